//! The HTTP connection manager: virtual host and route selection, then the route's action: forward (with
//! weighted clusters, rewrites, header changes, retries and timeouts), redirect or direct response.
//! Every request is counted in Istio's metrics and, when configured, written to the access log.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use rand::Rng;
use tracing::debug;

use crate::{
    Ctx, lb,
    model::{
        ForwardConfig, HeaderOps, HttpConfig, ListenerKind, PathMatch, RedirectConfig, RouteAction,
        RouteConfig, RouteTable,
    },
    state::{Body, ClusterState, EndpointState},
};

/// The connection a request arrived on.
#[derive(Debug)]
pub struct ConnInfo {
    pub local: std::net::SocketAddr,
    pub peer: std::net::SocketAddr,
    pub inbound: bool,
    pub http: HttpConfig,
    /// Who the client proved to be over mTLS.
    pub source_principal: Option<weft_certs::SpiffeId>,
    /// The SHA-256 of the client's certificate, for `x-forwarded-client-cert`.
    pub client_cert_hash: Option<String>,
    /// The listener config the connection was accepted under.
    pub origin: crate::listeners::Origin,
    /// The listener changed: HTTP/1.1 responses say `Connection: close`, so the client moves to a
    /// connection on the new config before this one is shut down.
    pub draining: AtomicBool,
    /// The connection speaks HTTP/2 (GOAWAY drains it at once).
    pub http2: AtomicBool,
    /// The series its last request was counted in.
    pub(crate) last_series: crate::LastSeries,
}

/// One request on a downstream connection: [`handle`], then what the connection's drain state asks
/// of the response.
pub async fn serve_request(
    req: Request<Incoming>,
    ctx: Arc<Ctx>,
    conn: Arc<ConnInfo>,
) -> Result<Response<Body>, Infallible> {
    let http2 = req.version() == http::Version::HTTP_2;
    conn.http2.store(http2, Ordering::Relaxed);
    let mut resp = handle(req, ctx, conn.clone()).await?;
    if !http2 && conn.draining.load(Ordering::Relaxed) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// Bodies up to this size are kept so a failed attempt can be retried, as Linkerd and Envoy limit it.
const MAX_RETRY_BODY: u64 = 64 * 1024;

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// What the access log and metrics record of one request.
struct Outcome {
    status: StatusCode,
    flags: &'static str,
    cluster: Option<Arc<ClusterState>>,
    endpoint: Option<Arc<EndpointState>>,
    route_name: String,
    /// Envoy's response code details for the access log.
    details: String,
}

fn local_reply(status: StatusCode, body: &str, flags: &'static str) -> (Response<Body>, Outcome) {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    if !body.is_empty() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    (
        resp,
        Outcome {
            status,
            flags,
            cluster: None,
            endpoint: None,
            route_name: String::new(),
            details: String::new(),
        },
    )
}

pub async fn handle(
    mut req: Request<Incoming>,
    ctx: Arc<Ctx>,
    conn: Arc<ConnInfo>,
) -> Result<Response<Body>, Infallible> {
    let start = tokio::time::Instant::now();
    let start_wall = SystemTime::now();
    // Before anything reads the request: one spelling of the path, so authorization and routing see
    // what the application will serve; and the headers only a sidecar may vouch for are its own.
    let normalized = normalize_path(&mut req, conn.http.normalization);
    sanitize_headers(req.headers_mut(), &ctx, &conn);
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let authority = authority(&req);
    let version = req.version();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // The request moves on; the access log needs its headers afterwards, and only then are they kept.
    let req_headers = conn
        .http
        .access_log
        .is_some()
        .then(|| req.headers().clone());
    let req_bytes = req.body().size_hint().exact().unwrap_or(0);

    let denied = (!conn.http.rbac.is_empty())
        .then(|| authorize(&req, &ctx, &conn, &authority, &path))
        .flatten();
    let (resp, outcome) = match (normalized, denied) {
        (false, _) => local_reply(StatusCode::BAD_REQUEST, "Bad Request", "DPE"),
        (true, Some(denial)) => denial,
        (true, None) => route_and_forward(req, &ctx, &conn, &authority).await,
    };
    let duration = start.elapsed();
    if let Some(c) = &outcome.cluster
        && !conn.inbound
    {
        debug!(cluster = %c.config.name, status = %outcome.status, "forwarded");
    }
    let resp_bytes = resp.body().size_hint().exact().unwrap_or(0);
    ctx.record_request(
        &conn,
        crate::RequestRecord {
            status: outcome.status,
            flags: outcome.flags,
            cluster: outcome.cluster.clone(),
            endpoint: outcome.endpoint.clone(),
            grpc,
            grpc_status: resp.headers().get(GRPC_STATUS).cloned(),
            duration,
            request_bytes: req_bytes,
            response_bytes: resp_bytes,
        },
    );
    if let (Some(path_out), Some(req_headers)) = (&conn.http.access_log, &req_headers) {
        let line = ctx.access_log.format(&crate::access_log::Entry {
            start: start_wall,
            method: &method,
            path: &path,
            version,
            status: outcome.status.as_u16(),
            flags: outcome.flags,
            details: &outcome.details,
            bytes_received: req_bytes,
            bytes_sent: resp_bytes,
            duration,
            headers: req_headers,
            authority: &authority,
            upstream_host: outcome
                .endpoint
                .as_ref()
                .map(|e| e.config.address.to_string()),
            upstream_cluster: outcome.cluster.as_ref().map(|c| c.config.name.as_str()),
            downstream_local: conn.local,
            downstream_remote: conn.peer,
            route_name: &outcome.route_name,
        });
        ctx.access_log.write(path_out, line);
    }
    Ok(resp)
}

/// Rewrites the request's path as the listener's normalization says; `false` when the path cannot
/// be normalized (it does not start with `/`), which is answered 400 as Envoy does.
fn normalize_path(req: &mut Request<Incoming>, how: crate::model::PathNormalization) -> bool {
    if how == crate::model::PathNormalization::default() {
        return true;
    }
    let uri = req.uri();
    // `*` (OPTIONS) and CONNECT's authority form carry no path to normalize.
    if uri.path() == "*" || req.method() == Method::CONNECT {
        return true;
    }
    let Some(path) = crate::normalize::normalize(uri.path(), how) else {
        return false;
    };
    if path == uri.path() {
        return true;
    }
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = match pq.parse() {
        Ok(pq) => Some(pq),
        Err(_) => return false,
    };
    match Uri::from_parts(parts) {
        Ok(u) => {
            *req.uri_mut() = u;
            true
        }
        Err(_) => false,
    }
}

const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// Named once, so the lookups on every request parse no name.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Headers a client could forge to claim what only a proxy may say: `x-envoy-*` controls are never
/// taken from a request, and `x-forwarded-client-cert` is kept, extended or replaced only as the
/// listener says and only over mTLS, where this proxy verified the client's certificate itself.
fn sanitize_headers(headers: &mut HeaderMap, ctx: &Ctx, conn: &ConnInfo) {
    let envoy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-envoy-"))
        .cloned()
        .collect();
    for name in envoy {
        headers.remove(name);
    }
    use crate::model::ForwardClientCert as F;
    let mtls = conn.source_principal.is_some();
    match conn.http.xfcc {
        F::AlwaysForwardOnly => {}
        _ if !mtls => {
            headers.remove(XFCC);
        }
        F::Sanitize => {
            headers.remove(XFCC);
        }
        F::ForwardOnly => {}
        F::AppendForward(details) | F::SanitizeSet(details) => {
            let element = xfcc_element(ctx, conn, details);
            let value = match (
                conn.http.xfcc,
                headers.get(XFCC).and_then(|v| v.to_str().ok()),
            ) {
                (F::AppendForward(_), Some(prior)) => format!("{prior},{element}"),
                _ => element,
            };
            match HeaderValue::from_str(&value) {
                Ok(v) => {
                    headers.insert(XFCC, v);
                }
                Err(_) => {
                    headers.remove(XFCC);
                }
            }
        }
    }
}

/// This hop's element of `x-forwarded-client-cert`, in Envoy's order: `By`, `Hash`, `Subject`,
/// `URI`. Mesh certificates carry no subject and no DNS names.
fn xfcc_element(ctx: &Ctx, conn: &ConnInfo, details: crate::model::CertDetails) -> String {
    let mut parts = Vec::new();
    if let Some(me) = ctx.own_spiffe_id() {
        parts.push(format!("By={me}"));
    }
    if let Some(hash) = &conn.client_cert_hash {
        parts.push(format!("Hash={hash}"));
    }
    if details.subject {
        parts.push("Subject=\"\"".to_string());
    }
    if let (true, Some(id)) = (details.uri, &conn.source_principal) {
        parts.push(format!("URI={id}"));
    }
    parts.join(";")
}

/// Removes the hop-by-hop headers: the fixed set, and any that `Connection` names (RFC 9110 §7.6.1).
/// For a WebSocket upgrade, `Connection: upgrade` and `Upgrade` stay.
fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for name in named {
        if keep_upgrade && name == "upgrade" {
            continue;
        }
        headers.remove(name.as_str());
    }
    for name in &HOP_BY_HOP {
        if keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
            continue;
        }
        headers.remove(name);
    }
}

fn authority(req: &Request<Incoming>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// Envoy's domain matching: exact, then `*.suffix`/`prefix*` wildcards, then `*`; a domain with a port
/// only matches an authority with that port.
fn select_virtual_host<'a>(
    table: &'a RouteTable,
    authority: &str,
) -> Option<&'a crate::model::VirtualHostConfig> {
    let exact = table
        .virtual_hosts
        .iter()
        .find(|vh| vh.domains.iter().any(|d| d == authority));
    exact
        .or_else(|| {
            table.virtual_hosts.iter().find(|vh| {
                vh.domains.iter().any(|d| {
                    d != "*"
                        && (d.strip_prefix('*').is_some_and(|s| authority.ends_with(s))
                            || d.strip_suffix('*')
                                .is_some_and(|p| authority.starts_with(p)))
                })
            })
        })
        .or_else(|| {
            table
                .virtual_hosts
                .iter()
                .find(|vh| vh.domains.iter().any(|d| d == "*"))
        })
}

fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

fn header_str(headers: &HeaderMap, name: &str, method: &Method, authority: &str) -> Option<String> {
    match name {
        ":method" => Some(method.as_str().to_string()),
        ":authority" => Some(authority.to_string()),
        _ => {
            let values: Vec<&str> = headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!values.is_empty()).then(|| values.join(","))
        }
    }
}

pub(crate) fn route_matches(
    route: &RouteConfig,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    authority: &str,
) -> bool {
    let m = &route.matcher;
    let (path, lowered);
    if m.case_sensitive {
        path = uri.path();
    } else {
        lowered = uri.path().to_ascii_lowercase();
        path = lowered.as_str();
    }
    let fold = |s: &str| {
        if m.case_sensitive {
            s.to_string()
        } else {
            s.to_ascii_lowercase()
        }
    };
    let path_ok = match &m.path.0 {
        PathMatch::Prefix(p) => path.starts_with(&fold(p)),
        PathMatch::Exact(p) => path == fold(p),
        PathMatch::Regex(r) => r.is_match(path),
    };
    if !path_ok {
        return false;
    }
    let headers_ok = m.headers.iter().all(|h| {
        let value = header_str(headers, &h.name, method, authority);
        let hit = match (&value, &h.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(sm)) => sm.matches(v),
        };
        hit != h.invert
    });
    let query = uri.query().unwrap_or("");
    headers_ok
        && m.query
            .iter()
            .all(|q| match (query_value(query, &q.name), &q.value) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(v), Some(sm)) => sm.matches(v),
            })
}

/// How long a request waits for its listener's route configuration.
const ROUTE_WARMING: Duration = Duration::from_secs(5);

/// The current config once it holds the listener's routes. A listener is bound when LDS arrives and its
/// routes follow by RDS; like Envoy's listener warming, a request in that gap waits for them rather than
/// failing with "no route".
async fn warmed(
    ctx: &Ctx,
    routes: &crate::model::RouteSource,
) -> Option<Arc<crate::state::ProxyState>> {
    let mut state = ctx.state.clone();
    let ready = state.wait_for(|s| s.route_table(routes).is_some());
    match tokio::time::timeout(ROUTE_WARMING, ready).await {
        Ok(Ok(s)) => Some(s.clone()),
        _ => None,
    }
}

/// What an authorization policy can ask of a request.
fn request_facts(
    req: &Request<Incoming>,
    conn: &ConnInfo,
    authority: &str,
    path: &str,
) -> weft_policy::Request {
    weft_policy::Request {
        source_principal: conn.source_principal.as_ref().map(crate::istio_principal),
        source_ip: Some(conn.peer.ip()),
        remote_ip: None,
        destination_ip: Some(conn.local.ip()),
        destination_port: conn.local.port(),
        http: Some(weft_policy::HttpRequest {
            host: authority.to_string(),
            method: req.method().as_str().to_string(),
            path: path.to_string(),
            headers: req
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect(),
        }),
    }
}

/// The HTTP RBAC filters, in order, before routing: `None` lets the request on; a denial answers as
/// Envoy does (403 `RBAC: access denied`), with the policy and rule in the access log's response
/// details and in `weft_authorization_denied_total`.
fn authorize(
    req: &Request<Incoming>,
    ctx: &Ctx,
    conn: &ConnInfo,
    authority: &str,
    path: &str,
) -> Option<(Response<Body>, Outcome)> {
    let facts = request_facts(req, conn, authority, path);
    let (decision, audited) = weft_policy::rbac::decide(&conn.http.rbac, &facts);
    for a in &audited {
        tracing::info!(policy = %a.policy, rule = a.rule, method = %req.method(), path, "AUDIT policy matched");
    }
    if decision.allowed() {
        return None;
    }
    ctx.count_denial(&decision, "http", conn.source_principal.as_ref());
    debug!(reason = %decision.reason(), method = %req.method(), path, "request denied");
    let (resp, mut outcome) = local_reply(StatusCode::FORBIDDEN, "RBAC: access denied", "-");
    outcome.details = crate::denial_details(&decision);
    Some((resp, outcome))
}

async fn route_and_forward(
    req: Request<Incoming>,
    ctx: &Ctx,
    conn: &ConnInfo,
    authority: &str,
) -> (Response<Body>, Outcome) {
    let Some(state) = warmed(ctx, &conn.http.routes).await else {
        debug!(routes = ?conn.http.routes, "route configuration never arrived (NR)");
        return local_reply(StatusCode::NOT_FOUND, "", "NR");
    };
    let Some(table) = state.route_table(&conn.http.routes) else {
        return local_reply(StatusCode::NOT_FOUND, "", "NR");
    };
    let Some(vh) = select_virtual_host(&table, authority) else {
        debug!(authority, route_config = %table.name, "no virtual host for this authority (NR)");
        return local_reply(StatusCode::NOT_FOUND, "", "NR");
    };
    let Some(route) = vh
        .routes
        .iter()
        .find(|r| route_matches(r, req.method(), req.uri(), req.headers(), authority))
    else {
        debug!(authority, virtual_host = %vh.name, path = req.uri().path(), "no route matches (NR)");
        return local_reply(StatusCode::NOT_FOUND, "", "NR");
    };
    let (mut resp, mut outcome) = match &route.action {
        RouteAction::Direct { status, body } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let (r, o) = local_reply(status, body, "-");
            (r, o)
        }
        RouteAction::Redirect(rd) => redirect(rd, &req, authority),
        RouteAction::Forward(fwd) => forward(req, fwd, route, &state, ctx, conn).await,
    };
    apply_response_headers(resp.headers_mut(), &route.headers);
    outcome.route_name = route.name.clone();
    (resp, outcome)
}

fn redirect(
    rd: &RedirectConfig,
    req: &Request<Incoming>,
    authority: &str,
) -> (Response<Body>, Outcome) {
    let host = rd
        .host
        .clone()
        .unwrap_or_else(|| authority.split(':').next().unwrap_or(authority).to_string());
    let port = rd.port.map(|p| format!(":{p}")).unwrap_or_else(|| {
        if rd.host.is_some() {
            String::new()
        } else {
            authority
                .split_once(':')
                .map(|(_, p)| format!(":{p}"))
                .unwrap_or_default()
        }
    });
    let scheme = rd.scheme.clone().unwrap_or_else(|| "http".into());
    let path = rd.path.clone().unwrap_or_else(|| {
        req.uri()
            .path_and_query()
            .map_or("/".into(), |p| p.as_str().to_string())
    });
    let location = format!("{scheme}://{host}{port}{path}");
    let status = StatusCode::from_u16(rd.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let (mut resp, outcome) = local_reply(status, "", "-");
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    (resp, outcome)
}

fn apply_request_headers(headers: &mut HeaderMap, ops: &HeaderOps) {
    for name in &ops.request_remove {
        headers.remove(name.as_str());
    }
    add_headers(headers, &ops.request_add);
}

fn apply_response_headers(headers: &mut HeaderMap, ops: &HeaderOps) {
    for name in &ops.response_remove {
        headers.remove(name.as_str());
    }
    add_headers(headers, &ops.response_add);
}

fn add_headers(headers: &mut HeaderMap, adds: &[crate::model::HeaderAdd]) {
    for add in adds {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(add.name.as_bytes()),
            HeaderValue::from_str(&add.value),
        ) else {
            continue;
        };
        if add.overwrite {
            headers.insert(name, value);
        } else {
            headers.append(name, value);
        }
    }
}

/// Headers that describe one hop's connection and must not be forwarded (RFC 9110 §7.6.1). As
/// `HeaderName`s, so removing them from every request and response parses no name.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Why an attempt failed, for the retry decision and Envoy's response flags.
enum Failure {
    Connect,
    Reset,
    Timeout,
}

async fn forward(
    mut req: Request<Incoming>,
    fwd: &ForwardConfig,
    route: &RouteConfig,
    state: &crate::state::ProxyState,
    ctx: &Ctx,
    conn: &ConnInfo,
) -> (Response<Body>, Outcome) {
    let Some(choice) = lb::pick_cluster(&fwd.clusters) else {
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no cluster", "NC");
    };
    let Some(cluster) = state.clusters.get(&choice.name).cloned() else {
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no cluster", "NC");
    };
    let websocket = conn.http.websocket && is_upgrade(req.headers());
    let downstream_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    // A tunnel outlives its request; when the listener changes, it is checked again against this.
    let tunnel_facts = websocket.then(|| {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        request_facts(&req, conn, &authority(&req), path)
    });

    let (mut parts, body) = req.into_parts();
    remove_hop_by_hop(&mut parts.headers, websocket);
    apply_request_headers(&mut parts.headers, &route.headers);
    apply_request_headers(&mut parts.headers, &choice.headers);
    if !parts.headers.contains_key(REQUEST_ID) {
        let id = format!("{:032x}", rand::rng().random::<u128>());
        if let Ok(v) = HeaderValue::from_str(&id) {
            parts.headers.insert(REQUEST_ID, v);
        }
    }
    if let Some(host) = &fwd.host_rewrite
        && let Ok(v) = HeaderValue::from_str(host)
    {
        parts.headers.insert(header::HOST, v);
    }
    let path = rewrite_path(&parts.uri, route, fwd);
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }

    // Keep a small body so it can be sent again; stream anything else once.
    let retry = fwd.retry.as_ref().filter(|_| !websocket);
    let small = body
        .size_hint()
        .upper()
        .is_some_and(|u| u <= MAX_RETRY_BODY);
    let (buffered, mut once) = if retry.is_some() && small {
        match body.collect().await {
            Ok(b) => (Some(b.to_bytes()), None),
            Err(_) => return local_reply(StatusCode::BAD_REQUEST, "downstream body error", "DPE"),
        }
    } else {
        (None, Some(body))
    };
    let max_attempts = if buffered.is_some() {
        retry.map_or(1, |r| r.num_retries + 1)
    } else {
        1
    };

    let attempts = async {
        let mut last_endpoint: Option<Arc<EndpointState>> = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(endpoint) = lb::pick_endpoint(&cluster, last_endpoint.as_ref()) else {
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy upstream",
                    "UH",
                    None,
                ));
            };
            let uri = match Uri::builder()
                .scheme(if endpoint.tls { "https" } else { "http" })
                .authority(endpoint.authority.clone())
                .path_and_query(path.as_str())
                .build()
            {
                Ok(u) => u,
                Err(_) => return Err((StatusCode::BAD_REQUEST, "invalid path", "DPE", None)),
            };
            let body = match (&buffered, once.take()) {
                (Some(b), _) => full(b.clone()),
                (None, Some(incoming)) => incoming.map_err(Into::into).boxed(),
                (None, None) => {
                    return Err((
                        StatusCode::SERVICE_UNAVAILABLE,
                        "request body already sent",
                        "URX",
                        Some(endpoint),
                    ));
                }
            };
            let mut upstream_req = Request::new(body);
            *upstream_req.method_mut() = parts.method.clone();
            *upstream_req.uri_mut() = uri;
            // The last attempt takes the headers; an attempt that may be retried copies them.
            *upstream_req.headers_mut() = if attempt >= max_attempts {
                std::mem::take(&mut parts.headers)
            } else {
                parts.headers.clone()
            };
            if cluster.config.http2 {
                *upstream_req.version_mut() = http::Version::HTTP_2;
            }
            // Counted until the response body ends; dropped with the attempt if it fails, times out
            // or the client goes away, so the count always comes back down.
            let in_flight = lb::InFlight::start(&endpoint);
            let call = cluster.client.request(upstream_req);
            let result = match retry.and_then(|r| r.per_try_timeout) {
                Some(t) => tokio::time::timeout(t, call)
                    .await
                    .map_err(|_| Failure::Timeout),
                None => Ok(call.await),
            };
            let failure = match result {
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    let grpc_status = resp
                        .headers()
                        .get(GRPC_STATUS)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.parse::<u32>().ok());
                    let retriable = retry.is_some_and(|r| {
                        (r.on_5xx && status.is_server_error())
                            || (r.on_gateway_error && matches!(status.as_u16(), 502..=504))
                            || r.retriable_status_codes.contains(&status.as_u16())
                            || grpc_status.is_some_and(|g| r.grpc_statuses.contains(&g))
                    });
                    if retriable && attempt < max_attempts {
                        last_endpoint = Some(endpoint);
                        backoff(retry.map_or(Duration::ZERO, |r| r.base_backoff), attempt).await;
                        continue;
                    }
                    return Ok((resp, endpoint, in_flight));
                }
                Ok(Err(e)) if e.is_connect() => Failure::Connect,
                Ok(Err(_)) => Failure::Reset,
                Err(timeout) => timeout,
            };
            let retriable = retry.is_some_and(|r| match failure {
                Failure::Connect => r.on_connect_failure || r.on_5xx || r.on_gateway_error,
                Failure::Reset => {
                    r.on_reset || r.on_5xx || r.on_gateway_error || r.on_refused_stream
                }
                Failure::Timeout => r.on_5xx || r.on_gateway_error,
            });
            if retriable && attempt < max_attempts {
                last_endpoint = Some(endpoint);
                backoff(retry.map_or(Duration::ZERO, |r| r.base_backoff), attempt).await;
                continue;
            }
            let flag = if attempt > 1 { "URX" } else { "-" };
            return Err(match failure {
                Failure::Connect => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                    if flag == "-" { "UF" } else { flag },
                    Some(endpoint),
                ),
                Failure::Reset => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                    if flag == "-" { "UC" } else { flag },
                    Some(endpoint),
                ),
                Failure::Timeout => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                    "UT",
                    Some(endpoint),
                ),
            });
        }
    };
    let result = match fwd.timeout {
        Some(t) => tokio::time::timeout(t, attempts).await.unwrap_or(Err((
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout",
            "UT",
            None,
        ))),
        None => attempts.await,
    };
    match result {
        Ok((mut resp, endpoint, in_flight)) => {
            let status = resp.status();
            if let (Some(down), StatusCode::SWITCHING_PROTOCOLS) = (downstream_upgrade, status) {
                let up = hyper::upgrade::on(&mut resp);
                let drain = ctx.drain.clone();
                let (state, drain_period) = (ctx.state.clone(), ctx.listener_drain);
                let origin = conn.origin.clone();
                let facts = tunnel_facts.unwrap_or_default();
                ctx.tasks.spawn(async move {
                    if let (Ok(down), Ok(up)) = (down.await, up.await) {
                        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                        let still_allowed = |kind: &ListenerKind| match kind {
                            ListenerKind::Http(h) => {
                                weft_policy::rbac::decide(&h.rbac, &facts).0.allowed()
                            }
                            ListenerKind::Tcp(_) => false,
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                            () = drain.signaled() => {}
                            () = crate::listeners::authorization_revoked(state, drain_period, &origin, still_allowed) => {
                                debug!(listener = %origin.listener.name, "closing a WebSocket the listener's new config no longer authorizes");
                            }
                        }
                    }
                });
            }
            let (mut rparts, rbody) = resp.into_parts();
            remove_hop_by_hop(
                &mut rparts.headers,
                status == StatusCode::SWITCHING_PROTOCOLS,
            );
            apply_response_headers(&mut rparts.headers, &choice.headers);
            let body = lb::WithInFlight {
                body: rbody,
                _in_flight: in_flight,
            };
            let resp = Response::from_parts(rparts, body.map_err(Into::into).boxed());
            (
                resp,
                Outcome {
                    status,
                    flags: "-",
                    cluster: Some(cluster),
                    endpoint: Some(endpoint),
                    route_name: String::new(),
                    details: "via_upstream".into(),
                },
            )
        }
        Err((status, body, flags, endpoint)) => {
            let (resp, mut outcome) = local_reply(status, body, flags);
            outcome.cluster = Some(cluster);
            outcome.endpoint = endpoint;
            (resp, outcome)
        }
    }
}

/// Envoy's retry backoff: a random wait up to base × 2^(n-1), capped at ten times the base.
async fn backoff(base: Duration, attempt: u32) {
    let cap = base * 10;
    let upper = base.saturating_mul(1 << (attempt - 1).min(10)).min(cap);
    if upper.is_zero() {
        return;
    }
    let wait = rand::rng().random_range(Duration::ZERO..=upper);
    tokio::time::sleep(wait).await;
}

/// The upstream path: `prefix_rewrite` replaces the matched prefix (or the whole path for exact matches).
fn rewrite_path(uri: &Uri, route: &RouteConfig, fwd: &ForwardConfig) -> String {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let Some(new_prefix) = &fwd.prefix_rewrite else {
        return pq.to_string();
    };
    let path = uri.path();
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let rest = match &route.matcher.path.0 {
        PathMatch::Prefix(p) if path.len() >= p.len() => &path[p.len()..],
        _ => "",
    };
    format!("{new_prefix}{rest}{query}")
}

#[cfg(test)]
mod tests;
