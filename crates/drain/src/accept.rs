//! One accept loop for every listener. An accept error never spins: running out of descriptors
//! (`EMFILE`, `ENFILE`) or memory leaves the pending connection in the backlog, so the socket stays
//! readable and a loop that simply retried would burn a core and flood the log. Resource errors back
//! off (doubling up to a second) until descriptors return, and the log line is rate-limited.

use std::{io, net::SocketAddr, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};

const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per listener this often while accepts keep failing.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A listener with its accept-error state.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    what: &'static str,
    backoff: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
    failures: u64,
}

impl Acceptor {
    /// `what` names the listener in the log (`"xDS"`, `"admin"`...).
    pub fn new(listener: TcpListener, what: &'static str) -> Self {
        Self {
            listener,
            what,
            backoff: FIRST_BACKOFF,
            last_log: None,
            suppressed: 0,
            failures: 0,
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection. Errors are handled here, never returned: a per-connection error (the peer
    /// reset before accept) is skipped at once; a resource error waits before trying again. Cancel-safe,
    /// so callers `select!` it against their stop signal.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = FIRST_BACKOFF;
                    return accepted;
                }
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    self.failures += 1;
                    self.log(&e);
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Accepts that failed for want of resources, since the start.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    fn log(&mut self, e: &io::Error) {
        let now = Instant::now();
        if self.last_log.is_some_and(|t| now - t < LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            listener = self.what,
            error = %e,
            repeated = self.suppressed,
            "accept failed; backing off until it succeeds (raise the descriptor limit if this is EMFILE)"
        );
        self.last_log = Some(now);
        self.suppressed = 0;
    }

    /// The accepted connections as a stream, for servers that take one (tonic's `serve_with_incoming`).
    pub fn into_stream(self) -> impl futures::Stream<Item = io::Result<TcpStream>> + Send {
        futures::stream::unfold(self, |mut acceptor| async move {
            let (stream, _) = acceptor.accept().await;
            Some((Ok(stream), acceptor))
        })
    }
}

/// Errors that concern one connection only; the next accept may succeed at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Raises this process's soft limit on open descriptors to its hard limit, as Envoy does at start: the
/// default soft limit (often 1024) is reached by a few hundred idle connections. Returns the limit now
/// in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(hard.max(soft))
}
