//! The mesh as it runs in pods: each pod is a network namespace with the capture rules of
//! `weft-proxy iptables` and a `weft-proxy` running as uid 1337 in REDIRECT mode; weftd runs in its own
//! namespace. The applications know nothing of the proxies.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use weft_e2e::{Netns, Network, Process, http_get, serve_echo, serve_http};
use weft_netns::SharedExecutable;

/// The standard gRPC health service, reporting SERVING.
async fn serve_grpc(listener: TcpListener) -> anyhow::Result<()> {
    let (_reporter, service) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}

/// One HTTP/2 request with prior knowledge, `authority` as `:authority`.
async fn h2_get(addr: &str, authority: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!("http://{authority}{path}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req)).await??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Speaks first, as MySQL and SMTP servers do.
async fn serve_banner(listener: TcpListener, name: &'static str) -> anyhow::Result<()> {
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move { s.write_all(format!("{name} hello\n").as_bytes()).await });
    }
}

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .join(name)
}

const CONTROL: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
const VIP: &str = "10.96.0.10";
const HOST: &str = "backend.test.svc.cluster.local";

fn manifests() -> String {
    let pod = |name: &str, version: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: test, labels: {{app: backend, version: {version}}}}}\n"
        )
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: backend, namespace: test}}
spec:
  clusterIP: {VIP}
  ports: [{{name: http, port: 9080, targetPort: 8080}}, {{name: tcp-echo, port: 7070, targetPort: 7070}}, {{name: mysql, port: 3306, targetPort: 3306}}, {{name: web, port: 8081, targetPort: 8080}}, {{name: raw, port: 7071, targetPort: 7070}}, {{name: grpc, port: 9090, targetPort: 9090}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: backend-1, namespace: test, labels: {{kubernetes.io/service-name: backend}}}}
ports: [{{name: http, port: 8080}}, {{name: tcp-echo, port: 7070}}, {{name: mysql, port: 3306}}, {{name: grpc, port: 9090}}]
endpoints:
- {{addresses: ["10.98.0.21"], targetRef: {{kind: Pod, name: backend-v1}}}}
- {{addresses: ["10.98.0.22"], targetRef: {{kind: Pod, name: backend-v2}}}}
{}{}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: backend, namespace: test}}
spec:
  host: backend
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: backend, namespace: test}}
spec:
  hosts: [backend]
  http:
  - match: [{{headers: {{x-canary: {{exact: "yes"}}}}}}]
    route: [{{destination: {{host: backend, subset: v2}}}}]
  - match: [{{uri: {{prefix: /split}}}}]
    route:
    - {{destination: {{host: backend, subset: v1}}, weight: 50}}
    - {{destination: {{host: backend, subset: v2}}, weight: 50}}
  - route: [{{destination: {{host: backend, subset: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: locked, namespace: test}}
spec:
  workloadSelector: {{labels: {{app: locked}}}}
  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}
"#,
        pod("backend-v1", "v1"),
        pod("backend-v2", "v2"),
    )
}

/// A pod: its namespace, the capture rules, and its proxy running as the proxy user (from a copy of the
/// binary that user can reach).
fn pod(
    network: &Network,
    proxy_bin: &SharedExecutable,
    name: &str,
    ip: Ipv4Addr,
    labels: &str,
) -> anyhow::Result<(Netns, Process)> {
    pod_with(
        network,
        proxy_bin,
        name,
        ip,
        labels,
        &format!("http://{CONTROL}:15010"),
        &[],
    )
}

/// As [`pod`], with the control plane at `xds` and extra environment (the identity settings).
fn pod_with(
    network: &Network,
    proxy_bin: &SharedExecutable,
    name: &str,
    ip: Ipv4Addr,
    labels: &str,
    xds: &str,
    env: &[(String, String)],
) -> anyhow::Result<(Netns, Process)> {
    let ns = Netns::new(name)?;
    network.attach(&ns, ip)?;
    ns.exec(&[bin("weft-proxy").to_str().expect("utf-8"), "iptables"])?;
    let proxy = ns
        .command("setpriv")
        .args(["--reuid=1337", "--regid=1337", "--clear-groups"])
        .arg(&proxy_bin.path)
        .args(["--xds-address", xds])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("POD_NAME", format!("{name}-0"))
        .env("POD_NAMESPACE", "test")
        .env("INSTANCE_IP", ip.to_string())
        .env("ISTIO_METAJSON_LABELS", labels)
        .env("ISTIO_META_INTERCEPTION_MODE", "REDIRECT")
        // WEFT_E2E_LOG=debug shows what the proxies did when a test fails.
        .env(
            "RUST_LOG",
            std::env::var("WEFT_E2E_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()?;
    Ok((ns, Process(proxy)))
}

/// Retries `f` until it succeeds, for a bounded time: config reaches proxies asynchronously.
async fn eventually<T, Fut: Future<Output = anyhow::Result<T>>>(
    what: &str,
    mut f: impl FnMut() -> Fut,
) -> T {
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() > until => {
                panic!("{what}: still failing after 20s: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[test]
fn pods_talk_through_captured_proxies() -> anyhow::Result<()> {
    for b in ["weftd", "weft-proxy"] {
        assert!(
            bin(b).exists(),
            "build {b} first (cargo build --bin {b}); cargo xtask test does"
        );
    }
    let proxy_bin = SharedExecutable::new(&bin("weft-proxy"))?;
    let network = Network::new()?;
    let control = Netns::new("control")?;
    network.attach(&control, CONTROL)?;
    let config = weft_e2e::TempDir::new("e2e")?;
    let dir = config.0.clone();
    std::fs::write(dir.join("mesh.yaml"), manifests())?;
    let _weftd = Process(
        control
            .command(bin("weftd").to_str().expect("utf-8"))
            .args(["--config-dir", dir.to_str().expect("utf-8")])
            .args([
                "--xds-address",
                &format!("{CONTROL}:15010"),
                "--monitoring-address",
                &format!("{CONTROL}:15014"),
            ])
            .env("RUST_LOG", "warn")
            .spawn()?,
    );
    // Something outside the mesh, for passthrough.
    let outside = control.spawn(|| async {
        serve_http(TcpListener::bind("10.98.0.1:7000").await?, "outside").await
    });

    let (v1, _p1) = pod(
        &network,
        &proxy_bin,
        "backend-v1",
        Ipv4Addr::new(10, 98, 0, 21),
        r#"{"app":"backend","version":"v1"}"#,
    )?;
    let (v2, _p2) = pod(
        &network,
        &proxy_bin,
        "backend-v2",
        Ipv4Addr::new(10, 98, 0, 22),
        r#"{"app":"backend","version":"v2"}"#,
    )?;
    let (client, _pc) = pod(
        &network,
        &proxy_bin,
        "client",
        Ipv4Addr::new(10, 98, 0, 11),
        r#"{"app":"client"}"#,
    )?;
    let (locked, _pl) = pod(
        &network,
        &proxy_bin,
        "locked",
        Ipv4Addr::new(10, 98, 0, 12),
        r#"{"app":"locked"}"#,
    )?;
    // The apps listen on every address, as containers do; inbound capture hands them their traffic.
    let _apps: Vec<_> = [(&v1, "v1"), (&v2, "v2")]
        .into_iter()
        .map(|(ns, name)| {
            ns.spawn(move || async move {
                let http = TcpListener::bind("0.0.0.0:8080").await?;
                let echo = TcpListener::bind("0.0.0.0:7070").await?;
                let banner = TcpListener::bind("0.0.0.0:3306").await?;
                let grpc = TcpListener::bind("0.0.0.0:9090").await?;
                let served = tokio::try_join!(
                    serve_http(http, name),
                    serve_echo(echo, name),
                    serve_banner(banner, name),
                    serve_grpc(grpc)
                );
                // These threads are never joined: say why an app stopped, or its test fails obscurely.
                if let Err(e) = &served {
                    eprintln!("app {name} stopped: {e:#}");
                }
                served?;
                Ok(())
            })
        })
        .collect();

    let results = client.spawn(|| async {
        let vip = format!("{VIP}:9080");
        // A routing rule: the default route goes to v1, the canary header to v2.
        // Until the backends' proxies have their config, the client's answers 503: wait for the 200.
        let (status, body) = eventually("HTTP through both proxies", || async {
            let (status, body) = http_get(&vip, HOST, "/hello", &[]).await?;
            anyhow::ensure!(status == 200, "{status}: {body}");
            Ok((status, body))
        })
        .await;
        assert_eq!((status, body.as_str()), (200, "v1 /hello"));
        let (_, body) = http_get(&vip, HOST, "/hello", &[("x-canary", "yes")]).await?;
        assert_eq!(body, "v2 /hello");
        // Called by its ClusterIP, a client sends that as its Host; the service answers to it too.
        for host in [VIP, vip.as_str()] {
            let (status, body) = http_get(&vip, host, "/by-ip", &[]).await?;
            assert_eq!((status, body.as_str()), (200, "v1 /by-ip"), "Host: {host}");
        }
        // A weighted split.
        let mut v2 = 0;
        for _ in 0..40 {
            let (status, body) = http_get(&vip, HOST, "/split", &[]).await?;
            assert_eq!(status, 200);
            v2 += usize::from(body.starts_with("v2"));
        }
        assert!((5..35).contains(&v2), "a 50/50 split sent {v2} of 40 to v2");
        // Raw TCP to the service address on a tcp- port.
        let echoed = eventually("TCP through both proxies", || async {
            let mut s = TcpStream::connect(format!("{VIP}:7070")).await?;
            s.write_all(b"ping").await?;
            let mut buf = [0u8; 7];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
            anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
        })
        .await;
        assert!(echoed == "v1:ping" || echoed == "v2:ping", "{echoed}");
        // A server-first protocol on a port declared as TCP (`mysql`): the greeting arrives although the
        // client has sent nothing, so nothing waits to sniff the client's first bytes.
        let greeting = eventually("server-first TCP", || async {
            let mut s = TcpStream::connect(format!("{VIP}:3306")).await?;
            let mut buf = [0u8; 9];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
            anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
        })
        .await;
        assert!(
            greeting == "v1 hello\n" || greeting == "v2 hello\n",
            "{greeting:?}"
        );
        // Ports with no declared protocol are sniffed: HTTP gets L7 routing (the header rule sends this
        // to v2), and anything else is carried as TCP.
        let web = format!("{VIP}:8081");
        let (_, body) = eventually("sniffed HTTP", || {
            http_get(&web, HOST, "/sniffed", &[("x-canary", "yes")])
        })
        .await;
        assert_eq!(body, "v2 /sniffed");
        let echoed = eventually("sniffed TCP", || async {
            let mut s = TcpStream::connect(format!("{VIP}:7071")).await?;
            s.write_all(b"ping").await?;
            let mut buf = [0u8; 7];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
            anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
        })
        .await;
        assert!(echoed.ends_with(":ping"), "{echoed}");
        // gRPC, HTTP/2 on both hops, with a real gRPC client and server.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{VIP}:9090"))?
            .origin(format!("http://{HOST}:9090").parse()?)
            .connect_lazy();
        let status = eventually("gRPC through both proxies", || {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            async move { anyhow::Ok(health.check(tonic_health::pb::HealthCheckRequest::default()).await?.into_inner().status()) }
        })
        .await;
        assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving);
        // HTTP/2 with prior knowledge from the app to its proxy, HTTP/1.1 beyond.
        let (status, body) = h2_get(&vip, &format!("{HOST}:9080"), "/h2").await?;
        assert_eq!((status, body.as_str()), (200, "v1 /h2"));
        // WebSocket: the upgrade goes through both proxies and bytes flow both ways afterwards.
        let mut ws = TcpStream::connect(&vip).await?;
        ws.write_all(format!("GET /ws HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").as_bytes()).await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut byte)).await??;
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        ws.write_all(b"frames").await?;
        let mut buf = [0u8; 6];
        tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut buf)).await??;
        assert_eq!(&buf, b"frames");
        // Passthrough: an address outside the mesh is reached as it is.
        let (status, body) = eventually("passthrough", || {
            http_get("10.98.0.1:7000", "outside", "/x", &[])
        })
        .await;
        assert_eq!((status, body.as_str()), (200, "outside /x"));
        anyhow::Ok(())
    });
    results.join().expect("client thread")?;

    // REGISTRY_ONLY: the same outside address is refused, while mesh services still work.
    let locked_results = locked.spawn(|| async {
        let vip = format!("{VIP}:9080");
        eventually("the mesh from the locked pod", || {
            http_get(&vip, HOST, "/", &[])
        })
        .await;
        let refused = http_get("10.98.0.1:7000", "outside", "/x", &[]).await;
        assert!(
            refused.is_err(),
            "REGISTRY_ONLY let an unknown destination through: {refused:?}"
        );
        anyhow::Ok(())
    });
    locked_results.join().expect("locked thread")?;

    // As the kubelet and Prometheus do, from outside the pod: the proxy's readiness and status ports
    // are not captured, and the admin's config is not on them.
    let kubelet = control.spawn(|| async {
        let backend = "10.98.0.21";
        let readiness = format!("{backend}:15021");
        let (status, body) = eventually("the backend proxy's readiness", || {
            http_get(&readiness, backend, "/healthz/ready", &[])
        })
        .await;
        assert_eq!((status, body.as_str()), (200, "LIVE\n"));
        let (status, _) =
            http_get(&format!("{backend}:15020"), backend, "/healthz/ready", &[]).await?;
        assert_eq!(status, 200);
        let (status, _) =
            http_get(&format!("{backend}:15020"), backend, "/config_dump", &[]).await?;
        assert_eq!(status, 404);
        let admin = http_get(&format!("{backend}:15000"), backend, "/config_dump", &[]).await;
        assert!(
            admin.is_err(),
            "admin is reachable from outside the pod: {admin:?}"
        );
        anyhow::Ok(())
    });
    kubelet.join().expect("kubelet thread")?;
    drop(outside);
    Ok(())
}

const SECURE_CONTROL: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const SECURE_VIP: &str = "10.96.1.10";

fn secure_manifests() -> String {
    let pod = |name: &str, app: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-0, namespace: test, labels: {{app: {app}, security.istio.io/tlsMode: istio}}}}\nspec: {{serviceAccountName: {app}}}\n"
        )
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: backend, namespace: test}}
spec:
  clusterIP: {SECURE_VIP}
  ports: [{{name: http, port: 9080, targetPort: 8080}}, {{name: tcp-echo, port: 7070, targetPort: 7070}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: backend-1, namespace: test, labels: {{kubernetes.io/service-name: backend}}}}
ports: [{{name: http, port: 8080}}, {{name: tcp-echo, port: 7070}}]
endpoints:
- {{addresses: ["10.99.0.21"], targetRef: {{kind: Pod, name: backend-0}}}}
{}{}{}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: test}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: backend-callers, namespace: test}}
spec:
  selector: {{matchLabels: {{app: backend}}}}
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/test/sa/client"]}}}}]
    to: [{{operation: {{paths: ["/ok*"]}}}}]
  - from: [{{source: {{principals: ["cluster.local/ns/test/sa/client"]}}}}]
    to: [{{operation: {{ports: ["7070"]}}}}]
"#,
        pod("backend", "backend"),
        pod("client", "client"),
        pod("stranger", "stranger"),
    )
}

/// A copy of weftd's bootstrap token for `sa` that the proxy user owns, as a pod's mounted token.
fn token_for_proxy(dir: &std::path::Path, sa: &str) -> anyhow::Result<PathBuf> {
    let written = dir.join("identity/test").join(sa).join("istio-token");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !written.exists() {
        anyhow::ensure!(
            std::time::Instant::now() < until,
            "weftd wrote no token for {sa}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let copy = dir.join(format!("{sa}-token"));
    std::fs::copy(&written, &copy)?;
    std::os::unix::fs::chown(&copy, Some(1337), Some(1337))?;
    Ok(copy)
}

async fn tcp_echo(addr: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"ping").await?;
    let mut buf = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[test]
fn captured_pods_talk_mtls_and_authorization_policies_decide() -> anyhow::Result<()> {
    for b in ["weftd", "weft-proxy"] {
        assert!(bin(b).exists(), "build {b} first; cargo xtask test does");
    }
    let proxy_bin = SharedExecutable::new(&bin("weft-proxy"))?;
    let network = Network::new()?;
    let control = Netns::new("secure-control")?;
    network.attach(&control, SECURE_CONTROL)?;
    let config = weft_e2e::TempDir::new("e2e-secure")?;
    let dir = config.0.clone();
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("mesh.yaml"), secure_manifests())?;
    let s = |p: PathBuf| p.to_str().expect("utf-8").to_string();
    let _weftd = Process(
        control
            .command(bin("weftd").to_str().expect("utf-8"))
            .args(["--config-dir", &s(manifests.clone())])
            .args(["--xds-address", &format!("{SECURE_CONTROL}:15010")])
            .args(["--secure-address", &format!("{SECURE_CONTROL}:15012")])
            .args(["--monitoring-address", &format!("{SECURE_CONTROL}:15014")])
            .args(["--ca-dir", &s(dir.join("ca"))])
            .args(["--identity-dir", &s(dir.join("identity"))])
            .env("RUST_LOG", "warn")
            .spawn()?,
    );
    let secure_pod = |name: &str, ip: Ipv4Addr, app: &str| -> anyhow::Result<(Netns, Process)> {
        let env = vec![
            ("SERVICE_ACCOUNT".to_string(), app.to_string()),
            ("CA_ADDR".to_string(), format!("{SECURE_CONTROL}:15012")),
            (
                "WEFT_CA_ROOT_CERT".to_string(),
                s(dir.join("identity/root-cert.pem")),
            ),
            (
                "WEFT_CA_TOKEN_FILE".to_string(),
                s(token_for_proxy(&dir, app)?),
            ),
        ];
        let labels = format!(r#"{{"app":"{app}","security.istio.io/tlsMode":"istio"}}"#);
        pod_with(
            &network,
            &proxy_bin,
            name,
            ip,
            &labels,
            &format!("https://{SECURE_CONTROL}:15012"),
            &env,
        )
    };
    let (backend, _pb) = secure_pod("backend", Ipv4Addr::new(10, 99, 0, 21), "backend")?;
    let (client, _pc) = secure_pod("client", Ipv4Addr::new(10, 99, 0, 11), "client")?;
    let (stranger, _ps) = secure_pod("stranger", Ipv4Addr::new(10, 99, 0, 12), "stranger")?;
    let _app = backend.spawn(|| async {
        let http = TcpListener::bind("0.0.0.0:8080").await?;
        let echo = TcpListener::bind("0.0.0.0:7070").await?;
        let served = tokio::try_join!(serve_http(http, "backend"), serve_echo(echo, "v1"));
        if let Err(e) = &served {
            eprintln!("backend app stopped: {e:#}");
        }
        served?;
        Ok(())
    });

    let vip = format!("{SECURE_VIP}:9080");
    let echo = format!("{SECURE_VIP}:7070");
    let from_client = client.spawn({
        let (vip, echo) = (vip.clone(), echo.clone());
        move || async move {
            let (status, body) = eventually("mTLS HTTP through both proxies", || {
                http_get(&vip, HOST, "/ok", &[])
            })
            .await;
            assert_eq!((status, body.as_str()), (200, "backend /ok"));
            let (status, body) = http_get(&vip, HOST, "/secret", &[]).await?;
            assert_eq!(
                (status, body.as_str()),
                (403, "RBAC: access denied"),
                "no ALLOW rule matches"
            );
            let echoed = eventually("mTLS TCP through both proxies", || tcp_echo(&echo)).await;
            assert_eq!(echoed, "v1:ping");
            // STRICT: plaintext to the backend pod itself (passthrough from this pod) is refused.
            let plaintext = http_get("10.99.0.21:8080", HOST, "/ok", &[]).await;
            assert!(
                plaintext.is_err(),
                "plaintext got through STRICT: {plaintext:?}"
            );
            anyhow::Ok(())
        }
    });
    from_client.join().expect("client thread")?;
    let from_stranger = stranger.spawn(move || async move {
        // A mesh identity the policy does not name: denied over HTTP, closed over TCP.
        let (status, _) = eventually("a request from the stranger", || {
            http_get(&vip, HOST, "/ok", &[])
        })
        .await;
        assert_eq!(status, 403);
        assert!(
            tcp_echo(&echo).await.is_err(),
            "TCP from a stranger was let through"
        );
        anyhow::Ok(())
    });
    from_stranger.join().expect("stranger thread")?;
    Ok(())
}
