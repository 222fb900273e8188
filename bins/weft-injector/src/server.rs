//! The webhook: `POST /inject` over TLS on Istio's 15017, answered by [`weft_inject::admission::review`];
//! `/metrics` (Istio's `sidecar_injection_*` counters) and `/ready` in plaintext on the monitoring
//! port. The serving certificate comes from a CA the injector makes at start; it keeps its
//! MutatingWebhookConfiguration's `caBundle` equal to that CA's root, so the API server trusts it.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration, time::SystemTime};

use futures::StreamExt;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use tokio::{net::TcpListener, task::JoinSet};
use tracing::{Instrument, info, info_span, warn};
use weft_certs::{Ca, ClientAuth, IdentityCell, PeerPolicy, SpiffeId};
use weft_drain::{Acceptor, DrainWatcher};

use weft_inject::{
    InjectConfig,
    admission::{self, Outcome},
};

/// The injector's settings, as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The webhook (Istio's 15017).
    pub address: SocketAddr,
    pub monitoring_address: SocketAddr,
    /// The names the API server reaches the webhook by (its Service's, or `localhost`).
    pub dns_names: Vec<String>,
    pub trust_domain: String,
    pub inject: InjectConfig,
    /// The MutatingWebhookConfiguration whose `caBundle` the injector keeps current, and how it
    /// reaches the API server (`None`: in-cluster or `$KUBECONFIG`). No name: nothing is written.
    pub webhook_configuration: Option<String>,
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Whether the sidecar is a native sidecar; `Auto` asks the API server its version at start.
    pub native_sidecars: NativeSidecars,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeSidecars {
    /// Native sidecars where the API server serves them (Kubernetes 1.29 and later).
    Auto,
    #[value(name = "true")]
    On,
    #[value(name = "false")]
    Off,
}

/// Native sidecars (init containers with `restartPolicy: Always`) are on by default from Kubernetes
/// 1.29. Providers write minors such as `29+`, so only the leading digits count.
pub fn serves_native_sidecars(major: &str, minor: &str) -> bool {
    let number = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .ok()
    };
    match (number(major), number(minor)) {
        (Some(major), Some(minor)) => (major, minor) >= (1, 29),
        _ => false,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind the {what} address {address}: {source}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot make the serving certificate: {0}")]
    Certificate(String),
    #[error("Kubernetes: {0}")]
    Kubernetes(String),
}

/// Istio's injector counters (`sidecar_injection_*_total`).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub requests: Counter,
    pub success: Counter,
    pub skip: Counter,
    pub failure: Counter,
}

impl Metrics {
    fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        for (name, help, counter) in [
            (
                "sidecar_injection_requests",
                "Admission requests for pods",
                &m.requests,
            ),
            ("sidecar_injection_success", "Pods injected", &m.success),
            (
                "sidecar_injection_skip",
                "Pods admitted without a sidecar, by a rule",
                &m.skip,
            ),
            (
                "sidecar_injection_failure",
                "Pods refused: the pod could not be read or patched",
                &m.failure,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        m
    }
}

/// The injector with its ports bound and its certificate made, ready to run.
pub struct Injector {
    config: Config,
    webhook: TcpListener,
    monitoring: TcpListener,
    cell: IdentityCell,
    root_pem: String,
    client: Option<kube::Client>,
    registry: Arc<Registry>,
    metrics: Metrics,
}

/// Serving certificates last a year; a restart makes a new CA and writes its root to the webhook.
const CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// How often the `caBundle` is checked, so a re-applied chart that blanks it is repaired.
const CA_BUNDLE_CHECK: Duration = Duration::from_secs(30);
/// An AdmissionReview carries one pod; more than this is not one.
const MAX_BODY: usize = 4 << 20;

async fn bind(what: &'static str, address: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(address)
        .await
        .map_err(|source| Error::Bind {
            what,
            address,
            source,
        })
}

pub async fn build(config: Config) -> Result<Injector, Error> {
    let webhook = bind("webhook", config.address).await?;
    let monitoring = bind("monitoring", config.monitoring_address).await?;
    let cert = |e: weft_certs::CaError| Error::Certificate(e.to_string());
    let ca = Ca::self_signed(&config.trust_domain, SystemTime::now(), CERT_TTL).map_err(cert)?;
    let me = SpiffeId::new(
        &config.trust_domain,
        &config.inject.control_plane_namespace,
        "weft-injector",
    );
    let identity = ca
        .issue_with_dns(&me, &config.dns_names, SystemTime::now(), CERT_TTL)
        .map_err(cert)?;
    let mut config = config;
    let client = if config.webhook_configuration.is_some()
        || config.native_sidecars == NativeSidecars::Auto
    {
        Some(
            client(config.kubeconfig.as_deref())
                .await
                .map_err(Error::Kubernetes)?,
        )
    } else {
        None
    };
    config.inject.native_sidecars = match (config.native_sidecars, &client) {
        (NativeSidecars::On, _) => true,
        (NativeSidecars::Off, _) | (NativeSidecars::Auto, None) => false,
        (NativeSidecars::Auto, Some(client)) => {
            let version = client.apiserver_version().await.map_err(|e| {
                Error::Kubernetes(format!(
                    "cannot read the API server's version to choose native sidecars (set --native-sidecars true or false): {e}"
                ))
            })?;
            let native = serves_native_sidecars(&version.major, &version.minor);
            tracing::info!(
                version = %version.git_version,
                native_sidecars = native,
                "sidecar lifecycle chosen from the API server's version"
            );
            native
        }
    };
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    Ok(Injector {
        root_pem: ca.root_pem().to_string(),
        cell: IdentityCell::new(identity),
        config,
        webhook,
        monitoring,
        client,
        registry: Arc::new(registry),
        metrics,
    })
}

async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| e.to_string())?,
    };
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

impl Injector {
    pub fn address(&self) -> SocketAddr {
        self.webhook.local_addr().unwrap_or(self.config.address)
    }

    pub fn monitoring_address(&self) -> SocketAddr {
        self.monitoring
            .local_addr()
            .unwrap_or(self.config.monitoring_address)
    }

    /// The root the webhook's certificate chains to: the `caBundle` the API server needs.
    pub fn ca_bundle(&self) -> &str {
        &self.root_pem
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// Serves until drained.
    pub async fn run(self, drain: DrainWatcher) -> Result<(), Error> {
        let tls = weft_certs::server_config(
            &self.cell,
            PeerPolicy::TrustDomain(self.config.trust_domain.clone()),
            ClientAuth::Optional,
            &["http/1.1"],
        )
        .map_err(|e| Error::Certificate(e.to_string()))?;
        let address = self.address();
        let mut tasks = JoinSet::new();
        if let (Some(client), Some(name)) = (
            self.client.clone(),
            self.config.webhook_configuration.clone(),
        ) {
            tasks.spawn(
                keep_ca_bundle(client, name, self.root_pem.clone(), drain.clone())
                    .instrument(info_span!("ca_bundle")),
            );
        }
        tasks.spawn(
            serve_monitoring(self.monitoring, self.registry.clone(), drain.clone())
                .instrument(info_span!("monitoring")),
        );
        info!(%address, "weft-injector serving /inject");
        let inject = Arc::new(self.config.inject.clone());
        let metrics = self.metrics.clone();
        let mut conns =
            weft_xds::tls::incoming(Acceptor::new(self.webhook, "webhook"), tls).boxed();
        let mut served = JoinSet::new();
        loop {
            let conn = tokio::select! {
                conn = conns.next() => conn,
                () = drain.signaled() => break,
            };
            let Some(Ok(conn)) = conn else { continue };
            while served.try_join_next().is_some() {}
            let (inject, metrics) = (inject.clone(), metrics.clone());
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (inject, metrics) = (inject.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(handle(req, &inject, &metrics).await) }
            });
            served.spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(conn), svc)
                    .await;
            });
        }
        served.abort_all();
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    inject: &InjectConfig,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/inject" {
        return reply(StatusCode::NOT_FOUND, "not found\n");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}\n"),
            );
        }
    };
    metrics.requests.inc();
    match admission::review(&body, inject) {
        Ok(answer) => {
            match &answer.outcome {
                Outcome::Injected => {
                    metrics.success.inc();
                    info!(pod = %answer.pod, "sidecar injected");
                }
                Outcome::Skipped(rule) => {
                    metrics.skip.inc();
                    info!(pod = %answer.pod, %rule, "no sidecar injected");
                }
                Outcome::Failed(why) => {
                    metrics.failure.inc();
                    warn!(pod = %answer.pod, reason = %why, "pod refused");
                }
            }
            let mut r = reply(StatusCode::OK, answer.review.to_string());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => {
            metrics.failure.inc();
            reply(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}

async fn serve_monitoring(listener: TcpListener, registry: Arc<Registry>, drain: DrainWatcher) {
    weft_drain::http::serve(
        listener,
        "monitoring",
        drain,
        move |req: Request<hyper::body::Incoming>| {
            let registry = registry.clone();
            async move {
                match req.uri().path() {
                    "/metrics" => match weft_telemetry::encode_prometheus_text(&registry) {
                        Ok(text) => reply(StatusCode::OK, text),
                        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    },
                    "/ready" => reply(StatusCode::OK, "ready\n"),
                    _ => reply(StatusCode::NOT_FOUND, "not found\n"),
                }
            }
        },
    )
    .await
}

/// Keeps every webhook of the configuration pointing at this injector's root, checking now and
/// every [`CA_BUNDLE_CHECK`].
async fn keep_ca_bundle(client: kube::Client, name: String, root_pem: String, drain: DrainWatcher) {
    use k8s_openapi::{ByteString, api::admissionregistration::v1::MutatingWebhookConfiguration};
    let api: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(client);
    let bundle = ByteString(root_pem.into_bytes());
    loop {
        match api.get_opt(&name).await {
            Ok(Some(mut config)) => {
                let webhooks = config.webhooks.get_or_insert_with(Vec::new);
                let stale = webhooks
                    .iter()
                    .any(|w| w.client_config.ca_bundle.as_ref() != Some(&bundle));
                if stale {
                    for w in webhooks.iter_mut() {
                        w.client_config.ca_bundle = Some(bundle.clone());
                    }
                    match api.replace(&name, &Default::default(), &config).await {
                        Ok(_) => info!(webhook = %name, "caBundle set to this injector's root"),
                        Err(e) => {
                            warn!(webhook = %name, error = %e, "cannot set the caBundle; trying again")
                        }
                    }
                }
            }
            Ok(None) => {
                warn!(webhook = %name, "no such MutatingWebhookConfiguration; the API server will not call this injector")
            }
            Err(e) => {
                warn!(webhook = %name, error = %e, "cannot read the MutatingWebhookConfiguration")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(CA_BUNDLE_CHECK) => {}
            () = drain.signaled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn native_sidecars_from_1_29() {
        for (major, minor, native) in [
            ("1", "20", false),
            ("1", "28", false),
            ("1", "29", true),
            ("1", "30+", true),
            ("2", "0", true),
            ("", "", false),
        ] {
            assert_eq!(
                super::serves_native_sidecars(major, minor),
                native,
                "{major}.{minor}"
            );
        }
    }
}
