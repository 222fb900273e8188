//! The README's main command, in-process: the demo mesh comes up, traffic follows the routing rule, and
//! the demo reports success.

use std::{path::PathBuf, time::Duration};

/// Removes the demo's directory when the test ends, passed or failed.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_and_all_traffic_behaves_as_configured() {
    let dir = std::env::temp_dir().join(format!("weft-demo-test-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let passed = weftctl::demo::run(weftctl::demo::Options {
        duration: Some(Duration::from_secs(3)),
        rate: 100,
        config_dir: Some(dir.clone()),
        mode: weftctl::demo::Mode::Explicit,
        bin_dir: None,
    })
    .await
    .expect("the demo starts and stops cleanly");
    let log = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
    assert!(
        passed,
        "the demo's verdict was a failure (its summary is above)"
    );
    assert!(
        log.contains("outbound|9080|v2|backend.demo.svc.cluster.local"),
        "access log: {log}"
    );
}

/// The same demo as it runs for root: every workload a network namespace with iptables capture.
/// CI runs as root; elsewhere this fails with what is missing rather than skipping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_in_network_namespaces_with_interception() {
    let dir = std::env::temp_dir().join(format!("weft-demo-ns-test-{}", std::process::id()));
    // Removed even when an assertion below fails.
    let _cleanup = RemoveOnDrop(dir.clone());
    let passed = weftctl::demo::run(weftctl::demo::Options {
        duration: Some(Duration::from_secs(3)),
        rate: 100,
        config_dir: Some(dir.clone()),
        mode: weftctl::demo::Mode::Interception,
        bin_dir: None,
    })
    .await
    .expect("the interception demo starts (it needs root, iproute2, iptables and setpriv) and stops cleanly");
    assert!(
        passed,
        "the demo's verdict was a failure (its summary is above)"
    );
}
