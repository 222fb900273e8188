//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does and as
//! istiod elects the replica that writes status and runs the namespace controller. Every replica
//! serves xDS and the CA; only the leader writes to the API server.
//!
//! A lease held by another replica is taken over only when its record has not changed for a whole
//! lease duration as this replica observed it (by its own clock, never comparing timestamps across
//! machines). The leader steps down when it cannot renew within the renew deadline, before any other
//! replica may take over, and releases the lease when drained so a successor need not wait.

use std::{future::Future, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};
use weft_drain::DrainWatcher;

use super::api_code;

/// The Lease's name in weftd's namespace.
pub const LEASE_NAME: &str = "weftd-leader";

/// client-go's defaults: a lease lasts 15 s, the leader must renew within 10 s, every try 2 s apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub lease: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// The part of a lease record whose change shows its holder is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: String,
    renewed: Option<Timestamp>,
    transitions: i32,
}

fn record(lease: &Lease) -> Record {
    let spec = lease.spec.clone().unwrap_or_default();
    Record {
        holder: spec.holder_identity.unwrap_or_default(),
        renewed: spec.renew_time.map(|t| t.0),
        transitions: spec.lease_transitions.unwrap_or(0),
    }
}

/// Campaigns until drained, publishing whether this replica leads on `leading`.
pub async fn run(
    client: Client,
    namespace: String,
    identity: String,
    timing: Timing,
    leading: watch::Sender<bool>,
    drain: DrainWatcher,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    // Another holder's record, and when this replica first saw it.
    let mut observed: Option<(Record, Instant)> = None;
    let mut renewed_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        match try_acquire_or_renew(&api, &identity, timing, &mut observed, now).await {
            Ok(true) => {
                renewed_at = Some(now);
                if !*leading.borrow() {
                    info!(lease = %format!("{namespace}/{LEASE_NAME}"), %identity, "leading: this replica writes status and runs the namespace controller");
                    leading.send_replace(true);
                }
            }
            Ok(false) => {
                renewed_at = None;
                if *leading.borrow() {
                    warn!("another replica took the lease: no longer leading");
                    leading.send_replace(false);
                }
            }
            Err(e) => {
                debug!(error = %e, "cannot reach the leader lease");
                if *leading.borrow()
                    && renewed_at.is_none_or(|at| now.duration_since(at) >= timing.renew_deadline)
                {
                    warn!(error = %e, "cannot renew the leader lease within its deadline: no longer leading");
                    leading.send_replace(false);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(timing.retry) => {}
            () = drain.signaled() => break,
        }
    }
    if *leading.borrow() {
        leading.send_replace(false);
        release(&api, &identity).await;
    }
}

/// One round: `Ok(true)` when this replica holds the lease after it.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    identity: &str,
    timing: Timing,
    observed: &mut Option<(Record, Instant)>,
    now: Instant,
) -> Result<bool, kube::Error> {
    let stamp = MicroTime(Timestamp::now());
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.into()),
                lease_duration_seconds: Some(seconds(timing.lease)),
                acquire_time: Some(stamp.clone()),
                renew_time: Some(stamp),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if api_code(&e) == Some(409) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let current = record(&lease);
    let mut spec = lease.spec.take().unwrap_or_default();
    if current.holder != identity {
        let since = match observed {
            Some((seen, at)) if *seen == current => *at,
            _ => {
                *observed = Some((current.clone(), now));
                now
            }
        };
        let held_for = Duration::from_secs(
            spec.lease_duration_seconds
                .unwrap_or(seconds(timing.lease))
                .max(0) as u64,
        );
        if !current.holder.is_empty() && now.duration_since(since) < held_for {
            return Ok(false);
        }
        spec.holder_identity = Some(identity.into());
        spec.acquire_time = Some(stamp.clone());
        spec.lease_transitions = Some(current.transitions.saturating_add(1));
    }
    spec.renew_time = Some(stamp);
    spec.lease_duration_seconds = Some(seconds(timing.lease));
    lease.spec = Some(spec);
    // The resource version in `lease` makes this a compare-and-swap: a replica that raced us loses.
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => {
            *observed = None;
            Ok(true)
        }
        Err(e) if api_code(&e) == Some(409) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the lease up so the next replica need not wait for it to expire.
async fn release(api: &Api<Lease>, identity: &str) {
    let Ok(Some(mut lease)) = api.get_opt(LEASE_NAME).await else {
        return;
    };
    if record(&lease).holder != identity {
        return;
    }
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
    }
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => info!("released the leader lease"),
        Err(e) => {
            warn!(error = %e, "cannot release the leader lease; another replica takes it when it expires")
        }
    }
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// Runs `work` while this replica leads: started when it becomes leader, dropped when it stops being
/// one or weftd drains, and started afresh on the next term.
pub async fn while_leading<F, Fut>(mut leading: watch::Receiver<bool>, drain: DrainWatcher, work: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        tokio::select! {
            led = leading.wait_for(|l| *l) => if led.is_err() { return },
            () = drain.signaled() => return,
        }
        let finished = tokio::select! {
            () = work() => true,
            _ = leading.wait_for(|l| !*l) => false,
            () = drain.signaled() => return,
        };
        // Work that ends on its own is not restarted within the same term.
        if finished {
            tokio::select! {
                _ = leading.wait_for(|l| !*l) => {}
                () = drain.signaled() => return,
            }
        }
    }
}
