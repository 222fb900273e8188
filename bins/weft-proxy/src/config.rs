//! The proxy's settings, read from Istio's environment variables (`POD_NAME`, `POD_NAMESPACE`,
//! `INSTANCE_IP`, `SERVICE_ACCOUNT`, `ISTIO_META_*`) through a lookup function so tests pass a map.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde_json::{Map, Value};
use weft_xds::{NodeInfo, ProxyId};

pub const ENV_POD_NAME: &str = "POD_NAME";
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
pub const ENV_INSTANCE_IP: &str = "INSTANCE_IP";
pub const ENV_SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
/// Istio passes pod labels to the agent as JSON in this variable.
pub const ENV_LABELS_JSON: &str = "ISTIO_METAJSON_LABELS";
pub const ENV_META_PREFIX: &str = "ISTIO_META_";
pub const ADMIN_PORT: u16 = 15000;
pub const STATS_PORT: u16 = 15090;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub xds_address: String,
    pub node: NodeInfo,
    pub admin_address: SocketAddr,
    pub stats_address: SocketAddr,
    pub drain_duration: Duration,
    /// This workload, for the `source_*`/`destination_*` metric labels.
    pub workload: Workload,
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
        let label = |k: &str| labels.get(k).and_then(Value::as_str).map(str::to_string);
        let app = label("app")
            .or_else(|| label("app.kubernetes.io/name"))
            .unwrap_or_else(|| pod.clone());
        let version = label("version").unwrap_or_else(|| "latest".into());
        let workload_name = metadata
            .get("WORKLOAD_NAME")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| {
                if label("version").is_some() {
                    format!("{app}-{version}")
                } else {
                    app.clone()
                }
            });
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
            // Under capture the pod has its own loopback, so admin stays local and metrics listen on every
            // address (15090 is excluded from capture), as in an Istio pod. In explicit mode several proxies
            // share one machine, so each binds its own workload address.
            admin_address: if captured {
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), ADMIN_PORT)
            } else {
                SocketAddr::new(ip, ADMIN_PORT)
            },
            stats_address: if captured {
                SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), STATS_PORT)
            } else {
                SocketAddr::new(ip, STATS_PORT)
            },
            drain_duration: Duration::from_secs(5),
            workload: Workload {
                name: workload_name,
                namespace,
                app,
                version,
                service_account: sa,
            },
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
