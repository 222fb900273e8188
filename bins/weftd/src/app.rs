//! Wiring: `build()` binds every port and loads config, so a port conflict or an unreadable directory
//! fails at start; `run()` serves until drained.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{Instrument, info, info_span, warn};
use weft_drain::DrainWatcher;
use weft_xds::{
    XdsMetrics,
    server::{AdsServer, SnapshotGenerator},
};

use crate::{
    source,
    translate::{Generator, MeshOptions},
};

/// weftd's settings, as plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub config_dir: PathBuf,
    pub xds_address: SocketAddr,
    pub monitoring_address: SocketAddr,
    pub mesh: MeshOptions,
    pub poll_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind the {what} address {address}: {source}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("config directory {0} does not exist or is not a directory")]
    NoConfigDir(PathBuf),
    #[error("the xDS server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// weftd with its ports bound and its config loaded, ready to run.
pub struct App {
    config: Config,
    xds: TcpListener,
    monitoring: TcpListener,
    generator: watch::Sender<Arc<dyn SnapshotGenerator>>,
    registry: Arc<Registry>,
    metrics: XdsMetrics,
    loaded: source::Fingerprint,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

async fn bind(what: &'static str, address: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(address)
        .await
        .map_err(|source| Error::Bind {
            what,
            address,
            source,
        })
}

pub async fn build(config: Config) -> Result<App, Error> {
    if !config.config_dir.is_dir() {
        return Err(Error::NoConfigDir(config.config_dir.clone()));
    }
    let xds = bind("xDS", config.xds_address).await?;
    let monitoring = bind("monitoring", config.monitoring_address).await?;
    let loaded = source::fingerprint(&config.config_dir);
    let model = Arc::new(source::load(&config.config_dir, &config.mesh));
    let (generator, _) =
        watch::channel(Arc::new(Generator { model }) as Arc<dyn SnapshotGenerator>);
    let mut registry = Registry::default();
    let metrics = XdsMetrics::new(&mut registry);
    Ok(App {
        config,
        xds,
        monitoring,
        generator,
        registry: Arc::new(registry),
        metrics,
        loaded,
    })
}

impl App {
    pub fn xds_address(&self) -> SocketAddr {
        self.xds.local_addr().unwrap_or(self.config.xds_address)
    }

    pub fn monitoring_address(&self) -> SocketAddr {
        self.monitoring
            .local_addr()
            .unwrap_or(self.config.monitoring_address)
    }

    /// The ADS server's counters, for tests that wait on ACKs and NACKs.
    pub fn xds_metrics(&self) -> XdsMetrics {
        self.metrics.clone()
    }

    /// Serves xDS and metrics and watches the config directory until `drain` is signaled.
    pub async fn run(self, drain: DrainWatcher) -> Result<(), Error> {
        let App {
            config,
            xds,
            monitoring,
            generator,
            registry,
            metrics,
            loaded,
        } = self;
        info!(xds = %xds.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), config_dir = %config.config_dir.display(), "weftd serving");
        let mut tasks = JoinSet::new();
        let watcher = source::watch_dir(
            loaded,
            config.config_dir.clone(),
            config.mesh.clone(),
            config.poll_interval,
            generator.clone(),
            drain.clone(),
        );
        tasks.spawn(watcher.instrument(info_span!("config_source")));
        tasks.spawn(
            serve_metrics(monitoring, registry, metrics.clone(), drain.clone())
                .instrument(info_span!("monitoring")),
        );
        let ads = AdsServer::new(generator.subscribe(), metrics, drain.clone()).into_service();
        let shutdown = {
            let d = drain.clone();
            async move { d.signaled().await }
        };
        let result = tonic::transport::Server::builder()
            .add_service(ads)
            .serve_with_incoming_shutdown(TcpListenerStream::new(xds), shutdown)
            .instrument(info_span!("xds"))
            .await;
        while tasks.join_next().await.is_some() {}
        drop(drain);
        result.map_err(Error::from)
    }
}

/// `/metrics` in Prometheus text format, on Istio's control-plane monitoring port, and `/debug/nacks`:
/// the recent NACKs with each proxy's `error_detail`, as JSON.
async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    xds: XdsMetrics,
    drain: DrainWatcher,
) {
    let mut conns = JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => { warn!(error = %e, "monitoring accept failed"); continue }
            },
            () = drain.signaled() => break,
        };
        let registry = registry.clone();
        let xds = xds.clone();
        let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
            let registry = registry.clone();
            let xds = xds.clone();
            async move {
                let (status, body) = if req.uri().path() == "/debug/nacks" {
                    match serde_json::to_string_pretty(&xds.recent_nacks()) {
                        Ok(json) => (200, json),
                        Err(e) => (500, format!("cannot encode NACKs: {e}")),
                    }
                } else if req.uri().path() == "/metrics" {
                    match weft_telemetry::encode_prometheus_text(&registry) {
                        Ok(text) => (200, text),
                        Err(e) => (500, format!("cannot encode metrics: {e}")),
                    }
                } else {
                    (404, "not found\n".into())
                };
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap_or_default(),
                )
            }
        });
        conns.spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
    conns.abort_all();
}
