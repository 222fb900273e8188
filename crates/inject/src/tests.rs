use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::*;

/// Istio's samples, as the pods their Deployments make (bookinfo's productpage, httpbin, sleep).
const PRODUCTPAGE: &str = include_str!("../testdata/productpage-pod.yaml");

const HTTPBIN: &str = include_str!("../testdata/httpbin-pod.yaml");

const SLEEP: &str = include_str!("../testdata/sleep-pod.yaml");

fn pod(yaml: &str) -> Pod {
    serde_saphyr::from_str(yaml).expect("a pod")
}

fn enabled() -> BTreeMap<String, String> {
    BTreeMap::from([("istio-injection".to_string(), "enabled".to_string())])
}

fn env(c: &k8s_openapi::api::core::v1::Container) -> BTreeMap<String, Value> {
    c.env
        .iter()
        .flatten()
        .map(|e| {
            let v = match (&e.value, &e.value_from) {
                (Some(v), _) => json!(v),
                (None, Some(from)) => serde_json::to_value(from).expect("json"),
                (None, None) => Value::Null,
            };
            (e.name.clone(), v)
        })
        .collect()
}

#[test]
fn istios_samples_get_istios_sidecar_field_by_field() {
    let config = InjectConfig::default();
    let original = pod(PRODUCTPAGE);
    let injected = mutate(&original, "bookinfo", Some(&enabled()), &config).expect("injected");
    let p = &injected.pod;
    let spec = p.spec.as_ref().expect("spec");

    // The app is left as it was, after the proxy.
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["istio-proxy", "productpage"]);
    assert_eq!(
        spec.containers[1],
        original.spec.as_ref().expect("spec").containers[0]
    );

    let init = &spec.init_containers.as_ref().expect("init")[0];
    assert_eq!(init.name, "istio-init");
    let args = init.args.clone().unwrap_or_default();
    assert_eq!(args[0], "iptables");
    assert!(args.contains(&"--proxy-uid=1337".to_string()), "{args:?}");
    assert!(args.contains(&"--local-exclude-ports=15090,15021,15020".to_string()));
    let caps = init
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone());
    assert_eq!(
        caps,
        Some(vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()])
    );

    let proxy = &spec.containers[0];
    assert_eq!(proxy.image.as_deref(), Some(config.proxy_image.as_str()));
    let sc = proxy.security_context.as_ref().expect("security context");
    assert_eq!((sc.run_as_user, sc.run_as_group), (Some(1337), Some(1337)));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let env = env(proxy);
    assert_eq!(
        env["POD_NAME"],
        json!({"fieldRef": {"fieldPath": "metadata.name"}})
    );
    assert_eq!(
        env["INSTANCE_IP"],
        json!({"fieldRef": {"fieldPath": "status.podIP"}})
    );
    assert_eq!(
        env["SERVICE_ACCOUNT"],
        json!({"fieldRef": {"fieldPath": "spec.serviceAccountName"}})
    );
    assert_eq!(env["CA_ADDR"], "istiod.istio-system.svc:15012");
    assert_eq!(env["ISTIO_META_WORKLOAD_NAME"], "productpage-v1");
    assert_eq!(
        env["ISTIO_META_OWNER"],
        "kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/productpage-v1"
    );
    assert_eq!(env["ISTIO_META_APP_CONTAINERS"], "productpage");
    let labels: BTreeMap<String, String> =
        serde_json::from_str(env["ISTIO_METAJSON_LABELS"].as_str().expect("text")).expect("json");
    assert_eq!(labels["app"], "productpage");
    assert_eq!(labels["security.istio.io/tlsMode"], "istio");
    let mounts: Vec<&str> = proxy
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(
        mounts.contains(&"/var/run/secrets/tokens") && mounts.contains(&"/var/run/secrets/istio")
    );

    let volumes = serde_json::to_value(spec.volumes.as_ref().expect("volumes")).expect("json");
    assert_eq!(volumes[0]["name"], "tmp", "the app's volumes stay first");
    let token = volumes
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "istio-token"))
        .expect("the token volume");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "istio-ca"
    );
    let root = volumes
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "istiod-ca-cert"))
        .expect("the root volume");
    assert_eq!(root["configMap"]["name"], "istio-ca-root-cert");

    let meta_labels = p.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        meta_labels["service.istio.io/canonical-name"],
        "productpage"
    );
    assert_eq!(meta_labels["service.istio.io/canonical-revision"], "v1");
    let annotations = p.metadata.annotations.as_ref().expect("annotations");
    let status: Value =
        serde_json::from_str(&annotations["sidecar.istio.io/status"]).expect("status json");
    assert_eq!(status["containers"], json!(["istio-proxy"]));
    assert_eq!(status["revision"], "default");
    assert_eq!(annotations["prometheus.io/port"], "15020");
    assert_eq!(annotations["prometheus.io/path"], "/stats/prometheus");
    assert!(!env.contains_key("ISTIO_PROMETHEUS_ANNOTATIONS"));
    assert!(
        !env.contains_key("ISTIO_KUBE_APP_PROBERS"),
        "no probes to rewrite"
    );

    // The patch is what the webhook answers: applied to the pod as it came, it makes the injected one.
    let mut patched = serde_json::to_value(&original).expect("json");
    json_patch::patch(&mut patched, &injected.patch).expect("the patch applies");
    assert_eq!(patched, serde_json::to_value(p).expect("json"));

    // Idempotent: an injected pod is left alone.
    let again = mutate(p, "bookinfo", Some(&enabled()), &config);
    assert!(
        matches!(again, Err(MutateError::Skipped(Skip::AlreadyInjected))),
        "{again:?}"
    );
}

#[test]
fn annotations_set_the_capture_rules_and_the_proxys_resources() {
    let injected = mutate(
        &pod(HTTPBIN),
        "demo",
        Some(&enabled()),
        &InjectConfig::default(),
    )
    .expect("injected")
    .pod;
    let spec = injected.spec.expect("spec");
    let init = &spec.init_containers.expect("init")[0];
    assert!(
        init.args
            .iter()
            .flatten()
            .any(|a| a == "--local-outbound-ports-exclude=3306"),
        "{:?}",
        init.args
    );
    let resources = serde_json::to_value(&spec.containers[0].resources).expect("json");
    assert_eq!(resources["requests"]["cpu"], "50m");
    assert_eq!(resources["requests"]["memory"], "128Mi");
    assert_eq!(resources["limits"]["memory"], "256Mi");
    assert_eq!(resources["limits"]["cpu"], "2000m");
}

#[test]
fn a_native_sidecar_runs_as_an_init_container_that_keeps_running() {
    let config = InjectConfig {
        native_sidecars: true,
        ..Default::default()
    };
    let injected = mutate(&pod(SLEEP), "demo", Some(&enabled()), &config)
        .expect("injected")
        .pod;
    let spec = injected.spec.expect("spec");
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["sleep"]);
    let init = spec.init_containers.expect("init");
    let init_names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(init_names, ["istio-init", "istio-proxy"]);
    assert_eq!(init[1].restart_policy.as_deref(), Some("Always"));
    assert_eq!(init[0].restart_policy, None);
    let proxy_env = env(&init[1]);
    assert_eq!(proxy_env["ISTIO_META_WORKLOAD_NAME"], "sleep");
    assert_eq!(
        proxy_env["ISTIO_META_OWNER"],
        "kubernetes://api/v1/namespaces/demo/pods/sleep"
    );
}

#[test]
fn skipped_pods_say_which_rule_skipped_them() {
    let config = InjectConfig::default();
    let unlabelled = BTreeMap::new();
    let err = mutate(&pod(SLEEP), "demo", Some(&unlabelled), &config).expect_err("not selected");
    assert!(err.to_string().contains("istio-injection=enabled"), "{err}");
    let mut host = pod(SLEEP);
    if let Some(spec) = host.spec.as_mut() {
        spec.host_network = Some(true);
    }
    let err = mutate(&host, "demo", Some(&enabled()), &config).expect_err("host network");
    assert!(err.to_string().contains("host's network"), "{err}");
}

fn with_annotations(mut pod: Pod, annotations: &[(&str, &str)]) -> Pod {
    let map = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    for (k, v) in annotations {
        map.insert(k.to_string(), v.to_string());
    }
    pod
}

#[test]
fn app_probes_and_metrics_go_through_the_status_port() {
    let mut original = with_annotations(
        pod(PRODUCTPAGE),
        &[
            ("prometheus.io/scrape", "true"),
            ("prometheus.io/port", "9080"),
        ],
    );
    if let Some(spec) = original.spec.as_mut() {
        spec.containers[0].readiness_probe = Some(
            serde_json::from_value(
                json!({"httpGet": {"path": "/health", "port": 9080}, "periodSeconds": 5}),
            )
            .expect("probe"),
        );
    }
    let config = InjectConfig::default();
    let injected = mutate(&original, "bookinfo", Some(&enabled()), &config)
        .expect("injected")
        .pod;
    let spec = injected.spec.as_ref().expect("spec");
    assert_eq!(
        serde_json::to_value(&spec.containers[1].readiness_probe).expect("json"),
        json!({"httpGet": {"path": "/app-health/productpage/readyz", "port": 15020, "scheme": "HTTP"}, "periodSeconds": 5})
    );
    let env = env(&spec.containers[0]);
    let probers =
        weft_sidecar::pod::parse_app_probes(env["ISTIO_KUBE_APP_PROBERS"].as_str().expect("text"))
            .expect("the proxy reads the probes");
    assert!(probers.contains_key("/app-health/productpage/readyz"));
    let scrape = weft_sidecar::pod::parse_app_metrics(
        env["ISTIO_PROMETHEUS_ANNOTATIONS"].as_str().expect("text"),
    )
    .expect("the proxy reads the app's scrape annotations");
    assert_eq!(scrape.map(|m| m.port), Some(9080));
    let annotations = injected.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(annotations["prometheus.io/port"], "15020");

    // The pod's opt-outs: probes and scrape annotations stay the app's own.
    let opted_out = with_annotations(
        original.clone(),
        &[
            ("sidecar.istio.io/rewriteAppHTTPProbers", "false"),
            ("prometheus.istio.io/merge-metrics", "false"),
        ],
    );
    let injected = mutate(&opted_out, "bookinfo", Some(&enabled()), &config)
        .expect("injected")
        .pod;
    let spec = injected.spec.as_ref().expect("spec");
    assert_eq!(
        spec.containers[1].readiness_probe,
        original.spec.as_ref().expect("spec").containers[0].readiness_probe
    );
    assert!(!env_has(&spec.containers[0], "ISTIO_KUBE_APP_PROBERS"));
    let annotations = injected.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(annotations["prometheus.io/port"], "9080");
}

fn env_has(c: &k8s_openapi::api::core::v1::Container, name: &str) -> bool {
    c.env.iter().flatten().any(|e| e.name == name)
}

#[test]
fn the_app_waits_for_its_proxy_unless_the_pod_says_not_to() {
    let config = InjectConfig::default();
    let post_start = |pod: &Pod, config: &InjectConfig| {
        let injected = mutate(pod, "demo", Some(&enabled()), config)
            .expect("injected")
            .pod;
        let spec = injected.spec.expect("spec");
        let proxy = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == "istio-proxy")
            .cloned()
            .expect("the proxy");
        serde_json::to_value(proxy.lifecycle).expect("json")
    };
    assert_eq!(
        post_start(&pod(SLEEP), &config),
        json!({"postStart": {"exec": {"command": ["weft-proxy", "wait"]}}})
    );
    let opted_out = with_annotations(
        pod(SLEEP),
        &[(
            "proxy.istio.io/config",
            "holdApplicationUntilProxyStarts: false\n",
        )],
    );
    assert_eq!(post_start(&opted_out, &config), Value::Null);
    // A native sidecar is started before the app by the kubelet itself.
    let native = InjectConfig {
        native_sidecars: true,
        ..Default::default()
    };
    assert_eq!(post_start(&pod(SLEEP), &native), Value::Null);
    let off = InjectConfig {
        hold_application_until_proxy_starts: false,
        ..Default::default()
    };
    let opted_in = with_annotations(
        pod(SLEEP),
        &[(
            "proxy.istio.io/config",
            "{holdApplicationUntilProxyStarts: true}",
        )],
    );
    assert_ne!(post_start(&opted_in, &off), Value::Null);
}

#[test]
fn annotations_it_cannot_act_on_refuse_the_pod_with_the_reason() {
    let config = InjectConfig::default();
    for (annotation, value, reason) in [
        ("sidecar.istio.io/proxyCPU", "lots", "quantity"),
        ("sidecar.istio.io/proxyMemoryLimit", "1.2.3Gi", "quantity"),
        (
            "traffic.sidecar.istio.io/excludeInboundPorts",
            "http",
            "not a list",
        ),
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0/99",
            "not a list",
        ),
        (
            "sidecar.istio.io/rewriteAppHTTPProbers",
            "yes",
            "\"true\" or \"false\"",
        ),
        (
            "proxy.istio.io/config",
            "holdApplicationUntilProxyStarts: [",
            "not YAML",
        ),
        (
            "proxy.istio.io/config",
            "holdApplicationUntilProxyStarts: sometimes",
            "true or false",
        ),
    ] {
        let err = mutate(
            &with_annotations(pod(SLEEP), &[(annotation, value)]),
            "demo",
            Some(&enabled()),
            &config,
        )
        .expect_err(annotation);
        let text = err.to_string();
        assert!(text.contains(reason), "{annotation}={value}: {text}");
    }
    for fine in ["100m", "2", "0.5", "128Mi", "1e3", "1Gi"] {
        let pod = with_annotations(pod(SLEEP), &[("sidecar.istio.io/proxyCPU", fine)]);
        assert!(
            mutate(&pod, "demo", Some(&enabled()), &config).is_ok(),
            "{fine}"
        );
    }
}
