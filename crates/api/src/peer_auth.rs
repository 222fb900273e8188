//! PeerAuthentication: which inbound traffic a workload takes in plaintext, with Istio's precedence.
//! A workload-selector policy in the workload's namespace wins over the namespace's policy, which wins
//! over the mesh-wide one in the root namespace; `UNSET` inherits from the next level, and with nothing
//! set the mode is `PERMISSIVE`. `portLevelMtls` (selector policies only) overrides per port.

use std::collections::BTreeMap;

use crate::{Object, istio::PeerAuthenticationSpec, labels_match, values::MtlsMode as Declared};

/// The namespace whose selector-less policies apply mesh-wide, as Istio's root namespace.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    /// Plaintext only: a client's mTLS goes through as opaque bytes.
    Disable,
    /// Both mTLS (told apart by Istio's ALPN) and plaintext.
    Permissive,
    /// mTLS only; anything else is refused.
    Strict,
}

/// The mode a policy sets; `None` (no mode, or `UNSET`) inherits.
fn parse(mode: Option<Declared>) -> Option<MtlsMode> {
    match mode? {
        Declared::Disable => Some(MtlsMode::Disable),
        Declared::Permissive => Some(MtlsMode::Permissive),
        Declared::Strict => Some(MtlsMode::Strict),
        Declared::Unset => None,
    }
}

fn own_mode(p: &Object<PeerAuthenticationSpec>) -> Option<MtlsMode> {
    parse(p.spec.mtls.as_ref().and_then(|m| m.mode))
}

/// A workload's mode, and the policy that decided it (`None`: nothing set, so PERMISSIVE).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Applied<'a> {
    pub mode: MtlsMode,
    pub by: Option<&'a Object<PeerAuthenticationSpec>>,
}

/// The mode for a workload in `namespace` with `labels`, for traffic to `port` (the workload's own
/// port, after target-port mapping) or, with `None`, for its ports at large.
pub fn mode_for<'a>(
    policies: &'a [Object<PeerAuthenticationSpec>],
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: Option<u16>,
) -> Applied<'a> {
    let with_mode = |p: &'a Object<PeerAuthenticationSpec>| own_mode(p).map(|m| (m, p));
    let mesh = policies
        .iter()
        .find(|p| p.metadata.namespace() == ROOT_NAMESPACE && p.spec.selector.is_none())
        .and_then(with_mode);
    let ns = policies
        .iter()
        .find(|p| p.metadata.namespace() == namespace && p.spec.selector.is_none())
        .and_then(with_mode);
    let (mode, by) = match ns.or(mesh) {
        Some((mode, by)) => (mode, Some(by)),
        None => (MtlsMode::Permissive, None),
    };
    let inherited = Applied { mode, by };
    let Some(workload) = policies.iter().find(|p| {
        p.metadata.namespace() == namespace
            && p.spec
                .selector
                .as_ref()
                .is_some_and(|s| labels_match(&s.labels, labels))
    }) else {
        return inherited;
    };
    let own = port
        .and_then(|port| workload.spec.port_level_mtls.get(&port))
        .and_then(|m| parse(m.mode))
        .or_else(|| own_mode(workload));
    match own {
        Some(mode) => Applied {
            mode,
            by: Some(workload),
        },
        None => inherited,
    }
}
