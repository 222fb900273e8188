//! The real binary, started twice: without `--ca-dir` its CA lives in the state directory, so the
//! second run serves the same root and proxies holding it keep verifying weftd. And `--xds-address ''`
//! leaves plaintext xDS off.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// weftd with its state in `state`, writing the trust bundle to `identity`, plaintext xDS as given.
fn start(dir: &Path, xds: &str) -> Running {
    let child = Command::new(env!("CARGO_BIN_EXE_weftd"))
        .arg("--config-dir")
        .arg(dir.join("config"))
        .arg("--identity-dir")
        .arg(dir.join("identity"))
        .args(["--xds-address", xds])
        .args(["--secure-address", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--monitoring-address",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .env("WEFTD_STATE_DIR", dir.join("state"))
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("weftd starts");
    Running(child)
}

fn wait_for_bundle(dir: &Path) -> String {
    let path = dir.join("identity/root-cert.pem");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(pem) = std::fs::read_to_string(&path)
            && pem.contains("END CERTIFICATE")
        {
            return pem;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no trust bundle written"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_ca_survives_a_restart_by_default_and_plaintext_xds_can_be_off() {
    let dir = std::env::temp_dir().join(format!("weftd-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("config")).expect("config dir");
    let xds = free_port();
    let first = start(&dir, &format!("127.0.0.1:{xds}"));
    let root = wait_for_bundle(&dir);
    drop(first);
    std::fs::remove_dir_all(dir.join("identity")).expect("clear the bundle");
    let second = start(&dir, "");
    assert_eq!(wait_for_bundle(&dir), root, "the same root after a restart");
    assert!(
        dir.join("state/ca/ca-key.pem").exists(),
        "the CA is kept in the state directory"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", xds)).is_err(),
        "with --xds-address '' nothing listens for plaintext xDS"
    );
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}
