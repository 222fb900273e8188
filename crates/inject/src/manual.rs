//! `weftctl kube-inject`: the same injection over manifests on disk, as `istioctl kube-inject`. Each
//! Pod, and the pod template of each Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob,
//! goes through [`crate::mutate`] as if the namespace asked for injection; every other document is
//! printed as it came.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::Value;

use crate::{InjectConfig, MutateError};

#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error("the manifests are not YAML: {0}")]
    Yaml(String),
    #[error("{what}: {reason}")]
    Document { what: String, reason: String },
}

/// The manifests injected, and a line per workload that was not (with the rule that said no).
pub fn inject_manifests(
    yaml: &str,
    config: &InjectConfig,
) -> Result<(String, Vec<String>), ManualError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| ManualError::Yaml(e.to_string()))?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for mut doc in docs.into_iter().filter(|d| !d.is_null()) {
        let kind = doc["kind"].as_str().unwrap_or("").to_string();
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let namespace = doc
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let what = format!("{kind} {namespace}/{name}");
        let template = match kind.as_str() {
            "Pod" => Some(""),
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                Some("/spec/template")
            }
            "CronJob" => Some("/spec/jobTemplate/spec/template"),
            _ => None,
        };
        if let Some(path) = template
            && let Some(slot) = doc.pointer_mut(path)
        {
            match inject_one(slot, &kind, &name, &namespace, config) {
                Ok(()) => {}
                Err(MutateError::Skipped(rule)) => skipped.push(format!("{what}: {rule}")),
                Err(e) => {
                    return Err(ManualError::Document {
                        what,
                        reason: e.to_string(),
                    });
                }
            }
        }
        out.push(doc);
    }
    let text =
        serde_saphyr::to_string_multiple(&out).map_err(|e| ManualError::Yaml(e.to_string()))?;
    Ok((text, skipped))
}

fn inject_one(
    slot: &mut Value,
    kind: &str,
    name: &str,
    namespace: &str,
    config: &InjectConfig,
) -> Result<(), MutateError> {
    let mut pod: Pod = serde_json::from_value(slot.clone())?;
    // A template names no workload; its controller does, as the owner its pods will have.
    let owners = pod.metadata.owner_references.clone();
    if kind != "Pod" {
        pod.metadata.owner_references = Some(vec![OwnerReference {
            kind: kind.into(),
            name: name.into(),
            controller: Some(true),
            ..Default::default()
        }]);
    }
    let mut injected = crate::mutate(&pod, namespace, None, config)?.pod;
    injected.metadata.owner_references = owners;
    let mut value = serde_json::to_value(&injected)?;
    if kind != "Pod"
        && let Some(map) = value.as_object_mut()
    {
        map.remove("apiVersion");
        map.remove("kind");
    }
    *slot = value;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_templates_are_injected_and_the_rest_passes_through() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: nginx}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly, namespace: demo}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        metadata: {labels: {sidecar.istio.io/inject: "false"}}
        spec: {restartPolicy: Never, containers: [{name: job, image: busybox}]}
"#;
        let (text, skipped) = inject_manifests(yaml, &InjectConfig::default()).expect("injected");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("yaml out");
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0]["kind"], "Service");
        assert_eq!(docs[0]["spec"]["ports"][0]["port"], 80);
        let template = &docs[1]["spec"]["template"];
        assert_eq!(template["spec"]["containers"][0]["name"], "istio-proxy");
        assert!(
            template.get("kind").is_none() && template["metadata"].get("ownerReferences").is_none()
        );
        let env = template["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env");
        let workload = env
            .iter()
            .find(|e| e["name"] == "ISTIO_META_WORKLOAD_NAME")
            .expect("workload");
        assert_eq!(workload["value"], "web");
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            skipped[0].starts_with("CronJob demo/nightly: the pod opts out"),
            "{skipped:?}"
        );
        assert_eq!(
            docs[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["name"],
            "job"
        );
    }
}
