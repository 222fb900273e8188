//! Helpers for the network-namespace tests: servers and clients that know nothing of the mesh, and the
//! original-destination lookup a captured connection carries. The namespaces come from `weft-netns`.
//! [`kubelet`] works out how a Pod from the API server runs as processes, for the harness that stands
//! in for kind here.

pub mod kubelet;

use anyhow::Context;

pub use weft_netns::{Netns, Network, Process, link};

/// The destination a redirected connection was headed for (`SO_ORIGINAL_DST`), as the proxy reads it.
pub fn original_dst(stream: &tokio::net::TcpStream) -> anyhow::Result<std::net::SocketAddr> {
    let addr = socket2::SockRef::from(stream)
        .original_dst_v4()
        .context("SO_ORIGINAL_DST")?;
    addr.as_socket().context("not an IP address")
}

/// Answers every HTTP/1.1 request on `listener` with `200` and `<name> <path>` as the body.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    name: &'static str,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf).to_string();
            if head.to_ascii_lowercase().contains("upgrade: websocket") {
                // Accept the upgrade, then echo whatever arrives: enough to prove the tunnel.
                let accept = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
                if s.write_all(accept.as_bytes()).await.is_err() {
                    return;
                }
                while let Ok(n) = s.read(&mut chunk).await {
                    if n == 0 || s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
                return;
            }
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let body = format!("{name} {path}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

/// Echoes bytes back prefixed by `name:`.
pub async fn serve_echo(
    listener: tokio::net::TcpListener,
    name: &'static str,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0
                    || s.write_all(
                        format!("{name}:{}", String::from_utf8_lossy(&buf[..n])).as_bytes(),
                    )
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }
}

/// One HTTP/1.1 request, the way an application that knows nothing of the mesh sends it.
pub async fn http_get(
    addr: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await??;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.read_to_string(&mut out),
    )
    .await??;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A directory removed when dropped, so a failing test leaves nothing behind.
#[derive(Debug)]
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("weft-{label}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
