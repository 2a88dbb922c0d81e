//! The bundle registry: records in memory, bytes in `blobs` (a folder or
//! a bucket), content-addressed by the sha256 of their bytes
//! (`<id>.bundle`). Uploads stream into local `.upload-*` files that are
//! put under their name only after the bundle verified, and removed again
//! if its record does not commit, so a crash or a refusal never leaves a
//! partial bundle under an id, and a refused push leaves no file at all.

use std::collections::BTreeMap;
use std::sync::RwLock;

use crate::blobs::Blobs;
use crate::error::Result;
use crate::store::BundleRecord;

#[derive(Debug)]
pub struct Registry {
    /// Where the bytes live (a folder or a bucket).
    pub blobs: Blobs,
    bundles: RwLock<BTreeMap<String, BundleRecord>>,
    /// Serializes pushes: the push rules look at the registry as a whole.
    pub push_lock: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Opens the bundle location (`[bundles]`), loads `records`.
    pub async fn open(
        data_dir: &std::path::Path,
        cfg: &crate::config::BundlesConfig,
        records: Vec<BundleRecord>,
    ) -> Result<Registry> {
        Ok(Registry {
            blobs: Blobs::open(data_dir, cfg).await?,
            bundles: RwLock::new(records.into_iter().map(|r| (r.id.clone(), r)).collect()),
            push_lock: tokio::sync::Mutex::new(()),
        })
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
