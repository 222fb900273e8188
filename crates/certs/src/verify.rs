//! rustls configs whose verifiers check the peer's chain to the mesh's trust bundle and then its SPIFFE
//! id: DNS names mean nothing between workloads, identities do.

use std::sync::Arc;

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{Identity, IdentityError, SpiffeId, peer_spiffe_id};

/// Which client identities a server accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Any workload whose certificate chains to the trust bundle and names this trust domain.
    TrustDomain(String),
    /// Only these identities.
    Only(Vec<SpiffeId>),
}

impl PeerPolicy {
    fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Self::TrustDomain(td) => &id.trust_domain == td,
            Self::Only(ids) => ids.contains(id),
        }
    }
}

fn identity_error(msg: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        IdentityError::Chain(msg),
    ))))
}

/// Verifies a server by chain and SPIFFE id, ignoring the DNS name the client dialled.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
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
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match peer_spiffe_id(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            other => Err(identity_error(format!(
                "server identity {} is not the expected {}",
                other.map_or_else(|| "(none)".into(), |i| i.to_string()),
                self.expected
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a client by chain (webpki), then by SPIFFE id against the policy.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: PeerPolicy,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
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
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server config presenting `identity` and requiring a client certificate the policy allows.
pub fn server_config(
    identity: &Identity,
    policy: PeerPolicy,
    alpn: &[&str],
) -> Result<Arc<ServerConfig>, Error> {
    let provider = crate::provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(
        Arc::new(identity.roots.clone()),
        provider.clone(),
    )
    .build()
    .map_err(|e| Error::General(e.to_string()))?;
    let verifier = Arc::new(SpiffeClientVerifier {
        inner: webpki,
        policy,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client config presenting `identity` and accepting only a server that is `expected`.
pub fn client_config(
    identity: &Identity,
    expected: SpiffeId,
    alpn: &[&str],
) -> Result<Arc<ClientConfig>, Error> {
    let provider = crate::provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: Arc::new(identity.roots.clone()),
        expected,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain.clone(), identity.key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests;
