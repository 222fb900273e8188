//! Transport sockets: Istio's mTLS contexts between sidecars, with certificates named by SDS secret
//! (`default`, `ROOTCA`) and resolved from the proxy's own identity manager. Inline keys and anything
//! this proxy cannot honour are rejected: a TLS setting that silently did nothing would be a hole.

use serde::Serialize;
use weft_xds::pb::envoy::{
    config::core::v3::TransportSocket,
    extensions::transport_sockets::{
        raw_buffer::v3::RawBuffer,
        tls::v3::{
            CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
            UpstreamTlsContext, common_tls_context, subject_alt_name_matcher::SanType,
        },
    },
    r#type::matcher::v3::string_matcher,
};

use super::{Rejection, reject, unpack};
use crate::identity::{SDS_CERTIFICATE, SDS_ROOT};

/// Originate mTLS to an upstream, as a cluster's `UpstreamTlsContext` says.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct UpstreamTls {
    /// Istio's `outbound_.<port>_.<subset>_.<host>`.
    pub sni: String,
    pub alpn: Vec<String>,
    /// SPIFFE ids the server may present (`match_subject_alt_names`); empty accepts any workload of
    /// the trust domain.
    pub peers: Vec<String>,
}

/// Terminate mTLS on a filter chain, as its `DownstreamTlsContext` says.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct DownstreamTls {
    pub require_client_certificate: bool,
    pub alpn: Vec<String>,
}

/// `None` for plaintext (`raw_buffer`).
pub(super) fn upstream(
    ts: &TransportSocket,
    kind: &'static str,
    name: &str,
    field: &str,
) -> Result<Option<UpstreamTls>, Rejection> {
    let Some(any) = typed(ts, kind, name, field)? else {
        return Ok(None);
    };
    let ctx: UpstreamTlsContext = unpack(&any, kind, name, field)?;
    let supported = UpstreamTlsContext {
        common_tls_context: ctx.common_tls_context.clone(),
        sni: ctx.sni.clone(),
        ..Default::default()
    };
    if ctx != supported {
        return Err(reject(
            kind,
            name,
            field,
            "only common_tls_context and sni are supported in UpstreamTlsContext",
        ));
    }
    // Checked now, so a name rustls would refuse fails this update, not every connection after it.
    let sni_field = format!("{field}.sni");
    if ctx.sni.is_empty() {
        return Err(reject(
            kind,
            name,
            &sni_field,
            "an SNI is required (weft-proxy sends one on every TLS connection)",
        ));
    }
    weft_certs::check_server_name(&ctx.sni).map_err(|e| reject(kind, name, &sni_field, e))?;
    let (alpn, peers) = common(ctx.common_tls_context.as_ref(), kind, name, field)?;
    Ok(Some(UpstreamTls {
        sni: ctx.sni,
        alpn,
        peers,
    }))
}

pub(super) fn downstream(
    ts: &TransportSocket,
    kind: &'static str,
    name: &str,
    field: &str,
) -> Result<Option<DownstreamTls>, Rejection> {
    let Some(any) = typed(ts, kind, name, field)? else {
        return Ok(None);
    };
    let ctx: DownstreamTlsContext = unpack(&any, kind, name, field)?;
    let supported = DownstreamTlsContext {
        common_tls_context: ctx.common_tls_context.clone(),
        require_client_certificate: ctx.require_client_certificate,
        ..Default::default()
    };
    if ctx != supported {
        return Err(reject(
            kind,
            name,
            field,
            "only common_tls_context and require_client_certificate are supported in DownstreamTlsContext",
        ));
    }
    let (alpn, peers) = common(ctx.common_tls_context.as_ref(), kind, name, field)?;
    if !peers.is_empty() {
        return Err(reject(
            kind,
            name,
            field,
            "match_subject_alt_names on a server is not supported; use an AuthorizationPolicy on principals",
        ));
    }
    Ok(Some(DownstreamTls {
        require_client_certificate: ctx.require_client_certificate.is_some_and(|b| b.value),
        alpn,
    }))
}

/// The TLS context's `Any`, or `None` for `raw_buffer`.
fn typed(
    ts: &TransportSocket,
    kind: &'static str,
    name: &str,
    field: &str,
) -> Result<Option<weft_xds::pb::google::protobuf::Any>, Rejection> {
    use prost::Name;
    use weft_xds::pb::envoy::config::core::v3::transport_socket::ConfigType;
    match &ts.config_type {
        Some(ConfigType::TypedConfig(any)) if any.type_url == RawBuffer::type_url() => Ok(None),
        Some(ConfigType::TypedConfig(any)) => Ok(Some(any.clone())),
        None if ts.name == "envoy.transport_sockets.raw_buffer" || ts.name == "raw_buffer" => {
            Ok(None)
        }
        None => Err(reject(kind, name, field, "typed_config is required")),
    }
}

fn sds_name<'a>(
    s: &'a SdsSecretConfig,
    want: &str,
    kind: &'static str,
    name: &str,
    field: &str,
) -> Result<&'a str, Rejection> {
    if s.name != want {
        return Err(reject(
            kind,
            name,
            field,
            format!(
                "secret {:?}: this proxy serves {SDS_CERTIFICATE:?} (its workload certificate) and {SDS_ROOT:?} (the trust bundle) from its own identity",
                s.name
            ),
        ));
    }
    Ok(&s.name)
}

/// ALPN and the peer SANs to match, from a context whose certificate is `default` and whose trust
/// bundle is `ROOTCA`.
fn common(
    ctx: Option<&CommonTlsContext>,
    kind: &'static str,
    name: &str,
    field: &str,
) -> Result<(Vec<String>, Vec<String>), Rejection> {
    let Some(ctx) = ctx else {
        return Err(reject(kind, name, field, "common_tls_context is required"));
    };
    let supported = CommonTlsContext {
        tls_certificate_sds_secret_configs: ctx.tls_certificate_sds_secret_configs.clone(),
        validation_context_type: ctx.validation_context_type.clone(),
        alpn_protocols: ctx.alpn_protocols.clone(),
        ..Default::default()
    };
    if *ctx != supported {
        return Err(reject(
            kind,
            name,
            field,
            "only tls_certificate_sds_secret_configs, a validation context and alpn_protocols are supported; inline keys are refused, as keys never leave the workload",
        ));
    }
    let [cert] = ctx.tls_certificate_sds_secret_configs.as_slice() else {
        return Err(reject(
            kind,
            name,
            format!("{field}.tls_certificate_sds_secret_configs"),
            "exactly one certificate, the SDS secret \"default\", is supported",
        ));
    };
    sds_name(cert, SDS_CERTIFICATE, kind, name, field)?;
    let field_v = format!("{field}.validation_context");
    let (root, default) = match &ctx.validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(s)) => {
            (s, None)
        }
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            let Some(root) = &c.validation_context_sds_secret_config else {
                return Err(reject(
                    kind,
                    name,
                    &field_v,
                    "validation_context_sds_secret_config \"ROOTCA\" is required",
                ));
            };
            (root, c.default_validation_context.as_ref())
        }
        _ => {
            return Err(reject(
                kind,
                name,
                &field_v,
                "the trust bundle must be the SDS secret \"ROOTCA\"",
            ));
        }
    };
    sds_name(root, SDS_ROOT, kind, name, &field_v)?;
    let peers = match default {
        None => Vec::new(),
        Some(v) => san_matches(v, kind, name, &field_v)?,
    };
    Ok((ctx.alpn_protocols.clone(), peers))
}

fn san_matches(
    v: &CertificateValidationContext,
    kind: &'static str,
    name: &str,
    field: &str,
) -> Result<Vec<String>, Rejection> {
    #[allow(deprecated)]
    let supported = CertificateValidationContext {
        match_subject_alt_names: v.match_subject_alt_names.clone(),
        match_typed_subject_alt_names: v.match_typed_subject_alt_names.clone(),
        ..Default::default()
    };
    if *v != supported {
        return Err(reject(
            kind,
            name,
            field,
            "only match_subject_alt_names and match_typed_subject_alt_names are supported",
        ));
    }
    let exact = |m: &weft_xds::pb::envoy::r#type::matcher::v3::StringMatcher| match &m.match_pattern
    {
        Some(string_matcher::MatchPattern::Exact(s)) if !m.ignore_case => Ok(s.clone()),
        _ => Err(reject(
            kind,
            name,
            field,
            "subject alt names must be matched exactly (SPIFFE ids)",
        )),
    };
    #[allow(deprecated)]
    let mut out: Vec<String> = v
        .match_subject_alt_names
        .iter()
        .map(exact)
        .collect::<Result<_, _>>()?;
    for t in &v.match_typed_subject_alt_names {
        if t.san_type != SanType::Uri as i32 {
            return Err(reject(
                kind,
                name,
                field,
                "only URI subject alt names (SPIFFE ids) are matched",
            ));
        }
        out.push(exact(t.matcher.as_ref().ok_or_else(|| {
            reject(kind, name, field, "a SAN matcher is required")
        })?)?);
    }
    Ok(out)
}
