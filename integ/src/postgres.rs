//! A throwaway PostgreSQL server from Debian's packages: `initdb` into a
//! temporary folder, `postgres` on a free loopback port, stopped and
//! removed on drop. PostgreSQL refuses to run as root, so when the tests
//! run as root (CI) the folder goes to `nobody` and both programs run
//! under `setpriv` as that user.
//!
//! Without the packages [`Postgres::start`] returns `None` (the caller
//! prints SKIPPED), unless `EDGEFLEET_REQUIRE_POSTGRES` is set, as
//! `.ci/run` does: then a missing PostgreSQL fails the test.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::free_port;

/// `nobody` and `nogroup` on Debian.
const NOBODY: u32 = 65534;

/// The folder holding `initdb` and `postgres`: `EDGEFLEET_PG_BIN`, else
/// the newest `/usr/lib/postgresql/<major>/bin`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("EDGEFLEET_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A running PostgreSQL server with a database per [`Postgres::database`].
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    root: bool,
    /// Set by [`Postgres::start_tls`]: URLs ask for TLS.
    tls: bool,
}

/// The files of a TLS-only server ([`Postgres::start_tls`]), PEM.
#[derive(Debug)]
pub struct ServerTls<'a> {
    pub cert: &'a str,
    pub key: &'a str,
    /// The CA client certificates are checked against.
    pub client_ca: &'a str,
}

impl Postgres {
    /// initdb + start, or `None` (SKIPPED) without PostgreSQL installed.
    pub fn start(test: &str) -> Option<Postgres> {
        Self::start_with(test, None)
    }

    /// A server that takes TCP connections over TLS only (`hostssl`
    /// lines, no `host` line): `trust` for every database except
    /// `clientcert`, which takes `cert` authentication (the client
    /// certificate's CN is the user).
    pub fn start_tls(test: &str, tls: &ServerTls<'_>) -> Option<Postgres> {
        Self::start_with(test, Some(tls))
    }

    fn start_with(test: &str, tls: Option<&ServerTls<'_>>) -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var_os("EDGEFLEET_REQUIRE_POSTGRES").is_none(),
                "EDGEFLEET_REQUIRE_POSTGRES is set but no PostgreSQL is installed \
                 (apt-get install postgresql)"
            );
            eprintln!("SKIPPED {test}: PostgreSQL is not installed (apt-get install postgresql)");
            return None;
        };
        let root = is_root();
        // `nobody` must reach the folder: under /tmp, not under a TMPDIR
        // that may sit in root's home.
        let parent = if root {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("edgefleet-pg-")
            .tempdir_in(parent)
            .expect("a temporary folder");
        if root {
            std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY))
                .expect("give the folder to nobody");
        }
        let mut pg = Postgres {
            dir,
            bin,
            port: free_port(),
            child: None,
            root,
            tls: tls.is_some(),
        };
        let data = pg.data();
        let out = pg
            .command("initdb")
            .args(["--auth=trust", "--username=edgefleet", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync", "--no-instructions", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(tls) = tls {
            pg.configure_tls(tls);
        }
        pg.run();
        Some(pg)
    }

    /// Writes the certificate files into the data folder (the key only
    /// the server's user may read, as PostgreSQL demands) and turns TLS
    /// on for every TCP connection.
    fn configure_tls(&self, tls: &ServerTls<'_>) {
        use std::os::unix::fs::PermissionsExt as _;
        let data = self.data();
        for (file, text) in [
            ("server.crt", tls.cert),
            ("server.key", tls.key),
            ("client-ca.crt", tls.client_ca),
        ] {
            let p = data.join(file);
            std::fs::write(&p, text).expect("write a TLS file");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .expect("chmod a TLS file");
            if self.root {
                std::os::unix::fs::chown(&p, Some(NOBODY), Some(NOBODY))
                    .expect("give a TLS file to nobody");
            }
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        std::io::Write::write_all(
            &mut conf,
            b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
              ssl_ca_file = 'client-ca.crt'\n",
        )
        .expect("append to postgresql.conf");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl clientcert all 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 trust\n",
        )
        .expect("write pg_hba.conf");
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `program` from the PostgreSQL folder, as `nobody` when we are root.
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        let mut c = if self.root {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                "--",
            ])
            .arg(exe);
            c
        } else {
            Command::new(exe)
        };
        // Our own working folder may not be readable by `nobody`.
        c.current_dir(self.dir.path()).env("LC_ALL", "C");
        c
    }

    /// Starts the server on the existing data folder and waits until it
    /// takes connections.
    fn run(&mut self) {
        let log = std::fs::File::create(self.log_path()).expect("create the server log");
        if self.root {
            std::os::unix::fs::chown(self.log_path(), Some(NOBODY), Some(NOBODY))
                .expect("give the log to nobody");
        }
        let mut child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            // A test database: durability across power loss is not what
            // the tests measure (restarts are clean shutdowns or kill -9
            // of the fleet server, not of PostgreSQL).
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let (url, log) = (self.url(), self.log_path());
        crate::common::wait_started(
            &mut child,
            "postgres",
            60,
            || std::fs::read_to_string(&log).unwrap_or_default(),
            || {
                // On its own thread: the blocking client may not run on
                // an async test's runtime thread.
                let url = url.clone();
                std::thread::spawn(move || fleet_server::store::postgres::probe(&url).is_ok())
                    .join()
                    .expect("the probe thread")
            },
        );
        self.child = Some(child);
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The URL of the default database.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of database `name` (see [`Postgres::database`]).
    pub fn url_of(&self, name: &str) -> String {
        let tls = if self.tls { "?sslmode=require" } else { "" };
        format!("postgres://edgefleet@127.0.0.1:{}/{name}{tls}", self.port)
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `sql` as the superuser over the Unix socket; its output
    /// (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> String {
        let out = self
            .command("psql")
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string()])
            .args(["-U", "edgefleet", "-d", "postgres", "-v", "ON_ERROR_STOP=1"])
            .args(["-A", "-t", "-c", sql])
            .output()
            .expect("run psql (beside initdb, as Debian installs it)");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Creates database `name` and returns its URL.
    pub fn database(&self, name: &str) -> String {
        self.psql(&format!("CREATE DATABASE \"{name}\""));
        self.url_of(name)
    }

    /// Stops the server (fast shutdown: connections are cut, data kept).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the stopped server again on the same data and port.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// The data folder (for tests that look at it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
