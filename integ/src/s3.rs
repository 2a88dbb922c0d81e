//! A throwaway S3-compatible server: `s3s-fs` (`cargo install s3s-fs
//! --features binary`; `.ci/run` installs it) on a free loopback port,
//! with its own access key, keeping each bucket as a folder of a temporary
//! directory. Without it the tests that need it print SKIPPED, unless
//! `EDGEFLEET_REQUIRE_S3` is set (CI), where they fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::{free_port, listening, wait_started};

pub const ACCESS_KEY: &str = "edgefleet-test-access";
pub const SECRET_KEY: &str = "edgefleet-test-secret-0123456789";

/// `s3s-fs` on PATH or in `~/.cargo/bin`.
pub fn bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("s3s-fs"));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|h| h.join("bin/s3s-fs"));
    on_path.chain(cargo_home).find(|p| p.is_file())
}

/// A running `s3s-fs` with one bucket.
#[derive(Debug)]
pub struct S3 {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    pub bucket: String,
    child: Option<Child>,
}

impl S3 {
    /// Starts the server with an empty `bucket`, or `None` (SKIPPED)
    /// when s3s-fs is not installed.
    pub fn start(test: &str, bucket: &str) -> Option<S3> {
        let Some(bin) = bin() else {
            assert!(
                std::env::var_os("EDGEFLEET_REQUIRE_S3").is_none(),
                "EDGEFLEET_REQUIRE_S3 is set but s3s-fs is not installed \
                 (cargo install s3s-fs --version 0.14.1 --features binary --locked)"
            );
            eprintln!(
                "SKIPPED {test}: s3s-fs is not installed (cargo install s3s-fs --features binary)"
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("edgefleet-s3-")
            .tempdir()
            .expect("a temporary folder");
        // s3s-fs keeps a bucket as a folder of its root.
        std::fs::create_dir_all(dir.path().join("root").join(bucket)).expect("the bucket folder");
        let mut s3 = S3 {
            dir,
            bin,
            port: free_port(),
            bucket: bucket.to_string(),
            child: None,
        };
        s3.run();
        Some(s3)
    }

    fn run(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("s3s-fs.log")).expect("the log");
        let child = Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.dir.path().join("root"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start s3s-fs");
        let mut child = child;
        let port = self.port;
        wait_started(&mut child, "s3s-fs", 30, || self.log(), || listening(port));
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("s3s-fs.log")).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `[bundles]` section of a fleet-server.toml that keeps bundles
    /// under `prefix` in this bucket.
    pub fn bundles_toml(&self, prefix: &str, presign: bool) -> String {
        format!(
            "[bundles]\nurl = \"s3://{bucket}/{prefix}\"\nendpoint = \"{endpoint}\"\n\
             region = \"us-east-1\"\naccess_key_id = \"{ACCESS_KEY}\"\n\
             secret_access_key = \"{SECRET_KEY}\"\npresign_downloads = {presign}\n",
            bucket = self.bucket,
            endpoint = self.endpoint(),
        )
    }

    /// The objects' files under `prefix` (s3s-fs stores each object as a
    /// file), by name.
    pub fn objects(&self, prefix: &str) -> Vec<(String, PathBuf)> {
        let d = self.dir.path().join("root").join(&self.bucket).join(prefix);
        let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(&d)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_file())
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Stops the server (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.stop();
    }
}
