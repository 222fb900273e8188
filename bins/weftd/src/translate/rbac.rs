//! AuthorizationPolicy on the wire: weft-policy compiles a workload's policies into RBAC filters as
//! istiod does, and this writes them as Envoy's `envoy.filters.http.rbac` (HTTP chains, before the
//! router) and `envoy.filters.network.rbac` (TCP chains, before the TCP proxy).

use super::*;
use weft_policy::rbac::{self as plain, Pattern};
use weft_xds::pb::envoy::{
    config::{
        core::v3::CidrRange,
        rbac::v3::{self as rbac, permission, principal},
    },
    extensions::filters::{
        http::rbac::v3::Rbac as HttpRbac, network::rbac::v3::Rbac as NetworkRbac,
    },
    r#type::matcher::v3::{PathMatcher, path_matcher},
};

const HTTP_RBAC: &str = "envoy.filters.http.rbac";
const NETWORK_RBAC: &str = "envoy.filters.network.rbac";

fn string(m: &plain::StringMatch) -> StringMatcher {
    let pattern = match &m.pattern {
        Pattern::Exact(s) => string_matcher::MatchPattern::Exact(s.clone()),
        Pattern::Prefix(s) => string_matcher::MatchPattern::Prefix(s.clone()),
        Pattern::Suffix(s) => string_matcher::MatchPattern::Suffix(s.clone()),
        Pattern::Contains(s) => string_matcher::MatchPattern::Contains(s.clone()),
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: m.ignore_case,
    }
}

fn cidr(c: &plain::Cidr) -> CidrRange {
    CidrRange {
        address_prefix: c.address.to_string(),
        prefix_len: Some(wkt::UInt32Value {
            value: c.prefix_len,
        }),
    }
}

fn header(h: &plain::HeaderMatch) -> HeaderMatcher {
    HeaderMatcher {
        name: h.name.clone(),
        invert_match: h.invert,
        header_match_specifier: Some(match &h.value {
            None => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
            Some(m) => header_matcher::HeaderMatchSpecifier::StringMatch(string(m)),
        }),
        ..Default::default()
    }
}

fn permission(p: &plain::Permission) -> rbac::Permission {
    use permission::Rule;
    use plain::Permission as P;
    let set = |v: &[P]| permission::Set {
        rules: v.iter().map(permission).collect(),
    };
    let rule = match p {
        P::Any => Rule::Any(true),
        P::And(v) => Rule::AndRules(set(v)),
        P::Or(v) => Rule::OrRules(set(v)),
        P::Not(p) => Rule::NotRule(Box::new(permission(p))),
        P::Header(h) => Rule::Header(header(h)),
        P::UrlPath(m) => Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(string(m))),
        }),
        P::DestinationPort(port) => Rule::DestinationPort(u32::from(*port)),
        P::DestinationIp(c) => Rule::DestinationIp(cidr(c)),
    };
    rbac::Permission { rule: Some(rule) }
}

fn principal(p: &plain::Principal) -> rbac::Principal {
    use plain::Principal as P;
    use principal::Identifier;
    let set = |v: &[P]| principal::Set {
        ids: v.iter().map(principal).collect(),
    };
    let id = match p {
        P::Any => Identifier::Any(true),
        P::And(v) => Identifier::AndIds(set(v)),
        P::Or(v) => Identifier::OrIds(set(v)),
        P::Not(p) => Identifier::NotId(Box::new(principal(p))),
        P::Authenticated(m) => Identifier::Authenticated(principal::Authenticated {
            principal_name: m.as_ref().map(string),
        }),
        P::DirectRemoteIp(c) => Identifier::DirectRemoteIp(cidr(c)),
        P::RemoteIp(c) => Identifier::RemoteIp(cidr(c)),
        P::Header(h) => Identifier::Header(header(h)),
    };
    rbac::Principal {
        identifier: Some(id),
    }
}

fn rules(r: &plain::Rbac) -> rbac::Rbac {
    rbac::Rbac {
        action: match r.action {
            plain::RbacAction::Allow => rbac::rbac::Action::Allow,
            plain::RbacAction::Deny => rbac::rbac::Action::Deny,
            plain::RbacAction::Log => rbac::rbac::Action::Log,
        } as i32,
        policies: r
            .policies
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    rbac::Policy {
                        permissions: p.permissions.iter().map(permission).collect(),
                        principals: p.principals.iter().map(principal).collect(),
                        ..Default::default()
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

pub(super) fn http_filters(filters: &[plain::Rbac]) -> Vec<HttpFilter> {
    filters
        .iter()
        .map(|r| HttpFilter {
            name: HTTP_RBAC.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack(&HttpRbac {
                rules: Some(rules(r)),
                ..Default::default()
            }))),
            ..Default::default()
        })
        .collect()
}

pub(super) fn network_filters(filters: &[plain::Rbac]) -> Vec<Filter> {
    filters
        .iter()
        .map(|r| Filter {
            name: NETWORK_RBAC.into(),
            config_type: Some(filter::ConfigType::TypedConfig(pack(&NetworkRbac {
                rules: Some(rules(r)),
                stat_prefix: "tcp.".into(),
                ..Default::default()
            }))),
        })
        .collect()
}
