//! The pod-facing health and metrics ports, as Istio's agent serves them. 15021 answers the kubelet's
//! readiness probe for the proxy. 15020 answers the app's own probes, which the injector rewrote to
//! come through here: the kubelet cannot speak the mesh's mTLS to a STRICT port, and under capture
//! the proxy would answer an app's TCP probe itself. 15020 also serves the proxy's metrics merged
//! with the app's, so one scrape annotation covers both.
//!
//! The injector hands the app's probes over in `ISTIO_KUBE_APP_PROBERS` and its scrape annotations
//! in `ISTIO_PROMETHEUS_ANNOTATIONS`, both JSON in Istio's shapes; they are parsed once, at start.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

pub const STATUS_PORT: u16 = 15020;
pub const READINESS_PORT: u16 = 15021;
pub const ENV_APP_PROBERS: &str = "ISTIO_KUBE_APP_PROBERS";
pub const ENV_PROMETHEUS_ANNOTATIONS: &str = "ISTIO_PROMETHEUS_ANNOTATIONS";
/// The kubelet's default when a probe names no timeout.
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Prometheus sends its scrape timeout; without it, a stuck app must not hold the scrape forever.
const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// An app's metrics beyond this are refused rather than buffered.
const MAX_APP_METRICS_BYTES: usize = 10 * 1024 * 1024;
/// Ports the app's metrics may not be scraped from: this merge itself, and the proxy's own.
const RESERVED_METRICS_PORTS: [u16; 3] = [STATUS_PORT, crate::config::STATS_PORT, 15000];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// One app probe, as the kubelet would have sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeAction {
    Http {
        scheme: Scheme,
        /// The probe's `host`, else the pod's IP (where the kubelet sends it).
        host: Option<String>,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: Option<String>,
        port: u16,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppProbe {
    pub action: ProbeAction,
    pub timeout: Duration,
}

/// Where the app's own metrics are, from its original `prometheus.io/*` annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppMetrics {
    pub port: u16,
    pub path: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawProbe {
    http_get: Option<RawHttpGet>,
    tcp_socket: Option<RawTcpSocket>,
    grpc: Option<serde_json::Value>,
    timeout_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawHttpGet {
    path: Option<String>,
    port: serde_json::Value,
    host: Option<String>,
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<RawHeader>,
}

#[derive(Deserialize)]
struct RawHeader {
    name: String,
    value: String,
}

#[derive(Deserialize)]
struct RawTcpSocket {
    port: serde_json::Value,
    host: Option<String>,
}

#[derive(Deserialize)]
struct RawScrape {
    scrape: Option<String>,
    path: Option<String>,
    port: Option<String>,
}

/// Reads `ISTIO_KUBE_APP_PROBERS`: a map from `/app-health/<container>/livez|readyz|startupz` to the
/// probe it stands for. Ports must be numbers (the injector resolved named ones).
pub fn parse_app_probes(json: &str) -> Result<BTreeMap<String, AppProbe>, String> {
    let raw: BTreeMap<String, RawProbe> =
        serde_json::from_str(json).map_err(|e| format!("not a map of probes: {e}"))?;
    raw.into_iter()
        .map(|(path, probe)| {
            if !is_app_health_path(&path) {
                return Err(format!(
                    "{path:?} is not /app-health/<container>/livez, readyz or startupz"
                ));
            }
            let timeout = match probe.timeout_seconds {
                None | Some(0) => DEFAULT_PROBE_TIMEOUT,
                Some(s) => Duration::from_secs(s),
            };
            let action = match (probe.http_get, probe.tcp_socket, probe.grpc) {
                (Some(h), None, None) => ProbeAction::Http {
                    scheme: match h.scheme.as_deref().map(str::to_ascii_uppercase).as_deref() {
                        None | Some("HTTP") => Scheme::Http,
                        Some("HTTPS") => Scheme::Https,
                        Some(other) => return Err(format!("{path}: scheme {other:?} is not HTTP or HTTPS")),
                    },
                    host: h.host.filter(|h| !h.is_empty()),
                    port: probe_port(&path, &h.port)?,
                    path: match h.path {
                        Some(p) if p.starts_with('/') => p,
                        Some(p) => format!("/{p}"),
                        None => "/".into(),
                    },
                    headers: h.http_headers.into_iter().map(|h| (h.name, h.value)).collect(),
                },
                (None, Some(t), None) => ProbeAction::Tcp {
                    host: t.host.filter(|h| !h.is_empty()),
                    port: probe_port(&path, &t.port)?,
                },
                (None, None, Some(_)) => {
                    return Err(format!(
                        "{path}: gRPC probes are not sent by the proxy; leave them to the kubelet (weft-injector does)"
                    ));
                }
                _ => return Err(format!("{path}: exactly one of httpGet or tcpSocket")),
            };
            Ok((path, AppProbe { action, timeout }))
        })
        .collect()
}

fn is_app_health_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/app-health/") else {
        return false;
    };
    matches!(rest.split_once('/'), Some((container, kind))
        if !container.is_empty() && !container.contains('/') && matches!(kind, "livez" | "readyz" | "startupz"))
}

fn probe_port(path: &str, port: &serde_json::Value) -> Result<u16, String> {
    port.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{path}: port {port} is not a port number"))
}

/// Reads `ISTIO_PROMETHEUS_ANNOTATIONS` (`{"scrape":"true","port":"9080","path":"/metrics"}`, the
/// app's own annotations before the injector pointed them at 15020). `None` when the app is not
/// scraped.
pub fn parse_app_metrics(json: &str) -> Result<Option<AppMetrics>, String> {
    let raw: RawScrape =
        serde_json::from_str(json).map_err(|e| format!("not scrape annotations: {e}"))?;
    if raw.scrape.as_deref() == Some("false") {
        return Ok(None);
    }
    let port_text = raw.port.unwrap_or_else(|| "80".into());
    let port: u16 = port_text
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {port_text:?} is not a port number"))?;
    if RESERVED_METRICS_PORTS.contains(&port) {
        return Err(format!(
            "port {port} is the proxy's own; scraping it from {STATUS_PORT} would count the proxy twice or loop (was the pod injected twice?)"
        ));
    }
    Ok(Some(AppMetrics {
        port,
        path: match raw.path {
            Some(p) if p.starts_with('/') => p,
            Some(p) if !p.is_empty() => format!("/{p}"),
            _ => "/metrics".into(),
        },
    }))
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS to {0} failed: {1}")]
    Tls(SocketAddr, String),
    #[error("HTTP to {0} failed: {1}")]
    Http(SocketAddr, String),
    #[error("{0} did not answer within {1:?}")]
    Timeout(SocketAddr, Duration),
}

/// The app side of 15020: its probes and metrics, and where the app is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppStatus {
    pub probes: BTreeMap<String, AppProbe>,
    pub metrics: Option<AppMetrics>,
    /// Where probes go without a `host`: the pod's IP, as the kubelet sends them.
    pub probe_ip: std::net::IpAddr,
    /// Where the app's metrics are scraped: the pod's loopback under capture, as Istio's agent does.
    pub metrics_ip: std::net::IpAddr,
}

impl AppStatus {
    /// Runs the probe for `path` and answers with its outcome: the app's status code for HTTP (the
    /// kubelet reads 200–399 as success), 200 for a TCP connect, 500 when the app cannot be reached.
    pub async fn probe(&self, path: &str, incoming: &HeaderMap) -> (StatusCode, String) {
        let Some(probe) = self.probes.get(path) else {
            return (
                StatusCode::BAD_REQUEST,
                format!("no app probe is configured for {path}\n"),
            );
        };
        let resolve = |host: &Option<String>, port: u16| -> Result<SocketAddr, String> {
            match host {
                None => Ok(SocketAddr::new(self.probe_ip, port)),
                Some(h) => h
                    .parse::<std::net::IpAddr>()
                    .map(|ip| SocketAddr::new(ip, port))
                    .map_err(|_| format!("probe host {h:?} is not an IP address")),
            }
        };
        let result = match &probe.action {
            ProbeAction::Tcp { host, port } => match resolve(host, *port) {
                Err(e) => Err(e),
                Ok(addr) => connect(addr, probe.timeout)
                    .await
                    .map(|_| StatusCode::OK)
                    .map_err(|e| e.to_string()),
            },
            ProbeAction::Http {
                scheme,
                host,
                port,
                path: app_path,
                headers,
            } => match resolve(host, *port) {
                Err(e) => Err(e),
                Ok(addr) => {
                    // The kubelet's headers go on to the app (its User-Agent says it is a probe);
                    // its Host named this port, not the app's.
                    let mut request_headers = incoming.clone();
                    request_headers.remove(header::HOST);
                    request_headers.remove(header::CONNECTION);
                    for (name, value) in headers {
                        if let (Ok(n), Ok(v)) = (
                            http::HeaderName::try_from(name.as_str()),
                            HeaderValue::try_from(value.as_str()),
                        ) {
                            request_headers.append(n, v);
                        }
                    }
                    fetch(addr, scheme, app_path, request_headers, probe.timeout, 0)
                        .await
                        .map(|(status, _)| status)
                        .map_err(|e| e.to_string())
                }
            },
        };
        match result {
            Ok(status) => (status, String::new()),
            Err(e) => {
                tracing::warn!(probe = path, error = %e, "app probe failed");
                (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
            }
        }
    }

    /// The app's metrics text, or `None` (and a warning) when it cannot be had: the proxy's own
    /// metrics are served regardless, as Istio's agent does.
    pub async fn scrape_app(&self, incoming: &HeaderMap) -> Option<Bytes> {
        let metrics = self.metrics.as_ref()?;
        let timeout = incoming
            .get("x-prometheus-scrape-timeout-seconds")
            .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(DEFAULT_SCRAPE_TIMEOUT, Duration::from_secs_f64);
        let mut headers = HeaderMap::new();
        for name in [header::USER_AGENT, header::ACCEPT] {
            if let Some(v) = incoming.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        headers.insert(
            "x-prometheus-scrape-timeout-seconds",
            HeaderValue::from_str(&timeout.as_secs_f64().to_string()).ok()?,
        );
        let addr = SocketAddr::new(self.metrics_ip, metrics.port);
        match fetch(
            addr,
            &Scheme::Http,
            &metrics.path,
            headers,
            timeout,
            MAX_APP_METRICS_BYTES,
        )
        .await
        {
            Ok((StatusCode::OK, body)) => Some(body),
            Ok((status, _)) => {
                tracing::warn!(%addr, path = %metrics.path, %status, "the app's metrics answered with an error");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot scrape the app's metrics");
                None
            }
        }
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, FetchError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(FetchError::Timeout(addr, timeout)),
        Ok(r) => r.map_err(|e| FetchError::Connect(addr, e)),
    }
}

/// One GET, on a connection of its own (as the kubelet probes: no keep-alive to go stale). The body
/// is read up to `limit` bytes, or not at all when `limit` is 0.
async fn fetch(
    addr: SocketAddr,
    scheme: &Scheme,
    path: &str,
    headers: HeaderMap,
    timeout: Duration,
    limit: usize,
) -> Result<(StatusCode, Bytes), FetchError> {
    let work = async {
        let tcp = connect(addr, timeout).await?;
        match scheme {
            Scheme::Http => get(tcp, addr, path, headers, limit).await,
            Scheme::Https => {
                let config = weft_certs::probe_client_config()
                    .map_err(|e| FetchError::Tls(addr, e.to_string()))?;
                let (tls, _) = weft_certs::connect(&config, &addr.ip().to_string(), tcp)
                    .await
                    .map_err(|e| FetchError::Tls(addr, e.to_string()))?;
                get(tls, addr, path, headers, limit).await
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| FetchError::Timeout(addr, timeout))?
}

async fn get<IO>(
    io: IO,
    addr: SocketAddr,
    path: &str,
    headers: HeaderMap,
    limit: usize,
) -> Result<(StatusCode, Bytes), FetchError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http_error = |e: &dyn std::fmt::Display| FetchError::Http(addr, e.to_string());
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| http_error(&e))?;
    let mut request = Request::get(path)
        .body(Empty::<Bytes>::new())
        .map_err(|e| http_error(&e))?;
    *request.headers_mut() = headers;
    // A probe's own `Host` header wins, as with the kubelet.
    if let Ok(host) = HeaderValue::from_str(&addr.to_string()) {
        request.headers_mut().entry(header::HOST).or_insert(host);
    }
    request
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http_error(&e))?;
        let status = response.status();
        if limit == 0 {
            return Ok((status, Bytes::new()));
        }
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| http_error(&e))?;
        Ok((status, body.to_bytes()))
    };
    // The connection is driven here, beside the exchange, so nothing outlives this call.
    let (result, _) = tokio::join!(exchange, connection);
    result
}

/// What `weft-proxy wait` polls: the proxy's readiness port on the pod's loopback.
pub const DEFAULT_WAIT_URL: &str = "http://localhost:15021/healthz/ready";

/// Polls `url` until it answers 200 or `deadline` passes, as Istio's `pilot-agent wait`: the app's
/// containers are started only once their proxy is ready, so their first connections do not fail.
pub async fn wait_until_ready(
    url: &str,
    deadline: Duration,
    period: Duration,
    request_timeout: Duration,
) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?}: only http:// is polled"));
    }
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let ip: std::net::IpAddr = if host == "localhost" {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        host.parse()
            .map_err(|_| format!("{url:?}: the host must be localhost or an IP address"))?
    };
    let addr = SocketAddr::new(ip, uri.port_u16().unwrap_or(80));
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        let last = match fetch(
            addr,
            &Scheme::Http,
            &path,
            HeaderMap::new(),
            request_timeout,
            0,
        )
        .await
        {
            Ok((StatusCode::OK, _)) => return Ok(()),
            Ok((status, _)) => format!("{url} answered {status}"),
            Err(e) => e.to_string(),
        };
        let now = tokio::time::Instant::now();
        if now >= give_up {
            return Err(format!(
                "the proxy was not ready within {deadline:?}: {last}"
            ));
        }
        tokio::time::sleep(period.min(give_up - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_probes_are_read_in_istios_shape() {
        let probes = parse_app_probes(
            r#"{"/app-health/web/livez":{"httpGet":{"path":"healthz","port":8080,"scheme":"HTTPS","httpHeaders":[{"name":"X-Probe","value":"1"}]},"timeoutSeconds":3},
                "/app-health/web/readyz":{"tcpSocket":{"port":8080}}}"#,
        )
        .expect("valid probes");
        assert_eq!(
            probes["/app-health/web/livez"],
            AppProbe {
                action: ProbeAction::Http {
                    scheme: Scheme::Https,
                    host: None,
                    port: 8080,
                    path: "/healthz".into(),
                    headers: vec![("X-Probe".into(), "1".into())],
                },
                timeout: Duration::from_secs(3),
            }
        );
        assert_eq!(
            probes["/app-health/web/readyz"],
            AppProbe {
                action: ProbeAction::Tcp {
                    host: None,
                    port: 8080
                },
                timeout: DEFAULT_PROBE_TIMEOUT,
            }
        );
    }

    #[test]
    fn bad_app_probes_are_refused_with_the_reason() {
        for (json, reason) in [
            ("nope", "not a map"),
            (
                r#"{"/healthz":{"tcpSocket":{"port":1}}}"#,
                "is not /app-health",
            ),
            (
                r#"{"/app-health/web/deadz":{"tcpSocket":{"port":1}}}"#,
                "is not /app-health",
            ),
            (
                r#"{"/app-health/web/livez":{"httpGet":{"port":"http"}}}"#,
                "not a port number",
            ),
            (
                r#"{"/app-health/web/livez":{"httpGet":{"port":70000}}}"#,
                "not a port number",
            ),
            (r#"{"/app-health/web/livez":{"grpc":{"port":1}}}"#, "gRPC"),
            (r#"{"/app-health/web/livez":{}}"#, "exactly one"),
            (r#"{"/app-health/web/livez":{"exec":{}}}"#, "unknown field"),
            (
                r#"{"/app-health/web/livez":{"httpGet":{"port":1,"scheme":"FTP"}}}"#,
                "FTP",
            ),
        ] {
            let err = parse_app_probes(json).expect_err(json);
            assert!(err.contains(reason), "{json}: {err}");
        }
    }

    #[test]
    fn app_metrics_follow_prometheus_defaults_and_refuse_the_proxys_ports() {
        assert_eq!(
            parse_app_metrics(r#"{"scrape":"true","port":"9080","path":"/m"}"#),
            Ok(Some(AppMetrics {
                port: 9080,
                path: "/m".into()
            }))
        );
        assert_eq!(
            parse_app_metrics(r#"{"scrape":"true"}"#),
            Ok(Some(AppMetrics {
                port: 80,
                path: "/metrics".into()
            }))
        );
        assert_eq!(
            parse_app_metrics(r#"{"scrape":"false","port":"1"}"#),
            Ok(None)
        );
        for bad in [
            r#"{"port":"15020"}"#,
            r#"{"port":"15090"}"#,
            r#"{"port":"x"}"#,
            "[]",
        ] {
            assert!(parse_app_metrics(bad).is_err(), "{bad}");
        }
    }
}
