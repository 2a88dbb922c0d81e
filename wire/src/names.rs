//! Validated names. A name that reaches a file path, a topic or a URL is
//! checked once, at construction, and cannot be built otherwise.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest model name accepted.
pub const MAX_MODEL_NAME: usize = 64;

/// A model name: 1..=64 of `[a-z0-9._-]`, starting with a letter or digit.
/// Safe to use as a path component, an MQTT topic level and a URL segment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelName(String);

impl ModelName {
    pub fn new(s: impl Into<String>) -> Result<Self> {
        let s = s.into();
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
        let starts_ok = s
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if s.len() > MAX_MODEL_NAME || !starts_ok || !s.chars().all(ok_char) || s.contains("..") {
            return Err(Error::invalid(
                "model name",
                format!(
                    "{s:?}: use 1..={MAX_MODEL_NAME} characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
                ),
            ));
        }
        Ok(ModelName(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModelName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        ModelName::new(s)
    }
}

impl From<ModelName> for String {
    fn from(n: ModelName) -> String {
        n.0
    }
}

impl std::fmt::Display for ModelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ModelName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ModelName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["cls", "ppocr-cls", "rec_v4.1", "0day"] {
            assert!(ModelName::new(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_path_traversal_and_odd_characters() {
        for n in [
            "",
            "..",
            "a/../b",
            "a/b",
            "-x",
            ".hidden",
            "UPPER",
            "sp ace",
            "a..b",
            &"x".repeat(65),
        ] {
            assert!(ModelName::new(n).is_err(), "{n:?} should be rejected");
        }
    }

    #[test]
    fn deserialization_validates() {
        let bytes = postcard::to_allocvec(&"../etc".to_string()).unwrap();
        assert!(postcard::from_bytes::<ModelName>(&bytes).is_err());
    }
}
