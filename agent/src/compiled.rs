//! Compiled models: an installed ONNX bundle's graph as tract left it after
//! decluttering, kept next to the bundle as NNEF, so that the next load of
//! that bundle (an agent restart, a reboot, a rollback) skips the ONNX front
//! end and decluttering: about half of an ONNX model's cold start
//! (docs/benchmarks.md).
//!
//! A compiled file is derived data, never a source of trust:
//! - the bundle is still opened and its signatures and payload digest
//!   verified on every load; the compiled file only replaces parsing it;
//! - the file is named after the bundle, the runtime and agent build that
//!   wrote it ([`edgefleet_runtime::decluttered_epoch`], the commit) and the
//!   SHA-256 of its content, which is compared while tract parses it;
//! - the model it loads must pass the bundle's golden self-test like any
//!   other before it serves.
//!
//! Any failure deletes the file and loads the bundle itself. A file damaged
//! on disk (its digest) is written again by that load; a form that loaded
//! but failed (a parse error, a failed self-test) would fail again, so this
//! runtime marks it and never writes it for that bundle again
//! ([`CompiledModels::reject`]).
//! Files are written to a temporary name, synced, then renamed, so a kill
//! leaves either no file or a whole one; the slots' garbage collection
//! removes them with their bundle ([`crate::updater::Slots::collect`]), and
//! a full disk is never made fuller by one (see [`CompiledModels::store`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use edgefleet_runtime::Decluttered;
use sha2::{Digest, Sha256};

/// Room a compiled file leaves free after it is written, beyond its own
/// size again (a download of a bundle like this one).
const SPARE_BYTES: u64 = 16 << 20;

/// The compiled files of one directory (the slots' `bundles/`).
#[derive(Clone, Debug)]
pub struct CompiledModels {
    dir: PathBuf,
}

/// A compiled file found for a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    /// The SHA-256 its name promises.
    pub sha256: [u8; 32],
}

/// Why a compiled file was not written.
#[derive(Debug, thiserror::Error)]
pub enum NotStored {
    #[error("this model has no NNEF form in this runtime: {0}")]
    Unsupported(String),
    #[error("this runtime's compiled form of this model failed before: not written again")]
    FailedBefore,
    #[error("{needed} bytes free needed to keep the compiled model, {free} free")]
    NoRoom { needed: u64, free: u64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a compiled file was not used.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// Unreadable, or its content does not match the digest in its name.
    #[error("{0}")]
    Damaged(String),
    /// It matched, but did not load or failed the bundle's self-test.
    #[error("{0}")]
    Failed(crate::error::AgentError),
}

/// Process-wide counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counts {
    /// Loads served from a compiled file.
    pub used: AtomicU64,
    /// Compiled files written.
    pub written: AtomicU64,
    /// Compiled files deleted because they did not match their digest,
    /// did not load or failed the self-test.
    pub rejected: AtomicU64,
    /// Models not kept compiled (no NNEF form, no room, an I/O error, a
    /// compiled form of it that failed before).
    pub not_stored: AtomicU64,
}

pub static COUNTS: Counts = Counts {
    used: AtomicU64::new(0),
    written: AtomicU64::new(0),
    rejected: AtomicU64::new(0),
    not_stored: AtomicU64::new(0),
};

impl CompiledModels {
    pub fn new(dir: impl Into<PathBuf>) -> CompiledModels {
        CompiledModels { dir: dir.into() }
    }

    /// `<key>.compiled-<runtime epoch>-<agent commit>-`: the key first, so
    /// that the slots' garbage collection (which reads the part before the
    /// first dot) sees a file of that bundle. No dots follow the first.
    fn prefix(key: &str) -> String {
        let commit: String = env!("EDGEFLEET_GIT_COMMIT")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect();
        format!(
            "{key}.compiled-{}-{commit}-",
            edgefleet_runtime::decluttered_epoch().replace('.', "_")
        )
    }

    /// The marker of a compiled form that loaded but failed: `key`'s
    /// compiled files are not written again by this agent build.
    fn failed_marker(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}failed", Self::prefix(key)))
    }

    /// The compiled file of `key` written by this runtime, if any. Writes
    /// of one that a kill interrupted (by another process) are deleted on
    /// the way.
    pub fn lookup(&self, key: &str) -> Option<Found> {
        let prefix = Self::prefix(key);
        let interrupted = format!("{key}.compiling-");
        let mine = std::process::id().to_string();
        let mut found = None;
        for entry in std::fs::read_dir(&self.dir).ok()?.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if name
                .strip_prefix(&interrupted)
                .is_some_and(|pid| pid != mine)
            {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Some(digest) = name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix("-nnef"))
            else {
                continue;
            };
            let mut sha256 = [0u8; 32];
            if hex::decode_to_slice(digest, &mut sha256).is_ok() {
                found = Some(Found {
                    path: entry.path(),
                    sha256,
                });
            }
        }
        found
    }

    /// Writes `nnef` as the compiled file of `key`, replacing any other
    /// (an older runtime's, or a leftover of a killed write). Refused when
    /// it would leave less than its own size plus [`SPARE_BYTES`] free: a
    /// compiled file only saves time, and must never cost an update its
    /// room.
    pub fn store(&self, key: &str, nnef: &[u8]) -> Result<PathBuf, NotStored> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| NotStored::Io { path, source }
        };
        if self.failed_marker(key).exists() {
            return Err(NotStored::FailedBefore);
        }
        self.remove_all(key);
        let free = crate::updater::slots::free_bytes(&self.dir).unwrap_or(0);
        let needed = 2 * nnef.len() as u64 + SPARE_BYTES;
        if free < needed {
            return Err(NotStored::NoRoom { needed, free });
        }
        let digest = hex::encode(Sha256::digest(nnef));
        let path = self.dir.join(format!("{}{digest}-nnef", Self::prefix(key)));
        let tmp = self
            .dir
            .join(format!("{key}.compiling-{}", std::process::id()));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(nnef).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
            std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.dir))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    }

    /// Deletes every compiled file of `key` (whatever runtime wrote it) and
    /// any write of one that a kill interrupted.
    fn remove_all(&self, key: &str) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let (compiled, compiling) = (format!("{key}.compiled-"), format!("{key}.compiling-"));
        for entry in rd.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&compiled) || name.starts_with(&compiling) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Deletes a compiled file that failed, counting it. A file whose
    /// content no longer matches its digest was damaged on disk, and is
    /// written again at the next load from the bundle. One that matched but
    /// did not load or failed the self-test would fail the same way again:
    /// a marker keeps this runtime from writing it again for `key` (one
    /// failed write per bundle, not one per start, on flash storage).
    pub fn reject(&self, key: &str, found: &Found, failure: &Rejection) {
        COUNTS.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            file = %found.path.display(),
            error = %failure,
            "compiled model rejected: deleted, loading the bundle itself"
        );
        if let Err(e) = std::fs::remove_file(&found.path) {
            tracing::warn!(file = %found.path.display(), error = %e, "cannot delete a rejected compiled model");
        }
        if let Rejection::Failed(_) = failure {
            let marker = self.failed_marker(key);
            if let Err(e) = std::fs::write(&marker, b"") {
                tracing::warn!(file = %marker.display(), error = %e, "cannot mark a failed compiled model");
            }
        }
    }

    /// Writes `model` as the compiled file of `key` on a thread of its own
    /// (serializing rec takes about as long as loading it), counting the
    /// outcome. Freed memory goes back to the system when it is done.
    pub fn keep_in_background(
        &self,
        key: String,
        model: Decluttered,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("compile".into())
            .spawn(move || {
                let t = std::time::Instant::now();
                let stored = model
                    .into_nnef()
                    .map_err(|e| NotStored::Unsupported(e.to_string()))
                    .and_then(|nnef| this.store(&key, &nnef).map(|p| (p, nnef.len())));
                match stored {
                    Ok((path, bytes)) => {
                        COUNTS.written.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            file = %path.display(),
                            bytes,
                            ms = t.elapsed().as_secs_f64() * 1e3,
                            "model kept compiled for its next load"
                        );
                    }
                    Err(e) => {
                        COUNTS.not_stored.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(bundle = %key, reason = %e, "model not kept compiled");
                    }
                }
                crate::mem::release_freed();
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_file_is_found_by_its_key_and_names_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let c = CompiledModels::new(dir.path());
        assert_eq!(c.lookup("abc"), None);
        let path = c.store("abc", b"graph").unwrap();
        let found = c.lookup("abc").unwrap();
        assert_eq!(found.path, path);
        assert_eq!(found.sha256, <[u8; 32]>::from(Sha256::digest(b"graph")));
        assert_eq!(std::fs::read(&path).unwrap(), b"graph");
        assert_eq!(c.lookup("ab"), None);
        // The bundle's id comes before the first dot, for the slots' collection.
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(name.split('.').next(), Some("abc"));
        assert_eq!(name.matches('.').count(), 1, "{name}");
    }

    #[test]
    fn storing_again_replaces_the_old_file_and_an_interrupted_write() {
        let dir = tempfile::tempdir().unwrap();
        let c = CompiledModels::new(dir.path());
        let old = c.store("abc", b"one").unwrap();
        let other_runtime = dir.path().join(format!(
            "abc.compiled-tract-0_0_1-runtime-0_0_1-{}-nnef",
            "00".repeat(32)
        ));
        std::fs::write(&other_runtime, b"x").unwrap();
        std::fs::write(dir.path().join("abc.compiling-1"), b"half").unwrap();
        std::fs::write(dir.path().join("abd.bundle"), b"keep").unwrap();
        let new = c.store("abc", b"two").unwrap();
        assert_ne!(old, new);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let new_name = new.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(names, [new_name, "abd.bundle".to_owned()]);
    }

    #[test]
    fn rejecting_deletes_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let c = CompiledModels::new(dir.path());
        c.store("abc", b"graph").unwrap();
        let found = c.lookup("abc").unwrap();
        let before = COUNTS.rejected.load(Ordering::Relaxed);
        c.reject("abc", &found, &Rejection::Damaged("test".into()));
        assert!(COUNTS.rejected.load(Ordering::Relaxed) > before);
        assert_eq!(c.lookup("abc"), None);
        assert!(!found.path.exists());
        // Damaged on disk: written again.
        c.store("abc", b"graph").unwrap();
        let found = c.lookup("abc").unwrap();
        let failed = crate::error::AgentError::Invariant("self-test".into());
        c.reject("abc", &found, &Rejection::Failed(failed));
        assert_eq!(c.lookup("abc"), None);
        // Failed as a model: never written again by this runtime, while
        // other bundles are.
        assert!(matches!(
            c.store("abc", b"graph"),
            Err(NotStored::FailedBefore)
        ));
        assert_eq!(c.lookup("abc"), None);
        c.store("abd", b"graph").unwrap();
    }

    #[test]
    fn a_write_interrupted_in_another_process_is_cleaned_up_by_a_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let c = CompiledModels::new(dir.path());
        let other = dir.path().join("abc.compiling-1");
        let mine = dir
            .path()
            .join(format!("abc.compiling-{}", std::process::id()));
        std::fs::write(&other, b"half").unwrap();
        std::fs::write(&mine, b"half").unwrap();
        assert_eq!(c.lookup("abc"), None);
        assert!(!other.exists(), "a killed write is removed");
        assert!(mine.exists(), "a write in progress here is not");
    }
}
