//! weftd against a real kube-apiserver (1.20, from Debian's source; `cargo xtask test` starts one and
//! runs these with `--ignored --test-threads=1`). weftd always runs with only the rights
//! the charts' RBAC grants, so a missing rule fails here first.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use http::StatusCode;
use serde_json::{Value, json};
use weft_certs::{PeerPolicy, SpiffeId, WorkloadKey};
use weft_integration::{
    Mesh, cluster::Cluster, get_text, http1_client, next_ip, send, service, sidecar, wait_for,
};
use weft_xds::istio_ca::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use weftd::kubernetes::{KubeOptions, leader::Timing, namespaces};

const WAIT: Duration = Duration::from_secs(30);

/// weftd's own namespace and least-privilege credentials, with a lease short enough for a test.
async fn weftd_options(cluster: &Cluster, namespace: Option<&str>) -> KubeOptions {
    static REPLICA: AtomicUsize = AtomicUsize::new(0);
    let namespace = match namespace {
        Some(ns) => ns.to_string(),
        None => cluster.namespace("weft-system").await,
    };
    let kubeconfig = cluster.weftd_kubeconfig(&namespace).await;
    let mut options = KubeOptions::new(
        Some(kubeconfig),
        namespace,
        format!("replica-{}", REPLICA.fetch_add(1, Ordering::Relaxed)),
    );
    options.leader_timing = Timing {
        lease: Duration::from_secs(4),
        renew_deadline: Duration::from_secs(3),
        retry: Duration::from_millis(300),
    };
    options
}

async fn wait_ready(monitoring: SocketAddr) {
    wait_for("weftd's /ready", WAIT, || async {
        get_text(monitoring, "/ready")
            .await
            .ok()
            .filter(|(s, _)| *s == StatusCode::OK)
            .map(|_| ())
    })
    .await;
}

/// The reason weftd wrote on an object it refuses, once it has.
async fn refusal(cluster: &Cluster, kind: &str, ns: &str, name: &str) -> Option<String> {
    let obj = cluster
        .get("networking.istio.io/v1beta1", kind, ns, name)
        .await?;
    let conditions = obj.data.pointer("/status/conditions")?.as_array()?.clone();
    conditions
        .iter()
        .find(|c| c["type"] == "Accepted" && c["status"] == "False")
        .and_then(|c| c["message"].as_str().map(str::to_string))
}

fn object(api_version: &str, kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec})
}

/// Istio's CRDs as Weft ships them take Istio's own examples in every served version; weftd reads the
/// kinds it acts on and writes why on each object it refuses (a kind it does not act on, a field it
/// does not know), then clears that when the object is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn istio_objects_in_every_version_are_read_and_refusals_are_written_to_status() {
    let cluster = Cluster::connect().await;
    let ns = cluster.namespace("weft-crds").await;
    let examples: [(&str, &str, &[&str], Value); 7] = [
        (
            "networking.istio.io",
            "VirtualService",
            &["v1alpha3", "v1beta1", "v1"],
            json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}),
        ),
        (
            "networking.istio.io",
            "DestinationRule",
            &["v1alpha3", "v1beta1", "v1"],
            json!({"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}),
        ),
        (
            "networking.istio.io",
            "ServiceEntry",
            &["v1alpha3", "v1beta1", "v1"],
            json!({"hosts": ["api.example.com"], "ports": [{"number": 443, "name": "https", "protocol": "TLS"}], "resolution": "STATIC", "location": "MESH_EXTERNAL", "endpoints": [{"address": "10.8.8.8"}]}),
        ),
        (
            "networking.istio.io",
            "Sidecar",
            &["v1alpha3", "v1beta1", "v1"],
            json!({"workloadSelector": {"labels": {"app": "none"}}, "egress": [{"hosts": ["./*", "istio-system/*"]}]}),
        ),
        (
            "networking.istio.io",
            "WorkloadEntry",
            &["v1alpha3", "v1beta1", "v1"],
            json!({"address": "10.9.9.9", "labels": {"app": "vm"}, "serviceAccount": "vm"}),
        ),
        (
            "security.istio.io",
            "PeerAuthentication",
            &["v1beta1", "v1"],
            json!({"selector": {"matchLabels": {"app": "none"}}, "mtls": {"mode": "STRICT"}}),
        ),
        (
            "security.istio.io",
            "AuthorizationPolicy",
            &["v1beta1", "v1"],
            json!({"selector": {"matchLabels": {"app": "none"}}, "action": "ALLOW", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}]}]}),
        ),
    ];
    let mut accepted = Vec::new();
    for (group, kind, versions, spec) in &examples {
        for version in *versions {
            let name = format!("{}-{version}", kind.to_lowercase());
            let doc = object(&format!("{group}/{version}"), kind, &name, spec.clone());
            let created = cluster.create(doc, &ns).await;
            let created = created.unwrap_or_else(|e| panic!("{kind} {version}: {e}"));
            assert_eq!(created.metadata.name.as_deref(), Some(name.as_str()));
            accepted.push((*group, *kind, name));
        }
    }
    let gateway = object(
        "networking.istio.io/v1",
        "Gateway",
        "ingress",
        json!({"selector": {"istio": "ingressgateway"}, "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}),
    );
    cluster.create(gateway, &ns).await.expect("a Gateway");
    let unknown_field = object(
        "networking.istio.io/v1",
        "VirtualService",
        "typo",
        json!({"hosts": ["reviews"], "htttp": []}),
    );
    cluster
        .create(unknown_field, &ns)
        .await
        .expect("the server keeps unknown fields");

    let options = weftd_options(&cluster, None).await;
    let mesh = Mesh::start_on_kubernetes(options, &ns).await;
    wait_ready(mesh.monitoring).await;
    let gateway_reason = wait_for("the Gateway's status", WAIT, || {
        refusal(&cluster, "Gateway", &ns, "ingress")
    })
    .await;
    assert!(
        gateway_reason.contains("does not act on Gateway"),
        "{gateway_reason}"
    );
    let typo_reason = wait_for("the typo's status", WAIT, || {
        refusal(&cluster, "VirtualService", &ns, "typo")
    })
    .await;
    assert!(typo_reason.contains("htttp"), "{typo_reason}");
    // Written in the same pass as the refusals: every example was read without one.
    for (group, kind, name) in &accepted {
        let obj = cluster
            .get(&format!("{group}/v1beta1"), kind, &ns, name)
            .await
            .expect("still there");
        assert!(
            obj.data.pointer("/status/conditions").is_none(),
            "{kind} {name} was refused: {:?}",
            obj.data.get("status")
        );
    }

    // Fixed, the refusal goes.
    let fix = json!({"spec": {"htttp": null, "http": [{"route": [{"destination": {"host": "reviews"}}]}]}});
    cluster
        .merge("networking.istio.io/v1", "VirtualService", &ns, "typo", fix)
        .await;
    wait_for("the typo's status to clear", WAIT, || async {
        let obj = cluster
            .get("networking.istio.io/v1", "VirtualService", &ns, "typo")
            .await?;
        let cleared = obj.data.pointer("/spec/htttp").is_none()
            && obj.data.pointer("/status/conditions").is_none();
        cleared.then_some(())
    })
    .await;
    mesh.shutdown().await;
}

fn all_to(subset: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: backend, namespace: test}}\nspec:\n  host: backend\n  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: backend, namespace: test}}\nspec:\n  hosts: [backend]\n  http: [{{route: [{{destination: {{host: backend, subset: {subset}}}}}]}}]\n"
    )
}

/// Config created, updated and deleted through the API reaches proxies with no failed request, and
/// survives the API server going away: proxies keep serving, and weftd's watches resume when it is
/// back. Then a ServiceEntry and an AuthorizationPolicy are followed the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn changes_through_the_api_reach_proxies_without_failed_requests_and_outlive_an_api_server_restart()
 {
    let cluster = Cluster::connect().await;
    let ns = cluster.namespace("weft-traffic").await;
    let options = weftd_options(&cluster, None).await;
    let mut mesh = Mesh::start_on_kubernetes(options, &ns).await;
    let drain = mesh.watcher();
    let mut apps = Vec::new();
    for v in ["v1", "v2"] {
        let (addr, _, task) =
            weft_integration::http_backend(&format!("backend-{v}"), drain.clone()).await;
        mesh.spawn(task);
        apps.push((next_ip(), v, addr));
    }
    drop(drain);
    let pods: Vec<(std::net::IpAddr, String, &str)> = apps
        .iter()
        .map(|(ip, v, _)| (*ip, format!("backend-{v}-0"), *v))
        .collect();
    let endpoints: Vec<(std::net::IpAddr, &str, &str)> = pods
        .iter()
        .map(|(ip, p, v)| (*ip, p.as_str(), *v))
        .collect();
    let mut manifests = service("backend", "http", 9080, &endpoints);
    for (_, v, addr) in &apps {
        manifests.push_str(&sidecar(
            &format!("backend-{v}"),
            &[("app", "backend"), ("version", v)],
            &[(9080, "HTTP", *addr)],
            &[],
        ));
    }
    manifests.push_str(&sidecar(
        "client",
        &[("app", "client")],
        &[],
        &[(9080, "HTTP")],
    ));
    cluster.apply(&manifests, &ns).await;
    cluster.apply(&all_to("v1"), &ns).await;
    wait_ready(mesh.monitoring).await;
    for (ip, v, _) in &apps {
        let p = mesh
            .proxy(
                &format!("backend-{v}-0"),
                *ip,
                &[("app", "backend"), ("version", v)],
            )
            .await;
        // Not `ready()`: this Sidecar lets the proxy see every namespace's services, and some in a
        // shared cluster have no endpoints (`kubernetes.default` here has none).
        let mut state = p.state.clone();
        wait_for("the backend's inbound listener", WAIT, || {
            let listening = !state.borrow_and_update().listeners.is_empty();
            async move { listening.then_some(()) }
        })
        .await;
    }
    let client_ip = next_ip();
    let mut client = mesh
        .proxy("client-0", client_ip, &[("app", "client")])
        .await;
    client.ready(1).await;
    let egress = SocketAddr::new(client_ip, 9080);
    let backend_now = || async move {
        send(&http1_client(), egress, "GET", "backend", "/", &[])
            .await
            .ok()
            .filter(|r| r.status == StatusCode::OK)
            .map(|r| r.backend())
    };
    wait_for("traffic to v1", WAIT, || async {
        (backend_now().await.as_deref() == Some("backend-v1")).then_some(())
    })
    .await;

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        let client = http1_client();
        let (mut ok, mut failed) = (0, Vec::new());
        loop {
            match send(&client, egress, "GET", "backend", "/", &[]).await {
                Ok(r) if r.status == StatusCode::OK => ok += 1,
                other => failed.push(format!("{other:?}")),
            }
            if *stop_rx.borrow_and_update() {
                return (ok, failed);
            }
        }
    });
    // Update: the route moves to v2.
    cluster.apply(&all_to("v2"), &ns).await;
    wait_for("traffic to move to v2", WAIT, || async {
        (backend_now().await.as_deref() == Some("backend-v2")).then_some(())
    })
    .await;
    // Delete: with no VirtualService the service's endpoints share the traffic.
    cluster.delete(&all_to("v2"), &ns).await;
    wait_for(
        "traffic to reach v1 again without a route",
        WAIT,
        || async { (backend_now().await.as_deref() == Some("backend-v1")).then_some(()) },
    )
    .await;

    // The API server goes away and comes back; proxies serve meanwhile from the config they hold.
    let run_dir = std::path::PathBuf::from(std::env::var_os("KUBE_RUN").expect("KUBE_RUN"));
    let pid = std::fs::read_to_string(run_dir.join("kube-apiserver.pid")).expect("the pid");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .expect("kill");
    assert!(killed.success());
    for _ in 0..20 {
        assert!(
            backend_now().await.is_some(),
            "proxies serve while the API server is down"
        );
    }
    let up = std::process::Command::new("bash")
        .arg(std::env::var_os("WEFT_TEST_KUBE_UP").expect("WEFT_TEST_KUBE_UP"))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("kube-up");
    assert!(up.success(), "the API server restarts");
    cluster.apply(&all_to("v2"), &ns).await;
    wait_for(
        "a change after the restart to reach the proxy",
        Duration::from_secs(60),
        || async { (backend_now().await.as_deref() == Some("backend-v2")).then_some(()) },
    )
    .await;

    let _ = stop_tx.send(true);
    let (ok, failed) = load.await.expect("load task");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 0);

    // A ServiceEntry: created, its endpoint moved, deleted.
    let status_of = |host: &'static str| async move {
        send(&http1_client(), egress, "GET", host, "/", &[])
            .await
            .ok()
            .map(|r| (r.status, r.backend()))
    };
    let entry = |port: u16| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: external, namespace: test}}\nspec:\n  hosts: [external.example]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  ports: [{{number: 9080, name: http, protocol: HTTP}}]\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]\n"
        )
    };
    cluster.apply(&entry(apps[0].2.port()), &ns).await;
    wait_for("the ServiceEntry to route", WAIT, || async {
        (status_of("external.example").await == Some((StatusCode::OK, "backend-v1".into())))
            .then_some(())
    })
    .await;
    cluster.apply(&entry(apps[1].2.port()), &ns).await;
    wait_for("the ServiceEntry's new endpoint", WAIT, || async {
        (status_of("external.example").await == Some((StatusCode::OK, "backend-v2".into())))
            .then_some(())
    })
    .await;
    cluster.delete(&entry(apps[1].2.port()), &ns).await;
    wait_for("the ServiceEntry to go", WAIT, || async {
        status_of("external.example")
            .await
            .filter(|(s, _)| *s != StatusCode::OK)
            .map(|_| ())
    })
    .await;

    // An AuthorizationPolicy on the backends: created (requests denied), deleted (allowed again).
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: test}\nspec:\n  selector: {matchLabels: {app: backend}}\n  action: DENY\n  rules: [{}]\n";
    cluster.apply(deny, &ns).await;
    wait_for("the policy to deny", WAIT, || async {
        status_of("backend")
            .await
            .filter(|(s, _)| *s == StatusCode::FORBIDDEN)
            .map(|_| ())
    })
    .await;
    cluster.delete(deny, &ns).await;
    wait_for("the policy to go", WAIT, || async {
        status_of("backend")
            .await
            .filter(|(s, _)| *s == StatusCode::OK)
            .map(|_| ())
    })
    .await;
    mesh.shutdown().await;
}

/// The CA signs for the service account the API server says a token belongs to, and nothing else;
/// the trust bundle it signs under is in every namespace, kept as weftd wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn service_account_tokens_prove_identity_and_every_namespace_holds_the_root() {
    let cluster = Cluster::connect().await;
    let ns = cluster.namespace("weft-ca").await;
    let options = weftd_options(&cluster, None).await;
    let mesh = Mesh::start_on_kubernetes(options, &ns).await;
    wait_ready(mesh.monitoring).await;

    let bundle_in = |namespace: String| {
        let cluster = &cluster;
        async move {
            let cm = cluster
                .get("v1", "ConfigMap", &namespace, namespaces::CONFIG_MAP)
                .await?;
            cm.data
                .pointer(&format!("/data/{}", namespaces::KEY))?
                .as_str()
                .map(str::to_string)
        }
    };
    let root = wait_for("the root in the test namespace", WAIT, || {
        bundle_in(ns.clone())
    })
    .await;
    assert!(root.contains("BEGIN CERTIFICATE"));
    // A namespace made later gets it too, and an edit or a delete is undone.
    let later = cluster.namespace("weft-later").await;
    let got = wait_for("the root in a new namespace", WAIT, || {
        bundle_in(later.clone())
    })
    .await;
    assert_eq!(got, root);
    cluster
        .apply(
            &format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {}, namespace: test}}\ndata: {{{}: tampered}}\n", namespaces::CONFIG_MAP, namespaces::KEY),
            &later,
        )
        .await;
    wait_for("the edit to be undone", WAIT, || async {
        (bundle_in(later.clone()).await.as_deref() == Some(root.as_str())).then_some(())
    })
    .await;

    let istiod = PeerPolicy::DnsName(weftd::app::CONTROL_PLANE_DNS_NAME.into());
    let tls = weft_certs::anonymous_client_config(&root, istiod, &["h2"]).expect("tls");
    let channel = weft_xds::tls::channel(&format!("https://{}", mesh.secure), Some(tls))
        .await
        .expect("connects to 15012");
    let mut ca = IstioCertificateServiceClient::new(channel);
    let ask = |sa: &str, token: &str| {
        let key = WorkloadKey::generate().expect("key");
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: key
                .csr_pem(&SpiffeId::new("cluster.local", &ns, sa))
                .expect("csr"),
            validity_duration: 3600,
            metadata: None,
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        req
    };
    let web = cluster.token(&ns, "web", "istio-ca").await;
    let chain = ca
        .create_certificate(ask("web", &web))
        .await
        .expect("web's token gets web's certificate")
        .into_inner()
        .cert_chain;
    assert!(!chain.is_empty());
    let other_audience = cluster.token(&ns, "web", "some-other-service").await;
    let mut forged = web.clone();
    forged.truncate(forged.len() - 4);
    forged.push_str("AAAA");
    let cases = [
        (
            "another account's certificate",
            ask("db", &web),
            tonic::Code::PermissionDenied,
        ),
        (
            "a token for another audience",
            ask("web", &other_audience),
            tonic::Code::Unauthenticated,
        ),
        (
            "a forged token",
            ask("web", &forged),
            tonic::Code::Unauthenticated,
        ),
    ];
    for (what, request, code) in cases {
        let refused = ca.create_certificate(request).await.expect_err(what);
        assert_eq!(refused.code(), code, "{what}: {}", refused.message());
    }
    mesh.shutdown().await;
}

/// Two replicas: both serve, one leads (and only it writes), and when it goes the other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn of_two_replicas_one_leads_and_the_other_takes_over_when_it_goes() {
    let cluster = Cluster::connect().await;
    let system = cluster.namespace("weft-ha").await;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let options = weftd_options(&cluster, Some(&system)).await;
        let app = weftd::app::build(weftd::app::Config {
            source: weftd::app::Source::Kubernetes(options.clone()),
            xds_address: Some("127.0.0.1:0".parse().expect("addr")),
            secure_address: "127.0.0.1:0".parse().expect("addr"),
            monitoring_address: "127.0.0.1:0".parse().expect("addr"),
            mesh: Default::default(),
            ca_dir: None,
            identity_dir: None,
            lifetimes: Default::default(),
        })
        .await
        .expect("weftd builds");
        let leading = app.leading();
        let monitoring = app.monitoring_address();
        let root = app.root_pem().to_string();
        let (trigger, watcher) = weft_drain::new();
        let task = tokio::spawn(app.run(watcher));
        replicas.push((options.identity, leading, monitoring, root, trigger, task));
    }
    assert_eq!(
        replicas[0].3, replicas[1].3,
        "both replicas share one root (istio-ca-secret)"
    );
    for r in &replicas {
        wait_ready(r.2).await;
    }
    let leaders = || replicas.iter().filter(|r| *r.1.borrow()).count();
    wait_for("a leader", WAIT, || async {
        (leaders() == 1).then_some(())
    })
    .await;
    let holder = || {
        let (cluster, system) = (&cluster, system.clone());
        async move {
            cluster
                .get(
                    "coordination.k8s.io/v1",
                    "Lease",
                    &system,
                    weftd::kubernetes::leader::LEASE_NAME,
                )
                .await?
                .data
                .pointer("/spec/holderIdentity")?
                .as_str()
                .map(str::to_string)
        }
    };
    let leader = replicas
        .iter()
        .position(|r| *r.1.borrow())
        .expect("one leads");
    assert_eq!(holder().await.as_deref(), Some(replicas[leader].0.as_str()));
    // Over a few renewals the other does not take over.
    let mut leading = replicas[leader].1.clone();
    leading.borrow_and_update();
    for _ in 0..3 {
        let renewed = tokio::time::timeout(Duration::from_secs(2), leading.changed()).await;
        assert!(
            renewed.is_err(),
            "leadership stays put while the leader renews"
        );
        assert_eq!(leaders(), 1);
    }

    let (identity, _, _, _, trigger, task) = replicas.remove(leader);
    trigger.drain().await;
    task.await
        .expect("joined")
        .expect("the leader drains cleanly");
    let successor = replicas[0].0.clone();
    wait_for("the other replica to lead", WAIT, || async {
        (*replicas[0].1.borrow()).then_some(())
    })
    .await;
    let now = holder().await;
    assert_eq!(now.as_deref(), Some(successor.as_str()), "was {identity}");
    let (_, _, _, _, trigger, task) = replicas.remove(0);
    trigger.drain().await;
    task.await.expect("joined").expect("drains cleanly");
}

/// What the injector makes of Istio's samples is a pod the API server's own validation accepts, with
/// the sidecar where the injector put it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn injected_samples_pass_the_api_servers_validation() {
    use k8s_openapi::api::core::v1::Pod;
    let cluster = Cluster::connect().await;
    let ns = cluster.namespace("weft-inject").await;
    let enabled =
        std::collections::BTreeMap::from([("istio-injection".to_string(), "enabled".to_string())]);
    let samples = [
        include_str!("../../../crates/inject/testdata/productpage-pod.yaml"),
        include_str!("../../../crates/inject/testdata/httpbin-pod.yaml"),
        include_str!("../../../crates/inject/testdata/sleep-pod.yaml"),
    ];
    let pods: kube::Api<Pod> = kube::Api::namespaced(cluster.admin.clone(), &ns);
    for sample in samples {
        let mut pod: Pod = serde_saphyr::from_str(sample).expect("a pod");
        // The sample's ReplicaSet is not in this cluster.
        pod.metadata.owner_references = None;
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        cluster.service_account_with_token(&ns, &sa).await;
        let injected = weft_inject::mutate(
            &pod,
            &ns,
            Some(&enabled),
            &weft_inject::InjectConfig::default(),
        )
        .expect("injected");
        let created = pods
            .create(&kube::api::PostParams::default(), &injected.pod)
            .await
            .unwrap_or_else(|e| panic!("the API server refuses the injected {sa} pod: {e}"));
        let spec = created.spec.expect("spec");
        assert_eq!(spec.containers[0].name, "istio-proxy");
        assert_eq!(
            spec.init_containers.expect("init containers")[0].name,
            "istio-init"
        );
    }
}

/// Istio's two default-revision webhooks as its chart writes them, pointed at an injector on this
/// machine (kube-apiserver 1.20 reaches webhooks by URL).
fn webhook_configuration(name: &str, url: &str) -> Value {
    let webhook = |hook: &str, namespace_selector: Value, object_selector: Value| {
        json!({
            "name": hook,
            "clientConfig": {"url": url},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": namespace_selector,
            "objectSelector": object_selector,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "reinvocationPolicy": "Never",
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            webhook(
                "namespace.sidecar-injector.istio.io",
                json!({"matchExpressions": [{"key": "istio-injection", "operator": "In", "values": ["enabled"]}]}),
                json!({"matchExpressions": [{"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]}),
            ),
            webhook(
                "object.sidecar-injector.istio.io",
                json!({"matchExpressions": [
                    {"key": "istio-injection", "operator": "DoesNotExist"},
                    {"key": "istio.io/rev", "operator": "DoesNotExist"}]}),
                json!({"matchExpressions": [
                    {"key": "sidecar.istio.io/inject", "operator": "In", "values": ["true"]},
                    {"key": "istio.io/rev", "operator": "DoesNotExist"}]}),
            ),
        ],
    })
}

/// The webhook, called by the real API server: a labelled namespace's pods get a sidecar, an
/// unlabelled one's do not, a pod's opt-out wins and its opt-in works anywhere; the injector keeps the
/// webhook's caBundle and counts what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn the_webhook_injects_the_pods_istios_rules_select() {
    use k8s_openapi::api::core::v1::Pod;
    let cluster = Cluster::connect().await;
    let name = format!("weft-injector-{}", std::process::id());
    let injector = weft_injector::server::build(weft_injector::server::Config {
        address: "127.0.0.1:0".parse().expect("addr"),
        monitoring_address: "127.0.0.1:0".parse().expect("addr"),
        dns_names: vec!["localhost".into()],
        trust_domain: "cluster.local".into(),
        inject: weft_inject::InjectConfig::default(),
        webhook_configuration: Some(name.clone()),
        // Asked of the API server: 1.20 has no native sidecars.
        native_sidecars: weft_injector::server::NativeSidecars::Auto,
        kubeconfig: Some(cluster.kubeconfig.clone()),
    })
    .await
    .expect("the injector builds");
    let url = format!("https://localhost:{}/inject", injector.address().port());
    let monitoring = injector.monitoring_address();
    cluster
        .create(webhook_configuration(&name, &url), "")
        .await
        .expect("the webhook configuration");
    let (trigger, watcher) = weft_drain::new();
    let task = tokio::spawn(injector.run(watcher));
    wait_for("the injector to write the caBundle", WAIT, || async {
        let config = cluster
            .get(
                "admissionregistration.k8s.io/v1",
                "MutatingWebhookConfiguration",
                "",
                &name,
            )
            .await?;
        let hooks = config.data["webhooks"].as_array()?.clone();
        hooks
            .iter()
            .all(|h| h.pointer("/clientConfig/caBundle").is_some_and(|b| b != ""))
            .then_some(())
    })
    .await;

    let labelled = cluster.namespace("weft-injected").await;
    cluster
        .merge(
            "v1",
            "Namespace",
            "",
            &labelled,
            json!({"metadata": {"labels": {"istio-injection": "enabled"}}}),
        )
        .await;
    let plain = cluster.namespace("weft-plain").await;
    let create = |ns: String, pod: &'static str, labels: Value| {
        let cluster = &cluster;
        async move {
            cluster.service_account_with_token(&ns, "default").await;
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": pod, "labels": labels},
                "spec": {"containers": [{"name": "app", "image": "weft-test-app",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}]},
            }))
            .expect("pod");
            let created = kube::Api::<Pod>::namespaced(cluster.admin.clone(), &ns)
                .create(&kube::api::PostParams::default(), &pod)
                .await
                .unwrap_or_else(|e| {
                    panic!("create {ns}/{}: {e}", pod.metadata.name.unwrap_or_default())
                });
            created
                .spec
                .expect("spec")
                .containers
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        }
    };
    let proxy_and_app = ["istio-proxy".to_string(), "app".to_string()];
    let app = ["app".to_string()];
    assert_eq!(
        create(labelled.clone(), "in-labelled", json!({"app": "a"})).await,
        proxy_and_app
    );
    assert_eq!(
        create(plain.clone(), "in-plain", json!({"app": "a"})).await,
        app
    );
    assert_eq!(
        create(
            labelled.clone(),
            "opted-out",
            json!({"sidecar.istio.io/inject": "false"})
        )
        .await,
        app
    );
    assert_eq!(
        create(
            plain.clone(),
            "opted-in",
            json!({"sidecar.istio.io/inject": "true"})
        )
        .await,
        proxy_and_app
    );

    // A pod the injector cannot act on is not created, and the API server's answer says why.
    let bad: Pod = serde_json::from_value(json!({
        "metadata": {"name": "bad-cpu", "annotations": {"sidecar.istio.io/proxyCPU": "lots"}},
        "spec": {"containers": [{"name": "app", "image": "weft-test-app"}]},
    }))
    .expect("pod");
    let refused = kube::Api::<Pod>::namespaced(cluster.admin.clone(), &labelled)
        .create(&kube::api::PostParams::default(), &bad)
        .await
        .expect_err("the webhook refuses it");
    let message = refused.to_string();
    assert!(
        message.contains("sidecar.istio.io/proxyCPU") && message.contains("quantity"),
        "{message}"
    );
    assert!(
        cluster
            .get("v1", "Pod", &labelled, "bad-cpu")
            .await
            .is_none(),
        "the refused pod does not exist"
    );

    // As the API server stored it: the app's probe goes through the proxy, and on 1.20 (no native
    // sidecars) the proxy holds the app until it is ready.
    let stored = cluster
        .get("v1", "Pod", &labelled, "in-labelled")
        .await
        .expect("the injected pod");
    let containers = stored.data["spec"]["containers"].clone();
    assert_eq!(
        containers[1]["readinessProbe"]["httpGet"],
        json!({"path": "/app-health/app/readyz", "port": 15020, "scheme": "HTTP"})
    );
    assert_eq!(
        containers[0]["lifecycle"]["postStart"]["exec"]["command"],
        json!(["weft-proxy", "wait"])
    );
    let probers = containers[0]["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "ISTIO_KUBE_APP_PROBERS"))
        .and_then(|e| e["value"].as_str())
        .expect("the app's probe handed to the proxy");
    let probers = weft_proxy::status::parse_app_probes(probers).expect("the proxy reads it");
    assert!(
        probers.contains_key("/app-health/app/readyz"),
        "{probers:?}"
    );

    let (_, metrics) = get_text(monitoring, "/metrics").await.expect("metrics");
    for counted in [
        "sidecar_injection_success_total 2",
        "sidecar_injection_failure_total 1",
    ] {
        assert!(metrics.contains(counted), "{counted} in {metrics}");
    }
    cluster
        .delete(
            &format!("apiVersion: admissionregistration.k8s.io/v1\nkind: MutatingWebhookConfiguration\nmetadata: {{name: {name}}}\n"),
            "",
        )
        .await;
    trigger.drain().await;
    task.await
        .expect("joined")
        .expect("the injector drains cleanly");
}

/// `weftctl install` into the real API server: the charts' objects applied with server-side apply
/// under field manager weftctl, again without conflict, and a clear reason when the control plane
/// cannot come up (here: no scheduler, so its pod stays Pending). `uninstall` removes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn weftctl_install_applies_the_charts_and_uninstall_removes_them() {
    use weftctl::{
        install::{InstallArgs, Target, UninstallArgs},
        manifest::ValuesArgs,
    };
    let cluster = Cluster::connect().await;
    let namespace = format!("weft-install-{}", std::process::id());
    // A revision of its own, so its webhook selects no namespace other tests use.
    let revision = format!("t{}", std::process::id());
    let values = ValuesArgs {
        sets: vec!["profile=demo".into()],
        files: vec![],
        revision: Some(revision.clone()),
    };
    let kube = cluster.kube_args();
    let target = Target {
        values,
        kube,
        namespace: namespace.clone(),
    };
    let args = InstallArgs {
        target: target.clone(),
        dry_run: false,
        wait_timeout: Duration::from_secs(3),
    };
    let check = |pre| weftctl::check::CheckArgs {
        pre,
        namespace: namespace.clone(),
        kube: target.kube.clone(),
    };
    let before = weftctl::check::run(&check(true)).await;
    assert!(
        weftctl::check::passed(&before),
        "check --pre passes on a cluster an admin reaches:\n{}",
        weftctl::check::render(&before)
    );
    for attempt in ["first", "again"] {
        let err = weftctl::install::install(&args)
            .await
            .expect_err("no scheduler runs here, so weftd never becomes available");
        let message = format!("{err:#}");
        assert!(
            message.contains(&format!(
                "Deployment {namespace}/weftd-{revision} is not available"
            )) && message.contains("not scheduled"),
            "{attempt}: {message}"
        );
    }
    let deployment = cluster
        .get(
            "apps/v1",
            "Deployment",
            &namespace,
            &format!("weftd-{revision}"),
        )
        .await
        .expect("the Deployment");
    let appliers: Vec<String> = deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| f.operation.as_deref() == Some("Apply"))
        .filter_map(|f| f.manager.clone())
        .collect();
    assert_eq!(
        appliers,
        ["weftctl"],
        "applied by weftctl alone, the second time without conflict"
    );
    let mesh = cluster
        .get("v1", "ConfigMap", &namespace, &format!("istio-{revision}"))
        .await
        .expect("the mesh config");
    assert!(
        mesh.data["data"]["mesh"]
            .as_str()
            .is_some_and(|m| m.contains("accessLogFile: /dev/stdout")),
        "the demo profile: {:?}",
        mesh.data
    );
    let webhook = format!("istio-sidecar-injector-{revision}");
    assert!(
        cluster
            .get(
                "admissionregistration.k8s.io/v1",
                "MutatingWebhookConfiguration",
                "",
                &webhook
            )
            .await
            .is_some()
    );

    // check names what is wrong and why: the control plane's pod is not scheduled, so the injector
    // never wrote its caBundle and the API server has no one to call.
    let after = weftctl::check::run(&check(false)).await;
    let report = weftctl::check::render(&after);
    assert!(!weftctl::check::passed(&after), "{report}");
    for expected in [
        "✓ all 14 Istio CRDs are installed, established, and serve their versions",
        &format!("✗ Deployment {namespace}/weftd-{revision} is not available"),
        "not scheduled",
        &format!("✗ istio-sidecar-injector-{revision} has no caBundle yet"),
        &format!("✗ no root certificate in ConfigMap {namespace}/istio-ca-root-cert"),
        "✗ no weftd is running to ask about proxies",
    ] {
        assert!(report.contains(expected), "{expected:?} in:\n{report}");
    }

    let purge_target = target.clone();
    weftctl::install::uninstall(&UninstallArgs {
        target,
        purge: false,
    })
    .await
    .expect("uninstall");
    for (api_version, kind, ns, name) in [
        (
            "apps/v1",
            "Deployment",
            namespace.as_str(),
            format!("weftd-{revision}"),
        ),
        (
            "v1",
            "Service",
            namespace.as_str(),
            format!("istiod-{revision}"),
        ),
        (
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            "",
            format!("weftd-{revision}"),
        ),
        (
            "admissionregistration.k8s.io/v1",
            "MutatingWebhookConfiguration",
            "",
            webhook.clone(),
        ),
    ] {
        wait_for(&format!("{kind} {name} to be deleted"), WAIT, || async {
            cluster
                .get(api_version, kind, ns, &name)
                .await
                .is_none()
                .then_some(())
        })
        .await;
    }
    assert!(
        cluster
            .get(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                "",
                "virtualservices.networking.istio.io"
            )
            .await
            .is_some(),
        "the CRDs stay without --purge"
    );
    // --purge takes the CRDs too, and returns once they are gone (the next test's connect puts
    // them back).
    weftctl::install::uninstall(&UninstallArgs {
        target: purge_target,
        purge: true,
    })
    .await
    .expect("uninstall --purge");
    assert!(
        cluster
            .get(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                "",
                "virtualservices.networking.istio.io"
            )
            .await
            .is_none(),
        "--purge deletes the CRDs"
    );
}

/// A non-loopback address of this machine: the API server refuses to proxy to loopback pod IPs.
fn host_address() -> std::net::IpAddr {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("ip runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
        .expect("this machine has a global IPv4 address")
}

/// `weftctl proxy-status` and `version` find weftd's pods by label and read `/debug/syncz` through the
/// API server's pod proxy, so nothing but the API server needs to be reachable. The "pod" is a Pod
/// object whose IP is this machine's, where a real weftd serves. `proxy-config` needs a port-forward,
/// which goes through a kubelet; without one it says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn weftctl_reads_weftd_through_the_api_servers_pod_proxy() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Patch, PatchParams, PostParams};
    let cluster = Cluster::connect().await;
    let namespace = cluster.namespace("weft-ops").await;
    let host = host_address();
    let dir = std::env::temp_dir().join(format!("weft-ops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("config dir");
    let weftd = weftd::app::build(weftd::app::Config {
        source: weftd::app::Source::Dir {
            config_dir: dir.clone(),
            poll_interval: Duration::from_millis(50),
        },
        xds_address: None,
        secure_address: "127.0.0.1:0".parse().expect("addr"),
        monitoring_address: SocketAddr::new(host, 0),
        mesh: Default::default(),
        ca_dir: None,
        identity_dir: None,
        lifetimes: Default::default(),
    })
    .await
    .expect("weftd builds");
    let port = weftd.monitoring_address().port();
    let (trigger, watcher) = weft_drain::new();
    let task = tokio::spawn(weftd.run(watcher));

    let pods: kube::Api<Pod> = kube::Api::namespaced(cluster.admin.clone(), &namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "weftd-0", "labels": {"app": "weftd", "istio": "pilot"}},
        "spec": {"automountServiceAccountToken": false, "containers": [{"name": "discovery", "image": "weft/weftd:test",
            "ports": [{"name": "http-monitoring", "containerPort": port}]}]}
    }))
    .expect("a pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");
    pods.patch_status(
        "weftd-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": host.to_string(), "podIPs": [{"ip": host.to_string()}]}})),
    )
    .await
    .expect("the pod runs, as a kubelet would report");

    let kube = cluster.kube_args();
    let source = weftctl::proxy_status::WeftdSource {
        kube: kube.clone(),
        istio_namespace: namespace.clone(),
        weftd: None,
    };
    let (replicas, unreachable) = source
        .reports()
        .await
        .expect("weftd answers through the API server");
    assert!(unreachable.is_empty(), "{unreachable:?}");
    let version = weftctl::proxy_status::render_version(&replicas);
    assert!(
        version.contains(&format!(
            "control plane version: {} (weftd-0)",
            env!("CARGO_PKG_VERSION")
        )),
        "{version}"
    );
    let table = weftctl::proxy_status::render(&replicas, &unreachable, None);
    assert!(table.contains("(no proxy is connected)"), "{table}");

    let elsewhere = weftctl::proxy_status::WeftdSource {
        istio_namespace: cluster.namespace("empty").await,
        ..source
    };
    let err = elsewhere.reports().await.expect_err("no weftd there");
    assert!(
        format!("{err:#}").contains("no weftd pod in namespace"),
        "{err:#}"
    );

    let err = weftctl::proxy_config::fetch(&weftctl::proxy_config::ProxyConfigArgs {
        section: weftctl::proxy_config::Section::Cluster,
        pod: Some(format!("weftd-0.{namespace}")),
        namespace: "default".into(),
        output: weftctl::proxy_config::Output::Short,
        admin: None,
        kube,
    })
    .await
    .expect_err("no kubelet serves port-forwards here");
    assert!(
        format!("{err:#}").contains("cannot port-forward to"),
        "{err:#}"
    );

    trigger.drain().await;
    task.await.expect("joined").expect("weftd drains cleanly");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `weftctl analyze` on the cluster: what the API server holds, read as weftd reads it, reported for
/// one namespace (mesh-wide policies included) with Istio's codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: cargo xtask test starts one"]
async fn weftctl_analyze_reads_the_cluster() {
    let cluster = Cluster::connect().await;
    let namespace = cluster.namespace("weft-analyze").await;
    cluster
        .apply(
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: {namespace}}}\nspec: {{selector: {{app: reviews}}, ports: [{{name: web, port: 9080}}]}}\n---\n\
                 apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: {namespace}}}\n\
                 spec: {{hosts: [reviews], http: [{{route: [{{destination: {{host: reviews, subset: v2}}}}]}}]}}\n"
            ),
            &namespace,
        )
        .await;
    let report = weftctl::analyze::run(&weftctl::analyze::AnalyzeArgs {
        files: vec![],
        all_namespaces: false,
        namespace: namespace.clone(),
        kube: cluster.kube_args(),
    })
    .await
    .expect("the cluster can be analyzed");
    let text = report.render();
    assert!(report.failed(), "{text}");
    assert!(
        text.contains(&format!(
            "Error [IST0101] (VirtualService {namespace}/reviews) Referenced host+subset in destinationrule not found: \"reviews.{namespace}.svc.cluster.local+v2\""
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "Info [IST0118] (Service {namespace}/reviews) Port name web"
        )),
        "{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.contains("(Service default/kubernetes)")),
        "other namespaces are left out: {text}"
    );
}

mod harness;
