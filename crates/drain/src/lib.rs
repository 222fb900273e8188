//! Graceful shutdown. [`new`] gives a trigger and a watcher; every listener, connection and long-lived
//! task holds a clone of the watcher, stops taking new work once [`DrainWatcher::signaled`] resolves, and
//! drops its clone when its work in flight is done. [`DrainTrigger::drain`] signals and then waits for the
//! last clone to go, so a caller bounds it with `tokio::time::timeout` for the grace period.

mod accept;
pub mod http;

use std::convert::Infallible;

pub use accept::{Acceptor, raise_fd_limit};

use tokio::sync::{mpsc, watch};

pub fn new() -> (DrainTrigger, DrainWatcher) {
    let (signal_tx, signal_rx) = watch::channel(false);
    let (release_tx, release_rx) = mpsc::channel(1);
    (
        DrainTrigger {
            signal: signal_tx,
            released: release_rx,
        },
        DrainWatcher {
            signal: signal_rx,
            _release: release_tx,
        },
    )
}

#[derive(Debug)]
pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    released: mpsc::Receiver<Infallible>,
}

impl DrainTrigger {
    /// Tells every watcher to drain, then waits until all of them are dropped.
    pub async fn drain(mut self) {
        let _ = self.signal.send(true);
        // recv() yields None once every sender (one per watcher clone) is gone; nothing is ever sent.
        let _ = self.released.recv().await;
    }
}

#[derive(Clone, Debug)]
pub struct DrainWatcher {
    signal: watch::Receiver<bool>,
    _release: mpsc::Sender<Infallible>,
}

impl DrainWatcher {
    /// Resolves once draining has begun (or the trigger was dropped, which also means shutdown).
    pub async fn signaled(&self) {
        let mut signal = self.signal.clone();
        let _ = signal.wait_for(|draining| *draining).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_every_watcher() {
        let (trigger, watcher) = super::new();
        let worker = watcher.clone();
        let task = tokio::spawn(async move {
            worker.signaled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(worker);
        });
        drop(watcher);
        let started = tokio::time::Instant::now();
        trigger.drain().await;
        assert!(started.elapsed() >= Duration::from_secs(1));
        task.await.expect("worker finished");
    }
}
