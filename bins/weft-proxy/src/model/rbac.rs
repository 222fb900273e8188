//! Envoy's RBAC filters (`envoy.filters.http.rbac`, `envoy.filters.network.rbac`) into weft-policy's
//! plain RBAC, which the proxy evaluates. Any matcher this proxy cannot evaluate exactly is rejected:
//! dropping a part of an authorization rule would allow or deny what the policy did not say.

use weft_policy::rbac::{self as plain, Pattern};
use weft_xds::pb::envoy::{
    config::{
        core::v3::CidrRange,
        rbac::v3::{self as rbac, permission, principal},
        route::v3::{HeaderMatcher, header_matcher::HeaderMatchSpecifier},
    },
    extensions::filters::{
        http::rbac::v3::Rbac as HttpRbac, network::rbac::v3::Rbac as NetworkRbac,
    },
    r#type::matcher::v3::{StringMatcher, path_matcher, string_matcher},
};

use super::{Rejection, reject};

struct Ctx<'a> {
    kind: &'static str,
    name: &'a str,
    field: String,
}

impl Ctx<'_> {
    fn no(&self, what: impl Into<String>) -> Rejection {
        reject(self.kind, self.name, &self.field, what)
    }
}

fn string(m: &StringMatcher, c: &Ctx<'_>) -> Result<plain::StringMatch, Rejection> {
    let pattern = match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(s)) => Pattern::Exact(s.clone()),
        Some(string_matcher::MatchPattern::Prefix(s)) => Pattern::Prefix(s.clone()),
        Some(string_matcher::MatchPattern::Suffix(s)) => Pattern::Suffix(s.clone()),
        Some(string_matcher::MatchPattern::Contains(s)) => Pattern::Contains(s.clone()),
        _ => {
            return Err(
                c.no("only exact, prefix, suffix and contains string matchers are supported")
            );
        }
    };
    Ok(plain::StringMatch {
        pattern,
        ignore_case: m.ignore_case,
    })
}

fn cidr(r: &CidrRange, c: &Ctx<'_>) -> Result<plain::Cidr, Rejection> {
    let len = r.prefix_len.as_ref().map_or(u32::MAX, |l| l.value);
    let text = if len == u32::MAX {
        r.address_prefix.clone()
    } else {
        format!("{}/{len}", r.address_prefix)
    };
    plain::Cidr::parse(&text).ok_or_else(|| c.no(format!("{text:?} is not a CIDR range")))
}

// The deprecated specifiers are still what many control planes send.
#[allow(deprecated)]
fn header(h: &HeaderMatcher, c: &Ctx<'_>) -> Result<plain::HeaderMatch, Rejection> {
    if h.treat_missing_header_as_empty {
        return Err(c.no("treat_missing_header_as_empty is not supported"));
    }
    let exact = |p: Pattern| {
        Some(plain::StringMatch {
            pattern: p,
            ignore_case: false,
        })
    };
    let value = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::PresentMatch(true)) => None,
        Some(HeaderMatchSpecifier::ExactMatch(s)) => exact(Pattern::Exact(s.clone())),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => exact(Pattern::Prefix(s.clone())),
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => exact(Pattern::Suffix(s.clone())),
        Some(HeaderMatchSpecifier::ContainsMatch(s)) => exact(Pattern::Contains(s.clone())),
        Some(HeaderMatchSpecifier::StringMatch(m)) => Some(string(m, c)?),
        _ => {
            return Err(c.no(format!(
                "header {}: only present, exact, prefix, suffix and contains matches are supported",
                h.name
            )));
        }
    };
    Ok(plain::HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        value,
        invert: h.invert_match,
    })
}

fn permission(p: &rbac::Permission, c: &Ctx<'_>) -> Result<plain::Permission, Rejection> {
    use permission::Rule;
    use plain::Permission as P;
    let all = |v: &[rbac::Permission]| {
        v.iter()
            .map(|p| permission(p, c))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match &p.rule {
        Some(Rule::Any(true)) => P::Any,
        Some(Rule::AndRules(s)) => P::And(all(&s.rules)?),
        Some(Rule::OrRules(s)) => P::Or(all(&s.rules)?),
        Some(Rule::NotRule(p)) => P::Not(Box::new(permission(p, c)?)),
        Some(Rule::Header(h)) => P::Header(header(h, c)?),
        Some(Rule::UrlPath(m)) => match &m.rule {
            Some(path_matcher::Rule::Path(s)) => P::UrlPath(string(s, c)?),
            None => return Err(c.no("url_path needs a path matcher")),
        },
        Some(Rule::DestinationPort(port)) => P::DestinationPort(
            u16::try_from(*port)
                .map_err(|_| c.no(format!("destination_port {port} is out of range")))?,
        ),
        Some(Rule::DestinationIp(r)) => P::DestinationIp(cidr(r, c)?),
        Some(other) => {
            let name = format!("{other:?}");
            let name = name.split('(').next().unwrap_or_default();
            return Err(c.no(format!("permission {name} is not supported")));
        }
        None => return Err(c.no("a permission needs a rule")),
    })
}

fn principal(p: &rbac::Principal, c: &Ctx<'_>) -> Result<plain::Principal, Rejection> {
    use plain::Principal as P;
    use principal::Identifier;
    let all = |v: &[rbac::Principal]| {
        v.iter()
            .map(|p| principal(p, c))
            .collect::<Result<Vec<_>, _>>()
    };
    #[allow(deprecated)]
    Ok(match &p.identifier {
        Some(Identifier::Any(true)) => P::Any,
        Some(Identifier::AndIds(s)) => P::And(all(&s.ids)?),
        Some(Identifier::OrIds(s)) => P::Or(all(&s.ids)?),
        Some(Identifier::NotId(p)) => P::Not(Box::new(principal(p, c)?)),
        Some(Identifier::Authenticated(a)) => P::Authenticated(
            a.principal_name
                .as_ref()
                .map(|m| string(m, c))
                .transpose()?,
        ),
        // `source_ip` is the deprecated name of `direct_remote_ip`.
        Some(Identifier::SourceIp(r) | Identifier::DirectRemoteIp(r)) => {
            P::DirectRemoteIp(cidr(r, c)?)
        }
        Some(Identifier::RemoteIp(r)) => P::RemoteIp(cidr(r, c)?),
        Some(Identifier::Header(h)) => P::Header(header(h, c)?),
        Some(other) => {
            let name = format!("{other:?}");
            let name = name.split('(').next().unwrap_or_default();
            return Err(c.no(format!("principal {name} is not supported")));
        }
        None => return Err(c.no("a principal needs an identifier")),
    })
}

/// `None` when the filter has no rules, which Envoy takes as allowing everything.
fn rules(r: Option<&rbac::Rbac>, c: &Ctx<'_>) -> Result<Option<plain::Rbac>, Rejection> {
    let Some(r) = r else { return Ok(None) };
    if r.audit_logging_options.is_some() {
        return Err(c.no("audit_logging_options is not supported"));
    }
    let action = match rbac::rbac::Action::try_from(r.action) {
        Ok(rbac::rbac::Action::Allow) => plain::RbacAction::Allow,
        Ok(rbac::rbac::Action::Deny) => plain::RbacAction::Deny,
        Ok(rbac::rbac::Action::Log) => plain::RbacAction::Log,
        Err(_) => return Err(c.no(format!("unknown action {}", r.action))),
    };
    // Envoy keeps policies in a map; sorted names make the decision and its report deterministic.
    let mut names: Vec<&String> = r.policies.keys().collect();
    names.sort();
    let mut policies = Vec::new();
    for name in names {
        let p = &r.policies[name];
        if p.condition.is_some() || p.checked_condition.is_some() {
            return Err(c.no(format!("policy {name}: CEL conditions are not supported")));
        }
        policies.push((
            name.clone(),
            plain::RbacPolicy {
                permissions: p
                    .permissions
                    .iter()
                    .map(|x| permission(x, c))
                    .collect::<Result<_, _>>()?,
                principals: p
                    .principals
                    .iter()
                    .map(|x| principal(x, c))
                    .collect::<Result<_, _>>()?,
            },
        ));
    }
    Ok(Some(plain::Rbac { action, policies }))
}

pub(super) fn http(
    f: &HttpRbac,
    kind: &'static str,
    name: &str,
    field: String,
) -> Result<Option<plain::Rbac>, Rejection> {
    let c = Ctx { kind, name, field };
    let supported = HttpRbac {
        rules: f.rules.clone(),
        rules_stat_prefix: f.rules_stat_prefix.clone(),
        ..Default::default()
    };
    if *f != supported {
        return Err(
            c.no("only rules are supported in the HTTP RBAC filter (no shadow rules or matchers)")
        );
    }
    rules(f.rules.as_ref(), &c)
}

pub(super) fn network(
    f: &NetworkRbac,
    kind: &'static str,
    name: &str,
    field: String,
) -> Result<Option<plain::Rbac>, Rejection> {
    let c = Ctx { kind, name, field };
    let supported = NetworkRbac {
        rules: f.rules.clone(),
        stat_prefix: f.stat_prefix.clone(),
        ..Default::default()
    };
    if *f != supported {
        return Err(c.no("only rules and stat_prefix are supported in the network RBAC filter (decided once, on connect)"));
    }
    rules(f.rules.as_ref(), &c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_xds::pb::envoy::r#type::matcher::v3::MetadataMatcher;

    fn filter(permission: permission::Rule, principal: principal::Identifier) -> HttpRbac {
        HttpRbac {
            rules: Some(rbac::Rbac {
                action: rbac::rbac::Action::Deny as i32,
                policies: [(
                    "ns[demo]-policy[p]-rule[0]".to_string(),
                    rbac::Policy {
                        permissions: vec![rbac::Permission {
                            rule: Some(permission),
                        }],
                        principals: vec![rbac::Principal {
                            identifier: Some(principal),
                        }],
                        ..Default::default()
                    },
                )]
                .into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    #[allow(deprecated)]
    fn what_cannot_be_evaluated_exactly_is_rejected_by_name() {
        let any_id = principal::Identifier::Any(true);
        let ok = http(
            &filter(permission::Rule::DestinationPort(8080), any_id.clone()),
            "listener",
            "l",
            "http_filters[0]".into(),
        )
        .expect("supported");
        assert_eq!(
            ok.map(|r| r.policies[0].1.permissions.clone()),
            Some(vec![plain::Permission::DestinationPort(8080)])
        );
        let cases = [
            (
                filter(
                    permission::Rule::Metadata(MetadataMatcher::default()),
                    any_id.clone(),
                ),
                "permission Metadata",
            ),
            (
                filter(
                    permission::Rule::Any(true),
                    principal::Identifier::Metadata(MetadataMatcher::default()),
                ),
                "principal Metadata",
            ),
            (
                filter(
                    permission::Rule::UrlPath(
                        weft_xds::pb::envoy::r#type::matcher::v3::PathMatcher {
                            rule: Some(path_matcher::Rule::Path(StringMatcher {
                                match_pattern: Some(string_matcher::MatchPattern::SafeRegex(
                                    Default::default(),
                                )),
                                ignore_case: false,
                            })),
                        },
                    ),
                    any_id.clone(),
                ),
                "string matchers",
            ),
            (
                HttpRbac {
                    shadow_rules: Some(rbac::Rbac::default()),
                    ..filter(permission::Rule::Any(true), any_id)
                },
                "shadow",
            ),
        ];
        for (f, want) in cases {
            let err = http(&f, "listener", "l", "http_filters[0]".into()).expect_err(want);
            assert!(err.to_string().contains(want), "{err}");
            assert!(
                err.to_string().starts_with("listener l: http_filters[0]"),
                "{err}"
            );
        }
    }
}
