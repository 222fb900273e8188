use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid CA material in {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("invalid CSR: {0}")]
    Csr(String),
    #[error("the CSR asks for {requested}, but the caller is {caller}")]
    WrongIdentity { requested: String, caller: String },
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A CA's material in Istio's `cacerts` layout, as PEM text: the issuing certificate (`ca-cert.pem`), its
/// key (`ca-key.pem`), the root (`root-cert.pem`) and the chain from the issuer up to the root
/// (`cert-chain.pem`).
#[derive(Clone, PartialEq, Eq)]
pub struct CaPem {
    pub cert: String,
    pub key: String,
    pub root: String,
    pub chain: String,
}

impl std::fmt::Debug for CaPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPem").finish_non_exhaustive()
    }
}

/// The mesh CA: it signs workload certificates with its issuing key, which never leaves it.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The issuing certificate and any intermediates above it, up to but not including the root.
    chain_pem: Vec<String>,
    root_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("chain_len", &self.chain_pem.len())
            .finish_non_exhaustive()
    }
}

fn offset(t: SystemTime) -> Result<time::OffsetDateTime, CaError> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| CaError::Sign(e.to_string()))?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).map_err(|e| CaError::Sign(e.to_string()))
}

fn pem_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END ") {
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

impl Ca {
    /// A new self-signed root for `trust_domain`, valid from `now` for `validity`.
    pub fn self_signed(
        trust_domain: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params
            .distinguished_name
            .push(DnType::CommonName, "weft root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset(now)?;
        params.not_after = offset(now + validity)?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            chain_pem: Vec::new(),
            root_pem: cert.pem(),
        })
    }

    /// Loads a user's CA from Istio's `cacerts` layout: `ca-cert.pem` (the issuing certificate),
    /// `ca-key.pem`, `root-cert.pem` and `cert-chain.pem` (the issuing certificate up to the root).
    pub fn from_cacerts(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| CaError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        Self::from_pem(&CaPem {
            cert: read("ca-cert.pem")?,
            key: read("ca-key.pem")?,
            root: read("root-cert.pem")?,
            chain: read("cert-chain.pem")?,
        })
    }

    /// A CA from the four PEM texts of Istio's `cacerts` layout, wherever they were read from (files,
    /// a Secret).
    pub fn from_pem(pem: &CaPem) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(&pem.key).map_err(|e| CaError::Invalid {
            what: "ca-key.pem",
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&pem.cert, key).map_err(|e| CaError::Invalid {
            what: "ca-cert.pem",
            reason: e.to_string(),
        })?;
        let root_pem = pem_blocks(&pem.root)
            .into_iter()
            .next()
            .ok_or(CaError::Invalid {
                what: "root-cert.pem",
                reason: "no certificate".into(),
            })?;
        // The chain file ends with the root, which clients hold already as their trust bundle.
        let chain_pem = pem_blocks(&pem.chain)
            .into_iter()
            .filter(|c| c.trim() != root_pem.trim())
            .collect();
        Ok(Self {
            issuer,
            chain_pem,
            root_pem,
        })
    }

    /// A new self-signed root (see [`Ca::self_signed`]) and its PEM texts, to be kept where the next
    /// start (or another replica) finds them.
    pub fn self_signed_pem(
        trust_domain: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<(Self, CaPem), CaError> {
        let ca = Self::self_signed(trust_domain, now, validity)?;
        // Root and issuer are one certificate here.
        let pem = CaPem {
            cert: ca.root_pem.clone(),
            key: ca.issuer.key().serialize_pem(),
            root: ca.root_pem.clone(),
            chain: ca.root_pem.clone(),
        };
        Ok((ca, pem))
    }

    /// The CA kept in `dir` in Istio's `cacerts` layout: loaded when the files are there (a user's CA, or
    /// one made by an earlier run), else a new self-signed root written there, key readable only by its
    /// owner, so a restart keeps the mesh's trust (as istiod keeps `istio-ca-secret`).
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        if dir.join("ca-key.pem").exists() {
            return Self::from_cacerts(dir);
        }
        let (ca, pem) = Self::self_signed_pem(trust_domain, now, crate::DEFAULT_ROOT_TTL)?;
        let write = |name: &str, text: &str, mode: u32| {
            use std::{io::Write, os::unix::fs::OpenOptionsExt};
            let path = dir.join(name);
            std::fs::create_dir_all(dir)
                .and_then(|()| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(mode)
                        .open(&path)
                })
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(|source| CaError::Read {
                    path: path.display().to_string(),
                    source,
                })
        };
        // The key goes last, so a crash midway leaves a directory that is regenerated rather than
        // one that loads without its key.
        write("ca-cert.pem", &pem.cert, 0o644)?;
        write("root-cert.pem", &pem.root, 0o644)?;
        write("cert-chain.pem", &pem.chain, 0o644)?;
        write("ca-key.pem", &pem.key, 0o600)?;
        Ok(ca)
    }

    /// A certificate for the CA's own process (weftd serving 15012), through the same path as a
    /// workload's: a fresh key, a CSR, a signature.
    pub fn issue(
        &self,
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<crate::Identity, CaError> {
        self.issue_with_dns(id, &[], now, ttl)
    }

    /// As [`Ca::issue`], with DNS names beside the SPIFFE id: the control plane's serving certificate,
    /// which proxies verify by name (`istiod.istio-system.svc`). Workload CSRs never get DNS names, so
    /// no workload certificate can pass for the control plane.
    pub fn issue_with_dns(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        now: SystemTime,
        ttl: Duration,
    ) -> Result<crate::Identity, CaError> {
        let key = crate::WorkloadKey::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let csr = key.csr_pem(id).map_err(|e| CaError::Sign(e.to_string()))?;
        let mut csr = CertificateSigningRequestParams::from_pem(&csr)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        for name in dns_names {
            let dns = name
                .as_str()
                .try_into()
                .map_err(|e| CaError::Sign(format!("DNS name {name:?}: {e}")))?;
            csr.params.subject_alt_names.push(SanType::DnsName(dns));
        }
        let chain = self.sign(csr, now, ttl)?;
        crate::Identity::new(id.clone(), &key, &chain, &self.root_pem)
            .map_err(|e| CaError::Sign(e.to_string()))
    }

    /// The trust bundle workloads verify peers against.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs a workload's CSR for `caller`, the identity the caller proved (a bootstrap token, a
    /// Kubernetes service-account token, a client certificate). The CSR must ask for exactly that
    /// SPIFFE id. Returns Istio's `cert_chain`: the leaf, the intermediates, then the root.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        caller: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let requested: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if requested != [caller.to_string()] {
            return Err(CaError::WrongIdentity {
                requested: requested.join(", "),
                caller: caller.to_string(),
            });
        }
        self.sign(csr, now, ttl)
    }

    /// Signs a CSR whose names are checked. Only its key and SANs are kept: its subject (a `CN`, an
    /// `O=system:masters`) and any extensions it asked for are the requester's words, not the CA's.
    fn sign(
        &self,
        mut csr: CertificateSigningRequestParams,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let params = &mut csr.params;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.custom_extensions.clear();
        params.name_constraints = None;
        params.crl_distribution_points.clear();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // Backdated a little for clock skew between workloads, but never by a large part of a short
        // lifetime, which would pull the renewal time (half the lifetime) towards the issue time.
        params.not_before = offset(now - Duration::from_secs(60).min(ttl / 10))?;
        params.not_after = offset(now + ttl)?;
        params.use_authority_key_identifier_extension = true;
        let leaf = csr
            .signed_by(&self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.chain_pem.iter().cloned());
        chain.push(self.root_pem.clone());
        Ok(chain)
    }
}
