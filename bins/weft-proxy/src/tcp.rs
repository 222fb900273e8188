//! The TCP proxy filter: one upstream connection per downstream connection, bytes copied both ways.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::debug;
use weft_telemetry::TcpLabels;

use crate::{Ctx, lb, model::TcpConfig};

pub async fn proxy(
    mut downstream: TcpStream,
    peer: SocketAddr,
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
    let result = match (&cluster, &endpoint) {
        (Some(c), Some(e)) => match tokio::time::timeout(
            c.config.connect_timeout,
            TcpStream::connect(e.config.address),
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
        (Some(_), None) => Err("UH"),
        (None, _) => Err("NC"),
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
