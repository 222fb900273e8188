//! Wiring: `build()` binds the admin, metrics, status and readiness ports (a conflict fails at start); `run()` starts the
//! ADS client, which binds listeners as config arrives, and serves until drained.

use std::{net::SocketAddr, sync::Arc};

use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{Instrument, info, info_span};
use weft_drain::DrainWatcher;
use weft_telemetry::IstioMetrics;

use crate::{
    Ctx, admin,
    config::Config,
    listeners::ListenerManager,
    state::{ProxyState, XdsHandler},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind the {what} address {address}: {source}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
}

pub struct App {
    config: Config,
    admin: TcpListener,
    stats: TcpListener,
    status: TcpListener,
    readiness: TcpListener,
    state: watch::Sender<Arc<ProxyState>>,
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
    let admin = bind("admin", config.admin_address).await?;
    let stats = bind("metrics", config.stats_address).await?;
    let status = bind("status", config.status_address).await?;
    let readiness = bind("readiness", config.readiness_address).await?;
    let (state, _) = watch::channel(Arc::new(ProxyState::default()));
    Ok(App {
        config,
        admin,
        stats,
        status,
        readiness,
        state,
    })
}

impl App {
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    pub fn stats_address(&self) -> Option<SocketAddr> {
        self.stats.local_addr().ok()
    }

    pub fn status_address(&self) -> Option<SocketAddr> {
        self.status.local_addr().ok()
    }

    pub fn readiness_address(&self) -> Option<SocketAddr> {
        self.readiness.local_addr().ok()
    }

    /// The applied config, for tests that wait for a route or endpoint to arrive.
    pub fn state(&self) -> watch::Receiver<Arc<ProxyState>> {
        self.state.subscribe()
    }

    pub async fn run(self, drain: DrainWatcher) {
        let App {
            config,
            admin,
            stats,
            status,
            readiness,
            state,
        } = self;
        let mut tasks = JoinSet::new();
        let tls = Arc::new(crate::mtls::TlsConfigs::default());
        let mut registry = Registry::default();
        let metrics = IstioMetrics::new(&mut registry);
        let access_log = crate::access_log::AccessLog::new(&mut registry);
        let ctx = Arc::new(Ctx {
            principal: if config.identity.is_some() {
                config.spiffe_id.to_string()
            } else {
                "unknown".into()
            },
            tls: tls.clone(),
            state: state.subscribe(),
            metrics,
            registry: Arc::new(registry),
            workload: config.workload.clone(),
            drain: drain.clone(),
            listener_drain: config.listener_drain,
            access_log,
            tasks: Default::default(),
        });
        info!(node = %config.node.id, xds = %config.xds_address, "weft-proxy starting");
        // Admin answers (not ready) while the certificate is being fetched.
        let app_status = Arc::new(config.app_status.clone());
        for (listener, port) in [
            (admin, admin::Port::Admin),
            (stats, admin::Port::Stats),
            (readiness, admin::Port::Readiness),
            (status, admin::Port::Status(app_status)),
        ] {
            let span = info_span!("port", name = port.name());
            tasks.spawn(admin::serve(listener, ctx.clone(), port).instrument(span));
        }
        // Rotation renews early when weftd cannot be verified (its CA may have changed).
        let renew_now = Arc::new(tokio::sync::Notify::new());
        // The certificate comes before xDS: listeners and clusters that need mTLS refer to it.
        if let Some(identity) = &config.identity {
            let Some(cell) = crate::identity::bootstrap(identity, &config.spiffe_id, &drain).await
            else {
                return;
            };
            tls.set_identity(cell.clone());
            tasks.spawn(
                crate::identity::rotate(
                    identity.clone(),
                    config.spiffe_id.clone(),
                    cell,
                    renew_now.clone(),
                    drain.clone(),
                )
                .instrument(info_span!("identity")),
            );
        }
        let handler = XdsHandler::new(
            state,
            ListenerManager::new(ctx.clone()),
            tls.clone(),
            renew_now,
        );
        let mut xds =
            weft_xds::client::ClientConfig::new(config.xds_address.clone(), config.node.clone());
        // weftd's 15012 takes this proxy's namespace and service account from its certificate;
        // the config refuses https without CA_ADDR, so the identity is there.
        if let (true, Some(cell), Some(identity)) = (
            config.xds_address.starts_with("https://"),
            tls.identity(),
            &config.identity,
        ) {
            let expected = weft_certs::PeerPolicy::DnsName(identity.control_plane.clone());
            match weft_certs::client_config(cell, expected, &["h2"]) {
                Ok(client) => xds.tls = Some(client),
                Err(e) => {
                    tracing::error!(error = %e, "cannot set up TLS to the control plane");
                    return;
                }
            }
        }
        tasks.spawn(
            weft_xds::client::run(xds, handler, drain.clone()).instrument(info_span!("xds")),
        );
        drop(ctx);
        drop(drain);
        while tasks.join_next().await.is_some() {}
    }
}

/// Builds and runs the proxy until SIGTERM or SIGINT, then drains for the configured grace period.
pub async fn run_until_signal(config: Config) -> Result<(), Error> {
    let grace = config.drain_duration;
    let app = build(config).await?;
    let (trigger, watcher) = weft_drain::new();
    let running = tokio::spawn(app.run(watcher));
    weft_telemetry::shutdown_signal().await;
    info!("shutting down: no new connections, draining those in flight");
    if tokio::time::timeout(grace, trigger.drain()).await.is_err() {
        tracing::warn!("drain deadline passed; closing remaining connections");
    }
    running.abort();
    Ok(())
}
