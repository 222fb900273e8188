//! Bound listeners: binds what LDS names, stops what it no longer names, and runs one accept loop each.
//! Binding happens while an update is applied, so a port that cannot be bound NACKs the update instead of
//! failing later.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    Ctx,
    detect::{self, Detected},
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
    let mut acceptor = weft_drain::Acceptor::new(listener, "listener");
    loop {
        let (stream, peer) = tokio::select! {
            accepted = acceptor.accept() => accepted,
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
        let original_dst = (own.use_original_dst || own.restore_original_dst)
            .then(|| original_dst(&stream))
            .flatten();
        let target = original_dst.unwrap_or(addr);
        let config = Arc::new(resolve(&state, own, target).clone());
        let ctx = ctx.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let drain = ctx.drain.clone();
            let _ = stream.set_nodelay(true);
            // Wait for the first bytes only where the chain depends on them, and never past the timeout.
            let detected = if config.needs_detection(target.port()) {
                Some(sniff(&stream, config.detect_timeout).await)
            } else {
                None
            };
            let Some(chain) = config.chain_for(target.port(), detected.as_ref()).cloned() else {
                debug!(%peer, %target, listener = %config.name, ?detected, "no filter chain for this connection; closing");
                return;
            };
            let conn = Conn {
                peer,
                origin: Origin {
                    listener: config.clone(),
                    target,
                    detected: detected.clone(),
                },
            };
            match &chain.tls {
                None => serve(stream, None, conn, chain.kind, &ctx, stop).await,
                Some(tls) => {
                    // The chain was picked from the ClientHello; the handshake proves who is calling.
                    let accepted = match ctx.tls.server(tls) {
                        Ok(server) => weft_certs::accept(&server, stream).await,
                        Err(e) => Err(e),
                    };
                    match accepted {
                        Ok((stream, tls_peer)) => {
                            serve(stream, Some(tls_peer), conn, chain.kind, &ctx, stop).await
                        }
                        Err(e) => debug!(%peer, listener = %config.name, error = %e, "mTLS handshake refused"),
                    }
                }
            }
            drop(drain);
        });
    }
    // Stop accepting, then let connections in flight finish (each watches the same signal to wind down).
    while conns.join_next().await.is_some() {}
}

/// Where a connection came from and was going, for the filters.
struct Conn {
    peer: SocketAddr,
    origin: Origin,
}

/// What a connection was accepted under, so it can be checked again when its listener changes.
#[derive(Clone, Debug)]
pub(crate) struct Origin {
    /// The listener config the connection was accepted under.
    pub listener: Arc<ListenerConfig>,
    /// Where it was headed (for a captured connection, its original destination).
    pub target: SocketAddr,
    /// What its first bytes said, which picked its filter chain.
    pub detected: Option<Detected>,
}

/// Resolves when a long-lived connection must close: its listener changed, the drain period passed,
/// and under the config then in force its filter chain is gone or `still_allowed` (the chain's
/// authorization, re-evaluated) says no. A change that keeps it authorized keeps it open.
pub(crate) async fn authorization_revoked(
    state: watch::Receiver<Arc<ProxyState>>,
    drain_period: std::time::Duration,
    origin: &Origin,
    still_allowed: impl Fn(&ListenerKind) -> bool,
) {
    let mut accepted = origin.listener.clone();
    loop {
        listener_changed(&state, &accepted).await;
        tokio::time::sleep(drain_period).await;
        let state = state.borrow().clone();
        let Some(now) = state.listeners.get(&accepted.name) else {
            return;
        };
        let chain = now.chain_for(origin.target.port(), origin.detected.as_ref());
        if !chain.is_some_and(|c| still_allowed(&c.kind)) {
            return;
        }
        accepted = Arc::new(now.clone());
    }
}

/// Resolves once the named listener's config differs from `accepted` (changed or removed).
async fn listener_changed(state: &watch::Receiver<Arc<ProxyState>>, accepted: &ListenerConfig) {
    let mut updates = state.clone();
    loop {
        if updates.changed().await.is_err() {
            return std::future::pending().await;
        }
        let now = updates.borrow_and_update().clone();
        if now.listeners.get(&accepted.name) != Some(accepted) {
            return;
        }
    }
}

/// Runs a chain's filter over a connection, plaintext or already decrypted. `tls` is what the mTLS
/// handshake proved, if there was one.
async fn serve<IO>(
    stream: IO,
    tls: Option<weft_certs::Peer>,
    conn: Conn,
    kind: ListenerKind,
    ctx: &Arc<Ctx>,
    mut stop: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (source_principal, client_cert_hash) = match tls {
        Some(p) => (p.id, p.cert_hash),
        None => (None, None),
    };
    let Conn { peer, origin } = conn;
    match kind {
        ListenerKind::Tcp(tcp) => {
            let downstream = tcp::Downstream {
                peer,
                source_principal: source_principal.as_ref(),
                origin: &origin,
            };
            tcp::proxy(stream, downstream, &tcp, ctx).await
        }
        ListenerKind::Http(http_config) => {
            let info = Arc::new(ConnInfo {
                local: origin.target,
                peer,
                inbound: origin.listener.inbound,
                http: http_config,
                source_principal,
                client_cert_hash,
                origin: origin.clone(),
                draining: AtomicBool::new(false),
                http2: AtomicBool::new(false),
                last_series: Default::default(),
            });
            let svc_ctx = ctx.clone();
            let svc_info = info.clone();
            let svc =
                service_fn(move |req| http::serve_request(req, svc_ctx.clone(), svc_info.clone()));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let served = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::pin!(served);
            // A changed listener (new routes inline, new authorization policy) must not keep serving
            // kept-alive connections on the old config for long, nor cut them while a client may be
            // writing: as Envoy drains an updated listener, HTTP/2 gets GOAWAY at once, HTTP/1.1
            // answers its next request with `Connection: close`, and what is left after the drain
            // period is shut down (in-flight requests finish).
            tokio::select! {
                r = served.as_mut() => if let Err(e) = r { debug!(error = %e, "connection ended with an error") },
                () = stopped(&mut stop, ctx) => {
                    served.as_mut().graceful_shutdown();
                    let _ = served.await;
                }
                () = listener_changed(&ctx.state, &origin.listener) => {
                    info.draining.store(true, Ordering::Relaxed);
                    if info.http2.load(Ordering::Relaxed) {
                        served.as_mut().graceful_shutdown();
                    }
                    tokio::select! {
                        _ = served.as_mut() => return,
                        () = tokio::time::sleep(ctx.listener_drain) => {}
                        () = stopped(&mut stop, ctx) => {}
                    }
                    served.as_mut().graceful_shutdown();
                    let _ = served.await;
                }
            }
        }
    }
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
/// `0.0.0.0:<port>`, else the capture listener itself.
fn resolve<'a>(
    state: &'a ProxyState,
    own: &'a ListenerConfig,
    target: SocketAddr,
) -> &'a ListenerConfig {
    if own.use_original_dst {
        let unbound = |want: SocketAddr| {
            state
                .listeners
                .values()
                .find(|l| !l.bind && l.address == want)
        };
        let wildcard = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), target.port());
        if let Some(l) = unbound(target).or_else(|| unbound(wildcard)) {
            return l;
        }
    }
    own
}

/// Peeks at the first bytes until they settle the protocol, the peek buffer is full, or `timeout`
/// passes (then the connection is taken as undetected, as Envoy's `continue_on_listener_filters_timeout`).
async fn sniff(stream: &tokio::net::TcpStream, timeout: std::time::Duration) -> Detected {
    let mut buf = vec![0u8; detect::MAX_PEEK];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return Detected::Unknown,
        };
        match detect::detect(&buf[..n]) {
            detect::Progress::Done(d) => return d,
            // The peer closed, or sent all it will before we may wait longer.
            _ if n == 0 || n == buf.len() => return Detected::Unknown,
            detect::Progress::NeedMore => {
                // Peek returns at once while bytes are queued; give the peer a moment to send more.
                if tokio::time::timeout_at(
                    deadline,
                    tokio::time::sleep(std::time::Duration::from_millis(1)),
                )
                .await
                .is_err()
                {
                    return Detected::Unknown;
                }
            }
        }
    }
}
