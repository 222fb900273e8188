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
        let err = String::from_utf8_lossy(&out.stderr);
        // Left by a run that was killed before it could clean up: it is the address we want.
        let already = err.contains("File exists");
        anyhow::ensure!(
            out.status.success() || already,
            "cannot add {ip} to the host's loopback (needs root): {}",
            err.trim()
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

/// A Service as pods name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub name: String,
    pub namespace: String,
    pub cluster_ip: Ipv4Addr,
}

/// A pod's `/etc/hosts`, standing in for cluster DNS: every Service by its names, the short one only
/// for the pod's own namespace, as the DNS search path `<ns>.svc.cluster.local` resolves it.
pub fn hosts_file(
    services: &[ServiceName],
    pod_namespace: &str,
    pod_name: &str,
    pod_ip: &str,
) -> String {
    let mut out = format!("127.0.0.1 localhost\n::1 localhost\n{pod_ip} {pod_name}\n");
    for s in services {
        let (name, ns) = (&s.name, &s.namespace);
        out.push_str(&format!(
            "{} {name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns}",
            s.cluster_ip
        ));
        if ns == pod_namespace {
            out.push_str(&format!(" {name}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_services_as_cluster_dns_would_for_the_pod() {
        let services = [
            ServiceName {
                name: "istiod".into(),
                namespace: "istio-system".into(),
                cluster_ip: Ipv4Addr::new(10, 0, 0, 10),
            },
            ServiceName {
                name: "reviews".into(),
                namespace: "bookinfo".into(),
                cluster_ip: Ipv4Addr::new(10, 0, 0, 20),
            },
        ];
        assert_eq!(
            hosts_file(&services, "bookinfo", "productpage-v1-abc", "10.98.0.7"),
            "127.0.0.1 localhost\n::1 localhost\n10.98.0.7 productpage-v1-abc\n\
             10.0.0.10 istiod.istio-system.svc.cluster.local istiod.istio-system.svc istiod.istio-system\n\
             10.0.0.20 reviews.bookinfo.svc.cluster.local reviews.bookinfo.svc reviews.bookinfo reviews\n"
        );
    }
}
