//! The CA's keys on Kubernetes, where istiod keeps them: a user's CA in Secret `cacerts` (Istio's
//! plug-in CA layout), else weftd's self-signed root in Secret `istio-ca-secret`, created by the first
//! replica to start and read by every later one, so replicas and restarts share one root.

use std::{collections::BTreeMap, time::SystemTime};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{Api, Client, api::PostParams};
use tracing::info;
use weft_certs::{Ca, CaPem};

use super::{Error, api_code};

/// A user's CA (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`).
pub const PLUGGED: &str = "cacerts";
/// The self-signed CA (`ca-cert.pem`, `ca-key.pem`), as istiod names it.
pub const SELF_SIGNED: &str = "istio-ca-secret";
const SELF_SIGNED_TYPE: &str = "istio.io/ca-root";

/// The CA from weftd's namespace: `cacerts` if present, else `istio-ca-secret`, else a new self-signed
/// root stored as `istio-ca-secret` (if another replica stores one first, that one is used).
pub async fn load_or_create(
    client: Client,
    namespace: &str,
    trust_domain: &str,
) -> Result<Ca, Error> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let secret_name = |name: &str| format!("{namespace}/{name}");
    for name in [PLUGGED, SELF_SIGNED] {
        if let Some(secret) = get(&api, namespace, name).await? {
            let ca = from_secret(&secret).map_err(|source| Error::Ca {
                secret: secret_name(name),
                source,
            })?;
            info!(secret = %secret_name(name), "CA loaded");
            return Ok(ca);
        }
    }
    let (ca, pem) = Ca::self_signed_pem(
        trust_domain,
        SystemTime::now(),
        weft_certs::DEFAULT_ROOT_TTL,
    )
    .map_err(|source| Error::Ca {
        secret: secret_name(SELF_SIGNED),
        source,
    })?;
    match api
        .create(&PostParams::default(), &self_signed_secret(&pem))
        .await
    {
        Ok(_) => {
            info!(secret = %secret_name(SELF_SIGNED), "no CA found: created a self-signed root");
            Ok(ca)
        }
        Err(e) if api_code(&e) == Some(409) => {
            // Another replica created it between our read and our write: share its root.
            let secret = get(&api, namespace, SELF_SIGNED)
                .await?
                .ok_or_else(|| Error::Api {
                    what: format!(
                        "Secret {} vanished after another replica created it",
                        secret_name(SELF_SIGNED)
                    ),
                    source: e,
                })?;
            from_secret(&secret).map_err(|source| Error::Ca {
                secret: secret_name(SELF_SIGNED),
                source,
            })
        }
        Err(source) => Err(Error::Api {
            what: format!("cannot create Secret {}", secret_name(SELF_SIGNED)),
            source,
        }),
    }
}

async fn get(api: &Api<Secret>, namespace: &str, name: &str) -> Result<Option<Secret>, Error> {
    api.get_opt(name).await.map_err(|source| Error::Api {
        what: format!("cannot read Secret {namespace}/{name}"),
        source,
    })
}

/// A CA Secret's keys: `root-cert.pem` and `cert-chain.pem` default to the issuing certificate, as in
/// `istio-ca-secret`, where the root issues directly.
pub fn from_secret(secret: &Secret) -> Result<Ca, weft_certs::CaError> {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &'static str| -> Result<Option<String>, weft_certs::CaError> {
        match data.get(key) {
            Some(ByteString(bytes)) if !bytes.is_empty() => String::from_utf8(bytes.clone())
                .map(Some)
                .map_err(|_| weft_certs::CaError::Invalid {
                    what: key,
                    reason: "not UTF-8 PEM text".into(),
                }),
            _ => Ok(None),
        }
    };
    let missing = |what: &'static str| weft_certs::CaError::Invalid {
        what,
        reason: "missing from the Secret".into(),
    };
    let cert = text("ca-cert.pem")?.ok_or_else(|| missing("ca-cert.pem"))?;
    let key = text("ca-key.pem")?.ok_or_else(|| missing("ca-key.pem"))?;
    let root = text("root-cert.pem")?.unwrap_or_else(|| cert.clone());
    let chain = text("cert-chain.pem")?.unwrap_or_else(|| cert.clone());
    Ca::from_pem(&CaPem {
        cert,
        key,
        root,
        chain,
    })
}

fn self_signed_secret(pem: &CaPem) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(SELF_SIGNED.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "weftd".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some(SELF_SIGNED_TYPE.into()),
        data: Some(BTreeMap::from([
            ("ca-cert.pem".to_string(), bytes(&pem.cert)),
            ("ca-key.pem".to_string(), bytes(&pem.key)),
            ("root-cert.pem".to_string(), bytes(&pem.root)),
            ("cert-chain.pem".to_string(), bytes(&pem.chain)),
        ])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_self_signed_secret_reads_back_as_the_same_root() {
        let (ca, pem) = Ca::self_signed_pem(
            "cluster.local",
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .expect("ca");
        let read = from_secret(&self_signed_secret(&pem)).expect("readable");
        assert_eq!(read.root_pem(), ca.root_pem());

        // Istio's own istio-ca-secret holds only the issuing certificate and key.
        let mut istio = self_signed_secret(&pem);
        if let Some(data) = istio.data.as_mut() {
            data.remove("root-cert.pem");
            data.insert("cert-chain.pem".into(), ByteString(Vec::new()));
        }
        assert_eq!(
            from_secret(&istio).expect("readable").root_pem(),
            ca.root_pem()
        );

        let mut keyless = self_signed_secret(&pem);
        if let Some(data) = keyless.data.as_mut() {
            data.remove("ca-key.pem");
        }
        let err = from_secret(&keyless).expect_err("no key");
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
    }
}
