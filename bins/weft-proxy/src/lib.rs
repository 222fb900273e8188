//! weft-proxy: Weft's sidecar. It takes its listeners, routes, clusters and endpoints from weftd over ADS
//! and carries the workload's HTTP/1.1, HTTP/2, gRPC, WebSocket and TCP traffic.
//!
//! The data path reads one immutable [`state::ProxyState`] that the xDS handler replaces whole;
//! [`app::build`] binds the admin and metrics ports, [`app::App::run`] serves until drained.

mod access_log;
pub mod admin;
pub mod app;
pub mod config;
mod detect;
mod http;
pub mod identity;
/// The capture rules of the pod's init step (`weft-proxy iptables`), shared with the injector.
pub use weft_sidecar::iptables;
mod lb;
mod listeners;
pub mod model;
mod mtls;
mod normalize;
pub mod state;
pub mod status;
mod tcp;

use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;
use tokio::{sync::watch, task::JoinSet};
use weft_drain::DrainWatcher;
use weft_telemetry::{IstioMetrics, RequestLabels, TcpLabels};

use crate::{
    config::Workload,
    state::{ClusterState, EndpointState, ProxyState},
};

/// What every connection needs, shared.
pub struct Ctx {
    pub state: watch::Receiver<Arc<ProxyState>>,
    pub metrics: IstioMetrics,
    pub registry: Arc<Registry>,
    pub workload: Workload,
    pub drain: DrainWatcher,
    /// How long connections of a changed listener may go on (see `Config::listener_drain`).
    pub listener_drain: std::time::Duration,
    /// TLS configs on the workload's identity, when it has one.
    tls: Arc<mtls::TlsConfigs>,
    /// This workload's SPIFFE id for metric labels, or `unknown` without an identity; rotation keeps it.
    principal: String,
    access_log: access_log::AccessLog,
    /// Upgraded (WebSocket) tunnels outlive the request that made them; this set owns them.
    tasks: TaskSet,
}

/// A JoinSet that can be spawned into from shared references.
#[derive(Default)]
pub(crate) struct TaskSet(Mutex<JoinSet<()>>);

impl TaskSet {
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        if let Ok(mut set) = self.0.lock() {
            while set.try_join_next().is_some() {}
            set.spawn(fut);
        }
    }
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".into()
    } else {
        s.to_string()
    }
}

/// The upstream chooses the `grpc-status` header, so it becomes a label only as one of gRPC's 17 codes;
/// anything else is `unknown`, and no upstream can mint series.
fn grpc_status_label(value: Option<&::http::HeaderValue>) -> String {
    match value.map(|v| v.to_str().ok().and_then(|s| s.parse::<u8>().ok())) {
        None => String::new(),
        Some(Some(code)) if code <= 16 => code.to_string(),
        Some(_) => "unknown".into(),
    }
}

/// Istio writes principals without the scheme: `cluster.local/ns/x/sa/y`.
fn istio_principal(id: &weft_certs::SpiffeId) -> String {
    let full = id.to_string();
    full.strip_prefix("spiffe://").unwrap_or(&full).to_string()
}

/// Envoy's response code details for a denial, naming the matched policy as istiod names it.
fn denial_details(decision: &weft_policy::Decision) -> String {
    match decision {
        weft_policy::Decision::Deny { by: Some(m) } => format!(
            "rbac_access_denied_matched_policy[{}]",
            weft_policy::rbac::policy_name(&m.policy, m.rule)
        ),
        _ => "rbac_access_denied_matched_policy[none]".into(),
    }
}

impl Ctx {
    /// This workload's SPIFFE id, when it has an identity.
    fn own_spiffe_id(&self) -> Option<&str> {
        (self.principal != "unknown").then_some(self.principal.as_str())
    }

    /// `weft_authorization_denied_total`, naming the policy and rule.
    fn count_denial(
        &self,
        decision: &weft_policy::Decision,
        protocol: &str,
        source: Option<&weft_certs::SpiffeId>,
    ) {
        let (policy, rule) = match decision {
            weft_policy::Decision::Deny { by: Some(m) } => (m.policy.clone(), m.rule.to_string()),
            _ => ("none".into(), String::new()),
        };
        self.metrics
            .denials
            .get_or_create(&weft_telemetry::DenialLabels {
                policy,
                rule,
                protocol: protocol.into(),
                source_principal: source.map_or_else(|| "unknown".into(), ToString::to_string),
                destination_workload: self.workload.name.clone(),
                destination_workload_namespace: self.workload.namespace.clone(),
            })
            .inc();
    }

    /// Istio's labels: outbound requests report as `source` with the endpoint's workload as destination;
    /// inbound ones report as `destination` with this workload and the services its port serves.
    fn request_labels(
        &self,
        conn: &http::ConnInfo,
        o: &Outcome<'_>,
        grpc: bool,
        resp_headers: &::http::HeaderMap,
    ) -> RequestLabels {
        let me = &self.workload;
        let dest = o.endpoint.map(|e| &e.config.workload);
        let service = o.cluster.and_then(|c| c.config.services.first().cloned());
        let (dest_service, dest_service_name, dest_service_ns) = match (&service, o.cluster) {
            (Some(s), _) => (s.host.clone(), s.name.clone(), s.namespace.clone()),
            (None, Some(c)) => {
                let host = c
                    .config
                    .name
                    .rsplit('|')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let name = host.split('.').next().unwrap_or_default().to_string();
                let ns = host.split('.').nth(1).unwrap_or_default().to_string();
                (host, name, ns)
            }
            _ => (String::new(), String::new(), String::new()),
        };
        let mut l = RequestLabels {
            reporter: if conn.inbound {
                "destination"
            } else {
                "source"
            }
            .into(),
            request_protocol: if grpc { "grpc" } else { "http" }.into(),
            response_code: o.status.as_u16().to_string(),
            grpc_response_status: grpc_status_label(resp_headers.get("grpc-status")),
            response_flags: o.flags.to_string(),
            connection_security_policy: if conn.inbound { "none" } else { "unknown" }.into(),
            destination_service: or_unknown(&dest_service),
            destination_service_name: or_unknown(&dest_service_name),
            destination_service_namespace: or_unknown(&dest_service_ns),
            destination_cluster: "Kubernetes".into(),
            ..Default::default()
        };
        if conn.inbound {
            l.source_workload = "unknown".into();
            l.source_workload_namespace = "unknown".into();
            l.source_principal = "unknown".into();
            l.source_app = "unknown".into();
            l.source_version = "unknown".into();
            l.destination_workload = me.name.clone();
            l.destination_workload_namespace = me.namespace.clone();
            l.destination_app = me.app.clone();
            l.destination_version = me.version.clone();
            l.destination_principal = self.principal.clone();
            if let Some(id) = &conn.source_principal {
                l.source_principal = id.to_string();
                l.source_workload_namespace = id.namespace.clone();
                l.connection_security_policy = "mutual_tls".into();
            }
        } else {
            l.source_workload = me.name.clone();
            l.source_workload_namespace = me.namespace.clone();
            l.source_app = me.app.clone();
            l.source_version = me.version.clone();
            l.source_principal = "unknown".into();
            l.destination_workload = or_unknown(dest.map_or("", |w| w.name.as_str()));
            l.destination_workload_namespace =
                or_unknown(dest.map_or("", |w| w.namespace.as_str()));
            l.destination_app = or_unknown(dest.map_or("", |w| w.app.as_str()));
            l.destination_version = or_unknown(dest.map_or("", |w| w.version.as_str()));
            l.source_principal = self.principal.clone();
            // The server's identity, when mTLS pins it to one (Istio learns it by metadata exchange).
            let pinned = o
                .endpoint
                .filter(|e| e.tls)
                .and_then(|e| o.cluster.and_then(|c| c.config.tls_for(&e.config)))
                .and_then(|t| match t.peers.as_slice() {
                    [one] => Some(one.clone()),
                    _ => None,
                });
            l.destination_principal = pinned.unwrap_or_else(|| "unknown".into());
        }
        l
    }

    fn tcp_labels(
        &self,
        inbound: bool,
        cluster: Option<&ClusterState>,
        endpoint: Option<&EndpointState>,
    ) -> TcpLabels {
        let me = &self.workload;
        let dest = endpoint.map(|e| &e.config.workload);
        let host = cluster.map(|c| {
            c.config.services.first().map_or_else(
                || {
                    c.config
                        .name
                        .rsplit('|')
                        .next()
                        .unwrap_or_default()
                        .to_string()
                },
                |s| s.host.clone(),
            )
        });
        let host = host.unwrap_or_default();
        let (src_w, src_ns, dst_w, dst_ns) = if inbound {
            (
                "unknown".to_string(),
                "unknown".to_string(),
                me.name.clone(),
                me.namespace.clone(),
            )
        } else {
            (
                me.name.clone(),
                me.namespace.clone(),
                or_unknown(dest.map_or("", |w| w.name.as_str())),
                or_unknown(dest.map_or("", |w| w.namespace.as_str())),
            )
        };
        TcpLabels {
            reporter: if inbound { "destination" } else { "source" }.into(),
            source_workload: src_w,
            source_workload_namespace: src_ns,
            source_principal: "unknown".into(),
            destination_workload: dst_w,
            destination_workload_namespace: dst_ns,
            destination_principal: "unknown".into(),
            destination_service_name: or_unknown(host.split('.').next().unwrap_or_default()),
            destination_service_namespace: or_unknown(host.split('.').nth(1).unwrap_or_default()),
            destination_service: or_unknown(&host),
            response_flags: "-".into(),
            connection_security_policy: if inbound { "none" } else { "unknown" }.into(),
        }
    }
}

/// What the metrics record of one request; borrowed from the HTTP path's outcome.
struct Outcome<'a> {
    status: ::http::StatusCode,
    flags: &'a str,
    cluster: Option<&'a ClusterState>,
    endpoint: Option<&'a EndpointState>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_status_labels_are_grpcs_codes_only() {
        let label = |v: &str| {
            super::grpc_status_label(Some(&::http::HeaderValue::from_str(v).expect("value")))
        };
        assert_eq!(super::grpc_status_label(None), "");
        assert_eq!(label("0"), "0");
        assert_eq!(label("16"), "16");
        for bad in [
            "17",
            "-1",
            "007x",
            "a-new-series-per-response",
            "999999999999",
        ] {
            assert_eq!(label(bad), "unknown", "{bad}");
        }
    }
}
