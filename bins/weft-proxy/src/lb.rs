//! Choosing a cluster among weighted ones, and an endpoint within a cluster.

use std::sync::{Arc, atomic::Ordering};

use rand::Rng;

use crate::{
    model::{LbPolicy, WeightedCluster},
    state::{ClusterState, EndpointState},
};

/// Picks among weighted clusters; weights need not add up to 100.
pub fn pick_cluster(clusters: &[WeightedCluster]) -> Option<&WeightedCluster> {
    let total: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return clusters.first();
    }
    let mut n = rand::rng().random_range(0..total);
    for c in clusters {
        let w = u64::from(c.weight);
        if n < w {
            return Some(c);
        }
        n -= w;
    }
    clusters.last()
}

/// Picks a healthy endpoint by the cluster's policy, skipping `exclude` (the endpoint a retry just failed on)
/// when another is available.
pub fn pick_endpoint(
    cluster: &ClusterState,
    exclude: Option<&Arc<EndpointState>>,
) -> Option<Arc<EndpointState>> {
    // One endpoint (a sidecar's inbound cluster, a one-replica service): nothing to choose, and no
    // list to build for it. A retry goes back to it, as it would with the list.
    if let [only] = cluster.endpoints.as_slice() {
        return only.config.healthy.then(|| Arc::clone(only));
    }
    let mut healthy: Vec<&Arc<EndpointState>> = cluster
        .endpoints
        .iter()
        .filter(|e| e.config.healthy)
        .collect();
    if healthy.len() > 1
        && let Some(ex) = exclude
    {
        healthy.retain(|e| !Arc::ptr_eq(e, ex));
    }
    let n = healthy.len();
    if n == 0 {
        return None;
    }
    let total: u64 = healthy.iter().map(|e| u64::from(e.config.weight)).sum();
    let by_weight = |mut x: u64| {
        for e in &healthy {
            let w = u64::from(e.config.weight);
            if x < w {
                return Arc::clone(e);
            }
            x -= w;
        }
        Arc::clone(healthy[n - 1])
    };
    Some(match cluster.config.lb {
        LbPolicy::RoundRobin => {
            by_weight(cluster.next.fetch_add(1, Ordering::Relaxed) as u64 % total.max(1))
        }
        LbPolicy::Random => by_weight(rand::rng().random_range(0..total.max(1))),
        LbPolicy::LeastRequest => {
            let mut rng = rand::rng();
            let a = healthy[rng.random_range(0..n)];
            let b = healthy[rng.random_range(0..n)];
            let load = |e: &EndpointState| {
                e.active.load(Ordering::Relaxed) as f64 / f64::from(e.config.weight.max(1))
            };
            Arc::clone(if load(b) < load(a) { b } else { a })
        }
    })
}

/// A request in flight to an endpoint, counted for `LEAST_REQUEST` while the guard lives.
pub struct InFlight(Arc<EndpointState>);

impl InFlight {
    pub fn start(endpoint: &Arc<EndpointState>) -> Self {
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        Self(endpoint.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted until it ends or is dropped.
pub struct WithInFlight<B> {
    pub body: B,
    pub _in_flight: InFlight,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for WithInFlight<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::atomic::AtomicUsize};

    use super::*;
    use crate::model::{ClusterConfig, EndpointConfig, HeaderOps, WorkloadRef};

    fn cluster(lb: LbPolicy, eps: &[(&str, u32, bool)]) -> ClusterState {
        let config = ClusterConfig {
            name: "c".into(),
            tls: None,
            tls_matches: vec![],
            lb,
            connect_timeout: std::time::Duration::from_secs(1),
            idle_timeout: crate::model::DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            http2: false,
            original_dst: false,
            source_address: None,
            static_endpoints: None,
            services: vec![],
        };
        ClusterState {
            client: crate::state::XdsHandlerTestAccess::client(&config),
            config,
            endpoints: eps
                .iter()
                .map(|(a, w, h)| {
                    Arc::new(EndpointState::new(
                        EndpointConfig {
                            address: a.parse().expect("addr"),
                            weight: *w,
                            healthy: *h,
                            workload: WorkloadRef::default(),
                            socket_match: Default::default(),
                        },
                        false,
                    ))
                })
                .collect(),
            next: AtomicUsize::new(0),
            tcp_tls: None,
        }
    }

    fn counts(c: &ClusterState, n: usize) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for _ in 0..n {
            let e = pick_endpoint(c, None).expect("endpoint");
            *m.entry(e.config.address.to_string()).or_default() += 1;
        }
        m
    }

    #[test]
    fn round_robin_honours_weights_and_health() {
        let c = cluster(
            LbPolicy::RoundRobin,
            &[
                ("127.0.0.1:1", 1, true),
                ("127.0.0.2:1", 3, true),
                ("127.0.0.3:1", 5, false),
            ],
        );
        let m = counts(&c, 400);
        assert_eq!((m["127.0.0.1:1"], m["127.0.0.2:1"]), (100, 300));
        assert!(!m.contains_key("127.0.0.3:1"));
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let c = cluster(
            LbPolicy::LeastRequest,
            &[("127.0.0.1:1", 1, true), ("127.0.0.2:1", 1, true)],
        );
        c.endpoints[0].active.store(100, Ordering::Relaxed);
        let m = counts(&c, 200);
        // The busy endpoint wins only when both random choices land on it (about a quarter of the time).
        assert!(m.get("127.0.0.1:1").copied().unwrap_or(0) < 90, "{m:?}");
    }

    #[test]
    fn random_spreads_and_no_healthy_endpoint_means_none() {
        let c = cluster(
            LbPolicy::Random,
            &[("127.0.0.1:1", 1, true), ("127.0.0.2:1", 1, true)],
        );
        assert_eq!(counts(&c, 200).len(), 2);
        assert!(
            pick_endpoint(
                &cluster(LbPolicy::Random, &[("127.0.0.1:1", 1, false)]),
                None
            )
            .is_none()
        );
    }

    #[test]
    fn weighted_clusters_split_by_weight() {
        let wc = |name: &str, weight| WeightedCluster {
            name: name.into(),
            weight,
            headers: HeaderOps::default(),
        };
        let clusters = [wc("a", 90), wc("b", 10)];
        let a = (0..2000)
            .filter(|_| pick_cluster(&clusters).expect("cluster").name == "a")
            .count();
        assert!((1700..1900).contains(&a), "{a}");
    }
}
