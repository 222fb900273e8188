//! `weftctl check [--pre]`: staged checks, a ✓/‼/✗ line each and, for what fails, how to fix it (as
//! Linkerd's check). `--pre` asks whether an install can go ahead; without it, whether the installed
//! mesh works: CRDs, control plane, injector webhook, root certificate, proxies.
//!
//! Each verdict is a pure function of what was read, so the table tests cover every line; `run`
//! only reads the cluster and hands the facts over.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        },
        core::v1::{ConfigMap, Namespace, Pod},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;
use weft_charts::KubeVersion;

use crate::install::{KubeArgs, api_message};

/// The oldest Kubernetes Weft is tested on.
pub const MIN_KUBE: KubeVersion = KubeVersion {
    major: 1,
    minor: 20,
};
/// A root certificate closer than this to its end is a warning: rotating it takes a rollout.
const ROOT_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Clone, Debug, clap::Args)]
pub struct CheckArgs {
    /// Check that an install can go ahead, rather than that an installed mesh works.
    #[arg(long)]
    pub pre: bool,
    /// The control plane's namespace.
    #[arg(short = 'i', long = "istio-namespace", default_value = "istio-system")]
    pub namespace: String,
    #[command(flatten)]
    pub kube: KubeArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub status: Status,
    pub what: String,
    /// How to fix it, for what did not pass.
    pub hint: Option<String>,
}

impl Line {
    fn pass(what: impl Into<String>) -> Self {
        Self {
            status: Status::Pass,
            what: what.into(),
            hint: None,
        }
    }

    fn warn(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            status: Status::Warn,
            what: what.into(),
            hint: Some(hint.into()),
        }
    }

    fn fail(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            status: Status::Fail,
            what: what.into(),
            hint: Some(hint.into()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub name: &'static str,
    pub lines: Vec<Line>,
}

pub fn passed(stages: &[Stage]) -> bool {
    stages
        .iter()
        .flat_map(|s| &s.lines)
        .all(|l| l.status != Status::Fail)
}

pub fn render(stages: &[Stage]) -> String {
    let mut out = String::new();
    for stage in stages {
        let _ = writeln!(
            out,
            "{}\n{}",
            stage.name,
            "-".repeat(stage.name.chars().count())
        );
        for line in &stage.lines {
            let mark = match line.status {
                Status::Pass => "✓",
                Status::Warn => "‼",
                Status::Fail => "✗",
            };
            let _ = writeln!(out, "{mark} {}", line.what);
            if let Some(hint) = &line.hint {
                for h in hint.lines() {
                    let _ = writeln!(out, "    {h}");
                }
            }
        }
        out.push('\n');
    }
    out.push_str(if passed(stages) {
        "Status check results are ✓\n"
    } else {
        "Status check results are ✗\n"
    });
    out
}

// === Verdicts ===

pub fn version_line(version: KubeVersion, git_version: &str) -> Line {
    if (version.major, version.minor) >= (MIN_KUBE.major, MIN_KUBE.minor) {
        Line::pass(format!(
            "the API server's version ({git_version}) is supported ({}.{} or later)",
            MIN_KUBE.major, MIN_KUBE.minor
        ))
    } else {
        Line::fail(
            format!("the API server's version ({git_version}) is older than Weft supports"),
            format!(
                "upgrade the cluster to Kubernetes {}.{} or later",
                MIN_KUBE.major, MIN_KUBE.minor
            ),
        )
    }
}

/// One `(verb, group, resource)` the install needs and whether the caller may.
pub type Access = ((&'static str, &'static str, &'static str), bool);

pub fn access_line(scope: &str, checked: &[Access]) -> Line {
    let missing: Vec<String> = checked
        .iter()
        .filter(|(_, allowed)| !allowed)
        .map(|((verb, group, resource), _)| match *group {
            "" => format!("{verb} {resource}"),
            g => format!("{verb} {resource}.{g}"),
        })
        .collect();
    if missing.is_empty() {
        Line::pass(format!(
            "can create the {scope} resources an install applies"
        ))
    } else {
        Line::fail(
            format!("cannot {} ({scope})", missing.join(", ")),
            "run as a cluster administrator, or have one grant these rights (kubectl auth can-i lists yours)",
        )
    }
}

/// A CRD as the check needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrdFacts {
    pub name: String,
    pub established: bool,
    pub served: Vec<String>,
}

/// Every Istio kind's CRD present, established and serving the versions Weft reads and writes. With
/// `pre`, absent CRDs are fine (install creates them) and only existing ones must fit.
pub fn crd_lines(crds: &[CrdFacts], pre: bool) -> Vec<Line> {
    let mut missing = Vec::new();
    let mut lines = Vec::new();
    for kind in weft_api::kinds::ISTIO_KINDS {
        let name = format!("{}.{}", kind.plural, kind.group);
        let Some(crd) = crds.iter().find(|c| c.name == name) else {
            missing.push(name);
            continue;
        };
        let absent: Vec<&str> = kind
            .versions
            .iter()
            .copied()
            .filter(|v| !crd.served.iter().any(|s| s == v))
            .collect();
        if !absent.is_empty() {
            lines.push(Line::fail(
                format!("CRD {name} does not serve {}", absent.join(", ")),
                "apply Weft's CRDs over it: weftctl install (or helm upgrade weft-base charts/base)",
            ));
        } else if !crd.established && !pre {
            lines.push(Line::fail(
                format!("CRD {name} is not established"),
                format!("kubectl describe crd {name} says why"),
            ));
        }
    }
    let total = weft_api::kinds::ISTIO_KINDS.len();
    if pre {
        if lines.is_empty() {
            let present = total - missing.len();
            lines.push(Line::pass(if present == 0 {
                "no Istio CRDs yet; install creates them".to_string()
            } else {
                format!("the {present} Istio CRDs present fit Weft's")
            }));
        }
    } else if !missing.is_empty() {
        lines.push(Line::fail(
            format!(
                "{} of {total} Istio CRDs are missing: {}",
                missing.len(),
                missing.join(", ")
            ),
            "install them: weftctl install (or helm install weft-base charts/base)",
        ));
    } else if lines.is_empty() {
        lines.push(Line::pass(format!(
            "all {total} Istio CRDs are installed, established, and serve their versions"
        )));
    }
    lines
}

/// The mesh's trust anchor: valid now, and not about to end.
pub fn root_cert_line(source: &str, pem: Option<&str>, now: SystemTime) -> Line {
    let Some(pem) = pem else {
        return Line::fail(
            format!("no root certificate in {source}"),
            "weftd writes it once it runs; check the control plane above",
        );
    };
    let info = match weft_certs::certificate_info(pem) {
        Ok(info) => info,
        Err(e) => {
            return Line::fail(
                format!("the root certificate in {source} cannot be read: {e}"),
                "weftd rewrites it from its CA; if the CA Secret (cacerts or istio-ca-secret) is damaged, restore it",
            );
        }
    };
    let soonest = info.iter().map(|c| c.not_after).min().unwrap_or(now);
    let started = info.iter().all(|c| c.not_before <= now);
    let left = soonest.duration_since(now).unwrap_or_default();
    let days = left.as_secs() / 86_400;
    if !started || soonest <= now {
        Line::fail(
            format!("the root certificate in {source} is not valid now"),
            "plug in a new root (Secret cacerts in weftd's namespace) and restart weftd; proxies pick up the new bundle",
        )
    } else if left < ROOT_WARNING {
        Line::warn(
            format!("the root certificate in {source} expires in {days} days"),
            "rotate it before then: add the new root to Secret cacerts beside the old, then replace the old",
        )
    } else {
        Line::pass(format!(
            "the root certificate in {source} is valid for {days} more days"
        ))
    }
}

/// A webhook's `caBundle`: present, readable, and valid now.
pub fn ca_bundle_line(webhook: &str, bundle: Option<&[u8]>, now: SystemTime) -> Line {
    let hint =
        "the injector writes it when it starts; check that weftd's pod (container injector) runs";
    let Some(bundle) = bundle.filter(|b| !b.is_empty()) else {
        return Line::fail(format!("{webhook} has no caBundle yet"), hint);
    };
    let pem = String::from_utf8_lossy(bundle);
    match weft_certs::certificate_info(&pem) {
        Ok(info)
            if info
                .iter()
                .all(|c| c.not_before <= now && now < c.not_after) =>
        {
            Line::pass(format!("the caBundle of {webhook} is a valid CA"))
        }
        Ok(_) => Line::fail(format!("the caBundle of {webhook} is not valid now"), hint),
        Err(e) => Line::fail(
            format!("the caBundle of {webhook} cannot be read: {e}"),
            hint,
        ),
    }
}

pub fn proxies_line(
    replicas: &[crate::proxy_status::Replica],
    unreachable: &[String],
) -> Vec<Line> {
    use weft_xds::syncz::SyncState;
    let mut lines: Vec<Line> = unreachable
        .iter()
        .map(|u| {
            Line::fail(
                format!("weftd {u}"),
                "kubectl -n <namespace> logs <pod> -c discovery says why",
            )
        })
        .collect();
    let proxies: Vec<_> = replicas.iter().flat_map(|r| &r.report.proxies).collect();
    let behind: Vec<String> = proxies
        .iter()
        .filter(|p| p.types.values().any(|t| t.state() != SyncState::Synced))
        .map(|p| crate::proxy_status::proxy_name(&p.node))
        .collect();
    if behind.is_empty() {
        lines.push(Line::pass(format!(
            "{} proxies connected, all in sync",
            proxies.len()
        )));
    } else {
        lines.push(Line::fail(
            format!(
                "{} of {} proxies are not in sync: {}",
                behind.len(),
                proxies.len(),
                behind.join(", ")
            ),
            "weftctl proxy-status shows each type's state and any rejection in the proxy's words",
        ));
    }
    lines
}

// === Reading the cluster ===

async fn can(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                namespace: namespace.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .ok()
        .and_then(|r| r.status)
        .is_some_and(|s| s.allowed)
}

const CLUSTER_RIGHTS: [(&str, &str, &str); 5] = [
    (
        "create",
        "apiextensions.k8s.io",
        "customresourcedefinitions",
    ),
    ("create", "rbac.authorization.k8s.io", "clusterroles"),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
    (
        "create",
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
    ),
    ("create", "", "namespaces"),
];

const NAMESPACE_RIGHTS: [(&str, &str, &str); 8] = [
    ("create", "apps", "deployments"),
    ("create", "", "services"),
    ("create", "", "serviceaccounts"),
    ("create", "", "configmaps"),
    ("create", "rbac.authorization.k8s.io", "roles"),
    ("create", "rbac.authorization.k8s.io", "rolebindings"),
    ("create", "policy", "poddisruptionbudgets"),
    ("create", "autoscaling", "horizontalpodautoscalers"),
];

async fn crd_facts(client: &Client) -> Result<Vec<CrdFacts>, String> {
    let crds = Api::<CustomResourceDefinition>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api_message(&e))?;
    Ok(crds
        .items
        .into_iter()
        .map(|c| CrdFacts {
            name: c.metadata.name.unwrap_or_default(),
            established: c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True"),
            served: c
                .spec
                .versions
                .iter()
                .filter(|v| v.served)
                .map(|v| v.name.clone())
                .collect(),
        })
        .collect())
}

pub async fn run(args: &CheckArgs) -> Vec<Stage> {
    let mut stages = Vec::new();
    let mut api = Stage {
        name: "Kubernetes API",
        lines: Vec::new(),
    };
    let client = match args.kube.client().await {
        Ok(c) => c,
        Err(e) => {
            api.lines.push(Line::fail(
                format!("cannot reach the API server: {e:#}"),
                "check --kubeconfig/--context, or $KUBECONFIG",
            ));
            return vec![api];
        }
    };
    let version = match client.apiserver_version().await {
        Ok(info) => info,
        Err(e) => {
            api.lines.push(Line::fail(
                format!("cannot reach the API server: {e}"),
                "check --kubeconfig/--context, or $KUBECONFIG, and that the server is up",
            ));
            return vec![api];
        }
    };
    api.lines.push(Line::pass("can reach the API server"));
    match crate::manifest::parse_kube_version(&format!("{}.{}", version.major, version.minor)) {
        Ok(v) => api.lines.push(version_line(v, &version.git_version)),
        Err(e) => api.lines.push(Line::fail(
            e,
            "a Kubernetes version such as 1.29 was expected",
        )),
    }
    stages.push(api);

    if args.pre {
        let mut rights = Vec::new();
        for r in CLUSTER_RIGHTS {
            rights.push((r, can(&client, r.0, r.1, r.2, None).await));
        }
        let mut namespaced = Vec::new();
        for r in NAMESPACE_RIGHTS {
            namespaced.push((r, can(&client, r.0, r.1, r.2, Some(&args.namespace)).await));
        }
        stages.push(Stage {
            name: "Permissions",
            lines: vec![
                access_line("cluster-wide", &rights),
                access_line(&format!("namespace {}", args.namespace), &namespaced),
            ],
        });
    }

    let crds = match crd_facts(&client).await {
        Ok(facts) => crd_lines(&facts, args.pre),
        Err(e) => vec![Line::fail(
            format!("cannot list CustomResourceDefinitions: {e}"),
            "the caller needs to list customresourcedefinitions.apiextensions.k8s.io",
        )],
    };
    stages.push(Stage {
        name: "Istio CRDs",
        lines: crds,
    });
    if args.pre {
        stages.push(Stage {
            name: "Control plane",
            lines: vec![existing_control_plane(&client, &args.namespace).await],
        });
        return stages;
    }

    let (control_plane, running) = control_plane(&client, &args.namespace).await;
    stages.push(Stage {
        name: "Control plane",
        lines: control_plane,
    });
    stages.push(Stage {
        name: "Sidecar injector",
        lines: injector(&client, &args.namespace).await,
    });
    let roots: Api<ConfigMap> = Api::namespaced(client.clone(), &args.namespace);
    let source = format!("ConfigMap {}/istio-ca-root-cert", args.namespace);
    let root = match roots.get_opt("istio-ca-root-cert").await {
        Ok(cm) => root_cert_line(
            &source,
            cm.as_ref()
                .and_then(|c| c.data.as_ref()?.get("root-cert.pem"))
                .map(String::as_str),
            SystemTime::now(),
        ),
        Err(e) => Line::fail(
            format!("cannot read {source}: {}", api_message(&e)),
            "the caller needs to read ConfigMaps there",
        ),
    };
    stages.push(Stage {
        name: "Certificates",
        lines: vec![root],
    });
    let proxies = if running {
        let source = crate::proxy_status::WeftdSource {
            kube: args.kube.clone(),
            istio_namespace: args.namespace.clone(),
            weftd: None,
        };
        match source.reports().await {
            Ok((replicas, unreachable)) => proxies_line(&replicas, &unreachable),
            Err(e) => vec![Line::fail(
                format!("{e:#}"),
                "weftctl proxy-status says more",
            )],
        }
    } else {
        vec![Line::fail(
            "no weftd is running to ask about proxies",
            "fix the control plane above first",
        )]
    };
    stages.push(Stage {
        name: "Data plane",
        lines: proxies,
    });
    stages
}

/// weftd's Deployments in `namespace` (label `app=weftd`, as the chart sets), or the failure line.
async fn weftd_deployments(client: &Client, namespace: &str) -> Result<Vec<Deployment>, Line> {
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels("app=weftd"))
        .await
        .map(|list| list.items)
        .map_err(|e| {
            Line::fail(
                format!(
                    "cannot list Deployments in {namespace}: {}",
                    api_message(&e)
                ),
                "the caller needs to list deployments there",
            )
        })
}

/// Before an install: a control plane already there is not an error, but install would change it.
async fn existing_control_plane(client: &Client, namespace: &str) -> Line {
    match weftd_deployments(client, namespace).await {
        Ok(list) if list.is_empty() => Line::pass(format!("no control plane in {namespace} yet")),
        Ok(list) => Line::warn(
            format!(
                "a control plane is already installed in {namespace} ({})",
                list.iter()
                    .filter_map(|d| d.metadata.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "install applies over it; use --revision R to install a second one beside it",
        ),
        Err(line) => line,
    }
}

/// Each weftd Deployment available, and whether any weftd pod runs to ask.
async fn control_plane(client: &Client, namespace: &str) -> (Vec<Line>, bool) {
    let list = match weftd_deployments(client, namespace).await {
        Ok(list) => list,
        Err(line) => return (vec![line], false),
    };
    if list.is_empty() {
        return (
            vec![Line::fail(
                format!("no weftd Deployment in {namespace}"),
                "install it: weftctl install (or pass -i with the control plane's namespace)",
            )],
            false,
        );
    }
    let mut lines = Vec::new();
    let mut any_available = false;
    for d in &list {
        let name = d.metadata.name.clone().unwrap_or_default();
        let available = d
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Available" && c.status == "True")
            });
        if available {
            any_available = true;
            lines.push(Line::pass(format!(
                "Deployment {namespace}/{name} is available"
            )));
        } else {
            let why = crate::install::explain(client, namespace, Some(d)).await;
            lines.push(Line::fail(
                format!("Deployment {namespace}/{name} is not available"),
                why.lines().map(str::trim).collect::<Vec<_>>().join("\n"),
            ));
        }
    }
    (lines, any_available)
}

/// Each injector webhook: its caBundle, then a server-side dry run of a pod in a namespace it
/// selects, which makes the API server call the webhook as it would for a real pod.
async fn injector(client: &Client, namespace: &str) -> Vec<Line> {
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let list = match webhooks.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => {
            return vec![Line::fail(
                format!(
                    "cannot list MutatingWebhookConfigurations: {}",
                    api_message(&e)
                ),
                "the caller needs to list them",
            )];
        }
    };
    // The webhooks of this control plane: named as Istio names them, calling a Service in its
    // namespace (another install's are another check's).
    let ours: Vec<_> = list
        .into_iter()
        .filter(|w| {
            w.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("istio-sidecar-injector"))
                && w.webhooks.iter().flatten().any(|h| {
                    h.client_config
                        .service
                        .as_ref()
                        .is_some_and(|s| s.namespace == namespace)
                })
        })
        .collect();
    if ours.is_empty() {
        return vec![Line::fail(
            format!("no istio-sidecar-injector webhook calls a Service in {namespace}"),
            "install it: weftctl install (sidecarInjectorWebhook.enabled=true)",
        )];
    }
    let mut lines = Vec::new();
    let now = SystemTime::now();
    for w in &ours {
        let name = w.metadata.name.clone().unwrap_or_default();
        let bundle = w
            .webhooks
            .iter()
            .flatten()
            .next()
            .and_then(|h| h.client_config.ca_bundle.as_ref())
            .map(|b| b.0.as_slice());
        lines.push(ca_bundle_line(&name, bundle, now));
        let revision = w
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("istio.io/rev"))
            .cloned()
            .unwrap_or_else(|| "default".into());
        lines.push(dry_run_injection(client, &name, &revision).await);
    }
    lines
}

async fn dry_run_injection(client: &Client, webhook: &str, revision: &str) -> Line {
    // Unique per run: the previous run's namespace may still be terminating.
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let namespace = format!("weft-check-{}-{nanos}", std::process::id());
    let label = if revision == "default" {
        json!({"istio-injection": "enabled"})
    } else {
        json!({"istio.io/rev": revision})
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        match serde_json::from_value(json!({"metadata": {"name": namespace, "labels": label}})) {
            Ok(ns) => ns,
            Err(e) => {
                return Line::fail(format!("cannot build a namespace: {e}"), "a bug: report it");
            }
        };
    if let Err(e) = namespaces.create(&PostParams::default(), &ns).await {
        return Line::warn(
            format!(
                "cannot make a namespace to test {webhook} in: {}",
                api_message(&e)
            ),
            "the check needs to create and delete a namespace; run it as a cluster administrator",
        );
    }
    // A new namespace gets its default ServiceAccount a moment later, and admission needs it.
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), &namespace);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while !matches!(accounts.get_opt("default").await, Ok(Some(_)))
        && tokio::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No token mount: the pod is never created, and a token would only wait on the token controller.
    let pod: Pod = match serde_json::from_value(json!({
        "metadata": {"name": "weft-check"},
        "spec": {"automountServiceAccountToken": false, "containers": [{"name": "app", "image": "weft-check"}]}
    })) {
        Ok(p) => p,
        Err(e) => return Line::fail(format!("cannot build a pod: {e}"), "a bug: report it"),
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let result = pods.create(&params, &pod).await;
    let _ = namespaces
        .delete(&namespace, &DeleteParams::background())
        .await;
    match result {
        Ok(pod) => {
            let containers = pod.spec.map(|s| {
                s.containers
                    .into_iter()
                    .chain(s.init_containers.into_iter().flatten())
                    .map(|c| c.name)
                    .collect::<Vec<_>>()
            });
            if containers.is_some_and(|c| c.iter().any(|n| n == "istio-proxy")) {
                Line::pass(format!(
                    "the API server calls {webhook} and it injects a sidecar"
                ))
            } else {
                Line::fail(
                    format!(
                        "{webhook} was not called, or did not inject a sidecar into a pod it selects"
                    ),
                    "kubectl get mutatingwebhookconfiguration -o yaml: check its selectors; the injector's log says what it decided",
                )
            }
        }
        Err(e) => Line::fail(
            format!("the API server cannot call {webhook}: {}", api_message(&e)),
            "the injector runs in weftd's pod behind Service istiod port 443: check the control plane above, and that the API server can reach pods",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses(lines: &[Line]) -> Vec<(Status, &str)> {
        lines.iter().map(|l| (l.status, l.what.as_str())).collect()
    }

    #[test]
    fn versions_from_1_20_are_supported() {
        let v = |minor| KubeVersion { major: 1, minor };
        assert_eq!(version_line(v(20), "v1.20.2").status, Status::Pass);
        assert_eq!(version_line(v(33), "v1.33.1").status, Status::Pass);
        let old = version_line(v(19), "v1.19.9");
        assert_eq!(old.status, Status::Fail);
        assert!(
            old.hint.as_deref().is_some_and(|h| h.contains("1.20")),
            "{old:?}"
        );
    }

    #[test]
    fn missing_rights_are_named() {
        let line = access_line(
            "cluster-wide",
            &[
                (
                    (
                        "create",
                        "apiextensions.k8s.io",
                        "customresourcedefinitions",
                    ),
                    true,
                ),
                (("create", "", "namespaces"), false),
            ],
        );
        assert_eq!(
            (line.status, line.what.as_str()),
            (Status::Fail, "cannot create namespaces (cluster-wide)")
        );
    }

    fn all_crds() -> Vec<CrdFacts> {
        weft_api::kinds::ISTIO_KINDS
            .iter()
            .map(|k| CrdFacts {
                name: format!("{}.{}", k.plural, k.group),
                established: true,
                served: k.versions.iter().map(|v| v.to_string()).collect(),
            })
            .collect()
    }

    #[test]
    fn crds_must_all_be_there_after_an_install_and_fit_before_one() {
        let total = weft_api::kinds::ISTIO_KINDS.len();
        assert_eq!(
            statuses(&crd_lines(&all_crds(), false)),
            [(
                Status::Pass,
                format!(
                    "all {total} Istio CRDs are installed, established, and serve their versions"
                )
                .as_str()
            )]
        );
        assert_eq!(
            crd_lines(&[], true)[0].status,
            Status::Pass,
            "none yet is fine before an install"
        );
        let missing = crd_lines(&all_crds()[1..], false);
        assert_eq!(missing[0].status, Status::Fail);
        assert!(missing[0].what.starts_with("1 of "), "{missing:?}");

        let mut old = all_crds();
        old[0].served.retain(|v| v != "v1");
        let name = old[0].name.clone();
        for pre in [true, false] {
            let lines = crd_lines(&old, pre);
            assert_eq!(
                statuses(&lines),
                [(
                    Status::Fail,
                    format!("CRD {name} does not serve v1").as_str()
                )]
            );
        }
        let mut pending = all_crds();
        pending[0].established = false;
        assert_eq!(crd_lines(&pending, false)[0].status, Status::Fail);
    }

    #[test]
    fn the_root_certificate_warns_a_month_ahead() {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let ca = |ttl| {
            weft_certs::Ca::self_signed("cluster.local", now, ttl)
                .expect("a CA")
                .root_pem()
                .to_string()
        };
        let long = root_cert_line("ConfigMap x", Some(&ca(400 * day)), now);
        assert_eq!(long.status, Status::Pass, "{long:?}");
        let soon = root_cert_line("ConfigMap x", Some(&ca(10 * day)), now);
        assert_eq!(soon.status, Status::Warn, "{soon:?}");
        assert!(
            soon.what.contains("expires in 9 days") || soon.what.contains("expires in 10 days"),
            "{soon:?}"
        );
        let expired = root_cert_line("ConfigMap x", Some(&ca(10 * day)), now + 11 * day);
        assert_eq!(expired.status, Status::Fail);
        assert_eq!(
            root_cert_line("ConfigMap x", None, now).status,
            Status::Fail
        );
        assert_eq!(
            root_cert_line("ConfigMap x", Some("junk"), now).status,
            Status::Fail
        );
        let bundle = ca(400 * day);
        assert_eq!(
            ca_bundle_line("hook", Some(bundle.as_bytes()), now).status,
            Status::Pass
        );
        assert_eq!(ca_bundle_line("hook", None, now).status, Status::Fail);
        assert_eq!(
            ca_bundle_line("hook", Some(b"junk"), now).status,
            Status::Fail
        );
    }

    #[test]
    fn proxies_out_of_sync_fail_and_say_where_to_look() {
        use weft_xds::syncz::{ProxySync, SyncReport, TypeSync};
        let proxy = |pod: &str, acked: &str| ProxySync {
            node: format!("sidecar~10.0.0.1~{pod}.shop~shop.svc.cluster.local"),
            types: [(
                "Cluster".to_string(),
                TypeSync {
                    sent_nonce: "2".into(),
                    acked_nonce: acked.into(),
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        let replicas = |proxies| {
            vec![crate::proxy_status::Replica {
                name: "weftd-0".into(),
                report: SyncReport {
                    control_plane_version: "0.1.0".into(),
                    proxies,
                },
            }]
        };
        assert_eq!(
            statuses(&proxies_line(&replicas(vec![proxy("a", "2")]), &[])),
            [(Status::Pass, "1 proxies connected, all in sync")]
        );
        let lines = proxies_line(
            &replicas(vec![proxy("a", "2"), proxy("b", "1")]),
            &["weftd-1: not running".into()],
        );
        assert_eq!(
            statuses(&lines),
            [
                (Status::Fail, "weftd weftd-1: not running"),
                (Status::Fail, "1 of 2 proxies are not in sync: b.shop")
            ]
        );
    }

    #[test]
    fn the_report_marks_each_line_and_says_whether_all_passed() {
        let stages = [Stage {
            name: "Certificates",
            lines: vec![Line::pass("fine"), Line::warn("soon", "rotate")],
        }];
        let text = render(&stages);
        assert_eq!(
            text,
            "Certificates\n------------\n✓ fine\n‼ soon\n    rotate\n\nStatus check results are ✓\n"
        );
        let failed = [Stage {
            name: "X",
            lines: vec![Line::fail("broken", "fix it")],
        }];
        assert!(!passed(&failed));
        assert!(render(&failed).ends_with("Status check results are ✗\n"));
    }
}
