use super::*;
use weft_xds::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;

fn model() -> Model {
    let mut r = weft_api::Resources::default();
    let mut rejected = Vec::new();
    weft_api::parse_manifests(
        "demo.yaml",
        include_str!("../../tests/fixtures/demo-like.yaml"),
        &mut r,
        &mut rejected,
    );
    assert!(rejected.is_empty(), "{rejected:?}");
    Model::build(&r, MeshOptions::default())
}

fn proxy(app: &str, ip: &str) -> Proxy {
    Proxy {
        ip: ip.parse().expect("ip"),
        namespace: "demo".into(),
        labels: [("app".to_string(), app.to_string())].into(),
        proxyless_grpc: false,
        captured: false,
    }
}

const HOST: &str = "backend.demo.svc.cluster.local";

#[test]
fn clusters_and_endpoints_follow_istio_names_and_subsets() {
    let snap = generate(&model(), &proxy("frontend", "127.0.0.10"));
    let clusters: Vec<&str> = snap
        .names(weft_xds::type_url::CLUSTER)
        .into_iter()
        .collect();
    assert_eq!(
        clusters,
        [
            "inbound|8000||",
            "outbound|9080|v1|backend.demo.svc.cluster.local",
            "outbound|9080|v2|backend.demo.svc.cluster.local",
            "outbound|9080||backend.demo.svc.cluster.local"
        ]
    );
    let c: Cluster = snap
        .get(&outbound_cluster_name(9080, "v1", HOST))
        .expect("cluster");
    assert_eq!(c.lb_policy, cluster::LbPolicy::RoundRobin as i32);
    let cla: ClusterLoadAssignment = snap
        .get(&outbound_cluster_name(9080, "v2", HOST))
        .expect("endpoints");
    let addrs: Vec<String> = cla.endpoints[0]
        .lb_endpoints
        .iter()
        .filter_map(|e| match &e.host_identifier {
            Some(HostIdentifier::Endpoint(ep)) => match ep.address.as_ref()?.address.as_ref()? {
                address::Address::SocketAddress(sa) => Some(sa.address.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(addrs, ["127.0.0.22"]);
}

#[test]
fn virtual_service_becomes_ordered_routes_with_istio_defaults() {
    let snap = generate(&model(), &proxy("frontend", "127.0.0.10"));
    let rc: RouteConfiguration = snap.get("9080").expect("route config named by port");
    let vh = &rc.virtual_hosts[0];
    assert_eq!(vh.name, "backend.demo.svc.cluster.local:9080");
    for d in ["backend", "backend:9080", "backend.demo", HOST] {
        assert!(
            vh.domains.iter().any(|x| x == d),
            "{d} missing in {:?}",
            vh.domains
        );
    }
    assert_eq!(vh.routes.len(), 2);
    let header = &vh.routes[0].r#match.as_ref().expect("match").headers[0];
    assert_eq!(header.name, "end-user");
    let Some(route::Action::Route(split)) = &vh.routes[1].action else {
        panic!("route action")
    };
    let Some(route_action::ClusterSpecifier::WeightedClusters(wc)) = &split.cluster_specifier
    else {
        panic!("weighted")
    };
    let weights: Vec<(String, u32)> = wc
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)))
        .collect();
    assert_eq!(
        weights,
        [
            (outbound_cluster_name(9080, "v1", HOST), 90),
            (outbound_cluster_name(9080, "v2", HOST), 10)
        ]
    );
    assert_eq!(
        split.timeout,
        Some(wkt::Duration {
            seconds: 2,
            nanos: 0
        })
    );
    let retry = split.retry_policy.as_ref().expect("retry");
    assert_eq!(
        (
            retry.retry_on.as_str(),
            retry.num_retries.as_ref().map(|n| n.value)
        ),
        ("5xx", Some(3))
    );
    // The route without a VirtualService rule gets Istio's default retry policy.
    let Some(route::Action::Route(first)) = &vh.routes[0].action else {
        panic!("route action")
    };
    assert_eq!(
        first.retry_policy.as_ref().map(|r| r.retry_on.as_str()),
        Some(DEFAULT_RETRY_ON)
    );
}

#[test]
fn sidecar_gives_explicit_listeners_on_the_workload_address() {
    let snap = generate(&model(), &proxy("frontend", "127.0.0.10"));
    let listeners: Vec<&str> = snap
        .names(weft_xds::type_url::LISTENER)
        .into_iter()
        .collect();
    assert_eq!(listeners, ["127.0.0.10_8000", "127.0.0.10_9080"]);
    // A workload without a Sidecar gets clusters but no listeners to bind.
    let other = generate(&model(), &proxy("backend", "127.0.0.21"));
    assert!(other.names(weft_xds::type_url::LISTENER).is_empty());
}

#[test]
fn proxyless_grpc_gets_api_listeners_by_host_and_port() {
    let mut p = proxy("client", "127.0.0.30");
    p.proxyless_grpc = true;
    let snap = generate(&model(), &p);
    let name = format!("{HOST}:9080");
    let l: Listener = snap.get(&name).expect("api listener");
    assert!(l.api_listener.is_some());
    let rc: RouteConfiguration = snap.get(&name).expect("route config");
    assert_eq!(rc.virtual_hosts[0].routes.len(), 2);
}

#[test]
fn proxy_identity_comes_from_the_istio_node() {
    let node = NodeInfo {
        id: "sidecar~127.0.0.10~frontend-1.demo~demo.svc.cluster.local".into(),
        cluster: String::new(),
        metadata: serde_json::json!({"NAMESPACE": "demo", "LABELS": {"app": "frontend"}, "GENERATOR": "grpc"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    };
    let p = Proxy::from_node(&node).expect("valid node");
    assert_eq!(
        p,
        Proxy {
            proxyless_grpc: true,
            ..proxy("frontend", "127.0.0.10")
        }
    );
}

#[test]
fn captured_proxies_get_virtual_listeners_as_istiod_generates_them() {
    let mut p = proxy("backend", "127.0.0.21");
    p.captured = true;
    let plain = generate(&model(), &p);
    let inbound: Listener = plain.get("virtualInbound").expect("virtualInbound");
    assert!(
        inbound
            .filter_chains
            .iter()
            .all(|c| c.transport_socket.is_none()),
        "a workload not labelled as having a sidecar identity takes plaintext only"
    );
    p.labels
        .insert("security.istio.io/tlsMode".into(), "istio".into());
    let snap = generate(&model(), &p);
    let listeners: Vec<&str> = snap
        .names(weft_xds::type_url::LISTENER)
        .into_iter()
        .collect();
    assert_eq!(
        listeners,
        ["0.0.0.0_9080", "virtualInbound", "virtualOutbound"]
    );
    let outbound: Listener = snap.get("virtualOutbound").expect("virtualOutbound");
    assert_eq!(
        outbound.use_original_dst,
        Some(wkt::BoolValue { value: true })
    );
    // Inbound restores the destination for its own chains but never hands off to outbound listeners.
    let inbound: Listener = snap.get("virtualInbound").expect("virtualInbound");
    assert_eq!(
        inbound.use_original_dst,
        Some(wkt::BoolValue { value: false })
    );
    assert_eq!(
        inbound.listener_filters[0].name,
        "envoy.filters.listener.original_dst"
    );
    let http: Listener = snap.get("0.0.0.0_9080").expect("http listener");
    assert_eq!(http.bind_to_port, Some(wkt::BoolValue { value: false }));
    // Inbound: the served port gets its chains (mTLS and, PERMISSIVE by default, plaintext), then
    // passthrough for the rest.
    let inbound: Listener = snap.get("virtualInbound").expect("virtualInbound");
    let ports: Vec<Option<u32>> = inbound
        .filter_chains
        .iter()
        .map(|c| {
            c.filter_chain_match
                .as_ref()
                .and_then(|m| m.destination_port.as_ref())
                .map(|p| p.value)
        })
        .collect();
    assert_eq!(ports, [Some(9080), Some(9080), None]);
    let transports: Vec<&str> = inbound
        .filter_chains
        .iter()
        .map(|c| {
            c.filter_chain_match
                .as_ref()
                .map_or("", |m| m.transport_protocol.as_str())
        })
        .collect();
    assert_eq!(transports, ["tls", "", ""]);
    assert!(inbound.filter_chains[0].transport_socket.is_some());
    for cluster in [
        "PassthroughCluster",
        "BlackHoleCluster",
        "InboundPassthroughCluster",
        "inbound|9080||",
    ] {
        assert!(snap.get::<Cluster>(cluster).is_some(), "{cluster} missing");
    }
}

#[test]
fn cluster_tls_follows_the_destination_rule_else_the_sidecar_label() {
    let yaml = |tls: &str| {
        format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: demo}}
spec: {{ports: [{{name: tcp, port: 5432}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: db-1, namespace: demo, labels: {{kubernetes.io/service-name: db}}}}
ports: [{{name: tcp, port: 5432}}]
endpoints:
- {{addresses: ["10.0.0.1"], targetRef: {{kind: Pod, name: db-0}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: db-0, namespace: demo, labels: {{app: db, security.istio.io/tlsMode: istio}}}}
spec: {{serviceAccountName: db}}
{tls}"#
        )
    };
    let dr = |mode: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: db, namespace: demo}}\nspec: {{host: db, trafficPolicy: {{tls: {{mode: {mode}}}}}}}\n"
        )
    };
    let cluster = |extra: String| {
        let mut r = weft_api::Resources::default();
        let mut rejected = Vec::new();
        weft_api::parse_manifests("db.yaml", &yaml(&extra), &mut r, &mut rejected);
        assert!(rejected.is_empty(), "{rejected:?}");
        let snap = generate(
            &Model::build(&r, MeshOptions::default()),
            &proxy("web", "10.0.0.9"),
        );
        snap.get::<Cluster>("outbound|5432||db.demo.svc.cluster.local")
            .expect("cluster")
    };
    let auto = cluster(String::new());
    assert_eq!(auto.transport_socket_matches.len(), 2, "auto mTLS by label");
    assert!(auto.transport_socket.is_none());
    let forced = cluster(dr("ISTIO_MUTUAL"));
    assert!(forced.transport_socket.is_some() && forced.transport_socket_matches.is_empty());
    let off = cluster(dr("DISABLE"));
    assert!(off.transport_socket.is_none() && off.transport_socket_matches.is_empty());

    let mut r = weft_api::Resources::default();
    let mut rejected = Vec::new();
    weft_api::parse_manifests("db.yaml", &yaml(&dr("SIMPLE")), &mut r, &mut rejected);
    assert!(rejected[0].reason.contains("SIMPLE"), "{rejected:?}");
}

#[test]
fn a_second_virtual_service_for_a_host_is_reported_with_the_one_used() {
    let mut r = weft_api::Resources::default();
    let mut rejected = Vec::new();
    let extra = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: backend-later, namespace: demo}\nspec:\n  hosts: [backend]\n  http: [{route: [{destination: {host: backend}}]}]\n";
    weft_api::parse_manifests(
        "demo.yaml",
        include_str!("../../tests/fixtures/demo-like.yaml"),
        &mut r,
        &mut rejected,
    );
    weft_api::parse_manifests("z.yaml", extra, &mut r, &mut rejected);
    assert!(rejected.is_empty(), "{rejected:?}");
    let model = Model::build(&r, MeshOptions::default());
    let conflicts = model.conflicts();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0].kind, "VirtualService");
    assert_eq!(conflicts[0].host, HOST);
    assert_eq!(conflicts[0].ignored, ["demo/backend-later"]);
    assert!(
        model
            .conflicts()
            .iter()
            .all(|c| c.used != "demo/backend-later")
    );
    assert!(self::model().conflicts().is_empty());
}

#[test]
fn service_entry_location_decides_auto_mtls_and_workload_metadata() {
    let cluster = |location: &str| {
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: demo}}\nspec:\n  hosts: [api.example.com]\n  location: {location}\n  resolution: STATIC\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  endpoints: [{{address: 10.9.0.1, serviceAccount: api, labels: {{app: api, security.istio.io/tlsMode: istio}}}}]\n"
        );
        let mut r = weft_api::Resources::default();
        let mut rejected = Vec::new();
        weft_api::parse_manifests("se.yaml", &yaml, &mut r, &mut rejected);
        assert!(rejected.is_empty(), "{rejected:?}");
        let snap = generate(
            &Model::build(&r, MeshOptions::default()),
            &proxy("web", "10.0.0.9"),
        );
        let name = "outbound|443||api.example.com";
        let cluster: Cluster = snap.get(name).expect("cluster");
        let cla: ClusterLoadAssignment = snap.get(name).expect("endpoints");
        let meta = cla.endpoints[0].lb_endpoints[0]
            .metadata
            .clone()
            .unwrap_or_default();
        let workload = meta
            .filter_metadata
            .get("istio")
            .is_some_and(|s| weft_xds::structs::struct_to_json(s).contains_key("workload"));
        (cluster.transport_socket_matches.len(), workload)
    };
    assert_eq!(cluster("MESH_INTERNAL"), (2, true));
    assert_eq!(
        cluster("MESH_EXTERNAL"),
        (0, false),
        "no mTLS to the outside"
    );
}
