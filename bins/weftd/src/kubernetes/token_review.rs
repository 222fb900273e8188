//! Callers' identities from Kubernetes, as istiod's CA takes them: a projected service-account token
//! for audience `istio-ca` (Istio's `/var/run/secrets/tokens/istio-token`), checked by the API server
//! with a TokenReview. The review, not the token's own claims, says who the caller is.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};

/// The audience Istio's proxies request their CA token for.
pub const AUDIENCE: &str = "istio-ca";

/// Why a token does not prove an identity.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The API server did not authenticate it, or it is not a service account's for our audience.
    #[error("{0}")]
    Unauthenticated(String),
    /// The API server could not be asked.
    #[error("the API server could not review the token: {0}")]
    Unavailable(String),
}

/// Asks the API server who a token belongs to.
#[derive(Clone)]
pub struct Reviewer {
    api: Api<TokenReview>,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer").finish_non_exhaustive()
    }
}

impl Reviewer {
    pub fn new(client: Client) -> Self {
        Self {
            api: Api::all(client),
        }
    }

    /// The `(namespace, service account)` a token was issued to.
    pub async fn review(&self, token: &str) -> Result<(String, String), Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let reviewed = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))?;
        identity_from_review(&reviewed.status.unwrap_or_default(), AUDIENCE)
    }
}

/// What a review proves: an authenticated service account's token, valid for `audience`.
pub fn identity_from_review(
    status: &TokenReviewStatus,
    audience: &str,
) -> Result<(String, String), Refusal> {
    let refuse = |why: String| Err(Refusal::Unauthenticated(why));
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("no reason given");
        return refuse(format!(
            "the API server did not authenticate the token: {why}"
        ));
    }
    // The server echoes the requested audiences the token is valid for; none means it is for another.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience))
    {
        return refuse(format!(
            "the token is not for audience {audience:?} (mount a projected service-account token with that audience)"
        ));
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or("");
    let parsed = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'));
    match parsed {
        Some((ns, sa)) => Ok((ns.to_string(), sa.to_string())),
        None => refuse(format!(
            "the token belongs to {username:?}, not a service account"
        )),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(authenticated: bool, audiences: &[&str], username: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_string()),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn only_an_authenticated_service_account_token_for_the_ca_proves_an_identity() {
        let sa = "system:serviceaccount:demo:web";
        type Case<'a> = (&'a str, TokenReviewStatus, Option<(&'a str, &'a str)>);
        let cases: [Case<'_>; 6] = [
            (
                "a pod's token",
                status(true, &[AUDIENCE], sa),
                Some(("demo", "web")),
            ),
            ("not authenticated", status(false, &[AUDIENCE], sa), None),
            ("another audience", status(true, &[], sa), None),
            (
                "a user, not a service account",
                status(true, &[AUDIENCE], "admin"),
                None,
            ),
            (
                "a malformed username",
                status(true, &[AUDIENCE], "system:serviceaccount:demo"),
                None,
            ),
            ("an empty review", TokenReviewStatus::default(), None),
        ];
        for (name, review, want) in cases {
            let got = identity_from_review(&review, AUDIENCE);
            match want {
                Some((ns, sa)) => {
                    assert_eq!(got, Ok((ns.to_string(), sa.to_string())), "{name}")
                }
                None => assert!(
                    matches!(got, Err(Refusal::Unauthenticated(_))),
                    "{name}: {got:?}"
                ),
            }
        }
    }
}
