use http::{HeaderMap, Method, Uri};

use super::*;
use crate::model::{
    HeaderMatch, PathMatchWrapper, QueryMatch, RouteMatcher, StringMatch, VirtualHostConfig,
    WeightedCluster,
};

fn route(
    path: PathMatch,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
    case_sensitive: bool,
) -> RouteConfig {
    RouteConfig {
        name: String::new(),
        matcher: RouteMatcher {
            path: PathMatchWrapper(path),
            case_sensitive,
            headers,
            query,
        },
        action: RouteAction::Direct {
            status: 200,
            body: String::new(),
        },
        headers: HeaderOps::default(),
    }
}

fn regex(r: &str) -> regex::Regex {
    regex::Regex::new(&format!("^(?:{r})$")).expect("regex")
}

#[test]
fn route_matching_table() {
    let hdr = |name: &str, value: Option<StringMatch>, invert| HeaderMatch {
        name: name.into(),
        value,
        invert,
    };
    let mut headers = HeaderMap::new();
    headers.insert("end-user", "tester".parse().expect("value"));
    let cases: Vec<(&str, RouteConfig, &str, Method, bool)> = vec![
        (
            "prefix hit",
            route(PathMatch::Prefix("/api".into()), vec![], vec![], true),
            "/api/v1",
            Method::GET,
            true,
        ),
        (
            "prefix miss",
            route(PathMatch::Prefix("/api".into()), vec![], vec![], true),
            "/web",
            Method::GET,
            false,
        ),
        (
            "exact hit",
            route(PathMatch::Exact("/health".into()), vec![], vec![], true),
            "/health?x=1",
            Method::GET,
            true,
        ),
        (
            "exact miss",
            route(PathMatch::Exact("/health".into()), vec![], vec![], true),
            "/healthz",
            Method::GET,
            false,
        ),
        (
            "regex is anchored",
            route(PathMatch::Regex(regex("/v[0-9]+")), vec![], vec![], true),
            "/v12/x",
            Method::GET,
            false,
        ),
        (
            "regex hit",
            route(PathMatch::Regex(regex("/v[0-9]+/.*")), vec![], vec![], true),
            "/v12/x",
            Method::GET,
            true,
        ),
        (
            "case-insensitive",
            route(PathMatch::Prefix("/API".into()), vec![], vec![], false),
            "/api/x",
            Method::GET,
            true,
        ),
        (
            "header exact",
            route(
                PathMatch::Prefix("/".into()),
                vec![hdr(
                    "end-user",
                    Some(StringMatch::Exact("tester".into())),
                    false,
                )],
                vec![],
                true,
            ),
            "/",
            Method::GET,
            true,
        ),
        (
            "header absent",
            route(
                PathMatch::Prefix("/".into()),
                vec![hdr("x-other", None, false)],
                vec![],
                true,
            ),
            "/",
            Method::GET,
            false,
        ),
        (
            "header inverted",
            route(
                PathMatch::Prefix("/".into()),
                vec![hdr("end-user", None, true)],
                vec![],
                true,
            ),
            "/",
            Method::GET,
            false,
        ),
        (
            "method",
            route(
                PathMatch::Prefix("/".into()),
                vec![hdr(
                    ":method",
                    Some(StringMatch::Exact("POST".into())),
                    false,
                )],
                vec![],
                true,
            ),
            "/",
            Method::POST,
            true,
        ),
        (
            "method miss",
            route(
                PathMatch::Prefix("/".into()),
                vec![hdr(
                    ":method",
                    Some(StringMatch::Exact("POST".into())),
                    false,
                )],
                vec![],
                true,
            ),
            "/",
            Method::GET,
            false,
        ),
        (
            "query",
            route(
                PathMatch::Prefix("/".into()),
                vec![],
                vec![QueryMatch {
                    name: "debug".into(),
                    value: Some(StringMatch::Exact("1".into())),
                }],
                true,
            ),
            "/?a=b&debug=1",
            Method::GET,
            true,
        ),
        (
            "query miss",
            route(
                PathMatch::Prefix("/".into()),
                vec![],
                vec![QueryMatch {
                    name: "debug".into(),
                    value: None,
                }],
                true,
            ),
            "/?a=b",
            Method::GET,
            false,
        ),
    ];
    for (name, r, uri, method, want) in cases {
        let uri: Uri = uri.parse().expect("uri");
        assert_eq!(
            route_matches(&r, &method, &uri, &headers, "backend:9080"),
            want,
            "{name}"
        );
    }
}

#[test]
fn virtual_hosts_are_chosen_by_authority_like_envoy() {
    let vh = |name: &str, domains: &[&str]| VirtualHostConfig {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes: vec![],
    };
    let table = RouteTable {
        name: "80".into(),
        virtual_hosts: vec![
            vh("any", &["*"]),
            vh("suffix", &["*.example.com"]),
            vh("backend", &["backend", "backend:9080"]),
        ],
    };
    for (authority, want) in [
        ("backend:9080", "backend"),
        ("backend", "backend"),
        ("a.example.com", "suffix"),
        ("other", "any"),
    ] {
        assert_eq!(
            select_virtual_host(&table, authority).map(|v| v.name.as_str()),
            Some(want),
            "{authority}"
        );
    }
}

#[test]
fn prefix_rewrite_replaces_the_matched_prefix() {
    let r = route(PathMatch::Prefix("/old".into()), vec![], vec![], true);
    let fwd = ForwardConfig {
        clusters: vec![WeightedCluster {
            name: "c".into(),
            weight: 1,
            headers: HeaderOps::default(),
        }],
        prefix_rewrite: Some("/new".into()),
        host_rewrite: None,
        timeout: None,
        retry: None,
    };
    let uri: Uri = "/old/items?x=1".parse().expect("uri");
    assert_eq!(rewrite_path(&uri, &r, &fwd), "/new/items?x=1");
}
