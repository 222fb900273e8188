//! The YAML directory config source: loads every manifest under a directory and reloads when any file
//! changes, without a restart.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
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
/// A directory that cannot be read whole is an error, so the caller keeps the model it serves.
pub fn load(dir: &Path, mesh: &MeshOptions) -> Result<Model, weft_api::LoadError> {
    let (resources, rejected) = weft_api::load_dir(dir)?;
    for r in &rejected {
        warn!(file = %r.file, kind = %r.kind, name = %r.name, reason = %r.reason, "skipping invalid resource");
    }
    let model = Model::build(&resources, mesh.clone());
    for c in model.conflicts() {
        warn!(host = %c.host, kind = c.kind, used = %c.used, ignored = ?c.ignored,
            "several resources of one kind apply to this host; only the first in load order (files by name, then documents in order) is used");
    }
    info!(dir = %dir.display(), services = model.registry.services.len(), virtual_services = model.virtual_services.len(),
        destination_rules = model.destination_rules.len(), sidecars = model.sidecars.len(), skipped = rejected.len(), "config loaded");
    Ok(model)
}

/// What a directory held when it was last read: every manifest's path, size and modification time
/// (followed through symlinks, so a ConfigMap's swapped target counts as a change).
pub type Fingerprint = Vec<weft_api::ManifestFile>;

pub fn fingerprint(dir: &Path) -> Result<Fingerprint, weft_api::LoadError> {
    weft_api::list_manifests(dir).map(|(files, _)| files)
}

/// Watches `dir` by polling every `interval` and publishes a new generator whenever it differs from
/// `last`, the fingerprint taken before the config now served was loaded (so no change falls between).
/// When the directory cannot be read (out of descriptors, swapped away for a moment), the served
/// config stays and the read is tried again at the next tick; the error is logged once per change.
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
    let mut failing: Option<String> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = drain.signaled() => return,
        }
        let loaded = fingerprint(&dir).and_then(|now| {
            if now == last {
                return Ok(None);
            }
            info!(dir = %dir.display(), "config directory changed; reloading");
            load(&dir, &mesh).map(|model| Some((now, model)))
        });
        let model = match loaded {
            Ok(None) => continue,
            Ok(Some((now, model))) => {
                last = now;
                failing = None;
                Arc::new(model)
            }
            Err(e) => {
                let error = e.to_string();
                if failing.as_ref() != Some(&error) {
                    warn!(dir = %dir.display(), %error, "cannot read the config directory; keeping the config loaded before, retrying");
                    failing = Some(error);
                }
                continue;
            }
        };
        // New service accounts get their tokens before their proxies could be told to ask.
        if let Some(files) = &identity_files {
            files.write(&model);
        }
        publish.send_replace(Arc::new(Generator { model }));
    }
}
