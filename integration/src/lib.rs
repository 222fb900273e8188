//! Fixtures for in-process mesh tests: a [`Mesh`] (weftd on a temporary config directory plus proxies on
//! 127.0.x.y addresses), real backends, manifest builders and condition waits with deadlines.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::Instant,
};
use weft_drain::{DrainTrigger, DrainWatcher};

pub mod cluster;

/// A fresh loopback address for each workload, so tests running in parallel never share ports.
pub fn next_ip() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() % 64 * 256;
    IpAddr::V4(Ipv4Addr::new(
        127,
        1 + (n / 65_024 % 200) as u8,
        (n / 254 % 256) as u8,
        (n % 254 + 1) as u8,
    ))
}

/// Polls `check` every 20 ms until it returns `Some`, or fails the test with `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// weftd with its config directory, and the proxies started for a test. Dropping it stops everything.
pub struct Mesh {
    pub dir: PathBuf,
    pub xds: SocketAddr,
    /// weftd's 15012: the CA and xDS over mTLS.
    pub secure: SocketAddr,
    pub monitoring: SocketAddr,
    pub xds_metrics: weft_xds::XdsMetrics,
    trigger: Option<DrainTrigger>,
    watcher: DrainWatcher,
    tasks: JoinSet<()>,
    /// weftd drains on its own trigger too, so a test can take the control plane away and bring it back.
    weftd: Option<(DrainTrigger, tokio::task::JoinHandle<()>)>,
    /// With `Some`, weftd reads the Kubernetes API instead of `dir`.
    kube: Option<weftd::app::KubeOptions>,
    /// The namespace the test's pods (and proxies) are in.
    pub namespace: String,
}

/// A running proxy's endpoints and its applied config.
pub struct Proxy {
    pub ip: IpAddr,
    pub admin: SocketAddr,
    pub stats: SocketAddr,
    /// 15020: app probes and merged metrics.
    pub status: SocketAddr,
    /// 15021: the proxy's readiness.
    pub readiness: SocketAddr,
    pub state: tokio::sync::watch::Receiver<Arc<weft_proxy::state::ProxyState>>,
}

impl Mesh {
    pub async fn start(manifests: &[(&str, String)]) -> Self {
        Self::start_with(manifests, None, "test").await
    }

    /// weftd on the Kubernetes API, for proxies in `namespace`.
    pub async fn start_on_kubernetes(options: weftd::app::KubeOptions, namespace: &str) -> Self {
        Self::start_with(&[], Some(options), namespace).await
    }

    async fn start_with(
        manifests: &[(&str, String)],
        kube: Option<weftd::app::KubeOptions>,
        namespace: &str,
    ) -> Self {
        // Failures print what the components logged; RUST_LOG=info shows the whole story.
        weft_telemetry::init_tracing_with_default("warn");
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-it-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for (name, text) in manifests {
            std::fs::write(dir.join(name), text).expect("write manifest");
        }
        let (trigger, watcher) = weft_drain::new();
        let mut mesh = Self {
            dir,
            xds: "127.0.0.1:0".parse().expect("addr"),
            secure: "127.0.0.1:0".parse().expect("addr"),
            monitoring: "127.0.0.1:0".parse().expect("addr"),
            xds_metrics: Default::default(),
            trigger: Some(trigger),
            watcher,
            tasks: JoinSet::new(),
            weftd: None,
            kube,
            namespace: namespace.to_string(),
        };
        mesh.start_weftd().await;
        mesh
    }

    /// Starts weftd, on the same xDS and CA addresses as before when it ran already, so proxies find it
    /// again. Its monitoring port is new each time: nothing needs it stable, and rebinding an old
    /// ephemeral port races other tests taking it.
    pub async fn start_weftd(&mut self) {
        let on_kubernetes = self.kube.is_some();
        let app = weftd::app::build(weftd::app::Config {
            source: match &self.kube {
                Some(options) => weftd::app::Source::Kubernetes(options.clone()),
                None => weftd::app::Source::Dir {
                    config_dir: self.dir.clone(),
                    poll_interval: Duration::from_millis(50),
                },
            },
            xds_address: Some(self.xds),
            secure_address: self.secure,
            monitoring_address: SocketAddr::new(self.monitoring.ip(), 0),
            mesh: weftd::translate::MeshOptions {
                access_log_file: self.dir.join("access.log").display().to_string(),
                ..Default::default()
            },
            // On Kubernetes the CA lives in Secrets and proxies prove who they are with tokens.
            ca_dir: (!on_kubernetes).then(|| self.dir.join("ca")),
            identity_dir: (!on_kubernetes).then(|| self.identity_dir()),
            lifetimes: Default::default(),
        })
        .await
        .expect("weftd builds");
        (self.xds, self.secure, self.monitoring, self.xds_metrics) = (
            app.xds_address().expect("plaintext xDS is on"),
            app.secure_address(),
            app.monitoring_address(),
            app.xds_metrics(),
        );
        let (trigger, watcher) = weft_drain::new();
        let task = tokio::spawn(async move {
            app.run(watcher).await.expect("weftd runs");
        });
        self.weftd = Some((trigger, task));
    }

    /// Drains and stops weftd, as SIGTERM would; the proxies lose their control plane.
    pub async fn stop_weftd(&mut self) {
        let (trigger, task) = self.weftd.take().expect("weftd is running");
        tokio::time::timeout(Duration::from_secs(10), trigger.drain())
            .await
            .expect("weftd drained within 10s");
        task.await.expect("weftd stopped cleanly");
    }

    /// Replaces (or adds) one manifest file; weftd picks the change up by itself.
    pub fn write(&self, name: &str, text: &str) {
        // Write then rename, so weftd never reads half a file.
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.dir.join(name)).expect("rename manifest");
    }

    /// Where weftd writes the trust bundle and bootstrap tokens.
    pub fn identity_dir(&self) -> PathBuf {
        self.dir.join("identity")
    }

    /// Starts a proxy for a pod in namespace `test` with the given labels.
    pub async fn proxy(&mut self, pod: &str, ip: IpAddr, labels: &[(&str, &str)]) -> Proxy {
        self.proxy_with(pod, ip, labels, None, &[]).await
    }

    /// A proxy given more of the environment the injector writes (`ISTIO_KUBE_APP_PROBERS`...).
    pub async fn proxy_with_env(
        &mut self,
        pod: &str,
        ip: IpAddr,
        labels: &[(&str, &str)],
        env: &[(&str, String)],
    ) -> Proxy {
        self.proxy_with(pod, ip, labels, None, env).await
    }

    /// A proxy with a workload identity: its certificate comes from weftd's CA (asking for `ttl`),
    /// proved by the bootstrap token weftd wrote for its service account (the pod's name), and it
    /// takes xDS over mTLS on 15012. Writes the Pod so weftd knows the service account.
    pub async fn proxy_mtls(
        &mut self,
        pod: &str,
        ip: IpAddr,
        labels: &[(&str, &str)],
        ttl: Duration,
    ) -> Proxy {
        let token = self
            .identity_dir()
            .join("test")
            .join(pod)
            .join("istio-token");
        if !token.exists() {
            self.write(
                &format!("pod-{pod}.yaml"),
                &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}-client, namespace: test}}\nspec: {{serviceAccountName: {pod}}}\n"),
            );
            wait_for("a bootstrap token", Duration::from_secs(10), || {
                let exists = token.exists();
                async move { exists.then_some(()) }
            })
            .await;
        }
        let mut labels = labels.to_vec();
        labels.push(("security.istio.io/tlsMode", "istio"));
        self.proxy_with(pod, ip, &labels, Some((token, ttl)), &[])
            .await
    }

    async fn proxy_with(
        &mut self,
        pod: &str,
        ip: IpAddr,
        labels: &[(&str, &str)],
        identity: Option<(PathBuf, Duration)>,
        env: &[(&str, String)],
    ) -> Proxy {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let mut vars: Vec<(String, String)> = vec![
            ("POD_NAME".into(), pod.into()),
            ("POD_NAMESPACE".into(), self.namespace.clone()),
            ("INSTANCE_IP".into(), ip.to_string()),
            ("SERVICE_ACCOUNT".into(), pod.into()),
            // Connections of a changed listener go on this long; short, so tests see the end of it.
            ("WEFT_LISTENER_DRAIN_DURATION".into(), "1s".into()),
            (
                "ISTIO_METAJSON_LABELS".into(),
                serde_json::to_string(&labels).expect("json"),
            ),
        ];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let xds = match &identity {
            None => format!("http://{}", self.xds),
            Some((token, ttl)) => {
                vars.extend([
                    ("CA_ADDR".into(), self.secure.to_string()),
                    ("SECRET_TTL".into(), format!("{}ms", ttl.as_millis())),
                    (
                        "WEFT_CA_ROOT_CERT".into(),
                        self.identity_dir()
                            .join("root-cert.pem")
                            .display()
                            .to_string(),
                    ),
                    ("WEFT_CA_TOKEN_FILE".into(), token.display().to_string()),
                ]);
                format!("https://{}", self.secure)
            }
        };
        let config = weft_proxy::config::Config::from_env(xds, &vars).expect("proxy config");
        let app = weft_proxy::app::build(config).await.expect("proxy builds");
        let proxy = Proxy {
            ip,
            admin: app.admin_address().expect("admin address"),
            stats: app.stats_address().expect("stats address"),
            status: app.status_address().expect("status address"),
            readiness: app.readiness_address().expect("readiness address"),
            state: app.state(),
        };
        self.tasks.spawn(app.run(self.watcher.clone()));
        proxy
    }

    /// Spawns a task that lives as long as the mesh.
    pub fn spawn(&mut self, fut: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(fut);
    }

    pub fn watcher(&self) -> DrainWatcher {
        self.watcher.clone()
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Drains every component, as SIGTERM would.
    pub async fn shutdown(mut self) {
        if self.weftd.is_some() {
            self.stop_weftd().await;
        }
        let trigger = self.trigger.take().expect("not yet shut down");
        let watcher = std::mem::replace(&mut self.watcher, weft_drain::new().1);
        drop(watcher);
        tokio::time::timeout(Duration::from_secs(10), trigger.drain())
            .await
            .expect("everything drained within 10s");
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.tasks.abort_all();
        if let Some((_, task)) = self.weftd.take() {
            task.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Proxy {
    /// Waits until this proxy has bound `listeners` listeners and every cluster has endpoints.
    pub async fn ready(&mut self, listeners: usize) {
        let mut state = self.state.clone();
        wait_for("proxy config", Duration::from_secs(10), || {
            let s = state.borrow_and_update().clone();
            async move {
                (s.listeners.len() >= listeners
                    && s.clusters.values().all(|c| !c.endpoints.is_empty()))
                .then_some(())
            }
        })
        .await;
    }
}

// === Manifests ===

/// A Service on `port`, with an EndpointSlice and a Pod per `(ip, pod, version)` endpoint.
pub fn service(
    name: &str,
    port_name: &str,
    port: u16,
    endpoints: &[(IpAddr, &str, &str)],
) -> String {
    service_pods(name, port_name, port, endpoints, "")
}

/// As [`service`], with pods labelled as running a sidecar (`security.istio.io/tlsMode: istio`), so
/// clients reach them over mTLS. Each pod's service account is its name.
pub fn mtls_service(
    name: &str,
    port_name: &str,
    port: u16,
    endpoints: &[(IpAddr, &str, &str)],
) -> String {
    service_pods(
        name,
        port_name,
        port,
        endpoints,
        ", security.istio.io/tlsMode: istio",
    )
}

fn service_pods(
    name: &str,
    port_name: &str,
    port: u16,
    endpoints: &[(IpAddr, &str, &str)],
    extra_labels: &str,
) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  ports: [{{name: {port_name}, port: {port}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: test, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: {port_name}, port: {port}}}]\nendpoints:\n"
    );
    for (ip, pod, _) in endpoints {
        out.push_str(&format!(
            "- {{addresses: [\"{ip}\"], targetRef: {{kind: Pod, name: {pod}}}}}\n"
        ));
    }
    for (_, pod, version) in endpoints {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: test, labels: {{app: {name}, version: {version}{extra_labels}}}}}\nspec: {{serviceAccountName: {pod}}}\n"
        ));
    }
    out
}

/// A Sidecar with explicit listeners for the workload labelled `app`/`version`.
pub fn sidecar(
    name: &str,
    labels: &[(&str, &str)],
    ingress: &[(u16, &str, SocketAddr)],
    egress: &[(u16, &str)],
) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let mut out = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  workloadSelector: {{labels: {{{}}}}}\n",
        labels.join(", ")
    );
    if !ingress.is_empty() {
        out.push_str("  ingress:\n");
        for (port, proto, app) in ingress {
            out.push_str(&format!(
                "  - {{port: {{number: {port}, protocol: {proto}, name: p{port}}}, defaultEndpoint: \"{app}\", captureMode: NONE}}\n"
            ));
        }
    }
    if !egress.is_empty() {
        out.push_str("  egress:\n");
        for (port, proto) in egress {
            out.push_str(&format!("  - {{port: {{number: {port}, protocol: {proto}, name: p{port}}}, captureMode: NONE, hosts: [\"./*\"]}}\n"));
        }
    }
    out
}

// === Backends ===

/// Counts what a backend saw and lets a test make it fail or slow down.
#[derive(Debug, Default)]
pub struct BackendControl {
    pub requests: AtomicUsize,
    /// Answer 503 to this many requests first.
    pub fail_first: AtomicUsize,
    /// Delay every answer by this many milliseconds.
    pub delay_ms: AtomicUsize,
}

/// An HTTP/1.1 + h2c backend answering JSON about the request it got; `/ws` upgrades and echoes bytes.
pub async fn http_backend(
    name: &str,
    drain: DrainWatcher,
) -> (
    SocketAddr,
    Arc<BackendControl>,
    impl Future<Output = ()> + Send + 'static,
) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    let control = Arc::new(BackendControl::default());
    let name = name.to_string();
    let ctl = control.clone();
    let task = async move {
        let mut conns = JoinSet::new();
        loop {
            let stream = tokio::select! {
                a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                () = drain.signaled() => break,
            };
            while conns.try_join_next().is_some() {}
            let (name, ctl) = (name.clone(), ctl.clone());
            conns.spawn(async move {
                let svc = service_fn(move |req| backend_reply(req, name.clone(), ctl.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
        conns.abort_all();
    };
    (addr, control, task)
}

async fn backend_reply(
    mut req: Request<Incoming>,
    name: String,
    ctl: Arc<BackendControl>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    ctl.requests.fetch_add(1, Ordering::SeqCst);
    let delay = ctl.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    if ctl
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let mut r = Response::new(Full::new(Bytes::from("failing on purpose")));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return Ok(r);
    }
    if req.uri().path() == "/ws" {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(http::header::CONNECTION, "upgrade".parse().expect("value"));
        r.headers_mut()
            .insert(http::header::UPGRADE, "websocket".parse().expect("value"));
        return Ok(r);
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let method = req.method().to_string();
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json = serde_json::json!({
        "backend": name,
        "path": path,
        "method": method,
        "headers": headers,
        "body_len": body.len(),
    });
    Ok(Response::new(Full::new(Bytes::from(json.to_string()))))
}

/// A TCP server that echoes what it receives, prefixed with its name (so a test can tell who answered).
pub async fn tcp_echo(
    name: &str,
    drain: DrainWatcher,
) -> (SocketAddr, impl Future<Output = ()> + Send + 'static) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    let greeting = format!("{name}:");
    let task = async move {
        let mut conns = JoinSet::new();
        loop {
            let mut stream: TcpStream = tokio::select! {
                a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                () = drain.signaled() => break,
            };
            let greeting = greeting.clone();
            conns.spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut out = greeting.clone().into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    if stream.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
        conns.abort_all();
    };
    (addr, task)
}

/// A real gRPC server: the standard health service, reporting SERVING.
pub async fn grpc_health(
    drain: DrainWatcher,
) -> (SocketAddr, impl Future<Output = ()> + Send + 'static) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let addr = listener.local_addr().expect("addr");
    let task = async move {
        let (_reporter, service) = tonic_health::server::health_reporter();
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move { drain.signaled().await },
            )
            .await;
    };
    (addr, task)
}

// === Clients ===

/// The answer to one request: status, headers and body as text.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    /// The backend that answered, from its JSON body.
    pub fn backend(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["backend"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    pub fn echoed_header(&self, name: &str) -> Option<String> {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["headers"][name].as_str().map(str::to_string))
    }
}

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub fn http1_client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// One HTTP/2 cleartext (prior knowledge) request to `proxy`, with `authority` as `:authority`, as an h2
/// client that resolved the service name would send it.
pub async fn send_h2c(proxy: SocketAddr, authority: &str, path: &str) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(proxy).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .uri(format!("http://{authority}{path}"))
        .body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    conn.abort();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends `method path` to `proxy` with the given Host and headers.
pub async fn send(
    client: &Client,
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{proxy}{path}"))
        .header(http::header::HOST, host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Full::new(Bytes::new()))?),
    )
    .await??;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A plain HTTP GET to an admin endpoint.
pub async fn get_text(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let r = send(&http1_client(), addr, "GET", &addr.to_string(), path, &[]).await?;
    Ok((r.status, r.body))
}
