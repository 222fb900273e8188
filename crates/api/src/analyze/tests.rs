use super::*;

/// The bookinfo-like base every case adds to: reviews v1/v2 pods behind a Service in `shop`, which
/// is labelled for injection, and a DestinationRule defining both subsets.
const BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: shop, labels: {app: reviews, version: v1, security.istio.io/tlsMode: istio}}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: shop, labels: {app: reviews, version: v2, security.istio.io/tlsMode: istio}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

fn run(extra: &str) -> Vec<String> {
    let mut input = Input::default();
    crate::parse_manifests(
        "case.yaml",
        &format!("{BASE}---\n{extra}"),
        &mut input.resources,
        &mut input.rejected,
    );
    input.namespace_labels.insert(
        "shop".into(),
        [("istio-injection".to_string(), "enabled".to_string())].into(),
    );
    analyze(&input).iter().map(ToString::to_string).collect()
}

#[test]
fn each_analyzer_reports_what_it_finds_and_nothing_else() {
    let cases: &[(&str, &str, &[&str])] = &[
        ("a clean mesh", "", &[]),
        (
            "a route to a host nothing defines",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: ratings}}]\n",
            &[
                r#"Error [IST0101] (VirtualService shop/reviews) Referenced host not found: "ratings""#,
            ],
        ),
        (
            "a route to a subset no DestinationRule defines",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews, subset: v3}}]\n",
            &[
                r#"Error [IST0101] (VirtualService shop/reviews) Referenced host+subset in destinationrule not found: "reviews.shop.svc.cluster.local+v3""#,
            ],
        ),
        (
            "a ServiceEntry's host is a known host",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext, namespace: shop}\nspec: {hosts: [api.example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: STATIC, location: MESH_EXTERNAL, endpoints: [{address: 192.0.2.10}]}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ext, namespace: shop}\nspec:\n  hosts: [api.example.com]\n  tcp:\n  - route: [{destination: {host: api.example.com}}]\n",
            &[],
        ),
        (
            "two VirtualServices for one host in the mesh",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: shop}\nspec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}}]}]}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: b, namespace: shop}\nspec: {hosts: [reviews.shop.svc.cluster.local], http: [{route: [{destination: {host: reviews}}]}]}\n",
            &[
                "Warning [IST0109] (VirtualService shop/a) The VirtualServices shop/a,shop/b associated with mesh define the same host reviews.shop.svc.cluster.local, which can lead to undefined behavior. Merge them into one VirtualService.",
                "Warning [IST0109] (VirtualService shop/b) The VirtualServices shop/a,shop/b associated with mesh define the same host reviews.shop.svc.cluster.local, which can lead to undefined behavior. Merge them into one VirtualService.",
            ],
        ),
        (
            "a port whose name says no protocol",
            "apiVersion: v1\nkind: Service\nmetadata: {name: legacy, namespace: shop}\nspec: {ports: [{name: web, port: 80, targetPort: 8080}, {name: x, port: 81, appProtocol: http}]}\n",
            &[
                "Info [IST0118] (Service shop/legacy) Port name web (port: 80, targetPort: 8080) doesn't follow the naming convention of Istio port: name it <protocol>[-<suffix>] (http, http2, grpc, tcp, tls...) or set appProtocol.",
            ],
        ),
        (
            "a subset that selects no pod",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews-canary, namespace: shop}\nspec: {host: reviews, subsets: [{name: v9, labels: {version: v9}}]}\n",
            &[
                "Warning [IST0173] (DestinationRule shop/reviews-canary) The Subset v9 defined in the DestinationRule does not select any pods.",
            ],
        ),
        (
            "STRICT mesh-wide while a pod outside the mesh calls in",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: sleep, namespace: legacy, labels: {app: sleep}}\n",
            &[
                "Warning [WEFT0001] (PeerAuthentication istio-system/default) STRICT mTLS for 2 (shop/reviews-v1 and shop/reviews-v2), while 1 pods have no sidecar (legacy/sleep) and can call them only in plaintext, which STRICT refuses. Inject those pods, or use PERMISSIVE until they are.",
            ],
        ),
        (
            "STRICT, with every pod in the mesh",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: sleep, namespace: shop, labels: {app: sleep}}\n",
            &[],
        ),
        (
            "STRICT overridden to PERMISSIVE where the plaintext caller goes",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: shop, namespace: shop}\nspec: {mtls: {mode: PERMISSIVE}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: sleep, namespace: legacy, labels: {app: sleep, sidecar.istio.io/inject: 'false'}}\n",
            &[],
        ),
        (
            "a resource weftd refuses",
            "apiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata: {name: tweak, namespace: shop}\nspec: {}\n",
            &[
                "Error [IST0106] (EnvoyFilter tweak case.yaml) Schema validation error: Weft does not act on EnvoyFilter yet; the object is refused rather than ignored",
            ],
        ),
    ];
    for (what, extra, expected) in cases {
        assert_eq!(run(extra), *expected, "{what}");
    }
}

#[test]
fn wildcard_hosts_match_their_subdomains_only() {
    let known = vec![
        "*.example.com".to_string(),
        "reviews.shop.svc.cluster.local".to_string(),
    ];
    assert!(host_known(&known, "api.example.com"));
    assert!(host_known(&known, "reviews.shop.svc.cluster.local"));
    assert!(!host_known(&known, "example.org"));
    assert!(!host_known(&known, "reviews.other.svc.cluster.local"));
}

#[test]
fn messages_know_their_namespace() {
    let m = Message {
        code: Code::ReferencedResourceNotFound,
        resource: "VirtualService shop/reviews".into(),
        origin: None,
        text: String::new(),
    };
    assert_eq!(m.namespace(), Some("shop"));
    assert_eq!(m.level(), Level::Error);
}
