//! Traffic capture rules, as Istio's `istio-iptables` writes them: the same flags, defaults, chains
//! (`ISTIO_INBOUND`, `ISTIO_REDIRECT`, `ISTIO_IN_REDIRECT`, `ISTIO_OUTPUT`) and rule order, so people who
//! debug Istio pods can read ours. [`rules`] is pure; [`apply`] and [`cleanup`] are thin shells over
//! `iptables-restore` and `iptables`.

use std::{collections::BTreeMap, io::Write, process::Command};

/// `istio-iptables`' settings, with the defaults Istio's injector passes.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct CaptureConfig {
    /// Port outbound traffic is redirected to.
    #[arg(short = 'p', long = "envoy-port", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port inbound traffic is redirected to.
    #[arg(short = 'z', long = "inbound-capture-port", default_value_t = 15006)]
    pub inbound_port: u16,
    /// The proxy's uid, whose own traffic is never redirected.
    #[arg(short = 'u', long = "proxy-uid", default_value = "1337")]
    pub proxy_uid: String,
    /// The proxy's gid, whose own traffic is never redirected.
    #[arg(short = 'g', long = "proxy-gid", default_value = "1337")]
    pub proxy_gid: String,
    /// Only REDIRECT is supported (TPROXY is not).
    #[arg(
        short = 'm',
        long = "inbound-interception-mode",
        default_value = "REDIRECT"
    )]
    pub mode: String,
    /// Outbound destination CIDRs to redirect, comma-separated; `*` for all.
    #[arg(short = 'i', long = "outbound-ip-ranges-include", default_value = "*")]
    pub outbound_ip_ranges_include: String,
    /// Outbound destination CIDRs never redirected.
    #[arg(short = 'x', long = "outbound-ip-ranges-exclude", default_value = "")]
    pub outbound_ip_ranges_exclude: String,
    /// Inbound ports to redirect, comma-separated; `*` for all; empty for none.
    #[arg(short = 'b', long = "inbound-ports", default_value = "*")]
    pub inbound_ports_include: String,
    /// Inbound ports never redirected (with `-b '*'`).
    #[arg(
        short = 'd',
        long = "local-exclude-ports",
        default_value = DEFAULT_INBOUND_EXCLUDE
    )]
    pub inbound_ports_exclude: String,
    /// Outbound ports never redirected.
    #[arg(short = 'o', long = "local-outbound-ports-exclude", default_value = "")]
    pub outbound_ports_exclude: String,
    /// Outbound ports always redirected, whatever the destination.
    #[arg(short = 'q', long = "outbound-ports", default_value = "")]
    pub outbound_ports_include: String,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_uid: "1337".into(),
            proxy_gid: "1337".into(),
            mode: "REDIRECT".into(),
            outbound_ip_ranges_include: "*".into(),
            outbound_ip_ranges_exclude: String::new(),
            inbound_ports_include: "*".into(),
            inbound_ports_exclude: DEFAULT_INBOUND_EXCLUDE.into(),
            outbound_ports_exclude: String::new(),
            outbound_ports_include: String::new(),
        }
    }
}

/// Istio's pod annotations and the flag each one sets.
pub const ANNOTATIONS: [(&str, char); 6] = [
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", 'i'),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", 'x'),
    ("traffic.sidecar.istio.io/includeInboundPorts", 'b'),
    ("traffic.sidecar.istio.io/excludeInboundPorts", 'd'),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", 'o'),
    ("traffic.sidecar.istio.io/includeOutboundPorts", 'q'),
];

/// HBONE's port: tunnelled traffic is never captured again.
const HBONE_PORT: u16 = 15008;
/// The source address the inbound passthrough cluster binds, as Istio uses it.
const INBOUND_PASSTHROUGH_SOURCE: &str = "127.0.0.6/32";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaptureError {
    #[error("{flag}: {value:?} is not a list of {what}")]
    Invalid {
        flag: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("interception mode {0} is not supported; use REDIRECT")]
    Mode(String),
    #[error("cannot run {command}: {reason}")]
    Command { command: String, reason: String },
}

/// The proxy's ports the kubelet and Prometheus reach from outside the mesh: 15090, 15021, 15020.
pub const DEFAULT_INBOUND_EXCLUDE: &str = "15090,15021,15020";

impl CaptureConfig {
    /// Applies a pod's `traffic.sidecar.istio.io/*` annotations over these settings, as Istio's injector
    /// does when it writes the init container's arguments.
    pub fn with_annotations(mut self, annotations: &BTreeMap<String, String>) -> Self {
        for (annotation, flag) in ANNOTATIONS {
            let Some(value) = annotations.get(annotation) else {
                continue;
            };
            let field = match flag {
                'i' => &mut self.outbound_ip_ranges_include,
                'x' => &mut self.outbound_ip_ranges_exclude,
                'b' => &mut self.inbound_ports_include,
                'd' => &mut self.inbound_ports_exclude,
                'o' => &mut self.outbound_ports_exclude,
                _ => &mut self.outbound_ports_include,
            };
            *field = value.trim().to_string();
        }
        // The proxy's own metrics, readiness and status ports are never captured, whatever the pod
        // excludes: the kubelet and Prometheus reach them from outside the mesh, as in Istio's template.
        if let Some(extra) = annotations.get("traffic.sidecar.istio.io/excludeInboundPorts") {
            let extra = extra.trim();
            self.inbound_ports_exclude = if extra.is_empty() {
                DEFAULT_INBOUND_EXCLUDE.into()
            } else {
                format!("{DEFAULT_INBOUND_EXCLUDE},{extra}")
            };
        }
        self
    }

    /// The `weft-proxy iptables` arguments that install these rules, as Istio's injector writes the
    /// `istio-init` container's.
    pub fn args(&self) -> Vec<String> {
        let flags: [(&str, String); 11] = [
            ("--envoy-port", self.outbound_port.to_string()),
            ("--inbound-capture-port", self.inbound_port.to_string()),
            ("--proxy-uid", self.proxy_uid.clone()),
            ("--proxy-gid", self.proxy_gid.clone()),
            ("--inbound-interception-mode", self.mode.clone()),
            (
                "--outbound-ip-ranges-include",
                self.outbound_ip_ranges_include.clone(),
            ),
            (
                "--outbound-ip-ranges-exclude",
                self.outbound_ip_ranges_exclude.clone(),
            ),
            ("--inbound-ports", self.inbound_ports_include.clone()),
            ("--local-exclude-ports", self.inbound_ports_exclude.clone()),
            (
                "--local-outbound-ports-exclude",
                self.outbound_ports_exclude.clone(),
            ),
            ("--outbound-ports", self.outbound_ports_include.clone()),
        ];
        std::iter::once("iptables".to_string())
            .chain(
                flags
                    .into_iter()
                    .map(|(flag, value)| format!("{flag}={value}")),
            )
            .collect()
    }
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|v| !v.is_empty())
}

fn ports(flag: &'static str, value: &str) -> Result<Vec<u16>, CaptureError> {
    list(value)
        .map(|p| {
            p.parse().map_err(|_| CaptureError::Invalid {
                flag,
                value: value.into(),
                what: "ports",
            })
        })
        .collect()
}

/// IPv4 CIDRs; IPv6 ranges belong in ip6tables, which Weft does not program yet, so they are skipped.
fn cidrs(flag: &'static str, value: &str) -> Result<Vec<String>, CaptureError> {
    let mut out = Vec::new();
    for c in list(value) {
        let (ip, len) = c.split_once('/').unwrap_or((c, "32"));
        let valid_len = len.parse::<u8>().is_ok_and(|l| l <= 32);
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) if valid_len => out.push(format!("{ip}/{len}")),
            Ok(std::net::IpAddr::V6(_)) => {}
            _ => {
                return Err(CaptureError::Invalid {
                    flag,
                    value: value.into(),
                    what: "CIDRs",
                });
            }
        }
    }
    Ok(out)
}

/// The `iptables-restore` input for the nat table.
pub fn rules(c: &CaptureConfig) -> Result<String, CaptureError> {
    if c.mode != "REDIRECT" {
        return Err(CaptureError::Mode(c.mode.clone()));
    }
    let mut r: Vec<String> = [
        "* nat",
        "-N ISTIO_INBOUND",
        "-N ISTIO_REDIRECT",
        "-N ISTIO_IN_REDIRECT",
        "-N ISTIO_OUTPUT",
    ]
    .map(String::from)
    .into();
    r.push(format!(
        "-A ISTIO_INBOUND -p tcp --dport {HBONE_PORT} -j RETURN"
    ));
    r.push(format!(
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        c.outbound_port
    ));
    r.push(format!(
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        c.inbound_port
    ));

    // Inbound: everything but the excluded ports, or only the listed ones.
    let inbound = c.inbound_ports_include.trim();
    if !inbound.is_empty() {
        r.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
        if inbound == "*" {
            for p in ports("-d", &c.inbound_ports_exclude)? {
                r.push(format!("-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN"));
            }
            r.push("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
        } else {
            for p in ports("-b", inbound)? {
                r.push(format!(
                    "-A ISTIO_INBOUND -p tcp --dport {p} -j ISTIO_IN_REDIRECT"
                ));
            }
        }
    }

    // Outbound.
    r.push("-A OUTPUT -p tcp -j ISTIO_OUTPUT".into());
    // Port exclusions come before the loopback rules, which would otherwise redirect them back to us.
    for p in ports("-o", &c.outbound_ports_exclude)? {
        r.push(format!("-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN"));
    }
    r.push(format!(
        "-A ISTIO_OUTPUT -o lo -s {INBOUND_PASSTHROUGH_SOURCE} -j RETURN"
    ));
    for (kind, ids) in [("uid", &c.proxy_uid), ("gid", &c.proxy_gid)] {
        for id in list(ids) {
            // The proxy calling a local workload by its pod address goes through inbound capture;
            // its other loopback traffic and all its outbound traffic go out as they are.
            r.push(format!(
                "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport {HBONE_PORT} -m owner --{kind}-owner {id} -j ISTIO_IN_REDIRECT"
            ));
            r.push(format!(
                "-A ISTIO_OUTPUT -o lo -m owner ! --{kind}-owner {id} -j RETURN"
            ));
            r.push(format!(
                "-A ISTIO_OUTPUT -m owner --{kind}-owner {id} -j RETURN"
            ));
        }
    }
    r.push("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN".into());
    for cidr in cidrs("-x", &c.outbound_ip_ranges_exclude)? {
        r.push(format!("-A ISTIO_OUTPUT -d {cidr} -j RETURN"));
    }
    for p in ports("-q", &c.outbound_ports_include)? {
        r.push(format!(
            "-A ISTIO_OUTPUT -p tcp --dport {p} -j ISTIO_REDIRECT"
        ));
    }
    if c.outbound_ip_ranges_include.trim() == "*" {
        r.push("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into());
    } else {
        for cidr in cidrs("-i", &c.outbound_ip_ranges_include)? {
            r.push(format!("-A ISTIO_OUTPUT -d {cidr} -j ISTIO_REDIRECT"));
        }
    }
    r.push("COMMIT".into());
    Ok(r.join("\n") + "\n")
}

/// The `iptables -t nat` commands that remove everything [`rules`] adds; each may fail harmlessly when
/// its rule or chain is already gone.
pub fn cleanup_commands() -> Vec<Vec<&'static str>> {
    let mut cmds = vec![
        vec!["-D", "PREROUTING", "-p", "tcp", "-j", "ISTIO_INBOUND"],
        vec!["-D", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"],
    ];
    // The redirect chains go last: the others jump to them.
    for chain in [
        "ISTIO_INBOUND",
        "ISTIO_OUTPUT",
        "ISTIO_REDIRECT",
        "ISTIO_IN_REDIRECT",
    ] {
        cmds.push(vec!["-F", chain]);
        cmds.push(vec!["-X", chain]);
    }
    cmds
}

/// Installs the rules with `iptables-restore --noflush`.
pub fn apply(c: &CaptureConfig) -> Result<(), CaptureError> {
    let input = rules(c)?;
    let command = "iptables-restore --noflush";
    let err = |reason: String| CaptureError::Command {
        command: command.into(),
        reason,
    };
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("{e} (is iptables installed, and are we root?)")))?;
    child
        .stdin
        .take()
        .ok_or_else(|| err("no stdin".into()))?
        .write_all(input.as_bytes())
        .map_err(|e| err(e.to_string()))?;
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

/// Removes the rules, ignoring the ones already gone.
pub fn cleanup() {
    for args in cleanup_commands() {
        let _ = Command::new("iptables")
            .args(["-t", "nat"])
            .args(&args)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests;
