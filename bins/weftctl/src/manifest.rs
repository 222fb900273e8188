//! What an install is made of: the charts' manifests for the user's values, rendered by the same
//! renderer whatever the command (`manifest generate`, `install`, `uninstall`), so what is printed is
//! what is applied, and both are what `helm template` renders.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::{Value, json};
use weft_charts::{KubeVersion, Manifest, Release};

/// Istio's profiles, each a set of values the charts lay over their defaults, and the charts installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Default,
    Demo,
    Minimal,
    Empty,
}

impl Profile {
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "" | "default" => Self::Default,
            "demo" => Self::Demo,
            "minimal" => Self::Minimal,
            "empty" => Self::Empty,
            other => anyhow::bail!("profile {other:?} is not one of default, demo, minimal, empty"),
        })
    }

    /// The charts installed: `empty` gives only the CRDs and cluster RBAC, to build on.
    pub fn charts(self) -> &'static [&'static str] {
        match self {
            Self::Empty => &["base"],
            Self::Default | Self::Demo | Self::Minimal => &["base", "weftd"],
        }
    }
}

/// The user's side of an install: `-f` files, then `--set`s, then the flags that are values.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ValuesArgs {
    /// A value, Helm's way (`--set profile=demo`, `--set pilot.replicaCount=2`); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// A values file, as `helm -f`; repeatable, later files win.
    #[arg(short = 'f', long = "values", value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// A control plane revision (Istio's `revision` value).
    #[arg(long)]
    pub revision: Option<String>,
}

impl ValuesArgs {
    pub fn values(&self) -> anyhow::Result<Value> {
        let mut values = json!({});
        for file in &self.files {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read values file {}", file.display()))?;
            let parsed = weft_charts::values::parse_file(&file.display().to_string(), &text)?;
            weft_charts::values::coalesce(&mut values, &parsed);
        }
        for set in &self.sets {
            weft_charts::values::apply_set(&mut values, set)?;
        }
        if let Some(revision) = &self.revision {
            values["revision"] = revision.clone().into();
        }
        Ok(values)
    }
}

/// Every manifest of the install, in the order they are applied (CRDs and RBAC first, the
/// webhook last), for `values` in `namespace` on a server of version `kube`.
pub fn generate(
    values: &Value,
    namespace: &str,
    kube: KubeVersion,
) -> anyhow::Result<Vec<Manifest>> {
    let profile = Profile::parse(values["profile"].as_str().unwrap_or_default())?;
    let mut values = values.clone();
    // The control plane's namespace is where it is installed, unless the user says otherwise.
    if values.pointer("/global/istioNamespace").is_none() {
        weft_charts::values::coalesce(
            &mut values,
            &json!({"global": {"istioNamespace": namespace}}),
        );
    }
    let release = Release {
        name: "weft".into(),
        namespace: namespace.into(),
    };
    let mut out = Vec::new();
    for name in profile.charts() {
        let chart = weft_charts::chart(name)?;
        out.extend(
            chart
                .render(&release, kube, &values)
                .with_context(|| format!("the {name} chart"))?,
        );
    }
    out.sort_by_key(|m| weft_charts::install_order(m.object["kind"].as_str().unwrap_or_default()));
    Ok(out)
}

/// `1.29`, `v1.29.3` or `1.29+` as a version.
pub fn parse_kube_version(text: &str) -> Result<KubeVersion, String> {
    let trimmed = text.trim_start_matches('v');
    let mut parts = trimmed.split('.');
    let number = |p: Option<&str>| {
        p.map(|p| p.trim_end_matches('+'))
            .and_then(|p| p.parse::<u32>().ok())
    };
    match (number(parts.next()), number(parts.next())) {
        (Some(major), Some(minor)) => Ok(KubeVersion { major, minor }),
        _ => Err(format!("{text:?} is not a Kubernetes version such as 1.29")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBE: KubeVersion = KubeVersion {
        major: 1,
        minor: 29,
    };

    fn kinds(manifests: &[Manifest]) -> Vec<String> {
        manifests
            .iter()
            .map(|m| m.object["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn profiles_choose_the_charts_and_crds_come_first() {
        let empty = generate(&json!({"profile": "empty"}), "istio-system", KUBE).expect("empty");
        assert!(kinds(&empty).iter().all(|k| k != "Deployment"));
        let default = generate(&json!({}), "istio-system", KUBE).expect("default");
        let kinds = kinds(&default);
        let first_workload = kinds.iter().position(|k| k == "Deployment").expect("weftd");
        let last_crd = kinds
            .iter()
            .rposition(|k| k == "CustomResourceDefinition")
            .expect("CRDs");
        assert!(last_crd < first_workload, "{kinds:?}");
        assert_eq!(
            kinds.last().map(String::as_str),
            Some("MutatingWebhookConfiguration")
        );
        let err = generate(&json!({"profile": "huge"}), "istio-system", KUBE).expect_err("unknown");
        assert!(err.to_string().contains("not one of"), "{err}");
    }

    #[test]
    fn the_namespace_is_the_control_planes() {
        let manifests = generate(&json!({}), "mesh", KUBE).expect("renders");
        let binding = manifests
            .iter()
            .find(|m| m.object["kind"] == "ClusterRoleBinding")
            .expect("binding");
        assert_eq!(binding.object["subjects"][0]["namespace"], "mesh");
    }

    #[test]
    fn values_come_from_files_then_sets_then_flags() {
        let dir = std::env::temp_dir().join(format!("weftctl-values-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("values.yaml");
        std::fs::write(&file, "pilot:\n  replicaCount: 3\nprofile: minimal\n").expect("write");
        let args = ValuesArgs {
            sets: vec!["profile=demo".into()],
            files: vec![file],
            revision: Some("canary".into()),
        };
        assert_eq!(
            args.values().expect("values"),
            json!({"pilot": {"replicaCount": 3}, "profile": "demo", "revision": "canary"})
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn kube_versions_parse_as_servers_write_them() {
        assert_eq!(
            parse_kube_version("v1.20.2"),
            Ok(KubeVersion {
                major: 1,
                minor: 20
            })
        );
        assert_eq!(
            parse_kube_version("1.29+"),
            Ok(KubeVersion {
                major: 1,
                minor: 29
            })
        );
        assert!(parse_kube_version("latest").is_err());
    }
}
