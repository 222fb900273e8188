//! Identity and mutual TLS through real proxies: certificates from weftd's CA, auto mTLS between a
//! client and a server sidecar, PeerAuthentication modes, rotation under load, and the CA's refusals.

use std::{net::SocketAddr, time::Duration};

use http::StatusCode;
use weft_certs::{Ca, IdentityCell, PeerPolicy, SpiffeId, WorkloadKey};
use weft_integration::{
    Mesh, Proxy, get_text, http1_client, mtls_service, next_ip, send, sidecar, wait_for,
};
use weft_xds::istio_ca::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};

const HOST: &str = "backend.test.svc.cluster.local";
const TD: &str = "cluster.local";

fn pa(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: test}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
    )
}

struct Pair {
    mesh: Mesh,
    client: Proxy,
    server: Proxy,
    egress: SocketAddr,
    /// The server sidecar's inbound listener.
    inbound: SocketAddr,
}

impl Pair {
    async fn new(mode: &str, ttl: Duration) -> Self {
        let (client_ip, server_ip) = (next_ip(), next_ip());
        let mut mesh = Mesh::start(&[]).await;
        let (app, _control, task) =
            weft_integration::http_backend("backend-v1", mesh.watcher()).await;
        mesh.spawn(task);
        let mut manifests =
            mtls_service("backend", "http", 9080, &[(server_ip, "backend-0", "v1")]);
        manifests.push_str(&sidecar(
            "backend",
            &[("app", "backend")],
            &[(9080, "HTTP", app)],
            &[],
        ));
        manifests.push_str(&sidecar(
            "client",
            &[("app", "client")],
            &[],
            &[(9080, "HTTP")],
        ));
        mesh.write("peer-authentication.yaml", &pa(mode));
        mesh.write("mesh.yaml", &manifests);
        let mut server = mesh
            .proxy_mtls(
                "backend-0",
                server_ip,
                &[("app", "backend"), ("version", "v1")],
                ttl,
            )
            .await;
        server.ready(1).await;
        let mut client = mesh
            .proxy_mtls("client-0", client_ip, &[("app", "client")], ttl)
            .await;
        client.ready(1).await;
        let egress = SocketAddr::new(client_ip, 9080);
        wait_for(
            "a request through the pair",
            Duration::from_secs(10),
            || async {
                send(&http1_client(), egress, "GET", HOST, "/", &[])
                    .await
                    .ok()
                    .filter(|r| r.status == StatusCode::OK)
                    .map(|_| ())
            },
        )
        .await;
        Self {
            mesh,
            client,
            server,
            egress,
            inbound: SocketAddr::new(server_ip, 9080),
        }
    }

    /// A workload identity of the mesh's own CA, for a test client of its own.
    fn identity(&self, sa: &str) -> IdentityCell {
        let ca = Ca::from_cacerts(&self.mesh.dir.join("ca")).expect("the mesh CA");
        let id = SpiffeId::new(TD, "test", sa);
        IdentityCell::new(
            ca.issue(&id, std::time::SystemTime::now(), Duration::from_secs(3600))
                .expect("issued"),
        )
    }
}

/// An HTTP/1.1 GET over mTLS straight to `addr`, as a sidecar would send it; returns the status and the
/// serial of the certificate the server presented.
async fn mtls_get(addr: SocketAddr, cell: &IdentityCell) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = weft_certs::client_config(
        cell,
        PeerPolicy::TrustDomain(TD.into()),
        &["istio-http/1.1", "istio-peer-exchange", "istio"],
    )?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut stream, peer) =
        weft_certs::connect(&tls, &format!("outbound_.9080_._.{HOST}"), tcp).await?;
    stream
        .write_all(
            format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut out)).await??;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP response: {out:?}"))?;
    Ok((status, peer.serial.unwrap_or_default()))
}

async fn plaintext_get(addr: SocketAddr) -> anyhow::Result<StatusCode> {
    Ok(send(&http1_client(), addr, "GET", HOST, "/", &[])
        .await?
        .status)
}

async fn serial(proxy: &Proxy) -> String {
    let (_, body) = get_text(proxy.admin, "/certs").await.expect("/certs");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(!body.contains("PRIVATE KEY"), "/certs never shows a key");
    v["certificates"][0]["serial_number"]
        .as_str()
        .expect("serial")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mtls_carries_identities_and_refuses_plaintext_while_permissive_takes_both() {
    let pair = Pair::new("STRICT", weft_certs::DEFAULT_WORKLOAD_TTL).await;

    // Through the pair: the server's metrics name the client's proven identity.
    let stats = wait_for(
        "server metrics with the client's principal",
        Duration::from_secs(10),
        || async {
            let (_, text) = get_text(pair.server.stats, "/stats/prometheus")
                .await
                .ok()?;
            text.lines()
                .find(|l| {
                    l.starts_with("istio_requests_total{")
                        && l.contains("reporter=\"destination\"")
                        && l.contains(
                            "source_principal=\"spiffe://cluster.local/ns/test/sa/client-0\"",
                        )
                        && l.contains("connection_security_policy=\"mutual_tls\"")
                })
                .map(str::to_string)
        },
    )
    .await;
    assert!(
        stats.contains("destination_principal=\"spiffe://cluster.local/ns/test/sa/backend-0\""),
        "{stats}"
    );

    // STRICT: plaintext straight to the server's sidecar is refused.
    assert!(
        plaintext_get(pair.inbound).await.is_err(),
        "plaintext got through STRICT"
    );
    // A certificate from another CA is refused; one from the mesh CA gets through.
    let foreign = {
        let ca = Ca::self_signed(TD, std::time::SystemTime::now(), Duration::from_secs(3600))
            .expect("ca");
        IdentityCell::new(
            ca.issue(
                &SpiffeId::new(TD, "test", "client-0"),
                std::time::SystemTime::now(),
                Duration::from_secs(3600),
            )
            .expect("issued"),
        )
    };
    assert!(
        mtls_get(pair.inbound, &foreign).await.is_err(),
        "another CA's certificate was accepted"
    );
    let (status, _) = mtls_get(pair.inbound, &pair.identity("tester"))
        .await
        .expect("mesh identity");
    assert_eq!(status, 200);

    // A WebSocket upgrade crosses the mTLS hop, and bytes flow both ways afterwards.
    {
        let mut ws = open_websocket(pair.egress, "").await;
        assert_eq!(&echo(&mut ws).await.expect("echo"), b"frames");
    }

    // PERMISSIVE: both plaintext and mTLS.
    pair.mesh
        .write("peer-authentication.yaml", &pa("PERMISSIVE"));
    wait_for(
        "plaintext accepted under PERMISSIVE",
        Duration::from_secs(10),
        || async {
            plaintext_get(pair.inbound)
                .await
                .ok()
                .filter(|s| *s == StatusCode::OK)
        },
    )
    .await;
    let (status, _) = mtls_get(pair.inbound, &pair.identity("tester"))
        .await
        .expect("mTLS under PERMISSIVE");
    assert_eq!(status, 200);
    let r = send(&http1_client(), pair.egress, "GET", HOST, "/", &[])
        .await
        .expect("through the pair");
    assert_eq!(r.status, StatusCode::OK);
    drop(pair.client);
    pair.mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_continuous_load_without_a_failed_request() {
    let ttl = Duration::from_secs(4);
    let pair = Pair::new("STRICT", ttl).await;
    let (client_first, server_first) = (serial(&pair.client).await, serial(&pair.server).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (mut ok, mut failed) = (0u32, Vec::new());
    // Keep requests flowing until both sides have rotated at least twice over.
    let mut rotations = 0;
    let (mut last_client, mut last_server) = (client_first.clone(), server_first.clone());
    while rotations < 2 && tokio::time::Instant::now() < deadline {
        // A fresh client each time, so new connections (and handshakes) happen across the rotation.
        match send(&http1_client(), pair.egress, "GET", HOST, "/", &[]).await {
            Ok(r) if r.status == StatusCode::OK => ok += 1,
            Ok(r) => failed.push(format!("{} {}", r.status, r.body)),
            Err(e) => failed.push(e.to_string()),
        }
        let (c, s) = (serial(&pair.client).await, serial(&pair.server).await);
        if c != last_client && s != last_server {
            rotations += 1;
            (last_client, last_server) = (c, s);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len() as u32
    );
    assert_eq!(
        rotations, 2,
        "both proxies rotated twice within 20s ({ok} requests)"
    );
    // The server presents its new certificate on new connections.
    let (status, presented) = mtls_get(pair.inbound, &pair.identity("tester"))
        .await
        .expect("mTLS");
    assert_eq!(status, 200);
    assert_eq!(presented, serial(&pair.server).await);
    assert_ne!(presented, server_first);
    drop(pair.client);
    pair.mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_only_the_identity_the_token_proves() {
    let mesh = Mesh::start(&[(
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: test}\nspec: {serviceAccountName: web}\n".into(),
    )])
    .await;
    let dir = mesh.identity_dir();
    let token_path = dir.join("test").join("web").join("istio-token");
    wait_for("the token file", Duration::from_secs(10), || {
        let exists = token_path.exists();
        async move { exists.then_some(()) }
    })
    .await;
    let token = std::fs::read_to_string(&token_path).expect("token");
    let roots = std::fs::read_to_string(dir.join("root-cert.pem")).expect("root");
    let istiod = PeerPolicy::DnsName("istiod.istio-system.svc".into());
    let tls = weft_certs::anonymous_client_config(&roots, istiod, &["h2"]).expect("tls");
    let channel = weft_xds::tls::channel(&format!("https://{}", mesh.secure), Some(tls))
        .await
        .expect("connects to 15012");
    let mut ca = IstioCertificateServiceClient::new(channel);
    let ask = |sa: &str, bearer: Option<&str>| {
        let key = WorkloadKey::generate().expect("key");
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: key.csr_pem(&SpiffeId::new(TD, "test", sa)).expect("csr"),
            validity_duration: 3600,
            metadata: None,
        });
        if let Some(t) = bearer {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("header"),
            );
        }
        req
    };
    let chain = ca
        .create_certificate(ask("web", Some(&token)))
        .await
        .expect("signed")
        .into_inner()
        .cert_chain;
    assert_eq!(chain.len(), 2, "leaf and root");
    let refused = ca
        .create_certificate(ask("admin", Some(&token)))
        .await
        .expect_err("a CSR for another identity");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused
            .message()
            .contains("spiffe://cluster.local/ns/test/sa/admin"),
        "{}",
        refused.message()
    );
    let anonymous = ca
        .create_certificate(ask("web", None))
        .await
        .expect_err("no proof");
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    let (_, metrics) = get_text(mesh.monitoring, "/metrics")
        .await
        .expect("weftd metrics");
    for line in [
        "weft_ca_certificates_issued_total 1",
        "weft_ca_requests_refused_total{reason=\"permission_denied\"} 1",
        "weft_ca_requests_refused_total{reason=\"unauthenticated\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from:\n{metrics}"
        );
    }
    mesh.shutdown().await;
}

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend-allow, namespace: test}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/test/sa/client-0"]}}]
    to: [{operation: {methods: [GET], paths: ["/public*", "/admin*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: test}
spec:
  selector: {matchLabels: {app: backend}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_allow_and_deny_through_two_proxies_and_name_the_policy() {
    let pair = Pair::new("STRICT", weft_certs::DEFAULT_WORKLOAD_TTL).await;
    pair.mesh.write("authz.yaml", POLICIES);
    let get = |path: &'static str| async move {
        send(&http1_client(), pair.egress, "GET", HOST, path, &[])
            .await
            .expect("request completes")
    };
    wait_for("the policies to apply", Duration::from_secs(10), || async {
        let r = get("/other").await;
        (r.status == StatusCode::FORBIDDEN).then_some(())
    })
    .await;
    assert_eq!(
        get("/public/x").await.status,
        StatusCode::OK,
        "allowed by backend-allow"
    );
    let admin = get("/admin").await;
    assert_eq!(admin.status, StatusCode::FORBIDDEN, "DENY wins over ALLOW");
    assert_eq!(admin.body, "RBAC: access denied");
    // Other spellings of the same path are the same path (Istio's default normalization).
    for spelling in [
        "/./admin",
        "/x/../admin",
        "/%61dmin",
        "/%2e/admin",
        "/public/../admin",
    ] {
        let r = get(spelling).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{spelling}: {}", r.body);
    }
    // The application sees the normalized path.
    let public = get("/public/./x/../y").await;
    let seen: serde_json::Value = serde_json::from_str(&public.body).expect("json");
    assert_eq!(seen["path"], "/public/y", "{}", public.body);

    // Headers only a sidecar may set: a forged client certificate and Envoy controls never reach the
    // server; the server's sidecar sets the header from the certificate it verified. Headers the
    // client names in `Connection` are this hop's only.
    let forged = send(
        &http1_client(),
        pair.egress,
        "GET",
        HOST,
        "/public/xfcc",
        &[
            ("x-forwarded-client-cert", "By=spiffe://cluster.local/ns/test/sa/backend;URI=spiffe://cluster.local/ns/istio-system/sa/istiod"),
            ("x-envoy-retry-on", "5xx"),
            ("connection", "x-hop-secret"),
            ("x-hop-secret", "1"),
        ],
    )
    .await
    .expect("request completes");
    assert_eq!(forged.status, StatusCode::OK);
    let xfcc = forged
        .echoed_header("x-forwarded-client-cert")
        .expect("the server's sidecar sets XFCC");
    assert!(
        xfcc.starts_with("By=spiffe://cluster.local/ns/test/sa/backend-0;Hash=")
            && xfcc.ends_with(";Subject=\"\";URI=spiffe://cluster.local/ns/test/sa/client-0")
            && !xfcc.contains(','),
        "{xfcc}"
    );
    assert_eq!(forged.echoed_header("x-envoy-retry-on"), None);
    assert_eq!(forged.echoed_header("x-hop-secret"), None);
    // Another identity of the mesh is not in the ALLOW policy.
    let (status, _) = mtls_get(pair.inbound, &pair.identity("tester"))
        .await
        .expect("mTLS");
    assert_eq!(status, 403);

    // The server's metrics and access log say which policy denied.
    let (_, text) = get_text(pair.server.stats, "/stats/prometheus")
        .await
        .expect("stats");
    let denied = |policy: &str| {
        text.lines().any(|l| {
            l.starts_with("weft_authorization_denied_total{")
                && l.contains(&format!("policy=\"{policy}\""))
        })
    };
    assert!(denied("test/deny-admin"), "{text}");
    assert!(denied("none"), "{text}");
    let log = wait_for(
        "the denial in the access log",
        Duration::from_secs(5),
        || async {
            let log = pair.mesh.access_log();
            log.contains("rbac_access_denied_matched_policy[ns[test]-policy[deny-admin]-rule[0]]")
                .then_some(log)
        },
    )
    .await;
    assert!(log.contains(" 403 "), "{log}");
    drop(pair.client);
    pair.mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_denials_close_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client_ip, server_ip) = (next_ip(), next_ip());
    let mut mesh = Mesh::start(&[]).await;
    let (echo, task) = weft_integration::tcp_echo("db", mesh.watcher()).await;
    mesh.spawn(task);
    let mut manifests = mtls_service("db", "tcp", 5432, &[(server_ip, "db-0", "v1")]);
    manifests.push_str(&sidecar(
        "db",
        &[("app", "db")],
        &[(5432, "TCP", echo)],
        &[],
    ));
    manifests.push_str(&sidecar(
        "client",
        &[("app", "client")],
        &[],
        &[(5432, "TCP")],
    ));
    mesh.write("mesh.yaml", &manifests);
    let mut server = mesh
        .proxy_mtls(
            "db-0",
            server_ip,
            &[("app", "db")],
            weft_certs::DEFAULT_WORKLOAD_TTL,
        )
        .await;
    server.ready(1).await;
    let mut client = mesh
        .proxy_mtls(
            "client-0",
            client_ip,
            &[("app", "client")],
            weft_certs::DEFAULT_WORKLOAD_TTL,
        )
        .await;
    client.ready(1).await;
    // A connection opened while it was allowed...
    let mut before = wait_for("an allowed connection", Duration::from_secs(10), || async {
        let mut c = tokio::net::TcpStream::connect(SocketAddr::new(client_ip, 5432))
            .await
            .ok()?;
        c.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 7];
        tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut buf))
            .await
            .ok()?
            .ok()?;
        (&buf == b"db:ping").then_some(c)
    })
    .await;
    mesh.write(
        "authz.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: test}\nspec:\n  selector: {matchLabels: {app: db}}\n  action: DENY\n  rules: [{from: [{source: {principals: [\"cluster.local/ns/test/sa/client-0\"]}}]}]\n",
    );
    // ...is closed once the DENY is in force and the drain period has passed.
    let mut byte = [0u8; 1];
    let end = tokio::time::timeout(Duration::from_secs(15), before.read(&mut byte))
        .await
        .expect("the connection opened before the DENY is closed");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    let mut conn = tokio::net::TcpStream::connect(SocketAddr::new(client_ip, 5432))
        .await
        .expect("the client's egress accepts");
    let _ = conn.write_all(b"hello").await;
    let mut buf = [0u8; 5];
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("closed, not hanging");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the denied connection got {read:?}"
    );
    let stats = wait_for("the TCP denial counted", Duration::from_secs(5), || async {
        let (_, text) = get_text(server.stats, "/stats/prometheus").await.ok()?;
        text.lines()
            .find(|l| {
                l.starts_with("weft_authorization_denied_total{")
                    && l.contains("policy=\"test/deny-client\"")
                    && l.contains("protocol=\"tcp\"")
            })
            .map(str::to_string)
    })
    .await;
    assert!(
        stats.contains("source_principal=\"spiffe://cluster.local/ns/test/sa/client-0\""),
        "{stats}"
    );
    wait_for(
        "the TCP denial in the access log",
        Duration::from_secs(5),
        || async {
            mesh.access_log()
                .contains("rbac_access_denied_matched_policy[ns[test]-policy[deny-client]-rule[0]]")
                .then_some(())
        },
    )
    .await;
    mesh.shutdown().await;
}

/// Silent connections from one address hold at most a few handshake slots for a few seconds, and
/// never the CA: a client from elsewhere is served while they sit there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_on_15012_do_not_stall_the_ca() {
    use tokio::io::AsyncReadExt;
    let mesh = Mesh::start(&[]).await;
    let mut silent = Vec::new();
    for _ in 0..100 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind a second loopback address");
        silent.push(socket.connect(mesh.secure).await.expect("connect"));
    }
    let roots = std::fs::read_to_string(mesh.identity_dir().join("root-cert.pem")).expect("root");
    let istiod = PeerPolicy::DnsName("istiod.istio-system.svc".into());
    let tls = weft_certs::anonymous_client_config(&roots, istiod, &["h2"]).expect("tls");
    // Well inside the silent peers' first-byte timeout, so only a handshake that did not wait for
    // them fits.
    let channel = tokio::time::timeout(
        Duration::from_millis(2500),
        weft_xds::tls::channel(&format!("https://{}", mesh.secure), Some(tls)),
    )
    .await
    .expect("the handshake is not queued behind silent peers")
    .expect("connects to 15012");
    let refused = IstioCertificateServiceClient::new(channel)
        .create_certificate(IstioCertificateRequest::default())
        .await
        .expect_err("no proof");
    assert_eq!(
        refused.code(),
        tonic::Code::Unauthenticated,
        "the CA answered"
    );
    // Past the per-source cap, connections are closed at once; the rest when their time is up.
    let mut closed = 0;
    for conn in &mut silent {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(10), conn.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, silent.len(), "every silent connection is closed");
    mesh.shutdown().await;
}

/// A WebSocket to the backend through `proxy`, with `extra` header lines, after its 101.
async fn open_websocket(proxy: SocketAddr, extra: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut ws = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    ws.write_all(format!("GET /ws HTTP/1.1\r\nHost: {HOST}\r\n{extra}Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), ws.read(&mut byte))
            .await
            .expect("handshake in time")
            .expect("read");
        assert_eq!(n, 1, "closed during the handshake");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    ws
}

/// Sends a few bytes over an open WebSocket and reads them back.
async fn echo(ws: &mut tokio::net::TcpStream) -> anyhow::Result<[u8; 6]> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ws.write_all(b"frames").await?;
    let mut buf = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut buf)).await??;
    Ok(buf)
}

/// A WebSocket opened while allowed is closed once a new policy denies it (after the drain period),
/// and one the new policy still allows stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_close_when_a_new_policy_denies_them() {
    use tokio::io::AsyncReadExt;
    let pair = Pair::new("STRICT", weft_certs::DEFAULT_WORKLOAD_TTL).await;
    let mut denied = open_websocket(pair.egress, "x-kill: yes\r\n").await;
    let mut kept = open_websocket(pair.egress, "").await;
    assert_eq!(&echo(&mut denied).await.expect("echo"), b"frames");
    pair.mesh.write(
        "authz.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-ws, namespace: test}\nspec:\n  selector: {matchLabels: {app: backend}}\n  action: DENY\n  rules: [{when: [{key: \"request.headers[x-kill]\", values: [\"yes\"]}]}]\n",
    );
    let mut byte = [0u8; 1];
    let end = tokio::time::timeout(Duration::from_secs(15), denied.read(&mut byte))
        .await
        .expect("the denied WebSocket is closed");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert_eq!(
        &echo(&mut kept).await.expect("the allowed one stays open"),
        b"frames"
    );
    pair.mesh.shutdown().await;
}

/// Kept-alive HTTP/1.1 connections to a proxy whose listener keeps changing are drained, never cut:
/// not one request fails, through the client's sidecar or straight to the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_connections_are_drained_without_a_failed_request() {
    let pair = Pair::new("PERMISSIVE", weft_certs::DEFAULT_WORKLOAD_TTL).await;
    let client = http1_client();
    let policy = |path: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: toggle, namespace: test}}\nspec:\n  selector: {{matchLabels: {{app: backend}}}}\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: [\"{path}\"]}}}}]}}]\n"
        )
    };
    let mut failed = Vec::new();
    for i in 0..2000 {
        if i % 200 == 0 {
            pair.mesh
                .write("toggle.yaml", &policy(&format!("/never-{i}")));
        }
        let target = if i % 2 == 0 {
            pair.egress
        } else {
            pair.inbound
        };
        match send(&client, target, "GET", HOST, "/load", &[]).await {
            Ok(r) if r.status == StatusCode::OK => {}
            Ok(r) => failed.push(format!("{i}: {}", r.status)),
            Err(e) => failed.push(format!("{i}: {e:#}")),
        }
    }
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    pair.mesh.shutdown().await;
}

/// weftd comes back with a new root (its CA was lost): the proxies cannot verify it, say so, renew from
/// the bundle file and token weftd rewrote, and take config from it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_follow_weftd_to_a_new_root() {
    let mut pair = Pair::new("STRICT", weft_certs::DEFAULT_WORKLOAD_TTL).await;
    let old_serial = serial(&pair.server).await;
    pair.mesh.stop_weftd().await;
    std::fs::remove_dir_all(pair.mesh.dir.join("ca")).expect("lose the CA");
    pair.mesh.start_weftd().await;
    pair.mesh.write("authz.yaml", POLICIES);
    wait_for(
        "a policy written after the new root to reach the server's proxy",
        Duration::from_secs(60),
        || async {
            let r = send(&http1_client(), pair.egress, "GET", HOST, "/admin", &[])
                .await
                .ok()?;
            (r.status == StatusCode::FORBIDDEN).then_some(())
        },
    )
    .await;
    assert_ne!(serial(&pair.server).await, old_serial, "the server renewed");
    pair.mesh.shutdown().await;
}
