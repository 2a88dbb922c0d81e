//! The fleet server on PostgreSQL (Debian's, started by the test on a
//! loopback port, as `nobody` under root): a sled deployment moves to
//! PostgreSQL with `fleet-server export` / `migrate` / `import`, its
//! devices keep their credentials (no re-enrollment) and take the next
//! rollout, and a kill -9 of the server plus a restart of PostgreSQL lose
//! nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use integ::agent::InProcAgent as Agent;
use integ::bundles::{Model, Pack};
use integ::common::free_port;
use integ::fleet::{ADMIN, ServerProc, TestFleet, config_file, trust_key};
use integ::pki::{issue, make_ca};
use integ::postgres::Postgres;
use rcgen::ExtendedKeyUsagePurpose;

fn active_version(s: &Value) -> Option<&str> {
    s["record"]["active"]["version"].as_str()
}

/// Waits until the server sees `id` committed on bundle `bundle`.
async fn wait_device_on(fleet: &TestFleet, id: &str, bundle: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = fleet.device(id).await;
        if d["state"] == "committed" && d["active"]["id"] == bundle {
            return d;
        }
        assert!(Instant::now() < deadline, "server view: {d:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn audit_actions(fleet: &TestFleet) -> Vec<String> {
    let r = fleet
        .req(
            reqwest::Method::GET,
            "/api/v1/audit?limit=1000",
            Some(ADMIN),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let v: Vec<Value> = r.json().await.unwrap();
    v.iter()
        .map(|e| format!("{} {}", e["action"], e["target"]))
        .collect()
}

#[track_caller]
fn ok(o: std::process::Output) -> (String, String) {
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "exit {}: {out}{err}", o.status);
    (out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sled_fleet_moves_to_postgres_without_reenrolling_and_loses_nothing() {
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1} s] {what}", t0.elapsed().as_secs_f64());
    let Some(mut pg) = Postgres::start("a_sled_fleet_moves_to_postgres_…") else {
        return;
    };
    phase("postgres up");
    let url = pg.database("fleet");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let sled_cfg = config_file(dir.path(), "sled.toml", &data, port, "");
    let pg_cfg = config_file(
        dir.path(),
        "pg.toml",
        &data,
        port,
        &format!("[store]\nurl = \"{url}\""),
    );

    // A fleet on the embedded store: one device on v1.
    let server = ServerProc::start(&sled_cfg, port);
    let fleet = TestFleet::attach(port);
    phase("sled server up");
    let v1 = fleet.push(Pack::new(Model::Cls, 1).bytes()).await;
    phase("v1 pushed");
    let adir = tempfile::tempdir().unwrap();
    let trust = vec![trust_key(adir.path(), 1)];
    let agent = Agent::start(Agent::config(
        &fleet.url,
        adir.path(),
        "pi-1",
        "rpi4",
        trust.clone(),
    ))
    .await;
    phase("agent started");
    let r1 = fleet.rollout_gated(&v1, "rpi4", json!({})).await;
    fleet.wait_rollout(&r1, "completed", 60).await;
    phase("r1 completed");
    let before = wait_device_on(&fleet, "pi-1", &v1).await;
    let audit_before = audit_actions(&fleet).await;
    assert!(!audit_before.is_empty());
    phase("v1 on the sled fleet");
    server.stop();
    phase("sled server stopped");

    // export (sled) → migrate + import (PostgreSQL), with the server stopped.
    let doc = dir.path().join("fleet.json");
    let (_, err) = ok(ServerProc::run(
        &sled_cfg,
        &["export", "--out", doc.to_str().unwrap()],
    ));
    assert!(err.contains("1 bundles, 1 devices, 1 rollouts"), "{err}");
    let (out, _) = ok(ServerProc::run(&pg_cfg, &["migrate"]));
    assert!(
        out.contains("postgres store is at the current schema"),
        "{out}"
    );
    let (out, _) = ok(ServerProc::run(
        &pg_cfg,
        &["import", "--in", doc.to_str().unwrap()],
    ));
    assert!(out.contains("into the postgres store"), "{out}");
    // Importing twice would merge two fleets: refused with the reason.
    let again = ServerProc::run(&pg_cfg, &["import", "--in", doc.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("import only into an empty store"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let check = ServerProc::run(&pg_cfg, &["--check-config"]);
    let (out, _) = ok(check);
    assert!(out.contains("reachable, schema version"), "{out}");

    phase("moved");
    // The same fleet on PostgreSQL: the device is the same record…
    let server = ServerProc::start(&pg_cfg, port);
    assert!(
        server.log().contains("postgres"),
        "the server says which store it runs on: {}",
        server.log()
    );
    let after = fleet.device("pi-1").await;
    for k in ["enrolled_at", "tags", "active", "state"] {
        assert_eq!(after[k], before[k], "{k}: {after:#}");
    }
    assert_eq!(
        audit_actions(&fleet).await[..audit_before.len()],
        audit_before
    );
    // …and its credential still works: it takes the next rollout without
    // enrolling again (a second enrollment would be refused: device_exists).
    let v2 = fleet.push(Pack::new(Model::Cls, 2).bytes()).await;
    let r2 = fleet.rollout_gated(&v2, "rpi4", json!({})).await;
    fleet.wait_rollout(&r2, "completed", 90).await;
    agent
        .wait_for("v2 committed", 60, |s| {
            s["state"] == "committed" && active_version(s) == Some("1.2.0")
        })
        .await;
    wait_device_on(&fleet, "pi-1", &v2).await;
    phase("v2 on the postgres fleet");

    // kill -9 the server and restart PostgreSQL: nothing is lost.
    server.kill();
    pg.restart();
    let server = ServerProc::start(&pg_cfg, port);
    let d = fleet.device("pi-1").await;
    assert_eq!(d["active"]["id"], v2.as_str(), "{d:#}");
    assert_eq!(d["enrolled_at"], before["enrolled_at"]);
    let rollouts = fleet.get_json("/api/v1/rollouts").await;
    let states: Vec<_> = rollouts
        .as_array()
        .or_else(|| rollouts["rollouts"].as_array())
        .unwrap()
        .iter()
        .map(|r| (r["id"].clone(), r["phase"]["state"].clone()))
        .collect();
    assert!(
        states.contains(&(json!(r1), json!("completed")))
            && states.contains(&(json!(r2), json!("completed"))),
        "{states:?}"
    );
    let bundles = fleet.get_json("/api/v1/bundles").await;
    let text = bundles.to_string();
    assert!(text.contains(&v1) && text.contains(&v2), "{bundles:#}");
    // The device keeps reporting to the restarted server.
    agent
        .wait_for("still committed on v2", 30, |s| {
            active_version(s) == Some("1.2.0")
        })
        .await;
    agent.stop().await;
    server.stop();
}

fn open_err(url: &str) -> String {
    match fleet_server::store::postgres::PgStore::open(url) {
        Ok(_) => panic!("{url} opened"),
        Err(e) => e.to_string(),
    }
}

/// PostgreSQL that takes TLS connections only: the libpq `sslmode`s in
/// `[store] url` mean what they mean to libpq, a wrong certificate or host
/// name is refused with the reason, client certificates authenticate, and
/// a real fleet server runs on the database over verified TLS.
#[test]
fn the_store_reaches_postgresql_over_tls_as_libpq_would() {
    let ca = make_ca("edgefleet test database CA");
    let (cert, key) = issue(
        &ca,
        &["localhost"],
        "db",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) =
        issue(&ca, &[], "edgefleet", ExtendedKeyUsagePurpose::ClientAuth);
    let ca_pem = ca.pem();
    let tls = integ::postgres::ServerTls {
        cert: &cert,
        key: &key,
        client_ca: &ca_pem,
    };
    let Some(pg) = Postgres::start_tls("postgres TLS", &tls) else {
        return;
    };
    pg.database("fleet");
    pg.database("clientcert");
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let ca_file = write("ca.pem", &ca_pem);
    let other_ca = write("other-ca.pem", &make_ca("someone else").pem());
    let (cc, ck) = (
        write("client.pem", &client_cert),
        write("client.key", &client_key),
    );
    let port = pg.port();
    let at = |host: &str, db: &str, query: &str| {
        format!("postgres://edgefleet@{host}:{port}/{db}?{query}")
    };

    // The server refuses unencrypted sessions: TLS below is real.
    let e = open_err(&at("127.0.0.1", "fleet", "sslmode=disable"));
    assert!(e.contains("no encryption"), "{e}");

    // libpq's default (prefer) and `require` encrypt without checking.
    for query in ["", "sslmode=require"] {
        fleet_server::store::postgres::PgStore::open(&at("127.0.0.1", "fleet", query))
            .unwrap_or_else(|e| panic!("{query}: {e}"));
    }
    // verify-full: the chain and the name. The certificate names
    // `localhost`, not 127.0.0.1.
    let full = |host: &str, root: &str| {
        at(
            host,
            "fleet",
            &format!("sslmode=verify-full&sslrootcert={root}"),
        )
    };
    let s = fleet_server::store::postgres::PgStore::open(&full("localhost", &ca_file))
        .expect("verify-full with the right CA and name");
    assert_eq!(
        s.schema_version().unwrap(),
        fleet_server::store::postgres::MIGRATIONS.len() as i32
    );
    drop(s);
    let e = open_err(&full("127.0.0.1", &ca_file));
    assert!(e.contains("certificate not valid for name"), "{e}");
    let e = open_err(&full("localhost", &other_ca));
    assert!(
        e.contains("certificate") && e.contains("UnknownIssuer"),
        "{e}"
    );
    // `require` with a root file and `verify-ca` check the chain only.
    let chain =
        |query: &str, root: &str| at("127.0.0.1", "fleet", &format!("{query}&sslrootcert={root}"));
    fleet_server::store::postgres::PgStore::open(&chain("sslmode=verify-ca", &ca_file))
        .expect("verify-ca ignores the name");
    let e = open_err(&chain("sslmode=require", &other_ca));
    assert!(e.contains("UnknownIssuer"), "{e}");
    // A missing root file is named before any connection.
    let e = open_err(&full("localhost", "/nonexistent/ca.pem"));
    assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");

    // `cert` authentication: the client certificate is the credential.
    let e = open_err(
        &at(
            "localhost",
            "clientcert",
            "sslmode=verify-full&sslrootcert=/x",
        )
        .replace("/x", &ca_file),
    );
    assert!(
        e.contains("certificate"),
        "without a client certificate: {e}"
    );
    fleet_server::store::postgres::PgStore::open(&at(
        "localhost",
        "clientcert",
        &format!("sslmode=verify-full&sslrootcert={ca_file}&sslcert={cc}&sslkey={ck}"),
    ))
    .expect("cert authentication");

    // A real server on the database over verified TLS: --check-config
    // reaches it, and every session it opens is encrypted.
    let http = free_port();
    let cfg = config_file(
        dir.path(),
        "tls.toml",
        &dir.path().join("data"),
        http,
        &format!("[store]\nurl = \"{}\"\n", full("localhost", &ca_file)),
    );
    let (out, _) = ok(ServerProc::run(&cfg, &["--check-config"]));
    assert!(out.contains("reachable, schema version"), "{out}");
    let server = ServerProc::start(&cfg, http);
    let sessions = pg.psql(
        "SELECT string_agg(s.ssl::text, ',') FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'fleet-server'",
    );
    assert!(
        !sessions.is_empty() && sessions.split(',').all(|s| s == "true"),
        "the server's sessions, encrypted or not: {sessions:?}"
    );
    server.stop();
}
