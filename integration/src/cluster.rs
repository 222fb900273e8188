//! A real kube-apiserver for tests (`cargo xtask test` starts one and sets `WEFT_TEST_KUBECONFIG`):
//! namespaces of their own, manifests applied as users apply them, and weftd's least-privilege
//! credentials from the charts' RBAC.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, ServiceAccount},
};
use kube::{
    Api, Client, Discovery,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
    },
    discovery::Scope,
};
use serde_json::{Value, json};

use crate::wait_for;

const FIELD_MANAGER: &str = "weft-tests";

/// The test cluster, reached with its admin credentials.
pub struct Cluster {
    pub admin: Client,
    pub kubeconfig: PathBuf,
    discovery: Discovery,
}

impl Cluster {
    /// The cluster `WEFT_TEST_KUBECONFIG` names; these tests run only under `cargo xtask test`.
    pub async fn connect() -> Self {
        weft_telemetry::init_tracing_with_default("warn");
        let kubeconfig = PathBuf::from(std::env::var_os("WEFT_TEST_KUBECONFIG").expect(
            "WEFT_TEST_KUBECONFIG names a kube-apiserver's kubeconfig (cargo xtask test starts one)",
        ));
        let admin = weftd::kubernetes::client(Some(&kubeconfig))
            .await
            .expect("the admin kubeconfig works");
        let discovery = Discovery::new(admin.clone())
            .run()
            .await
            .expect("discovery");
        let cluster = Self {
            admin,
            kubeconfig,
            discovery,
        };
        let crds = rendered("base", "istio-system", |m| {
            m.object["kind"] == "CustomResourceDefinition"
        });
        cluster.apply(&crds, "").await;
        // The CRDs' kinds are served a moment after they are created.
        let mut cluster = cluster;
        cluster.discovery = wait_for(
            "Istio's kinds to be served",
            Duration::from_secs(30),
            || {
                let client = cluster.admin.clone();
                async move {
                    let d = Discovery::new(client).run().await.ok()?;
                    (d.has_group("networking.istio.io") && d.has_group("security.istio.io"))
                        .then_some(d)
                }
            },
        )
        .await;
        cluster
    }

    /// How weftctl reaches this cluster, as `--kubeconfig` would say.
    pub fn kube_args(&self) -> weftctl::install::KubeArgs {
        weftctl::install::KubeArgs {
            kubeconfig: Some(self.kubeconfig.clone()),
            context: None,
        }
    }

    /// A fresh namespace, named after `what` and unique to this run.
    pub async fn namespace(&self, what: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
        Api::<Namespace>::all(self.admin.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace created");
        name
    }

    /// Where the server serves `kind` of `api_version`, or the same kind in another version of its
    /// group (an EndpointSlice written as v1 on a server with only v1beta1).
    fn resource(&self, api_version: &str, kind: &str) -> (ApiResource, Scope) {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let exact = self
            .discovery
            .resolve_gvk(&GroupVersionKind::gvk(group, version, kind));
        let found = exact.or_else(|| {
            let g = self.discovery.get(group)?;
            g.recommended_kind(kind)
        });
        let (ar, caps) =
            found.unwrap_or_else(|| panic!("the server serves no {api_version} {kind}"));
        (ar, caps.scope)
    }

    /// The dynamic API for `kind`, cluster-wide or in `namespace` as the kind is scoped.
    fn dynamic(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
    ) -> (Api<DynamicObject>, ApiResource) {
        let (ar, scope) = self.resource(api_version, kind);
        let api = match scope {
            Scope::Cluster => Api::all_with(self.admin.clone(), &ar),
            Scope::Namespaced => Api::namespaced_with(self.admin.clone(), namespace, &ar),
        };
        (api, ar)
    }

    fn api(&self, doc: &Value, namespace: &str) -> (Api<DynamicObject>, String, ApiResource) {
        let api_version = doc["apiVersion"].as_str().expect("apiVersion");
        let kind = doc["kind"].as_str().expect("kind");
        let name = doc["metadata"]["name"].as_str().expect("name").to_string();
        let (api, ar) = self.dynamic(api_version, kind, namespace);
        (api, name, ar)
    }

    /// Applies every document of `yaml` (server-side apply) into `namespace`, where the fixtures say
    /// `namespace: test`. As a kubelet-less cluster needs: a Pod gets a container and its service
    /// account, and a document's `status` is written through the status subresource.
    pub async fn apply(&self, yaml: &str, namespace: &str) {
        for mut doc in docs(yaml, namespace) {
            let (api, name, ar) = self.api(&doc, namespace);
            doc["apiVersion"] = ar.api_version.clone().into();
            if ar.kind == "EndpointSlice" && ar.version == "v1beta1" {
                doc = endpoint_slice_to_v1beta1(doc);
            }
            // Server-side apply on 1.20 keys Service ports by port and protocol, with no default.
            if ar.kind == "Service"
                && let Some(ports) = doc["spec"]["ports"].as_array_mut()
            {
                for port in ports.iter_mut().filter(|p| p.get("protocol").is_none()) {
                    port["protocol"] = "TCP".into();
                }
            }
            if ar.kind == "Pod" {
                let sa = doc["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string();
                self.service_account(namespace, &sa).await;
                doc["spec"]["containers"] = json!([{"name": "app", "image": "weft-test-app"}]);
                doc["spec"]["automountServiceAccountToken"] = false.into();
            }
            let status = doc.as_object_mut().and_then(|m| m.remove("status"));
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&doc),
            )
            .await
            .unwrap_or_else(|e| panic!("apply {} {namespace}/{name}: {e}", ar.kind));
            if let Some(status) = status {
                let patch = json!({"status": status});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .unwrap_or_else(|e| panic!("status of {} {namespace}/{name}: {e}", ar.kind));
            }
        }
    }

    /// Deletes every object `yaml` names, last first: a route goes before the subsets it names, the
    /// order Istio tells users to delete in so no request meets a route to a missing subset.
    pub async fn delete(&self, yaml: &str, namespace: &str) {
        for doc in docs(yaml, namespace).into_iter().rev() {
            let (api, name, ar) = self.api(&doc, namespace);
            api.delete(&name, &DeleteParams::default())
                .await
                .unwrap_or_else(|e| panic!("delete {} {namespace}/{name}: {e}", ar.kind));
        }
    }

    /// Creates an object as it is, expecting the server to refuse or accept it.
    pub async fn create(&self, doc: Value, namespace: &str) -> Result<DynamicObject, kube::Error> {
        let (api, _, ar) = self.api(&doc, namespace);
        let mut doc = doc;
        doc["apiVersion"] = ar.api_version.clone().into();
        let obj: DynamicObject = serde_json::from_value(doc).expect("an object");
        api.create(&PostParams::default(), &obj).await
    }

    /// A JSON merge patch, which (unlike an apply) also removes fields another manager set.
    pub async fn merge(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        patch: Value,
    ) {
        let (api, _) = self.dynamic(api_version, kind, namespace);
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("patch {kind} {namespace}/{name}: {e}"));
    }

    pub async fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<DynamicObject> {
        let (api, _) = self.dynamic(api_version, kind, namespace);
        api.get_opt(name).await.expect("get")
    }

    pub async fn service_account(&self, namespace: &str, name: &str) {
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": name}})).expect("sa");
        match Api::<ServiceAccount>::namespaced(self.admin.clone(), namespace)
            .create(&PostParams::default(), &sa)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("service account {namespace}/{name}: {e}"),
        }
    }

    /// A service account whose pods can be created: 1.20 mounts the account's token Secret into each
    /// of them, which its controller makes a moment after the account.
    pub async fn service_account_with_token(&self, namespace: &str, name: &str) {
        self.service_account(namespace, name).await;
        let accounts: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), namespace);
        wait_for(
            "a service account's token Secret",
            Duration::from_secs(30),
            || async {
                let account = accounts.get(name).await.ok()?;
                account.secrets.filter(|s| !s.is_empty()).map(|_| ())
            },
        )
        .await;
    }

    /// A projected service-account token, as the kubelet mounts one, for `audience`.
    pub async fn token(&self, namespace: &str, service_account: &str, audience: &str) -> String {
        self.service_account(namespace, service_account).await;
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.into()],
                expiration_seconds: Some(3600),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(self.admin.clone(), namespace)
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .expect("token request")
            .status
            .expect("a token")
            .token
    }

    /// A kubeconfig for weftd in `namespace`, holding only what the charts grant it: the base chart's
    /// ClusterRole and the weftd chart's ServiceAccount, Role and their bindings.
    pub async fn weftd_kubeconfig(&self, namespace: &str) -> PathBuf {
        let rbac = |m: &weft_charts::Manifest| {
            matches!(
                m.object["kind"].as_str(),
                Some(
                    "ClusterRole"
                        | "ClusterRoleBinding"
                        | "ServiceAccount"
                        | "Role"
                        | "RoleBinding"
                )
            )
        };
        let mut cluster_rbac = chart_manifests("base", namespace);
        cluster_rbac.retain(rbac);
        // One ClusterRoleBinding per weftd namespace; the ClusterRole is shared.
        for m in &mut cluster_rbac {
            if m.object["kind"] == "ClusterRoleBinding" {
                m.object["metadata"]["name"] = format!("weftd-{namespace}").into();
            }
        }
        let mut own = chart_manifests("weftd", namespace);
        own.retain(rbac);
        cluster_rbac.extend(own);
        let text = weft_charts::to_yaml_stream(&cluster_rbac).expect("yaml");
        self.apply(&text, namespace).await;
        let token = self
            .token(
                namespace,
                "weftd",
                "https://kubernetes.default.svc.cluster.local",
            )
            .await;
        let admin = std::fs::read_to_string(&self.kubeconfig).expect("admin kubeconfig");
        let field = |key: &str| {
            admin
                .lines()
                .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("{key} in the admin kubeconfig"))
        };
        let (server, ca) = (field("server:"), field("certificate-authority:"));
        let path = std::env::temp_dir().join(format!("weftd-{namespace}.kubeconfig"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: {server}, certificate-authority: {ca}}}\nusers:\n- name: weftd\n  user: {{token: {token}}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: weftd}}\ncurrent-context: c\n"
            ),
        )
        .expect("write kubeconfig");
        path
    }
}

/// A chart's manifests for a control plane in `namespace`, as `weftctl install` renders them.
fn chart_manifests(chart: &str, namespace: &str) -> Vec<weft_charts::Manifest> {
    weft_charts::chart(chart)
        .expect("embedded chart")
        .render(
            &weft_charts::Release {
                name: "weft".into(),
                namespace: namespace.into(),
            },
            weft_charts::KubeVersion {
                major: 1,
                minor: 20,
            },
            &json!({"global": {"istioNamespace": namespace}}),
        )
        .expect("the chart renders")
}

fn rendered(chart: &str, namespace: &str, keep: impl Fn(&weft_charts::Manifest) -> bool) -> String {
    let manifests: Vec<_> = chart_manifests(chart, namespace)
        .into_iter()
        .filter(keep)
        .collect();
    weft_charts::to_yaml_stream(&manifests).expect("yaml")
}

fn docs(yaml: &str, namespace: &str) -> Vec<Value> {
    let yaml = yaml
        .replace("namespace: test}", &format!("namespace: {namespace}}}"))
        .replace("namespace: test,", &format!("namespace: {namespace},"))
        .replace("namespace: test\n", &format!("namespace: {namespace}\n"));
    serde_saphyr::from_multiple::<Value>(&yaml)
        .expect("test YAML parses")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// The few fields Weft's fixtures use, from v1 to the v1beta1 a 1.20 server serves.
fn endpoint_slice_to_v1beta1(mut doc: Value) -> Value {
    if let Some(endpoints) = doc["endpoints"].as_array_mut() {
        for ep in endpoints {
            if let Some(zone) = ep.as_object_mut().and_then(|e| e.remove("zone")) {
                ep["topology"] = json!({"topology.kubernetes.io/zone": zone});
            }
        }
    }
    doc
}
