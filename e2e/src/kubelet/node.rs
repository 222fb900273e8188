//! The harness's node, as a kubelet and the scheduler would keep it: a Ready Node object, pods bound
//! to it, and each pod's status reported, so the real controllers (ReplicaSets, EndpointSlices) act on
//! the pods as on any cluster's.

use k8s_openapi::{
    api::core::v1::{Node as NodeObject, Pod},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

const MANAGER: &str = "weft-e2e-kubelet";

pub struct Node {
    client: Client,
    pub name: String,
    /// The node's address: the host's end of the pod bridge.
    pub ip: String,
}

/// A pod's state as the harness reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// Its containers are starting (init steps running).
    Pending,
    /// Running, ready or not yet.
    Running { ready: bool },
    /// A container could not start, with why.
    Failed { reason: String, message: String },
}

impl Node {
    /// Creates (or takes over) the Node object and marks it Ready.
    pub async fn register(client: Client, name: &str, ip: &str) -> anyhow::Result<Self> {
        let nodes: Api<NodeObject> = Api::all(client.clone());
        let params = PatchParams::apply(MANAGER).force();
        nodes
            .patch(
                name,
                &params,
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                })),
            )
            .await?;
        let node = Self {
            client,
            name: name.to_string(),
            ip: ip.to_string(),
        };
        node.heartbeat().await?;
        Ok(node)
    }

    /// The Ready condition and addresses, as a kubelet posts them.
    pub async fn heartbeat(&self) -> anyhow::Result<()> {
        let nodes: Api<NodeObject> = Api::all(self.client.clone());
        let now = Time(Timestamp::now());
        nodes
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "the weft e2e harness runs this node's pods",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
                    "addresses": [{"type": "InternalIP", "address": self.ip}, {"type": "Hostname", "address": self.name}],
                    "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
                    "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
                }})),
            )
            .await?;
        Ok(())
    }

    /// Pods no scheduler has placed, in every namespace: with no scheduler here, they are this
    /// node's to bind.
    pub async fn unscheduled(&self) -> anyhow::Result<Vec<Pod>> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let list = pods
            .list(&ListParams::default().fields("spec.nodeName="))
            .await?;
        Ok(list.items)
    }

    /// Binds a pod to this node, as the scheduler does.
    pub async fn bind(&self, pod: &Pod) -> anyhow::Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.name},
        });
        let _: serde_json::Value = pods
            .create_subresource("binding", &name, &PostParams::default(), &binding)
            .await?;
        Ok(())
    }

    /// Writes a pod's status: phase, IPs and conditions, and each container's state.
    pub async fn report(
        &self,
        pod: &Pod,
        pod_ip: &str,
        containers: &[String],
        report: &Report,
    ) -> anyhow::Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let now = Time(Timestamp::now());
        let started = !matches!(report, Report::Pending);
        let ready = matches!(report, Report::Running { ready: true });
        let (phase, state) = match report {
            Report::Pending => ("Pending", json!({"waiting": {"reason": "PodInitializing"}})),
            Report::Running { .. } => ("Running", json!({"running": {"startedAt": now}})),
            Report::Failed { reason, message } => (
                "Pending",
                json!({"waiting": {"reason": reason, "message": message}}),
            ),
        };
        let condition = |kind: &str, ok: bool| json!({"type": kind, "status": if ok { "True" } else { "False" }, "lastTransitionTime": now});
        let statuses: Vec<_> = containers
            .iter()
            .map(|c| {
                let image = pod
                    .spec
                    .iter()
                    .flat_map(|s| &s.containers)
                    .find(|x| &x.name == c)
                    .and_then(|x| x.image.clone())
                    .unwrap_or_default();
                json!({"name": c, "image": image, "imageID": "", "ready": ready, "restartCount": 0,
                       "started": started, "state": state})
            })
            .collect();
        pods.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": phase,
                "hostIP": self.ip,
                "podIP": pod_ip,
                "podIPs": [{"ip": pod_ip}],
                "startTime": now,
                "conditions": [
                    condition("PodScheduled", true),
                    condition("Initialized", started),
                    condition("ContainersReady", ready),
                    condition("Ready", ready),
                ],
                "containerStatuses": statuses,
            }})),
        )
        .await?;
        Ok(())
    }
}
