//! Which AuthorizationPolicies apply to a workload, as Istio scopes them, converted to
//! `weft_policy` for evaluation. Pure.

use weft_api::{
    Object,
    istio::{AuthorizationAction, AuthorizationPolicySpec, RuleOperation, RuleSource},
    labels_match,
};
use weft_policy::{Action, Condition, Operation, Policy, Rule, Source};

use crate::{Model, translate::Proxy};

/// Istio's root namespace: a policy here applies across the mesh.
pub use weft_api::peer_auth::ROOT_NAMESPACE;

/// A policy applies to a workload when it sits in the root namespace or the workload's namespace, and
/// its selector (if any) matches the workload's labels.
fn applies(p: &Object<AuthorizationPolicySpec>, proxy: &Proxy) -> bool {
    let ns = p.metadata.namespace();
    (ns == ROOT_NAMESPACE || ns == proxy.namespace)
        && p.spec
            .selector
            .as_ref()
            .is_none_or(|s| labels_match(&s.labels, &proxy.labels))
}

pub fn policies_for(model: &Model, proxy: &Proxy) -> Vec<Policy> {
    model
        .authorization_policies
        .iter()
        .filter(|p| applies(p, proxy))
        .map(convert)
        .collect()
}

fn convert(p: &Object<AuthorizationPolicySpec>) -> Policy {
    let action = match p.spec.action {
        Some(AuthorizationAction::Deny) => Action::Deny,
        Some(AuthorizationAction::Audit) => Action::Audit,
        None | Some(AuthorizationAction::Allow) => Action::Allow,
        // The loader refuses CUSTOM; should one get here, it allows nothing rather than everything.
        Some(AuthorizationAction::Custom) => {
            return Policy {
                name: format!("{}/{}", p.metadata.namespace(), p.metadata.name),
                action: Action::Allow,
                rules: Vec::new(),
            };
        }
    };
    let rules = p
        .spec
        .rules
        .iter()
        .map(|r| Rule {
            from: r.from.iter().map(|f| source(&f.source)).collect(),
            to: r.to.iter().map(|t| operation(&t.operation)).collect(),
            when: r
                .when
                .iter()
                .map(|c| Condition {
                    key: c.key.clone(),
                    values: c.values.clone(),
                    not_values: c.not_values.clone(),
                })
                .collect(),
        })
        .collect();
    Policy {
        name: format!("{}/{}", p.metadata.namespace(), p.metadata.name),
        action,
        rules,
    }
}

fn source(s: &RuleSource) -> Source {
    Source {
        principals: s.principals.clone(),
        not_principals: s.not_principals.clone(),
        namespaces: s.namespaces.clone(),
        not_namespaces: s.not_namespaces.clone(),
        ip_blocks: s.ip_blocks.clone(),
        not_ip_blocks: s.not_ip_blocks.clone(),
        remote_ip_blocks: s.remote_ip_blocks.clone(),
        not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
    }
}

fn operation(o: &RuleOperation) -> Operation {
    Operation {
        hosts: o.hosts.clone(),
        not_hosts: o.not_hosts.clone(),
        ports: o.ports.clone(),
        not_ports: o.not_ports.clone(),
        methods: o.methods.clone(),
        not_methods: o.not_methods.clone(),
        paths: o.paths.clone(),
        not_paths: o.not_paths.clone(),
    }
}

#[cfg(test)]
mod tests {
    use weft_policy::{HttpRequest, Request, evaluate};

    use super::*;
    use crate::translate::MeshOptions;

    const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-debug, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/debug/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend-from-frontend, namespace: demo}
spec:
  selector: {labels: {app: backend}}
  rules: [{from: [{source: {principals: ["cluster.local/ns/demo/sa/frontend"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-namespace, namespace: other}
spec: {}
"#;

    fn model() -> Model {
        let mut r = weft_api::Resources::default();
        let mut rejected = Vec::new();
        weft_api::parse_manifests("authz.yaml", POLICIES, &mut r, &mut rejected);
        assert!(rejected.is_empty(), "{rejected:?}");
        Model::build(&r, MeshOptions::default())
    }

    fn proxy(app: &str) -> Proxy {
        Proxy {
            ip: "127.0.0.2".parse().expect("ip"),
            namespace: "demo".into(),
            labels: [("app".to_string(), app.to_string())].into(),
            proxyless_grpc: false,
            captured: false,
        }
    }

    fn get(principal: &str, path: &str) -> Request {
        Request {
            source_principal: Some(principal.into()),
            destination_port: 9080,
            http: Some(HttpRequest {
                host: "backend".into(),
                method: "GET".into(),
                path: path.into(),
                headers: vec![],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn policies_apply_by_root_namespace_namespace_and_selector() {
        let names = |app: &str| {
            policies_for(&model(), &proxy(app))
                .into_iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names("backend"),
            ["istio-system/deny-debug", "demo/backend-from-frontend"]
        );
        assert_eq!(names("frontend"), ["istio-system/deny-debug"]);
    }

    #[test]
    fn converted_policies_decide_as_istio_documents() {
        let backend = policies_for(&model(), &proxy("backend"));
        let frontend = "cluster.local/ns/demo/sa/frontend";
        for (principal, path, allowed, reason) in [
            (
                frontend,
                "/api",
                true,
                "allowed by demo/backend-from-frontend rule 0",
            ),
            (
                "cluster.local/ns/demo/sa/other",
                "/api",
                false,
                "denied: no ALLOW policy matched",
            ),
            (
                frontend,
                "/debug/pprof",
                false,
                "denied by istio-system/deny-debug rule 0",
            ),
        ] {
            let (d, _) = evaluate(&backend, &get(principal, path));
            assert_eq!(
                (d.allowed(), d.reason().as_str()),
                (allowed, reason),
                "{principal} {path}"
            );
        }
    }
}
