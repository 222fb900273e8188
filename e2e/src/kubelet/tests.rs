use super::*;

fn placement() -> Placement {
    Placement {
        pod_ip: "10.98.0.7".into(),
        host_ip: "10.98.0.1".into(),
        node_name: "weft-e2e".into(),
    }
}

fn images() -> Images {
    Images::default()
        .with("weft-proxy", "/opt/weft/weft-proxy")
        .with("examples-bookinfo-productpage-v1", "/opt/weft/bookinfo")
}

/// Istio's productpage pod as the API server holds it after weft-injector: the plan runs the init
/// step, the app and the sidecar, each as the pod says.
#[test]
fn an_injected_bookinfo_pod_runs_as_its_spec_says() {
    let mut pod: Pod = serde_saphyr::from_str(include_str!(
        "../../../crates/inject/testdata/productpage-pod.yaml"
    ))
    .expect("the sample pod");
    pod.metadata.name = Some("productpage-v1-abc".into());
    pod.metadata.namespace = Some("bookinfo".into());
    let injected = weft_inject::mutate(&pod, "bookinfo", None, &Default::default())
        .expect("injected")
        .pod;
    let plan = plan(&injected, &images(), &placement()).expect("a plan");
    let names: Vec<(&str, bool)> = plan
        .processes
        .iter()
        .map(|p| (p.container.as_str(), p.init))
        .collect();
    assert_eq!(
        names,
        [
            ("istio-init", true),
            ("istio-proxy", false),
            ("productpage", false)
        ]
    );
    let init = &plan.processes[0];
    assert_eq!(init.program, Path::new("/opt/weft/weft-proxy"));
    assert_eq!(init.args[0], "iptables");
    assert_eq!(init.user, Some((0, 0)));

    let proxy = &plan.processes[1];
    let env: BTreeMap<&str, &str> = proxy
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(env["POD_NAME"], "productpage-v1-abc");
    assert_eq!(env["POD_NAMESPACE"], "bookinfo");
    assert_eq!(env["INSTANCE_IP"], "10.98.0.7");
    assert_eq!(env["HOST_IP"], "10.98.0.1");
    assert_eq!(env["SERVICE_ACCOUNT"], "bookinfo-productpage");
    assert_eq!(env["ISTIO_META_NODE_NAME"], "weft-e2e");
    assert_eq!(proxy.user, Some((1337, 1337)));
    assert_eq!(
        proxy.post_start.as_deref(),
        Some(&["weft-proxy".to_string(), "wait".to_string()][..])
    );
    let mounted: Vec<(&str, &str)> = proxy
        .mounts
        .iter()
        .map(|m| (m.volume.as_str(), m.path.as_str()))
        .collect();
    assert!(
        mounted.contains(&("istio-token", "/var/run/secrets/tokens")),
        "{mounted:?}"
    );
    assert!(
        mounted.contains(&("istiod-ca-cert", "/var/run/secrets/istio")),
        "{mounted:?}"
    );
    assert!(
        mounted.contains(&(
            "kube-api-access",
            "/var/run/secrets/kubernetes.io/serviceaccount"
        )),
        "{mounted:?}"
    );
    assert_eq!(
        plan.volumes["istio-token"],
        VolumeSource::Token {
            path: "istio-token".into(),
            audience: "istio-ca".into()
        }
    );
    assert_eq!(
        plan.volumes["istiod-ca-cert"],
        VolumeSource::ConfigMap {
            name: "istio-ca-root-cert".into(),
            items: vec![]
        }
    );
    assert_eq!(plan.volumes["tmp"], VolumeSource::EmptyDir);
    assert_eq!(plan.processes[2].program, Path::new("/opt/weft/bookinfo"));
    assert_eq!(
        proxy.readiness,
        Some(Readiness::Http {
            port: 15021,
            path: "/healthz/ready".into()
        })
    );
}

#[test]
fn what_the_harness_cannot_run_is_refused_with_the_reason() {
    let pod = |spec: serde_json::Value| -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec}))
            .expect("a pod")
    };
    let cases = [
        (
            serde_json::json!({"containers": [{"name": "db", "image": "postgres:16"}]}),
            "container db: no local program for image postgres:16",
        ),
        (
            serde_json::json!({"containers": [{"name": "x", "image": "weft/weft-proxy", "command": ["sh", "-c", "true"]}]}),
            "container x: command [\"sh\", \"-c\", \"true\"] is not its image's program",
        ),
        (
            serde_json::json!({"containers": [{"name": "x", "image": "weft/weft-proxy", "volumeMounts": [{"name": "gone", "mountPath": "/x"}]}]}),
            "volume gone: mounted by x but not in the pod",
        ),
        (
            serde_json::json!({"containers": [{"name": "x", "image": "weft/weft-proxy", "env": [{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}}]}]}),
            "container x: env N: fieldRef spec.hostname is not one the kubelet serves",
        ),
    ];
    for (spec, expected) in cases {
        let err = plan(&pod(spec), &images(), &placement()).expect_err(expected);
        assert_eq!(err.to_string(), expected);
    }
}

#[test]
fn commands_args_and_env_expand_as_the_kubelet_expands_them() {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p", "namespace": "n", "labels": {"app": "web"}},
        "spec": {"automountServiceAccountToken": false, "securityContext": {"runAsUser": 1000}, "containers": [{
            "name": "c", "image": "registry.example/weft/weft-proxy:1.0@sha256:00",
            "command": ["/usr/local/bin/weft-proxy", "--xds-address=$(XDS)"],
            "args": ["$(APP)-$$(APP)-$(MISSING)"],
            "env": [
                {"name": "XDS", "value": "http://$(HOST):15010"},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}
            ],
            "resources": {"requests": {"cpu": "100m"}}
        }]}
    }))
    .expect("a pod");
    let plan = plan(&pod, &images(), &placement()).expect("a plan");
    let p = &plan.processes[0];
    assert_eq!(
        p.args,
        [
            "--xds-address=http://$(HOST):15010",
            "web-$(APP)-$(MISSING)"
        ]
    );
    assert_eq!(p.env[2], ("CPU".to_string(), "100m".to_string()));
    assert_eq!(p.user, Some((1000, 1000)));
    assert!(
        p.mounts.is_empty(),
        "no service account token when the pod opts out"
    );
    assert!(plan.volumes.is_empty());
}

/// An image's CMD runs where the container names no args; a tools image's container runs the host's
/// program its command names, as `kubectl exec deploy/curl -- curl ...` expects of Istio's curl sample.
#[test]
fn image_entrypoints_and_tool_images_run_what_a_container_runtime_would() {
    let images = Images::default()
        .with_cmd(
            "examples-bookinfo-reviews-v2",
            "/opt/weft/weftctl",
            &["sample-app", "bookinfo", "reviews-v2"],
        )
        .with_host_tools("curl");
    let pod = |containers: serde_json::Value| -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"automountServiceAccountToken": false, "containers": containers}
        }))
        .expect("a pod")
    };
    let run = |containers| {
        plan(&pod(containers), &images, &placement())
            .map(|p| (p.processes[0].program.clone(), p.processes[0].args.clone()))
    };
    let image = "docker.io/istio/examples-bookinfo-reviews-v2:1.20.1";
    assert_eq!(
        run(serde_json::json!([{"name": "reviews", "image": image}])),
        Ok((
            "/opt/weft/weftctl".into(),
            vec!["sample-app".into(), "bookinfo".into(), "reviews-v2".into()]
        ))
    );
    assert_eq!(
        run(serde_json::json!([{"name": "reviews", "image": image, "args": ["--other"]}])),
        Ok(("/opt/weft/weftctl".into(), vec!["--other".into()]))
    );
    let sleep = host_program("sleep").expect("the host has sleep");
    assert_eq!(
        run(
            serde_json::json!([{"name": "curl", "image": "curlimages/curl", "command": ["/bin/sleep", "infinity"]}])
        ),
        Ok((sleep, vec!["infinity".into()]))
    );
    assert_eq!(
        run(serde_json::json!([{"name": "curl", "image": "curlimages/curl"}])),
        Err(PlanError::Image {
            container: "curl".into(),
            image: "curlimages/curl".into()
        })
    );
}
