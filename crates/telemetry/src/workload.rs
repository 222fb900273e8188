//! How a workload is named in metrics, one rule for both sides of a request: the proxy names itself
//! with it, and weftd names endpoints with it, so a pod is the same `source_workload` and
//! `destination_workload` wherever it is seen. The rule is Istio's canonical service labels.

use std::collections::BTreeMap;

/// Istio's canonical service name: `service.istio.io/canonical-name`, then `app.kubernetes.io/name`,
/// then `app`.
pub fn canonical_name(labels: &BTreeMap<String, String>) -> Option<&str> {
    [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .map(String::as_str)
}

/// Istio's canonical revision: `service.istio.io/canonical-revision`, then `app.kubernetes.io/version`,
/// then `version`.
pub fn canonical_revision(labels: &BTreeMap<String, String>) -> Option<&str> {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .map(String::as_str)
}

/// The workload name when its owner (a Deployment) is not known, as in a directory of manifests: the
/// canonical name with its revision (`reviews-v2`, as Deployments are usually named), else the name
/// alone, else the pod's name.
pub fn workload_name(labels: &BTreeMap<String, String>, pod: Option<&str>) -> String {
    match (canonical_name(labels), canonical_revision(labels)) {
        (Some(app), Some(rev)) => format!("{app}-{rev}"),
        (Some(app), None) => app.to_string(),
        _ => pod.unwrap_or("unknown").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_name_whichever_labels_a_pod_has() {
        let l = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        for (labels, pod, want) in [
            (l(&[("app", "web"), ("version", "v1")]), None, "web-v1"),
            (
                l(&[("app", "web"), ("app.kubernetes.io/name", "site")]),
                None,
                "site",
            ),
            (
                l(&[
                    ("app", "web"),
                    ("service.istio.io/canonical-name", "portal"),
                    ("version", "v2"),
                ]),
                None,
                "portal-v2",
            ),
            (
                l(&[("app.kubernetes.io/version", "3")]),
                Some("web-0"),
                "web-0",
            ),
            (l(&[]), None, "unknown"),
        ] {
            assert_eq!(workload_name(&labels, pod), want, "{labels:?}");
        }
    }
}
