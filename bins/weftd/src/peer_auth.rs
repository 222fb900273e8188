//! PeerAuthentication: which inbound traffic a workload takes in plaintext, with Istio's precedence.
//! A workload-selector policy in the workload's namespace wins over the namespace's policy, which wins
//! over the mesh-wide one in the root namespace; `UNSET` inherits from the next level, and with nothing
//! set the mode is `PERMISSIVE`. `portLevelMtls` (selector policies only) overrides per port.

use weft_api::{
    Object,
    istio::{self, PeerAuthenticationSpec},
};

use crate::{Model, authz::ROOT_NAMESPACE, translate::Proxy};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    /// Plaintext only: a client's mTLS goes through as opaque bytes.
    Disable,
    /// Both mTLS (told apart by Istio's ALPN) and plaintext.
    Permissive,
    /// mTLS only; anything else is refused.
    Strict,
}

/// The mode a policy sets; `None` (no mode, or `UNSET`) inherits.
fn parse(mode: Option<istio::MtlsMode>) -> Option<MtlsMode> {
    match mode? {
        istio::MtlsMode::Disable => Some(MtlsMode::Disable),
        istio::MtlsMode::Permissive => Some(MtlsMode::Permissive),
        istio::MtlsMode::Strict => Some(MtlsMode::Strict),
        istio::MtlsMode::Unset => None,
    }
}

fn own_mode(p: &Object<PeerAuthenticationSpec>) -> Option<MtlsMode> {
    parse(p.spec.mtls.as_ref().and_then(|m| m.mode))
}

/// The mode for traffic to `port` (the workload's own port, after target-port mapping).
pub fn mode_for(model: &Model, proxy: &Proxy, port: u16) -> MtlsMode {
    let policies = &model.peer_authentications;
    let mesh = policies
        .iter()
        .find(|p| p.metadata.namespace() == ROOT_NAMESPACE && p.spec.selector.is_none())
        .and_then(own_mode);
    let namespace = policies
        .iter()
        .find(|p| p.metadata.namespace() == proxy.namespace && p.spec.selector.is_none())
        .and_then(own_mode);
    let workload = policies.iter().find(|p| {
        p.metadata.namespace() == proxy.namespace
            && p.spec
                .selector
                .as_ref()
                .is_some_and(|s| s.labels.iter().all(|(k, v)| proxy.labels.get(k) == Some(v)))
    });
    let inherited = namespace.or(mesh).unwrap_or(MtlsMode::Permissive);
    let Some(workload) = workload else {
        return inherited;
    };
    let workload_mode = own_mode(workload).unwrap_or(inherited);
    workload
        .spec
        .port_level_mtls
        .get(&port)
        .and_then(|m| parse(m.mode))
        .unwrap_or(workload_mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::MeshOptions;

    fn model(yaml: &str) -> Model {
        let dir =
            std::env::temp_dir().join(format!("weft-pa-{}-{}", std::process::id(), yaml.len()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("pa.yaml"), yaml).expect("write");
        let (resources, rejected) =
            weft_api::load_dir(&dir).expect("the fixture directory is readable");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(rejected.is_empty(), "{rejected:?}");
        Model::build(&resources, MeshOptions::default())
    }

    fn proxy(ns: &str, app: &str) -> Proxy {
        Proxy {
            ip: "10.0.0.1".parse().expect("ip"),
            namespace: ns.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            proxyless_grpc: false,
            captured: false,
        }
    }

    const MESH_STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n";
    const NS_PERMISSIVE: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: demo}\nspec: {mtls: {mode: PERMISSIVE}}\n";
    const NS_UNSET: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: demo}\nspec: {mtls: {mode: UNSET}}\n";
    const DB_DISABLE_PORT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: db, namespace: demo}\nspec:\n  selector: {matchLabels: {app: db}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    \"5432\": {mode: DISABLE}\n    \"9000\": {mode: UNSET}\n";
    const DB_UNSET: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: db, namespace: demo}\nspec:\n  selector: {matchLabels: {app: db}}\n  portLevelMtls:\n    \"8080\": {mode: STRICT}\n";

    #[test]
    fn precedence_follows_istio() {
        use MtlsMode::*;
        let cases: [(&str, String, &str, &str, u16, MtlsMode); 9] = [
            ("nothing set", String::new(), "demo", "web", 80, Permissive),
            ("mesh-wide", MESH_STRICT.into(), "demo", "web", 80, Strict),
            (
                "mesh-wide, other namespace",
                MESH_STRICT.into(),
                "prod",
                "web",
                80,
                Strict,
            ),
            (
                "namespace beats mesh",
                format!("{MESH_STRICT}---\n{NS_PERMISSIVE}"),
                "demo",
                "web",
                80,
                Permissive,
            ),
            (
                "namespace UNSET inherits the mesh",
                format!("{MESH_STRICT}---\n{NS_UNSET}"),
                "demo",
                "web",
                80,
                Strict,
            ),
            (
                "workload beats namespace",
                format!("{NS_PERMISSIVE}---\n{DB_DISABLE_PORT}"),
                "demo",
                "db",
                80,
                Strict,
            ),
            (
                "port beats workload",
                format!("{NS_PERMISSIVE}---\n{DB_DISABLE_PORT}"),
                "demo",
                "db",
                5432,
                Disable,
            ),
            (
                "port UNSET inherits the workload",
                format!("{NS_PERMISSIVE}---\n{DB_DISABLE_PORT}"),
                "demo",
                "db",
                9000,
                Strict,
            ),
            (
                "workload UNSET inherits, its port still applies",
                format!("{NS_PERMISSIVE}---\n{DB_UNSET}"),
                "demo",
                "db",
                8080,
                Strict,
            ),
        ];
        for (name, yaml, ns, app, port, want) in cases {
            let m = model(&yaml);
            assert_eq!(mode_for(&m, &proxy(ns, app), port), want, "{name}");
        }
        let m = model(&format!("{NS_PERMISSIVE}---\n{DB_UNSET}"));
        assert_eq!(
            mode_for(&m, &proxy("demo", "db"), 80),
            Permissive,
            "other ports inherit"
        );
    }
}
