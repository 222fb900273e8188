//! weft-certs: workload identity for the mesh, and the only crate that touches rustls and rcgen.
//!
//! - [`SpiffeId`], written `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! - [`Ca`]: a self-signed root (ten years by default) or a user's root and intermediate loaded from
//!   Istio's `cacerts` layout; it signs workload CSRs, refusing any identity the caller does not hold.
//! - [`WorkloadKey`]: a key generated in memory that never leaves the workload, and its CSR.
//! - [`Identity`] in an [`IdentityCell`] that rotation swaps, and the rustls configs built on it, whose
//!   verifiers check the chain to the trust bundle and the peer's SPIFFE id; [`accept`] and [`connect`]
//!   run handshakes and report the [`Peer`].
//! - [`BootstrapTokens`]: how a workload proves its service account where no Kubernetes API can.

mod ca;
mod identity;
mod spiffe;
mod stream;
mod token;
mod verify;

use std::time::Duration;

pub use ca::{Ca, CaError, CaPem};
pub use identity::{CertificateInfo, Identity, IdentityError, WorkloadKey, certificate_info};
pub use spiffe::{SpiffeId, SpiffeIdError, peer_spiffe_id};
pub use stream::{
    ClientStream, Peer, ServerStream, accept, check_server_name, connect, is_unverified_peer,
};
pub use token::{BootstrapTokens, TokenKeyError};
pub use verify::{
    ClientAuth, ClientTls, IdentityCell, PeerPolicy, ServerTls, anonymous_client_config,
    client_config, probe_client_config, server_config,
};

/// Istio's default workload certificate lifetime.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Istio's default lifetime for the self-signed root.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The one crypto provider Weft uses.
fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
