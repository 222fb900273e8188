//! `weftctl proxy-config`: one proxy's applied config, as its admin `/config_dump` has it (15000, on the
//! pod's loopback only), read through the API server's port-forward as istioctl does, or at an
//! address for a proxy on this machine. `-o short` prints a table per section; `json` and `yaml`
//! print the section as the proxy dumped it.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::{Value, json};

use crate::{install::KubeArgs, proxy_status::table};

/// The proxy's admin port, where `/config_dump` is.
const ADMIN_PORT: u16 = 15000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Cluster,
    Listener,
    Route,
    Endpoint,
    Secret,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Short,
    Json,
    Yaml,
}

#[derive(Clone, Debug, clap::Args)]
pub struct ProxyConfigArgs {
    #[arg(value_enum)]
    pub section: Section,
    /// The pod, `POD[.NAMESPACE]` (not needed with `--admin`).
    #[arg(required_unless_present = "admin")]
    pub pod: Option<String>,
    /// The pod's namespace, when `POD` does not name it.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    #[arg(short = 'o', long, value_enum, default_value = "short")]
    pub output: Output,
    /// Read the proxy admin at this address instead of port-forwarding to a pod
    /// (`http://127.0.0.10:15000`, which `weftctl demo` prints).
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// The proxy's `/config_dump`.
pub async fn fetch(args: &ProxyConfigArgs) -> anyhow::Result<Value> {
    let text = match (&args.admin, &args.pod) {
        (Some(admin), _) => {
            let url = format!("{}/config_dump", admin.trim_end_matches('/'));
            crate::http_get(&url)
                .await
                .with_context(|| format!("cannot read the proxy's config at {url}"))?
        }
        (None, Some(pod)) => {
            let (name, namespace) = match pod.split_once('.') {
                Some((name, ns)) => (name, ns),
                None => (pod.as_str(), args.namespace.as_str()),
            };
            port_forwarded_dump(&args.kube, name, namespace).await?
        }
        (None, None) => anyhow::bail!("name a pod (POD[.NAMESPACE]) or pass --admin"),
    };
    serde_json::from_str(&text).context("the proxy's /config_dump is not JSON")
}

/// `GET /config_dump` over a port-forward to the pod's 15000, as istioctl reaches Envoy's admin.
async fn port_forwarded_dump(
    kube: &KubeArgs,
    name: &str,
    namespace: &str,
) -> anyhow::Result<String> {
    let client = kube.client().await?;
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    pods.get(name).await.map_err(|e| {
        anyhow::anyhow!(
            "pod {namespace}/{name}: {}",
            crate::install::api_message(&e)
        )
    })?;
    let mut forwarder = pods
        .portforward(name, &[ADMIN_PORT])
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot port-forward to {namespace}/{name}:{ADMIN_PORT} (the API server reaches the pod through its node's kubelet): {e}"
            )
        })?;
    let stream = forwarder
        .take_stream(ADMIN_PORT)
        .context("the port-forward gave no stream for 15000")?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("HTTP over the port-forward")?;
    let connection = tokio::spawn(connection);
    let request = http::Request::get("/config_dump")
        .header(http::header::HOST, "localhost")
        .body(Empty::<bytes::Bytes>::new())?;
    let answer = async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::ensure!(
            status.is_success(),
            "the proxy's admin answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    let result = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .map_err(|_| anyhow::anyhow!("the proxy's admin did not answer within 10s"))?;
    connection.abort();
    forwarder.abort();
    result.with_context(|| format!("{namespace}/{name}:{ADMIN_PORT}/config_dump"))
}

/// One section of the dump, by its Envoy type.
fn dump_section<'a>(dump: &'a Value, type_suffix: &str, field: &str) -> &'a Value {
    dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| {
            c["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with(type_suffix))
        })
        .map_or(&Value::Null, |c| &c[field])
}

fn clusters(dump: &Value) -> &Value {
    dump_section(dump, "ClustersConfigDump", "dynamic_active_clusters")
}

fn listeners(dump: &Value) -> &Value {
    dump_section(dump, "ListenersConfigDump", "dynamic_listeners")
}

fn routes(dump: &Value) -> &Value {
    dump_section(dump, "RoutesConfigDump", "dynamic_route_configs")
}

fn secrets(dump: &Value) -> &Value {
    dump_section(dump, "SecretsConfigDump", "dynamic_active_secrets")
}

fn items(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The selected section as the proxy dumped it, for `-o json|yaml`.
pub fn selected(dump: &Value, section: Section) -> Value {
    match section {
        Section::All => dump.clone(),
        Section::Cluster => Value::Array(
            items(clusters(dump))
                .map(|c| c["cluster"].clone())
                .collect(),
        ),
        Section::Endpoint => Value::Array(
            items(clusters(dump))
                .map(|c| json!({"cluster": c["cluster"]["name"], "endpoints": c["endpoints"]}))
                .collect(),
        ),
        Section::Listener => listeners(dump).clone(),
        Section::Route => routes(dump).clone(),
        Section::Secret => secrets(dump).clone(),
    }
}

pub fn render(dump: &Value, section: Section, output: Output) -> anyhow::Result<String> {
    match output {
        Output::Json => Ok(serde_json::to_string_pretty(&selected(dump, section))? + "\n"),
        Output::Yaml => serde_saphyr::to_string(&selected(dump, section))
            .context("cannot write the config as YAML"),
        Output::Short => Ok(match section {
            Section::Cluster => cluster_table(dump),
            Section::Listener => listener_table(dump),
            Section::Route => route_table(dump),
            Section::Endpoint => endpoint_table(dump),
            Section::Secret => secret_table(dump, SystemTime::now()),
            Section::All => [
                cluster_table(dump),
                listener_table(dump),
                route_table(dump),
                endpoint_table(dump),
                secret_table(dump, SystemTime::now()),
            ]
            .join("\n"),
        }),
    }
}

/// Istio's cluster names, `outbound|9080|v2|reviews.default.svc.cluster.local`, in their parts:
/// (service, port, subset, direction).
fn cluster_parts(cluster: &Value) -> [String; 4] {
    let name = text(&cluster["name"]);
    let service = || {
        cluster["services"][0]["host"]
            .as_str()
            .unwrap_or("-")
            .to_string()
    };
    match name.split('|').collect::<Vec<_>>().as_slice() {
        [direction, port, subset, host] => [
            if host.is_empty() {
                service()
            } else {
                host.to_string()
            },
            port.to_string(),
            if subset.is_empty() { "-" } else { subset }.to_string(),
            direction.to_string(),
        ],
        _ => [name.clone(), "-".into(), "-".into(), "-".into()],
    }
}

fn cluster_table(dump: &Value) -> String {
    let header = [
        "SERVICE FQDN",
        "PORT",
        "SUBSET",
        "DIRECTION",
        "LB",
        "ENDPOINTS",
    ]
    .map(String::from);
    let mut rows: Vec<[String; 6]> = items(clusters(dump))
        .map(|c| {
            let [service, port, subset, direction] = cluster_parts(&c["cluster"]);
            let endpoints: Vec<&Value> = items(&c["endpoints"]).collect();
            let healthy = endpoints
                .iter()
                .filter(|e| e["healthy"].as_bool().unwrap_or(false))
                .count();
            [
                service,
                port,
                subset,
                direction,
                text(&c["cluster"]["lb"]),
                format!("{healthy}/{} healthy", endpoints.len()),
            ]
        })
        .collect();
    rows.sort();
    table(std::iter::once(&header).chain(&rows))
}

/// What a filter chain hands its connections to.
fn chain_destination(chain: &Value) -> String {
    let kind = &chain["kind"];
    if let Some(http) = kind.get("Http") {
        let routes = &http["routes"];
        let name = routes
            .get("Rds")
            .map(text)
            .or_else(|| routes.get("Inline").map(|t| text(&t["name"])))
            .unwrap_or_else(|| "-".into());
        format!("Route: {name}")
    } else if let Some(tcp) = kind.get("Tcp") {
        let names: Vec<String> = items(&tcp["clusters"]).map(|c| text(&c["name"])).collect();
        format!("Cluster: {}", names.join(", "))
    } else {
        "-".into()
    }
}

fn chain_match(chain: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(t) = chain["transport_protocol"].as_str() {
        parts.push(format!("Trans: {t}"));
    }
    let alpn: Vec<String> = items(&chain["application_protocols"]).map(text).collect();
    if !alpn.is_empty() {
        parts.push(format!("App: {}", alpn.join(",")));
    }
    let sni: Vec<String> = items(&chain["server_names"]).map(text).collect();
    if !sni.is_empty() {
        parts.push(format!("SNI: {}", sni.join(",")));
    }
    if parts.is_empty() {
        "ALL".into()
    } else {
        parts.join("; ")
    }
}

fn listener_table(dump: &Value) -> String {
    let header = ["ADDRESS", "PORT", "MATCH", "DESTINATION"].map(String::from);
    let mut rows: Vec<[String; 4]> = Vec::new();
    for listener in items(listeners(dump)) {
        let address = text(&listener["address"]);
        let (ip, port) = address
            .rsplit_once(':')
            .map_or((address.clone(), "-".to_string()), |(i, p)| {
                (i.to_string(), p.to_string())
            });
        for chain in items(&listener["chains"]) {
            let chain_port = chain["destination_port"]
                .as_u64()
                .map_or_else(|| port.clone(), |p| p.to_string());
            rows.push([
                ip.clone(),
                chain_port,
                chain_match(chain),
                chain_destination(chain),
            ]);
        }
    }
    table(std::iter::once(&header).chain(&rows))
}

/// The route tables: RDS's, then those inline in a listener (every inbound port has one).
fn route_tables(dump: &Value) -> Vec<&Value> {
    let mut tables: Vec<&Value> = items(routes(dump)).collect();
    for listener in items(listeners(dump)) {
        for chain in items(&listener["chains"]) {
            if let Some(inline) = chain["kind"]["Http"]["routes"].get("Inline")
                && !tables.iter().any(|t| t["name"] == inline["name"])
            {
                tables.push(inline);
            }
        }
    }
    tables
}

fn path_match(matcher: &Value) -> String {
    let path = &matcher["path"];
    if let Some(p) = path.get("Prefix").and_then(Value::as_str) {
        format!("{p}*")
    } else if let Some(p) = path.get("Exact") {
        text(p)
    } else if let Some(p) = path.get("Regex") {
        format!("~{}", text(p))
    } else {
        text(path)
    }
}

fn route_destination(action: &Value) -> String {
    if let Some(forward) = action.get("Forward") {
        let clusters: Vec<String> = items(&forward["clusters"])
            .map(|c| match c["weight"].as_u64() {
                Some(w) if forward["clusters"].as_array().is_some_and(|a| a.len() > 1) => {
                    format!("{} ({w})", text(&c["name"]))
                }
                _ => text(&c["name"]),
            })
            .collect();
        clusters.join(", ")
    } else {
        action
            .as_object()
            .and_then(|o| o.keys().next().cloned())
            .unwrap_or_else(|| text(action))
    }
}

fn route_table(dump: &Value) -> String {
    let header = ["NAME", "VHOST", "DOMAINS", "MATCH", "ROUTE", "DESTINATION"].map(String::from);
    let mut rows: Vec<[String; 6]> = Vec::new();
    for t in route_tables(dump) {
        for vhost in items(&t["virtual_hosts"]) {
            let domains: Vec<String> = items(&vhost["domains"]).map(text).collect();
            let domains = match domains.as_slice() {
                [] => "-".to_string(),
                [one] => one.clone(),
                [first, rest @ ..] => format!("{first} +{} more", rest.len()),
            };
            for route in items(&vhost["routes"]) {
                let name = route["name"]
                    .as_str()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("-");
                rows.push([
                    text(&t["name"]),
                    text(&vhost["name"]),
                    domains.clone(),
                    path_match(&route["matcher"]),
                    name.to_string(),
                    route_destination(&route["action"]),
                ]);
            }
        }
    }
    table(std::iter::once(&header).chain(&rows))
}

fn endpoint_table(dump: &Value) -> String {
    let header = ["ENDPOINT", "STATUS", "WEIGHT", "CLUSTER"].map(String::from);
    let mut rows: Vec<[String; 4]> = Vec::new();
    for c in items(clusters(dump)) {
        for e in items(&c["endpoints"]) {
            rows.push([
                text(&e["address"]),
                if e["healthy"].as_bool().unwrap_or(false) {
                    "HEALTHY"
                } else {
                    "UNHEALTHY"
                }
                .into(),
                text(&e["weight"]),
                text(&c["cluster"]["name"]),
            ]);
        }
    }
    rows.sort();
    table(std::iter::once(&header).chain(&rows))
}

/// A time as RFC 3339 in UTC, as istioctl prints certificate validity.
fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let Ok(dt) = time::OffsetDateTime::from_unix_timestamp(secs as i64) else {
        return "-".into();
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        dt.year(),
        dt.month() as u8,
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

fn secret_table(dump: &Value, now: SystemTime) -> String {
    let header = [
        "RESOURCE NAME",
        "TYPE",
        "STATUS",
        "VALID CERT",
        "SERIAL NUMBER",
        "NOT AFTER",
        "NOT BEFORE",
        "IDENTITY",
    ]
    .map(String::from);
    let unix = |v: &Value| v.as_u64().map(|s| UNIX_EPOCH + Duration::from_secs(s));
    let valid = |from: Option<SystemTime>, to: Option<SystemTime>| match (from, to) {
        (Some(from), Some(to)) => (from <= now && now < to).to_string(),
        _ => "false".into(),
    };
    let mut rows: Vec<[String; 8]> = Vec::new();
    let dumped = secrets(dump);
    for cert in items(&dumped["certificates"]) {
        let (from, to) = (
            unix(&cert["valid_from_unix"]),
            unix(&cert["expiration_unix"]),
        );
        rows.push([
            text(&cert["name"]),
            "Cert Chain".into(),
            "ACTIVE".into(),
            valid(from, to),
            text(&cert["serial_number"]),
            to.map_or_else(|| "-".into(), utc),
            from.map_or_else(|| "-".into(), utc),
            text(&cert["identity"]),
        ]);
    }
    let bundle = &dumped["trust_bundle"];
    if let Some(pem) = bundle["pem"].as_str() {
        match weft_certs::certificate_info(pem) {
            Ok(roots) => {
                for root in roots {
                    rows.push([
                        text(&bundle["name"]),
                        "CA".into(),
                        "ACTIVE".into(),
                        valid(Some(root.not_before), Some(root.not_after)),
                        root.serial,
                        utc(root.not_after),
                        utc(root.not_before),
                        root.subject,
                    ]);
                }
            }
            Err(e) => rows.push([
                text(&bundle["name"]),
                "CA".into(),
                format!("UNREADABLE: {e}"),
                "false".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]),
        }
    }
    let mut out = table(std::iter::once(&header).chain(&rows));
    if rows.is_empty() {
        let note = dumped["note"].as_str().unwrap_or("no certificate");
        let _ = writeln!(out, "({note})");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump() -> Value {
        json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": [
                {"address": "0.0.0.0:15006", "chains": [
                    {"destination_port": 9080, "transport_protocol": "tls", "application_protocols": ["istio"], "server_names": [],
                     "kind": {"Http": {"routes": {"Inline": {"name": "inbound|9080||", "virtual_hosts": [
                        {"name": "inbound|http|9080", "domains": ["*"], "routes": [
                            {"name": "", "matcher": {"path": {"Prefix": "/"}}, "action": {"Forward": {"clusters": [{"name": "inbound|9080||", "weight": 1}]}}}]}]}}}}},
                    {"destination_port": 7070, "application_protocols": [], "server_names": [],
                     "kind": {"Tcp": {"clusters": [{"name": "inbound|7070||", "weight": 1}]}}}]},
                {"address": "0.0.0.0:9080", "chains": [
                    {"application_protocols": [], "server_names": [], "kind": {"Http": {"routes": {"Rds": "9080"}}}}]}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": [
                {"cluster": {"name": "outbound|9080|v2|reviews.shop.svc.cluster.local", "lb": "RoundRobin"},
                 "endpoints": [{"address": "10.0.0.7:9080", "healthy": true, "weight": 1}, {"address": "10.0.0.8:9080", "healthy": false, "weight": 1}]},
                {"cluster": {"name": "inbound|9080||", "lb": "RoundRobin", "services": [{"host": "reviews.shop.svc.cluster.local"}]}, "endpoints": []},
                {"cluster": {"name": "PassthroughCluster", "lb": "ClusterProvided"}, "endpoints": []}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": [
                {"name": "9080", "virtual_hosts": [{"name": "reviews.shop.svc.cluster.local:9080", "domains": ["reviews.shop.svc.cluster.local", "reviews"], "routes": [
                    {"name": "canary", "matcher": {"path": {"Exact": "/v2"}}, "action": {"Forward": {"clusters": [
                        {"name": "outbound|9080|v1|reviews.shop.svc.cluster.local", "weight": 90},
                        {"name": "outbound|9080|v2|reviews.shop.svc.cluster.local", "weight": 10}]}}}]}]}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump", "dynamic_active_secrets": {
                "certificates": [{"name": "default", "identity": "spiffe://cluster.local/ns/shop/sa/reviews", "serial_number": "0a:0b", "valid_from_unix": 1000, "expiration_unix": 2000}]}}
        ]})
    }

    fn rows(text: &str) -> Vec<Vec<String>> {
        text.lines()
            .map(|l| {
                l.split("   ")
                    .map(|c| c.trim().to_string())
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn clusters_are_split_into_istios_parts() {
        let r = rows(&cluster_table(&dump()));
        assert_eq!(
            r[0],
            [
                "SERVICE FQDN",
                "PORT",
                "SUBSET",
                "DIRECTION",
                "LB",
                "ENDPOINTS"
            ]
        );
        assert!(
            r.contains(
                &[
                    "PassthroughCluster",
                    "-",
                    "-",
                    "-",
                    "ClusterProvided",
                    "0/0 healthy"
                ]
                .map(String::from)
                .to_vec()
            ),
            "{r:?}"
        );
        assert!(
            r.contains(
                &[
                    "reviews.shop.svc.cluster.local",
                    "9080",
                    "-",
                    "inbound",
                    "RoundRobin",
                    "0/0 healthy"
                ]
                .map(String::from)
                .to_vec()
            ),
            "{r:?}"
        );
        assert!(
            r.contains(
                &[
                    "reviews.shop.svc.cluster.local",
                    "9080",
                    "v2",
                    "outbound",
                    "RoundRobin",
                    "1/2 healthy"
                ]
                .map(String::from)
                .to_vec()
            ),
            "{r:?}"
        );
    }

    #[test]
    fn listeners_show_each_chain_its_match_and_where_it_goes() {
        let r = rows(&listener_table(&dump()));
        assert_eq!(
            r[1],
            [
                "0.0.0.0",
                "9080",
                "Trans: tls; App: istio",
                "Route: inbound|9080||"
            ]
        );
        assert_eq!(r[2], ["0.0.0.0", "7070", "ALL", "Cluster: inbound|7070||"]);
        assert_eq!(r[3], ["0.0.0.0", "9080", "ALL", "Route: 9080"]);
    }

    #[test]
    fn routes_include_the_inline_tables_of_inbound_listeners() {
        let r = rows(&route_table(&dump()));
        assert_eq!(
            r[1],
            [
                "9080",
                "reviews.shop.svc.cluster.local:9080",
                "reviews.shop.svc.cluster.local +1 more",
                "/v2",
                "canary",
                "outbound|9080|v1|reviews.shop.svc.cluster.local (90), outbound|9080|v2|reviews.shop.svc.cluster.local (10)"
            ]
        );
        assert_eq!(
            r[2],
            [
                "inbound|9080||",
                "inbound|http|9080",
                "*",
                "/*",
                "-",
                "inbound|9080||"
            ]
        );
    }

    #[test]
    fn endpoints_and_secrets_say_whether_they_are_usable() {
        let r = rows(&endpoint_table(&dump()));
        assert_eq!(
            r[1],
            [
                "10.0.0.7:9080",
                "HEALTHY",
                "1",
                "outbound|9080|v2|reviews.shop.svc.cluster.local"
            ]
        );
        assert_eq!(r[2][1], "UNHEALTHY");
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        let r = rows(&secret_table(&dump(), at(1500)));
        assert_eq!(
            r[1],
            [
                "default",
                "Cert Chain",
                "ACTIVE",
                "true",
                "0a:0b",
                "1970-01-01T00:33:20Z",
                "1970-01-01T00:16:40Z",
                "spiffe://cluster.local/ns/shop/sa/reviews"
            ]
        );
        assert_eq!(
            rows(&secret_table(&dump(), at(2500)))[1][3],
            "false",
            "expired"
        );
    }

    #[test]
    fn json_and_yaml_print_the_section_as_dumped() {
        let clusters = selected(&dump(), Section::Cluster);
        assert_eq!(
            clusters[0]["name"],
            "outbound|9080|v2|reviews.shop.svc.cluster.local"
        );
        let endpoints = selected(&dump(), Section::Endpoint);
        assert_eq!(endpoints[0]["endpoints"][0]["address"], "10.0.0.7:9080");
        let yaml = render(&dump(), Section::Route, Output::Yaml).expect("yaml");
        assert!(
            yaml.contains("name: canary") || yaml.contains("name: \"canary\""),
            "{yaml}"
        );
    }
}
