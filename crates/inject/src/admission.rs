//! The webhook's wire format: an `admission.k8s.io/v1` AdmissionReview for a Pod in, the same review
//! with its response out. Only parsing and encoding live here; [`crate::mutate`] decides.
//!
//! The webhook's `namespaceSelector` and `objectSelector` (Istio's, in the chart) choose the pods the
//! API server sends, so the namespace's labels are not read again here; the rules no selector can
//! express (ignored namespaces, host network, injected already) still apply, and a pod they skip is
//! admitted unchanged with a warning that says which rule.

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use crate::{InjectConfig, MutateError, Skip};

/// What happened to one pod: what the injector's log and metrics report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped(Skip),
    /// Refused: the pod is not created, and the API server shows the reason.
    Failed(String),
}

/// A review answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub review: Value,
    pub outcome: Outcome,
    /// `namespace/name` (or `generateName`) of the pod, for the log.
    pub pod: String,
}

/// A request that is not an AdmissionReview at all: the HTTP answer is 400.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("the body is not JSON: {0}")]
    Json(String),
    #[error("not an admission.k8s.io/v1 AdmissionReview with a request uid")]
    NotAReview,
}

pub fn review(body: &[u8], config: &InjectConfig) -> Result<Answer, ReviewError> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| ReviewError::Json(e.to_string()))?;
    if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return Err(ReviewError::NotAReview);
    }
    let request = &review["request"];
    let uid = request["uid"].as_str().ok_or(ReviewError::NotAReview)?;
    let object = &request["object"];
    let namespace = request["namespace"]
        .as_str()
        .or(object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str))
        .unwrap_or("default");
    let name = object
        .pointer("/metadata/name")
        .or(object.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let pod_name = format!("{namespace}/{name}");
    let answer = |response: Value, outcome: Outcome| Answer {
        review: json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        }),
        outcome,
        pod: pod_name.clone(),
    };
    let refuse = |message: String| {
        answer(
            json!({"uid": uid, "allowed": false, "status": {"code": 400, "message": message}}),
            Outcome::Failed(message.clone()),
        )
    };
    if request.pointer("/kind/kind").and_then(Value::as_str) != Some("Pod") {
        return Ok(refuse(format!(
            "weft-injector injects Pods, not {}; check the webhook's rules",
            request
                .pointer("/kind/kind")
                .and_then(Value::as_str)
                .unwrap_or("this kind")
        )));
    }
    let pod: Pod = match serde_json::from_value(object.clone()) {
        Ok(pod) => pod,
        Err(e) => return Ok(refuse(format!("weft-injector cannot read the pod: {e}"))),
    };
    Ok(match crate::mutate(&pod, namespace, None, config) {
        Ok(injected) => match serde_json::to_vec(&injected.patch) {
            Ok(patch) => answer(
                json!({
                    "uid": uid, "allowed": true, "patchType": "JSONPatch",
                    "patch": base64::engine::general_purpose::STANDARD.encode(patch),
                }),
                Outcome::Injected,
            ),
            Err(e) => refuse(format!("weft-injector cannot encode its patch: {e}")),
        },
        Err(MutateError::Skipped(skip)) => answer(
            json!({"uid": uid, "allowed": true, "warnings": [format!("no sidecar injected: {skip}")]}),
            Outcome::Skipped(skip),
        ),
        Err(e) => refuse(format!("weft-injector: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(object: Value, kind: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": kind},
                "namespace": "demo",
                "operation": "CREATE",
                "object": object,
            },
        }))
        .expect("json")
    }

    fn pod(extra_labels: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "labels": extra_labels},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]},
        })
    }

    #[test]
    fn reviews_are_answered_with_a_patch_a_warning_or_a_refusal() {
        let config = InjectConfig::default();
        let injected =
            review(&request(pod(json!({"app": "web"})), "Pod"), &config).expect("a review");
        assert_eq!(injected.outcome, Outcome::Injected);
        let response = &injected.review["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().expect("patch"))
            .expect("base64");
        let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSON Patch");
        let mut pod_value = pod(json!({"app": "web"}));
        json_patch::patch(&mut pod_value, &patch).expect("applies");
        assert_eq!(pod_value["spec"]["containers"][0]["name"], "istio-proxy");
        assert_eq!(injected.pod, "demo/web-");

        let mut host = pod(json!({}));
        host["spec"]["hostNetwork"] = true.into();
        let skipped = review(&request(host, "Pod"), &config).expect("a review");
        assert_eq!(skipped.outcome, Outcome::Skipped(Skip::HostNetwork));
        assert_eq!(skipped.review["response"]["allowed"], true);
        assert!(
            skipped.review["response"]["warnings"][0]
                .as_str()
                .is_some_and(|w| w.contains("host's network"))
        );
        assert!(skipped.review["response"].get("patch").is_none());

        let broken = json!({"metadata": {"name": "x"}, "spec": {"containers": "not a list"}});
        let refused = review(&request(broken, "Pod"), &config).expect("a review");
        assert_eq!(refused.review["response"]["allowed"], false);
        let message = refused.review["response"]["status"]["message"]
            .as_str()
            .unwrap_or("");
        assert!(message.contains("cannot read the pod"), "{message}");

        let deployment = review(&request(json!({}), "Deployment"), &config).expect("a review");
        assert!(matches!(deployment.outcome, Outcome::Failed(_)));

        assert_eq!(review(b"{}", &config), Err(ReviewError::NotAReview));
        assert!(matches!(
            review(b"not json", &config),
            Err(ReviewError::Json(_))
        ));
    }
}
