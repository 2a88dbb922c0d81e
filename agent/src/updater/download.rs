//! The download effect: a resumable, content-addressed transfer of one
//! bundle into `bundles/<id>.part`, renamed to `<id>.bundle` once its bytes
//! hash to the id.
//!
//! Failure classes (docs/ARCHITECTURE.md, "Failure classes"):
//! - transport (connection, timeout, stall, 5xx, a body cut short): the
//!   bytes already written are kept and the next attempt resumes after the
//!   last byte durably in the part file;
//! - corrupted (the bytes do not hash to the id): the part file is dropped
//!   and the next attempt starts over — a content-addressed download that
//!   does not match says nothing about the bundle, only about the path;
//! - no space (too little free for the rest, or ENOSPC while writing): the
//!   update waits as `blocked`;
//! - refused (404, 403, over the size cap, a sideload file missing): final
//!   for this bundle and rollout.

use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgefleet_wire::bundle::StreamDigest;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};
use tokio::sync::mpsc;

use super::Ctx;
use super::slots::{free_bytes, is_no_space};
use crate::client::ServerClient;
use crate::update::{Event, Target, TransferFault};

/// Bytes between durable checkpoints (fsync, then a progress event).
pub const CHECKPOINT_BYTES: u64 = 256 * 1024;

/// How one attempt ended.
#[derive(Debug)]
enum Fault {
    Transport(String),
    Corrupted(String),
    NoSpace { reason: String, needed: u64 },
    Refused(String),
}

impl Fault {
    fn event(self, max_corrupt: u32) -> Event {
        match self {
            Fault::Transport(reason) => Event::DownloadFailed {
                reason,
                fault: TransferFault::Transport,
                max_corrupt,
            },
            Fault::Corrupted(reason) => Event::DownloadFailed {
                reason,
                fault: TransferFault::Corrupted,
                max_corrupt,
            },
            Fault::NoSpace { reason, needed } => Event::NoSpace { reason, needed },
            Fault::Refused(reason) => Event::Rejected { reason },
        }
    }
}

/// The no-space fault of a failed write, or a transport fault.
fn write_fault(path: &Path, e: std::io::Error, needed: u64) -> Fault {
    if is_no_space(&e) {
        Fault::NoSpace {
            reason: format!("insufficient_space: writing {} failed: {e}", path.display()),
            needed,
        }
    } else {
        Fault::Transport(format!("{}: {e}", path.display()))
    }
}

/// Fetches `target` into its slot; the outcome as the machine's event.
pub async fn download(ctx: &Ctx, target: &Target, progress: mpsc::UnboundedSender<u64>) -> Event {
    let max_corrupt = ctx.cfg.update.max_corrupt_transfers;
    let id = &target.bundle.id;
    let dest = ctx.slots.bundle(id);
    if dest.exists() {
        return Event::Downloaded;
    }
    let Some(path) = &target.download else {
        return Event::Rejected {
            reason: format!("sideloaded bundle {id} is missing from {}", dest.display()),
        };
    };
    let Some(client) = ctx.client.get() else {
        return Fault::Transport("not enrolled with a fleet server yet".into()).event(max_corrupt);
    };
    let job = Job {
        path,
        part: ctx.slots.part(id),
        dest,
        expected_id: id,
        max_bytes: ctx.cfg.update.max_bundle_bytes,
        margin: ctx.cfg.update.free_space_margin_bytes,
        idle: Duration::from_secs(ctx.cfg.update.download_idle_timeout_secs),
        min_rate: ctx.cfg.update.download_min_bytes_per_sec,
        bytes_per_sec: super::download_cap(&ctx.cfg),
    };
    match fetch(client, &job, &progress).await {
        Ok(()) => Event::Downloaded,
        Err(f) => f.event(max_corrupt),
    }
}

struct Job<'a> {
    /// Server-relative path.
    path: &'a str,
    part: PathBuf,
    dest: PathBuf,
    expected_id: &'a str,
    max_bytes: u64,
    margin: u64,
    idle: Duration,
    min_rate: u64,
    /// Throughput cap (tests).
    bytes_per_sec: Option<u64>,
}

/// Opens the part file and returns it with the number of bytes durably in
/// it and their digest: a resume continues exactly after them.
fn open_part(part: &Path) -> Result<(std::fs::File, u64, StreamDigest), Fault> {
    let io = |e| write_fault(part, e, 0);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(part)
        .map_err(io)?;
    file.sync_all().map_err(io)?;
    let have = file.metadata().map_err(io)?.len();
    let mut digest = StreamDigest::default();
    file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
    }
    Ok((file, have, digest))
}

async fn fetch(
    client: &ServerClient,
    job: &Job<'_>,
    progress: &mpsc::UnboundedSender<u64>,
) -> Result<(), Fault> {
    let part = job.part.clone();
    // Re-hashing the kept prefix may read hundreds of MB: off the workers.
    let (mut file, mut offset, mut digest) = tokio::task::spawn_blocking(move || open_part(&part))
        .await
        .map_err(|e| Fault::Transport(format!("internal: {e}")))??;
    let io = |e| write_fault(&job.part, e, 0);

    let (url, mut rb) = client.get_stream(job.path);
    if offset > 0 {
        rb = rb.header(header::RANGE, format!("bytes={offset}-"));
        if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", job.expected_id)) {
            rb = rb.header(header::IF_RANGE, v);
        }
    }
    let transport = |e: reqwest::Error| Fault::Transport(format!("{url}: {e}"));
    let mut resp = tokio::time::timeout(job.idle, rb.send())
        .await
        .map_err(|_| Fault::Transport(format!("{url}: no answer within {:?}", job.idle)))?
        .map_err(transport)?;
    // The server may send the bytes from a bucket: one redirect to a
    // presigned URL, asked without the credential. The range stays; the
    // If-Range does not (the bucket's ETag is not the bundle's id; the
    // name is a content address and the digest is checked at the end).
    if resp.status().is_redirection() {
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| client.get_redirected(&url, l));
        let Some((to, mut rb)) = location else {
            return Err(Fault::Transport(format!(
                "{url}: {} without a usable Location",
                resp.status()
            )));
        };
        if offset > 0 {
            rb = rb.header(header::RANGE, format!("bytes={offset}-"));
        }
        let host = reqwest::Url::parse(&to)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        resp = tokio::time::timeout(job.idle, rb.send())
            .await
            .map_err(|_| Fault::Transport(format!("{host}: no answer within {:?}", job.idle)))?
            .map_err(|e| {
                Fault::Transport(format!(
                    "redirected download from {host}: {}",
                    e.without_url()
                ))
            })?;
    }
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => {}
        StatusCode::OK => {
            // The server sent everything (no range support, or other
            // content): start over.
            if offset > 0 {
                offset = 0;
                digest = StreamDigest::default();
                file.set_len(0).map_err(io)?;
                file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            // More bytes here than the bundle has: they cannot be it.
            file.set_len(0).map_err(io)?;
            let _ = progress.send(0);
            return Err(Fault::Corrupted(format!(
                "{url}: range from {offset} not satisfiable; starting over"
            )));
        }
        s @ (StatusCode::NOT_FOUND | StatusCode::FORBIDDEN | StatusCode::GONE) => {
            let e = ServerClient::error_of(&url, resp).await;
            return Err(Fault::Refused(format!("download refused ({s}): {e}")));
        }
        _ => {
            let e = ServerClient::error_of(&url, resp).await;
            return Err(Fault::Transport(e.to_string()));
        }
    }
    let total = resp.content_length().map(|n| n + offset);
    if let Some(t) = total {
        if t > job.max_bytes {
            return Err(Fault::Refused(format!(
                "bundle is {t} bytes, over the {}-byte download cap",
                job.max_bytes
            )));
        }
        let needed = (t - offset).saturating_add(job.margin);
        let free = free_bytes(&job.part).map_err(|e| Fault::Transport(e.to_string()))?;
        if free < needed {
            return Err(Fault::NoSpace {
                reason: format!(
                    "insufficient_space: the download needs {} more bytes plus a {}-byte margin, {free} bytes are free",
                    t - offset,
                    job.margin
                ),
                needed,
            });
        }
    }
    let remaining = total.map_or(job.max_bytes, |t| t - offset);
    let deadline = Instant::now()
        + Duration::from_secs(120)
        + Duration::from_secs(remaining / job.min_rate.max(1));
    let started = Instant::now();
    let mut received: u64 = 0;
    let mut since_checkpoint: u64 = 0;
    let needed_now =
        |offset: u64| total.map_or(job.margin, |t| t.saturating_sub(offset) + job.margin);
    loop {
        let wait = job
            .idle
            .min(deadline.saturating_duration_since(Instant::now()));
        let chunk = match tokio::time::timeout(wait, resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                sync_progress(&file, offset, progress);
                return Err(transport(e));
            }
            Err(_) => {
                sync_progress(&file, offset, progress);
                let why = if Instant::now() >= deadline {
                    "the transfer is slower than download_min_bytes_per_sec"
                } else {
                    "the body stalled"
                };
                return Err(Fault::Transport(format!(
                    "{url}: {why} at byte {offset}; resuming later"
                )));
            }
        };
        if offset + chunk.len() as u64 > job.max_bytes {
            return Err(Fault::Refused(format!(
                "bundle exceeds the {}-byte download cap",
                job.max_bytes
            )));
        }
        if let Err(e) = file.write_all(&chunk) {
            let f = write_fault(&job.part, e, needed_now(offset));
            sync_progress(&file, offset, progress);
            return Err(f);
        }
        digest.update(&chunk);
        offset += chunk.len() as u64;
        received += chunk.len() as u64;
        since_checkpoint += chunk.len() as u64;
        if since_checkpoint >= CHECKPOINT_BYTES {
            file.sync_data()
                .map_err(|e| write_fault(&job.part, e, needed_now(offset)))?;
            let _ = progress.send(offset);
            since_checkpoint = 0;
        }
        if let Some(rate) = job.bytes_per_sec.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(received as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    file.sync_all()
        .map_err(|e| write_fault(&job.part, e, needed_now(offset)))?;
    let _ = progress.send(offset);
    if let Some(t) = total
        && offset < t
    {
        return Err(Fault::Transport(format!(
            "{url}: the body ended at byte {offset} of {t}; resuming later"
        )));
    }
    let got = digest.content_address();
    if got != job.expected_id {
        // These bytes are not the bundle: drop them, start over next time.
        drop(file);
        let _ = std::fs::remove_file(&job.part);
        let _ = progress.send(0);
        return Err(Fault::Corrupted(format!(
            "downloaded bytes hash to {got}, expected bundle {}",
            job.expected_id
        )));
    }
    std::fs::rename(&job.part, &job.dest).map_err(|e| write_fault(&job.dest, e, 0))?;
    if let Some(dir) = job.dest.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        d.sync_all().map_err(|e| write_fault(dir, e, 0))?;
    }
    Ok(())
}

/// After a cut: make what arrived durable and report it, so the next
/// attempt resumes after it.
fn sync_progress(file: &std::fs::File, offset: u64, progress: &mpsc::UnboundedSender<u64>) {
    if file.sync_data().is_ok() {
        let _ = progress.send(offset);
    }
}
