//! What weftd knows of each connected proxy's config, per type: the last response sent, whether the
//! proxy accepted it, and its words when it did not. weftd serves it as `/debug/syncz` (Istio's
//! istiod serves the same path on 15014) and `weftctl proxy-status` prints it as istioctl does.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// Every open ADS stream's sync state. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct SyncTable {
    streams: Arc<Mutex<BTreeMap<u64, ProxySync>>>,
    next: Arc<AtomicU64>,
}

/// One proxy's stream, as `/debug/syncz` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxySync {
    /// The node id (`sidecar~10.0.0.1~web-0.demo~demo.svc.cluster.local`).
    pub node: String,
    /// `ISTIO_VERSION` from the node's metadata: the proxy's own version.
    #[serde(default)]
    pub proxy_version: String,
    /// The SPIFFE id the proxy proved on the mTLS port; empty on plaintext xDS.
    #[serde(default)]
    pub identity: String,
    /// `sotw` or `delta`.
    pub variant: String,
    /// When the stream opened, in seconds since the Unix epoch.
    pub connected_at: u64,
    /// By short type name (`Cluster`, `ClusterLoadAssignment`, `Listener`, `RouteConfiguration`).
    pub types: BTreeMap<String, TypeSync>,
}

/// One type of one stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeSync {
    /// The nonce of the last response sent; empty before the first.
    pub sent_nonce: String,
    /// The version of what was sent: SotW's `version_info`, or the delta response's nonce.
    pub version: String,
    /// How many resources the last response carried.
    pub resources: usize,
    /// The nonce the proxy last accepted.
    pub acked_nonce: String,
    /// What the proxy wrote when it rejected the last response (cut to a few KiB by the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nack: Option<String>,
}

/// Where one type of one proxy stands, as istioctl's proxy-status names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// The proxy accepted the last response weftd sent.
    Synced,
    /// Sent, and neither accepted nor rejected yet.
    Stale,
    /// The proxy rejected the last response; it runs its previous config.
    Nacked,
    /// The proxy subscribed, and nothing was sent yet.
    NotSent,
}

impl TypeSync {
    pub fn state(&self) -> SyncState {
        if self.sent_nonce.is_empty() {
            SyncState::NotSent
        } else if self.nack.is_some() {
            SyncState::Nacked
        } else if self.acked_nonce == self.sent_nonce {
            SyncState::Synced
        } else {
            SyncState::Stale
        }
    }
}

impl std::fmt::Display for SyncState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Synced => "SYNCED",
            Self::Stale => "STALE",
            Self::Nacked => "NACKED",
            Self::NotSent => "NOT SENT",
        })
    }
}

/// What `/debug/syncz` answers: the control plane's version and its streams.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    pub control_plane_version: String,
    pub proxies: Vec<ProxySync>,
}

impl SyncTable {
    /// The streams open now, by node id.
    pub fn snapshot(&self) -> Vec<ProxySync> {
        let mut all: Vec<ProxySync> = self
            .streams
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| a.node.cmp(&b.node));
        all
    }

    /// A new stream's entry, removed when the handle drops however the stream ends.
    pub(crate) fn open(&self, variant: &str) -> StreamSync {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let connected_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Ok(mut s) = self.streams.lock() {
            s.insert(
                id,
                ProxySync {
                    variant: variant.into(),
                    connected_at,
                    ..Default::default()
                },
            );
        }
        StreamSync {
            table: self.clone(),
            id,
        }
    }
}

/// One stream's handle on its entry.
#[derive(Debug)]
pub(crate) struct StreamSync {
    table: SyncTable,
    id: u64,
}

impl StreamSync {
    fn update(&self, f: impl FnOnce(&mut ProxySync)) {
        if let Ok(mut s) = self.table.streams.lock()
            && let Some(entry) = s.get_mut(&self.id)
        {
            f(entry);
        }
    }

    fn update_type(&self, type_url: &str, f: impl FnOnce(&mut TypeSync)) {
        let short = crate::type_url::short(type_url).to_string();
        self.update(|p| f(p.types.entry(short).or_default()));
    }

    pub(crate) fn identify(&self, node: &crate::NodeInfo, identity: Option<&weft_certs::SpiffeId>) {
        self.update(|p| {
            p.node = node.id.clone();
            p.proxy_version = node.meta_str("ISTIO_VERSION").unwrap_or_default().into();
            p.identity = identity.map(ToString::to_string).unwrap_or_default();
        });
    }

    /// A served type the proxy subscribed to, before anything is sent.
    pub(crate) fn subscribed(&self, type_url: &str) {
        self.update_type(type_url, |_| {});
    }

    pub(crate) fn sent(&self, type_url: &str, nonce: &str, version: &str, resources: usize) {
        self.update_type(type_url, |t| {
            t.sent_nonce = nonce.into();
            t.version = version.into();
            t.resources = resources;
            t.nack = None;
        });
    }

    pub(crate) fn acked(&self, type_url: &str, nonce: &str) {
        self.update_type(type_url, |t| {
            if t.sent_nonce == nonce {
                t.acked_nonce = nonce.into();
                t.nack = None;
            }
        });
    }

    pub(crate) fn nacked(&self, type_url: &str, nonce: &str, detail: &str) {
        self.update_type(type_url, |t| {
            if t.sent_nonce == nonce {
                t.nack = Some(detail.into());
            }
        });
    }
}

impl Drop for StreamSync {
    fn drop(&mut self) {
        if let Ok(mut s) = self.table.streams.lock() {
            s.remove(&self.id);
        }
    }
}
