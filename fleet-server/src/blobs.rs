//! Where bundle bytes live: a local folder (`file://`, by default
//! `data_dir/bundles`) or an S3-compatible bucket (`s3://bucket/prefix`,
//! through `object_store`). Names are content addresses
//! (`<sha256>.bundle`), so replicas sharing a bucket agree on them and a
//! re-push of the same bytes overwrites nothing that differs.
//!
//! Uploads always stream into a local staging file first (`.upload-*`);
//! only a verified bundle is moved (folder) or copied (bucket) under its
//! name, before its record commits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer as _;
use object_store::{GetOptions, GetRange, ObjectStore as _, ObjectStoreExt as _, PutPayload};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use crate::config::BundlesConfig;
use crate::error::{Error, Result};

/// Bundles up to this size go to a bucket in one PUT; larger ones as a
/// multipart upload of parts this size.
const PART_BYTES: usize = 8 << 20;

/// A stream of a bundle's bytes.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

#[derive(Debug)]
enum Backend {
    Dir,
    Bucket {
        store: Arc<AmazonS3>,
        prefix: String,
        presign: Option<Duration>,
    },
}

#[derive(Debug)]
pub struct Blobs {
    /// The bundle folder (`Dir`) or the local staging folder (`Bucket`).
    dir: PathBuf,
    backend: Backend,
    /// For logs and `--check-config`: where the bytes go, no secrets.
    describe: String,
}

/// The scheme of a bucket URL in `[bundles] url`.
pub const S3_SCHEME: &str = "s3://";

impl Blobs {
    /// Opens the configured location (and, for a bucket, checks that it
    /// answers with these credentials); drops upload leftovers of a crash.
    pub async fn open(data_dir: &Path, cfg: &BundlesConfig) -> Result<Blobs> {
        let url = cfg.url.as_deref().unwrap_or("");
        let (dir, backend, describe) = if let Some(rest) = url.strip_prefix(S3_SCHEME) {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::Usage(format!("[bundles] url {url}: no bucket")));
            }
            let prefix = prefix.trim_matches('/').to_string();
            let store = bucket_store(bucket, cfg)?;
            let describe = format!(
                "s3://{bucket}/{prefix} at {}",
                endpoint(cfg).unwrap_or_else(|| "AWS".into())
            );
            let presign = cfg
                .presign_downloads
                .then(|| Duration::from_secs(cfg.presign_ttl_secs.max(1)));
            (
                data_dir.join("bundles"),
                Backend::Bucket {
                    store: Arc::new(store),
                    prefix,
                    presign,
                },
                describe,
            )
        } else {
            let d = url
                .strip_prefix("file://")
                .map_or_else(|| data_dir.join("bundles"), PathBuf::from);
            let describe = format!("file://{}", d.display());
            (d, Backend::Dir, describe)
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".upload-") || name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let blobs = Blobs {
            dir,
            backend,
            describe,
        };
        blobs.probe().await?;
        Ok(blobs)
    }

    /// Where bundle bytes go, without credentials.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Lists the prefix once: a missing bucket, a wrong endpoint or
    /// refused credentials fail here, at start, not at the first push.
    async fn probe(&self) -> Result<()> {
        let Backend::Bucket { store, prefix, .. } = &self.backend else {
            return Ok(());
        };
        let at = (!prefix.is_empty()).then(|| ObjectPath::from(prefix.as_str()));
        tokio::time::timeout(
            Duration::from_secs(30),
            store.list_with_delimiter(at.as_ref()),
        )
        .await
        .map_err(|_| {
            Error::Store(format!(
                "bundle bucket {}: no answer within 30 s",
                self.describe
            ))
        })?
        .map_err(|e| Error::Store(format!("bundle bucket {}: {e}", self.describe)))?;
        Ok(())
    }

    /// A fresh local path for an upload in progress.
    pub fn upload_path(&self) -> Result<PathBuf> {
        let mut r = [0u8; 12];
        getrandom::fill(&mut r).map_err(|e| Error::Store(format!("random: {e}")))?;
        Ok(self.dir.join(format!(".upload-{}", hex::encode(r))))
    }

    /// The folder's file for `id` (folder backend only).
    pub fn local_path(&self, id: &str) -> Option<PathBuf> {
        matches!(self.backend, Backend::Dir).then(|| self.dir.join(format!("{id}.bundle")))
    }

    fn key(prefix: &str, id: &str) -> ObjectPath {
        if prefix.is_empty() {
            ObjectPath::from(format!("{id}.bundle"))
        } else {
            ObjectPath::from(format!("{prefix}/{id}.bundle"))
        }
    }

    /// Puts the verified upload at `upload` under `id`. The staging file
    /// is gone afterwards (moved, or copied and removed).
    pub async fn store(&self, id: &str, upload: &Path) -> Result<()> {
        match &self.backend {
            Backend::Dir => {
                let dest = self.dir.join(format!("{id}.bundle"));
                std::fs::rename(upload, &dest).map_err(|e| Error::io(&dest, e))?;
                if let Ok(d) = std::fs::File::open(&self.dir) {
                    let _ = d.sync_all();
                }
                Ok(())
            }
            Backend::Bucket { store, prefix, .. } => {
                let key = Self::key(prefix, id);
                let r = put_file(store, &key, upload).await;
                let _ = std::fs::remove_file(upload);
                r.map_err(|e| Error::Store(format!("storing {key} in {}: {e}", self.describe)))
            }
        }
    }

    /// Removes `id`'s bytes (a push whose record did not commit).
    pub async fn remove(&self, id: &str) {
        match &self.backend {
            Backend::Dir => {
                let _ = std::fs::remove_file(self.dir.join(format!("{id}.bundle")));
            }
            Backend::Bucket { store, prefix, .. } => {
                let _ = store.delete(&Self::key(prefix, id)).await;
            }
        }
    }

    /// A presigned GET URL for `id`, when downloads are redirected.
    pub async fn presigned(&self, id: &str) -> Option<Result<String>> {
        let Backend::Bucket {
            store,
            prefix,
            presign: Some(ttl),
        } = &self.backend
        else {
            return None;
        };
        Some(
            store
                .signed_url(axum::http::Method::GET, &Self::key(prefix, id), *ttl)
                .await
                .map(|u| u.to_string())
                .map_err(|e| Error::Store(format!("presigning in {}: {e}", self.describe))),
        )
    }

    /// Whether the bytes are in a bucket (which replicas share; a folder
    /// is one server's, by default in its own `data_dir`).
    pub fn is_bucket(&self) -> bool {
        matches!(self.backend, Backend::Bucket { .. })
    }

    /// The size of `id`'s bytes; `None` when there are none.
    pub async fn size(&self, id: &str) -> Result<Option<u64>> {
        match &self.backend {
            Backend::Dir => {
                let path = self.dir.join(format!("{id}.bundle"));
                match tokio::fs::metadata(&path).await {
                    Ok(m) => Ok(Some(m.len())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Error::io(&path, e)),
                }
            }
            Backend::Bucket { store, prefix, .. } => {
                let key = Self::key(prefix, id);
                match store.head(&key).await {
                    Ok(meta) => Ok(Some(meta.size)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(Error::Store(format!(
                        "looking up {key} in {}: {e}",
                        self.describe
                    ))),
                }
            }
        }
    }

    /// `len` bytes of `id` from `start`.
    pub async fn read(&self, id: &str, start: u64, len: u64) -> Result<ByteStream> {
        match &self.backend {
            Backend::Dir => {
                let path = self.dir.join(format!("{id}.bundle"));
                let mut file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| Error::io(&path, e))?;
                file.seek(std::io::SeekFrom::Start(start))
                    .await
                    .map_err(|e| Error::io(&path, e))?;
                Ok(tokio_util::io::ReaderStream::new(file.take(len)).boxed())
            }
            Backend::Bucket { store, prefix, .. } => {
                if len == 0 {
                    return Ok(futures_util::stream::empty().boxed());
                }
                let key = Self::key(prefix, id);
                let got = store
                    .get_opts(
                        &key,
                        GetOptions {
                            range: Some(GetRange::Bounded(start..start + len)),
                            ..GetOptions::default()
                        },
                    )
                    .await
                    .map_err(|e| {
                        Error::Store(format!("reading {key} from {}: {e}", self.describe))
                    })?;
                Ok(got
                    .into_stream()
                    .map(|r| r.map_err(std::io::Error::other))
                    .boxed())
            }
        }
    }
}

/// An S3-compatible service's endpoint: `[bundles] endpoint`, else the
/// environment's; `None` means AWS.
fn endpoint(cfg: &BundlesConfig) -> Option<String> {
    cfg.endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .or_else(|| std::env::var("AWS_ENDPOINT").ok())
}

/// The bucket client: `[bundles]` settings over the AWS_* environment.
fn bucket_store(bucket: &str, cfg: &BundlesConfig) -> Result<AmazonS3> {
    // reqwest is built without a default TLS provider: use ring, as the
    // rest of the server does (idempotent).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(e) = &endpoint(cfg) {
        b = b
            .with_endpoint(e)
            .with_allow_http(e.starts_with("http://"))
            // S3-compatible services are addressed by path, not by
            // bucket subdomain.
            .with_virtual_hosted_style_request(false);
    }
    let region = cfg
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .unwrap_or_else(|| "us-east-1".into());
    b = b.with_region(region);
    if let Some(k) = &cfg.access_key_id {
        b = b.with_access_key_id(k);
    }
    if let Some(k) = &cfg.secret_access_key {
        b = b.with_secret_access_key(k);
    }
    b.build()
        .map_err(|e| Error::Usage(format!("[bundles] s3://{bucket}: {e}")))
}

/// Copies a local file into the bucket: one PUT when small, else a
/// multipart upload streamed from the file (memory stays at a few parts).
async fn put_file(store: &AmazonS3, key: &ObjectPath, file: &Path) -> std::io::Result<()> {
    let mut f = tokio::fs::File::open(file).await?;
    let size = f.metadata().await?.len();
    if size <= PART_BYTES as u64 {
        let mut buf = Vec::with_capacity(size as usize);
        f.read_to_end(&mut buf).await?;
        store
            .put(key, PutPayload::from(buf))
            .await
            .map_err(std::io::Error::other)?;
        return Ok(());
    }
    let upload = store
        .put_multipart(key)
        .await
        .map_err(std::io::Error::other)?;
    let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let mut buf = vec![0u8; 1 << 20];
    let copied = async {
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            w.wait_for_capacity(2)
                .await
                .map_err(std::io::Error::other)?;
            w.write(&buf[..n]);
        }
    }
    .await;
    match copied {
        // No half-uploaded parts left behind in the bucket.
        Err(e) => {
            let _ = w.abort().await;
            Err(e)
        }
        Ok(()) => w.finish().await.map(|_| ()).map_err(std::io::Error::other),
    }
}
