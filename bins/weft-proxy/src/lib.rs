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

use prometheus_client::{
    metrics::{counter::Counter, histogram::Histogram},
    registry::Registry,
};
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
fn grpc_status_label(value: Option<&::http::HeaderValue>) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    match value.map(|v| v.to_str().ok().and_then(|s| s.parse::<usize>().ok())) {
        None => "",
        Some(Some(code)) => CODES.get(code).copied().unwrap_or("unknown"),
        Some(None) => "unknown",
    }
}

/// One request label set's four series, taken out of their families: recording into them hashes
/// nothing and builds no labels.
struct RequestSeries {
    requests: Counter,
    duration_ms: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// What decides a request's labels beyond its connection and this workload. The config objects are
/// compared by identity: a config change gives new objects, and holding them keeps an address from
/// being reused by another while the key lives.
struct SeriesKey {
    cluster: Option<Arc<ClusterState>>,
    endpoint: Option<Arc<EndpointState>>,
    status: ::http::StatusCode,
    flags: &'static str,
    grpc: bool,
    grpc_status: &'static str,
}

impl SeriesKey {
    fn same(&self, other: &Self) -> bool {
        fn same_arc<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
        }
        same_arc(&self.cluster, &other.cluster)
            && same_arc(&self.endpoint, &other.endpoint)
            && self.status == other.status
            && self.flags == other.flags
            && self.grpc == other.grpc
            && self.grpc_status == other.grpc_status
    }
}

/// A connection's last request series: the next request like it (a keep-alive client calling one
/// route) records into the same series without building its labels again.
#[derive(Default)]
pub(crate) struct LastSeries(Mutex<Option<(SeriesKey, RequestSeries)>>);

impl std::fmt::Debug for LastSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LastSeries(..)")
    }
}

/// One finished request, as the request metrics record it.
pub(crate) struct RequestRecord {
    pub status: ::http::StatusCode,
    pub flags: &'static str,
    pub cluster: Option<Arc<ClusterState>>,
    pub endpoint: Option<Arc<EndpointState>>,
    pub grpc: bool,
    pub grpc_status: Option<::http::HeaderValue>,
    pub duration: std::time::Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
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
    /// Counts one request into Istio's request metrics, through the connection's last series when
    /// the request's labels are the same as the last one's.
    fn record_request(&self, conn: &http::ConnInfo, r: RequestRecord) {
        let key = SeriesKey {
            cluster: r.cluster,
            endpoint: r.endpoint,
            status: r.status,
            flags: r.flags,
            grpc: r.grpc,
            grpc_status: grpc_status_label(r.grpc_status.as_ref()),
        };
        let Ok(mut last) = conn.last_series.0.lock() else {
            return;
        };
        let series = match last.take() {
            Some((k, series)) if k.same(&key) => (k, series),
            _ => {
                let outcome = Outcome {
                    status: key.status,
                    flags: key.flags,
                    cluster: key.cluster.as_deref(),
                    endpoint: key.endpoint.as_deref(),
                };
                let labels = self.request_labels(conn, &outcome, key.grpc, key.grpc_status);
                let m = &self.metrics;
                let series = RequestSeries {
                    requests: m.requests.get_or_create(&labels).clone(),
                    duration_ms: m.request_duration_ms.get_or_create(&labels).clone(),
                    request_bytes: m.request_bytes.get_or_create(&labels).clone(),
                    response_bytes: m.response_bytes.get_or_create(&labels).clone(),
                };
                (key, series)
            }
        };
        let s = &series.1;
        s.requests.inc();
        s.duration_ms.observe(r.duration.as_secs_f64() * 1000.0);
        s.request_bytes.observe(r.request_bytes as f64);
        s.response_bytes.observe(r.response_bytes as f64);
        *last = Some(series);
    }

    fn request_labels(
        &self,
        conn: &http::ConnInfo,
        o: &Outcome<'_>,
        grpc: bool,
        grpc_status: &str,
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
            grpc_response_status: grpc_status.into(),
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
    /// The last series is reused only for a request whose labels would be the same: the same
    /// cluster and endpoint objects (not equal copies, which a config change makes), status, flags
    /// and gRPC status.
    #[test]
    fn a_series_is_reused_only_for_the_same_labels() {
        use std::sync::Arc;
        let endpoint = |n: u8| {
            Arc::new(crate::state::EndpointState::new(
                crate::model::EndpointConfig {
                    address: std::net::SocketAddr::from(([127, 0, 0, n], 9080)),
                    weight: 1,
                    healthy: true,
                    workload: Default::default(),
                    socket_match: Default::default(),
                },
                false,
            ))
        };
        let (a, b) = (endpoint(1), endpoint(1));
        let key =
            |e: &Arc<crate::state::EndpointState>, status: u16, grpc_status| super::SeriesKey {
                cluster: None,
                endpoint: Some(e.clone()),
                status: ::http::StatusCode::from_u16(status).expect("a status"),
                flags: "-",
                grpc: false,
                grpc_status,
            };
        assert!(key(&a, 200, "").same(&key(&a, 200, "")));
        assert!(
            !key(&a, 200, "").same(&key(&b, 200, "")),
            "an equal copy is not the same"
        );
        assert!(!key(&a, 200, "").same(&key(&a, 503, "")));
        assert!(!key(&a, 200, "0").same(&key(&a, 200, "14")));
    }

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
