//! `cargo xtask bench`: the same HTTP/1.1 keep-alive load direct, through one weft-proxy, and through a
//! client and server proxy pair; at a fixed rate (latency) and at full speed (throughput). Where haproxy is
//! installed, the same topologies through haproxy in the same run. Everything runs on loopback; the load
//! generator is in this process, so on a 2-core machine it competes with what it measures: compare ratios
//! within one run, never absolute numbers across runs.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, time::Instant};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Length of each measured phase, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Requests per second in the fixed-rate phase.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Connections in the full-speed phase.
    #[arg(long, default_value_t = 16)]
    connections: usize,
}

const BACKEND: &str = "127.0.0.1:18500";
const CLIENT_PROXY_IP: &str = "127.0.0.101";
const SERVER_PROXY_IP: &str = "127.0.0.102";
/// weftd's CA and xDS over mTLS.
const SECURE: &str = "127.0.0.1:18512";

/// Kills its processes when dropped, so a failed run leaves nothing behind.
struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Procs {
    fn spawn(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<u32> {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child.id();
        self.0.push((name.to_string(), child));
        Ok(pid)
    }
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// User plus system CPU time of a process, in microseconds.
fn cpu_us(pid: u32, ticks: u64) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // utime and stime are fields 14 and 15 of stat; here (state dropped as non-numeric) at 10 and 11.
    let (utime, stime) = (
        f.get(10).copied().unwrap_or(0),
        f.get(11).copied().unwrap_or(0),
    );
    (utime + stime) * 1_000_000 / ticks
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn manifests() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: one, namespace: bench}}
spec: {{ports: [{{name: http, port: 9080}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: one-1, namespace: bench, labels: {{kubernetes.io/service-name: one}}}}
ports: [{{name: http, port: 18500}}]
endpoints: [{{addresses: ["127.0.0.1"]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: pair, namespace: bench}}
spec: {{ports: [{{name: http, port: 9081}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: pair-1, namespace: bench, labels: {{kubernetes.io/service-name: pair}}}}
ports: [{{name: http, port: 9082}}]
endpoints: [{{addresses: ["{SERVER_PROXY_IP}"], targetRef: {{kind: Pod, name: server-0}}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: server-0, namespace: bench, labels: {{app: server, security.istio.io/tlsMode: istio}}}}
spec: {{serviceAccountName: server}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client-0, namespace: bench, labels: {{app: client, security.istio.io/tlsMode: istio}}}}
spec: {{serviceAccountName: client}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: client, namespace: bench}}
spec:
  workloadSelector: {{labels: {{app: client}}}}
  egress:
  - {{port: {{number: 9080, protocol: HTTP, name: http}}, captureMode: NONE, hosts: ["./*"]}}
  - {{port: {{number: 9081, protocol: HTTP, name: http}}, captureMode: NONE, hosts: ["./*"]}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: server, namespace: bench}}
spec:
  workloadSelector: {{labels: {{app: server}}}}
  ingress:
  - {{port: {{number: 9082, protocol: HTTP, name: http}}, defaultEndpoint: "{BACKEND}", captureMode: NONE}}
"#
    )
}

const HAPROXY_CFG: &str = "global\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n\
frontend one\n  bind 127.0.0.1:18601\n  default_backend app\nfrontend pair_client\n  bind 127.0.0.1:18602\n  default_backend to_server\n\
frontend pair_server\n  bind 127.0.0.1:18603\n  default_backend app\nbackend app\n  server app 127.0.0.1:18500\nbackend to_server\n  server s 127.0.0.1:18603\n";

/// One measured topology: where the load goes, its Host header, and which processes to charge.
struct Target {
    name: String,
    addr: SocketAddr,
    host: &'static str,
    pids: Vec<u32>,
}

struct Result {
    name: String,
    p50: Duration,
    p99: Duration,
    rps: f64,
    cpu_us_per_req: Vec<f64>,
    rss_kib: Vec<u64>,
}

pub(crate) fn run(root: &Path, o: Options) -> anyhow::Result<()> {
    eprintln!("==> building release binaries");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--bin",
            "weftd",
            "--bin",
            "weft-proxy",
            "--bin",
            "weftctl",
        ])
        .status()?;
    if !status.success() {
        bail!("release build failed");
    }
    let bin = root.join("target/release");
    let dir = std::env::temp_dir().join(format!("weft-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench.yaml"), manifests())?;
    let identity = dir.join("identity");
    let mut procs = Procs(Vec::new());
    procs.spawn(
        "backend",
        Command::new(bin.join("weftctl")).args([
            "sample-app",
            "backend",
            "--listen",
            BACKEND,
            "--version",
            "v1",
        ]),
    )?;
    procs.spawn(
        "weftd",
        Command::new(bin.join("weftd")).args([
            "--config-dir",
            &dir.display().to_string(),
            "--xds-address",
            "127.0.0.1:18510",
            "--monitoring-address",
            "127.0.0.1:18511",
            "--secure-address",
            SECURE,
            "--identity-dir",
            &identity.display().to_string(),
        ]),
    )?;
    // Proxies get certificates from weftd's CA and talk mTLS to each other, as sidecars do.
    let proxy = |ip: &str, app: &str| -> anyhow::Result<Command> {
        let token = identity.join("bench").join(app).join("istio-token");
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !token.exists() {
            anyhow::ensure!(
                std::time::Instant::now() < until,
                "weftd wrote no token for {app}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut c = Command::new(bin.join("weft-proxy"));
        c.args(["--xds-address", &format!("https://{SECURE}")])
            .env("POD_NAME", format!("{app}-0"))
            .env("POD_NAMESPACE", "bench")
            .env("INSTANCE_IP", ip)
            .env("SERVICE_ACCOUNT", app)
            .env(
                "ISTIO_METAJSON_LABELS",
                format!("{{\"app\":\"{app}\",\"security.istio.io/tlsMode\":\"istio\"}}"),
            )
            .env("CA_ADDR", SECURE)
            .env("WEFT_CA_ROOT_CERT", identity.join("root-cert.pem"))
            .env("WEFT_CA_TOKEN_FILE", token)
            .env("RUST_LOG", "warn");
        Ok(c)
    };
    let client_pid = procs.spawn("client proxy", &mut proxy(CLIENT_PROXY_IP, "client")?)?;
    let server_pid = procs.spawn("server proxy", &mut proxy(SERVER_PROXY_IP, "server")?)?;
    let mut targets = vec![
        Target {
            name: "direct".into(),
            addr: BACKEND.parse()?,
            host: "backend",
            pids: vec![],
        },
        Target {
            name: "weft: one proxy".into(),
            addr: format!("{CLIENT_PROXY_IP}:9080").parse()?,
            host: "one.bench.svc.cluster.local",
            pids: vec![client_pid],
        },
        Target {
            name: "weft: proxy pair (mTLS)".into(),
            addr: format!("{CLIENT_PROXY_IP}:9081").parse()?,
            host: "pair.bench.svc.cluster.local",
            pids: vec![client_pid, server_pid],
        },
    ];
    if let Some(haproxy) = which("haproxy") {
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, HAPROXY_CFG)?;
        let pid = procs.spawn(
            "haproxy",
            Command::new(haproxy).args(["-f", &cfg.display().to_string(), "-db"]),
        )?;
        targets.push(Target {
            name: "haproxy: one hop".into(),
            addr: "127.0.0.1:18601".parse()?,
            host: "backend",
            pids: vec![pid],
        });
        targets.push(Target {
            name: "haproxy: pair (one process, two hops)".into(),
            addr: "127.0.0.1:18602".parse()?,
            host: "backend",
            pids: vec![pid],
        });
    } else {
        eprintln!(
            "    haproxy not found: install it (apt-get install haproxy) to compare in the same run"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let results = rt.block_on(async {
        for t in &targets {
            wait_ready(t)
                .await
                .with_context(|| format!("{} never answered", t.name))?;
        }
        let idle: Vec<(String, u64)> = procs
            .0
            .iter()
            .filter(|(n, _)| n.contains("proxy"))
            .map(|(n, c)| (n.clone(), rss_kib(c.id())))
            .collect();
        let mut results = Vec::new();
        for t in &targets {
            results.push(measure(t, &o).await?);
        }
        anyhow::Ok((idle, results))
    })?;
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
    print_table(&results.1, &results.0, &o);
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

async fn request(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: &str,
) -> anyhow::Result<()> {
    let req = http::Request::builder()
        .uri("/")
        .header(http::header::HOST, host)
        .body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    let ok = resp.status().is_success();
    resp.into_body().collect().await?;
    if !ok {
        bail!("non-2xx answer");
    }
    Ok(())
}

async fn connect(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn wait_ready(t: &Target) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async {
            let mut s = connect(t.addr).await?;
            request(&mut s, t.host).await
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > until => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn measure(t: &Target, o: &Options) -> anyhow::Result<Result> {
    eprintln!(
        "==> {}: {} req/s for {}s, then full speed on {} connections",
        t.name, o.rate, o.seconds, o.connections
    );
    let ticks = clock_ticks();
    // Fixed rate: latency from the scheduled send time, so a stall is charged to every request it delays.
    let conns = 8u32;
    let per_conn = Duration::from_secs_f64(f64::from(conns) / f64::from(o.rate.max(1)));
    let deadline = Instant::now() + Duration::from_secs(o.seconds);
    let cpu_before: Vec<u64> = t.pids.iter().map(|p| cpu_us(*p, ticks)).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..conns {
        let (addr, host) = (t.addr, t.host);
        tasks.spawn(async move {
            let mut sender = connect(addr).await?;
            let mut lat = Vec::new();
            let mut next = Instant::now() + per_conn * i / conns;
            while next < deadline {
                tokio::time::sleep_until(next).await;
                request(&mut sender, host).await?;
                lat.push(next.elapsed());
                next += per_conn;
            }
            anyhow::Ok(lat)
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat.extend(r??);
    }
    let fixed_count = lat.len() as f64;
    let cpu: Vec<f64> = t
        .pids
        .iter()
        .zip(&cpu_before)
        .map(|(p, b)| (cpu_us(*p, ticks) - b) as f64 / fixed_count.max(1.0))
        .collect();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    // Full speed: closed loop on every connection.
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(o.seconds);
    for _ in 0..o.connections {
        let (addr, host, done) = (t.addr, t.host, done.clone());
        tasks.spawn(async move {
            let mut sender = connect(addr).await?;
            while Instant::now() < deadline {
                request(&mut sender, host).await?;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            anyhow::Ok(Vec::new())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(Result {
        name: t.name.clone(),
        p50: pct(0.5),
        p99: pct(0.99),
        rps: done.load(std::sync::atomic::Ordering::Relaxed) as f64 / o.seconds as f64,
        cpu_us_per_req: cpu,
        rss_kib: t.pids.iter().map(|p| rss_kib(*p)).collect(),
    })
}

fn print_table(results: &[Result], idle: &[(String, u64)], o: &Options) {
    let Some(direct) = results.first() else {
        return;
    };
    println!(
        "\nweft bench: HTTP/1.1 keep-alive on loopback; {} req/s fixed rate and full speed on {} connections, {}s each",
        o.rate, o.connections, o.seconds
    );
    println!(
        "weft's pair talks mTLS (certificates from weftd's CA); haproxy's pair is plaintext.\n"
    );
    println!(
        "{:<40} {:>9} {:>9} {:>12} {:>12} {:>11} {:>24} {:>16}",
        "topology",
        "p50 ms",
        "p99 ms",
        "added p99",
        "req/s",
        "vs direct",
        "CPU µs/req per proxy",
        "RSS MiB"
    );
    for r in results {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let cpu: Vec<String> = r.cpu_us_per_req.iter().map(|c| format!("{c:.0}")).collect();
        let rss: Vec<String> = r
            .rss_kib
            .iter()
            .map(|k| format!("{:.1}", *k as f64 / 1024.0))
            .collect();
        println!(
            "{:<40} {:>9.3} {:>9.3} {:>12.3} {:>12.0} {:>10.2}x {:>24} {:>16}",
            r.name,
            ms(r.p50),
            ms(r.p99),
            ms(r.p99) - ms(direct.p99),
            r.rps,
            r.rps / direct.rps.max(1.0),
            if cpu.is_empty() {
                "-".into()
            } else {
                cpu.join(" + ")
            },
            if rss.is_empty() {
                "-".into()
            } else {
                rss.join(" + ")
            },
        );
    }
    for (name, kib) in idle {
        println!(
            "idle RSS before load, {name}: {:.1} MiB",
            *kib as f64 / 1024.0
        );
    }
}
