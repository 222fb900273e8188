use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

/// Weft's command line.
#[derive(Debug, Parser)]
#[command(name = "weftctl", version = weft_telemetry::VERSION)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole mesh on this machine (weftd, a proxy per workload, a sample app) and drive traffic
    /// through a routing rule; exits 0 only if all traffic behaved as configured.
    Demo {
        /// Stop after this long (`10s`, `2m`); without it the demo runs until Ctrl-C.
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Requests per second.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// Where to write the demo's manifests (default: a new temporary directory).
        #[arg(long)]
        config_dir: Option<PathBuf>,
        /// `interception` puts each workload in a network namespace with iptables capture (needs root);
        /// `explicit` gives each its own 127.0.0.x address; `auto` picks interception when it can.
        #[arg(long, value_enum, default_value = "auto")]
        mode: weftctl::demo::Mode,
        /// Where `weftd` and `weft-proxy` are (default: beside weftctl, then `PATH`).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Print manifests with sidecars injected, as `istioctl kube-inject`: Pods and the pod templates of
    /// Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs.
    KubeInject {
        /// The manifests; `-` reads standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// The weft-proxy image for the sidecar and its init step.
        #[arg(long, env = "WEFT_PROXY_IMAGE", default_value = "weft-proxy:latest")]
        proxy_image: String,
        /// Where sidecars find weftd's CA and secure xDS.
        #[arg(long, default_value = "istiod.istio-system.svc:15012")]
        discovery_address: String,
        /// Inject native sidecars (Kubernetes 1.29 and later).
        #[arg(long)]
        native_sidecars: bool,
    },
    /// Install Weft into the cluster: the charts rendered for these values, applied with server-side
    /// apply (CRDs first), then a wait for the control plane.
    Install(weftctl::install::InstallArgs),
    /// Delete what `install` applied for these values; `--purge` deletes the CRDs too.
    Uninstall(weftctl::install::UninstallArgs),
    /// The manifests of an install.
    #[command(subcommand)]
    Manifest(ManifestCommand),
    /// Staged checks with a ✓/✗ line each and how to fix what fails: `--pre` before an install, else
    /// the installed mesh (CRDs, control plane, injector, root certificate, proxies).
    Check(weftctl::check::CheckArgs),
    /// Find what weftd would refuse and what would not do what it says, in manifest files (`-f`) or
    /// in the cluster, with Istio's message codes; exits 79 when an error is found, as istioctl.
    Analyze(weftctl::analyze::AnalyzeArgs),
    /// Each proxy's sync with weftd, per xDS type (SYNCED, STALE, NACKED, NOT SENT), as istioctl
    /// proxy-status; a rejection is printed in the proxy's own words.
    #[command(alias = "ps")]
    ProxyStatus {
        /// Only this proxy: `POD.NAMESPACE` or `POD`.
        proxy: Option<String>,
        #[command(flatten)]
        source: weftctl::proxy_status::WeftdSource,
    },
    /// One proxy's applied config (cluster, listener, route, endpoint, secret or all), from its admin
    /// through a port-forward, as istioctl proxy-config.
    #[command(alias = "pc")]
    ProxyConfig(weftctl::proxy_config::ProxyConfigArgs),
    /// weftctl's version, each weftd replica's, and the connected proxies' by count.
    Version {
        /// Only weftctl's own version; the cluster is not asked.
        #[arg(long)]
        client: bool,
        #[command(flatten)]
        source: weftctl::proxy_status::WeftdSource,
    },
    /// Print a completion script: `weftctl completion bash > /etc/bash_completion.d/weftctl`.
    Completion { shell: clap_complete::Shell },
    /// The demo's sample application, one workload per process (used by `cargo xtask bench`).
    #[command(hide = true, subcommand)]
    SampleApp(SampleApp),
}

#[derive(Debug, Subcommand)]
enum ManifestCommand {
    /// Print what `install` would apply for these values: the charts rendered as `helm template`
    /// renders them.
    Generate {
        #[command(flatten)]
        values: weftctl::manifest::ValuesArgs,
        /// The control plane's namespace.
        #[arg(short = 'n', long, default_value = "istio-system")]
        namespace: String,
        /// The Kubernetes version to render for (API versions differ: autoscaling/v2 from 1.23).
        #[arg(long, default_value = "1.29", value_parser = weftctl::manifest::parse_kube_version)]
        kube_version: weft_charts::KubeVersion,
    },
}

#[derive(Debug, Subcommand)]
enum SampleApp {
    /// A backend answering `backend <version>` to every request.
    Backend {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "v1")]
        version: String,
    },
    /// One of Bookinfo's services on port 9080, standing in for its sample image where none can be
    /// pulled (the Kubernetes-backed e2e runs `docker.io/istio/examples-bookinfo-*` images with it).
    Bookinfo {
        /// The image's service and version: `productpage-v1`, `details-v1`, `reviews-v1`,
        /// `reviews-v2`, `reviews-v3` or `ratings-v1`.
        service: weftctl::sample_app::Bookinfo,
    },
    /// HTTP/1.1 keep-alive load against one address (`cargo xtask bench` runs it pinned to a core of
    /// its own); prints what it measured as one JSON line.
    Load(weftctl::load::LoadArgs),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    weft_api::parse_duration(s)
}

fn main() -> ExitCode {
    let Args { command } = Args::parse();
    // The demo prints its own progress; logs show only problems unless RUST_LOG asks for more.
    // kube-client logs every error response it gets; weftctl reports each one itself, with what it was doing.
    weft_telemetry::init_tracing_with_default("warn,kube_client=off");
    if let Err(e) = weft_drain::raise_fd_limit() {
        tracing::warn!(error = %e, "cannot raise the open file limit");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weftctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Command::SampleApp(app) => match runtime.block_on(sample_app(app)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weftctl sample-app: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::KubeInject {
            file,
            proxy_image,
            discovery_address,
            native_sidecars,
        } => {
            let config = weft_inject::InjectConfig {
                proxy_image,
                discovery_address,
                native_sidecars,
                ..Default::default()
            };
            match kube_inject(&file, &config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("weftctl kube-inject: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Manifest(ManifestCommand::Generate {
            values,
            namespace,
            kube_version,
        }) => {
            let printed = values
                .values()
                .and_then(|v| weftctl::manifest::generate(&v, &namespace, kube_version))
                .and_then(|m| weft_charts::to_yaml_stream(&m).map_err(anyhow::Error::msg));
            match printed {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("weftctl manifest generate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ProxyStatus { proxy, source } => match runtime.block_on(source.reports()) {
            Ok((replicas, unreachable)) => {
                print!(
                    "{}",
                    weftctl::proxy_status::render(&replicas, &unreachable, proxy.as_deref())
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("✗ weftctl proxy-status: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Check(args) => {
            let stages = runtime.block_on(weftctl::check::run(&args));
            print!("{}", weftctl::check::render(&stages));
            if weftctl::check::passed(&stages) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Analyze(args) => match runtime.block_on(weftctl::analyze::run(&args)) {
            Ok(report) => {
                print!("{}", report.render());
                if report.failed() {
                    ExitCode::from(79)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("✗ weftctl analyze: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::ProxyConfig(args) => {
            let printed = runtime
                .block_on(weftctl::proxy_config::fetch(&args))
                .and_then(|dump| weftctl::proxy_config::render(&dump, args.section, args.output));
            match printed {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("✗ weftctl proxy-config: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Version { client, source } => {
            if client {
                println!("client version: {}", weft_telemetry::VERSION);
                return ExitCode::SUCCESS;
            }
            match runtime.block_on(source.reports()) {
                Ok((replicas, _)) => {
                    print!("{}", weftctl::proxy_status::render_version(&replicas));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("client version: {}", weft_telemetry::VERSION);
                    eprintln!("✗ control plane: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Args::command(),
                "weftctl",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Install(args) => match runtime.block_on(weftctl::install::install(&args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("✗ weftctl install: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Uninstall(args) => match runtime.block_on(weftctl::install::uninstall(&args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("✗ weftctl uninstall: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Demo {
            duration,
            rate,
            config_dir,
            mode,
            bin_dir,
        } => {
            match runtime.block_on(weftctl::demo::run(weftctl::demo::Options {
                duration,
                rate,
                config_dir,
                mode,
                bin_dir,
            })) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("weftctl demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn kube_inject(file: &std::path::Path, config: &weft_inject::InjectConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let (injected, skipped) = weft_inject::manual::inject_manifests(&text, config)?;
    for line in skipped {
        eprintln!("weftctl kube-inject: not injected: {line}");
    }
    print!("{injected}");
    Ok(())
}

async fn sample_app(app: SampleApp) -> anyhow::Result<()> {
    use anyhow::Context;
    use weftctl::sample_app;
    let bind = |listen: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))
    };
    let (trigger, watcher) = weft_drain::new();
    let server = match app {
        SampleApp::Backend { listen, version } => {
            tokio::spawn(sample_app::backend(bind(listen).await?, version, watcher))
        }
        SampleApp::Bookinfo { service } => {
            let listen = (std::net::Ipv4Addr::UNSPECIFIED, sample_app::BOOKINFO_PORT).into();
            tokio::spawn(sample_app::bookinfo(bind(listen).await?, service, watcher))
        }
        SampleApp::Load(args) => {
            let report = weftctl::load::run(&args).await?;
            println!("{}", serde_json::to_string(&report)?);
            return Ok(());
        }
    };
    weft_telemetry::shutdown_signal().await;
    trigger.drain().await;
    server.await?;
    Ok(())
}
