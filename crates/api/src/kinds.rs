//! Istio's custom resource kinds as Istio's `base` chart defines them (group, kind, plural, short names,
//! served versions), and the CustomResourceDefinitions Weft ships, generated from this one table so a
//! cluster that has Istio's CRDs needs nothing new and manifests apply unchanged.

use serde_json::{Value, json};

/// One Istio kind: where the API server serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IstioKind {
    pub group: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub short_names: &'static [&'static str],
    /// Served versions, the storage version first (as Istio stores them).
    pub versions: &'static [&'static str],
    /// Whether Weft acts on this kind. The others are watched all the same, so an object of a kind Weft
    /// cannot act on is refused with a reason on its status, never silently ignored.
    pub supported: bool,
}

const NETWORKING: &str = "networking.istio.io";
const SECURITY: &str = "security.istio.io";
/// networking.istio.io stores v1alpha3 and serves v1beta1 and v1 besides, one schema for all three.
const NETWORKING_VERSIONS: &[&str] = &["v1alpha3", "v1beta1", "v1"];
/// security.istio.io stores v1beta1 and serves v1 besides.
const SECURITY_VERSIONS: &[&str] = &["v1beta1", "v1"];

const fn kind(
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    short_names: &'static [&'static str],
    versions: &'static [&'static str],
    supported: bool,
) -> IstioKind {
    IstioKind {
        group,
        kind,
        plural,
        short_names,
        versions,
        supported,
    }
}

/// Every kind of Istio's `base` chart but the newest, TrafficExtension, whose schema Weft has not taken yet.
pub const ISTIO_KINDS: &[IstioKind] = &[
    kind(
        NETWORKING,
        "DestinationRule",
        "destinationrules",
        &["dr"],
        NETWORKING_VERSIONS,
        true,
    ),
    kind(
        NETWORKING,
        "EnvoyFilter",
        "envoyfilters",
        &[],
        &["v1alpha3"],
        false,
    ),
    kind(
        NETWORKING,
        "Gateway",
        "gateways",
        &["gw"],
        NETWORKING_VERSIONS,
        false,
    ),
    kind(
        NETWORKING,
        "ProxyConfig",
        "proxyconfigs",
        &[],
        &["v1beta1"],
        false,
    ),
    kind(
        NETWORKING,
        "ServiceEntry",
        "serviceentries",
        &["se"],
        NETWORKING_VERSIONS,
        true,
    ),
    kind(
        NETWORKING,
        "Sidecar",
        "sidecars",
        &[],
        NETWORKING_VERSIONS,
        true,
    ),
    kind(
        NETWORKING,
        "VirtualService",
        "virtualservices",
        &["vs"],
        NETWORKING_VERSIONS,
        true,
    ),
    kind(
        NETWORKING,
        "WorkloadEntry",
        "workloadentries",
        &["we"],
        NETWORKING_VERSIONS,
        true,
    ),
    kind(
        NETWORKING,
        "WorkloadGroup",
        "workloadgroups",
        &["wg"],
        NETWORKING_VERSIONS,
        false,
    ),
    kind(
        SECURITY,
        "AuthorizationPolicy",
        "authorizationpolicies",
        &["ap"],
        SECURITY_VERSIONS,
        true,
    ),
    kind(
        SECURITY,
        "PeerAuthentication",
        "peerauthentications",
        &["pa"],
        SECURITY_VERSIONS,
        true,
    ),
    kind(
        SECURITY,
        "RequestAuthentication",
        "requestauthentications",
        &["ra"],
        SECURITY_VERSIONS,
        false,
    ),
    kind(
        "telemetry.istio.io",
        "Telemetry",
        "telemetries",
        &["telemetry"],
        &["v1alpha1", "v1"],
        false,
    ),
    kind(
        "extensions.istio.io",
        "WasmPlugin",
        "wasmplugins",
        &[],
        &["v1alpha1"],
        false,
    ),
];

/// The version to watch among those a server serves: the newest stable one, as Istio's clients
/// prefer. `None` when the server serves none of the versions Weft knows.
pub fn preferred_version<'a>(known: &[&str], served: &[&'a str]) -> Option<&'a str> {
    let rank = |v: &str| match v {
        "v1" => 0,
        _ if v.starts_with("v1beta") => 1,
        _ if v.starts_with("v1alpha") => 2,
        _ => 3,
    };
    served
        .iter()
        .copied()
        .filter(|v| known.contains(v))
        .min_by_key(|v| rank(v))
}

/// The CustomResourceDefinition for one kind. The schema keeps every field (Istio's own CRDs validate
/// field by field; Weft validates in weftd, with the same reasons as its directory loader, and writes
/// them to the object's `status`), and `status` is a subresource, so weftd's writes never race a user's.
pub fn crd(k: &IstioKind) -> Value {
    let singular = k.kind.to_ascii_lowercase();
    let category = k.group.replace('.', "-");
    let open = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    let versions: Vec<Value> = k
        .versions
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json!({
                "name": v,
                "served": true,
                "storage": i == 0,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": open, "status": open},
                }},
            })
        })
        .collect();
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{}.{}", k.plural, k.group),
            "labels": {"app": "istio-pilot", "chart": "istio", "app.kubernetes.io/part-of": "weft"},
        },
        "spec": {
            "group": k.group,
            "names": {
                "categories": ["istio-io", category],
                "kind": k.kind,
                "listKind": format!("{}List", k.kind),
                "plural": k.plural,
                "shortNames": k.short_names,
                "singular": singular,
            },
            "scope": "Namespaced",
            "versions": versions,
        },
    })
}

/// All of Weft's CRDs as the base chart's template: what `charts/base/templates/crds.yaml` holds, byte
/// for byte.
pub fn crds_yaml() -> String {
    let docs: Vec<Value> = ISTIO_KINDS.iter().map(crd).collect();
    let body = serde_saphyr::to_string_multiple(&docs).unwrap_or_default();
    format!(
        "# Istio's custom resource definitions, as Weft serves them. Generated from crates/api/src/kinds.rs by\n# `cargo xtask gen-crds`; a test fails when this file and the table differ.\n{{{{- if .Values.base.enableCRDTemplates }}}}\n{body}{{{{- end }}}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_stable_version_is_watched() {
        let known = NETWORKING_VERSIONS;
        let cases: &[(&[&str], Option<&str>)] = &[
            (&["v1alpha3", "v1beta1", "v1"], Some("v1")),
            // Istio before 1.22 served no v1.
            (&["v1alpha3", "v1beta1"], Some("v1beta1")),
            (&["v1alpha3"], Some("v1alpha3")),
            (&["v2"], None),
            (&[], None),
        ];
        for (served, want) in cases {
            assert_eq!(preferred_version(known, served), *want, "{served:?}");
        }
        // EndpointSlice: v1 where the server has it, v1beta1 on Kubernetes 1.20.
        let slice = &["v1", "v1beta1"];
        assert_eq!(preferred_version(slice, &["v1beta1", "v1"]), Some("v1"));
        assert_eq!(preferred_version(slice, &["v1beta1"]), Some("v1beta1"));
    }

    #[test]
    fn every_supported_kind_is_one_the_loader_reads() {
        for k in ISTIO_KINDS.iter().filter(|k| k.supported) {
            let doc = json!({
                "apiVersion": format!("{}/{}", k.group, k.versions[0]),
                "kind": k.kind,
                "metadata": {"name": "x", "namespace": "y"},
                "spec": {},
            });
            let mut resources = crate::Resources::default();
            let verdict = crate::parse_object("test", doc, &mut resources);
            if let Err(r) = verdict {
                assert!(
                    !r.reason.starts_with("unsupported kind"),
                    "{}: {}",
                    k.kind,
                    r.reason
                );
            }
        }
        for k in ISTIO_KINDS.iter().filter(|k| !k.supported) {
            let doc = json!({
                "apiVersion": format!("{}/{}", k.group, k.versions[0]),
                "kind": k.kind,
                "metadata": {"name": "x", "namespace": "y"},
                "spec": {},
            });
            let verdict = crate::parse_object("test", doc, &mut crate::Resources::default());
            assert!(verdict.is_err(), "{} is refused", k.kind);
        }
    }

    /// One source: the checked-in file is what the table generates.
    #[test]
    fn the_shipped_crds_are_generated_from_the_table() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../charts/base/templates/crds.yaml"
        );
        let shipped = std::fs::read_to_string(path).expect("the base chart's CRDs exist");
        assert!(
            shipped == crds_yaml(),
            "charts/base/templates/crds.yaml differs from crates/api/src/kinds.rs: run `cargo xtask gen-crds`"
        );
    }
}
