//! weftd's memory stays bounded under hostile input: manifests built to be expensive, and xDS clients
//! that open many streams, name many pods, subscribe to types and names weftd does not serve. The
//! real binary runs, and its resident memory is read from /proc.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use tokio_stream::StreamExt;
use weft_xds::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest, DiscoveryRequest,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};

const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

struct Weftd(Child, PathBuf);

impl Drop for Weftd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn node(i: usize) -> Option<Node> {
    Some(Node {
        id: format!(
            "sidecar~127.0.0.{}~web-{i}.demo~demo.svc.cluster.local",
            2 + i % 200
        ),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_hostile_manifests_and_xds_clients() {
    let dir = std::env::temp_dir().join(format!("weftd-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = dir.join("config");
    std::fs::create_dir_all(&config).expect("config dir");
    let services: String = (0..200)
        .map(|i| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: demo}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n"))
        .collect();
    std::fs::write(config.join("mesh.yaml"), services).expect("write");
    std::fs::write(
        config.join("deep-flow.yaml"),
        format!("a: {}{}\n", "[".repeat(1_000_000), "]".repeat(1_000_000)),
    )
    .expect("write");
    let block: String = (0..3000)
        .map(|i| format!("{}k{i}:\n", "  ".repeat(i)))
        .collect();
    std::fs::write(config.join("deep-block.yaml"), block).expect("write");
    // Many documents, each just under the depth budget.
    let nested = |depth: usize| format!("{}1{}", "{a: ".repeat(depth), "}".repeat(depth));
    let near_limit: String = (0..2_000)
        .map(|_| format!("x: {}\n---\n", nested(60)))
        .collect();
    std::fs::write(config.join("near-limit.yaml"), near_limit).expect("write");

    let xds = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_weftd"))
        .args(["--config-dir"])
        .arg(&config)
        .args(["--xds-address", &format!("127.0.0.1:{xds}")])
        .args(["--secure-address", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--monitoring-address",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .arg("--ephemeral-ca")
        .env(
            "RUST_LOG",
            std::env::var("HOSTILE_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("HOSTILE_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("weftd starts");
    let weftd = Weftd(child, dir);
    let pid = weftd.0.id();
    let address = format!("http://127.0.0.1:{xds}");
    let channel = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tonic::transport::Endpoint::from_shared(address.clone())
                .expect("uri")
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "weftd never listened: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    let loaded = rss_kib(pid);

    // Hostile clients: 40 connections, each with as many ADS streams as a connection may hold (one
    // of them a flood of subscribed names, refused), each stream naming another pod and asking for
    // what weftd serves and for types it does not; all left open.
    let mut held = Vec::new();
    for c in 0..40 {
        let channel = tonic::transport::Endpoint::from_shared(address.clone())
            .expect("uri")
            .connect()
            .await
            .unwrap_or_else(|_| channel.clone());
        let mut delta = AggregatedDiscoveryServiceClient::new(channel.clone());
        let names: Vec<String> = (0..100_001).map(|n| format!("{c}-{n}")).collect();
        let flood = tokio_stream::iter(vec![DeltaDiscoveryRequest {
            node: node(c),
            type_url: CLUSTER.into(),
            resource_names_subscribe: names,
            ..Default::default()
        }]);
        if let Ok(mut refused) = tokio::time::timeout(
            Duration::from_secs(10),
            delta.delta_aggregated_resources(flood),
        )
        .await
        .expect("a flood is answered in time")
        .map(tonic::Response::into_inner)
        {
            let end = tokio::time::timeout(Duration::from_secs(10), refused.next()).await;
            assert!(
                matches!(end, Ok(Some(Err(ref e))) if e.code() == tonic::Code::ResourceExhausted),
                "the flood is refused: {end:?}"
            );
        }
        for s in 0..7 {
            let i = c * 7 + s;
            let mut client = AggregatedDiscoveryServiceClient::new(channel.clone());
            let requests = vec![
                DiscoveryRequest {
                    node: node(i),
                    type_url: CLUSTER.into(),
                    ..Default::default()
                },
                DiscoveryRequest {
                    type_url: LISTENER.into(),
                    ..Default::default()
                },
                DiscoveryRequest {
                    type_url: format!("type.googleapis.com/junk.T{i}"),
                    response_nonce: "1".into(),
                    ..Default::default()
                },
            ];
            let stream = tokio_stream::iter(requests).chain(tokio_stream::pending());
            let opened = tokio::time::timeout(
                Duration::from_secs(10),
                client.stream_aggregated_resources(stream),
            )
            .await
            .expect("a stream opens in time");
            if let Ok(resp) = opened {
                held.push(resp.into_inner());
            }
        }
    }
    // Every held stream got its first response: weftd did all the work it was asked for.
    let mut answered = 0;
    for s in held.iter_mut().take(64) {
        if let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            answered += 1;
        }
    }
    let hostile = rss_kib(pid);
    let held_count = held.len().max(1);
    eprintln!("weftd RSS: {loaded} KiB after loading, {hostile} KiB under hostile clients");
    drop(held);
    assert!(answered > 0, "the streams were served");
    assert!(
        loaded < 64 * 1024,
        "after loading hostile manifests weftd holds {loaded} KiB"
    );
    // Each stream holds its proxy's snapshot and what is queued for it (these clients never read);
    // floods, junk types and refused subscriptions add nothing that stays.
    let per_stream = hostile.saturating_sub(loaded) / held_count as u64;
    assert!(
        per_stream < 1024,
        "{per_stream} KiB per stream: {hostile} KiB under {held_count} hostile streams, {loaded} KiB before"
    );
}
