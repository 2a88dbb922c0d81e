//! Bundle files of a data dir: `bundles/<id>.bundle` (complete, named by
//! content address) and `bundles/<id>.part` (a download in progress), plus
//! what the filesystem under them has free.

use std::path::{Path, PathBuf};

use edgefleet_wire::bundle::StreamDigest;

use crate::error::AgentError;

#[derive(Clone, Debug)]
pub struct Slots {
    dir: PathBuf,
}

impl Slots {
    pub fn new(data_dir: &Path) -> Result<Slots, AgentError> {
        let dir = data_dir.join("bundles");
        std::fs::create_dir_all(&dir).map_err(|e| AgentError::io(&dir, e))?;
        Ok(Slots { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.bundle"))
    }

    /// The compiled models kept next to the bundles ([`crate::compiled`]);
    /// [`Slots::collect`] removes them with their bundle.
    pub fn compiled(&self) -> crate::compiled::CompiledModels {
        crate::compiled::CompiledModels::new(&self.dir)
    }

    /// Where [`crate::engine::prepare_with`] keeps bundle `id`'s compiled
    /// model, if the configuration keeps them.
    pub fn compiled_for(
        &self,
        id: &str,
        cfg: &crate::config::AgentConfig,
    ) -> Option<crate::engine::Compiled> {
        cfg.engine.keep_compiled.then(|| crate::engine::Compiled {
            models: self.compiled(),
            key: id.to_owned(),
        })
    }

    pub fn part(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.part"))
    }

    /// Deletes every bundle file (complete or partial) except those of
    /// `keep`, logging each removal. Returns the bytes freed.
    pub fn collect(&self, keep: &[&str]) -> Result<u64, AgentError> {
        let mut freed = 0;
        let rd = std::fs::read_dir(&self.dir).map_err(|e| AgentError::io(&self.dir, e))?;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let id = name.split('.').next().unwrap_or_default();
            if keep.contains(&id) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(entry.path()).map_err(|e| AgentError::io(entry.path(), e))?;
            tracing::info!(file = %name, bytes = size, "removed an old bundle file");
            freed += size;
        }
        Ok(freed)
    }

    /// Deletes partial downloads (they are fetched again) and compiled
    /// models (written again at the next load), logging each: the room of
    /// last resort on a full disk. Returns the bytes freed.
    pub fn discard_partials(&self) -> u64 {
        self.discard("a partial download or compiled model", |name| {
            name.ends_with(".part") || is_compiled(name)
        })
    }

    /// Deletes the compiled models (written again at the next load of their
    /// bundle), logging each: room for a download that lacks it. Returns
    /// the bytes freed.
    pub fn discard_compiled(&self) -> u64 {
        self.discard("a compiled model", is_compiled)
    }

    fn discard(&self, what: &str, pick: impl Fn(&str) -> bool) -> u64 {
        let mut freed = 0;
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !pick(&name) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::warn!(file = %name, bytes = size, "short of disk space: discarded {what}");
                    freed += size;
                }
                Err(e) => tracing::warn!(file = %name, error = %e, "cannot discard {what}"),
            }
        }
        freed
    }

    /// Bytes available to this process on the filesystem of the slots.
    pub fn free_bytes(&self) -> Result<u64, AgentError> {
        free_bytes(&self.dir)
    }
}

/// A compiled model, or an interrupted write of one ([`crate::compiled`]).
fn is_compiled(name: &str) -> bool {
    name.contains(".compiled-") || name.contains(".compiling-")
}

/// Bytes available to an unprivileged writer on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> Result<u64, AgentError> {
    let st = rustix::fs::statvfs(path)
        .map_err(|e| AgentError::io(path, std::io::Error::from_raw_os_error(e.raw_os_error())))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Whether an I/O error means the disk (or quota) is full.
pub fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.raw_os_error() == Some(28) // ENOSPC
        || e.raw_os_error() == Some(122) // EDQUOT
}

/// The content address of a file (see
/// `edgefleet_wire::bundle::content_address`).
pub fn file_content_address(path: &Path) -> Result<String, AgentError> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(|e| AgentError::io(path, e))?;
    let mut h = StreamDigest::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(|e| AgentError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.content_address())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collect_keeps_what_it_is_told_and_counts_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let s = Slots::new(d.path()).unwrap();
        std::fs::write(s.bundle("a"), b"aaaa").unwrap();
        std::fs::write(s.part("b"), b"bb").unwrap();
        std::fs::write(s.bundle("c"), b"c").unwrap();
        // Compiled models go with their bundle.
        let kept = s.compiled().store("a", b"kept").unwrap();
        let dropped = s.compiled().store("c", b"gone").unwrap();
        assert_eq!(s.collect(&["a"]).unwrap(), 7);
        assert!(s.bundle("a").exists() && kept.exists());
        assert!(!s.part("b").exists() && !s.bundle("c").exists() && !dropped.exists());
        assert!(s.free_bytes().unwrap() > 0);
    }

    #[test]
    fn compiled_models_are_kept_unless_configured_off() {
        let d = tempfile::tempdir().unwrap();
        let s = Slots::new(d.path()).unwrap();
        let base = "[trust]\nkeys = [\"k.pub\"]\n";
        let cfg = crate::config::AgentConfig::parse(base).unwrap();
        assert_eq!(s.compiled_for("a", &cfg).map(|c| c.key), Some("a".into()));
        let off = format!("{base}[engine]\nkeep_compiled = false\n");
        let cfg = crate::config::AgentConfig::parse(&off).unwrap();
        assert!(s.compiled_for("a", &cfg).is_none());
    }

    #[test]
    fn a_full_disk_discards_partials_and_compiled_models_but_no_bundle() {
        let d = tempfile::tempdir().unwrap();
        let s = Slots::new(d.path()).unwrap();
        std::fs::write(s.bundle("a"), b"aaaa").unwrap();
        std::fs::write(s.part("b"), b"bb").unwrap();
        let compiled = s.compiled().store("a", b"compiled").unwrap();
        std::fs::write(d.path().join("bundles/a.compiling-7"), b"half").unwrap();
        assert_eq!(s.discard_partials(), 14);
        assert!(s.bundle("a").exists());
        assert!(!compiled.exists() && !s.part("b").exists());
        assert_eq!(s.compiled().lookup("a"), None);
        let compiled = s.compiled().store("a", b"compiled").unwrap();
        std::fs::write(s.part("c"), b"cc").unwrap();
        assert_eq!(s.discard_compiled(), 8);
        assert!(!compiled.exists() && s.part("c").exists() && s.bundle("a").exists());
    }

    #[test]
    fn enospc_and_quota_errors_are_no_space() {
        assert!(is_no_space(&std::io::Error::from_raw_os_error(28)));
        assert!(is_no_space(&std::io::Error::from_raw_os_error(122)));
        assert!(!is_no_space(&std::io::Error::from_raw_os_error(5)));
    }
}
