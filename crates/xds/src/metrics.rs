use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TypeLabels {
    pub(crate) type_url: String,
}

/// Counters of the ADS server, registered under `weft_xds_` on the registry weftd exposes.
#[derive(Clone, Debug, Default)]
pub struct XdsMetrics {
    pub(crate) pushes: Family<TypeLabels, Counter>,
    pub(crate) acks: Family<TypeLabels, Counter>,
    pub(crate) nacks: Family<TypeLabels, Counter>,
    pub(crate) connected: Gauge,
    recent_nacks: Arc<Mutex<VecDeque<Nack>>>,
    pub(crate) sync: crate::syncz::SyncTable,
}

/// One rejected response: which proxy, which type, and the proxy's own words for why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Nack {
    pub node: String,
    pub type_url: String,
    pub error_detail: String,
}

/// How many NACKs weftd remembers for `/debug/nacks`.
const RECENT_NACKS: usize = 64;

impl XdsMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let r = registry.sub_registry_with_prefix("weft_xds");
        r.register(
            "pushes",
            "xDS responses sent to proxies",
            metrics.pushes.clone(),
        );
        r.register(
            "acks",
            "xDS responses proxies accepted",
            metrics.acks.clone(),
        );
        r.register(
            "nacks",
            "xDS responses proxies rejected (see the weftd log for each error_detail)",
            metrics.nacks.clone(),
        );
        r.register(
            "connected_proxies",
            "proxies with an open ADS stream",
            metrics.connected.clone(),
        );
        metrics
    }

    pub(crate) fn labels(type_url: &str) -> TypeLabels {
        TypeLabels {
            type_url: crate::type_url::short(type_url).to_string(),
        }
    }

    pub(crate) fn record_nack(&self, nack: Nack) {
        self.nacks
            .get_or_create(&Self::labels(&nack.type_url))
            .inc();
        if let Ok(mut recent) = self.recent_nacks.lock() {
            if recent.len() == RECENT_NACKS {
                recent.pop_front();
            }
            recent.push_back(nack);
        }
    }

    /// The most recent NACKs, oldest first, so an operator can see which proxy rejected what and why.
    pub fn recent_nacks(&self) -> Vec<Nack> {
        self.recent_nacks
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Each open stream's sync state, for `/debug/syncz`.
    pub fn sync_status(&self) -> Vec<crate::syncz::ProxySync> {
        self.sync.snapshot()
    }

    /// NACKs seen so far for one resource type (`Cluster`, `Listener`, ...); tests wait on it.
    pub fn nacks_for(&self, short_type: &str) -> u64 {
        self.nacks
            .get_or_create(&TypeLabels {
                type_url: short_type.to_string(),
            })
            .get()
    }
}
