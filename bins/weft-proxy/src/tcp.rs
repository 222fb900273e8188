//! The TCP proxy filter: one upstream connection per downstream connection, bytes copied both ways.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::debug;
use weft_certs::SpiffeId;
use weft_telemetry::TcpLabels;

use crate::{
    Ctx, lb,
    listeners::{Origin, authorization_revoked},
    model::{ListenerKind, TcpConfig},
    mtls::Upstream,
};

/// The downstream side of a proxied connection.
pub struct Downstream<'a> {
    pub peer: SocketAddr,
    /// Who the client proved to be over mTLS.
    pub source_principal: Option<&'a SpiffeId>,
    /// The listener config it was accepted under (checked again when that changes), and where it was
    /// headed: the listener's own address, or for a captured connection its original destination,
    /// which ORIGINAL_DST clusters connect to.
    pub origin: &'a Origin,
}

pub async fn proxy<IO>(mut downstream: IO, conn: Downstream<'_>, config: &TcpConfig, ctx: &Ctx)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let Downstream {
        peer,
        source_principal,
        origin,
    } = conn;
    let (target, listener, inbound) = (
        origin.target,
        origin.listener.name.as_str(),
        origin.listener.inbound,
    );
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
            ctx.access_log.write(path, line);
        }
    };
    let facts = weft_policy::Request {
        source_principal: source_principal.map(crate::istio_principal),
        source_ip: Some(peer.ip()),
        remote_ip: None,
        destination_ip: Some(target.ip()),
        destination_port: target.port(),
        http: None,
    };
    if !config.rbac.is_empty() {
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
    let mut termination = "";
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
                    // A connection lives as long as its authorization: checked again whenever
                    // its listener changes, after the drain period.
                    let still_allowed = |kind: &ListenerKind| match kind {
                        ListenerKind::Tcp(t) => {
                            weft_policy::rbac::decide(&t.rbac, &facts).0.allowed()
                        }
                        ListenerKind::Http(_) => false,
                    };
                    let (from_down, from_up) = (AtomicU64::new(0), AtomicU64::new(0));
                    let copied = || {
                        (
                            from_down.load(Ordering::Relaxed),
                            from_up.load(Ordering::Relaxed),
                        )
                    };
                    let mut down = Counted {
                        io: &mut downstream,
                        read: &from_down,
                    };
                    let mut up = Counted {
                        io: &mut upstream,
                        read: &from_up,
                    };
                    tokio::select! {
                        r = tokio::io::copy_bidirectional(&mut down, &mut up) => r.map_err(|_| "-"),
                        () = authorization_revoked(ctx.state.clone(), ctx.listener_drain, origin, still_allowed) => {
                            debug!(%peer, listener, "closing a connection the listener's new config no longer authorizes");
                            termination = REVOKED;
                            Ok(copied())
                        }
                    }
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
            log(termination, "-", (from_downstream, to_downstream), upstream);
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

/// Termination details of a connection closed because a changed listener no longer authorizes it.
const REVOKED: &str = "rbac_access_denied_after_listener_update";

/// An IO that counts the bytes read from it, so a connection closed mid-copy still reports them.
struct Counted<'a, IO> {
    io: &'a mut IO,
    read: &'a AtomicU64,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<'_, IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<'_, IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
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
