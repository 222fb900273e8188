//! The config the proxy is running with, and the xDS handler that replaces it one whole type at a time.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, atomic::AtomicUsize},
};

use http_body_util::combinators::BoxBody;
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::sync::watch;
use weft_xds::{
    client::Handler,
    pb::{
        envoy::config::{
            cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
            route::v3::RouteConfiguration,
        },
        google::protobuf::Any,
    },
    type_url,
};

use crate::{
    listeners::ListenerManager,
    model::{self, ClusterConfig, EndpointConfig, ListenerConfig, Map, RouteSource, RouteTable},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<HttpConnector, Body>;

/// One upstream endpoint with the requests in flight to it (for LEAST_REQUEST).
#[derive(Debug)]
pub struct EndpointState {
    pub config: EndpointConfig,
    pub active: AtomicUsize,
}

/// A cluster ready for traffic: its settings, its endpoints and its pooled connections.
#[derive(Debug)]
pub struct ClusterState {
    pub config: ClusterConfig,
    pub endpoints: Vec<Arc<EndpointState>>,
    pub next: AtomicUsize,
    pub client: HttpClient,
}

/// Everything the data path reads: one immutable value, replaced as a whole on each accepted update.
#[derive(Debug, Default)]
pub struct ProxyState {
    pub listeners: Map<ListenerConfig>,
    pub routes: Map<Arc<RouteTable>>,
    pub clusters: Map<Arc<ClusterState>>,
    /// Accepted version per type, for /config_dump.
    pub versions: Map<String>,
    pub xds_connected: bool,
}

impl ProxyState {
    pub fn route_table(&self, source: &RouteSource) -> Option<Arc<RouteTable>> {
        match source {
            RouteSource::Rds(name) => self.routes.get(name).cloned(),
            RouteSource::Inline(table) => Some(Arc::new(table.clone())),
        }
    }

    /// Ready once listeners and clusters have arrived at least once.
    pub fn ready(&self) -> bool {
        self.versions.contains_key(type_url::LISTENER)
            && self.versions.contains_key(type_url::CLUSTER)
    }
}

fn client_for(config: &ClusterConfig) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(config.http2)
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .build(connector)
}

/// Applies xDS updates to the proxy state and the bound listeners.
pub struct XdsHandler {
    state: watch::Sender<Arc<ProxyState>>,
    /// Endpoints by cluster name, as EDS last delivered them.
    eds: HashMap<String, Vec<EndpointConfig>>,
    listeners: ListenerManager,
}

impl XdsHandler {
    pub fn new(state: watch::Sender<Arc<ProxyState>>, listeners: ListenerManager) -> Self {
        Self {
            state,
            eds: HashMap::new(),
            listeners,
        }
    }

    fn current(&self) -> Arc<ProxyState> {
        self.state.borrow().clone()
    }

    fn publish(&self, update: impl FnOnce(&mut ProxyState)) {
        let cur = self.current();
        let mut next = ProxyState {
            listeners: cur.listeners.clone(),
            routes: cur.routes.clone(),
            clusters: cur.clusters.clone(),
            versions: cur.versions.clone(),
            xds_connected: cur.xds_connected,
        };
        update(&mut next);
        self.state.send_replace(Arc::new(next));
    }

    fn cluster_state(
        &self,
        config: ClusterConfig,
        previous: Option<&ClusterState>,
    ) -> ClusterState {
        let endpoints = config
            .static_endpoints
            .clone()
            .unwrap_or_else(|| self.eds.get(&config.name).cloned().unwrap_or_default());
        // Keep pooled connections when only endpoints change.
        let client = match previous {
            Some(p) if p.config == config => p.client.clone(),
            _ => client_for(&config),
        };
        ClusterState {
            endpoints: endpoints
                .into_iter()
                .map(|config| {
                    Arc::new(EndpointState {
                        config,
                        active: AtomicUsize::new(0),
                    })
                })
                .collect(),
            config,
            next: AtomicUsize::new(0),
            client,
        }
    }
}

impl Handler for XdsHandler {
    fn apply(&mut self, t: &str, version: &str, resources: &[Any]) -> Result<(), String> {
        let current = self.current();
        match t {
            type_url::CLUSTER => {
                let configs =
                    model::convert_all::<Cluster, _>(resources, |c| ClusterConfig::try_from(c))?;
                let clusters: Map<Arc<ClusterState>> = configs
                    .into_iter()
                    .map(|c| {
                        let prev = current.clusters.get(&c.name).map(Arc::as_ref);
                        (c.name.clone(), Arc::new(self.cluster_state(c, prev)))
                    })
                    .collect();
                self.eds.retain(|name, _| clusters.contains_key(name));
                self.publish(|s| {
                    s.clusters = clusters;
                    s.versions.insert(t.to_string(), version.to_string());
                });
            }
            type_url::ENDPOINT => {
                let assignments =
                    model::convert_all::<ClusterLoadAssignment, _>(resources, |cla| {
                        Ok((cla.cluster_name.clone(), model::endpoints(cla)?))
                    })?;
                self.eds = assignments.into_iter().collect();
                let clusters: Map<Arc<ClusterState>> = current
                    .clusters
                    .iter()
                    .map(|(name, c)| {
                        (
                            name.clone(),
                            Arc::new(self.cluster_state(c.config.clone(), Some(c))),
                        )
                    })
                    .collect();
                self.publish(|s| {
                    s.clusters = clusters;
                    s.versions.insert(t.to_string(), version.to_string());
                });
            }
            type_url::LISTENER => {
                let configs =
                    model::convert_all::<Listener, _>(resources, |l| ListenerConfig::try_from(l))?;
                let listeners: Map<ListenerConfig> =
                    configs.into_iter().map(|l| (l.name.clone(), l)).collect();
                let addresses: Vec<(String, SocketAddr)> = listeners
                    .values()
                    .filter(|l| l.bind)
                    .map(|l| (l.name.clone(), l.address))
                    .collect();
                let bound = self.listeners.prepare(&addresses)?;
                self.publish(|s| {
                    s.listeners = listeners;
                    s.versions.insert(t.to_string(), version.to_string());
                });
                self.listeners.commit(bound);
            }
            type_url::ROUTE => {
                let tables = model::convert_all::<RouteConfiguration, _>(resources, |r| {
                    RouteTable::try_from(r)
                })?;
                let routes = tables
                    .into_iter()
                    .map(|r| (r.name.clone(), Arc::new(r)))
                    .collect();
                self.publish(|s| {
                    s.routes = routes;
                    s.versions.insert(t.to_string(), version.to_string());
                });
            }
            other => return Err(format!("type {other} is not supported by weft-proxy")),
        }
        Ok(())
    }

    fn wanted_names(&self, t: &str) -> BTreeSet<String> {
        let s = self.current();
        match t {
            type_url::ENDPOINT => s
                .clusters
                .values()
                .filter(|c| c.config.static_endpoints.is_none())
                .map(|c| c.config.name.clone())
                .collect(),
            type_url::ROUTE => s
                .listeners
                .values()
                .flat_map(|l| &l.chains)
                .filter_map(|c| match &c.kind {
                    model::ListenerKind::Http(h) => match &h.routes {
                        RouteSource::Rds(name) => Some(name.clone()),
                        RouteSource::Inline(_) => None,
                    },
                    model::ListenerKind::Tcp(_) => None,
                })
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    fn connected(&mut self, connected: bool) {
        self.publish(|s| s.xds_connected = connected);
    }
}

/// Lets sibling tests build clusters without a handler.
#[cfg(test)]
pub(crate) struct XdsHandlerTestAccess;

#[cfg(test)]
impl XdsHandlerTestAccess {
    pub(crate) fn client(config: &ClusterConfig) -> HttpClient {
        client_for(config)
    }
}
