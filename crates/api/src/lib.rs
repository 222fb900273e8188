//! Weft's config model: the Kubernetes and Istio resources a user writes, as plain data.
//!
//! Both config sources (a directory of YAML manifests today, the Kubernetes API later) produce these same
//! types, so everything downstream is independent of where config came from. Spec types reject fields
//! Weft does not act on (`deny_unknown_fields`): a resource that asks for behaviour Weft cannot give is
//! reported and skipped rather than half-applied.

pub mod analyze;
pub mod istio;
pub mod k8s;
pub mod kinds;
mod load;
pub mod names;
pub mod peer_auth;
pub mod protocol;
pub mod values;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use load::{
    LoadError, MAX_FILE_BYTES, ManifestFile, Rejected, Resources, is_mesh_kind, list_manifests,
    load_dir, parse_duration, parse_manifests, parse_object, read_documents,
};

/// The namespace a resource lands in when its manifest names none, as `kubectl apply` does.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `metadata` of any object. Only the fields Weft reads; others (uid, annotations set by tools) are ignored
/// because they never change behaviour.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl ObjectMeta {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }
}

/// An object with its metadata and its typed spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Object<S> {
    pub metadata: ObjectMeta,
    pub spec: S,
}

/// `matchLabels`-style selection by exact label values, as Istio's `workloadSelector` and a Service's
/// `selector` do. An empty selector selects everything.
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
