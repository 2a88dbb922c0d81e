//! The one error type of the wire crate.
//!
//! Every variant's message starts with a short, stable reason ("bad
//! signature", "expired", ...) so that a CLI can print one line and a script
//! can match on [`Error::code`].

/// Errors from decoding, verifying or encoding wire data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("bad magic: not an edgefleet bundle")]
    BadMagic,
    #[error(
        "bad version: bundle format version {found}, this build reads versions 1 to {supported}"
    )]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("truncated: {region} needs {needed} bytes, only {available} present")]
    Truncated {
        region: &'static str,
        needed: u64,
        available: u64,
    },
    #[error("too large: {what} is {size} bytes, the limit is {limit}")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("trailing data: bytes follow the payload's signed length")]
    TrailingData,
    #[error("bad signature: the signature by key {key_id} does not verify")]
    BadSignature { key_id: String },
    #[error("unknown key: signed only by keys outside the trust root ({key_ids})")]
    UnknownKey { key_ids: String },
    #[error(
        "threshold not met: {valid} valid signature(s) from trusted keys, {threshold} required"
    )]
    ThresholdNotMet { valid: usize, threshold: usize },
    #[error("expired: the manifest expired at {expires_at} (unix), now is {now}")]
    Expired { expires_at: u64, now: u64 },
    #[error("hash mismatch: {what} sha256 is {actual}, the signed manifest says {expected}")]
    HashMismatch {
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("length mismatch: {what} is {actual} bytes, the signed manifest says {expected}")]
    LengthMismatch {
        what: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("rotation refused: trust version {version}: {detail}")]
    RotationRefused { version: u64, detail: String },
    #[error(
        "trust expired: trust version {version} expired at {expires_at} (unix), now is {now}; publish a new version"
    )]
    TrustExpired {
        version: u64,
        expires_at: u64,
        now: u64,
    },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("i/o error on {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A stable machine-readable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadMagic => "bad_magic",
            Error::UnsupportedVersion { .. } => "unsupported_version",
            Error::Truncated { .. } => "truncated",
            Error::TooLarge { .. } => "too_large",
            Error::TrailingData => "trailing_data",
            Error::BadSignature { .. } => "bad_signature",
            Error::UnknownKey { .. } => "unknown_key",
            Error::ThresholdNotMet { .. } => "threshold_not_met",
            Error::Expired { .. } => "expired",
            Error::HashMismatch { .. } => "hash_mismatch",
            Error::LengthMismatch { .. } => "length_mismatch",
            Error::RotationRefused { .. } => "rotation_refused",
            Error::TrustExpired { .. } => "trust_expired",
            Error::Malformed { .. } => "malformed",
            Error::Invalid { .. } => "invalid",
            Error::Io { .. } => "io",
        }
    }

    pub(crate) fn malformed(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Error::Malformed {
            what,
            detail: detail.to_string(),
        }
    }

    pub(crate) fn invalid(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Error::Invalid {
            what,
            detail: detail.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
