//! The harness's container start, for real: a planned process runs inside a pod's network namespace,
//! as its user, seeing its volume at the mount path and nothing of it outside. Needs root.

use std::time::Duration;

use weft_e2e::{
    Netns,
    kubelet::{Mount, Process, run},
};

#[test]
fn a_planned_container_runs_in_its_pod_as_its_user_with_its_volumes() {
    let base = std::env::temp_dir().join(format!("weft-kubelet-{}", std::process::id()));
    let volume = base.join("volumes/token");
    std::fs::create_dir_all(&volume).expect("volume dir");
    std::fs::write(volume.join("t"), "TOKEN").expect("token");
    let target = base.join("mnt/tokens");
    let netns = Netns::new("kubelet").expect("a network namespace (needs root)");
    let process = Process {
        container: "app".into(),
        init: false,
        program: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            format!(
                "id -u; echo $GREETING; cat {}/t; echo; touch {}/w 2>/dev/null || echo read-only; ip -o link | grep -c ': eth'; true",
                target.display(),
                target.display()
            ),
        ],
        env: vec![("GREETING".into(), "hello".into())],
        user: Some((1337, 1337)),
        mounts: vec![Mount {
            volume: "token".into(),
            path: target.display().to_string(),
            read_only: true,
        }],
        post_start: None,
    };
    let volumes = [("token".to_string(), volume.clone())].into();
    let log_path = base.join("app.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = run::spawn(&netns.name, &process, &volumes, log).expect("started");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < until,
            "the container did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "{status}: {out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["1337", "hello", "TOKEN", "read-only", "0"],
        "as 1337, its env, its volume read-only, and only the namespace's loopback"
    );
    assert!(
        !target.join("t").exists(),
        "the mount lives only in the container's mount namespace"
    );
    let _ = std::fs::remove_dir_all(&base);
}
