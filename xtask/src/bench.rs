//! `cargo xtask bench`: the same HTTP/1.1 keep-alive load direct, through one proxy and through an mTLS
//! proxy pair, for weft-proxy and, in the same run, haproxy; at a fixed rate and at full speed. The
//! load generator (`weftctl sample-app load`) is a process of its own pinned to the first core, and
//! the backend, the proxies and weftd are pinned to the second, so each proxy's CPU time is its own
//! and the generator does not compete with it. Each topology is measured `--runs` times, interleaved,
//! and the medians are printed, with weft against haproxy and the goals of issue "data path".

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

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
    connections: u32,
    /// How many times each topology is measured; the medians are printed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const BACKEND: &str = "127.0.0.1:18500";
const CLIENT_PROXY_IP: &str = "127.0.0.101";
const SERVER_PROXY_IP: &str = "127.0.0.102";
/// weftd's CA and xDS over mTLS.
const SECURE: &str = "127.0.0.1:18512";
/// The load generator's core, and everything else's.
const LOAD_CORE: &str = "0";
const SERVED_CORE: &str = "1";

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

/// CPU time (user and system, all threads) a process has used, in microseconds, from its CPU-time
/// clock: nanosecond resolution where /proc's tick counts have 10 ms.
fn cpu_us(pid: u32) -> u64 {
    use nix::{time::clock_getcpuclockid, unistd::Pid};
    let Ok(pid) = i32::try_from(pid) else {
        return 0;
    };
    clock_getcpuclockid(Pid::from_raw(pid))
        .and_then(nix::time::clock_gettime)
        .map_or(0, |t| {
            (t.tv_sec() as u64) * 1_000_000 + (t.tv_nsec() as u64) / 1_000
        })
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

/// haproxy as weft's pair is laid out: a client-side process serving the one-hop frontend and the
/// pair's client end, a server-side process terminating the pair's mTLS; one thread each, as
/// weft-proxy's one worker.
fn haproxy_configs(dir: &Path) -> (String, String) {
    let file = |name: &str| dir.join(name).display().to_string();
    let defaults = "global\n  maxconn 4096\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n";
    let client = format!(
        "{defaults}frontend one\n  bind 127.0.0.1:18601\n  default_backend app\n\
         frontend pair_client\n  bind 127.0.0.1:18602\n  default_backend to_server\n\
         backend app\n  server app {BACKEND}\n\
         backend to_server\n  server s 127.0.0.1:18603 ssl verify required ca-file {} crt {}\n",
        file("ca.pem"),
        file("client.pem")
    );
    let server = format!(
        "{defaults}frontend pair_server\n  bind 127.0.0.1:18603 ssl crt {} ca-file {} verify required\n  default_backend app\n\
         backend app\n  server app {BACKEND}\n",
        file("server.pem"),
        file("ca.pem")
    );
    (client, server)
}

/// haproxy's certificates, ECDSA P-256 as weft's, with the SPIFFE ids of weft's pair; made with the
/// openssl command line, since weft's own CA never hands out private keys.
fn haproxy_certificates(dir: &Path) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("cannot run openssl (needed for haproxy's mTLS pair)")?;
        if !out.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/O=cluster.local/CN=bench root",
    ]);
    openssl(&ca)?;
    for name in ["client", "server"] {
        let ext = format!("{name}.ext");
        std::fs::write(
            dir.join(&ext),
            format!("subjectAltName=URI:spiffe://cluster.local/ns/bench/sa/{name}\n"),
        )?;
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", "/O=cluster.local"]);
        openssl(&req)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ])?;
        // haproxy reads the certificate and its key from one file.
        let bundle =
            std::fs::read_to_string(dir.join(&pem))? + &std::fs::read_to_string(dir.join(&key))?;
        std::fs::write(dir.join(format!("{name}.pem")), bundle)?;
    }
    Ok(())
}

/// One measured topology: where the load goes, its Host header, and which processes to charge.
struct Target {
    name: &'static str,
    addr: String,
    host: &'static str,
    pids: Vec<u32>,
}

/// What the load generator printed.
#[derive(serde::Deserialize)]
struct LoadReport {
    requests: u64,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
}

/// One phase of one run: the generator's report and each charged process's CPU per request.
struct Phase {
    report: LoadReport,
    cpu_us_per_req: Vec<f64>,
}

impl Phase {
    fn rps(&self) -> f64 {
        self.report.requests as f64 / self.report.seconds.max(1e-9)
    }
}

struct Machine {
    bin: PathBuf,
    /// `taskset` where the machine has two cores to pin to.
    pin: bool,
}

impl Machine {
    /// `program` pinned to `core` where pinning is possible.
    fn pinned(&self, core: &str, program: &Path) -> Command {
        if self.pin {
            let mut c = Command::new("taskset");
            c.args(["-c", core]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn load(&self, t: &Target, args: &[String]) -> anyhow::Result<LoadReport> {
        let out = self
            .pinned(LOAD_CORE, &self.bin.join("weftctl"))
            .args(["sample-app", "load", "--target", &t.addr, "--host", t.host])
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run the load generator (weftctl sample-app load)")?;
        if !out.status.success() {
            bail!("the load generator failed against {}", t.name);
        }
        serde_json::from_slice(&out.stdout).context("the load generator's report")
    }

    fn phase(&self, t: &Target, args: &[String]) -> anyhow::Result<Phase> {
        let before: Vec<u64> = t.pids.iter().map(|p| cpu_us(*p)).collect();
        let report = self.load(t, args)?;
        let requests = report.requests.max(1) as f64;
        let cpu_us_per_req = t
            .pids
            .iter()
            .zip(&before)
            .map(|(p, b)| cpu_us(*p).saturating_sub(*b) as f64 / requests)
            .collect();
        Ok(Phase {
            report,
            cpu_us_per_req,
        })
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
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
    let pin = cores() >= 2 && crate::on_path("taskset");
    if !pin {
        eprintln!(
            "    not pinning: this needs two cores and taskset (util-linux); the load generator shares the proxies' CPU"
        );
    }
    let machine = Machine {
        bin: root.join("target/release"),
        pin,
    };
    let bin = &machine.bin;
    let dir = std::env::temp_dir().join(format!("weft-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench.yaml"), manifests())?;
    let identity = dir.join("identity");
    let mut procs = Procs(Vec::new());
    procs.spawn(
        "backend",
        machine.pinned(SERVED_CORE, &bin.join("weftctl")).args([
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
        machine.pinned(SERVED_CORE, &bin.join("weftd")).args([
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
        let mut c = machine.pinned(SERVED_CORE, &bin.join("weft-proxy"));
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
    let weft_client = procs.spawn("weft client proxy", &mut proxy(CLIENT_PROXY_IP, "client")?)?;
    let weft_server = procs.spawn("weft server proxy", &mut proxy(SERVER_PROXY_IP, "server")?)?;
    let mut targets = vec![
        Target {
            name: "direct",
            addr: BACKEND.into(),
            host: "backend",
            pids: vec![],
        },
        Target {
            name: "weft: one hop",
            addr: format!("{CLIENT_PROXY_IP}:9080"),
            host: "one.bench.svc.cluster.local",
            pids: vec![weft_client],
        },
        Target {
            name: "weft: mTLS pair",
            addr: format!("{CLIENT_PROXY_IP}:9081"),
            host: "pair.bench.svc.cluster.local",
            pids: vec![weft_client, weft_server],
        },
    ];
    match crate::on_path("haproxy") {
        true => {
            haproxy_certificates(&dir)?;
            let (client, server) = haproxy_configs(&dir);
            let mut pids = Vec::new();
            for (name, cfg) in [("client", client), ("server", server)] {
                let file = dir.join(format!("haproxy-{name}.cfg"));
                std::fs::write(&file, cfg)?;
                pids.push(procs.spawn(
                    &format!("haproxy {name} proxy"),
                    machine.pinned(SERVED_CORE, Path::new("haproxy")).args([
                        "-f",
                        &file.display().to_string(),
                        "-db",
                    ]),
                )?);
            }
            targets.push(Target {
                name: "haproxy: one hop",
                addr: "127.0.0.1:18601".into(),
                host: "backend",
                pids: vec![pids[0]],
            });
            targets.push(Target {
                name: "haproxy: mTLS pair",
                addr: "127.0.0.1:18602".into(),
                host: "backend",
                pids,
            });
        }
        false => eprintln!(
            "    haproxy not found: install it (apt-get install haproxy) to compare in the same run"
        ),
    }
    for t in &targets {
        machine
            .load(
                t,
                &[
                    "--seconds".into(),
                    "0".into(),
                    "--wait-ready-seconds".into(),
                    "20".into(),
                ],
            )
            .with_context(|| format!("{} never answered", t.name))?;
    }
    let idle: Vec<(String, u64)> = procs
        .0
        .iter()
        .filter(|(n, _)| n.contains("proxy"))
        .map(|(n, c)| (n.clone(), rss_kib(c.id())))
        .collect();
    let seconds = o.seconds.to_string();
    let fixed_args = [
        "--rate".to_string(),
        o.rate.to_string(),
        "--connections".into(),
        "8".into(),
        "--seconds".into(),
        seconds.clone(),
    ];
    let max_args = [
        "--connections".to_string(),
        o.connections.to_string(),
        "--seconds".into(),
        seconds,
    ];
    let mut runs: Vec<Vec<(Phase, Phase)>> = targets.iter().map(|_| Vec::new()).collect();
    for run in 1..=o.runs.max(1) {
        for (t, results) in targets.iter().zip(&mut runs) {
            eprintln!(
                "==> run {run}/{}: {}: {} req/s for {}s, then full speed on {} connections",
                o.runs, t.name, o.rate, o.seconds, o.connections
            );
            results.push((machine.phase(t, &fixed_args)?, machine.phase(t, &max_args)?));
        }
    }
    let loaded: Vec<Vec<u64>> = targets
        .iter()
        .map(|t| t.pids.iter().map(|p| rss_kib(*p)).collect())
        .collect();
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
    let rows: Vec<Row> = targets
        .iter()
        .zip(&runs)
        .zip(loaded)
        .map(|((t, r), rss)| Row::median(t.name, r, rss))
        .collect();
    print_tables(&rows, &idle, &o, machine.pin);
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// One topology's medians over the runs.
struct Row {
    name: &'static str,
    p50_ms: f64,
    p99_ms: f64,
    rps: f64,
    cpu_fixed: Vec<f64>,
    cpu_max: Vec<f64>,
    rss_kib: Vec<u64>,
}

impl Row {
    fn median(name: &'static str, runs: &[(Phase, Phase)], rss_kib: Vec<u64>) -> Self {
        let of = |f: &dyn Fn(&(Phase, Phase)) -> f64| median(runs.iter().map(f).collect());
        let per_proxy = |fixed: bool| -> Vec<f64> {
            let n = runs.first().map_or(0, |r| r.0.cpu_us_per_req.len());
            (0..n)
                .map(|i| {
                    of(&|r| {
                        let p = if fixed { &r.0 } else { &r.1 };
                        p.cpu_us_per_req[i]
                    })
                })
                .collect()
        };
        Self {
            name,
            p50_ms: of(&|r| r.0.report.p50_us as f64 / 1e3),
            p99_ms: of(&|r| r.0.report.p99_us as f64 / 1e3),
            rps: of(&|r| r.1.rps()),
            cpu_fixed: per_proxy(true),
            cpu_max: per_proxy(false),
            rss_kib,
        }
    }
}

fn joined(values: &[String]) -> String {
    if values.is_empty() {
        "-".into()
    } else {
        values.join(" + ")
    }
}

fn print_tables(rows: &[Row], idle: &[(String, u64)], o: &Options, pinned: bool) {
    let Some(direct) = rows.first() else {
        return;
    };
    println!(
        "\nweft bench: HTTP/1.1 keep-alive on loopback; {} req/s on 8 connections, then full speed on {}; {}s each; medians of {} runs{}",
        o.rate,
        o.connections,
        o.seconds,
        o.runs,
        if pinned {
            "; load generator on core 0, everything else on core 1"
        } else {
            "; not pinned"
        }
    );
    println!(
        "\n{:<20} {:>9} {:>9} {:>10} {:>10} {:>10} {:>22} {:>22} {:>14}",
        "topology",
        "p50 ms",
        "p99 ms",
        "added p99",
        "max req/s",
        "vs direct",
        "CPU µs/req at rate",
        "CPU µs/req at max",
        "RSS MiB"
    );
    for r in rows {
        let us = |v: &[f64]| joined(&v.iter().map(|c| format!("{c:.1}")).collect::<Vec<_>>());
        let rss: Vec<String> = r
            .rss_kib
            .iter()
            .map(|k| format!("{:.1}", *k as f64 / 1024.0))
            .collect();
        println!(
            "{:<20} {:>9.3} {:>9.3} {:>10.3} {:>10.0} {:>9.2}x {:>22} {:>22} {:>14}",
            r.name,
            r.p50_ms,
            r.p99_ms,
            r.p99_ms - direct.p99_ms,
            r.rps,
            r.rps / direct.rps.max(1.0),
            us(&r.cpu_fixed),
            us(&r.cpu_max),
            joined(&rss),
        );
    }
    for (name, kib) in idle {
        println!("idle RSS, {name}: {:.1} MiB", *kib as f64 / 1024.0);
    }
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let (Some(w1), Some(w2), Some(h1), Some(h2)) = (
        find("weft: one hop"),
        find("weft: mTLS pair"),
        find("haproxy: one hop"),
        find("haproxy: mTLS pair"),
    ) else {
        return;
    };
    let idle_max = |prefix: &str| {
        idle.iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, k)| *k as f64 / 1024.0)
            .fold(0.0, f64::max)
    };
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let vs = |r: &Row| r.rps / direct.rps.max(1.0);
    // (what, haproxy, weft, goal as weft/haproxy at most (true) or at least (false), the goal's bound)
    let lines: [(&str, f64, f64, bool, f64); 5] = [
        (
            "one hop, CPU µs/request at the fixed rate",
            h1.cpu_fixed[0],
            w1.cpu_fixed[0],
            true,
            0.6,
        ),
        (
            "one hop, CPU µs/request at max",
            h1.cpu_max[0],
            w1.cpu_max[0],
            true,
            0.8,
        ),
        (
            "one hop, max throughput vs direct",
            vs(h1),
            vs(w1),
            false,
            1.2,
        ),
        (
            "mTLS pair, CPU µs/request (both) at the fixed rate",
            sum(&h2.cpu_fixed),
            sum(&w2.cpu_fixed),
            true,
            0.6,
        ),
        (
            "mTLS pair, max throughput vs direct",
            vs(h2),
            vs(w2),
            false,
            1.2,
        ),
    ];
    println!(
        "\n{:<52} {:>9} {:>9} {:>13} {:>9}",
        "against haproxy (issue \"data path\")", "haproxy", "weft", "weft/haproxy", "goal"
    );
    for (what, h, w, at_most, bound) in lines {
        let ratio = w / h.max(1e-9);
        let met = if at_most {
            ratio <= bound
        } else {
            ratio >= bound
        };
        println!(
            "{:<52} {:>9.2} {:>9.2} {:>12.2}x {:>2} {}{bound}x",
            what,
            h,
            w,
            ratio,
            if met { "✓" } else { "✗" },
            if at_most { "≤ " } else { "≥ " },
        );
    }
    let (h, w) = (idle_max("haproxy"), idle_max("weft"));
    println!(
        "{:<52} {:>9.1} {:>9.1} {:>12.2}x {:>2} ≤ 8 MiB",
        "idle RSS per proxy, MiB (largest)",
        h,
        w,
        w / h.max(1e-9),
        if w <= 8.0 { "✓" } else { "✗" },
    );
}
