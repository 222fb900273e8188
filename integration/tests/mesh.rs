//! In-process mesh tests: weftd, proxies and backends on loopback addresses, talking real HTTP/1.1, h2c,
//! gRPC, WebSocket and TCP. Each test builds its own mesh on fresh 127.x addresses.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use http::StatusCode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use weft_integration::{
    BackendControl, Mesh, Proxy, Reply, get_text, http1_client, next_ip, send, send_h2c, service,
    sidecar, wait_for,
};

const HOST: &str = "backend.test.svc.cluster.local";
const CLUSTER: &str = "outbound|9080||backend.test.svc.cluster.local";

/// A client workload with an egress listener on 9080, and one `backend` endpoint (with its own proxy and
/// app) per version. `rules` is extra YAML (VirtualService, DestinationRule) in its own file.
struct Scenario {
    mesh: Mesh,
    client: Proxy,
    egress: SocketAddr,
    /// `mesh.yaml` as first written, for tests that change the workloads' Sidecars.
    manifests: String,
    backends: Vec<(String, Arc<BackendControl>)>,
    servers: Vec<Proxy>,
}

impl Scenario {
    async fn new(versions: &[&str], rules: &str) -> Self {
        let client_ip = next_ip();
        let mut apps = Vec::new();
        let mut manifests = String::new();
        let mut endpoints = Vec::new();
        // Config arrives after the apps are up, so their addresses can go into the Sidecars.
        let mut mesh = Mesh::start(&[]).await;
        let app_drain = mesh.watcher();
        for v in versions {
            let ip = next_ip();
            let (addr, control, task) =
                weft_integration::http_backend(&format!("backend-{v}"), app_drain.clone()).await;
            apps.push((ip, v.to_string(), addr, control, task));
            endpoints.push(ip);
        }
        let eps: Vec<(std::net::IpAddr, String, String)> = apps
            .iter()
            .map(|(ip, v, ..)| (*ip, format!("backend-{v}-0"), v.clone()))
            .collect();
        let eps_ref: Vec<(std::net::IpAddr, &str, &str)> = eps
            .iter()
            .map(|(ip, p, v)| (*ip, p.as_str(), v.as_str()))
            .collect();
        manifests.push_str(&service("backend", "http", 9080, &eps_ref));
        for (_, v, addr, ..) in &apps {
            manifests.push_str(&sidecar(
                &format!("backend-{v}"),
                &[("app", "backend"), ("version", v)],
                &[(9080, "HTTP", *addr)],
                &[],
            ));
        }
        manifests.push_str(&sidecar(
            "client",
            &[("app", "client")],
            &[],
            &[(9080, "HTTP")],
        ));
        mesh.write("rules.yaml", rules);
        mesh.write("mesh.yaml", &manifests);
        drop(app_drain);
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for (ip, v, _, control, task) in apps {
            mesh.spawn(task);
            let mut p = mesh
                .proxy(
                    &format!("backend-{v}-0"),
                    ip,
                    &[("app", "backend"), ("version", &v)],
                )
                .await;
            p.ready(1).await;
            servers.push(p);
            backends.push((format!("backend-{v}"), control));
        }
        let mut client = mesh
            .proxy("client-0", client_ip, &[("app", "client")])
            .await;
        client.ready(1).await;
        let egress = SocketAddr::new(client_ip, 9080);
        let s = Self {
            mesh,
            client,
            egress,
            manifests,
            backends,
            servers,
        };
        wait_for(
            "the first request to route",
            Duration::from_secs(10),
            || async {
                send(&http1_client(), egress, "GET", HOST, "/", &[])
                    .await
                    .ok()
                    .filter(|r| r.status != StatusCode::NOT_FOUND)
                    .map(|_| ())
            },
        )
        .await;
        s
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        send(
            &http1_client(),
            self.egress,
            "GET",
            "backend:9080",
            path,
            headers,
        )
        .await
        .expect("request completes")
    }

    fn control(&self, name: &str) -> &BackendControl {
        &self
            .backends
            .iter()
            .find(|(n, _)| n == name)
            .expect("backend")
            .1
    }
}

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend, namespace: test}
spec:
  host: backend
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend, namespace: test}
spec:
  hosts: [backend]
  http:
  - match: [{uri: {prefix: /direct}}]
    directResponse: {status: 418, body: {string: "short and stout"}}
  - match: [{uri: {exact: /moved}}]
    redirect: {uri: /new-home, authority: example.com, redirectCode: 302}
  - match: [{uri: {prefix: /old/}}]
    rewrite: {uri: /new/, authority: rewritten.example}
    route: [{destination: {host: backend, subset: v1}}]
  - match: [{uri: {prefix: /headers}}]
    headers:
      request: {set: {x-added: "yes"}, remove: [x-remove-me]}
      response: {set: {x-answered-by: weft}}
    route: [{destination: {host: backend, subset: v1}}]
  - match: [{uri: {regex: "/items/[0-9]+"}}]
    route: [{destination: {host: backend, subset: v2}}]
  - match: [{headers: {x-version: {exact: v2}}}]
    route: [{destination: {host: backend, subset: v2}}]
  - match: [{queryParams: {pick: {exact: v3}}}]
    route: [{destination: {host: backend, subset: v3}}]
  - match: [{method: {exact: DELETE}}]
    route: [{destination: {host: backend, subset: v3}}]
  - match: [{uri: {prefix: /split}}]
    route:
    - {destination: {host: backend, subset: v2}, weight: 50}
    - {destination: {host: backend, subset: v3}, weight: 50}
  - route: [{destination: {host: backend, subset: v1}}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_and_act_as_the_virtual_service_says() {
    let s = Scenario::new(&["v1", "v2", "v3"], ROUTES).await;

    let r = s.get("/direct", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (418, "short and stout")
    );

    let r = s.get("/moved", &[]).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(r.headers["location"], "http://example.com/new-home");

    let r = s.get("/old/thing?q=1", &[]).await;
    assert_eq!(r.backend(), "backend-v1");
    assert!(r.body.contains("\"path\":\"/new/thing?q=1\""), "{}", r.body);
    assert_eq!(
        r.echoed_header("host").as_deref(),
        Some("rewritten.example")
    );

    let r = s.get("/headers", &[("x-remove-me", "1")]).await;
    assert_eq!(r.echoed_header("x-added").as_deref(), Some("yes"));
    assert_eq!(r.echoed_header("x-remove-me"), None);
    assert_eq!(r.headers["x-answered-by"], "weft");
    assert!(
        r.echoed_header("x-request-id").is_some(),
        "the proxy adds x-request-id"
    );

    for (path, headers, method, want) in [
        ("/items/42", vec![], "GET", "backend-v2"),
        ("/items/abc", vec![], "GET", "backend-v1"),
        ("/", vec![("x-version", "v2")], "GET", "backend-v2"),
        ("/?pick=v3", vec![], "GET", "backend-v3"),
        ("/", vec![], "DELETE", "backend-v3"),
        ("/anything", vec![], "GET", "backend-v1"),
    ] {
        let r = send(&http1_client(), s.egress, method, "backend", path, &headers)
            .await
            .expect("request");
        assert_eq!(r.backend(), want, "{method} {path} {headers:?}");
    }

    let mut v2 = 0;
    for _ in 0..200 {
        if s.get("/split", &[]).await.backend() == "backend-v2" {
            v2 += 1;
        }
    }
    assert!(
        (70..130).contains(&v2),
        "a 50/50 split sent {v2} of 200 to v2"
    );

    let r = send(
        &http1_client(),
        s.egress,
        "GET",
        "unknown.example",
        "/",
        &[],
    )
    .await
    .expect("request");
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "no virtual host means 404 (NR)"
    );
}

fn lb_rule(policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: backend, namespace: test}}\nspec:\n  host: backend\n  trafficPolicy: {{loadBalancer: {{simple: {policy}}}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancing_policies_spread_requests() {
    use weft_proxy::model::LbPolicy;
    let s = Scenario::new(&["a", "b", "c"], &lb_rule("ROUND_ROBIN")).await;
    for (policy, lb) in [
        ("ROUND_ROBIN", LbPolicy::RoundRobin),
        ("RANDOM", LbPolicy::Random),
        ("LEAST_REQUEST", LbPolicy::LeastRequest),
    ] {
        s.mesh.write("rules.yaml", &lb_rule(policy));
        let mut state = s.client.state.clone();
        wait_for(policy, Duration::from_secs(10), || {
            let st = state.borrow_and_update().clone();
            async move {
                st.clusters
                    .get(CLUSTER)
                    .filter(|c| c.config.lb == lb && c.endpoints.len() == 3)
                    .map(|_| ())
            }
        })
        .await;
        let before: Vec<usize> = s
            .backends
            .iter()
            .map(|(_, c)| c.requests.load(Ordering::SeqCst))
            .collect();
        for _ in 0..60 {
            assert_eq!(s.get("/", &[]).await.status, StatusCode::OK);
        }
        let counts: Vec<usize> = s
            .backends
            .iter()
            .zip(before)
            .map(|((_, c), b)| c.requests.load(Ordering::SeqCst) - b)
            .collect();
        if lb == LbPolicy::RoundRobin {
            assert_eq!(counts, [20, 20, 20], "round robin is exact");
        } else {
            assert!(
                counts.iter().all(|c| *c > 0),
                "{policy} reached every endpoint: {counts:?}"
            );
        }
    }
}

/// LEAST_REQUEST under concurrency: a slow endpoint gets fewer requests than an idle one, and requests
/// abandoned by a route timeout stop counting, so no endpoint is avoided for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_prefers_idle_endpoints_and_abandoned_requests_stop_counting() {
    let rules = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: backend, namespace: test}}\nspec:\n  hosts: [backend]\n  http:\n  - match: [{{uri: {{prefix: /impatient}}}}]\n    timeout: 50ms\n    route: [{{destination: {{host: backend}}}}]\n  - route: [{{destination: {{host: backend}}}}]\n",
        lb_rule("LEAST_REQUEST")
    );
    let s = Scenario::new(&["slow", "fast"], &rules).await;
    let mut state = s.client.state.clone();
    wait_for("LEAST_REQUEST", Duration::from_secs(10), || {
        let st = state.borrow_and_update().clone();
        async move {
            st.clusters
                .get(CLUSTER)
                .filter(|c| {
                    c.config.lb == weft_proxy::model::LbPolicy::LeastRequest
                        && c.endpoints.len() == 2
                })
                .map(|_| ())
        }
    })
    .await;
    // Requests arrive at a steady pace, whether or not earlier ones are answered: the slow endpoint
    // holds each it gets for a second, the fast one answers before the next arrives. Least request
    // then sends the slow one a request only when both of its two random picks land there.
    s.control("backend-slow")
        .delay_ms
        .store(1000, Ordering::SeqCst);
    use futures::StreamExt;
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut served = std::collections::HashMap::<String, usize>::new();
    let mut sent = 0;
    while sent < 40 || !in_flight.is_empty() {
        tokio::select! {
            _ = pace.tick(), if sent < 40 => {
                in_flight.push(s.get("/", &[]));
                sent += 1;
            }
            Some(r) = in_flight.next() => {
                assert_eq!(r.status, StatusCode::OK);
                *served.entry(r.backend()).or_default() += 1;
            }
        }
    }
    let count = |b: &str| served.get(b).copied().unwrap_or(0);
    let (slow, fast) = (count("backend-slow"), count("backend-fast"));
    assert!(
        slow < fast,
        "the busy endpoint got {slow}, the idle one {fast}"
    );

    // Requests the route timeout abandons while the slow endpoint holds them.
    let abandoned = futures::future::join_all((0..10).map(|_| s.get("/impatient", &[]))).await;
    assert!(
        abandoned
            .iter()
            .any(|r| r.status == StatusCode::GATEWAY_TIMEOUT),
        "some went to the slow endpoint and timed out"
    );
    s.control("backend-slow")
        .delay_ms
        .store(0, Ordering::SeqCst);
    wait_for(
        "in-flight counts back to zero",
        Duration::from_secs(5),
        || async {
            let (_, text) = get_text(s.client.admin, "/clusters").await.ok()?;
            let active: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(CLUSTER) && l.contains("::rq_active::"))
                .collect();
            (active.len() == 2 && active.iter().all(|l| l.ends_with("::rq_active::0")))
                .then_some(())
        },
    )
    .await;
}

const RESILIENCE: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend, namespace: test}
spec:
  hosts: [backend]
  http:
  - match: [{uri: {prefix: /retry}}]
    retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: backend}}]
  - match: [{uri: {prefix: /no-retry}}]
    retries: {attempts: 0}
    route: [{destination: {host: backend}}]
  - match: [{uri: {prefix: /slow}}]
    timeout: 200ms
    route: [{destination: {host: backend}}]
  - match: [{uri: {prefix: /per-try}}]
    retries: {attempts: 2, perTryTimeout: 100ms, retryOn: 5xx}
    route: [{destination: {host: backend}}]
  - route: [{destination: {host: backend}}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_timeouts_follow_the_route() {
    let s = Scenario::new(&["v1"], RESILIENCE).await;
    let ctl = s.control("backend-v1");

    ctl.fail_first.store(2, Ordering::SeqCst);
    let before = ctl.requests.load(Ordering::SeqCst);
    let r = s.get("/retry", &[]).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "two failures are retried away: {}",
        r.body
    );
    assert_eq!(ctl.requests.load(Ordering::SeqCst) - before, 3);

    ctl.fail_first.store(1, Ordering::SeqCst);
    assert_eq!(
        s.get("/no-retry", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    ctl.delay_ms.store(1500, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let r = s.get("/slow", &[]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
    );
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "the route timeout cut the request short"
    );

    let before = ctl.requests.load(Ordering::SeqCst);
    let r = s.get("/per-try", &[]).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        ctl.requests.load(Ordering::SeqCst) - before,
        3,
        "each try timed out and was retried"
    );
    ctl.delay_ms.store(0, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_grpc_websocket_and_tcp_pass_through_proxy_pairs() {
    let client_ip = next_ip();
    let (grpc_ip, echo_ip, web_ip) = (next_ip(), next_ip(), next_ip());
    let mut mesh = Mesh::start(&[]).await;
    let drain = mesh.watcher();
    let (grpc_addr, grpc_task) = weft_integration::grpc_health(drain.clone()).await;
    let (echo_addr, echo_task) = weft_integration::tcp_echo("echo", drain.clone()).await;
    let (web_addr, _ctl, web_task) = weft_integration::http_backend("web", drain.clone()).await;
    let mut manifests = service("greeter", "grpc", 9090, &[(grpc_ip, "greeter-0", "v1")]);
    manifests.push_str("---\n");
    manifests.push_str(&service(
        "echo",
        "tcp-echo",
        7070,
        &[(echo_ip, "echo-0", "v1")],
    ));
    manifests.push_str("---\n");
    manifests.push_str(&service(
        "web",
        "http-web",
        9080,
        &[(web_ip, "web-0", "v1")],
    ));
    manifests.push_str(&sidecar(
        "greeter",
        &[("app", "greeter")],
        &[(9090, "GRPC", grpc_addr)],
        &[],
    ));
    manifests.push_str(&sidecar(
        "echo",
        &[("app", "echo")],
        &[(7070, "TCP", echo_addr)],
        &[],
    ));
    manifests.push_str(&sidecar(
        "web",
        &[("app", "web")],
        &[(9080, "HTTP", web_addr)],
        &[],
    ));
    manifests.push_str(&sidecar(
        "client",
        &[("app", "client")],
        &[],
        &[(9090, "GRPC"), (7070, "TCP"), (9080, "HTTP")],
    ));
    mesh.write("mesh.yaml", &manifests);
    drop(drain);
    mesh.spawn(grpc_task);
    mesh.spawn(echo_task);
    mesh.spawn(web_task);
    for (pod, ip, app) in [
        ("greeter-0", grpc_ip, "greeter"),
        ("echo-0", echo_ip, "echo"),
        ("web-0", web_ip, "web"),
    ] {
        mesh.proxy(pod, ip, &[("app", app), ("version", "v1")])
            .await
            .ready(1)
            .await;
    }
    mesh.proxy("client-0", client_ip, &[("app", "client")])
        .await
        .ready(3)
        .await;

    // HTTP/2 (h2c) from the client app to its proxy.
    let web = SocketAddr::new(client_ip, 9080);
    let r = wait_for("h2c request", Duration::from_secs(10), || async {
        send_h2c(web, "web.test.svc.cluster.local:9080", "/")
            .await
            .ok()
            .filter(|r| r.status == StatusCode::OK)
    })
    .await;
    assert_eq!(r.backend(), "web");

    // gRPC over HTTP/2 on both hops, with a real gRPC client and server.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{client_ip}:9090"))
        .expect("endpoint")
        .origin(
            "http://greeter.test.svc.cluster.local:9090"
                .parse()
                .expect("uri"),
        );
    let channel = endpoint.connect().await.expect("connect to the proxy");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("grpc call through the mesh");
    assert_eq!(
        reply.into_inner().status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // WebSocket: the upgrade is forwarded and bytes flow both ways afterwards.
    let mut ws = TcpStream::connect(web).await.expect("connect");
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: web:9080\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            ws.read(&mut byte).await.expect("read"),
            1,
            "connection closed during the handshake"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws.write_all(b"frames").await.expect("write");
    let mut buf = [0u8; 6];
    ws.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"frames");

    // Raw TCP on a tcp- port.
    let mut tcp = TcpStream::connect(SocketAddr::new(client_ip, 7070))
        .await
        .expect("connect");
    tcp.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 9];
    tcp.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"echo:ping");
}

fn all_to(subset: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
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
  http: [{{route: [{{destination: {{host: backend, subset: {subset}}}}}]}}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_reach_proxies_without_failed_requests() {
    let s = Scenario::new(&["v1", "v2"], &all_to("v1")).await;
    assert_eq!(s.get("/", &[]).await.backend(), "backend-v1");
    let egress = s.egress;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        let client = http1_client();
        let (mut ok, mut failed, mut saw_v2) = (0, Vec::new(), false);
        loop {
            match send(&client, egress, "GET", "backend", "/", &[]).await {
                Ok(r) if r.status == StatusCode::OK => {
                    ok += 1;
                    saw_v2 |= r.backend() == "backend-v2";
                }
                other => failed.push(format!("{other:?}")),
            }
            if *stop_rx.borrow_and_update() {
                return (ok, failed, saw_v2);
            }
        }
    });
    s.mesh.write("rules.yaml", &all_to("v2"));
    wait_for("traffic to move to v2", Duration::from_secs(10), || async {
        (s.get("/", &[]).await.backend() == "backend-v2").then_some(())
    })
    .await;
    // A little more traffic after the switch, bounded by count rather than time.
    for _ in 0..20 {
        assert_eq!(s.get("/", &[]).await.backend(), "backend-v2");
    }
    let _ = stop_tx.send(true);
    let (ok, failed, saw_v2) = load.await.expect("load task");
    assert!(
        failed.is_empty(),
        "{} requests failed during the change: {failed:?}",
        failed.len()
    );
    assert!(ok > 0 && saw_v2, "ok={ok} saw_v2={saw_v2}");
}

/// What weftd cannot use is refused at load, one resource at a time: a DestinationRule the proxy
/// could not enforce and a VirtualService with a bad regex are skipped, while a valid change written
/// in the same reload applies, and later changes still apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_resources_are_skipped_at_load_and_the_rest_of_the_directory_applies() {
    let s = Scenario::new(&["v1"], "").await;
    assert_eq!(s.get("/teapot", &[]).await.status, StatusCode::OK);
    let teapot = |path: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: backend, namespace: test}}\nspec:\n  hosts: [backend]\n  http:\n  - match: [{{uri: {{prefix: {path}}}}}]\n    directResponse: {{status: 418}}\n  - route: [{{destination: {{host: backend}}}}]\n"
        )
    };
    s.mesh.write(
        "broken.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: backend-outlier, namespace: test}\nspec:\n  host: backend\n  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 3}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad-regex, namespace: test}\nspec:\n  hosts: [backend]\n  http: [{match: [{uri: {regex: \"/(unclosed\"}}], route: [{destination: {host: backend}}]}]\n",
    );
    s.mesh.write("rules.yaml", &teapot("/teapot"));
    wait_for(
        "the valid change to apply",
        Duration::from_secs(10),
        || async { (s.get("/teapot", &[]).await.status == StatusCode::IM_A_TEAPOT).then_some(()) },
    )
    .await;
    assert_eq!(s.get("/other", &[]).await.backend(), "backend-v1");
    // A later change on the same port is not frozen by the refused regex.
    s.mesh.write("rules.yaml", &teapot("/kettle"));
    wait_for(
        "a later change to apply",
        Duration::from_secs(10),
        || async { (s.get("/kettle", &[]).await.status == StatusCode::IM_A_TEAPOT).then_some(()) },
    )
    .await;
    assert!(
        s.mesh.xds_metrics.recent_nacks().is_empty(),
        "nothing reached a proxy that it had to refuse: {:?}",
        s.mesh.xds_metrics.recent_nacks()
    );
}

/// A directory weftd cannot read for a while (swapped away, as an atomic deploy does; or descriptors
/// exhausted) is not an empty mesh: weftd keeps what it served, and reloads once the directory is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_config_directory_keeps_the_served_config() {
    let s = Scenario::new(&["v1"], "").await;
    let away = s.mesh.dir.with_extension("away");
    std::fs::rename(&s.mesh.dir, &away).expect("move the directory away");
    // Many of weftd's 50 ms polls pass while every request must still be answered.
    let window = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < window {
        assert_eq!(s.get("/", &[]).await.backend(), "backend-v1");
    }
    assert!(
        s.client.state.borrow().clusters.contains_key(CLUSTER),
        "the proxy kept its clusters"
    );
    std::fs::rename(&away, &s.mesh.dir).expect("bring it back");
    s.mesh.write(
        "rules.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: backend, namespace: test}\nspec:\n  hosts: [backend]\n  http: [{directResponse: {status: 418}}]\n",
    );
    wait_for(
        "the reload after the directory returns",
        Duration::from_secs(10),
        || async { (s.get("/", &[]).await.status == StatusCode::IM_A_TEAPOT).then_some(()) },
    )
    .await;
}

/// A change the proxy cannot apply (here, a listener on a port something else holds) is NACKed with
/// the reason, and the last good config keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_the_proxy_cannot_apply_is_nacked_while_traffic_flows() {
    let s = Scenario::new(&["v1"], "").await;
    let held = tokio::net::TcpListener::bind(SocketAddr::new(s.egress.ip(), 9081))
        .await
        .expect("hold the port");
    let before = sidecar("client", &[("app", "client")], &[], &[(9080, "HTTP")]);
    let after = sidecar(
        "client",
        &[("app", "client")],
        &[],
        &[(9080, "HTTP"), (9081, "HTTP")],
    );
    assert!(s.manifests.contains(&before));
    s.mesh
        .write("mesh.yaml", &s.manifests.replace(&before, &after));
    let nack = wait_for("a NACK", Duration::from_secs(10), || async {
        s.mesh
            .xds_metrics
            .recent_nacks()
            .into_iter()
            .find(|n| n.node.contains("client-0"))
    })
    .await;
    assert!(nack.type_url.ends_with("Listener"), "{nack:?}");
    assert!(
        nack.error_detail.contains(":9081: ") && nack.error_detail.contains("cannot bind"),
        "{}",
        nack.error_detail
    );
    for _ in 0..20 {
        assert_eq!(
            s.get("/", &[]).await.status,
            StatusCode::OK,
            "the last good config keeps serving"
        );
    }
    let (status, body) = get_text(s.mesh.monitoring, "/debug/nacks")
        .await
        .expect("nacks page");
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("cannot bind"), "{body}");

    // `weftctl proxy-status` reads weftd's /debug/syncz: the client's listeners are NACKed, in its words.
    let source = weftctl::proxy_status::WeftdSource {
        kube: Default::default(),
        istio_namespace: "istio-system".into(),
        weftd: Some(format!("http://{}", s.mesh.monitoring)),
    };
    let (replicas, unreachable) = source.reports().await.expect("weftd answers /debug/syncz");
    let table = weftctl::proxy_status::render(&replicas, &unreachable, None);
    let client_row = table
        .lines()
        .find(|l| l.starts_with("client-0.test "))
        .unwrap_or_else(|| panic!("a row for the client: {table}"));
    assert_eq!(
        client_row.split_whitespace().take(3).collect::<Vec<_>>(),
        ["client-0.test", "SYNCED", "NACKED"],
        "{table}"
    );
    assert!(
        table.contains("✗ client-0.test rejected its Listener: ") && table.contains("cannot bind"),
        "{table}"
    );
    let server_row = table
        .lines()
        .find(|l| l.starts_with("backend-v1-0.test "))
        .unwrap_or_else(|| panic!("a row for the server: {table}"));
    assert!(server_row.contains("SYNCED   SYNCED"), "{table}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_metrics_and_access_logs_describe_the_traffic() {
    let s = Scenario::new(&["v1"], "").await;
    for _ in 0..5 {
        assert_eq!(s.get("/hello", &[]).await.status, StatusCode::OK);
    }
    let (status, ready) = get_text(s.client.admin, "/ready").await.expect("ready");
    assert_eq!((status, ready.as_str()), (StatusCode::OK, "LIVE\n"));

    let (_, dump) = get_text(s.client.admin, "/config_dump")
        .await
        .expect("config_dump");
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
    let listeners = dump["configs"][0]["dynamic_listeners"]
        .as_array()
        .expect("listeners");
    assert_eq!(listeners[0]["name"], format!("{}_9080", s.client.ip));

    // `weftctl proxy-config` reads the same dump and prints Istio's view of it.
    let args = |section| weftctl::proxy_config::ProxyConfigArgs {
        section,
        pod: None,
        namespace: "test".into(),
        output: weftctl::proxy_config::Output::Short,
        admin: Some(format!("http://{}", s.client.admin)),
        kube: Default::default(),
    };
    use weftctl::proxy_config::{Output, Section, fetch, render};
    let dump = fetch(&args(Section::All))
        .await
        .expect("weftctl reads the dump");
    let clusters = render(&dump, Section::Cluster, Output::Short).expect("cluster table");
    assert!(
        clusters
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "backend.test.svc.cluster.local",
                    "9080",
                    "-",
                    "outbound",
                    "LeastRequest",
                    "1/1",
                    "healthy"
                ]),
        "{clusters}"
    );
    let endpoints = render(&dump, Section::Endpoint, Output::Short).expect("endpoint table");
    assert!(
        endpoints.contains(&format!("{}:9080", s.servers[0].ip)) && endpoints.contains("HEALTHY"),
        "{endpoints}"
    );
    let listeners = render(&dump, Section::Listener, Output::Short).expect("listener table");
    assert!(listeners.contains("Route: 9080"), "{listeners}");
    let json = render(&dump, Section::Route, Output::Json).expect("route json");
    let routes: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(routes[0]["name"], "9080", "{json}");

    let (_, clusters) = get_text(s.client.admin, "/clusters")
        .await
        .expect("clusters");
    let server_ip = s.servers[0].ip;
    assert!(
        clusters.contains(&format!(
            "{CLUSTER}::{server_ip}:9080::health_flags::healthy"
        )),
        "{clusters}"
    );

    let (_, client_stats) = get_text(s.client.stats, "/stats/prometheus")
        .await
        .expect("stats");
    let line = client_stats
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .unwrap_or_else(|| panic!("no request counter in:\n{client_stats}"));
    for label in [
        "reporter=\"source\"",
        "source_workload=\"client\"",
        "destination_workload=\"backend-v1\"",
        &format!("destination_service=\"{HOST}\""),
        "request_protocol=\"http\"",
    ] {
        assert!(line.contains(label), "{label} missing in {line}");
    }
    let count: u64 = line
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("counter value");
    assert!(count >= 5, "{line}");
    let (_, server_stats) = get_text(s.servers[0].stats, "/stats/prometheus")
        .await
        .expect("stats");
    assert!(
        server_stats
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains(&format!("destination_service=\"{HOST}\""))),
        "{server_stats}"
    );

    // Lines reach the file from the proxy's writer thread, a moment after the response.
    wait_for(
        "the request in the access log",
        Duration::from_secs(5),
        || async {
            s.mesh
                .access_log()
                .lines()
                .any(|l| l.contains("\"GET /hello HTTP/1.1\" 200") && l.contains(CLUSTER))
                .then_some(())
        },
    )
    .await;

    let (_, weftd_metrics) = get_text(s.mesh.monitoring, "/metrics")
        .await
        .expect("weftd metrics");
    assert!(
        weftd_metrics.contains("weft_xds_connected_proxies 2"),
        "{weftd_metrics}"
    );

    // SIGTERM's path: everything drains and stops within the deadline.
    let Scenario { mesh, .. } = s;
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_serving_while_the_control_plane_is_away_and_resync_when_it_returns() {
    let mut s = Scenario::new(&["v1", "v2"], &all_to("v1")).await;
    s.mesh.stop_weftd().await;
    let mut state = s.client.state.clone();
    wait_for("the proxy to notice", Duration::from_secs(10), || {
        let st = state.borrow_and_update().clone();
        async move { (!st.xds_connected).then_some(()) }
    })
    .await;
    for _ in 0..20 {
        assert_eq!(
            s.get("/", &[]).await.backend(),
            "backend-v1",
            "last good config keeps serving"
        );
    }
    // A change made while weftd is down arrives once it is back.
    s.mesh.write("rules.yaml", &all_to("v2"));
    s.mesh.start_weftd().await;
    wait_for(
        "traffic to follow the change made while weftd was away",
        Duration::from_secs(20),
        || async { (s.get("/", &[]).await.backend() == "backend-v2").then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_xds_sends_only_what_changed_over_grpc() {
    use weft_xds::pb::envoy::{
        config::{cluster::v3::Cluster, core::v3::Node},
        service::discovery::v3::{
            DeltaDiscoveryRequest,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    };
    let ip = next_ip();
    let mesh = Mesh::start(&[(
        "a.yaml",
        service("alpha", "http", 9080, &[(next_ip(), "alpha-0", "v1")]),
    )])
    .await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", mesh.xds))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let first = DeltaDiscoveryRequest {
        node: Some(Node {
            id: format!("sidecar~{ip}~delta-0.test~test.svc.cluster.local"),
            ..Default::default()
        }),
        type_url: weft_xds::type_url::CLUSTER.into(),
        ..Default::default()
    };
    tx.send(first).expect("send");
    let mut responses = client
        .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let names = |r: &weft_xds::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse| {
        r.resources
            .iter()
            .map(|x| x.name.clone())
            .collect::<Vec<_>>()
    };
    let r1 = responses.message().await.expect("response").expect("open");
    assert_eq!(names(&r1), ["outbound|9080||alpha.test.svc.cluster.local"]);
    let decoded: Cluster = prost::Message::decode(
        r1.resources[0]
            .resource
            .as_ref()
            .expect("resource")
            .value
            .as_slice(),
    )
    .expect("cluster");
    assert_eq!(decoded.name, "outbound|9080||alpha.test.svc.cluster.local");
    let ack = |nonce: &str| DeltaDiscoveryRequest {
        type_url: weft_xds::type_url::CLUSTER.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    tx.send(ack(&r1.nonce)).expect("ack");

    // Adding a service sends that cluster alone; removing the first sends only its name as removed.
    mesh.write(
        "b.yaml",
        &service("beta", "http", 9080, &[(next_ip(), "beta-0", "v1")]),
    );
    let r2 = responses.message().await.expect("response").expect("open");
    assert_eq!(
        (names(&r2), r2.removed_resources.clone()),
        (
            vec!["outbound|9080||beta.test.svc.cluster.local".to_string()],
            vec![]
        )
    );
    tx.send(ack(&r2.nonce)).expect("ack");
    std::fs::remove_file(mesh.dir.join("a.yaml")).expect("remove");
    let r3 = responses.message().await.expect("response").expect("open");
    assert_eq!(
        (names(&r3), r3.removed_resources.clone()),
        (
            vec![],
            vec!["outbound|9080||alpha.test.svc.cluster.local".to_string()]
        )
    );
}
