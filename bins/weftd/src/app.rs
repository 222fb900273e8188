//! Wiring: `build()` binds every port and loads config, so a port conflict or an unreadable directory
//! fails at start; `run()` serves until drained.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{Instrument, info, info_span, warn};
use weft_certs::{BootstrapTokens, Ca, ClientAuth, IdentityCell, PeerPolicy, SpiffeId};
use weft_drain::{Acceptor, DrainWatcher};
use weft_xds::{
    XdsMetrics,
    istio_ca::istio_certificate_service_server::IstioCertificateServiceServer,
    server::{AdsServer, SnapshotGenerator},
};

pub use crate::kubernetes::KubeOptions;
use crate::{
    ca::{CaMetrics, CaService, IdentityFiles, Lifetimes, TokenAuthority},
    source,
    translate::{Generator, MeshOptions},
};

/// Where weftd's config comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A directory of YAML manifests, polled for changes (`weftctl demo`, tests, one machine).
    Dir {
        config_dir: PathBuf,
        poll_interval: Duration,
    },
    /// The Kubernetes API server, as istiod reads it.
    Kubernetes(KubeOptions),
}

/// weftd's settings, as plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub source: Source,
    /// Plaintext xDS (Istio's 15010), for trusted local use only: it believes what each node claims.
    /// `None` turns it off.
    pub xds_address: Option<SocketAddr>,
    /// The CA service and xDS over mTLS (Istio's 15012).
    pub secure_address: SocketAddr,
    pub monitoring_address: SocketAddr,
    pub mesh: MeshOptions,
    /// The CA's `cacerts` directory: a user's CA, or where a self-signed one is created and kept.
    /// `None` keeps a self-signed CA in memory for this process only with the directory source, and
    /// reads the CA from Secrets (`cacerts`, else `istio-ca-secret`) with the Kubernetes source.
    pub ca_dir: Option<PathBuf>,
    /// Where the trust bundle and per-service-account bootstrap tokens are written for proxies.
    pub identity_dir: Option<PathBuf>,
    pub lifetimes: Lifetimes,
}

/// weftd's own identity on 15012, as istiod's.
const CONTROL_PLANE_NAMESPACE: &str = "istio-system";
const CONTROL_PLANE_ACCOUNT: &str = "istiod";
const CONTROL_PLANE_CERT_TTL: Duration = weft_certs::DEFAULT_WORKLOAD_TTL;

/// weftd's own identity, which the CA never issues to a workload.
pub fn control_plane_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::new(trust_domain, CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_ACCOUNT)
}

/// The DNS name proxies verify weftd's 15012 by, as Istio's agents verify istiod's.
pub const CONTROL_PLANE_DNS_NAME: &str = "istiod.istio-system.svc";

/// Istio's name, and its long form under the cluster domain.
fn control_plane_dns_names() -> Vec<String> {
    vec![
        CONTROL_PLANE_DNS_NAME.to_string(),
        format!("{CONTROL_PLANE_DNS_NAME}.{}", crate::registry::DNS_DOMAIN),
    ]
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
    #[error("cannot load the config directory: {0}")]
    Config(#[from] weft_api::LoadError),
    #[error("the xDS server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("the CA: {0}")]
    Ca(#[from] weft_certs::CaError),
    #[error("Kubernetes: {0}")]
    Kubernetes(#[from] crate::kubernetes::Error),
    #[error("cannot set up TLS on the secure port: {0}")]
    Tls(String),
}

/// weftd with its ports bound and its config loaded, ready to run.
pub struct App {
    config: Config,
    xds: Option<TcpListener>,
    secure: TcpListener,
    monitoring: TcpListener,
    ca: Arc<Ca>,
    tokens: Arc<BootstrapTokens>,
    identity_files: Option<IdentityFiles>,
    ca_metrics: CaMetrics,
    generator: watch::Sender<Arc<dyn SnapshotGenerator>>,
    registry: Arc<Registry>,
    metrics: XdsMetrics,
    running: Running,
    /// Whether config has been read in full once: `/ready` answers 200 from then on.
    ready: watch::Sender<bool>,
    /// Whether this replica leads (always with the directory source: there is only one).
    leading: watch::Sender<bool>,
}

/// The source as `build()` left it, ready to run.
enum Running {
    Dir {
        loaded: source::Fingerprint,
        config_dir: PathBuf,
        poll_interval: Duration,
    },
    Kubernetes {
        client: kube::Client,
        options: KubeOptions,
    },
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
    if let Source::Dir { config_dir, .. } = &config.source
        && !config_dir.is_dir()
    {
        return Err(Error::NoConfigDir(config_dir.clone()));
    }
    let xds = match config.xds_address {
        Some(address) => Some(bind("xDS", address).await?),
        None => None,
    };
    let secure = bind("secure xDS and CA", config.secure_address).await?;
    let monitoring = bind("monitoring", config.monitoring_address).await?;
    let trust_domain = &config.mesh.trust_domain;
    let running = match &config.source {
        Source::Dir {
            config_dir,
            poll_interval,
        } => Running::Dir {
            loaded: source::fingerprint(config_dir)?,
            config_dir: config_dir.clone(),
            poll_interval: *poll_interval,
        },
        Source::Kubernetes(options) => Running::Kubernetes {
            client: crate::kubernetes::client(options.kubeconfig.as_deref()).await?,
            options: options.clone(),
        },
    };
    let ca = Arc::new(match (&config.ca_dir, &running) {
        (Some(dir), _) => Ca::load_or_create(dir, trust_domain, SystemTime::now())?,
        (None, Running::Kubernetes { client, options }) => {
            crate::kubernetes::ca_secret::load_or_create(
                client.clone(),
                &options.namespace,
                trust_domain,
            )
            .await?
        }
        (None, Running::Dir { .. }) => Ca::self_signed(
            trust_domain,
            SystemTime::now(),
            weft_certs::DEFAULT_ROOT_TTL,
        )?,
    });
    let tokens = Arc::new(BootstrapTokens::generate().map_err(|e| Error::Tls(e.to_string()))?);
    let identity_files = config.identity_dir.as_ref().map(|dir| IdentityFiles {
        dir: dir.clone(),
        tokens: tokens.clone(),
        trust_domain: trust_domain.clone(),
        root_pem: ca.root_pem().to_string(),
    });
    let model = match &running {
        Running::Dir { config_dir, .. } => {
            let model = Arc::new(source::load(config_dir, &config.mesh)?);
            if let Some(files) = &identity_files {
                files.write(&model);
            }
            model
        }
        // Nothing is served before the first full sync, so this empty model is never pushed.
        Running::Kubernetes { .. } => Arc::new(crate::Model::build(
            &Default::default(),
            config.mesh.clone(),
        )),
    };
    // With one directory there is one weftd: it is ready and leads at once.
    let single = matches!(running, Running::Dir { .. });
    let (generator, _) =
        watch::channel(Arc::new(Generator { model }) as Arc<dyn SnapshotGenerator>);
    let mut registry = Registry::default();
    let metrics = XdsMetrics::new(&mut registry);
    let ca_metrics = CaMetrics::new(&mut registry);
    Ok(App {
        config,
        xds,
        secure,
        monitoring,
        ca,
        tokens,
        identity_files,
        ca_metrics,
        generator,
        registry: Arc::new(registry),
        metrics,
        running,
        ready: watch::Sender::new(single),
        leading: watch::Sender::new(single),
    })
}

impl App {
    /// Whether this replica leads: always with the directory source; on Kubernetes, while it holds
    /// the leader Lease.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    /// Whether config has been read in full once (what `/ready` answers).
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Where plaintext xDS listens, when it is on.
    pub fn xds_address(&self) -> Option<SocketAddr> {
        self.xds.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn secure_address(&self) -> SocketAddr {
        self.secure
            .local_addr()
            .unwrap_or(self.config.secure_address)
    }

    /// The trust bundle proxies verify weftd and each other against.
    pub fn root_pem(&self) -> &str {
        self.ca.root_pem()
    }

    /// The bootstrap token for a service account, as written to the identity directory.
    pub fn bootstrap_token(&self, namespace: &str, service_account: &str) -> String {
        self.tokens.issue(&SpiffeId::new(
            &self.config.mesh.trust_domain,
            namespace,
            service_account,
        ))
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
            secure,
            monitoring,
            ca,
            tokens,
            identity_files,
            ca_metrics,
            generator,
            registry,
            metrics,
            running,
            ready,
            leading,
        } = self;
        let xds_address = xds.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(address) = xds_address.filter(|a| !a.ip().is_loopback()) {
            warn!(%address, "plaintext xDS listens beyond loopback: any caller that can reach it gets any workload's config by naming it in its node id; keep it for trusted local use, or turn it off with --xds-address ''");
        }
        let mut tasks = JoinSet::new();
        tasks.spawn(
            serve_metrics(
                monitoring,
                registry,
                metrics.clone(),
                ready.subscribe(),
                drain.clone(),
            )
            .instrument(info_span!("monitoring")),
        );
        let authority = match running {
            Running::Dir {
                loaded,
                config_dir,
                poll_interval,
            } => {
                info!(xds = ?xds_address, secure = ?secure.local_addr().ok(), config_dir = %config_dir.display(), "weftd serving");
                let watcher = source::watch_dir(
                    loaded,
                    config_dir,
                    config.mesh.clone(),
                    poll_interval,
                    generator.clone(),
                    identity_files,
                    drain.clone(),
                );
                tasks.spawn(watcher.instrument(info_span!("config_source")));
                TokenAuthority::Bootstrap(tokens)
            }
            Running::Kubernetes { client, options } => {
                spawn_kubernetes(
                    &mut tasks,
                    client.clone(),
                    options,
                    config.mesh.clone(),
                    ca.root_pem().to_string(),
                    generator.clone(),
                    ready.clone(),
                    leading,
                    drain.clone(),
                );
                // Serving before every kind is listed would push proxies a partial mesh.
                let mut synced = ready.subscribe();
                let drained = tokio::select! {
                    _ = synced.wait_for(|r| *r) => false,
                    () = drain.signaled() => true,
                };
                if drained {
                    while tasks.join_next().await.is_some() {}
                    return Ok(());
                }
                info!(xds = ?xds_address, secure = ?secure.local_addr().ok(), "weftd serving config from the Kubernetes API");
                TokenAuthority::Kubernetes(Box::new(
                    crate::kubernetes::token_review::Reviewer::new(client),
                ))
            }
        };
        let trust_domain = config.mesh.trust_domain.clone();
        let me = control_plane_identity(&trust_domain);
        let cell = IdentityCell::new(ca.issue_with_dns(
            &me,
            &control_plane_dns_names(),
            SystemTime::now(),
            CONTROL_PLANE_CERT_TTL,
        )?);
        // Proxies with no certificate yet must reach the CA, so a client certificate is optional at
        // the handshake; the ADS service refuses a stream without one on this port.
        let server_tls = weft_certs::server_config(
            &cell,
            PeerPolicy::TrustDomain(trust_domain.clone()),
            ClientAuth::Optional,
            &["h2"],
        )
        .map_err(|e| Error::Tls(e.to_string()))?;
        tasks.spawn(
            renew_own_certificate(ca.clone(), me, cell, drain.clone()).instrument(info_span!("ca")),
        );
        let ca_service = IstioCertificateServiceServer::new(CaService {
            ca,
            authority,
            trust_domain,
            lifetimes: config.lifetimes,
            metrics: ca_metrics,
        });
        let ads = AdsServer::new(generator.subscribe(), metrics, drain.clone()).into_service();
        let shutdown = |d: DrainWatcher| async move { d.signaled().await };
        let plaintext_ads = ads.clone();
        let plaintext_drain = drain.clone();
        let plaintext = async move {
            let Some(xds) = xds else { return Ok(()) };
            grpc_server()
                .add_service(plaintext_ads)
                .serve_with_incoming_shutdown(
                    Acceptor::new(xds, "xDS").into_stream(),
                    shutdown(plaintext_drain),
                )
                .await
        }
        .instrument(info_span!("xds"));
        let mtls = grpc_server()
            .add_service(ads)
            .add_service(ca_service)
            .serve_with_incoming_shutdown(
                weft_xds::tls::incoming(Acceptor::new(secure, "secure xDS and CA"), server_tls),
                shutdown(drain.clone()),
            )
            .instrument(info_span!("secure"));
        let (plaintext, mtls) = tokio::join!(plaintext, mtls);
        while tasks.join_next().await.is_some() {}
        drop(drain);
        plaintext.and(mtls).map_err(Error::from)
    }
}

/// The Kubernetes source and what runs beside it: leader election, and on the leader the status
/// writer and the namespace controller.
#[allow(clippy::too_many_arguments)]
fn spawn_kubernetes(
    tasks: &mut JoinSet<()>,
    client: kube::Client,
    options: KubeOptions,
    mesh: MeshOptions,
    root_pem: String,
    generator: watch::Sender<Arc<dyn SnapshotGenerator>>,
    ready: watch::Sender<bool>,
    leading: watch::Sender<bool>,
    drain: DrainWatcher,
) {
    use crate::kubernetes::{leader, namespaces, source as kube_source, status};
    let (verdicts, _) = watch::channel(Arc::new(Vec::new()));
    let served = kube_source::Served::default();
    let outputs = kube_source::Outputs {
        publish: generator,
        synced: ready,
        verdicts: verdicts.clone(),
        served: served.clone(),
        identity_files: None,
    };
    tasks.spawn(
        kube_source::run(
            client.clone(),
            mesh,
            options.debounce,
            outputs,
            drain.clone(),
        )
        .instrument(info_span!("config_source")),
    );
    let (c, d) = (client.clone(), drain.clone());
    tasks.spawn(
        leader::while_leading(leading.subscribe(), drain.clone(), move || {
            status::run(c.clone(), verdicts.subscribe(), served.clone(), d.clone())
        })
        .instrument(info_span!("status")),
    );
    let (c, d) = (client.clone(), drain.clone());
    tasks.spawn(
        leader::while_leading(leading.subscribe(), drain.clone(), move || {
            namespaces::run(c.clone(), root_pem.clone(), d.clone())
        })
        .instrument(info_span!("namespace_controller")),
    );
    tasks.spawn(
        leader::run(
            client,
            options.namespace,
            options.identity,
            options.leader_timing,
            leading,
            drain,
        )
        .instrument(info_span!("leader")),
    );
}

/// weftd's gRPC servers, with the limits hostile clients meet: a proxy needs one ADS stream (and a CA
/// call now and then), so a connection may hold only a few; and a peer that stops answering HTTP/2
/// pings is dropped, so dead connections do not keep their streams' state.
fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

const MAX_STREAMS_PER_CONNECTION: u32 = 8;

/// Reissues weftd's serving certificate at half its lifetime, like any workload's.
async fn renew_own_certificate(ca: Arc<Ca>, me: SpiffeId, cell: IdentityCell, drain: DrainWatcher) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(CONTROL_PLANE_CERT_TTL / 2) => {}
            () = drain.signaled() => return,
        }
        match ca.issue_with_dns(
            &me,
            &control_plane_dns_names(),
            SystemTime::now(),
            CONTROL_PLANE_CERT_TTL,
        ) {
            Ok(identity) => {
                info!(serial = %identity.serial, "renewed weftd's serving certificate");
                cell.replace(identity);
            }
            Err(e) => {
                warn!(error = %e, "cannot renew weftd's serving certificate; keeping the current one")
            }
        }
    }
}

/// `/metrics` in Prometheus text format, on Istio's control-plane monitoring port; `/ready`, 200 once
/// config has been read in full (the first full sync on Kubernetes); and `/debug/nacks`: the recent
/// NACKs with each proxy's `error_detail`, as JSON.
async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    xds: XdsMetrics,
    ready: watch::Receiver<bool>,
    drain: DrainWatcher,
) {
    weft_drain::http::serve(
        listener,
        "monitoring",
        drain,
        move |req: Request<hyper::body::Incoming>| {
            let registry = registry.clone();
            let xds = xds.clone();
            let ready = *ready.borrow();
            async move {
                let (status, body) = if req.uri().path() == "/ready" {
                    if ready {
                        (200, "ready\n".to_string())
                    } else {
                        (
                            503,
                            "not ready: the config source has not been read in full yet\n"
                                .to_string(),
                        )
                    }
                } else if req.uri().path() == "/debug/syncz" {
                    let report = weft_xds::syncz::SyncReport {
                        control_plane_version: weft_telemetry::VERSION.into(),
                        proxies: xds.sync_status(),
                    };
                    match serde_json::to_string_pretty(&report) {
                        Ok(json) => (200, json),
                        Err(e) => (500, format!("cannot encode the sync status: {e}")),
                    }
                } else if req.uri().path() == "/debug/nacks" {
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
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default()
            }
        },
    )
    .await
}
