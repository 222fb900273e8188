//! The pod-facing ports as the kubelet and Prometheus use them: 15021 says whether the proxy is
//! ready, 15020 runs the app's rewritten probes against the app and merges the app's metrics into
//! the proxy's, and neither port (nor 15090) shows the admin's view of the config.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use weft_integration::{Mesh, get_text, next_ip, wait_for};

/// The app: healthy on `/healthz`, failing on `/sick`, slow on `/slow`, metrics on `/metrics`.
async fn app(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let (status, body) = match req.uri().path() {
                    "/healthz" => {
                        // The kubelet's headers reach the app, as they would without the proxy.
                        let agent = req.headers().get("user-agent").cloned();
                        if agent.as_ref().is_some_and(|a| a == "kube-probe/1.20") {
                            (StatusCode::OK, "ok")
                        } else {
                            (StatusCode::BAD_REQUEST, "not the kubelet")
                        }
                    }
                    "/sick" => (StatusCode::SERVICE_UNAVAILABLE, "sick"),
                    "/slow" => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        (StatusCode::OK, "late")
                    }
                    "/metrics" => (
                        StatusCode::OK,
                        "# HELP app_orders_total Orders taken.\n# TYPE app_orders_total counter\napp_orders_total 3\n",
                    ),
                    _ => (StatusCode::NOT_FOUND, "no"),
                };
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from(body)))
                        .expect("response"),
                )
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn probe(status: SocketAddr, path: &str) -> StatusCode {
    let client = weft_integration::http1_client();
    let reply = weft_integration::send(
        &client,
        status,
        "GET",
        &status.to_string(),
        path,
        &[("user-agent", "kube-probe/1.20")],
    )
    .await
    .expect("the status port answers");
    reply.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_ports_probe_the_app_and_merge_its_metrics() {
    let ip = next_ip();
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .expect("bind the app");
    let port = listener.local_addr().expect("app address").port();
    let app_task = tokio::spawn(app(listener));
    let closed = TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .expect("bind a port");
    let closed_port = closed.local_addr().expect("address").port();
    drop(closed);

    let probers = json!({
        "/app-health/web/livez": {"httpGet": {"path": "/healthz", "port": port, "scheme": "HTTP"}, "timeoutSeconds": 1},
        "/app-health/web/readyz": {"httpGet": {"path": "/sick", "port": port}},
        "/app-health/web/startupz": {"tcpSocket": {"port": port}},
        "/app-health/slow/livez": {"httpGet": {"path": "/slow", "port": port}, "timeoutSeconds": 1},
        "/app-health/gone/livez": {"tcpSocket": {"port": closed_port}},
    });
    let scrape = json!({"scrape": "true", "port": port.to_string(), "path": "/metrics"});
    let mut mesh = Mesh::start(&[]).await;
    let proxy = mesh
        .proxy_with_env(
            "web-0",
            ip,
            &[("app", "web")],
            &[
                ("ISTIO_KUBE_APP_PROBERS", probers.to_string()),
                ("ISTIO_PROMETHEUS_ANNOTATIONS", scrape.to_string()),
            ],
        )
        .await;
    assert_eq!(proxy.status.port(), 15020);
    assert_eq!(proxy.readiness.port(), 15021);

    // The postStart hook's wait returns once the proxy has its config.
    weft_proxy::status::wait_until_ready(
        &format!("http://{}/healthz/ready", proxy.readiness),
        Duration::from_secs(10),
        Duration::from_millis(50),
        Duration::from_millis(500),
    )
    .await
    .expect("the proxy becomes ready");
    for addr in [proxy.readiness, proxy.status] {
        let (code, body) = get_text(addr, "/healthz/ready").await.expect("ready");
        assert_eq!((code, body.as_str()), (StatusCode::OK, "LIVE\n"));
    }
    // Only the admin port, local to the pod, shows the config.
    for addr in [proxy.readiness, proxy.status, proxy.stats] {
        for path in ["/config_dump", "/certs", "/clusters"] {
            let (code, _) = get_text(addr, path).await.expect("answers");
            assert_eq!(code, StatusCode::NOT_FOUND, "{addr}{path}");
        }
    }
    let (code, _) = get_text(proxy.admin, "/config_dump").await.expect("admin");
    assert_eq!(code, StatusCode::OK);

    for (path, expected) in [
        ("/app-health/web/livez", StatusCode::OK),
        ("/app-health/web/readyz", StatusCode::SERVICE_UNAVAILABLE),
        ("/app-health/web/startupz", StatusCode::OK),
        ("/app-health/slow/livez", StatusCode::INTERNAL_SERVER_ERROR),
        ("/app-health/gone/livez", StatusCode::INTERNAL_SERVER_ERROR),
        ("/app-health/other/livez", StatusCode::BAD_REQUEST),
    ] {
        assert_eq!(probe(proxy.status, path).await, expected, "{path}");
    }

    // The proxy's own metrics, then the app's (the Python test reads the merge with Prometheus's parser).
    let (_, own) = get_text(proxy.stats, "/stats/prometheus")
        .await
        .expect("proxy metrics");
    let (code, merged) = get_text(proxy.status, "/stats/prometheus")
        .await
        .expect("merged metrics");
    assert_eq!(code, StatusCode::OK);
    assert!(merged.starts_with(&own), "{merged}");
    assert!(merged.ends_with("app_orders_total 3\n"), "{merged}");

    // The app gone: its probes fail, the proxy's metrics are still served.
    app_task.abort();
    let _ = app_task.await;
    wait_for(
        "the liveness probe to fail",
        Duration::from_secs(10),
        || async {
            (probe(proxy.status, "/app-health/web/livez").await
                == StatusCode::INTERNAL_SERVER_ERROR)
                .then_some(())
        },
    )
    .await;
    let (code, alone) = get_text(proxy.status, "/stats/prometheus")
        .await
        .expect("metrics");
    assert_eq!(code, StatusCode::OK);
    assert!(!alone.contains("app_orders_total"), "{alone}");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_gives_up_with_the_reason() {
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = closed.local_addr().expect("address");
    drop(closed);
    let err = weft_proxy::status::wait_until_ready(
        &format!("http://{addr}/healthz/ready"),
        Duration::from_millis(300),
        Duration::from_millis(50),
        Duration::from_millis(100),
    )
    .await
    .expect_err("nothing listens");
    assert!(
        err.contains("not ready within") && err.contains("refused"),
        "{err}"
    );
}
