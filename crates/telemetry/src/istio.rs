//! Istio's standard metrics, with Istio's names and labels, so existing dashboards work unchanged.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// Labels of the HTTP and gRPC request metrics, as Istio's stats filter sets them.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `source` when the client's proxy reports, `destination` when the server's does.
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_cluster: String,
    /// `http`, `grpc`.
    pub request_protocol: String,
    pub response_code: String,
    pub grpc_response_status: String,
    /// Envoy's response flags (`-`, `UH` no healthy upstream, `UF` upstream connect failure, `NR` no route,
    /// `UT` upstream timeout, `URX` retries exhausted).
    pub response_flags: String,
    pub connection_security_policy: String,
}

/// Labels of the TCP metrics: the request labels without the per-request ones.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

/// Labels of Weft's authorization denials: which policy and rule denied, which Istio cannot say.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// `<namespace>/<name>` of the DENY policy, or `none` when no ALLOW policy matched.
    pub policy: String,
    /// The rule's index in the policy; empty when no ALLOW policy matched.
    pub rule: String,
    /// `http` or `tcp`.
    pub protocol: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
}

#[derive(Clone, Debug)]
pub struct IstioMetrics {
    /// `weft_authorization_denied_total`.
    pub denials: Family<DenialLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration_ms: Family<RequestLabels, Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub tcp_connections_opened: Family<TcpLabels, Counter>,
    pub tcp_connections_closed: Family<TcpLabels, Counter>,
}

/// Istio's default duration buckets, in milliseconds.
const DURATION_BUCKETS: [f64; 15] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];
/// Istio's default size buckets, in bytes: powers of ten.
const SIZE_BUCKETS: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

impl IstioMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let duration = || Histogram::new(DURATION_BUCKETS);
        let size = || Histogram::new(SIZE_BUCKETS);
        let m = Self {
            denials: Family::default(),
            requests: Family::default(),
            request_duration_ms: Family::new_with_constructor(duration),
            request_bytes: Family::new_with_constructor(size),
            response_bytes: Family::new_with_constructor(size),
            tcp_sent_bytes: Family::default(),
            tcp_received_bytes: Family::default(),
            tcp_connections_opened: Family::default(),
            tcp_connections_closed: Family::default(),
        };
        // prometheus-client appends `_total` to counters, giving Istio's exact names.
        registry.register(
            "istio_requests",
            "Requests handled, by source, destination and response",
            m.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            m.request_duration_ms.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the downstream on TCP connections",
            m.tcp_sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the downstream on TCP connections",
            m.tcp_received_bytes.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.tcp_connections_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.tcp_connections_closed.clone(),
        );
        registry.register(
            "weft_authorization_denied",
            "Requests and connections denied by an AuthorizationPolicy, by policy and rule",
            m.denials.clone(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_istio() {
        let mut registry = Registry::default();
        let m = IstioMetrics::new(&mut registry);
        m.requests
            .get_or_create(&RequestLabels {
                response_code: "200".into(),
                ..Default::default()
            })
            .inc();
        m.tcp_sent_bytes
            .get_or_create(&TcpLabels::default())
            .inc_by(3);
        m.request_duration_ms
            .get_or_create(&RequestLabels::default())
            .observe(2.0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        for name in [
            "istio_requests_total{",
            "istio_tcp_sent_bytes_total{",
            "istio_request_duration_milliseconds_bucket{",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
