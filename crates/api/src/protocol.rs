//! What a port carries and what a host names, read from config as Istio reads it.

/// Kubernetes' cluster DNS suffix; Istio names services `<name>.<namespace>.svc.<domain>`.
pub const DNS_DOMAIN: &str = "cluster.local";

/// How a port's traffic is handled, picked as Istio picks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Http,
    /// HTTP/2 cleartext, including gRPC: the upstream speaks HTTP/2.
    Http2,
    Grpc,
    Tcp,
    /// Nothing declared: under capture the proxy sniffs the first bytes, as Istio does.
    Auto,
}

impl Protocol {
    /// From `appProtocol` first, then the port name's prefix up to the first `-` (`http-web`, `grpc`),
    /// then a declared protocol (ServiceEntry, Sidecar). Otherwise [`Protocol::Auto`].
    pub fn infer(name: Option<&str>, app_protocol: Option<&str>, declared: Option<&str>) -> Self {
        let by_word = |w: &str| match w.to_ascii_lowercase().as_str() {
            "http" | "http-web" | "http1" => Some(Self::Http),
            "http2" | "kubernetes.io/h2c" | "h2c" => Some(Self::Http2),
            "grpc" | "grpc-web" => Some(Self::Grpc),
            "tcp" | "tls" | "mongo" | "mysql" | "redis" | "https" => Some(Self::Tcp),
            _ => None,
        };
        app_protocol
            .and_then(by_word)
            .or_else(|| name.and_then(|n| by_word(n.split('-').next().unwrap_or(n))))
            .or_else(|| declared.and_then(by_word))
            .unwrap_or(Self::Auto)
    }

    /// Declared HTTP of some kind. Auto is not: explicit listeners cannot sniff, so they carry it as TCP,
    /// which never stalls a server-first protocol.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2 | Self::Grpc)
    }

    pub fn is_http2(self) -> bool {
        matches!(self, Self::Http2 | Self::Grpc)
    }
}

/// A short name (no dot) means a Kubernetes service in the rule's own namespace.
pub fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') || host == "*" {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{DNS_DOMAIN}")
    }
}
