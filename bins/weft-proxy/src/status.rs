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
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
pub use weft_sidecar::pod::{
    AppMetrics, AppProbe, ENV_APP_PROBERS, ENV_PROMETHEUS_ANNOTATIONS, ProbeAction, READINESS_PORT,
    STATUS_PORT, Scheme, parse_app_metrics, parse_app_probes,
};

/// Prometheus sends its scrape timeout; without it, a stuck app must not hold the scrape forever.
const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// An app's metrics beyond this are refused rather than buffered.
const MAX_APP_METRICS_BYTES: usize = 10 * 1024 * 1024;

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
