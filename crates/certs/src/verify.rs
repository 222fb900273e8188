//! rustls configs whose verifiers check the peer's chain to the mesh's trust bundle and then its SPIFFE
//! id: DNS names mean nothing between workloads, identities do.
//!
//! Configs read the workload's certificate from an [`IdentityCell`] at each handshake, so one config
//! serves across rotations: connections in flight keep the certificate they started with, new ones get
//! the new certificate as soon as it is in the cell.

use std::sync::{Arc, RwLock};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    server::{
        ClientHello, ParsedCertificate, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{Identity, IdentityError, SpiffeId, peer_spiffe_id};

/// Which peer identities are accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Any workload whose certificate chains to the trust bundle and names this trust domain.
    TrustDomain(String),
    /// Only these identities.
    Only(Vec<SpiffeId>),
    /// A server whose certificate carries this DNS name, as Istio's agents check istiod
    /// (`istiod.istio-system.svc`). The mesh CA puts DNS names only in the control plane's own
    /// certificate, so a workload's cannot pass. Never matches a client.
    DnsName(String),
}

impl PeerPolicy {
    fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Self::TrustDomain(td) => &id.trust_domain == td,
            Self::Only(ids) => ids.contains(id),
            Self::DnsName(_) => false,
        }
    }
}

/// Whether a server asks clients for a certificate and refuses those without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    /// Asked for and verified when sent; a client without one still connects (weftd's 15012, where a
    /// proxy asks for its first certificate before it has one).
    Optional,
}

/// A workload's current identity, replaced whole when its certificate is rotated.
#[derive(Clone, Debug)]
pub struct IdentityCell(Arc<RwLock<Arc<Identity>>>);

impl IdentityCell {
    pub fn new(identity: Identity) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(identity))))
    }

    pub fn current(&self) -> Arc<Identity> {
        match self.0.read() {
            Ok(guard) => guard.clone(),
            // A writer panicked mid-swap; the value is an Arc that was fully written either way.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// New handshakes use `identity` from now on; connections already made keep theirs.
    pub fn replace(&self, identity: Identity) {
        let next = Arc::new(identity);
        match self.0.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }
}

pub type ServerTls = Arc<ServerConfig>;
pub type ClientTls = Arc<ClientConfig>;

fn identity_error(msg: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        IdentityError::Chain(msg),
    ))))
}

#[derive(Debug)]
enum Trust {
    Cell(IdentityCell),
    Fixed(Arc<RootCertStore>),
}

impl Trust {
    fn roots(&self) -> Arc<RootCertStore> {
        match self {
            Self::Cell(cell) => cell.current().roots.clone(),
            Self::Fixed(roots) => roots.clone(),
        }
    }
}

#[derive(Clone, Copy)]
enum Tls {
    V12,
    V13,
}

/// Handshake signatures are checked the same way on both sides, with the one crypto provider.
fn verify_signature(
    provider: &CryptoProvider,
    version: Tls,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    let algorithms = &provider.signature_verification_algorithms;
    match version {
        Tls::V12 => rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms),
        Tls::V13 => rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms),
    }
}

/// Verifies a server by chain and SPIFFE id, ignoring the DNS name the client dialled.
#[derive(Debug)]
struct SpiffeServerVerifier {
    trust: Trust,
    expected: PeerPolicy,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.trust.roots(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if let PeerPolicy::DnsName(name) = &self.expected {
            let server = ServerName::try_from(name.as_str())
                .map_err(|e| identity_error(format!("{name:?} is not a DNS name: {e}")))?;
            return rustls::client::verify_server_name(&cert, &server)
                .map(|()| ServerCertVerified::assertion())
                .map_err(|_| {
                    identity_error(format!("the server's certificate is not for {name}"))
                });
        }
        match peer_spiffe_id(end_entity) {
            Some(id) if self.expected.allows(&id) => Ok(ServerCertVerified::assertion()),
            other => Err(identity_error(format!(
                "server identity {} is not the expected {}",
                other.map_or_else(|| "(none)".into(), |i| i.to_string()),
                describe(&self.expected)
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_signature(&self.provider, Tls::V12, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_signature(&self.provider, Tls::V13, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn describe(policy: &PeerPolicy) -> String {
    match policy {
        PeerPolicy::TrustDomain(td) => format!("(any identity in trust domain {td})"),
        PeerPolicy::Only(ids) => ids
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" or "),
        PeerPolicy::DnsName(name) => format!("(a server named {name})"),
    }
}

/// Verifies a client by chain (webpki, against the current trust bundle), then by SPIFFE id.
#[derive(Debug)]
struct SpiffeClientVerifier {
    cell: IdentityCell,
    policy: PeerPolicy,
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional, and the bundle may change under us; clients have one certificate anyway.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.cell
            .current()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        match peer_spiffe_id(end_entity) {
            Some(id) if self.policy.allows(&id) => Ok(ClientCertVerified::assertion()),
            other => Err(identity_error(format!(
                "client identity {} is not allowed",
                other.map_or_else(|| "(none)".into(), |i| i.to_string())
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_signature(&self.provider, Tls::V12, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_signature(&self.provider, Tls::V13, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Presents whatever certificate the cell holds when the handshake starts.
#[derive(Debug)]
struct CellResolver(IdentityCell);

impl ResolvesServerCert for CellResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

impl ResolvesClientCert for CellResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn alpn_list(alpn: &[&str]) -> Vec<Vec<u8>> {
    alpn.iter().map(|p| p.as_bytes().to_vec()).collect()
}

/// A server config presenting the cell's identity and verifying clients against `policy`.
pub fn server_config(
    cell: &IdentityCell,
    policy: PeerPolicy,
    client_auth: ClientAuth,
    alpn: &[&str],
) -> Result<ServerTls, Error> {
    let provider = crate::provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        cell: cell.clone(),
        policy,
        mandatory: client_auth == ClientAuth::Required,
        provider: provider.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CellResolver(cell.clone())));
    config.alpn_protocols = alpn_list(alpn);
    Ok(Arc::new(config))
}

/// A client config presenting the cell's identity and accepting only a server `expected` allows.
pub fn client_config(
    cell: &IdentityCell,
    expected: PeerPolicy,
    alpn: &[&str],
) -> Result<ClientTls, Error> {
    let provider = crate::provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        trust: Trust::Cell(cell.clone()),
        expected,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CellResolver(cell.clone())));
    // A resumed session carries the identity of the first handshake; after a rotation every new
    // connection must prove the current certificate.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = alpn_list(alpn);
    Ok(Arc::new(config))
}

/// A client config with no certificate of its own, for a workload's first call to the CA: it trusts
/// `roots_pem` and accepts only a server `expected` allows.
pub fn anonymous_client_config(
    roots_pem: &str,
    expected: PeerPolicy,
    alpn: &[&str],
) -> Result<ClientTls, IdentityError> {
    let provider = crate::provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        trust: Trust::Fixed(Arc::new(crate::identity::root_store(roots_pem)?)),
        expected,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| IdentityError::Roots(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = alpn_list(alpn);
    Ok(Arc::new(config))
}

/// The client config for an app's HTTPS health probe sent on the kubelet's behalf. The kubelet does
/// not verify an HTTPS probe's certificate (the app's is often self-signed for its own port), so a
/// probe the proxy sends for it must not either: this config checks the handshake's signatures and
/// nothing about who signed the certificate. It never carries the workload's certificate.
pub fn probe_client_config() -> Result<ClientTls, IdentityError> {
    let provider = crate::provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| IdentityError::Roots(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ProbeServerVerifier { provider }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct ProbeServerVerifier {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ProbeServerVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_signature(&self.provider, Tls::V12, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_signature(&self.provider, Tls::V13, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests;
