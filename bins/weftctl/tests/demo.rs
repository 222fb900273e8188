//! The README's main command, in-process: the demo mesh comes up, traffic follows the routing rule, and
//! the demo reports success.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_and_all_traffic_behaves_as_configured() {
    let dir = std::env::temp_dir().join(format!("weft-demo-test-{}", std::process::id()));
    let passed = weftctl::demo::run(weftctl::demo::Options {
        duration: Some(Duration::from_secs(3)),
        rate: 100,
        config_dir: Some(dir.clone()),
    })
    .await
    .expect("the demo starts and stops cleanly");
    let log = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        passed,
        "the demo's verdict was a failure (its summary is above)"
    );
    assert!(
        log.contains("outbound|9080|v2|backend.demo.svc.cluster.local"),
        "access log: {log}"
    );
}
