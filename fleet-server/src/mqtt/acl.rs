//! Who may log in to the broker and what each login may publish and
//! subscribe to, decided by the server's own credentials and
//! [`crate::auth::POLICY`]:
//!
//! - a device logs in with its id as username and client id and its
//!   credential as password; it may publish only its own `state`,
//!   `telemetry` and `events` and subscribe only to its own `cmd`;
//! - an operator token (viewer and up) logs in read-only: it may subscribe
//!   to `edgefleet/v1/...` filters (dashboards) and publish nothing;
//! - client ids of devices and the server's own (`fleet-server*`) are
//!   reserved: no other login may use them, so nobody can take over a
//!   device's or the server's session.
//!
//! The embedded broker asks these functions on every CONNECT, PUBLISH and
//! SUBSCRIBE; the HTTP auth/ACL endpoints give external brokers (EMQX,
//! VerneMQ) the same answers.

use edgefleet_wire::telemetry::TOPIC_PREFIX;

use crate::auth::{Action, Principal, Tokens, allowed, sha256_hex};
use crate::fleet::{Fleet, lock};

/// The reserved client-id prefix of the server's own connections.
pub const SERVER_CLIENT_PREFIX: &str = "fleet-server";

/// A logged-in broker client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Login {
    /// An enrolled device, by id.
    Device(String),
    /// An operator token, read-only, by token name.
    Reader { name: String, principal: Principal },
}

impl Login {
    /// Who owns the session: a client id may be taken over only by the
    /// same owner.
    pub fn owner(&self) -> String {
        match self {
            Login::Device(id) => format!("device:{id}"),
            Login::Reader { name, .. } => format!("token:{name}"),
        }
    }
}

/// Why a login is refused (counted by reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoginRefusal {
    BadCredentials,
    /// The client id is not the device's id, or is reserved.
    ClientId,
    /// The credential may not use the broker at all.
    NotAllowed,
}

impl LoginRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            LoginRefusal::BadCredentials => "bad_credentials",
            LoginRefusal::ClientId => "client_id",
            LoginRefusal::NotAllowed => "not_allowed",
        }
    }
}

/// Decides a CONNECT.
pub fn login(
    fleet: &Fleet,
    tokens: &Tokens,
    client_id: &str,
    username: Option<&str>,
    password: Option<&[u8]>,
) -> Result<Login, LoginRefusal> {
    let password = password
        .and_then(|p| std::str::from_utf8(p).ok())
        .ok_or(LoginRefusal::BadCredentials)?;
    let hash = sha256_hex(password);
    if let Some((name, role)) = tokens.find_hash(&hash) {
        let principal: Principal = role.into();
        if !allowed(principal, Action::MqttReadFleet) {
            return Err(LoginRefusal::NotAllowed);
        }
        // Readers may not wear a device's or the server's client id.
        if client_id.starts_with(SERVER_CLIENT_PREFIX) || fleet.get(client_id).is_some() {
            return Err(LoginRefusal::ClientId);
        }
        return Ok(Login::Reader { name, principal });
    }
    let cell = fleet
        .by_credential(&hash)
        .ok_or(LoginRefusal::BadCredentials)?;
    let id = lock(&cell).rec.id.clone();
    if username.is_some_and(|u| u != id) {
        return Err(LoginRefusal::BadCredentials);
    }
    if client_id != id {
        return Err(LoginRefusal::ClientId);
    }
    if !allowed(Principal::Device, Action::MqttPublishOwn) {
        return Err(LoginRefusal::NotAllowed);
    }
    Ok(Login::Device(id))
}

/// Whether `login` may publish to `topic` (a topic name, no wildcards).
pub fn may_publish(login: &Login, topic: &str) -> bool {
    match login {
        Login::Device(id) => {
            let Some(rest) = topic
                .strip_prefix(TOPIC_PREFIX)
                .and_then(|r| r.strip_prefix('/'))
                .and_then(|r| r.strip_prefix(id.as_str()))
                .and_then(|r| r.strip_prefix('/'))
            else {
                return false;
            };
            allowed(Principal::Device, Action::MqttPublishOwn)
                && matches!(rest, "state" | "telemetry" | "events")
        }
        Login::Reader { .. } => false,
    }
}

/// Whether `login` may subscribe to `filter`.
pub fn may_subscribe(login: &Login, filter: &str) -> bool {
    match login {
        Login::Device(id) => {
            allowed(Principal::Device, Action::MqttSubscribeOwnCmd)
                && filter == format!("{TOPIC_PREFIX}/{id}/cmd")
        }
        Login::Reader { principal, .. } => {
            allowed(*principal, Action::MqttReadFleet)
                && (filter == TOPIC_PREFIX
                    || filter
                        .strip_prefix(TOPIC_PREFIX)
                        .is_some_and(|r| r.starts_with('/')))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Role, TokenConfig};
    use crate::store::{DeviceRecord, Identity};

    fn setup() -> (Fleet, Tokens) {
        let f = Fleet::default();
        for (id, cred) in [("pi-a", "cred-a"), ("pi-b", "cred-b")] {
            f.insert(DeviceRecord::enrolled(
                id.into(),
                Identity {
                    tags: Default::default(),
                    arch: "aarch64".into(),
                    agent_version: "0.1.0".into(),
                    credential_sha256: sha256_hex(cred),
                    enrolled_at: 1,
                    enrolled_with: None,
                    revoked_at: None,
                    broker_password: None,
                },
            ));
        }
        let tokens = Tokens::from_config(&[
            TokenConfig {
                name: "dash".into(),
                role: Role::Viewer,
                token: Some("viewer-token".into()),
                token_sha256: None,
            },
            TokenConfig {
                name: "mq".into(),
                role: Role::Broker,
                token: Some("broker-token".into()),
                token_sha256: None,
            },
        ])
        .unwrap();
        (f, tokens)
    }

    #[test]
    fn devices_log_in_as_themselves_only() {
        let (f, t) = setup();
        let l = |cid: &str, user: Option<&str>, pass: &str| {
            login(&f, &t, cid, user, Some(pass.as_bytes()))
        };
        assert_eq!(
            l("pi-a", Some("pi-a"), "cred-a"),
            Ok(Login::Device("pi-a".into()))
        );
        assert_eq!(
            l("pi-b", Some("pi-a"), "cred-a"),
            Err(LoginRefusal::ClientId)
        );
        assert_eq!(
            l("pi-b", Some("pi-b"), "cred-a"),
            Err(LoginRefusal::BadCredentials)
        );
        assert_eq!(
            l("pi-a", Some("pi-a"), "wrong"),
            Err(LoginRefusal::BadCredentials)
        );
        assert_eq!(
            login(&f, &t, "pi-a", Some("pi-a"), None),
            Err(LoginRefusal::BadCredentials)
        );
    }

    #[test]
    fn tokens_are_read_only_and_cannot_wear_reserved_client_ids() {
        let (f, t) = setup();
        let l = |cid: &str, pass: &str| login(&f, &t, cid, Some("x"), Some(pass.as_bytes()));
        let reader = l("grafana-1", "viewer-token").unwrap();
        assert!(matches!(reader, Login::Reader { .. }));
        assert_eq!(l("pi-a", "viewer-token"), Err(LoginRefusal::ClientId));
        assert_eq!(
            l("fleet-server", "viewer-token"),
            Err(LoginRefusal::ClientId)
        );
        assert_eq!(
            l("fleet-server-2", "viewer-token"),
            Err(LoginRefusal::ClientId)
        );
        assert_eq!(l("x", "broker-token"), Err(LoginRefusal::NotAllowed));
        assert!(may_subscribe(&reader, "edgefleet/v1/#"));
        assert!(may_subscribe(&reader, "edgefleet/v1/+/telemetry"));
        assert!(!may_subscribe(&reader, "#"));
        assert!(!may_subscribe(&reader, "$SYS/#"));
        for topic in [
            "edgefleet/v1/pi-a/state",
            "edgefleet/v1/pi-a/telemetry",
            "edgefleet/v1/pi-a/cmd",
        ] {
            assert!(!may_publish(&reader, topic), "{topic}");
        }
    }

    /// Table: what a device may touch.
    #[test]
    fn devices_publish_and_subscribe_only_under_their_own_id() {
        let me = Login::Device("pi-a".into());
        for (topic, ok) in [
            ("edgefleet/v1/pi-a/state", true),
            ("edgefleet/v1/pi-a/telemetry", true),
            ("edgefleet/v1/pi-a/events", true),
            ("edgefleet/v1/pi-a/cmd", false),
            ("edgefleet/v1/pi-a/other", false),
            ("edgefleet/v1/pi-b/telemetry", false),
            ("edgefleet/v1/pi-a", false),
            ("edgefleet/v1/pi-a/telemetry/x", false),
            ("edgefleet/v1/pi-ab/telemetry", false),
            ("other/pi-a/telemetry", false),
        ] {
            assert_eq!(may_publish(&me, topic), ok, "publish {topic}");
        }
        for (filter, ok) in [
            ("edgefleet/v1/pi-a/cmd", true),
            ("edgefleet/v1/pi-b/cmd", false),
            ("edgefleet/v1/#", false),
            ("edgefleet/v1/+/cmd", false),
            ("edgefleet/v1/pi-a/#", false),
            ("#", false),
        ] {
            assert_eq!(may_subscribe(&me, filter), ok, "subscribe {filter}");
        }
    }
}
