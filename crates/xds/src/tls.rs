//! gRPC over mTLS for weftd's 15012 and the proxies that call it. The server side hands tonic
//! connections whose handshake is done and records what the peer proved ([`TlsConnectInfo`] in each
//! request's extensions); the client side is a tonic channel that dials through `weft_certs::connect`.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Endpoint, Uri, server::Connected};
use tracing::debug;
use weft_certs::{ClientTls, Peer, ServerStream, ServerTls, SpiffeId};

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

/// Handshakes in progress at once; more connections wait in the listen backlog.
const CONCURRENT_HANDSHAKES: usize = 64;

/// Accepts on `listener` and yields connections whose handshake succeeded. Handshakes run side by
/// side inside the stream (no task of their own), so the server that polls it owns them, and one slow
/// client does not hold up the rest.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
) -> impl futures::Stream<Item = io::Result<TlsConn>> + Send {
    use futures::StreamExt;
    TcpListenerStream::new(listener)
        .filter_map(|accepted| async move {
            accepted
                .inspect_err(|e| debug!(error = %e, "accept failed"))
                .ok()
        })
        .map(move |tcp| handshake(tls.clone(), tcp))
        .buffer_unordered(CONCURRENT_HANDSHAKES)
        .filter_map(|conn| async move { conn.map(Ok) })
}

async fn handshake(tls: ServerTls, tcp: TcpStream) -> Option<TlsConn> {
    let remote = tcp.peer_addr().ok();
    let _ = tcp.set_nodelay(true);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, weft_certs::accept(&tls, tcp)).await {
        Ok(Ok((stream, peer))) => Some(TlsConn {
            stream,
            info: TlsConnectInfo { remote, peer },
        }),
        Ok(Err(e)) => {
            debug!(?remote, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!(?remote, "TLS handshake timed out");
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
