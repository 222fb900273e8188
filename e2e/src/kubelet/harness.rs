//! The stand-in for a cluster's nodes where no container runtime exists: one node that binds every
//! unscheduled pod, runs it as processes in a network namespace on a pod bridge, and reports it as a
//! kubelet would; the API server behind the `kubernetes` Service's ClusterIP; every Service's
//! ClusterIP forwarded to its ready endpoints; names in each pod's `/etc/hosts`. The real API server
//! and controller-manager do the rest (ReplicaSets, EndpointSlices, admission, the webhook's calls).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams},
    discovery::ApiResource,
};
use tokio::{sync::watch, task::JoinSet, time::Instant};
use weft_netns::{HostLink, Netns, Network};

use super::{
    Images, Placement, Process, Readiness,
    network::{Forwarder, HostAddress, ServiceName, hosts_file},
    node::{Node, Report},
    plan, run, volumes,
};

/// The `kubernetes` Service's ClusterIP (the first of kube-up's service range), which the API
/// server's certificate names.
const API_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// How long an init step or a postStart hook may take.
const STEP_DEADLINE: Duration = Duration::from_secs(120);
/// How long a pod that could not start waits before the next try.
const RETRY: Duration = Duration::from_secs(2);

pub struct Config {
    pub node_name: String,
    pub images: Images,
    /// Where pods' volumes, hosts files and logs go, as /var/lib/kubelet for a kubelet: outside any
    /// path a pod mounts over (Bookinfo's pods mount an emptyDir at /tmp), and the programs too.
    pub dir: PathBuf,
    /// The pod network's first three octets; the host is `.1`, pods from `.10`.
    pub subnet: [u8; 3],
    /// Where the API server listens on this machine.
    pub api_server: SocketAddr,
}

/// Running until dropped; dropping stops every pod (their processes, namespaces) and the forwarders.
pub struct Harness {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    _api: (HostAddress, Forwarder, watch::Sender<Vec<SocketAddr>>),
    _host: HostLink,
    _network: Arc<Network>,
}

struct Shared {
    client: Client,
    node: Node,
    network: Arc<Network>,
    images: Images,
    dir: PathBuf,
    subnet: [u8; 3],
    next_ip: AtomicU8,
    services: Mutex<Vec<ServiceName>>,
    /// The pods running now, by namespace and name, for `exec` and for their hosts files.
    running: Mutex<BTreeMap<(String, String), RunningPod>>,
}

/// What it takes to run another process in a running pod's container, as `kubectl exec` does.
struct RunningPod {
    uid: String,
    ip: Ipv4Addr,
    netns: String,
    processes: Vec<Process>,
    volumes: volumes::Written,
    hosts: PathBuf,
}

/// A running pod's entry in [`Shared::running`], removed with the pod's other guards.
struct Registration {
    shared: Arc<Shared>,
    key: (String, String),
    uid: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut running) = self.shared.running.lock()
            && running.get(&self.key).is_some_and(|p| p.uid == self.uid)
        {
            running.remove(&self.key);
        }
    }
}

/// How long an `exec` may run.
const EXEC_DEADLINE: Duration = Duration::from_secs(30);

impl Harness {
    pub async fn start(client: Client, config: Config) -> anyhow::Result<Self> {
        let [a, b, c] = config.subnet;
        let host_ip = Ipv4Addr::new(a, b, c, 1);
        let network = Arc::new(Network::new()?);
        let host = network.attach_host(host_ip)?;
        let api_address = HostAddress::add(API_CLUSTER_IP)?;
        let (api_target, api_rx) = watch::channel(vec![config.api_server]);
        let api = Forwarder::start(SocketAddr::new(API_CLUSTER_IP.into(), 443), api_rx).await?;
        let node = Node::register(client.clone(), &config.node_name, &host_ip.to_string()).await?;
        let shared = Arc::new(Shared {
            client,
            node,
            network: network.clone(),
            images: config.images,
            dir: config.dir,
            subnet: config.subnet,
            next_ip: AtomicU8::new(10),
            services: Mutex::new(Vec::new()),
            running: Mutex::new(BTreeMap::new()),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(services_loop(shared.clone()));
        tasks.spawn(pods_loop(shared.clone()));
        Ok(Self {
            shared,
            tasks,
            _api: (api_address, api, api_target),
            _host: host,
            _network: network,
        })
    }
}

impl Harness {
    /// Runs `argv` in a running pod's container, as `kubectl exec POD -c CONTAINER -- ARGV`: in the
    /// pod's network namespace, with the container's volumes, env and user. `argv[0]` is the
    /// container's own program or one of the host's.
    pub async fn exec(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        argv: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        let (command, first) = {
            let running = self
                .shared
                .running
                .lock()
                .map_err(|_| anyhow::anyhow!("the harness's pod table is poisoned"))?;
            let target = running
                .get(&(namespace.to_string(), pod.to_string()))
                .with_context(|| format!("pod {namespace}/{pod} is not running on this node"))?;
            let process = target
                .processes
                .iter()
                .find(|p| p.container == container && !p.init)
                .with_context(|| format!("pod {namespace}/{pod} has no container {container}"))?;
            let first = argv.first().context("exec needs a command")?;
            let own = process.program.file_name().and_then(|n| n.to_str());
            let program = if first.rsplit('/').next() == own {
                process.program.clone()
            } else {
                super::host_program(first).with_context(|| {
                    format!("{first} is not a program of {container} or the host")
                })?
            };
            let exec = Process {
                program,
                args: argv[1..].iter().map(|a| a.to_string()).collect(),
                ..process.clone()
            };
            let command = run::command(&target.netns, &exec, &target.volumes, Some(&target.hosts))?;
            (command, first.to_string())
        };
        let mut command = tokio::process::Command::from(command);
        command
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        tokio::time::timeout(EXEC_DEADLINE, command.output())
            .await
            .with_context(|| format!("{first} in {namespace}/{pod} ran over {EXEC_DEADLINE:?}"))?
            .with_context(|| format!("cannot run {first} in {namespace}/{pod}"))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

fn slices_api(client: &Client) -> Api<DynamicObject> {
    // Kubernetes 1.20 serves EndpointSlices as v1beta1 only; the fields read here are the same.
    Api::all_with(
        client.clone(),
        &ApiResource {
            group: "discovery.k8s.io".into(),
            version: "v1beta1".into(),
            api_version: "discovery.k8s.io/v1beta1".into(),
            kind: "EndpointSlice".into(),
            plural: "endpointslices".into(),
        },
    )
}

/// One ClusterIP port: its forwarder, and where to tell it of endpoint changes.
type ServicePort = (watch::Sender<Vec<SocketAddr>>, Forwarder);

/// Every Service's ClusterIP ports, each a forwarder to its ready endpoints, kept current.
async fn services_loop(shared: Arc<Shared>) {
    let mut addresses: BTreeMap<Ipv4Addr, HostAddress> = BTreeMap::new();
    let mut forwarders: BTreeMap<(Ipv4Addr, u16), ServicePort> = BTreeMap::new();
    loop {
        if let (Ok(services), Ok(slices)) = (
            Api::<Service>::all(shared.client.clone())
                .list(&ListParams::default())
                .await,
            slices_api(&shared.client)
                .list(&ListParams::default())
                .await,
        ) {
            let mut names = Vec::new();
            let mut wanted = BTreeSet::new();
            for s in &services.items {
                let ns = s.metadata.namespace.clone().unwrap_or_default();
                let name = s.metadata.name.clone().unwrap_or_default();
                let Some(ip) = s
                    .spec
                    .as_ref()
                    .and_then(|sp| sp.cluster_ip.as_deref())
                    .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                else {
                    continue;
                };
                names.push(ServiceName {
                    name: name.clone(),
                    namespace: ns.clone(),
                    cluster_ip: ip,
                });
                if ip == API_CLUSTER_IP {
                    continue;
                }
                for port in s.spec.iter().flat_map(|sp| sp.ports.iter().flatten()) {
                    let Ok(number) = u16::try_from(port.port) else {
                        continue;
                    };
                    let targets = endpoints(&slices.items, &ns, &name, port.name.as_deref());
                    wanted.insert((ip, number));
                    if let std::collections::btree_map::Entry::Vacant(slot) = addresses.entry(ip) {
                        match HostAddress::add(ip) {
                            Ok(a) => {
                                slot.insert(a);
                            }
                            Err(_) => continue,
                        }
                    }
                    match forwarders.get(&(ip, number)) {
                        Some((tx, _)) => {
                            tx.send_if_modified(|t| {
                                let changed = *t != targets;
                                *t = targets.clone();
                                changed
                            });
                        }
                        None => {
                            let (tx, rx) = watch::channel(targets);
                            if let Ok(f) =
                                Forwarder::start(SocketAddr::new(ip.into(), number), rx).await
                            {
                                forwarders.insert((ip, number), (tx, f));
                            }
                        }
                    }
                }
            }
            forwarders.retain(|key, _| wanted.contains(key));
            addresses.retain(|ip, _| wanted.iter().any(|(i, _)| i == ip));
            let changed = shared
                .services
                .lock()
                .map(|mut s| {
                    let changed = *s != names;
                    *s = names.clone();
                    changed
                })
                .unwrap_or(false);
            // Cluster DNS answers for a Service from the moment it exists; the pods' hosts files,
            // bound over /etc/hosts, are rewritten in place to keep up.
            if changed && let Ok(running) = shared.running.lock() {
                for ((ns, name), pod) in running.iter() {
                    let _ = std::fs::write(
                        &pod.hosts,
                        hosts_file(&names, ns, name, &pod.ip.to_string()),
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The ready endpoints of a Service's port, from its EndpointSlices.
fn endpoints(
    slices: &[DynamicObject],
    ns: &str,
    service: &str,
    port_name: Option<&str>,
) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for slice in slices {
        let labels = slice.metadata.labels.clone().unwrap_or_default();
        if slice.metadata.namespace.as_deref() != Some(ns)
            || labels.get("kubernetes.io/service-name").map(String::as_str) != Some(service)
        {
            continue;
        }
        let port = slice.data["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str().filter(|n| !n.is_empty()) == port_name)
            .and_then(|p| p["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else { continue };
        for e in slice.data["endpoints"].as_array().into_iter().flatten() {
            if e["conditions"]["ready"] == false {
                continue;
            }
            for a in e["addresses"].as_array().into_iter().flatten() {
                if let Some(ip) = a.as_str().and_then(|a| a.parse::<Ipv4Addr>().ok()) {
                    out.push(SocketAddr::new(ip.into(), port));
                }
            }
        }
    }
    out.sort();
    out
}

/// Binds unscheduled pods, runs this node's new pods, and stops those deleted.
async fn pods_loop(shared: Arc<Shared>) {
    let mut running: BTreeMap<String, tokio::task::AbortHandle> = BTreeMap::new();
    let mut pods_tasks = JoinSet::new();
    loop {
        while pods_tasks.try_join_next().is_some() {}
        // A pod whose start failed ended its task; the next pass starts it again.
        running.retain(|_, task| !task.is_finished());
        if let Ok(unscheduled) = shared.node.unscheduled().await {
            for pod in unscheduled {
                let _ = shared.node.bind(&pod).await;
            }
        }
        let api: Api<Pod> = Api::all(shared.client.clone());
        let field = format!("spec.nodeName={}", shared.node.name);
        if let Ok(list) = api.list(&ListParams::default().fields(&field)).await {
            let mut present = BTreeSet::new();
            for pod in list.items {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                let deleting = pod.metadata.deletion_timestamp.is_some();
                if deleting {
                    if let Some(task) = running.remove(&uid) {
                        task.abort();
                    }
                    // The kubelet confirms a graceful deletion once the pod's processes are gone.
                    let ns = pod.metadata.namespace.clone().unwrap_or_default();
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    let _ = Api::<Pod>::namespaced(shared.client.clone(), &ns)
                        .delete(&name, &DeleteParams::default().grace_period(0))
                        .await;
                    continue;
                }
                present.insert(uid.clone());
                if let std::collections::btree_map::Entry::Vacant(slot) = running.entry(uid) {
                    slot.insert(pods_tasks.spawn(run_pod(shared.clone(), pod)));
                }
            }
            running.retain(|uid, task| {
                let keep = present.contains(uid);
                if !keep {
                    task.abort();
                }
                keep
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn wait_exit(child: &mut std::process::Child, deadline: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::ensure!(status.success(), "exited with {status}");
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < until, "did not finish within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ready(ip: Ipv4Addr, check: &Readiness) -> bool {
    match check {
        Readiness::Tcp { port } => tokio::net::TcpStream::connect((ip, *port)).await.is_ok(),
        Readiness::Http { port, path } => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(Ok(mut s)) = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect((ip, *port)),
            )
            .await
            else {
                return false;
            };
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.20\r\nConnection: close\r\n\r\n"
            );
            if s.write_all(request.as_bytes()).await.is_err() {
                return false;
            }
            let mut head = [0u8; 12];
            matches!(
                tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut head)).await,
                Ok(Ok(_))
            ) && head.starts_with(b"HTTP/1.1 2")
        }
    }
}

/// One pod, from its namespace to Ready, held until the task is aborted (which kills its processes
/// and deletes its namespace).
async fn run_pod(shared: Arc<Shared>, pod: Pod) {
    let n = shared.next_ip.fetch_add(1, Ordering::Relaxed);
    let [a, b, c] = shared.subnet;
    let ip = Ipv4Addr::new(a, b, c, n);
    let containers: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| c.name.clone())
        .collect();
    let report = |r: Report| {
        let (shared, pod, containers) = (shared.clone(), pod.clone(), containers.clone());
        async move {
            let _ = shared
                .node
                .report(&pod, &ip.to_string(), &containers, &r)
                .await;
        }
    };
    match start_pod(&shared, &pod, ip).await {
        Ok((_guards, checks)) => {
            report(Report::Running { ready: false }).await;
            let mut was_ready = false;
            loop {
                let mut all = true;
                for check in checks.iter().flatten() {
                    all &= ready(ip, check).await;
                }
                if all != was_ready {
                    report(Report::Running { ready: all }).await;
                    was_ready = all;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Err(e) => {
            report(Report::Failed {
                reason: "CreateContainerError".into(),
                message: format!("{e:#}"),
            })
            .await;
            // Tried again, as a kubelet retries: what was missing (a ConfigMap the control plane
            // writes, a Secret) may be there by then.
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// What keeps a started pod alive: its entry for `exec`, its processes, then its namespace.
struct PodGuards {
    _registration: Registration,
    _processes: Vec<weft_netns::Process>,
    _netns: Netns,
}

async fn start_pod(
    shared: &Arc<Shared>,
    pod: &Pod,
    ip: Ipv4Addr,
) -> anyhow::Result<(PodGuards, Vec<Option<Readiness>>)> {
    let [a, b, c] = shared.subnet;
    let placement = Placement {
        pod_ip: ip.to_string(),
        host_ip: Ipv4Addr::new(a, b, c, 1).to_string(),
        node_name: shared.node.name.clone(),
    };
    let mut plan = plan(pod, &shared.images, &placement)?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let dir = shared.dir.join(&uid);
    std::fs::create_dir_all(&dir)?;
    let netns = Netns::new("pod")?;
    shared.network.attach(&netns, ip)?;
    let written = volumes::write_volumes(&shared.client, pod, &plan.volumes, &dir).await?;
    let services = shared
        .services
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, hosts_file(&services, &ns, &name, &ip.to_string()))?;
    // Every container learns where the API server is, as the kubelet tells them.
    for p in &mut plan.processes {
        p.env
            .insert(0, ("KUBERNETES_SERVICE_PORT".into(), "443".into()));
        p.env.insert(
            0,
            ("KUBERNETES_SERVICE_HOST".into(), API_CLUSTER_IP.to_string()),
        );
    }
    let log = |p: &Process| std::fs::File::create(dir.join(format!("{}.log", p.container)));
    let mut processes = Vec::new();
    let mut checks = Vec::new();
    for p in &plan.processes {
        let mut child = run::spawn(&netns.name, p, &written, Some(&hosts), log(p)?)
            .with_context(|| format!("container {}", p.container))?;
        if p.init {
            wait_exit(&mut child, STEP_DEADLINE)
                .await
                .with_context(|| {
                    format!(
                        "init container {} (its log: {})",
                        p.container,
                        dir.join(format!("{}.log", p.container)).display()
                    )
                })?;
            continue;
        }
        processes.push(weft_netns::Process(child));
        checks.push(p.readiness.clone());
        if let Some(command) = &p.post_start {
            let program = command
                .first()
                .and_then(|c| shared.images.program(c).map(PathBuf::from))
                .unwrap_or_else(|| p.program.clone());
            let hook = Process {
                container: format!("{}-poststart", p.container),
                init: true,
                program,
                args: command[1..].to_vec(),
                post_start: None,
                readiness: None,
                ..p.clone()
            };
            let mut child = run::spawn(&netns.name, &hook, &written, Some(&hosts), log(&hook)?)?;
            wait_exit(&mut child, STEP_DEADLINE)
                .await
                .with_context(|| format!("the postStart hook of {}", p.container))?;
        }
    }
    let key = (ns, name);
    if let Ok(mut running) = shared.running.lock() {
        running.insert(
            key.clone(),
            RunningPod {
                uid: uid.clone(),
                ip,
                netns: netns.name.clone(),
                processes: plan.processes.clone(),
                volumes: written,
                hosts,
            },
        );
    }
    Ok((
        PodGuards {
            _registration: Registration {
                shared: shared.clone(),
                key,
                uid,
            },
            _processes: processes,
            _netns: netns,
        },
        checks,
    ))
}
