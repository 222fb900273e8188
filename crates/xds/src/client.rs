//! The ADS client a proxy runs (state of the world).
//!
//! It subscribes to all listeners and clusters, then to the routes and endpoints those name, and hands
//! each response to a [`Handler`] that applies it whole or rejects it whole: the client ACKs what was
//! applied and NACKs the rest with the handler's reason as `error_detail`. Like Envoy it warms clusters:
//! while endpoints for newly named clusters are on their way, listener and route updates wait, so a new
//! route never points at a cluster with no endpoints yet. When the control plane is away it reconnects
//! with jittered exponential backoff and the handler keeps its last good config meanwhile.

use std::{collections::BTreeSet, time::Duration};

use rand::Rng;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};
use weft_drain::DrainWatcher;

use crate::{
    NodeInfo,
    pb::{
        envoy::{
            config::core::v3::Node,
            service::discovery::v3::{
                DiscoveryRequest, DiscoveryResponse,
                aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            },
        },
        google::{protobuf::Any, rpc},
    },
    type_url,
};

/// Applies config of one type at a time. Implemented by the proxy over its own typed config.
pub trait Handler: Send + 'static {
    /// Applies the complete set of resources of `type_url`, or rejects all of them. The error is sent to
    /// the control plane as `error_detail`, so it names the resource and the field at fault.
    fn apply(&mut self, type_url: &str, version: &str, resources: &[Any]) -> Result<(), String>;

    /// The names of `type_url` (route configurations or cluster load assignments) the applied config uses.
    fn wanted_names(&self, type_url: &str) -> BTreeSet<String>;

    /// Called when a stream to the control plane is established or lost; the proxy's readiness uses it.
    fn connected(&mut self, _connected: bool) {}

    /// Called when the control plane's certificate could not be verified: its CA may have changed, and
    /// the handler may refresh what it trusts (the proxy renews its certificate from the bundle file).
    fn control_plane_unverified(&mut self) {}
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:port` of the ADS server.
    pub address: String,
    pub node: NodeInfo,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// mTLS to the server (weftd's 15012) with the workload's certificate; `None` is plaintext (15010).
    pub tls: Option<weft_certs::ClientTls>,
}

impl ClientConfig {
    pub fn new(address: impl Into<String>, node: NodeInfo) -> Self {
        Self {
            address: address.into(),
            node,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("cannot connect to the control plane at {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("the control plane refused the stream: {0}")]
    Refused(tonic::Status),
    #[error("the stream to the control plane broke: {0}")]
    Broken(tonic::Status),
    #[error("the control plane closed the stream")]
    Closed,
}

/// Runs until `drain` is signaled, reconnecting whenever the stream ends.
pub async fn run<H: Handler>(config: ClientConfig, mut handler: H, drain: DrainWatcher) {
    let mut backoff = config.initial_backoff;
    loop {
        let mut session = Session::new(&config);
        let result = tokio::select! {
            r = session.run(&mut handler) => r,
            () = drain.signaled() => return,
        };
        handler.connected(false);
        if session.received_any {
            backoff = config.initial_backoff;
        }
        let jittered = rand::rng().random_range(backoff / 2..=backoff);
        match result {
            Err(StreamError::Connect { address, source })
                if weft_certs::is_unverified_peer(&source) =>
            {
                error!(%address, error = %source, retry_in = ?jittered,
                    "cannot verify the control plane's certificate with this proxy's trust bundle: if its CA changed, the bundle must hold the new root; keeping the last accepted config and retrying");
                handler.control_plane_unverified();
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?jittered, "xds stream ended; keeping the last accepted config")
            }
            Ok(()) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(jittered) => {}
            () = drain.signaled() => return,
        }
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

#[derive(Debug, Default, Clone)]
struct TypeState {
    accepted_version: String,
    last_nonce: String,
    names: BTreeSet<String>,
}

/// One stream's worth of protocol state.
struct Session<'a> {
    config: &'a ClientConfig,
    received_any: bool,
    clusters: TypeState,
    endpoints: TypeState,
    listeners: TypeState,
    routes: TypeState,
    /// Set while endpoints for newly named clusters are outstanding; listener and route updates wait.
    warming: bool,
    deferred: Vec<DiscoveryResponse>,
    node_sent: bool,
}

impl<'a> Session<'a> {
    fn new(config: &'a ClientConfig) -> Self {
        Self {
            config,
            received_any: false,
            clusters: TypeState::default(),
            endpoints: TypeState::default(),
            listeners: TypeState::default(),
            routes: TypeState::default(),
            warming: false,
            deferred: Vec::new(),
            node_sent: false,
        }
    }

    fn state(&mut self, type_url: &str) -> Option<&mut TypeState> {
        match type_url {
            type_url::CLUSTER => Some(&mut self.clusters),
            type_url::ENDPOINT => Some(&mut self.endpoints),
            type_url::LISTENER => Some(&mut self.listeners),
            type_url::ROUTE => Some(&mut self.routes),
            _ => None,
        }
    }

    fn request(&mut self, type_url: &str, error: Option<String>) -> DiscoveryRequest {
        let node = (!self.node_sent).then(|| Node::from(&self.config.node));
        self.node_sent = true;
        let state = self.state(type_url).cloned().unwrap_or_default();
        DiscoveryRequest {
            node,
            version_info: state.accepted_version,
            resource_names: state.names.into_iter().collect(),
            type_url: type_url.to_string(),
            response_nonce: state.last_nonce,
            error_detail: error.map(|message| rpc::Status {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: vec![],
            }),
            ..Default::default()
        }
    }

    async fn run<H: Handler>(&mut self, handler: &mut H) -> Result<(), StreamError> {
        let address = self.config.address.clone();
        let channel = crate::tls::channel(&address, self.config.tls.clone())
            .await
            .map_err(|source| StreamError::Connect { address, source })?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
        // Resubscribe to what we already use, so a reconnect resynchronises everything at once.
        self.endpoints.names = handler.wanted_names(type_url::ENDPOINT);
        self.routes.names = handler.wanted_names(type_url::ROUTE);
        for t in type_url::PUSH_ORDER {
            if matches!(t, type_url::CLUSTER | type_url::LISTENER)
                || !self.state(t).is_some_and(|s| s.names.is_empty())
            {
                let _ = tx.send(self.request(t, None));
            }
        }
        let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let mut responses = client
            .stream_aggregated_resources(requests)
            .await
            .map_err(StreamError::Refused)?
            .into_inner();
        info!(address = %self.config.address, "connected to the control plane");
        handler.connected(true);
        loop {
            let resp = match responses.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => return Err(StreamError::Closed),
                Err(status) => return Err(StreamError::Broken(status)),
            };
            self.received_any = true;
            if self.warming
                && matches!(resp.type_url.as_str(), type_url::LISTENER | type_url::ROUTE)
            {
                debug!(type_url = %resp.type_url, "holding an update while clusters warm");
                self.deferred.push(resp);
                continue;
            }
            for req in self.handle(resp, handler) {
                let _ = tx.send(req);
            }
            if !self.warming {
                for resp in std::mem::take(&mut self.deferred) {
                    for req in self.handle(resp, handler) {
                        let _ = tx.send(req);
                    }
                }
            }
        }
    }

    /// Applies one response and returns the requests it calls for: its ACK or NACK, then any change of
    /// subscription to the routes or endpoints the new config names.
    fn handle<H: Handler>(
        &mut self,
        resp: DiscoveryResponse,
        handler: &mut H,
    ) -> Vec<DiscoveryRequest> {
        let t = resp.type_url.clone();
        let Some(state) = self.state(&t) else {
            warn!(type_url = %t, "ignoring a response of a type this proxy did not ask for");
            return Vec::new();
        };
        state.last_nonce = resp.nonce.clone();
        let result = handler.apply(&t, &resp.version_info, &resp.resources);
        let mut out = Vec::new();
        match result {
            Ok(()) => {
                if let Some(state) = self.state(&t) {
                    state.accepted_version = resp.version_info.clone();
                }
                debug!(type_url = %t, version = %resp.version_info, "applied");
                out.push(self.request(&t, None));
            }
            Err(reason) => {
                warn!(type_url = %t, version = %resp.version_info, %reason, "rejected config (NACK); keeping the last accepted");
                out.push(self.request(&t, Some(reason)));
            }
        }
        if t == type_url::ENDPOINT {
            self.warming = false;
        }
        let dependent = match t.as_str() {
            type_url::CLUSTER => Some(type_url::ENDPOINT),
            type_url::LISTENER => Some(type_url::ROUTE),
            _ => None,
        };
        if let Some(dep) = dependent {
            let wanted = handler.wanted_names(dep);
            let state = self.state(dep).expect("dependent types are tracked");
            if wanted != state.names {
                let grew = !wanted.is_subset(&state.names);
                state.names = wanted;
                if dep == type_url::ENDPOINT && grew {
                    self.warming = true;
                }
                out.push(self.request(dep, None));
            }
        }
        out
    }
}
