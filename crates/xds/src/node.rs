//! Who a proxy is: Envoy's `Node` as plain data, and Istio's node id format.

use std::{fmt, net::IpAddr};

use serde_json::{Map, Value};

use crate::{pb::envoy::config::core::v3::Node, structs};

/// A proxy's `Node`, as plain data.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    pub id: String,
    pub cluster: String,
    pub metadata: Map<String, Value>,
}

impl NodeInfo {
    /// A string entry of the node metadata (`NAMESPACE`, `INTERCEPTION_MODE`, ...).
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }
}

impl From<&Node> for NodeInfo {
    fn from(node: &Node) -> Self {
        Self {
            id: node.id.clone(),
            cluster: node.cluster.clone(),
            metadata: node
                .metadata
                .as_ref()
                .map(structs::struct_to_json)
                .unwrap_or_default(),
        }
    }
}

impl From<&NodeInfo> for Node {
    fn from(info: &NodeInfo) -> Self {
        Node {
            id: info.id.clone(),
            cluster: info.cluster.clone(),
            metadata: Some(structs::json_to_struct(&info.metadata)),
            user_agent_name: "weft-proxy".into(),
            ..Default::default()
        }
    }
}

/// Istio's node id: `<type>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyId {
    /// `sidecar` or `router`.
    pub proxy_type: String,
    pub ip: IpAddr,
    pub pod_name: String,
    pub namespace: String,
    pub dns_domain: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid proxy node id {id:?}: {reason} (want <type>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>)"
)]
pub struct ProxyIdError {
    id: String,
    reason: &'static str,
}

impl std::str::FromStr for ProxyId {
    type Err = ProxyIdError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let err = |reason| ProxyIdError {
            id: id.to_string(),
            reason,
        };
        let parts: Vec<&str> = id.split('~').collect();
        let [proxy_type, ip, pod_dot_ns, domain] = parts[..] else {
            return Err(err("expected four parts separated by '~'"));
        };
        if !matches!(proxy_type, "sidecar" | "router") {
            return Err(err("type must be sidecar or router"));
        }
        let ip = ip
            .parse()
            .map_err(|_| err("the second part is not an IP address"))?;
        let (pod_name, namespace) = pod_dot_ns
            .rsplit_once('.')
            .ok_or_else(|| err("the third part is not <pod>.<namespace>"))?;
        Ok(ProxyId {
            proxy_type: proxy_type.into(),
            ip,
            pod_name: pod_name.into(),
            namespace: namespace.into(),
            dns_domain: domain.into(),
        })
    }
}

impl fmt::Display for ProxyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            proxy_type,
            ip,
            pod_name,
            namespace,
            dns_domain,
        } = self;
        write!(f, "{proxy_type}~{ip}~{pod_name}.{namespace}~{dns_domain}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_node_ids_round_trip_and_bad_ones_are_explained() {
        let id = "sidecar~10.1.2.3~reviews-v1-abc.bookinfo~bookinfo.svc.cluster.local";
        let parsed: ProxyId = id.parse().expect("valid id");
        assert_eq!(parsed.pod_name, "reviews-v1-abc");
        assert_eq!(parsed.namespace, "bookinfo");
        assert_eq!(parsed.to_string(), id);
        for bad in [
            "sidecar~1.2.3.4~pod",
            "gateway~1.2.3.4~p.ns~d",
            "sidecar~nope~p.ns~d",
            "sidecar~1.2.3.4~pod~d",
        ] {
            assert!(bad.parse::<ProxyId>().is_err(), "{bad}");
        }
    }
}
