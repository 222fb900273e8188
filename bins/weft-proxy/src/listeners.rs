//! Bound listeners: binds what LDS names, stops what it no longer names, and runs one accept loop each.
//! Binding happens while an update is applied, so a port that cannot be bound NACKs the update instead of
//! failing later.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    Ctx,
    http::{self, ConnInfo},
    model::{ListenerConfig, ListenerKind},
    state::ProxyState,
    tcp,
};

/// Sockets bound for an update that is not applied yet.
#[derive(Debug)]
pub struct Prepared {
    new: Vec<(SocketAddr, std::net::TcpListener)>,
    keep: Vec<SocketAddr>,
}

pub struct ListenerManager {
    running: HashMap<SocketAddr, watch::Sender<bool>>,
    tasks: JoinSet<()>,
    ctx: Arc<Ctx>,
}

impl ListenerManager {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self {
            running: HashMap::new(),
            tasks: JoinSet::new(),
            ctx,
        }
    }

    /// Binds every address not bound yet; on any failure nothing changes.
    pub fn prepare(&mut self, wanted: &[(String, SocketAddr)]) -> Result<Prepared, String> {
        let mut new = Vec::new();
        let mut keep = Vec::new();
        for (name, addr) in wanted {
            if self.running.contains_key(addr) {
                keep.push(*addr);
                continue;
            }
            let socket = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| format!("listener {name}: cannot bind {addr}: {e}"))?;
            new.push((*addr, socket));
        }
        Ok(Prepared { new, keep })
    }

    /// Starts the newly bound listeners and stops those no longer wanted.
    pub fn commit(&mut self, prepared: Prepared) {
        let Prepared { new, keep } = prepared;
        self.running.retain(|addr, stop| {
            let wanted = keep.contains(addr);
            if !wanted {
                info!(%addr, "listener removed");
                let _ = stop.send(true);
            }
            wanted
        });
        for (addr, socket) in new {
            let listener = match TcpListener::from_std(socket) {
                Ok(l) => l,
                Err(e) => {
                    warn!(%addr, error = %e, "cannot register listener with the runtime");
                    continue;
                }
            };
            let (stop_tx, stop_rx) = watch::channel(false);
            self.running.insert(addr, stop_tx);
            info!(%addr, "listener bound");
            self.tasks.spawn(
                accept_loop(listener, addr, self.ctx.clone(), stop_rx)
                    .instrument(info_span!("listener", %addr)),
            );
        }
        // Reap loops that already ended so the set does not grow.
        while self.tasks.try_join_next().is_some() {}
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>, ctx: &Ctx) {
    tokio::select! {
        _ = stop.wait_for(|s| *s) => {}
        () = ctx.drain.signaled() => {}
    }
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    ctx: Arc<Ctx>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => { warn!(error = %e, "accept failed"); continue }
            },
            () = stopped(&mut stop, &ctx) => break,
        };
        while conns.try_join_next().is_some() {}
        let state = ctx.state.borrow().clone();
        let Some(own) = state
            .listeners
            .values()
            .find(|l| l.bind && l.address == addr)
        else {
            debug!(%peer, "no listener config for this address any more; closing");
            continue;
        };
        // A capture listener hands the connection to the listener for where it was going.
        let original_dst = own
            .use_original_dst
            .then(|| original_dst(&stream))
            .flatten();
        let target = original_dst.unwrap_or(addr);
        let (config, kind) = match resolve(&state, own, target) {
            Some((config, kind)) => (config.clone(), kind.clone()),
            None => {
                debug!(%peer, %target, listener = %own.name, "no filter chain for this destination; closing");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let drain = ctx.drain.clone();
            match kind {
                ListenerKind::Tcp(tcp) => {
                    tcp::proxy(stream, peer, target, &config.name, config.inbound, &tcp, &ctx).await
                }
                ListenerKind::Http(http_config) => {
                    let info = Arc::new(ConnInfo { local: target, peer, inbound: config.inbound, http: http_config });
                    let svc_ctx = ctx.clone();
                    let svc = service_fn(move |req| http::handle(req, svc_ctx.clone(), info.clone()));
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    let mut stop = stop;
                    tokio::select! {
                        r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "connection ended with an error") },
                        () = stopped(&mut stop, &ctx) => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                }
            }
            drop(drain);
        });
    }
    // Stop accepting, then let connections in flight finish (each watches the same signal to wind down).
    while conns.join_next().await.is_some() {}
}

/// Where a redirected connection was headed (`SO_ORIGINAL_DST`); `None` when it was not redirected.
fn original_dst(stream: &tokio::net::TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr().ok()? {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    addr.ok()?.as_socket()
}

/// Envoy's `use_original_dst` choice: an unbound listener for exactly the destination, then one for
/// `0.0.0.0:<port>`, then the capture listener's own chains, each by destination port.
fn resolve<'a>(
    state: &'a ProxyState,
    own: &'a ListenerConfig,
    target: SocketAddr,
) -> Option<(&'a ListenerConfig, &'a ListenerKind)> {
    if own.use_original_dst {
        let unbound = |want: SocketAddr| {
            state
                .listeners
                .values()
                .find(|l| !l.bind && l.address == want)
        };
        let wildcard = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), target.port());
        if let Some(l) = unbound(target).or_else(|| unbound(wildcard)) {
            return l.chain_for(target.port()).map(|k| (l, k));
        }
    }
    own.chain_for(target.port()).map(|k| (own, k))
}
