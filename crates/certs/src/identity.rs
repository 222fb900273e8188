use std::{sync::Arc, time::SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::{
    RootCertStore,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};

use crate::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot generate a key: {0}")]
    Key(String),
    #[error("cannot make a CSR for {id}: {reason}")]
    Csr { id: String, reason: String },
    #[error("invalid certificate chain: {0}")]
    Chain(String),
    #[error("the certificate is for {actual}, not {expected}")]
    WrongIdentity { expected: String, actual: String },
    #[error("invalid trust bundle: {0}")]
    Roots(String),
}

/// A private key made in this process; it is never serialized anywhere but into rustls.
pub struct WorkloadKey(KeyPair);

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkloadKey(..)")
    }
}

impl WorkloadKey {
    pub fn generate() -> Result<Self, IdentityError> {
        KeyPair::generate()
            .map(Self)
            .map_err(|e| IdentityError::Key(e.to_string()))
    }

    /// A CSR asking for `id` as its only URI SAN, as Istio's agent sends it.
    pub fn csr_pem(&self, id: &SpiffeId) -> Result<String, IdentityError> {
        let err = |reason: String| IdentityError::Csr {
            id: id.to_string(),
            reason,
        };
        let mut params = CertificateParams::default();
        let uri = id
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| err(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params
            .serialize_request(&self.0)
            .and_then(|csr| csr.pem())
            .map_err(|e| err(e.to_string()))
    }
}

/// A workload's certificate chain and key, and the trust bundle it verifies peers against.
#[derive(Debug)]
pub struct Identity {
    pub id: SpiffeId,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The trust bundle, as PEM, for `/certs` and for clients that must verify this workload.
    pub roots_pem: String,
    /// The chain and signing key rustls presents; the key is only ever handed to rustls.
    pub(crate) certified: Arc<CertifiedKey>,
    pub(crate) roots: Arc<RootCertStore>,
    /// Chain verification for client certificates against `roots`, built once per identity.
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
}

pub(crate) fn root_store(roots_pem: &str) -> Result<RootCertStore, IdentityError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| IdentityError::Roots(e.to_string()))?)
            .map_err(|e| IdentityError::Roots(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(IdentityError::Roots("no certificate".into()));
    }
    Ok(roots)
}

fn unix(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64)
}

impl Identity {
    /// Checks that `chain_pem`'s leaf is for `id`, then keeps it with the key it was made for.
    pub fn new(
        id: SpiffeId,
        key: &WorkloadKey,
        chain_pem: &[String],
        roots_pem: &str,
    ) -> Result<Self, IdentityError> {
        let mut chain = Vec::new();
        for pem in chain_pem {
            chain.push(
                CertificateDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| IdentityError::Chain(e.to_string()))?,
            );
        }
        let leaf = chain
            .first()
            .ok_or_else(|| IdentityError::Chain("empty".into()))?;
        let actual = crate::peer_spiffe_id(leaf);
        if actual.as_ref() != Some(&id) {
            let actual = actual.map_or_else(|| "(no SPIFFE id)".to_string(), |a| a.to_string());
            return Err(IdentityError::WrongIdentity {
                expected: id.to_string(),
                actual,
            });
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| IdentityError::Chain(e.to_string()))?;
        let serial = parsed.raw_serial_as_string();
        let not_before = unix(parsed.validity().not_before.timestamp());
        let not_after = unix(parsed.validity().not_after.timestamp());
        let roots = Arc::new(root_store(roots_pem)?);
        // The leaf, then intermediates; the root stays out of what we send, as peers hold it.
        let root_count = chain.len().saturating_sub(1).min(1);
        chain.truncate(chain.len() - root_count);
        let provider = crate::provider();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.0.serialize_der()));
        let certified = CertifiedKey::from_der(chain, key_der, &provider)
            .map_err(|e| IdentityError::Chain(e.to_string()))?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| IdentityError::Roots(e.to_string()))?;
        Ok(Self {
            id,
            serial,
            not_before,
            not_after,
            roots_pem: roots_pem.to_string(),
            certified: Arc::new(certified),
            roots,
            client_verifier,
        })
    }
}

/// What an operator reads off a certificate: who it is for, its serial, and when it is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    pub subject: String,
    /// The SPIFFE id in its URI SAN, when it has one.
    pub spiffe_id: Option<SpiffeId>,
    pub serial: String,
    pub is_ca: bool,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Each certificate of a PEM bundle, in order.
pub fn certificate_info(pem: &str) -> Result<Vec<CertificateInfo>, IdentityError> {
    let mut out = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| IdentityError::Chain(format!("not PEM: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| IdentityError::Chain(e.to_string()))?;
        out.push(CertificateInfo {
            subject: parsed.subject().to_string(),
            spiffe_id: crate::peer_spiffe_id(&cert),
            serial: parsed.raw_serial_as_string(),
            is_ca: parsed.is_ca(),
            not_before: unix(parsed.validity().not_before.timestamp()),
            not_after: unix(parsed.validity().not_after.timestamp()),
        });
    }
    if out.is_empty() {
        return Err(IdentityError::Chain("no certificate in the PEM".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_info_reads_each_certificate_of_a_bundle() {
        let now = SystemTime::now();
        let ca = crate::Ca::self_signed("cluster.local", now, crate::DEFAULT_ROOT_TTL).expect("ca");
        let bundle = format!("{}{}", ca.root_pem(), ca.root_pem());
        let info = certificate_info(&bundle).expect("two certificates");
        assert_eq!(info.len(), 2);
        assert!(info[0].is_ca, "{info:?}");
        assert!(
            info[0].not_before <= now && info[0].not_after > now,
            "{info:?}"
        );
        assert!(!info[0].serial.is_empty());
        assert!(certificate_info("not a certificate").is_err());
    }
}
