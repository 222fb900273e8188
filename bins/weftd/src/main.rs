use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use weftd::{
    app,
    translate::{MeshOptions, PathNormalization},
};

/// Weft's control plane: serves Envoy xDS built from Kubernetes and Istio manifests.
#[derive(Debug, Parser)]
#[command(name = "weftd", version = weft_telemetry::VERSION)]
struct Args {
    /// Where config comes from: `dir` (a directory of YAML manifests, `--config-dir`) or `kubernetes`
    /// (the API server, as istiod reads it).
    #[arg(long, env = "WEFTD_SOURCE", default_value = "dir")]
    source: SourceKind,
    /// Directory of YAML manifests (Services, EndpointSlices, Pods, ServiceEntries, WorkloadEntries,
    /// VirtualServices, DestinationRules, Sidecars); changes are picked up without a restart.
    #[arg(long, env = "WEFTD_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// The kubeconfig for `--source kubernetes`. Default: the pod's service account when in a pod,
    /// else `$KUBECONFIG`, else `~/.kube/config`.
    #[arg(long, env = "WEFTD_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// weftd's own namespace on Kubernetes: its CA Secrets and its leader Lease live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    namespace: String,
    /// This replica's name in the leader Lease. Default: `$POD_NAME`, else the host name with a
    /// random suffix.
    #[arg(long, env = "POD_NAME")]
    replica_name: Option<String>,
    /// Address for plaintext xDS (Istio's 15010). It trusts what each node claims, so it is for trusted
    /// local use; an empty value turns it off, leaving the authenticated 15012.
    #[arg(long, env = "WEFTD_XDS_ADDRESS", default_value = "0.0.0.0:15010", value_parser = optional_address)]
    xds_address: OptionalAddress,
    /// Address for the CA service and xDS over mTLS (Istio's 15012).
    #[arg(long, env = "WEFTD_SECURE_ADDRESS", default_value = "0.0.0.0:15012")]
    secure_address: SocketAddr,
    /// The CA in Istio's `cacerts` layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem). If
    /// the directory holds none, a self-signed root is created there and kept, so a restart keeps the
    /// mesh's trust. Default: `<state dir>/ca`; with `--source kubernetes`, Secret `cacerts` in weftd's
    /// namespace, else `istio-ca-secret` (created with a self-signed root if missing), as istiod.
    #[arg(long, env = "WEFTD_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Where weftd keeps what must survive a restart (the self-signed CA). Default: `$STATE_DIRECTORY`,
    /// else `$XDG_STATE_HOME/weftd`, else `$HOME/.local/state/weftd`, else `/var/lib/weftd`.
    #[arg(long, env = "WEFTD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Keep a self-signed CA in memory only: every restart mints a new root, and proxies holding the
    /// old one cannot verify weftd until they are given the new bundle. For throwaway tests.
    #[arg(long, env = "WEFTD_EPHEMERAL_CA", conflicts_with = "ca_dir")]
    ephemeral_ca: bool,
    /// Where to write `root-cert.pem` and `<namespace>/<service-account>/istio-token` (bootstrap tokens
    /// for proxies to prove their service account to the CA).
    #[arg(long, env = "WEFTD_IDENTITY_DIR")]
    identity_dir: Option<PathBuf>,
    /// The mesh's trust domain (`meshConfig.trustDomain`).
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Address for /metrics (Istio's control-plane monitoring port 15014).
    #[arg(
        long,
        env = "WEFTD_MONITORING_ADDRESS",
        default_value = "0.0.0.0:15014"
    )]
    monitoring_address: SocketAddr,
    /// Mesh-wide access log path for every proxy (`meshConfig.accessLogFile`); empty turns logs off.
    #[arg(long, env = "WEFTD_ACCESS_LOG_FILE", default_value = "")]
    access_log_file: String,
    /// How proxies normalize request paths before authorization and routing
    /// (`meshConfig.pathNormalization`): NONE, DEFAULT (= BASE), BASE, MERGE_SLASHES or
    /// DECODE_AND_MERGE_SLASHES.
    #[arg(long, env = "WEFTD_PATH_NORMALIZATION", default_value = "DEFAULT")]
    path_normalization: PathNormalization,
}

fn main() -> ExitCode {
    let Args {
        source,
        config_dir,
        kubeconfig,
        namespace,
        replica_name,
        xds_address,
        secure_address,
        ca_dir,
        state_dir,
        ephemeral_ca,
        identity_dir,
        trust_domain,
        monitoring_address,
        access_log_file,
        path_normalization,
    } = Args::parse();
    weft_telemetry::init_tracing();
    match weft_drain::raise_fd_limit() {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    let (source, ca_dir) = match (source, config_dir) {
        (SourceKind::Dir, Some(config_dir)) => {
            let ca_dir = match (ephemeral_ca, ca_dir) {
                (true, _) => None,
                (false, Some(dir)) => Some(dir),
                (false, None) => Some(state_dir.unwrap_or_else(default_state_dir).join("ca")),
            };
            let source = app::Source::Dir {
                config_dir,
                poll_interval: Duration::from_millis(500),
            };
            (source, ca_dir)
        }
        (SourceKind::Kubernetes, None) => {
            if ephemeral_ca || identity_dir.is_some() {
                eprintln!(
                    "weftd: --ephemeral-ca and --identity-dir are for --source dir; on Kubernetes the CA lives in Secrets and proxies prove who they are with service-account tokens"
                );
                return ExitCode::FAILURE;
            }
            let identity = replica_name.unwrap_or_else(default_replica_name);
            let options = app::KubeOptions::new(kubeconfig, namespace, identity);
            (app::Source::Kubernetes(options), ca_dir)
        }
        (SourceKind::Kubernetes, Some(_)) => {
            eprintln!(
                "weftd: --config-dir is for --source dir; with --source kubernetes config comes from the API server"
            );
            return ExitCode::FAILURE;
        }
        (SourceKind::Dir, None) => {
            eprintln!("weftd: --source dir needs --config-dir");
            return ExitCode::FAILURE;
        }
    };
    let config = app::Config {
        source,
        xds_address: xds_address.0,
        secure_address,
        monitoring_address,
        mesh: MeshOptions {
            access_log_file,
            trust_domain,
            path_normalization,
        },
        ca_dir,
        identity_dir,
        lifetimes: Default::default(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weftd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weftd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: app::Config) -> anyhow::Result<()> {
    let app = app::build(config).await?;
    let (trigger, watcher) = weft_drain::new();
    let server = tokio::spawn(app.run(watcher));
    weft_telemetry::shutdown_signal().await;
    tracing::info!("shutting down: draining proxies' streams");
    if tokio::time::timeout(Duration::from_secs(5), trigger.drain())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing anyway");
    }
    server.await??;
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SourceKind {
    Dir,
    Kubernetes,
}

/// As client-go names a leader candidate outside a pod: the host name, made unique per process.
fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "weftd".into());
    format!("{host}_{:08x}", rand::random::<u32>())
}

/// `--xds-address`: an address, or empty for none.
#[derive(Clone, Debug)]
struct OptionalAddress(Option<SocketAddr>);

fn optional_address(value: &str) -> Result<OptionalAddress, String> {
    if value.trim().is_empty() {
        return Ok(OptionalAddress(None));
    }
    value
        .parse()
        .map(|a| OptionalAddress(Some(a)))
        .map_err(|e| {
            format!("{value:?} is not an address (host:port), nor empty to turn it off: {e}")
        })
}

/// The conventional places for a service's state, most specific first.
fn default_state_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("STATE_DIRECTORY")
        .or_else(|| env("XDG_STATE_HOME").map(|d| d.join("weftd")))
        .or_else(|| env("HOME").map(|h| h.join(".local/state/weftd")))
        .unwrap_or_else(|| PathBuf::from("/var/lib/weftd"))
}
