//! Mutual TLS as istiod generates it. Clients get auto mTLS: a cluster's `transport_socket_matches`
//! send endpoints labelled `security.istio.io/tlsMode: istio` (they run a sidecar) over mTLS, with SNI
//! `outbound_.<port>_.<subset>_.<host>`, Istio's ALPN and the endpoints' SPIFFE ids to expect, and the
//! rest in plaintext. Servers get, per port and PeerAuthentication mode, a chain that terminates mTLS
//! (TLS with Istio's ALPN) and, unless STRICT, one that takes plaintext.

use std::collections::BTreeSet;

use super::*;
use crate::peer_auth::MtlsMode;
use weft_api::istio::ClientTlsMode;
use weft_xds::pb::envoy::{
    config::{cluster::v3::cluster::TransportSocketMatch, core::v3::TransportSocket},
    extensions::transport_sockets::{
        raw_buffer::v3::RawBuffer,
        tls::v3::{
            CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
            UpstreamTlsContext, common_tls_context,
        },
    },
};

/// The label Istio's injector puts on pods with a sidecar, and the endpoint metadata it becomes.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";
/// ALPN a sidecar offers upstream (TCP), and what it may offer in its place for HTTP.
const ALPN_MESH: [&str; 2] = ["istio-peer-exchange", "istio"];
const ALPN_MESH_HTTP: [&str; 3] = ["istio-http/1.0", "istio-http/1.1", "istio-h2"];
const SDS_CERTIFICATE: &str = "default";
const SDS_ROOT: &str = "ROOTCA";

pub(super) fn has_sidecar(e: &crate::registry::Endpoint) -> bool {
    e.labels.get(TLS_MODE_LABEL).map(String::as_str) == Some("istio")
}

/// `envoy.transport_socket_match: {tlsMode: istio}` for endpoints with a sidecar.
pub(super) fn endpoint_metadata(e: &crate::registry::Endpoint, metadata: &mut Metadata) {
    if has_sidecar(e) {
        let fields =
            serde_json::Map::from_iter([("tlsMode".to_string(), Value::String("istio".into()))]);
        metadata.filter_metadata.insert(
            TRANSPORT_SOCKET_MATCH.into(),
            weft_xds::structs::json_to_struct(&fields),
        );
    }
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(ads()),
    }
}

fn common(alpn: &[&str], peers: &[String]) -> CommonTlsContext {
    #[allow(deprecated)]
    let default_validation_context = (!peers.is_empty()).then(|| CertificateValidationContext {
        match_subject_alt_names: peers
            .iter()
            .map(|p| StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(p.clone())),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(SDS_CERTIFICATE)],
        validation_context_type: Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context,
                    validation_context_sds_secret_config: Some(sds(SDS_ROOT)),
                    ..Default::default()
                },
            ),
        ),
        alpn_protocols: alpn.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

fn tls_socket(any: Any) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(
            weft_xds::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any),
        ),
    }
}

/// A cluster's mTLS, for `svc`'s endpoints restricted to `subset`: as the DestinationRule's
/// `trafficPolicy.tls.mode` says (`ISTIO_MUTUAL` for every endpoint, `DISABLE` for none), else auto mTLS
/// (endpoints running a sidecar get mTLS, the others plaintext).
pub(super) fn cluster_tls(
    cluster: &mut Cluster,
    svc: &Service,
    port: u16,
    subset: &str,
    subset_labels: &BTreeMap<String, String>,
    trust_domain: &str,
    policy: Option<&TrafficPolicy>,
) {
    let mode = policy.and_then(|p| p.tls.as_ref()).and_then(|t| t.mode);
    let in_subset = || {
        svc.endpoints
            .iter()
            .filter(|e| labels_match(subset_labels, &e.labels))
    };
    let endpoints: Vec<_> = match mode {
        Some(ClientTlsMode::Disable) => return,
        Some(ClientTlsMode::IstioMutual) => in_subset().collect(),
        // The loader refuses SIMPLE and MUTUAL; were one here, no auto mTLS either.
        Some(ClientTlsMode::Simple | ClientTlsMode::Mutual) => return,
        // Auto mTLS is for the mesh's own workloads; an external service's labels do not make it one.
        _ if svc.mesh_external => return,
        _ => in_subset().filter(|e| has_sidecar(e)).collect(),
    };
    if endpoints.is_empty() && mode.is_none() {
        return;
    }
    let peers: BTreeSet<String> = endpoints
        .iter()
        .map(|e| {
            weft_certs::SpiffeId::new(trust_domain, &e.namespace, &e.service_account).to_string()
        })
        .collect();
    let peers: Vec<String> = peers.into_iter().collect();
    let upstream = UpstreamTlsContext {
        common_tls_context: Some(common(&ALPN_MESH, &peers)),
        sni: format!("outbound_.{port}_.{subset}_.{}", svc.hostname),
        ..Default::default()
    };
    if mode == Some(ClientTlsMode::IstioMutual) {
        cluster.transport_socket = Some(tls_socket(pack(&upstream)));
        return;
    }
    cluster.transport_socket_matches = vec![
        TransportSocketMatch {
            name: "tlsMode-istio".into(),
            r#match: Some(weft_xds::structs::json_to_struct(&serde_json::Map::from_iter([(
                "tlsMode".to_string(),
                Value::String("istio".into()),
            )]))),
            transport_socket: Some(tls_socket(pack(&upstream))),
        },
        TransportSocketMatch {
            name: "tlsMode-disabled".into(),
            r#match: Some(Default::default()),
            transport_socket: Some(TransportSocket {
                name: "envoy.transport_sockets.raw_buffer".into(),
                config_type: Some(
                    weft_xds::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                        pack(&RawBuffer::default()),
                    ),
                ),
            }),
        },
    ];
}

/// The mode a proxy's inbound `port` runs in. Only a workload labelled as running a sidecar (and so
/// holding an identity) can terminate mTLS; any other takes plaintext, as it would without a sidecar.
pub(super) fn inbound_mode(model: &Model, proxy: &Proxy, port: u16) -> MtlsMode {
    if proxy.labels.get(TLS_MODE_LABEL).map(String::as_str) == Some("istio") {
        crate::peer_auth::mode_for(model, proxy, port)
    } else {
        MtlsMode::Disable
    }
}

/// A server's chains for one port, as its PeerAuthentication mode allows.
pub(super) fn inbound_chains(
    port: u16,
    filters: Vec<Filter>,
    protocol: Protocol,
    mode: MtlsMode,
) -> Vec<FilterChain> {
    let port_match = FilterChainMatch {
        destination_port: Some(wkt::UInt32Value { value: port.into() }),
        ..Default::default()
    };
    let mut alpn: Vec<String> = ALPN_MESH.iter().map(|p| p.to_string()).collect();
    if protocol.is_http() || protocol == Protocol::Auto {
        alpn.extend(ALPN_MESH_HTTP.iter().map(|p| p.to_string()));
    }
    let mtls = FilterChain {
        name: format!("{port}-mtls"),
        filter_chain_match: Some(FilterChainMatch {
            transport_protocol: "tls".into(),
            application_protocols: alpn,
            ..port_match.clone()
        }),
        filters: filters.clone(),
        transport_socket: Some(tls_socket(pack(&DownstreamTlsContext {
            common_tls_context: Some(common(&[], &[])),
            require_client_certificate: Some(wkt::BoolValue { value: true }),
            ..Default::default()
        }))),
        ..Default::default()
    };
    let plaintext = FilterChain {
        name: format!("{port}-plaintext"),
        filter_chain_match: Some(port_match),
        filters,
        ..Default::default()
    };
    match mode {
        MtlsMode::Strict => vec![mtls],
        MtlsMode::Permissive => vec![mtls, plaintext],
        MtlsMode::Disable => vec![plaintext],
    }
}

/// The TLS inspector, so chains can be picked by transport and ALPN; a client that sends nothing
/// first (a server-first protocol) waits at most Istio's 100 ms for it to give up.
pub(super) fn inspect_tls(l: &mut Listener) {
    use weft_xds::pb::envoy::{
        config::listener::v3::{ListenerFilter, listener_filter},
        extensions::filters::listener::tls_inspector::v3::TlsInspector,
    };
    l.listener_filters.push(ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack(
            &TlsInspector::default(),
        ))),
        ..Default::default()
    });
    l.listener_filters_timeout = Some(duration(std::time::Duration::from_millis(100)));
    l.continue_on_listener_filters_timeout = true;
}
