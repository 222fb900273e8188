//! Bootstrap tokens: how a workload proves its service account to the CA when there is no Kubernetes
//! API to vouch for it (the YAML-directory mode). weftd mints one per service account with a key only
//! it holds; the CA accepts a CSR for exactly the identity its token names.

use ring::hmac;

use crate::SpiffeId;

const PREFIX: &str = "weft-bootstrap-v1";

/// Mints and checks bootstrap tokens with one HMAC key, made fresh for each weftd process.
pub struct BootstrapTokens {
    key: hmac::Key,
}

impl std::fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootstrapTokens(..)")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(Debug, thiserror::Error)]
#[error("cannot make a token key: {0}")]
pub struct TokenKeyError(String);

impl BootstrapTokens {
    pub fn generate() -> Result<Self, TokenKeyError> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| TokenKeyError("no system randomness".into()))?;
        Ok(Self { key })
    }

    /// `weft-bootstrap-v1.<hex of the SPIFFE id>.<hex of its HMAC>`.
    pub fn issue(&self, id: &SpiffeId) -> String {
        let body = hex(id.to_string().as_bytes());
        let tag = hmac::sign(&self.key, body.as_bytes());
        format!("{PREFIX}.{body}.{}", hex(tag.as_ref()))
    }

    /// The identity a token vouches for, if this key minted it.
    pub fn verify(&self, token: &str) -> Option<SpiffeId> {
        let mut parts = token.trim().split('.');
        let (Some(PREFIX), Some(body), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        hmac::verify(&self.key, body.as_bytes(), &unhex(tag)?).ok()?;
        String::from_utf8(unhex(body)?).ok()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_vouch_only_for_what_this_key_signed() {
        let tokens = BootstrapTokens::generate().expect("key");
        let id = SpiffeId::new("cluster.local", "demo", "frontend");
        let token = tokens.issue(&id);
        assert_eq!(tokens.verify(&token), Some(id.clone()));
        assert_eq!(tokens.verify(&format!("{token}\n")), Some(id));
        let other = BootstrapTokens::generate().expect("key");
        assert_eq!(other.verify(&token), None, "another weftd's token");
        let forged = token.replace(
            &hex(b"spiffe://cluster.local/ns/demo/sa/frontend"),
            &hex(b"spiffe://cluster.local/ns/demo/sa/admin"),
        );
        assert_eq!(
            tokens.verify(&forged),
            None,
            "a token edited to another identity"
        );
        assert_eq!(tokens.verify("not a token"), None);
    }
}
