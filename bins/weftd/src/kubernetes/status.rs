//! Where users look for why their config does nothing: an Istio object weftd refuses gets the reason in
//! its `status` (as Istio's status writer fills `validationMessages` and `conditions`), and loses it
//! when fixed. Only the leader writes, and only what differs from the object's current status, so a
//! status write (which the watch sees) never causes another.

use std::sync::Arc;

use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, warn};
use weft_drain::DrainWatcher;

use super::source::{Served, Verdict};

/// The condition weftd owns on every Istio object it refuses.
pub const CONDITION: &str = "Accepted";

/// The merge patch that brings an object's status in line with its verdict, if it needs one.
pub fn status_patch(verdict: &Verdict) -> Option<Value> {
    let status = verdict.status.as_ref();
    let ours = status
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == CONDITION));
    match &verdict.refused {
        Some(reason) => {
            let current = ours.and_then(|c| c["message"].as_str());
            let generation_seen = status.and_then(|s| s["observedGeneration"].as_i64());
            if current == Some(reason.as_str()) && generation_seen == verdict.generation {
                return None;
            }
            Some(json!({"status": {
                "conditions": [{
                    "type": CONDITION,
                    "status": "False",
                    "reason": "Invalid",
                    "message": reason,
                    "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                }],
                "validationMessages": [{
                    "level": "ERROR",
                    "type": {"code": "IST0106", "name": "SchemaValidationError"},
                    "description": reason,
                }],
                "observedGeneration": verdict.generation,
            }}))
        }
        // Accepted: clear what weftd wrote when it refused the object; touch nothing else.
        None if ours.is_some() => Some(json!({"status": {
            "conditions": null,
            "validationMessages": null,
            "observedGeneration": verdict.generation,
        }})),
        None => None,
    }
}

/// Writes each new build's verdicts into the objects' status until drained.
pub async fn run(
    client: Client,
    mut verdicts: watch::Receiver<Arc<Vec<Verdict>>>,
    served: Served,
    drain: DrainWatcher,
) {
    loop {
        let current = verdicts.borrow_and_update().clone();
        for verdict in current.iter() {
            let Some(patch) = status_patch(verdict) else {
                continue;
            };
            let resource = served
                .lock()
                .ok()
                .and_then(|m| m.get(&verdict.kind).cloned());
            let Some(resource) = resource else { continue };
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &verdict.namespace, &resource);
            match api
                .patch_status(
                    &verdict.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    debug!(kind = %resource.kind, namespace = %verdict.namespace, name = %verdict.name, "status written")
                }
                // Deleted meanwhile, or the CRD has no status subresource: the next build says again.
                Err(e) => {
                    warn!(kind = %resource.kind, namespace = %verdict.namespace, name = %verdict.name, error = %e, "cannot write status")
                }
            }
        }
        tokio::select! {
            changed = verdicts.changed() => if changed.is_err() { return },
            () = drain.signaled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(status: Option<Value>, refused: Option<&str>) -> Verdict {
        Verdict {
            kind: 0,
            namespace: "demo".into(),
            name: "vs".into(),
            status,
            generation: Some(3),
            refused: refused.map(str::to_string),
        }
    }

    #[test]
    fn status_is_written_only_when_it_differs_from_the_verdict() {
        let refused = status_patch(&verdict(None, Some("bad field"))).expect("a patch");
        assert_eq!(refused["status"]["conditions"][0]["message"], "bad field");
        assert_eq!(refused["status"]["observedGeneration"], 3);

        let written = Some(refused["status"].clone());
        assert_eq!(
            status_patch(&verdict(written.clone(), Some("bad field"))),
            None
        );
        assert!(status_patch(&verdict(written.clone(), Some("another reason"))).is_some());

        let cleared = status_patch(&verdict(written, None)).expect("cleared when fixed");
        assert_eq!(cleared["status"]["conditions"], Value::Null);
        assert_eq!(
            status_patch(&verdict(None, None)),
            None,
            "valid and untouched"
        );
    }
}
