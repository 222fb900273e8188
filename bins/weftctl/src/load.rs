//! The load generator of `cargo xtask bench`: HTTP/1.1 keep-alive GETs to one address, in a process
//! of its own so that the bench can pin it to a core the proxies do not use and charge the proxies'
//! CPU to them alone. It prints one JSON line with what it measured.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, task::JoinSet, time::Instant};

#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    /// Where to send the requests.
    #[arg(long)]
    pub target: SocketAddr,
    /// The Host header, which picks the proxy's route.
    #[arg(long, default_value = "backend")]
    pub host: String,
    /// Requests per second over all connections; without it, each connection sends its next request
    /// as soon as the last one is answered (closed loop, full speed).
    #[arg(long)]
    pub rate: Option<u32>,
    #[arg(long, default_value_t = 8)]
    pub connections: u32,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Retry one request for up to this long before measuring, for a target still starting.
    #[arg(long, default_value_t = 0)]
    pub wait_ready_seconds: u64,
}

/// What one run measured. Latency is from each request's scheduled send time, so a stall is charged
/// to every request it delays (no coordinated omission).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct LoadReport {
    pub requests: u64,
    pub seconds: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn get(sender: &mut SendRequest<Empty<Bytes>>, host: &str) -> anyhow::Result<()> {
    let req = http::Request::builder()
        .uri("/")
        .header(http::header::HOST, host)
        .body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    if !status.is_success() {
        bail!("answered {status}");
    }
    Ok(())
}

async fn wait_ready(args: &LoadArgs) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(args.wait_ready_seconds);
    loop {
        let attempt = async {
            let mut sender = connect(args.target).await?;
            get(&mut sender, &args.host).await
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= until => {
                return Err(e.context(format!("{} never answered", args.target)));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub async fn run(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    wait_ready(args).await?;
    let conns = args.connections.max(1);
    let interval = args
        .rate
        .map(|rate| Duration::from_secs_f64(f64::from(conns) / f64::from(rate.max(1))));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let mut tasks = JoinSet::new();
    for i in 0..conns {
        let (addr, host) = (args.target, args.host.clone());
        tasks.spawn(async move {
            let mut sender = connect(addr).await?;
            let mut latencies = Vec::new();
            let mut next = Instant::now() + interval.map_or(Duration::ZERO, |d| d * i / conns);
            while next < deadline {
                tokio::time::sleep_until(next).await;
                get(&mut sender, &host).await?;
                latencies.push(next.elapsed());
                next = match interval {
                    Some(d) => next + d,
                    None => Instant::now(),
                };
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        latencies.extend(r.context("a load connection panicked")??);
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .map_or(0, |d| d.as_micros() as u64)
    };
    Ok(LoadReport {
        requests: latencies.len() as u64,
        seconds,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    })
}
