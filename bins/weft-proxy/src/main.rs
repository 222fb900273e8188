use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weft_proxy::{app, config::Config, iptables};

/// Weft's sidecar proxy. The workload is described by Istio's environment variables: POD_NAME,
/// POD_NAMESPACE, INSTANCE_IP, SERVICE_ACCOUNT, ISTIO_METAJSON_LABELS and ISTIO_META_*.
#[derive(Debug, Parser)]
#[command(name = "weft-proxy", version)]
struct Args {
    /// The control plane's ADS address.
    #[arg(
        long,
        env = "WEFT_PROXY_XDS_ADDRESS",
        default_value = "http://127.0.0.1:15010"
    )]
    xds_address: String,
    /// Worker threads, as Istio's proxy `concurrency`. The default, 1, runs the proxy on a single
    /// thread that never hands work to another: the least CPU per request and the lowest latency for a
    /// sidecar (the bench measured 41 µs per request against 66 with 2 threads). Raise it for a
    /// workload that needs more than one core of proxying.
    #[arg(long, env = "WEFT_PROXY_CONCURRENCY", default_value_t = 1)]
    concurrency: usize,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the traffic capture rules, as Istio's `istio-iptables` (the pod's init step) does.
    Iptables {
        #[command(flatten)]
        capture: iptables::CaptureConfig,
        /// Print the rules instead of installing them.
        #[arg(long)]
        dry_run: bool,
        /// Remove the rules instead of installing them.
        #[arg(long)]
        cleanup: bool,
    },
}

fn iptables_step(capture: &iptables::CaptureConfig, dry_run: bool, cleanup: bool) -> ExitCode {
    if cleanup {
        if dry_run {
            for args in iptables::cleanup_commands() {
                println!("iptables -t nat {}", args.join(" "));
            }
        } else {
            iptables::cleanup();
        }
        return ExitCode::SUCCESS;
    }
    let result = if dry_run {
        iptables::rules(capture).map(|r| print!("{r}"))
    } else {
        iptables::apply(capture)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-proxy iptables: {e}");
            ExitCode::from(64)
        }
    }
}

fn main() -> ExitCode {
    let Args {
        xds_address,
        concurrency,
        command,
    } = Args::parse();
    if let Some(Cmd::Iptables {
        capture,
        dry_run,
        cleanup,
    }) = command
    {
        return iptables_step(&capture, dry_run, cleanup);
    }
    let xds_address = if xds_address.contains("://") {
        xds_address
    } else {
        format!("http://{xds_address}")
    };
    let vars: Vec<(String, String)> = std::env::vars().collect();
    let config = match Config::from_env(xds_address, &vars) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weft-proxy: {e}");
            return ExitCode::from(64);
        }
    };
    weft_telemetry::init_tracing();
    if let Err(e) = weft_drain::raise_fd_limit() {
        tracing::warn!(error = %e, "cannot raise the open file limit");
    }
    let runtime = if concurrency <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(concurrency)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-proxy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(app::run_until_signal(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
