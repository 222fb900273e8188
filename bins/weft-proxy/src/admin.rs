//! The proxy's HTTP endpoints, on Istio's ports. Each port serves only its own paths: the admin port
//! (15000, local to the pod) has `/config_dump`, `/clusters`, `/certs`, `/ready` and the metrics; the
//! ports reachable from outside the pod have no view of the config: 15090 the metrics, 15021 the
//! proxy's readiness, 15020 the app's probes and the merged metrics (see [`crate::status`]).

use std::{fmt::Write, sync::Arc};

use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use serde_json::json;
use tokio::net::TcpListener;

use crate::{Ctx, state::ProxyState, status::AppStatus};

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// An Envoy-shaped dump of what is applied: the same sections as Envoy's `/config_dump`, with each
/// resource in weft-proxy's own typed form.
pub fn config_dump(
    state: &ProxyState,
    identity: Option<&weft_certs::IdentityCell>,
) -> serde_json::Value {
    let clusters: Vec<_> = state
        .clusters
        .values()
        .map(|c| json!({"cluster": c.config, "endpoints": c.endpoints.iter().map(|e| &e.config).collect::<Vec<_>>()}))
        .collect();
    json!({
        "configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": state.listeners.values().collect::<Vec<_>>()},
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": clusters},
            {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": state.routes.values().map(|r| r.as_ref()).collect::<Vec<_>>()},
            {"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump", "dynamic_active_secrets": crate::identity::certs_json(identity)},
        ],
        "versions": state.versions,
        "xds_connected": state.xds_connected,
    })
}

/// Envoy's `/clusters` text: one `cluster::address::field::value` line per endpoint fact.
pub fn clusters_text(state: &ProxyState) -> String {
    let mut out = String::new();
    for c in state.clusters.values() {
        for e in &c.endpoints {
            let name = &c.config.name;
            let addr = e.config.address;
            let health = if e.config.healthy {
                "healthy"
            } else {
                "/failed_eds_health"
            };
            let _ = writeln!(out, "{name}::{addr}::health_flags::{health}");
            let _ = writeln!(out, "{name}::{addr}::weight::{}", e.config.weight);
            let _ = writeln!(
                out,
                "{name}::{addr}::rq_active::{}",
                e.active.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    }
    out
}

/// Which of the proxy's ports a listener is, and so which paths it answers.
#[derive(Clone, Debug)]
pub enum Port {
    Admin,
    Stats,
    Readiness,
    Status(Arc<AppStatus>),
}

impl Port {
    pub fn name(&self) -> &'static str {
        match self {
            Port::Admin => "admin",
            Port::Stats => "stats",
            Port::Readiness => "readiness",
            Port::Status(_) => "status",
        }
    }
}

fn not_found() -> Response<Full<Bytes>> {
    reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
}

fn readiness(state: &ProxyState, ctx: &Ctx) -> Response<Full<Bytes>> {
    if state.ready() && !ctx.drain.is_draining() {
        reply(StatusCode::OK, "text/plain", "LIVE\n".into())
    } else if ctx.drain.is_draining() {
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "DRAINING\n".into(),
        )
    } else {
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "PRE_INITIALIZING\n".into(),
        )
    }
}

fn metrics_error(e: std::fmt::Error) -> Response<Full<Bytes>> {
    reply(
        StatusCode::INTERNAL_SERVER_ERROR,
        "text/plain",
        format!("cannot encode the metrics: {e}\n"),
    )
}

fn admin_route(path: &str, state: &ProxyState, ctx: &Ctx) -> Response<Full<Bytes>> {
    match path {
        "/config_dump" => {
            match serde_json::to_string_pretty(&config_dump(state, ctx.tls.identity())) {
                Ok(s) => reply(StatusCode::OK, "application/json", s),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/clusters" => reply(StatusCode::OK, "text/plain", clusters_text(state)),
        "/certs" => reply(
            StatusCode::OK,
            "application/json",
            crate::identity::certs_json(ctx.tls.identity()).to_string(),
        ),
        "/ready" | "/healthz/ready" => readiness(state, ctx),
        "/stats/prometheus" | "/metrics" => {
            match weft_telemetry::encode_prometheus_text(&ctx.registry) {
                Ok(text) => reply(StatusCode::OK, weft_telemetry::PROMETHEUS_TEXT, text),
                Err(e) => metrics_error(e),
            }
        }
        _ => not_found(),
    }
}

async fn route(req: Request<Incoming>, ctx: &Ctx, port: &Port) -> Response<Full<Bytes>> {
    let state = ctx.state.borrow().clone();
    let path = req.uri().path();
    match port {
        Port::Admin => admin_route(path, &state, ctx),
        Port::Stats => match path {
            "/stats/prometheus" | "/metrics" => admin_route(path, &state, ctx),
            _ => not_found(),
        },
        Port::Readiness => match path {
            "/healthz/ready" => readiness(&state, ctx),
            _ => not_found(),
        },
        Port::Status(app) => match path {
            "/healthz/ready" => readiness(&state, ctx),
            "/stats/prometheus" | "/metrics" => {
                let mut text = match weft_telemetry::encode_prometheus_text(&ctx.registry) {
                    Ok(text) => text,
                    Err(e) => return metrics_error(e),
                };
                // Concatenated, as Istio's agent merges: the app's names do not collide with istio_*.
                if let Some(app_text) = app.scrape_app(req.headers()).await {
                    text.push_str(&String::from_utf8_lossy(&app_text));
                    if !text.ends_with('\n') {
                        text.push('\n');
                    }
                }
                reply(StatusCode::OK, weft_telemetry::PROMETHEUS_TEXT, text)
            }
            p if p.starts_with("/app-health/") => {
                let (status, body) = app.probe(p, req.headers()).await;
                reply(status, "text/plain", body)
            }
            _ => not_found(),
        },
    }
}

pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>, port: Port) {
    let drain = ctx.drain.clone();
    weft_drain::http::serve(listener, port.name(), drain, move |req| {
        let (ctx, port) = (ctx.clone(), port.clone());
        async move { route(req, &ctx, &port).await }
    })
    .await
}
