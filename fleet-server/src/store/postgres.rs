//! The PostgreSQL store, for fleets that outgrow one machine
//! (`[store] url = "postgres://…"`): several fleet-server replicas may
//! share one database.
//!
//! Records are the same JSON as the sled store's, in `jsonb` columns (see
//! `fleet-server/migrations/`). A batch of [`Write`]s is one transaction:
//! device part writes are sent as one `UPDATE … FROM unnest(…)` per part,
//! and the batch's events as one locked read and one update of the
//! devices' event rings (`SELECT … FOR UPDATE`), so a batch of 4096
//! telemetry messages or reports costs a handful of round trips. A
//! bundle's `name@version` claim is a unique constraint, so writers at
//! once cannot break either.
//!
//! The client is the synchronous `postgres` crate: [`Store`] calls come
//! from the writer thread and `spawn_blocking`, never from async code.
//! A broken connection is reopened on the next call (the writer retries
//! failed batches), so a database restart costs a retry, not the server.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use edgefleet_wire::telemetry::DeviceEvent;
use fallible_iterator::FallibleIterator as _;
use postgres::types::Json;
use postgres::{Client, GenericClient, Row};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::pg_tls::PgTls;
use super::{
    AuditEntry, Desired, DeviceRecord, EVENTS_KEPT, FleetChange, Identity, LeaseHolder, Live, Part,
    Reported, Snapshot, Store, Write,
};
use crate::error::{Error, Result};

/// The schema, in order. A migration is never edited once released: a
/// change is a new file.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "active_lease",
        include_str!("../../migrations/0002_active_lease.sql"),
    ),
    (
        3,
        "lease_url",
        include_str!("../../migrations/0003_lease_url.sql"),
    ),
    (
        4,
        "shared_ingest",
        include_str!("../../migrations/0004_shared_ingest.sql"),
    ),
];

/// The advisory lock replicas take while migrating (any constant unique
/// to edgefleet: "edgeflt" in ASCII).
const MIGRATION_LOCK: i64 = 0x0065_6467_6566_6c74;

/// The advisory lock the active server holds for its whole life.
const ACTIVE_LOCK: i64 = 0x0065_6467_6566_6c75;

/// The first key of the advisory locks on shared-ingest slots (the
/// second is the slot). Two-key locks never conflict with the one-key
/// locks above.
const SLOT_LOCKS: i32 = 0x6566_736c;

/// How often a standby tries to take the lease.
const STANDBY_POLL: Duration = Duration::from_millis(500);

/// How long connecting may take when the URL does not say.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The change feed's channel ([`Store::watch_fleet`]).
const FEED: &str = "edgefleet_fleet";
/// A notification's payload stays under PostgreSQL's 8000-byte limit.
const FEED_PAYLOAD: usize = 7000;

/// What a batch changed that standbys serve: the feed's notifications,
/// sent in the batch's transaction (so delivered once it commits, in
/// commit order). `f` says something fleet-wide changed; `d id id …`
/// lists devices (ids never hold spaces).
#[derive(Default)]
struct Feed {
    fleetwide: bool,
    devices: std::collections::BTreeSet<String>,
}

impl Feed {
    fn note(&mut self, w: &Write) {
        match w {
            Write::Device(id, Part::Identity(_) | Part::Desired(_)) | Write::RemoveDevice(id) => {
                self.devices.insert(id.clone());
            }
            Write::NewDevice(d) => {
                self.devices.insert(d.id.clone());
            }
            Write::Rollout(_) | Write::Window(..) | Write::Trust(_) => self.fleetwide = true,
            _ => {}
        }
    }

    fn payloads(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.fleetwide {
            out.push("f".to_string());
        }
        let mut p = String::new();
        for id in &self.devices {
            if !p.is_empty() && p.len() + 1 + id.len() > FEED_PAYLOAD {
                out.push(std::mem::take(&mut p));
            }
            if p.is_empty() {
                p.push('d');
            }
            p.push(' ');
            p.push_str(id);
        }
        if !p.is_empty() {
            out.push(p);
        }
        out
    }

    /// Folds one notification's payload in.
    fn read(&mut self, payload: &str) {
        let mut words = payload.split(' ');
        match words.next() {
            Some("f") => self.fleetwide = true,
            Some("d") => self
                .devices
                .extend(words.filter(|w| !w.is_empty()).map(String::from)),
            _ => tracing::warn!(payload, "change feed: a notification of an unknown kind"),
        }
    }
}

/// The PostgreSQL-backed store.
pub struct PgStore {
    config: postgres::Config,
    /// TLS to the database, as the URL's `sslmode` says.
    tls: PgTls,
    /// Shown in logs: the URL without its password.
    display: String,
    /// The writer thread's connection.
    write: Mutex<Option<Client>>,
    /// Reads (start-up load, audit pages) do not wait behind a batch.
    read: Mutex<Option<Client>>,
    /// The session holding the active lease's advisory lock; never
    /// reconnected (a new session would not hold the lock).
    lease: Mutex<Option<Client>>,
    /// A standby's session holding its shared-ingest slot's lock, and
    /// that slot.
    slot: Mutex<Option<(Client, i32)>>,
    /// The active server's session holding the locks of the slots it is
    /// adopting.
    adopting: Mutex<Option<Client>>,
    /// Inbox writes (standby) and reads (active server).
    inbox: Mutex<Option<Client>>,
    /// The lease epoch this server holds (0: none yet). Every batch
    /// checks it against the table.
    epoch: std::sync::atomic::AtomicI64,
    /// Set once a batch found a newer epoch or the lease session broke.
    fenced: std::sync::atomic::AtomicBool,
}

/// The synchronous client runs each connection on a runtime of its own and
/// closes it (`block_on`) when dropped, which panics on a thread that
/// drives a tokio runtime, as when the server drops its store at shutdown.
/// Close the sessions on a plain thread instead (this also ends the lease
/// session, releasing the advisory lock at once).
impl Drop for PgStore {
    fn drop(&mut self) {
        let mut clients: Vec<Client> = [
            &self.write,
            &self.read,
            &self.lease,
            &self.adopting,
            &self.inbox,
        ]
        .into_iter()
        .filter_map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).take())
        .collect();
        clients.extend(
            self.slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .map(|(c, _)| c),
        );
        if clients.is_empty() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::spawn(move || drop(clients)).join();
        } else {
            drop(clients);
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.display)
            .finish_non_exhaustive()
    }
}

fn pg_err(e: postgres::Error) -> Error {
    if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
        return Error::Conflict(format!("a unique claim is already taken: {e}"));
    }
    // The server's own message (e.g. "relation … does not exist") is in
    // the source; Display alone says only "db error".
    match e.as_db_error() {
        Some(db) => Error::Store(format!("postgres: {}: {}", db.code().code(), db.message())),
        None => Error::Store(format!("postgres: {e}")),
    }
}

/// A failed connection with its causes: the client's Display alone says
/// only "db error" or "error performing TLS handshake".
fn connect_err(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn get<T: DeserializeOwned>(row: &Row, col: &str, what: &dyn std::fmt::Display) -> Result<T> {
    let v: Json<Value> = row.try_get(col).map_err(pg_err)?;
    serde_json::from_value(v.0).map_err(|e| Error::Store(format!("corrupt record {what}: {e}")))
}

/// `url` without the password, for logs and `--check-config`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "postgres (key=value settings)".into();
    };
    match rest.split_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(u, _)| u);
            format!("{scheme}://{user}@{host}")
        }
        None => url.into(),
    }
}

/// The client settings of `url`, with our defaults for what it leaves out
/// (connect timeout, application name).
fn client_config(url: &str) -> Result<(postgres::Config, PgTls)> {
    let (rest, tls) = super::pg_tls::split_url(url)?;
    let mut config: postgres::Config = rest
        .parse()
        .map_err(|e| Error::Usage(format!("[store] url {}: {e}", redact(url))))?;
    if let Some(mode) = tls.mode {
        config.ssl_mode(mode);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("fleet-server");
    }
    Ok((config, PgTls::new(&tls)?))
}

/// `--check-config`: connects to `url` without changing anything and
/// says what it found.
pub fn probe(url: &str) -> Result<String> {
    let (config, tls) = client_config(url)?;
    let mut c = config
        .connect(tls)
        .map_err(|e| Error::Usage(format!("[store] url {}: {}", redact(url), connect_err(&e))))?;
    let has_table: bool = c
        .query_one(
            "SELECT to_regclass('edgefleet_migrations') IS NOT NULL",
            &[],
        )
        .map_err(pg_err)?
        .get(0);
    let version: i32 = if has_table {
        c.query_one(
            "SELECT coalesce(max(version), 0) FROM edgefleet_migrations",
            &[],
        )
        .map_err(pg_err)?
        .get(0)
    } else {
        0
    };
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    Ok(match version {
        0 => format!(
            "[store]: {} reachable, schema not created yet (start or `fleet-server migrate` creates it)",
            redact(url)
        ),
        v if v < known => format!(
            "[store]: {} reachable, schema version {v} (start or `fleet-server migrate` upgrades it to {known})",
            redact(url)
        ),
        v if v > known => {
            return Err(Error::Usage(format!(
                "[store]: {} has schema version {v}, newer than this fleet-server ({known})",
                redact(url)
            )));
        }
        v => format!("[store]: {} reachable, schema version {v}", redact(url)),
    })
}

impl PgStore {
    /// Connects, applies the schema migrations this binary knows (under
    /// an advisory lock, so replicas starting together migrate once) and
    /// returns the store.
    pub fn open(url: &str) -> Result<PgStore> {
        let (config, tls) = client_config(url)?;
        let s = PgStore {
            config,
            tls,
            display: redact(url),
            write: Mutex::new(None),
            read: Mutex::new(None),
            lease: Mutex::new(None),
            slot: Mutex::new(None),
            adopting: Mutex::new(None),
            inbox: Mutex::new(None),
            epoch: std::sync::atomic::AtomicI64::new(0),
            fenced: std::sync::atomic::AtomicBool::new(false),
        };
        let applied = s.with(&s.write, migrate)?;
        for (v, name) in applied {
            tracing::info!(version = v, name, url = %s.display, "applied a schema migration");
        }
        Ok(s)
    }

    /// The URL without its password.
    pub fn url(&self) -> &str {
        &self.display
    }

    /// The schema version of the database (the highest applied migration).
    pub fn schema_version(&self) -> Result<i32> {
        self.with(&self.read, |c| {
            let row = c
                .query_one(
                    "SELECT coalesce(max(version), 0) AS v FROM edgefleet_migrations",
                    &[],
                )
                .map_err(pg_err)?;
            row.try_get("v").map_err(pg_err)
        })
    }

    /// A new session.
    fn connect(&self) -> Result<Client> {
        self.config.connect(self.tls.clone()).map_err(|e| {
            Error::Store(format!(
                "postgres: connecting to {}: {}",
                self.display,
                connect_err(&e)
            ))
        })
    }

    /// Runs `f` on the connection in `slot`, connecting first if there is
    /// none or it broke. A failure that closed the connection drops it.
    fn with<T>(
        &self,
        slot: &Mutex<Option<Client>>,
        f: impl FnOnce(&mut Client) -> Result<T>,
    ) -> Result<T> {
        let mut guard = slot
            .lock()
            .map_err(|_| Error::Store("postgres connection lock poisoned".into()))?;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(self.connect()?);
        }
        let Some(client) = guard.as_mut() else {
            return Err(Error::Store("postgres: no connection".into()));
        };
        let out = f(client);
        if client.is_closed() {
            *guard = None;
        }
        out
    }

    /// Blocks until this server holds the active lease (or `keep_waiting`,
    /// asked after each refused try with the active server's lease row,
    /// says to stop: `Ok(None)`); returns its epoch. `me` goes into the
    /// row, for the standbys.
    fn acquire(
        &self,
        me: &LeaseHolder,
        keep_waiting: &dyn Fn(&LeaseHolder) -> bool,
    ) -> Result<Option<u64>> {
        use std::sync::atomic::Ordering::SeqCst;
        let mut said = false;
        loop {
            let mut guard = self
                .lease
                .lock()
                .map_err(|_| Error::Store("postgres lease lock poisoned".into()))?;
            if guard.as_ref().is_none_or(Client::is_closed) {
                *guard = Some(self.connect()?);
            }
            let Some(c) = guard.as_mut() else {
                continue;
            };
            let got: bool = c
                .query_one("SELECT pg_try_advisory_lock($1)", &[&ACTIVE_LOCK])
                .map_err(pg_err)?
                .get(0);
            if got {
                let epoch: i64 = c
                    .query_one(
                        "INSERT INTO edgefleet_lease (id, epoch, holder, url, secret) \
                         VALUES (true, 1, $1, $2, $3) \
                         ON CONFLICT (id) DO UPDATE SET epoch = edgefleet_lease.epoch + 1, \
                         holder = EXCLUDED.holder, url = EXCLUDED.url, \
                         secret = EXCLUDED.secret, acquired_at = now() \
                         RETURNING epoch",
                        &[&me.name, &me.url, &me.secret],
                    )
                    .map_err(pg_err)?
                    .get(0);
                self.epoch.store(epoch, SeqCst);
                return Ok(Some(epoch as u64));
            }
            let active = c
                .query_opt("SELECT holder, url, secret FROM edgefleet_lease", &[])
                .map_err(pg_err)?
                .map(|r| LeaseHolder {
                    name: r.get(0),
                    url: r.get(1),
                    secret: r.get(2),
                })
                .unwrap_or_default();
            if !said {
                tracing::info!(
                    holder = active.name.as_str(),
                    "standby: another fleet-server is active on this database; waiting for its lease"
                );
                said = true;
            }
            drop(guard);
            if !keep_waiting(&active) {
                return Ok(None);
            }
            std::thread::sleep(STANDBY_POLL);
        }
    }

    /// Whether this server still holds the lease: its lease session is
    /// alive and no batch found a newer epoch.
    fn holds(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        if self.fenced.load(SeqCst) {
            return false;
        }
        let Ok(mut guard) = self.lease.lock() else {
            return false;
        };
        let alive = guard
            .as_mut()
            .is_some_and(|c| c.simple_query("SELECT 1").is_ok());
        if !alive {
            self.fenced.store(true, SeqCst);
        }
        alive
    }

    /// `f` on one consistent view of every table (a read-only repeatable
    /// read transaction), even while a server writes.
    fn consistent<T>(
        &self,
        f: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        self.with(&self.read, |c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(pg_err)?;
            f(&mut tx)
        })
    }

    fn all<T: DeserializeOwned>(c: &mut impl GenericClient, table: &str) -> Result<Vec<T>> {
        let key = match table {
            "trust" => "version",
            "enrollment_tokens" => "name",
            "windows" => "scope",
            _ => "id",
        };
        c.query(&format!("SELECT record FROM {table} ORDER BY {key}"), &[])
            .map_err(pg_err)?
            .iter()
            .map(|r| get(r, "record", &table))
            .collect()
    }
}

/// Applies the migrations missing from the database; returns them.
/// Refuses a database migrated by a newer fleet-server.
pub fn migrate(c: &mut Client) -> Result<Vec<(i32, &'static str)>> {
    let mut tx = c.transaction().map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(pg_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS edgefleet_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .map_err(pg_err)?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM edgefleet_migrations", &[])
        .map_err(pg_err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(newer) = done.iter().copied().filter(|v| *v > known).max() {
        return Err(Error::Store(format!(
            "the database schema is at version {newer}, newer than this fleet-server \
             (it knows versions up to {known}): upgrade fleet-server"
        )));
    }
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql).map_err(|e| {
            Error::Store(format!(
                "migration {version} ({name}): {}",
                pg_err(e).to_string().trim_start_matches("store: ")
            ))
        })?;
        tx.execute(
            "INSERT INTO edgefleet_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .map_err(pg_err)?;
        applied.push((*version, *name));
    }
    tx.commit().map_err(pg_err)?;
    Ok(applied)
}

/// The column of a device part.
fn part_column(p: &Part) -> &'static str {
    match p {
        Part::Identity(_) => "identity",
        Part::Desired(_) => "desired",
        Part::Reported(_) => "reported",
        Part::Live(_) => "live",
    }
}

/// A part as JSON text (PostgreSQL parses it into jsonb; no
/// intermediate `Value`).
fn part_text(p: &Part) -> Result<String> {
    let r = match p {
        Part::Identity(v) => serde_json::to_string(v),
        Part::Desired(v) => serde_json::to_string(v),
        Part::Reported(v) => serde_json::to_string(v),
        Part::Live(v) => serde_json::to_string(v),
    };
    r.map_err(|e| Error::Store(e.to_string()))
}

/// Device part writes and events of a batch, sent together: one
/// statement per part column, and one locked read plus one write for all
/// event rings. Flushed before any other kind of write, so that write
/// sees them (a device removed after its last telemetry stays removed).
#[derive(Default)]
struct Pending {
    /// (column, device) → position in `parts`: the last write wins.
    at: HashMap<(&'static str, String), usize>,
    parts: Vec<(&'static str, String, String)>,
    /// New events by device, in order.
    events: Vec<(String, Vec<DeviceEvent>)>,
    event_at: HashMap<String, usize>,
}

impl Pending {
    fn part(&mut self, id: &str, p: &Part) -> Result<()> {
        let col = part_column(p);
        let v = part_text(p)?;
        match self.at.get(&(col, id.to_string())) {
            Some(&i) => self.parts[i].2 = v,
            None => {
                self.at.insert((col, id.to_string()), self.parts.len());
                self.parts.push((col, id.to_string(), v));
            }
        }
        Ok(())
    }

    fn event(&mut self, id: &str, e: &DeviceEvent) {
        match self.event_at.get(id) {
            Some(&i) => self.events[i].1.push(e.clone()),
            None => {
                self.event_at.insert(id.to_string(), self.events.len());
                self.events.push((id.to_string(), vec![e.clone()]));
            }
        }
    }

    fn flush(&mut self, tx: &mut impl GenericClient) -> Result<()> {
        for col in ["identity", "desired", "reported", "live"] {
            let (ids, values): (Vec<&str>, Vec<&str>) = self
                .parts
                .iter()
                .filter(|r| r.0 == col)
                .map(|r| (r.1.as_str(), r.2.as_str()))
                .unzip();
            if ids.is_empty() {
                continue;
            }
            // A part of a device that no longer exists updates nothing,
            // as sled's load ignores such leftovers.
            tx.execute(
                &format!(
                    "UPDATE devices SET {col} = v.val::jsonb \
                     FROM unnest($1::text[], $2::text[]) AS v(id, val) \
                     WHERE devices.id = v.id"
                ),
                &[&ids, &values],
            )
            .map_err(pg_err)?;
        }
        self.at.clear();
        self.parts.clear();
        if !self.events.is_empty() {
            let ids: Vec<&str> = self.events.iter().map(|(id, _)| id.as_str()).collect();
            // Locked in id order: concurrent writers cannot deadlock.
            let rows = tx
                .query(
                    "SELECT id, events FROM devices WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                    &[&ids],
                )
                .map_err(pg_err)?;
            let mut rings: HashMap<String, VecDeque<DeviceEvent>> = HashMap::new();
            for row in rows {
                let id: String = row.try_get("id").map_err(pg_err)?;
                let ring = get(&row, "events", &format_args!("events of {id}"))?;
                rings.insert(id, ring);
            }
            let (mut ids, mut values): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
            // Events of a device that does not exist are dropped.
            for (id, new) in self.events.drain(..) {
                let Some(mut ring) = rings.remove(&id) else {
                    continue;
                };
                let before = ring.clone();
                for e in new {
                    if !ring.contains(&e) {
                        ring.push_back(e);
                        while ring.len() > EVENTS_KEPT {
                            ring.pop_front();
                        }
                    }
                }
                if ring != before {
                    values.push(
                        serde_json::to_string(&ring).map_err(|e| Error::Store(e.to_string()))?,
                    );
                    ids.push(id);
                }
            }
            if !ids.is_empty() {
                tx.execute(
                    "UPDATE devices SET events = v.val::jsonb \
                     FROM unnest($1::text[], $2::text[]) AS v(id, val) \
                     WHERE devices.id = v.id",
                    &[&ids, &values],
                )
                .map_err(pg_err)?;
            }
        }
        self.event_at.clear();
        Ok(())
    }
}

fn commit_batch(c: &mut Client, writes: &[Write], epoch: i64) -> Result<()> {
    let mut tx = c.transaction().map_err(pg_err)?;
    if epoch > 0 {
        // FOR SHARE: a takeover (which updates the row) waits for this
        // batch, and this batch sees any takeover committed before it.
        let now: Option<i64> = tx
            .query_opt("SELECT epoch FROM edgefleet_lease FOR SHARE", &[])
            .map_err(pg_err)?
            .map(|r| r.get(0));
        if now != Some(epoch) {
            return Err(Error::Fenced(format!(
                "another fleet-server took over this database (lease epoch {} > {epoch})",
                now.unwrap_or(0)
            )));
        }
    }
    let mut pending = Pending::default();
    let mut feed = Feed::default();
    for w in writes {
        feed.note(w);
        match w {
            Write::Device(id, p) => {
                pending.part(id, p)?;
                continue;
            }
            Write::DeviceEvent(id, e) => {
                pending.event(id, e);
                continue;
            }
            _ => {}
        }
        // Everything else sees the part writes and events before it.
        pending.flush(&mut tx)?;
        match w {
            Write::Device(..) | Write::DeviceEvent(..) => {}
            Write::Bundle(b) => {
                let claimed: Option<String> = tx
                    .query_opt(
                        "SELECT id FROM bundles WHERE name = $1 AND version = $2",
                        &[&b.name, &b.version],
                    )
                    .map_err(pg_err)?
                    .map(|r| r.get(0));
                if let Some(id) = claimed.filter(|id| *id != b.id) {
                    return Err(Error::Conflict(format!(
                        "{} {} is already bundle {id}",
                        b.name, b.version
                    )));
                }
                tx.execute(
                    "INSERT INTO bundles (id, name, version, record) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                    &[&b.id, &b.name, &b.version, &Json(b)],
                )
                .map_err(|e| match pg_err(e) {
                    // Another replica claimed the name in the meantime.
                    Error::Conflict(_) => Error::Conflict(format!(
                        "{} {} is already another bundle",
                        b.name, b.version
                    )),
                    e => e,
                })?;
            }
            Write::Rollout(r) => upsert(&mut tx, "rollouts", "id", &r.id, &**r)?,
            Write::Experiment(x) => upsert(&mut tx, "experiments", "id", &x.id, &**x)?,
            Write::EnrollmentToken(t) => {
                upsert(&mut tx, "enrollment_tokens", "name", &t.name, t)?;
            }
            Write::Window(scope, Some(schedule)) => {
                let entry = edgefleet_wire::api::v1::WindowEntry {
                    scope: scope.clone(),
                    schedule: schedule.clone(),
                };
                upsert(&mut tx, "windows", "scope", scope, &entry)?;
            }
            Write::Window(scope, None) => {
                tx.execute("DELETE FROM windows WHERE scope = $1", &[scope])
                    .map_err(pg_err)?;
            }
            Write::Audit(a) => {
                tx.execute("INSERT INTO audit (record) VALUES ($1)", &[&Json(a)])
                    .map_err(pg_err)?;
            }
            Write::NewDevice(d) => {
                tx.execute(
                    "INSERT INTO devices (id, identity, desired, reported, live, events) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (id) DO UPDATE SET identity = EXCLUDED.identity, \
                     desired = EXCLUDED.desired, reported = EXCLUDED.reported, \
                     live = EXCLUDED.live, events = EXCLUDED.events",
                    &[
                        &d.id,
                        &Json(&d.identity),
                        &Json(&d.desired),
                        &d.reported.as_ref().map(Json),
                        &Json(&d.live),
                        &Json(&d.events),
                    ],
                )
                .map_err(pg_err)?;
            }
            Write::RemoveDevice(id) => {
                tx.execute("DELETE FROM devices WHERE id = $1", &[id])
                    .map_err(pg_err)?;
            }
            Write::Trust(doc) => {
                let version = doc
                    .peek_unverified()
                    .map_err(|e| Error::Store(format!("trust document: {e}")))?
                    .version;
                let version = i64::try_from(version)
                    .map_err(|_| Error::Store(format!("trust version {version} out of range")))?;
                tx.execute(
                    "INSERT INTO trust (version, record) VALUES ($1, $2) \
                     ON CONFLICT (version) DO UPDATE SET record = EXCLUDED.record",
                    &[&version, &Json(doc)],
                )
                .map_err(pg_err)?;
            }
        }
    }
    pending.flush(&mut tx)?;
    for p in feed.payloads() {
        tx.execute("SELECT pg_notify($1, $2)", &[&FEED, &p])
            .map_err(pg_err)?;
    }
    tx.commit().map_err(pg_err)
}

/// A `devices` row (every column) as a record.
fn device_row(row: &Row) -> Result<DeviceRecord> {
    let id: String = row.try_get("id").map_err(pg_err)?;
    let what = format_args!("device {id}");
    let reported: Option<Json<Value>> = row.try_get("reported").map_err(pg_err)?;
    let reported: Option<Reported> = reported
        .map(|v| serde_json::from_value(v.0))
        .transpose()
        .map_err(|e| Error::Store(format!("corrupt record {what}: {e}")))?;
    let identity: Identity = get(row, "identity", &what)?;
    let desired: Desired = get(row, "desired", &what)?;
    let live: Live = get(row, "live", &what)?;
    let events: VecDeque<DeviceEvent> = get(row, "events", &what)?;
    Ok(DeviceRecord {
        id,
        identity,
        desired,
        reported,
        live,
        events,
    })
}

fn upsert<T: Serialize + std::fmt::Debug + Sync>(
    tx: &mut impl GenericClient,
    table: &str,
    key: &str,
    id: &str,
    record: &T,
) -> Result<()> {
    tx.execute(
        &format!(
            "INSERT INTO {table} ({key}, record) VALUES ($1, $2) \
             ON CONFLICT ({key}) DO UPDATE SET record = EXCLUDED.record"
        ),
        &[&id, &Json(record)],
    )
    .map_err(pg_err)?;
    Ok(())
}

impl Store for PgStore {
    fn load(&self) -> Result<Snapshot> {
        self.consistent(|c| {
            let mut snap = Snapshot {
                bundles: Self::all(c, "bundles")?,
                rollouts: Self::all(c, "rollouts")?,
                enrollment_tokens: Self::all(c, "enrollment_tokens")?,
                trust: Self::all(c, "trust")?,
                experiments: Self::all(c, "experiments")?,
                windows: Self::all(c, "windows")?,
                devices: Vec::new(),
            };
            let rows = c
                .query(
                    "SELECT id, identity, desired, reported, live, events FROM devices ORDER BY id",
                    &[],
                )
                .map_err(pg_err)?;
            snap.devices = rows.iter().map(device_row).collect::<Result<_>>()?;
            Ok(snap)
        })
    }

    fn commit(&self, writes: &[Write]) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        use std::sync::atomic::Ordering::SeqCst;
        let epoch = self.epoch.load(SeqCst);
        let r = self.with(&self.write, |c| commit_batch(c, writes, epoch));
        if matches!(r, Err(Error::Fenced(_))) {
            self.fenced.store(true, SeqCst);
        }
        r
    }

    fn acquire_active(
        &self,
        me: &LeaseHolder,
        keep_waiting: &dyn Fn(&LeaseHolder) -> bool,
    ) -> Result<Option<u64>> {
        self.acquire(me, keep_waiting)
    }

    fn watch_fleet(&self, on: &mut dyn FnMut(FleetChange) -> Result<bool>) -> Result<()> {
        let mut c = self.connect()?;
        c.batch_execute(&format!(
            "SET application_name = 'fleet-server change feed'; LISTEN {FEED}"
        ))
        .map_err(pg_err)?;
        if !on(FleetChange::Listening)? {
            return Ok(());
        }
        loop {
            let mut feed = Feed::default();
            let first = c
                .notifications()
                .timeout_iter(Duration::from_secs(1))
                .next()
                .map_err(pg_err)?;
            let Some(first) = first else {
                // A broken session also ends the wait: the feed must not
                // go quiet without saying so.
                if c.is_closed() {
                    return Err(Error::Store(
                        "postgres: the change feed's session closed".into(),
                    ));
                }
                if !on(FleetChange::Quiet)? {
                    return Ok(());
                }
                continue;
            };
            feed.read(first.payload());
            // Whatever else is queued is applied with it.
            {
                let mut n = c.notifications();
                let mut more = n.iter();
                for _ in 0..4096 {
                    match more.next().map_err(pg_err)? {
                        Some(m) => feed.read(m.payload()),
                        None => break,
                    }
                }
            }
            if feed.fleetwide && !on(FleetChange::Fleetwide)? {
                return Ok(());
            }
            if !feed.devices.is_empty()
                && !on(FleetChange::Devices(feed.devices.into_iter().collect()))?
            {
                return Ok(());
            }
        }
    }

    fn devices(&self, ids: &[String]) -> Result<Vec<DeviceRecord>> {
        // Only what a document is made of: a device's reports, telemetry
        // and events are the bulk of its row and no standby serves them.
        self.with(&self.read, |c| {
            c.query(
                "SELECT id, identity, desired FROM devices WHERE id = ANY($1)",
                &[&ids],
            )
            .map_err(pg_err)?
            .iter()
            .map(|row| {
                let id: String = row.try_get("id").map_err(pg_err)?;
                let what = format_args!("device {id}");
                Ok(DeviceRecord {
                    identity: get(row, "identity", &what)?,
                    desired: get(row, "desired", &what)?,
                    id,
                    reported: None,
                    live: Live::default(),
                    events: VecDeque::new(),
                })
            })
            .collect()
        })
    }

    fn load_fleetwide(&self) -> Result<Snapshot> {
        self.consistent(|c| {
            Ok(Snapshot {
                rollouts: Self::all(c, "rollouts")?,
                trust: Self::all(c, "trust")?,
                windows: Self::all(c, "windows")?,
                ..Snapshot::default()
            })
        })
    }

    fn still_active(&self) -> bool {
        self.holds()
    }

    fn audit(&self, after: Option<u64>, limit: usize) -> Result<Vec<(u64, AuditEntry)>> {
        let after = i64::try_from(after.unwrap_or(0)).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(&self.read, |c| {
            c.query(
                "SELECT seq, record FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&after, &limit],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| {
                let seq: i64 = r.try_get("seq").map_err(pg_err)?;
                Ok((seq as u64, get(r, "record", &format_args!("audit {seq}"))?))
            })
            .collect()
        })
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn claim_ingest_slot(&self, slots: u32, holder: &str) -> Result<Option<u32>> {
        let mut guard = self
            .slot
            .lock()
            .map_err(|_| Error::Store("postgres slot lock poisoned".into()))?;
        if let Some((_, n)) = guard.as_ref().filter(|(c, _)| !c.is_closed()) {
            return Ok(Some(*n as u32));
        }
        // The lock lives as long as this session: a dead standby's slot
        // is free at once.
        let mut c = self.connect()?;
        for n in 1..=i32::try_from(slots).unwrap_or(i32::MAX) {
            let got: bool = c
                .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&SLOT_LOCKS, &n])
                .map_err(pg_err)?
                .get(0);
            if got {
                c.execute(
                    "INSERT INTO edgefleet_ingest_slots (slot, holder, in_use) VALUES ($1, $2, true) \
                     ON CONFLICT (slot) DO UPDATE SET holder = EXCLUDED.holder, in_use = true, \
                     since = now()",
                    &[&n, &holder],
                )
                .map_err(pg_err)?;
                *guard = Some((c, n));
                return Ok(Some(n as u32));
            }
        }
        Ok(None)
    }

    fn holds_ingest_slot(&self) -> bool {
        let Ok(mut guard) = self.slot.lock() else {
            return false;
        };
        guard
            .as_mut()
            .is_some_and(|(c, _)| c.simple_query("SELECT 1").is_ok())
    }

    fn leave_ingest_slot(&self) -> Result<()> {
        let taken = self
            .slot
            .lock()
            .map_err(|_| Error::Store("postgres slot lock poisoned".into()))?
            .take();
        // Ending the session releases the lock.
        if let Some((c, _)) = taken {
            let _ = std::thread::spawn(move || drop(c)).join();
        }
        Ok(())
    }

    fn inbox_push(&self, slot: u32, messages: &[(String, Vec<u8>)]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let slot = i32::try_from(slot).unwrap_or(i32::MAX);
        let topics: Vec<&str> = messages.iter().map(|(t, _)| t.as_str()).collect();
        let payloads: Vec<&[u8]> = messages.iter().map(|(_, p)| p.as_slice()).collect();
        self.with(&self.inbox, |c| {
            c.execute(
                "INSERT INTO edgefleet_inbox (topic, payload, slot) \
                 SELECT t, p, $3 FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS m(t, p, i) \
                 ORDER BY i",
                &[&topics, &payloads, &slot],
            )
            .map_err(pg_err)?;
            Ok(())
        })
    }

    fn inbox_take(&self, limit: usize) -> Result<Vec<super::InboxMessage>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(&self.inbox, |c| {
            c.query(
                "SELECT id, topic, payload FROM edgefleet_inbox ORDER BY id LIMIT $1",
                &[&limit],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| {
                Ok(super::InboxMessage {
                    id: r.try_get(0).map_err(pg_err)?,
                    topic: r.try_get(1).map_err(pg_err)?,
                    payload: r.try_get(2).map_err(pg_err)?,
                })
            })
            .collect()
        })
    }

    fn inbox_done(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.with(&self.inbox, |c| {
            c.execute("DELETE FROM edgefleet_inbox WHERE id = ANY($1)", &[&ids])
                .map_err(pg_err)?;
            Ok(())
        })
    }

    fn orphaned_ingest_slots(&self) -> Result<Vec<u32>> {
        self.with(&self.adopting, |c| {
            let in_use: Vec<i32> = c
                .query(
                    "SELECT slot FROM edgefleet_ingest_slots WHERE in_use ORDER BY slot",
                    &[],
                )
                .map_err(pg_err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut orphans = Vec::new();
            for n in in_use {
                // A lock this session holds already (an adoption that
                // failed) is taken again: one more level, released once
                // per level at the end.
                let got: bool = c
                    .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&SLOT_LOCKS, &n])
                    .map_err(pg_err)?
                    .get(0);
                if got {
                    orphans.push(n as u32);
                }
            }
            Ok(orphans)
        })
    }

    fn ingest_slot_adopted(&self, slot: u32, drained: bool) -> Result<()> {
        let n = i32::try_from(slot).unwrap_or(i32::MAX);
        self.with(&self.adopting, |c| {
            if drained {
                c.execute(
                    "UPDATE edgefleet_ingest_slots SET in_use = false, since = now() WHERE slot = $1",
                    &[&n],
                )
                .map_err(pg_err)?;
            }
            c.query_one("SELECT pg_advisory_unlock($1, $2)", &[&SLOT_LOCKS, &n])
                .map_err(pg_err)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_feed_names_what_changed_in_notifications_under_the_size_limit() {
        let mut feed = Feed::default();
        let part = |id: &str, p| Write::Device(id.to_string(), p);
        let desired = Part::Desired(Desired::default());
        let live = Part::Live(Live::default());
        // Reports, telemetry and events change nothing a standby serves.
        feed.note(&part("pi-0", live));
        feed.note(&Write::Audit(AuditEntry {
            at: 1,
            who: "ops".into(),
            action: "report".into(),
            target: "pi-0".into(),
        }));
        assert!(feed.payloads().is_empty());
        for i in 0..2000 {
            feed.note(&part(&format!("device-{i:05}"), desired.clone()));
        }
        feed.note(&Write::RemoveDevice("gone".into()));
        feed.note(&Write::Window("tag:a=b".into(), None));
        let payloads = feed.payloads();
        assert_eq!(payloads[0], "f");
        assert!(
            payloads.len() > 2,
            "2000 ids need more than one notification"
        );
        assert!(payloads.iter().all(|p| p.len() <= FEED_PAYLOAD));
        // Read back: every device once, and the fleet-wide flag.
        let mut back = Feed::default();
        for p in &payloads {
            back.read(p);
        }
        assert!(back.fleetwide);
        assert_eq!(back.devices, feed.devices);
        assert_eq!(back.devices.len(), 2001);
    }

    #[test]
    fn urls_lose_their_password_in_logs() {
        assert_eq!(
            redact("postgres://fleet:s3cret@db.example:5432/edgefleet"),
            "postgres://fleet@db.example:5432/edgefleet"
        );
        assert_eq!(
            redact("postgresql://fleet@db/edgefleet"),
            "postgresql://fleet@db/edgefleet"
        );
        assert!(!redact("host=db password=s3cret").contains("s3cret"));
    }

    #[test]
    fn migrations_are_numbered_in_order_from_one() {
        for (i, (v, name, sql)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*v as usize, i + 1, "{name}");
            assert!(!sql.trim().is_empty(), "{name}");
        }
    }
}
