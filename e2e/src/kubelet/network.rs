//! What pods reach beyond their bridge, as kube-proxy's userspace mode gave it: a Service's ClusterIP
//! is an address of the host (on its loopback, so the host answers for it on the pod bridge), where a
//! forwarder hands each connection to one of the Service's endpoints. The `kubernetes` Service's
//! ClusterIP forwards to the API server, whose certificate names that address.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::Context;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

/// An address the host answers for, removed when dropped.
#[derive(Debug)]
pub struct HostAddress(Ipv4Addr);

impl HostAddress {
    pub fn add(ip: Ipv4Addr) -> anyhow::Result<Self> {
        let out = Command::new("ip")
            .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
            .output()
            .context("cannot run ip (iproute2)")?;
        anyhow::ensure!(
            out.status.success(),
            "cannot add {ip} to the host's loopback (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Self(ip))
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.0), "dev", "lo"])
            .output();
    }
}

/// Connections to one address handed to the endpoints `targets` holds, in turn; with none, a
/// connection is closed at once, as a Service without ready endpoints refuses. Stops when dropped.
#[derive(Debug)]
pub struct Forwarder {
    pub address: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Forwarder {
    pub async fn start(
        listen: SocketAddr,
        targets: watch::Receiver<Vec<SocketAddr>>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let address = listener.local_addr()?;
        let next = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            let mut acceptor = weft_drain::Acceptor::new(listener, "service forwarder");
            loop {
                let (mut inbound, _) = acceptor.accept().await;
                while conns.try_join_next().is_some() {}
                let endpoints = targets.borrow().clone();
                let Some(target) = (!endpoints.is_empty())
                    .then(|| endpoints[next.fetch_add(1, Ordering::Relaxed) % endpoints.len()])
                else {
                    continue;
                };
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Self { address, task })
    }
}
