//! Who is calling: an operator with a role, or an enrolled device. Secrets
//! are compared by their sha256, so the server never needs the plaintext of
//! device credentials (it stores only their hashes).

use axum::http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};

use crate::api::ApiError;
use crate::config::{Role, TokenConfig};
use crate::store::{DeviceRecord, Store};

/// An authenticated caller.
#[derive(Clone, Debug)]
pub enum Caller {
    Operator { name: String, role: Role },
    Device(Box<DeviceRecord>),
}

impl Caller {
    pub fn name(&self) -> String {
        match self {
            Caller::Operator { name, .. } => name.clone(),
            Caller::Device(d) => format!("device:{}", d.id),
        }
    }
}

pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Operator tokens, by sha256.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_hash: Vec<(String, String, Role)>,
}

impl Tokens {
    /// The operator a bearer token belongs to.
    pub fn find(&self, token: &str) -> Option<(String, Role)> {
        let hash = sha256_hex(token);
        self.by_hash
            .iter()
            .find(|(h, _, _)| *h == hash)
            .map(|(_, n, r)| (n.clone(), *r))
    }

    pub fn from_config(tokens: &[TokenConfig]) -> Result<Tokens, String> {
        let mut by_hash = Vec::new();
        for t in tokens {
            let hash = match (&t.token, &t.token_sha256) {
                (Some(p), None) if !p.is_empty() => sha256_hex(p),
                (None, Some(h)) if h.len() == 64 => h.to_ascii_lowercase(),
                _ => {
                    return Err(format!(
                        "token {:?}: give exactly one of token or token_sha256 (64 hex)",
                        t.name
                    ));
                }
            };
            by_hash.push((hash, t.name.clone(), t.role));
        }
        Ok(Tokens { by_hash })
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn unauthorized() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a valid bearer token is required",
    )
}

/// Resolves the bearer token to an operator or a device.
pub fn authenticate(
    headers: &HeaderMap,
    tokens: &Tokens,
    store: &dyn Store,
) -> Result<Caller, ApiError> {
    let token = bearer(headers).ok_or_else(unauthorized)?;
    let hash = sha256_hex(token);
    if let Some((_, name, role)) = tokens.by_hash.iter().find(|(h, _, _)| *h == hash) {
        return Ok(Caller::Operator {
            name: name.clone(),
            role: *role,
        });
    }
    match store.device_by_credential(&hash).map_err(ApiError::from)? {
        Some(d) => Ok(Caller::Device(Box::new(d))),
        None => Err(unauthorized()),
    }
}

/// Requires an operator with at least `role`.
pub fn require_role(caller: &Caller, role: Role) -> Result<(), ApiError> {
    match caller {
        Caller::Operator { role: have, .. } if *have >= role => Ok(()),
        Caller::Operator { role: have, .. } => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this needs the {role:?} role; the token has {have:?}").to_lowercase(),
        )),
        Caller::Device(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "device credentials cannot use operator endpoints",
        )),
    }
}

/// Requires a device credential.
pub fn require_device(caller: Caller) -> Result<DeviceRecord, ApiError> {
    match caller {
        Caller::Device(d) => Ok(*d),
        Caller::Operator { .. } => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this endpoint is for devices; use the device credential from enrollment",
        )),
    }
}
