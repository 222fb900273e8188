//! The proxy's identity manager: a key made in memory, a CSR to weftd's CA (Istio's
//! `CreateCertificate`), and renewal at half the certificate's lifetime with jitter. The new
//! certificate replaces the old one in an [`IdentityCell`] only once it is in hand, so handshakes
//! never go without one. Listeners and clusters refer to it by Istio's SDS names: `default` for the
//! certificate and `ROOTCA` for the trust bundle.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use rand::Rng;
use tonic::metadata::MetadataValue;
use tracing::{debug, error, info, warn};
use weft_certs::{Identity, IdentityCell, PeerPolicy, SpiffeId, WorkloadKey};
use weft_drain::DrainWatcher;
use weft_xds::istio_ca::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};

/// SDS secret names, as Istio's agent serves them to Envoy.
pub const SDS_CERTIFICATE: &str = "default";
pub const SDS_ROOT: &str = "ROOTCA";

/// Where and how to get certificates, as plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct IdentityConfig {
    /// `https://host:15012` (Istio's `CA_ADDR`).
    pub ca_address: String,
    /// The trust bundle that verifies weftd (Istio's `istio-ca-root-cert`).
    pub root_cert: PathBuf,
    /// A bootstrap token proving this workload's service account; read at every request, so a
    /// refreshed file is picked up.
    pub token_file: Option<PathBuf>,
    /// The DNS name weftd's 15012 certificate must carry (Istio's `ISTIOD_SAN`).
    pub control_plane: String,
    /// The lifetime asked for (Istio's `SECRET_TTL`).
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityFetchError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Certs(String),
    #[error("cannot reach the CA at {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("the CA refused: {}", .0.message())]
    Refused(tonic::Status),
}

fn read(path: &std::path::Path) -> Result<String, IdentityFetchError> {
    std::fs::read_to_string(path).map_err(|source| IdentityFetchError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// One round trip to the CA: a new key, its CSR, the signed chain. With `current`, the call is made
/// with the current certificate, so renewal works even after the bootstrap token is gone.
pub async fn fetch(
    config: &IdentityConfig,
    id: &SpiffeId,
    current: Option<&IdentityCell>,
) -> Result<Identity, IdentityFetchError> {
    let certs = |e: String| IdentityFetchError::Certs(e);
    let roots = read(&config.root_cert)?;
    let expected = PeerPolicy::DnsName(config.control_plane.clone());
    let tls = match current {
        Some(cell) => {
            weft_certs::client_config(cell, expected, &["h2"]).map_err(|e| certs(e.to_string()))?
        }
        None => weft_certs::anonymous_client_config(&roots, expected, &["h2"])
            .map_err(|e| certs(e.to_string()))?,
    };
    let channel = weft_xds::tls::channel(&config.ca_address, Some(tls))
        .await
        .map_err(|source| IdentityFetchError::Connect {
            address: config.ca_address.clone(),
            source,
        })?;
    let key = WorkloadKey::generate().map_err(|e| certs(e.to_string()))?;
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: key.csr_pem(id).map_err(|e| certs(e.to_string()))?,
        validity_duration: config.ttl.as_secs() as i64,
        metadata: None,
    });
    if let Some(path) = &config.token_file
        && path.exists()
    {
        let token = read(path)?;
        let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|e| certs(format!("token in {}: {e}", path.display())))?;
        request.metadata_mut().insert("authorization", value);
    }
    let chain = IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await
        .map_err(IdentityFetchError::Refused)?
        .into_inner()
        .cert_chain;
    Identity::new(id.clone(), &key, &chain, &roots).map_err(|e| certs(e.to_string()))
}

/// Failed CA calls in a row after which the log says so at error level, with what to check.
const LOUD_AFTER: u32 = 3;

/// Gets the first certificate, retrying with backoff until it comes or the proxy drains. Without it
/// the proxy could serve no mTLS at all, so nothing else starts first.
pub async fn bootstrap(
    config: &IdentityConfig,
    id: &SpiffeId,
    drain: &DrainWatcher,
) -> Option<IdentityCell> {
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        match fetch(config, id, None).await {
            Ok(identity) => {
                info!(identity = %id, serial = %identity.serial, "workload certificate issued");
                return Some(IdentityCell::new(identity));
            }
            Err(e) => {
                failures += 1;
                if failures >= LOUD_AFTER {
                    error!(identity = %id, error = %e, failures, root_cert = %config.root_cert.display(), ca = %config.ca_address,
                        "still no workload certificate, so no traffic: check that weftd is reachable and that the trust bundle file holds its root; retrying");
                } else {
                    warn!(identity = %id, error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot get a workload certificate yet");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = drain.signaled() => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(15));
    }
}

/// When to renew: half way through the lifetime, moved by up to a tenth of it either way, so a fleet
/// started together does not renew together.
pub fn renewal_delay(identity: &Identity, now: SystemTime, jitter: f64) -> Duration {
    let lifetime = identity
        .not_after
        .duration_since(identity.not_before)
        .unwrap_or_default();
    let offset = lifetime.mul_f64(0.5 + 0.1 * jitter.clamp(-1.0, 1.0));
    (identity.not_before + offset)
        .duration_since(now)
        .unwrap_or_default()
}

/// Renews forever: wait for the renewal time, fetch, swap. A failure keeps the current certificate
/// and retries with backoff (never waiting past a tenth of the remaining lifetime).
pub async fn rotate(
    config: IdentityConfig,
    id: SpiffeId,
    cell: IdentityCell,
    renew_now: std::sync::Arc<tokio::sync::Notify>,
    drain: DrainWatcher,
) {
    let mut delay = renewal_delay(
        &cell.current(),
        SystemTime::now(),
        rand::rng().random_range(-1.0..1.0),
    );
    let mut backoff = Duration::from_millis(200);
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = renew_now.notified() => info!(identity = %id, "renewing early: the control plane could not be verified"),
            () = drain.signaled() => return,
        }
        // The current certificate proves who is asking; if weftd can no longer be verified with
        // the bundle that certificate came with (its CA changed), the bundle file and token, which
        // whoever runs the proxy keeps current, are tried too.
        let fetched = match fetch(&config, &id, Some(&cell)).await {
            Ok(identity) => Ok(identity),
            Err(with_current) => {
                debug!(identity = %id, error = %with_current, "renewal with the current certificate failed; trying the bundle file and token");
                fetch(&config, &id, None).await
            }
        };
        match fetched {
            Ok(identity) => {
                info!(identity = %id, serial = %identity.serial, previous = %cell.current().serial, "workload certificate rotated");
                delay = renewal_delay(
                    &identity,
                    SystemTime::now(),
                    rand::rng().random_range(-1.0..1.0),
                );
                cell.replace(identity);
                backoff = Duration::from_millis(200);
                failures = 0;
            }
            Err(e) => {
                let remaining = cell
                    .current()
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                delay = backoff.min(remaining / 10).max(Duration::from_millis(50));
                backoff = (backoff * 2).min(Duration::from_secs(30));
                failures += 1;
                if failures >= LOUD_AFTER {
                    error!(identity = %id, error = %e, failures, root_cert = %config.root_cert.display(), ca = %config.ca_address,
                        "cannot renew the workload certificate; serving on the current one until it expires. If weftd cannot be verified, its CA changed: put its root in the trust bundle file; retrying");
                } else {
                    warn!(identity = %id, error = %e, "cannot renew the workload certificate; serving on the current one");
                }
            }
        }
    }
}

/// `/certs`: identity, serial, validity and trust bundle; never a key.
pub fn certs_json(cell: Option<&IdentityCell>) -> serde_json::Value {
    let Some(cell) = cell else {
        return serde_json::json!({"certificates": [], "note": "no certificate: CA_ADDR is not set, or the first one is still on its way"});
    };
    let id = cell.current();
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    serde_json::json!({
        "certificates": [{
            "name": SDS_CERTIFICATE,
            "identity": id.id.to_string(),
            "serial_number": id.serial,
            "valid_from_unix": secs(id.not_before),
            "expiration_unix": secs(id.not_after),
            "seconds_until_expiration": id.not_after.duration_since(SystemTime::now()).map_or(0, |d| d.as_secs()),
        }],
        "trust_bundle": {"name": SDS_ROOT, "pem": id.roots_pem},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_half_the_lifetime_give_or_take_a_tenth() {
        let now = SystemTime::now();
        let ca = weft_certs::Ca::self_signed("cluster.local", now, weft_certs::DEFAULT_ROOT_TTL)
            .expect("ca");
        let id = SpiffeId::new("cluster.local", "demo", "web");
        let ttl = Duration::from_secs(1000);
        let identity = ca.issue(&id, now, ttl).expect("issued");
        let lifetime = identity
            .not_after
            .duration_since(identity.not_before)
            .expect("valid");
        let from_issue = |jitter| {
            let at = identity.not_before + renewal_delay(&identity, identity.not_before, jitter);
            at.duration_since(identity.not_before).expect("after")
        };
        assert_eq!(from_issue(0.0), lifetime / 2);
        assert_eq!(from_issue(-1.0), lifetime.mul_f64(0.4));
        assert_eq!(from_issue(1.0), lifetime.mul_f64(0.6));
        assert_eq!(from_issue(7.0), lifetime.mul_f64(0.6), "jitter is clamped");
        let later = identity.not_after + Duration::from_secs(1);
        assert_eq!(
            renewal_delay(&identity, later, 0.0),
            Duration::ZERO,
            "overdue: now"
        );
        assert!(
            certs_json(None)["certificates"]
                .as_array()
                .is_some_and(Vec::is_empty)
        );
    }
}
