//! Access log lines in Istio's default text format (Envoy's format string that istiod configures), so
//! log pipelines built for Istio parse them unchanged.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::Write,
    net::SocketAddr,
    sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{metrics::counter::Counter, registry::Registry};

use http::{HeaderMap, Method, Version};

pub struct Entry<'a> {
    pub start: SystemTime,
    pub method: &'a Method,
    pub path: &'a str,
    pub version: Version,
    pub status: u16,
    pub flags: &'a str,
    /// Envoy's `%RESPONSE_CODE_DETAILS%`, such as `rbac_access_denied_matched_policy[...]`.
    pub details: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub headers: &'a HeaderMap,
    pub authority: &'a str,
    pub upstream_host: Option<String>,
    pub upstream_cluster: Option<&'a str>,
    pub downstream_local: SocketAddr,
    pub downstream_remote: SocketAddr,
    pub route_name: &'a str,
}

/// What the access log records of one TCP connection.
pub struct TcpEntry<'a> {
    pub start: SystemTime,
    pub flags: &'a str,
    pub termination: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_host: Option<String>,
    pub upstream_cluster: Option<&'a str>,
    pub downstream_local: SocketAddr,
    pub downstream_remote: SocketAddr,
}

/// Open log files by path, shared by every listener that logs to the same place.
/// Lines waiting for the writer; past this many, new lines are dropped (and counted) rather than
/// held: about a megabyte of Istio-format lines.
const QUEUE_LINES: usize = 4096;

/// Access log lines go to a writer thread through a bounded queue, so a slow reader of the log (a
/// full stdout pipe, a stalled disk) costs dropped lines, counted in
/// `weft_access_log_dropped_lines_total`, and never a stalled request on the worker thread. Dropping
/// it closes the queue: the writer writes what is queued and ends.
#[derive(Debug)]
pub struct AccessLog {
    queue: SyncSender<(String, String)>,
    dropped: Counter,
    _writer: Option<std::thread::JoinHandle<()>>,
}

impl Default for AccessLog {
    fn default() -> Self {
        Self::with_capacity(QUEUE_LINES, Counter::default())
    }
}

impl AccessLog {
    /// The log, with its dropped-lines counter in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let dropped = Counter::default();
        registry.register(
            "weft_access_log_dropped_lines",
            "Access log lines dropped because the writer was behind (a slow log reader or disk)",
            dropped.clone(),
        );
        Self::with_capacity(QUEUE_LINES, dropped)
    }

    fn with_capacity(lines: usize, dropped: Counter) -> Self {
        let (queue, lines) = sync_channel(lines);
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(lines))
            .inspect_err(|e| tracing::warn!(error = %e, "cannot start the access log writer; lines are dropped"))
            .ok();
        Self {
            queue,
            dropped,
            _writer: writer,
        }
    }

    pub fn format(&self, e: &Entry<'_>) -> String {
        let h = |name: &str| {
            e.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        format!(
            "[{}] \"{} {} {:?}\" {} {} {} - \"-\" {} {} {} - \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} - {} {} - {}\n",
            rfc3339_millis(e.start),
            e.method,
            e.path,
            e.version,
            e.status,
            e.flags,
            dash(e.details),
            e.bytes_received,
            e.bytes_sent,
            e.duration.as_millis(),
            h("x-forwarded-for"),
            h("user-agent"),
            h("x-request-id"),
            dash(e.authority),
            e.upstream_host.as_deref().unwrap_or("-"),
            e.upstream_cluster.unwrap_or("-"),
            e.downstream_local,
            e.downstream_remote,
            dash(e.route_name),
        )
    }

    /// A TCP connection's line in the same format, with the HTTP fields as `-`, as Envoy writes it for
    /// a TCP proxy. `termination` is `%CONNECTION_TERMINATION_DETAILS%` (the RBAC policy that closed it).
    pub fn format_tcp(&self, e: &TcpEntry<'_>) -> String {
        format!(
            "[{}] \"- - -\" 0 {} - {} \"-\" {} {} {} - \"-\" \"-\" \"-\" \"-\" \"{}\" {} - {} {} - -\n",
            rfc3339_millis(e.start),
            e.flags,
            if e.termination.is_empty() {
                "-"
            } else {
                e.termination
            },
            e.bytes_received,
            e.bytes_sent,
            e.duration.as_millis(),
            e.upstream_host.as_deref().unwrap_or("-"),
            e.upstream_cluster.unwrap_or("-"),
            e.downstream_local,
            e.downstream_remote,
        )
    }

    /// Queues `line` for the file at `path` (`/dev/stdout` being the proxy's standard output).
    pub fn write(&self, path: &str, line: String) {
        match self.queue.try_send((path.to_string(), line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// The writer thread: each line to its file, opened on first use and kept.
fn write_lines(lines: Receiver<(String, String)>) {
    let mut files: HashMap<String, File> = HashMap::new();
    for (path, line) in lines {
        if path == "/dev/stdout" {
            let _ = std::io::stdout().lock().write_all(line.as_bytes());
            continue;
        }
        if !files.contains_key(&path) {
            match OpenOptions::new().create(true).append(true).open(&path) {
                Ok(f) => {
                    files.insert(path.clone(), f);
                }
                Err(e) => {
                    tracing::warn!(path, error = %e, "cannot open access log");
                    continue;
                }
            }
        }
        if let Some(f) = files.get_mut(&path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer stuck on its file (a FIFO nobody reads: opening it blocks) fills the queue; later
    /// lines are dropped and counted, and `write` never waits.
    #[test]
    fn a_stuck_writer_costs_dropped_lines_not_a_blocked_caller() {
        let dir = std::env::temp_dir().join(format!("weft-access-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory");
        let fifo = dir.join("stuck");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        let dropped = Counter::default();
        let log = AccessLog::with_capacity(4, dropped.clone());
        let path = fifo.display().to_string();
        let started = std::time::Instant::now();
        for i in 0..100 {
            log.write(&path, format!("line {i}\n"));
        }
        assert!(started.elapsed() < Duration::from_secs(1), "write waited");
        // The writer holds one line while it blocks in open; the queue holds four more.
        assert!(dropped.get() >= 95, "dropped {}", dropped.get());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(UNIX_EPOCH + Duration::from_millis(1_795_748_645_123)),
            "2026-11-27T03:04:05.123Z"
        );
    }

    #[test]
    fn tcp_lines_name_the_policy_that_closed_the_connection() {
        let line = AccessLog::default().format_tcp(&TcpEntry {
            start: UNIX_EPOCH,
            flags: "-",
            termination: "rbac_access_denied_matched_policy[ns[demo]-policy[deny-db]-rule[0]]",
            bytes_received: 0,
            bytes_sent: 0,
            duration: Duration::from_millis(1),
            upstream_host: None,
            upstream_cluster: None,
            downstream_local: "10.0.0.2:5432".parse().expect("addr"),
            downstream_remote: "10.0.0.1:4444".parse().expect("addr"),
        });
        assert_eq!(
            line,
            "[1970-01-01T00:00:00.000Z] \"- - -\" 0 - - rbac_access_denied_matched_policy[ns[demo]-policy[deny-db]-rule[0]] \"-\" 0 0 1 - \"-\" \"-\" \"-\" \"-\" \"-\" - - 10.0.0.2:5432 10.0.0.1:4444 - -\n"
        );
    }

    #[test]
    fn lines_follow_istios_default_format() {
        let mut headers = HeaderMap::new();
        headers.insert("user-agent", "curl/8".parse().expect("value"));
        let line = AccessLog::default().format(&Entry {
            start: UNIX_EPOCH,
            method: &Method::GET,
            path: "/api?x=1",
            version: Version::HTTP_11,
            status: 200,
            flags: "-",
            details: "via_upstream",
            bytes_received: 0,
            bytes_sent: 12,
            duration: Duration::from_millis(3),
            headers: &headers,
            authority: "backend:9080",
            upstream_host: Some("127.0.0.21:9080".into()),
            upstream_cluster: Some("outbound|9080|v1|backend.demo.svc.cluster.local"),
            downstream_local: "127.0.0.10:9080".parse().expect("addr"),
            downstream_remote: "127.0.0.1:5555".parse().expect("addr"),
            route_name: "default",
        });
        assert_eq!(
            line,
            "[1970-01-01T00:00:00.000Z] \"GET /api?x=1 HTTP/1.1\" 200 - via_upstream - \"-\" 0 12 3 - \"-\" \"curl/8\" \"-\" \"backend:9080\" \"127.0.0.21:9080\" outbound|9080|v1|backend.demo.svc.cluster.local - 127.0.0.10:9080 127.0.0.1:5555 - default\n"
        );
    }
}
