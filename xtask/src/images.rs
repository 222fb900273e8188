//! `cargo xtask images`: the release binaries in the images of `images/`, built with docker or podman,
//! whichever works here. Without a working engine it says which it tried and why each cannot run.

use std::{path::Path, process::Command};

use anyhow::{Context, bail};

use crate::release::{self, BINARIES, X86_64};

/// A container engine that answers: its command.
pub(crate) fn engine() -> anyhow::Result<&'static str> {
    let mut why = Vec::new();
    for tool in ["docker", "podman"] {
        match Command::new(tool).arg("info").output() {
            Ok(out) if out.status.success() => return Ok(tool),
            Ok(out) => {
                let err = String::from_utf8_lossy(&out.stderr);
                let first = err
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no output");
                why.push(format!(
                    "{tool} is installed, but `{tool} info` failed: {}",
                    first.trim()
                ));
            }
            Err(_) => why.push(format!("{tool} is not installed")),
        }
    }
    bail!("no container engine works here: {}", why.join("; "))
}

/// The image names: `<hub>/<name>:<tag>` for the release's version, and for the crates' version,
/// which the charts' default `global.tag` names.
fn tags(hub: &str, name: &str, version: &str) -> Vec<String> {
    // An image tag may not hold `+`.
    let release = version.replace('+', "-");
    let mut tags = vec![format!("{hub}/{name}:{release}")];
    let base = env!("CARGO_PKG_VERSION");
    if release != base {
        tags.push(format!("{hub}/{name}:{base}"));
    }
    tags
}

pub(crate) fn run(root: &Path, hub: &str) -> anyhow::Result<Vec<String>> {
    // Before the long build: without an engine there is nothing to build for.
    let engine = engine()?;
    let artifacts = release::run(root)?;
    let version = release::version(root)?;
    let revision = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let source = Command::new("git")
        .args(["remote", "get-url", "origin"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_string(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
        );
    let mut built = Vec::new();
    for name in BINARIES {
        let binary = artifacts
            .iter()
            .find(|a| a.target == X86_64 && a.path.ends_with(name))
            .with_context(|| format!("the release has no {name}"))?;
        let context = root.join("target/images").join(name);
        std::fs::create_dir_all(&context)?;
        std::fs::copy(
            root.join("images").join(name).join("Dockerfile"),
            context.join("Dockerfile"),
        )
        .with_context(|| format!("images/{name}/Dockerfile"))?;
        std::fs::copy(&binary.path, context.join(name))?;
        let tags = tags(hub, name, &version);
        let mut cmd = Command::new(engine);
        cmd.arg("build")
            .args(tags.iter().flat_map(|t| ["-t", t.as_str()]))
            .args(["--build-arg", &format!("VERSION={version}")])
            .args(["--build-arg", &format!("REVISION={revision}")])
            .args(["--build-arg", &format!("SOURCE={source}")])
            .arg(&context);
        crate::run(&format!("build the {name} image"), &mut cmd)?;
        let size = Command::new(engine)
            .args(["image", "inspect", "--format", "{{.Size}}", &tags[0]])
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        println!(
            "  {}  {:.1} MiB",
            tags.join(", "),
            size as f64 / (1024.0 * 1024.0)
        );
        built.extend(tags);
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tags_hold_no_plus_and_include_the_charts_default() {
        assert_eq!(
            super::tags("weft", "weftd", "0.1.0+g1234"),
            ["weft/weftd:0.1.0-g1234", "weft/weftd:0.1.0"]
        );
        assert_eq!(super::tags("weft", "weftd", "0.1.0"), ["weft/weftd:0.1.0"]);
    }
}
