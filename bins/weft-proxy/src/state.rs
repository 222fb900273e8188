//! The config the proxy is running with, and the xDS handler that replaces it one whole type at a time.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, atomic::AtomicUsize},
};

use crate::mtls::{self, MeshConnector, TlsConfigs};
use http_body_util::combinators::BoxBody;
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
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
pub type HttpClient = Client<MeshConnector, Body>;

/// One upstream endpoint with the requests in flight to it (for LEAST_REQUEST).
#[derive(Debug)]
pub struct EndpointState {
    pub config: EndpointConfig,
    pub active: AtomicUsize,
    /// Connect with mTLS (the cluster's transport socket for this endpoint says so).
    pub tls: bool,
    /// The address as a URI authority, made once rather than per request.
    pub authority: http::uri::Authority,
}

impl EndpointState {
    pub fn new(config: EndpointConfig, tls: bool) -> Self {
        let authority = http::uri::Authority::try_from(config.address.to_string())
            .expect("a socket address is a URI authority");
        Self {
            config,
            active: AtomicUsize::new(0),
            tls,
            authority,
        }
    }
}

/// A cluster ready for traffic: its settings, its endpoints and its pooled connections.
#[derive(Debug)]
pub struct ClusterState {
    pub config: ClusterConfig,
    pub endpoints: Vec<Arc<EndpointState>>,
    pub next: AtomicUsize,
    pub client: HttpClient,
    /// The client config and SNI for TCP proxied to this cluster's mTLS endpoints, built once here
    /// rather than per connection.
    pub tcp_tls: Option<(weft_certs::ClientTls, String)>,
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

/// The cluster's mTLS settings: Istio gives every TLS variant of a cluster the same ones, and
/// only switches them on or off per endpoint.
fn upstream_tls(config: &ClusterConfig) -> Option<&model::UpstreamTls> {
    config
        .tls_matches
        .iter()
        .find_map(|m| m.tls.as_ref())
        .or(config.tls.as_ref())
}

/// Idle connections kept per endpoint after a burst; more are closed as they come back to the pool.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

fn client_for(config: &ClusterConfig, tls: &TlsConfigs) -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_nodelay(true);
    // https:// marks the endpoints that take mTLS; the connector does the TLS.
    http.enforce_http(false);
    let alpn = if config.http2 {
        mtls::ALPN_H2
    } else {
        mtls::ALPN_HTTP11
    };
    let tls = match upstream_tls(config) {
        None => None,
        Some(u) => Some((
            tls.client(u, Some(alpn))
                .map_err(|e| format!("cluster {}: transport_socket: {e}", config.name))?,
            u.sni.clone(),
        )),
    };
    // The idle timeout only runs with a timer: without one, idle connections stay open for good.
    Ok(Client::builder(TokioExecutor::new())
        .http2_only(config.http2)
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.idle_timeout)
        .pool_max_idle_per_host(MAX_IDLE_PER_ENDPOINT)
        .build(MeshConnector { http, tls }))
}

/// Applies xDS updates to the proxy state and the bound listeners.
pub struct XdsHandler {
    state: watch::Sender<Arc<ProxyState>>,
    /// Endpoints by cluster name, as EDS last delivered them.
    eds: HashMap<String, Vec<EndpointConfig>>,
    listeners: ListenerManager,
    tls: Arc<TlsConfigs>,
    /// Wakes the certificate rotation early.
    renew_now: Arc<tokio::sync::Notify>,
}

impl XdsHandler {
    pub fn new(
        state: watch::Sender<Arc<ProxyState>>,
        listeners: ListenerManager,
        tls: Arc<TlsConfigs>,
        renew_now: Arc<tokio::sync::Notify>,
    ) -> Self {
        Self {
            state,
            eds: HashMap::new(),
            listeners,
            tls,
            renew_now,
        }
    }

    fn current(&self) -> Arc<ProxyState> {
        self.state.borrow().clone()
    }

    /// Empties the TLS caches of what the applied config no longer names.
    fn prune_tls(&self) {
        let s = self.current();
        let servers: std::collections::HashSet<&model::DownstreamTls> = s
            .listeners
            .values()
            .flat_map(|l| &l.chains)
            .filter_map(|c| c.tls.as_ref())
            .collect();
        let clients: std::collections::HashSet<&model::UpstreamTls> = s
            .clusters
            .values()
            .filter_map(|c| upstream_tls(&c.config))
            .collect();
        self.tls
            .retain(|d| servers.contains(d), |u| clients.contains(u));
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
    ) -> Result<ClusterState, String> {
        let endpoints = config
            .static_endpoints
            .clone()
            .unwrap_or_else(|| self.eds.get(&config.name).cloned().unwrap_or_default());
        // Keep pooled connections when only endpoints change.
        let (client, tcp_tls) = match previous {
            Some(p) if p.config == config => (p.client.clone(), p.tcp_tls.clone()),
            _ => (
                client_for(&config, &self.tls)?,
                match upstream_tls(&config) {
                    None => None,
                    Some(u) => Some((
                        self.tls.client(u, None).map_err(|e| {
                            format!("cluster {}: transport_socket: {e}", config.name)
                        })?,
                        u.sni.clone(),
                    )),
                },
            ),
        };
        Ok(ClusterState {
            endpoints: endpoints
                .into_iter()
                .map(|e| {
                    let tls = config.tls_for(&e).is_some();
                    Arc::new(EndpointState::new(e, tls))
                })
                .collect(),
            config,
            next: AtomicUsize::new(0),
            client,
            tcp_tls,
        })
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
                        Ok((c.name.clone(), Arc::new(self.cluster_state(c, prev)?)))
                    })
                    .collect::<Result<_, String>>()?;
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
                        Ok((
                            name.clone(),
                            Arc::new(self.cluster_state(c.config.clone(), Some(c))?),
                        ))
                    })
                    .collect::<Result<_, String>>()?;
                self.publish(|s| {
                    s.clusters = clusters;
                    s.versions.insert(t.to_string(), version.to_string());
                });
            }
            type_url::LISTENER => {
                let configs =
                    model::convert_all::<Listener, _>(resources, |l| ListenerConfig::try_from(l))?;
                // A chain that terminates mTLS needs a certificate to present.
                for l in &configs {
                    for c in l.chains.iter().filter_map(|c| c.tls.as_ref()) {
                        self.tls
                            .server(c)
                            .map_err(|e| format!("listener {}: transport_socket: {e}", l.name))?;
                    }
                }
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
        if matches!(t, type_url::CLUSTER | type_url::LISTENER) {
            self.prune_tls();
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

    /// weftd's certificate did not verify with the bundle this proxy's certificate came with: renew
    /// now, which falls back to the bundle file and token and so takes in a new root.
    fn control_plane_unverified(&mut self) {
        self.renew_now.notify_one();
    }
}

/// Lets sibling tests build clusters without a handler.
#[cfg(test)]
pub(crate) struct XdsHandlerTestAccess;

#[cfg(test)]
impl XdsHandlerTestAccess {
    pub(crate) fn client(config: &ClusterConfig) -> HttpClient {
        client_for(config, &TlsConfigs::default()).expect("a plaintext cluster")
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::Ordering,
        time::{Duration, Instant},
    };

    use http_body_util::{BodyExt, Empty, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    use super::*;

    /// An HTTP/1.1 server that counts the connections it has open.
    async fn counting_backend() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let open = counter.clone();
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (addr, open)
    }

    #[tokio::test]
    async fn idle_upstream_connections_close_after_the_idle_timeout() {
        let (addr, open) = counting_backend().await;
        let config = ClusterConfig {
            name: "c".into(),
            tls: None,
            tls_matches: vec![],
            lb: model::LbPolicy::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_millis(200),
            http2: false,
            original_dst: false,
            source_address: None,
            static_endpoints: None,
            services: vec![],
        };
        let client = XdsHandlerTestAccess::client(&config);
        // A burst opens a connection per concurrent request.
        let burst = (0..10).map(|_| {
            let client = client.clone();
            async move {
                let req = hyper::Request::get(format!("http://{addr}/"))
                    .body(Empty::new().map_err(|never| match never {}).boxed())
                    .expect("request");
                let resp = client.request(req).await.expect("response");
                resp.into_body().collect().await.expect("body");
            }
        });
        futures::future::join_all(burst).await;
        assert!(
            open.load(Ordering::SeqCst) > 1,
            "the burst used several connections"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while open.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "{} idle connections still open",
                open.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(client);
    }
}
