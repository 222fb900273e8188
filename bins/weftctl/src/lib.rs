//! weftctl: Weft's command line. `weftctl demo` runs a whole mesh on this machine: weftd, a proxy per
//! workload on its own 127.0.0.x address, and our sample application; it drives traffic through a
//! routing rule and reports whether the traffic did what the rule says.

pub mod analyze;
pub mod check;
pub mod demo;
pub mod install;
pub mod load;
pub mod manifest;
pub mod proxy_config;
pub mod proxy_status;
pub mod sample_app;

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

/// The body of a 2xx answer to a plaintext GET, for the HTTP endpoints weftd and proxies serve.
pub async fn http_get(url: &str) -> anyhow::Result<String> {
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::get(url).body(Empty::new())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("{url} did not answer within 5s"))??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "{url} answered {status}: {}",
        String::from_utf8_lossy(&body).trim()
    );
    Ok(String::from_utf8_lossy(&body).into_owned())
}
