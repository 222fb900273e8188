//! The YAML directory config source: loads every manifest under a directory and reloads when any file
//! changes, without a restart.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use weft_drain::DrainWatcher;
use weft_xds::server::SnapshotGenerator;

use crate::{
    Model,
    translate::{Generator, MeshOptions},
};

/// Rejections logged one by one per load; a file of thousands of bad documents gets a count beyond.
const LOGGED_REJECTIONS: usize = 100;

/// Loads the directory into a model, logging each skipped resource with its file, kind, name and reason.
/// A directory that cannot be read whole is an error, so the caller keeps the model it serves.
pub fn load(dir: &Path, mesh: &MeshOptions) -> Result<Model, weft_api::LoadError> {
    let (resources, rejected) = weft_api::load_dir(dir)?;
    for r in rejected.iter().take(LOGGED_REJECTIONS) {
        warn!(file = %r.file, kind = %r.kind, name = %r.name, reason = %r.reason, "skipping invalid resource");
    }
    if rejected.len() > LOGGED_REJECTIONS {
        warn!(
            more = rejected.len() - LOGGED_REJECTIONS,
            "more invalid resources skipped; the first ones are logged above"
        );
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

/// Filesystem events under `dir`, coalesced into one pending wake-up. The watcher (and its thread) lives
/// as long as the returned value. Symlinked directories are not followed: the poll covers them, and a
/// ConfigMap's swap renames `..data` in the watched directory itself.
fn watch_events(dir: &Path) -> Option<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    use notify::Watcher;
    let (tx, rx) = mpsc::channel(1);
    let handler = move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // Full means a wake-up is pending already; one is all it takes.
            let _ = tx.try_send(());
        }
    };
    let config = notify::Config::default().with_follow_symlinks(false);
    let watched = notify::RecommendedWatcher::new(handler, config)
        .and_then(|mut w| w.watch(dir, notify::RecursiveMode::Recursive).map(|()| w));
    match watched {
        Ok(w) => Some((w, rx)),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot watch the config directory for changes; polling only");
            None
        }
    }
}

/// Writes that come in a burst (an editor, `kubectl cp`, a deploy tool) are read once, together.
const SETTLE: Duration = Duration::from_millis(100);

/// Watches `dir` (inotify events, and a poll every `interval` as the fallback) and publishes a new
/// generator whenever it differs from `last`, the fingerprint taken before the config now served was
/// loaded (so no change falls between). When the directory cannot be read (out of descriptors, swapped
/// away for a moment), the served config stays and the read is tried again at the next tick; the
/// error is logged once per change.
pub async fn watch_dir(
    mut last: Fingerprint,
    dir: PathBuf,
    mesh: MeshOptions,
    interval: Duration,
    publish: watch::Sender<Arc<dyn SnapshotGenerator>>,
    identity_files: Option<crate::ca::IdentityFiles>,
    drain: DrainWatcher,
) {
    // The config served was just loaded from `last`: the first poll is one interval away.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing: Option<String> = None;
    let (_watcher, mut events) = match watch_events(&dir) {
        Some((w, rx)) => (Some(w), Some(rx)),
        None => (None, None),
    };
    loop {
        let event = async {
            match events.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ticker.tick() => {}
            Some(()) = event => {
                tokio::time::sleep(SETTLE).await;
                if let Some(rx) = events.as_mut() {
                    while rx.try_recv().is_ok() {}
                }
            }
            () = drain.signaled() => return,
        }
        // Reading and parsing are blocking work that hostile files can make long; off the runtime, the
        // xDS streams are served meanwhile.
        let (read_dir, read_mesh, seen) = (dir.clone(), mesh.clone(), last.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            fingerprint(&read_dir).and_then(|now| {
                if now == seen {
                    return Ok(None);
                }
                info!(dir = %read_dir.display(), "config directory changed; reloading");
                load(&read_dir, &read_mesh).map(|model| Some((now, model)))
            })
        })
        .await;
        let Ok(loaded) = loaded else {
            warn!(dir = %dir.display(), "the config reader stopped unexpectedly; keeping the config loaded before");
            continue;
        };
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::translate::Generator;

    /// With the poll an hour away, only the filesystem's events can bring these reloads: an edit, and
    /// a ConfigMap-style swap of the `..data` link that the manifest links through.
    #[tokio::test]
    async fn changes_are_seen_as_they_happen_including_configmap_swaps() {
        let dir = std::env::temp_dir().join(format!("weftd-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..v1")).expect("dir");
        let service = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n"
            )
        };
        std::fs::write(dir.join("..v1/mesh.yaml"), service("one")).expect("write");
        symlink("..v1", dir.join("..data")).expect("link");
        symlink("..data/mesh.yaml", dir.join("mesh.yaml")).expect("link");
        let mesh = MeshOptions::default();
        let model = Arc::new(load(&dir, &mesh).expect("loads"));
        let (publish, mut published) =
            watch::channel(Arc::new(Generator { model }) as Arc<dyn SnapshotGenerator>);
        let (trigger, drain) = weft_drain::new();
        let watcher = tokio::spawn(watch_dir(
            fingerprint(&dir).expect("fingerprint"),
            dir.clone(),
            mesh,
            Duration::from_secs(3600),
            publish,
            None,
            drain,
        ));
        let reloaded = |published: &mut watch::Receiver<_>| {
            let mut rx = published.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), rx.changed())
                    .await
                    .is_ok()
            }
        };
        // On this single-threaded runtime, the watcher runs up to its first wait: it is watching.
        tokio::task::yield_now().await;
        let edit = reloaded(&mut published);
        std::fs::write(dir.join("extra.yaml"), service("two")).expect("write");
        assert!(edit.await, "an edit is seen without waiting for the poll");
        published.borrow_and_update();
        let swap = reloaded(&mut published);
        std::fs::create_dir_all(dir.join("..v2")).expect("dir");
        std::fs::write(dir.join("..v2/mesh.yaml"), service("three")).expect("write");
        symlink("..v2", dir.join("..data_tmp")).expect("link");
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
        assert!(
            swap.await,
            "a ConfigMap swap is seen without waiting for the poll"
        );
        trigger.drain().await;
        watcher.await.expect("watcher ends on drain");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
