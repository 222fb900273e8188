//! TLS over any byte stream, reporting who the peer proved to be, so callers never handle rustls types.

use std::io;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{ClientTls, ServerTls, SpiffeId, peer_spiffe_id};

pub type ServerStream<IO> = tokio_rustls::server::TlsStream<IO>;
pub type ClientStream<IO> = tokio_rustls::client::TlsStream<IO>;

/// What the handshake established about the other side.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The SPIFFE id in the peer's verified certificate; `None` when it sent none.
    pub id: Option<SpiffeId>,
    /// The serial of the peer's certificate, in hex, as `/certs` shows serials.
    pub serial: Option<String>,
    /// The negotiated application protocol.
    pub alpn: Option<String>,
    /// SHA-256 of the peer's certificate (DER), in lowercase hex: the `Hash` of Envoy's
    /// `x-forwarded-client-cert`.
    pub cert_hash: Option<String>,
}

fn peer(conn: &rustls::CommonState) -> Peer {
    let leaf = conn.peer_certificates().and_then(|c| c.first());
    Peer {
        id: leaf.and_then(peer_spiffe_id),
        serial: leaf.and_then(|c| {
            x509_parser::parse_x509_certificate(c.as_ref())
                .ok()
                .map(|(_, p)| p.raw_serial_as_string())
        }),
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        cert_hash: leaf.map(|c| {
            ring::digest::digest(&ring::digest::SHA256, c.as_ref())
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        }),
    }
}

/// Whether an error (anywhere in its chain) is a TLS peer whose certificate this side could not verify:
/// another CA's, expired, or not the identity expected. A client seeing this should say so loudly and
/// refresh its trust bundle rather than only retry.
pub fn is_unverified_peer(err: &(dyn std::error::Error + 'static)) -> bool {
    let unverified = |e: &(dyn std::error::Error + 'static)| {
        matches!(
            e.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidCertificate(_))
        )
    };
    let mut next = Some(err);
    while let Some(e) = next {
        if unverified(e) {
            return true;
        }
        // io::Error hides what it wraps from `source()`.
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref())
            && unverified(inner)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether `sni` can be sent as a TLS server name, so a config that names one that cannot is refused
/// when it arrives rather than failing every connection later.
pub fn check_server_name(sni: &str) -> Result<(), String> {
    ServerName::try_from(sni.to_string())
        .map(|_| ())
        .map_err(|e| format!("SNI {sni:?} is not a valid TLS server name: {e}"))
}

/// Completes a server handshake on `io`.
pub async fn accept<IO>(config: &ServerTls, io: IO) -> io::Result<(ServerStream<IO>, Peer)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let stream = tokio_rustls::TlsAcceptor::from(config.clone())
        .accept(io)
        .await?;
    let peer = peer(stream.get_ref().1);
    Ok((stream, peer))
}

/// Completes a client handshake on `io`, sending `sni` (Istio's `outbound_.<port>_.<subset>_.<host>`
/// between sidecars; the server's identity is checked by SPIFFE id, not by this name).
pub async fn connect<IO>(
    config: &ClientTls,
    sni: &str,
    io: IO,
) -> io::Result<(ClientStream<IO>, Peer)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(sni.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("SNI {sni:?}: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, io)
        .await?;
    let peer = peer(stream.get_ref().1);
    Ok((stream, peer))
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_names_are_checked_before_use() {
        assert_eq!(
            super::check_server_name("outbound_.9080_._.reviews.demo.svc.cluster.local"),
            Ok(())
        );
        for bad in [
            "outbound_.80_._.10.1.2.3",
            "",
            "a b",
            "outbound_.80_._.[::1]",
        ] {
            assert!(super::check_server_name(bad).is_err(), "{bad}");
        }
    }
}
