//! Sidecar injection as Istio does it, as pure functions over plain Kubernetes types: [`select`] says
//! whether a pod gets a sidecar and, if not, why; [`template`] adds the sidecar; [`mutate`] is both,
//! answered as the JSON Patch an admission webhook returns. The webhook (`weft-injector`) and
//! `weftctl kube-inject` only parse and serialize around these.

pub mod admission;
pub mod manual;
pub mod probes;
pub mod select;
pub mod template;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
pub use select::Skip;

/// The audience of the token a sidecar proves its service account with, as Istio's CA expects it.
pub const AUDIENCE: &str = "istio-ca";

/// What the injector injects, as plain data (Istio's `values.global.proxy*` and the chart's defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectConfig {
    /// The weft-proxy image, for both the sidecar and its init step.
    pub proxy_image: String,
    /// The control plane's namespace, whose pods are never injected.
    pub control_plane_namespace: String,
    /// This injector's revision (`istio.io/rev`); Istio's default revision is `default`.
    pub revision: String,
    /// weftd's CA and secure xDS (Istio's `istiod.istio-system.svc:15012`).
    pub discovery_address: String,
    /// The sidecar as a native sidecar (an init container that keeps running), which Kubernetes
    /// serves from 1.29: it starts before the app and does not keep a Job from finishing.
    pub native_sidecars: bool,
    /// Without native sidecars, the app's containers start only once the proxy is ready (a postStart
    /// `weft-proxy wait` on the proxy); a pod overrides it in `proxy.istio.io/config`.
    pub hold_application_until_proxy_starts: bool,
    pub resources: ProxyResources,
}

/// The sidecar's requests and limits, overridable per pod with `sidecar.istio.io/proxyCPU`,
/// `proxyMemory`, `proxyCPULimit` and `proxyMemoryLimit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyResources {
    pub cpu: String,
    pub memory: String,
    pub cpu_limit: String,
    pub memory_limit: String,
}

impl Default for InjectConfig {
    /// Istio's chart defaults.
    fn default() -> Self {
        Self {
            proxy_image: "weft-proxy:latest".into(),
            control_plane_namespace: "istio-system".into(),
            revision: "default".into(),
            discovery_address: "istiod.istio-system.svc:15012".into(),
            native_sidecars: false,
            hold_application_until_proxy_starts: true,
            resources: ProxyResources {
                cpu: "100m".into(),
                memory: "128Mi".into(),
                cpu_limit: "2000m".into(),
                memory_limit: "1024Mi".into(),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MutateError {
    #[error("not injected: {0}")]
    Skipped(#[from] Skip),
    #[error("{0}")]
    Annotation(#[from] template::InvalidAnnotation),
    #[error("cannot encode the pod: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A pod injected, and the JSON Patch that makes it from the pod as it came.
#[derive(Clone, Debug, PartialEq)]
pub struct Injected {
    pub pod: Pod,
    pub patch: json_patch::Patch,
}

/// Injects `pod` if the rules say so. `namespace_labels` is `None` for a manual injection, which
/// ignores the namespace's labels.
pub fn mutate(
    pod: &Pod,
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
    config: &InjectConfig,
) -> Result<Injected, MutateError> {
    let empty = BTreeMap::new();
    let candidate = select::Candidate {
        namespace,
        labels: pod.metadata.labels.as_ref().unwrap_or(&empty),
        annotations: pod.metadata.annotations.as_ref().unwrap_or(&empty),
        host_network: pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false),
    };
    select::should_inject(candidate, namespace_labels, config)?;
    template::check_annotations(candidate.annotations)?;
    let injected = template::inject(pod, namespace, config);
    let patch = json_patch::diff(
        &serde_json::to_value(pod)?,
        &serde_json::to_value(&injected)?,
    );
    Ok(Injected {
        pod: injected,
        patch,
    })
}

#[cfg(test)]
mod tests;
