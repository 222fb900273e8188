//! The CA service on 15012: Istio's `CreateCertificate`, signing a workload's CSR for the identity the
//! caller proved, either with a bearer token (`authorization: Bearer <token>`: a bootstrap token, or on
//! Kubernetes a service-account token the API server reviews) or with the
//! certificate it already holds (renewal). Also writes what a workload needs to start: the trust bundle
//! and one bootstrap token per service account.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use weft_certs::{BootstrapTokens, Ca, CaError, SpiffeId};
use weft_xds::istio_ca::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_server::IstioCertificateService,
};

use crate::Model;

/// Istio's bounds on a requested lifetime: the default when none is asked for, and the most granted
/// (`DEFAULT_WORKLOAD_CERT_TTL`, `MAX_WORKLOAD_CERT_TTL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    pub default: Duration,
    pub max: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            default: weft_certs::DEFAULT_WORKLOAD_TTL,
            max: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

impl Lifetimes {
    fn grant(&self, requested_secs: i64) -> Duration {
        if requested_secs <= 0 {
            return self.default;
        }
        Duration::from_secs(requested_secs as u64).min(self.max)
    }
}

pub struct CaService {
    pub ca: Arc<Ca>,
    pub authority: TokenAuthority,
    pub trust_domain: String,
    pub lifetimes: Lifetimes,
    pub metrics: CaMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `unauthenticated`, `permission_denied`, `invalid_csr` or `internal`.
    pub reason: String,
}

/// What the CA did, on weftd's `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct CaMetrics {
    pub issued: Counter,
    pub refused: Family<RefusedLabels, Counter>,
}

impl CaMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "weft_ca_certificates_issued",
            "Workload certificates signed",
            m.issued.clone(),
        );
        registry.register(
            "weft_ca_requests_refused",
            "Certificate requests refused, by reason",
            m.refused.clone(),
        );
        m
    }

    fn refuse(&self, status: Status) -> Status {
        let reason = match status.code() {
            tonic::Code::Unauthenticated => "unauthenticated",
            tonic::Code::PermissionDenied => "permission_denied",
            tonic::Code::InvalidArgument => "invalid_csr",
            _ => "internal",
        };
        self.refused
            .get_or_create(&RefusedLabels {
                reason: reason.into(),
            })
            .inc();
        status
    }
}

/// Who vouches for a bearer token: weftd itself (bootstrap tokens, for the directory source) or the
/// Kubernetes API server (a service-account token for audience `istio-ca`, checked by TokenReview).
#[derive(Clone, Debug)]
pub enum TokenAuthority {
    Bootstrap(Arc<BootstrapTokens>),
    Kubernetes(Box<crate::kubernetes::token_review::Reviewer>),
}

impl TokenAuthority {
    async fn verify(&self, token: &str, trust_domain: &str) -> Result<SpiffeId, Status> {
        match self {
            Self::Bootstrap(tokens) => verify_bootstrap(tokens, trust_domain, token),
            Self::Kubernetes(reviewer) => {
                use crate::kubernetes::token_review::Refusal;
                match reviewer.review(token).await {
                    Ok((ns, sa)) => Ok(SpiffeId::new(trust_domain, &ns, &sa)),
                    Err(e @ Refusal::Unauthenticated(_)) => {
                        Err(Status::unauthenticated(e.to_string()))
                    }
                    Err(e @ Refusal::Unavailable(_)) => Err(Status::unavailable(e.to_string())),
                }
            }
        }
    }
}

fn verify_bootstrap(
    tokens: &BootstrapTokens,
    trust_domain: &str,
    token: &str,
) -> Result<SpiffeId, Status> {
    match tokens.verify(token) {
        Some(id) if id.trust_domain == trust_domain => Ok(id),
        Some(id) => Err(Status::permission_denied(format!(
            "the token is for {id}, outside trust domain {trust_domain}"
        ))),
        None => Err(Status::unauthenticated(
            "the bootstrap token is not one this weftd issued (tokens change when weftd restarts; read the file again)",
        )),
    }
}

/// Who the caller is: the identity its bearer token proves wins (it is how a workload gets its first
/// certificate), else the SPIFFE id of its client certificate.
fn authenticate(
    bearer: Option<Result<SpiffeId, Status>>,
    certificate: Option<SpiffeId>,
) -> Result<SpiffeId, Status> {
    if let Some(proved) = bearer {
        return proved;
    }
    certificate.ok_or_else(|| {
        Status::unauthenticated(
            "no bearer token (authorization: Bearer) and no client certificate: the CA cannot tell who is asking",
        )
    })
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let certificate = weft_xds::tls::caller_identity(&request).ok().flatten();
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let proved = match &bearer {
            Some(token) => Some(self.authority.verify(token, &self.trust_domain).await),
            None => None,
        };
        let caller = authenticate(proved, certificate).map_err(|s| self.metrics.refuse(s))?;
        // A Pod may name any service account in its manifest; the control plane's is never a
        // workload's, or that workload could serve xDS and the CA to every proxy.
        if caller == crate::app::control_plane_identity(&self.trust_domain) {
            warn!(caller = %caller, "CSR refused: the control plane's identity is not issued to workloads");
            return Err(self.metrics.refuse(Status::permission_denied(format!(
                "{caller} is the control plane's identity and is not issued to workloads"
            ))));
        }
        let req = request.into_inner();
        let ttl = self.lifetimes.grant(req.validity_duration);
        match self.ca.sign_csr(&req.csr, &caller, SystemTime::now(), ttl) {
            Ok(cert_chain) => {
                info!(identity = %caller, ttl_secs = ttl.as_secs(), "certificate issued");
                self.metrics.issued.inc();
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(e @ CaError::WrongIdentity { .. }) => {
                warn!(caller = %caller, error = %e, "CSR refused");
                Err(self
                    .metrics
                    .refuse(Status::permission_denied(e.to_string())))
            }
            Err(e @ CaError::Csr(_)) => {
                Err(self.metrics.refuse(Status::invalid_argument(e.to_string())))
            }
            Err(e) => Err(self.metrics.refuse(Status::internal(e.to_string()))),
        }
    }
}

/// Where weftd writes what workloads need to join the mesh without a Kubernetes API:
/// `root-cert.pem` (the trust bundle, Istio's `istio-ca-root-cert`) and
/// `<namespace>/<service-account>/istio-token` (a bootstrap token, readable by its owner only).
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    pub dir: PathBuf,
    pub tokens: Arc<BootstrapTokens>,
    pub trust_domain: String,
    pub root_pem: String,
}

impl IdentityFiles {
    pub fn token_path(dir: &Path, namespace: &str, service_account: &str) -> PathBuf {
        dir.join(namespace)
            .join(service_account)
            .join("istio-token")
    }

    /// Writes the bundle and a token for every service account the model's workloads run as. Each
    /// write stands alone: one that fails is logged with its service account, and the rest go on.
    pub fn write(&self, model: &Model) {
        let bundle = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(self.dir.join("root-cert.pem"), &self.root_pem));
        if let Err(e) = bundle {
            warn!(dir = %self.dir.display(), error = %e, "cannot write the trust bundle");
        }
        for (ns, sa) in &model.service_accounts {
            if let Err(e) = self.write_token(ns, sa) {
                warn!(dir = %self.dir.display(), namespace = %ns, service_account = %sa, error = %e, "cannot write a bootstrap token");
            }
        }
    }

    fn write_token(&self, ns: &str, sa: &str) -> std::io::Result<()> {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        // The loader already refuses such names; a path component is checked where it is made.
        weft_api::names::check_label(ns)
            .and_then(|()| weft_api::names::check_subdomain(sa))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let id = SpiffeId::new(&self.trust_domain, ns, sa);
        if id == crate::app::control_plane_identity(&self.trust_domain) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the control plane's identity gets no bootstrap token",
            ));
        }
        let path = Self::token_path(&self.dir, ns, sa);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let token = self.tokens.issue(&id);
        // Write then rename, so a proxy never reads half a token.
        let tmp = path.with_extension("tmp");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?
            .write_all(token.as_bytes())?;
        std::fs::rename(&tmp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_prove_identity_with_a_token_or_a_certificate() {
        let tokens = BootstrapTokens::generate().expect("key");
        let web = SpiffeId::new("cluster.local", "demo", "web");
        let foreign = SpiffeId::new("other.domain", "demo", "web");
        type Case<'a> = (
            &'a str,
            Option<String>,
            Option<SpiffeId>,
            Result<&'a SpiffeId, tonic::Code>,
        );
        let cases: [Case<'_>; 5] = [
            ("token", Some(tokens.issue(&web)), None, Ok(&web)),
            ("certificate", None, Some(web.clone()), Ok(&web)),
            ("nothing", None, None, Err(tonic::Code::Unauthenticated)),
            (
                "forged token",
                Some("weft-bootstrap-v1.00.00".into()),
                Some(web.clone()),
                Err(tonic::Code::Unauthenticated),
            ),
            (
                "token for another trust domain",
                Some(tokens.issue(&foreign)),
                None,
                Err(tonic::Code::PermissionDenied),
            ),
        ];
        for (name, bearer, cert, want) in cases {
            let proved = bearer.map(|t| verify_bootstrap(&tokens, "cluster.local", &t));
            let got = authenticate(proved, cert);
            match (got, want) {
                (Ok(id), Ok(w)) => assert_eq!(&id, w, "{name}"),
                (Err(s), Err(code)) => assert_eq!(s.code(), code, "{name}: {}", s.message()),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn lifetimes_default_and_cap_as_istio_does() {
        let l = Lifetimes::default();
        assert_eq!(l.grant(0), weft_certs::DEFAULT_WORKLOAD_TTL);
        assert_eq!(l.grant(3600), Duration::from_secs(3600));
        assert_eq!(l.grant(i64::MAX), l.max);
    }

    #[test]
    fn each_token_write_stands_alone_and_none_leaves_the_directory() {
        let dir = std::env::temp_dir().join(format!("weftd-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = IdentityFiles {
            dir: dir.join("identity"),
            tokens: Arc::new(BootstrapTokens::generate().expect("key")),
            trust_domain: "cluster.local".into(),
            root_pem: "bundle".into(),
        };
        let mut model = Model::build(&Default::default(), Default::default());
        // Sorted first, so a failure that stopped the loop would leave `web` unwritten.
        model.service_accounts = [
            ("demo", "../../escape".to_string()),
            ("demo", "a".repeat(300)),
            ("demo", "web".to_string()),
        ]
        .into_iter()
        .map(|(ns, sa)| (ns.to_string(), sa))
        .collect();
        files.write(&model);
        let web = IdentityFiles::token_path(&files.dir, "demo", "web");
        let written = std::fs::read_to_string(&web);
        let escaped = dir.join("escape").exists() || files.dir.join("escape").exists();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            written.is_ok_and(|t| !t.is_empty()),
            "web's token is written"
        );
        assert!(!escaped, "no token outside the identity directory");
    }

    #[tokio::test]
    async fn the_control_plane_identity_is_never_issued_to_a_workload() {
        let tokens = Arc::new(BootstrapTokens::generate().expect("key"));
        let istiod = crate::app::control_plane_identity("cluster.local");
        let service = CaService {
            ca: Arc::new(
                Ca::self_signed(
                    "cluster.local",
                    SystemTime::now(),
                    Duration::from_secs(3600),
                )
                .expect("ca"),
            ),
            authority: TokenAuthority::Bootstrap(tokens.clone()),
            trust_domain: "cluster.local".into(),
            lifetimes: Lifetimes::default(),
            metrics: CaMetrics::new(&mut Registry::default()),
        };
        let key = weft_certs::WorkloadKey::generate().expect("key");
        let mut request = Request::new(IstioCertificateRequest {
            csr: key.csr_pem(&istiod).expect("csr"),
            validity_duration: 3600,
            metadata: None,
        });
        let bearer = format!("Bearer {}", tokens.issue(&istiod));
        request
            .metadata_mut()
            .insert("authorization", bearer.parse().expect("header"));
        let refused = service
            .create_certificate(request)
            .await
            .expect_err("a workload claiming istiod");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

        // Nor does a Pod that names istiod's service account get a token to ask with.
        let dir = std::env::temp_dir().join(format!("weftd-istiod-{}", std::process::id()));
        let files = IdentityFiles {
            dir: dir.clone(),
            tokens,
            trust_domain: "cluster.local".into(),
            root_pem: "bundle".into(),
        };
        let mut model = Model::build(&Default::default(), Default::default());
        model.service_accounts = [("istio-system".to_string(), "istiod".to_string())].into();
        files.write(&model);
        let written = IdentityFiles::token_path(&dir, "istio-system", "istiod").exists();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!written);
    }
}
