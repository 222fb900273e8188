//! The e2e harness standing in for kind: a node that runs pods as processes in network namespaces,
//! against the real API server, with the real control plane and sidecars installed by weftctl.

use super::*;

/// The e2e harness's node against the real API server: the pod the real controller-manager makes for
/// a Deployment is bound to the node and reported running and ready, and the real controllers act on
/// it as on any cluster's: the Deployment becomes available and the EndpointSlice controller puts the
/// pod's address in its Service's slice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn the_harness_node_binds_pods_and_reports_them_as_a_kubelet() {
    use k8s_openapi::api::{apps::v1::Deployment, core::v1::Node as NodeObject};
    use kube::api::{DeleteParams, ListParams};
    use weft_e2e::kubelet::node::{Node, Report};
    let cluster = Cluster::connect().await;
    let namespace = cluster.namespace("weft-node").await;
    cluster
        .apply(
            &format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: {namespace}}}\n\
                 spec:\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n\
                 \x20   spec: {{automountServiceAccountToken: false, containers: [{{name: web, image: weft/weft-proxy:0.1.0}}]}}\n---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {namespace}}}\n\
                 spec: {{selector: {{app: web}}, ports: [{{name: http, port: 80}}]}}\n"
            ),
            &namespace,
        )
        .await;
    let node_name = format!("weft-e2e-{}", std::process::id());
    let node = Node::register(cluster.admin.clone(), &node_name, "10.98.0.1")
        .await
        .expect("the node registers");
    let pod = wait_for("the Deployment's pod, unscheduled", WAIT, || async {
        node.unscheduled()
            .await
            .ok()?
            .into_iter()
            .find(|p| p.metadata.namespace.as_deref() == Some(namespace.as_str()))
    })
    .await;
    node.bind(&pod).await.expect("bound to the node");
    node.report(
        &pod,
        "10.98.0.7",
        &["web".into()],
        &Report::Running { ready: true },
    )
    .await
    .expect("status reported");

    let deployments: kube::Api<Deployment> =
        kube::Api::namespaced(cluster.admin.clone(), &namespace);
    wait_for("the Deployment to be available", WAIT, || async {
        let d = deployments.get("web").await.ok()?;
        (d.status?.available_replicas? == 1).then_some(())
    })
    .await;
    let slices: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        cluster.admin.clone(),
        &namespace,
        &kube::discovery::ApiResource {
            group: "discovery.k8s.io".into(),
            version: "v1beta1".into(),
            api_version: "discovery.k8s.io/v1beta1".into(),
            kind: "EndpointSlice".into(),
            plural: "endpointslices".into(),
        },
    );
    wait_for(
        "the pod's address in the Service's EndpointSlice",
        WAIT,
        || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                .await
                .ok()?;
            list.items
                .iter()
                .any(|s| {
                    s.data["endpoints"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| {
                            e["addresses"][0] == "10.98.0.7" && e["conditions"]["ready"] == true
                        })
                })
                .then_some(())
        },
    )
    .await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(cluster.admin.clone(), &namespace);
    let bound = pods
        .get(pod.metadata.name.as_deref().unwrap_or_default())
        .await
        .expect("the pod");
    assert_eq!(
        bound.spec.and_then(|s| s.node_name).as_deref(),
        Some(node_name.as_str())
    );
    kube::Api::<NodeObject>::all(cluster.admin.clone())
        .delete(&node_name, &DeleteParams::default())
        .await
        .expect("the node is removed");
}

/// The harness writes an injected pod's volumes as a kubelet does: the `istio-ca` token weftd's CA
/// accepts (checked with a TokenReview for that audience), the ConfigMap's keys, an emptyDir, and the
/// service account directory with the cluster's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn the_harness_writes_a_pods_volumes_as_a_kubelet() {
    use k8s_openapi::api::{
        authentication::v1::{TokenReview, TokenReviewSpec},
        core::v1::Pod,
    };
    use kube::api::PostParams;
    let cluster = Cluster::connect().await;
    let namespace = cluster.namespace("weft-volumes").await;
    cluster.service_account(&namespace, "web").await;
    cluster
        .apply(
            &format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio-ca-root-cert, namespace: {namespace}}}\ndata: {{root-cert.pem: ROOT}}\n"
            ),
            &namespace,
        )
        .await;
    let pods: kube::Api<Pod> = kube::Api::namespaced(cluster.admin.clone(), &namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "weft/weft-proxy"}],
            "volumes": [
                {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {"audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}},
                {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
                {"name": "scratch", "emptyDir": {}}
            ]}
    }))
    .expect("a pod");
    // The ServiceAccount admission needs the account's token Secret, which its controller makes.
    let pod = wait_for("the pod to be admitted", WAIT, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    let images = weft_e2e::kubelet::Images::default().with("weft-proxy", "/bin/true");
    let placement = weft_e2e::kubelet::Placement {
        pod_ip: "10.98.0.9".into(),
        host_ip: "10.98.0.1".into(),
        node_name: "n".into(),
    };
    let plan = weft_e2e::kubelet::plan(&pod, &images, &placement).expect("a plan");
    let dir = std::env::temp_dir().join(format!("weft-volumes-{}", std::process::id()));
    let root_ca = wait_for("the namespace's kube-root-ca.crt", WAIT, || async {
        weft_e2e::kubelet::volumes::write_volumes(&cluster.admin, &pod, &plan.volumes, &dir)
            .await
            .ok()
    })
    .await;
    let read = |volume: &str, file: &str| {
        std::fs::read_to_string(root_ca[volume].join(file))
            .unwrap_or_else(|e| panic!("{volume}/{file}: {e}"))
    };
    assert_eq!(read("istiod-ca-cert", "root-cert.pem"), "ROOT");
    assert_eq!(read("kube-api-access", "namespace"), namespace);
    assert!(read("kube-api-access", "ca.crt").contains("BEGIN CERTIFICATE"));
    assert!(root_ca["scratch"].is_dir());
    let review = kube::Api::<TokenReview>::all(cluster.admin.clone())
        .create(
            &PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token: Some(read("istio-token", "istio-token")),
                    audiences: Some(vec!["istio-ca".into()]),
                },
                ..Default::default()
            },
        )
        .await
        .expect("a review")
        .status
        .expect("a status");
    assert_eq!(review.authenticated, Some(true), "{review:?}");
    assert_eq!(
        review.user.and_then(|u| u.username).as_deref(),
        Some(format!("system:serviceaccount:{namespace}:web").as_str())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The debug binaries cargo built beside this test (cargo xtask test builds them first), copied
/// where the harness's pods (uid 1337 among them) can run them. weftctl's sample apps stand in for
/// app images: `weft/weft-sample` runs it, and each of Bookinfo's images runs its stand-in.
fn harness_images(
    dir: &std::path::Path,
) -> (weft_e2e::kubelet::Images, Vec<weft_netns::SharedExecutable>) {
    let exe = std::env::current_exe().expect("the test's path");
    let bin_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/debug");
    let mut images = weft_e2e::kubelet::Images::default().with_host_tools("curl");
    let mut copies = Vec::new();
    for name in ["weftd", "weft-injector", "weft-proxy", "weftctl"] {
        let built = bin_dir.join(name);
        assert!(
            built.is_file(),
            "{} is missing: cargo build --bin {name} (cargo xtask test builds it)",
            built.display()
        );
        let copy =
            weft_netns::SharedExecutable::new_in(&built, dir).expect("a copy any user can run");
        images = match name {
            "weftctl" => {
                let mut images = images.with("weft-sample", copy.path.clone());
                for service in [
                    "productpage-v1",
                    "details-v1",
                    "reviews-v1",
                    "reviews-v2",
                    "reviews-v3",
                    "ratings-v1",
                ] {
                    images = images.with_cmd(
                        &format!("examples-bookinfo-{service}"),
                        copy.path.clone(),
                        &["sample-app", "bookinfo", service],
                    );
                }
                images
            }
            _ => images.with(name, copy.path.clone()),
        };
        copies.push(copy);
    }
    (images, copies)
}

/// Where harness nodes keep their pods' files, as a kubelet keeps /var/lib/kubelet.
const HARNESS_ROOT: &str = "/var/lib/weft-e2e";

/// `weftctl install --set profile=demo` on a harness node of its own, for one test.
struct Installed {
    harness: weft_e2e::kubelet::harness::Harness,
    client: kube::Client,
    _copies: Vec<weft_netns::SharedExecutable>,
    dir: std::path::PathBuf,
    node_name: String,
    target: weftctl::install::Target,
    revision: String,
}

impl Installed {
    /// `tag` names the node, the control plane's namespace and the revision, with this process's id.
    async fn start(cluster: &Cluster, tag: &str, subnet: [u8; 3]) -> Self {
        use weftctl::{
            install::{InstallArgs, Target},
            manifest::ValuesArgs,
        };
        let pid = std::process::id();
        let name = format!("weft-{tag}-{pid}");
        // Outside /tmp, where Bookinfo's pods mount an emptyDir, as a kubelet keeps its own.
        let dir = std::path::Path::new(HARNESS_ROOT).join(&name);
        std::fs::create_dir_all(&dir).expect("the harness's directory");
        let (images, copies) = harness_images(&dir);
        let server = kube::config::Kubeconfig::read_from(&cluster.kubeconfig)
            .expect("the kubeconfig")
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref()?.server.clone())
            .expect("a server");
        let api_server: SocketAddr = server
            .trim_start_matches("https://")
            .parse()
            .expect("the API server's address");
        let harness = weft_e2e::kubelet::harness::Harness::start(
            cluster.admin.clone(),
            weft_e2e::kubelet::harness::Config {
                node_name: name.clone(),
                images,
                dir: dir.clone(),
                subnet,
                api_server,
            },
        )
        .await
        .expect("the harness starts (needs root)");
        let revision = format!("{}{pid}", &tag[..1]);
        let target = Target {
            values: ValuesArgs {
                sets: vec!["profile=demo".into()],
                files: vec![],
                revision: Some(revision.clone()),
            },
            kube: cluster.kube_args(),
            namespace: name.clone(),
        };
        let installed = Self {
            harness,
            client: cluster.admin.clone(),
            _copies: copies,
            dir,
            node_name: name,
            target,
            revision,
        };
        let result = weftctl::install::install(&InstallArgs {
            target: installed.target.clone(),
            dry_run: false,
            wait_timeout: Duration::from_secs(90),
        })
        .await;
        if let Err(e) = &result {
            panic!("install: {e:#}\n{}", installed.logs());
        }
        installed
    }

    fn namespace(&self) -> &str {
        &self.target.namespace
    }

    /// Every container's log on this node, for a failure's message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for entry in walk_logs(&self.dir) {
            out.push_str(&format!(
                "--- {}\n{}\n",
                entry.display(),
                std::fs::read_to_string(&entry).unwrap_or_default()
            ));
        }
        out
    }

    /// A namespace whose pods the real webhook injects with this install's sidecar.
    async fn injected_namespace(&self, cluster: &Cluster, name: &str) {
        let revision = &self.revision;
        cluster
            .apply(
                &format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{istio.io/rev: {revision}}}}}\n"
                ),
                name,
            )
            .await;
    }

    async fn wait_available(&self, cluster: &Cluster, namespace: &str, deployments: &[&str]) {
        let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
            kube::Api::namespaced(cluster.admin.clone(), namespace);
        let until = tokio::time::Instant::now() + Duration::from_secs(120);
        for name in deployments {
            loop {
                let available = api
                    .get(name)
                    .await
                    .ok()
                    .and_then(|d| d.status?.available_replicas)
                    == Some(1);
                if available {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "{namespace}/{name} did not become available:\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// Leaves nothing behind for later tests: the apps' pods go while the harness still confirms
    /// their deletion, then the control plane, then the node.
    async fn remove(self, cluster: &Cluster, app_namespaces: &[&str]) {
        let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
            kube::Api::all(cluster.admin.clone());
        for ns in app_namespaces {
            namespaces
                .delete(ns, &Default::default())
                .await
                .expect("delete an app's namespace");
        }
        for ns in app_namespaces {
            wait_for("an app's namespace to be gone", WAIT, || async {
                matches!(namespaces.get_opt(ns).await, Ok(None)).then_some(())
            })
            .await;
        }
        weftctl::install::uninstall(&weftctl::install::UninstallArgs {
            target: self.target.clone(),
            purge: false,
        })
        .await
        .expect("uninstall");
        let namespace = self.namespace().to_string();
        namespaces
            .delete(&namespace, &Default::default())
            .await
            .expect("delete the control plane's namespace");
        wait_for("the control plane's namespace to be gone", WAIT, || async {
            matches!(namespaces.get_opt(&namespace).await, Ok(None)).then_some(())
        })
        .await;
        let (node_name, dir) = (self.node_name.clone(), self.dir.clone());
        drop(self);
        kube::Api::<k8s_openapi::api::core::v1::Node>::all(cluster.admin.clone())
            .delete(&node_name, &Default::default())
            .await
            .expect("the node is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `weftctl install --set profile=demo` into the real API server with the harness as its node: the
/// control plane's pod (weftd and the injector, the real binaries, as the chart runs them) comes up,
/// install returns once it is available, and `weftctl check` passes every stage: CRDs, control plane,
/// the injector's caBundle and a dry-run injection the API server really sends to it, the root
/// certificate weftd wrote, and the (zero) proxies in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn weftctl_install_on_the_harness_node_then_check_passes() {
    let cluster = Cluster::connect().await;
    let installed = Installed::start(&cluster, "harness", [10, 94, 0]).await;
    let args = weftctl::check::CheckArgs {
        pre: false,
        namespace: installed.namespace().to_string(),
        kube: installed.target.kube.clone(),
    };
    let until = tokio::time::Instant::now() + WAIT;
    let report = loop {
        let stages = weftctl::check::run(&args).await;
        let text = weftctl::check::render(&stages);
        if weftctl::check::passed(&stages) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "weftctl check did not pass within {WAIT:?}:\n{text}\n{}",
            installed.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        report.contains("✓ the API server calls istio-sidecar-injector-"),
        "{report}"
    );

    // A workload in a namespace labelled for this revision: the real webhook injects it, and the
    // harness runs its init step (the capture rules), its sidecar and its app. The sidecar gets its
    // certificate and config from weftd through the Service, and the pod turns Ready only once the
    // sidecar says it is (its postStart `weft-proxy wait` holds the app until then).
    let app_ns = format!("weft-app-{}", std::process::id());
    installed.injected_namespace(&cluster, &app_ns).await;
    cluster
        .apply(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: backend}\n\
             spec:\n  selector: {matchLabels: {app: backend}}\n  template:\n    metadata: {labels: {app: backend, version: v1}}\n\
             \x20   spec:\n      containers:\n      - name: backend\n        image: weft/weft-sample:0.1.0\n\
             \x20       args: [sample-app, backend, --listen, 0.0.0.0:9080, --version, v1]\n        ports: [{containerPort: 9080}]\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: backend}\n\
             spec: {selector: {app: backend}, ports: [{name: http, port: 9080}]}\n",
            &app_ns,
        )
        .await;
    installed
        .wait_available(&cluster, &app_ns, &["backend"])
        .await;
    let source = weftctl::proxy_status::WeftdSource {
        kube: installed.target.kube.clone(),
        istio_namespace: installed.namespace().to_string(),
        weftd: None,
    };
    // Each push is STALE until the proxy's ACK comes back: wait for the ACKs.
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let (replicas, unreachable) = source.reports().await.expect("weftd answers");
        let table = weftctl::proxy_status::render(&replicas, &unreachable, None);
        let synced = table.lines().any(|l| {
            l.contains(&format!(".{app_ns} "))
                && l.split_whitespace().skip(1).take(3).collect::<Vec<_>>()
                    == ["SYNCED", "SYNCED", "SYNCED"]
        });
        if synced {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the backend's sidecar is not in sync:\n{table}\n{}",
            installed.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    installed.remove(&cluster, &[&app_ns]).await;
}

/// Istio's curl sample as the Bookinfo tasks use it: a pod to `kubectl exec` curl in.
const CURL: &str = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: curl}\n---\n\
    apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: curl}\n\
    spec:\n  selector: {matchLabels: {app: curl}}\n  template:\n    metadata: {labels: {app: curl}}\n\
    \x20   spec:\n      serviceAccountName: curl\n      containers:\n      - name: curl\n        image: curlimages/curl\n\
    \x20       command: [/bin/sleep, infinity]\n";

/// What `curl` met: its HTTP status (`000` when no response came) and body.
#[derive(Debug)]
struct Fetched {
    status: String,
    body: String,
}

impl Installed {
    /// `kubectl exec deploy/curl -n NS -- curl -s URL`, with `headers`.
    async fn curl(&self, ns: &str, url: &str, headers: &[&str]) -> Fetched {
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(self.client.clone(), ns);
        let pod = pods
            .list(&kube::api::ListParams::default().labels("app=curl"))
            .await
            .expect("list the curl pods")
            .items
            .into_iter()
            .find_map(|p| p.metadata.name)
            .unwrap_or_else(|| panic!("no curl pod in {ns}"));
        let mut argv = vec!["curl", "-s", "-m", "5", "-w", "\n%{http_code}"];
        for h in headers {
            argv.extend(["-H", h]);
        }
        argv.push(url);
        let out = self
            .harness
            .exec(ns, &pod, "curl", &argv)
            .await
            .unwrap_or_else(|e| panic!("exec curl in {ns}/{pod}: {e:#}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        Fetched {
            status: status.trim().to_string(),
            body: body.to_string(),
        }
    }

    /// Asks until `want` holds for `times` answers in a row, within the deadline; the last answer
    /// otherwise, in the panic.
    async fn until(
        &self,
        what: &str,
        ns: &str,
        url: &str,
        headers: &[&str],
        times: usize,
        want: impl Fn(&Fetched) -> bool,
    ) {
        let until = tokio::time::Instant::now() + WAIT;
        let mut in_a_row = 0;
        loop {
            let fetched = self.curl(ns, url, headers).await;
            in_a_row = if want(&fetched) { in_a_row + 1 } else { 0 };
            if in_a_row == times {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "{what}: last answer {fetched:?}\n{}",
                self.logs()
            );
            if in_a_row == 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The stand-in for kind's Bookinfo run (`cargo xtask e2e-kind`): Bookinfo's manifests in a
/// namespace labelled for injection, on the harness node with `weftctl install --set profile=demo`.
/// Every pod gets the real sidecar; productpage reaches details, and reviews (v2 and v3 reaching
/// ratings) through them. Then Istio's own tasks: reviews routed by version and by the `end-user`
/// header; mTLS STRICT refusing a caller without a sidecar that PERMISSIVE let in; an
/// AuthorizationPolicy letting only productpage's identity call details.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn bookinfo_runs_in_the_mesh_on_the_harness_node() {
    let cluster = Cluster::connect().await;
    let installed = Installed::start(&cluster, "bookinfo", [10, 95, 0]).await;
    let pid = std::process::id();
    let (app_ns, outside_ns) = (format!("bookinfo-{pid}"), format!("outside-{pid}"));
    installed.injected_namespace(&cluster, &app_ns).await;
    cluster
        .apply(
            &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {outside_ns}}}\n"),
            &outside_ns,
        )
        .await;
    let bookinfo = match std::env::var_os("WEFT_BOOKINFO_MANIFEST") {
        Some(path) => std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("WEFT_BOOKINFO_MANIFEST {}: {e}", path.to_string_lossy())),
        None => include_str!("../../testdata/bookinfo.yaml").to_string(),
    };
    cluster.apply(&bookinfo, &app_ns).await;
    cluster.apply(CURL, &app_ns).await;
    cluster.apply(CURL, &outside_ns).await;
    installed
        .wait_available(
            &cluster,
            &app_ns,
            &[
                "details-v1",
                "ratings-v1",
                "reviews-v1",
                "reviews-v2",
                "reviews-v3",
                "productpage-v1",
                "curl",
            ],
        )
        .await;
    installed
        .wait_available(&cluster, &outside_ns, &["curl"])
        .await;

    let page = "http://productpage:9080/productpage";
    // Without a rule, reviews' requests spread over its three versions.
    let until = tokio::time::Instant::now() + WAIT;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 3 {
        let fetched = installed.curl(&app_ns, page, &[]).await;
        if fetched.status == "200" && fetched.body.contains("details v1") {
            for version in [
                "reviews v1",
                "reviews v2 black stars",
                "reviews v3 red stars",
            ] {
                if fetched.body.contains(version) {
                    assert!(
                        version == "reviews v1" || fetched.body.contains("ratings v1"),
                        "{fetched:?}"
                    );
                    seen.insert(version);
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "productpage did not show every reviews version: {seen:?}, last {fetched:?}\n{}",
            installed.logs()
        );
    }

    // Istio's "request routing" task: everyone to v1, jason to v2.
    cluster
        .apply(
            "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: reviews}\n\
             spec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n\
             \x20 - {name: v2, labels: {version: v2}}\n  - {name: v3, labels: {version: v3}}\n---\n\
             apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: reviews}\n\
             spec:\n  hosts: [reviews]\n  http:\n\
             \x20 - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n\
             \x20 - route: [{destination: {host: reviews, subset: v1}}]\n",
            &app_ns,
        )
        .await;
    installed
        .until("everyone sees reviews v1", &app_ns, page, &[], 10, |f| {
            f.status == "200" && f.body.contains("reviews v1\n")
        })
        .await;
    installed
        .until(
            "jason sees reviews v2",
            &app_ns,
            page,
            &["end-user: jason"],
            10,
            |f| f.status == "200" && f.body.contains("reviews v2 black stars"),
        )
        .await;

    // mTLS: a caller without a sidecar gets in while the namespace is PERMISSIVE, not once STRICT.
    let from_outside = format!("http://productpage.{app_ns}:9080/productpage");
    installed
        .until(
            "PERMISSIVE lets a plaintext caller in",
            &outside_ns,
            &from_outside,
            &[],
            1,
            |f| f.status == "200",
        )
        .await;
    cluster
        .apply(
            "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: default}\n\
             spec: {mtls: {mode: STRICT}}\n",
            &app_ns,
        )
        .await;
    installed
        .until(
            "STRICT refuses a plaintext caller",
            &outside_ns,
            &from_outside,
            &[],
            3,
            |f| f.status == "000",
        )
        .await;
    installed
        .until("STRICT serves the mesh", &app_ns, page, &[], 3, |f| {
            f.status == "200" && f.body.contains("details v1")
        })
        .await;

    // Only productpage's identity may call details.
    cluster
        .apply(
            &format!(
                "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {{name: details-viewer}}\n\
                 spec:\n  selector: {{matchLabels: {{app: details}}}}\n  action: ALLOW\n  rules:\n\
                 \x20 - from: [{{source: {{principals: [cluster.local/ns/{app_ns}/sa/bookinfo-productpage]}}}}]\n\
                 \x20   to: [{{operation: {{methods: [GET]}}}}]\n"
            ),
            &app_ns,
        )
        .await;
    installed
        .until(
            "curl's identity is denied details",
            &app_ns,
            "http://details:9080/details/0",
            &[],
            3,
            |f| f.status == "403" && f.body.contains("RBAC: access denied"),
        )
        .await;
    installed
        .until(
            "productpage's identity still reads details",
            &app_ns,
            page,
            &[],
            3,
            |f| f.status == "200" && f.body.contains("details v1"),
        )
        .await;

    installed.remove(&cluster, &[&app_ns, &outside_ns]).await;
}

fn walk_logs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk_logs(&path));
        } else if path.extension().is_some_and(|e| e == "log") {
            out.push(path);
        }
    }
    out
}
