//! Translation of the mesh model into the Envoy resources one proxy should have, named as istiod names
//! them: clusters `outbound|<port>|<subset>|<host>` and `inbound|<port>||`, route configurations named by
//! port, one virtual host per service with its short and long names. Pure: no IO, no clock.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde_json::Value;
use tracing::warn;
use weft_api::{
    Object,
    istio::{
        Destination, DestinationRuleSpec, H2UpgradePolicy, HeaderOperations, HttpMatchRequest,
        HttpRoute, SidecarSpec, SimpleLb, StringMatch, TrafficPolicy, VirtualServiceSpec,
    },
    labels_match,
};
use weft_xds::{
    NodeInfo, ProxyId, Snapshot, pack,
    pb::{
        envoy::{
            config::{
                accesslog::v3::{AccessLog, access_log},
                cluster::v3::{Cluster, cluster},
                core::v3::{
                    Address, AggregatedConfigSource, BindConfig, ConfigSource, DataSource,
                    HeaderValue, HeaderValueOption, HealthStatus, Http2ProtocolOptions, Locality,
                    Metadata, SocketAddress, TrafficDirection, address, config_source, data_source,
                    header_value_option::HeaderAppendAction, socket_address,
                },
                endpoint::v3::{
                    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
                },
                listener::v3::{
                    ApiListener, Filter, FilterChain, FilterChainMatch, Listener, filter,
                },
                route::v3::{
                    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction,
                    RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
                    WeightedCluster, header_matcher, query_parameter_matcher, redirect_action,
                    retry_policy, route, route_action, route_match,
                    weighted_cluster::ClusterWeight,
                },
            },
            extensions::{
                access_loggers::file::v3::FileAccessLog,
                filters::{
                    http::router::v3::Router,
                    network::{
                        http_connection_manager::v3::{
                            HttpConnectionManager, HttpFilter, Rds, http_connection_manager,
                            http_filter,
                        },
                        tcp_proxy::v3::{TcpProxy, tcp_proxy},
                    },
                },
                upstreams::http::v3::{HttpProtocolOptions, http_protocol_options},
            },
            r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher},
        },
        google::protobuf::{self as wkt, Any},
    },
};

use crate::{
    Model,
    registry::{Protocol, Service, fqdn},
};

/// Envoy's filter and extension names, as istiod writes them.
pub mod names {
    pub const HCM: &str = "envoy.filters.network.http_connection_manager";
    pub const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
    pub const ROUTER: &str = "envoy.filters.http.router";
    pub const FILE_ACCESS_LOG: &str = "envoy.access_loggers.file";
    pub const HTTP_PROTOCOL_OPTIONS: &str =
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
    /// Istio's filter-metadata namespace for workload facts on endpoints and clusters.
    pub const ISTIO_METADATA: &str = "istio";
}

/// Mesh-wide settings, as Istio's MeshConfig holds them.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshOptions {
    /// `accessLogFile`: empty turns access logs off, as in Istio's default profile.
    pub access_log_file: String,
    /// `trustDomain`: the first part of every SPIFFE id the mesh issues and checks.
    pub trust_domain: String,
    /// `pathNormalization.normalization`.
    pub path_normalization: PathNormalization,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            access_log_file: String::new(),
            trust_domain: "cluster.local".into(),
            path_normalization: PathNormalization::Base,
        }
    }
}

/// Istio's `meshConfig.pathNormalization.normalization`: how request paths are normalized before
/// authorization and routing. `DEFAULT` is `BASE`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathNormalization {
    /// Paths as the client sent them; a policy on `/admin` can be bypassed by `/./admin`.
    None,
    /// RFC 3986: dot segments removed, unreserved percent-escapes decoded.
    #[default]
    Base,
    /// `BASE`, and `//` merged into `/`.
    MergeSlashes,
    /// `MERGE_SLASHES`, after decoding `%2F` and `%5C`.
    DecodeAndMergeSlashes,
}

impl std::str::FromStr for PathNormalization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "NONE" => Ok(Self::None),
            "DEFAULT" | "BASE" => Ok(Self::Base),
            "MERGE_SLASHES" => Ok(Self::MergeSlashes),
            "DECODE_AND_MERGE_SLASHES" => Ok(Self::DecodeAndMergeSlashes),
            other => Err(format!(
                "unknown path normalization {other:?} (NONE, DEFAULT, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)"
            )),
        }
    }
}

/// Istio's default retry policy for routes that set none (`meshConfig.defaultHttpRetryPolicy`).
const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
const DEFAULT_CONNECT_TIMEOUT_SECS: i64 = 10;

/// What weftd knows of a proxy from its node.
#[derive(Clone, Debug, PartialEq)]
pub struct Proxy {
    pub ip: IpAddr,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// `GENERATOR: grpc` marks a proxyless gRPC client, which asks for API listeners by `<host>:<port>`.
    pub proxyless_grpc: bool,
    /// `INTERCEPTION_MODE: REDIRECT`: iptables sends all the pod's TCP to 15001 and 15006.
    pub captured: bool,
}

impl Proxy {
    pub fn from_node(node: &NodeInfo) -> Result<Self, weft_xds::ProxyIdError> {
        let id: ProxyId = node.id.parse()?;
        let labels = match node.metadata.get("LABELS") {
            Some(Value::Object(m)) => m
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect(),
            _ => BTreeMap::new(),
        };
        Ok(Self {
            ip: id.ip,
            namespace: node
                .meta_str("NAMESPACE")
                .map_or(id.namespace, str::to_string),
            labels,
            proxyless_grpc: node.meta_str("GENERATOR") == Some("grpc"),
            captured: node.meta_str("INTERCEPTION_MODE") == Some("REDIRECT"),
        })
    }
}

/// The snapshot generator weftd hands to the ADS server: the whole model, translated per proxy on demand.
#[derive(Debug)]
pub struct Generator {
    pub model: Arc<Model>,
}

impl weft_xds::server::SnapshotGenerator for Generator {
    fn generate(&self, node: &NodeInfo) -> Snapshot {
        match Proxy::from_node(node) {
            Ok(proxy) => generate(&self.model, &proxy),
            Err(e) => {
                warn!(error = %e, "cannot tell which workload this proxy runs for; sending it no config");
                Snapshot::default()
            }
        }
    }
}

pub fn outbound_cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

pub fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

/// Everything one proxy should have.
pub fn generate(model: &Model, proxy: &Proxy) -> Snapshot {
    let mut snap = Snapshot::default();
    let sidecar = model.sidecar_for(proxy);
    let visible: Vec<&Service> = model
        .registry
        .services
        .values()
        .filter(|s| visible_to(s, sidecar, proxy))
        .collect();

    for svc in &visible {
        let dr = model.destination_rule_for(svc);
        for port in &svc.ports {
            let base_policy = dr.and_then(|d| d.traffic_policy.as_ref());
            // Proxyless gRPC clients take mTLS only through certificate providers in their own
            // bootstrap, which Weft does not configure; they get plaintext clusters.
            // They also validate lb_policy and take only what gRPC implements; Istio's gRPC
            // generator gives them round robin, whatever the DestinationRule says.
            let secure = |cluster: &mut Cluster,
                          subset: &str,
                          labels: &BTreeMap<String, String>,
                          policy: Option<&TrafficPolicy>| {
                if proxy.proxyless_grpc {
                    cluster.lb_policy = cluster::LbPolicy::RoundRobin as i32;
                } else {
                    let td = &model.mesh.trust_domain;
                    mtls::cluster_tls(cluster, svc, port.number, subset, labels, td, policy);
                }
            };
            let name = outbound_cluster_name(port.number, "", &svc.hostname);
            let mut cluster = outbound_cluster(&name, port.protocol, base_policy);
            secure(&mut cluster, "", &BTreeMap::new(), base_policy);
            snap.insert(&name, &cluster);
            snap.insert(&name, &load_assignment(&name, svc, port, &BTreeMap::new()));
            for subset in dr.map(|d| d.subsets.as_slice()).unwrap_or_default() {
                let name = outbound_cluster_name(port.number, &subset.name, &svc.hostname);
                let policy = subset.traffic_policy.as_ref().or(base_policy);
                let mut cluster = outbound_cluster(&name, port.protocol, policy);
                secure(&mut cluster, &subset.name, &subset.labels, policy);
                snap.insert(&name, &cluster);
                snap.insert(&name, &load_assignment(&name, svc, port, &subset.labels));
            }
        }
    }

    if proxy.proxyless_grpc {
        for svc in &visible {
            for port in svc.ports.iter().filter(|p| p.protocol.is_http()) {
                let name = format!("{}:{}", svc.hostname, port.number);
                snap.insert(&name, &api_listener(&name));
                let vh = virtual_host(model, svc, port.number, &proxy.namespace);
                snap.insert(
                    &name,
                    &RouteConfiguration {
                        name: name.clone(),
                        virtual_hosts: vec![vh],
                        ..Default::default()
                    },
                );
            }
        }
        return snap;
    }

    if proxy.captured {
        capture::generate(model, proxy, sidecar, &visible, &mut snap);
        return snap;
    }
    let Some(sidecar) = sidecar else { return snap };
    let policies = crate::authz::policies_for(model, proxy);
    let bind_default = proxy.ip.to_string();
    for ingress in &sidecar.spec.ingress {
        let port = ingress.port.number;
        let bind = ingress.bind.clone().unwrap_or_else(|| bind_default.clone());
        let protocol = Protocol::infer(
            ingress.port.name.as_deref(),
            None,
            ingress.port.protocol.as_deref(),
        );
        let Some(app) = ingress
            .default_endpoint
            .as_deref()
            .and_then(parse_default_endpoint)
        else {
            warn!(sidecar = %sidecar.metadata.name, port, "ingress listener without a usable defaultEndpoint; skipping it");
            continue;
        };
        let cluster_name = inbound_cluster_name(port);
        let mut cluster = static_cluster(&cluster_name, &app.0, app.1, protocol);
        cluster.metadata = Some(services_metadata(model, proxy, port));
        snap.insert(&cluster_name, &cluster);
        let listener_name = format!("{bind}_{port}");
        let filters = inbound_filters(
            &listener_name,
            port,
            &cluster_name,
            protocol,
            &model.mesh,
            &policies,
        );
        let mode = mtls::inbound_mode(model, proxy, port);
        let mut l = listener(
            &listener_name,
            &bind,
            port,
            TrafficDirection::Inbound,
            Vec::new(),
        );
        l.filter_chains = mtls::inbound_chains(port, filters, protocol, mode);
        mtls::inspect_tls(&mut l);
        snap.insert(&listener_name, &l);
    }
    for egress in &sidecar.spec.egress {
        let Some(port) = &egress.port else {
            warn!(sidecar = %sidecar.metadata.name, "an egress listener without a port needs traffic capture; skipping it in explicit mode");
            continue;
        };
        let bind = egress.bind.clone().unwrap_or_else(|| bind_default.clone());
        let listener_name = format!("{bind}_{}", port.number);
        let on_port: Vec<&&Service> = visible
            .iter()
            .filter(|s| s.port(port.number).is_some())
            .collect();
        let protocol = Protocol::infer(port.name.as_deref(), None, port.protocol.as_deref());
        let chain = if protocol.is_http() {
            snap.insert(
                port.number.to_string(),
                &port_routes(model, proxy, port.number, on_port.iter().map(|s| **s)),
            );
            rds_filter(&listener_name, port.number, &model.mesh)
        } else {
            // A TCP port cannot tell services apart without an address to match on; the first one wins.
            let Some(svc) = on_port.first() else {
                warn!(sidecar = %sidecar.metadata.name, port = port.number, "no service has this egress port; skipping it");
                continue;
            };
            if on_port.len() > 1 {
                warn!(port = port.number, chosen = %svc.hostname, "several services share this TCP egress port; using the first");
            }
            tcp_proxy_filter(
                &listener_name,
                tcp_destination(model, svc, port.number),
                &model.mesh,
            )
        };
        snap.insert(
            &listener_name,
            &listener(
                &listener_name,
                &bind,
                port.number,
                TrafficDirection::Outbound,
                vec![chain],
            ),
        );
    }
    snap
}

fn visible_to(svc: &Service, sidecar: Option<&Object<SidecarSpec>>, proxy: &Proxy) -> bool {
    let Some(sidecar) = sidecar else { return true };
    if sidecar.spec.egress.is_empty() {
        return true;
    }
    sidecar.spec.egress.iter().flat_map(|e| &e.hosts).any(|h| {
        let (ns, host) = h.split_once('/').unwrap_or(("*", h.as_str()));
        let ns_ok = match ns {
            "*" => true,
            "." => svc.namespace == proxy.namespace,
            "~" => false,
            ns => svc.namespace == ns,
        };
        let host_ok = host == "*"
            || host == svc.hostname
            || host
                .strip_prefix('*')
                .is_some_and(|suffix| svc.hostname.ends_with(suffix));
        ns_ok && host_ok
    })
}

fn parse_default_endpoint(s: &str) -> Option<(String, u16)> {
    let s = s.strip_prefix("unix://").map_or(s, |_| "");
    let (host, port) = s.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port.parse().ok()?))
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: 2, // V3
        ..Default::default()
    }
}

fn duration(d: std::time::Duration) -> wkt::Duration {
    wkt::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn socket_address(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port.into())),
            ..Default::default()
        })),
    }
}

fn typed(name: &str, any: Any) -> (String, Any) {
    (name.to_string(), any)
}

fn http_protocol_options(
    protocol: Protocol,
    policy: Option<&TrafficPolicy>,
) -> Option<(String, Any)> {
    let upgrade = policy
        .and_then(|p| p.connection_pool.as_ref())
        .and_then(|c| c.http.as_ref())
        .and_then(|h| h.h2_upgrade_policy)
        == Some(H2UpgradePolicy::Upgrade);
    if !(protocol.is_http2() || (protocol.is_http() && upgrade)) {
        return None;
    }
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
            http_protocol_options::ExplicitHttpConfig {
                protocol_config: Some(http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                    Http2ProtocolOptions::default(),
                )),
            },
        )),
        ..Default::default()
    };
    Some(typed(names::HTTP_PROTOCOL_OPTIONS, pack(&options)))
}

fn outbound_cluster(name: &str, protocol: Protocol, policy: Option<&TrafficPolicy>) -> Cluster {
    let lb = policy
        .and_then(|p| p.load_balancer.as_ref())
        .and_then(|lb| lb.simple);
    let lb_policy = match lb {
        Some(SimpleLb::RoundRobin) => cluster::LbPolicy::RoundRobin,
        Some(SimpleLb::Random) => cluster::LbPolicy::Random,
        // Istio's default; LEAST_CONN is its deprecated alias. The loader refuses PASSTHROUGH.
        None
        | Some(
            SimpleLb::Unspecified
            | SimpleLb::LeastRequest
            | SimpleLb::LeastConn
            | SimpleLb::Passthrough,
        ) => cluster::LbPolicy::LeastRequest,
    };
    let connect_timeout = policy
        .and_then(|p| p.connection_pool.as_ref())
        .and_then(|c| c.tcp.as_ref())
        .and_then(|t| t.connect_timeout)
        .map(|t| duration(t.0))
        .unwrap_or(wkt::Duration {
            seconds: DEFAULT_CONNECT_TIMEOUT_SECS,
            nanos: 0,
        });
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(connect_timeout),
        lb_policy: lb_policy as i32,
        typed_extension_protocol_options: http_protocol_options(protocol, policy)
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

fn static_cluster(name: &str, ip: &str, port: u16, protocol: Protocol) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(wkt::Duration {
            seconds: DEFAULT_CONNECT_TIMEOUT_SECS,
            nanos: 0,
        }),
        typed_extension_protocol_options: http_protocol_options(protocol, None)
            .into_iter()
            .collect(),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.to_string(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![lb_endpoint(ip, port, 1, true, None)],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn lb_endpoint(
    ip: &str,
    port: u16,
    weight: u32,
    healthy: bool,
    metadata: Option<Metadata>,
) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket_address(ip, port)),
            ..Default::default()
        })),
        health_status: if healthy {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        } as i32,
        load_balancing_weight: Some(wkt::UInt32Value { value: weight }),
        metadata,
    }
}

fn istio_metadata(fields: serde_json::Map<String, Value>) -> Metadata {
    Metadata {
        filter_metadata: [(
            names::ISTIO_METADATA.to_string(),
            weft_xds::structs::json_to_struct(&fields),
        )]
        .into(),
        ..Default::default()
    }
}

/// The endpoints of one service port, restricted to a subset's labels.
fn load_assignment(
    name: &str,
    svc: &Service,
    port: &crate::registry::Port,
    subset: &BTreeMap<String, String>,
) -> ClusterLoadAssignment {
    let lb_endpoints = svc
        .endpoints
        .iter()
        .filter(|e| labels_match(subset, &e.labels))
        .map(|e| {
            let target = e.ports.get(&port.name).copied().unwrap_or(port.number);
            // Istio's `workload` metadata: name;namespace;canonical name;revision;cluster.
            let app =
                weft_telemetry::workload::canonical_name(&e.labels).unwrap_or(&e.workload_name);
            let version =
                weft_telemetry::workload::canonical_revision(&e.labels).unwrap_or("latest");
            let workload = format!(
                "{};{};{app};{version};Kubernetes",
                e.workload_name, e.namespace
            );
            // External endpoints are no mesh workload: metrics say `unknown` for them, as Istio's do.
            let meta = if svc.mesh_external {
                serde_json::Map::new()
            } else {
                serde_json::Map::from_iter([("workload".to_string(), Value::String(workload))])
            };
            let mut metadata = istio_metadata(meta);
            if !svc.mesh_external {
                mtls::endpoint_metadata(e, &mut metadata);
            }
            lb_endpoint(&e.address, target, e.weight, e.healthy, Some(metadata))
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        // gRPC clients reject endpoints without a locality and ignore localities without a weight.
        endpoints: vec![LocalityLbEndpoints {
            locality: Some(Locality::default()),
            lb_endpoints,
            load_balancing_weight: Some(wkt::UInt32Value { value: 1 }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The services an inbound port serves, for `destination_service` in the proxy's metrics.
fn services_metadata(model: &Model, proxy: &Proxy, port: u16) -> Metadata {
    let ip = proxy.ip.to_string();
    let services: Vec<Value> = model
        .registry
        .services
        .values()
        .filter(|s| {
            s.endpoints
                .iter()
                .any(|e| e.address == ip && e.ports.values().any(|p| *p == port))
        })
        .map(|s| serde_json::json!({"host": s.hostname, "name": s.name, "namespace": s.namespace}))
        .collect();
    istio_metadata(serde_json::Map::from_iter([(
        "services".to_string(),
        Value::Array(services),
    )]))
}

/// The route configuration named by port (`"9080"`), as istiod names it: one virtual host per service.
fn port_routes<'a>(
    model: &Model,
    proxy: &Proxy,
    port: u16,
    services: impl Iterator<Item = &'a Service>,
) -> RouteConfiguration {
    let virtual_hosts = services
        .map(|s| virtual_host(model, s, port, &proxy.namespace))
        .collect();
    RouteConfiguration {
        name: port.to_string(),
        virtual_hosts,
        ..Default::default()
    }
}

/// An HTTP connection manager whose routes come by RDS from the configuration named by `port`.
fn rds_filter(stat_prefix: &str, port: u16, mesh: &MeshOptions) -> Filter {
    let rds = Rds {
        config_source: Some(ads()),
        route_config_name: port.to_string(),
    };
    hcm_filter(
        stat_prefix,
        http_connection_manager::RouteSpecifier::Rds(rds),
        mesh,
        Vec::new(),
        false,
    )
}

/// The filters that hand inbound traffic for `port` to its inbound cluster, after the workload's
/// AuthorizationPolicies (as RBAC filters): HTTP through a route that matches everything, anything
/// else through the TCP proxy.
fn inbound_filters(
    stat_prefix: &str,
    port: u16,
    cluster_name: &str,
    protocol: Protocol,
    mesh: &MeshOptions,
    policies: &[weft_policy::Policy],
) -> Vec<Filter> {
    if !protocol.is_http() {
        let mut filters = rbac::network_filters(&weft_policy::rbac::compile(policies, true));
        filters.push(tcp_proxy_filter(
            stat_prefix,
            tcp_proxy::ClusterSpecifier::Cluster(cluster_name.to_string()),
            mesh,
        ));
        return filters;
    }
    let route = RouteConfiguration {
        name: cluster_name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: format!("inbound|http|{port}"),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(prefix_match("/")),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        cluster_name.to_string(),
                    )),
                    timeout: Some(duration(std::time::Duration::ZERO)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    vec![hcm_filter(
        stat_prefix,
        http_connection_manager::RouteSpecifier::RouteConfig(route),
        mesh,
        rbac::http_filters(&weft_policy::rbac::compile(policies, false)),
        true,
    )]
}

fn listener(
    name: &str,
    ip: &str,
    port: u16,
    direction: TrafficDirection,
    filters: Vec<Filter>,
) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket_address(ip, port)),
        filter_chains: vec![FilterChain {
            filters,
            ..Default::default()
        }],
        traffic_direction: direction as i32,
        ..Default::default()
    }
}

fn router_filter() -> HttpFilter {
    HttpFilter {
        name: names::ROUTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack(
            &Router::default(),
        ))),
        ..Default::default()
    }
}

/// `filters` run before the router (authorization, on inbound chains). Paths are normalized as the
/// mesh says before any filter sees them. Inbound, the client certificate the sidecar verified is
/// appended to `x-forwarded-client-cert`, as Istio configures it; outbound, Envoy's default
/// (`SANITIZE`) drops whatever the application sent.
fn hcm_filter(
    stat_prefix: &str,
    routes: http_connection_manager::RouteSpecifier,
    mesh: &MeshOptions,
    mut filters: Vec<HttpFilter>,
    inbound: bool,
) -> Filter {
    let access_log = access_logs(mesh);
    let (forward_client_cert_details, set_current_client_cert_details) = if inbound {
        (
            http_connection_manager::ForwardClientCertDetails::AppendForward,
            Some(http_connection_manager::SetCurrentClientCertDetails {
                subject: Some(wkt::BoolValue { value: true }),
                dns: true,
                uri: true,
                ..Default::default()
            }),
        )
    } else {
        (
            http_connection_manager::ForwardClientCertDetails::Sanitize,
            None,
        )
    };
    let normalization = mesh.path_normalization;
    let hcm = HttpConnectionManager {
        normalize_path: (normalization != PathNormalization::None)
            .then_some(wkt::BoolValue { value: true }),
        merge_slashes: matches!(
            normalization,
            PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes
        ),
        path_with_escaped_slashes_action: if normalization
            == PathNormalization::DecodeAndMergeSlashes
        {
            http_connection_manager::PathWithEscapedSlashesAction::UnescapeAndForward as i32
        } else {
            0
        },
        forward_client_cert_details: forward_client_cert_details as i32,
        set_current_client_cert_details,
        stat_prefix: stat_prefix.to_string(),
        route_specifier: Some(routes),
        http_filters: {
            filters.push(router_filter());
            filters
        },
        access_log,
        upgrade_configs: vec![http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    Filter {
        name: names::HCM.into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
    }
}

fn api_listener(name: &str) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: name.to_string(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.to_string(),
        })),
        http_filters: vec![router_filter()],
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack(&hcm)),
        }),
        ..Default::default()
    }
}

/// The mesh's access log (`meshConfig.accessLogFile`), for HTTP connection managers and TCP proxies.
fn access_logs(mesh: &MeshOptions) -> Vec<AccessLog> {
    (!mesh.access_log_file.is_empty())
        .then(|| AccessLog {
            name: names::FILE_ACCESS_LOG.into(),
            config_type: Some(access_log::ConfigType::TypedConfig(pack(&FileAccessLog {
                path: mesh.access_log_file.clone(),
                ..Default::default()
            }))),
            ..Default::default()
        })
        .into_iter()
        .collect()
}

fn tcp_proxy_filter(
    stat_prefix: &str,
    cluster: tcp_proxy::ClusterSpecifier,
    mesh: &MeshOptions,
) -> Filter {
    let proxy = TcpProxy {
        stat_prefix: stat_prefix.to_string(),
        cluster_specifier: Some(cluster),
        access_log: access_logs(mesh),
        ..Default::default()
    };
    Filter {
        name: names::TCP_PROXY.into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack(&proxy))),
    }
}

/// Where TCP traffic to a service port goes: a VirtualService `tcp` route for the port, or the service.
fn tcp_destination(model: &Model, svc: &Service, port: u16) -> tcp_proxy::ClusterSpecifier {
    let route = model.virtual_service_for(svc).and_then(|vs| {
        vs.spec
            .tcp
            .iter()
            .find(|r| {
                r.matches.is_empty() || r.matches.iter().any(|m| m.port.is_none_or(|p| p == port))
            })
            .map(|r| (vs.metadata.namespace().to_string(), r))
    });
    let Some((ns, route)) = route.filter(|(_, r)| !r.route.is_empty()) else {
        return tcp_proxy::ClusterSpecifier::Cluster(outbound_cluster_name(
            port,
            "",
            &svc.hostname,
        ));
    };
    let clusters: Vec<_> = route
        .route
        .iter()
        .map(|d| tcp_proxy::weighted_cluster::ClusterWeight {
            name: destination_cluster(model, &d.destination, &ns, port),
            weight: d.weight.unwrap_or(100 / route.route.len() as u32),
            ..Default::default()
        })
        .collect();
    if let [only] = clusters.as_slice() {
        return tcp_proxy::ClusterSpecifier::Cluster(only.name.clone());
    }
    tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster { clusters })
}

/// The cluster a VirtualService destination names: its port, or the service's only port, or the port
/// the traffic arrived on.
fn destination_cluster(model: &Model, dest: &Destination, ns: &str, listener_port: u16) -> String {
    let host = fqdn(&dest.host, ns);
    let port = dest.port.as_ref().map(|p| p.number).unwrap_or_else(|| {
        match model
            .registry
            .services
            .get(&host)
            .map(|s| s.ports.as_slice())
        {
            Some([only]) => only.number,
            _ => listener_port,
        }
    });
    outbound_cluster_name(port, dest.subset.as_deref().unwrap_or(""), &host)
}

/// The names a service answers to on one port: its FQDN and, for Kubernetes services, the shorter forms
/// a client in the proxy's namespace (or any namespace) can use, and its virtual addresses (a client
/// calling `http://<ClusterIP>/` sends that as its Host), each with and without the port, as istiod
/// lists them.
fn domains(svc: &Service, port: u16, proxy_namespace: &str) -> Vec<String> {
    let mut names = vec![svc.hostname.clone()];
    names.extend(
        svc.addresses
            .iter()
            .filter(|a| a.parse::<IpAddr>().is_ok())
            .map(|a| match a.parse::<IpAddr>() {
                Ok(IpAddr::V6(_)) => format!("[{a}]"),
                _ => a.clone(),
            }),
    );
    if let Some(stem) = svc
        .hostname
        .strip_suffix(&format!(".svc.{}", crate::registry::DNS_DOMAIN))
    {
        names.push(format!("{stem}.svc"));
        names.push(stem.to_string());
        if svc.namespace == proxy_namespace {
            names.push(svc.name.clone());
        }
    }
    let with_ports: Vec<String> = names.iter().map(|n| format!("{n}:{port}")).collect();
    names.extend(with_ports);
    names
}

fn virtual_host(model: &Model, svc: &Service, port: u16, proxy_namespace: &str) -> VirtualHost {
    let routes = match model.virtual_service_for(svc) {
        Some(vs) => vs
            .spec
            .http
            .iter()
            .flat_map(|r| http_routes(model, r, vs.metadata.namespace(), port))
            .collect(),
        None => vec![Route {
            name: "default".into(),
            r#match: Some(prefix_match("/")),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                    outbound_cluster_name(port, "", &svc.hostname),
                )),
                timeout: Some(duration(std::time::Duration::ZERO)),
                retry_policy: Some(default_retry_policy()),
                ..Default::default()
            })),
            ..Default::default()
        }],
    };
    VirtualHost {
        name: format!("{}:{port}", svc.hostname),
        domains: domains(svc, port, proxy_namespace),
        routes,
        ..Default::default()
    }
}

fn prefix_match(prefix: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(prefix.into())),
        ..Default::default()
    }
}

fn string_matcher(sm: &StringMatch) -> Option<StringMatcher> {
    let pattern = if let Some(v) = &sm.exact {
        string_matcher::MatchPattern::Exact(v.clone())
    } else if let Some(v) = &sm.prefix {
        string_matcher::MatchPattern::Prefix(v.clone())
    } else if let Some(v) = &sm.regex {
        string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: v.clone(),
            ..Default::default()
        })
    } else {
        return None;
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    })
}

fn header_matcher(name: &str, sm: &StringMatch, invert: bool) -> HeaderMatcher {
    let spec = match string_matcher(sm) {
        Some(m) => header_matcher::HeaderMatchSpecifier::StringMatch(m),
        None => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
    };
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(spec),
        invert_match: invert,
        ..Default::default()
    }
}

fn route_match(m: &HttpMatchRequest) -> RouteMatch {
    let path = match &m.uri {
        Some(StringMatch { exact: Some(v), .. }) => route_match::PathSpecifier::Path(v.clone()),
        Some(StringMatch {
            prefix: Some(v), ..
        }) => route_match::PathSpecifier::Prefix(v.clone()),
        Some(StringMatch { regex: Some(v), .. }) => {
            route_match::PathSpecifier::SafeRegex(RegexMatcher {
                regex: v.clone(),
                ..Default::default()
            })
        }
        _ => route_match::PathSpecifier::Prefix("/".into()),
    };
    let mut headers: Vec<HeaderMatcher> = m
        .headers
        .iter()
        .map(|(k, v)| header_matcher(k, v, false))
        .collect();
    headers.extend(
        m.without_headers
            .iter()
            .map(|(k, v)| header_matcher(k, v, true)),
    );
    if let Some(method) = &m.method {
        headers.push(header_matcher(":method", method, false));
    }
    if let Some(authority) = &m.authority {
        headers.push(header_matcher(":authority", authority, false));
    }
    let query_parameters = m
        .query_params
        .iter()
        .map(|(k, v)| QueryParameterMatcher {
            name: k.clone(),
            query_parameter_match_specifier: Some(match string_matcher(v) {
                Some(sm) => query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(sm),
                None => query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true),
            }),
        })
        .collect();
    RouteMatch {
        path_specifier: Some(path),
        case_sensitive: m.ignore_uri_case.then_some(wkt::BoolValue { value: false }),
        headers,
        query_parameters,
        ..Default::default()
    }
}

fn header_options(ops: &HeaderOperations) -> Vec<HeaderValueOption> {
    let set = ops
        .set
        .iter()
        .map(|kv| (kv, HeaderAppendAction::OverwriteIfExistsOrAdd));
    let add = ops
        .add
        .iter()
        .map(|kv| (kv, HeaderAppendAction::AppendIfExistsOrAdd));
    set.chain(add)
        .map(|((k, v), action)| HeaderValueOption {
            header: Some(HeaderValue {
                key: k.clone(),
                value: v.clone(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        })
        .collect()
}

fn default_retry_policy() -> RetryPolicy {
    RetryPolicy {
        retry_on: DEFAULT_RETRY_ON.into(),
        num_retries: Some(wkt::UInt32Value {
            value: DEFAULT_RETRY_ATTEMPTS,
        }),
        retriable_status_codes: vec![503],
        ..Default::default()
    }
}

/// One Istio HTTP route becomes one Envoy route per match condition (or one catch-all), each with the
/// same action, in order. Matches on another port than this listener's are dropped, as istiod does.
fn http_routes(model: &Model, r: &HttpRoute, ns: &str, port: u16) -> Vec<Route> {
    let matches: Vec<RouteMatch> = if r.matches.is_empty() {
        vec![prefix_match("/")]
    } else {
        r.matches
            .iter()
            .filter(|m| m.port.is_none_or(|p| p == port))
            .map(route_match)
            .collect()
    };
    let mut template = Route {
        name: r.name.clone().unwrap_or_default(),
        ..Default::default()
    };
    if let Some(h) = &r.headers {
        if let Some(req) = &h.request {
            template.request_headers_to_add = header_options(req);
            template.request_headers_to_remove = req.remove.clone();
        }
        if let Some(resp) = &h.response {
            template.response_headers_to_add = header_options(resp);
            template.response_headers_to_remove = resp.remove.clone();
        }
    }
    template.action = Some(if let Some(d) = &r.direct_response {
        route::Action::DirectResponse(DirectResponseAction {
            status: d.status.into(),
            body: d
                .body
                .as_ref()
                .and_then(|b| b.string.clone())
                .map(|s| DataSource {
                    specifier: Some(data_source::Specifier::InlineString(s)),
                    ..Default::default()
                }),
            ..Default::default()
        })
    } else if let Some(rd) = &r.redirect {
        route::Action::Redirect(RedirectAction {
            host_redirect: rd.authority.clone().unwrap_or_default(),
            port_redirect: rd.port.map(u32::from).unwrap_or_default(),
            path_rewrite_specifier: rd
                .uri
                .clone()
                .map(redirect_action::PathRewriteSpecifier::PathRedirect),
            scheme_rewrite_specifier: rd
                .scheme
                .clone()
                .map(redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
            response_code: match rd.redirect_code.unwrap_or(301) {
                302 => redirect_action::RedirectResponseCode::Found,
                303 => redirect_action::RedirectResponseCode::SeeOther,
                307 => redirect_action::RedirectResponseCode::TemporaryRedirect,
                308 => redirect_action::RedirectResponseCode::PermanentRedirect,
                _ => redirect_action::RedirectResponseCode::MovedPermanently,
            } as i32,
            ..Default::default()
        })
    } else {
        route::Action::Route(route_action(model, r, ns, port))
    });
    matches
        .into_iter()
        .map(|m| Route {
            r#match: Some(m),
            ..template.clone()
        })
        .collect()
}

fn route_action(model: &Model, r: &HttpRoute, ns: &str, port: u16) -> RouteAction {
    let cluster_specifier = if let [only] = r.route.as_slice() {
        route_action::ClusterSpecifier::Cluster(destination_cluster(
            model,
            &only.destination,
            ns,
            port,
        ))
    } else {
        let clusters = r
            .route
            .iter()
            .map(|d| {
                let mut cw = ClusterWeight {
                    name: destination_cluster(model, &d.destination, ns, port),
                    weight: Some(wkt::UInt32Value {
                        value: d.weight.unwrap_or(0),
                    }),
                    ..Default::default()
                };
                if let Some(h) = &d.headers {
                    if let Some(req) = &h.request {
                        cw.request_headers_to_add = header_options(req);
                        cw.request_headers_to_remove = req.remove.clone();
                    }
                    if let Some(resp) = &h.response {
                        cw.response_headers_to_add = header_options(resp);
                        cw.response_headers_to_remove = resp.remove.clone();
                    }
                }
                cw
            })
            .collect();
        route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters,
            ..Default::default()
        })
    };
    let retry_policy = match &r.retries {
        None => Some(default_retry_policy()),
        Some(retries) if retries.attempts == 0 => None,
        Some(retries) => Some(RetryPolicy {
            retry_on: retries
                .retry_on
                .clone()
                .unwrap_or_else(|| DEFAULT_RETRY_ON.into()),
            num_retries: Some(wkt::UInt32Value {
                value: retries.attempts,
            }),
            per_try_timeout: retries.per_try_timeout.map(|d| duration(d.0)),
            retry_back_off: retries.backoff.map(|d| retry_policy::RetryBackOff {
                base_interval: Some(duration(d.0)),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    RouteAction {
        cluster_specifier: Some(cluster_specifier),
        prefix_rewrite: r
            .rewrite
            .as_ref()
            .and_then(|rw| rw.uri.clone())
            .unwrap_or_default(),
        host_rewrite_specifier: r
            .rewrite
            .as_ref()
            .and_then(|rw| rw.authority.clone())
            .map(route_action::HostRewriteSpecifier::HostRewriteLiteral),
        timeout: Some(duration(r.timeout.unwrap_or_default().0)),
        retry_policy,
        ..Default::default()
    }
}

// Used by the model to pick rules; kept here beside the translation that relies on these choices.
pub(crate) fn rule_applies(hosts: &[String], rule_ns: &str, svc: &Service) -> bool {
    hosts.iter().any(|h| fqdn(h, rule_ns) == svc.hostname)
}

pub(crate) fn dr_applies(dr: &Object<DestinationRuleSpec>, svc: &Service) -> bool {
    fqdn(&dr.spec.host, dr.metadata.namespace()) == svc.hostname
}

pub(crate) fn vs_applies(vs: &Object<VirtualServiceSpec>, svc: &Service) -> bool {
    rule_applies(&vs.spec.hosts, vs.metadata.namespace(), svc)
}

pub(crate) fn sidecar_selects(sc: &Object<SidecarSpec>, proxy: &Proxy) -> Option<usize> {
    if sc.metadata.namespace() != proxy.namespace {
        return None;
    }
    match &sc.spec.workload_selector {
        Some(sel) if labels_match(&sel.labels, &proxy.labels) => Some(sel.labels.len() + 1),
        Some(_) => None,
        None => Some(0),
    }
}

mod capture;
mod mtls;
mod rbac;
#[cfg(test)]
mod tests;
