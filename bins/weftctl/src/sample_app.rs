//! The demo's sample application: a frontend that calls a backend (and a gRPC status service) through its
//! sidecar, backends that say which version answered, and a gRPC service (the standard health service).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::{net::TcpListener, task::JoinSet};
use weft_drain::DrainWatcher;

pub const BACKEND_HOST: &str = "backend.demo.svc.cluster.local:9080";
pub const STATUS_ORIGIN: &str = "http://status.demo.svc.cluster.local:9090";

async fn serve<F, Fut>(listener: TcpListener, drain: DrainWatcher, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut conns = JoinSet::new();
    let mut acceptor = weft_drain::Acceptor::new(listener, "sample app");
    loop {
        let (stream, _) = tokio::select! {
            a = acceptor.accept() => a,
            () = drain.signaled() => break,
        };
        while conns.try_join_next().is_some() {}
        let handler = handler.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
    conns.abort_all();
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// A backend that answers `backend <version>`.
pub async fn backend(listener: TcpListener, version: String, drain: DrainWatcher) {
    let version = Arc::new(version);
    serve(listener, drain, move |_req| {
        let version = version.clone();
        async move { text(StatusCode::OK, format!("backend {version}")) }
    })
    .await
}

/// The frontend: `/status` makes a gRPC health check of the status service through the sidecar; any
/// other path calls the backend on that path through the sidecar's egress listener, passing `end-user`
/// along.
pub async fn frontend(
    listener: TcpListener,
    egress_http: SocketAddr,
    egress_grpc: SocketAddr,
    drain: DrainWatcher,
) {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let grpc = tonic::transport::Endpoint::from_shared(format!("http://{egress_grpc}"))
        .ok()
        // The origin sets :authority, so the sidecar routes by service name, not by its own address.
        .map(|e| e.origin(Uri::from_static(STATUS_ORIGIN)).connect_lazy());
    serve(listener, drain, move |req: Request<Incoming>| {
        let client = client.clone();
        let grpc = grpc.clone();
        async move {
            if req.uri().path() == "/status" {
                let Some(channel) = grpc else {
                    return text(StatusCode::INTERNAL_SERVER_ERROR, "no grpc channel".into());
                };
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                return match health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                {
                    Ok(r) => text(
                        StatusCode::OK,
                        format!("status {:?}", r.into_inner().status()),
                    ),
                    Err(s) => text(StatusCode::BAD_GATEWAY, format!("status call failed: {s}")),
                };
            }
            // `/` and anything else (the demo's `/admin`) go to the backend on the same path.
            let path = req.uri().path();
            let mut upstream = Request::builder()
                .uri(format!("http://{egress_http}{path}"))
                .header(http::header::HOST, BACKEND_HOST);
            if let Some(user) = req.headers().get("end-user") {
                upstream = upstream.header("end-user", user);
            }
            let Ok(upstream) = upstream.body(Empty::new()) else {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "bad request".into());
            };
            match client.request(upstream).await {
                Ok(resp) => {
                    let status = resp.status();
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    text(status, String::from_utf8_lossy(&body).into_owned())
                }
                Err(e) => text(StatusCode::BAD_GATEWAY, format!("backend call failed: {e}")),
            }
        }
    })
    .await
}

/// A gRPC service: the standard `grpc.health.v1.Health`, reporting SERVING.
pub async fn status(
    listener: TcpListener,
    drain: DrainWatcher,
) -> Result<(), tonic::transport::Error> {
    let (_reporter, service) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move { drain.signaled().await },
        )
        .await
}
