//! `weftctl demo`: the whole mesh on one machine, traffic through a routing rule, and a verdict.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use weft_drain::DrainTrigger;

use crate::sample_app;

/// The bundled config, written to a directory the user can edit while the demo runs.
const MANIFESTS: [(&str, &str); 4] = [
    ("mesh.yaml", include_str!("../demo/mesh.yaml")),
    ("routing.yaml", include_str!("../demo/routing.yaml")),
    ("sidecars.yaml", include_str!("../demo/sidecars.yaml")),
    ("security.yaml", include_str!("../demo/security.yaml")),
];

/// The AuthorizationPolicy the demo's `/admin` calls run into.
const DENY_POLICY: &str = "demo/backend-no-admin";
const DENIED_ROUTE: &str = "admin (forbidden by policy)";

const FRONTEND: &str = "127.0.0.10:8000";

/// One workload: its pod, address, labels and where its app listens.
struct Workload {
    pod: &'static str,
    ip: &'static str,
    app: &'static str,
    version: &'static str,
    app_port: u16,
    /// Where the app listens inside its pod in interception mode: its EndpointSlice port.
    pod_port: u16,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        pod: "frontend-0",
        ip: "127.0.0.10",
        app: "frontend",
        version: "v1",
        app_port: 18000,
        pod_port: 8000,
    },
    Workload {
        pod: "backend-v1-0",
        ip: "127.0.0.21",
        app: "backend",
        version: "v1",
        app_port: 18081,
        pod_port: 9080,
    },
    Workload {
        pod: "backend-v2-0",
        ip: "127.0.0.22",
        app: "backend",
        version: "v2",
        app_port: 18082,
        pod_port: 9080,
    },
    Workload {
        pod: "status-0",
        ip: "127.0.0.31",
        app: "status",
        version: "v1",
        app_port: 18090,
        pod_port: 9090,
    },
];

#[derive(Clone, Debug)]
pub struct Options {
    /// Stop after this long; `None` runs until Ctrl-C.
    pub duration: Option<Duration>,
    pub rate: u32,
    pub config_dir: Option<PathBuf>,
    pub mode: Mode,
    /// Where `weftd` and `weft-proxy` are; `None` looks beside this program, then on `PATH`.
    pub bin_dir: Option<PathBuf>,
}

/// How workloads reach their proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Interception when run as root with iptables and setpriv at hand, else explicit listeners.
    Auto,
    /// Every workload on its own 127.0.0.x address, proxies binding the listeners their Sidecar names.
    Explicit,
    /// Every workload in its own network namespace, its TCP captured by iptables, as in a pod.
    Interception,
}

/// Why interception mode cannot run here, if it cannot.
fn interception_missing() -> Option<&'static str> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("root");
    }
    let on_path = |tool: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
    };
    ["ip", "iptables-restore", "setpriv"]
        .into_iter()
        .find(|t| !on_path(t))
        .map(|t| match t {
            "ip" => "iproute2 (ip)",
            "iptables-restore" => "iptables",
            _ => "setpriv (util-linux)",
        })
}

/// Pod addresses in interception mode: the same last octet as in explicit mode.
const POD_NET: &str = "10.97.0";
/// This machine's end of the pod network: weftd and the demo's client live here.
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
/// Service addresses (ClusterIPs in mesh.yaml) the frontend calls in interception mode.
const BACKEND_VIP: &str = "10.96.0.20:9080";
const STATUS_VIP: &str = "10.96.0.30:9090";

/// The parts of interception mode, dropped in this order: proxies, then the namespaces and the network,
/// then the shared executable.
struct Captured {
    _proxies: Vec<weft_netns::Process>,
    apps: Vec<std::thread::JoinHandle<anyhow::Result<()>>>,
    _pods: Vec<weft_netns::Netns>,
    _host: weft_netns::HostLink,
    _network: weft_netns::Network,
    _exe: weft_netns::SharedExecutable,
}

/// Interception mode: each workload a network namespace on a bridge with the capture rules installed by
/// `weft-proxy iptables` and a `weft-proxy` running as uid 1337; the apps run on threads inside the
/// namespaces; weftd runs here, on this machine's end of the bridge.
async fn start_captured(dir: &Path, bins: &Binaries) -> anyhow::Result<Running> {
    let (trigger, watcher) = weft_drain::new();
    let tasks = JoinSet::new();
    let exe = weft_netns::SharedExecutable::new(&bins.proxy)?;
    let network = weft_netns::Network::new()?;
    let host = network.attach_host(HOST_IP)?;
    let (weftd, xds) = start_weftd(dir, HOST_IP.into(), bins).await?;
    let (mut proxies, mut apps, mut pods, mut metrics_urls, mut stats) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let exe_path = exe
        .path
        .to_str()
        .context("executable path is not UTF-8")?
        .to_string();
    for wl in &WORKLOADS {
        let ip: Ipv4Addr = wl.ip.replace("127.0.0", POD_NET).parse()?;
        let ns = weft_netns::Netns::new(wl.pod)?;
        network.attach(&ns, ip)?;
        ns.exec(&[&exe_path, "iptables"])?;
        let log_path = dir.join(format!("{}.log", wl.pod));
        let log = std::fs::File::create(&log_path)?;
        let token = proxy_readable_token(dir, &xds, wl)?;
        let proxy = ns
            .command("setpriv")
            .args(["--reuid=1337", "--regid=1337", "--clear-groups", &exe_path])
            .args(["--xds-address", &format!("https://{}", xds.secure)])
            .env("POD_NAME", wl.pod)
            .env("POD_NAMESPACE", "demo")
            .env("INSTANCE_IP", ip.to_string())
            .env("SERVICE_ACCOUNT", wl.app)
            .env("ISTIO_METAJSON_LABELS", pod_labels(wl))
            .env("ISTIO_META_INTERCEPTION_MODE", "REDIRECT")
            .envs(identity_env(&xds, &token))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start the proxy for {}", wl.pod))?;
        proxies.push(weft_netns::Process(proxy));
        metrics_urls.push((
            wl.pod.to_string(),
            format!(
                "metrics http://{ip}:15090/stats/prometheus  proxy log {}",
                log_path.display()
            ),
        ));
        stats.push((wl.pod.to_string(), SocketAddr::new(ip.into(), 15090)));
        let (app, version, port, w) = (wl.app, wl.version, wl.pod_port, watcher.clone());
        apps.push(ns.spawn(move || async move {
            let listener =
                TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)).await?;
            match app {
                "frontend" => {
                    sample_app::frontend(listener, BACKEND_VIP.parse()?, STATUS_VIP.parse()?, w)
                        .await
                }
                "backend" => sample_app::backend(listener, version.to_string(), w).await,
                _ => sample_app::status(listener, w).await?,
            }
            Ok(())
        }));
        pods.push(ns);
    }
    drop(watcher);
    let frontend = SocketAddr::new(format!("{POD_NET}.10").parse::<Ipv4Addr>()?.into(), 8000);
    let captured = Captured {
        _proxies: proxies,
        apps,
        _pods: pods,
        _host: host,
        _network: network,
        _exe: exe,
    };
    Ok(Running {
        trigger,
        tasks,
        metrics_urls,
        stats,
        xds,
        weftd,
        proxies: Vec::new(),
        frontend,
        backend_inbound: SocketAddr::new(format!("{POD_NET}.21").parse::<Ipv4Addr>()?.into(), 9080),
        captured: Some(captured),
    })
}

fn pod_labels(wl: &Workload) -> String {
    serde_json::json!({"app": wl.app, "version": wl.version, "security.istio.io/tlsMode": "istio"})
        .to_string()
}

/// The bootstrap token weftd wrote for the workload's service account (its app name).
fn token_path(xds: &XdsView, wl: &Workload) -> PathBuf {
    xds.identity_dir
        .join("demo")
        .join(wl.app)
        .join("istio-token")
}

/// Istio agent settings for a proxy that gets its certificate from weftd.
fn identity_env(xds: &XdsView, token: &Path) -> Vec<(String, String)> {
    vec![
        ("CA_ADDR".into(), xds.secure.to_string()),
        (
            "WEFT_CA_ROOT_CERT".into(),
            xds.identity_dir.join("root-cert.pem").display().to_string(),
        ),
        ("WEFT_CA_TOKEN_FILE".into(), token.display().to_string()),
    ]
}

/// In a pod the token is mounted for the proxy's user; here, a copy the proxy (uid 1337) owns.
fn proxy_readable_token(dir: &Path, xds: &XdsView, wl: &Workload) -> anyhow::Result<PathBuf> {
    let copy = dir.join("pods").join(wl.pod).join("istio-token");
    let parent = copy.parent().context("token path has a parent")?;
    std::fs::create_dir_all(parent)?;
    std::fs::copy(token_path(xds, wl), &copy)
        .with_context(|| format!("no bootstrap token for {}", wl.pod))?;
    let proxy_user = Some(nix::unistd::Uid::from_raw(1337));
    let proxy_group = Some(nix::unistd::Gid::from_raw(1337));
    nix::unistd::chown(&copy, proxy_user, proxy_group)?;
    nix::unistd::chown(parent, proxy_user, proxy_group)?;
    Ok(copy)
}

/// Per-route results.
#[derive(Debug, Default)]
struct Tally {
    by_answer: BTreeMap<String, u64>,
    failures: u64,
    latencies: Vec<Duration>,
}

impl Tally {
    fn total(&self) -> u64 {
        self.by_answer.values().sum::<u64>() + self.failures
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// In interception mode the workloads live on the pod network rather than on 127.0.0.x, so their
/// endpoint addresses move with them; everything else is the same config.
fn write_manifests(dir: &Path, captured: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, text) in MANIFESTS {
        let path = dir.join(name);
        let text = if captured {
            text.replace("addresses: [127.0.0.", &format!("addresses: [{POD_NET}."))
        } else {
            text.to_string()
        };
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind {what} on {addr}"))
}

/// Everything the demo started, so it can be drained in one place.
struct Running {
    frontend: SocketAddr,
    /// Backend v1's sidecar, where a plaintext call must be refused (STRICT).
    backend_inbound: SocketAddr,
    /// Each proxy's Prometheus endpoint, for the identities each hop proved.
    stats: Vec<(String, SocketAddr)>,
    /// The namespaces, processes and threads of interception mode; dropping it tears them down.
    captured: Option<Captured>,
    weftd: weft_netns::Process,
    /// Explicit mode's proxies (interception mode's live in `captured`).
    proxies: Vec<weft_netns::Process>,
    trigger: DrainTrigger,
    tasks: JoinSet<()>,
    metrics_urls: Vec<(String, String)>,
    xds: XdsView,
}

struct XdsView {
    /// The CA and xDS over mTLS; every proxy of the demo has an identity, so plaintext xDS is off.
    secure: SocketAddr,
    /// Where the trust bundle and bootstrap tokens are.
    identity_dir: PathBuf,
    /// weftd's `/ready` and `/metrics` (Istio's 15014).
    monitoring: SocketAddr,
}

/// The programs the demo runs: the same binaries a cluster runs.
pub struct Binaries {
    pub weftd: PathBuf,
    pub proxy: PathBuf,
}

impl Binaries {
    /// `weftd` and `weft-proxy` in `dir`, else beside this program, else on `PATH`.
    pub fn find(dir: Option<&Path>) -> anyhow::Result<Self> {
        let own_dir = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf));
        let mut dirs: Vec<PathBuf> = match dir {
            Some(d) => vec![d.to_path_buf()],
            None => own_dir.into_iter().collect(),
        };
        // A test binary lives in cargo's `deps/`, one below the binaries it runs.
        if let Some(parent) = dirs
            .first()
            .filter(|d| d.ends_with("deps"))
            .and_then(|d| d.parent())
        {
            dirs.push(parent.to_path_buf());
        }
        if dir.is_none()
            && let Some(path) = std::env::var_os("PATH")
        {
            dirs.extend(std::env::split_paths(&path));
        }
        let find = |name: &str| {
            dirs.iter()
                .map(|d| d.join(name))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "cannot find {name} in {}; build it beside weftctl (`cargo build --release` builds every binary) or put it on PATH",
                        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
                    )
                })
        };
        Ok(Self {
            weftd: find("weftd")?,
            proxy: find("weft-proxy")?,
        })
    }
}

/// weftd, as its own process, serving Istio's ports on `ip` from the demo's directory, with a CA that
/// lives as long as the demo.
async fn start_weftd(
    dir: &Path,
    ip: std::net::IpAddr,
    bins: &Binaries,
) -> anyhow::Result<(weft_netns::Process, XdsView)> {
    let xds = XdsView {
        secure: SocketAddr::new(ip, 15012),
        identity_dir: dir.join("identity"),
        monitoring: SocketAddr::new(ip, 15014),
    };
    let log_path = dir.join("weftd.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let child = std::process::Command::new(&bins.weftd)
        .arg("--config-dir")
        .arg(dir)
        .args(["--xds-address", ""])
        .args(["--secure-address", &xds.secure.to_string()])
        .args(["--monitoring-address", &xds.monitoring.to_string()])
        .arg("--identity-dir")
        .arg(&xds.identity_dir)
        .arg("--ephemeral-ca")
        .arg("--access-log-file")
        .arg(dir.join("access.log"))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", bins.weftd.display()))?;
    let mut weftd = weft_netns::Process(child);
    let ready = format!("http://{}/ready", xds.monitoring);
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(status)) = weftd.0.try_wait() {
            bail!(
                "weftd exited ({status}) before it was ready; its log {}:\n{}",
                log_path.display(),
                log_tail(&log_path)
            );
        }
        if crate::http_get(&ready).await.is_ok() {
            break;
        }
        if Instant::now() > until {
            bail!(
                "weftd was not ready on {ready} within 15s; its log {}:\n{}",
                log_path.display(),
                log_tail(&log_path)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for wl in &WORKLOADS {
        let token = token_path(&xds, wl);
        while !token.is_file() {
            if Instant::now() > until {
                bail!(
                    "weftd wrote no bootstrap token {} within 15s",
                    token.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok((weftd, xds))
}

/// The last lines of a log, for an error that says why a process stopped.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Asks a process to stop (SIGTERM, so it drains) and kills it if it has not within `grace`.
async fn terminate(mut process: weft_netns::Process, grace: Duration) {
    let Ok(pid) = i32::try_from(process.0.id()) else {
        return;
    };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let until = Instant::now() + grace;
    while Instant::now() < until {
        if let Ok(Some(_)) = process.0.try_wait() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Dropping kills what did not stop in time.
}

/// Explicit-listener mode: every workload on its own 127.0.0.x address, a `weft-proxy` process each.
async fn start_explicit(dir: &Path, bins: &Binaries) -> anyhow::Result<Running> {
    let (trigger, watcher) = weft_drain::new();
    let mut tasks = JoinSet::new();
    let (weftd, xds) = start_weftd(dir, "127.0.0.1".parse()?, bins).await?;

    let (mut metrics_urls, mut stats, mut proxies) = (Vec::new(), Vec::new(), Vec::new());
    for wl in &WORKLOADS {
        let log_path = dir.join(format!("{}.log", wl.pod));
        let log = std::fs::File::create(&log_path)?;
        let token = token_path(&xds, wl);
        let proxy = std::process::Command::new(&bins.proxy)
            .args(["--xds-address", &format!("https://{}", xds.secure)])
            .env("POD_NAME", wl.pod)
            .env("POD_NAMESPACE", "demo")
            .env("INSTANCE_IP", wl.ip)
            .env("SERVICE_ACCOUNT", wl.app)
            .env("ISTIO_METAJSON_LABELS", pod_labels(wl))
            .envs(identity_env(&xds, &token))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start the proxy for {}", wl.pod))?;
        proxies.push(weft_netns::Process(proxy));
        let (admin, metrics) = (
            format!("{}:{ADMIN_PORT}", wl.ip),
            SocketAddr::new(wl.ip.parse()?, STATS_PORT),
        );
        metrics_urls.push((
            wl.pod.to_string(),
            format!(
                "admin http://{admin}/config_dump  http://{admin}/certs  metrics http://{metrics}/stats/prometheus  proxy log {}",
                log_path.display()
            ),
        ));
        stats.push((wl.pod.to_string(), metrics));
        let app_addr: SocketAddr = format!("127.0.0.1:{}", wl.app_port).parse()?;
        let listener = bind(app_addr, wl.pod).await?;
        let w = watcher.clone();
        match wl.app {
            "frontend" => {
                let (http, grpc) = ("127.0.0.10:9080".parse()?, "127.0.0.10:9090".parse()?);
                tasks.spawn(sample_app::frontend(listener, http, grpc, w));
            }
            "backend" => {
                tasks.spawn(sample_app::backend(listener, wl.version.to_string(), w));
            }
            _ => {
                tasks.spawn(async move {
                    let _ = sample_app::status(listener, w).await;
                });
            }
        }
    }
    drop(watcher);
    Ok(Running {
        trigger,
        tasks,
        metrics_urls,
        stats,
        xds,
        weftd,
        proxies,
        frontend: FRONTEND.parse()?,
        backend_inbound: "127.0.0.21:9080".parse()?,
        captured: None,
    })
}

/// Istio's proxy admin and Prometheus ports, where each explicit-mode proxy serves on its address.
const ADMIN_PORT: u16 = 15000;
const STATS_PORT: u16 = 15090;

type DemoClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

async fn call(
    client: &DemoClient,
    frontend: SocketAddr,
    path: &str,
    user: Option<&str>,
) -> Result<String, String> {
    let mut req = Request::builder()
        .uri(format!("http://{frontend}{path}"))
        .header(http::header::HOST, "frontend.demo.svc.cluster.local:8000");
    if let Some(u) = user {
        req = req.header("end-user", u);
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// Waits until the mesh answers end to end, or gives up with what was last seen.
async fn wait_ready(
    client: &DemoClient,
    frontend: SocketAddr,
    deadline: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    loop {
        let (a, b) = (
            call(client, frontend, "/", None).await,
            call(client, frontend, "/status", None).await,
        );
        if a.is_ok() && b.is_ok() {
            return Ok(());
        }
        if Instant::now() > until {
            bail!(
                "the mesh did not become ready within {deadline:?}: / -> {a:?}, /status -> {b:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(options: Options) -> anyhow::Result<bool> {
    let dir = options
        .config_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("weft-demo-{}", std::process::id())));
    let captured = match options.mode {
        Mode::Explicit => false,
        Mode::Interception => {
            if let Some(missing) = interception_missing() {
                anyhow::bail!("interception mode needs {missing}");
            }
            true
        }
        Mode::Auto => match interception_missing() {
            None => true,
            Some(missing) => {
                println!("weft demo: explicit-listener mode (interception needs {missing})");
                false
            }
        },
    };
    write_manifests(&dir, captured)?;
    if captured {
        println!(
            "weft demo: interception mode: each workload is a network namespace ({POD_NET}.x) whose TCP iptables hands to its proxy"
        );
    } else if options.mode == Mode::Explicit {
        println!(
            "weft demo: explicit-listener mode (no traffic capture); each workload has its own 127.0.0.x address"
        );
    }
    println!(
        "  config directory: {}  (edit it while the demo runs; weftd reloads it)",
        dir.display()
    );
    let bins = Binaries::find(options.bin_dir.as_deref())?;
    let running = if captured {
        start_captured(&dir, &bins).await?
    } else {
        start_explicit(&dir, &bins).await?
    };
    println!(
        "  weftd: CA and xDS over mTLS on {} (plaintext xDS is off), metrics on http://{}/metrics",
        running.xds.secure, running.xds.monitoring
    );
    let client: DemoClient = Client::builder(TokioExecutor::new()).build_http();
    wait_ready(&client, running.frontend, Duration::from_secs(15)).await?;
    // STRICT: a client outside the mesh cannot talk to the backend's sidecar in plaintext.
    let plaintext = plaintext_refused(running.backend_inbound).await;
    println!(
        "  mesh ready; sending ~{} requests/s through the frontend {}",
        options.rate,
        match options.duration {
            Some(d) => format!("for {d:?}"),
            None => "until Ctrl-C".into(),
        }
    );

    let mut tallies: BTreeMap<&'static str, Tally> = BTreeMap::new();
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / options.rate.max(1));
    let mut next_progress = started + Duration::from_secs(1);
    let stop = async {
        match options.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => weft_telemetry::shutdown_signal().await,
        }
    };
    tokio::pin!(stop);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut stop => break,
        }
        n += 1;
        // Every 10th request is the test user, every 7th a gRPC status call, every 13th an admin call
        // the backend's AuthorizationPolicy refuses; the rest go through the split.
        let (route, path, user) = if n.is_multiple_of(10) {
            ("test-user (end-user: tester)", "/", Some("tester"))
        } else if n.is_multiple_of(7) {
            ("grpc status.demo", "/status", None)
        } else if n.is_multiple_of(13) {
            (DENIED_ROUTE, "/admin", None)
        } else {
            ("split 90/10", "/", None)
        };
        let t0 = Instant::now();
        let result = match call(&client, running.frontend, path, user).await {
            // The denial is the expected answer on this route.
            Err(e) if route == DENIED_ROUTE && e.starts_with("403") => Ok(e),
            other => other,
        };
        let tally = tallies.entry(route).or_default();
        tally.latencies.push(t0.elapsed());
        match result {
            Ok(answer) => *tally.by_answer.entry(answer).or_default() += 1,
            Err(e) => {
                tally.failures += 1;
                tracing::warn!(route, error = %e, "request failed");
            }
        }
        if Instant::now() >= next_progress {
            next_progress += Duration::from_secs(1);
            let total: u64 = tallies.values().map(Tally::total).sum();
            let failed: u64 = tallies.values().map(|t| t.failures).sum();
            println!(
                "  {:>4}s  {total} requests, {failed} failed",
                started.elapsed().as_secs()
            );
        }
    }

    let mut scraped = Vec::new();
    for (pod, addr) in &running.stats {
        let url = format!("http://{addr}/stats/prometheus");
        scraped.push((pod.clone(), crate::http_get(&url).await.unwrap_or_default()));
    }
    let weftd_metrics = crate::http_get(&format!("http://{}/metrics", running.xds.monitoring))
        .await
        .unwrap_or_default();
    let ok = report(
        &tallies,
        &running,
        &Security { plaintext, scraped },
        &weftd_metrics,
    );
    let Running {
        trigger,
        mut tasks,
        captured,
        weftd,
        proxies,
        ..
    } = running;
    for proxy in proxies {
        terminate(proxy, Duration::from_secs(2)).await;
    }
    if tokio::time::timeout(Duration::from_secs(5), trigger.drain())
        .await
        .is_err()
    {
        tracing::warn!("demo components did not drain in time");
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(mut captured) = captured {
        // The apps stopped on the drain signal; their threads end with them.
        for app in captured.apps.drain(..) {
            if let Ok(Err(e)) = app.join() {
                tracing::warn!(error = %e, "a demo app stopped with an error");
            }
        }
    }
    terminate(weftd, Duration::from_secs(2)).await;
    Ok(ok)
}

/// What the demo checks of identity and access, beyond the traffic tallies.
struct Security {
    /// `Ok` with why a plaintext call to the backend failed, or `Err` if it got through.
    plaintext: Result<String, String>,
    /// Each proxy's Prometheus text.
    scraped: Vec<(String, String)>,
}

async fn plaintext_refused(addr: SocketAddr) -> Result<String, String> {
    let client: DemoClient = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::builder()
        .uri(format!("http://{addr}/"))
        .header(http::header::HOST, sample_app::BACKEND_HOST)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
        Ok(Ok(resp)) => Err(format!("answered {}", resp.status())),
        Ok(Err(e)) => Ok(format!("connection refused by the sidecar ({e})")),
        Err(_) => Ok("no answer".into()),
    }
}

/// NACKs weftd counted, summed over resource types, from its Prometheus text.
fn nacks(weftd_metrics: &str) -> u64 {
    weftd_metrics
        .lines()
        .filter(|l| l.starts_with("weft_xds_nacks_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|n| n as u64)
        .sum()
}

/// A label's value in one Prometheus text line.
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let rest = &line[start..];
    Some(&rest[..rest.find('"')?])
}

/// The hops servers saw over mTLS: (client identity, server identity, server workload).
fn mtls_hops(scraped: &[(String, String)]) -> std::collections::BTreeSet<(String, String, String)> {
    scraped
        .iter()
        .flat_map(|(_, text)| text.lines())
        .filter(|l| {
            l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\"")
        })
        .filter(|l| label(l, "connection_security_policy") == Some("mutual_tls"))
        .filter_map(|l| {
            Some((
                label(l, "source_principal")?.to_string(),
                label(l, "destination_principal")?.to_string(),
                label(l, "destination_workload")?.to_string(),
            ))
        })
        .collect()
}

/// Denials counted by the proxies for `policy`.
fn denials(scraped: &[(String, String)], policy: &str) -> f64 {
    scraped
        .iter()
        .flat_map(|(_, text)| text.lines())
        .filter(|l| l.starts_with("weft_authorization_denied_total{"))
        .filter(|l| label(l, "policy") == Some(policy))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn report(
    tallies: &BTreeMap<&'static str, Tally>,
    running: &Running,
    security: &Security,
    weftd_metrics: &str,
) -> bool {
    println!("\nsummary");
    let mut ok = true;
    for (route, t) in tallies {
        let mut lat = t.latencies.clone();
        lat.sort();
        let total = t.total();
        let success = if total == 0 {
            0.0
        } else {
            100.0 * (total - t.failures) as f64 / total as f64
        };
        println!(
            "  {route}: {total} requests, {success:.1}% success, p50 {:.2} ms, p99 {:.2} ms",
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3
        );
        for (answer, count) in &t.by_answer {
            println!(
                "      {answer}: {count} ({:.1}%)",
                100.0 * *count as f64 / total.max(1) as f64
            );
        }
        if t.failures > 0 {
            println!("      FAILED: {}", t.failures);
            ok = false;
        }
    }
    let count = |route: &str, answer: &str| {
        tallies
            .get(route)
            .and_then(|t| t.by_answer.get(answer))
            .copied()
            .unwrap_or(0)
    };
    let tester_total = tallies
        .get("test-user (end-user: tester)")
        .map_or(0, Tally::total);
    if tester_total == 0 || count("test-user (end-user: tester)", "backend v2") != tester_total {
        println!("  ✗ the test user was not always sent to backend v2");
        ok = false;
    } else {
        println!("  ✓ the test user always reached backend v2 (header match)");
    }
    let (v1, v2) = (
        count("split 90/10", "backend v1"),
        count("split 90/10", "backend v2"),
    );
    let share = if v1 + v2 == 0 {
        0.0
    } else {
        v2 as f64 / (v1 + v2) as f64
    };
    // The split is random per request: allow for chance on short runs.
    let tolerance = if v1 + v2 >= 400 { 0.05 } else { 0.10 };
    if v1 + v2 == 0 || (share - 0.10).abs() > tolerance {
        println!(
            "  ✗ the split sent {:.1}% to v2, expected 10%",
            share * 100.0
        );
        ok = false;
    } else {
        println!(
            "  ✓ the split sent {:.1}% to v2 (rule: 90/10)",
            share * 100.0
        );
    }
    if count("grpc status.demo", "status Serving") == 0 {
        println!("  ✗ no gRPC call reached the status service");
        ok = false;
    } else {
        println!("  ✓ gRPC calls to status.demo were served over HTTP/2 through both proxies");
    }
    let denied_total = tallies.get(DENIED_ROUTE).map_or(0, Tally::total);
    let denied_right = count(DENIED_ROUTE, "403 Forbidden: RBAC: access denied");
    let counted = denials(&security.scraped, DENY_POLICY);
    if denied_total == 0 || denied_right != denied_total || counted < 1.0 {
        println!(
            "  ✗ /admin calls: {denied_right} of {denied_total} denied; {counted} denials counted for {DENY_POLICY}"
        );
        ok = false;
    } else {
        println!(
            "  ✓ every /admin call was denied (403 RBAC: access denied); the backend's proxies counted {counted} denials by {DENY_POLICY} rule 0"
        );
    }
    match &security.plaintext {
        Ok(why) => println!("  ✓ plaintext to backend v1 was refused under STRICT mTLS: {why}"),
        Err(what) => {
            println!("  ✗ plaintext to backend v1 got through STRICT mTLS: {what}");
            ok = false;
        }
    }
    let hops = mtls_hops(&security.scraped);
    let reached = |workload: &str| hops.iter().any(|(_, _, w)| w.starts_with(workload));
    if reached("backend") && reached("status") {
        println!("  ✓ every hop between sidecars was mutual TLS; identities the servers saw:");
    } else {
        println!("  ✗ expected mTLS hops to backend and status; the servers saw:");
        ok = false;
    }
    for (source, destination, workload) in &hops {
        println!("      {source} -> {destination} ({workload})");
    }
    println!("  xDS: {} NACKs from proxies", nacks(weftd_metrics));
    println!("\nendpoints");
    for (pod, urls) in &running.metrics_urls {
        println!("  {pod}: {urls}");
    }
    println!(
        "  weftd: xDS and CA {}  metrics http://{}/metrics  log {}",
        running.xds.secure,
        running.xds.monitoring,
        running
            .xds
            .identity_dir
            .with_file_name("weftd.log")
            .display()
    );
    println!(
        "\n{}",
        if ok {
            "demo passed: all traffic behaved as configured"
        } else {
            "demo FAILED: see above"
        }
    );
    ok
}
