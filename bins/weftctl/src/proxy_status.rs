//! `weftctl proxy-status` and `weftctl version`: what each weftd replica knows of the proxies connected
//! to it, read from its `/debug/syncz`, printed as istioctl prints it.

use std::fmt::Write as _;

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};
use weft_xds::{
    ProxyId,
    syncz::{ProxySync, SyncReport, SyncState},
};

use crate::install::KubeArgs;

/// The label every weftd pod carries, as istiod's do.
const WEFTD_SELECTOR: &str = "istio=pilot";
/// weftd's monitoring port (Istio's 15014), where `/debug/syncz` is served.
const MONITORING_PORT: u16 = 15014;

/// Where weftd is: each of its pods in the cluster, through the API server, or one address.
#[derive(Clone, Debug, clap::Args)]
pub struct WeftdSource {
    #[command(flatten)]
    pub kube: KubeArgs,
    /// The control plane's namespace.
    #[arg(short = 'i', long = "istio-namespace", default_value = "istio-system")]
    pub istio_namespace: String,
    /// Ask the weftd at this monitoring address instead of the cluster's (`http://127.0.0.1:15014`,
    /// which `weftctl demo` prints).
    #[arg(long, value_name = "URL")]
    pub weftd: Option<String>,
}

/// One weftd's answer, named by its pod (or address).
#[derive(Clone, Debug, PartialEq)]
pub struct Replica {
    pub name: String,
    pub report: SyncReport,
}

impl WeftdSource {
    /// Every replica's report. Replicas that do not answer are listed in the error when none does,
    /// else returned beside the answers so the table can say which are missing.
    pub async fn reports(&self) -> anyhow::Result<(Vec<Replica>, Vec<String>)> {
        if let Some(url) = &self.weftd {
            let report = fetch_direct(url).await?;
            return Ok((
                vec![Replica {
                    name: url.trim_start_matches("http://").to_string(),
                    report,
                }],
                Vec::new(),
            ));
        }
        let client = self.kube.client().await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &self.istio_namespace);
        let list = pods
            .list(&ListParams::default().labels(WEFTD_SELECTOR))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot list weftd's pods in {}: {}",
                    self.istio_namespace,
                    crate::install::api_message(&e)
                )
            })?;
        if list.items.is_empty() {
            anyhow::bail!(
                "no weftd pod in namespace {} (label {WEFTD_SELECTOR}); install Weft with `weftctl install`, or pass -i with its namespace",
                self.istio_namespace
            );
        }
        let (mut replicas, mut failed) = (Vec::new(), Vec::new());
        for pod in &list.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let running = pod
                .status
                .as_ref()
                .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some());
            if !running {
                failed.push(format!("{name}: not running"));
                continue;
            }
            let path = format!(
                "/api/v1/namespaces/{}/pods/{name}:{}/proxy/debug/syncz",
                self.istio_namespace,
                monitoring_port(pod)
            );
            let answer = async {
                let request = http::Request::get(&path).body(Vec::new())?;
                let text = client.request_text(request).await?;
                anyhow::Ok(serde_json::from_str::<SyncReport>(&text)?)
            };
            match answer.await {
                Ok(report) => replicas.push(Replica { name, report }),
                Err(e) => failed.push(format!("{name}: {e:#}")),
            }
        }
        if replicas.is_empty() {
            anyhow::bail!("no weftd pod answered /debug/syncz: {}", failed.join("; "));
        }
        Ok((replicas, failed))
    }
}

/// The discovery container's `http-monitoring` port, where the chart puts weftd's monitoring.
fn monitoring_port(pod: &Pod) -> u16 {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .filter(|c| c.name == "discovery")
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("http-monitoring"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(MONITORING_PORT)
}

async fn fetch_direct(url: &str) -> anyhow::Result<SyncReport> {
    let url = format!("{}/debug/syncz", url.trim_end_matches('/'));
    let text = crate::http_get(&url)
        .await
        .with_context(|| format!("cannot read weftd's sync status at {url}"))?;
    serde_json::from_str(&text).with_context(|| format!("{url} did not answer a sync report"))
}

/// A proxy's name as istioctl shows it: `POD.NAMESPACE`, or the node id when it is not Istio's shape.
pub fn proxy_name(node: &str) -> String {
    match node.parse::<ProxyId>() {
        Ok(id) => format!("{}.{}", id.pod_name, id.namespace),
        Err(_) => node.to_string(),
    }
}

/// The columns istioctl shows, in its order, with the type each reads.
const COLUMNS: [(&str, &str); 4] = [
    ("CDS", "Cluster"),
    ("LDS", "Listener"),
    ("EDS", "ClusterLoadAssignment"),
    ("RDS", "RouteConfiguration"),
];

fn cell(proxy: &ProxySync, short_type: &str) -> String {
    proxy
        .types
        .get(short_type)
        .map_or_else(|| "-".to_string(), |t| t.state().to_string())
}

/// The table, one row per proxy across replicas, then each rejection in the proxy's words. `filter`
/// keeps one proxy (`POD.NAMESPACE` or `POD`).
pub fn render(replicas: &[Replica], unreachable: &[String], filter: Option<&str>) -> String {
    let mut rows: Vec<[String; 7]> = Vec::new();
    let mut nacks = Vec::new();
    for replica in replicas {
        for proxy in &replica.report.proxies {
            let name = proxy_name(&proxy.node);
            if filter.is_some_and(|f| f != name && name.split('.').next() != Some(f)) {
                continue;
            }
            let [cds, lds, eds, rds] = COLUMNS.map(|(_, t)| cell(proxy, t));
            for (short, t) in &proxy.types {
                if let (SyncState::Nacked, Some(detail)) = (t.state(), &t.nack) {
                    nacks.push(format!("✗ {name} rejected its {short}: {detail}"));
                }
            }
            rows.push([
                name,
                cds,
                lds,
                eds,
                rds,
                replica.name.clone(),
                or_dash(&proxy.proxy_version),
            ]);
        }
    }
    rows.sort();
    let header = ["NAME", "CDS", "LDS", "EDS", "RDS", "WEFTD", "VERSION"].map(String::from);
    let mut out = table(std::iter::once(&header).chain(&rows));
    if rows.is_empty() {
        out.push_str(match filter {
            Some(_) => "(no connected proxy by that name)\n",
            None => "(no proxy is connected)\n",
        });
    }
    if !nacks.is_empty() {
        out.push('\n');
        for line in nacks {
            let _ = writeln!(out, "{line}");
        }
        out.push_str(
            "  The proxy keeps its last accepted config; fix the resource named above, and weftd pushes again.\n",
        );
    }
    for line in unreachable {
        let _ = writeln!(out, "✗ weftd {line}");
    }
    out
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

/// Columns padded to their widest cell, as kubectl prints.
pub fn table<'a, const N: usize>(rows: impl IntoIterator<Item = &'a [String; N]>) -> String {
    let rows: Vec<&[String; N]> = rows.into_iter().collect();
    let mut widths = [0usize; N];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}   ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `weftctl version`: this binary's, each weftd replica's, and the proxies' by count.
pub fn render_version(replicas: &[Replica]) -> String {
    let mut out = format!("client version: {}\n", weft_telemetry::VERSION);
    for r in replicas {
        let _ = writeln!(
            out,
            "control plane version: {} ({})",
            r.report.control_plane_version, r.name
        );
    }
    let mut data_plane: std::collections::BTreeMap<String, usize> = Default::default();
    for proxy in replicas.iter().flat_map(|r| &r.report.proxies) {
        *data_plane.entry(or_dash(&proxy.proxy_version)).or_default() += 1;
    }
    if data_plane.is_empty() {
        out.push_str("data plane version: (no proxy is connected)\n");
    }
    for (version, n) in data_plane {
        let proxies = if n == 1 { "proxy" } else { "proxies" };
        let _ = writeln!(out, "data plane version: {version} ({n} {proxies})");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_xds::syncz::TypeSync;

    fn synced(nonce: &str) -> TypeSync {
        TypeSync {
            sent_nonce: nonce.into(),
            acked_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn proxy(pod: &str, types: &[(&str, TypeSync)]) -> ProxySync {
        ProxySync {
            node: format!("sidecar~10.0.0.1~{pod}.demo~demo.svc.cluster.local"),
            proxy_version: "0.1.0".into(),
            variant: "sotw".into(),
            types: types
                .iter()
                .map(|(t, s)| (t.to_string(), s.clone()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_table_shows_each_types_state_and_each_rejection_in_the_proxys_words() {
        let nacked = TypeSync {
            sent_nonce: "4".into(),
            acked_nonce: "2".into(),
            nack: Some("listener 0.0.0.0_80: bad filter".into()),
            ..Default::default()
        };
        let stale = TypeSync {
            sent_nonce: "5".into(),
            acked_nonce: "3".into(),
            ..Default::default()
        };
        let replicas = vec![Replica {
            name: "weftd-7d9f-abc".into(),
            report: SyncReport {
                control_plane_version: "0.1.0".into(),
                proxies: vec![
                    proxy(
                        "web-1",
                        &[
                            ("Cluster", synced("1")),
                            ("Listener", nacked),
                            ("ClusterLoadAssignment", stale),
                        ],
                    ),
                    proxy("api-0", &[("Cluster", synced("1"))]),
                ],
            },
        }];
        let text = render(&replicas, &["weftd-other: not running".into()], None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["NAME", "CDS", "LDS", "EDS", "RDS", "WEFTD", "VERSION"]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "api-0.demo",
                "SYNCED",
                "-",
                "-",
                "-",
                "weftd-7d9f-abc",
                "0.1.0"
            ]
        );
        assert!(
            lines[2].starts_with("web-1.demo   SYNCED   NACKED   STALE"),
            "{text}"
        );
        assert!(
            text.contains("✗ web-1.demo rejected its Listener: listener 0.0.0.0_80: bad filter"),
            "{text}"
        );
        assert!(text.contains("✗ weftd weftd-other: not running"), "{text}");

        let one = render(&replicas, &[], Some("api-0"));
        assert_eq!(one.lines().count(), 2, "{one}");
        let none = render(&replicas, &[], Some("nope.demo"));
        assert!(none.contains("no connected proxy by that name"), "{none}");
    }

    #[test]
    fn version_counts_the_data_plane_by_version() {
        let replicas = vec![Replica {
            name: "weftd-0".into(),
            report: SyncReport {
                control_plane_version: "0.1.0".into(),
                proxies: vec![proxy("a", &[]), proxy("b", &[])],
            },
        }];
        let text = render_version(&replicas);
        assert!(
            text.contains("control plane version: 0.1.0 (weftd-0)"),
            "{text}"
        );
        assert!(
            text.contains("data plane version: 0.1.0 (2 proxies)"),
            "{text}"
        );
    }

    #[test]
    fn names_are_pod_dot_namespace() {
        assert_eq!(
            proxy_name("sidecar~10.0.0.1~web-0.shop~shop.svc.cluster.local"),
            "web-0.shop"
        );
        assert_eq!(proxy_name("grpc-client"), "grpc-client");
    }
}
