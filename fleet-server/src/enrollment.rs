//! Enrollment tokens: the fleet-wide ones from the config file, and
//! per-batch ones an admin creates (`fleetctl token create`) with an
//! expiry, a number of uses and the tags every device enrolled with them
//! gets. A device may set only the tag keys its token allows.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::auth::sha256_hex;
use crate::store::EnrollmentToken;

/// Why an enrollment token is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the enrollment token is not valid")]
    Unknown,
    #[error("the enrollment token {0:?} has expired")]
    Expired(String),
    #[error("the enrollment token {0:?} has been used up")]
    UsedUp(String),
    #[error("the enrollment token {0:?} was revoked")]
    Revoked(String),
    #[error("tag {key:?} may not be set at enrollment with this token (allowed: {allowed})")]
    TagNotAllowed { key: String, allowed: String },
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::TagNotAllowed { .. } => "tag_not_allowed",
            _ => "bad_enrollment_token",
        }
    }
}

/// What an accepted token grants: the device's tags and, for a per-batch
/// token, its record with one more use (to be written with the device).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub token_name: String,
    pub tags: BTreeMap<String, String>,
    pub used: Option<EnrollmentToken>,
}

#[derive(Debug)]
pub struct Enrollment {
    /// Fleet-wide tokens by sha256.
    fleet_wide: Vec<String>,
    fleet_wide_tags: Vec<String>,
    /// Per-batch tokens by name.
    tokens: Mutex<BTreeMap<String, EnrollmentToken>>,
}

impl Enrollment {
    pub fn new(
        fleet_wide: &[String],
        fleet_wide_tags: &[String],
        stored: Vec<EnrollmentToken>,
    ) -> Self {
        Enrollment {
            fleet_wide: fleet_wide.iter().map(|t| sha256_hex(t)).collect(),
            fleet_wide_tags: fleet_wide_tags.to_vec(),
            tokens: Mutex::new(stored.into_iter().map(|t| (t.name.clone(), t)).collect()),
        }
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, EnrollmentToken>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks `token` and the tags a device asks for, and takes one use of
    /// a per-batch token. The use is given back with [`Enrollment::release`]
    /// if the enrollment does not go through.
    pub fn admit(
        &self,
        token: &str,
        asked: &BTreeMap<String, String>,
        now: u64,
    ) -> Result<Grant, Refusal> {
        let hash = sha256_hex(token);
        let check_tags = |allowed: &[String]| {
            for k in asked.keys() {
                if !allowed.iter().any(|a| a == k) {
                    return Err(Refusal::TagNotAllowed {
                        key: k.clone(),
                        allowed: if allowed.is_empty() {
                            "none".into()
                        } else {
                            allowed.join(", ")
                        },
                    });
                }
            }
            Ok(())
        };
        if self.fleet_wide.contains(&hash) {
            check_tags(&self.fleet_wide_tags)?;
            return Ok(Grant {
                token_name: "fleet-wide".into(),
                tags: asked.clone(),
                used: None,
            });
        }
        let mut tokens = self.tokens();
        let Some(t) = tokens.values_mut().find(|t| t.token_sha256 == hash) else {
            return Err(Refusal::Unknown);
        };
        if t.revoked_at.is_some() {
            return Err(Refusal::Revoked(t.name.clone()));
        }
        if now >= t.expires_at {
            return Err(Refusal::Expired(t.name.clone()));
        }
        if t.uses >= t.max_uses {
            return Err(Refusal::UsedUp(t.name.clone()));
        }
        check_tags(&t.allowed_tags)?;
        t.uses += 1;
        // The token's own tags win over what the device asks for.
        let mut tags = asked.clone();
        tags.extend(t.tags.clone());
        Ok(Grant {
            token_name: t.name.clone(),
            tags,
            used: Some(t.clone()),
        })
    }

    /// Gives back the use taken by a grant whose enrollment failed.
    pub fn release(&self, grant: &Grant) {
        if let Some(used) = &grant.used
            && let Some(t) = self.tokens().get_mut(&used.name)
        {
            t.uses = t.uses.saturating_sub(1);
        }
    }

    /// Adds a new per-batch token; `false` if the name is taken.
    pub fn add(&self, t: EnrollmentToken) -> bool {
        let mut tokens = self.tokens();
        if tokens.contains_key(&t.name) {
            return false;
        }
        tokens.insert(t.name.clone(), t);
        true
    }

    /// Marks a token revoked; returns its new record.
    pub fn revoke(&self, name: &str, now: u64) -> Option<EnrollmentToken> {
        let mut tokens = self.tokens();
        let t = tokens.get_mut(name)?;
        t.revoked_at.get_or_insert(now);
        Some(t.clone())
    }

    pub fn list(&self) -> Vec<EnrollmentToken> {
        self.tokens().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(name: &str, secret: &str, max_uses: u64, expires_at: u64) -> EnrollmentToken {
        EnrollmentToken {
            name: name.into(),
            token_sha256: sha256_hex(secret),
            tags: BTreeMap::from([("site".into(), "plant-7".into())]),
            allowed_tags: vec!["board".into()],
            expires_at,
            max_uses,
            uses: 0,
            created_at: 0,
            created_by: "admin".into(),
            revoked_at: None,
        }
    }

    fn tags(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn per_batch_tokens_expire_count_uses_fix_tags_and_can_be_revoked() {
        let e = Enrollment::new(&[], &[], vec![batch("line-1", "s3cret", 2, 100)]);
        let g = e.admit("s3cret", &tags(&[("board", "rpi4")]), 10).unwrap();
        assert_eq!(g.tags, tags(&[("board", "rpi4"), ("site", "plant-7")]));
        assert_eq!(g.used.as_ref().unwrap().uses, 1);
        // The token's tags win; other keys are refused.
        let g2 = e.admit("s3cret", &tags(&[("board", "rpi5")]), 10).unwrap();
        assert_eq!(g2.tags["site"], "plant-7");
        assert_eq!(
            e.admit("s3cret", &tags(&[]), 10),
            Err(Refusal::UsedUp("line-1".into()))
        );
        e.release(&g2);
        assert!(matches!(
            e.admit("s3cret", &tags(&[("site", "elsewhere")]), 10),
            Err(Refusal::TagNotAllowed { .. })
        ));
        assert_eq!(
            e.admit("s3cret", &tags(&[]), 100),
            Err(Refusal::Expired("line-1".into()))
        );
        e.revoke("line-1", 50).unwrap();
        assert_eq!(
            e.admit("s3cret", &tags(&[]), 60),
            Err(Refusal::Revoked("line-1".into()))
        );
        assert_eq!(e.admit("wrong", &tags(&[]), 10), Err(Refusal::Unknown));
    }

    #[test]
    fn fleet_wide_tokens_allow_only_the_configured_tag_keys() {
        let e = Enrollment::new(&["shared".into()], &["board".into()], Vec::new());
        assert!(e.admit("shared", &tags(&[("board", "rpi4")]), 0).is_ok());
        let err = e
            .admit(
                "shared",
                &tags(&[("board", "rpi4"), ("role", "gateway")]),
                0,
            )
            .unwrap_err();
        assert_eq!(err.code(), "tag_not_allowed");
        assert!(err.to_string().contains("\"role\""), "{err}");
    }
}
