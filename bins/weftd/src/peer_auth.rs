//! PeerAuthentication for a proxy: Istio's precedence (weft-api's) applied to the proxy's namespace
//! and labels.

pub use weft_api::peer_auth::MtlsMode;

use crate::{Model, translate::Proxy};

/// The mode for traffic to `port` (the workload's own port, after target-port mapping).
pub fn mode_for(model: &Model, proxy: &Proxy, port: u16) -> MtlsMode {
    weft_api::peer_auth::mode_for(
        &model.peer_authentications,
        &proxy.namespace,
        &proxy.labels,
        Some(port),
    )
    .mode
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
