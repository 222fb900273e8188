//! The TCP proxy filter: one upstream connection per downstream connection, bytes copied both ways.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::debug;
use weft_telemetry::TcpLabels;

use crate::{Ctx, lb, model::TcpConfig};

/// `target` is where the connection was headed: the listener's own address, or for a captured
/// connection its original destination, which ORIGINAL_DST clusters connect to.
pub async fn proxy(
    mut downstream: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    listener: &str,
    inbound: bool,
    config: &TcpConfig,
    ctx: &Ctx,
) {
    let state = ctx.state.borrow().clone();
    let cluster =
        lb::pick_cluster(&config.clusters).and_then(|c| state.clusters.get(&c.name).cloned());
    let endpoint = cluster.as_ref().and_then(|c| lb::pick_endpoint(c, None));
    let mut labels = ctx.tcp_labels(inbound, cluster.as_deref(), endpoint.as_deref());
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
    let result = match (destination, &cluster) {
        (Ok(dst), Some(c)) => match tokio::time::timeout(
            c.config.connect_timeout,
            connect(dst, c.config.source_address),
        )
        .await
        {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                tokio::io::copy_bidirectional(&mut downstream, &mut upstream)
                    .await
                    .map_err(|_| "-")
            }
            _ => Err("UF"),
        },
        (Err(flag), _) => Err(flag),
        (Ok(_), None) => Err("NC"),
    };
    match result {
        Ok((from_downstream, to_downstream)) => {
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
