//! systemd's notify protocol (`Type=notify`, `WatchdogSec=`), without a
//! dependency: one datagram per message to `$NOTIFY_SOCKET`. Every call is
//! a no-op when the agent does not run under systemd.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where to send notifications.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

#[derive(Debug, Clone)]
enum Target {
    Path(PathBuf),
    /// Linux abstract socket (`@name` in the variable).
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|s| {
            let s = s.to_string_lossy().to_string();
            if let Some(name) = s.strip_prefix('@') {
                Some(Target::Abstract(name.as_bytes().to_vec()))
            } else if s.starts_with('/') {
                Some(Target::Path(PathBuf::from(s)))
            } else {
                None
            }
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// Notifications to a socket path (tests).
    pub fn new(path: impl Into<PathBuf>, watchdog: Option<Duration>) -> Notifier {
        Notifier {
            target: Some(Target::Path(path.into())),
            watchdog,
        }
    }

    /// Not under systemd.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// How often to send `WATCHDOG=1`: half the configured timeout.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    fn send(&self, msg: &str) {
        let Some(target) = &self.target else { return };
        let Ok(sock) = UnixDatagram::unbound() else {
            return;
        };
        let r = match target {
            Target::Path(p) => sock.send_to(msg.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                match std::os::unix::net::SocketAddr::from_abstract_name(name) {
                    Ok(addr) => sock.send_to_addr(msg.as_bytes(), &addr),
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    /// Start-up finished: the model is served (or there is none yet).
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// Still alive (the event loop runs).
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// Free-form status shown by `systemctl status`.
    pub fn status(&self, s: &str) {
        self.send(&format!("STATUS={}", s.replace('\n', " ")));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sends_ready_watchdog_status_and_stopping_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let n = Notifier::new(&path, Some(Duration::from_secs(20)));
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(10)));
        n.ready();
        n.watchdog();
        n.status("serving cls 1.0.0\nline two");
        n.stopping();
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        for _ in 0..4 {
            let k = server.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..k]).to_string());
        }
        assert_eq!(
            got,
            [
                "READY=1",
                "WATCHDOG=1",
                "STATUS=serving cls 1.0.0 line two",
                "STOPPING=1"
            ]
        );
    }

    #[test]
    fn disabled_is_silent() {
        let n = Notifier::disabled();
        assert_eq!(n.watchdog_interval(), None);
        n.ready();
    }
}
