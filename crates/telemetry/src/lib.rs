//! weft-telemetry: tracing setup, shutdown signals, and Istio's standard proxy metrics.

mod istio;
pub mod workload;

pub use istio::{DenialLabels, IstioMetrics, RequestLabels, TcpLabels};

/// The content type of [`encode_prometheus_text`].
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes a registry in Prometheus' text format 0.0.4, which Envoy's `/stats/prometheus` serves and every
/// scraper reads. prometheus-client writes OpenMetrics, whose counter families are named without the
/// `_total` their samples carry; in 0.0.4 the family is named like its samples, so parsers would otherwise
/// see an empty counter and an untyped `..._total`.
pub fn encode_prometheus_text(
    registry: &prometheus_client::registry::Registry,
) -> Result<String, std::fmt::Error> {
    let mut open_metrics = String::new();
    prometheus_client::encoding::text::encode(&mut open_metrics, registry)?;
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    Ok(out)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); `WEFT_LOG_FORMAT=json` switches to JSON lines.
pub fn init_tracing() {
    init_tracing_with_default("info");
}

/// Weft's version as every binary reports it: a release's, stamped from git into `WEFT_VERSION` by
/// `cargo xtask release`, else the crates' own.
pub const VERSION: &str = match option_env!("WEFT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// As [`init_tracing`], with another default filter for tools whose own output matters more than logs.
pub fn init_tracing_with_default(default_filter: &str) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if std::env::var("WEFT_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = async {
            match signal(SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
