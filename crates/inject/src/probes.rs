//! The app's probes rewritten to go through the proxy's status port, as Istio's
//! `rewriteAppHTTPProbers`. Under capture the kubelet's probe would reach the inbound listener: a
//! STRICT port refuses the kubelet's plain HTTP, and a TCP probe would be answered by the proxy
//! whether or not the app is up. So each HTTP and TCP probe becomes an HTTP probe of
//! `:15020/app-health/<container>/livez|readyz|startupz`, and the proxy, given the original in
//! `ISTIO_KUBE_APP_PROBERS`, sends it to the app from inside the pod. gRPC and exec probes are left as
//! they are: exec runs in the container, and gRPC probes go to the kubelet's own client.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Container, HTTPGetAction, PodSpec, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::{Value, json};
use weft_sidecar::pod::STATUS_PORT;

/// The pod's opt-out, Istio's annotation.
pub const REWRITE_ANNOTATION: &str = "sidecar.istio.io/rewriteAppHTTPProbers";

/// Rewrites the probes of the app's containers in `spec` and returns what the proxy must send for
/// each, keyed by its `/app-health/...` path. A probe whose named port no container port defines is
/// left alone (the kubelet would fail it the same way).
pub fn rewrite(spec: &mut PodSpec) -> BTreeMap<String, Value> {
    let mut probers = BTreeMap::new();
    for container in &mut spec.containers {
        let ports: BTreeMap<String, i32> = container
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
            .collect();
        let name = container.name.clone();
        let Container {
            readiness_probe,
            liveness_probe,
            startup_probe,
            ..
        } = container;
        for (kind, probe) in [
            ("readyz", readiness_probe),
            ("livez", liveness_probe),
            ("startupz", startup_probe),
        ] {
            let Some(probe) = probe else { continue };
            let path = format!("/app-health/{name}/{kind}");
            if let Some(original) = rewrite_one(probe, &path, &ports) {
                probers.insert(path, original);
            }
        }
    }
    probers
}

fn resolve(port: &IntOrString, ports: &BTreeMap<String, i32>) -> Option<i32> {
    match port {
        IntOrString::Int(p) => Some(*p),
        IntOrString::String(name) => ports.get(name).copied().or_else(|| name.parse().ok()),
    }
}

fn rewrite_one(probe: &mut Probe, path: &str, ports: &BTreeMap<String, i32>) -> Option<Value> {
    let mut original = if let Some(get) = &probe.http_get {
        let mut action = json!({
            "path": get.path.clone().unwrap_or_else(|| "/".into()),
            "port": resolve(&get.port, ports)?,
            "scheme": get.scheme.clone().unwrap_or_else(|| "HTTP".into()),
        });
        if let Some(host) = &get.host {
            action["host"] = host.clone().into();
        }
        if let Some(headers) = &get.http_headers {
            action["httpHeaders"] = serde_json::to_value(headers).ok()?;
        }
        json!({ "httpGet": action })
    } else if let Some(tcp) = &probe.tcp_socket {
        let mut action = json!({ "port": resolve(&tcp.port, ports)? });
        if let Some(host) = &tcp.host {
            action["host"] = host.clone().into();
        }
        json!({ "tcpSocket": action })
    } else {
        return None;
    };
    if let Some(timeout) = probe.timeout_seconds {
        original["timeoutSeconds"] = timeout.into();
    }
    probe.tcp_socket = None;
    probe.http_get = Some(HTTPGetAction {
        path: Some(path.to_string()),
        port: IntOrString::Int(i32::from(STATUS_PORT)),
        scheme: Some("HTTP".into()),
        ..Default::default()
    });
    Some(original)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(containers: Value) -> PodSpec {
        serde_json::from_value(json!({ "containers": containers })).expect("pod spec")
    }

    #[test]
    fn http_and_tcp_probes_go_through_the_status_port() {
        let mut spec = spec(json!([{
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTPS",
                "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 3, "periodSeconds": 7},
            "livenessProbe": {"tcpSocket": {"port": 8080}},
            "startupProbe": {"exec": {"command": ["true"]}},
        }, {
            "name": "grpc",
            "livenessProbe": {"grpc": {"port": 9000}},
            "readinessProbe": {"httpGet": {"path": "/", "port": "undefined-name"}},
        }]));
        let probers = rewrite(&mut spec);
        assert_eq!(
            serde_json::to_value(&probers).expect("json"),
            json!({
                "/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTPS",
                    "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 3},
                "/app-health/web/livez": {"tcpSocket": {"port": 8080}},
            })
        );
        let web = serde_json::to_value(&spec.containers[0]).expect("json");
        assert_eq!(
            web["readinessProbe"],
            json!({"httpGet": {"path": "/app-health/web/readyz", "port": 15020, "scheme": "HTTP"},
                   "timeoutSeconds": 3, "periodSeconds": 7})
        );
        assert_eq!(
            web["livenessProbe"],
            json!({"httpGet": {"path": "/app-health/web/livez", "port": 15020, "scheme": "HTTP"}})
        );
        assert_eq!(web["startupProbe"], json!({"exec": {"command": ["true"]}}));
        // gRPC and unresolvable probes stay the kubelet's.
        let grpc = serde_json::to_value(&spec.containers[1]).expect("json");
        assert_eq!(grpc["livenessProbe"], json!({"grpc": {"port": 9000}}));
        assert_eq!(
            grpc["readinessProbe"],
            json!({"httpGet": {"path": "/", "port": "undefined-name"}})
        );
    }

    #[test]
    fn what_the_injector_writes_the_proxy_reads() {
        let mut spec = spec(json!([{
            "name": "web",
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
            "livenessProbe": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 2},
        }]));
        let probers = serde_json::to_string(&rewrite(&mut spec)).expect("json");
        let read = weft_sidecar::pod::parse_app_probes(&probers).expect("the proxy reads it");
        assert_eq!(read.len(), 2);
    }
}
