//! Install tokens: the credential in a fleet's install files that maps a collector to its
//! fleet.
//!
//! The text is `<id>.<secret>`: a public id (`tk_` + 8 hex digits, safe to show and to list
//! in `revoked`) and a 160-bit random secret. Only SHA-256 of the secret is stored (the
//! secret is random, so a fast hash is enough); comparisons are constant-time. The text
//! never appears in logs, the API, the status page or Git.

use std::collections::HashMap;
use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::repo::manifest::TokenPolicy;

const SECRET_BYTES: usize = 20;

/// A token as the store keeps it: no secret, only its hash.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub id: String,
    pub fleet: String,
    pub secret_hash: [u8; 32],
    /// Unix seconds.
    pub issued_at: i64,
    /// The fleet file's `token.rotate` it was issued for.
    pub rotation: u32,
    /// The token's text sealed under the replicas' shared key (`install::seal`), when
    /// there is one: how replicas other than the one that issued it serve its install files.
    pub sealed: Option<Vec<u8>>,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("id", &self.id)
            .field("fleet", &self.fleet)
            .field("issued_at", &self.issued_at)
            .finish_non_exhaustive()
    }
}

/// The token text, shown once (written to the operator's token file) and never logged.
pub struct TokenText(String);

impl TokenText {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The text of `token`, if `text` (as read from its token file) is it.
    pub fn of(token: &IssuedToken, text: &str) -> Option<Self> {
        let (id, secret) = text.trim().split_once('.')?;
        let matches: bool = hash_secret(secret).ct_eq(&token.secret_hash).into();
        (id == token.id && matches).then(|| Self(text.trim().to_owned()))
    }
}

impl fmt::Debug for TokenText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenText(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the operating system's random source failed: {0}")]
pub struct RandomError(String);

/// Issues a new token for `fleet`.
pub fn issue(fleet: &str, issued_at: i64, rotation: u32) -> Result<(TokenText, IssuedToken), RandomError> {
    let mut random = [0u8; 4 + SECRET_BYTES];
    getrandom::fill(&mut random).map_err(|error| RandomError(error.to_string()))?;
    let id = format!("tk_{}", hex::encode(&random[..4]));
    let secret = hex::encode(&random[4..]);
    let token = IssuedToken {
        id: id.clone(),
        fleet: fleet.to_owned(),
        secret_hash: hash_secret(&secret),
        issued_at,
        rotation,
        sealed: None,
    };
    Ok((TokenText(format!("{id}.{secret}")), token))
}

fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Why a presented token was refused. Messages never include the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("unknown token")]
    Unknown,
    #[error("token expired")]
    Expired,
    #[error("token revoked")]
    Revoked,
    #[error("token replaced by a newer one and its grace period is over")]
    Retired,
}

impl Refused {
    /// The WebSocket close reason for a session whose token is refused now.
    pub fn close_reason(self) -> &'static str {
        match self {
            Self::Revoked => "install token revoked",
            Self::Expired => "install token expired",
            Self::Retired => "install token replaced; its grace period is over",
            Self::Missing | Self::Malformed | Self::Unknown => "install token no longer valid",
        }
    }
}

/// Where a token stands at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// The fleet's current token.
    Active,
    /// Replaced by a newer token and still accepted until its grace period ends.
    Grace,
    /// Replaced, and the grace period is over.
    Retired,
    Revoked,
    Expired,
}

impl TokenState {
    pub fn accepted(self) -> bool {
        matches!(self, Self::Active | Self::Grace)
    }
}

/// One issued token under its fleet's current `[token]` policy: expiry counts from the
/// issue time with the policy's `expires` (so editing `expires` moves it), a replaced token
/// retires `grace` after its successor was issued, and a listed id is revoked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenStatus {
    pub token: IssuedToken,
    /// Unix seconds; `None` never expires.
    pub expires_at: Option<i64>,
    /// Unix seconds when its grace period ends; `None` while it is the newest.
    pub retires_at: Option<i64>,
    pub revoked: bool,
}

impl TokenStatus {
    pub fn state(&self, now: i64) -> TokenState {
        if self.revoked {
            TokenState::Revoked
        } else if self.expires_at.is_some_and(|at| now >= at) {
            TokenState::Expired
        } else if self.retires_at.is_some_and(|at| now >= at) {
            TokenState::Retired
        } else if self.retires_at.is_some() {
            TokenState::Grace
        } else {
            TokenState::Active
        }
    }

    /// Unix seconds from which it is refused, if it is accepted now and that time is set.
    pub fn refused_from(&self) -> Option<i64> {
        if self.revoked {
            return None;
        }
        match (self.expires_at, self.retires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn refusal(&self, now: i64) -> Option<Refused> {
        match self.state(now) {
            TokenState::Active | TokenState::Grace => None,
            TokenState::Retired => Some(Refused::Retired),
            TokenState::Revoked => Some(Refused::Revoked),
            TokenState::Expired => Some(Refused::Expired),
        }
    }
}

/// Every token of one fleet (`tokens` oldest first) under its current policy, newest first.
pub fn statuses(tokens: &[IssuedToken], policy: &TokenPolicy) -> Vec<TokenStatus> {
    let lifetime = policy.expires.map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let grace = i64::try_from(policy.grace.as_secs()).unwrap_or(i64::MAX);
    let mut out: Vec<TokenStatus> = tokens
        .iter()
        .enumerate()
        .map(|(index, token)| TokenStatus {
            token: token.clone(),
            expires_at: lifetime.map(|seconds| token.issued_at.saturating_add(seconds)),
            retires_at: tokens.get(index + 1).map(|next| next.issued_at.saturating_add(grace)),
            revoked: policy.revoked.contains(&token.id),
        })
        .collect();
    out.reverse();
    out
}

/// Why a fleet needs a new token now, if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueReason {
    /// The fleet has never had one.
    First,
    /// `rotate` went up.
    Rotated,
    /// Its newest token is listed in `revoked`.
    Revoked,
    /// The fleet was removed and is back: its earlier tokens stay dead.
    Returned,
}

/// Whether a fleet with these tokens (oldest first) needs a new one under `policy`.
pub fn needs_token(tokens: &[IssuedToken], policy: &TokenPolicy) -> Option<IssueReason> {
    let Some(newest) = tokens.last() else { return Some(IssueReason::First) };
    if policy.revoked.contains(&newest.id) {
        Some(IssueReason::Revoked)
    } else if policy.rotate > newest.rotation {
        Some(IssueReason::Rotated)
    } else {
        None
    }
}

/// Every token gitfleet has issued under its fleet's current policy, for authenticating
/// requests. Refused tokens stay in the index so that a refusal can say why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenIndex {
    by_id: HashMap<String, TokenStatus>,
}

impl TokenIndex {
    pub fn new(tokens: impl IntoIterator<Item = TokenStatus>) -> Self {
        Self { by_id: tokens.into_iter().map(|t| (t.token.id.clone(), t)).collect() }
    }

    /// The token a bearer header presents, if it is accepted now. `header` is the whole
    /// `Authorization` value.
    pub fn authenticate(&self, header: Option<&str>, now: i64) -> Result<&IssuedToken, Refused> {
        let header = header.ok_or(Refused::Missing)?;
        let (scheme, text) = header.trim().split_once(' ').ok_or(Refused::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Refused::Missing);
        }
        let (id, secret) = text.trim().split_once('.').ok_or(Refused::Malformed)?;
        let status = self.by_id.get(id).ok_or(Refused::Unknown)?;
        let matches: bool = hash_secret(secret).ct_eq(&status.token.secret_hash).into();
        if !matches {
            return Err(Refused::Unknown);
        }
        match status.refusal(now) {
            Some(refused) => Err(refused),
            None => Ok(&status.token),
        }
    }

    /// Why a token id, authenticated earlier, is refused now (for closing live sessions).
    pub fn refusal(&self, id: &str, now: i64) -> Option<Refused> {
        match self.by_id.get(id) {
            Some(status) => status.refusal(now),
            None => Some(Refused::Unknown),
        }
    }

    /// The next moment after `now` at which an accepted token becomes refused.
    pub fn next_refusal_after(&self, now: i64) -> Option<i64> {
        self.by_id.values().filter_map(TokenStatus::refused_from).filter(|at| *at > now).min()
    }
}

/// Writes the token for the operator on the server host to `<data-dir>/install/<fleet>/token`
/// (directory 0700, file 0600, replaced atomically). `fleet` is a checked name.
pub fn write_token_file(
    data_dir: &std::path::Path,
    fleet: &str,
    text: &TokenText,
) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = data_dir.join("install").join(fleet);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    let path = dir.join("token");
    let temporary = dir.join(".token.tmp");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
    file.write_all(text.expose().as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&temporary, &path)?;
    Ok(path)
}

/// The text of `token` from its fleet's token file, if the file holds it.
pub fn read_current(data_dir: &std::path::Path, token: &IssuedToken) -> Option<TokenText> {
    let text = read_token_file(data_dir, &token.fleet, std::time::Duration::ZERO).ok()?;
    TokenText::of(token, &text)
}

/// Reads a fleet's token file, waiting up to `timeout` for it to be written (it is written
/// just after the token becomes valid).
pub fn read_token_file(
    data_dir: &std::path::Path,
    fleet: &str,
    timeout: std::time::Duration,
) -> std::io::Result<String> {
    let path = data_dir.join("install").join(fleet).join("token");
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match std::fs::read_to_string(&path) {
            Ok(text) => return Ok(text.trim().to_owned()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy(expires: Option<u64>, rotate: u32, grace: u64, revoked: &[&str]) -> TokenPolicy {
        TokenPolicy {
            expires: expires.map(Duration::from_secs),
            rotate,
            grace: Duration::from_secs(grace),
            revoked: revoked.iter().map(|id| (*id).to_owned()).collect(),
        }
    }

    fn bearer(text: &TokenText) -> String {
        format!("Bearer {}", text.expose())
    }

    #[test]
    fn issued_tokens_authenticate_their_fleet() {
        let (text, token) = issue("prod", 1_000, 0).expect("random");
        assert!(crate::repo::manifest::is_token_id(&token.id), "{}", token.id);
        let secret = text.expose().split_once('.').expect("id.secret").1;
        assert_eq!(secret.len(), 2 * SECRET_BYTES, "160 bits of secret");
        let index = TokenIndex::new(statuses(std::slice::from_ref(&token), &TokenPolicy::default()));
        assert_eq!(index.authenticate(Some(&bearer(&text)), 2_000).map(|t| t.fleet.as_str()), Ok("prod"));
        assert_eq!(
            index.authenticate(Some(&format!("bearer  {}", text.expose())), 2_000).map(|t| t.id.clone()),
            Ok(token.id.clone())
        );
        assert!(TokenText::of(&token, &format!("{}\n", text.expose())).is_some(), "the token file reads back");
        assert!(TokenText::of(&token, &format!("{}.{}", token.id, "0".repeat(40))).is_none());
    }

    #[test]
    fn refusals() {
        let (text, token) = issue("prod", 1_000, 0).expect("random");
        let index = TokenIndex::new(statuses(std::slice::from_ref(&token), &policy(Some(60), 0, 0, &[])));
        let (id, secret) = text.expose().split_once('.').expect("id.secret");
        assert_eq!(index.authenticate(None, 1_000).err(), Some(Refused::Missing));
        assert_eq!(index.authenticate(Some("Basic dXNlcjpwYXNz"), 1_000).err(), Some(Refused::Missing));
        assert_eq!(index.authenticate(Some("Bearer"), 1_000).err(), Some(Refused::Malformed));
        assert_eq!(index.authenticate(Some("Bearer nodot"), 1_000).err(), Some(Refused::Malformed));
        assert_eq!(
            index.authenticate(Some(&format!("Bearer {id}.{}", "0".repeat(40))), 1_000).err(),
            Some(Refused::Unknown)
        );
        assert_eq!(
            index.authenticate(Some(&format!("Bearer tk_00000000.{secret}")), 1_000).err(),
            Some(Refused::Unknown)
        );
        assert_eq!(index.authenticate(Some(&bearer(&text)), 1_059).map(|t| t.id.clone()), Ok(token.id.clone()));
        assert_eq!(index.authenticate(Some(&bearer(&text)), 1_060).err(), Some(Refused::Expired));
        assert_eq!(index.refusal(&token.id, 1_060), Some(Refused::Expired));
        assert_eq!(index.next_refusal_after(1_000), Some(1_060));
        assert_eq!(index.next_refusal_after(1_060), None);
    }

    #[test]
    fn expiry_follows_the_fleet_file_from_the_issue_time() {
        let (_, token) = issue("prod", 1_000, 0).expect("random");
        let tokens = [token];
        assert_eq!(statuses(&tokens, &policy(Some(100), 0, 0, &[]))[0].state(1_099), TokenState::Active);
        assert_eq!(statuses(&tokens, &policy(Some(100), 0, 0, &[]))[0].state(1_100), TokenState::Expired);
        // `expires = "never"` after the fact lifts the expiry.
        assert_eq!(statuses(&tokens, &policy(None, 0, 0, &[]))[0].state(i64::MAX / 2), TokenState::Active);
    }

    #[test]
    fn rotation_keeps_the_old_token_for_the_grace_period() {
        let (old_text, old) = issue("prod", 1_000, 0).expect("random");
        assert_eq!(needs_token(&[], &policy(None, 0, 60, &[])), Some(IssueReason::First));
        assert_eq!(needs_token(std::slice::from_ref(&old), &policy(None, 0, 60, &[])), None);
        assert_eq!(needs_token(std::slice::from_ref(&old), &policy(None, 1, 60, &[])), Some(IssueReason::Rotated));
        let (new_text, new) = issue("prod", 2_000, 1).expect("random");
        let tokens = [old.clone(), new.clone()];
        assert_eq!(needs_token(&tokens, &policy(None, 1, 60, &[])), None);
        // Lowering `rotate` does not issue a token.
        assert_eq!(needs_token(&tokens, &policy(None, 0, 60, &[])), None);

        let listed = statuses(&tokens, &policy(None, 1, 60, &[]));
        assert_eq!(listed[0].token.id, new.id, "newest first");
        assert_eq!(listed[0].state(2_000), TokenState::Active);
        assert_eq!(listed[1].state(2_059), TokenState::Grace);
        assert_eq!(listed[1].state(2_060), TokenState::Retired);
        let index = TokenIndex::new(listed);
        assert_eq!(index.authenticate(Some(&bearer(&old_text)), 2_059).map(|t| t.id.clone()), Ok(old.id.clone()));
        assert_eq!(index.authenticate(Some(&bearer(&old_text)), 2_060).err(), Some(Refused::Retired));
        assert_eq!(index.authenticate(Some(&bearer(&new_text)), 9_999).map(|t| t.id.clone()), Ok(new.id.clone()));
        assert_eq!(index.next_refusal_after(2_000), Some(2_060));
    }

    #[test]
    fn revocation_refuses_at_once_and_replaces_a_revoked_current_token() {
        let (old_text, old) = issue("prod", 1_000, 0).expect("random");
        let (_, new) = issue("prod", 2_000, 1).expect("random");
        let tokens = [old.clone(), new.clone()];
        let revoked_old = policy(None, 1, 3_600, &[old.id.as_str()]);
        let index = TokenIndex::new(statuses(&tokens, &revoked_old));
        assert_eq!(index.authenticate(Some(&bearer(&old_text)), 2_001).err(), Some(Refused::Revoked));
        assert_eq!(needs_token(&tokens, &revoked_old), None, "the current token is fine");
        let revoked_new = policy(None, 1, 3_600, &[new.id.as_str()]);
        assert_eq!(needs_token(&tokens, &revoked_new), Some(IssueReason::Revoked));
    }

    #[test]
    fn tokens_never_print_their_secret() {
        let (text, token) = issue("prod", 0, 0).expect("random");
        let secret = text.expose().split_once('.').expect("id.secret").1.to_owned();
        assert!(!format!("{text:?}").contains(&secret));
        assert!(!format!("{token:?}").contains(&secret));
        assert!(!format!("{token:?}").contains(&hex::encode(token.secret_hash)));
    }
}
