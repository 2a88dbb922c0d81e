//! Ed25519 signing keys, their text file forms and key ids.
//!
//! Files are one line of text so they can be pasted into a config file:
//! `edgefleet-ed25519-public <64 hex>` and `edgefleet-ed25519-secret <64 hex>`.

pub use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const PUBLIC_PREFIX: &str = "edgefleet-ed25519-public";
const SECRET_PREFIX: &str = "edgefleet-ed25519-secret";

/// Identifies a public key: sha256 of its 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 32]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        KeyId(Sha256::digest(key.as_bytes()).into())
    }

    /// The first 8 bytes as hex: what humans see in messages.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({})", self.short())
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.short())
    }
}

/// Builds a signing key from 32 bytes of seed (the caller supplies the
/// randomness, so this crate stays free of OS calls).
pub fn signing_key_from_seed(seed: [u8; 32]) -> SigningKey {
    SigningKey::from_bytes(&seed)
}

pub fn encode_public_key(key: &VerifyingKey) -> String {
    format!("{PUBLIC_PREFIX} {}\n", hex::encode(key.as_bytes()))
}

pub fn encode_secret_key(key: &SigningKey) -> String {
    format!("{SECRET_PREFIX} {}\n", hex::encode(key.to_bytes()))
}

fn decode_line(text: &str, prefix: &str, what: &'static str) -> Result<[u8; 32]> {
    let hexpart = text
        .trim()
        .strip_prefix(prefix)
        .map(str::trim)
        .ok_or_else(|| {
            Error::malformed(what, format!("expected a line starting with {prefix:?}"))
        })?;
    let bytes = hex::decode(hexpart).map_err(|e| Error::malformed(what, e))?;
    bytes
        .try_into()
        .map_err(|_| Error::malformed(what, "expected 32 bytes"))
}

pub fn decode_public_key(text: &str) -> Result<VerifyingKey> {
    let b = decode_line(text, PUBLIC_PREFIX, "public key")?;
    VerifyingKey::from_bytes(&b).map_err(|e| Error::malformed("public key", e))
}

pub fn decode_secret_key(text: &str) -> Result<SigningKey> {
    Ok(SigningKey::from_bytes(&decode_line(
        text,
        SECRET_PREFIX,
        "secret key",
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip() {
        let sk = signing_key_from_seed([7; 32]);
        let back = decode_secret_key(&encode_secret_key(&sk)).unwrap();
        assert_eq!(back.to_bytes(), sk.to_bytes());
        let pk = decode_public_key(&encode_public_key(&sk.verifying_key())).unwrap();
        assert_eq!(pk, sk.verifying_key());
    }

    #[test]
    fn a_secret_key_is_not_accepted_as_a_public_key() {
        let sk = signing_key_from_seed([1; 32]);
        assert!(decode_public_key(&encode_secret_key(&sk)).is_err());
    }
}
