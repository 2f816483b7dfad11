//! Secrets: generation, hashing and redaction.
//!
//! API keys, provider keys, login codes and refresh tokens are random, shown
//! to their owner once, and stored only as their SHA-256 [`KeyHash`]. A
//! [`Secret`] never prints itself.

use std::fmt;

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::Error;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// `n` random characters from `[a-zA-Z0-9]`, from the OS-seeded thread RNG.
pub fn random_token(n: usize) -> String {
    let mut token = String::with_capacity(n);
    push_random(&mut token, n);
    token
}

/// Appends `n` characters of [`random_token`] to `out` (an id is built in
/// one allocation).
pub(crate) fn push_random(out: &mut String, n: usize) {
    let mut rng = rand::rng();
    out.extend((0..n).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char));
}

/// A secret value: its `Debug` and `Display` are redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// A new API key: `cx-` followed by 40 random characters.
    pub fn generate_api_key() -> Self {
        Secret(format!("cx-{}", random_token(40)))
    }

    /// A new provider key: `cxp-` followed by 40 random characters.
    pub fn generate_provider_key() -> Self {
        Secret(format!("cxp-{}", random_token(40)))
    }

    /// A new random token of `n` characters (node secrets, refresh tokens).
    pub fn generate(n: usize) -> Self {
        Secret(random_token(n))
    }

    /// The secret itself. Call only to hand it to its owner or a peer.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Its hash, as stored.
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.0)
    }

    /// The first characters, safe to display (`cx-AbCd`).
    pub fn display_prefix(&self) -> String {
        self.0.chars().take(7).collect()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// SHA-256 of a secret. Stores look secrets up by it; equality is constant-time.
#[derive(Clone, Copy, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// The hash of a secret's text.
    pub fn of(secret: &str) -> Self {
        KeyHash(Sha256::digest(secret.as_bytes()).into())
    }

    /// Lower-case hex, as stored.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses lower- or upper-case hex.
    pub fn from_hex(s: &str) -> Result<Self, Error> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|e| Error::InvalidInput(format!("bad key hash: {e}")))?;
        Ok(KeyHash(out))
    }
}

impl PartialEq for KeyHash {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::hash::Hash for KeyHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialOrd for KeyHash {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for KeyHash {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl fmt::Debug for KeyHash {
    /// Only a short prefix: enough to tell hashes apart in logs, useless to an attacker.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}..)", &self.to_hex()[..8])
    }
}

impl Serialize for KeyHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KeyHash::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// Constant-time equality of two byte strings (for secrets compared in the clear).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}
