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

const SECRET_BYTES: usize = 20;

/// A token as the store keeps it: no secret, only its hash.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub id: String,
    pub fleet: String,
    pub secret_hash: [u8; 32],
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds; `None` never expires.
    pub expires_at: Option<i64>,
    /// The fleet file's `token.rotate` it was issued for.
    pub rotation: u32,
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
pub fn issue(
    fleet: &str,
    issued_at: i64,
    lifetime_seconds: Option<u64>,
    rotation: u32,
) -> Result<(TokenText, IssuedToken), RandomError> {
    let mut random = [0u8; 4 + SECRET_BYTES];
    getrandom::fill(&mut random).map_err(|error| RandomError(error.to_string()))?;
    let id = format!("tk_{}", hex::encode(&random[..4]));
    let secret = hex::encode(&random[4..]);
    let expires_at =
        lifetime_seconds.map(|seconds| issued_at.saturating_add(i64::try_from(seconds).unwrap_or(i64::MAX)));
    let token = IssuedToken {
        id: id.clone(),
        fleet: fleet.to_owned(),
        secret_hash: hash_secret(&secret),
        issued_at,
        expires_at,
        rotation,
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
}

/// Every valid token by id, for authenticating requests.
#[derive(Clone, Debug, Default)]
pub struct TokenIndex {
    by_id: HashMap<String, IssuedToken>,
}

impl TokenIndex {
    pub fn new(tokens: impl IntoIterator<Item = IssuedToken>) -> Self {
        Self { by_id: tokens.into_iter().map(|t| (t.id.clone(), t)).collect() }
    }

    /// The fleet a bearer token belongs to. `header` is the whole `Authorization` value.
    pub fn authenticate(&self, header: Option<&str>, now: i64) -> Result<&IssuedToken, Refused> {
        let header = header.ok_or(Refused::Missing)?;
        let (scheme, text) = header.trim().split_once(' ').ok_or(Refused::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Refused::Missing);
        }
        let (id, secret) = text.trim().split_once('.').ok_or(Refused::Malformed)?;
        let token = self.by_id.get(id).ok_or(Refused::Unknown)?;
        let matches: bool = hash_secret(secret).ct_eq(&token.secret_hash).into();
        if !matches {
            return Err(Refused::Unknown);
        }
        if token.expires_at.is_some_and(|expires_at| now >= expires_at) {
            return Err(Refused::Expired);
        }
        Ok(token)
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
    use super::*;

    #[test]
    fn issued_tokens_authenticate_their_fleet() {
        let (text, token) = issue("prod", 1_000, None, 0).expect("random");
        assert!(crate::repo::manifest::is_token_id(&token.id), "{}", token.id);
        let secret = text.expose().split_once('.').expect("id.secret").1;
        assert_eq!(secret.len(), 2 * SECRET_BYTES, "160 bits of secret");
        let index = TokenIndex::new([token.clone()]);
        let header = format!("Bearer {}", text.expose());
        assert_eq!(index.authenticate(Some(&header), 2_000).map(|t| t.fleet.as_str()), Ok("prod"));
        assert_eq!(
            index.authenticate(Some(&format!("bearer  {}", text.expose())), 2_000).map(|t| t.id.clone()),
            Ok(token.id.clone())
        );
    }

    #[test]
    fn refusals() {
        let (text, token) = issue("prod", 1_000, Some(60), 0).expect("random");
        let index = TokenIndex::new([token.clone()]);
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
        assert_eq!(
            index.authenticate(Some(&format!("Bearer {}", text.expose())), 1_059).map(|t| t.id.clone()),
            Ok(token.id.clone())
        );
        assert_eq!(index.authenticate(Some(&format!("Bearer {}", text.expose())), 1_060).err(), Some(Refused::Expired));
    }

    #[test]
    fn tokens_never_print_their_secret() {
        let (text, token) = issue("prod", 0, None, 0).expect("random");
        let secret = text.expose().split_once('.').expect("id.secret").1.to_owned();
        assert!(!format!("{text:?}").contains(&secret));
        assert!(!format!("{token:?}").contains(&secret));
        assert!(!format!("{token:?}").contains(&hex::encode(token.secret_hash)));
    }
}
