//! Reading manifests: a directory of YAML files, each holding one or more `---`-separated documents.

use std::{path::Path, time::Duration};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    Object,
    istio::{
        AuthorizationPolicySpec, DestinationRuleSpec, HttpRoute, PeerAuthenticationSpec,
        ServiceEntrySpec, SidecarSpec, StringMatch, VirtualServiceSpec, WorkloadEntrySpec,
    },
    k8s::{EndpointSlice, Pod, ServiceSpec},
};

/// Every resource read from one source, by kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub services: Vec<Object<ServiceSpec>>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    pub service_entries: Vec<Object<ServiceEntrySpec>>,
    pub workload_entries: Vec<Object<WorkloadEntrySpec>>,
    pub virtual_services: Vec<Object<VirtualServiceSpec>>,
    pub destination_rules: Vec<Object<DestinationRuleSpec>>,
    pub sidecars: Vec<Object<SidecarSpec>>,
    pub peer_authentications: Vec<Object<PeerAuthenticationSpec>>,
    pub authorization_policies: Vec<Object<AuthorizationPolicySpec>>,
}

/// A resource that was skipped, and why: enough for an operator to find and fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub file: String,
    pub kind: String,
    pub name: String,
    pub reason: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} {}: {}",
            self.file, self.kind, self.name, self.reason
        )
    }
}

/// Reads every `*.yaml`/`*.yml` file under `dir` (recursively, in name order so results are stable).
/// Unreadable files and invalid resources are returned as rejections; the rest is still loaded.
pub fn load_dir(dir: &Path) -> (Resources, Vec<Rejected>) {
    let mut resources = Resources::default();
    let mut rejected = Vec::new();
    let mut files = Vec::new();
    collect_yaml_files(dir, &mut files, &mut rejected);
    files.sort();
    for file in files {
        let name = file.display().to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => parse_manifests(&name, &text, &mut resources, &mut rejected),
            Err(e) => rejected.push(Rejected {
                file: name,
                kind: "-".into(),
                name: "-".into(),
                reason: format!("cannot read file: {e}"),
            }),
        }
    }
    (resources, rejected)
}

fn collect_yaml_files(
    dir: &Path,
    files: &mut Vec<std::path::PathBuf>,
    rejected: &mut Vec<Rejected>,
) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            rejected.push(Rejected {
                file: dir.display().to_string(),
                kind: "-".into(),
                name: "-".into(),
                reason: format!("cannot read directory: {e}"),
            });
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_yaml_files(&path, files, rejected);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            files.push(path);
        }
    }
}

/// Parses the documents of one file into `resources`. `file` only labels rejections.
pub fn parse_manifests(
    file: &str,
    text: &str,
    resources: &mut Resources,
    rejected: &mut Vec<Rejected>,
) {
    let docs: Vec<Value> = match serde_saphyr::from_multiple(text) {
        Ok(docs) => docs,
        Err(e) => {
            rejected.push(Rejected {
                file: file.into(),
                kind: "-".into(),
                name: "-".into(),
                reason: format!("invalid YAML: {e}"),
            });
            return;
        }
    };
    for doc in docs {
        if doc.is_null() {
            continue;
        }
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_string();
        let api_version = doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_string();
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        if let Err(reason) = add_document(group, &kind, doc, resources) {
            rejected.push(Rejected {
                file: file.into(),
                kind,
                name,
                reason,
            });
        }
    }
}

fn add_document(group: &str, kind: &str, doc: Value, r: &mut Resources) -> Result<(), String> {
    match (group, kind) {
        ("", "Service") => r.services.push(typed(doc)?),
        ("discovery.k8s.io", "EndpointSlice") => r.endpoint_slices.push(typed(doc)?),
        ("", "Pod") => r.pods.push(typed(doc)?),
        ("", "Namespace") => {}
        ("networking.istio.io", "ServiceEntry") => r.service_entries.push(typed(doc)?),
        ("networking.istio.io", "WorkloadEntry") => r.workload_entries.push(typed(doc)?),
        ("networking.istio.io", "VirtualService") => {
            let vs: Object<VirtualServiceSpec> = typed(doc)?;
            validate_virtual_service(&vs.spec)?;
            r.virtual_services.push(vs);
        }
        ("networking.istio.io", "DestinationRule") => {
            let dr: Object<DestinationRuleSpec> = typed(doc)?;
            validate_destination_rule(&dr.spec)?;
            r.destination_rules.push(dr);
        }
        ("networking.istio.io", "Sidecar") => r.sidecars.push(typed(doc)?),
        ("security.istio.io", "PeerAuthentication") => {
            let pa: Object<PeerAuthenticationSpec> = typed(doc)?;
            validate_peer_authentication(&pa.spec)?;
            r.peer_authentications.push(pa);
        }
        ("security.istio.io", "AuthorizationPolicy") => {
            let ap: Object<AuthorizationPolicySpec> = typed(doc)?;
            match ap.spec.action.as_deref() {
                None | Some("ALLOW" | "DENY" | "AUDIT") => {}
                Some("CUSTOM") => {
                    return Err(
                        "spec.action: CUSTOM (external authorization) is not supported".into(),
                    );
                }
                Some(other) => return Err(format!("spec.action: unknown action {other}")),
            }
            for (i, rule) in ap.spec.rules.iter().enumerate() {
                for (j, c) in rule.when.iter().enumerate() {
                    if !supported_condition(&c.key) {
                        return Err(format!(
                            "spec.rules[{i}].when[{j}].key: {} is not supported (supported: request.headers[<name>], source.ip, remote.ip, source.namespace, source.principal, destination.port); a policy Weft cannot enforce exactly is refused rather than half applied",
                            c.key
                        ));
                    }
                }
            }
            r.authorization_policies.push(ap);
        }
        _ => return Err(format!("unsupported kind {kind} in API group {group:?}")),
    }
    Ok(())
}

/// The `when` keys Weft enforces. JWT claims (`request.auth.*`) need RequestAuthentication, and SNI
/// or destination IP conditions are not translated yet.
fn supported_condition(key: &str) -> bool {
    let header = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
        .is_some_and(|name| !name.is_empty());
    header
        || matches!(
            key,
            "source.ip"
                | "remote.ip"
                | "source.namespace"
                | "source.principal"
                | "destination.port"
        )
}

fn typed<T: DeserializeOwned>(doc: Value) -> Result<T, String> {
    serde_json::from_value(doc).map_err(|e| e.to_string())
}

fn validate_peer_authentication(spec: &PeerAuthenticationSpec) -> Result<(), String> {
    let modes = spec
        .mtls
        .iter()
        .map(|m| ("mtls.mode".to_string(), m))
        .chain(
            spec.port_level_mtls
                .iter()
                .map(|(port, m)| (format!("portLevelMtls[{port}].mode"), m)),
        );
    for (field, m) in modes {
        if let Some(mode) = m.mode.as_deref()
            && !matches!(mode, "UNSET" | "DISABLE" | "PERMISSIVE" | "STRICT")
        {
            return Err(format!("spec.{field}: unknown mode {mode}"));
        }
    }
    for port in spec.port_level_mtls.keys() {
        port.parse::<u16>()
            .map_err(|_| format!("spec.portLevelMtls: {port:?} is not a port number"))?;
    }
    if !spec.port_level_mtls.is_empty() && spec.selector.is_none() {
        return Err("spec.portLevelMtls needs a selector, as in Istio".into());
    }
    Ok(())
}

fn validate_virtual_service(spec: &VirtualServiceSpec) -> Result<(), String> {
    if spec.hosts.is_empty() {
        return Err("spec.hosts: at least one host is required".into());
    }
    if !spec.gateways.is_empty() && !spec.gateways.iter().all(|g| g == "mesh") {
        return Err("spec.gateways: only the `mesh` gateway is supported".into());
    }
    for (i, route) in spec.http.iter().enumerate() {
        validate_http_route(route).map_err(|e| format!("spec.http[{i}]: {e}"))?;
    }
    Ok(())
}

fn validate_http_route(route: &HttpRoute) -> Result<(), String> {
    let actions = usize::from(!route.route.is_empty())
        + usize::from(route.redirect.is_some())
        + usize::from(route.direct_response.is_some());
    if actions != 1 {
        return Err("exactly one of route, redirect or directResponse is required".into());
    }
    for (j, m) in route.matches.iter().enumerate() {
        let all = m.uri.iter().chain(&m.method).chain(&m.authority);
        let all = all.chain(m.headers.values()).chain(m.query_params.values());
        for sm in all.chain(m.without_headers.values()) {
            validate_string_match(sm).map_err(|e| format!("match[{j}]: {e}"))?;
        }
    }
    if let Some(t) = &route.timeout {
        parse_duration(t).map_err(|e| format!("timeout: {e}"))?;
    }
    if let Some(r) = &route.retries {
        for d in r.per_try_timeout.iter().chain(&r.backoff) {
            parse_duration(d).map_err(|e| format!("retries: {e}"))?;
        }
    }
    Ok(())
}

fn validate_string_match(sm: &StringMatch) -> Result<(), String> {
    let set = [&sm.exact, &sm.prefix, &sm.regex]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if set > 1 {
        return Err("a string match takes only one of exact, prefix or regex".into());
    }
    Ok(())
}

fn validate_destination_rule(spec: &DestinationRuleSpec) -> Result<(), String> {
    let policies = spec.traffic_policy.iter().chain(
        spec.subsets
            .iter()
            .filter_map(|s| s.traffic_policy.as_ref()),
    );
    for p in policies {
        if let Some(simple) = p.load_balancer.as_ref().and_then(|lb| lb.simple.as_deref())
            && !matches!(
                simple,
                "UNSPECIFIED" | "ROUND_ROBIN" | "LEAST_REQUEST" | "LEAST_CONN" | "RANDOM"
            )
        {
            return Err(format!(
                "trafficPolicy.loadBalancer.simple: {simple} is not supported"
            ));
        }
        if let Some(mode) = p.tls.as_ref().and_then(|t| t.mode.as_deref())
            && !matches!(mode, "DISABLE" | "ISTIO_MUTUAL")
        {
            return Err(format!(
                "trafficPolicy.tls.mode: {mode} is not supported (DISABLE and ISTIO_MUTUAL are; SIMPLE and MUTUAL need client certificates Weft does not mount yet)"
            ));
        }
        if let Some(t) = p
            .connection_pool
            .as_ref()
            .and_then(|c| c.tcp.as_ref())
            .and_then(|t| t.connect_timeout.as_ref())
        {
            parse_duration(t)
                .map_err(|e| format!("trafficPolicy.connectionPool.tcp.connectTimeout: {e}"))?;
        }
    }
    Ok(())
}

/// Parses Istio's duration strings: a decimal number followed by `h`, `m`, `s`, `ms`, `us` or `ns`,
/// possibly several in a row (`1m30s`), as Go's `time.ParseDuration` does.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("invalid duration {text:?}"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(format!("invalid duration {text:?}: unknown unit {unit:?}")),
        };
        total += value * scale;
        rest = tail;
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        for (text, want) in [
            ("1s", Duration::from_secs(1)),
            ("1.5s", Duration::from_millis(1500)),
            ("200ms", Duration::from_millis(200)),
            ("1m30s", Duration::from_secs(90)),
            ("2h", Duration::from_secs(7200)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "s", "10", "1d", "x1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loads_istio_and_kubernetes_kinds_and_rejects_bad_ones_with_reasons() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: both, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    directResponse: {status: 503}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: example.com/v1
kind: Widget
metadata: {name: w}
"#;
        let mut resources = Resources::default();
        let mut rejected = Vec::new();
        parse_manifests("mesh.yaml", text, &mut resources, &mut rejected);
        assert_eq!(resources.services.len(), 1);
        assert_eq!(resources.services[0].metadata.namespace(), "bookinfo");
        assert_eq!(resources.destination_rules.len(), 1);
        assert!(resources.virtual_services.is_empty());
        let summary: Vec<String> = rejected
            .iter()
            .map(|r| format!("{} {}", r.kind, r.name))
            .collect();
        assert_eq!(
            summary,
            ["VirtualService reviews", "VirtualService both", "Widget w"]
        );
        assert!(
            rejected[0].reason.contains("mirror"),
            "{}",
            rejected[0].reason
        );
        assert!(
            rejected[1].reason.contains("exactly one of"),
            "{}",
            rejected[1].reason
        );
        assert_eq!(rejected[0].file, "mesh.yaml");
    }

    #[test]
    fn loads_security_resources_and_refuses_what_weft_cannot_enforce() {
        let text = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: demo}
spec:
  selector: {matchLabels: {app: db}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ports, namespace: demo}
spec:
  selector: {labels: {app: web}}
  portLevelMtls: {"8080": {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: odd, namespace: demo}
spec: {mtls: {mode: SOMETIMES}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: demo}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/frontend"]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
    when: [{key: "request.headers[x-user]", values: ["*"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: demo}
spec: {action: CUSTOM, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: claims, namespace: demo}
spec:
  rules: [{when: [{key: "request.auth.claims[iss]", values: ["x"]}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt, namespace: demo}
spec:
  rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
"#;
        let mut resources = Resources::default();
        let mut rejected = Vec::new();
        parse_manifests("security.yaml", text, &mut resources, &mut rejected);
        assert_eq!(resources.peer_authentications.len(), 3);
        assert_eq!(
            resources.peer_authentications[1]
                .spec
                .selector
                .as_ref()
                .map(|s| s.labels["app"].as_str()),
            Some("db"),
            "security policies select with matchLabels"
        );
        assert_eq!(
            resources.peer_authentications[2].spec.port_level_mtls["8080"]
                .mode
                .as_deref(),
            Some("DISABLE")
        );
        assert_eq!(resources.authorization_policies.len(), 1);
        assert_eq!(
            resources.authorization_policies[0].spec.rules[0].to[0]
                .operation
                .paths,
            ["/api/*"]
        );
        let names: Vec<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        // requestPrincipals needs JWT support.
        assert_eq!(names, ["odd", "ext", "claims", "jwt"], "{rejected:#?}");
        assert!(
            rejected[1].reason.contains("CUSTOM"),
            "{}",
            rejected[1].reason
        );
        assert!(
            rejected[2].reason.contains("request.auth.claims[iss]"),
            "{}",
            rejected[2].reason
        );
        assert!(
            rejected[3].reason.contains("requestPrincipals"),
            "{}",
            rejected[3].reason
        );
    }
}
