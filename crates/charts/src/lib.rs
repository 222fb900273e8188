//! Weft's Helm charts (`charts/` in the repository), built into the binary, and a renderer that gives
//! what `helm template` gives for them: `weftctl install` applies exactly what Helm would, from one
//! source. The charts are Go templates; they are rendered with gtmpl and the Helm functions in
//! [`funcs`], and the chart tests render every profile with the real `helm` and compare.

mod funcs;
pub mod values;

use serde_json::{Value, json};

include!(concat!(env!("OUT_DIR"), "/charts.rs"));

/// The charts an install applies, in order: the CRDs and cluster RBAC, then the control plane.
pub const CHARTS: [&str; 3] = ["base", "weftd", "gateway"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChartError {
    #[error("no chart named {0:?}; Weft ships base, weftd and gateway")]
    Unknown(String),
    #[error("chart {chart}: {file}: {reason}")]
    Invalid {
        chart: String,
        file: String,
        reason: String,
    },
    #[error("{template}: {reason}")]
    Render { template: String, reason: String },
}

/// One chart: its metadata, default values and templates.
#[derive(Clone, Debug)]
pub struct Chart {
    pub name: String,
    pub version: String,
    pub app_version: String,
    /// `values.yaml`.
    pub values: Value,
    /// `templates/*` that produce manifests, by path under `charts/`.
    templates: Vec<(String, String)>,
    /// Every `templates/_*.tpl`, where `include` finds its `define`s.
    helpers: String,
}

/// The release the chart is rendered for (Helm's `.Release`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub name: String,
    pub namespace: String,
}

/// The API server's version (Helm's `.Capabilities.KubeVersion`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KubeVersion {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}.{}.0", self.major, self.minor)
    }
}

/// One rendered object and the template it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub template: String,
    pub object: Value,
}

fn invalid(chart: &str, file: &str, reason: impl Into<String>) -> ChartError {
    ChartError::Invalid {
        chart: chart.into(),
        file: file.into(),
        reason: reason.into(),
    }
}

/// The embedded chart `name`.
pub fn chart(name: &str) -> Result<Chart, ChartError> {
    let prefix = format!("{name}/");
    let files: Vec<(&str, &str)> = FILES
        .iter()
        .filter_map(|(path, text)| Some((path.strip_prefix(&prefix)?, *text)))
        .collect();
    let file = |wanted: &str| files.iter().find(|(p, _)| *p == wanted).map(|(_, t)| *t);
    let meta_text = file("Chart.yaml").ok_or_else(|| ChartError::Unknown(name.into()))?;
    let meta: Value = serde_saphyr::from_str(meta_text)
        .map_err(|e| invalid(name, "Chart.yaml", e.to_string()))?;
    let field = |key: &str| {
        meta[key]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| invalid(name, "Chart.yaml", format!("no {key}")))
    };
    let values = values::parse_file(
        &format!("{name}/values.yaml"),
        file("values.yaml").unwrap_or_default(),
    )
    .map_err(|e| invalid(name, "values.yaml", e.to_string()))?;
    let mut templates = Vec::new();
    let mut helpers = String::new();
    for (path, text) in &files {
        let Some(base) = path.strip_prefix("templates/") else {
            continue;
        };
        if base.starts_with('_') {
            helpers.push_str(text);
            helpers.push('\n');
        } else if base.ends_with(".yaml") || base.ends_with(".yml") {
            templates.push((format!("{name}/{path}"), text.to_string()));
        }
    }
    Ok(Chart {
        name: field("name")?,
        version: field("version")?,
        app_version: field("appVersion")?,
        values,
        templates,
        helpers,
    })
}

impl Chart {
    /// The chart's manifests for `values` (over `values.yaml`), as `helm template` renders them.
    pub fn render(
        &self,
        release: &Release,
        kube: KubeVersion,
        user_values: &Value,
    ) -> Result<Vec<Manifest>, ChartError> {
        let mut values = self.values.clone();
        values::coalesce(&mut values, user_values);
        let mut out = Vec::new();
        for (path, text) in &self.templates {
            let error = |reason: String| ChartError::Render {
                template: path.clone(),
                reason,
            };
            let context = json!({
                "Values": values,
                "Release": {"Name": release.name, "Namespace": release.namespace, "Service": "Helm",
                            "IsInstall": true, "IsUpgrade": false, "Revision": 1},
                "Chart": {"Name": self.name, "Version": self.version, "AppVersion": self.app_version},
                "Capabilities": {"KubeVersion": {"Version": kube.to_string(), "GitVersion": kube.to_string(),
                                 "Major": kube.major.to_string(), "Minor": kube.minor.to_string()}},
                "Template": {"Name": path, "BasePath": format!("{}/templates", self.name)},
            });
            let mut t = funcs::template(path);
            t.parse(self.helpers.clone())
                .map_err(|e| error(e.to_string()))?;
            t.parse(text.clone()).map_err(|e| error(e.to_string()))?;
            let rendered = funcs::with_helpers(&self.helpers, || {
                t.render(&gtmpl_ng::Context::from(funcs::from_json_value(&context)))
                    .map_err(|e| e.to_string())
            })
            .map_err(error)?;
            // As Helm: a missing value prints as nothing.
            let rendered = rendered.replace("<no value>", "");
            for doc in split_documents(&rendered) {
                let object: Value = serde_saphyr::from_str(&doc)
                    .map_err(|e| error(format!("the output is not YAML: {e}\n{doc}")))?;
                if !object.is_null() {
                    out.push(Manifest {
                        template: path.clone(),
                        object,
                    });
                }
            }
        }
        out.sort_by_key(|m| install_order(m.object["kind"].as_str().unwrap_or_default()));
        Ok(out)
    }
}

fn split_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line == "---" || line.starts_with("--- ") {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.retain(|d| !d.trim().is_empty());
    docs
}

/// Helm's install order by kind: what others depend on first (CRDs, RBAC, config), workloads after,
/// admission webhooks last, so a webhook never blocks the objects of its own install.
pub fn install_order(kind: &str) -> usize {
    const ORDER: &[&str] = &[
        "PriorityClass",
        "Namespace",
        "NetworkPolicy",
        "ResourceQuota",
        "LimitRange",
        "PodSecurityPolicy",
        "PodDisruptionBudget",
        "ServiceAccount",
        "Secret",
        "SecretList",
        "ConfigMap",
        "StorageClass",
        "PersistentVolume",
        "PersistentVolumeClaim",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleList",
        "ClusterRoleBinding",
        "ClusterRoleBindingList",
        "Role",
        "RoleList",
        "RoleBinding",
        "RoleBindingList",
        "Service",
        "DaemonSet",
        "Pod",
        "ReplicationController",
        "ReplicaSet",
        "Deployment",
        "HorizontalPodAutoscaler",
        "StatefulSet",
        "Job",
        "CronJob",
        "IngressClass",
        "Ingress",
        "APIService",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ];
    ORDER.iter().position(|k| *k == kind).unwrap_or(ORDER.len())
}

/// Manifests as one YAML stream, each with Helm's `# Source:` line.
pub fn to_yaml_stream(manifests: &[Manifest]) -> Result<String, String> {
    let mut out = String::new();
    for m in manifests {
        out.push_str("---\n# Source: ");
        out.push_str(&m.template);
        out.push('\n');
        out.push_str(&funcs::yaml_text(&m.object)?);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> Release {
        Release {
            name: "weft".into(),
            namespace: "istio-system".into(),
        }
    }

    const KUBE: KubeVersion = KubeVersion {
        major: 1,
        minor: 20,
    };

    #[test]
    fn every_chart_renders_with_its_defaults() {
        for name in ["base", "weftd"] {
            let chart = chart(name).expect("embedded");
            let manifests = chart
                .render(&release(), KUBE, &json!({}))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!manifests.is_empty(), "{name}");
        }
    }

    #[test]
    fn profiles_and_values_change_the_control_plane() {
        let chart = chart("weftd").expect("embedded");
        let render = |values: Value| chart.render(&release(), KUBE, &values);
        let find = |manifests: &[Manifest], kind: &str| {
            manifests
                .iter()
                .find(|m| m.object["kind"] == kind)
                .map(|m| m.object.clone())
        };
        let demo = render(json!({"profile": "demo"})).expect("demo");
        let mesh = find(&demo, "ConfigMap").expect("mesh config");
        assert!(
            mesh["data"]["mesh"]
                .as_str()
                .is_some_and(|m| m.contains("accessLogFile: /dev/stdout")),
            "{mesh}"
        );
        assert!(find(&demo, "HorizontalPodAutoscaler").is_none());
        // The user's values win over the profile's.
        let mine =
            render(json!({"profile": "demo", "meshConfig": {"accessLogFile": ""}})).expect("demo");
        let deployment = find(&mine, "Deployment").expect("deployment");
        let env = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
        assert!(
            env.as_array().is_some_and(|e| e
                .iter()
                .any(|e| e["name"] == "WEFTD_ACCESS_LOG_FILE" && e["value"] == "")),
            "{env}"
        );
        let default = render(json!({})).expect("default");
        let hpa = find(&default, "HorizontalPodAutoscaler").expect("autoscaler");
        assert_eq!(
            hpa["apiVersion"], "autoscaling/v2beta2",
            "1.20 has no autoscaling/v2"
        );
        let err = render(json!({"profile": "huge"})).expect_err("unknown profile");
        assert!(
            err.to_string()
                .contains("not one of default, demo, minimal, empty"),
            "{err}"
        );
        let err =
            render(json!({"meshConfig": {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}}}))
                .expect_err("a mesh config key Weft does not act on");
        assert!(
            err.to_string().contains("meshConfig.outboundTrafficPolicy"),
            "{err}"
        );
    }
}
