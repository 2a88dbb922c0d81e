//! The anti-rollback floor (TUF 5.4.4-style rollback protection for model
//! bundles), in its own file written with write, fsync, rename (FACTS.md:
//! not in sled). It is raised before a bundle is activated and never
//! lowered.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use edgefleet_wire::manifest::Manifest;
use edgefleet_wire::verify::Verified;
use serde::{Deserialize, Serialize};

use crate::error::AgentError;
use crate::store::write_atomic;

/// Per model name: the highest sequence activated here and the bundle that
/// set it, plus every bundle this device ran (explicit rollback targets).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Floor {
    pub models: BTreeMap<String, ModelFloor>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFloor {
    pub sequence: u64,
    /// The bundle id (sha256) that raised the floor to `sequence`.
    pub bundle: String,
    /// Bundle ids this device has run.
    pub ran: BTreeSet<String>,
}

/// Why the floor refuses a bundle.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "anti-rollback: {name} sequence {sequence} is not above {floor}, the highest this device has run"
    )]
    BelowFloor {
        name: String,
        sequence: u64,
        floor: u64,
    },
    #[error(
        "anti-rollback: a rollback to {id} was requested, but this device never ran that bundle"
    )]
    NeverRan { id: String },
}

impl Floor {
    /// May `id` (model `name`, `sequence`) be installed? Sequences above the
    /// floor may; the bundle that set the floor may be re-installed (a
    /// restart between raising the floor and activating); an older bundle
    /// only on an explicit rollback request, and only if it ran here.
    pub fn permits(
        &self,
        name: &str,
        sequence: u64,
        id: &str,
        rollback: bool,
    ) -> Result<(), Refusal> {
        let Some(m) = self.models.get(name) else {
            return Ok(());
        };
        if sequence > m.sequence || (sequence == m.sequence && id == m.bundle) {
            return Ok(());
        }
        if rollback {
            if m.ran.contains(id) {
                return Ok(());
            }
            return Err(Refusal::NeverRan { id: id.to_string() });
        }
        Err(Refusal::BelowFloor {
            name: name.to_string(),
            sequence,
            floor: m.sequence,
        })
    }

    /// Records that the verified bundle `id` runs here; raises the floor if
    /// its sequence is higher. Returns whether anything changed. Only a
    /// manifest whose signatures passed can move the floor.
    pub fn raise(&mut self, manifest: &Verified<Manifest>, id: &str) -> bool {
        self.raise_to(manifest.name.as_str(), manifest.sequence, id)
    }

    fn raise_to(&mut self, name: &str, sequence: u64, id: &str) -> bool {
        let m = self.models.entry(name.to_string()).or_default();
        let mut changed = m.ran.insert(id.to_string());
        if sequence > m.sequence || m.bundle.is_empty() {
            m.sequence = sequence;
            m.bundle = id.to_string();
            changed = true;
        }
        changed
    }
}

/// The floor file of a data dir.
#[derive(Debug, Clone)]
pub struct FloorFile {
    path: PathBuf,
}

impl FloorFile {
    pub fn new(data_dir: &Path) -> FloorFile {
        FloorFile {
            path: data_dir.join("floor.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A missing file is an empty floor. An unreadable one is an error: the
    /// caller must not guess lower.
    pub fn load(&self) -> Result<Floor, AgentError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                AgentError::Store(format!("{}: unreadable floor: {e}", self.path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Floor::default()),
            Err(e) => Err(AgentError::io(&self.path, e)),
        }
    }

    /// Durable when it returns.
    pub fn save(&self, floor: &Floor) -> Result<(), AgentError> {
        let bytes =
            serde_json::to_vec_pretty(floor).map_err(|e| AgentError::Invariant(e.to_string()))?;
        write_atomic(&self.path, &bytes, 0o644)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_higher_sequences_or_explicit_rollbacks_to_bundles_that_ran() {
        let mut f = Floor::default();
        assert!(f.permits("cls", 1, "a", false).is_ok());
        f.raise_to("cls", 1, "a");
        f.raise_to("cls", 3, "c");
        assert!(f.permits("cls", 4, "d", false).is_ok());
        assert!(
            f.permits("cls", 3, "c", false).is_ok(),
            "re-install of the floor bundle"
        );
        assert!(matches!(
            f.permits("cls", 3, "other", false),
            Err(Refusal::BelowFloor { floor: 3, .. })
        ));
        assert!(matches!(
            f.permits("cls", 1, "a", false),
            Err(Refusal::BelowFloor { .. })
        ));
        assert!(f.permits("cls", 1, "a", true).is_ok());
        assert!(matches!(
            f.permits("cls", 2, "b", true),
            Err(Refusal::NeverRan { .. })
        ));
        assert!(f.permits("rec", 1, "x", false).is_ok(), "per model name");
        // A rollback never lowers the floor.
        f.raise_to("cls", 1, "a");
        assert_eq!(f.models["cls"].sequence, 3);
    }

    #[test]
    fn floor_file_round_trips_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let ff = FloorFile::new(dir.path());
        assert_eq!(ff.load().unwrap(), Floor::default());
        let mut f = Floor::default();
        f.raise_to("cls", 7, "abc");
        ff.save(&f).unwrap();
        assert_eq!(ff.load().unwrap(), f);
        std::fs::write(ff.path(), b"{not json").unwrap();
        assert!(
            ff.load()
                .unwrap_err()
                .to_string()
                .contains("unreadable floor")
        );
    }
}
