//! The service registry: every service the mesh knows, from Kubernetes Services with their EndpointSlices
//! (labels from Pods) and from ServiceEntries with their endpoints or selected WorkloadEntries.

use std::collections::BTreeMap;

use tracing::warn;
use weft_api::{
    Resources,
    istio::{ServiceEntryPort, WorkloadEntrySpec},
    k8s::ServicePort,
    labels_match,
};

pub use weft_api::protocol::{DNS_DOMAIN, Protocol, fqdn};

#[derive(Clone, Debug, PartialEq)]
pub struct Port {
    pub name: String,
    pub number: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub address: String,
    /// Service port name to the endpoint's port for it.
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    pub weight: u32,
    pub healthy: bool,
    pub workload_name: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    /// The fully qualified host: `name.namespace.svc.cluster.local` or a ServiceEntry host.
    pub hostname: String,
    pub name: String,
    pub namespace: String,
    /// Virtual addresses clients connect to: a Service's ClusterIP, a ServiceEntry's `addresses`.
    /// Captured TCP is told apart by these, as it carries no host name.
    pub addresses: Vec<String>,
    pub ports: Vec<Port>,
    pub endpoints: Vec<Endpoint>,
    /// A ServiceEntry's `location: MESH_EXTERNAL` (its default): its endpoints run no sidecar, so no
    /// auto mTLS and no workload in metrics, as Istio treats them.
    pub mesh_external: bool,
}

impl Service {
    pub fn port(&self, number: u16) -> Option<&Port> {
        self.ports.iter().find(|p| p.number == number)
    }
}

/// All services, by hostname.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Registry {
    pub services: BTreeMap<String, Service>,
}

impl Registry {
    pub fn build(r: &Resources) -> Self {
        let mut services = BTreeMap::new();
        for svc in &r.services {
            let ns = svc.metadata.namespace().to_string();
            let name = svc.metadata.name.clone();
            let hostname = format!("{name}.{ns}.svc.{DNS_DOMAIN}");
            let ports = svc.spec.ports.iter().map(k8s_port).collect();
            let mut endpoints = Vec::new();
            let slices = r.endpoint_slices.iter().filter(|s| {
                s.metadata.namespace() == ns && s.service_name() == Some(name.as_str())
            });
            for slice in slices {
                for ep in &slice.endpoints {
                    let pod = ep.target_ref.as_ref().and_then(|t| {
                        r.pods
                            .iter()
                            .find(|p| p.metadata.name == t.name && p.metadata.namespace() == ns)
                    });
                    let labels = pod.map(|p| p.metadata.labels.clone()).unwrap_or_default();
                    let healthy = ep.conditions.ready.unwrap_or(true)
                        && !ep.conditions.terminating.unwrap_or(false);
                    let ports: BTreeMap<String, u16> = svc
                        .spec
                        .ports
                        .iter()
                        .filter_map(|sp| {
                            target_port(sp, &slice.ports)
                                .map(|p| (port_key(sp.name.as_deref(), sp.port), p))
                        })
                        .collect();
                    for address in &ep.addresses {
                        endpoints.push(Endpoint {
                            address: address.clone(),
                            ports: ports.clone(),
                            workload_name: weft_telemetry::workload::workload_name(
                                &labels,
                                pod.map(|p| p.metadata.name.as_str()),
                            ),
                            labels: labels.clone(),
                            weight: 1,
                            healthy,
                            namespace: ns.clone(),
                            service_account: pod
                                .and_then(|p| p.spec.service_account_name.clone())
                                .unwrap_or_else(|| "default".into()),
                        });
                    }
                }
            }
            services.insert(
                hostname.clone(),
                Service {
                    hostname,
                    name,
                    namespace: ns,
                    addresses: svc
                        .spec
                        .cluster_ip
                        .iter()
                        .filter(|ip| !ip.is_empty() && *ip != "None")
                        .cloned()
                        .collect(),
                    ports,
                    endpoints,
                    mesh_external: false,
                },
            );
        }
        for se in &r.service_entries {
            let ns = se.metadata.namespace().to_string();
            let ports: Vec<Port> = se.spec.ports.iter().map(se_port).collect();
            let mut endpoints: Vec<Endpoint> = se
                .spec
                .endpoints
                .iter()
                .map(|we| workload_entry(we, &ns, None))
                .collect();
            if let Some(selector) = &se.spec.workload_selector {
                let selected = r.workload_entries.iter().filter(|we| {
                    we.metadata.namespace() == ns && labels_match(&selector.labels, &we.spec.labels)
                });
                endpoints.extend(
                    selected.map(|we| workload_entry(&we.spec, &ns, Some(&we.metadata.name))),
                );
            }
            for host in &se.spec.hosts {
                if services.contains_key(host) {
                    warn!(host, service_entry = %se.metadata.name, "a service with this host already exists; skipping the ServiceEntry host");
                    continue;
                }
                let name = host.split('.').next().unwrap_or(host).to_string();
                services.insert(
                    host.clone(),
                    Service {
                        hostname: host.clone(),
                        name,
                        namespace: ns.clone(),
                        addresses: se.spec.addresses.clone(),
                        ports: ports.clone(),
                        endpoints: endpoints.clone(),
                        mesh_external: se.spec.location
                            != Some(weft_api::istio::Location::MeshInternal),
                    },
                );
            }
        }
        Self { services }
    }

    /// The service a rule's host names, resolving a short name in the rule's namespace as Istio does.
    pub fn resolve(&self, host: &str, rule_namespace: &str) -> Option<&Service> {
        self.services.get(&fqdn(host, rule_namespace))
    }
}

fn port_key(name: Option<&str>, number: u16) -> String {
    name.map(str::to_string)
        .unwrap_or_else(|| number.to_string())
}

fn k8s_port(p: &ServicePort) -> Port {
    Port {
        name: port_key(p.name.as_deref(), p.port),
        number: p.port,
        protocol: Protocol::infer(p.name.as_deref(), p.app_protocol.as_deref(), None),
    }
}

/// The endpoint port for a Service port: a numeric `targetPort`, or the slice port of the same name.
fn target_port(sp: &ServicePort, slice_ports: &[weft_api::k8s::EndpointPort]) -> Option<u16> {
    if let Some(slice_port) = slice_ports.iter().find(|p| p.name == sp.name) {
        return Some(slice_port.port);
    }
    match &sp.target_port {
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Some(_) => None,
        None => Some(sp.port),
    }
}

fn se_port(p: &ServiceEntryPort) -> Port {
    Port {
        name: p.name.clone(),
        number: p.number,
        protocol: Protocol::infer(Some(&p.name), None, p.protocol.as_deref()),
    }
}

fn workload_entry(we: &WorkloadEntrySpec, ns: &str, name: Option<&str>) -> Endpoint {
    Endpoint {
        address: we.address.clone(),
        ports: we.ports.clone(),
        workload_name: weft_telemetry::workload::workload_name(&we.labels, name),
        labels: we.labels.clone(),
        weight: we.weight.unwrap_or(1).max(1),
        healthy: true,
        namespace: ns.to_string(),
        service_account: we
            .service_account
            .clone()
            .unwrap_or_else(|| "default".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_picked_as_istio_picks_them() {
        use Protocol::*;
        for (name, app, declared, want) in [
            (Some("http"), None, None, Http),
            (Some("http-web"), None, None, Http),
            (Some("grpc-api"), None, None, Grpc),
            (Some("http2"), None, None, Http2),
            (Some("tcp-db"), None, None, Tcp),
            (Some("mysql"), None, None, Tcp),
            (Some("web"), Some("http"), None, Http),
            (Some("web"), Some("kubernetes.io/h2c"), None, Http2),
            (Some("web"), None, None, Auto),
            (None, None, None, Auto),
            (Some("api"), None, Some("GRPC"), Grpc),
        ] {
            assert_eq!(
                Protocol::infer(name, app, declared),
                want,
                "{name:?} {app:?} {declared:?}"
            );
        }
    }

    #[test]
    fn services_come_from_kubernetes_and_service_entries() {
        let mut r = Resources::default();
        let mut rejected = Vec::new();
        weft_api::parse_manifests(
            "t.yaml",
            include_str!("../tests/fixtures/registry.yaml"),
            &mut r,
            &mut rejected,
        );
        assert!(rejected.is_empty(), "{rejected:?}");
        let reg = Registry::build(&r);
        let reviews = reg.resolve("reviews", "bookinfo").expect("reviews");
        assert_eq!(reviews.hostname, "reviews.bookinfo.svc.cluster.local");
        assert_eq!(reviews.ports[0].protocol, Protocol::Http);
        let eps: Vec<(&str, u16, &str, bool)> = reviews
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.address.as_str(),
                    e.ports["http"],
                    e.labels["version"].as_str(),
                    e.healthy,
                )
            })
            .collect();
        assert_eq!(
            eps,
            [
                ("10.0.0.1", 9080, "v1", true),
                ("10.0.0.2", 9080, "v2", false)
            ]
        );
        let vm = reg
            .resolve("vm.example.com", "bookinfo")
            .expect("service entry");
        assert_eq!(vm.endpoints.len(), 2);
        assert_eq!(vm.endpoints[1].workload_name, "vm-app");
        assert_eq!(vm.ports[0].protocol, Protocol::Grpc);
    }
}
