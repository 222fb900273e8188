//! The Kubernetes objects a mesh reads: Services, EndpointSlices and Pods.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ObjectMeta;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    /// A number or a named container port; a name resolves through the EndpointSlice's ports.
    #[serde(default)]
    pub target_port: Option<serde_json::Value>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// `discovery.k8s.io/v1` EndpointSlice; it names its Service with the `kubernetes.io/service-name` label.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: Option<String>,
    /// The API server writes `null` for a Service with no endpoints yet.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub endpoints: Vec<Endpoint>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub ports: Vec<EndpointPort>,
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// The label on an EndpointSlice that names the Service it belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl EndpointSlice {
    pub fn service_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(SERVICE_NAME_LABEL)
            .map(String::as_str)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default)]
    pub target_ref: Option<ObjectReference>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
}

/// Missing conditions mean ready, as the EndpointSlice API documents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointConditions {
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(default)]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// The parts of a Pod a mesh needs: its labels (for subsets and selectors) and its service account.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

/// A `discovery.k8s.io/v1beta1` EndpointSlice (all Kubernetes 1.20 serves) read as v1: each endpoint's
/// zone and node come from its `topology` labels where v1's own fields are absent, as Istio reads
/// slices on older clusters.
pub fn endpoint_slice_from_v1beta1(mut doc: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    if let Some(endpoints) = doc.get_mut("endpoints").and_then(Value::as_array_mut) {
        for ep in endpoints.iter_mut().filter_map(Value::as_object_mut) {
            let topology = ep.get("topology").cloned().unwrap_or(Value::Null);
            for (field, label) in [
                ("zone", "topology.kubernetes.io/zone"),
                ("nodeName", "kubernetes.io/hostname"),
            ] {
                if let Some(v) = topology.get(label).filter(|v| v.is_string()) {
                    ep.entry(field).or_insert_with(|| v.clone());
                }
            }
        }
    }
    if let Some(obj) = doc.as_object_mut() {
        obj.insert("apiVersion".into(), "discovery.k8s.io/v1".into());
    }
    doc
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_endpoint_slice_with_no_endpoints_yet_is_empty() {
        let slice: super::EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "istiod-x", "namespace": "istio-system"},
            "addressType": "IPv4", "endpoints": null, "ports": null,
        }))
        .expect("the API server's shape");
        assert!(slice.endpoints.is_empty() && slice.ports.is_empty());
    }

    use serde_json::json;

    use super::*;

    #[test]
    fn v1beta1_slices_read_as_v1() {
        let cases = [
            (
                json!({"addresses": ["10.0.0.1"], "topology": {"topology.kubernetes.io/zone": "a", "kubernetes.io/hostname": "n1"}}),
                (Some("a"), Some("n1")),
            ),
            // v1's own fields win over the topology labels.
            (
                json!({"addresses": ["10.0.0.1"], "nodeName": "n2", "topology": {"kubernetes.io/hostname": "n1"}}),
                (None, Some("n2")),
            ),
            (json!({"addresses": ["10.0.0.1"]}), (None, None)),
        ];
        for (endpoint, (zone, node)) in cases {
            let doc = json!({
                "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                "metadata": {"name": "s", "namespace": "n"}, "addressType": "IPv4",
                "endpoints": [endpoint.clone()],
            });
            let doc = endpoint_slice_from_v1beta1(doc);
            assert_eq!(doc["apiVersion"], "discovery.k8s.io/v1");
            let slice: EndpointSlice = serde_json::from_value(doc).expect("a v1 slice");
            let ep = &slice.endpoints[0];
            assert_eq!(ep.zone.as_deref(), zone, "{endpoint}");
            assert_eq!(ep.node_name.as_deref(), node, "{endpoint}");
        }
    }
}
