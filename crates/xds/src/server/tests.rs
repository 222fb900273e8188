use super::*;
use crate::pb::{
    envoy::config::{cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment},
    google::rpc,
};

struct Fixed(Snapshot);

impl SnapshotGenerator for Fixed {
    fn generate(&self, _: &NodeInfo) -> Snapshot {
        self.0.clone()
    }
}

fn snapshot(clusters: &[(&str, u64)]) -> Fixed {
    let mut s = Snapshot::default();
    for (name, timeout) in clusters {
        let c = Cluster {
            name: name.to_string(),
            connect_timeout: Some(crate::pb::google::protobuf::Duration {
                seconds: *timeout as i64,
                nanos: 0,
            }),
            ..Default::default()
        };
        s.insert(*name, &c);
        s.insert(
            *name,
            &ClusterLoadAssignment {
                cluster_name: name.to_string(),
                ..Default::default()
            },
        );
    }
    Fixed(s)
}

fn node() -> Option<Node> {
    Some(Node {
        id: "sidecar~127.0.0.2~a.demo~demo.svc.cluster.local".into(),
        ..Default::default()
    })
}

fn req(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node(),
        type_url: type_url.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn names(resp: &DiscoveryResponse) -> Vec<String> {
    resp.resources.iter().map(Cluster::decode_name).collect()
}

trait DecodeName {
    fn decode_name(any: &crate::pb::google::protobuf::Any) -> String;
}

impl DecodeName for Cluster {
    fn decode_name(any: &crate::pb::google::protobuf::Any) -> String {
        use prost::Message;
        if any.type_url == type_url::CLUSTER {
            Cluster::decode(any.value.as_slice()).expect("cluster").name
        } else {
            ClusterLoadAssignment::decode(any.value.as_slice())
                .expect("cla")
                .cluster_name
        }
    }
}

#[test]
fn sotw_sends_once_acks_quietly_and_pushes_only_changes() {
    let metrics = XdsMetrics::default();
    let mut s = SotwState::new(metrics.clone(), None);
    let g1 = snapshot(&[("a", 1), ("b", 1)]);
    s.on_request(req(type_url::CLUSTER, &[], "", ""), &g1)
        .expect("ok");
    let first = s.pending.pop_front().expect("initial response");
    assert_eq!(names(&first), ["a", "b"]);
    assert!(s.pending.is_empty());

    // ACK: nothing more to send.
    s.on_request(
        req(type_url::CLUSTER, &[], &first.version_info, &first.nonce),
        &g1,
    )
    .expect("ok");
    assert!(s.pending.is_empty());
    assert_eq!(
        metrics
            .acks
            .get_or_create(&XdsMetrics::labels(type_url::CLUSTER))
            .get(),
        1
    );

    // The same content again: no push.
    s.on_config(&snapshot(&[("a", 1), ("b", 1)]));
    assert!(s.pending.is_empty());

    // Changed content: one push with a new version.
    s.on_config(&snapshot(&[("a", 2), ("b", 1)]));
    let second = s.pending.pop_front().expect("push after change");
    assert_ne!(second.version_info, first.version_info);
    assert_ne!(second.nonce, first.nonce);

    // A NACK is counted and not answered.
    let mut nack = req(type_url::CLUSTER, &[], &first.version_info, &second.nonce);
    nack.error_detail = Some(rpc::Status {
        code: 3,
        message: "cluster a: bad".into(),
        details: vec![],
    });
    s.on_request(nack, &g1).expect("ok");
    assert!(s.pending.is_empty());
    assert_eq!(metrics.nacks_for("Cluster"), 1);

    // A request carrying a superseded nonce is ignored.
    s.on_request(req(type_url::CLUSTER, &["a"], "", &first.nonce), &g1)
        .expect("ok");
    assert!(s.pending.is_empty());
}

#[test]
fn sotw_named_subscriptions_get_only_their_names() {
    let mut s = SotwState::new(XdsMetrics::default(), None);
    let g = snapshot(&[("a", 1), ("b", 1), ("c", 1)]);
    s.on_request(req(type_url::ENDPOINT, &["c", "a", "missing"], "", ""), &g)
        .expect("ok");
    let resp = s.pending.pop_front().expect("response");
    assert_eq!(names(&resp), ["a", "c"]);
    // Growing the subscription answers at once with the new set.
    s.on_request(
        req(
            type_url::ENDPOINT,
            &["a", "b", "c"],
            &resp.version_info,
            &resp.nonce,
        ),
        &g,
    )
    .expect("ok");
    assert_eq!(
        names(&s.pending.pop_front().expect("response")),
        ["a", "b", "c"]
    );
}

#[test]
fn sotw_first_request_needs_a_node() {
    let mut s = SotwState::new(XdsMetrics::default(), None);
    let mut r = req(type_url::CLUSTER, &[], "", "");
    r.node = None;
    assert_eq!(
        s.on_request(r, &snapshot(&[])).expect_err("refused").code(),
        tonic::Code::InvalidArgument
    );
}

fn delta_req(
    type_url: &str,
    subscribe: &[&str],
    initial: &[(&str, &str)],
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: node(),
        type_url: type_url.into(),
        resource_names_subscribe: subscribe.iter().map(|n| n.to_string()).collect(),
        initial_resource_versions: initial
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

#[test]
fn delta_sends_only_changed_and_removed_resources() {
    let mut s = DeltaState::new(XdsMetrics::default(), None);
    s.on_request(
        delta_req(type_url::CLUSTER, &[], &[]),
        &snapshot(&[("a", 1), ("b", 1)]),
    )
    .expect("ok");
    let first = s.pending.pop_front().expect("initial");
    let sent: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(sent, ["a", "b"]);

    s.on_config(&snapshot(&[("a", 2), ("b", 1)]));
    let second = s.pending.pop_front().expect("update");
    let sent: Vec<&str> = second.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(sent, ["a"]);
    assert!(second.removed_resources.is_empty());

    s.on_config(&snapshot(&[("a", 2)]));
    let third = s.pending.pop_front().expect("removal");
    assert!(third.resources.is_empty());
    assert_eq!(third.removed_resources, ["b"]);
}

#[test]
fn delta_reconnect_with_known_versions_gets_nothing_new() {
    let g = snapshot(&[("a", 1)]);
    let mut s = DeltaState::new(XdsMetrics::default(), None);
    s.on_request(delta_req(type_url::CLUSTER, &[], &[]), &g)
        .expect("ok");
    let version = s.pending.pop_front().expect("initial").resources[0]
        .version
        .clone();

    let mut again = DeltaState::new(XdsMetrics::default(), None);
    again
        .on_request(delta_req(type_url::CLUSTER, &[], &[("a", &version)]), &g)
        .expect("ok");
    assert!(again.pending.is_empty());
}

#[test]
fn on_an_mtls_port_the_certificate_decides_namespace_and_service_account() {
    use crate::pb::envoy::config::core::v3::Node;
    let node = |ns: &str, sa: &str| Node {
        id: format!("sidecar~10.0.0.1~web-0.{ns}~{ns}.svc.cluster.local"),
        metadata: Some(crate::structs::json_to_struct(
            &serde_json::json!({"NAMESPACE": ns, "SERVICE_ACCOUNT": sa})
                .as_object()
                .expect("object")
                .clone(),
        )),
        ..Default::default()
    };
    let cert = SpiffeId::new("cluster.local", "demo", "web");
    let plain = first_node(Some(&node("demo", "admin")), "test", None).expect("plaintext");
    assert_eq!(
        plain.meta_str("SERVICE_ACCOUNT"),
        Some("admin"),
        "plaintext trusts the claim"
    );
    let proved = first_node(Some(&node("demo", "admin")), "test", Some(&cert)).expect("same ns");
    assert_eq!(
        proved.meta_str("SERVICE_ACCOUNT"),
        Some("web"),
        "the certificate wins"
    );
    let err = first_node(Some(&node("prod", "web")), "test", Some(&cert)).expect_err("other ns");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message()
            .contains("spiffe://cluster.local/ns/demo/sa/web"),
        "{}",
        err.message()
    );
}

#[test]
fn types_weftd_does_not_serve_cost_nothing() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = XdsMetrics::new(&mut registry);
    let mut sotw = SotwState::new(metrics.clone(), None);
    let mut delta = DeltaState::new(metrics.clone(), None);
    let g = snapshot(&[("a", 1)]);
    for i in 0..1000 {
        let t = format!("type.googleapis.com/attacker.Chosen{i}");
        sotw.on_request(req(&t, &[], "", "x"), &g).expect("ignored");
        delta
            .on_request(
                DeltaDiscoveryRequest {
                    node: node(),
                    type_url: t,
                    response_nonce: "x".into(),
                    ..Default::default()
                },
                &g,
            )
            .expect("ignored");
    }
    assert!(sotw.types.is_empty() && delta.types.is_empty());
    assert!(sotw.pending.is_empty() && delta.pending.is_empty());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(!text.contains("attacker"), "{text}");
}

#[test]
fn a_stream_cannot_subscribe_to_unbounded_names() {
    let g = snapshot(&[("a", 1)]);
    let many: Vec<String> = (0..=MAX_NAMES_PER_TYPE).map(|i| format!("n{i}")).collect();
    let mut sotw = SotwState::new(XdsMetrics::default(), None);
    let mut r = req(type_url::ENDPOINT, &[], "", "");
    r.resource_names = many.clone();
    let err = sotw.on_request(r, &g).expect_err("refused");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    let mut delta = DeltaState::new(XdsMetrics::default(), None);
    let subscribe = |names: &[String]| DeltaDiscoveryRequest {
        node: node(),
        type_url: type_url::ENDPOINT.into(),
        resource_names_subscribe: names.to_vec(),
        ..Default::default()
    };
    let half = many.len() / 2;
    delta
        .on_request(subscribe(&many[..half]), &g)
        .expect("within the bound");
    let err = delta
        .on_request(subscribe(&many[half..]), &g)
        .expect_err("past the bound, in total");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
}

#[test]
fn what_a_client_writes_is_kept_only_in_part() {
    let metrics = XdsMetrics::default();
    let mut s = SotwState::new(metrics.clone(), None);
    let g = snapshot(&[("a", 1)]);
    s.on_request(req(type_url::CLUSTER, &[], "", ""), &g)
        .expect("ok");
    let sent = s.pending.pop_front().expect("response");
    for _ in 0..100 {
        let mut nack = req(type_url::CLUSTER, &[], "", &sent.nonce);
        nack.error_detail = Some(rpc::Status {
            code: 3,
            message: "x".repeat(4 << 20),
            details: vec![],
        });
        s.on_request(nack, &g).expect("ok");
    }
    let kept: usize = metrics
        .recent_nacks()
        .iter()
        .map(|n| n.error_detail.len())
        .sum();
    assert!(kept < 1 << 20, "{kept} bytes of NACK text kept");
    let mut long = req(type_url::CLUSTER, &[], "", "");
    long.node.as_mut().expect("node").id = "x".repeat(MAX_NODE_ID + 1);
    let err = SotwState::new(metrics, None)
        .on_request(long, &g)
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[test]
fn syncz_follows_each_type_through_sent_acked_nacked_and_closed() {
    use crate::syncz::SyncState;
    let metrics = XdsMetrics::default();
    let state = |m: &XdsMetrics, t: &str| {
        m.sync_status()[0]
            .types
            .get(t)
            .map(|s| (s.state(), s.nack.clone()))
    };
    let mut s = SotwState::new(metrics.clone(), None);
    assert_eq!(metrics.sync_status().len(), 1, "listed while it connects");
    let g1 = snapshot(&[("a", 1)]);
    s.on_request(req(type_url::CLUSTER, &[], "", ""), &g1)
        .expect("ok");
    let first = s.pending.pop_front().expect("initial response");
    let status = &metrics.sync_status()[0];
    assert_eq!(
        status.node,
        "sidecar~127.0.0.2~a.demo~demo.svc.cluster.local"
    );
    assert_eq!(status.variant, "sotw");
    assert_eq!(status.types["Cluster"].resources, 1);
    assert_eq!(state(&metrics, "Cluster"), Some((SyncState::Stale, None)));

    s.on_request(
        req(type_url::CLUSTER, &[], &first.version_info, &first.nonce),
        &g1,
    )
    .expect("ok");
    assert_eq!(state(&metrics, "Cluster"), Some((SyncState::Synced, None)));

    // Endpoints subscribed by name, none of which exist yet: nothing sent is still a response.
    s.on_request(req(type_url::ENDPOINT, &["missing"], "", ""), &g1)
        .expect("ok");
    s.pending.pop_front().expect("an empty endpoints response");
    assert_eq!(
        state(&metrics, "ClusterLoadAssignment"),
        Some((SyncState::Stale, None))
    );

    s.on_config(&snapshot(&[("a", 2)]));
    let second = s.pending.pop_front().expect("push after change");
    let mut nack = req(type_url::CLUSTER, &[], &first.version_info, &second.nonce);
    nack.error_detail = Some(rpc::Status {
        code: 3,
        message: "cluster a: bad".into(),
        details: vec![],
    });
    s.on_request(nack, &g1).expect("ok");
    assert_eq!(
        state(&metrics, "Cluster"),
        Some((SyncState::Nacked, Some("cluster a: bad".into())))
    );

    // The next change supersedes the rejected response, and its ACK clears the NACK.
    s.on_config(&snapshot(&[("a", 3)]));
    let third = s.pending.pop_front().expect("push after change");
    assert_eq!(state(&metrics, "Cluster"), Some((SyncState::Stale, None)));
    s.on_request(
        req(type_url::CLUSTER, &[], &third.version_info, &third.nonce),
        &g1,
    )
    .expect("ok");
    assert_eq!(state(&metrics, "Cluster"), Some((SyncState::Synced, None)));

    drop(s);
    assert!(metrics.sync_status().is_empty(), "a closed stream is gone");
}

#[test]
fn syncz_tracks_delta_streams_by_their_nonces() {
    use crate::syncz::SyncState;
    let metrics = XdsMetrics::default();
    let mut s = DeltaState::new(metrics.clone(), None);
    let g = snapshot(&[("a", 1)]);
    s.on_request(delta_req(type_url::CLUSTER, &[], &[]), &g)
        .expect("ok");
    let first = s.pending.pop_front().expect("initial");
    let cluster = |m: &XdsMetrics| m.sync_status()[0].types["Cluster"].state();
    assert_eq!(cluster(&metrics), SyncState::Stale);
    let mut ack = delta_req(type_url::CLUSTER, &[], &[]);
    ack.response_nonce = first.nonce.clone();
    s.on_request(ack, &g).expect("ok");
    assert_eq!(cluster(&metrics), SyncState::Synced);
    assert_eq!(metrics.sync_status()[0].variant, "delta");
}
