//! `weftctl install` and `uninstall`: the manifests of [`crate::manifest::generate`] applied to a
//! cluster with server-side apply (field manager `weftctl`), CRDs first and established before the
//! rest, then a wait for every Deployment that says, when it gives up, which pod is stuck and why.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::Context;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Event, Pod},
};
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
    discovery::{ApiCapabilities, ApiResource, Discovery, Scope},
};
use serde_json::{Value, json};
use weft_charts::{KubeVersion, Manifest};

use crate::manifest::{ValuesArgs, parse_kube_version};

pub const FIELD_MANAGER: &str = "weftctl";

/// How weftctl reaches the cluster, as kubectl: `--kubeconfig`, else `$KUBECONFIG`, else
/// `~/.kube/config`, else the pod's service account; `--context` picks a context.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KubeArgs {
    /// The kubeconfig file (default: `$KUBECONFIG`, then `~/.kube/config`).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long)]
    pub context: Option<String>,
}

impl KubeArgs {
    pub async fn client(&self) -> anyhow::Result<Client> {
        let options = kube::config::KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .with_context(|| format!("the kubeconfig {}", path.display()))?
            }
            None if self.context.is_some() => kube::Config::from_kubeconfig(&options)
                .await
                .context("cannot load the kubeconfig for that context")?,
            None => kube::Config::infer()
                .await
                .context("no kubeconfig found (--kubeconfig, $KUBECONFIG or ~/.kube/config)")?,
        };
        Client::try_from(config).context("cannot make a Kubernetes client")
    }
}

/// Which install a command is about: its values, its cluster and its namespace.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    #[command(flatten)]
    pub values: ValuesArgs,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// The control plane's namespace (`install` creates it if missing).
    #[arg(short = 'n', long, default_value = "istio-system")]
    pub namespace: String,
}

#[derive(Clone, Debug, clap::Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub target: Target,
    /// Send everything with the API server's dry run: it validates and admits, and nothing is kept.
    #[arg(long)]
    pub dry_run: bool,
    /// How long to wait for the control plane to be available.
    #[arg(long, default_value = "5m", value_parser = weft_api::parse_duration)]
    pub wait_timeout: Duration,
}

#[derive(Clone, Debug, clap::Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub target: Target,
    /// Delete the CRDs too, and with them every Istio object in the cluster.
    #[arg(long)]
    pub purge: bool,
}

/// What a manifest is, for progress lines: `Deployment istio-system/weftd`.
fn describe(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("?");
    let name = object["metadata"]["name"].as_str().unwrap_or("?");
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

struct Cluster {
    client: Client,
    discovery: Discovery,
}

impl Cluster {
    async fn connect(kube: &KubeArgs) -> anyhow::Result<(Self, KubeVersion, String)> {
        let client = kube.client().await?;
        let info = client
            .apiserver_version()
            .await
            .context("cannot reach the API server")?;
        let version = parse_kube_version(&format!("{}.{}", info.major, info.minor))
            .map_err(anyhow::Error::msg)?;
        let discovery = discover(&client).await?;
        Ok((Self { client, discovery }, version, info.git_version))
    }

    async fn rediscover(&mut self) -> anyhow::Result<()> {
        self.discovery = discover(&self.client).await?;
        Ok(())
    }

    fn api(&self, object: &Value) -> anyhow::Result<(Api<DynamicObject>, String)> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
        let (resource, caps): (ApiResource, ApiCapabilities) =
            self.discovery.resolve_gvk(&gvk).with_context(|| {
                format!("the API server does not serve {api_version} {kind}; is the Kubernetes version supported?")
            })?;
        let name = object["metadata"]["name"]
            .as_str()
            .context("a manifest without a name")?
            .to_string();
        let api = match (caps.scope, object["metadata"]["namespace"].as_str()) {
            (Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(self.client.clone(), ns, &resource)
            }
            (Scope::Namespaced, None) => {
                Api::default_namespaced_with(self.client.clone(), &resource)
            }
            (Scope::Cluster, _) => Api::all_with(self.client.clone(), &resource),
        };
        Ok((api, name))
    }

    async fn apply(&self, object: &Value, dry_run: bool) -> anyhow::Result<()> {
        let (api, name) = self.api(object)?;
        let mut params = PatchParams::apply(FIELD_MANAGER).force();
        params.dry_run = dry_run;
        api.patch(&name, &params, &Patch::Apply(object))
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot apply {}: {}", describe(object), api_message(&e))
            })?;
        Ok(())
    }

    async fn namespace_exists(&self, name: &str) -> anyhow::Result<bool> {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        Ok(api
            .get_opt(name)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read Namespace {name}: {}", api_message(&e)))?
            .is_some())
    }
}

/// What the API server serves. Right after CRDs come or go, a group it lists can answer 404 for a
/// moment while it is (un)registered; that is retried for a few seconds before it is an error.
async fn discover(client: &Client) -> anyhow::Result<Discovery> {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Discovery::new(client.clone()).run().await {
            Ok(d) => return Ok(d),
            Err(e) if tokio::time::Instant::now() >= give_up => {
                return Err(e).context("cannot list the API server's resources");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// The API server's own words for a refusal, without the client's wrapping.
pub(crate) fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.reason),
        other => other.to_string(),
    }
}

/// Waits until every CRD in `crds` is Established, as the API server must before their kinds exist.
async fn wait_established(
    cluster: &Cluster,
    crds: &[&Manifest],
    deadline: Duration,
) -> anyhow::Result<()> {
    let api: Api<DynamicObject> = Api::all_with(
        cluster.client.clone(),
        &ApiResource::erase::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(&()),
    );
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        let mut waiting = Vec::new();
        for crd in crds {
            let name = crd.object["metadata"]["name"].as_str().unwrap_or_default();
            let established = api
                .get_opt(name)
                .await
                .with_context(|| format!("cannot read CRD {name}"))?
                .and_then(|o| o.data["status"]["conditions"].as_array().cloned())
                .is_some_and(|conditions| {
                    conditions
                        .iter()
                        .any(|c| c["type"] == "Established" && c["status"] == "True")
                });
            if !established {
                waiting.push(name.to_string());
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= give_up {
            anyhow::bail!(
                "CRDs not established after {deadline:?}: {}",
                waiting.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn install(args: &InstallArgs) -> anyhow::Result<()> {
    let target = &args.target;
    let values = target.values.values()?;
    let (mut cluster, version, git_version) = Cluster::connect(&target.kube).await?;
    let manifests = crate::manifest::generate(&values, &target.namespace, version)?;
    let profile = values["profile"].as_str().unwrap_or("default");
    println!(
        "weftctl install: profile {profile}, namespace {}, Kubernetes {git_version}{}",
        target.namespace,
        if args.dry_run { " (dry run)" } else { "" }
    );
    let namespace =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": target.namespace}});
    cluster.apply(&namespace, args.dry_run).await?;
    println!("✓ Namespace {}", target.namespace);

    let (crds, rest): (Vec<&Manifest>, Vec<&Manifest>) = manifests
        .iter()
        .partition(|m| m.object["kind"] == "CustomResourceDefinition");
    for crd in &crds {
        cluster.apply(&crd.object, args.dry_run).await?;
    }
    if !crds.is_empty() {
        if !args.dry_run {
            wait_established(&cluster, &crds, Duration::from_secs(60)).await?;
            cluster.rediscover().await?;
        }
        println!(
            "✓ {} CustomResourceDefinitions applied and established",
            crds.len()
        );
    }
    // A dry run keeps nothing, not even the namespace, so what would go into a new namespace can
    // only be checked once it exists.
    let unchecked = args.dry_run && !cluster.namespace_exists(&target.namespace).await?;
    let mut by_chart: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &rest {
        if unchecked && m.object["metadata"]["namespace"].is_string() {
            continue;
        }
        cluster.apply(&m.object, args.dry_run).await?;
        *by_chart
            .entry(m.template.split('/').next().unwrap_or_default())
            .or_default() += 1;
    }
    for (chart, count) in &by_chart {
        let verb = if args.dry_run { "accepted" } else { "applied" };
        println!(
            "✓ {chart}: {count} object{} {verb}",
            if *count == 1 { "" } else { "s" }
        );
    }
    if args.dry_run {
        if unchecked {
            println!(
                "… Namespace {} does not exist yet, so the objects in it were not sent",
                target.namespace
            );
        }
        println!("✓ dry run: the API server accepted what was sent; nothing was kept");
        return Ok(());
    }
    let deployments: Vec<&Manifest> = rest
        .iter()
        .copied()
        .filter(|m| m.object["kind"] == "Deployment")
        .collect();
    for d in deployments {
        let name = d.object["metadata"]["name"].as_str().unwrap_or_default();
        let ns = d.object["metadata"]["namespace"]
            .as_str()
            .unwrap_or(&target.namespace);
        println!(
            "… waiting for Deployment {ns}/{name} to be available (up to {:?})",
            args.wait_timeout
        );
        wait_available(&cluster.client, ns, name, args.wait_timeout).await?;
        println!("✓ Deployment {ns}/{name} available");
    }
    println!("✓ installed");
    Ok(())
}

async fn wait_available(
    client: &Client,
    ns: &str,
    name: &str,
    deadline: Duration,
) -> anyhow::Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        let deployment = api
            .get_opt(name)
            .await
            .with_context(|| format!("cannot read Deployment {ns}/{name}"))?;
        let available = deployment
            .as_ref()
            .and_then(|d| d.status.as_ref()?.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Available" && c.status == "True")
            });
        if available {
            return Ok(());
        }
        if tokio::time::Instant::now() >= give_up {
            let why = explain(client, ns, deployment.as_ref()).await;
            anyhow::bail!("Deployment {ns}/{name} is not available after {deadline:?}:\n{why}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Why a Deployment is not available, from its pods' status and the events about them.
pub(crate) async fn explain(client: &Client, ns: &str, deployment: Option<&Deployment>) -> String {
    let Some(d) = deployment else {
        return "  it does not exist".into();
    };
    let status = d.status.clone().unwrap_or_default();
    let mut lines = vec![format!(
        "  {} of {} replicas available",
        status.available_replicas.unwrap_or(0),
        d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
    )];
    let selector = d
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let listed = match pods.list(&ListParams::default().labels(&selector)).await {
        Ok(l) => l.items,
        Err(e) => return format!("{}\n  cannot list its pods: {e}", lines.join("\n")),
    };
    if listed.is_empty() {
        lines.push("  no pods: see the ReplicaSet's events (kubectl describe replicaset)".into());
    }
    for pod in listed {
        let name = pod.metadata.name.clone().unwrap_or_default();
        lines.push(format!("  pod {name}: {}", pod_reason(&pod)));
        let field = format!("involvedObject.name={name}");
        if let Ok(evs) = events.list(&ListParams::default().fields(&field)).await {
            for e in evs.items.iter().rev().take(3) {
                lines.push(format!(
                    "    event {}: {}",
                    e.reason.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default()
                ));
            }
        }
    }
    lines.join("\n")
}

/// A pod's state in a phrase: why it is not running or not ready.
pub fn pod_reason(pod: &Pod) -> String {
    let Some(status) = &pod.status else {
        return "no status yet".into();
    };
    let phase = status.phase.clone().unwrap_or_else(|| "Unknown".into());
    let conditions = status.conditions.clone().unwrap_or_default();
    let condition = |t: &str| conditions.iter().find(|c| c.type_ == t);
    match condition("PodScheduled") {
        None => {
            return format!(
                "{phase}, not scheduled: no scheduler has looked at it (is one running?)"
            );
        }
        Some(c) if c.status != "True" => {
            return format!(
                "{phase}, not scheduled: {}",
                c.message
                    .clone()
                    .unwrap_or_else(|| c.reason.clone().unwrap_or_default())
            );
        }
        Some(_) => {}
    }
    for c in status.container_statuses.iter().flatten() {
        if let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            return format!(
                "{phase}, container {} waiting: {} {}",
                c.name,
                waiting.reason.clone().unwrap_or_default(),
                waiting.message.clone().unwrap_or_default()
            )
            .trim_end()
            .to_string();
        }
        if !c.ready {
            return format!(
                "{phase}, container {} not ready (its readiness probe fails)",
                c.name
            );
        }
    }
    phase
}

pub async fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    let target = &args.target;
    let values = target.values.values()?;
    let (cluster, version, _) = Cluster::connect(&target.kube).await?;
    let manifests = crate::manifest::generate(&values, &target.namespace, version)?;
    let mut removed = 0;
    let mut crds = Vec::new();
    // Webhook first and CRDs last: the reverse of the install order.
    for m in manifests.iter().rev() {
        let crd = m.object["kind"] == "CustomResourceDefinition";
        if crd && !args.purge {
            continue;
        }
        let (api, name) = cluster.api(&m.object)?;
        match api.delete(&name, &DeleteParams::foreground()).await {
            Ok(_) => {
                removed += 1;
                println!("✓ deleted {}", describe(&m.object));
                if crd {
                    crds.push((api, name));
                }
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot delete {}", describe(&m.object)));
            }
        }
    }
    if !crds.is_empty() {
        // A CRD goes only once the API server has deleted its objects; until then the kinds are
        // still served, and an install right after would find them terminating.
        println!(
            "… waiting for {} CRDs and their objects to be gone",
            crds.len()
        );
        let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let mut left = Vec::new();
            for (api, name) in &crds {
                if api.get_opt(name).await.map_or(true, |o| o.is_some()) {
                    left.push(name.clone());
                }
            }
            if left.is_empty() {
                println!("✓ the CRDs are gone");
                break;
            }
            if tokio::time::Instant::now() >= give_up {
                anyhow::bail!(
                    "CRDs still terminating after 2m: {} (kubectl get crd NAME -o yaml shows what holds each: its status.conditions and finalizers)",
                    left.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!(
        "✓ uninstalled: {removed} objects deleted{}",
        if args.purge {
            ""
        } else {
            "; the CRDs stay (--purge deletes them and every Istio object)"
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "weftd-1"}, "status": status}))
            .expect("pod")
    }

    #[test]
    fn a_stuck_pod_says_why() {
        assert!(pod_reason(&pod(json!({"phase": "Pending"}))).contains("is one running?"));
        let unschedulable = pod(json!({"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available: insufficient cpu"}]}));
        assert!(pod_reason(&unschedulable).contains("insufficient cpu"));
        let pulling = pod(
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "discovery", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "weft/weftd:0.1.0 not found"}}}]}),
        );
        assert_eq!(
            pod_reason(&pulling),
            "Pending, container discovery waiting: ImagePullBackOff weft/weftd:0.1.0 not found"
        );
    }
}
