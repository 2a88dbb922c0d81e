//! The fleet server's [`Store`] contract, run against both backends: the
//! embedded sled store and a real PostgreSQL server (Debian's, started by
//! [`integ::postgres::Postgres`] on a loopback port). Then what only a
//! shared database has to get right: two replicas writing at once,
//! concurrent migrations, a database restart under the writer, and the
//! sled → PostgreSQL move (`export` / `import`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_wire::telemetry::DeviceEvent;
use fleet_server::store::postgres::PgStore;
use fleet_server::store::sled::SledStore;
use fleet_server::store::{
    AuditEntry, BundleRecord, Desired, DeviceRecord, EVENTS_KEPT, Identity, Joined, Live, Part,
    Store, Write, export,
};
use integ::postgres::Postgres;

/// Where a test's store lives; `open` opens it again (a restart).
enum Backend {
    Sled(tempfile::TempDir),
    Postgres(String),
}

impl Backend {
    fn open(&self) -> Arc<dyn Store> {
        match self {
            Backend::Sled(dir) => Arc::new(reopen_sled(dir.path().to_path_buf())),
            Backend::Postgres(url) => {
                Arc::new(PgStore::open(url).expect("open the postgres store"))
            }
        }
    }
}

/// Right after a sled store of the same folder was dropped, sled's
/// flusher thread may still hold the folder's lock for a moment: retry
/// that (and only that) briefly.
fn reopen_sled(dir: PathBuf) -> SledStore {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match SledStore::open(&dir) {
            Ok(s) => return s,
            Err(e) if e.to_string().contains("lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("open the store: {e}"),
        }
    }
}

/// Runs `case` on a fresh sled store and a fresh PostgreSQL database.
fn on_both_backends(test: &str, case: impl Fn(&Backend)) {
    let sled = Backend::Sled(tempfile::tempdir().unwrap());
    case(&sled);
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    case(&Backend::Postgres(pg.url()));
}

fn identity(cred: &str) -> Identity {
    Identity {
        tags: BTreeMap::from([("board".into(), "rpi4".into())]),
        arch: "aarch64".into(),
        agent_version: "0.1.0".into(),
        credential_sha256: cred.into(),
        enrolled_at: 1,
        enrolled_with: None,
        revoked_at: None,
        broker_password: None,
    }
}

fn bundle(id: &str, version: &str) -> BundleRecord {
    BundleRecord {
        id: id.into(),
        name: "cls".into(),
        version: version.into(),
        sequence: 1,
        size: 10,
        format: "onnx".into(),
        targets: vec!["aarch64".into()],
        expires_at: 9,
        uploaded_at: 1,
        uploaded_by: "ops".into(),
    }
}

fn event(at: u64) -> DeviceEvent {
    DeviceEvent {
        at,
        event: "downloaded".into(),
        bundle: None,
        reason: None,
        drift: Vec::new(),
    }
}

fn audit(i: u64) -> Write {
    Write::Audit(AuditEntry {
        at: i,
        who: "ops".into(),
        action: format!("a{i}"),
        target: "t".into(),
    })
}

fn live(at: u64) -> Part {
    Part::Live(Live {
        online: Some(true),
        at: Some(at),
        ..Live::default()
    })
}

#[test]
fn batches_survive_reopen_part_by_part() {
    on_both_backends("batches_survive_reopen_part_by_part", |b| {
        {
            let s = b.open();
            let d = DeviceRecord::enrolled("pi-1".into(), identity("c1"));
            s.commit(&[
                Write::NewDevice(Box::new(d)),
                Write::Bundle(bundle("aa", "1.0.0")),
            ])
            .unwrap();
            // Two writers of different parts: neither undoes the other.
            s.commit(&[
                Write::Device("pi-1".into(), live(5)),
                Write::Device(
                    "pi-1".into(),
                    Part::Desired(Desired {
                        rollout: Some("r1".into()),
                        joined: Some(Joined {
                            rollout: "r1".into(),
                            previous: None,
                        }),
                        ..Desired::default()
                    }),
                ),
            ])
            .unwrap();
            for i in 0..25 {
                s.commit(&[Write::DeviceEvent("pi-1".into(), event(i))])
                    .unwrap();
            }
            // A repeated event (a replay after an outage) is kept once.
            s.commit(&[Write::DeviceEvent("pi-1".into(), event(24))])
                .unwrap();
        }
        let s = b.open();
        let snap = s.load().unwrap();
        assert_eq!(snap.bundles.len(), 1, "{}", s.backend());
        let d = &snap.devices[0];
        assert_eq!(d.live.online, Some(true));
        assert_eq!(d.live.at, Some(5));
        assert_eq!(d.desired.rollout.as_deref(), Some("r1"));
        assert_eq!(d.identity.credential_sha256, "c1");
        assert_eq!(d.events.len(), EVENTS_KEPT, "{}", s.backend());
        assert_eq!(d.events.back().unwrap().at, 24);
        assert_eq!(d.events.front().unwrap().at, 25 - EVENTS_KEPT as u64);
    });
}

#[test]
fn a_bundle_and_its_name_claim_are_one_write_and_conflicts_fail_the_batch() {
    on_both_backends("a_bundle_and_its_name_claim_…", |b| {
        let s = b.open();
        s.commit(&[Write::Bundle(bundle("aa", "1.0.0"))]).unwrap();
        // Same bytes again: idempotent.
        s.commit(&[Write::Bundle(bundle("aa", "1.0.0"))]).unwrap();
        // Other bytes under the same name and version: the whole batch fails.
        let err = s
            .commit(&[audit(1), Write::Bundle(bundle("bb", "1.0.0"))])
            .unwrap_err();
        assert!(
            matches!(err, fleet_server::error::Error::Conflict(_)),
            "{}: {err:?}",
            s.backend()
        );
        assert!(err.to_string().contains("already bundle aa"), "{err}");
        assert!(
            s.audit(None, 10).unwrap().is_empty(),
            "{}: nothing of the batch",
            s.backend()
        );
        assert_eq!(s.load().unwrap().bundles.len(), 1);
        // The store still takes writes after a refused batch.
        s.commit(&[Write::Bundle(bundle("bb", "1.0.1"))]).unwrap();
        assert_eq!(s.load().unwrap().bundles.len(), 2);
    });
}

#[test]
fn audit_pages_in_order_across_reopen() {
    on_both_backends("audit_pages_in_order_across_reopen", |b| {
        {
            let s = b.open();
            for i in 0..5 {
                s.commit(&[audit(i)]).unwrap();
            }
        }
        let s = b.open();
        s.commit(&[audit(5)]).unwrap();
        let first = s.audit(None, 4).unwrap();
        assert_eq!(first.len(), 4);
        let rest = s.audit(Some(first[3].0), 10).unwrap();
        let actions: Vec<_> = first
            .iter()
            .chain(&rest)
            .map(|(_, a)| a.action.clone())
            .collect();
        assert_eq!(
            actions,
            ["a0", "a1", "a2", "a3", "a4", "a5"],
            "{}",
            s.backend()
        );
        assert!(
            s.audit(Some(rest.last().unwrap().0), 10)
                .unwrap()
                .is_empty()
        );
    });
}

#[test]
fn removed_devices_leave_nothing_behind() {
    on_both_backends("removed_devices_leave_nothing_behind", |b| {
        let s = b.open();
        let d = DeviceRecord::enrolled("pi-1".into(), identity("c1"));
        s.commit(&[Write::NewDevice(Box::new(d))]).unwrap();
        s.commit(&[
            Write::DeviceEvent("pi-1".into(), event(1)),
            Write::RemoveDevice("pi-1".into()),
            // Late writes for the removed device (its last telemetry) do
            // not bring it back.
            Write::Device("pi-1".into(), live(9)),
            Write::DeviceEvent("pi-1".into(), event(2)),
        ])
        .unwrap();
        assert!(s.load().unwrap().devices.is_empty(), "{}", s.backend());
        // Enrolled again: a clean record, none of the old events.
        let d = DeviceRecord::enrolled("pi-1".into(), identity("c2"));
        s.commit(&[Write::NewDevice(Box::new(d))]).unwrap();
        let backend = s.backend();
        drop(s);
        let snap = b.open().load().unwrap();
        assert_eq!(snap.devices[0].identity.credential_sha256, "c2");
        assert!(snap.devices[0].events.is_empty(), "{backend}");
    });
}

#[test]
fn a_full_batch_of_telemetry_keeps_the_last_write_of_each_device() {
    on_both_backends("a_full_batch_of_telemetry_…", |b| {
        let s = b.open();
        let n = 2000;
        let new: Vec<Write> = (0..n)
            .map(|i| {
                Write::NewDevice(Box::new(DeviceRecord::enrolled(
                    format!("pi-{i:05}"),
                    identity(&format!("c{i}")),
                )))
            })
            .collect();
        s.commit(&new).unwrap();
        // Two writes per device in one batch (as the writer's MAX_BATCH
        // may hold): the later one is what stays.
        let batch: Vec<Write> = (0..2)
            .flat_map(|round| (0..n).map(move |i| (round, i)))
            .map(|(round, i)| Write::Device(format!("pi-{i:05}"), live(round * 1000 + i)))
            .collect();
        s.commit(&batch).unwrap();
        // Events of many devices in one batch, several per device (one
        // repeated), and one for a device that does not exist.
        let events: Vec<Write> = (0..25u64)
            .flat_map(|e| (0..3).map(move |i| Write::DeviceEvent(format!("pi-{i:05}"), event(e))))
            .chain([
                Write::DeviceEvent("pi-00001".into(), event(24)),
                Write::DeviceEvent("nobody".into(), event(1)),
            ])
            .collect();
        s.commit(&events).unwrap();
        let backend = s.backend();
        drop(s);
        let snap = b.open().load().unwrap();
        assert_eq!(snap.devices.len(), n as usize);
        for (i, d) in snap.devices.iter().enumerate() {
            assert_eq!(d.live.at, Some(1000 + i as u64), "{backend} {}", d.id);
            let ats: Vec<u64> = d.events.iter().map(|e| e.at).collect();
            if i < 3 {
                assert_eq!(ats, (5..25).collect::<Vec<_>>(), "{backend} {}", d.id);
            } else {
                assert!(ats.is_empty(), "{backend} {}", d.id);
            }
        }
    });
}

#[test]
fn everything_exported_imports_into_the_other_backend() {
    // sled → PostgreSQL is the documented move; the document is the same
    // whichever way it goes.
    let Some(pg) = Postgres::start("everything_exported_imports_into_the_other_backend") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sled = Backend::Sled(dir);
    let s = sled.open();
    let mut d = DeviceRecord::enrolled("pi-1".into(), identity("c1"));
    d.desired.rollout = Some("r1".into());
    d.events.push_back(event(3));
    s.commit(&[
        Write::NewDevice(Box::new(d)),
        Write::NewDevice(Box::new(DeviceRecord::enrolled(
            "pi-2".into(),
            identity("c2"),
        ))),
        Write::Bundle(bundle("aa", "1.0.0")),
        Write::Device("pi-2".into(), live(7)),
        audit(1),
        audit(2),
        Write::Window(
            "device:pi-1".into(),
            Some(edgefleet_wire::window::Schedule {
                windows: vec!["daily 02:00-04:00".into()],
                time_zone: Some("UTC".into()),
            }),
        ),
    ])
    .unwrap();
    let doc = export::export(s.as_ref(), 100).unwrap();
    assert_eq!(doc.source, "sled");
    // Through its JSON text, as the CLI writes and reads it.
    let text = serde_json::to_string(&doc).unwrap();
    let doc: export::Export = serde_json::from_str(&text).unwrap();

    let p = Backend::Postgres(pg.url()).open();
    let counts = export::import(p.as_ref(), doc.clone()).unwrap();
    assert_eq!(counts.devices, 2);
    assert_eq!(counts.audit, 2);
    let (a, b) = (s.load().unwrap(), p.load().unwrap());
    assert_eq!(a.devices, b.devices);
    assert_eq!(a.bundles, b.bundles);
    assert_eq!(a.windows, b.windows);
    let actions = |st: &Arc<dyn Store>| -> Vec<String> {
        st.audit(None, 100)
            .unwrap()
            .into_iter()
            .map(|(_, a)| a.action)
            .collect()
    };
    assert_eq!(actions(&s), actions(&p));
    // A second import would merge into a live fleet: refused, nothing written.
    let err = export::import(p.as_ref(), doc).unwrap_err().to_string();
    assert!(err.contains("import only into an empty store"), "{err}");
    assert_eq!(p.audit(None, 100).unwrap().len(), 2);
}

#[test]
fn replicas_sharing_a_database_lose_no_event_and_claim_a_name_once() {
    let Some(pg) = Postgres::start("replicas_sharing_a_database_…") else {
        return;
    };
    let url = pg.url();
    let (a, b) = (
        Arc::new(PgStore::open(&url).unwrap()),
        Arc::new(PgStore::open(&url).unwrap()),
    );
    a.commit(&[Write::NewDevice(Box::new(DeviceRecord::enrolled(
        "pi-1".into(),
        identity("c1"),
    )))])
    .unwrap();
    // Both replicas append events to the same device at once: the row
    // lock serializes the ring's read-modify-write.
    let writers: Vec<_> = [(a.clone(), 0u64), (b.clone(), 1000u64)]
        .into_iter()
        .map(|(s, base)| {
            std::thread::spawn(move || {
                for i in 0..EVENTS_KEPT as u64 / 2 {
                    s.commit(&[Write::DeviceEvent("pi-1".into(), event(base + i))])
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let events = &a.load().unwrap().devices[0].events;
    assert_eq!(events.len(), EVENTS_KEPT, "no event lost: {events:?}");
    // Both race to claim cls 2.0.0 with different bytes: exactly one wins.
    let claims: Vec<_> = [(a.clone(), "x1"), (b.clone(), "x2")]
        .into_iter()
        .map(|(s, id)| std::thread::spawn(move || s.commit(&[Write::Bundle(bundle(id, "2.0.0"))])))
        .collect();
    let results: Vec<_> = claims.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(fleet_server::error::Error::Conflict(_)))),
        "{results:?}"
    );
}

#[test]
fn migrations_run_once_and_a_newer_schema_is_refused() {
    let Some(pg) = Postgres::start("migrations_run_once_…") else {
        return;
    };
    let url = pg.database("fleet");
    // Replicas starting together: the advisory lock makes one migrate.
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PgStore::open(&url).map(|s| s.schema_version().unwrap()))
        })
        .collect();
    let known = fleet_server::store::postgres::MIGRATIONS.len() as i32;
    for o in opens {
        assert_eq!(o.join().unwrap().unwrap(), known);
    }
    assert!(
        fleet_server::store::postgres::probe(&url)
            .unwrap()
            .contains(&format!("schema version {known}"))
    );
    // A database a newer fleet-server migrated: this one must not touch it.
    let out = std::process::Command::new("psql")
        .args([&url, "-c"])
        .arg(format!(
            "INSERT INTO edgefleet_migrations (version, name) VALUES ({}, 'future')",
            known + 1
        ))
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = PgStore::open(&url).unwrap_err().to_string();
    assert!(err.contains("newer than this fleet-server"), "{err}");
}

#[test]
fn a_database_restart_costs_the_writer_a_retry_not_the_data() {
    let Some(mut pg) = Postgres::start("a_database_restart_…") else {
        return;
    };
    let s = PgStore::open(&pg.url()).unwrap();
    s.commit(&[audit(1)]).unwrap();
    pg.stop();
    let err = s.commit(&[audit(2)]).unwrap_err();
    // An I/O failure (the writer retries it), not a refusal.
    assert!(
        matches!(err, fleet_server::error::Error::Store(_)),
        "{err:?}"
    );
    pg.restart();
    // The same store object reconnects on its next call.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = s.commit(&[audit(2)]) {
        assert!(std::time::Instant::now() < deadline, "{e}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let actions: Vec<_> = s
        .audit(None, 10)
        .unwrap()
        .into_iter()
        .map(|(_, a)| a.action)
        .collect();
    assert_eq!(actions, ["a1", "a2"]);
}
