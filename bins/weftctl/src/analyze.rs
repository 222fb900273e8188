//! `weftctl analyze`: weft-api's analyzers over manifest files (offline) or over what the cluster
//! holds. Files are read as weftd reads them, plus what only an analysis needs: Namespaces' labels and
//! the pod templates of workloads (Deployments and the like), which stand for the pods they will make.

use std::path::{Path, PathBuf};

use anyhow::Context;
use kube::{
    Api,
    api::{DynamicObject, ListParams},
    discovery::ApiResource,
};
use serde_json::{Value, json};
use weft_api::analyze::{Input, Level, Message};

use crate::install::KubeArgs;

#[derive(Clone, Debug, clap::Args)]
pub struct AnalyzeArgs {
    /// Manifest files or directories of them (`-` reads standard input); without any, the cluster
    /// is analyzed.
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<PathBuf>,
    /// Report on every namespace of the cluster.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// The namespace to report on (mesh-wide policies in the root namespace count everywhere).
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// What an analysis covered and found.
#[derive(Debug)]
pub struct Report {
    pub scope: String,
    pub messages: Vec<Message>,
}

impl Report {
    /// istioctl's exit status: 79 when an error was found.
    pub fn failed(&self) -> bool {
        self.messages.iter().any(|m| m.level() == Level::Error)
    }

    pub fn render(&self) -> String {
        if self.messages.is_empty() {
            return format!(
                "✔ No validation issues found when analyzing {}.\n",
                self.scope
            );
        }
        let mut out: String = self.messages.iter().map(|m| format!("{m}\n")).collect();
        out.push_str(&format!(
            "\n{} issue(s) found when analyzing {}.\n",
            self.messages.len(),
            self.scope
        ));
        out
    }
}

pub async fn run(args: &AnalyzeArgs) -> anyhow::Result<Report> {
    if !args.files.is_empty() {
        let input = from_files(&args.files)?;
        let names: Vec<String> = args.files.iter().map(|f| f.display().to_string()).collect();
        return Ok(Report {
            scope: names.join(", "),
            messages: weft_api::analyze::analyze(&input),
        });
    }
    let input = from_cluster(&args.kube).await?;
    let mut messages = weft_api::analyze::analyze(&input);
    let scope = if args.all_namespaces {
        "all namespaces".to_string()
    } else {
        messages.retain(|m| m.namespace().is_none_or(|ns| ns == args.namespace));
        format!("namespace: {}", args.namespace)
    };
    Ok(Report { scope, messages })
}

/// Every `*.yaml`/`*.yml` under a directory, or the file itself.
fn manifest_paths(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let (files, _) = weft_api::list_manifests(path)
        .with_context(|| format!("cannot read the directory {}", path.display()))?;
    Ok(files.into_iter().map(|f| f.path).collect())
}

pub fn from_files(paths: &[PathBuf]) -> anyhow::Result<Input> {
    let mut input = Input::default();
    for path in paths {
        for file in manifest_paths(path)? {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            add_text(&mut input, &file.display().to_string(), &text);
        }
    }
    Ok(input)
}

/// One file's documents into `input`; a file that is not YAML is one rejection, as weftd makes it.
pub fn add_text(input: &mut Input, file: &str, text: &str) {
    let docs = match weft_api::read_documents(text) {
        Ok(docs) => docs,
        Err(reason) => {
            input.rejected.push(weft_api::Rejected {
                file: file.into(),
                kind: "-".into(),
                name: "-".into(),
                reason,
            });
            return;
        }
    };
    for doc in docs {
        add_object(input, file, doc);
    }
}

fn add_object(input: &mut Input, source: &str, doc: Value) {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_string();
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    if (group, kind.as_str()) == ("", "Namespace") {
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let labels = serde_json::from_value(doc["metadata"]["labels"].clone()).unwrap_or_default();
        input.namespace_labels.insert(name, labels);
        return;
    }
    let doc = match pod_from_template(group, &kind, &doc) {
        Some(pod) => pod,
        None if weft_api::is_mesh_kind(group, &kind) => doc,
        None => return,
    };
    if let Err(r) = weft_api::parse_object(source, doc, &mut input.resources) {
        input.rejected.push(r);
    }
}

/// A workload's pod template as the Pod it will make, named after the workload.
fn pod_from_template(group: &str, kind: &str, doc: &Value) -> Option<Value> {
    let template = match (group, kind) {
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") | ("batch", "Job") => {
            &doc["spec"]["template"]
        }
        ("batch", "CronJob") => &doc["spec"]["jobTemplate"]["spec"]["template"],
        _ => return None,
    };
    let mut metadata = json!({
        "name": doc["metadata"]["name"],
        "labels": template["metadata"]["labels"],
        "annotations": template["metadata"]["annotations"],
    });
    if let Some(ns) = doc["metadata"]["namespace"].as_str() {
        metadata["namespace"] = ns.into();
    }
    for field in ["labels", "annotations"] {
        if metadata[field].is_null() {
            metadata[field] = json!({});
        }
    }
    Some(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"serviceAccountName": template["spec"]["serviceAccountName"]},
    }))
}

/// What the cluster holds of the kinds the mesh reads, every namespace.
async fn from_cluster(kube: &KubeArgs) -> anyhow::Result<Input> {
    let client = kube.client().await?;
    let mut input = Input::default();
    let mut kinds: Vec<ApiResource> = vec![
        ApiResource::erase::<k8s_openapi::api::core::v1::Namespace>(&()),
        ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&()),
        ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
    ];
    kinds.extend(weft_api::kinds::ISTIO_KINDS.iter().map(|k| ApiResource {
        group: k.group.into(),
        version: k.versions[0].into(),
        api_version: format!("{}/{}", k.group, k.versions[0]),
        kind: k.kind.into(),
        plural: k.plural.into(),
    }));
    for ar in kinds {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let list = match api.list(&ListParams::default()).await {
            Ok(list) => list,
            // A cluster without some of Istio's CRDs has none of those objects.
            Err(kube::Error::Api(status)) if status.code == 404 => continue,
            Err(e) => {
                anyhow::bail!(
                    "cannot list {} in the cluster: {}",
                    ar.plural,
                    crate::install::api_message(&e)
                )
            }
        };
        for object in list.items {
            let mut doc = serde_json::to_value(&object)?;
            doc["apiVersion"] = ar.api_version.clone().into();
            doc["kind"] = ar.kind.clone().into();
            add_object(&mut input, "cluster", doc);
        }
    }
    Ok(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_stand_for_their_pods_and_namespaces_for_their_labels() {
        let mut input = Input::default();
        add_text(
            &mut input,
            "app.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio-injection: enabled}}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: reviews-v1, namespace: shop}\n\
             spec: {template: {metadata: {labels: {app: reviews, version: v1}}, spec: {serviceAccountName: reviews, containers: [{name: app, image: x}]}}}\n---\n\
             apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: report}\n\
             spec: {jobTemplate: {spec: {template: {metadata: {annotations: {sidecar.istio.io/inject: 'false'}}, spec: {containers: []}}}}}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: reviews, namespace: shop}\n",
        );
        assert!(input.rejected.is_empty(), "{:?}", input.rejected);
        assert_eq!(input.namespace_labels["shop"]["istio-injection"], "enabled");
        let pods: Vec<(&str, &str)> = input
            .resources
            .pods
            .iter()
            .map(|p| (p.metadata.namespace(), p.metadata.name.as_str()))
            .collect();
        assert_eq!(pods, [("shop", "reviews-v1"), ("default", "report")]);
        assert_eq!(input.resources.pods[0].metadata.labels["version"], "v1");
        assert_eq!(
            input.resources.pods[1].metadata.annotations["sidecar.istio.io/inject"],
            "false"
        );
    }

    #[test]
    fn a_file_that_is_not_yaml_is_one_error() {
        let mut input = Input::default();
        add_text(&mut input, "bad.yaml", "a: [unclosed");
        let report = Report {
            scope: "bad.yaml".into(),
            messages: weft_api::analyze::analyze(&input),
        };
        assert!(report.failed());
        assert!(
            report
                .render()
                .contains("Error [IST0106] (- - bad.yaml) Schema validation error: invalid YAML"),
            "{}",
            report.render()
        );
        let clean = Report {
            scope: "x.yaml".into(),
            messages: vec![],
        };
        assert_eq!(
            clean.render(),
            "✔ No validation issues found when analyzing x.yaml.\n"
        );
    }
}
