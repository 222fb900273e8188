//! `cargo xtask e2e-kind`: Weft on a kind cluster with Istio's bookinfo, end to end. It creates the
//! cluster, loads the images `cargo xtask images` builds, installs with `weftctl install --set
//! profile=demo`, checks with `weftctl check`, then walks Istio's own task steps: routing to reviews
//! v3, STRICT mTLS refusing a caller without a sidecar, and an AuthorizationPolicy denying then
//! allowing. The cluster is deleted however it ends. Where kind, kubectl or a container engine is
//! missing it fails at once and says which.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

const CLUSTER: &str = "weft-e2e";
/// Istio's samples, pinned to a release whose layout these steps follow.
const SAMPLES: &str = "https://raw.githubusercontent.com/istio/istio/release-1.23/samples";

/// What this command needs and this machine lacks, all of it at once.
fn missing() -> Vec<String> {
    let mut missing: Vec<String> = ["kind", "kubectl"]
        .into_iter()
        .filter(|t| !crate::on_path(t))
        .map(|t| format!("{t} is not installed"))
        .collect();
    if let Err(e) = crate::images::engine() {
        missing.push(e.to_string());
    }
    missing
}

struct Kind {
    kubeconfig: PathBuf,
}

impl Drop for Kind {
    fn drop(&mut self) {
        eprintln!("==> delete the kind cluster {CLUSTER}");
        let _ = Command::new("kind")
            .args(["delete", "cluster", "--name", CLUSTER])
            .status();
    }
}

impl Kind {
    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .context("cannot run kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `curl` from the `sleep` pod of `namespace` to bookinfo's productpage: the HTTP status and body.
    fn call(&self, namespace: &str, path: &str) -> anyhow::Result<(String, String)> {
        let out = self.kubectl(&[
            "-n",
            namespace,
            "exec",
            "deploy/sleep",
            "-c",
            "sleep",
            "--",
            "curl",
            "-s",
            "-m",
            "5",
            "-w",
            "\n%{http_code}",
            &format!("http://productpage.bookinfo:9080{path}"),
        ]);
        let out = match out {
            Ok(out) => out,
            // curl's own failure (refused, reset) is an answer too: no HTTP status.
            Err(e) => return Ok(("000".into(), e.to_string())),
        };
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
        Ok((code.trim().to_string(), body.to_string()))
    }

    /// Waits for `check` to hold, within `deadline`, saying what was last seen if it never does.
    fn eventually(
        &self,
        what: &str,
        deadline: Duration,
        check: impl Fn(&Self) -> anyhow::Result<Result<(), String>>,
    ) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        loop {
            match check(self)? {
                Ok(()) => {
                    println!("✓ {what}");
                    return Ok(());
                }
                Err(seen) if Instant::now() > until => {
                    bail!("{what}: not within {deadline:?}; last seen: {seen}")
                }
                Err(_) => std::thread::sleep(Duration::from_secs(2)),
            }
        }
    }
}

pub(crate) fn run(root: &Path) -> anyhow::Result<()> {
    let missing = missing();
    if !missing.is_empty() {
        bail!(
            "cargo xtask e2e-kind needs kind, kubectl and a working docker or podman: {}",
            missing.join("; ")
        );
    }
    let images = crate::images::run(root, "weft")?;
    let version = crate::release::version(root)?;
    let weftctl = root
        .join("target/dist")
        .join(format!("weft-{version}-{}", crate::release::X86_64))
        .join("weftctl");
    let kubeconfig = root.join("target/kind/kubeconfig");
    std::fs::create_dir_all(root.join("target/kind"))?;
    crate::run(
        "create the kind cluster",
        Command::new("kind")
            .args(["create", "cluster", "--name", CLUSTER, "--wait", "180s"])
            .arg("--kubeconfig")
            .arg(&kubeconfig),
    )?;
    let kind = Kind { kubeconfig };
    crate::run(
        "load the images into the cluster",
        Command::new("kind")
            .args(["load", "docker-image", "--name", CLUSTER])
            .args(&images),
    )?;
    let weftctl_run = |args: &[&str]| {
        crate::run(
            &format!("weftctl {}", args.join(" ")),
            Command::new(&weftctl)
                .args(args)
                .arg("--kubeconfig")
                .arg(&kind.kubeconfig),
        )
    };
    weftctl_run(&["install", "--set", "profile=demo"])?;
    weftctl_run(&["check"])?;

    kind.kubectl(&["create", "namespace", "bookinfo"])?;
    kind.kubectl(&["label", "namespace", "bookinfo", "istio-injection=enabled"])?;
    kind.kubectl(&["create", "namespace", "legacy"])?;
    for (ns, manifest) in [
        ("bookinfo", "bookinfo/platform/kube/bookinfo.yaml"),
        ("bookinfo", "bookinfo/networking/destination-rule-all.yaml"),
        ("bookinfo", "sleep/sleep.yaml"),
        ("legacy", "sleep/sleep.yaml"),
    ] {
        kind.kubectl(&["apply", "-n", ns, "-f", &format!("{SAMPLES}/{manifest}")])?;
    }
    for ns in ["bookinfo", "legacy"] {
        kind.kubectl(&[
            "-n",
            ns,
            "wait",
            "--for=condition=available",
            "deployment",
            "--all",
            "--timeout=300s",
        ])?;
    }
    kind.eventually(
        "bookinfo answers through its sidecars",
        Duration::from_secs(60),
        |k| {
            let (code, _) = k.call("bookinfo", "/productpage")?;
            Ok(if code == "200" { Ok(()) } else { Err(code) })
        },
    )?;

    // Istio's request-routing task: every request to reviews goes to v3, whose stars are red.
    kind.kubectl(&[
        "apply",
        "-n",
        "bookinfo",
        "-f",
        &format!("{SAMPLES}/bookinfo/networking/virtual-service-reviews-v3.yaml"),
    ])?;
    kind.eventually(
        "reviews routes to v3 only (red stars)",
        Duration::from_secs(60),
        |k| {
            for _ in 0..10 {
                let (code, body) = k.call("bookinfo", "/productpage")?;
                if code != "200" || !body.contains("color=\"red\"") {
                    return Ok(Err(format!(
                        "{code}, red stars: {}",
                        body.contains("color=\"red\"")
                    )));
                }
            }
            Ok(Ok(()))
        },
    )?;

    // Istio's mutual TLS migration task: STRICT refuses the caller without a sidecar.
    apply_stdin(
        &kind,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: bookinfo}\nspec: {mtls: {mode: STRICT}}\n",
    )?;
    kind.eventually(
        "STRICT mTLS refuses a pod without a sidecar",
        Duration::from_secs(60),
        |k| {
            let (code, _) = k.call("legacy", "/productpage")?;
            Ok(if code == "000" {
                Ok(())
            } else {
                Err(format!("legacy got {code}"))
            })
        },
    )?;
    kind.eventually(
        "and serves the meshed caller",
        Duration::from_secs(30),
        |k| {
            let (code, _) = k.call("bookinfo", "/productpage")?;
            Ok(if code == "200" { Ok(()) } else { Err(code) })
        },
    )?;

    // Istio's authorization task: allow-nothing denies, then an ALLOW for the caller's identity.
    apply_stdin(
        &kind,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: bookinfo}\nspec: {}\n",
    )?;
    kind.eventually(
        "an empty AuthorizationPolicy denies with 403",
        Duration::from_secs(60),
        |k| {
            let (code, body) = k.call("bookinfo", "/productpage")?;
            Ok(if code == "403" && body.contains("RBAC: access denied") {
                Ok(())
            } else {
                Err(code)
            })
        },
    )?;
    apply_stdin(
        &kind,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: productpage-viewer, namespace: bookinfo}\n\
         spec:\n  selector: {matchLabels: {app: productpage}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/bookinfo/sa/sleep]}}]\n    to: [{operation: {methods: [GET]}}]\n",
    )?;
    kind.eventually(
        "an ALLOW for the caller's identity lets it through",
        Duration::from_secs(60),
        |k| {
            let (code, _) = k.call("bookinfo", "/productpage")?;
            Ok(if code == "200" { Ok(()) } else { Err(code) })
        },
    )?;
    weftctl_run(&["proxy-status"])?;
    println!("e2e-kind passed");
    Ok(())
}

fn apply_stdin(kind: &Kind, yaml: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kind.kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("cannot run kubectl")?;
    child
        .stdin
        .take()
        .context("kubectl's stdin")?
        .write_all(yaml.as_bytes())?;
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "kubectl apply failed ({status})");
    Ok(())
}
