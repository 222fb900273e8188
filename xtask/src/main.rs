//! Weft's automation, one home for it: `cargo xtask test` (everything CI checks), `cargo xtask bench`,
//! the Kubernetes helpers (`gen-crds`, `kube-up`, `kube-down`), and the release path (`release`,
//! `images`, `e2e-kind`).

mod bench;
mod images;
mod kind;
mod kube;
mod release;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Args {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Every check CI runs, cheapest first: fmt, clippy, one crypto provider, unit, in-process and
    /// network-namespace tests (these need root and iptables), then the real third-party peers (Python
    /// grpcio's xDS client, the Prometheus text parser).
    Test {
        /// Skip the checks against Python peers (they need python3 and PyPI for `.venv`).
        #[arg(long)]
        no_python: bool,
        /// Skip the tests against a real kube-apiserver (they start one with `kube-up`).
        #[arg(long)]
        no_kube: bool,
    },
    /// Measure weft-proxy against a direct connection (and haproxy where installed): latency at a fixed
    /// rate, throughput at full speed, CPU per request and RSS.
    Bench(bench::Options),
    /// Write charts/base/templates/crds.yaml from the table in crates/api/src/kinds.rs.
    GenCrds,
    /// Start a real Kubernetes control plane on 127.0.0.1 (built on first use) and print its kubeconfig.
    KubeUp,
    /// Stop the control plane `kube-up` started.
    KubeDown {
        /// Also delete its state (certificates, etcd data, logs).
        #[arg(long)]
        purge: bool,
    },
    /// Static release binaries (x86_64 musl; aarch64 too where `cross` exists) in target/dist, with
    /// a version from git and SHA256SUMS, each checked to be static and to start.
    Release,
    /// The release binaries in the images of images/, with docker or podman.
    Images {
        /// The registry prefix of the image names.
        #[arg(long, default_value = "weft")]
        hub: String,
    },
    /// Weft on a kind cluster with Istio's bookinfo: install, check, routing, STRICT mTLS and an
    /// AuthorizationPolicy, then the cluster is deleted. Needs kind, kubectl and docker or podman.
    E2eKind,
}

fn main() -> anyhow::Result<()> {
    let Args { command } = Args::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("cannot enter {}", root.display()))?;
    match command {
        Task::Test { no_python, no_kube } => test(&root, no_python, no_kube),
        Task::Bench(options) => bench::run(&root, options),
        Task::GenCrds => kube::gen_crds(&root),
        Task::KubeUp => {
            println!("{}", kube::up(&root)?.display());
            Ok(())
        }
        Task::KubeDown { purge } => kube::down(&root, purge),
        Task::Release => release::run(&root).map(drop),
        Task::Images { hub } => images::run(&root, &hub).map(drop),
        Task::E2eKind => kind::run(&root),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("==> {what}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start: {what}"))?;
    if !status.success() {
        bail!("failed: {what} ({status})");
    }
    Ok(())
}

/// Whether `tool` is an executable on `PATH`.
fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args);
    c
}

/// The third-party peers the tests run against, pinned.
/// (The chart tests fetch the helm binary themselves, from a wheel that is not installed.)
const PYTHON_PEERS: [&str; 5] = [
    "grpcio==1.85.*",
    "prometheus-client==0.26.*",
    "pytest==9.*",
    "kubernetes-validate==1.37.*",
    "pyyaml==6.*",
];

/// A virtualenv in `.venv` with the Python peers, created on first use.
fn venv_python(root: &Path) -> anyhow::Result<PathBuf> {
    let python = root.join(".venv/bin/python");
    if !python.exists() {
        run(
            "create .venv for the Python test peers",
            Command::new("python3").args(["-m", "venv", ".venv"]),
        )?;
    }
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(PYTHON_PEERS);
    run("install the Python test peers", &mut pip)?;
    Ok(python)
}

fn test(root: &Path, no_python: bool, no_kube: bool) -> anyhow::Result<()> {
    run("rustfmt", &mut cargo(&["fmt", "--all", "--", "--check"]))?;
    run(
        "clippy",
        &mut cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // One crypto provider: ring. `cargo tree -i` fails when the package is absent, which is what we want.
    let aws = cargo(&["tree", "--workspace", "-i", "aws-lc-rs"])
        .output()
        .context("cannot run cargo tree")?;
    if aws.status.success() {
        bail!(
            "aws-lc-rs is in the dependency tree; Weft uses ring only:\n{}",
            String::from_utf8_lossy(&aws.stdout)
        );
    }
    // The network-namespace tests, the harness node and the Python peers run the real binaries.
    run(
        "build binaries",
        &mut cargo(&[
            "build",
            "--bin",
            "weftd",
            "--bin",
            "weft-proxy",
            "--bin",
            "weft-injector",
            "--bin",
            "weftctl",
        ]),
    )?;
    run(
        "unit, in-process and network-namespace tests",
        &mut cargo(&["test", "--workspace", "--all-targets"]),
    )?;
    if no_kube {
        eprintln!("==> skipping the tests against a real kube-apiserver (--no-kube)");
    } else {
        kube::test(root)?;
    }
    if no_python {
        eprintln!("==> skipping the Python peer checks (--no-python)");
        return Ok(());
    }
    let python = venv_python(root)?;
    let mut peers = Command::new(python);
    peers
        .args(["-m", "pytest", "-q", "integration/python"])
        .env("WEFT_BIN_DIR", root.join("target/debug"));
    run(
        "real third-party peers (grpcio xDS client, Prometheus parser)",
        &mut peers,
    )
}
