use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use weft_inject::InjectConfig;
use weft_injector::server;

/// Weft's sidecar injector: a mutating admission webhook that gives pods weft-proxy as Istio's
/// injector gives them Envoy.
#[derive(Debug, Parser)]
#[command(name = "weft-injector", version = weft_telemetry::VERSION)]
struct Args {
    /// The webhook's address (Istio's 15017), served over TLS.
    #[arg(long, env = "WEFT_INJECTOR_ADDRESS", default_value = "0.0.0.0:15017")]
    address: SocketAddr,
    /// /metrics and /ready, in plaintext.
    #[arg(
        long,
        env = "WEFT_INJECTOR_MONITORING_ADDRESS",
        default_value = "0.0.0.0:15014"
    )]
    monitoring_address: SocketAddr,
    /// A name the API server reaches the webhook by; repeat for several.
    #[arg(long = "dns-name", default_values = ["istiod.istio-system.svc", "weft-injector.istio-system.svc"])]
    dns_names: Vec<String>,
    /// The weft-proxy image injected as the sidecar and its init step.
    #[arg(long, env = "WEFT_PROXY_IMAGE")]
    proxy_image: String,
    /// The control plane's namespace, whose pods are never injected.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    control_plane_namespace: String,
    /// This injector's revision (`istio.io/rev`).
    #[arg(long, env = "REVISION", default_value = "default")]
    revision: String,
    /// Where sidecars find weftd's CA and secure xDS.
    #[arg(
        long,
        env = "WEFT_DISCOVERY_ADDRESS",
        default_value = "istiod.istio-system.svc:15012"
    )]
    discovery_address: String,
    /// Inject the sidecar as a native sidecar: `auto` does where the API server is 1.29 or later.
    #[arg(long, env = "WEFT_NATIVE_SIDECARS", value_enum, default_value = "auto")]
    native_sidecars: server::NativeSidecars,
    /// Without native sidecars, hold the app's containers until the proxy is ready (a postStart
    /// `weft-proxy wait`), as Istio's holdApplicationUntilProxyStarts; a pod overrides it in
    /// `proxy.istio.io/config`.
    #[arg(long, env = "WEFT_HOLD_APPLICATION_UNTIL_PROXY_STARTS", default_value_t = true, action = clap::ArgAction::Set)]
    hold_application_until_proxy_starts: bool,
    /// The sidecar's CPU request (Istio's global.proxy.resources); a pod overrides it with
    /// sidecar.istio.io/proxyCPU.
    #[arg(long, env = "WEFT_PROXY_CPU", default_value = "100m")]
    proxy_cpu: String,
    /// The sidecar's memory request; sidecar.istio.io/proxyMemory overrides it.
    #[arg(long, env = "WEFT_PROXY_MEMORY", default_value = "128Mi")]
    proxy_memory: String,
    /// The sidecar's CPU limit; sidecar.istio.io/proxyCPULimit overrides it.
    #[arg(long, env = "WEFT_PROXY_CPU_LIMIT", default_value = "2000m")]
    proxy_cpu_limit: String,
    /// The sidecar's memory limit; sidecar.istio.io/proxyMemoryLimit overrides it.
    #[arg(long, env = "WEFT_PROXY_MEMORY_LIMIT", default_value = "1024Mi")]
    proxy_memory_limit: String,
    /// The MutatingWebhookConfiguration whose caBundle this injector keeps current.
    #[arg(long, env = "WEFT_WEBHOOK_CONFIGURATION")]
    webhook_configuration: Option<String>,
    /// The kubeconfig for writing the caBundle; default in-cluster, else $KUBECONFIG.
    #[arg(long, env = "WEFT_INJECTOR_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    weft_telemetry::init_tracing();
    let config = server::Config {
        address: args.address,
        monitoring_address: args.monitoring_address,
        dns_names: args.dns_names,
        trust_domain: args.trust_domain,
        inject: InjectConfig {
            proxy_image: args.proxy_image,
            control_plane_namespace: args.control_plane_namespace,
            revision: args.revision,
            discovery_address: args.discovery_address,
            hold_application_until_proxy_starts: args.hold_application_until_proxy_starts,
            resources: weft_inject::ProxyResources {
                cpu: args.proxy_cpu,
                memory: args.proxy_memory,
                cpu_limit: args.proxy_cpu_limit,
                memory_limit: args.proxy_memory_limit,
            },
            ..Default::default()
        },
        webhook_configuration: args.webhook_configuration,
        kubeconfig: args.kubeconfig,
        native_sidecars: args.native_sidecars,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-injector: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-injector: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: server::Config) -> anyhow::Result<()> {
    let injector = server::build(config).await?;
    let (trigger, watcher) = weft_drain::new();
    let task = tokio::spawn(injector.run(watcher));
    weft_telemetry::shutdown_signal().await;
    if tokio::time::timeout(Duration::from_secs(5), trigger.drain())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing anyway");
    }
    task.await??;
    Ok(())
}
