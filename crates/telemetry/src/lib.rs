//! weft-telemetry: tracing setup, shutdown signals, and Istio's standard proxy metrics.

mod istio;

pub use istio::{IstioMetrics, RequestLabels, TcpLabels};

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); `WEFT_LOG_FORMAT=json` switches to JSON lines.
pub fn init_tracing() {
    init_tracing_with_default("info");
}

/// As [`init_tracing`], with another default filter for tools whose own output matters more than logs.
pub fn init_tracing_with_default(default_filter: &str) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
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
