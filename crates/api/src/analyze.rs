//! `weftctl analyze`: what weftd would refuse, and what it would accept but not do what the author
//! meant, found across resources. Pure over [`Resources`]; each message carries Istio's code where
//! Istio's analyzers have one, so a team's runbooks keep working, and a `WEFT` code where Istio has none.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    Object, Rejected, Resources,
    istio::{Destination, VirtualServiceSpec},
    labels_match,
    peer_auth::{self, MtlsMode},
    protocol::{Protocol, fqdn},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warning,
    Info,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Error => "Error",
            Self::Warning => "Warning",
            Self::Info => "Info",
        })
    }
}

/// What a message is about, as Istio names analyzers' messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Code {
    /// IST0101: a referenced host, or host and subset, exists nowhere.
    ReferencedResourceNotFound,
    /// IST0106: the resource is refused at load.
    SchemaValidationError,
    /// IST0109: VirtualServices for the mesh claim the same host.
    ConflictingMeshGatewayVirtualServiceHosts,
    /// IST0118: a Service port whose protocol cannot be told from its name.
    PortNameIsNotUnderNamingConvention,
    /// IST0173: a subset whose labels select none of its service's pods.
    DestinationRuleSubsetNotSelectPods,
    /// WEFT0001: STRICT mTLS for workloads that pods without a sidecar call.
    StrictMtlsWithPlaintextCallers,
}

impl Code {
    pub fn id(self) -> &'static str {
        match self {
            Self::ReferencedResourceNotFound => "IST0101",
            Self::SchemaValidationError => "IST0106",
            Self::ConflictingMeshGatewayVirtualServiceHosts => "IST0109",
            Self::PortNameIsNotUnderNamingConvention => "IST0118",
            Self::DestinationRuleSubsetNotSelectPods => "IST0173",
            Self::StrictMtlsWithPlaintextCallers => "WEFT0001",
        }
    }

    pub fn level(self) -> Level {
        match self {
            Self::ReferencedResourceNotFound | Self::SchemaValidationError => Level::Error,
            Self::ConflictingMeshGatewayVirtualServiceHosts
            | Self::DestinationRuleSubsetNotSelectPods
            | Self::StrictMtlsWithPlaintextCallers => Level::Warning,
            Self::PortNameIsNotUnderNamingConvention => Level::Info,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Message {
    pub code: Code,
    /// `Kind namespace/name`.
    pub resource: String,
    /// The file it came from, when it came from one.
    pub origin: Option<String>,
    pub text: String,
}

impl Message {
    pub fn level(&self) -> Level {
        self.code.level()
    }

    /// The namespace of the resource the message is about.
    pub fn namespace(&self) -> Option<&str> {
        let (_, name) = self.resource.split_once(' ')?;
        Some(name.split_once('/')?.0)
    }
}

impl std::fmt::Display for Message {
    /// As istioctl prints them: `Error [IST0101] (VirtualService shop/reviews) Referenced host ...`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} [{}] ({}",
            self.level(),
            self.code.id(),
            self.resource
        )?;
        if let Some(origin) = &self.origin {
            write!(f, " {origin}")?;
        }
        write!(f, ") {}", self.text)
    }
}

/// What an analysis reads: the typed resources, what was refused on the way in, and namespaces'
/// labels (for whether their pods get a sidecar).
#[derive(Clone, Debug, Default)]
pub struct Input {
    pub resources: Resources,
    pub rejected: Vec<Rejected>,
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// Namespaces whose pods are the platform's, never the mesh's callers.
const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// Every message, sorted by resource.
pub fn analyze(input: &Input) -> Vec<Message> {
    let mut out = Vec::new();
    rejected(input, &mut out);
    destinations(&input.resources, &mut out);
    conflicting_virtual_services(&input.resources, &mut out);
    port_names(&input.resources, &mut out);
    subsets_without_pods(&input.resources, &mut out);
    strict_with_plaintext_callers(input, &mut out);
    out.sort_by(|a, b| (&a.resource, a.code, &a.text).cmp(&(&b.resource, b.code, &b.text)));
    out.dedup();
    out
}

fn resource<S>(kind: &str, o: &Object<S>) -> String {
    format!("{kind} {}/{}", o.metadata.namespace(), o.metadata.name)
}

fn rejected(input: &Input, out: &mut Vec<Message>) {
    for r in &input.rejected {
        out.push(Message {
            code: Code::SchemaValidationError,
            resource: format!("{} {}", r.kind, r.name),
            origin: Some(r.file.clone()),
            text: format!("Schema validation error: {}", r.reason),
        });
    }
}

/// The hosts the mesh knows: Kubernetes Services by their FQDN, and ServiceEntry hosts (wildcards
/// included), each with its namespace.
fn known_hosts(r: &Resources) -> Vec<String> {
    let mut hosts: Vec<String> = r
        .services
        .iter()
        .map(|s| fqdn(&s.metadata.name, s.metadata.namespace()))
        .collect();
    for se in &r.service_entries {
        hosts.extend(
            se.spec
                .hosts
                .iter()
                .map(|h| fqdn(h, se.metadata.namespace())),
        );
    }
    hosts
}

fn host_known(known: &[String], host: &str) -> bool {
    known.iter().any(|k| {
        k == host
            || k.strip_prefix('*')
                .is_some_and(|suffix| host.ends_with(suffix))
    })
}

fn route_destinations(vs: &VirtualServiceSpec) -> impl Iterator<Item = &Destination> {
    vs.http
        .iter()
        .flat_map(|h| h.route.iter().map(|r| &r.destination))
        .chain(
            vs.tcp
                .iter()
                .flat_map(|t| t.route.iter().map(|r| &r.destination)),
        )
}

/// IST0101: each route destination names a host the mesh knows, and a subset a DestinationRule for
/// that host defines.
fn destinations(r: &Resources, out: &mut Vec<Message>) {
    let known = known_hosts(r);
    let mut subsets: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for dr in &r.destination_rules {
        subsets
            .entry(fqdn(&dr.spec.host, dr.metadata.namespace()))
            .or_default()
            .extend(dr.spec.subsets.iter().map(|s| s.name.as_str()));
    }
    for vs in &r.virtual_services {
        let ns = vs.metadata.namespace();
        for d in route_destinations(&vs.spec) {
            let host = fqdn(&d.host, ns);
            if !host_known(&known, &host) {
                out.push(Message {
                    code: Code::ReferencedResourceNotFound,
                    resource: resource("VirtualService", vs),
                    origin: None,
                    text: format!("Referenced host not found: {:?}", d.host),
                });
                continue;
            }
            if let Some(subset) = &d.subset
                && !subsets
                    .get(&host)
                    .is_some_and(|s| s.contains(subset.as_str()))
            {
                out.push(Message {
                    code: Code::ReferencedResourceNotFound,
                    resource: resource("VirtualService", vs),
                    origin: None,
                    text: format!(
                        "Referenced host+subset in destinationrule not found: \"{host}+{subset}\""
                    ),
                });
            }
        }
    }
}

/// IST0109: two VirtualServices bound to the mesh (no `gateways`, or `mesh` among them) for the same
/// host; a sidecar takes one of them, and which is not something to leave to chance.
fn conflicting_virtual_services(r: &Resources, out: &mut Vec<Message>) {
    let mut by_host: BTreeMap<String, Vec<&Object<VirtualServiceSpec>>> = BTreeMap::new();
    for vs in &r.virtual_services {
        let mesh = vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh");
        if !mesh {
            continue;
        }
        let hosts: BTreeSet<String> = vs
            .spec
            .hosts
            .iter()
            .map(|h| fqdn(h, vs.metadata.namespace()))
            .collect();
        for host in hosts {
            by_host.entry(host).or_default().push(vs);
        }
    }
    for (host, services) in by_host {
        if services.len() < 2 {
            continue;
        }
        let names: Vec<String> = services
            .iter()
            .map(|v| format!("{}/{}", v.metadata.namespace(), v.metadata.name))
            .collect();
        for vs in services {
            out.push(Message {
                code: Code::ConflictingMeshGatewayVirtualServiceHosts,
                resource: resource("VirtualService", vs),
                origin: None,
                text: format!(
                    "The VirtualServices {} associated with mesh define the same host {host}, which can lead to undefined behavior. Merge them into one VirtualService.",
                    names.join(",")
                ),
            });
        }
    }
}

/// IST0118: a port Istio cannot tell the protocol of from its name or `appProtocol` is sniffed under
/// capture and carried as opaque TCP by explicit listeners.
fn port_names(r: &Resources, out: &mut Vec<Message>) {
    for s in &r.services {
        if SYSTEM_NAMESPACES.contains(&s.metadata.namespace()) {
            continue;
        }
        for p in &s.spec.ports {
            if Protocol::infer(p.name.as_deref(), p.app_protocol.as_deref(), None) != Protocol::Auto
            {
                continue;
            }
            let target = p.target_port.as_ref().map_or_else(
                || p.port.to_string(),
                |t| t.to_string().trim_matches('"').to_string(),
            );
            out.push(Message {
                code: Code::PortNameIsNotUnderNamingConvention,
                resource: resource("Service", s),
                origin: None,
                text: format!(
                    "Port name {} (port: {}, targetPort: {target}) doesn't follow the naming convention of Istio port: name it <protocol>[-<suffix>] (http, http2, grpc, tcp, tls...) or set appProtocol.",
                    p.name.as_deref().unwrap_or("(none)"),
                    p.port
                ),
            });
        }
    }
}

/// IST0173: a subset that selects none of the pods behind its host, so traffic routed to it fails.
/// Only where the pods are known (a live cluster, or files that carry them).
fn subsets_without_pods(r: &Resources, out: &mut Vec<Message>) {
    for dr in &r.destination_rules {
        let host = fqdn(&dr.spec.host, dr.metadata.namespace());
        let Some(service) = r
            .services
            .iter()
            .find(|s| fqdn(&s.metadata.name, s.metadata.namespace()) == host)
        else {
            continue;
        };
        if service.spec.selector.is_empty() {
            continue;
        }
        let pods: Vec<_> = r
            .pods
            .iter()
            .filter(|p| {
                p.metadata.namespace() == service.metadata.namespace()
                    && labels_match(&service.spec.selector, &p.metadata.labels)
            })
            .collect();
        if pods.is_empty() {
            continue;
        }
        for subset in &dr.spec.subsets {
            if !pods
                .iter()
                .any(|p| labels_match(&subset.labels, &p.metadata.labels))
            {
                out.push(Message {
                    code: Code::DestinationRuleSubsetNotSelectPods,
                    resource: resource("DestinationRule", dr),
                    origin: None,
                    text: format!(
                        "The Subset {} defined in the DestinationRule does not select any pods.",
                        subset.name
                    ),
                });
            }
        }
    }
}

/// Whether a pod has, or will get, a sidecar: the injector's label, else what decides injection.
fn has_sidecar(
    pod: &crate::k8s::Pod,
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> bool {
    let meta = &pod.metadata;
    if meta
        .labels
        .get("security.istio.io/tlsMode")
        .map(String::as_str)
        == Some("istio")
    {
        return true;
    }
    let says = |key: &str| {
        meta.labels
            .get(key)
            .or_else(|| meta.annotations.get(key))
            .map(String::as_str)
    };
    match says("sidecar.istio.io/inject") {
        Some("true") => return true,
        Some("false") => return false,
        _ => {}
    }
    namespace_labels.get(meta.namespace()).is_some_and(|l| {
        l.get("istio-injection").map(String::as_str) == Some("enabled")
            || l.contains_key("istio.io/rev")
    })
}

/// WEFT0001: workloads a PeerAuthentication makes STRICT refuse plaintext, and pods without a sidecar
/// have only plaintext. Istio has no analyzer for it; it is the first thing a STRICT rollout breaks.
fn strict_with_plaintext_callers(input: &Input, out: &mut Vec<Message>) {
    let r = &input.resources;
    let (mut meshed, mut plaintext) = (Vec::new(), Vec::new());
    for pod in &r.pods {
        let ns = pod.metadata.namespace();
        if SYSTEM_NAMESPACES.contains(&ns) || ns == peer_auth::ROOT_NAMESPACE {
            continue;
        }
        if has_sidecar(pod, &input.namespace_labels) {
            meshed.push(pod);
        } else {
            plaintext.push(format!("{ns}/{}", pod.metadata.name));
        }
    }
    if plaintext.is_empty() {
        return;
    }
    let mut strict_by: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for pod in meshed {
        let applied = peer_auth::mode_for(
            &r.peer_authentications,
            pod.metadata.namespace(),
            &pod.metadata.labels,
            None,
        );
        if let (MtlsMode::Strict, Some(policy)) = (applied.mode, applied.by) {
            strict_by
                .entry(resource("PeerAuthentication", policy))
                .or_insert_with(|| (policy.metadata.namespace().to_string(), Vec::new()))
                .1
                .push(format!(
                    "{}/{}",
                    pod.metadata.namespace(),
                    pod.metadata.name
                ));
        }
    }
    let few = |names: &[String]| match names {
        [a] => a.clone(),
        [a, b] => format!("{a} and {b}"),
        [a, b, rest @ ..] => format!("{a}, {b} and {} more", rest.len()),
        [] => String::new(),
    };
    for (policy, (_, workloads)) in strict_by {
        out.push(Message {
            code: Code::StrictMtlsWithPlaintextCallers,
            resource: policy,
            origin: None,
            text: format!(
                "STRICT mTLS for {} ({}), while {} pods have no sidecar ({}) and can call them only in plaintext, which STRICT refuses. Inject those pods, or use PERMISSIVE until they are.",
                workloads.len(),
                few(&workloads),
                plaintext.len(),
                few(&plaintext)
            ),
        });
    }
}

#[cfg(test)]
mod tests;
