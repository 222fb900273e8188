//! Config for proxies whose pod traffic is captured by iptables (`INTERCEPTION_MODE: REDIRECT`), shaped
//! as istiod's: `virtualOutbound` on 15001 and `virtualInbound` on 15006 hand each connection to the
//! listener or filter chain for its original destination.

use std::collections::BTreeSet;

use super::*;
use weft_xds::pb::envoy::{
    config::listener::v3::{ListenerFilter, listener_filter},
    extensions::filters::listener::{
        http_inspector::v3::HttpInspector, original_dst::v3::OriginalDst,
        tls_inspector::v3::TlsInspector,
    },
};

pub(super) const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub(super) const VIRTUAL_INBOUND: &str = "virtualInbound";
pub(super) const PASSTHROUGH: &str = "PassthroughCluster";
pub(super) const BLACKHOLE: &str = "BlackHoleCluster";
pub(super) const INBOUND_PASSTHROUGH: &str = "InboundPassthroughCluster";
/// How long a captured connection on an undeclared port may keep its first bytes to itself before it is
/// carried as plain TCP. Short, so server-first protocols on such ports wait only this long.
const PROTOCOL_DETECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);
/// What the inspectors report for HTTP, as filter chains match it.
const HTTP_PROTOCOLS: [&str; 3] = ["http/1.1", "http/1.0", "h2c"];
const OUTBOUND_CAPTURE_PORT: u16 = 15001;
const INBOUND_CAPTURE_PORT: u16 = 15006;
/// The source address of inbound passthrough connections, which the capture rules let through.
const INBOUND_PASSTHROUGH_SOURCE: &str = "127.0.0.6";

fn bool_value(value: bool) -> Option<wkt::BoolValue> {
    Some(wkt::BoolValue { value })
}

fn original_dst_cluster(name: &str, source: Option<&str>) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(wkt::Duration {
            seconds: DEFAULT_CONNECT_TIMEOUT_SECS,
            nanos: 0,
        }),
        upstream_bind_config: source.map(|ip| BindConfig {
            source_address: Some(SocketAddress {
                address: ip.to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A listener that only takes connections handed over by a capture listener.
fn unbound_listener(name: &str, ip: &str, port: u16, filter: Filter) -> Listener {
    Listener {
        bind_to_port: bool_value(false),
        ..listener(name, ip, port, TrafficDirection::Outbound, vec![filter])
    }
}

fn chain(destination_port: Option<u16>, filter: Filter) -> FilterChain {
    FilterChain {
        filter_chain_match: destination_port.map(|p| FilterChainMatch {
            destination_port: Some(wkt::UInt32Value { value: p.into() }),
            ..Default::default()
        }),
        filters: vec![filter],
        ..Default::default()
    }
}

/// The chain that takes connections the inspectors found to be HTTP.
fn http_chain(destination_port: Option<u16>, filter: Filter) -> FilterChain {
    let mut c = chain(destination_port, filter);
    let m = c.filter_chain_match.get_or_insert_with(Default::default);
    m.application_protocols = HTTP_PROTOCOLS.map(String::from).to_vec();
    c
}

/// Inspect the first bytes (HTTP request line or preface, TLS ClientHello), but not for long.
fn with_inspectors(mut l: Listener) -> Listener {
    l.listener_filters.extend([
        ListenerFilter {
            name: "envoy.filters.listener.http_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack(
                &HttpInspector::default(),
            ))),
            ..Default::default()
        },
        ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack(
                &TlsInspector::default(),
            ))),
            ..Default::default()
        },
    ]);
    l.listener_filters_timeout = Some(duration(PROTOCOL_DETECTION_TIMEOUT));
    l.continue_on_listener_filters_timeout = true;
    l
}

/// A capture listener. Outbound hands each connection to the listener for its original destination
/// (`use_original_dst`); inbound only restores that destination to match its own chains against (the
/// `original_dst` listener filter), so inbound traffic never lands on an outbound listener for the port.
fn capture_listener(
    name: &str,
    port: u16,
    direction: TrafficDirection,
    chains: Vec<FilterChain>,
) -> Listener {
    let inbound = direction == TrafficDirection::Inbound;
    Listener {
        name: name.to_string(),
        address: Some(socket_address("0.0.0.0", port)),
        filter_chains: chains,
        use_original_dst: bool_value(!inbound),
        listener_filters: if inbound {
            vec![original_dst_filter()]
        } else {
            vec![]
        },
        traffic_direction: direction as i32,
        ..Default::default()
    }
}

fn original_dst_filter() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.original_dst".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack(
            &OriginalDst::default(),
        ))),
        ..Default::default()
    }
}

pub(super) fn generate(
    model: &Model,
    proxy: &Proxy,
    sidecar: Option<&Object<SidecarSpec>>,
    visible: &[&Service],
    snap: &mut Snapshot,
) {
    snap.insert(PASSTHROUGH, &original_dst_cluster(PASSTHROUGH, None));
    snap.insert(
        INBOUND_PASSTHROUGH,
        &original_dst_cluster(INBOUND_PASSTHROUGH, Some(INBOUND_PASSTHROUGH_SOURCE)),
    );
    snap.insert(
        BLACKHOLE,
        &Cluster {
            name: BLACKHOLE.into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32,
            )),
            connect_timeout: Some(wkt::Duration {
                seconds: DEFAULT_CONNECT_TIMEOUT_SECS,
                nanos: 0,
            }),
            ..Default::default()
        },
    );

    // Outbound: HTTP ports route by Host on 0.0.0.0_<port>; TCP is told apart by the service address.
    let mut http_ports = BTreeSet::new();
    for svc in visible {
        for port in &svc.ports {
            if port.protocol.is_http() {
                http_ports.insert(port.number);
                continue;
            }
            for vip in &svc.addresses {
                let name = format!("{vip}_{}", port.number);
                let tcp =
                    tcp_proxy_filter(&name, tcp_destination(model, svc, port.number), &model.mesh);
                let mut l = unbound_listener(&name, vip, port.number, tcp);
                if port.protocol == Protocol::Auto {
                    // Sniffed HTTP routes by Host like any HTTP port; anything else stays TCP.
                    http_ports.insert(port.number);
                    let hcm = rds_filter(&name, port.number, &model.mesh);
                    l.filter_chains.insert(0, http_chain(None, hcm));
                    l = with_inspectors(l);
                }
                snap.insert(&name, &l);
            }
        }
    }
    for port in http_ports {
        let routed = visible.iter().copied().filter(|s| {
            s.port(port)
                .is_some_and(|p| p.protocol.is_http() || p.protocol == Protocol::Auto)
        });
        snap.insert(port.to_string(), &port_routes(model, proxy, port, routed));
        let declared_http = visible
            .iter()
            .any(|s| s.port(port).is_some_and(|p| p.protocol.is_http()));
        if !declared_http {
            continue;
        }
        let name = format!("0.0.0.0_{port}");
        let filter = rds_filter(&name, port, &model.mesh);
        snap.insert(&name, &unbound_listener(&name, "0.0.0.0", port, filter));
    }
    // Anything else leaves as it came, unless the Sidecar allows only what the registry knows.
    let registry_only = sidecar
        .and_then(|s| s.spec.outbound_traffic_policy.as_ref())
        .and_then(|p| p.mode)
        == Some(weft_api::istio::OutboundMode::RegistryOnly);
    let fallback = if registry_only {
        BLACKHOLE
    } else {
        PASSTHROUGH
    };
    let outbound_default = tcp_proxy_filter(
        fallback,
        tcp_proxy::ClusterSpecifier::Cluster(fallback.into()),
        &model.mesh,
    );
    snap.insert(
        VIRTUAL_OUTBOUND,
        &capture_listener(
            VIRTUAL_OUTBOUND,
            OUTBOUND_CAPTURE_PORT,
            TrafficDirection::Outbound,
            vec![chain(None, outbound_default)],
        ),
    );

    // Inbound: chains per port the workload serves for some service, then passthrough for the rest.
    let policies = crate::authz::policies_for(model, proxy);
    let ip = proxy.ip.to_string();
    let mut served: BTreeMap<u16, Protocol> = BTreeMap::new();
    for svc in model.registry.services.values() {
        for e in svc.endpoints.iter().filter(|e| e.address == ip) {
            for port in &svc.ports {
                let target = e.ports.get(&port.name).copied().unwrap_or(port.number);
                served.entry(target).or_insert(port.protocol);
            }
        }
    }
    let mut chains = Vec::new();
    for (port, protocol) in served {
        let cluster_name = inbound_cluster_name(port);
        // The app listens on the pod's loopback too; 127.0.0.1 is exempt from capture, so no loop.
        let mut cluster = static_cluster(&cluster_name, "127.0.0.1", port, protocol);
        cluster.metadata = Some(services_metadata(model, proxy, port));
        snap.insert(&cluster_name, &cluster);
        let filters = inbound_filters(
            &cluster_name,
            port,
            &cluster_name,
            protocol,
            &model.mesh,
            &policies,
        );
        let mode = super::mtls::inbound_mode(model, proxy, port);
        chains.extend(super::mtls::inbound_chains(port, filters, protocol, mode));
    }
    chains.push(chain(
        None,
        tcp_proxy_filter(
            INBOUND_PASSTHROUGH,
            tcp_proxy::ClusterSpecifier::Cluster(INBOUND_PASSTHROUGH.into()),
            &model.mesh,
        ),
    ));
    let mut inbound = capture_listener(
        VIRTUAL_INBOUND,
        INBOUND_CAPTURE_PORT,
        TrafficDirection::Inbound,
        chains,
    );
    super::mtls::inspect_tls(&mut inbound);
    snap.insert(VIRTUAL_INBOUND, &inbound);
}
