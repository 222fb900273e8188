//! `weftctl demo`: the whole mesh on one machine, traffic through a routing rule, and a verdict.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
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
const MANIFESTS: [(&str, &str); 3] = [
    ("mesh.yaml", include_str!("../demo/mesh.yaml")),
    ("routing.yaml", include_str!("../demo/routing.yaml")),
    ("sidecars.yaml", include_str!("../demo/sidecars.yaml")),
];

const FRONTEND: &str = "127.0.0.10:8000";

/// One workload: its pod, address, labels and where its app listens.
struct Workload {
    pod: &'static str,
    ip: &'static str,
    app: &'static str,
    version: &'static str,
    app_port: u16,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        pod: "frontend-0",
        ip: "127.0.0.10",
        app: "frontend",
        version: "v1",
        app_port: 18000,
    },
    Workload {
        pod: "backend-v1-0",
        ip: "127.0.0.21",
        app: "backend",
        version: "v1",
        app_port: 18081,
    },
    Workload {
        pod: "backend-v2-0",
        ip: "127.0.0.22",
        app: "backend",
        version: "v2",
        app_port: 18082,
    },
    Workload {
        pod: "status-0",
        ip: "127.0.0.31",
        app: "status",
        version: "v1",
        app_port: 18090,
    },
];

#[derive(Clone, Debug)]
pub struct Options {
    /// Stop after this long; `None` runs until Ctrl-C.
    pub duration: Option<Duration>,
    pub rate: u32,
    pub config_dir: Option<PathBuf>,
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

fn write_manifests(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, text) in MANIFESTS {
        let path = dir.join(name);
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
    trigger: DrainTrigger,
    tasks: JoinSet<()>,
    metrics_urls: Vec<(String, String)>,
    xds: XdsView,
}

struct XdsView {
    address: SocketAddr,
    monitoring: SocketAddr,
    metrics: weft_xds::XdsMetrics,
}

async fn start(dir: &Path) -> anyhow::Result<Running> {
    let (trigger, watcher) = weft_drain::new();
    let mut tasks = JoinSet::new();
    let weftd = weftd::app::build(weftd::app::Config {
        config_dir: dir.to_path_buf(),
        xds_address: "127.0.0.1:0".parse()?,
        monitoring_address: "127.0.0.1:0".parse()?,
        mesh: weftd::translate::MeshOptions {
            access_log_file: dir.join("access.log").display().to_string(),
        },
        poll_interval: Duration::from_millis(500),
    })
    .await?;
    let xds = XdsView {
        address: weftd.xds_address(),
        monitoring: weftd.monitoring_address(),
        metrics: weftd.xds_metrics(),
    };
    let w = watcher.clone();
    tasks.spawn(async move {
        if let Err(e) = weftd.run(w).await {
            tracing::error!(error = %e, "weftd stopped");
        }
    });

    let mut metrics_urls = Vec::new();
    for wl in &WORKLOADS {
        let labels = serde_json::json!({"app": wl.app, "version": wl.version}).to_string();
        let vars: Vec<(String, String)> = [
            ("POD_NAME", wl.pod.to_string()),
            ("POD_NAMESPACE", "demo".to_string()),
            ("INSTANCE_IP", wl.ip.to_string()),
            ("SERVICE_ACCOUNT", wl.app.to_string()),
            ("ISTIO_METAJSON_LABELS", labels),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let config =
            weft_proxy::config::Config::from_env(format!("http://{}", xds.address), &vars)?;
        let proxy = weft_proxy::app::build(config)
            .await
            .with_context(|| format!("cannot start the proxy for {}", wl.pod))?;
        if let (Some(admin), Some(stats)) = (proxy.admin_address(), proxy.stats_address()) {
            metrics_urls.push((
                wl.pod.to_string(),
                format!(
                    "admin http://{admin}/config_dump  metrics http://{stats}/stats/prometheus"
                ),
            ));
        }
        tasks.spawn(proxy.run(watcher.clone()));
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
        xds,
    })
}

type DemoClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

async fn call(client: &DemoClient, path: &str, user: Option<&str>) -> Result<String, String> {
    let mut req = Request::builder()
        .uri(format!("http://{FRONTEND}{path}"))
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
async fn wait_ready(client: &DemoClient, deadline: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    loop {
        let (a, b) = (
            call(client, "/", None).await,
            call(client, "/status", None).await,
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
    write_manifests(&dir)?;
    println!(
        "weft demo: explicit-listener mode (no traffic capture); each workload has its own 127.0.0.x address"
    );
    println!(
        "  config directory: {}  (edit it while the demo runs; weftd reloads it)",
        dir.display()
    );
    let running = start(&dir).await?;
    println!(
        "  weftd: xDS on {}, metrics on http://{}/metrics",
        running.xds.address, running.xds.monitoring
    );
    let client: DemoClient = Client::builder(TokioExecutor::new()).build_http();
    wait_ready(&client, Duration::from_secs(15)).await?;
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
        // Every 10th request is the test user, every 7th a gRPC status call; the rest go through the split.
        let (route, path, user) = if n.is_multiple_of(10) {
            ("test-user (end-user: tester)", "/", Some("tester"))
        } else if n.is_multiple_of(7) {
            ("grpc status.demo", "/status", None)
        } else {
            ("split 90/10", "/", None)
        };
        let t0 = Instant::now();
        let result = call(&client, path, user).await;
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

    let ok = report(&tallies, &running);
    let Running {
        trigger, mut tasks, ..
    } = running;
    if tokio::time::timeout(Duration::from_secs(5), trigger.drain())
        .await
        .is_err()
    {
        tracing::warn!("demo components did not drain in time");
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(ok)
}

fn report(tallies: &BTreeMap<&'static str, Tally>, running: &Running) -> bool {
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
    println!(
        "  xDS: {} NACKs from proxies",
        [
            "Cluster",
            "ClusterLoadAssignment",
            "Listener",
            "RouteConfiguration"
        ]
        .iter()
        .map(|t| running.xds.metrics.nacks_for(t))
        .sum::<u64>()
    );
    println!("\nendpoints");
    for (pod, urls) in &running.metrics_urls {
        println!("  {pod}: {urls}");
    }
    println!(
        "  weftd: xds {}  metrics http://{}/metrics",
        running.xds.address, running.xds.monitoring
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
