//! Cases written from Istio's AuthorizationPolicy reference and tasks.

use super::*;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn http(principal: Option<&str>, method: &str, path: &str) -> Request {
    Request {
        source_principal: principal.map(str::to_string),
        source_ip: "10.1.2.3".parse().ok(),
        remote_ip: None,
        destination_ip: None,
        destination_port: 8000,
        http: Some(HttpRequest {
            host: "httpbin.foo.svc.cluster.local:8000".into(),
            method: method.into(),
            path: path.into(),
            headers: vec![("version".into(), "v1".into())],
        }),
    }
}

fn tcp(principal: Option<&str>, port: u16) -> Request {
    Request {
        source_principal: principal.map(str::to_string),
        source_ip: "10.1.2.3".parse().ok(),
        remote_ip: None,
        destination_ip: None,
        destination_port: port,
        http: None,
    }
}

fn policy(name: &str, action: Action, rules: Vec<Rule>) -> Policy {
    Policy {
        name: name.into(),
        action,
        rules,
    }
}

const SLEEP: &str = "cluster.local/ns/default/sa/sleep";
const OTHER: &str = "cluster.local/ns/bar/sa/other";

#[test]
fn evaluation_order_and_the_empty_cases() {
    let allow_all = policy("foo/allow-all", Action::Allow, vec![Rule::default()]);
    let allow_nothing = policy("foo/allow-nothing", Action::Allow, vec![]);
    let deny_nothing = policy("foo/deny-nothing", Action::Deny, vec![]);
    let deny_admin = policy(
        "foo/deny-admin",
        Action::Deny,
        vec![Rule {
            to: vec![Operation {
                paths: s(&["/admin*"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    let req = http(Some(SLEEP), "GET", "/ip");
    let admin = http(Some(SLEEP), "GET", "/admin/users");
    let cases: Vec<(&str, Vec<Policy>, &Request, bool)> = vec![
        ("no policy allows", vec![], &req, true),
        (
            "an ALLOW with one empty rule allows all",
            vec![allow_all.clone()],
            &req,
            true,
        ),
        (
            "an ALLOW with no rules denies all",
            vec![allow_nothing.clone()],
            &req,
            false,
        ),
        (
            "a DENY with no rules denies nothing",
            vec![deny_nothing],
            &req,
            true,
        ),
        ("DENY matches", vec![deny_admin.clone()], &admin, false),
        ("DENY does not match", vec![deny_admin.clone()], &req, true),
        (
            "DENY comes before ALLOW",
            vec![allow_all.clone(), deny_admin.clone()],
            &admin,
            false,
        ),
        (
            "any matching ALLOW is enough",
            vec![allow_nothing, allow_all],
            &req,
            true,
        ),
    ];
    for (name, policies, req, want) in cases {
        assert_eq!(evaluate(&policies, req).0.allowed(), want, "{name}");
    }
}

#[test]
fn decisions_name_the_policy_and_rule() {
    let deny = policy(
        "foo/deny-admin",
        Action::Deny,
        vec![Rule::default(), Rule::default()],
    );
    let (d, _) = evaluate(&[deny], &http(None, "GET", "/"));
    assert_eq!(
        d,
        Decision::Deny {
            by: Some(Matched {
                policy: "foo/deny-admin".into(),
                rule: 0
            })
        }
    );
    assert_eq!(d.reason(), "denied by foo/deny-admin rule 0");
    let allow = policy(
        "foo/only-get",
        Action::Allow,
        vec![Rule {
            to: vec![Operation {
                methods: s(&["GET"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    assert_eq!(
        evaluate(std::slice::from_ref(&allow), &http(None, "POST", "/"))
            .0
            .reason(),
        "denied: no ALLOW policy matched"
    );
    assert_eq!(
        evaluate(&[allow], &http(None, "GET", "/")).0.reason(),
        "allowed by foo/only-get rule 0"
    );
}

#[test]
fn rule_fields_table() {
    // Each case: one ALLOW rule, a request, and whether the rule lets it through.
    let from = |src: Source| Rule {
        from: vec![src],
        ..Default::default()
    };
    let to = |op: Operation| Rule {
        to: vec![op],
        ..Default::default()
    };
    let when = |key: &str, values: &[&str], not_values: &[&str]| Rule {
        when: vec![Condition {
            key: key.into(),
            values: s(values),
            not_values: s(not_values),
        }],
        ..Default::default()
    };
    let cases: Vec<(&str, Rule, Request, bool)> = vec![
        (
            "principals exact",
            from(Source {
                principals: s(&[SLEEP]),
                ..Default::default()
            }),
            http(Some(SLEEP), "GET", "/"),
            true,
        ),
        (
            "principals other",
            from(Source {
                principals: s(&[SLEEP]),
                ..Default::default()
            }),
            http(Some(OTHER), "GET", "/"),
            false,
        ),
        (
            "principals * needs an authenticated peer",
            from(Source {
                principals: s(&["*"]),
                ..Default::default()
            }),
            http(None, "GET", "/"),
            false,
        ),
        (
            "principals suffix",
            from(Source {
                principals: s(&["*/sa/sleep"]),
                ..Default::default()
            }),
            http(Some(SLEEP), "GET", "/"),
            true,
        ),
        (
            "notPrincipals",
            from(Source {
                not_principals: s(&[SLEEP]),
                ..Default::default()
            }),
            http(Some(SLEEP), "GET", "/"),
            false,
        ),
        (
            "namespaces",
            from(Source {
                namespaces: s(&["default"]),
                ..Default::default()
            }),
            http(Some(SLEEP), "GET", "/"),
            true,
        ),
        (
            "notNamespaces",
            from(Source {
                not_namespaces: s(&["default"]),
                ..Default::default()
            }),
            http(Some(SLEEP), "GET", "/"),
            false,
        ),
        (
            "namespaces without a peer identity",
            from(Source {
                namespaces: s(&["default"]),
                ..Default::default()
            }),
            http(None, "GET", "/"),
            false,
        ),
        (
            "ipBlocks cidr",
            from(Source {
                ip_blocks: s(&["10.1.0.0/16"]),
                ..Default::default()
            }),
            http(None, "GET", "/"),
            true,
        ),
        (
            "ipBlocks single ip",
            from(Source {
                ip_blocks: s(&["10.1.2.4"]),
                ..Default::default()
            }),
            http(None, "GET", "/"),
            false,
        ),
        (
            "notIpBlocks",
            from(Source {
                not_ip_blocks: s(&["10.0.0.0/8"]),
                ..Default::default()
            }),
            http(None, "GET", "/"),
            false,
        ),
        (
            "remoteIpBlocks falls back to the peer",
            from(Source {
                remote_ip_blocks: s(&["10.1.2.3/32"]),
                ..Default::default()
            }),
            http(None, "GET", "/"),
            true,
        ),
        (
            "methods",
            to(Operation {
                methods: s(&["GET", "HEAD"]),
                ..Default::default()
            }),
            http(None, "GET", "/"),
            true,
        ),
        (
            "notMethods",
            to(Operation {
                not_methods: s(&["GET"]),
                ..Default::default()
            }),
            http(None, "GET", "/"),
            false,
        ),
        (
            "paths prefix",
            to(Operation {
                paths: s(&["/info*"]),
                ..Default::default()
            }),
            http(None, "GET", "/info/x"),
            true,
        ),
        (
            "paths exact",
            to(Operation {
                paths: s(&["/info"]),
                ..Default::default()
            }),
            http(None, "GET", "/info/x"),
            false,
        ),
        (
            "paths suffix",
            to(Operation {
                paths: s(&["*/x"]),
                ..Default::default()
            }),
            http(None, "GET", "/info/x"),
            true,
        ),
        (
            "notPaths",
            to(Operation {
                not_paths: s(&["/healthz"]),
                ..Default::default()
            }),
            http(None, "GET", "/healthz"),
            false,
        ),
        (
            "hosts without the port",
            to(Operation {
                hosts: s(&["httpbin.foo.svc.cluster.local"]),
                ..Default::default()
            }),
            http(None, "GET", "/"),
            true,
        ),
        (
            "hosts suffix, any case",
            to(Operation {
                hosts: s(&["*.FOO.svc.cluster.local"]),
                ..Default::default()
            }),
            http(None, "GET", "/"),
            true,
        ),
        (
            "ports",
            to(Operation {
                ports: s(&["8000"]),
                ..Default::default()
            }),
            http(None, "GET", "/"),
            true,
        ),
        (
            "notPorts",
            to(Operation {
                not_ports: s(&["8000"]),
                ..Default::default()
            }),
            http(None, "GET", "/"),
            false,
        ),
        (
            "every field of an operation must match",
            to(Operation {
                methods: s(&["GET"]),
                paths: s(&["/admin"]),
                ..Default::default()
            }),
            http(None, "GET", "/ip"),
            false,
        ),
        (
            "when header",
            when("request.headers[version]", &["v1", "v2"], &[]),
            http(None, "GET", "/"),
            true,
        ),
        (
            "when header, notValues",
            when("request.headers[version]", &[], &["v1"]),
            http(None, "GET", "/"),
            false,
        ),
        (
            "when absent header",
            when("request.headers[x-token]", &["*"], &[]),
            http(None, "GET", "/"),
            false,
        ),
        (
            "when source.namespace",
            when("source.namespace", &["default"], &[]),
            http(Some(SLEEP), "GET", "/"),
            true,
        ),
        (
            "when source.principal",
            when("source.principal", &[OTHER], &[]),
            http(Some(SLEEP), "GET", "/"),
            false,
        ),
        (
            "when destination.port",
            when("destination.port", &["8000"], &[]),
            http(None, "GET", "/"),
            true,
        ),
        (
            "when source.ip cidr",
            when("source.ip", &["10.1.2.0/24"], &[]),
            http(None, "GET", "/"),
            true,
        ),
    ];
    for (name, rule, req, want) in cases {
        let p = policy("foo/p", Action::Allow, vec![rule]);
        assert_eq!(evaluate(&[p], &req).0.allowed(), want, "{name}");
    }
}

#[test]
fn tcp_drops_http_fields_the_safe_way() {
    let get_only = Rule {
        to: vec![Operation {
            methods: s(&["GET"]),
            ports: s(&["3306"]),
            ..Default::default()
        }],
        ..Default::default()
    };
    let port_only = Rule {
        to: vec![Operation {
            ports: s(&["3306"]),
            ..Default::default()
        }],
        ..Default::default()
    };
    // ALLOW: a rule with HTTP-only fields cannot match a TCP connection, so it allows nothing.
    assert!(
        !evaluate(
            &[policy(
                "db/allow-get",
                Action::Allow,
                vec![get_only.clone()]
            )],
            &tcp(Some(SLEEP), 3306)
        )
        .0
        .allowed()
    );
    assert!(
        evaluate(
            &[policy("db/allow-port", Action::Allow, vec![port_only])],
            &tcp(Some(SLEEP), 3306)
        )
        .0
        .allowed()
    );
    // DENY: the HTTP-only fields are dropped, so the rule denies the whole port.
    assert!(
        !evaluate(
            &[policy("db/deny-get", Action::Deny, vec![get_only.clone()])],
            &tcp(Some(SLEEP), 3306)
        )
        .0
        .allowed()
    );
    assert!(
        evaluate(
            &[policy("db/deny-get", Action::Deny, vec![get_only])],
            &tcp(Some(SLEEP), 5432)
        )
        .0
        .allowed()
    );
}

#[test]
fn audit_is_reported_and_changes_nothing() {
    let audit = policy("foo/audit-all", Action::Audit, vec![Rule::default()]);
    let (d, audited) = evaluate(&[audit], &http(None, "GET", "/"));
    assert!(d.allowed());
    assert_eq!(
        audited,
        [Matched {
            policy: "foo/audit-all".into(),
            rule: 0
        }]
    );
}

#[test]
fn rbac_names_round_trip_and_filters_run_in_envoys_order() {
    use crate::rbac::{Rbac, RbacAction, RbacPolicy, decide, parse_policy_name, policy_name};
    let name = policy_name("demo/deny-admin", 2);
    assert_eq!(name, "ns[demo]-policy[deny-admin]-rule[2]");
    assert_eq!(
        parse_policy_name(&name),
        Matched {
            policy: "demo/deny-admin".into(),
            rule: 2
        }
    );
    let all = |action, name: &str| Rbac {
        action,
        policies: vec![(
            name.into(),
            RbacPolicy {
                permissions: vec![rbac::Permission::Any],
                principals: vec![rbac::Principal::Any],
            },
        )],
    };
    let req = tcp(None, 80);
    let (d, audited) = decide(
        &[
            all(RbacAction::Log, "ns[a]-policy[audit]-rule[0]"),
            all(RbacAction::Deny, "ns[a]-policy[deny]-rule[0]"),
            all(RbacAction::Allow, "ns[a]-policy[allow]-rule[0]"),
        ],
        &req,
    );
    assert_eq!(d.reason(), "denied by a/deny rule 0");
    assert_eq!(audited.len(), 1, "LOG reports and goes on");
    let empty_allow = Rbac {
        action: RbacAction::Allow,
        policies: vec![],
    };
    assert!(
        !decide(&[empty_allow], &req).0.allowed(),
        "ALLOW with nothing denies all"
    );
    assert!(decide(&[], &req).0.allowed());
    let c = rbac::Cidr::parse("10.0.0.0/8").expect("cidr");
    assert!(c.contains("10.9.8.7".parse().expect("ip")));
    assert!(!c.contains("11.0.0.1".parse().expect("ip")));
    assert!(rbac::Cidr::parse("10.0.0.0/33").is_none());
}
