//! The bundle registry: records in memory, files on disk, content-addressed
//! by the sha256 of their bytes (`<data_dir>/bundles/<id>.bundle`).
//! Uploads stream into `.upload-*` files that are renamed into place only
//! after the bundle verified and its record committed, so a crash or a
//! refusal never leaves a partial bundle under an id, and a refused push
//! leaves no file at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use edgefleet_wire::bundle::is_content_address;

use crate::error::{Error, Result};
use crate::store::BundleRecord;

#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    bundles: RwLock<BTreeMap<String, BundleRecord>>,
    /// Serializes pushes: the push rules look at the registry as a whole.
    pub push_lock: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Opens the folder, drops upload leftovers of a crash, loads `records`.
    pub fn open(data_dir: &Path, records: Vec<BundleRecord>) -> Result<Registry> {
        let dir = data_dir.join("bundles");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".upload-") || name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Registry {
            dir,
            bundles: RwLock::new(records.into_iter().map(|r| (r.id.clone(), r)).collect()),
            push_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a stored bundle. `id` must be a content address, which also
    /// rules out path traversal.
    pub fn path(&self, id: &str) -> Option<PathBuf> {
        is_content_address(id).then(|| self.dir.join(format!("{id}.bundle")))
    }

    /// A fresh path for an upload in progress.
    pub fn upload_path(&self) -> Result<PathBuf> {
        let mut r = [0u8; 12];
        getrandom::fill(&mut r).map_err(|e| Error::Store(format!("random: {e}")))?;
        Ok(self.dir.join(format!(".upload-{}", hex::encode(r))))
    }

    pub fn get(&self, id: &str) -> Option<BundleRecord> {
        self.bundles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Every bundle, newest upload first.
    pub fn list(&self) -> Vec<BundleRecord> {
        let mut v: Vec<BundleRecord> = self
            .bundles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| {
            (a.name.as_str(), b.sequence)
                .cmp(&(b.name.as_str(), a.sequence))
                .then(a.id.cmp(&b.id))
        });
        v
    }

    /// The bundle stored as `name@version`.
    pub fn find(&self, name: &str, version: &str) -> Option<BundleRecord> {
        self.bundles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|b| b.name == name && b.version == version)
            .cloned()
    }

    /// The highest sequence stored for `name`.
    pub fn newest(&self, name: &str) -> Option<BundleRecord> {
        self.bundles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|b| b.name == name)
            .max_by_key(|b| b.sequence)
            .cloned()
    }

    pub fn insert(&self, rec: BundleRecord) {
        self.bundles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rec.id.clone(), rec);
    }

    /// Ids starting with `prefix` (for operators who type short ids).
    pub fn ids_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.bundles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|id| id.starts_with(prefix))
            .cloned()
            .collect()
    }
}
