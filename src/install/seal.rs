//! Token secrets sealed for the shared store, so that every replica can serve install files
//! while the database never holds a secret in clear.
//!
//! The key is 32 random bytes, hex-encoded in a file every replica reads
//! (`--secret-key-file`). Each secret is sealed with AES-256-GCM under a random nonce, with
//! the token's public id as associated data: a sealed secret copied onto another token's row
//! does not open.

use std::fmt;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};

use crate::install::token::{IssuedToken, TokenText};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the secret key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(
        "the secret key file {path} must hold 64 hex digits (32 random bytes), e.g. from `gitfleet secret-key`; {found}"
    )]
    Malformed { path: String, found: String },
}

/// The key all replicas share.
pub struct SecretKey(RandomizedNonceKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: shown.clone(), source })?;
        Self::from_hex(text.trim()).map_err(|found| KeyError::Malformed { path: shown, found })
    }

    /// A key from its 64 hex digits; what is wrong otherwise (never echoing the text).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let bytes =
            hex::decode(text).map_err(|_| format!("it holds {} characters that are not all hex digits", text.len()))?;
        if bytes.len() != 32 {
            return Err(format!("it holds {} bytes", bytes.len()));
        }
        RandomizedNonceKey::new(&AES_256_GCM, &bytes).map(Self).map_err(|_| "the key is not usable".to_owned())
    }

    /// A new key's 64 hex digits.
    pub fn generate() -> Result<String, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(hex::encode(bytes))
    }

    /// `text` sealed for the token `id`: nonce, then ciphertext and tag.
    pub fn seal(&self, id: &str, text: &TokenText) -> Vec<u8> {
        let mut sealed = text.expose().as_bytes().to_vec();
        let nonce = self
            .0
            .seal_in_place_append_tag(Aad::from(id.as_bytes()), &mut sealed)
            .expect("sealing a short text with a random nonce does not fail");
        let mut out = nonce.as_ref().to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// The text sealed for `token`, if `sealed` opens under this key and is that token's.
    pub fn open(&self, token: &IssuedToken, sealed: &[u8]) -> Option<TokenText> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = ciphertext.to_vec();
        let plain = self.0.open_in_place(nonce, Aad::from(token.id.as_bytes()), &mut buffer).ok()?;
        TokenText::of(token, std::str::from_utf8(plain).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::install::token;

    #[test]
    fn a_sealed_secret_opens_only_under_its_key_and_for_its_token() {
        let key = SecretKey::from_hex(&SecretKey::generate().expect("random")).expect("a key");
        let (text, issued) = token::issue("edge", 1_700_000_000, 0).expect("a token");
        let sealed = key.seal(&issued.id, &text);
        assert!(!sealed.windows(8).any(|w| text.expose().as_bytes().windows(8).any(|t| t == w)), "no clear text");
        assert_eq!(key.open(&issued, &sealed).map(|t| t.expose().to_owned()), Some(text.expose().to_owned()));

        let other = SecretKey::from_hex(&SecretKey::generate().expect("random")).expect("a key");
        assert!(other.open(&issued, &sealed).is_none(), "another key");
        let (_, second) = token::issue("edge", 1_700_000_001, 1).expect("a token");
        assert!(key.open(&second, &sealed).is_none(), "another token's row");
        let mut flipped = sealed.clone();
        *flipped.last_mut().expect("bytes") ^= 1;
        assert!(key.open(&issued, &flipped).is_none(), "tampered");
        assert!(key.open(&issued, &sealed[..5]).is_none(), "truncated");
    }

    #[test]
    fn a_malformed_key_says_what_is_wrong_without_echoing_it() {
        let short = SecretKey::from_hex("abcd").expect_err("2 bytes");
        assert_eq!(short, "it holds 2 bytes");
        let secret = "zz".repeat(32);
        let error = SecretKey::from_hex(&secret).expect_err("not hex");
        assert!(!error.contains(&secret), "{error}");
    }
}
