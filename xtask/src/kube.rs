//! A real Kubernetes control plane for the tests (etcd and kube-apiserver 1.20 from Debian, built once
//! into `$KUBE_PREFIX`), and the CRDs Weft ships, generated from one table.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// Where the running control plane keeps its certificates, data, logs and pids.
pub fn run_dir(root: &Path) -> PathBuf {
    std::env::var_os("KUBE_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/kube"))
}

fn script(root: &Path, name: &str) -> PathBuf {
    root.join("xtask/kube").join(name)
}

/// Starts etcd, kube-apiserver and kube-controller-manager (building them first if needed, about
/// 7.5 minutes on two cores) and returns the admin kubeconfig's path.
pub fn up(root: &Path) -> anyhow::Result<PathBuf> {
    eprintln!(
        "==> kube-up (the first run builds kube-apiserver from Debian's source: about 7.5 minutes)"
    );
    let out = Command::new("bash")
        .arg(script(root, "kube-up.sh"))
        .env("KUBE_RUN", run_dir(root))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run xtask/kube/kube-up.sh")?;
    if !out.status.success() {
        bail!("kube-up failed ({})", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let kubeconfig = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .context("kube-up printed no kubeconfig path")?;
    Ok(PathBuf::from(kubeconfig))
}

pub fn down(root: &Path, purge: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new("bash");
    cmd.arg(script(root, "kube-down.sh"))
        .env("KUBE_RUN", run_dir(root));
    if purge {
        cmd.arg("--purge");
    }
    crate::run("kube-down", &mut cmd)
}

/// The tests against the real API server, with a control plane of their own, stopped afterwards
/// whether they pass or not.
pub fn test(root: &Path) -> anyhow::Result<()> {
    let kubeconfig = up(root)?;
    let mut tests = crate::cargo(&[
        "test",
        "-p",
        "weft-integration",
        "--test",
        "kubernetes",
        "--",
        "--ignored",
        "--test-threads=1",
    ]);
    tests
        .env("WEFT_TEST_KUBECONFIG", &kubeconfig)
        .env("WEFT_TEST_KUBE_UP", script(root, "kube-up.sh"))
        .env("KUBE_RUN", run_dir(root));
    let result = crate::run("tests against the real kube-apiserver", &mut tests);
    let stopped = down(root, true);
    result.and(stopped)
}

pub const CRDS: &str = "charts/base/templates/crds.yaml";

pub fn gen_crds(root: &Path) -> anyhow::Result<()> {
    let path = root.join(CRDS);
    std::fs::write(&path, weft_api::kinds::crds_yaml())
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("==> wrote {}", path.display());
    Ok(())
}
