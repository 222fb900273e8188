//! The harness's container start, for real: a planned process runs inside a pod's network namespace,
//! as its user, seeing its volume at the mount path and nothing of it outside. Needs root.

use std::time::Duration;

use weft_e2e::{
    Netns,
    kubelet::{Mount, Process, run},
};

#[test]
fn a_planned_container_runs_in_its_pod_as_its_user_with_its_volumes() {
    let base = std::env::temp_dir().join(format!("weft-kubelet-{}", std::process::id()));
    let volume = base.join("volumes/token");
    std::fs::create_dir_all(&volume).expect("volume dir");
    std::fs::write(volume.join("t"), "TOKEN").expect("token");
    let target = base.join("mnt/tokens");
    let netns = Netns::new("kubelet").expect("a network namespace (needs root)");
    let process = Process {
        container: "app".into(),
        init: false,
        program: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            format!(
                "id -u; echo $GREETING; cat {}/t; echo; touch {}/w 2>/dev/null || echo read-only; ip -o link | grep -c ': eth'; getent hosts istiod.istio-system.svc; true",
                target.display(),
                target.display()
            ),
        ],
        env: vec![("GREETING".into(), "hello".into())],
        user: Some((1337, 1337)),
        mounts: vec![Mount {
            volume: "token".into(),
            path: target.display().to_string(),
            read_only: true,
        }],
        post_start: None,
        readiness: None,
    };
    let volumes = [("token".to_string(), volume.clone())].into();
    let hosts = base.join("hosts");
    std::fs::write(
        &hosts,
        weft_e2e::kubelet::network::hosts_file(
            &[weft_e2e::kubelet::network::ServiceName {
                name: "istiod".into(),
                namespace: "istio-system".into(),
                cluster_ip: std::net::Ipv4Addr::new(10, 0, 0, 10),
            }],
            "default",
            "app-0",
            "10.95.0.9",
        ),
    )
    .expect("hosts");
    let log_path = base.join("app.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child =
        run::spawn(&netns.name, &process, &volumes, Some(&hosts), log).expect("started");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < until,
            "the container did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "{status}: {out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "1337",
            "hello",
            "TOKEN",
            "read-only",
            "0",
            "10.0.0.10       istiod.istio-system.svc.cluster.local istiod.istio-system.svc istiod.istio-system"
        ],
        "as 1337, its env, its volume read-only, only the namespace's loopback, and its hosts file"
    );
    assert!(
        !target.join("t").exists(),
        "the mount lives only in the container's mount namespace"
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// A Service's ClusterIP as pods reach it: routed to the host over the pod bridge, answered there,
/// and forwarded to an endpoint; with no endpoint, refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_ip_forwards_from_pods_to_an_endpoint() {
    use std::net::{Ipv4Addr, SocketAddr};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weft_e2e::kubelet::network::{Forwarder, HostAddress};

    let network = weft_e2e::Network::new().expect("a pod network (needs root)");
    let _host = network
        .attach_host(Ipv4Addr::new(10, 95, 0, 1))
        .expect("the host on the pod network");
    let pod = Netns::new("client").expect("a pod");
    network
        .attach(&pod, Ipv4Addr::new(10, 95, 0, 2))
        .expect("the pod on the network");
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let backend = echo.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf).await {
                    let _ = s.write_all(&buf[..n]).await;
                }
            });
        }
    });
    let vip = Ipv4Addr::new(10, 0, 0, 77);
    let _address = HostAddress::add(vip).expect("the ClusterIP on the host");
    let (endpoints, targets) = tokio::sync::watch::channel(vec![backend]);
    let _forwarder = Forwarder::start(SocketAddr::new(vip.into(), 443), targets)
        .await
        .expect("the forwarder");

    let call = || {
        pod.spawn(move || async move {
            let mut s = tokio::net::TcpStream::connect(SocketAddr::new(vip.into(), 443)).await?;
            s.write_all(b"ping").await?;
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            let n =
                tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await??;
            got.extend_from_slice(&buf[..n]);
            Ok(String::from_utf8_lossy(&got).into_owned())
        })
        .join()
        .expect("the pod's thread")
    };
    assert_eq!(call().expect("through the ClusterIP"), "ping");
    endpoints.send_replace(vec![]);
    // Closed with the request unread, which the kernel answers with a reset.
    let refused = call();
    assert!(
        refused.as_ref().map_or(true, String::is_empty),
        "no endpoints: closed at once, got {refused:?}"
    );
    server.abort();
}
