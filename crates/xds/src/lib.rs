//! weft-xds: the wire APIs between weftd and its proxies.
//!
//! [`pb`] re-exports the generated Envoy protobuf types; [`server`] is the aggregated discovery service
//! (state of the world and delta) that weftd serves, and [`syncz`] what it knows of each proxy's sync; [`client`] is the ADS client weft-proxy runs;
//! [`istio_ca`] is Istio's CA service, generated from its proto; [`tls`] carries gRPC over mTLS. This
//! crate knows the protocols and nothing of Istio's config model.

pub mod client;
mod metrics;
mod node;
pub mod server;
mod snapshot;
pub mod structs;
pub mod syncz;
pub mod tls;

/// Istio's `istio.v1.auth.IstioCertificateService`, wire-compatible with istiod's.
#[allow(clippy::all, clippy::unwrap_used)]
pub mod istio_ca {
    tonic::include_proto!("istio.v1.auth");
}

pub use envoy_types::pb;
pub use metrics::{Nack, XdsMetrics};
pub use node::{NodeInfo, ProxyId, ProxyIdError};
pub use snapshot::{Snapshot, pack};

/// Type URLs of the resources Weft serves, in the order a push sends them: clusters before the endpoints
/// that fill them, listeners before the routes they name, so a proxy never points at what it lacks.
pub mod type_url {
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

    pub const PUSH_ORDER: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

    /// Listeners and clusters are fetched whole when a proxy names none; routes and endpoints only by name.
    pub fn is_wildcard_by_default(type_url: &str) -> bool {
        type_url == CLUSTER || type_url == LISTENER
    }

    /// A short name for logs and metric labels (`Cluster`, `Listener`, ...).
    pub fn short(type_url: &str) -> &str {
        type_url.rsplit('.').next().unwrap_or(type_url)
    }
}
