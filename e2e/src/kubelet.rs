//! The kubelet's part of running a pod, for a harness that stands in for one where no container
//! runtime exists: what each container would run, with which arguments, environment, user and
//! files, worked out from the Pod as the API server holds it. Images are not pulled: each runs the
//! local program its image would (weft-proxy's image runs target/debug/weft-proxy).
//!
//! [`plan`] is pure, so a pod's plan is a table test; starting the processes in the pod's network
//! namespace and writing its files is the harness's.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};

/// What each image runs here, by the image's repository name (`weft/weft-proxy:0.1.0` and
/// `docker.io/weft/weft-proxy` are both `weft-proxy`).
#[derive(Clone, Debug, Default)]
pub struct Images(BTreeMap<String, Image>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Image {
    /// One local program as the image's entrypoint; `cmd` stands in for the image's CMD, the
    /// arguments a container gets when it names neither `command` nor `args`.
    Program { program: PathBuf, cmd: Vec<String> },
    /// An image of ordinary tools (curl's, busybox's): a container's `command` names one of the
    /// host's programs, found on [`HOST_PATH`].
    HostTools,
}

/// Where a [`Image::HostTools`] container's programs are looked for, and every container's `PATH`.
pub const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The host's program named by `command` (a path or a bare name), by its file name on [`HOST_PATH`].
pub fn host_program(command: &str) -> Option<PathBuf> {
    let name = command.rsplit('/').next().filter(|n| !n.is_empty())?;
    HOST_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

fn repository(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last)
}

impl Images {
    pub fn with(self, repository: &str, program: impl Into<PathBuf>) -> Self {
        self.with_cmd(repository, program, &[])
    }

    /// An image whose CMD is `cmd`: Istio's sample images are run without arguments.
    pub fn with_cmd(mut self, repository: &str, program: impl Into<PathBuf>, cmd: &[&str]) -> Self {
        self.0.insert(
            repository.to_string(),
            Image::Program {
                program: program.into(),
                cmd: cmd.iter().map(|a| a.to_string()).collect(),
            },
        );
        self
    }

    pub fn with_host_tools(mut self, repository: &str) -> Self {
        self.0.insert(repository.to_string(), Image::HostTools);
        self
    }

    /// The entrypoint program of an image that has one.
    pub fn program(&self, image: &str) -> Option<&Path> {
        match self.0.get(repository(image))? {
            Image::Program { program, .. } => Some(program),
            Image::HostTools => None,
        }
    }
}

/// What the kubelet knows of a pod beyond its spec once it runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub pod_ip: String,
    pub host_ip: String,
    pub node_name: String,
}

/// A file a volume puts in a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeSource {
    /// A service account token for `audience`, at `path` within the volume.
    Token { path: String, audience: String },
    /// Keys of a ConfigMap (all, or the listed `key -> path`).
    ConfigMap {
        name: String,
        items: Vec<(String, String)>,
    },
    Secret {
        name: String,
        items: Vec<(String, String)>,
    },
    /// An empty directory the pod's containers share.
    EmptyDir,
    /// The service account token, CA and namespace the kubelet mounts at
    /// /var/run/secrets/kubernetes.io/serviceaccount unless the pod opts out.
    ServiceAccount,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub volume: String,
    pub path: String,
    pub read_only: bool,
}

/// One container as a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub container: String,
    /// Init containers run one after the other to completion before the others start.
    pub init: bool,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `runAsUser`/`runAsGroup`, the container's over the pod's.
    pub user: Option<(i64, i64)>,
    pub mounts: Vec<Mount>,
    /// `lifecycle.postStart.exec`, which holds the pod's next containers until it exits.
    pub post_start: Option<Vec<String>>,
    /// How the kubelet would tell the container is ready; `None`: ready once started.
    pub readiness: Option<Readiness>,
}

/// A readiness probe, its port resolved against the container's named ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Http { port: u16, path: String },
    Tcp { port: u16 },
}

fn readiness(c: &Container) -> Option<Readiness> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let probe = c.readiness_probe.as_ref()?;
    let resolve = |port: &IntOrString| match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    };
    if let Some(h) = &probe.http_get {
        return Some(Readiness::Http {
            port: resolve(&h.port)?,
            path: h.path.clone().unwrap_or_else(|| "/".into()),
        });
    }
    probe.tcp_socket.as_ref().and_then(|t| {
        Some(Readiness::Tcp {
            port: resolve(&t.port)?,
        })
    })
}

/// The pod as processes, with the volumes they mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlan {
    pub volumes: BTreeMap<String, VolumeSource>,
    pub processes: Vec<Process>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("container {container}: no local program for image {image}")]
    Image { container: String, image: String },
    #[error("container {container}: command {command:?} is not its image's program")]
    Command {
        container: String,
        command: Vec<String>,
    },
    #[error("container {container}: env {name}: {reason}")]
    Env {
        container: String,
        name: String,
        reason: String,
    },
    #[error("volume {name}: {reason}")]
    Volume { name: String, reason: String },
    #[error("the pod has no spec")]
    NoSpec,
}

const SERVICE_ACCOUNT_VOLUME: &str = "kube-api-access";
const SERVICE_ACCOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `$(NAME)` replaced by the value of an earlier variable, `$$` by `$`, anything else left as it is:
/// the kubelet's expansion of `command`, `args` and `env` values.
pub fn expand(text: &str, vars: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, value)) = vars.iter().rev().find(|(k, _)| *k == inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn field(pod: &Pod, placement: &Placement, path: &str) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let quoted = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|p| p.strip_prefix("['"))
            .and_then(|p| p.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_else(|| "default".into()),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => placement.node_name.clone(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => placement.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => placement.host_ip.clone(),
        _ => {
            if let Some(key) = quoted("metadata.labels") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(&key))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(key) = quoted("metadata.annotations") {
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(&key))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(format!("fieldRef {path} is not one the kubelet serves"));
            }
        }
    })
}

fn env_value(
    pod: &Pod,
    placement: &Placement,
    container: &Container,
    var: &EnvVar,
    earlier: &[(String, String)],
) -> Result<String, String> {
    if let Some(value) = &var.value {
        return Ok(expand(value, earlier));
    }
    let Some(from) = &var.value_from else {
        return Ok(String::new());
    };
    if let Some(f) = &from.field_ref {
        return field(pod, placement, &f.field_path);
    }
    if let Some(r) = &from.resource_field_ref {
        // Without limits the kubelet reports the node's capacity; a harness node has no fixed one,
        // so the request stands in, as for a pod sized exactly.
        let resources = container.resources.as_ref();
        let (kind, which) = r
            .resource
            .split_once('.')
            .unwrap_or(("limits", &r.resource));
        let pick = |m: Option<
            &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >| { m.and_then(|m| m.get(which)).map(|q| q.0.clone()) };
        let quantity = match kind {
            "limits" => pick(resources.and_then(|r| r.limits.as_ref()))
                .or_else(|| pick(resources.and_then(|r| r.requests.as_ref()))),
            _ => pick(resources.and_then(|r| r.requests.as_ref())),
        };
        return Ok(quantity.unwrap_or_else(|| "0".into()));
    }
    Err("configMapKeyRef and secretKeyRef need the API server; the harness reads them".into())
}

fn volume_source(v: &k8s_openapi::api::core::v1::Volume) -> Result<VolumeSource, String> {
    let items = |items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>| {
        items
            .iter()
            .flatten()
            .map(|i| (i.key.clone(), i.path.clone()))
            .collect()
    };
    if v.empty_dir.is_some() {
        return Ok(VolumeSource::EmptyDir);
    }
    if let Some(cm) = &v.config_map {
        return Ok(VolumeSource::ConfigMap {
            name: cm.name.clone(),
            items: items(&cm.items),
        });
    }
    if let Some(s) = &v.secret {
        return Ok(VolumeSource::Secret {
            name: s.secret_name.clone().unwrap_or_default(),
            items: items(&s.items),
        });
    }
    if let Some(p) = &v.projected {
        let sources = p.sources.as_deref().unwrap_or_default();
        if let [only] = sources
            && let Some(t) = &only.service_account_token
        {
            return Ok(VolumeSource::Token {
                path: t.path.clone(),
                audience: t.audience.clone().unwrap_or_default(),
            });
        }
        return Err("only a projected serviceAccountToken is supported".into());
    }
    Err("only emptyDir, configMap, secret and projected token volumes are supported".into())
}

/// What the kubelet would run for `pod` placed as `placement`.
pub fn plan(pod: &Pod, images: &Images, placement: &Placement) -> Result<PodPlan, PlanError> {
    let spec = pod.spec.as_ref().ok_or(PlanError::NoSpec)?;
    let mut volumes = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        let source = volume_source(v).map_err(|reason| PlanError::Volume {
            name: v.name.clone(),
            reason,
        })?;
        volumes.insert(v.name.clone(), source);
    }
    let automount = spec.automount_service_account_token != Some(false);
    if automount {
        volumes.insert(SERVICE_ACCOUNT_VOLUME.into(), VolumeSource::ServiceAccount);
    }
    let pod_user = spec
        .security_context
        .as_ref()
        .map(|s| (s.run_as_user, s.run_as_group));
    let init = spec.init_containers.iter().flatten().map(|c| (c, true));
    let main = spec.containers.iter().map(|c| (c, false));
    let mut processes = Vec::new();
    for (c, is_init) in init.chain(main) {
        let image = c.image.clone().unwrap_or_default();
        let no_program = || PlanError::Image {
            container: c.name.clone(),
            image: image.clone(),
        };
        let entry = images.0.get(repository(&image)).ok_or_else(no_program)?;
        let mut env: Vec<(String, String)> = Vec::new();
        for var in c.env.iter().flatten() {
            let value =
                env_value(pod, placement, c, var, &env).map_err(|reason| PlanError::Env {
                    container: c.name.clone(),
                    name: var.name.clone(),
                    reason,
                })?;
            env.push((var.name.clone(), value));
        }
        let expand_all =
            |args: &[String]| -> Vec<String> { args.iter().map(|a| expand(a, &env)).collect() };
        let command = c.command.as_ref().filter(|c| !c.is_empty());
        let container_args = c.args.as_ref().filter(|a| !a.is_empty());
        let wrong_command = |command: &[String]| PlanError::Command {
            container: c.name.clone(),
            command: command.to_vec(),
        };
        let (program, mut args) = match (entry, command) {
            (Image::Program { program, .. }, Some(command)) => {
                let own = program
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                if command[0].rsplit('/').next().unwrap_or_default() != own {
                    return Err(wrong_command(command));
                }
                (program.clone(), expand_all(&command[1..]))
            }
            (Image::Program { program, cmd }, None) => {
                // The image's CMD applies only where the container gives no args of its own.
                let cmd = if container_args.is_some() {
                    vec![]
                } else {
                    cmd.clone()
                };
                (program.clone(), cmd)
            }
            (Image::HostTools, Some(command)) => (
                host_program(&command[0]).ok_or_else(|| wrong_command(command))?,
                expand_all(&command[1..]),
            ),
            (Image::HostTools, None) => return Err(no_program()),
        };
        args.extend(expand_all(container_args.map_or(&[][..], Vec::as_slice)));
        let own = c.security_context.as_ref();
        let uid = own
            .and_then(|s| s.run_as_user)
            .or(pod_user.and_then(|p| p.0));
        let gid = own
            .and_then(|s| s.run_as_group)
            .or(pod_user.and_then(|p| p.1))
            .or(uid);
        let mut mounts: Vec<Mount> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| Mount {
                volume: m.name.clone(),
                path: m.mount_path.clone(),
                read_only: m.read_only.unwrap_or(false),
            })
            .collect();
        if automount && !mounts.iter().any(|m| m.path == SERVICE_ACCOUNT_PATH) {
            mounts.push(Mount {
                volume: SERVICE_ACCOUNT_VOLUME.into(),
                path: SERVICE_ACCOUNT_PATH.into(),
                read_only: true,
            });
        }
        for m in &mounts {
            if !volumes.contains_key(&m.volume) {
                return Err(PlanError::Volume {
                    name: m.volume.clone(),
                    reason: format!("mounted by {} but not in the pod", c.name),
                });
            }
        }
        // A native sidecar (an init container with restartPolicy Always) starts in order but is not
        // waited for: it runs beside the app.
        let native_sidecar = c.restart_policy.as_deref() == Some("Always");
        processes.push(Process {
            container: c.name.clone(),
            init: is_init && !native_sidecar,
            program,
            args,
            env,
            user: uid.map(|u| (u, gid.unwrap_or(u))),
            mounts,
            post_start: c
                .lifecycle
                .as_ref()
                .and_then(|l| l.post_start.as_ref())
                .and_then(|h| h.exec.as_ref())
                .and_then(|e| e.command.clone()),
            readiness: readiness(c),
        });
    }
    Ok(PodPlan { volumes, processes })
}

pub mod harness;
pub mod network;
pub mod node;
pub mod run;
pub mod volumes;

#[cfg(test)]
mod tests;
