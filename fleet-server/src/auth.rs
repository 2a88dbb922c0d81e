//! Who is calling and what they may do.
//!
//! Callers are operators (a bearer token with a role) or devices (the
//! credential from enrollment). Secrets are compared by their sha256, so
//! the server never needs the plaintext of device credentials.
//!
//! Least privilege is data: [`POLICY`] lists, for every [`Action`] on the
//! HTTP API and the MQTT broker, the principals allowed to do it. Handlers
//! ask [`require`]; the broker asks [`allowed`]. The table is tested as a
//! table (role × action → allowed).

use axum::http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};

use crate::config::{Role, TokenConfig};
use crate::fleet::{DeviceCell, Fleet, lock};
use crate::http_error::ApiError;

/// The kinds of principal the policy knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Principal {
    Viewer,
    Operator,
    Admin,
    /// An enrolled device, acting on itself only.
    Device,
    /// An external broker's token.
    Broker,
}

/// Everything a credential can be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Devices, bundles, rollouts, metrics, the OpenAPI document.
    ReadFleet,
    ReadAudit,
    /// Any bundle's bytes (operators inspecting a release).
    DownloadAnyBundle,
    PushBundle,
    ManageRollouts,
    TagDevices,
    ManageEnrollmentTokens,
    RevokeDevices,
    ManageTrust,
    /// A device's own desired state.
    CheckIn,
    /// A device's own report.
    Report,
    /// A bundle the device's desired state names (now or recently).
    DownloadAssignedBundle,
    /// Broker: publish state, telemetry and events under its own id.
    MqttPublishOwn,
    /// Broker: subscribe to its own `cmd` topic.
    MqttSubscribeOwnCmd,
    /// Broker: subscribe to every device's topics, read-only (dashboards).
    MqttReadFleet,
    /// Ask the server's auth and ACL decisions (external brokers).
    BrokerAuth,
}

use Action::*;
use Principal::*;

/// The policy: who may do what. Anything not listed is refused.
pub const POLICY: &[(Action, &[Principal])] = &[
    (ReadFleet, &[Viewer, Operator, Admin]),
    (ReadAudit, &[Operator, Admin]),
    (DownloadAnyBundle, &[Operator, Admin]),
    (PushBundle, &[Operator, Admin]),
    (ManageRollouts, &[Operator, Admin]),
    (TagDevices, &[Operator, Admin]),
    (ManageEnrollmentTokens, &[Admin]),
    (RevokeDevices, &[Admin]),
    (ManageTrust, &[Admin]),
    (CheckIn, &[Device]),
    (Report, &[Device]),
    (DownloadAssignedBundle, &[Device]),
    (MqttPublishOwn, &[Device]),
    (MqttSubscribeOwnCmd, &[Device]),
    (MqttReadFleet, &[Viewer, Operator, Admin]),
    (BrokerAuth, &[Broker]),
];

/// Whether `p` may do `a`.
pub fn allowed(p: Principal, a: Action) -> bool {
    POLICY
        .iter()
        .any(|(action, who)| *action == a && who.contains(&p))
}

impl From<Role> for Principal {
    fn from(r: Role) -> Self {
        match r {
            Role::Viewer => Viewer,
            Role::Operator => Operator,
            Role::Admin => Admin,
            Role::Broker => Broker,
        }
    }
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub enum Caller {
    Operator { name: String, role: Role },
    Device { id: String, cell: DeviceCell },
}

impl Caller {
    /// For the audit log.
    pub fn name(&self) -> String {
        match self {
            Caller::Operator { name, .. } => name.clone(),
            Caller::Device { id, .. } => format!("device:{id}"),
        }
    }

    pub fn principal(&self) -> Principal {
        match self {
            Caller::Operator { role, .. } => (*role).into(),
            Caller::Device { .. } => Device,
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
    /// The operator (name, role) a bearer token belongs to.
    pub fn find(&self, token: &str) -> Option<(String, Role)> {
        self.find_hash(&sha256_hex(token))
    }

    pub fn find_hash(&self, hash: &str) -> Option<(String, Role)> {
        self.by_hash
            .iter()
            .find(|(h, _, _)| h == hash)
            .map(|(_, n, r)| (n.clone(), *r))
    }

    pub fn from_config(tokens: &[TokenConfig]) -> Result<Tokens, String> {
        let mut by_hash = Vec::new();
        for t in tokens {
            let hash = match (&t.token, &t.token_sha256) {
                (Some(p), None) if !p.is_empty() => sha256_hex(p),
                (None, Some(h)) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    h.to_ascii_lowercase()
                }
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

/// The bearer token of a request.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= 512)
}

fn unauthorized() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a valid bearer token is required",
    )
}

/// Resolves a bearer token to an operator or a device.
pub fn identify(token: &str, tokens: &Tokens, fleet: &Fleet) -> Option<Caller> {
    let hash = sha256_hex(token);
    if let Some((name, role)) = tokens.find_hash(&hash) {
        return Some(Caller::Operator { name, role });
    }
    let cell = fleet.by_credential(&hash)?;
    let id = lock(&cell).rec.id.clone();
    Some(Caller::Device { id, cell })
}

/// Resolves the request's bearer token.
pub fn authenticate(
    headers: &HeaderMap,
    tokens: &Tokens,
    fleet: &Fleet,
) -> Result<Caller, ApiError> {
    let token = bearer(headers).ok_or_else(unauthorized)?;
    identify(token, tokens, fleet).ok_or_else(unauthorized)
}

/// Requires that the caller may do `action`.
pub fn require(caller: &Caller, action: Action) -> Result<(), ApiError> {
    if allowed(caller.principal(), action) {
        return Ok(());
    }
    let message = match caller {
        Caller::Device { .. } => "device credentials cannot use operator endpoints".to_string(),
        Caller::Operator { role, .. } => {
            let needed = POLICY
                .iter()
                .find(|(a, _)| *a == action)
                .and_then(|(_, who)| who.iter().find(|p| **p != Device))
                .map_or("a device credential".to_string(), |p| {
                    format!("the {} role", format!("{p:?}").to_lowercase())
                });
            if needed == "a device credential" {
                "this endpoint is for devices; use the device credential from enrollment".into()
            } else {
                format!(
                    "this needs {needed}; the token has the {} role",
                    format!("{role:?}").to_lowercase()
                )
            }
        }
    };
    Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", message))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole policy as a table: every principal against every action.
    #[test]
    fn the_policy_table() {
        let actions = [
            ReadFleet,
            ReadAudit,
            DownloadAnyBundle,
            PushBundle,
            ManageRollouts,
            TagDevices,
            ManageEnrollmentTokens,
            RevokeDevices,
            ManageTrust,
            CheckIn,
            Report,
            DownloadAssignedBundle,
            MqttPublishOwn,
            MqttSubscribeOwnCmd,
            MqttReadFleet,
            BrokerAuth,
        ];
        // Columns: Viewer, Operator, Admin, Device, Broker.
        let expected: [[bool; 5]; 16] = [
            [true, true, true, false, false],   // ReadFleet
            [false, true, true, false, false],  // ReadAudit
            [false, true, true, false, false],  // DownloadAnyBundle
            [false, true, true, false, false],  // PushBundle
            [false, true, true, false, false],  // ManageRollouts
            [false, true, true, false, false],  // TagDevices
            [false, false, true, false, false], // ManageEnrollmentTokens
            [false, false, true, false, false], // RevokeDevices
            [false, false, true, false, false], // ManageTrust
            [false, false, false, true, false], // CheckIn
            [false, false, false, true, false], // Report
            [false, false, false, true, false], // DownloadAssignedBundle
            [false, false, false, true, false], // MqttPublishOwn
            [false, false, false, true, false], // MqttSubscribeOwnCmd
            [true, true, true, false, false],   // MqttReadFleet
            [false, false, false, false, true], // BrokerAuth
        ];
        for (a, row) in actions.iter().zip(expected) {
            for (p, want) in [Viewer, Operator, Admin, Device, Broker].iter().zip(row) {
                assert_eq!(allowed(*p, *a), want, "{p:?} × {a:?}");
            }
        }
        // Every action in the table is in the policy exactly once.
        for a in actions {
            assert_eq!(POLICY.iter().filter(|(x, _)| *x == a).count(), 1, "{a:?}");
        }
        assert_eq!(POLICY.len(), actions.len());
    }

    #[test]
    fn only_one_of_token_or_its_hash_and_hashes_must_be_hex() {
        let t = |token: Option<&str>, h: Option<&str>| {
            Tokens::from_config(&[TokenConfig {
                name: "x".into(),
                role: Role::Viewer,
                token: token.map(str::to_string),
                token_sha256: h.map(str::to_string),
            }])
        };
        assert!(t(Some("s"), None).is_ok());
        assert!(t(None, Some(&"A".repeat(64))).is_ok());
        assert!(t(None, Some(&"z".repeat(64))).is_err());
        assert!(t(Some("s"), Some(&"a".repeat(64))).is_err());
        assert!(t(Some(""), None).is_err());
        let ok = t(Some("secret"), None).unwrap();
        assert_eq!(ok.find("secret"), Some(("x".into(), Role::Viewer)));
        assert_eq!(ok.find("other"), None);
    }
}
