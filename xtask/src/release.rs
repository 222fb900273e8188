//! `cargo xtask release`: static release binaries for x86_64 musl (and aarch64 where `cross` is at
//! hand), stamped with a version from git, with their checksums, each checked to be static and to
//! start. Reproducible: the same commit gives the same bytes (paths remapped, symbols stripped,
//! `--locked`), so anyone can rebuild a release and compare its SHA256SUMS.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// The binaries a release ships.
pub(crate) const BINARIES: [&str; 4] = ["weftd", "weft-proxy", "weft-injector", "weftctl"];
pub(crate) const X86_64: &str = "x86_64-unknown-linux-musl";
const AARCH64: &str = "aarch64-unknown-linux-musl";

/// What one build produced.
pub(crate) struct Artifact {
    pub path: PathBuf,
    pub target: String,
    pub size: u64,
    pub sha256: String,
}

fn output(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The crates' version, plus the commit when HEAD is not the release tag `v<version>`, and `dirty`
/// when the tree has changes: a binary always says what it was built from.
pub(crate) fn version(root: &Path) -> anyhow::Result<String> {
    let base = env!("CARGO_PKG_VERSION");
    let git = |args: &[&str]| {
        output(
            Command::new("git").current_dir(root).args(args),
            &format!("git {}", args.join(" ")),
        )
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty();
    let tagged = git(&["tag", "--points-at", "HEAD"])?
        .lines()
        .any(|t| t == format!("v{base}"));
    Ok(match (tagged, dirty) {
        (true, false) => base.to_string(),
        (true, true) | (false, true) => format!("{base}+g{commit}.dirty"),
        (false, false) => format!("{base}+g{commit}"),
    })
}

/// Why the x86_64 musl build cannot run here, if it cannot: the Rust target and a C compiler for
/// ring's assembly and C.
fn musl_missing() -> anyhow::Result<Option<String>> {
    let installed = output(
        Command::new("rustup").args(["target", "list", "--installed"]),
        "rustup target list",
    )?;
    if !installed.lines().any(|t| t == X86_64) {
        return Ok(Some(format!(
            "the Rust target {X86_64} is not installed: rustup target add {X86_64}"
        )));
    }
    if !crate::on_path("x86_64-linux-musl-gcc") && !crate::on_path("musl-gcc") {
        return Ok(Some(
            "no musl C compiler (ring compiles C and assembly): apt-get install musl-tools".into(),
        ));
    }
    Ok(None)
}

/// Whether an ELF file asks for a dynamic loader: a static binary has no `PT_INTERP` segment.
pub(crate) fn is_static(bytes: &[u8]) -> anyhow::Result<bool> {
    anyhow::ensure!(bytes.get(..4) == Some(b"\x7fELF"), "not an ELF file");
    anyhow::ensure!(bytes.get(4) == Some(&2), "not a 64-bit ELF file");
    anyhow::ensure!(bytes.get(5) == Some(&1), "not a little-endian ELF file");
    let u16_at = |at: usize| -> anyhow::Result<u16> {
        Ok(u16::from_le_bytes(
            bytes
                .get(at..at + 2)
                .context("a truncated ELF header")?
                .try_into()?,
        ))
    };
    let phoff = u64::from_le_bytes(
        bytes
            .get(0x20..0x28)
            .context("a truncated ELF header")?
            .try_into()?,
    );
    let (phentsize, phnum) = (u16_at(0x36)? as usize, u16_at(0x38)? as usize);
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let at = usize::try_from(phoff)? + i * phentsize;
        let kind = u32::from_le_bytes(
            bytes
                .get(at..at + 4)
                .context("a truncated program header")?
                .try_into()?,
        );
        if kind == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

fn build(root: &Path, target: &str, version: &str, epoch: &str, tool: &str) -> anyhow::Result<()> {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|_| PathBuf::from("/root/.cargo"));
    // Where the sources are must not change the bytes, nor may symbols.
    let rustflags = format!(
        "--remap-path-prefix={}=/weft --remap-path-prefix={}=/cargo -C strip=symbols",
        root.display(),
        home.display()
    );
    let mut cmd = if tool == "cargo" {
        crate::cargo(&[])
    } else {
        Command::new(tool)
    };
    cmd.args(["build", "--release", "--locked", "--target", target])
        .args(["--target-dir", "target/release-build"])
        .args(BINARIES.iter().flat_map(|b| ["--bin", b]))
        .env("WEFT_VERSION", version)
        .env("SOURCE_DATE_EPOCH", epoch)
        .env("RUSTFLAGS", rustflags);
    if target == X86_64 && !crate::on_path("x86_64-linux-musl-gcc") {
        cmd.env("CC_x86_64_unknown_linux_musl", "musl-gcc");
    }
    crate::run(
        &format!("build the release binaries for {target}"),
        &mut cmd,
    )
}

pub(crate) fn run(root: &Path) -> anyhow::Result<Vec<Artifact>> {
    if let Some(missing) = musl_missing()? {
        bail!("cannot build static binaries: {missing}");
    }
    let version = version(root)?;
    let epoch = output(
        Command::new("git")
            .current_dir(root)
            .args(["log", "-1", "--format=%ct"]),
        "git log",
    )?;
    let mut targets = vec![X86_64];
    if crate::on_path("cross") {
        targets.push(AARCH64);
    } else {
        eprintln!("==> no `cross` on PATH: building {X86_64} only");
    }
    let mut artifacts = Vec::new();
    for target in targets {
        let tool = if target == X86_64 { "cargo" } else { "cross" };
        build(root, target, &version, &epoch, tool)?;
        let dist = root
            .join("target/dist")
            .join(format!("weft-{version}-{target}"));
        std::fs::create_dir_all(&dist)
            .with_context(|| format!("cannot create {}", dist.display()))?;
        let mut sums = String::new();
        for bin in BINARIES {
            let built = root
                .join("target/release-build")
                .join(target)
                .join("release")
                .join(bin);
            let path = dist.join(bin);
            std::fs::copy(&built, &path)
                .with_context(|| format!("cannot copy {}", built.display()))?;
            let bytes = std::fs::read(&path)?;
            anyhow::ensure!(
                is_static(&bytes).with_context(|| path.display().to_string())?,
                "{} is dynamically linked; a release binary must be static",
                path.display()
            );
            let sum = output(
                Command::new("sha256sum").arg(&path),
                &format!("sha256sum {}", path.display()),
            )?;
            let sha256 = sum
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            sums.push_str(&format!("{sha256}  {bin}\n"));
            artifacts.push(Artifact {
                path,
                target: target.to_string(),
                size: bytes.len() as u64,
                sha256,
            });
        }
        std::fs::write(dist.join("SHA256SUMS"), sums)?;
        if target == X86_64 {
            for bin in BINARIES {
                let said = output(
                    Command::new(dist.join(bin)).arg("--version"),
                    &format!("{bin} --version"),
                )?;
                anyhow::ensure!(
                    said == format!("{bin} {version}"),
                    "{bin} --version said {said:?}, not \"{bin} {version}\""
                );
            }
        }
    }
    println!("release {version}:");
    for a in &artifacts {
        println!(
            "  {}  {:>6.1} MiB  static  {}  ({})",
            a.path.display(),
            a.size as f64 / (1024.0 * 1024.0),
            a.sha256,
            a.target
        );
    }
    Ok(artifacts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_is_dynamic_and_junk_is_not_elf() {
        let own = std::fs::read(std::env::current_exe().expect("own path")).expect("readable");
        assert!(
            !is_static(&own).expect("an ELF file"),
            "a glibc test binary has an interpreter"
        );
        assert!(is_static(b"#!/bin/sh\n").is_err());
    }
}
