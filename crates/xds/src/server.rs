//! The aggregated discovery service: state of the world (`StreamAggregatedResources`) and incremental
//! (`DeltaAggregatedResources`) over one gRPC stream per proxy.
//!
//! A [`SnapshotGenerator`] turns the mesh config into the resources one proxy should have. Each stream
//! regenerates its proxy's snapshot whenever the generator changes and sends only the types (SotW) or the
//! resources (delta) whose content changed for that proxy. ACKs and NACKs are tracked per type; a NACK is
//! logged with the proxy id and the proxy's `error_detail`, counted, and not retried: the proxy keeps its
//! last accepted config until the next change.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    pin::Pin,
    sync::Arc,
};

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use weft_certs::SpiffeId;
use weft_drain::DrainWatcher;

use crate::{
    NodeInfo, Snapshot, XdsMetrics,
    metrics::Nack,
    pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        Resource,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    },
    snapshot::content_version,
    type_url,
};

/// Builds the resources one proxy should have from the current mesh config. Pure: no IO.
pub trait SnapshotGenerator: Send + Sync + 'static {
    fn generate(&self, node: &NodeInfo) -> Snapshot;
}

/// The ADS service. Cloning shares the config source and metrics.
#[derive(Clone)]
pub struct AdsServer {
    config: watch::Receiver<Arc<dyn SnapshotGenerator>>,
    metrics: XdsMetrics,
    drain: DrainWatcher,
}

impl std::fmt::Debug for AdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsServer").finish_non_exhaustive()
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl AdsServer {
    /// Streams end when `drain` is signaled, so a draining weftd is not held open by its proxies.
    pub fn new(
        config: watch::Receiver<Arc<dyn SnapshotGenerator>>,
        metrics: XdsMetrics,
        drain: DrainWatcher,
    ) -> Self {
        Self {
            config,
            metrics,
            drain,
        }
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }
}

/// Why a stream's loop woke up.
enum Event<R> {
    Request(R),
    ConfigChanged,
    Closed,
}

async fn next_event<R>(
    requests: &mut Streaming<R>,
    config: &mut watch::Receiver<Arc<dyn SnapshotGenerator>>,
    drain: &DrainWatcher,
) -> Event<R> {
    tokio::select! {
        req = requests.next() => match req {
            Some(Ok(req)) => Event::Request(req),
            Some(Err(status)) => {
                debug!(%status, "ads stream ended with an error");
                Event::Closed
            }
            None => Event::Closed,
        },
        changed = config.changed() => if changed.is_ok() { Event::ConfigChanged } else { Event::Closed },
        () = drain.signaled() => Event::Closed,
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let caller = crate::tls::caller_identity(&request)?;
        let stream = AdsStream {
            requests: request.into_inner(),
            config: self.config.clone(),
            drain: self.drain.clone(),
            proto: SotwState::new(self.metrics.clone(), caller),
        };
        Ok(Response::new(stream.into_response_stream()))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let caller = crate::tls::caller_identity(&request)?;
        let stream = AdsStream {
            requests: request.into_inner(),
            config: self.config.clone(),
            drain: self.drain.clone(),
            proto: DeltaState::new(self.metrics.clone(), caller),
        };
        Ok(Response::new(stream.into_response_stream()))
    }
}

/// Present for the life of one proxy's stream, so `connected_proxies` and `/debug/syncz` are right
/// however the stream ends.
struct Connected {
    metrics: XdsMetrics,
    sync: crate::syncz::StreamSync,
}

impl Connected {
    fn new(metrics: XdsMetrics, variant: &str) -> Self {
        metrics.connected.inc();
        Self {
            sync: metrics.sync.open(variant),
            metrics,
        }
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.metrics.connected.dec();
    }
}

/// The version of a set of resources as a whole: SotW's `version_info`.
fn set_version<'a>(resources: impl Iterator<Item = (&'a String, &'a str)>) -> String {
    let mut joined = String::new();
    for (name, version) in resources {
        joined.push_str(name);
        joined.push('=');
        joined.push_str(version);
        joined.push(';');
    }
    content_version(joined.as_bytes())
}

/// Which names of a type a proxy wants.
#[derive(Debug, Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
}

impl Subscription {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// One variant of the protocol (SotW or delta), apart from IO so tests can drive it directly.
trait Protocol: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    fn on_request(
        &mut self,
        req: Self::Request,
        generator: &dyn SnapshotGenerator,
    ) -> Result<(), Status>;
    fn on_config(&mut self, generator: &dyn SnapshotGenerator);
    fn next_response(&mut self) -> Option<Self::Response>;
}

/// A proxy's stream: requests and config changes in, queued responses out, until either side closes.
struct AdsStream<P: Protocol> {
    requests: Streaming<P::Request>,
    config: watch::Receiver<Arc<dyn SnapshotGenerator>>,
    drain: DrainWatcher,
    proto: P,
}

impl<P: Protocol> AdsStream<P> {
    fn into_response_stream(self) -> ResponseStream<P::Response>
    where
        Streaming<P::Request>: Send,
    {
        Box::pin(futures::stream::unfold(self, Self::next))
    }

    async fn next(mut self) -> Option<(Result<P::Response, Status>, Self)> {
        loop {
            if let Some(resp) = self.proto.next_response() {
                return Some((Ok(resp), self));
            }
            match next_event(&mut self.requests, &mut self.config, &self.drain).await {
                Event::Request(req) => {
                    // Marking the config seen here must not swallow a change that arrived with it.
                    let changed = self.config.has_changed().unwrap_or(false);
                    let generator = self.config.borrow_and_update().clone();
                    if let Err(status) = self.proto.on_request(req, generator.as_ref()) {
                        return Some((Err(status), self));
                    }
                    if changed {
                        self.proto.on_config(generator.as_ref());
                    }
                }
                Event::ConfigChanged => {
                    let generator = self.config.borrow_and_update().clone();
                    self.proto.on_config(generator.as_ref());
                }
                Event::Closed => return None,
            }
        }
    }
}

/// The proxy's node from its first request, which must carry one. On an mTLS port the namespace and
/// service account come from the client certificate: a proxy claiming another namespace is refused,
/// and what it says of its service account is replaced by what it proved.
fn first_node(
    node: Option<&crate::pb::envoy::config::core::v3::Node>,
    variant: &str,
    caller: Option<&SpiffeId>,
) -> Result<NodeInfo, Status> {
    let node =
        node.ok_or_else(|| Status::invalid_argument("the first request must carry a node"))?;
    // The id lands in every log line and NACK of the stream.
    if node.id.len() > MAX_NODE_ID {
        return Err(Status::invalid_argument(format!(
            "the node id is {} bytes; at most {MAX_NODE_ID}",
            node.id.len()
        )));
    }
    let mut node = NodeInfo::from(node);
    if let Some(id) = caller {
        let claimed = node
            .meta_str("NAMESPACE")
            .map(str::to_string)
            .or_else(|| node.id.parse::<crate::ProxyId>().ok().map(|p| p.namespace))
            .unwrap_or_default();
        if claimed != id.namespace {
            return Err(Status::permission_denied(format!(
                "node {} claims namespace {claimed:?}, but its certificate is for {id}",
                node.id
            )));
        }
        node.metadata.insert(
            "SERVICE_ACCOUNT".into(),
            serde_json::Value::String(id.service_account.clone()),
        );
        node.metadata.insert(
            "NAMESPACE".into(),
            serde_json::Value::String(id.namespace.clone()),
        );
    }
    info!(node = %node.id, variant, identity = %caller.map_or_else(|| "(plaintext)".to_string(), ToString::to_string), "proxy connected");
    Ok(node)
}

/// The subscribed types in push order: clusters, endpoints, listeners, routes.
fn push_order<'a>(subscribed: impl Iterator<Item = &'a String>) -> Vec<String> {
    let subscribed: Vec<&String> = subscribed.collect();
    type_url::PUSH_ORDER
        .iter()
        .filter(|t| subscribed.iter().any(|s| s == *t))
        .map(|t| t.to_string())
        .collect()
}

/// Longest node id taken; Istio's are well under 300 bytes.
const MAX_NODE_ID: usize = 1024;
/// How much of a NACK's `error_detail` is logged and kept: enough to name the resource and field, and
/// never the megabytes a client could send.
const MAX_ERROR_DETAIL: usize = 4096;

/// A NACK, logged and kept for `/debug/nacks`, with what the proxy wrote cut to [`MAX_ERROR_DETAIL`].
fn record_nack(connected: &Connected, node: String, type_url: &str, nonce: &str, message: &str) {
    let mut detail: String = message.chars().take(MAX_ERROR_DETAIL).collect();
    if detail.len() < message.len() {
        detail.push_str(" [cut]");
    }
    connected.sync.nacked(type_url, nonce, &detail);
    let nonce: String = nonce.chars().take(64).collect();
    warn!(node = %node, type_url = %type_url, rejected_nonce = %nonce, error_detail = %detail, "proxy rejected config (NACK)");
    connected.metrics.record_nack(Nack {
        node,
        type_url: type_url.to_string(),
        error_detail: detail,
    });
}

/// Names one stream may subscribe to per type: far past any proxy's config (a proxy names what its
/// listeners and clusters refer to), and a bound on what a client can make a stream hold.
const MAX_NAMES_PER_TYPE: usize = 100_000;

fn too_many_names(type_url: &str) -> Status {
    Status::resource_exhausted(format!(
        "more than {MAX_NAMES_PER_TYPE} resource names subscribed for {}",
        type_url::short(type_url)
    ))
}

/// Whether weftd serves this type. A request for any other is ignored before it costs anything: the
/// client chooses the string, so it must never become a metric label or a key of per-stream state.
fn served(type_url: &str) -> bool {
    let known = type_url::PUSH_ORDER.contains(&type_url);
    if !known {
        debug!(type_url = %type_url.chars().take(200).collect::<String>(), "ignoring a request for a type weftd does not serve");
    }
    known
}

// === State of the world ===

#[derive(Debug, Default)]
struct SotwType {
    subscription: Subscription,
    last_nonce: String,
    sent_version: Option<String>,
}

/// The protocol state of one SotW stream, apart from IO so it can be driven directly in tests.
struct SotwState {
    node: Option<NodeInfo>,
    caller: Option<SpiffeId>,
    snapshot: Snapshot,
    types: BTreeMap<String, SotwType>,
    nonce: u64,
    pending: VecDeque<DiscoveryResponse>,
    metrics: XdsMetrics,
    connected: Connected,
}

impl SotwState {
    fn new(metrics: XdsMetrics, caller: Option<SpiffeId>) -> Self {
        Self {
            node: None,
            caller,
            snapshot: Snapshot::default(),
            types: BTreeMap::new(),
            nonce: 0,
            pending: VecDeque::new(),
            connected: Connected::new(metrics.clone(), "sotw"),
            metrics,
        }
    }

    fn node_id(&self) -> &str {
        self.node.as_ref().map_or("", |n| n.id.as_str())
    }

    /// Queues the full set of `type_url` the proxy subscribes to, unless it already has exactly that.
    fn push(&mut self, type_url: &str, even_if_unchanged: bool) {
        let Some(state) = self.types.get_mut(type_url) else {
            return;
        };
        let wanted: Vec<_> = self
            .snapshot
            .resources(type_url)
            .filter(|(name, _)| state.subscription.wants(name))
            .collect();
        let version = set_version(wanted.iter().map(|(n, v)| (*n, v.version.as_str())));
        if !even_if_unchanged && state.sent_version.as_deref() == Some(version.as_str()) {
            return;
        }
        self.nonce += 1;
        state.last_nonce = self.nonce.to_string();
        state.sent_version = Some(version.clone());
        self.metrics
            .pushes
            .get_or_create(&XdsMetrics::labels(type_url))
            .inc();
        debug!(node = %self.node.as_ref().map_or("", |n| n.id.as_str()), type_url, %version, count = wanted.len(), "push");
        self.connected
            .sync
            .sent(type_url, &state.last_nonce, &version, wanted.len());
        self.pending.push_back(DiscoveryResponse {
            version_info: version,
            resources: wanted.iter().map(|(_, v)| v.resource.clone()).collect(),
            type_url: type_url.to_string(),
            nonce: state.last_nonce.clone(),
            ..Default::default()
        });
    }
}

impl Protocol for SotwState {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn on_request(
        &mut self,
        req: DiscoveryRequest,
        generator: &dyn SnapshotGenerator,
    ) -> Result<(), Status> {
        if self.node.is_none() {
            let node = first_node(
                req.node.as_ref(),
                "state of the world",
                self.caller.as_ref(),
            )?;
            self.connected.sync.identify(&node, self.caller.as_ref());
            self.snapshot = generator.generate(&node);
            self.node = Some(node);
        }
        if !served(&req.type_url) {
            return Ok(());
        }
        let labels = XdsMetrics::labels(&req.type_url);
        let node_id = self.node_id().to_string();
        let state = self.types.entry(req.type_url.clone()).or_default();
        if !req.response_nonce.is_empty() && req.response_nonce != state.last_nonce {
            debug!(node = %node_id, type_url = %req.type_url, nonce = %req.response_nonce, "ignoring a request for a superseded response");
            return Ok(());
        }
        if let Some(error) = &req.error_detail {
            record_nack(
                &self.connected,
                node_id,
                &req.type_url,
                &req.response_nonce,
                &error.message,
            );
            return Ok(());
        }
        if req.response_nonce.is_empty() {
            self.connected.sync.subscribed(&req.type_url);
        } else {
            self.metrics.acks.get_or_create(&labels).inc();
            self.connected
                .sync
                .acked(&req.type_url, &req.response_nonce);
        }
        if req.resource_names.len() > MAX_NAMES_PER_TYPE {
            return Err(too_many_names(&req.type_url));
        }
        let names: BTreeSet<String> = req
            .resource_names
            .iter()
            .filter(|n| *n != "*")
            .cloned()
            .collect();
        let wildcard = req.resource_names.iter().any(|n| n == "*")
            || (req.resource_names.is_empty() && type_url::is_wildcard_by_default(&req.type_url));
        let changed = state.sent_version.is_none()
            || names != state.subscription.names
            || wildcard != state.subscription.wildcard;
        state.subscription = Subscription { wildcard, names };
        if changed {
            self.push(&req.type_url, true);
        }
        Ok(())
    }

    fn on_config(&mut self, generator: &dyn SnapshotGenerator) {
        let Some(node) = &self.node else { return };
        let snapshot = generator.generate(node);
        if snapshot == self.snapshot {
            return;
        }
        self.snapshot = snapshot;
        for t in push_order(self.types.keys()) {
            self.push(&t, false);
        }
    }

    fn next_response(&mut self) -> Option<Self::Response> {
        self.pending.pop_front()
    }
}

// === Delta ===

#[derive(Debug, Default)]
struct DeltaType {
    subscription: Subscription,
    /// What the proxy holds, by name: the version last sent (or declared in `initial_resource_versions`).
    known: HashMap<String, String>,
}

struct DeltaState {
    node: Option<NodeInfo>,
    caller: Option<SpiffeId>,
    snapshot: Snapshot,
    types: BTreeMap<String, DeltaType>,
    nonce: u64,
    pending: VecDeque<DeltaDiscoveryResponse>,
    metrics: XdsMetrics,
    connected: Connected,
}

impl DeltaState {
    fn new(metrics: XdsMetrics, caller: Option<SpiffeId>) -> Self {
        Self {
            node: None,
            caller,
            snapshot: Snapshot::default(),
            types: BTreeMap::new(),
            nonce: 0,
            pending: VecDeque::new(),
            connected: Connected::new(metrics.clone(), "delta"),
            metrics,
        }
    }

    /// Queues the resources whose version differs from what the proxy holds, and the names it holds that
    /// are gone. Nothing is queued when the proxy is up to date.
    fn push(&mut self, type_url: &str) {
        let Some(state) = self.types.get_mut(type_url) else {
            return;
        };
        let mut resources = Vec::new();
        let mut present = BTreeSet::new();
        for (name, v) in self.snapshot.resources(type_url) {
            if !state.subscription.wants(name) {
                continue;
            }
            present.insert(name.clone());
            if state.known.get(name) != Some(&v.version) {
                state.known.insert(name.clone(), v.version.clone());
                resources.push(Resource {
                    name: name.clone(),
                    version: v.version.clone(),
                    resource: Some(v.resource.clone()),
                    ..Default::default()
                });
            }
        }
        let removed: Vec<String> = state
            .known
            .keys()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        for name in &removed {
            state.known.remove(name);
        }
        if resources.is_empty() && removed.is_empty() {
            return;
        }
        self.nonce += 1;
        self.metrics
            .pushes
            .get_or_create(&XdsMetrics::labels(type_url))
            .inc();
        let nonce = self.nonce.to_string();
        self.connected
            .sync
            .sent(type_url, &nonce, &nonce, resources.len() + removed.len());
        self.pending.push_back(DeltaDiscoveryResponse {
            resources,
            removed_resources: removed,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        });
    }
}

impl Protocol for DeltaState {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        generator: &dyn SnapshotGenerator,
    ) -> Result<(), Status> {
        if self.node.is_none() {
            let node = first_node(req.node.as_ref(), "delta", self.caller.as_ref())?;
            self.connected.sync.identify(&node, self.caller.as_ref());
            self.snapshot = generator.generate(&node);
            self.node = Some(node);
        }
        if !served(&req.type_url) {
            return Ok(());
        }
        let labels = XdsMetrics::labels(&req.type_url);
        let node_id = self.node.as_ref().map_or("", |n| n.id.as_str()).to_string();
        if let Some(error) = &req.error_detail {
            record_nack(
                &self.connected,
                node_id,
                &req.type_url,
                &req.response_nonce,
                &error.message,
            );
        } else if req.response_nonce.is_empty() {
            self.connected.sync.subscribed(&req.type_url);
        } else {
            self.metrics.acks.get_or_create(&labels).inc();
            self.connected
                .sync
                .acked(&req.type_url, &req.response_nonce);
        }
        let first = !self.types.contains_key(&req.type_url);
        let state = self.types.entry(req.type_url.clone()).or_default();
        if first {
            state.subscription.wildcard = req.resource_names_subscribe.is_empty()
                && type_url::is_wildcard_by_default(&req.type_url);
            state.known = req.initial_resource_versions.clone();
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                state.subscription.wildcard = true;
            } else {
                state.subscription.names.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                state.subscription.wildcard = false;
            } else {
                state.subscription.names.remove(name);
            }
            state.known.remove(name);
        }
        if state.subscription.names.len() > MAX_NAMES_PER_TYPE
            || state.known.len() > MAX_NAMES_PER_TYPE
        {
            return Err(too_many_names(&req.type_url));
        }
        self.push(&req.type_url);
        Ok(())
    }

    fn on_config(&mut self, generator: &dyn SnapshotGenerator) {
        let Some(node) = &self.node else { return };
        let snapshot = generator.generate(node);
        if snapshot == self.snapshot {
            return;
        }
        self.snapshot = snapshot;
        for t in push_order(self.types.keys()) {
            self.push(&t);
        }
    }

    fn next_response(&mut self) -> Option<Self::Response> {
        self.pending.pop_front()
    }
}

#[cfg(test)]
mod tests;
