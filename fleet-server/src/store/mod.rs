//! Persistent state of the fleet server behind the [`Store`] trait.
//!
//! The server serves reads from memory ([`crate::fleet`]) and writes
//! behind, in batches: the [`crate::writer`] thread hands each batch of
//! [`Write`]s to [`Store::commit`], one transaction per batch. A device is
//! stored in parts (identity, desired, reported, live state, events) so
//! that writers of different parts never overwrite each other's data, on
//! one server or on replicas sharing a database.
//!
//! # Layout
//! - this module: the records, the [`Write`] operations and the trait;
//! - [`sled`]: the embedded default (one sled tree, atomic batches);
//! - [`postgres`]: PostgreSQL, shared by fleet-server replicas;
//! - [`export`]: the whole store as one document (backend moves).

pub mod export;
pub mod pg_tls;
pub mod postgres;
pub mod sled;

use std::collections::{BTreeMap, VecDeque};

use edgefleet_wire::device::{BundleRef, DeviceReport};
use edgefleet_wire::telemetry::{DeviceEvent, DeviceState, Telemetry};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::rollout::Rollout;

pub use edgefleet_wire::api::v1::AuditEntry;

/// A bundle in the registry: stored as the API shows it.
pub type BundleRecord = edgefleet_wire::api::v1::BundleView;

/// Lifecycle events kept per device.
pub const EVENTS_KEPT: usize = 20;

/// Who a device is. Written at enrollment and by operators (tags,
/// revocation); never by the device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub tags: BTreeMap<String, String>,
    pub arch: String,
    pub agent_version: String,
    /// sha256 of the device credential, hex. The credential itself is never stored.
    pub credential_sha256: String,
    pub enrolled_at: u64,
    /// The enrollment token's name, for the audit trail.
    #[serde(default)]
    pub enrolled_with: Option<String>,
    /// Set when an admin revoked the credential or decommissioned the
    /// device: it can no longer call the API or log in to the broker.
    #[serde(default)]
    pub revoked_at: Option<u64>,
    /// The credential's hash in an external broker's password format
    /// (mosquitto's salted PBKDF2-SHA512), when the server keeps that
    /// broker's password file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_password: Option<String>,
}

/// What the server wants a device to run (written by the rollout
/// controller and operators).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub bundle: Option<BundleRef>,
    pub rollout: Option<String>,
    /// The desired bundle is an explicit rollback (abort) to one the device ran.
    pub rollback: bool,
    /// The rollout the device joined and what it ran before (for abort).
    #[serde(default)]
    pub joined: Option<Joined>,
    /// Bundles desired earlier, downloadable until `until` (unix seconds):
    /// a device that was mid-download when its desired state moved on may
    /// still finish (or resume) for a grace period.
    #[serde(default)]
    pub recent: Vec<RecentBundle>,
}

/// A device's membership of a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    pub rollout: String,
    /// What it ran before joining (`None`: nothing).
    pub previous: Option<BundleRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentBundle {
    pub id: String,
    pub until: u64,
}

/// What the device last reported over HTTP: the source of truth for what
/// it runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reported {
    pub report: DeviceReport,
    pub at: u64,
}

/// What the device last said over MQTT: its retained state (birth/death)
/// and its last telemetry record.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Live {
    pub online: Option<bool>,
    pub state: Option<DeviceState>,
    pub telemetry: Option<Telemetry>,
    pub at: Option<u64>,
}

/// A device in the inventory, all parts (serialized as is by
/// [`export`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: String,
    pub identity: Identity,
    pub desired: Desired,
    pub reported: Option<Reported>,
    pub live: Live,
    pub events: VecDeque<DeviceEvent>,
}

impl DeviceRecord {
    /// A device as enrollment creates it: known to the server, nothing
    /// desired, reported or heard over MQTT yet.
    pub fn enrolled(id: String, identity: Identity) -> DeviceRecord {
        DeviceRecord {
            id,
            identity,
            desired: Desired::default(),
            reported: None,
            live: Live::default(),
            events: VecDeque::new(),
        }
    }

    /// The last time the device was heard from, by any channel.
    pub fn last_seen(&self) -> Option<u64> {
        let r = self.reported.as_ref().map(|r| r.at);
        match (r, self.live.at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b).or(Some(self.identity.enrolled_at)),
        }
    }

    pub fn report(&self) -> Option<&DeviceReport> {
        self.reported.as_ref().map(|r| &r.report)
    }

    pub fn is_revoked(&self) -> bool {
        self.identity.revoked_at.is_some()
    }

    /// Appends a lifecycle event once (replays after an outage may repeat
    /// one), keeping the last [`EVENTS_KEPT`]. Returns whether it was new.
    pub fn push_event(&mut self, e: DeviceEvent) -> bool {
        if self.events.contains(&e) {
            return false;
        }
        self.events.push_back(e);
        while self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
        true
    }
}

/// One part of a device record.
#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    Identity(Identity),
    Desired(Desired),
    Reported(Reported),
    Live(Live),
}

impl Part {
    /// Which part this is (batches keep the last write of each).
    pub fn kind(&self) -> u8 {
        match self {
            Part::Identity(_) => 0,
            Part::Desired(_) => 1,
            Part::Reported(_) => 2,
            Part::Live(_) => 3,
        }
    }
}

/// A per-batch enrollment token (`fleetctl token create`): an expiry, a
/// number of uses and the tags every device enrolled with it gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub name: String,
    pub token_sha256: String,
    pub tags: BTreeMap<String, String>,
    /// Tag keys a device may set itself at enrollment (besides `tags`).
    pub allowed_tags: Vec<String>,
    pub expires_at: u64,
    pub max_uses: u64,
    pub uses: u64,
    pub created_at: u64,
    pub created_by: String,
    pub revoked_at: Option<u64>,
}

/// One durable change. A batch of them is one transaction.
// Device parts dominate the write path (telemetry, check-ins) and live only
// until their batch commits; boxing them would add an allocation per write.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// Insert a bundle and claim its `name@version`, atomically.
    Bundle(BundleRecord),
    Rollout(Box<Rollout>),
    Audit(AuditEntry),
    /// Insert a new device with all its parts.
    NewDevice(Box<DeviceRecord>),
    Device(String, Part),
    DeviceEvent(String, DeviceEvent),
    /// Delete a device and everything about it.
    RemoveDevice(String),
    EnrollmentToken(EnrollmentToken),
    /// A new trust version (the server checked it follows the chain).
    Trust(edgefleet_wire::trust::SignedTrust),
    Experiment(Box<crate::experiment::Experiment>),
    /// Set (or with `None` clear) the maintenance window of a scope
    /// (`device:<id>`, `tag:<key>=<value>`).
    Window(String, Option<edgefleet_wire::window::Schedule>),
}

/// Everything the server holds in memory, read once at start.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub bundles: Vec<BundleRecord>,
    pub devices: Vec<DeviceRecord>,
    pub rollouts: Vec<Rollout>,
    pub enrollment_tokens: Vec<EnrollmentToken>,
    /// Trust versions 2.., as stored (walked from the configured keys at start).
    pub trust: Vec<edgefleet_wire::trust::SignedTrust>,
    pub experiments: Vec<crate::experiment::Experiment>,
    /// Device and tag maintenance windows.
    pub windows: Vec<edgefleet_wire::api::v1::WindowEntry>,
}

/// Storage the server needs. Implementations must make `commit` atomic
/// and durable before it returns. Calls block: the server makes them from
/// its writer thread or `spawn_blocking`.
pub trait Store: Send + Sync + 'static {
    /// Everything but the audit log.
    fn load(&self) -> Result<Snapshot>;
    /// One transaction: all of `batch` or nothing.
    fn commit(&self, batch: &[Write]) -> Result<()>;
    /// Audit entries oldest first, starting after `after` (an entry's
    /// position), at most `limit`; with their positions.
    fn audit(&self, after: Option<u64>, limit: usize) -> Result<Vec<(u64, AuditEntry)>>;
    /// A short name for logs and /metrics (`sled`, `postgres`).
    fn backend(&self) -> &'static str;
    /// Blocks until this server may serve the store: at most one server
    /// is active on a shared database, the others wait here as standbys.
    /// `keep_waiting` is called each time the lease is found taken, with
    /// what the active server wrote in the lease row: false gives up
    /// (`Ok(None)`). `me` goes into that row once this server is active.
    /// Returns the lease epoch; after it, commits of a server whose lease
    /// was taken over fail with [`crate::error::Error::Fenced`]. A store
    /// only one process can open (sled locks its folder) is always active:
    /// `Ok(Some(0))`.
    fn acquire_active(
        &self,
        _me: &LeaseHolder,
        _keep_waiting: &dyn Fn(&LeaseHolder) -> bool,
    ) -> Result<Option<u64>> {
        Ok(Some(0))
    }
    /// False once the lease is lost (its session broke, or a commit was
    /// fenced): the server must stop serving.
    fn still_active(&self) -> bool {
        true
    }

    // Shared ingest across replicas (PostgreSQL only; docs/brokers.md,
    // "Replicas"). A standby claims a slot, takes its share of the
    // broker's shared subscription with that slot's broker login, and
    // keeps each message in the inbox until the active server applied
    // it. The active server adopts the broker session of every slot in
    // use whose standby is gone.

    /// Claims the first free slot of `1..=slots` for this server (held
    /// until [`Store::leave_ingest_slot`] or the process ends) and marks
    /// it in use; `None` when every slot is taken. `Unsupported` on a
    /// store only one server opens.
    fn claim_ingest_slot(&self, _slots: u32, _holder: &str) -> Result<Option<u32>> {
        Err(crate::error::Error::Usage(
            "a shared ingest needs a store replicas share ([store] url = \"postgres://…\")".into(),
        ))
    }
    /// Whether this server still holds its slot's lock.
    fn holds_ingest_slot(&self) -> bool {
        false
    }
    /// Lets go of this server's slot, leaving it in use: its broker
    /// session is the active server's to adopt.
    fn leave_ingest_slot(&self) -> Result<()> {
        Ok(())
    }
    /// Stores messages a standby took, in one transaction.
    fn inbox_push(&self, _slot: u32, _messages: &[(String, Vec<u8>)]) -> Result<()> {
        Err(crate::error::Error::Usage("no inbox in this store".into()))
    }
    /// The oldest `limit` messages of the inbox.
    fn inbox_take(&self, _limit: usize) -> Result<Vec<InboxMessage>> {
        Ok(Vec::new())
    }
    /// Removes applied messages from the inbox.
    fn inbox_done(&self, _ids: &[i64]) -> Result<()> {
        Ok(())
    }
    /// Slots in use whose standby is gone, each now locked by this server
    /// for adoption until [`Store::ingest_slot_adopted`].
    fn orphaned_ingest_slots(&self) -> Result<Vec<u32>> {
        Ok(Vec::new())
    }
    /// Ends an adoption: the slot is free again when `drained`, and in
    /// use still (adopted later) when not.
    fn ingest_slot_adopted(&self, _slot: u32, _drained: bool) -> Result<()> {
        Ok(())
    }

    // The change feed (PostgreSQL only; docs/deploy.md, "Standbys answer
    // device calls"): every commit that changes what a device is served
    // (its desired state, its identity and credential, rollouts, windows,
    // trust) tells the listeners which, after it committed. A standby
    // keeps its copy of the fleet current with it.

    /// Listens to the change feed on a session of its own and calls `on`
    /// with what it reports: first [`FleetChange::Listening`] (load what
    /// you need now: every later commit is reported), then the changes,
    /// and [`FleetChange::Quiet`] at least once a second. Returns when
    /// `on` returns `Ok(false)`, or with the error that broke the feed
    /// (changes may have been missed: start again and load again).
    fn watch_fleet(&self, _on: &mut dyn FnMut(FleetChange) -> Result<bool>) -> Result<()> {
        Err(crate::error::Error::Usage(
            "no change feed in this store (only one server opens it)".into(),
        ))
    }
    /// The identity and desired state of the devices of `ids` as stored
    /// now (ids not stored are left out; reports, live state and events
    /// are left empty).
    fn devices(&self, _ids: &[String]) -> Result<Vec<DeviceRecord>> {
        Err(crate::error::Error::Usage(
            "no change feed in this store (only one server opens it)".into(),
        ))
    }
    /// What applies fleet-wide to desired states: the rollouts, the
    /// trust documents and the windows (the rest of the snapshot empty).
    fn load_fleetwide(&self) -> Result<Snapshot> {
        let s = self.load()?;
        Ok(Snapshot {
            rollouts: s.rollouts,
            trust: s.trust,
            windows: s.windows,
            ..Snapshot::default()
        })
    }
}

/// What the change feed reports ([`Store::watch_fleet`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetChange {
    /// The feed is listening: every commit from now on is reported.
    Listening,
    /// These devices changed (or were added or removed).
    Devices(Vec<String>),
    /// A rollout, window or trust document changed.
    Fleetwide,
    /// Nothing for a while.
    Quiet,
}

/// A device message a standby took from the broker.
#[derive(Clone, Debug)]
pub struct InboxMessage {
    pub id: i64,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A server's entry in a shared store's lease row: what the standbys
/// learn about the active server.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LeaseHolder {
    /// Host, pid and listen address, for logs.
    pub name: String,
    /// Where standbys forward requests (`[http] advertise_url`).
    pub url: Option<String>,
    /// Vouches for the client address and certificate of a request a
    /// standby forwards (fresh at each takeover).
    pub secret: Option<String>,
}

/// The secret never reaches a log.
impl std::fmt::Debug for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseHolder")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "…"))
            .finish()
    }
}

/// Opens the store `config` names: PostgreSQL with `[store] url`, else
/// sled in `data_dir/store`.
pub fn open(config: &crate::config::ServerConfig) -> Result<std::sync::Arc<dyn Store>> {
    if let Some(url) = &config.store.url {
        return Ok(std::sync::Arc::new(postgres::PgStore::open(url)?));
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| crate::error::Error::io(&config.data_dir, e))?;
    Ok(std::sync::Arc::new(sled::SledStore::open(
        &config.data_dir.join("store"),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_secret_never_shows_in_debug_output() {
        let l = LeaseHolder {
            name: "a".into(),
            url: Some("http://a:7070".into()),
            secret: Some("s3cret-vouch".into()),
        };
        let shown = format!("{l:?}");
        assert!(
            !shown.contains("s3cret-vouch") && shown.contains("http://a:7070"),
            "{shown}"
        );
    }
}
