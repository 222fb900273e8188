//! The namespace controller, as istiod's: ConfigMap `istio-ca-root-cert` (key `root-cert.pem`) in
//! every namespace, holding the mesh's trust bundle, so injected proxies can verify weftd and each
//! other. It is written when missing or different, and written back when someone deletes or edits it.

use std::collections::{BTreeMap, BTreeSet};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use tracing::{debug, info, warn};
use weft_drain::DrainWatcher;

pub const CONFIG_MAP: &str = "istio-ca-root-cert";
pub const KEY: &str = "root-cert.pem";
/// Namespaces Istio leaves alone: no mesh workload runs there.
const IGNORED: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
];
const FIELD_MANAGER: &str = "weftd";

/// Whether a namespace should hold the bundle: not one Istio ignores, and not being deleted (a write
/// there is refused).
pub fn wants_bundle(namespace: &Namespace) -> bool {
    let name = namespace.metadata.name.as_deref().unwrap_or("");
    let terminating = namespace.metadata.deletion_timestamp.is_some()
        || namespace.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
    !name.is_empty() && !IGNORED.contains(&name) && !terminating
}

enum Event {
    Namespace(watcher::Event<Namespace>),
    ConfigMap(watcher::Event<ConfigMap>),
}

/// What the controller knows: the namespaces that want the bundle and what each one's ConfigMap holds.
#[derive(Debug, Default)]
struct State {
    namespaces: BTreeSet<String>,
    listing_namespaces: Option<BTreeSet<String>>,
    bundles: BTreeMap<String, Option<String>>,
    listing_bundles: Option<BTreeMap<String, Option<String>>>,
    namespaces_listed: bool,
    bundles_listed: bool,
}

impl State {
    /// Applies one event; returns the namespaces to check (all of them after a full list).
    fn apply(&mut self, event: Event) -> Vec<String> {
        match event {
            Event::Namespace(e) => match e {
                watcher::Event::Init => {
                    self.listing_namespaces = Some(BTreeSet::new());
                    vec![]
                }
                watcher::Event::InitApply(ns) => {
                    if let (Some(list), true) =
                        (self.listing_namespaces.as_mut(), wants_bundle(&ns))
                    {
                        list.extend(ns.metadata.name);
                    }
                    vec![]
                }
                watcher::Event::InitDone => {
                    self.namespaces = self.listing_namespaces.take().unwrap_or_default();
                    self.namespaces_listed = true;
                    self.namespaces.iter().cloned().collect()
                }
                watcher::Event::Apply(ns) => {
                    let Some(name) = ns.metadata.name.clone() else {
                        return vec![];
                    };
                    if wants_bundle(&ns) {
                        self.namespaces.insert(name.clone());
                    } else {
                        self.namespaces.remove(&name);
                    }
                    vec![name]
                }
                watcher::Event::Delete(ns) => {
                    if let Some(name) = &ns.metadata.name {
                        self.namespaces.remove(name);
                        self.bundles.remove(name);
                    }
                    vec![]
                }
            },
            Event::ConfigMap(e) => {
                let entry = |cm: &ConfigMap| {
                    let ns = cm.metadata.namespace.clone().unwrap_or_default();
                    let data = cm.data.as_ref().and_then(|d| d.get(KEY)).cloned();
                    (ns, data)
                };
                match e {
                    watcher::Event::Init => {
                        self.listing_bundles = Some(BTreeMap::new());
                        vec![]
                    }
                    watcher::Event::InitApply(cm) => {
                        if let Some(list) = self.listing_bundles.as_mut() {
                            let (ns, data) = entry(&cm);
                            list.insert(ns, data);
                        }
                        vec![]
                    }
                    watcher::Event::InitDone => {
                        self.bundles = self.listing_bundles.take().unwrap_or_default();
                        self.bundles_listed = true;
                        self.namespaces.iter().cloned().collect()
                    }
                    watcher::Event::Apply(cm) => {
                        let (ns, data) = entry(&cm);
                        self.bundles.insert(ns.clone(), data);
                        vec![ns]
                    }
                    watcher::Event::Delete(cm) => {
                        let (ns, _) = entry(&cm);
                        self.bundles.remove(&ns);
                        vec![ns]
                    }
                }
            }
        }
    }

    /// Whether `namespace` needs the bundle written: only once both lists are complete, so a
    /// ConfigMap not listed yet is not mistaken for a missing one.
    fn needs_write(&self, namespace: &str, bundle: &str) -> bool {
        self.namespaces_listed
            && self.bundles_listed
            && self.namespaces.contains(namespace)
            && self.bundles.get(namespace).and_then(Option::as_deref) != Some(bundle)
    }
}

/// Keeps `istio-ca-root-cert` in every namespace equal to `bundle` until drained (or dropped when this
/// replica stops leading).
pub async fn run(client: Client, bundle: String, drain: DrainWatcher) {
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| e.map(Event::Namespace));
    let config_maps = watcher(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP}")),
    )
    .default_backoff()
    .map(|e| e.map(Event::ConfigMap));
    let mut events = stream::select(namespaces.boxed(), config_maps.boxed());
    let mut state = State::default();
    let mut failing = false;
    // Namespaces whose write failed (the API server briefly away, say): tried again on a timer, as
    // no event may come for them.
    let mut retry = BTreeSet::new();
    let mut retry_timer = tokio::time::interval(RETRY);
    info!("namespace controller started");
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = retry_timer.tick(), if !retry.is_empty() => {
                for namespace in std::mem::take(&mut retry) {
                    reconcile(&client, &mut state, namespace, &bundle, &mut retry).await;
                }
                continue;
            }
            () = drain.signaled() => return,
        };
        let Some(event) = event else { return };
        let event = match event {
            Ok(event) => {
                failing = false;
                event
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "the namespace controller's watch failed; retrying");
                    failing = true;
                }
                continue;
            }
        };
        for namespace in state.apply(event) {
            reconcile(&client, &mut state, namespace, &bundle, &mut retry).await;
        }
    }
}

const RETRY: std::time::Duration = std::time::Duration::from_secs(10);

async fn reconcile(
    client: &Client,
    state: &mut State,
    namespace: String,
    bundle: &str,
    retry: &mut BTreeSet<String>,
) {
    if !state.needs_write(&namespace, bundle) {
        return;
    }
    match write(client, &namespace, bundle).await {
        Ok(()) => {
            debug!(%namespace, "wrote {CONFIG_MAP}");
            state.bundles.insert(namespace, Some(bundle.to_string()));
        }
        Err(e) => {
            warn!(%namespace, error = %e, "cannot write {CONFIG_MAP}; trying again in {}s", RETRY.as_secs());
            retry.insert(namespace);
        }
    }
}

async fn write(client: &Client, namespace: &str, bundle: &str) -> Result<(), kube::Error> {
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "istio.io/config".to_string(),
                "true".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(KEY.to_string(), bundle.to_string())])),
        ..Default::default()
    };
    // Server-side apply: only our fields are ours, so labels or keys others add survive.
    let mut value = serde_json::to_value(&config_map).map_err(kube::Error::SerdeError)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), "v1".into());
        map.insert("kind".into(), "ConfigMap".into());
    }
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            CONFIG_MAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(value),
        )
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::NamespaceStatus;

    use super::*;

    fn namespace(name: &str, phase: &str) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(NamespaceStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn config_map(ns: &str, data: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(CONFIG_MAP.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(KEY.to_string(), data.to_string())])),
            ..Default::default()
        }
    }

    #[test]
    fn the_bundle_is_written_where_missing_or_different_once_both_lists_are_in() {
        let mut s = State::default();
        s.apply(Event::Namespace(watcher::Event::Init));
        for ns in [
            namespace("demo", "Active"),
            namespace("fresh", "Active"),
            namespace("kube-system", "Active"),
            namespace("going", "Terminating"),
        ] {
            s.apply(Event::Namespace(watcher::Event::InitApply(ns)));
        }
        s.apply(Event::Namespace(watcher::Event::InitDone));
        assert!(
            !s.needs_write("fresh", "B"),
            "ConfigMaps are not listed yet"
        );
        s.apply(Event::ConfigMap(watcher::Event::Init));
        s.apply(Event::ConfigMap(watcher::Event::InitApply(config_map(
            "demo", "B",
        ))));
        let check = s.apply(Event::ConfigMap(watcher::Event::InitDone));
        let writes: Vec<&String> = check.iter().filter(|ns| s.needs_write(ns, "B")).collect();
        assert_eq!(writes, ["fresh"]);
        assert!(!s.needs_write("kube-system", "B") && !s.needs_write("going", "B"));

        // An edit or a delete is written back.
        let edited = s.apply(Event::ConfigMap(watcher::Event::Apply(config_map(
            "demo", "X",
        ))));
        assert_eq!(edited, ["demo"]);
        assert!(s.needs_write("demo", "B"));
        s.apply(Event::ConfigMap(watcher::Event::Delete(config_map(
            "fresh", "B",
        ))));
        assert!(s.needs_write("fresh", "B"));
    }
}
