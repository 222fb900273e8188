//! What a pod gets, as Istio's sidecar template gives it: the `istio-init` init container installing
//! the capture rules from the pod's `traffic.sidecar.istio.io/*` annotations, the `istio-proxy`
//! container (weft-proxy) with the downward-API environment Istio's agent reads, uid and gid 1337,
//! the projected `istio-token` (audience `istio-ca`) and the `istio-ca-root-cert` ConfigMap, the
//! labels and annotations Istio sets, and the proxy's requests and limits.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Volume};
use serde_json::{Value, json};
use weft_sidecar::iptables::CaptureConfig;

use crate::{InjectConfig, probes, select};

pub const PROXY_CONTAINER: &str = "istio-proxy";
pub const INIT_CONTAINER: &str = "istio-init";
pub const PROXY_UID: i64 = 1337;
const TLS_MODE: &str = "security.istio.io/tlsMode";
const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";
/// Per-pod overrides of the proxy's requests and limits.
const PROXY_CPU: &str = "sidecar.istio.io/proxyCPU";
const PROXY_MEMORY: &str = "sidecar.istio.io/proxyMemory";
const PROXY_CPU_LIMIT: &str = "sidecar.istio.io/proxyCPULimit";
const PROXY_MEMORY_LIMIT: &str = "sidecar.istio.io/proxyMemoryLimit";
const SCRAPE: &str = "prometheus.io/scrape";
const SCRAPE_PORT: &str = "prometheus.io/port";
const SCRAPE_PATH: &str = "prometheus.io/path";
const MERGE_METRICS: &str = "prometheus.istio.io/merge-metrics";
/// Istio's per-pod ProxyConfig overrides, YAML.
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
const VOLUMES: [&str; 4] = ["istio-envoy", "istio-data", "istio-token", "istiod-ca-cert"];

/// The workload a pod belongs to, as Istio names it: a ReplicaSet's Deployment (the ReplicaSet's name
/// without its hash), another owner's name, else the pod's name or its `generateName` stem.
pub fn workload_name(pod: &Pod) -> (String, String) {
    let meta = &pod.metadata;
    if let Some(owner) = meta
        .owner_references
        .as_ref()
        .and_then(|o| o.iter().find(|o| o.controller == Some(true)).or(o.first()))
    {
        if owner.kind == "ReplicaSet"
            && let Some((deployment, _hash)) = owner.name.rsplit_once('-')
        {
            return ("Deployment".into(), deployment.to_string());
        }
        return (owner.kind.clone(), owner.name.clone());
    }
    let name = meta
        .name
        .clone()
        .or_else(|| {
            meta.generate_name
                .as_ref()
                .map(|g| g.trim_end_matches('-').to_string())
        })
        .unwrap_or_default();
    ("Pod".into(), name)
}

/// The pod with its sidecar. Only what Istio's template adds is added; the app's containers are
/// left as they were.
pub fn inject(pod: &Pod, namespace: &str, config: &InjectConfig) -> Pod {
    let mut pod = pod.clone();
    let (owner_kind, workload) = workload_name(&pod);
    let meta = &mut pod.metadata;
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    let canonical_name = labels
        .get("app.kubernetes.io/name")
        .or(labels.get("app"))
        .cloned()
        .unwrap_or_else(|| workload.clone());
    let canonical_revision = labels
        .get("app.kubernetes.io/version")
        .or(labels.get("version"))
        .cloned()
        .unwrap_or_else(|| "latest".into());
    labels.insert(TLS_MODE.into(), "istio".into());
    labels
        .entry(CANONICAL_NAME.into())
        .or_insert(canonical_name);
    labels
        .entry(CANONICAL_REVISION.into())
        .or_insert(canonical_revision);
    let labels = labels.clone();
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    let app_containers: Vec<String> = spec.containers.iter().map(|c| c.name.clone()).collect();
    let pod_ports: Vec<Value> = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| serde_json::to_value(p).ok())
        .collect();

    let probers = if annotations
        .get(probes::REWRITE_ANNOTATION)
        .map(String::as_str)
        == Some("false")
    {
        BTreeMap::new()
    } else {
        probes::rewrite(spec)
    };
    let app_metrics = merge_prometheus(annotations);
    let hold = hold_application(annotations, config);

    let capture = CaptureConfig::default().with_annotations(annotations);
    let init = container(json!({
        "name": INIT_CONTAINER,
        "image": config.proxy_image,
        "args": capture.args(),
        // As Istio without its CNI plugin: root with NET_ADMIN and NET_RAW, for the capture rules only.
        "securityContext": {
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": false, "privileged": false,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "resources": resources(annotations, config),
    }));

    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let env = json!([
        {"name": "CA_ADDR", "value": config.discovery_address},
        {"name": "WEFT_PROXY_XDS_ADDRESS", "value": format!("https://{}", config.discovery_address)},
        {"name": "POD_NAME", "valueFrom": field("metadata.name")},
        {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
        {"name": "INSTANCE_IP", "valueFrom": field("status.podIP")},
        {"name": "SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")},
        {"name": "HOST_IP", "valueFrom": field("status.hostIP")},
        {"name": "ISTIO_META_POD_PORTS", "value": Value::Array(pod_ports).to_string()},
        {"name": "ISTIO_META_APP_CONTAINERS", "value": app_containers.join(",")},
        {"name": "ISTIO_META_CLUSTER_ID", "value": "Kubernetes"},
        {"name": "ISTIO_META_NODE_NAME", "valueFrom": field("spec.nodeName")},
        {"name": "ISTIO_META_INTERCEPTION_MODE", "value": "REDIRECT"},
        {"name": "ISTIO_META_WORKLOAD_NAME", "value": workload},
        {"name": "ISTIO_META_OWNER", "value": owner(&owner_kind, namespace, &workload)},
        {"name": "ISTIO_METAJSON_LABELS", "value": json!(labels).to_string()},
    ]);
    let mut env = env;
    if let Some(list) = env.as_array_mut() {
        if !probers.is_empty() {
            list.push(json!({"name": weft_sidecar::pod::ENV_APP_PROBERS, "value": json!(probers).to_string()}));
        }
        if let Some(metrics) = app_metrics {
            list.push(json!({"name": weft_sidecar::pod::ENV_PROMETHEUS_ANNOTATIONS, "value": metrics.to_string()}));
        }
    }
    let mut proxy = json!({
        "name": PROXY_CONTAINER,
        "image": config.proxy_image,
        "env": env,
        "ports": [{"containerPort": weft_sidecar::pod::STATS_PORT, "name": "http-envoy-prom", "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": 15021},
            "periodSeconds": 15, "timeoutSeconds": 3, "failureThreshold": 4,
        },
        "resources": resources(annotations, config),
        "securityContext": {
            "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID, "runAsNonRoot": true, "privileged": false,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "istio-envoy", "mountPath": "/etc/istio/proxy"},
            {"name": "istio-data", "mountPath": "/var/lib/istio/data"},
            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens"},
            {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio"},
        ],
    });
    let init_containers = spec.init_containers.get_or_insert_with(Vec::new);
    init_containers.insert(0, init);
    if config.native_sidecars {
        // Started right after the capture rules, kept running beside the app, stopped after it.
        proxy["restartPolicy"] = "Always".into();
        init_containers.insert(1, container(proxy));
    } else {
        // First in the list, so the kubelet starts it before the app's containers; the kubelet does
        // not start the next container until this one's postStart hook returns, so waiting there
        // for readiness holds the app until its traffic can flow (Istio's
        // holdApplicationUntilProxyStarts).
        if hold {
            proxy["lifecycle"] =
                json!({"postStart": {"exec": {"command": ["weft-proxy", "wait"]}}});
        }
        spec.containers.insert(0, container(proxy));
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.extend(
        [
            json!({"name": "istio-envoy", "emptyDir": {"medium": "Memory"}}),
            json!({"name": "istio-data", "emptyDir": {}}),
            json!({"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                "audience": crate::AUDIENCE, "expirationSeconds": 43200, "path": "istio-token"}}]}}),
            json!({"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}}),
        ]
        .into_iter()
        .map(|v| serde_json::from_value::<Volume>(v).expect("the template's volumes are valid Volumes (tested)")),
    );

    let (init_names, container_names): (Vec<&str>, Vec<&str>) = if config.native_sidecars {
        (vec![INIT_CONTAINER, PROXY_CONTAINER], vec![])
    } else {
        (vec![INIT_CONTAINER], vec![PROXY_CONTAINER])
    };
    annotations.insert(
        select::STATUS_ANNOTATION.into(),
        json!({
            "initContainers": init_names,
            "containers": container_names,
            "volumes": VOLUMES,
            "imagePullSecrets": null,
            "revision": config.revision,
        })
        .to_string(),
    );
    pod
}

/// Points the pod's scrape annotations at the proxy's merged metrics on 15020, as Istio's
/// `enablePrometheusMerge`, and returns the app's own (for `ISTIO_PROMETHEUS_ANNOTATIONS`) when it
/// had any. A pod with `prometheus.io/scrape: "false"` or `prometheus.istio.io/merge-metrics:
/// "false"` keeps its annotations.
fn merge_prometheus(annotations: &mut BTreeMap<String, String>) -> Option<Value> {
    if annotations.get(SCRAPE).map(String::as_str) == Some("false")
        || annotations.get(MERGE_METRICS).map(String::as_str) == Some("false")
    {
        return None;
    }
    let mut app = serde_json::Map::new();
    for (key, field) in [
        (SCRAPE, "scrape"),
        (SCRAPE_PORT, "port"),
        (SCRAPE_PATH, "path"),
    ] {
        if let Some(value) = annotations.get(key) {
            app.insert(field.into(), value.clone().into());
        }
    }
    annotations.insert(SCRAPE.into(), "true".into());
    annotations.insert(
        SCRAPE_PORT.into(),
        weft_sidecar::pod::STATUS_PORT.to_string(),
    );
    annotations.insert(SCRAPE_PATH.into(), "/stats/prometheus".into());
    (!app.is_empty()).then_some(Value::Object(app))
}

/// Whether the app waits for its proxy: the injector's setting, overridden by the pod's
/// `proxy.istio.io/config` (`holdApplicationUntilProxyStarts: true|false`), as Istio reads it.
fn hold_application(annotations: &BTreeMap<String, String>, config: &InjectConfig) -> bool {
    annotations
        .get(PROXY_CONFIG)
        .and_then(|text| serde_saphyr::from_str::<Value>(text).ok())
        .and_then(|v| v.get("holdApplicationUntilProxyStarts")?.as_bool())
        .unwrap_or(config.hold_application_until_proxy_starts)
}

/// A pod annotation the injector cannot act on. The pod is refused with it: injecting around a bad
/// value would make a pod whose proxy is not what its owner asked for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("annotation {annotation}={value:?}: {reason}")]
pub struct InvalidAnnotation {
    pub annotation: String,
    pub value: String,
    pub reason: String,
}

/// Checks the annotations that change what is injected, before anything is.
pub fn check_annotations(annotations: &BTreeMap<String, String>) -> Result<(), InvalidAnnotation> {
    let invalid = |annotation: &str, reason: String| InvalidAnnotation {
        annotation: annotation.to_string(),
        value: annotations.get(annotation).cloned().unwrap_or_default(),
        reason,
    };
    for key in [PROXY_CPU, PROXY_MEMORY, PROXY_CPU_LIMIT, PROXY_MEMORY_LIMIT] {
        if let Some(value) = annotations.get(key)
            && !is_quantity(value)
        {
            return Err(invalid(
                key,
                "not a Kubernetes quantity such as 100m or 128Mi".into(),
            ));
        }
    }
    for key in [probes::REWRITE_ANNOTATION, MERGE_METRICS] {
        if let Some(value) = annotations.get(key)
            && value != "true"
            && value != "false"
        {
            return Err(invalid(key, "\"true\" or \"false\"".into()));
        }
    }
    if let Some(text) = annotations.get(PROXY_CONFIG) {
        let config: Value = serde_saphyr::from_str(text)
            .map_err(|e| invalid(PROXY_CONFIG, format!("not YAML: {e}")))?;
        match config.get("holdApplicationUntilProxyStarts") {
            None | Some(Value::Bool(_)) => {}
            Some(_) => {
                return Err(invalid(
                    PROXY_CONFIG,
                    "holdApplicationUntilProxyStarts must be true or false".into(),
                ));
            }
        }
        if !config.is_object() && !config.is_null() {
            return Err(invalid(PROXY_CONFIG, "not a ProxyConfig mapping".into()));
        }
    }
    let capture = CaptureConfig::default().with_annotations(annotations);
    weft_sidecar::iptables::rules(&capture).map_err(|e| InvalidAnnotation {
        annotation: "traffic.sidecar.istio.io/*".into(),
        value: String::new(),
        reason: e.to_string(),
    })?;
    Ok(())
}

/// Kubernetes' quantity syntax: a decimal number and a binary, decimal or exponent suffix.
fn is_quantity(text: &str) -> bool {
    let digits_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(|exp| {
        let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
        !exp.is_empty() && exp.chars().all(|c| c.is_ascii_digit())
    });
    number_ok && suffix_ok
}

fn container(value: Value) -> Container {
    serde_json::from_value(value).expect("the template's containers are valid Containers (tested)")
}

/// Istio's `ISTIO_META_OWNER`: the controlling object's API path.
fn owner(kind: &str, namespace: &str, name: &str) -> String {
    let (group, plural) = match kind {
        "Deployment" => ("apis/apps/v1", "deployments"),
        "StatefulSet" => ("apis/apps/v1", "statefulsets"),
        "DaemonSet" => ("apis/apps/v1", "daemonsets"),
        "ReplicaSet" => ("apis/apps/v1", "replicasets"),
        "Job" => ("apis/batch/v1", "jobs"),
        "CronJob" => ("apis/batch/v1", "cronjobs"),
        _ => ("api/v1", "pods"),
    };
    format!("kubernetes://{group}/namespaces/{namespace}/{plural}/{name}")
}

fn resources(annotations: &BTreeMap<String, String>, config: &InjectConfig) -> Value {
    let pick = |key: &str, default: &str| {
        annotations
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let r = &config.resources;
    json!({
        "requests": {"cpu": pick(PROXY_CPU, &r.cpu), "memory": pick(PROXY_MEMORY, &r.memory)},
        "limits": {"cpu": pick(PROXY_CPU_LIMIT, &r.cpu_limit), "memory": pick(PROXY_MEMORY_LIMIT, &r.memory_limit)},
    })
}
