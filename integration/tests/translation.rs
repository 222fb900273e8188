//! What weftd writes, the proxy reads back unchanged: authorization policies compiled to RBAC, and the
//! mTLS settings of clusters and inbound chains, through real Envoy protobufs on both sides.

use weft_proxy::model::{ClusterConfig, ListenerConfig, ListenerKind};
use weft_xds::pb::envoy::config::{cluster::v3::Cluster, listener::v3::Listener};
use weftd::translate::{MeshOptions, Proxy, generate};

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: demo}
spec: {ports: [{name: http, port: 9080}, {name: tcp-db, port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: backend-1, namespace: demo, labels: {kubernetes.io/service-name: backend}}
ports: [{name: http, port: 9080}, {name: tcp-db, port: 5432}]
endpoints:
- {addresses: ["127.0.0.21"], targetRef: {kind: Pod, name: backend-0}}
---
apiVersion: v1
kind: Pod
metadata: {name: backend-0, namespace: demo, labels: {app: backend, security.istio.io/tlsMode: istio}}
spec: {serviceAccountName: backend}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: backend, namespace: demo}
spec:
  workloadSelector: {labels: {app: backend}}
  ingress:
  - {port: {number: 9080, protocol: HTTP, name: http}, defaultEndpoint: "127.0.0.1:18080"}
  - {port: {number: 5432, protocol: TCP, name: tcp-db}, defaultEndpoint: "127.0.0.1:15432"}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: callers, namespace: demo}
spec:
  selector: {matchLabels: {app: backend}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/frontend"], notNamespaces: ["prod"]}}]
    to: [{operation: {methods: [GET, HEAD], paths: ["/api/*", "*.json"], notPaths: ["/api/private*"]}}]
    when: [{key: "request.headers[x-tenant]", values: ["a", "b*"]}, {key: source.ip, notValues: ["10.0.0.0/8"]}]
  - from: [{source: {namespaces: [demo]}}]
    to: [{operation: {ports: ["5432"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: demo}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-debug, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {hosts: ["*.internal", "debug.demo"], notMethods: [GET]}}]}]
"#;

fn model() -> weftd::Model {
    let dir = std::env::temp_dir().join(format!("weft-translation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("mesh.yaml"), MESH).expect("write");
    let (resources, rejected) =
        weft_api::load_dir(&dir).expect("the fixture directory is readable");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(rejected.is_empty(), "{rejected:?}");
    weftd::Model::build(&resources, MeshOptions::default())
}

fn sorted(mut filters: Vec<weft_policy::rbac::Rbac>) -> Vec<weft_policy::rbac::Rbac> {
    for f in &mut filters {
        f.policies.sort_by(|a, b| a.0.cmp(&b.0));
    }
    filters
}

#[test]
fn rbac_and_mtls_survive_the_wire_unchanged() {
    let model = model();
    let proxy = Proxy {
        ip: "127.0.0.21".parse().expect("ip"),
        namespace: "demo".into(),
        labels: [
            ("app".to_string(), "backend".to_string()),
            ("security.istio.io/tlsMode".to_string(), "istio".to_string()),
        ]
        .into(),
        proxyless_grpc: false,
        captured: false,
    };
    let snap = generate(&model, &proxy);
    let policies = weftd::authz::policies_for(&model, &proxy);
    assert_eq!(policies.len(), 3);

    let http: Listener = snap.get("127.0.0.21_9080").expect("HTTP inbound listener");
    let http = ListenerConfig::try_from(&http).expect("the proxy accepts what weftd writes");
    assert_eq!(
        http.chains.len(),
        2,
        "PERMISSIVE by default: mTLS and plaintext"
    );
    assert!(
        http.chains[0]
            .tls
            .as_ref()
            .is_some_and(|t| t.require_client_certificate)
    );
    for chain in &http.chains {
        let ListenerKind::Http(h) = &chain.kind else {
            panic!("HTTP chain expected")
        };
        assert_eq!(
            sorted(h.rbac.clone()),
            sorted(weft_policy::rbac::compile(&policies, false))
        );
    }

    let tcp: Listener = snap.get("127.0.0.21_5432").expect("TCP inbound listener");
    let tcp = ListenerConfig::try_from(&tcp).expect("accepted");
    let ListenerKind::Tcp(t) = &tcp.chains[0].kind else {
        panic!("TCP chain expected")
    };
    let for_tcp = sorted(weft_policy::rbac::compile(&policies, true));
    assert_eq!(sorted(t.rbac.clone()), for_tcp);
    // The HTTP-only ALLOW rule is left out on TCP; the port rule stays.
    let allow = for_tcp
        .iter()
        .find(|f| f.action == weft_policy::rbac::RbacAction::Allow)
        .expect("ALLOW filter");
    let names: Vec<&str> = allow.policies.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ns[demo]-policy[callers]-rule[1]"]);

    let cluster: Cluster = snap
        .get("outbound|9080||backend.demo.svc.cluster.local")
        .expect("cluster");
    let cluster = ClusterConfig::try_from(&cluster).expect("accepted");
    let tls = cluster.tls_matches[0].tls.as_ref().expect("auto mTLS");
    assert_eq!(tls.sni, "outbound_.9080_._.backend.demo.svc.cluster.local");
    assert_eq!(tls.peers, ["spiffe://cluster.local/ns/demo/sa/backend"]);
    assert_eq!(tls.alpn, ["istio-peer-exchange", "istio"]);
    assert!(
        cluster.tls_matches[1].tls.is_none(),
        "plaintext for endpoints without a sidecar"
    );
}
