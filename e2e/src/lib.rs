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
