use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use weftd::{app, translate::MeshOptions};

/// Weft's control plane: serves Envoy xDS built from Kubernetes and Istio manifests.
#[derive(Debug, Parser)]
#[command(name = "weftd", version)]
struct Args {
    /// Directory of YAML manifests (Services, EndpointSlices, Pods, ServiceEntries, WorkloadEntries,
    /// VirtualServices, DestinationRules, Sidecars); changes are picked up without a restart.
    #[arg(long, env = "WEFTD_CONFIG_DIR")]
    config_dir: PathBuf,
    /// Address for plaintext xDS (Istio's 15010).
    #[arg(long, env = "WEFTD_XDS_ADDRESS", default_value = "0.0.0.0:15010")]
    xds_address: SocketAddr,
    /// Address for the CA service and xDS over mTLS (Istio's 15012).
    #[arg(long, env = "WEFTD_SECURE_ADDRESS", default_value = "0.0.0.0:15012")]
    secure_address: SocketAddr,
    /// The CA in Istio's `cacerts` layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem). If
    /// the directory holds none, a self-signed root is created there and kept. Without it, the
    /// self-signed root lives only as long as this process.
    #[arg(long, env = "WEFTD_CA_DIR")]
    ca_dir: Option<PathBuf>,
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
}

fn main() -> ExitCode {
    let Args {
        config_dir,
        xds_address,
        secure_address,
        ca_dir,
        identity_dir,
        trust_domain,
        monitoring_address,
        access_log_file,
    } = Args::parse();
    weft_telemetry::init_tracing();
    let config = app::Config {
        config_dir,
        xds_address,
        secure_address,
        monitoring_address,
        mesh: MeshOptions {
            access_log_file,
            trust_domain,
        },
        poll_interval: Duration::from_millis(500),
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
