//! The demo's sample application: a frontend that calls a backend (and a gRPC status service) through its
//! sidecar, backends that say which version answered, and a gRPC service (the standard health service).

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::net::TcpListener;
use weft_drain::DrainWatcher;

pub const BACKEND_HOST: &str = "backend.demo.svc.cluster.local:9080";
pub const STATUS_ORIGIN: &str = "http://status.demo.svc.cluster.local:9090";

/// The sample app's servers: one per workload process.
const SERVER: &str = "sample app";

/// An upstream's answer as text; what could not be read is left out.
async fn body_text(response: Response<Incoming>) -> String {
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    String::from_utf8_lossy(&body).into_owned()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// A backend that answers `backend <version>`.
pub async fn backend(listener: TcpListener, version: String, drain: DrainWatcher) {
    let version = Arc::new(version);
    weft_drain::http::serve(listener, SERVER, drain, move |_req| {
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
    weft_drain::http::serve(listener, SERVER, drain, move |req: Request<Incoming>| {
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
                    text(status, body_text(resp).await)
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

/// One of Bookinfo's services, as its sample images behave on the wire: each listens on 9080 and
/// calls the next by its Service's short name (the pod's sidecar captures the call).
/// `productpage` calls `details` and `reviews`, passing `end-user` along as the real one does for a
/// signed-in user; `reviews` v2 and v3 call `ratings`, v1 does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bookinfo {
    Productpage,
    Details,
    Reviews(ReviewsVersion),
    Ratings,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReviewsVersion {
    V1,
    V2,
    V3,
}

impl std::str::FromStr for Bookinfo {
    type Err = String;

    /// As the image names them: `productpage-v1`, `details-v1`, `reviews-v2`, `ratings-v1`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "productpage-v1" => Self::Productpage,
            "details-v1" => Self::Details,
            "reviews-v1" => Self::Reviews(ReviewsVersion::V1),
            "reviews-v2" => Self::Reviews(ReviewsVersion::V2),
            "reviews-v3" => Self::Reviews(ReviewsVersion::V3),
            "ratings-v1" => Self::Ratings,
            other => {
                return Err(format!(
                    "{other:?} is not a Bookinfo image: productpage-v1, details-v1, reviews-v1..v3 or ratings-v1"
                ));
            }
        })
    }
}

/// Bookinfo's port, on every one of its Services.
pub const BOOKINFO_PORT: u16 = 9080;

type PlainClient = Client<HttpConnector, Empty<Bytes>>;

/// GET `http://<service>:9080<path>`, with `end-user` when the caller had one; the body, or why not.
async fn call(
    client: &PlainClient,
    service: &str,
    path: &str,
    user: Option<&http::HeaderValue>,
) -> Result<String, String> {
    let mut request = Request::builder().uri(format!("http://{service}:{BOOKINFO_PORT}{path}"));
    if let Some(user) = user {
        request = request.header("end-user", user);
    }
    let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("{service} unreachable: {e}"))?;
    let status = response.status();
    let body = body_text(response).await.trim().to_string();
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{service} answered {status}: {body}"))
    }
}

/// Serves one Bookinfo service. Each answers a line naming itself and its version, after the lines
/// of the services it called, so a caller of `productpage` sees which `reviews` version answered and
/// what each call met (a denial reads `details answered 403 Forbidden: RBAC: access denied`).
pub async fn bookinfo(listener: TcpListener, service: Bookinfo, drain: DrainWatcher) {
    let client: PlainClient = Client::builder(TokioExecutor::new()).build_http();
    weft_drain::http::serve(listener, SERVER, drain, move |req: Request<Incoming>| {
        let client = client.clone();
        async move {
            let path = req.uri().path().to_string();
            let user = req.headers().get("end-user").cloned();
            if path == "/health" {
                return text(StatusCode::OK, "ok\n".into());
            }
            let line = |r: Result<String, String>| r.unwrap_or_else(|e| format!("error: {e}"));
            let body = match service {
                Bookinfo::Productpage if path == "/productpage" => {
                    let (details, reviews) = tokio::join!(
                        call(&client, "details", "/details/0", user.as_ref()),
                        call(&client, "reviews", "/reviews/0", user.as_ref()),
                    );
                    format!("{}\n{}\nproductpage v1\n", line(details), line(reviews))
                }
                Bookinfo::Details if path.starts_with("/details/") => "details v1\n".into(),
                Bookinfo::Reviews(version) if path.starts_with("/reviews/") => match version {
                    ReviewsVersion::V1 => "reviews v1\n".into(),
                    ReviewsVersion::V2 | ReviewsVersion::V3 => {
                        let stars = if version == ReviewsVersion::V2 {
                            "v2 black stars"
                        } else {
                            "v3 red stars"
                        };
                        let ratings = call(&client, "ratings", "/ratings/0", user.as_ref()).await;
                        format!("{}\nreviews {stars}\n", line(ratings))
                    }
                },
                Bookinfo::Ratings if path.starts_with("/ratings/") => "ratings v1\n".into(),
                _ => return text(StatusCode::NOT_FOUND, format!("no {path} here\n")),
            };
            text(StatusCode::OK, body)
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bookinfo_services_are_named_as_their_images() {
        assert_eq!("productpage-v1".parse(), Ok(Bookinfo::Productpage));
        assert_eq!(
            "reviews-v3".parse(),
            Ok(Bookinfo::Reviews(ReviewsVersion::V3))
        );
        assert!(
            "reviews-v4"
                .parse::<Bookinfo>()
                .is_err_and(|e| e.contains("not a Bookinfo image"))
        );
    }
}
