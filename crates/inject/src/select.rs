//! Which pods get a sidecar, by Istio's rules: the namespace's `istio-injection` or `istio.io/rev`
//! label, the pod's `sidecar.istio.io/inject` label (or the deprecated annotation of that name) and
//! its `istio.io/rev`, never in `kube-system`, `kube-public` or the control plane's namespace, never a
//! host-network pod, and never twice.

use std::collections::BTreeMap;

use crate::InjectConfig;

pub const NAMESPACE_LABEL: &str = "istio-injection";
pub const REVISION_LABEL: &str = "istio.io/rev";
pub const INJECT: &str = "sidecar.istio.io/inject";
/// Set on an injected pod; its presence means the pod was injected already.
pub const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Namespaces Istio's injector never touches.
pub const IGNORED_NAMESPACES: [&str; 2] = ["kube-system", "kube-public"];

/// Why a pod is not injected: what the admission answer and the injector's log say.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("namespace {0} is never injected")]
    IgnoredNamespace(String),
    #[error("namespace {0} is the control plane's; its pods are never injected")]
    ControlPlaneNamespace(String),
    #[error("the pod uses the host's network, which a sidecar cannot capture")]
    HostNetwork,
    #[error("the pod has a sidecar already (annotation {STATUS_ANNOTATION})")]
    AlreadyInjected,
    #[error("the pod opts out with {from} {INJECT}={value:?}")]
    PodOptOut { from: &'static str, value: String },
    #[error("namespace {namespace} has {NAMESPACE_LABEL}=disabled")]
    NamespaceDisabled { namespace: String },
    #[error(
        "neither namespace {namespace} ({NAMESPACE_LABEL}=enabled or {REVISION_LABEL}) nor the pod ({INJECT}=true) asks for injection"
    )]
    NotSelected { namespace: String },
    #[error("{REVISION_LABEL}={wanted:?} asks for another revision than this injector's {ours:?}")]
    OtherRevision { wanted: String, ours: String },
    #[error("{from} {INJECT}={value:?} is neither true nor false")]
    BadValue { from: &'static str, value: String },
}

/// The pod's own say, from the label (which Istio prefers) or else the deprecated annotation.
fn pod_choice(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<bool>, Skip> {
    let (source, value) = match (labels.get(INJECT), annotations.get(INJECT)) {
        (Some(v), _) => ("label", v),
        (None, Some(v)) => ("annotation", v),
        (None, None) => return Ok(None),
    };
    // Istio reads the value with Go's strconv.ParseBool, plus y/yes/on and n/no/off.
    match value.to_ascii_lowercase().as_str() {
        "1" | "t" | "true" | "y" | "yes" | "on" => Ok(Some(true)),
        "0" | "f" | "false" | "n" | "no" | "off" => Ok(Some(false)),
        _ => Err(Skip::BadValue {
            from: source,
            value: value.clone(),
        }),
    }
    .and_then(|choice| match choice {
        Some(false) => Err(Skip::PodOptOut {
            from: source,
            value: value.clone(),
        }),
        other => Ok(other),
    })
}

/// The facts about a pod the rules read.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
    pub host_network: bool,
}

/// Whether to inject: `Ok(())`, or the rule that says no. `namespace_labels` is `None` for a manual
/// injection (`weftctl kube-inject`), which, as `istioctl kube-inject`, ignores the namespace's labels.
pub fn should_inject(
    pod: Candidate<'_>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    config: &InjectConfig,
) -> Result<(), Skip> {
    let namespace = pod.namespace.to_string();
    if IGNORED_NAMESPACES.contains(&pod.namespace) {
        return Err(Skip::IgnoredNamespace(namespace));
    }
    if pod.namespace == config.control_plane_namespace {
        return Err(Skip::ControlPlaneNamespace(namespace));
    }
    if pod.host_network {
        return Err(Skip::HostNetwork);
    }
    if pod.annotations.contains_key(STATUS_ANNOTATION) {
        return Err(Skip::AlreadyInjected);
    }
    let pod_says = pod_choice(pod.labels, pod.annotations)?;
    let Some(ns_labels) = namespace_labels else {
        return Ok(());
    };
    let revision_matches = |wanted: &String| -> Result<(), Skip> {
        if *wanted == config.revision {
            Ok(())
        } else {
            Err(Skip::OtherRevision {
                wanted: wanted.clone(),
                ours: config.revision.clone(),
            })
        }
    };
    // Istio's webhooks, in its chart's order: `istio-injection` wins over `istio.io/rev` on the
    // namespace, and a namespace's choice over the pod's revision.
    match ns_labels.get(NAMESPACE_LABEL).map(String::as_str) {
        Some("enabled") => return Ok(()),
        Some("disabled") => return Err(Skip::NamespaceDisabled { namespace }),
        _ => {}
    }
    if let Some(wanted) = ns_labels.get(REVISION_LABEL) {
        return revision_matches(wanted);
    }
    match (pod_says, pod.labels.get(REVISION_LABEL)) {
        (_, Some(wanted)) => revision_matches(wanted),
        (Some(true), None) => Ok(()),
        _ => Err(Skip::NotSelected { namespace }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn istios_selection_rules() {
        let config = InjectConfig::default();
        let enabled = map(&[(NAMESPACE_LABEL, "enabled")]);
        let disabled = map(&[(NAMESPACE_LABEL, "disabled")]);
        let rev_default = map(&[(REVISION_LABEL, "default")]);
        let rev_canary = map(&[(REVISION_LABEL, "canary")]);
        let none = map(&[]);
        type Case<'a> = (
            &'a str,
            &'a str,
            Option<&'a BTreeMap<String, String>>,
            Vec<(&'a str, &'a str)>,
            Vec<(&'a str, &'a str)>,
            bool,
            Result<(), &'a str>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "labelled namespace",
                "demo",
                Some(&enabled),
                vec![],
                vec![],
                false,
                Ok(()),
            ),
            (
                "unlabelled namespace",
                "demo",
                Some(&none),
                vec![],
                vec![],
                false,
                Err("NotSelected"),
            ),
            (
                "pod opts in",
                "demo",
                Some(&none),
                vec![(INJECT, "true")],
                vec![],
                false,
                Ok(()),
            ),
            (
                "pod opts out",
                "demo",
                Some(&enabled),
                vec![(INJECT, "false")],
                vec![],
                false,
                Err("PodOptOut"),
            ),
            (
                "deprecated annotation opts out",
                "demo",
                Some(&enabled),
                vec![],
                vec![(INJECT, "no")],
                false,
                Err("PodOptOut"),
            ),
            (
                "label wins over annotation",
                "demo",
                Some(&enabled),
                vec![(INJECT, "true")],
                vec![(INJECT, "false")],
                false,
                Ok(()),
            ),
            (
                "a value that is neither",
                "demo",
                Some(&enabled),
                vec![(INJECT, "maybe")],
                vec![],
                false,
                Err("BadValue"),
            ),
            (
                "namespace disabled beats the pod",
                "demo",
                Some(&disabled),
                vec![(INJECT, "true")],
                vec![],
                false,
                Err("NamespaceDisabled"),
            ),
            (
                "revision label of ours",
                "demo",
                Some(&rev_default),
                vec![],
                vec![],
                false,
                Ok(()),
            ),
            (
                "another revision",
                "demo",
                Some(&rev_canary),
                vec![],
                vec![],
                false,
                Err("OtherRevision"),
            ),
            (
                "pod revision",
                "demo",
                Some(&none),
                vec![(REVISION_LABEL, "default")],
                vec![],
                false,
                Ok(()),
            ),
            (
                "kube-system",
                "kube-system",
                Some(&enabled),
                vec![],
                vec![],
                false,
                Err("IgnoredNamespace"),
            ),
            (
                "control plane",
                "istio-system",
                Some(&enabled),
                vec![],
                vec![],
                false,
                Err("ControlPlaneNamespace"),
            ),
            (
                "host network",
                "demo",
                Some(&enabled),
                vec![],
                vec![],
                true,
                Err("HostNetwork"),
            ),
            (
                "injected already",
                "demo",
                Some(&enabled),
                vec![],
                vec![(STATUS_ANNOTATION, "{}")],
                false,
                Err("AlreadyInjected"),
            ),
            (
                "manual injection ignores the namespace",
                "demo",
                None,
                vec![],
                vec![],
                false,
                Ok(()),
            ),
            (
                "manual injection still honours opt-out",
                "demo",
                None,
                vec![(INJECT, "false")],
                vec![],
                false,
                Err("PodOptOut"),
            ),
        ];
        for (name, ns, ns_labels, labels, annotations, host_network, want) in cases {
            let (labels, annotations) = (map(&labels), map(&annotations));
            let got = should_inject(
                Candidate {
                    namespace: ns,
                    labels: &labels,
                    annotations: &annotations,
                    host_network,
                },
                ns_labels,
                &config,
            );
            let got = got.map_err(|skip| {
                let debug = format!("{skip:?}");
                debug
                    .split(['(', ' ', '{'])
                    .next()
                    .unwrap_or_default()
                    .to_string()
            });
            assert_eq!(got, want.map_err(str::to_string), "{name}");
        }
    }
}
