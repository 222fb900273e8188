//! The enumerated and duration values of Istio's resources, parsed once at load: an unknown spelling
//! is refused with the accepted ones listed, and nothing downstream re-reads a string with a fallback.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Istio duration (`1.5s`, `1m30s`, `200ms`), as Go's `time.ParseDuration` reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct IstioDuration(pub Duration);

impl<'de> Deserialize<'de> for IstioDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        crate::parse_duration(&text)
            .map(IstioDuration)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for IstioDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", self.0.as_secs_f64()))
    }
}

macro_rules! istio_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }
    };
}

istio_enum!(
    /// `AuthorizationPolicy.action`; absent means `Allow`.
    AuthorizationAction { Allow, Deny, Audit, Custom }
);

istio_enum!(
    /// `PeerAuthentication` mTLS modes; `Unset` inherits from the enclosing scope.
    MtlsMode { Unset, Disable, Permissive, Strict }
);

istio_enum!(
    /// `trafficPolicy.loadBalancer.simple`. `LeastConn` is Istio's deprecated alias of `LeastRequest`.
    SimpleLb { Unspecified, RoundRobin, LeastRequest, LeastConn, Random, Passthrough }
);

istio_enum!(
    /// `trafficPolicy.tls.mode`.
    ClientTlsMode { Disable, Simple, Mutual, IstioMutual }
);

istio_enum!(
    /// `connectionPool.http.h2UpgradePolicy`.
    H2UpgradePolicy { Default, DoNotUpgrade, Upgrade }
);

istio_enum!(
    /// `Sidecar.outboundTrafficPolicy.mode`.
    OutboundMode { RegistryOnly, AllowAny }
);

istio_enum!(
    /// `ServiceEntry.resolution`; absent is `None`.
    Resolution { None, Static, Dns, DnsRoundRobin }
);

istio_enum!(
    /// `ServiceEntry.location`; absent is `MeshExternal`.
    Location { MeshExternal, MeshInternal }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_once_and_unknown_ones_are_refused_with_the_known_ones() {
        let action: AuthorizationAction = serde_json::from_str("\"DENY\"").expect("known");
        assert_eq!(action, AuthorizationAction::Deny);
        let lb: SimpleLb = serde_json::from_str("\"LEAST_REQUEST\"").expect("known");
        assert_eq!(lb, SimpleLb::LeastRequest);
        let err = serde_json::from_str::<AuthorizationAction>("\"deny\"")
            .expect_err("case matters, as in Istio");
        assert!(err.to_string().contains("ALLOW"), "{err}");
        let d: IstioDuration = serde_json::from_str("\"1m30s\"").expect("duration");
        assert_eq!(d.0, Duration::from_secs(90));
        assert!(serde_json::from_str::<IstioDuration>("\"10\"").is_err());
    }
}
