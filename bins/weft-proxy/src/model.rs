//! The proxy's own config types, converted from Envoy's at the xDS boundary.
//!
//! Conversion is where unsupported config is caught: every field that would change behaviour and that
//! this proxy does not implement fails the conversion with an error naming the resource and the field,
//! which the ADS client sends back as the NACK's `error_detail`. Nothing is silently ignored.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use prost::{Message, Name};
use regex::Regex;

pub use crate::normalize::PathNormalization;
use serde::Serialize;

use crate::detect::Detected;

mod rbac;
mod tls;
pub use tls::{DownstreamTls, UpstreamTls};
use weft_xds::{
    pb::{
        envoy::{
            config::{
                cluster::v3::{Cluster, cluster},
                core::v3::{
                    HeaderValueOption, HealthStatus, Metadata, address,
                    header_value_option::HeaderAppendAction, socket_address,
                },
                endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
                listener::v3::{FilterChainMatch, Listener, filter, listener_filter},
                route::v3::{
                    HeaderMatcher, RouteConfiguration, RouteMatch, header_matcher,
                    query_parameter_matcher, redirect_action, route, route_action, route_match,
                },
            },
            extensions::{
                access_loggers::file::v3::FileAccessLog,
                filters::{
                    http::{rbac::v3::Rbac as HttpRbac, router::v3::Router},
                    listener::{
                        http_inspector::v3::HttpInspector, original_dst::v3::OriginalDst,
                        tls_inspector::v3::TlsInspector,
                    },
                    network::{
                        http_connection_manager::v3::{
                            HttpConnectionManager, http_connection_manager, http_filter,
                        },
                        rbac::v3::Rbac as NetworkRbac,
                        tcp_proxy::v3::{TcpProxy, tcp_proxy},
                    },
                },
                upstreams::http::v3::{HttpProtocolOptions, http_protocol_options},
            },
            r#type::matcher::v3::{StringMatcher, string_matcher},
        },
        google::protobuf::{self as wkt, Any},
    },
    structs,
};

/// Why a resource was rejected: `<kind> <name>: <field>: <reason>`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name}: {field}: {reason}")]
pub struct Rejection {
    pub kind: &'static str,
    pub name: String,
    pub field: String,
    pub reason: String,
}

fn reject(
    kind: &'static str,
    name: &str,
    field: impl Into<String>,
    reason: impl Into<String>,
) -> Rejection {
    Rejection {
        kind,
        name: name.to_string(),
        field: field.into(),
        reason: reason.into(),
    }
}

fn unsupported(kind: &'static str, name: &str, field: &str) -> Rejection {
    reject(kind, name, field, "not supported by weft-proxy")
}

fn unpack<T: Message + Name + Default>(
    any: &Any,
    kind: &'static str,
    name: &str,
    field: &str,
) -> Result<T, Rejection> {
    if any.type_url != T::type_url() {
        return Err(reject(
            kind,
            name,
            field,
            format!("unsupported type {}", any.type_url),
        ));
    }
    T::decode(any.value.as_slice())
        .map_err(|e| reject(kind, name, field, format!("cannot decode: {e}")))
}

fn to_duration(d: &wkt::Duration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

fn socket_addr(
    addr: Option<&weft_xds::pb::envoy::config::core::v3::Address>,
    kind: &'static str,
    name: &str,
) -> Result<SocketAddr, Rejection> {
    let Some(address::Address::SocketAddress(sa)) = addr.and_then(|a| a.address.as_ref()) else {
        return Err(reject(
            kind,
            name,
            "address",
            "a socket address is required",
        ));
    };
    let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        return Err(reject(
            kind,
            name,
            "address.port_value",
            "a port number is required",
        ));
    };
    let ip = sa.address.parse().map_err(|_| {
        reject(
            kind,
            name,
            "address.address",
            format!("{:?} is not an IP address", sa.address),
        )
    })?;
    let port = u16::try_from(port)
        .map_err(|_| reject(kind, name, "address.port_value", "out of range"))?;
    Ok(SocketAddr::new(ip, port))
}

// === Listeners ===

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub inbound: bool,
    /// False for listeners that only receive connections handed over by a capture listener (Envoy's
    /// `bind_to_port: false`), such as `0.0.0.0_9080` behind 15001.
    pub bind: bool,
    /// The outbound capture listener (15001): it hands each connection to the listener for the
    /// connection's original destination, as Envoy's `use_original_dst` does, or else to its own chains.
    pub use_original_dst: bool,
    /// The `original_dst` listener filter (the inbound capture listener, 15006): chains are matched
    /// against the connection's original destination, with no hand-off to other listeners.
    pub restore_original_dst: bool,
    /// Listener filters `http_inspector`/`tls_inspector`: chains may be picked by the first bytes.
    pub inspect: bool,
    /// How long to wait for the first bytes before going on without them.
    pub detect_timeout: Duration,
    pub chains: Vec<FilterChainConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FilterChainConfig {
    /// Taken only by connections to this port (`filter_chain_match.destination_port`); `None` takes the rest.
    pub destination_port: Option<u16>,
    pub server_names: Vec<String>,
    pub transport_protocol: Option<String>,
    pub application_protocols: Vec<String>,
    /// Terminate mTLS before the filters see the bytes.
    pub tls: Option<DownstreamTls>,
    pub kind: ListenerKind,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ListenerKind {
    Http(HttpConfig),
    Tcp(TcpConfig),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpConfig {
    pub routes: RouteSource,
    /// The file access log lines go to (`/dev/stdout` in Istio's demo profile), if any.
    pub access_log: Option<String>,
    pub websocket: bool,
    /// Authorization filters, in order, before routing.
    #[serde(skip)]
    pub rbac: Vec<weft_policy::rbac::Rbac>,
    /// How the path is normalized before authorization and routing.
    pub normalization: PathNormalization,
    /// What happens to `x-forwarded-client-cert`.
    pub xfcc: ForwardClientCert,
}

/// Envoy's `forward_client_cert_details`. Without a verified client certificate the header is
/// dropped, except under `AlwaysForwardOnly`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum ForwardClientCert {
    /// Dropped (Envoy's default, and Istio's outbound).
    #[default]
    Sanitize,
    ForwardOnly,
    /// The verified client certificate is appended (Istio's inbound).
    AppendForward(CertDetails),
    /// Replaced by the verified client certificate.
    SanitizeSet(CertDetails),
    AlwaysForwardOnly,
}

/// `set_current_client_cert_details`: which parts of the client certificate go into the header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CertDetails {
    pub subject: bool,
    pub uri: bool,
    pub dns: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum RouteSource {
    Rds(String),
    Inline(RouteTable),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TcpConfig {
    pub clusters: Vec<WeightedCluster>,
    /// The file each connection's access log line goes to, if any.
    pub access_log: Option<String>,
    /// Authorization filters, decided once when the connection opens.
    #[serde(skip)]
    pub rbac: Vec<weft_policy::rbac::Rbac>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    pub headers: HeaderOps,
}

impl TryFrom<&Listener> for ListenerConfig {
    type Error = Rejection;

    fn try_from(l: &Listener) -> Result<Self, Rejection> {
        const K: &str = "listener";
        let name = l.name.as_str();
        if l.api_listener.is_some() {
            return Err(reject(
                K,
                name,
                "api_listener",
                "API listeners are for proxyless gRPC clients, not a proxy",
            ));
        }
        let mut inspect = false;
        let mut original_dst_filter = false;
        for (i, f) in l.listener_filters.iter().enumerate() {
            let field = format!("listener_filters[{i}] {}", f.name);
            if f.filter_disabled.is_some() {
                return Err(unsupported(K, name, &format!("{field}.filter_disabled")));
            }
            let Some(listener_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                return Err(reject(K, name, field, "typed_config is required"));
            };
            if any.type_url == HttpInspector::type_url() || any.type_url == TlsInspector::type_url()
            {
                inspect = true;
            } else if any.type_url == OriginalDst::type_url() {
                original_dst_filter = true;
            } else {
                return Err(reject(
                    K,
                    name,
                    field,
                    format!("unsupported listener filter {}", any.type_url),
                ));
            }
        }
        // Envoy's default is 15s; Istio sets its own. On timeout the connection goes on undetected.
        let detect_timeout = l
            .listener_filters_timeout
            .as_ref()
            .map_or(Duration::from_secs(15), to_duration);
        if l.filter_chain_matcher.is_some() || l.default_filter_chain.is_some() {
            return Err(unsupported(
                K,
                name,
                "filter_chain_matcher/default_filter_chain",
            ));
        }
        if !l.socket_options.is_empty() || l.transparent.as_ref().is_some_and(|v| v.value) {
            return Err(unsupported(K, name, "socket_options/transparent"));
        }
        let address = socket_addr(l.address.as_ref(), K, name)?;
        if l.filter_chains.is_empty() {
            return Err(reject(
                K,
                name,
                "filter_chains",
                "at least one filter chain is required",
            ));
        }
        let mut chains = Vec::new();
        for (i, chain) in l.filter_chains.iter().enumerate() {
            let field = |f: &str| format!("filter_chains[{i}].{f}");
            let tls = match &chain.transport_socket {
                Some(ts) => tls::downstream(ts, K, name, &field("transport_socket"))?,
                None => None,
            };
            let destination_port = match &chain.filter_chain_match {
                None => None,
                Some(m) => {
                    let supported = FilterChainMatch {
                        destination_port: m.destination_port,
                        server_names: m.server_names.clone(),
                        transport_protocol: m.transport_protocol.clone(),
                        application_protocols: m.application_protocols.clone(),
                        ..Default::default()
                    };
                    if *m != supported {
                        return Err(reject(
                            K,
                            name,
                            field("filter_chain_match"),
                            "only destination_port, server_names, transport_protocol and application_protocols are supported",
                        ));
                    }
                    match m.destination_port.as_ref() {
                        Some(p) => Some(u16::try_from(p.value).map_err(|_| {
                            reject(
                                K,
                                name,
                                field("filter_chain_match.destination_port"),
                                "out of range",
                            )
                        })?),
                        None => None,
                    }
                }
            };
            // Network RBAC filters, then one terminal filter (HTTP connection manager or TCP proxy).
            let Some((terminal, before)) = chain.filters.split_last() else {
                return Err(reject(
                    K,
                    name,
                    field("filters"),
                    "a terminal filter is required",
                ));
            };
            let mut rbac = Vec::new();
            for (j, f) in before.iter().enumerate() {
                let f_field = field(&format!("filters[{j}] {}", f.name));
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    return Err(reject(K, name, f_field, "typed_config is required"));
                };
                if any.type_url != NetworkRbac::type_url() {
                    return Err(reject(
                        K,
                        name,
                        f_field,
                        format!(
                            "only RBAC may come before the terminal filter, not {}",
                            any.type_url
                        ),
                    ));
                }
                let config: NetworkRbac = unpack(any, K, name, &f_field)?;
                rbac.extend(rbac::network(&config, K, name, f_field)?);
            }
            let last = chain.filters.len() - 1;
            let t_field = field(&format!("filters[{last}]"));
            let Some(filter::ConfigType::TypedConfig(any)) = &terminal.config_type else {
                return Err(reject(K, name, t_field, "typed_config is required"));
            };
            let kind = if any.type_url == HttpConnectionManager::type_url() {
                if !rbac.is_empty() {
                    return Err(reject(
                        K,
                        name,
                        field("filters"),
                        "network RBAC before an HTTP connection manager is not supported; use the HTTP RBAC filter",
                    ));
                }
                ListenerKind::Http(http_config(&unpack(any, K, name, &t_field)?, name)?)
            } else if any.type_url == TcpProxy::type_url() {
                let mut tcp = tcp_config(&unpack(any, K, name, &t_field)?, name)?;
                tcp.rbac = rbac;
                ListenerKind::Tcp(tcp)
            } else {
                return Err(reject(
                    K,
                    name,
                    format!("{t_field} {}", terminal.name),
                    format!("unsupported network filter {}", any.type_url),
                ));
            };
            let m = chain.filter_chain_match.clone().unwrap_or_default();
            chains.push(FilterChainConfig {
                destination_port,
                server_names: m.server_names,
                transport_protocol: Some(m.transport_protocol).filter(|t| !t.is_empty()),
                application_protocols: m.application_protocols,
                tls,
                kind,
            });
        }
        Ok(Self {
            name: name.to_string(),
            address,
            inbound: l.traffic_direction == 1,
            bind: l.bind_to_port.as_ref().is_none_or(|b| b.value),
            use_original_dst: l.use_original_dst.as_ref().is_some_and(|v| v.value),
            restore_original_dst: original_dst_filter,
            inspect,
            detect_timeout,
            chains,
        })
    }
}

impl ListenerConfig {
    /// The chains Envoy would consider for `port`: those for the port if any, else those for any port.
    fn candidates(&self, port: u16) -> impl Iterator<Item = &FilterChainConfig> {
        let for_port = self.chains.iter().any(|c| c.destination_port == Some(port));
        self.chains.iter().filter(move |c| {
            if for_port {
                c.destination_port == Some(port)
            } else {
                c.destination_port.is_none()
            }
        })
    }

    /// Whether picking a chain for `port` depends on what the first bytes say. Only then does the proxy
    /// wait for them, so server-first protocols on ports declared as TCP never stall.
    pub fn needs_detection(&self, port: u16) -> bool {
        self.inspect
            && self.candidates(port).any(|c| {
                !c.application_protocols.is_empty()
                    || c.transport_protocol.is_some()
                    || !c.server_names.is_empty()
            })
    }

    /// Envoy's chain selection: destination port, then server name, transport protocol and application
    /// protocol, the most specific match winning at each step.
    pub fn chain_for(&self, port: u16, detected: Option<&Detected>) -> Option<&FilterChainConfig> {
        let transport = detected.map_or("raw_buffer", Detected::transport_protocol);
        let protocols = detected
            .map(Detected::application_protocols)
            .unwrap_or_default();
        let sni = detected.and_then(Detected::server_name);
        self.candidates(port)
            .filter(|c| {
                c.server_names.is_empty()
                    || sni.is_some_and(|n| c.server_names.iter().any(|s| s == n))
            })
            .filter(|c| {
                c.transport_protocol
                    .as_deref()
                    .is_none_or(|t| t == transport)
            })
            .filter(|c| {
                c.application_protocols.is_empty()
                    || c.application_protocols
                        .iter()
                        .any(|p| protocols.contains(p))
            })
            .max_by_key(|c| {
                (
                    !c.server_names.is_empty(),
                    c.transport_protocol.is_some(),
                    !c.application_protocols.is_empty(),
                )
            })
    }
}

fn http_config(hcm: &HttpConnectionManager, name: &str) -> Result<HttpConfig, Rejection> {
    const K: &str = "listener";
    let supported = HttpConnectionManager {
        stat_prefix: hcm.stat_prefix.clone(),
        route_specifier: hcm.route_specifier.clone(),
        http_filters: hcm.http_filters.clone(),
        access_log: hcm.access_log.clone(),
        upgrade_configs: hcm.upgrade_configs.clone(),
        normalize_path: hcm.normalize_path,
        merge_slashes: hcm.merge_slashes,
        path_with_escaped_slashes_action: hcm.path_with_escaped_slashes_action,
        forward_client_cert_details: hcm.forward_client_cert_details,
        set_current_client_cert_details: hcm.set_current_client_cert_details,
        ..Default::default()
    };
    if *hcm != supported {
        return Err(unsupported(
            K,
            name,
            "http_connection_manager: only stat_prefix, route_specifier, http_filters, access_log, upgrade_configs, normalize_path, merge_slashes, path_with_escaped_slashes_action, forward_client_cert_details and set_current_client_cert_details are supported",
        ));
    }
    let normalization = path_normalization(hcm, name)?;
    let xfcc = forward_client_cert(hcm, name)?;
    // RBAC filters, then the router, last.
    let mut rbac = Vec::new();
    let last = hcm.http_filters.len().checked_sub(1);
    for (i, f) in hcm.http_filters.iter().enumerate() {
        let field = format!("http_filters[{i}] {}", f.name);
        let any = match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(a)) => a,
            _ => return Err(reject(K, name, field, "typed_config is required")),
        };
        if any.type_url == Router::type_url() && Some(i) == last {
            continue;
        }
        if any.type_url == HttpRbac::type_url() {
            let config: HttpRbac = unpack(any, K, name, &field)?;
            rbac.extend(rbac::http(&config, K, name, field)?);
            continue;
        }
        return Err(reject(
            K,
            name,
            field,
            "unsupported HTTP filter (RBAC filters, then the router, are supported)",
        ));
    }
    if last.is_none_or(|l| {
        !matches!(&hcm.http_filters[l].config_type, Some(http_filter::ConfigType::TypedConfig(a)) if a.type_url == Router::type_url())
    }) {
        return Err(reject(K, name, "http_filters", "the router must be the last HTTP filter"));
    }
    let mut websocket = false;
    for u in &hcm.upgrade_configs {
        if !u.upgrade_type.eq_ignore_ascii_case("websocket") {
            return Err(reject(
                K,
                name,
                "upgrade_configs",
                format!("upgrade type {} is not supported", u.upgrade_type),
            ));
        }
        websocket = u.enabled.as_ref().is_none_or(|e| e.value);
    }
    let access_log = file_access_log(&hcm.access_log, name, "access_log")?;
    let routes = match &hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
            RouteSource::Rds(rds.route_config_name.clone())
        }
        Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
            RouteSource::Inline(RouteTable::try_from(rc)?)
        }
        _ => {
            return Err(reject(
                K,
                name,
                "route_specifier",
                "rds or route_config is required",
            ));
        }
    };
    Ok(HttpConfig {
        routes,
        access_log,
        websocket,
        rbac,
        normalization,
        xfcc,
    })
}

fn path_normalization(
    hcm: &HttpConnectionManager,
    name: &str,
) -> Result<PathNormalization, Rejection> {
    use http_connection_manager::PathWithEscapedSlashesAction as A;
    let decode_slashes = match A::try_from(hcm.path_with_escaped_slashes_action) {
        Ok(A::ImplementationSpecificDefault | A::KeepUnchanged) => false,
        Ok(A::UnescapeAndForward) => true,
        _ => {
            return Err(unsupported(
                "listener",
                name,
                "path_with_escaped_slashes_action: only KEEP_UNCHANGED and UNESCAPE_AND_FORWARD are supported",
            ));
        }
    };
    Ok(PathNormalization {
        rfc3986: hcm.normalize_path.is_some_and(|b| b.value),
        merge_slashes: hcm.merge_slashes,
        decode_slashes,
    })
}

fn forward_client_cert(
    hcm: &HttpConnectionManager,
    name: &str,
) -> Result<ForwardClientCert, Rejection> {
    use http_connection_manager::ForwardClientCertDetails as F;
    let details = match &hcm.set_current_client_cert_details {
        None => CertDetails::default(),
        Some(d) => {
            let supported = http_connection_manager::SetCurrentClientCertDetails {
                subject: d.subject,
                dns: d.dns,
                uri: d.uri,
                ..Default::default()
            };
            if *d != supported {
                return Err(unsupported(
                    "listener",
                    name,
                    "set_current_client_cert_details: only subject, dns and uri are supported",
                ));
            }
            CertDetails {
                subject: d.subject.is_some_and(|b| b.value),
                uri: d.uri,
                dns: d.dns,
            }
        }
    };
    Ok(match F::try_from(hcm.forward_client_cert_details) {
        Ok(F::Sanitize) => ForwardClientCert::Sanitize,
        Ok(F::ForwardOnly) => ForwardClientCert::ForwardOnly,
        Ok(F::AppendForward) => ForwardClientCert::AppendForward(details),
        Ok(F::SanitizeSet) => ForwardClientCert::SanitizeSet(details),
        Ok(F::AlwaysForwardOnly) => ForwardClientCert::AlwaysForwardOnly,
        Err(_) => {
            return Err(reject(
                "listener",
                name,
                "forward_client_cert_details",
                "unknown value",
            ));
        }
    })
}

fn tcp_config(tp: &TcpProxy, name: &str) -> Result<TcpConfig, Rejection> {
    const K: &str = "listener";
    let supported = TcpProxy {
        stat_prefix: tp.stat_prefix.clone(),
        cluster_specifier: tp.cluster_specifier.clone(),
        access_log: tp.access_log.clone(),
        ..Default::default()
    };
    if *tp != supported {
        return Err(reject(
            K,
            name,
            "tcp_proxy",
            "only stat_prefix, cluster_specifier and access_log are supported",
        ));
    }
    let clusters = match &tp.cluster_specifier {
        Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => vec![WeightedCluster {
            name: c.clone(),
            weight: 1,
            headers: HeaderOps::default(),
        }],
        Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => w
            .clusters
            .iter()
            .map(|c| WeightedCluster {
                name: c.name.clone(),
                weight: c.weight,
                headers: HeaderOps::default(),
            })
            .collect(),
        None => {
            return Err(reject(
                K,
                name,
                "tcp_proxy.cluster_specifier",
                "a cluster is required",
            ));
        }
    };
    Ok(TcpConfig {
        clusters,
        access_log: file_access_log(&tp.access_log, name, "tcp_proxy.access_log")?,
        rbac: Vec::new(),
    })
}

/// The path of a file access log in Istio's default format; anything else is rejected.
fn file_access_log(
    logs: &[weft_xds::pb::envoy::config::accesslog::v3::AccessLog],
    name: &str,
    field: &str,
) -> Result<Option<String>, Rejection> {
    const K: &str = "listener";
    let mut path = None;
    for (i, log) in logs.iter().enumerate() {
        let Some(weft_xds::pb::envoy::config::accesslog::v3::access_log::ConfigType::TypedConfig(
            any,
        )) = &log.config_type
        else {
            return Err(reject(
                K,
                name,
                format!("{field}[{i}]"),
                "typed_config is required",
            ));
        };
        let file: FileAccessLog = unpack(any, K, name, &format!("{field}[{i}]"))?;
        if log.filter.is_some() || file.access_log_format.is_some() {
            return Err(unsupported(K, name, &format!("{field}[{i}] filter/format")));
        }
        path = Some(file.path);
    }
    Ok(path)
}

// === Routes ===

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHostConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VirtualHostConfig {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<RouteConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouteConfig {
    pub name: String,
    pub matcher: RouteMatcher,
    pub action: RouteAction,
    pub headers: HeaderOps,
}

/// Header changes on the request and the response.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HeaderOps {
    pub request_add: Vec<HeaderAdd>,
    pub request_remove: Vec<String>,
    pub response_add: Vec<HeaderAdd>,
    pub response_remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeaderAdd {
    pub name: String,
    pub value: String,
    /// Replace an existing value instead of appending.
    pub overwrite: bool,
}

#[derive(Clone, Debug, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(#[serde(serialize_with = "ser_regex")] Regex),
}

fn ser_regex<S: serde::Serializer>(r: &Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

impl PartialEq for StringMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            (Self::Exact(a), Self::Exact(b)) | (Self::Prefix(a), Self::Prefix(b)) => a == b,
            (Self::Suffix(a), Self::Suffix(b)) | (Self::Contains(a), Self::Contains(b)) => a == b,
            _ => false,
        }
    }
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v) => value == v,
            Self::Prefix(v) => value.starts_with(v.as_str()),
            Self::Suffix(v) => value.ends_with(v.as_str()),
            Self::Contains(v) => value.contains(v.as_str()),
            Self::Regex(r) => r
                .find(value)
                .is_some_and(|m| m.start() == 0 && m.end() == value.len()),
        }
    }
}

/// Envoy's regexes match the whole value, so they are anchored here.
fn compile_regex(re: &str, field: &str, name: &str) -> Result<Regex, Rejection> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| {
        reject(
            "route_configuration",
            name,
            field,
            format!("invalid regex: {e}"),
        )
    })
}

fn string_match(m: &StringMatcher, field: &str, name: &str) -> Result<StringMatch, Rejection> {
    if m.ignore_case {
        return Err(unsupported(
            "route_configuration",
            name,
            &format!("{field}.ignore_case"),
        ));
    }
    Ok(match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(v)) => StringMatch::Exact(v.clone()),
        Some(string_matcher::MatchPattern::Prefix(v)) => StringMatch::Prefix(v.clone()),
        Some(string_matcher::MatchPattern::Suffix(v)) => StringMatch::Suffix(v.clone()),
        Some(string_matcher::MatchPattern::Contains(v)) => StringMatch::Contains(v.clone()),
        Some(string_matcher::MatchPattern::SafeRegex(r)) => {
            StringMatch::Regex(compile_regex(&r.regex, field, name)?)
        }
        _ => return Err(unsupported("route_configuration", name, field)),
    })
}

#[derive(Clone, Debug, Serialize)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(#[serde(serialize_with = "ser_regex")] Regex),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouteMatcher {
    pub path: PathMatchWrapper,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
}

/// Path matcher; a newtype so regexes compare by pattern.
#[derive(Clone, Debug, Serialize)]
pub struct PathMatchWrapper(pub PathMatch);

impl PartialEq for PathMatchWrapper {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (PathMatch::Regex(a), PathMatch::Regex(b)) => a.as_str() == b.as_str(),
            (PathMatch::Prefix(a), PathMatch::Prefix(b))
            | (PathMatch::Exact(a), PathMatch::Exact(b)) => a == b,
            _ => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeaderMatch {
    pub name: String,
    /// `None` means "present".
    pub value: Option<StringMatch>,
    pub invert: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueryMatch {
    pub name: String,
    pub value: Option<StringMatch>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum RouteAction {
    Forward(ForwardConfig),
    Redirect(RedirectConfig),
    Direct { status: u16, body: String },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ForwardConfig {
    pub clusters: Vec<WeightedCluster>,
    pub prefix_rewrite: Option<String>,
    pub host_rewrite: Option<String>,
    /// `None` means no timeout (Envoy's `0s`).
    pub timeout: Option<Duration>,
    pub retry: Option<RetryConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryConfig {
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub base_backoff: Duration,
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_connect_failure: bool,
    pub on_refused_stream: bool,
    pub on_reset: bool,
    pub retriable_status_codes: Vec<u16>,
    /// gRPC status names (`unavailable`, `cancelled`, ...) from `retry_on`.
    pub grpc_statuses: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RedirectConfig {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub scheme: Option<String>,
    pub status: u16,
}

fn header_adds(
    opts: &[HeaderValueOption],
    field: &str,
    name: &str,
) -> Result<Vec<HeaderAdd>, Rejection> {
    opts.iter()
        .map(|o| {
            let h = o
                .header
                .as_ref()
                .ok_or_else(|| reject("route_configuration", name, field, "header is required"))?;
            let overwrite = o.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
            if o.append_action == HeaderAppendAction::AddIfAbsent as i32
                || o.append_action == HeaderAppendAction::OverwriteIfExists as i32
            {
                return Err(reject(
                    "route_configuration",
                    name,
                    field,
                    "append_action ADD_IF_ABSENT/OVERWRITE_IF_EXISTS is not supported",
                ));
            }
            Ok(HeaderAdd {
                name: h.key.to_ascii_lowercase(),
                value: h.value.clone(),
                overwrite,
            })
        })
        .collect()
}

fn retry_config(
    p: &weft_xds::pb::envoy::config::route::v3::RetryPolicy,
    name: &str,
) -> Result<RetryConfig, Rejection> {
    let mut c = RetryConfig {
        num_retries: p.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout: p
            .per_try_timeout
            .as_ref()
            .map(to_duration)
            .filter(|d| !d.is_zero()),
        base_backoff: p
            .retry_back_off
            .as_ref()
            .and_then(|b| b.base_interval.as_ref())
            .map_or(Duration::from_millis(25), to_duration),
        on_5xx: false,
        on_gateway_error: false,
        on_connect_failure: false,
        on_refused_stream: false,
        on_reset: false,
        retriable_status_codes: Vec::new(),
        grpc_statuses: Vec::new(),
    };
    for cond in p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match cond {
            "5xx" => c.on_5xx = true,
            "gateway-error" => c.on_gateway_error = true,
            "connect-failure" => c.on_connect_failure = true,
            "refused-stream" => c.on_refused_stream = true,
            "reset" => c.on_reset = true,
            "retriable-status-codes" => {
                c.retriable_status_codes = p
                    .retriable_status_codes
                    .iter()
                    .filter_map(|s| u16::try_from(*s).ok())
                    .collect()
            }
            "cancelled" => c.grpc_statuses.push(1),
            "deadline-exceeded" => c.grpc_statuses.push(4),
            "resource-exhausted" => c.grpc_statuses.push(8),
            "internal" => c.grpc_statuses.push(13),
            "unavailable" => c.grpc_statuses.push(14),
            other => {
                return Err(reject(
                    "route_configuration",
                    name,
                    "retry_policy.retry_on",
                    format!("condition {other:?} is not supported"),
                ));
            }
        }
    }
    if !p.retry_host_predicate.is_empty()
        || p.retry_priority.is_some()
        || !p.retriable_headers.is_empty()
    {
        return Err(unsupported(
            "route_configuration",
            name,
            "retry_policy host predicates/priority/retriable_headers",
        ));
    }
    Ok(c)
}

fn route_matcher(m: &RouteMatch, name: &str) -> Result<RouteMatcher, Rejection> {
    if m.grpc.is_some()
        || m.tls_context.is_some()
        || !m.dynamic_metadata.is_empty()
        || m.runtime_fraction.is_some()
    {
        return Err(unsupported(
            "route_configuration",
            name,
            "match grpc/tls_context/dynamic_metadata/runtime_fraction",
        ));
    }
    let path = match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(route_match::PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(route_match::PathSpecifier::SafeRegex(r)) => {
            PathMatch::Regex(compile_regex(&r.regex, "match.safe_regex", name)?)
        }
        _ => {
            return Err(unsupported(
                "route_configuration",
                name,
                "match.path_specifier",
            ));
        }
    };
    let headers = m
        .headers
        .iter()
        .map(|h| header_match(h, name))
        .collect::<Result<_, _>>()?;
    let query = m
        .query_parameters
        .iter()
        .map(|q| {
            let value = match &q.query_parameter_match_specifier {
                Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(sm)) => {
                    Some(string_match(sm, "match.query_parameters", name)?)
                }
                Some(query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true))
                | None => None,
                Some(query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(
                    false,
                )) => {
                    return Err(unsupported(
                        "route_configuration",
                        name,
                        "match.query_parameters.present_match=false",
                    ));
                }
            };
            Ok(QueryMatch {
                name: q.name.clone(),
                value,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(RouteMatcher {
        path: PathMatchWrapper(path),
        case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
        headers,
        query,
    })
}

fn header_match(h: &HeaderMatcher, name: &str) -> Result<HeaderMatch, Rejection> {
    let value = match &h.header_match_specifier {
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) => {
            Some(string_match(sm, "match.headers", name)?)
        }
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)) | None => None,
        _ => {
            return Err(unsupported(
                "route_configuration",
                name,
                &format!("match.headers[{}] matcher", h.name),
            ));
        }
    };
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        value,
        invert: h.invert_match,
    })
}

impl TryFrom<&RouteConfiguration> for RouteTable {
    type Error = Rejection;

    fn try_from(rc: &RouteConfiguration) -> Result<Self, Rejection> {
        const K: &str = "route_configuration";
        let name = rc.name.as_str();
        if !rc.request_headers_to_add.is_empty()
            || !rc.response_headers_to_add.is_empty()
            || rc.vhds.is_some()
        {
            return Err(unsupported(
                K,
                name,
                "route-configuration-level headers/vhds",
            ));
        }
        let mut virtual_hosts = Vec::new();
        for vh in &rc.virtual_hosts {
            if vh.retry_policy.is_some()
                || !vh.request_headers_to_add.is_empty()
                || !vh.typed_per_filter_config.is_empty()
            {
                return Err(unsupported(
                    K,
                    name,
                    &format!(
                        "virtual_hosts[{}] retry_policy/headers/typed_per_filter_config",
                        vh.name
                    ),
                ));
            }
            let mut routes = Vec::new();
            for (i, r) in vh.routes.iter().enumerate() {
                let field = |f: &str| format!("virtual_hosts[{}].routes[{i}].{f}", vh.name);
                if !r.typed_per_filter_config.is_empty() || r.decorator.is_some() {
                    return Err(unsupported(
                        K,
                        name,
                        &field("typed_per_filter_config/decorator"),
                    ));
                }
                let matcher = route_matcher(
                    r.r#match
                        .as_ref()
                        .ok_or_else(|| reject(K, name, field("match"), "required"))?,
                    name,
                )?;
                let action = match &r.action {
                    Some(route::Action::Route(ra)) => {
                        RouteAction::Forward(forward_config(ra, name, &field("route"))?)
                    }
                    Some(route::Action::Redirect(rd)) => RouteAction::Redirect(RedirectConfig {
                        host: Some(rd.host_redirect.clone()).filter(|s| !s.is_empty()),
                        port: u16::try_from(rd.port_redirect).ok().filter(|p| *p != 0),
                        path: match &rd.path_rewrite_specifier {
                            Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => {
                                Some(p.clone())
                            }
                            None => None,
                            Some(_) => {
                                return Err(unsupported(
                                    K,
                                    name,
                                    &field("redirect.prefix_rewrite/regex_rewrite"),
                                ));
                            }
                        },
                        scheme: match &rd.scheme_rewrite_specifier {
                            Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) => {
                                Some(s.clone())
                            }
                            Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => {
                                Some("https".into())
                            }
                            _ => None,
                        },
                        status: match rd.response_code {
                            1 => 302,
                            2 => 303,
                            3 => 307,
                            4 => 308,
                            _ => 301,
                        },
                    }),
                    Some(route::Action::DirectResponse(d)) => {
                        let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                            Some(weft_xds::pb::envoy::config::core::v3::data_source::Specifier::InlineString(s)) => s.clone(),
                            Some(weft_xds::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => String::from_utf8_lossy(b).into_owned(),
                            None => String::new(),
                            Some(_) => return Err(unsupported(K, name, &field("direct_response.body.filename"))),
                        };
                        let status = u16::try_from(d.status).map_err(|_| {
                            reject(K, name, field("direct_response.status"), "out of range")
                        })?;
                        RouteAction::Direct { status, body }
                    }
                    _ => return Err(unsupported(K, name, &field("action"))),
                };
                let headers = HeaderOps {
                    request_add: header_adds(
                        &r.request_headers_to_add,
                        &field("request_headers_to_add"),
                        name,
                    )?,
                    request_remove: r
                        .request_headers_to_remove
                        .iter()
                        .map(|h| h.to_ascii_lowercase())
                        .collect(),
                    response_add: header_adds(
                        &r.response_headers_to_add,
                        &field("response_headers_to_add"),
                        name,
                    )?,
                    response_remove: r
                        .response_headers_to_remove
                        .iter()
                        .map(|h| h.to_ascii_lowercase())
                        .collect(),
                };
                routes.push(RouteConfig {
                    name: r.name.clone(),
                    matcher,
                    action,
                    headers,
                });
            }
            virtual_hosts.push(VirtualHostConfig {
                name: vh.name.clone(),
                domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
                routes,
            });
        }
        Ok(Self {
            name: name.to_string(),
            virtual_hosts,
        })
    }
}

fn forward_config(
    ra: &weft_xds::pb::envoy::config::route::v3::RouteAction,
    name: &str,
    field: &str,
) -> Result<ForwardConfig, Rejection> {
    const K: &str = "route_configuration";
    if !ra.hash_policy.is_empty()
        || !ra.request_mirror_policies.is_empty()
        || ra.regex_rewrite.is_some()
    {
        return Err(unsupported(
            K,
            name,
            &format!("{field}.hash_policy/request_mirror_policies/regex_rewrite"),
        ));
    }
    if ra.idle_timeout.is_some() || ra.max_stream_duration.is_some() || !ra.rate_limits.is_empty() {
        return Err(unsupported(
            K,
            name,
            &format!("{field}.idle_timeout/max_stream_duration/rate_limits"),
        ));
    }
    let clusters = match &ra.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => vec![WeightedCluster {
            name: c.clone(),
            weight: 1,
            headers: HeaderOps::default(),
        }],
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
            .clusters
            .iter()
            .map(|c| {
                Ok(WeightedCluster {
                    name: c.name.clone(),
                    weight: c.weight.as_ref().map_or(0, |w| w.value),
                    headers: HeaderOps {
                        request_add: header_adds(&c.request_headers_to_add, field, name)?,
                        request_remove: c
                            .request_headers_to_remove
                            .iter()
                            .map(|h| h.to_ascii_lowercase())
                            .collect(),
                        response_add: header_adds(&c.response_headers_to_add, field, name)?,
                        response_remove: c
                            .response_headers_to_remove
                            .iter()
                            .map(|h| h.to_ascii_lowercase())
                            .collect(),
                    },
                })
            })
            .collect::<Result<_, Rejection>>()?,
        _ => return Err(unsupported(K, name, &format!("{field}.cluster_specifier"))),
    };
    let host_rewrite = match &ra.host_rewrite_specifier {
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h.clone()),
        None => None,
        Some(_) => {
            return Err(unsupported(
                K,
                name,
                &format!("{field}.host_rewrite_specifier"),
            ));
        }
    };
    Ok(ForwardConfig {
        clusters,
        prefix_rewrite: Some(ra.prefix_rewrite.clone()).filter(|p| !p.is_empty()),
        host_rewrite,
        // Envoy's default route timeout is 15s when unset; `0s` disables it.
        timeout: match &ra.timeout {
            Some(d) => Some(to_duration(d)).filter(|d| !d.is_zero()),
            None => Some(Duration::from_secs(15)),
        },
        retry: ra
            .retry_policy
            .as_ref()
            .map(|p| retry_config(p, name))
            .transpose()?,
    })
}

// === Clusters and endpoints ===

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of two random choices by requests in flight, as Envoy's LEAST_REQUEST.
    LeastRequest,
    Random,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterConfig {
    pub name: String,
    /// The cluster's transport socket; `None` is plaintext.
    pub tls: Option<UpstreamTls>,
    /// `transport_socket_matches`: the first whose fields an endpoint's
    /// `envoy.transport_socket_match` metadata holds decides, else `tls`. This is Istio's auto mTLS:
    /// endpoints with a sidecar carry `tlsMode: istio`.
    pub tls_matches: Vec<TlsMatch>,
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    /// How long a pooled upstream connection may sit idle before it is closed
    /// (`common_http_protocol_options.idle_timeout`).
    pub idle_timeout: Duration,
    pub http2: bool,
    /// Each connection goes where it was originally headed (Istio's PassthroughCluster).
    pub original_dst: bool,
    /// The address upstream connections are made from (`upstream_bind_config`), such as Istio's
    /// 127.0.0.6 for inbound passthrough, which the capture rules let through.
    pub source_address: Option<std::net::IpAddr>,
    /// Endpoints given in the cluster itself (STATIC); EDS clusters get theirs separately.
    pub static_endpoints: Option<Vec<EndpointConfig>>,
    /// The services an inbound cluster serves (Istio's `istio.services` metadata), for metrics.
    pub services: Vec<ServiceRef>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TlsMatch {
    pub fields: BTreeMap<String, String>,
    pub tls: Option<UpstreamTls>,
}

impl ClusterConfig {
    /// How to connect to `endpoint`: mTLS with these settings, or plaintext.
    pub fn tls_for(&self, endpoint: &EndpointConfig) -> Option<&UpstreamTls> {
        self.tls_matches
            .iter()
            .find(|m| {
                m.fields
                    .iter()
                    .all(|(k, v)| endpoint.socket_match.get(k) == Some(v))
            })
            .map_or(self.tls.as_ref(), |m| m.tls.as_ref())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ServiceRef {
    pub host: String,
    pub name: String,
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    pub weight: u32,
    pub healthy: bool,
    pub workload: WorkloadRef,
    /// The endpoint's `envoy.transport_socket_match` metadata (Istio's `tlsMode`).
    pub socket_match: BTreeMap<String, String>,
}

/// Istio's `workload` endpoint metadata: who serves behind an endpoint, for metrics labels.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WorkloadRef {
    pub name: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
}

fn istio_meta(m: Option<&Metadata>) -> serde_json::Map<String, serde_json::Value> {
    m.and_then(|m| m.filter_metadata.get("istio"))
        .map(structs::struct_to_json)
        .unwrap_or_default()
}

impl TryFrom<&Cluster> for ClusterConfig {
    type Error = Rejection;

    fn try_from(c: &Cluster) -> Result<Self, Rejection> {
        const K: &str = "cluster";
        let name = c.name.as_str();
        let checks: [(&str, bool); 7] = [
            ("outlier_detection", c.outlier_detection.is_some()),
            ("circuit_breakers", c.circuit_breakers.is_some()),
            ("health_checks", !c.health_checks.is_empty()),
            ("lb_subset_config", c.lb_subset_config.is_some()),
            ("common_lb_config", c.common_lb_config.is_some()),
            (
                "upstream_connection_options",
                c.upstream_connection_options.is_some(),
            ),
            ("load_balancing_policy", c.load_balancing_policy.is_some()),
        ];
        if let Some((field, _)) = checks.iter().find(|(_, set)| *set) {
            return Err(unsupported(K, name, field));
        }
        let lb = match cluster::LbPolicy::try_from(c.lb_policy) {
            Ok(cluster::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
            Ok(cluster::LbPolicy::LeastRequest) => LbPolicy::LeastRequest,
            Ok(cluster::LbPolicy::Random) => LbPolicy::Random,
            // An ORIGINAL_DST cluster has one destination per connection; there is nothing to balance.
            Ok(cluster::LbPolicy::ClusterProvided)
                if c.cluster_discovery_type == original_dst_type() =>
            {
                LbPolicy::RoundRobin
            }
            _ => {
                return Err(reject(
                    K,
                    name,
                    "lb_policy",
                    format!("policy {} is not supported", c.lb_policy),
                ));
            }
        };
        let mut http2 = false;
        let mut idle_timeout = DEFAULT_UPSTREAM_IDLE_TIMEOUT;
        for (ext, any) in &c.typed_extension_protocol_options {
            let field = format!("typed_extension_protocol_options[{ext}]");
            let opts: HttpProtocolOptions = unpack(any, K, name, &field)?;
            if let Some(common) = &opts.common_http_protocol_options {
                let only_idle = weft_xds::pb::envoy::config::core::v3::HttpProtocolOptions {
                    idle_timeout: common.idle_timeout,
                    ..Default::default()
                };
                if *common != only_idle {
                    return Err(unsupported(
                        K,
                        name,
                        &format!(
                            "{field}.common_http_protocol_options: only idle_timeout is supported"
                        ),
                    ));
                }
                if let Some(t) = &common.idle_timeout {
                    idle_timeout = to_duration(t);
                }
            }
            match opts.upstream_protocol_options {
                Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(e)) => {
                    http2 = matches!(e.protocol_config, Some(http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_)));
                }
                None => {}
                Some(_) => {
                    return Err(unsupported(
                        K,
                        name,
                        "typed_extension_protocol_options: only explicit_http_config is supported",
                    ));
                }
            }
        }
        let static_endpoints = match &c.cluster_discovery_type {
            Some(cluster::ClusterDiscoveryType::Type(t))
                if *t == cluster::DiscoveryType::Eds as i32 =>
            {
                let ads = c.eds_cluster_config.as_ref().and_then(|e| e.eds_config.as_ref()).is_some_and(|s| {
                    matches!(s.config_source_specifier, Some(weft_xds::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier::Ads(_)))
                });
                if !ads {
                    return Err(reject(
                        K,
                        name,
                        "eds_cluster_config.eds_config",
                        "endpoints must come over ADS",
                    ));
                }
                None
            }
            Some(cluster::ClusterDiscoveryType::Type(t))
                if *t == cluster::DiscoveryType::Static as i32 =>
            {
                // Without endpoints it refuses every connection: Istio's BlackHoleCluster.
                match c.load_assignment.as_ref() {
                    Some(cla) => Some(endpoints(cla)?),
                    None => Some(Vec::new()),
                }
            }
            Some(_) if c.cluster_discovery_type == original_dst_type() => Some(Vec::new()),
            _ => {
                return Err(reject(
                    K,
                    name,
                    "type",
                    "only EDS, STATIC and ORIGINAL_DST clusters are supported",
                ));
            }
        };
        let source_address = match c.upstream_bind_config.as_ref() {
            None => None,
            Some(bind) => {
                let Some(sa) = bind.source_address.as_ref() else {
                    return Err(reject(
                        K,
                        name,
                        "upstream_bind_config.source_address",
                        "a socket address is required",
                    ));
                };
                Some(sa.address.parse().map_err(|_| {
                    reject(
                        K,
                        name,
                        "upstream_bind_config.source_address",
                        format!("{:?} is not an IP address", sa.address),
                    )
                })?)
            }
        };
        let services = istio_meta(c.metadata.as_ref())
            .get("services")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .map(|s| ServiceRef {
                        host: s["host"].as_str().unwrap_or_default().into(),
                        name: s["name"].as_str().unwrap_or_default().into(),
                        namespace: s["namespace"].as_str().unwrap_or_default().into(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let tls = match &c.transport_socket {
            Some(ts) => tls::upstream(ts, K, name, "transport_socket")?,
            None => None,
        };
        let mut tls_matches = Vec::new();
        for (i, m) in c.transport_socket_matches.iter().enumerate() {
            let field = format!("transport_socket_matches[{i}]");
            let Some(ts) = &m.transport_socket else {
                return Err(reject(K, name, field, "transport_socket is required"));
            };
            let fields = m
                .r#match
                .as_ref()
                .map(structs::struct_to_json)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => Ok((k, s)),
                    _ => Err(reject(K, name, &field, "match values must be strings")),
                })
                .collect::<Result<_, _>>()?;
            tls_matches.push(TlsMatch {
                fields,
                tls: tls::upstream(ts, K, name, &field)?,
            });
        }
        Ok(Self {
            name: name.to_string(),
            tls,
            tls_matches,
            lb,
            connect_timeout: c
                .connect_timeout
                .as_ref()
                .map_or(Duration::from_secs(5), to_duration),
            idle_timeout,
            http2,
            original_dst: c.cluster_discovery_type == original_dst_type(),
            source_address,
            static_endpoints,
            services,
        })
    }
}

/// Envoy keeps idle upstream connections for an hour; a sidecar's pool is cheaper to refill than to
/// keep, so unused connections go after a minute.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

fn original_dst_type() -> Option<cluster::ClusterDiscoveryType> {
    Some(cluster::ClusterDiscoveryType::Type(
        cluster::DiscoveryType::OriginalDst as i32,
    ))
}

/// The endpoints of a load assignment, flattened across localities.
pub fn endpoints(cla: &ClusterLoadAssignment) -> Result<Vec<EndpointConfig>, Rejection> {
    const K: &str = "cluster_load_assignment";
    let name = cla.cluster_name.as_str();
    if cla
        .policy
        .as_ref()
        .is_some_and(|p| !p.drop_overloads.is_empty())
    {
        return Err(unsupported(K, name, "policy.drop_overloads"));
    }
    let mut out = Vec::new();
    for locality in &cla.endpoints {
        if locality.priority != 0 {
            return Err(unsupported(K, name, "endpoints.priority"));
        }
        for e in &locality.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return Err(unsupported(K, name, "lb_endpoints.endpoint_name"));
            };
            let address = socket_addr(ep.address.as_ref(), K, name)?;
            let health = HealthStatus::try_from(e.health_status).unwrap_or(HealthStatus::Unknown);
            let workload = istio_meta(e.metadata.as_ref())
                .get("workload")
                .and_then(|w| w.as_str())
                .map(|w| {
                    let mut parts = w.split(';').map(str::to_string);
                    WorkloadRef {
                        name: parts.next().unwrap_or_default(),
                        namespace: parts.next().unwrap_or_default(),
                        app: parts.next().unwrap_or_default(),
                        version: parts.next().unwrap_or_default(),
                    }
                })
                .unwrap_or_default();
            out.push(EndpointConfig {
                address,
                weight: e
                    .load_balancing_weight
                    .as_ref()
                    .map_or(1, |w| w.value.max(1)),
                healthy: matches!(health, HealthStatus::Unknown | HealthStatus::Healthy),
                workload,
                socket_match: e
                    .metadata
                    .as_ref()
                    .and_then(|m| m.filter_metadata.get(TRANSPORT_SOCKET_MATCH))
                    .map(structs::struct_to_json)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v.as_str()?.to_string())))
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// The endpoint metadata namespace `transport_socket_matches` look in.
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// All resources of one type, converted; the first rejection fails the whole update.
pub fn convert_all<P: Message + Name + Default, T>(
    resources: &[Any],
    convert: impl Fn(&P) -> Result<T, Rejection>,
) -> Result<Vec<T>, String> {
    resources
        .iter()
        .map(|any| {
            let p: P = unpack(any, "resource", "-", "resource").map_err(|r| r.to_string())?;
            convert(&p).map_err(|r| r.to_string())
        })
        .collect()
}

pub type Map<T> = BTreeMap<String, T>;
