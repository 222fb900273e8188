//! A harness for tests that need real network namespaces: each "pod" is a namespace with its own
//! loopback and a veth pair to its peer, and code runs inside one on a thread that has entered it.
//!
//! It needs root (CI runs as root). Without it, [`Netns::new`] fails the test with the reason; it never
//! skips, because a skipped test looks like a pass.

use std::{
    fs::File,
    net::Ipv4Addr,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, bail};

/// A named network namespace, deleted (with its veth ends) when dropped, even if the test failed.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

impl Netns {
    /// Creates `weft-<pid>-<n>-<label>` with its loopback up.
    pub fn new(label: &str) -> anyhow::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "weft-{}-{}-{label}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name])).context(
            "network-namespace tests need root and iproute2 (`ip netns add` failed); run them as root, as CI does",
        )?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside this namespace and returns its output; a non-zero exit is an error.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<Output> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// A command that will run inside this namespace, for the caller to adjust and run.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a new thread that has entered this namespace, so every socket it opens lives here.
    /// The thread gets its own single-threaded tokio runtime.
    pub fn spawn<F, Fut, T>(&self, f: F) -> std::thread::JoinHandle<anyhow::Result<T>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<T>>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns failed")?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Joins two namespaces with a veth pair and gives each end an address in `prefix`/24.
pub fn link(a: &Netns, a_ip: Ipv4Addr, b: &Netns, b_ip: Ipv4Addr) -> anyhow::Result<()> {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    // Interface names are at most 15 bytes.
    let (va, vb) = (
        format!("wa{}x{n}", std::process::id() % 100_000),
        format!("wb{}x{n}", std::process::id() % 100_000),
    );
    run(Command::new("ip").args([
        "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name,
    ]))?;
    for (ns, dev, ip) in [(a, &va, a_ip), (b, &vb, b_ip)] {
        ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", dev])?;
        ns.exec(&["ip", "link", "set", dev, "up"])?;
    }
    Ok(())
}

/// The destination a redirected connection was headed for (`SO_ORIGINAL_DST`), as the proxy reads it.
pub fn original_dst(stream: &tokio::net::TcpStream) -> anyhow::Result<std::net::SocketAddr> {
    let addr = socket2::SockRef::from(stream)
        .original_dst_v4()
        .context("SO_ORIGINAL_DST")?;
    addr.as_socket().context("not an IP address")
}

/// A bridge in its own namespace that pods attach to, like a node's pod network.
#[derive(Debug)]
pub struct Network {
    ns: Netns,
    next_if: AtomicU32,
}

impl Network {
    pub fn new() -> anyhow::Result<Self> {
        let ns = Netns::new("net")?;
        ns.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        ns.exec(&["ip", "link", "set", "br0", "up"])?;
        Ok(Self {
            ns,
            next_if: AtomicU32::new(0),
        })
    }

    /// Attaches `pod` to the bridge with `ip`/24, with a default route out of that interface so traffic to
    /// any address (a service VIP, an outside host) has somewhere to go before capture takes it.
    pub fn attach(&self, pod: &Netns, ip: Ipv4Addr) -> anyhow::Result<()> {
        let n = self.next_if.fetch_add(1, Ordering::Relaxed);
        let (inner, outer) = (
            format!("eth{n}"),
            format!("veth{}x{n}", std::process::id() % 100_000),
        );
        run(Command::new("ip").args([
            "link",
            "add",
            &inner,
            "netns",
            &pod.name,
            "type",
            "veth",
            "peer",
            "name",
            &outer,
            "netns",
            &self.ns.name,
        ]))?;
        self.ns
            .exec(&["ip", "link", "set", &outer, "master", "br0"])?;
        self.ns.exec(&["ip", "link", "set", &outer, "up"])?;
        pod.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &inner])?;
        pod.exec(&["ip", "link", "set", &inner, "up"])?;
        pod.exec(&["ip", "route", "add", "default", "dev", &inner])?;
        Ok(())
    }
}

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Answers every HTTP/1.1 request on `listener` with `200` and `<name> <path>` as the body.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    name: &'static str,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf).to_string();
            if head.to_ascii_lowercase().contains("upgrade: websocket") {
                // Accept the upgrade, then echo whatever arrives: enough to prove the tunnel.
                let accept = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
                if s.write_all(accept.as_bytes()).await.is_err() {
                    return;
                }
                while let Ok(n) = s.read(&mut chunk).await {
                    if n == 0 || s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
                return;
            }
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let body = format!("{name} {path}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

/// Echoes bytes back prefixed by `name:`.
pub async fn serve_echo(
    listener: tokio::net::TcpListener,
    name: &'static str,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0
                    || s.write_all(
                        format!("{name}:{}", String::from_utf8_lossy(&buf[..n])).as_bytes(),
                    )
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }
}

/// One HTTP/1.1 request, the way an application that knows nothing of the mesh sends it.
pub async fn http_get(
    addr: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await??;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.read_to_string(&mut out),
    )
    .await??;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
