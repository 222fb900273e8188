//! The API server's rules for names, applied at load: every name here later becomes a file path (bootstrap
//! tokens), a metric label, a cluster name or a TLS server name, so one that Kubernetes would refuse is
//! refused here too, before it reaches any of them.

use std::net::IpAddr;

/// A DNS-1123 label: at most 63 lowercase alphanumerics or `-`, starting and ending alphanumeric.
/// Namespaces are labels.
pub fn check_label(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > 63 {
        return Err(format!(
            "{} characters; a DNS-1123 label has at most 63",
            value.len()
        ));
    }
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = value.as_bytes();
    if !bytes.iter().all(|&c| alnum(c) || c == b'-') {
        return Err(format!(
            "{value:?} is not a DNS-1123 label (lowercase letters, digits and '-' only)"
        ));
    }
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(format!(
            "{value:?} is not a DNS-1123 label (must start and end with a letter or digit)"
        ));
    }
    Ok(())
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters. Object names and service
/// accounts are subdomains.
pub fn check_subdomain(value: &str) -> Result<(), String> {
    if value.len() > 253 {
        return Err(format!(
            "{} characters; a DNS-1123 subdomain has at most 253",
            value.len()
        ));
    }
    value
        .split('.')
        .try_for_each(check_label)
        .map_err(|e| format!("{value:?} is not a DNS-1123 subdomain: {e}"))
}

/// A label key (`[prefix/]name`) and value, as the API server checks `metadata.labels`.
pub fn check_label_pair(key: &str, value: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        check_subdomain(p).map_err(|e| format!("label key {key:?}: prefix: {e}"))?;
    }
    check_label_value(name)
        .and_then(|()| {
            if name.is_empty() {
                Err("name must not be empty".into())
            } else {
                Ok(())
            }
        })
        .map_err(|e| format!("label key {key:?}: {e}"))?;
    check_label_value(value).map_err(|e| format!("label {key}: value: {e}"))
}

/// A label value: empty, or at most 63 alphanumerics, `-`, `_` or `.`, starting and ending
/// alphanumeric.
fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > 63 {
        return Err(format!("{} characters; at most 63", value.len()));
    }
    let bytes = value.as_bytes();
    let ok = bytes
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !ok || !bytes[0].is_ascii_alphanumeric() || !bytes[bytes.len() - 1].is_ascii_alphanumeric() {
        return Err(format!(
            "{value:?} must be alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// A host a ServiceEntry or VirtualService names, as Istio validates it: a DNS name, optionally with a
/// leading `*.` wildcard (or `*` alone), never an IP address (those belong in `addresses`).
pub fn check_host(host: &str) -> Result<(), String> {
    if host == "*" {
        return Ok(());
    }
    if host.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "{host:?} is an IP address; hosts are DNS names (put IP addresses in `addresses`)"
        ));
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    let lower = name.to_ascii_lowercase();
    check_subdomain(&lower).map_err(|e| format!("host {host:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_api_servers_rules() {
        for ok in ["a", "frontend", "back-end-2", "x1"] {
            assert_eq!(check_label(ok), Ok(()), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "../../escape",
            long.as_str(),
        ] {
            assert!(check_label(bad).is_err(), "{bad}");
        }
        for ok in ["a.b", "istio-ingressgateway.istio-system", "x"] {
            assert_eq!(check_subdomain(ok), Ok(()), "{ok}");
        }
        let very_long = "a".repeat(300);
        for bad in [
            "..",
            "a..b",
            "../../escape",
            "a/b",
            very_long.as_str(),
            ".a",
        ] {
            assert!(check_subdomain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_and_hosts() {
        for (k, v) in [
            ("app", "reviews"),
            ("app.kubernetes.io/name", "x_y.z"),
            ("security.istio.io/tlsMode", "istio"),
            ("empty", ""),
        ] {
            assert_eq!(check_label_pair(k, v), Ok(()), "{k}={v}");
        }
        for (k, v) in [("app", "a b"), ("", "x"), ("a/b/c", "x"), ("app", "-x")] {
            assert!(check_label_pair(k, v).is_err(), "{k}={v}");
        }
        for ok in [
            "*",
            "*.example.com",
            "api.example.com",
            "reviews",
            "Reviews.Example",
        ] {
            assert_eq!(check_host(ok), Ok(()), "{ok}");
        }
        for bad in ["10.0.0.1", "::1", "a..b", "*x.example.com", "a/b", ""] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
    }
}
