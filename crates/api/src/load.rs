//! Reading manifests: a directory of YAML files, each holding one or more `---`-separated documents.

use std::{
    collections::HashSet,
    io::{self, Read},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    Object,
    istio::{
        AuthorizationAction, AuthorizationPolicySpec, ClientTlsMode, DestinationRuleSpec,
        HttpRoute, PeerAuthenticationSpec, Resolution, ServiceEntrySpec, SidecarSpec, SimpleLb,
        StringMatch, VirtualServiceSpec, WorkloadEntrySpec,
    },
    k8s::{EndpointSlice, Pod, ServiceSpec},
    names,
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

impl Resources {
    /// Adds everything `other` holds, kind by kind, in order.
    pub fn append(&mut self, other: Resources) {
        let Resources {
            services,
            endpoint_slices,
            pods,
            service_entries,
            workload_entries,
            virtual_services,
            destination_rules,
            sidecars,
            peer_authentications,
            authorization_policies,
        } = other;
        self.services.extend(services);
        self.endpoint_slices.extend(endpoint_slices);
        self.pods.extend(pods);
        self.service_entries.extend(service_entries);
        self.workload_entries.extend(workload_entries);
        self.virtual_services.extend(virtual_services);
        self.destination_rules.extend(destination_rules);
        self.sidecars.extend(sidecars);
        self.peer_authentications.extend(peer_authentications);
        self.authorization_policies.extend(authorization_policies);
    }
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

/// Why a config directory could not be read as a whole. The caller keeps serving the config it
/// loaded before: half a directory (or none, when descriptors ran out or the directory is being
/// swapped) must never be taken for the mesh's whole config.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    File { path: PathBuf, source: io::Error },
}

/// One manifest file found under a config directory, with what changes when it is edited.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ManifestFile {
    pub path: PathBuf,
    pub len: u64,
    pub modified: Option<SystemTime>,
}

/// Files larger than this are refused unread, so one file cannot take the loader's memory.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Lists every `*.yaml`/`*.yml` regular file under `dir`, recursively and in name order, following
/// symlinks (a ConfigMap mount is made of them) and reading each directory once, so symlink loops end.
/// Entries whose name starts with `.` are skipped: a ConfigMap mount's `..data` holds the same files
/// its top-level links point to. Anything that is not a regular file is skipped with a rejection, as a
/// FIFO would block the reader. An I/O error reading any directory is an error for the whole listing.
pub fn list_manifests(dir: &Path) -> Result<(Vec<ManifestFile>, Vec<Rejected>), LoadError> {
    let mut files = Vec::new();
    let mut rejected = Vec::new();
    let mut seen = HashSet::new();
    let meta = std::fs::metadata(dir).map_err(|source| LoadError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    seen.insert((meta.dev(), meta.ino()));
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| LoadError::Dir {
            path: d.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| LoadError::Dir {
                path: d.clone(),
                source,
            })?;
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let path = entry.path();
            let manifest = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            );
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                // A dangling symlink is the user's to fix; it takes nothing else down.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if manifest {
                        rejected.push(file_rejection(&path, format!("skipped: {e}")));
                    }
                    continue;
                }
                Err(source) => return Err(LoadError::File { path, source }),
            };
            if meta.is_dir() {
                if seen.insert((meta.dev(), meta.ino())) {
                    stack.push(path);
                } else {
                    rejected.push(file_rejection(
                        &path,
                        "skipped: this directory was already read (a symlink loop or a second link to it)".into(),
                    ));
                }
            } else if manifest && meta.is_file() {
                files.push(ManifestFile {
                    path,
                    len: meta.len(),
                    modified: meta.modified().ok(),
                });
            } else if manifest {
                rejected.push(file_rejection(&path, "skipped: not a regular file".into()));
            }
        }
    }
    files.sort();
    Ok((files, rejected))
}

fn file_rejection(path: &Path, reason: String) -> Rejected {
    Rejected {
        file: path.display().to_string(),
        kind: "-".into(),
        name: "-".into(),
        reason,
    }
}

/// Reads every manifest [`list_manifests`] finds. Invalid resources (and files that are not manifests)
/// are returned as rejections and the rest is still loaded; an I/O error is an error for the whole
/// directory.
pub fn load_dir(dir: &Path) -> Result<(Resources, Vec<Rejected>), LoadError> {
    let (files, mut rejected) = list_manifests(dir)?;
    let mut resources = Resources::default();
    for file in files {
        if let Some(text) = read_manifest(&file.path, &mut rejected)? {
            let name = file.path.display().to_string();
            parse_manifests(&name, &text, &mut resources, &mut rejected);
        }
    }
    Ok((resources, rejected))
}

/// Opens without blocking (a FIFO swapped in after the listing must not stall the loader), then checks
/// what was opened is a regular file of a sane size.
fn read_manifest(path: &Path, rejected: &mut Vec<Rejected>) -> Result<Option<String>, LoadError> {
    let io_err = |source| LoadError::File {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        rejected.push(file_rejection(path, "skipped: not a regular file".into()));
        return Ok(None);
    }
    if meta.len() > MAX_FILE_BYTES {
        rejected.push(file_rejection(
            path,
            format!(
                "skipped: {} bytes; a manifest file may hold at most {MAX_FILE_BYTES}",
                meta.len()
            ),
        ));
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    (&mut file)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Some(text)),
        Err(_) => {
            rejected.push(file_rejection(path, "skipped: not UTF-8 text".into()));
            Ok(None)
        }
    }
}

/// serde-saphyr's budgets, applied to each document as it is read: the depth, node, event and alias
/// limits that stop hostile YAML, with no cap on how many documents a file holds (generated manifests
/// hold thousands, and Istio has no such cap). The input is bounded by [`MAX_FILE_BYTES`] already.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_reader_input_bytes = None;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// Every document of a YAML stream, each read under the loader's budgets; empty documents are left
/// out. For readers that look at objects the loader does not keep (`weftctl analyze` reads pod
/// templates and Namespaces).
pub fn read_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut reader = text.as_bytes();
    let mut docs = Vec::new();
    for doc in serde_saphyr::read_with_options::<_, Value>(&mut reader, yaml_options()) {
        let doc = doc.map_err(|e| format!("invalid YAML: {e}"))?;
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// Whether [`parse_object`] reads this kind (or refuses it with a reason, as an Istio kind Weft does
/// not act on): every other kind is no concern of the mesh's.
pub fn is_mesh_kind(group: &str, kind: &str) -> bool {
    matches!(
        (group, kind),
        ("", "Service" | "Pod" | "Namespace") | ("discovery.k8s.io", "EndpointSlice")
    ) || crate::kinds::ISTIO_KINDS
        .iter()
        .any(|k| k.group == group && k.kind == kind)
}

/// Parses the documents of one file into `resources`. `file` only labels rejections.
pub fn parse_manifests(
    file: &str,
    text: &str,
    resources: &mut Resources,
    rejected: &mut Vec<Rejected>,
) {
    // Documents are read one at a time, each under its own depth, node and alias budget, so a file
    // of thousands of documents loads and memory never holds more than one document's tree beside
    // the typed resources. A syntax or budget error refuses the whole file: half a file is never
    // applied.
    let mut staged = Resources::default();
    let mut staged_rejected = Vec::new();
    let mut reader = text.as_bytes();
    for doc in serde_saphyr::read_with_options::<_, Value>(&mut reader, yaml_options()) {
        let doc = match doc {
            Ok(doc) => doc,
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
        if doc.is_null() {
            continue;
        }
        if let Err(r) = parse_object(file, doc, &mut staged) {
            staged_rejected.push(r);
        }
    }
    resources.append(staged);
    rejected.extend(staged_rejected);
}

/// Checks and adds one object, however it was read (a YAML document, an object from the Kubernetes
/// API), so every source refuses the same objects for the same reasons. `source` only labels the
/// rejection.
pub fn parse_object(source: &str, doc: Value, resources: &mut Resources) -> Result<(), Rejected> {
    let text = |pointer: &str, default: &str| {
        doc.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let (kind, api_version, name) = (
        text("/kind", "-"),
        text("/apiVersion", ""),
        text("/metadata/name", "-"),
    );
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    check_metadata(&doc)
        .and_then(|()| add_document(group, &kind, doc, resources))
        .map_err(|reason| Rejected {
            file: source.into(),
            kind,
            name,
            reason,
        })
}

fn add_document(group: &str, kind: &str, doc: Value, r: &mut Resources) -> Result<(), String> {
    match (group, kind) {
        ("", "Service") => r.services.push(typed(doc)?),
        ("discovery.k8s.io", "EndpointSlice") => r.endpoint_slices.push(typed(doc)?),
        ("", "Pod") => {
            let pod: Pod = typed(doc)?;
            if let Some(sa) = &pod.spec.service_account_name {
                names::check_subdomain(sa).map_err(|e| format!("spec.serviceAccountName: {e}"))?;
            }
            r.pods.push(pod);
        }
        ("", "Namespace") => {}
        ("networking.istio.io", "ServiceEntry") => {
            let se: Object<ServiceEntrySpec> = typed(doc)?;
            validate_service_entry(&se.spec)?;
            r.service_entries.push(se);
        }
        ("networking.istio.io", "WorkloadEntry") => {
            let we: Object<WorkloadEntrySpec> = typed(doc)?;
            validate_workload_entry(&we.spec).map_err(|e| format!("spec.{e}"))?;
            r.workload_entries.push(we);
        }
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
            if ap
                .metadata
                .annotations
                .get(DRY_RUN_ANNOTATION)
                .map(String::as_str)
                == Some("true")
            {
                return Err(format!(
                    "metadata.annotations[{DRY_RUN_ANNOTATION}]: dry-run (shadow) policies are not supported yet; the policy is refused rather than enforced"
                ));
            }
            if ap.spec.action == Some(AuthorizationAction::Custom) {
                return Err("spec.action: CUSTOM (external authorization) is not supported".into());
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
        _ if crate::kinds::ISTIO_KINDS
            .iter()
            .any(|k| k.group == group && k.kind == kind) =>
        {
            return Err(format!(
                "Weft does not act on {kind} yet; the object is refused rather than ignored"
            ));
        }
        _ => return Err(format!("unsupported kind {kind} in API group {group:?}")),
    }
    Ok(())
}

/// Istio's annotation for an AuthorizationPolicy that is evaluated and logged, never enforced.
const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// `metadata` as the API server checks it: names, namespaces and labels all flow into paths, metric
/// labels and cluster names downstream.
fn check_metadata(doc: &Value) -> Result<(), String> {
    let Some(meta) = doc.get("metadata") else {
        return Err("metadata.name is required".into());
    };
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .ok_or("metadata.name is required")?;
    names::check_subdomain(name).map_err(|e| format!("metadata.name: {e}"))?;
    if let Some(ns) = meta.get("namespace").and_then(Value::as_str) {
        names::check_label(ns).map_err(|e| format!("metadata.namespace: {e}"))?;
    }
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            let v = v
                .as_str()
                .ok_or_else(|| format!("metadata.labels[{k}]: must be a string"))?;
            names::check_label_pair(k, v).map_err(|e| format!("metadata.labels: {e}"))?;
        }
    }
    Ok(())
}

fn validate_workload_entry(spec: &WorkloadEntrySpec) -> Result<(), String> {
    if let Some(sa) = &spec.service_account {
        names::check_subdomain(sa).map_err(|e| format!("serviceAccount: {e}"))?;
    }
    for (k, v) in &spec.labels {
        names::check_label_pair(k, v).map_err(|e| format!("labels: {e}"))?;
    }
    Ok(())
}

/// Hosts must be DNS names, and only what Weft carries is accepted: endpoints listed by address
/// (`STATIC`). `DNS` needs the proxy to resolve names, and `NONE` (Istio's default) to forward to the
/// original destination; neither is built yet, and an empty cluster would fail every request.
fn validate_service_entry(spec: &ServiceEntrySpec) -> Result<(), String> {
    if spec.hosts.is_empty() {
        return Err("spec.hosts: at least one host is required".into());
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        names::check_host(host).map_err(|e| format!("spec.hosts[{i}]: {e}"))?;
    }
    match spec.resolution {
        Some(Resolution::Static) => {}
        Some(r @ (Resolution::Dns | Resolution::DnsRoundRobin)) => {
            let r = if r == Resolution::Dns {
                "DNS"
            } else {
                "DNS_ROUND_ROBIN"
            };
            return Err(format!(
                "spec.resolution: {r} is not supported yet (weft-proxy does not resolve hostnames); list the endpoints by IP address with resolution: STATIC"
            ));
        }
        None | Some(Resolution::None) => {
            return Err(
                "spec.resolution: NONE (Istio's default) forwards to the original destination, which Weft does not do for ServiceEntries yet; set resolution: STATIC with endpoints or a workloadSelector".into(),
            );
        }
    }
    for (i, ep) in spec.endpoints.iter().enumerate() {
        ep.address.parse::<std::net::IpAddr>().map_err(|_| {
            format!(
                "spec.endpoints[{i}].address: {:?} is not an IP address (resolution STATIC takes addresses)",
                ep.address
            )
        })?;
        validate_workload_entry(ep).map_err(|e| format!("spec.endpoints[{i}].{e}"))?;
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
    if let Some(re) = &sm.regex {
        // Compiled as the proxy will (anchored), so a pattern it cannot take never reaches it.
        regex::Regex::new(&format!("^(?:{re})$"))
            .map_err(|e| format!("regex {re:?} does not compile: {e}"))?;
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
        if p.load_balancer.as_ref().and_then(|lb| lb.simple) == Some(SimpleLb::Passthrough) {
            return Err(
                "trafficPolicy.loadBalancer.simple: PASSTHROUGH is not supported (weft-proxy balances over the endpoints it is given)".into(),
            );
        }
        if p.outlier_detection.is_some() {
            return Err(
                "trafficPolicy.outlierDetection: not supported yet (weft-proxy does not eject endpoints); the rule is refused so it cannot take other clusters down".into(),
            );
        }
        if let Some(mode @ (ClientTlsMode::Simple | ClientTlsMode::Mutual)) =
            p.tls.as_ref().and_then(|t| t.mode)
        {
            let mode = if mode == ClientTlsMode::Simple {
                "SIMPLE"
            } else {
                "MUTUAL"
            };
            return Err(format!(
                "trafficPolicy.tls.mode: {mode} is not supported (DISABLE and ISTIO_MUTUAL are; SIMPLE and MUTUAL need client certificates Weft does not mount yet)"
            ));
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
            resources.peer_authentications[2].spec.port_level_mtls[&8080].mode,
            Some(crate::values::MtlsMode::Disable)
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

#[cfg(test)]
mod validation_tests {
    use super::*;

    /// Each manifest is refused at load with a reason naming the field, so it never reaches a path,
    /// a metric label or a proxy that would NACK it.
    #[test]
    fn what_weft_cannot_use_is_refused_with_the_field_named() {
        let cases = [
            (
                "pod with a path for a service account",
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nspec: {serviceAccountName: ../../escape}\n",
                "spec.serviceAccountName",
            ),
            (
                "overlong service account",
                &format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: demo}}\nspec: {{serviceAccountName: {}}}\n",
                    "a".repeat(300)
                ),
                "spec.serviceAccountName",
            ),
            (
                "workload entry account",
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: demo}\nspec: {address: 10.0.0.1, serviceAccount: a/b}\n",
                "spec.serviceAccount",
            ),
            (
                "bad namespace",
                "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: Demo_1}\nspec: {ports: [{port: 80}]}\n",
                "metadata.namespace",
            ),
            (
                "bad name",
                "apiVersion: v1\nkind: Service\nmetadata: {name: \"a b\"}\nspec: {ports: [{port: 80}]}\n",
                "metadata.name",
            ),
            (
                "no name",
                "apiVersion: v1\nkind: Service\nmetadata: {namespace: demo}\nspec: {ports: [{port: 80}]}\n",
                "metadata.name",
            ),
            (
                "bad label",
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {app: \"x y\"}}\nspec: {}\n",
                "metadata.labels",
            ),
            (
                "regex",
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec: {hosts: [a], http: [{match: [{uri: {regex: \"/(a\"}}], route: [{destination: {host: a}}]}]}\n",
                "does not compile",
            ),
            (
                "outlier detection",
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: a, trafficPolicy: {outlierDetection: {consecutive5xxErrors: 3}}}\n",
                "outlierDetection",
            ),
            (
                "service entry ip host",
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e}\nspec: {hosts: [10.1.2.3], resolution: STATIC, ports: [{number: 80, name: http}], endpoints: [{address: 10.1.2.3}]}\n",
                "spec.hosts[0]",
            ),
            (
                "service entry dns",
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e}\nspec: {hosts: [api.example.com], resolution: DNS, ports: [{number: 443, name: https}]}\n",
                "spec.resolution: DNS",
            ),
            (
                "service entry none",
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e}\nspec: {hosts: [api.example.com], ports: [{number: 443, name: https}]}\n",
                "spec.resolution: NONE",
            ),
            (
                "service entry hostname endpoint",
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e}\nspec: {hosts: [db.example.com], resolution: STATIC, ports: [{number: 5432, name: tcp}], endpoints: [{address: db1.example.com}]}\n",
                "spec.endpoints[0].address",
            ),
            (
                "dry-run policy",
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, annotations: {istio.io/dry-run: \"true\"}}\nspec: {action: DENY, rules: [{}]}\n",
                "dry-run",
            ),
        ];
        for (what, text, reason) in cases {
            let mut res = Resources::default();
            let mut rejected = Vec::new();
            parse_manifests("t.yaml", text, &mut res, &mut rejected);
            assert_eq!(rejected.len(), 1, "{what}: {res:?}");
            assert!(
                rejected[0].reason.contains(reason),
                "{what}: {}",
                rejected[0].reason
            );
        }
        let fine = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: demo}\nspec: {hosts: [db.example.com], location: MESH_INTERNAL, resolution: STATIC, ports: [{number: 5432, name: tcp}], endpoints: [{address: 10.0.0.9, serviceAccount: db}]}\n";
        let mut res = Resources::default();
        let mut rejected = Vec::new();
        parse_manifests("t.yaml", fine, &mut res, &mut rejected);
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(res.service_entries.len(), 1);
    }
}

#[cfg(test)]
mod dir_tests {
    use std::{os::unix::fs::symlink, path::PathBuf};

    use super::*;

    /// A scratch directory removed when the test ends, pass or fail.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("weft-api-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create scratch dir");
            Self(dir)
        }
        fn write(&self, rel: &str, text: &str) {
            let path = self.0.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("create parent");
            }
            std::fs::write(path, text).expect("write manifest");
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {ports: [{name: http, port: 80}]}\n";

    #[test]
    fn a_missing_directory_is_an_error_not_an_empty_mesh() {
        let s = Scratch::new("missing");
        let gone = s.0.join("swapped-away");
        assert!(matches!(load_dir(&gone), Err(LoadError::Dir { .. })));
    }

    #[test]
    fn a_dangling_link_is_skipped_and_the_rest_loads() {
        let s = Scratch::new("vanish");
        s.write("a.yaml", SERVICE);
        symlink(s.0.join("nowhere"), s.0.join("sub")).expect("symlink");
        let (res, rejected) = load_dir(&s.0).expect("loads");
        assert_eq!(res.services.len(), 1);
        assert!(rejected.is_empty(), "not a manifest name: {rejected:?}");
    }

    #[test]
    fn symlink_loops_end_and_are_reported() {
        let s = Scratch::new("loop");
        s.write("a/svc.yaml", SERVICE);
        symlink("..", s.0.join("a/up")).expect("symlink");
        symlink("../a", s.0.join("a/again")).expect("symlink");
        let (res, rejected) = load_dir(&s.0).expect("loads");
        assert_eq!(res.services.len(), 1, "each directory is read once");
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(rejected.iter().all(|r| r.reason.contains("already read")));
    }

    #[test]
    fn a_fifo_is_skipped_without_blocking() {
        let s = Scratch::new("fifo");
        s.write("svc.yaml", SERVICE);
        nix::unistd::mkfifo(&s.0.join("pipe.yaml"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let (res, rejected) = load_dir(&s.0).expect("loads");
        assert_eq!(res.services.len(), 1);
        assert_eq!(rejected.len(), 1);
        assert!(
            rejected[0].reason.contains("not a regular file"),
            "{rejected:?}"
        );
    }

    #[test]
    fn configmap_mounts_are_read_through_their_links_once_and_follow_the_target() {
        let s = Scratch::new("configmap");
        s.write("..2026_12_02_1/mesh.yaml", SERVICE);
        symlink("..2026_12_02_1", s.0.join("..data")).expect("symlink");
        symlink("..data/mesh.yaml", s.0.join("mesh.yaml")).expect("symlink");
        let (files, _) = list_manifests(&s.0).expect("lists");
        assert_eq!(files.len(), 1, "{files:?}");
        let (res, _) = load_dir(&s.0).expect("loads");
        assert_eq!(res.services.len(), 1);
        // Kubelet's update: a new timestamped directory, then `..data` swapped to it.
        s.write(
            "..2026_12_02_2/mesh.yaml",
            &format!(
                "{SERVICE}---\n{}",
                SERVICE.replace("name: web", "name: api")
            ),
        );
        symlink("..2026_12_02_2", s.0.join("..data_tmp")).expect("symlink");
        std::fs::rename(s.0.join("..data_tmp"), s.0.join("..data")).expect("swap");
        let (after, _) = list_manifests(&s.0).expect("lists");
        assert_ne!(
            files, after,
            "the fingerprint follows the link to the new target"
        );
    }

    #[test]
    fn hostile_yaml_refuses_its_file_whole_and_nothing_else() {
        let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let nested: String = (0..500)
            .map(|i| format!("{}k{i}:\n", "  ".repeat(i)))
            .collect();
        let half = format!("{SERVICE}---\nkind: [unclosed\n");
        for (what, text) in [
            ("deep flow", deep),
            ("deep block", nested),
            ("half valid", half),
        ] {
            let mut res = Resources::default();
            let mut rejected = Vec::new();
            parse_manifests("bad.yaml", &text, &mut res, &mut rejected);
            assert_eq!(
                res,
                Resources::default(),
                "{what}: nothing of the file applies"
            );
            assert_eq!(rejected.len(), 1, "{what}: {rejected:?}");
            assert!(
                rejected[0].reason.starts_with("invalid YAML"),
                "{what}: {}",
                rejected[0].reason
            );
        }
    }

    #[test]
    fn large_generated_files_load() {
        let docs: Vec<String> = (0..3000)
            .map(|i| SERVICE.replace("name: web", &format!("name: web-{i}")))
            .collect();
        let mut res = Resources::default();
        let mut rejected = Vec::new();
        parse_manifests("big.yaml", &docs.join("---\n"), &mut res, &mut rejected);
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(res.services.len(), 3000);
    }
}
