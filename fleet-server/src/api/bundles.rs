//! Bundles: streamed pushes verified before the registry sees them, the
//! push rules, listing, and downloads with Range/ETag, per-device
//! authorization and a concurrency limit.

use std::io::Write as _;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use edgefleet_wire::api::v1::{BundleView, ErrorBody};
use edgefleet_wire::bundle::{Limits, StreamDigest};
use edgefleet_wire::time::unix_now as now;
use edgefleet_wire::verify::{Expiry, check_bundle};
use http_body_util::BodyExt as _;

use super::{ApiError, ApiResult, AppState};
use crate::auth::{Action, Caller, require};
use crate::error::Error;
use crate::fleet::{DeviceCell, lock};
use crate::store::{BundleRecord, Write};

/// Removes an upload file unless it was moved into place.
struct Upload {
    path: std::path::PathBuf,
    keep: bool,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("bundles are limited to {limit} bytes (`[http] max_bundle_bytes`)"),
    )
}

#[utoipa::path(post, path = "/api/v1/bundles", tag = "bundles",
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The raw signed bundle, streamed"),
    responses((status = 201, description = "Stored", body = BundleView),
              (status = 200, description = "The same bytes were already stored", body = BundleView),
              (status = 409, description = "Same name and version with other bytes, or a sequence not above the newest of its name", body = ErrorBody),
              (status = 413, body = ErrorBody),
              (status = 422, description = "Refused by verification; `code` is the reason", body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn push(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let caller = s.allow(&headers, Action::PushBundle)?;
    let limit = s.config.http.max_bundle_bytes;
    if super::declared_length(&headers).is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    // Stream to a temporary file while hashing: memory stays flat.
    let mut upload = Upload {
        path: s.registry.blobs.upload_path()?,
        keep: false,
    };
    let mut file = std::fs::File::create(&upload.path).map_err(|e| Error::io(&upload.path, e))?;
    let mut digest = StreamDigest::default();
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request("body_error", format!("reading the upload: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if digest.len() + data.len() as u64 > limit {
            return Err(too_large(limit));
        }
        digest.update(&data);
        file.write_all(&data).map_err(|e| {
            tracing::error!(error = %e, "cannot write an upload");
            ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "cannot_store",
                "the upload could not be written (disk full?)",
            )
        })?;
    }
    file.sync_all().map_err(|e| Error::io(&upload.path, e))?;
    drop(file);
    let size = digest.len();
    let id = digest.content_address();

    // Verify from the file, streaming (signatures, expiry, both digests).
    let path = upload.path.clone();
    let current = s.trust.current();
    current.check_fresh(now()).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.code(),
            format!("bundle rejected: {e}"),
        )
    })?;
    let trust = current.root().clone();
    let manifest = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&path)?;
        Ok::<_, std::io::Error>(check_bundle(
            std::io::BufReader::new(f),
            &trust,
            Expiry::Enforce { now: now() },
            &Limits::default(),
        ))
    })
    .await
    .map_err(|e| Error::Store(format!("verification task: {e}")))?
    .map_err(|e| Error::io(&upload.path, e))?
    .map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.code(),
            format!("bundle rejected: {e}"),
        )
    })?;
    let rec = BundleRecord {
        id: id.clone(),
        name: manifest.name.to_string(),
        version: manifest.version.to_string(),
        sequence: manifest.sequence,
        size,
        format: manifest.payload.format.to_string(),
        targets: manifest
            .targets
            .iter()
            .map(|t| t.name().to_string())
            .collect(),
        expires_at: manifest.expires_at,
        uploaded_at: now(),
        uploaded_by: caller.name(),
    };

    // The push rules, against the registry as a whole.
    let _push = s.registry.push_lock.lock().await;
    if let Some(existing) = s.registry.get(&id) {
        return Ok((StatusCode::OK, axum::Json(existing)).into_response());
    }
    if let Some(existing) = s.registry.find(&rec.name, &rec.version) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "bundle_conflict",
            format!(
                "{} {} already exists with different bytes (id {}); bundles are immutable, bump the version",
                existing.name, existing.version, existing.id
            ),
        ));
    }
    if let Some(newest) = s.registry.newest(&rec.name)
        && rec.sequence <= newest.sequence
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "sequence_not_above_newest",
            format!(
                "{} sequence {} is not above {}, the newest stored ({} {}); devices refuse it (anti-rollback)",
                rec.name, rec.sequence, newest.sequence, newest.name, newest.version
            ),
        ));
    }
    s.registry
        .blobs
        .store(&id, &upload.path)
        .await
        .map_err(|e| {
            tracing::error!(bundle = %id, error = %e, "cannot store a pushed bundle");
            ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "cannot_store",
                format!("the bundle could not be stored: {e}"),
            )
        })?;
    upload.keep = true;
    let audit = s.audit_write(&caller, "bundle.push", &id);
    if let Err(e) = s.commit(vec![Write::Bundle(rec.clone()), audit]).await {
        // The record did not commit: the bytes must not stay behind either.
        s.registry.blobs.remove(&id).await;
        return Err(e);
    }
    s.registry.insert(rec.clone());
    tracing::info!(bundle = %id, name = %rec.name, version = %rec.version, by = %caller.name(), "bundle pushed");
    Ok((StatusCode::CREATED, axum::Json(rec)).into_response())
}

#[utoipa::path(get, path = "/api/v1/bundles", tag = "bundles",
    responses((status = 200, body = Vec<BundleView>), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Vec<BundleView>>> {
    s.allow(&headers, Action::ReadFleet)?;
    Ok(axum::Json(s.registry.list()))
}

/// The bundle an id or a unique id prefix (at least 8 hex digits) names.
pub fn resolve(s: &AppState, id: &str) -> ApiResult<BundleRecord> {
    if let Some(b) = s.registry.get(id) {
        return Ok(b);
    }
    if id.len() >= 8 && id.len() < 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        let ids = s.registry.ids_with_prefix(&id.to_ascii_lowercase());
        match ids.as_slice() {
            [one] => {
                return s
                    .registry
                    .get(one)
                    .ok_or_else(|| ApiError::not_found("bundle"));
            }
            [] => {}
            many => {
                return Err(ApiError::bad_request(
                    "ambiguous_id",
                    format!("{id} matches {} bundles; give more digits", many.len()),
                ));
            }
        }
    }
    Err(ApiError::not_found("bundle"))
}

#[utoipa::path(get, path = "/api/v1/bundles/{id}", tag = "bundles",
    params(("id" = String, Path, description = "sha256 of the bundle, hex, or a unique prefix of 8+ digits")),
    responses((status = 200, body = BundleView), (status = 404, body = ErrorBody),
              (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_one(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<BundleView>> {
    s.allow(&headers, Action::ReadFleet)?;
    Ok(axum::Json(resolve(&s, &id)?))
}

/// Parses a single `bytes=` range against a file size.
fn parse_range(value: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = value.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // multiple ranges: answer with the whole file
    }
    let (a, b) = spec.split_once('-')?;
    let range = match (a.trim(), b.trim()) {
        ("", suffix) => suffix
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .map(|n| (size.saturating_sub(n), size - 1)),
        (start, "") => start
            .parse::<u64>()
            .ok()
            .map(|s| (s, size.saturating_sub(1))),
        (start, end) => match (start.parse::<u64>(), end.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => Some((s, e.min(size.saturating_sub(1)))),
            _ => None,
        },
    };
    Some(match range {
        Some((s, e)) if s < size && s <= e => Ok((s, e)),
        _ => Err(()),
    })
}

/// Whether a device may fetch `id`: its desired state names it, or named
/// it recently (a transfer in flight when the rollout moved on).
pub fn assigned(cell: &DeviceCell, id: &str) -> bool {
    let d = lock(cell);
    let desired = &d.rec.desired;
    desired.bundle.as_ref().is_some_and(|b| b.id == id)
        || desired.recent.iter().any(|r| r.id == id && r.until > now())
}

#[utoipa::path(get, path = "/api/v1/bundles/{id}/download", tag = "bundles",
    params(("id" = String, Path, description = "sha256 of the bundle, hex"),
           ("Range" = Option<String>, Header, description = "bytes=START-[END]"),
           ("If-Range" = Option<String>, Header, description = "The ETag (the quoted id)"),
           ("If-None-Match" = Option<String>, Header, description = "The ETag (the quoted id)")),
    responses((status = 200, description = "The whole bundle", content_type = "application/octet-stream"),
              (status = 206, description = "The requested range", content_type = "application/octet-stream"),
              (status = 304, description = "Not modified"),
              (status = 307, description = "`[bundles] presign_downloads`: the bytes are at `Location`, a presigned bucket URL; GET it without the bearer token (`Range` works there too)"),
              (status = 403, description = "A device asked for a bundle its desired state does not name", body = ErrorBody),
              (status = 416, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 503, description = "Too many downloads at once; retry after `Retry-After`", body = ErrorBody),
              (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn download(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let caller = s.caller(&headers, None)?;
    match caller {
        Caller::Device { ref cell, .. } => {
            require(&caller, Action::DownloadAssignedBundle)?;
            if !assigned(cell, &id) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "bundle_not_assigned",
                    "this device's desired state does not name that bundle",
                ));
            }
        }
        Caller::Operator { .. } => require(&caller, Action::DownloadAnyBundle)?,
    }
    let rec = s
        .registry
        .get(&id)
        .ok_or_else(|| ApiError::not_found("bundle"))?;
    let m = &s.metrics;
    send_bundle(
        &s.registry.blobs,
        &s.downloads,
        [&m.downloads, &m.downloads_refused, &m.downloads_redirected],
        (&rec.id, rec.size),
        &headers,
    )
    .await
}

/// Sends bundle `id` of `size` bytes from `blobs` as `headers` ask
/// (`If-None-Match`, `Range`, `If-Range`), or a redirect to a presigned
/// bucket URL; at most `permits` transfers at once, counted in `counts`
/// (sent, refused at the limit, redirected). The active server and a
/// standby serve downloads alike.
pub async fn send_bundle(
    blobs: &crate::blobs::Blobs,
    permits: &std::sync::Arc<tokio::sync::Semaphore>,
    [sent, refused, redirected]: [&crate::metrics::Counter; 3],
    (id, size): (&str, u64),
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let etag = format!("\"{id}\"");
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    // A bucket that presigns: the bytes come from it, not through here.
    if let Some(url) = blobs.presigned(id).await {
        let url = url?;
        redirected.inc();
        let mut r = StatusCode::TEMPORARY_REDIRECT.into_response();
        if let Ok(v) = HeaderValue::from_str(&url) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        if let Ok(v) = HeaderValue::from_str(&etag) {
            r.headers_mut().insert(header::ETAG, v);
        }
        return Ok(r);
    }
    // Bounded: a rollout to a whole fleet must not open a transfer per
    // device at once. Devices retry 503s with backoff.
    let Ok(permit) = permits.clone().try_acquire_owned() else {
        refused.inc();
        let wait = 2 + (edgefleet_wire::backoff::random_unit() * 8.0) as u64;
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_downloads",
            "the server is at its download limit; retry later",
        )
        .retry_after(wait));
    };
    // If-Range: the range applies only to the same content.
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == etag);
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_ok)
        .and_then(|v| parse_range(v, size));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, size.saturating_sub(1)),
        Some(Ok((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
        Some(Err(())) => {
            let mut r = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the bundle has {size} bytes"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
    };
    let len = if size == 0 { 0 } else { end - start + 1 };
    let stream = blobs.read(id, start, len).await?;
    sent.inc();
    // The permit lives as long as the body is being sent.
    let stream = futures_util::StreamExt::map(stream, move |chunk| {
        let _held = &permit;
        chunk
    });
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}"))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_are_parsed_like_rfc_9110_says() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=95-200", 100), Some(Ok((95, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=5-1", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}
