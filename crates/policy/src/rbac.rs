//! Envoy's RBAC model as plain data, its evaluation, and the compilation of Istio's
//! AuthorizationPolicies into it as istiod does. weftd turns [`Rbac`] into Envoy's RBAC filters on the
//! wire; the proxy turns those filters back into [`Rbac`] and evaluates them, so what a policy means
//! is decided here, once.

use std::net::IpAddr;

use crate::{Action, Condition, Operation, Policy, Request, Rule, Source};

/// One RBAC filter: its action and its named policies, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rbac {
    pub action: RbacAction,
    pub policies: Vec<(String, RbacPolicy)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RbacAction {
    /// Allowed only if some policy matches.
    Allow,
    /// Denied if some policy matches.
    Deny,
    /// Never changes the outcome; matches are reported (Istio's AUDIT).
    Log,
}

/// Matches when any permission and any principal match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbacPolicy {
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
}

/// What is being asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    Header(HeaderMatch),
    /// The path without its query.
    UrlPath(StringMatch),
    DestinationPort(u16),
    DestinationIp(Cidr),
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// A peer authenticated by mTLS whose URI SAN matches; `None` matches any authenticated peer.
    Authenticated(Option<StringMatch>),
    /// The address of the connection's peer.
    DirectRemoteIp(Cidr),
    /// The original client address (X-Forwarded-For at a gateway), else the peer's.
    RemoteIp(Cidr),
    Header(HeaderMatch),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Lower case; pseudo-headers `:authority`, `:method`, `:path` too.
    pub name: String,
    /// `None` matches presence.
    pub value: Option<StringMatch>,
    pub invert: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StringMatch {
    pub pattern: Pattern,
    pub ignore_case: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix_len: u32,
}

impl Cidr {
    /// `10.0.0.0/8`, or a bare address (the whole address).
    pub fn parse(s: &str) -> Option<Self> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, len.parse::<u32>().ok()?),
            None => {
                let ip: IpAddr = s.parse().ok()?;
                (ip, if ip.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Self {
            address: ip,
            prefix_len: len,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix_len).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix_len).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl StringMatch {
    pub fn exact(s: &str) -> Self {
        Self {
            pattern: Pattern::Exact(s.into()),
            ignore_case: false,
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        let value = fold(value, self.ignore_case);
        let fold = |p| fold(p, self.ignore_case);
        match &self.pattern {
            Pattern::Exact(p) => *value == *fold(p),
            Pattern::Prefix(p) => value.starts_with(&*fold(p)),
            Pattern::Suffix(p) => value.ends_with(&*fold(p)),
            Pattern::Contains(p) => value.contains(&*fold(p)),
        }
    }
}

fn fold(s: &str, ignore_case: bool) -> std::borrow::Cow<'_, str> {
    if ignore_case {
        std::borrow::Cow::Owned(s.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    let http = req.http.as_ref()?;
    match name {
        ":authority" | "host" => Some(&http.host),
        ":method" => Some(&http.method),
        ":path" => Some(&http.path),
        _ => http
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str()),
    }
}

impl HeaderMatch {
    fn matches(&self, req: &Request) -> bool {
        let hit = match (header(req, &self.name), &self.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(m)) => m.matches(v),
        };
        hit != self.invert
    }
}

impl Permission {
    pub fn matches(&self, req: &Request) -> bool {
        match self {
            Self::Any => true,
            Self::And(all) => all.iter().all(|p| p.matches(req)),
            Self::Or(any) => any.iter().any(|p| p.matches(req)),
            Self::Not(p) => !p.matches(req),
            Self::Header(h) => h.matches(req),
            Self::UrlPath(m) => req
                .http
                .as_ref()
                .is_some_and(|h| m.matches(h.path.split(['?', '#']).next().unwrap_or_default())),
            Self::DestinationPort(p) => req.destination_port == *p,
            Self::DestinationIp(c) => req.destination_ip.is_some_and(|ip| c.contains(ip)),
        }
    }
}

impl Principal {
    pub fn matches(&self, req: &Request) -> bool {
        match self {
            Self::Any => true,
            Self::And(all) => all.iter().all(|p| p.matches(req)),
            Self::Or(any) => any.iter().any(|p| p.matches(req)),
            Self::Not(p) => !p.matches(req),
            Self::Authenticated(m) => req.source_principal.as_deref().is_some_and(|p| {
                m.as_ref()
                    .is_none_or(|m| m.matches(&format!("spiffe://{p}")))
            }),
            Self::DirectRemoteIp(c) => req.source_ip.is_some_and(|ip| c.contains(ip)),
            Self::RemoteIp(c) => req
                .remote_ip
                .or(req.source_ip)
                .is_some_and(|ip| c.contains(ip)),
            Self::Header(h) => h.matches(req),
        }
    }
}

impl Rbac {
    /// The first policy that matches, by name.
    pub fn matching(&self, req: &Request) -> Option<&str> {
        self.policies
            .iter()
            .find(|(_, p)| {
                p.permissions.iter().any(|x| x.matches(req))
                    && p.principals.iter().any(|x| x.matches(req))
            })
            .map(|(name, _)| name.as_str())
    }
}

/// istiod's name for a rule's RBAC policy: `ns[<namespace>]-policy[<name>]-rule[<index>]`.
pub fn policy_name(policy: &str, rule: usize) -> String {
    let (ns, name) = policy.split_once('/').unwrap_or(("", policy));
    format!("ns[{ns}]-policy[{name}]-rule[{rule}]")
}

/// Back from istiod's name to `<namespace>/<name>` and the rule index, for decisions; names written by
/// another control plane are kept whole.
pub fn parse_policy_name(name: &str) -> crate::Matched {
    let parsed = (|| {
        let rest = name.strip_prefix("ns[")?;
        let (ns, rest) = rest.split_once("]-policy[")?;
        let (policy, rest) = rest.split_once("]-rule[")?;
        let rule = rest.strip_suffix(']')?.parse().ok()?;
        Some(crate::Matched {
            policy: format!("{ns}/{policy}"),
            rule,
        })
    })();
    parsed.unwrap_or_else(|| crate::Matched {
        policy: name.to_string(),
        rule: 0,
    })
}

/// Runs a chain of RBAC filters as Envoy does: a LOG filter reports, a DENY filter that matches
/// denies, an ALLOW filter that does not match denies; the first denial ends the chain.
pub fn decide(filters: &[Rbac], req: &Request) -> (crate::Decision, Vec<crate::Matched>) {
    use crate::Decision;
    let mut audited = Vec::new();
    let mut allowed_by = None;
    for f in filters {
        let hit = f.matching(req);
        match (f.action, hit) {
            (RbacAction::Log, Some(name)) => audited.push(parse_policy_name(name)),
            (RbacAction::Deny, Some(name)) => {
                return (
                    Decision::Deny {
                        by: Some(parse_policy_name(name)),
                    },
                    audited,
                );
            }
            (RbacAction::Allow, None) => return (Decision::Deny { by: None }, audited),
            (RbacAction::Allow, Some(name)) => allowed_by = Some(parse_policy_name(name)),
            _ => {}
        }
    }
    (Decision::Allow { by: allowed_by }, audited)
}

// === Istio to RBAC ===

/// Istio's string forms: `*` (present), `prefix*`, `*suffix`, or exact.
fn istio_string(s: &str, ignore_case: bool) -> Option<StringMatch> {
    let pattern = if s == "*" {
        return None;
    } else if let Some(p) = s.strip_suffix('*') {
        Pattern::Prefix(p.into())
    } else if let Some(p) = s.strip_prefix('*') {
        Pattern::Suffix(p.into())
    } else {
        Pattern::Exact(s.into())
    };
    Some(StringMatch {
        pattern,
        ignore_case,
    })
}

/// A field's values as an OR, and its `not` values as NOT(OR); `None` when the field is unset.
fn field<T>(
    values: &[String],
    not_values: &[String],
    one: impl Fn(&str) -> T,
    or: impl Fn(Vec<T>) -> T,
    not: impl Fn(T) -> T,
) -> Vec<T> {
    let mut out = Vec::new();
    if !values.is_empty() {
        out.push(or(values.iter().map(|v| one(v)).collect()));
    }
    if !not_values.is_empty() {
        out.push(not(or(not_values.iter().map(|v| one(v)).collect())));
    }
    out
}

fn p_or(v: Vec<Principal>) -> Principal {
    Principal::Or(v)
}
fn p_not(p: Principal) -> Principal {
    Principal::Not(Box::new(p))
}
fn perm_or(v: Vec<Permission>) -> Permission {
    Permission::Or(v)
}
fn perm_not(p: Permission) -> Permission {
    Permission::Not(Box::new(p))
}

fn principal_name(p: &str) -> Principal {
    Principal::Authenticated(istio_string(p, false).map(|m| StringMatch {
        pattern: match m.pattern {
            Pattern::Exact(s) => Pattern::Exact(format!("spiffe://{s}")),
            Pattern::Prefix(s) => Pattern::Prefix(format!("spiffe://{s}")),
            other => other,
        },
        ..m
    }))
}

/// A namespace is the `/ns/<namespace>/` part of the peer's SPIFFE id.
fn namespace(ns: &str) -> Principal {
    let pattern = if ns == "*" {
        return Principal::Authenticated(None);
    } else if let Some(p) = ns.strip_suffix('*') {
        Pattern::Contains(format!("/ns/{p}"))
    } else if let Some(p) = ns.strip_prefix('*') {
        Pattern::Contains(format!("{p}/sa/"))
    } else {
        Pattern::Contains(format!("/ns/{ns}/sa/"))
    };
    Principal::Authenticated(Some(StringMatch {
        pattern,
        ignore_case: false,
    }))
}

fn cidr(block: &str) -> Cidr {
    // The loader keeps policies as written; an unparseable block matches nothing rather than all.
    Cidr::parse(block).unwrap_or(Cidr {
        address: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        prefix_len: 129,
    })
}

fn header_perm(name: &str, value: &str, ignore_case: bool) -> Permission {
    Permission::Header(HeaderMatch {
        name: name.to_ascii_lowercase(),
        value: istio_string(value, ignore_case),
        invert: false,
    })
}

fn host(h: &str) -> Permission {
    // A host without a port also matches the authority with one, as istiod generates it.
    let exact = header_perm(":authority", h, true);
    if h.contains(':') || h == "*" || h.ends_with('*') {
        return exact;
    }
    let with_port = match h.strip_prefix('*') {
        Some(suffix) => Permission::Header(HeaderMatch {
            name: ":authority".into(),
            value: Some(StringMatch {
                pattern: Pattern::Contains(format!("{suffix}:")),
                ignore_case: true,
            }),
            invert: false,
        }),
        None => header_perm(":authority", &format!("{h}:*"), true),
    };
    Permission::Or(vec![exact, with_port])
}

fn port(p: &str) -> Permission {
    p.parse().map_or(
        Permission::Not(Box::new(Permission::Any)),
        Permission::DestinationPort,
    )
}

fn source(s: &Source) -> Principal {
    let mut all = Vec::new();
    all.extend(field(
        &s.principals,
        &s.not_principals,
        principal_name,
        p_or,
        p_not,
    ));
    all.extend(field(
        &s.namespaces,
        &s.not_namespaces,
        namespace,
        p_or,
        p_not,
    ));
    all.extend(field(
        &s.ip_blocks,
        &s.not_ip_blocks,
        |b| Principal::DirectRemoteIp(cidr(b)),
        p_or,
        p_not,
    ));
    all.extend(field(
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
        |b| Principal::RemoteIp(cidr(b)),
        p_or,
        p_not,
    ));
    and_p(all)
}

fn operation(o: &Operation, tcp: bool) -> Permission {
    let mut all = Vec::new();
    all.extend(field(&o.ports, &o.not_ports, port, perm_or, perm_not));
    if !tcp {
        all.extend(field(&o.hosts, &o.not_hosts, host, perm_or, perm_not));
        all.extend(field(
            &o.methods,
            &o.not_methods,
            |m| header_perm(":method", m, false),
            perm_or,
            perm_not,
        ));
        all.extend(field(
            &o.paths,
            &o.not_paths,
            |p| match istio_string(p, false) {
                Some(m) => Permission::UrlPath(m),
                None => Permission::Any,
            },
            perm_or,
            perm_not,
        ));
    }
    and_perm(all)
}

fn and_p(mut v: Vec<Principal>) -> Principal {
    match v.len() {
        0 => Principal::Any,
        1 => v.remove(0),
        _ => Principal::And(v),
    }
}

fn and_perm(mut v: Vec<Permission>) -> Permission {
    match v.len() {
        0 => Permission::Any,
        1 => v.remove(0),
        _ => Permission::And(v),
    }
}

/// A condition on who is asking, or on what; `None` for HTTP conditions on TCP.
enum Cond {
    Who(Principal),
    What(Permission),
}

fn condition(c: &Condition, tcp: bool) -> Option<Cond> {
    let key = c.key.as_str();
    if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        if tcp {
            return None;
        }
        let name = name.to_ascii_lowercase();
        let all = field(
            &c.values,
            &c.not_values,
            |v| header_perm(&name, v, false),
            perm_or,
            perm_not,
        );
        return Some(Cond::What(and_perm(all)));
    }
    let who = |f: fn(&str) -> Principal| {
        Some(Cond::Who(and_p(field(
            &c.values,
            &c.not_values,
            f,
            p_or,
            p_not,
        ))))
    };
    match key {
        "source.principal" => who(principal_name),
        "source.namespace" => who(namespace),
        "source.ip" => who(|b| Principal::DirectRemoteIp(cidr(b))),
        "remote.ip" => who(|b| Principal::RemoteIp(cidr(b))),
        "destination.port" => Some(Cond::What(and_perm(field(
            &c.values,
            &c.not_values,
            port,
            perm_or,
            perm_not,
        )))),
        // The loader refuses every other key; should one get here, it matches nothing.
        _ => Some(Cond::What(Permission::Not(Box::new(Permission::Any)))),
    }
}

fn uses_http(rule: &Rule) -> bool {
    rule.to.iter().any(|o| {
        [
            &o.hosts,
            &o.not_hosts,
            &o.methods,
            &o.not_methods,
            &o.paths,
            &o.not_paths,
        ]
        .iter()
        .any(|l| !l.is_empty())
    }) || rule.when.iter().any(|c| c.key.starts_with("request."))
}

fn rule_policy(rule: &Rule, tcp: bool) -> RbacPolicy {
    let mut permissions = Vec::new();
    let mut principals = Vec::new();
    if !rule.to.is_empty() {
        permissions.push(Permission::Or(
            rule.to.iter().map(|o| operation(o, tcp)).collect(),
        ));
    }
    if !rule.from.is_empty() {
        principals.push(Principal::Or(rule.from.iter().map(source).collect()));
    }
    for c in &rule.when {
        match condition(c, tcp) {
            Some(Cond::Who(p)) => principals.push(p),
            Some(Cond::What(p)) => permissions.push(p),
            None => {}
        }
    }
    RbacPolicy {
        permissions: vec![and_perm(permissions)],
        principals: vec![and_p(principals)],
    }
}

/// The RBAC filters istiod would generate for a workload's policies, in the order Envoy runs them:
/// AUDIT (as LOG), DENY, then ALLOW. For TCP (`tcp`), HTTP-only parts are dropped the way Istio drops
/// them: an ALLOW rule with any is left out (it must not allow more than was written), a DENY rule
/// keeps its other parts (it denies more).
pub fn compile(policies: &[Policy], tcp: bool) -> Vec<Rbac> {
    let mut out = Vec::new();
    for (action, rbac_action) in [
        (Action::Audit, RbacAction::Log),
        (Action::Deny, RbacAction::Deny),
        (Action::Allow, RbacAction::Allow),
    ] {
        let of_action: Vec<&Policy> = policies.iter().filter(|p| p.action == action).collect();
        if of_action.is_empty() {
            continue;
        }
        let mut rbac = Rbac {
            action: rbac_action,
            policies: Vec::new(),
        };
        for p in of_action {
            for (i, rule) in p.rules.iter().enumerate() {
                if tcp && action == Action::Allow && uses_http(rule) {
                    continue;
                }
                rbac.policies
                    .push((policy_name(&p.name, i), rule_policy(rule, tcp)));
            }
        }
        out.push(rbac);
    }
    out
}
