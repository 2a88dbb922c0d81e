//! Debian's mosquitto run with the published configuration
//! (docs/brokers/mosquitto.conf and mosquitto.acl) on a free loopback
//! port, its password file kept by the fleet server (which makes it
//! reload with SIGHUP), plus a static `dashboard` login.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use fleet_server::config::{MosquittoConfig, MqttConfig};

use crate::common::{free_port, listening, repo, wait_started};

/// The fleet server's own login at the broker.
pub const SERVER_USER: &str = "fleet-server";

/// A running mosquitto; killed when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    /// Written by the fleet server (devices and its own login).
    pub passwd: PathBuf,
    /// The operator's static logins (`dashboard`).
    pub statics: PathBuf,
}

impl Mosquitto {
    /// Starts `bin` with its files in `dir`; `dashboard` logs in with
    /// `dash_password`.
    pub fn start(dir: &Path, bin: &Path, dash_password: &str) -> Mosquitto {
        let port = free_port();
        let passwd = dir.join("mosquitto.passwd");
        let statics = dir.join("dashboards.passwd");
        let data = dir.join("mosquitto-data");
        std::fs::create_dir_all(&data).expect("mosquitto's data folder");
        std::fs::write(&passwd, "").expect("an empty password file");
        // A dashboard login, the way an operator adds one.
        let st = Command::new("mosquitto_passwd")
            .args(["-c", "-b"])
            .arg(&statics)
            .args(["dashboard", dash_password])
            .status()
            .expect("run mosquitto_passwd");
        assert!(st.success());
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        let conf = std::fs::read_to_string(repo("docs/brokers/mosquitto.conf"))
            .expect("the published mosquitto.conf")
            .replace("@PORT@", &port.to_string())
            .replace("@BIND@", "127.0.0.1")
            .replace("@PASSWORD_FILE@", &passwd.display().to_string())
            .replace(
                "@ACL_FILE@",
                &repo("docs/brokers/mosquitto.acl").display().to_string(),
            )
            .replace("@DATA_DIR@", &data.display().to_string())
            // The test's own user: the files it writes stay readable.
            + &format!("user {user}\n");
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf).expect("write mosquitto.conf");
        let log_path = dir.join("mosquitto.log");
        let log = std::fs::File::create(&log_path).expect("create mosquitto.log");
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&conf_path)
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        wait_started(&mut child, "mosquitto", 10, log, || listening(port));
        Mosquitto {
            child,
            port,
            passwd,
            statics,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The fleet server's `[mqtt]` for this broker: it logs in as
    /// [`SERVER_USER`] with `password` and keeps the password file.
    pub fn server_config(&self, password: &str) -> MqttConfig {
        MqttConfig {
            embedded: false,
            url: Some(self.url()),
            username: Some(SERVER_USER.into()),
            password: Some(password.into()),
            mosquitto: Some(MosquittoConfig {
                password_file: self.passwd.clone(),
                static_password_file: Some(self.statics.clone()),
                reload_command: vec!["kill".into(), "-HUP".into(), self.child.id().to_string()],
            }),
            ..MqttConfig::default()
        }
    }

    /// [`Mosquitto::server_config`] as fleet-server.toml text, with a
    /// shared subscription group when given.
    pub fn server_toml(&self, password: &str, share_group: Option<&str>) -> String {
        self.server_toml_slots(password, share_group, 0)
    }

    /// [`Mosquitto::server_toml`] with `ingest_slots` standbys taking a
    /// share of the device messages (their logins are in the published
    /// ACL file).
    pub fn server_toml_slots(
        &self,
        password: &str,
        share_group: Option<&str>,
        slots: u32,
    ) -> String {
        let mut share = share_group
            .map(|g| format!("share_group = \"{g}\"\n"))
            .unwrap_or_default();
        if slots > 0 {
            share.push_str(&format!("ingest_slots = {slots}\n"));
        }
        format!(
            "[mqtt]\nembedded = false\nurl = \"{url}\"\nusername = \"{SERVER_USER}\"\n\
             password = \"{password}\"\n{share}\
             [mqtt.mosquitto]\npassword_file = \"{passwd}\"\n\
             static_password_file = \"{statics}\"\n\
             reload_command = [\"kill\", \"-HUP\", \"{pid}\"]\n",
            url = self.url(),
            passwd = self.passwd.display(),
            statics = self.statics.display(),
            pid = self.child.id(),
        )
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
