//! weft-policy: Istio's AuthorizationPolicy semantics, evaluated over plain facts about one request or
//! connection. No IO, no clock: the proxy and the control plane can share it, and table tests pin it.
//!
//! Order, as Istio documents it: any matching DENY policy denies; then, if the workload has ALLOW
//! policies, the request must match one of them; otherwise it is allowed. AUDIT policies never change
//! the outcome; they are reported. A decision names the policy and rule that made it, so a denial can
//! say why (Istio answers only `RBAC: access denied`).

use std::net::IpAddr;

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

/// Decides one request against every policy that applies to the workload. Also returns the AUDIT
/// policies that matched, for the access log.
pub fn evaluate(policies: &[Policy], req: &Request) -> (Decision, Vec<Matched>) {
    let matching = |action: Action| {
        policies
            .iter()
            .filter(move |p| p.action == action)
            .flat_map(move |p| p.rules.iter().enumerate().map(move |(i, r)| (p, i, r)))
            .filter(move |(_, _, r)| rule_matches(r, req, action))
            .map(|(p, i, _)| Matched {
                policy: p.name.clone(),
                rule: i,
            })
    };
    let audited = matching(Action::Audit).collect();
    if let Some(m) = matching(Action::Deny).next() {
        return (Decision::Deny { by: Some(m) }, audited);
    }
    if !policies.iter().any(|p| p.action == Action::Allow) {
        return (Decision::Allow { by: None }, audited);
    }
    let decision = match matching(Action::Allow).next() {
        Some(m) => Decision::Allow { by: Some(m) },
        None => Decision::Deny { by: None },
    };
    (decision, audited)
}

/// Istio's string forms: `*` (present), `prefix*`, `*suffix`, or exact.
fn string_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

/// A field with its positive and negative lists: any positive (if there are any), and no negative.
fn field(
    values: &[String],
    not_values: &[String],
    actual: Option<&str>,
    matches: impl Fn(&str, &str) -> bool,
) -> bool {
    let hit = |list: &[String]| actual.is_some_and(|a| list.iter().any(|p| matches(p, a)));
    (values.is_empty() || hit(values)) && !hit(not_values)
}

fn cidr_matches(block: &str, ip: &str) -> bool {
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return false;
    };
    let (net, len) = block
        .split_once('/')
        .unwrap_or((block, if block.contains(':') { "128" } else { "32" }));
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if len <= 128 => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn namespace_of(principal: &str) -> Option<&str> {
    let mut parts = principal.split('/');
    while let Some(p) = parts.next() {
        if p == "ns" {
            return parts.next();
        }
    }
    None
}

fn source_matches(s: &Source, req: &Request) -> bool {
    let principal = req.source_principal.as_deref();
    let ip = req.source_ip.map(|i| i.to_string());
    let remote = req.remote_ip.or(req.source_ip).map(|i| i.to_string());
    field(&s.principals, &s.not_principals, principal, string_matches)
        && field(
            &s.namespaces,
            &s.not_namespaces,
            principal.and_then(namespace_of),
            string_matches,
        )
        && field(&s.ip_blocks, &s.not_ip_blocks, ip.as_deref(), cidr_matches)
        && field(
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            remote.as_deref(),
            cidr_matches,
        )
}

impl Operation {
    fn uses_http(&self) -> bool {
        [
            &self.hosts,
            &self.not_hosts,
            &self.methods,
            &self.not_methods,
            &self.paths,
            &self.not_paths,
        ]
        .iter()
        .any(|l| !l.is_empty())
    }
}

fn operation_matches(o: &Operation, req: &Request) -> bool {
    let port = req.destination_port.to_string();
    let ports = field(&o.ports, &o.not_ports, Some(&port), |p, a| p == a);
    let Some(http) = &req.http else { return ports };
    // Hosts compare without case; a host pattern without a port also matches the host with one.
    let host = http.host.to_ascii_lowercase();
    let host_no_port = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
    let host_match = |p: &str, _: &str| {
        let p = p.to_ascii_lowercase();
        string_matches(&p, &host) || string_matches(&p, host_no_port)
    };
    ports
        && field(&o.hosts, &o.not_hosts, Some(&host), host_match)
        && field(
            &o.methods,
            &o.not_methods,
            Some(&http.method),
            string_matches,
        )
        && field(&o.paths, &o.not_paths, Some(&http.path), string_matches)
}

fn condition_value(key: &str, req: &Request) -> Option<String> {
    if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        let name = name.to_ascii_lowercase();
        return req
            .http
            .as_ref()?
            .headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone());
    }
    match key {
        "source.principal" => req.source_principal.clone(),
        "source.namespace" => req
            .source_principal
            .as_deref()
            .and_then(namespace_of)
            .map(str::to_string),
        "source.ip" => req.source_ip.map(|i| i.to_string()),
        "remote.ip" => req.remote_ip.or(req.source_ip).map(|i| i.to_string()),
        "destination.port" => Some(req.destination_port.to_string()),
        _ => None,
    }
}

fn condition_matches(c: &Condition, req: &Request) -> bool {
    let value = condition_value(&c.key, req);
    let ip_key = matches!(c.key.as_str(), "source.ip" | "remote.ip");
    let matcher = |p: &str, a: &str| {
        if ip_key {
            cidr_matches(p, a)
        } else {
            string_matches(p, a)
        }
    };
    field(&c.values, &c.not_values, value.as_deref(), matcher)
}

fn is_http_condition(c: &Condition) -> bool {
    c.key.starts_with("request.")
}

/// Without HTTP, Istio drops a rule's HTTP-only parts: an ALLOW rule that has any cannot match (it
/// must not allow more than was written), while a DENY rule is kept without them (it denies more).
fn rule_matches(rule: &Rule, req: &Request, action: Action) -> bool {
    let tcp = req.http.is_none();
    let uses_http =
        rule.to.iter().any(Operation::uses_http) || rule.when.iter().any(is_http_condition);
    if tcp && uses_http && action == Action::Allow {
        return false;
    }
    let from = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, req));
    let to = rule.to.is_empty()
        || rule.to.iter().any(|o| {
            if tcp && action != Action::Allow {
                field(
                    &o.ports,
                    &o.not_ports,
                    Some(&req.destination_port.to_string()),
                    |p, a| p == a,
                )
            } else {
                operation_matches(o, req)
            }
        });
    let when = rule
        .when
        .iter()
        .filter(|c| !(tcp && is_http_condition(c)))
        .all(|c| condition_matches(c, req));
    from && to && when
}

#[cfg(test)]
mod tests;
