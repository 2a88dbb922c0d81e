//! Mosquitto as the external broker: the fleet server keeps mosquitto's
//! password file — every enrolled device (username = device id, its
//! credential's PBKDF2-SHA512 hash in mosquitto's `$7$` format) and the
//! server's own login, plus the lines of an operator-kept file
//! (dashboards, made with `mosquitto_passwd`) — and makes mosquitto reload
//! it. The per-device ACL is a static `acl_file` with `pattern` lines
//! (`%u`), and `use_username_as_clientid true` ties each session to its
//! login: see docs/brokers.md.
//!
//! (mosquitto 2.0's dynamic-security plugin does not expand `%u` in role
//! ACLs and ignores a client's fixed client id, so it cannot express
//! "a device may touch only its own topics" without one role per device.)

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha512};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use crate::config::MosquittoConfig;
use crate::error::{Error, Result};
use crate::fleet::{Fleet, lock};

/// mosquitto's PBKDF2 iterations for `$7$` hashes.
const ITERATIONS: u32 = 101;

fn hmac_sha512(key: &[u8], msg: &[&[u8]]) -> [u8; 64] {
    const BLOCK: usize = 128;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..64].copy_from_slice(&Sha512::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha512::new();
    inner.update(k.map(|b| b ^ 0x36));
    for m in msg {
        inner.update(m);
    }
    let mut outer = Sha512::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// PBKDF2-HMAC-SHA512 with one 64-byte block (RFC 8018 §5.2).
fn pbkdf2_sha512(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 64] {
    let mut u = hmac_sha512(password, &[salt, &1u32.to_be_bytes()]);
    let mut t = u;
    for _ in 1..iterations {
        u = hmac_sha512(password, &[&u]);
        for (a, b) in t.iter_mut().zip(u) {
            *a ^= b;
        }
    }
    t
}

/// A password-file hash as `mosquitto_passwd` writes it.
pub fn hash_with_salt(password: &str, salt: &[u8; 12]) -> String {
    let dk = pbkdf2_sha512(password.as_bytes(), salt, ITERATIONS);
    format!("$7${ITERATIONS}${}${}", B64.encode(salt), B64.encode(dk))
}

/// A hash with a fresh random salt.
pub fn hash(password: &str) -> Result<String> {
    let mut salt = [0u8; 12];
    getrandom::fill(&mut salt).map_err(|e| Error::Store(format!("random: {e}")))?;
    Ok(hash_with_salt(password, &salt))
}

/// Keeps the password file in step with the inventory.
#[derive(Debug)]
pub struct Sync {
    cfg: MosquittoConfig,
    /// The server's own login line.
    server_line: String,
    server_user: String,
    dirty: Notify,
}

impl Sync {
    /// `slots` logins `<server_user>-1` … for the standbys' shared
    /// ingest get the server's password too.
    pub fn new(
        cfg: MosquittoConfig,
        server_user: &str,
        server_password: &str,
        slots: u32,
    ) -> Result<Arc<Sync>> {
        let h = hash(server_password)?;
        let mut server_line = format!("{server_user}:{h}");
        for n in 1..=slots {
            server_line.push_str(&format!("\n{server_user}-{n}:{h}"));
        }
        Ok(Arc::new(Sync {
            cfg,
            server_line,
            server_user: server_user.to_string(),
            dirty: Notify::new(),
        }))
    }

    /// Asks for a rewrite (debounced).
    pub fn changed(&self) {
        self.dirty.notify_one();
    }

    /// The file's contents for the current inventory.
    fn render(&self, fleet: &Fleet) -> Result<String> {
        let mut out = String::new();
        out.push_str(&self.server_line);
        out.push('\n');
        if let Some(p) = &self.cfg.static_password_file {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                out.push_str(line);
                out.push('\n');
            }
        }
        for cell in fleet.cells() {
            let d = lock(&cell);
            // A device enrolled under a server login before such ids
            // were refused never gets that login.
            let id = d.rec.id.as_str();
            let user = self.server_user.as_str();
            if d.rec.is_revoked()
                || crate::api::devices::reserved_device_id(id, None)
                || id
                    .strip_prefix(user)
                    .is_some_and(|r| r.is_empty() || r.starts_with('-'))
            {
                continue;
            }
            if let Some(h) = &d.rec.identity.broker_password {
                out.push_str(&d.rec.id);
                out.push(':');
                out.push_str(h);
                out.push('\n');
            }
        }
        Ok(out)
    }

    fn write(&self, text: &str) -> Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = &self.cfg.password_file;
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    fn reload(&self) -> Result<()> {
        let Some((cmd, args)) = self.cfg.reload_command.split_first() else {
            return Ok(());
        };
        let st = std::process::Command::new(cmd)
            .args(args)
            .status()
            .map_err(|e| Error::io(Path::new(cmd), e))?;
        if !st.success() {
            return Err(Error::Usage(format!(
                "[mqtt.mosquitto] reload_command {:?} failed: {st}",
                self.cfg.reload_command
            )));
        }
        Ok(())
    }

    /// Writes the file and reloads mosquitto once now, then after every
    /// change (at most every 500 ms), until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        fleet: Arc<Fleet>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        loop {
            let (s, f) = (self.clone(), fleet.clone());
            let done = tokio::task::spawn_blocking(move || {
                let text = s.render(&f)?;
                s.write(&text)?;
                s.reload()
            })
            .await
            .map_err(|e| Error::Store(e.to_string()))?;
            if let Err(e) = done {
                tracing::error!(error = %e, "cannot update mosquitto's password file");
            }
            tokio::select! {
                () = self.dirty.notified() => {}
                () = shutdown.cancelled() => return Ok(()),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_mosquitto_passwd() {
        // `mosquitto_passwd -b` wrote this line for alice/secret; same salt,
        // same hash.
        let line = "$7$101$sIP/QkAy0dq44Tje$5ytG5SF/yCYXnmgAvyTDJtce0xoflE/4JU+JSSpTEz6d/s9RYemlloidkm0HxsO00YFb7PCdxEWwMxfFEuJltw==";
        let salt: [u8; 12] = B64.decode("sIP/QkAy0dq44Tje").unwrap().try_into().unwrap();
        assert_eq!(hash_with_salt("secret", &salt), line);
        assert_ne!(hash("secret").unwrap(), line, "a fresh salt each time");
    }

    #[test]
    fn slot_logins_share_the_servers_password_and_devices_never_wear_them() {
        use crate::store::{DeviceRecord, Identity};
        let cfg = MosquittoConfig::default();
        let sync = Sync::new(cfg, "fleet-server", "pw", 2).unwrap();
        let fleet = Fleet::default();
        for id in ["cam-1", "fleet-server-1", "fleet-server", "fleet-serverx"] {
            fleet.insert(DeviceRecord::enrolled(
                id.into(),
                Identity {
                    tags: Default::default(),
                    arch: "x86_64".into(),
                    agent_version: "0.1.0".into(),
                    credential_sha256: "c".into(),
                    enrolled_at: 1,
                    enrolled_with: None,
                    revoked_at: None,
                    broker_password: Some(format!("hash-of-{id}")),
                },
            ));
        }
        let text = sync.render(&fleet).unwrap();
        let users: Vec<&str> = text.lines().filter_map(|l| l.split(':').next()).collect();
        assert_eq!(
            users,
            [
                "fleet-server",
                "fleet-server-1",
                "fleet-server-2",
                "cam-1",
                "fleet-serverx"
            ],
            "{text}"
        );
        let hashes: Vec<&str> = text
            .lines()
            .take(3)
            .map(|l| &l[l.find(':').unwrap()..])
            .collect();
        assert!(hashes.iter().all(|h| *h == hashes[0]), "{text}");
        for reserved in ["hash-of-fleet-server-1\n", "hash-of-fleet-server\n"] {
            assert!(!text.contains(reserved), "{text}");
        }
    }

    #[test]
    fn hmac_sha512_rfc_4231_case_2() {
        let mac = hmac_sha512(b"Jefe", &[b"what do ya want for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
        );
    }
}
