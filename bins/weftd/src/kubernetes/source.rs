//! The Kubernetes config source: one watcher per kind over one shared client, feeding one aggregator
//! that owns every kind's objects, rebuilds the model through the directory loader's own parser when a
//! burst of changes settles, and publishes it.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::Value;
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
    time::Instant,
};
use tracing::{Instrument, debug, info, info_span, warn};
use weft_api::kinds::{ISTIO_KINDS, IstioKind, preferred_version};
use weft_drain::DrainWatcher;
use weft_xds::server::SnapshotGenerator;

use crate::{
    Model,
    translate::{Generator, MeshOptions},
};

/// A kind weftd reads from the API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchedKind {
    pub group: &'static str,
    pub kind: &'static str,
    /// Versions Weft reads, in any order; the newest stable one the server serves is watched.
    pub versions: &'static [&'static str],
    pub istio: Option<IstioKind>,
}

/// Services, EndpointSlices, Pods and every Istio kind, in the order the model reads them.
pub fn watched_kinds() -> Vec<WatchedKind> {
    let core = |kind| WatchedKind {
        group: "",
        kind,
        versions: &["v1"],
        istio: None,
    };
    let mut kinds = vec![
        core("Service"),
        WatchedKind {
            group: "discovery.k8s.io",
            kind: "EndpointSlice",
            versions: &["v1", "v1beta1"],
            istio: None,
        },
        core("Pod"),
    ];
    kinds.extend(ISTIO_KINDS.iter().map(|k| WatchedKind {
        group: k.group,
        kind: k.kind,
        versions: k.versions,
        istio: Some(*k),
    }));
    kinds
}

/// Istio's push debounce (`PILOT_DEBOUNCE_AFTER`, `PILOT_DEBOUNCE_MAX`): a build waits for this much
/// quiet after a change, but never longer than the max after the first change of a burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Debounce {
    pub after: Duration,
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Self {
            after: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// How often a kind the server does not serve (its CRD not installed yet) is looked for again.
const REDISCOVER: Duration = Duration::from_secs(5);

type Key = (String, String);

/// What one kind's watcher reports.
#[derive(Debug)]
enum Change {
    /// A full list: every object that exists now (after a start or a relist).
    Replace(BTreeMap<Key, Value>),
    Apply(Key, Value),
    Delete(Key),
    /// The server serves this kind in no version Weft reads; there are no such objects.
    Absent,
}

/// An Istio object as the aggregator last built it, and what the loader made of it: what the status
/// writer needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub kind: usize,
    pub namespace: String,
    pub name: String,
    /// The object's `status` as the API server last showed it.
    pub status: Option<Value>,
    pub generation: Option<i64>,
    /// Why the loader refused it; `None` when it was accepted.
    pub refused: Option<String>,
}

/// Where each watched kind is served, for the status writer's patches.
pub type Served = Arc<std::sync::Mutex<BTreeMap<usize, ApiResource>>>;

/// The running source's outputs.
pub struct Outputs {
    pub publish: watch::Sender<Arc<dyn SnapshotGenerator>>,
    /// Set once every kind has been listed (or found not served): the first full sync.
    pub synced: watch::Sender<bool>,
    pub verdicts: watch::Sender<Arc<Vec<Verdict>>>,
    pub served: Served,
    pub identity_files: Option<crate::ca::IdentityFiles>,
}

/// Watches every kind until drained, publishing a model after the first full sync and then after every
/// settled burst of changes.
pub async fn run(
    client: Client,
    mesh: MeshOptions,
    debounce: Debounce,
    out: Outputs,
    drain: DrainWatcher,
) {
    let kinds = watched_kinds();
    let (tx, rx) = mpsc::channel(256);
    let mut watchers = JoinSet::new();
    for (i, kind) in kinds.iter().enumerate() {
        let span = info_span!("watch", kind = kind.kind);
        watchers.spawn(
            watch_kind(
                client.clone(),
                i,
                *kind,
                tx.clone(),
                out.served.clone(),
                drain.clone(),
            )
            .instrument(span),
        );
    }
    drop(tx);
    aggregate(kinds, rx, mesh, debounce, out, drain).await;
    watchers.abort_all();
    while watchers.join_next().await.is_some() {}
}

/// Finds where the server serves `kind`: `None` when it serves it in no version Weft reads.
async fn discover(client: &Client, kind: &WatchedKind) -> Result<Option<ApiResource>, kube::Error> {
    let group = match kube::discovery::group(client, kind.group).await {
        Ok(g) => g,
        Err(kube::Error::Discovery(kube::error::DiscoveryError::MissingApiGroup(_))) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let serving: Vec<&str> = group
        .versions()
        .filter(|v| {
            group
                .versioned_resources(v)
                .iter()
                .any(|(ar, _)| ar.kind == kind.kind)
        })
        .collect();
    let Some(version) = preferred_version(kind.versions, &serving) else {
        return Ok(None);
    };
    Ok(group
        .versioned_resources(version)
        .into_iter()
        .map(|(ar, _)| ar)
        .find(|ar| ar.kind == kind.kind))
}

/// One kind's watcher: discovers its version, then lists and watches, resuming from the last resource
/// version after a broken watch and relisting when that version is gone (both by kube's watcher, with
/// its backoff). A list is reported whole, so a relist never drops an object that still exists.
async fn watch_kind(
    client: Client,
    index: usize,
    kind: WatchedKind,
    tx: mpsc::Sender<(usize, Change)>,
    served: Served,
    drain: DrainWatcher,
) {
    let mut reported_absent = false;
    let mut discovery_failing = false;
    let resource = loop {
        match discover(&client, &kind).await {
            Ok(Some(ar)) => break ar,
            Ok(None) => {
                if !reported_absent {
                    if kind.istio.is_some_and(|k| k.supported) {
                        warn!(
                            group = kind.group,
                            "the API server does not serve this kind (install the base chart: weftctl install, or helm install charts/base); looking again every {}s",
                            REDISCOVER.as_secs()
                        );
                    } else {
                        debug!(group = kind.group, "not served; looking again later");
                    }
                    reported_absent = true;
                    if tx.send((index, Change::Absent)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                if !discovery_failing {
                    warn!(error = %e, "cannot discover where the API server serves this kind; retrying");
                    discovery_failing = true;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(REDISCOVER) => {}
            () = drain.signaled() => return,
        }
    };
    info!(version = %resource.version, "watching");
    if let Ok(mut map) = served.lock() {
        map.insert(index, resource.clone());
    }
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Option<BTreeMap<Key, Value>> = None;
    let mut failing = false;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = drain.signaled() => return,
        };
        let Some(event) = event else { return };
        let change = match event {
            Ok(event) => {
                if failing {
                    info!("watching again");
                    failing = false;
                }
                match event {
                    watcher::Event::Init => {
                        listing = Some(BTreeMap::new());
                        continue;
                    }
                    watcher::Event::InitApply(obj) => {
                        if let (Some(list), Some((key, value))) =
                            (listing.as_mut(), normalize(&resource, obj))
                        {
                            list.insert(key, value);
                        }
                        continue;
                    }
                    watcher::Event::InitDone => Change::Replace(listing.take().unwrap_or_default()),
                    watcher::Event::Apply(obj) => match normalize(&resource, obj) {
                        Some((key, value)) => Change::Apply(key, value),
                        None => continue,
                    },
                    watcher::Event::Delete(obj) => match normalize(&resource, obj) {
                        Some((key, _)) => Change::Delete(key),
                        None => continue,
                    },
                }
            }
            Err(e) => {
                // The watcher backs off and resumes by itself; what weftd serves stays meanwhile.
                if !failing {
                    warn!(error = %e, "the watch failed; serving the config seen so far and retrying");
                    failing = true;
                }
                continue;
            }
        };
        if tx.send((index, change)).await.is_err() {
            return;
        }
    }
}

/// An object as the loader reads it: with its kind and version (list items carry neither), without
/// the fields no part of Weft reads (managed fields; all of a Pod but its labels, service account
/// and address), and an EndpointSlice of v1beta1 read as v1.
fn normalize(resource: &ApiResource, obj: DynamicObject) -> Option<(Key, Value)> {
    let key = (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone()?,
    );
    let mut value = serde_json::to_value(obj).ok()?;
    let map = value.as_object_mut()?;
    map.insert("apiVersion".into(), resource.api_version.clone().into());
    map.insert("kind".into(), resource.kind.clone().into());
    if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    if resource.kind == "Pod" {
        let pick = |v: &Value, path: &str| v.pointer(path).cloned().unwrap_or(Value::Null);
        value = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": pick(&value, "/metadata"),
            "spec": {"serviceAccountName": pick(&value, "/spec/serviceAccountName")},
            "status": {"podIP": pick(&value, "/status/podIP")},
        });
    } else if resource.kind == "EndpointSlice" && resource.version == "v1beta1" {
        value = weft_api::k8s::endpoint_slice_from_v1beta1(value);
    }
    Some((key, value))
}

/// Owns every kind's objects; builds and publishes when a burst of changes settles.
async fn aggregate(
    kinds: Vec<WatchedKind>,
    mut rx: mpsc::Receiver<(usize, Change)>,
    mesh: MeshOptions,
    debounce: Debounce,
    out: Outputs,
    drain: DrainWatcher,
) {
    let mut stores: Vec<BTreeMap<Key, Value>> = vec![BTreeMap::new(); kinds.len()];
    let mut reported = vec![false; kinds.len()];
    let mut synced = false;
    // The first change of the pending burst, and the latest.
    let mut pending: Option<(Instant, Instant)> = None;
    loop {
        let deadline =
            pending.map(|(first, last)| (last + debounce.after).min(first + debounce.max));
        let settle = async {
            match deadline {
                Some(d) if synced => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = rx.recv() => {
                let Some((i, change)) = msg else { return };
                let store = &mut stores[i];
                match change {
                    Change::Replace(all) => { *store = all; reported[i] = true; }
                    Change::Absent => { store.clear(); reported[i] = true; }
                    Change::Apply(key, value) => {
                        if store.get(&key) == Some(&value) {
                            continue;
                        }
                        store.insert(key, value);
                    }
                    Change::Delete(key) => {
                        if store.remove(&key).is_none() {
                            continue;
                        }
                    }
                }
                let now = Instant::now();
                pending = Some(pending.map_or((now, now), |(first, _)| (first, now)));
                if !synced && reported.iter().all(|r| *r) {
                    synced = true;
                    info!("every kind listed: the first full sync");
                    build_and_publish(&kinds, &stores, &mesh, &out);
                    pending = None;
                    out.synced.send_replace(true);
                }
            }
            () = settle => {
                pending = None;
                build_and_publish(&kinds, &stores, &mesh, &out);
            }
            () = drain.signaled() => return,
        }
    }
}

/// Rejections logged one by one per build; beyond, a count.
const LOGGED_REJECTIONS: usize = 100;

fn build_and_publish(
    kinds: &[WatchedKind],
    stores: &[BTreeMap<Key, Value>],
    mesh: &MeshOptions,
    out: &Outputs,
) {
    let (resources, verdicts) = parse(kinds, stores);
    let refused: Vec<&Verdict> = verdicts.iter().filter(|v| v.refused.is_some()).collect();
    for v in refused.iter().take(LOGGED_REJECTIONS) {
        warn!(kind = kinds[v.kind].kind, namespace = %v.namespace, name = %v.name, reason = v.refused.as_deref().unwrap_or(""), "skipping invalid resource");
    }
    if refused.len() > LOGGED_REJECTIONS {
        warn!(
            more = refused.len() - LOGGED_REJECTIONS,
            "more invalid resources skipped; the first ones are logged above"
        );
    }
    let model = Model::build(&resources, mesh.clone());
    for c in model.conflicts() {
        warn!(host = %c.host, kind = c.kind, used = %c.used, ignored = ?c.ignored,
            "several resources of one kind apply to this host; only the oldest (by creation time, then namespace and name) is used");
    }
    info!(
        services = model.registry.services.len(),
        virtual_services = model.virtual_services.len(),
        destination_rules = model.destination_rules.len(),
        sidecars = model.sidecars.len(),
        skipped = refused.len(),
        "config built from the API server"
    );
    let model = Arc::new(model);
    if let Some(files) = &out.identity_files {
        files.write(&model);
    }
    out.publish.send_replace(Arc::new(Generator { model }));
    out.verdicts.send_replace(Arc::new(verdicts));
}

/// Every object through the loader's parser, oldest first within a kind (as Istio orders configs, so
/// the oldest of two conflicting resources wins wherever it came from). Istio objects get a verdict
/// each; other kinds' rejections are only logged.
pub fn parse(
    kinds: &[WatchedKind],
    stores: &[BTreeMap<Key, Value>],
) -> (weft_api::Resources, Vec<Verdict>) {
    let mut resources = weft_api::Resources::default();
    let mut verdicts = Vec::new();
    for (i, (kind, store)) in kinds.iter().zip(stores).enumerate() {
        let mut objects: Vec<(&Key, &Value)> = store.iter().collect();
        objects.sort_by_key(|(key, v)| {
            let created = v
                .pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .unwrap_or("");
            (created, *key)
        });
        for ((namespace, name), value) in objects {
            let source = format!("kubernetes {}/{namespace}/{name}", kind.kind);
            let verdict = weft_api::parse_object(&source, value.clone(), &mut resources);
            let refused = verdict.err().map(|r| r.reason);
            if kind.istio.is_some() {
                verdicts.push(Verdict {
                    kind: i,
                    namespace: namespace.clone(),
                    name: name.clone(),
                    status: value.get("status").cloned(),
                    generation: value
                        .pointer("/metadata/generation")
                        .and_then(Value::as_i64),
                    refused,
                });
            } else if let Some(reason) = refused {
                warn!(kind = kind.kind, %namespace, %name, %reason, "skipping invalid resource");
            }
        }
    }
    (resources, verdicts)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn store(objects: &[Value]) -> BTreeMap<Key, Value> {
        objects
            .iter()
            .map(|o| {
                let key = (
                    o["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    o["metadata"]["name"].as_str().unwrap_or("").to_string(),
                );
                (key, o.clone())
            })
            .collect()
    }

    #[test]
    fn objects_from_the_api_are_parsed_as_the_directory_loader_parses_them() {
        let kinds = watched_kinds();
        let mut stores = vec![BTreeMap::new(); kinds.len()];
        let at = |kind: &str| kinds.iter().position(|k| k.kind == kind).expect("watched");
        stores[at("Service")] = store(&[json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "demo", "uid": "u", "resourceVersion": "7"},
            "spec": {"ports": [{"name": "http", "port": 80}], "clusterIP": "10.0.0.9", "sessionAffinity": "None"},
            "status": {"loadBalancer": {}},
        })]);
        let vs = |name: &str, created: &str, spec: Value| {
            json!({
                "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                "metadata": {"name": name, "namespace": "demo", "creationTimestamp": created, "generation": 2},
                "spec": spec,
            })
        };
        stores[at("VirtualService")] = store(&[
            vs(
                "newer",
                "2026-01-02T00:00:00Z",
                json!({"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}]}]}),
            ),
            vs(
                "older",
                "2026-01-01T00:00:00Z",
                json!({"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}]}]}),
            ),
            vs(
                "bad",
                "2026-01-01T00:00:00Z",
                json!({"hosts": ["web"], "nonsense": true}),
            ),
        ]);
        stores[at("Gateway")] = store(&[json!({
            "apiVersion": "networking.istio.io/v1", "kind": "Gateway",
            "metadata": {"name": "gw", "namespace": "demo"}, "spec": {},
        })]);
        let (resources, verdicts) = parse(&kinds, &stores);
        assert_eq!(resources.services.len(), 1);
        let names: Vec<&str> = resources
            .virtual_services
            .iter()
            .map(|v| v.metadata.name.as_str())
            .collect();
        assert_eq!(names, ["older", "newer"], "oldest first");
        let refused: BTreeMap<&str, &str> = verdicts
            .iter()
            .filter_map(|v| Some((v.name.as_str(), v.refused.as_deref()?)))
            .collect();
        assert!(refused["bad"].contains("nonsense"), "{refused:?}");
        assert!(
            refused["gw"].contains("does not act on Gateway"),
            "{refused:?}"
        );
        assert_eq!(refused.len(), 2);
        assert_eq!(
            verdicts
                .iter()
                .find(|v| v.name == "older")
                .and_then(|v| v.generation),
            Some(2)
        );
    }

    #[test]
    fn pods_keep_only_what_the_mesh_reads() {
        let resource = ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "Pod".into(),
            plural: "pods".into(),
        };
        let obj: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"app": "a"}, "managedFields": [{}]},
            "spec": {"serviceAccountName": "sa", "containers": [{"name": "c", "image": "i", "env": [{"name": "SECRET", "value": "x"}]}]},
            "status": {"podIP": "10.1.1.1", "phase": "Running"},
        }))
        .expect("object");
        let (key, value) = normalize(&resource, obj).expect("normalized");
        assert_eq!(key, ("n".to_string(), "p".to_string()));
        assert_eq!(value["kind"], "Pod");
        assert!(value.pointer("/spec/containers").is_none());
        assert!(value.pointer("/metadata/managedFields").is_none());
        let pod: weft_api::k8s::Pod = serde_json::from_value(value).expect("a pod");
        assert_eq!(pod.status.pod_ip.as_deref(), Some("10.1.1.1"));
        assert_eq!(pod.spec.service_account_name.as_deref(), Some("sa"));
    }

    /// Builds wait for a burst of changes to settle, as istiod's debounce does, but a stream of
    /// changes that never settles still gets a build every `max`.
    #[tokio::test(start_paused = true)]
    async fn changes_are_debounced_and_never_held_past_the_max() {
        let kinds = watched_kinds();
        let service = kinds
            .iter()
            .position(|k| k.kind == "Service")
            .expect("watched");
        let (tx, rx) = mpsc::channel(256);
        let (publish, _) = watch::channel(Arc::new(Generator {
            model: Arc::new(Model::default()),
        }) as Arc<dyn SnapshotGenerator>);
        let (verdicts, mut builds) = watch::channel(Arc::new(Vec::new()));
        let (synced, mut synced_rx) = watch::channel(false);
        let out = Outputs {
            publish,
            synced,
            verdicts,
            served: Served::default(),
            identity_files: None,
        };
        let (trigger, drain) = weft_drain::new();
        let debounce = Debounce {
            after: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let task = tokio::spawn(aggregate(
            kinds.clone(),
            rx,
            MeshOptions::default(),
            debounce,
            out,
            drain,
        ));
        let mut count = || {
            let n = usize::from(builds.has_changed().unwrap_or(false));
            builds.borrow_and_update();
            n
        };
        let apply = |n: usize| {
            let svc = json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("s{n}"), "namespace": "demo"},
                "spec": {"ports": [{"port": 80}]}});
            (
                service,
                Change::Apply(("demo".into(), format!("s{n}")), svc),
            )
        };

        // Nothing is built until every kind has been listed.
        for i in 0..kinds.len() - 1 {
            tx.send((i, Change::Replace(BTreeMap::new())))
                .await
                .expect("sent");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(count(), 0);
        assert!(!*synced_rx.borrow_and_update());
        tx.send((kinds.len() - 1, Change::Absent))
            .await
            .expect("sent");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(count(), 1, "the first full sync builds at once");
        assert!(*synced_rx.borrow());

        // A burst of five changes 50 ms apart: one build, 100 ms after the last.
        for n in 0..5 {
            tx.send(apply(n)).await.expect("sent");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(count(), 0, "not while the burst goes on");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(count(), 1);

        // Changes every 50 ms for 2.5 s: a build each second all the same.
        let mut built = 0;
        for n in 5..55 {
            tx.send(apply(n)).await.expect("sent");
            tokio::time::sleep(Duration::from_millis(50)).await;
            built += count();
        }
        assert_eq!(built, 2);
        drop(tx);
        task.await.expect("the aggregator ends with its watchers");
        drop(trigger);
    }
}
