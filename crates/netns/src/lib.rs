//! Network namespaces for Weft's pods: each "pod" is a namespace with its own loopback, joined to its
//! peers by veth pairs or a bridge, and code runs inside one on a thread that has entered it.
//!
//! It needs root. Without it, [`Netns::new`] fails with the reason; callers never skip silently.

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
        run(Command::new("ip").args(["netns", "add", &name]))
            .context("network namespaces need root and iproute2 (`ip netns add` failed)")?;
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

/// A copy of `path` that any user can run, for starting it as the proxy user (uid 1337): a build tree
/// under a private home directory is not reachable by that user. Removed when dropped.
#[derive(Debug)]
pub struct SharedExecutable {
    dir: std::path::PathBuf,
    pub path: std::path::PathBuf,
}

impl SharedExecutable {
    pub fn new(path: &std::path::Path) -> anyhow::Result<Self> {
        Self::new_in(path, &std::env::temp_dir())
    }

    /// The copy in a new directory under `parent` (which every user must be able to enter).
    pub fn new_in(path: &std::path::Path, parent: &std::path::Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = parent.join(format!(
            "weft-bin-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let name = path
            .file_name()
            .context("executable path has no file name")?;
        let copy = dir.join(name);
        std::fs::copy(path, &copy).with_context(|| format!("cannot copy {}", path.display()))?;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { dir, path: copy })
    }
}

impl Drop for SharedExecutable {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// This machine's end of a [`Network`]: a veth whose peer is on the bridge. Removed when dropped.
#[derive(Debug)]
pub struct HostLink {
    name: String,
}

impl Network {
    /// Joins this machine to the bridge with `ip`/24, so code running here reaches the pods directly.
    pub fn attach_host(&self, ip: Ipv4Addr) -> anyhow::Result<HostLink> {
        let n = std::process::id() % 100_000;
        let (host, peer) = (format!("wh{n}"), format!("wp{n}"));
        run(Command::new("ip").args([
            "link",
            "add",
            &host,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.ns.name,
        ]))?;
        let link = HostLink { name: host };
        self.ns
            .exec(&["ip", "link", "set", &peer, "master", "br0"])?;
        self.ns.exec(&["ip", "link", "set", &peer, "up"])?;
        run(Command::new("ip").args(["addr", "add", &format!("{ip}/24"), "dev", &link.name]))?;
        run(Command::new("ip").args(["link", "set", &link.name, "up"]))?;
        Ok(link)
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}
