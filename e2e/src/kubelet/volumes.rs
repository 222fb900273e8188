//! A pod's volumes written out as a kubelet writes them: one directory per volume under the pod's
//! directory, holding the projected token for its audience, the ConfigMap's or Secret's keys, or
//! nothing (emptyDir); and the service account directory (token, the cluster's CA, namespace).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context;
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{ConfigMap, Pod, Secret, ServiceAccount},
    },
};
use kube::{Api, Client, api::PostParams};

use super::VolumeSource;

/// How long the tokens the harness asks for live: a test's length, and longer than the API
/// server's minimum of ten minutes.
const TOKEN_SECONDS: i64 = 3600;

/// The ConfigMap the API server's root CA publisher writes in every namespace (Kubernetes 1.20 and
/// later), which a kubelet puts in each service account directory as `ca.crt`.
const ROOT_CA_CONFIG_MAP: &str = "kube-root-ca.crt";

/// Each volume's directory, by volume name.
pub type Written = BTreeMap<String, PathBuf>;

async fn token(client: &Client, pod: &Pod, audience: Option<&str>) -> anyhow::Result<String> {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
            expiration_seconds: Some(TOKEN_SECONDS),
            // Bound to the pod, as the kubelet's are: the API server invalidates it with the pod.
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create_token_request(&sa, &PostParams::default(), &request)
        .await
        .with_context(|| format!("a token for service account {ns}/{sa}"))?;
    answer
        .status
        .map(|s| s.token)
        .context("the API server answered no token")
}

fn write(dir: &Path, file: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let path = dir.join(file);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// The keys to write: all of them, or the listed ones under their paths.
fn selected<'a>(
    data: impl Iterator<Item = (&'a String, &'a [u8])>,
    items: &[(String, String)],
) -> Vec<(String, Vec<u8>)> {
    let data: Vec<(&String, &[u8])> = data.collect();
    if items.is_empty() {
        return data
            .into_iter()
            .map(|(k, v)| (k.clone(), v.to_vec()))
            .collect();
    }
    items
        .iter()
        .filter_map(|(key, path)| {
            data.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (path.clone(), v.to_vec()))
        })
        .collect()
}

/// Writes every volume of `volumes` under `pod_dir`, readable by every container's user.
pub async fn write_volumes(
    client: &Client,
    pod: &Pod,
    volumes: &BTreeMap<String, VolumeSource>,
    pod_dir: &Path,
) -> anyhow::Result<Written> {
    use std::os::unix::fs::PermissionsExt;
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut written = Written::new();
    for (name, source) in volumes {
        let dir = pod_dir.join("volumes").join(name);
        std::fs::create_dir_all(&dir)?;
        match source {
            VolumeSource::EmptyDir => {
                // Any container's user writes here, as in an emptyDir.
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))?;
            }
            VolumeSource::Token { path, audience } => {
                let t = token(client, pod, Some(audience)).await?;
                write(&dir, path, t.as_bytes())?;
            }
            VolumeSource::ConfigMap { name: cm, items } => {
                let map = Api::<ConfigMap>::namespaced(client.clone(), &ns)
                    .get(cm)
                    .await
                    .with_context(|| format!("ConfigMap {ns}/{cm} for volume {name}"))?;
                let data = map.data.unwrap_or_default();
                for (file, bytes) in selected(data.iter().map(|(k, v)| (k, v.as_bytes())), items) {
                    write(&dir, &file, &bytes)?;
                }
            }
            VolumeSource::Secret { name: s, items } => {
                let secret = Api::<Secret>::namespaced(client.clone(), &ns)
                    .get(s)
                    .await
                    .with_context(|| format!("Secret {ns}/{s} for volume {name}"))?;
                let data: BTreeMap<String, ByteString> = secret.data.unwrap_or_default();
                for (file, bytes) in selected(data.iter().map(|(k, v)| (k, v.0.as_slice())), items)
                {
                    write(&dir, &file, &bytes)?;
                }
            }
            VolumeSource::ServiceAccount => {
                let t = token(client, pod, None).await?;
                write(&dir, "token", t.as_bytes())?;
                write(&dir, "namespace", ns.as_bytes())?;
                let ca = Api::<ConfigMap>::namespaced(client.clone(), &ns)
                    .get(ROOT_CA_CONFIG_MAP)
                    .await
                    .with_context(|| format!("ConfigMap {ns}/{ROOT_CA_CONFIG_MAP}"))?;
                let pem = ca
                    .data
                    .and_then(|d| d.get("ca.crt").cloned())
                    .with_context(|| format!("{ROOT_CA_CONFIG_MAP} in {ns} has no ca.crt"))?;
                write(&dir, "ca.crt", pem.as_bytes())?;
            }
        }
        // Mounted for containers running as other users (the proxy's 1337): readable by all, as a
        // kubelet's projected volumes are (0644 files) unless a pod sets fsGroup.
        for entry in walk(&dir)? {
            let mode = if entry.is_dir() { 0o755 } else { 0o644 };
            if !matches!(source, VolumeSource::EmptyDir) || entry != dir {
                std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode))?;
            }
        }
        written.insert(name.clone(), dir);
    }
    Ok(written)
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn listed_items_pick_keys_and_rename_them() {
        let data = [
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"2".to_vec()),
        ];
        let iter = || data.iter().map(|(k, v)| (k, v.as_slice()));
        assert_eq!(super::selected(iter(), &[]).len(), 2);
        assert_eq!(
            super::selected(
                iter(),
                &[("b".into(), "dir/b.txt".into()), ("c".into(), "c".into())]
            ),
            [("dir/b.txt".to_string(), b"2".to_vec())]
        );
    }
}
