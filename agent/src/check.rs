//! `edge-agent config check`: everything the daemon would load at start,
//! without starting it, each problem named by file and key; optionally
//! reaching the fleet server and the broker.

use std::path::Path;
use std::time::Duration;

use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::trust::TrustState;

/// Checks `path`; returns what was found good, one line each.
pub async fn check(path: &Path, reach: bool) -> Result<Vec<String>, AgentError> {
    let mut ok = Vec::new();
    let cfg = AgentConfig::load(path)?;
    ok.push(format!(
        "{}: parsed; device {}, data_dir {}",
        path.display(),
        cfg.device_id(),
        cfg.data_dir.display()
    ));
    let trust = TrustState::open(&cfg.trust, &cfg.data_dir)?;
    let t = trust.current();
    ok.push(format!(
        "[trust]: version {}, threshold {} of {} key(s)",
        t.version(),
        t.root().threshold(),
        t.root().key_ids().count()
    ));
    for (url, section, files) in [
        (&cfg.server.url, "[server]", cfg.server_tls()),
        (&cfg.mqtt.url, "[mqtt]", cfg.mqtt_tls()),
    ] {
        let Some(u) = url else { continue };
        if u.starts_with("https://") || u.starts_with("mqtts://") {
            crate::tls::client_config(&files)
                .map_err(|e| AgentError::Config(format!("{section}: {e}")))?;
            ok.push(format!("{section}: TLS files load"));
        }
    }
    if let Some(server) = &cfg.server.url {
        let cred = cfg.data_dir.join("credential");
        match std::fs::read_to_string(&cred) {
            Ok(c) if !c.trim().is_empty() => ok.push(format!("enrolled: {}", cred.display())),
            Ok(_) | Err(_) if cfg.server.enrollment_token.is_some() => ok.push(
                "not enrolled yet: enrolls at the first start with [server] enrollment_token"
                    .into(),
            ),
            _ => {
                return Err(AgentError::Config(format!(
                    "{}: no credential in {} and no [server] enrollment_token: the agent cannot \
                     talk to {server}",
                    path.display(),
                    cred.display()
                )));
            }
        }
    }
    if !reach {
        return Ok(ok);
    }
    if let Some(server) = &cfg.server.url {
        let http = crate::tls::http_client(
            server,
            &cfg.server_tls(),
            reqwest::Client::builder().timeout(Duration::from_secs(10)),
        )?;
        let url = format!("{}/healthz", server.trim_end_matches('/'));
        let r = http.get(&url).send().await.map_err(|e| AgentError::Http {
            url: url.clone(),
            detail: format!("[server] url unreachable: {e}"),
        })?;
        if !r.status().is_success() {
            return Err(AgentError::Http {
                url,
                detail: format!("answered {}", r.status()),
            });
        }
        ok.push(format!("[server]: {url} answers"));
    }
    if let Some(mqtt) = &cfg.mqtt.url {
        let hostport = mqtt
            .split_once("://")
            .map_or(mqtt.as_str(), |(_, rest)| rest)
            .trim_end_matches('/');
        let addr = if hostport.contains(':') {
            hostport.to_string()
        } else if mqtt.starts_with("mqtts://") {
            format!("{hostport}:8883")
        } else {
            format!("{hostport}:1883")
        };
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        .map_err(|_| AgentError::Config(format!("[mqtt] url {mqtt}: no answer in 10 s")))?
        .map_err(|e| AgentError::Config(format!("[mqtt] url {mqtt}: {e}")))?;
        ok.push(format!("[mqtt]: {addr} accepts connections"));
    }
    Ok(ok)
}
