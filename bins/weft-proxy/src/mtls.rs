//! mTLS on the data path: rustls configs for the TLS settings xDS names, built once per distinct
//! setting on top of the identity cell (so rotation needs no rebuild), and the upstream connector
//! that wraps a connection in TLS when the endpoint's cluster says so.

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{Mutex, OnceLock},
    task::{Context, Poll},
};

use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use weft_certs::{
    ClientAuth, ClientStream, ClientTls, IdentityCell, PeerPolicy, ServerTls, SpiffeId,
};

use crate::model::{DownstreamTls, UpstreamTls};

/// What an HTTP connection over mTLS tells the server it carries, as Istio's `istio.alpn` filter
/// does, so the server's chains can tell HTTP from opaque TCP before decrypting.
pub const ALPN_HTTP11: &str = "istio-http/1.1";
pub const ALPN_H2: &str = "istio-h2";

/// The proxy's TLS configs, keyed by the xDS settings they implement.
#[derive(Default)]
pub struct TlsConfigs {
    /// Set once the first certificate is in; rotation then swaps what the cell holds.
    cell: OnceLock<IdentityCell>,
    servers: Mutex<HashMap<DownstreamTls, ServerTls>>,
    clients: Mutex<HashMap<(UpstreamTls, Option<&'static str>), ClientTls>>,
}

impl TlsConfigs {
    pub fn set_identity(&self, cell: IdentityCell) {
        // Set once, at start; a second call would mean two bootstraps, which app::run never does.
        let _ = self.cell.set(cell);
    }

    pub fn identity(&self) -> Option<&IdentityCell> {
        self.cell.get()
    }

    fn trust_domain(&self) -> Option<String> {
        Some(self.cell.get()?.current().id.trust_domain.clone())
    }

    /// A server config for a chain's `DownstreamTlsContext`; `None` without an identity.
    pub fn server(&self, tls: &DownstreamTls) -> io::Result<ServerTls> {
        let cell = self.cell.get().ok_or_else(no_identity)?;
        let mut servers = self
            .servers
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        if let Some(c) = servers.get(tls) {
            return Ok(c.clone());
        }
        let alpn: Vec<&str> = tls.alpn.iter().map(String::as_str).collect();
        let auth = if tls.require_client_certificate {
            ClientAuth::Required
        } else {
            ClientAuth::Optional
        };
        let policy = PeerPolicy::TrustDomain(self.trust_domain().unwrap_or_default());
        let config =
            weft_certs::server_config(cell, policy, auth, &alpn).map_err(io::Error::other)?;
        servers.insert(tls.clone(), config.clone());
        Ok(config)
    }

    /// A client config for a cluster's `UpstreamTlsContext`, with `http` put first in ALPN when the
    /// connection carries HTTP.
    pub fn client(&self, tls: &UpstreamTls, http: Option<&'static str>) -> io::Result<ClientTls> {
        let cell = self.cell.get().ok_or_else(no_identity)?;
        let key = (tls.clone(), http);
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let mut alpn: Vec<&str> = http.into_iter().collect();
        alpn.extend(tls.alpn.iter().map(String::as_str));
        let policy = if tls.peers.is_empty() {
            PeerPolicy::TrustDomain(self.trust_domain().unwrap_or_default())
        } else {
            PeerPolicy::Only(
                tls.peers
                    .iter()
                    .map(|p| p.parse::<SpiffeId>())
                    .collect::<Result<_, _>>()
                    .map_err(io::Error::other)?,
            )
        };
        let config = weft_certs::client_config(cell, policy, &alpn).map_err(io::Error::other)?;
        clients.insert(key, config.clone());
        Ok(config)
    }
}

impl TlsConfigs {
    /// Drops the configs no listener or cluster uses any more: their keys are whatever xDS sent, so
    /// the caches would otherwise grow with every peer list a config ever named.
    pub fn retain(
        &self,
        server_used: impl Fn(&DownstreamTls) -> bool,
        client_used: impl Fn(&UpstreamTls) -> bool,
    ) {
        if let Ok(mut servers) = self.servers.lock() {
            servers.retain(|k, _| server_used(k));
        }
        if let Ok(mut clients) = self.clients.lock() {
            clients.retain(|(k, _), _| client_used(k));
        }
    }

    #[cfg(test)]
    pub(crate) fn cached(&self) -> (usize, usize) {
        let servers = self.servers.lock().map_or(0, |m| m.len());
        let clients = self.clients.lock().map_or(0, |m| m.len());
        (servers, clients)
    }
}

fn no_identity() -> io::Error {
    io::Error::other("mTLS is configured but this proxy has no identity (set CA_ADDR)")
}

/// An upstream connection, plaintext or mTLS.
pub enum Upstream {
    Plain(TcpStream),
    Tls(Box<ClientStream<TcpStream>>),
}

impl Upstream {
    /// Wraps `tcp` in TLS when `tls` is set.
    pub async fn over(
        tcp: TcpStream,
        tls: Option<(&ClientTls, &str)>,
    ) -> io::Result<(Self, Option<SpiffeId>)> {
        match tls {
            None => Ok((Self::Plain(tcp), None)),
            Some((config, sni)) => {
                let (stream, peer) = weft_certs::connect(config, sni, tcp).await?;
                Ok((Self::Tls(Box::new(stream)), peer.id))
            }
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// The HTTP client's connector: `http://` URIs are plaintext, `https://` ones mTLS with the cluster's
/// settings. The pool keys on scheme and address, so the two never share a connection.
#[derive(Clone)]
pub struct MeshConnector {
    pub http: HttpConnector,
    /// The cluster's client config and SNI for endpoints that take mTLS.
    pub tls: Option<(ClientTls, String)>,
}

impl tower::Service<http::Uri> for MeshConnector {
    type Response = TokioIo<Upstream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let secure = uri.scheme_str() == Some("https");
        let tls = self.tls.clone();
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let tls = match (secure, &tls) {
                (false, _) => None,
                (true, Some((config, sni))) => Some((config, sni.as_str())),
                (true, None) => return Err("an https endpoint in a cluster without TLS".into()),
            };
            let (stream, _) = Upstream::over(tcp, tls).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn configs_no_cluster_uses_are_dropped() {
        let ca = weft_certs::Ca::self_signed(
            "cluster.local",
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .expect("ca");
        let me = SpiffeId::new("cluster.local", "demo", "web");
        let configs = TlsConfigs::default();
        configs.set_identity(IdentityCell::new(
            ca.issue(&me, SystemTime::now(), Duration::from_secs(3600))
                .expect("issued"),
        ));
        let upstream = |i: usize| UpstreamTls {
            sni: format!("outbound_.80_._.svc-{i}"),
            alpn: vec!["istio".into()],
            peers: vec![format!("spiffe://cluster.local/ns/demo/sa/peer-{i}")],
        };
        for i in 0..50 {
            configs
                .client(&upstream(i), Some(ALPN_HTTP11))
                .expect("client config");
        }
        assert_eq!(configs.cached(), (0, 50));
        let kept = upstream(7);
        configs.retain(|_| false, |u| *u == kept);
        assert_eq!(configs.cached(), (0, 1));
    }
}
