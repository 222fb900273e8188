//! weft-policy: Istio's AuthorizationPolicy semantics, evaluated over plain facts about one request or
//! connection. No IO, no clock: the proxy and the control plane can share it, and table tests pin it.
//!
//! Order, as Istio documents it: any matching DENY policy denies; then, if the workload has ALLOW
//! policies, the request must match one of them; otherwise it is allowed. AUDIT policies never change
//! the outcome; they are reported. A decision names the policy and rule that made it, so a denial can
//! say why (Istio answers only `RBAC: access denied`).

use std::net::IpAddr;

pub mod rbac;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// One AuthorizationPolicy that applies to the workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `<namespace>/<name>`, for decisions and logs.
    pub name: String,
    pub action: Action,
    /// Istio distinguishes no rules at all (matches nothing) from a list of rules.
    pub rules: Vec<Rule>,
}

/// A rule matches when each of its parts does: any `from`, any `to`, and every `when`. An empty part
/// matches everything, so an empty rule matches every request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

/// `from.source`: every field set must match; within a field, any value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
}

/// `to.operation`: every field set must match; within a field, any value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

/// `when`: the attribute must have one of `values` and none of `not_values`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Condition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// What is known of one request (or, without `http`, one TCP connection).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// The peer's SPIFFE id without `spiffe://`, as Istio writes principals (`cluster.local/ns/x/sa/y`);
    /// `None` for plaintext peers.
    pub source_principal: Option<String>,
    pub source_ip: Option<IpAddr>,
    /// The original client address (from X-Forwarded-For at a gateway); the peer address otherwise.
    pub remote_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: u16,
    pub http: Option<HttpRequest>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRequest {
    pub host: String,
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `by` names the ALLOW policy and rule, or is `None` when the workload has no ALLOW policy.
    Allow { by: Option<Matched> },
    /// Denied by a DENY policy's rule, or by having ALLOW policies none of which matched.
    Deny { by: Option<Matched> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matched {
    pub policy: String,
    pub rule: usize,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Self::Allow { .. })
    }

    /// For access logs and 403 bodies: which policy decided, and why.
    pub fn reason(&self) -> String {
        match self {
            Self::Allow { by: Some(m) } => format!("allowed by {} rule {}", m.policy, m.rule),
            Self::Allow { by: None } => "allowed: no ALLOW policy applies".into(),
            Self::Deny { by: Some(m) } => format!("denied by {} rule {}", m.policy, m.rule),
            Self::Deny { by: None } => "denied: no ALLOW policy matched".into(),
        }
    }
}

/// Decides one request against every policy that applies to the workload, through the same RBAC
/// filters the proxy runs. Also returns the AUDIT policies that matched, for the access log.
pub fn evaluate(policies: &[Policy], req: &Request) -> (Decision, Vec<Matched>) {
    rbac::decide(&rbac::compile(policies, req.http.is_none()), req)
}

#[cfg(test)]
mod tests;
