//! `edge-agent run` as a child process: spawn it on a config, find its
//! local API, kill it with SIGKILL, read its floor file.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// A running agent; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct AgentProc {
    pub child: Child,
    /// `http://127.0.0.1:<port>` of its local API.
    pub url: String,
}

impl AgentProc {
    /// Starts `edge-agent run --config <config>`, its stderr appended to
    /// `log`, and waits for the line naming its address.
    pub fn spawn(config: &Path, log: &Path) -> AgentProc {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the agent log");
        let mut child = Command::new(crate::bins::bin("edge-agent"))
            .args(["run", "--config"])
            .arg(config)
            .env("EDGE_AGENT_LOG", "edge_agent=info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn edge-agent");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the agent's first line");
        let Some(url) = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .map(str::to_string)
        else {
            let _ = child.kill();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("the agent did not start (first line {line:?}); its log ends:\n{tail}");
        };
        AgentProc { child, url }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The anti-rollback floor of `model` in an agent's data dir (0: none).
pub fn floor_sequence(data: &Path, model: &str) -> u64 {
    match std::fs::read(data.join("floor.json")) {
        Ok(b) => {
            let v: Value = serde_json::from_slice(&b).expect("the floor file is always whole");
            v["models"][model]["sequence"].as_u64().unwrap_or(0)
        }
        Err(_) => 0,
    }
}
