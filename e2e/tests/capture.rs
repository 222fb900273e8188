//! Real iptables in network namespaces: `weft-proxy iptables` captures a pod's outbound and inbound TCP
//! and leaves the proxy's own traffic (uid 1337) alone.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use weft_e2e::{Netns, link, original_dst};

fn weft_proxy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/weft-proxy")
}

/// Accepts `n` connections and answers each with `<name> <original destination or ->`.
async fn answer(listener: TcpListener, name: &'static str, n: usize) -> anyhow::Result<()> {
    for _ in 0..n {
        let (mut s, _) = listener.accept().await?;
        let dst = original_dst(&s).map_or_else(|_| "-".to_string(), |a| a.to_string());
        s.write_all(format!("{name} {dst}").as_bytes()).await?;
    }
    Ok(())
}

async fn ask(addr: &str) -> anyhow::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await??;
    Ok(out)
}

#[test]
fn pod_traffic_is_captured_and_the_proxys_own_is_not() -> anyhow::Result<()> {
    assert!(
        weft_proxy().exists(),
        "build weft-proxy first (cargo build --bin weft-proxy); cargo xtask test does"
    );
    let pod = Netns::new("pod")?;
    let remote = Netns::new("remote")?;
    let (pod_ip, remote_ip) = (Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::new(10, 99, 0, 2));
    link(&pod, pod_ip, &remote, remote_ip)?;
    let out = pod.exec(&[weft_proxy().to_str().expect("utf-8 path"), "iptables"])?;
    assert!(out.status.success());
    let saved = String::from_utf8(pod.exec(&["iptables-save", "-t", "nat"])?.stdout)?;
    for chain in [
        ":ISTIO_INBOUND",
        ":ISTIO_OUTPUT",
        ":ISTIO_REDIRECT",
        ":ISTIO_IN_REDIRECT",
    ] {
        assert!(saved.contains(chain), "{chain} missing:\n{saved}");
    }

    // Listeners first, each on a thread inside its namespace: the "proxy" on 15001 and 15006 in the pod,
    // the real server on the remote side.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let r = ready_tx.clone();
    let server = remote.spawn(move || async move {
        let l = TcpListener::bind("10.99.0.2:8080").await?;
        r.send(())?;
        answer(l, "server", 1).await
    });
    let r = ready_tx.clone();
    let proxy = pod.spawn(move || async move {
        let outbound = TcpListener::bind("0.0.0.0:15001").await?;
        let inbound = TcpListener::bind("0.0.0.0:15006").await?;
        r.send(())?;
        r.send(())?;
        tokio::try_join!(
            answer(outbound, "outbound", 1),
            answer(inbound, "inbound", 1)
        )?;
        Ok(())
    });
    for _ in 0..3 {
        ready_rx.recv_timeout(Duration::from_secs(10))?;
    }

    // The app's connection to the remote server lands on 15001, with its destination recovered.
    let app = pod.spawn(|| async { ask("10.99.0.2:8080").await });
    assert_eq!(app.join().expect("app thread")?, "outbound 10.99.0.2:8080");

    // The proxy's own connection (uid 1337) goes straight to the server.
    let as_proxy = pod
        .command("setpriv")
        .args([
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            "timeout",
            "5",
            "bash",
            "-c",
        ])
        .arg("exec 3<>/dev/tcp/10.99.0.2/8080; cat <&3")
        .output()?;
    assert!(
        as_proxy.status.success(),
        "{}",
        String::from_utf8_lossy(&as_proxy.stderr)
    );
    assert_eq!(String::from_utf8(as_proxy.stdout)?.trim(), "server -");

    // Inbound: a connection from the remote side to any pod port lands on 15006, destination intact.
    let client = remote.spawn(|| async { ask("10.99.0.1:9080").await });
    assert_eq!(
        client.join().expect("client thread")?,
        "inbound 10.99.0.1:9080"
    );

    server.join().expect("server thread")?;
    proxy.join().expect("proxy thread")?;
    Ok(())
}

#[test]
fn cleanup_removes_every_chain() -> anyhow::Result<()> {
    let pod = Netns::new("clean")?;
    pod.exec(&[weft_proxy().to_str().expect("utf-8 path"), "iptables"])?;
    pod.exec(&[
        weft_proxy().to_str().expect("utf-8 path"),
        "iptables",
        "--cleanup",
    ])?;
    let saved = String::from_utf8(pod.exec(&["iptables-save", "-t", "nat"])?.stdout)?;
    assert!(!saved.contains("ISTIO_"), "{saved}");
    Ok(())
}
