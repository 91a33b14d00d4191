//! Verification of `POST /hooks/git` deliveries from GitHub, Gitea and GitLab.
//!
//! A hook only ever triggers a fetch, but with a secret configured nobody else may trigger
//! one. Comparisons are constant-time.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Which forge signed a delivery, as read from its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forge {
    GitHub,
    Gitea,
    GitLab,
}

/// The signature headers of a delivery (any may be absent).
#[derive(Clone, Copy, Debug, Default)]
pub struct Signatures<'a> {
    /// `X-Hub-Signature-256: sha256=<hex>` (GitHub; Gitea and Forgejo send it too).
    pub hub_signature_256: Option<&'a str>,
    /// `X-Gitea-Signature: <hex>`.
    pub gitea_signature: Option<&'a str>,
    /// `X-Gitlab-Token: <secret>`.
    pub gitlab_token: Option<&'a str>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("no signature header (X-Hub-Signature-256, X-Gitea-Signature or X-Gitlab-Token)")]
    Unsigned,
    #[error("{0:?} signature does not match the webhook secret")]
    BadSignature(Forge),
}

/// Checks a delivery against `secret`; returns the forge whose signature matched.
pub fn verify(secret: &[u8], body: &[u8], signatures: Signatures<'_>) -> Result<Forge, WebhookError> {
    if let Some(header) = signatures.hub_signature_256 {
        let matches = header.strip_prefix("sha256=").is_some_and(|hex_digest| hmac_matches(secret, body, hex_digest));
        return if matches { Ok(Forge::GitHub) } else { Err(WebhookError::BadSignature(Forge::GitHub)) };
    }
    if let Some(hex_digest) = signatures.gitea_signature {
        return if hmac_matches(secret, body, hex_digest) {
            Ok(Forge::Gitea)
        } else {
            Err(WebhookError::BadSignature(Forge::Gitea))
        };
    }
    if let Some(token) = signatures.gitlab_token {
        let equal: bool = token.as_bytes().ct_eq(secret).into();
        return if equal { Ok(Forge::GitLab) } else { Err(WebhookError::BadSignature(Forge::GitLab)) };
    }
    Err(WebhookError::Unsigned)
}

fn hmac_matches(secret: &[u8], body: &[u8], hex_digest: &str) -> bool {
    let Ok(expected) = hex::decode(hex_digest.trim()) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// HMAC-SHA256 of `body` under `secret`, hex: what a forge would send.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const BODY: &[u8] = b"Hello, World!";

    #[test]
    fn github_documented_example() {
        // The example from GitHub's "Validating webhook deliveries" documentation.
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(SECRET, BODY), header.trim_start_matches("sha256="));
        let signatures = Signatures { hub_signature_256: Some(header), ..Default::default() };
        assert_eq!(verify(SECRET, BODY, signatures), Ok(Forge::GitHub));
        assert_eq!(verify(SECRET, b"Hello, World?", signatures), Err(WebhookError::BadSignature(Forge::GitHub)));
    }

    #[test]
    fn gitea_and_gitlab() {
        let digest = sign(SECRET, BODY);
        let gitea = Signatures { gitea_signature: Some(&digest), ..Default::default() };
        assert_eq!(verify(SECRET, BODY, gitea), Ok(Forge::Gitea));
        assert_eq!(verify(b"other", BODY, gitea), Err(WebhookError::BadSignature(Forge::Gitea)));
        let token = std::str::from_utf8(SECRET).expect("ascii");
        let gitlab = Signatures { gitlab_token: Some(token), ..Default::default() };
        assert_eq!(verify(SECRET, BODY, gitlab), Ok(Forge::GitLab));
        let wrong = Signatures { gitlab_token: Some("It's a Secret to Everybod"), ..Default::default() };
        assert_eq!(verify(SECRET, BODY, wrong), Err(WebhookError::BadSignature(Forge::GitLab)));
    }

    #[test]
    fn unsigned_and_malformed() {
        assert_eq!(verify(SECRET, BODY, Signatures::default()), Err(WebhookError::Unsigned));
        let malformed = Signatures { hub_signature_256: Some("sha1=abc"), ..Default::default() };
        assert_eq!(verify(SECRET, BODY, malformed), Err(WebhookError::BadSignature(Forge::GitHub)));
        let not_hex = Signatures { gitea_signature: Some("zz"), ..Default::default() };
        assert_eq!(verify(SECRET, BODY, not_hex), Err(WebhookError::BadSignature(Forge::Gitea)));
    }
}
