//! The TCP proxy filter: one upstream connection per downstream connection, bytes copied both ways.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::debug;
use weft_certs::SpiffeId;
use weft_telemetry::TcpLabels;

use crate::{Ctx, lb, model::TcpConfig, mtls::Upstream};

/// The downstream side of a proxied connection.
pub struct Downstream<'a> {
    pub peer: SocketAddr,
    /// Where the connection was headed: the listener's own address, or for a captured connection its
    /// original destination, which ORIGINAL_DST clusters connect to.
    pub target: SocketAddr,
    pub listener: &'a str,
    pub inbound: bool,
    /// Who the client proved to be over mTLS.
    pub source_principal: Option<&'a SpiffeId>,
}

pub async fn proxy<IO>(mut downstream: IO, conn: Downstream<'_>, config: &TcpConfig, ctx: &Ctx)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let Downstream {
        peer,
        target,
        listener,
        inbound,
        source_principal,
    } = conn;
    let (start, start_wall) = (tokio::time::Instant::now(), std::time::SystemTime::now());
    let log = |termination: &str,
               flags: &str,
               bytes: (u64, u64),
               upstream: Option<(&crate::state::ClusterState, Option<SocketAddr>)>| {
        if let Some(path) = &config.access_log {
            let line = ctx.access_log.format_tcp(&crate::access_log::TcpEntry {
                start: start_wall,
                flags,
                termination,
                bytes_received: bytes.0,
                bytes_sent: bytes.1,
                duration: start.elapsed(),
                upstream_host: upstream.and_then(|(_, h)| h).map(|h| h.to_string()),
                upstream_cluster: upstream.map(|(c, _)| c.config.name.as_str()),
                downstream_local: target,
                downstream_remote: peer,
            });
            ctx.access_log.write(path, &line);
        }
    };
    if !config.rbac.is_empty() {
        let facts = weft_policy::Request {
            source_principal: source_principal.map(crate::istio_principal),
            source_ip: Some(peer.ip()),
            remote_ip: None,
            destination_ip: Some(target.ip()),
            destination_port: target.port(),
            http: None,
        };
        let (decision, _) = weft_policy::rbac::decide(&config.rbac, &facts);
        if !decision.allowed() {
            // As Envoy's network RBAC: the connection is closed without a byte.
            ctx.count_denial(&decision, "tcp", source_principal);
            let details = crate::denial_details(&decision);
            debug!(%peer, listener, reason = %decision.reason(), %details, "connection denied");
            log(&details, "-", (0, 0), None);
            return;
        }
    }
    let state = ctx.state.borrow().clone();
    let cluster =
        lb::pick_cluster(&config.clusters).and_then(|c| state.clusters.get(&c.name).cloned());
    let endpoint = cluster.as_ref().and_then(|c| lb::pick_endpoint(c, None));
    let mut labels = ctx.tcp_labels(inbound, cluster.as_deref(), endpoint.as_deref());
    if let Some(id) = source_principal {
        labels.source_principal = id.to_string();
        labels.source_workload_namespace = id.namespace.clone();
        labels.connection_security_policy = "mutual_tls".into();
    }
    ctx.metrics
        .tcp_connections_opened
        .get_or_create(&labels)
        .inc();
    let destination = match (&cluster, &endpoint) {
        (Some(c), _) if c.config.original_dst => Ok(target),
        (Some(_), Some(e)) => Ok(e.config.address),
        (Some(_), None) => Err("UH"),
        (None, _) => Err("NC"),
    };
    // mTLS when the endpoint's transport socket says so (auto mTLS: the endpoint runs a sidecar).
    let tls = match (&cluster, &endpoint) {
        (Some(c), Some(e)) if e.tls => c.tcp_tls.as_ref(),
        _ => None,
    };
    let result = match (destination, &cluster) {
        (Ok(dst), Some(c)) => {
            let connecting = async {
                let tcp = connect(dst, c.config.source_address).await?;
                let _ = tcp.set_nodelay(true);
                Upstream::over(tcp, tls.map(|(config, sni)| (config, sni.as_str()))).await
            };
            match tokio::time::timeout(c.config.connect_timeout, connecting).await {
                Ok(Ok((mut upstream, server))) => {
                    if let Some(id) = server {
                        labels.destination_principal = id.to_string();
                        labels.connection_security_policy = "mutual_tls".into();
                    }
                    tokio::io::copy_bidirectional(&mut downstream, &mut upstream)
                        .await
                        .map_err(|_| "-")
                }
                Ok(Err(e)) => {
                    debug!(%peer, listener, error = %e, "upstream connection failed");
                    Err("UF")
                }
                Err(_) => Err("UF"),
            }
        }
        (Err(flag), _) => Err(flag),
        (Ok(_), None) => Err("NC"),
    };
    let upstream = cluster.as_deref().map(|c| (c, destination.ok()));
    match result {
        Ok((from_downstream, to_downstream)) => {
            log("", "-", (from_downstream, to_downstream), upstream);
            ctx.metrics
                .tcp_received_bytes
                .get_or_create(&labels)
                .inc_by(from_downstream);
            ctx.metrics
                .tcp_sent_bytes
                .get_or_create(&labels)
                .inc_by(to_downstream);
        }
        Err(flag) => {
            debug!(%peer, listener, flag, "tcp connection could not be proxied");
            log("", flag, (0, 0), upstream);
            labels = TcpLabels {
                response_flags: flag.into(),
                ..labels
            };
        }
    }
    ctx.metrics
        .tcp_connections_closed
        .get_or_create(&labels)
        .inc();
}

/// Connects from `source` when the cluster asks for it (inbound passthrough binds 127.0.0.6).
async fn connect(dst: SocketAddr, source: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(dst).await;
    };
    let socket = if dst.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(dst).await
}
