//! The YAML directory config source: loads every manifest under a directory and reloads when any file
//! changes, without a restart.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tracing::{info, warn};
use weft_drain::DrainWatcher;
use weft_xds::server::SnapshotGenerator;

use crate::{
    Model,
    translate::{Generator, MeshOptions},
};

/// Loads the directory into a model, logging each skipped resource with its file, kind, name and reason.
pub fn load(dir: &Path, mesh: &MeshOptions) -> Model {
    let (resources, rejected) = weft_api::load_dir(dir);
    for r in &rejected {
        warn!(file = %r.file, kind = %r.kind, name = %r.name, reason = %r.reason, "skipping invalid resource");
    }
    let model = Model::build(&resources, mesh.clone());
    info!(dir = %dir.display(), services = model.registry.services.len(), virtual_services = model.virtual_services.len(),
        destination_rules = model.destination_rules.len(), sidecars = model.sidecars.len(), skipped = rejected.len(), "config loaded");
    model
}

/// What a directory held when it was last read.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Names, sizes and modification times of every manifest under `dir`: cheap to take, and it changes
/// when any manifest is added, removed or edited (other files, such as logs, do not count).
pub fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push((path, meta.len(), meta.modified().ok()));
            }
        }
    }
    out.sort();
    out
}

/// Watches `dir` by polling every `interval` and publishes a new generator whenever it differs from
/// `last`, the fingerprint taken before the config now served was loaded (so no change falls between).
pub async fn watch_dir(
    mut last: Fingerprint,
    dir: PathBuf,
    mesh: MeshOptions,
    interval: Duration,
    publish: watch::Sender<Arc<dyn SnapshotGenerator>>,
    identity_files: Option<crate::ca::IdentityFiles>,
    drain: DrainWatcher,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = drain.signaled() => return,
        }
        let now = fingerprint(&dir);
        if now == last {
            continue;
        }
        info!(dir = %dir.display(), "config directory changed; reloading");
        last = now;
        let model = Arc::new(load(&dir, &mesh));
        // New service accounts get their tokens before their proxies could be told to ask.
        if let Some(files) = &identity_files {
            files.write(&model);
        }
        publish.send_replace(Arc::new(Generator { model }));
    }
}
