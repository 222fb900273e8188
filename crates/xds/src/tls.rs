//! gRPC over mTLS for weftd's 15012 and the proxies that call it. The server side hands tonic
//! connections whose handshake is done and records what the peer proved ([`TlsConnectInfo`] in each
//! request's extensions); the client side is a tonic channel that dials through `weft_certs::connect`.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    task::JoinSet,
};
use tonic::transport::{Channel, Endpoint, Uri, server::Connected};
use tracing::debug;
use weft_certs::{ClientTls, Peer, ServerStream, ServerTls, SpiffeId};
use weft_drain::Acceptor;

/// A handshake that has not finished by then is dropped, so a silent client holds nothing for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a gRPC handler on an mTLS port knows of its caller.
#[derive(Clone, Debug)]
pub struct TlsConnectInfo {
    pub remote: Option<SocketAddr>,
    pub peer: Peer,
}

/// The identity a request's client certificate proved: `Ok(None)` on a plaintext port, an error on an
/// mTLS port when the client sent no certificate.
pub fn caller_identity<T>(request: &tonic::Request<T>) -> Result<Option<SpiffeId>, tonic::Status> {
    match request.extensions().get::<TlsConnectInfo>() {
        None => Ok(None),
        Some(info) => info.peer.id.clone().map(Some).ok_or_else(|| {
            tonic::Status::unauthenticated(
                "this port needs a client certificate from the mesh CA (or use the CA service first)",
            )
        }),
    }
}

/// A server-side connection after its TLS handshake.
pub struct TlsConn {
    stream: ServerStream<TcpStream>,
    info: TlsConnectInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Handshakes in progress at once from one source address. A client needs one at a time (a few while
/// it reconnects); past this, its new connections are closed at once, so no source can take the
/// handshake capacity from the others.
pub const HANDSHAKES_PER_SOURCE: usize = 8;
/// Handshakes in progress at once in all.
const MAX_HANDSHAKES: usize = 1024;
/// A TLS client speaks first: one that has sent nothing by then is closed.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(3);

/// Counts handshakes in progress per source address; a slot is freed when its guard drops.
#[derive(Clone, Default)]
struct SourceSlots(Arc<Mutex<HashMap<IpAddr, usize>>>);

struct Slot {
    slots: SourceSlots,
    ip: IpAddr,
}

impl SourceSlots {
    fn acquire(&self, ip: IpAddr) -> Option<Slot> {
        let mut map = self.0.lock().ok()?;
        let n = map.entry(ip).or_default();
        if *n >= HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.slots.0.lock()
            && let Some(n) = map.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Accepts on `acceptor` and yields connections whose handshake succeeded. Each handshake runs in a
/// task of its own, owned by the returned stream (dropping it aborts them), so one slow or silent peer
/// never holds up another; a peer that sends nothing within a few seconds is closed, and each source
/// address has a bounded number of handshakes in progress.
pub fn incoming(
    acceptor: Acceptor,
    tls: ServerTls,
) -> impl futures::Stream<Item = io::Result<TlsConn>> + Send {
    struct State {
        acceptor: Acceptor,
        tls: ServerTls,
        handshakes: JoinSet<Option<TlsConn>>,
        slots: SourceSlots,
    }
    let state = State {
        acceptor,
        tls,
        handshakes: JoinSet::new(),
        slots: SourceSlots::default(),
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            tokio::select! {
                (tcp, remote) = s.acceptor.accept(), if s.handshakes.len() < MAX_HANDSHAKES => {
                    let Some(slot) = s.slots.acquire(remote.ip()) else {
                        debug!(%remote, "too many TLS handshakes in progress from this address; closing");
                        continue;
                    };
                    let tls = s.tls.clone();
                    s.handshakes.spawn(async move {
                        let conn = handshake(tls, tcp, remote).await;
                        drop(slot);
                        conn
                    });
                }
                Some(done) = s.handshakes.join_next() => {
                    if let Ok(Some(conn)) = done {
                        return Some((Ok(conn), s));
                    }
                }
            }
        }
    })
}

async fn handshake(tls: ServerTls, tcp: TcpStream, remote: SocketAddr) -> Option<TlsConn> {
    let _ = tcp.set_nodelay(true);
    if tokio::time::timeout(FIRST_BYTE_TIMEOUT, tcp.readable())
        .await
        .is_err()
    {
        debug!(%remote, "no ClientHello in time; closing");
        return None;
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, weft_certs::accept(&tls, tcp)).await {
        Ok(Ok((stream, peer))) => Some(TlsConn {
            stream,
            info: TlsConnectInfo {
                remote: Some(remote),
                peer,
            },
        }),
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!(%remote, "TLS handshake timed out");
            None
        }
    }
}

/// A channel to `address` (`https://host:port` or `http://host:port`): over `tls` when given, else
/// plaintext. The server's identity is checked by the config's verifier, not by DNS name.
pub async fn channel(
    address: &str,
    tls: Option<ClientTls>,
) -> Result<Channel, tonic::transport::Error> {
    let Some(tls) = tls else {
        return Endpoint::from_shared(address.to_string())?.connect().await;
    };
    // tonic's own TLS is not compiled in; the connector below does TLS, so the URI stays http.
    let plain = address.replacen("https://", "http://", 1);
    Endpoint::from_shared(plain)?
        .connect_with_connector(tower::service_fn(move |uri: Uri| {
            let tls = tls.clone();
            async move {
                let host = uri.host().unwrap_or("localhost").to_string();
                let port = uri.port_u16().unwrap_or(15012);
                let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
                let _ = tcp.set_nodelay(true);
                let (stream, _) = weft_certs::connect(&tls, &host, tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}
