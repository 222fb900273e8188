//! The proxy's settings, read from Istio's environment variables (`POD_NAME`, `POD_NAMESPACE`,
//! `INSTANCE_IP`, `SERVICE_ACCOUNT`, `ISTIO_META_*`) through a lookup function so tests pass a map.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde_json::{Map, Value};
use weft_certs::SpiffeId;
use weft_xds::{NodeInfo, ProxyId};

use crate::{
    identity::IdentityConfig,
    status::{self, AppStatus},
};

pub const ENV_POD_NAME: &str = "POD_NAME";
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
pub const ENV_INSTANCE_IP: &str = "INSTANCE_IP";
pub const ENV_SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
/// Istio passes pod labels to the agent as JSON in this variable.
pub const ENV_LABELS_JSON: &str = "ISTIO_METAJSON_LABELS";
pub const ENV_META_PREFIX: &str = "ISTIO_META_";
/// Istio's agent settings for certificates.
pub const ENV_CA_ADDR: &str = "CA_ADDR";
pub const ENV_LISTENER_DRAIN: &str = "WEFT_LISTENER_DRAIN_DURATION";
pub const DEFAULT_LISTENER_DRAIN: Duration = Duration::from_secs(5);
/// The DNS name the control plane's certificate must carry, as Istio's agent takes it.
pub const ENV_ISTIOD_SAN: &str = "ISTIOD_SAN";
pub const DEFAULT_ISTIOD_SAN: &str = "istiod.istio-system.svc";
pub const ENV_TRUST_DOMAIN: &str = "TRUST_DOMAIN";
pub const ENV_SECRET_TTL: &str = "SECRET_TTL";
/// Where the trust bundle and bootstrap token are, defaulting to where Istio mounts them in a pod.
pub const ENV_ROOT_CERT: &str = "WEFT_CA_ROOT_CERT";
pub const ENV_TOKEN_FILE: &str = "WEFT_CA_TOKEN_FILE";
const DEFAULT_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";
const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";
pub use weft_sidecar::pod::{ADMIN_PORT, STATS_PORT};

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub xds_address: String,
    pub node: NodeInfo,
    pub admin_address: SocketAddr,
    pub stats_address: SocketAddr,
    /// Istio's status port (15020): app probes and merged metrics.
    pub status_address: SocketAddr,
    /// Istio's readiness port (15021): the kubelet's probe of the proxy.
    pub readiness_address: SocketAddr,
    pub app_status: AppStatus,
    pub drain_duration: Duration,
    /// How long connections accepted under a listener's previous config may go on after it changes:
    /// HTTP/1.1 ones are told `Connection: close` on their next response meanwhile, then closed;
    /// long-lived ones (TCP, WebSocket) are closed then if the new config no longer authorizes them.
    pub listener_drain: Duration,
    /// This workload, for the `source_*`/`destination_*` metric labels.
    pub workload: Workload,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub spiffe_id: SpiffeId,
    /// Where to get certificates; `None` (no `CA_ADDR`) runs without an identity, plaintext only.
    pub identity: Option<IdentityConfig>,
}

/// Go-style durations as Istio's agent takes them (`24h`, `90m`, `1h30m`, `45s`).
fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut number = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let unit = match (c, chars.peek()) {
            ('m', Some('s')) => {
                chars.next();
                0.001
            }
            ('h', _) => 3600.0,
            ('m', _) => 60.0,
            ('s', _) => 1.0,
            _ => return None,
        };
        total += number.parse::<f64>().ok()? * unit;
        number.clear();
    }
    (number.is_empty() && total > 0.0).then(|| Duration::from_secs_f64(total))
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("invalid {name}={value:?}: {reason}")]
    Invalid {
        name: String,
        value: String,
        reason: String,
    },
}

impl Config {
    /// `vars` lists every environment variable (for `ISTIO_META_*`); `get` looks one up.
    pub fn from_env(xds_address: String, vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let pod = get(ENV_POD_NAME).ok_or(ConfigError::Missing(ENV_POD_NAME))?;
        let namespace = get(ENV_POD_NAMESPACE).unwrap_or_else(|| "default".into());
        let ip_text = get(ENV_INSTANCE_IP).ok_or(ConfigError::Missing(ENV_INSTANCE_IP))?;
        let ip: IpAddr = ip_text.parse().map_err(|_| ConfigError::Invalid {
            name: ENV_INSTANCE_IP.into(),
            value: ip_text.clone(),
            reason: "not an IP address".into(),
        })?;
        let sa = get(ENV_SERVICE_ACCOUNT).unwrap_or_else(|| "default".into());
        let mut metadata = Map::new();
        for (k, v) in vars {
            if let Some(key) = k.strip_prefix(ENV_META_PREFIX) {
                metadata.insert(key.to_string(), Value::String(v.clone()));
            }
        }
        let labels: Map<String, Value> = match get(ENV_LABELS_JSON) {
            Some(json) => serde_json::from_str(&json).map_err(|e| ConfigError::Invalid {
                name: ENV_LABELS_JSON.into(),
                value: json.clone(),
                reason: e.to_string(),
            })?,
            None => Map::new(),
        };
        metadata.insert("LABELS".into(), Value::Object(labels.clone()));
        metadata.insert("NAMESPACE".into(), Value::String(namespace.clone()));
        metadata.insert("INSTANCE_IPS".into(), Value::String(ip.to_string()));
        metadata.insert("SERVICE_ACCOUNT".into(), Value::String(sa.clone()));
        // Istio's agent reports its version here; `weftctl proxy-status` and `version` show it.
        metadata.insert(
            "ISTIO_VERSION".into(),
            Value::String(weft_telemetry::VERSION.into()),
        );
        metadata
            .entry("INTERCEPTION_MODE")
            .or_insert_with(|| Value::String("NONE".into()));
        let captured = match metadata.get("INTERCEPTION_MODE").and_then(Value::as_str) {
            Some("NONE") => false,
            Some("REDIRECT") => true,
            other => {
                return Err(ConfigError::Invalid {
                    name: "ISTIO_META_INTERCEPTION_MODE".into(),
                    value: other.unwrap_or_default().to_string(),
                    reason:
                        "NONE (explicit listeners) or REDIRECT (iptables capture) are supported"
                            .into(),
                });
            }
        };
        let string_labels: std::collections::BTreeMap<String, String> = labels
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect();
        use weft_telemetry::workload;
        let app =
            workload::canonical_name(&string_labels).map_or_else(|| pod.clone(), str::to_string);
        let version = workload::canonical_revision(&string_labels)
            .unwrap_or("latest")
            .to_string();
        let workload_name = metadata
            .get("WORKLOAD_NAME")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| workload::workload_name(&string_labels, Some(&pod)));
        let listener_drain = match get(ENV_LISTENER_DRAIN) {
            None => DEFAULT_LISTENER_DRAIN,
            Some(t) => parse_go_duration(&t).ok_or_else(|| ConfigError::Invalid {
                name: ENV_LISTENER_DRAIN.into(),
                value: t.clone(),
                reason: "a duration such as 5s".into(),
            })?,
        };
        let trust_domain = get(ENV_TRUST_DOMAIN).unwrap_or_else(|| "cluster.local".into());
        let spiffe_id = SpiffeId::new(&trust_domain, &namespace, &sa);
        let identity = match get(ENV_CA_ADDR) {
            None => None,
            Some(addr) => {
                let ttl = match get(ENV_SECRET_TTL) {
                    None => weft_certs::DEFAULT_WORKLOAD_TTL,
                    Some(t) => parse_go_duration(&t).ok_or_else(|| ConfigError::Invalid {
                        name: ENV_SECRET_TTL.into(),
                        value: t.clone(),
                        reason: "a duration such as 24h, 90m or 45s".into(),
                    })?,
                };
                Some(IdentityConfig {
                    ca_address: if addr.contains("://") {
                        addr
                    } else {
                        format!("https://{addr}")
                    },
                    root_cert: get(ENV_ROOT_CERT)
                        .unwrap_or_else(|| DEFAULT_ROOT_CERT.into())
                        .into(),
                    token_file: Some(
                        get(ENV_TOKEN_FILE)
                            .unwrap_or_else(|| DEFAULT_TOKEN_FILE.into())
                            .into(),
                    ),
                    control_plane: get(ENV_ISTIOD_SAN).unwrap_or_else(|| DEFAULT_ISTIOD_SAN.into()),
                    ttl,
                })
            }
        };
        if xds_address.starts_with("https://") && identity.is_none() {
            return Err(ConfigError::Invalid {
                name: ENV_CA_ADDR.into(),
                value: String::new(),
                reason: format!(
                    "xDS over mTLS ({xds_address}) needs a workload certificate; set CA_ADDR to weftd's CA (its 15012)"
                ),
            });
        }
        let app_status = AppStatus {
            probes: match get(status::ENV_APP_PROBERS) {
                None => Default::default(),
                Some(json) => {
                    status::parse_app_probes(&json).map_err(|reason| ConfigError::Invalid {
                        name: status::ENV_APP_PROBERS.into(),
                        value: json.clone(),
                        reason,
                    })?
                }
            },
            metrics: match get(status::ENV_PROMETHEUS_ANNOTATIONS) {
                None => None,
                Some(json) => {
                    status::parse_app_metrics(&json).map_err(|reason| ConfigError::Invalid {
                        name: status::ENV_PROMETHEUS_ANNOTATIONS.into(),
                        value: json.clone(),
                        reason,
                    })?
                }
            },
            probe_ip: ip,
            metrics_ip: if captured {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                ip
            },
        };
        // Under capture the pod has its own loopback, so admin stays local while the ports the kubelet
        // and Prometheus reach listen on every address (the capture excludes them), as in an Istio pod.
        // In explicit mode several proxies share one machine, so each binds its own workload address.
        let on = |port: u16, local: bool| {
            let any: IpAddr = if local {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            };
            SocketAddr::new(if captured { any } else { ip }, port)
        };
        let id = ProxyId {
            proxy_type: "sidecar".into(),
            ip,
            pod_name: pod,
            namespace: namespace.clone(),
            dns_domain: format!("{namespace}.svc.cluster.local"),
        };
        Ok(Self {
            xds_address,
            node: NodeInfo {
                id: id.to_string(),
                cluster: app.clone(),
                metadata,
            },
            admin_address: on(ADMIN_PORT, true),
            stats_address: on(STATS_PORT, false),
            status_address: on(status::STATUS_PORT, false),
            readiness_address: on(status::READINESS_PORT, false),
            app_status,
            drain_duration: Duration::from_secs(5),
            listener_drain,
            workload: Workload {
                name: workload_name,
                namespace,
                app,
                version,
                service_account: sa,
            },
            spiffe_id,
            identity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn node_is_built_like_istios_agent() {
        let c = Config::from_env(
            "http://127.0.0.1:15010".into(),
            &vars(&[
                ("POD_NAME", "backend-v1-0"),
                ("POD_NAMESPACE", "demo"),
                ("INSTANCE_IP", "127.0.0.21"),
                ("SERVICE_ACCOUNT", "backend"),
                (
                    "ISTIO_METAJSON_LABELS",
                    r#"{"app":"backend","version":"v1"}"#,
                ),
                ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
            ]),
        )
        .expect("valid");
        assert_eq!(
            c.node.id,
            "sidecar~127.0.0.21~backend-v1-0.demo~demo.svc.cluster.local"
        );
        assert_eq!(c.node.meta_str("INTERCEPTION_MODE"), Some("NONE"));
        assert_eq!(c.node.meta_str("CLUSTER_ID"), Some("Kubernetes"));
        assert_eq!(c.workload.name, "backend-v1");
        assert_eq!(c.admin_address.to_string(), "127.0.0.21:15000");
    }

    #[test]
    fn identity_settings_follow_istios_agent() {
        let base = [
            ("POD_NAME", "web-0"),
            ("POD_NAMESPACE", "demo"),
            ("INSTANCE_IP", "10.0.0.1"),
            ("SERVICE_ACCOUNT", "web"),
        ];
        let c = Config::from_env(String::new(), &vars(&base)).expect("valid");
        assert_eq!(c.identity, None, "no CA_ADDR, no identity");
        assert_eq!(
            c.spiffe_id.to_string(),
            "spiffe://cluster.local/ns/demo/sa/web"
        );
        let mut with_ca = base.to_vec();
        with_ca.extend([("CA_ADDR", "weftd:15012"), ("SECRET_TTL", "1h30m")]);
        let c = Config::from_env(String::new(), &vars(&with_ca)).expect("valid");
        let identity = c.identity.expect("identity");
        assert_eq!(identity.ca_address, "https://weftd:15012");
        assert_eq!(identity.ttl, Duration::from_secs(5400));
        assert_eq!(identity.control_plane, "istiod.istio-system.svc");
        let err = Config::from_env("https://weftd:15012".into(), &vars(&base)).expect_err("no CA");
        assert!(err.to_string().contains("CA_ADDR"), "{err}");
        assert_eq!(parse_go_duration("24h"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("soon"), None);
    }

    #[test]
    fn missing_and_bad_values_name_the_variable() {
        assert_eq!(
            Config::from_env(String::new(), &vars(&[("INSTANCE_IP", "1.2.3.4")])),
            Err(ConfigError::Missing("POD_NAME"))
        );
        let err = Config::from_env(
            String::new(),
            &vars(&[("POD_NAME", "p"), ("INSTANCE_IP", "nope")]),
        )
        .expect_err("invalid");
        assert!(err.to_string().contains("INSTANCE_IP"), "{err}");
    }
}
