//! Bundle files on disk, content-addressed by the sha256 of their bytes:
//! `<data_dir>/bundles/<id>.bundle`. Writes go to a temporary file that is
//! fsynced and renamed, so a crash never leaves a partial bundle under its id.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use edgefleet_wire::bundle::{content_address, is_content_address};

use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    pub fn open(data_dir: &Path) -> Result<Registry> {
        let dir = data_dir.join("bundles");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Registry { dir })
    }

    /// Path of a stored bundle. `id` must be 64 lowercase hex characters,
    /// which also rules out path traversal.
    pub fn path(&self, id: &str) -> Option<PathBuf> {
        is_content_address(id).then(|| self.dir.join(format!("{id}.bundle")))
    }

    /// Stores bytes under their id (idempotent).
    pub fn put(&self, bytes: &[u8]) -> Result<String> {
        let id = content_address(bytes);
        let dest = self.dir.join(format!("{id}.bundle"));
        if dest.exists() {
            return Ok(id);
        }
        let tmp = self.dir.join(format!(".{id}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &dest)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| Error::io(&dest, e))?;
        Ok(id)
    }
}
