//! What the injector writes into a pod for the proxy to read: Istio's ports, and the app's probes and
//! scrape annotations handed over in `ISTIO_KUBE_APP_PROBERS` and `ISTIO_PROMETHEUS_ANNOTATIONS`,
//! both JSON in Istio's shapes. Both sides use these, so what one writes the other reads.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

/// The proxy's admin API, on the pod's loopback only.
pub const ADMIN_PORT: u16 = 15000;
/// The proxy's own Prometheus metrics.
pub const STATS_PORT: u16 = 15090;
/// The app's rewritten probes and the merged metrics.
pub const STATUS_PORT: u16 = 15020;
/// The kubelet's readiness probe of the proxy.
pub const READINESS_PORT: u16 = 15021;
pub const ENV_APP_PROBERS: &str = "ISTIO_KUBE_APP_PROBERS";
pub const ENV_PROMETHEUS_ANNOTATIONS: &str = "ISTIO_PROMETHEUS_ANNOTATIONS";
/// The kubelet's default when a probe names no timeout.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Ports the app's metrics may not be scraped from: the merge itself, and the proxy's own.
const RESERVED_METRICS_PORTS: [u16; 3] = [STATUS_PORT, STATS_PORT, ADMIN_PORT];

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
