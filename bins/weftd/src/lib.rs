//! weftd, Weft's control plane: reads mesh config, builds the service registry and serves each proxy
//! the Envoy resources for its workload over ADS.
//!
//! Config sources (today a directory of YAML manifests, [`source`]) produce a [`Model`]; the pure
//! [`translate`] turns a model and a proxy into that proxy's snapshot; [`app`] wires the ADS server.

pub mod app;
pub mod authz;
pub mod ca;
pub mod kubernetes;
pub mod peer_auth;
pub mod registry;
pub mod source;
pub mod translate;

use weft_api::{
    Object, Resources,
    istio::{
        AuthorizationPolicySpec, DestinationRuleSpec, PeerAuthenticationSpec, SidecarSpec,
        VirtualServiceSpec,
    },
};

use crate::{
    registry::{Registry, Service},
    translate::{MeshOptions, Proxy},
};

/// The mesh as weftd understands it: the registry plus the routing and scoping rules.
#[derive(Debug, Default, PartialEq)]
pub struct Model {
    pub registry: Registry,
    pub virtual_services: Vec<Object<VirtualServiceSpec>>,
    pub destination_rules: Vec<Object<DestinationRuleSpec>>,
    pub sidecars: Vec<Object<SidecarSpec>>,
    pub peer_authentications: Vec<Object<PeerAuthenticationSpec>>,
    pub authorization_policies: Vec<Object<AuthorizationPolicySpec>>,
    /// `(namespace, service account)` of every Pod and WorkloadEntry: who may ask the CA for a
    /// certificate with a bootstrap token.
    pub service_accounts: std::collections::BTreeSet<(String, String)>,
    pub mesh: MeshOptions,
}

impl Model {
    pub fn build(resources: &Resources, mesh: MeshOptions) -> Self {
        Self {
            registry: Registry::build(resources),
            virtual_services: resources.virtual_services.clone(),
            destination_rules: resources.destination_rules.clone(),
            sidecars: resources.sidecars.clone(),
            peer_authentications: resources.peer_authentications.clone(),
            authorization_policies: resources.authorization_policies.clone(),
            service_accounts: resources
                .pods
                .iter()
                .map(|p| {
                    let sa = p.spec.service_account_name.as_deref().unwrap_or("default");
                    (p.metadata.namespace().to_string(), sa.to_string())
                })
                .chain(resources.workload_entries.iter().map(|w| {
                    let sa = w.spec.service_account.as_deref().unwrap_or("default");
                    (w.metadata.namespace().to_string(), sa.to_string())
                }))
                .collect(),
            mesh,
        }
    }

    /// The Sidecar that scopes a proxy: the one in its namespace whose selector matches it (the most
    /// specific if several do), else the namespace's Sidecar without a selector.
    pub fn sidecar_for(&self, proxy: &Proxy) -> Option<&Object<SidecarSpec>> {
        self.sidecars
            .iter()
            .filter_map(|sc| translate::sidecar_selects(sc, proxy).map(|rank| (rank, sc)))
            .max_by_key(|(rank, _)| *rank)
            .map(|(_, sc)| sc)
    }

    /// The first DestinationRule for a host, as Istio uses one per host.
    pub fn destination_rule_for(&self, svc: &Service) -> Option<&DestinationRuleSpec> {
        self.destination_rules
            .iter()
            .find(|dr| translate::dr_applies(dr, svc))
            .map(|dr| &dr.spec)
    }

    pub fn virtual_service_for(&self, svc: &Service) -> Option<&Object<VirtualServiceSpec>> {
        self.virtual_services
            .iter()
            .find(|vs| translate::vs_applies(vs, svc))
    }

    /// Hosts that several VirtualServices or DestinationRules apply to. One of each applies per host,
    /// the first in load order (files by name, then documents in order), as `virtual_service_for`
    /// and `destination_rule_for` pick; the others are reported so an operator knows which was
    /// ignored, as `istioctl analyze` reports the conflict.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let name = |m: &weft_api::ObjectMeta| format!("{}/{}", m.namespace(), m.name);
        let mut out = Vec::new();
        for svc in self.registry.services.values() {
            let vs: Vec<String> = self
                .virtual_services
                .iter()
                .filter(|vs| translate::vs_applies(vs, svc))
                .map(|vs| name(&vs.metadata))
                .collect();
            let dr: Vec<String> = self
                .destination_rules
                .iter()
                .filter(|dr| translate::dr_applies(dr, svc))
                .map(|dr| name(&dr.metadata))
                .collect();
            for (kind, all) in [("VirtualService", vs), ("DestinationRule", dr)] {
                if let [used, ignored @ ..] = all.as_slice()
                    && !ignored.is_empty()
                {
                    out.push(Conflict {
                        host: svc.hostname.clone(),
                        kind,
                        used: used.clone(),
                        ignored: ignored.to_vec(),
                    });
                }
            }
        }
        out
    }
}

/// Several resources of one kind for one host: which one is used, and which are not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub host: String,
    pub kind: &'static str,
    pub used: String,
    pub ignored: Vec<String>,
}
