//! Config for proxies whose pod traffic is captured by iptables (`INTERCEPTION_MODE: REDIRECT`), shaped
//! as istiod's: `virtualOutbound` on 15001 and `virtualInbound` on 15006 hand each connection to the
//! listener or filter chain for its original destination.

use std::collections::BTreeSet;

use super::*;

pub(super) const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub(super) const VIRTUAL_INBOUND: &str = "virtualInbound";
pub(super) const PASSTHROUGH: &str = "PassthroughCluster";
pub(super) const BLACKHOLE: &str = "BlackHoleCluster";
pub(super) const INBOUND_PASSTHROUGH: &str = "InboundPassthroughCluster";
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
        ..listener(name, ip, port, TrafficDirection::Outbound, filter)
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

fn capture_listener(
    name: &str,
    port: u16,
    direction: TrafficDirection,
    chains: Vec<FilterChain>,
) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket_address("0.0.0.0", port)),
        filter_chains: chains,
        use_original_dst: bool_value(true),
        traffic_direction: direction as i32,
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
                let filter = tcp_proxy_filter(&name, tcp_destination(model, svc, port.number));
                snap.insert(&name, &unbound_listener(&name, vip, port.number, filter));
            }
        }
    }
    for port in http_ports {
        let route_name = port.to_string();
        let virtual_hosts = visible
            .iter()
            .filter(|s| s.port(port).is_some_and(|p| p.protocol.is_http()))
            .map(|s| virtual_host(model, s, port, &proxy.namespace))
            .collect();
        snap.insert(
            &route_name,
            &RouteConfiguration {
                name: route_name.clone(),
                virtual_hosts,
                ..Default::default()
            },
        );
        let name = format!("0.0.0.0_{port}");
        let rds = Rds {
            config_source: Some(ads()),
            route_config_name: route_name,
        };
        let filter = hcm_filter(
            &name,
            http_connection_manager::RouteSpecifier::Rds(rds),
            &model.mesh,
        );
        snap.insert(&name, &unbound_listener(&name, "0.0.0.0", port, filter));
    }
    // Anything else leaves as it came, unless the Sidecar allows only what the registry knows.
    let registry_only = sidecar
        .and_then(|s| s.spec.outbound_traffic_policy.as_ref())
        .and_then(|p| p.mode.as_deref())
        == Some("REGISTRY_ONLY");
    let fallback = if registry_only {
        BLACKHOLE
    } else {
        PASSTHROUGH
    };
    let outbound_default = tcp_proxy_filter(
        fallback,
        tcp_proxy::ClusterSpecifier::Cluster(fallback.into()),
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

    // Inbound: one chain per port the workload serves for some service, then passthrough for the rest.
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
        chains.push(chain(
            Some(port),
            inbound_filter(&cluster_name, port, &cluster_name, protocol, &model.mesh),
        ));
    }
    chains.push(chain(
        None,
        tcp_proxy_filter(
            INBOUND_PASSTHROUGH,
            tcp_proxy::ClusterSpecifier::Cluster(INBOUND_PASSTHROUGH.into()),
        ),
    ));
    snap.insert(
        VIRTUAL_INBOUND,
        &capture_listener(
            VIRTUAL_INBOUND,
            INBOUND_CAPTURE_PORT,
            TrafficDirection::Inbound,
            chains,
        ),
    );
}
