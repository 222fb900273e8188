//! weftd on Kubernetes: the API server as the config source, and what istiod does beside it there (the
//! namespace controller, status, the CA's keys and callers' identities), with leader election for the
//! parts only one replica may do.

pub mod ca_secret;
pub mod leader;
pub mod namespaces;
pub mod source;
pub mod status;
pub mod token_review;

use std::path::PathBuf;

/// How weftd reaches the API server and where its own objects live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeOptions {
    /// A kubeconfig file; `None` uses the pod's service account (in-cluster), else `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// weftd's own namespace: its Secrets (`cacerts`, `istio-ca-secret`) and its leader Lease.
    pub namespace: String,
    /// This replica's name in the leader Lease (the pod name on Kubernetes).
    pub identity: String,
    pub debounce: source::Debounce,
    pub leader_timing: leader::Timing,
}

impl KubeOptions {
    /// istiod's defaults: namespace `istio-system`, Istio's debounce and client-go's lease timing.
    pub fn new(kubeconfig: Option<PathBuf>, namespace: String, identity: String) -> Self {
        Self {
            kubeconfig,
            namespace,
            identity,
            debounce: source::Debounce::default(),
            leader_timing: leader::Timing::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "cannot find Kubernetes credentials (no --kubeconfig, no $KUBECONFIG, not in a pod): {0}"
    )]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("the CA in Secret {secret}: {source}")]
    Ca {
        secret: String,
        #[source]
        source: weft_certs::CaError,
    },
}

/// One client for everything weftd asks the API server, so connections and credentials are shared.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    kube::Client::try_from(config).map_err(Error::Client)
}

/// A kube error's HTTP status, when the API server answered.
fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}
