use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::time::Duration;

use weft_proxy::{app, config::Config, iptables, status};

/// Weft's sidecar proxy. The workload is described by Istio's environment variables: POD_NAME,
/// POD_NAMESPACE, INSTANCE_IP, SERVICE_ACCOUNT, ISTIO_METAJSON_LABELS and ISTIO_META_*.
#[derive(Debug, Parser)]
#[command(name = "weft-proxy", version = weft_telemetry::VERSION)]
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
    /// Wait until the proxy beside this one is ready, as Istio's `pilot-agent wait` (the injector's
    /// postStart hook, so the app starts only once its traffic can flow).
    Wait {
        #[arg(long, default_value = status::DEFAULT_WAIT_URL)]
        url: String,
        #[arg(long, alias = "timeoutSeconds", default_value_t = 60)]
        timeout_seconds: u64,
        #[arg(long, alias = "periodMillis", default_value_t = 500)]
        period_millis: u64,
        #[arg(long, alias = "requestTimeoutMillis", default_value_t = 500)]
        request_timeout_millis: u64,
    },
}

fn wait_step(
    url: &str,
    timeout_seconds: u64,
    period_millis: u64,
    request_timeout_millis: u64,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-proxy wait: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(status::wait_until_ready(
        url,
        Duration::from_secs(timeout_seconds),
        Duration::from_millis(period_millis),
        Duration::from_millis(request_timeout_millis),
    ));
    match result {
        Ok(()) => {
            println!("weft-proxy is ready");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft-proxy wait: {e}");
            ExitCode::FAILURE
        }
    }
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
    match command {
        Some(Cmd::Iptables {
            capture,
            dry_run,
            cleanup,
        }) => return iptables_step(&capture, dry_run, cleanup),
        Some(Cmd::Wait {
            url,
            timeout_seconds,
            period_millis,
            request_timeout_millis,
        }) => return wait_step(&url, timeout_seconds, period_millis, request_timeout_millis),
        None => {}
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
