//! The fleet server's HTTP API (`/api/v1/...`). Every endpoint but
//! `/healthz` and enrollment requires a bearer token: an operator token with
//! a role, or a device credential. Errors are `{"error": {"code", "message"}}`;
//! bad input is always a 4xx.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgefleet_wire::api::v1::{
    AuditEntry, BundleView, CreateRollout, DeviceView, PatchDevice, RolloutAction, RolloutView,
};
use edgefleet_wire::bundle::Limits;
use edgefleet_wire::bundle::content_address;
use edgefleet_wire::device::{
    DesiredState, DeviceReport, EnrollRequest, EnrollResponse, WatchPolicy,
};
use edgefleet_wire::time::unix_now as now;
use edgefleet_wire::verify::{Expiry, TrustRoot, open_bundle};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use crate::auth::{Caller, Tokens, authenticate, require_device, require_role, sha256_hex};
use crate::config::Role;
use crate::controller::{Controller, ControllerError};
use crate::error::Error;
use crate::metrics::ServerMetrics;
use crate::registry::Registry;
use crate::rollout::{Command, RolloutSpec};
use crate::store::{BundleRecord, DeviceRecord, Store};

/// Shared state of the API handlers.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    pub trust: TrustRoot,
    pub tokens: Tokens,
    pub enrollment_tokens: Vec<String>,
    pub max_bundle_bytes: u64,
    pub controller: Arc<Controller>,
    pub metrics: Arc<ServerMetrics>,
    /// Set when MQTT is configured.
    pub mqtt: Option<crate::mqtt::Mqtt>,
}

pub use crate::http_error::ApiError;

type ApiResult<T> = Result<T, ApiError>;

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// Times every request into the API latency histogram.
async fn timed(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let t0 = std::time::Instant::now();
    let r = next.run(req).await;
    s.metrics.api_latency.observe(t0.elapsed());
    r
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/openapi.json", get(crate::openapi::serve))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/bundles", post(push_bundle).get(list_bundles))
        .route("/api/v1/bundles/{id}", get(get_bundle))
        .route("/api/v1/bundles/{id}/download", get(download_bundle))
        .route("/api/v1/devices/enroll", post(enroll))
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{id}", get(get_device).patch(patch_device))
        .route("/api/v1/device/desired", get(device_desired))
        .route("/api/v1/device/report", post(device_report))
        .route("/api/v1/audit", get(list_audit))
        .route("/api/v1/rollouts", post(create_rollout).get(list_rollouts))
        .route("/api/v1/rollouts/{id}", get(get_rollout))
        .route("/api/v1/rollouts/{id}/{action}", post(rollout_action))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), timed))
        .with_state(state)
}

#[utoipa::path(get, path = "/metrics", tag = "server",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain"),
              (status = 401, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn metrics_text(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    require_role(&auth(&s, &headers)?, Role::Viewer)?;
    let mut text = s.metrics.render(s.store.as_ref())?;
    if let Some(m) = &s.mqtt {
        text.push_str(&crate::mqtt::render_metrics(m, s.store.as_ref())?);
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

fn auth(s: &AppState, headers: &HeaderMap) -> ApiResult<Caller> {
    authenticate(headers, &s.tokens, s.store.as_ref())
}

fn audit(s: &AppState, who: &Caller, action: &str, target: &str) -> ApiResult<()> {
    s.store.append_audit(&AuditEntry {
        at: now(),
        who: who.name(),
        action: action.into(),
        target: target.into(),
    })?;
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/bundles", tag = "bundles",
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The raw signed bundle"),
    responses((status = 201, description = "Stored", body = BundleView),
              (status = 200, description = "The same bytes were already stored", body = BundleView),
              (status = 409, description = "Same name and version, different bytes", body = edgefleet_wire::api::v1::ErrorBody),
              (status = 413, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 422, description = "Refused by verification; `code` is the reason", body = edgefleet_wire::api::v1::ErrorBody),
              (status = 401, body = edgefleet_wire::api::v1::ErrorBody), (status = 403, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn push_bundle(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let caller = auth(&s, &headers)?;
    require_role(&caller, Role::Operator)?;
    if body.len() as u64 > s.max_bundle_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("bundles are limited to {} bytes", s.max_bundle_bytes),
        ));
    }
    let (manifest, _model) = open_bundle(
        &body[..],
        &s.trust,
        Expiry::Enforce { now: now() },
        &Limits::default(),
    )
    .map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.code(),
            format!("bundle rejected: {e}"),
        )
    })?;
    let id = content_address(&body);
    let rec = BundleRecord {
        id: id.clone(),
        name: manifest.name.to_string(),
        version: manifest.version.to_string(),
        sequence: manifest.sequence,
        size: body.len() as u64,
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
    // The file first: a record never points at a missing file.
    s.registry.put(&body)?;
    match s.store.insert_bundle(&rec)? {
        None => {
            audit(&s, &caller, "bundle.push", &id)?;
            Ok((StatusCode::CREATED, axum::Json(rec)).into_response())
        }
        Some(existing) if existing.id == id => {
            Ok((StatusCode::OK, axum::Json(existing)).into_response())
        }
        Some(existing) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "bundle_conflict",
            format!(
                "{} {} already exists with different bytes (id {}); bundles are immutable, bump the version",
                existing.name, existing.version, existing.id
            ),
        )),
    }
}

#[utoipa::path(get, path = "/api/v1/bundles", tag = "bundles",
    responses((status = 200, body = Vec<BundleView>), (status = 401, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn list_bundles(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    require_role(&auth(&s, &headers)?, Role::Viewer)?;
    Ok(axum::Json(s.store.list_bundles()?).into_response())
}

#[utoipa::path(get, path = "/api/v1/bundles/{id}", tag = "bundles",
    params(("id" = String, Path, description = "sha256 of the bundle, hex")),
    responses((status = 200, body = BundleView), (status = 404, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 401, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn get_bundle(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    require_role(&auth(&s, &headers)?, Role::Viewer)?;
    let rec = s
        .store
        .get_bundle(&id)?
        .ok_or_else(|| ApiError::not_found("bundle"))?;
    Ok(axum::Json(rec).into_response())
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

#[utoipa::path(get, path = "/api/v1/bundles/{id}/download", tag = "bundles",
    params(("id" = String, Path, description = "sha256 of the bundle, hex"),
           ("Range" = Option<String>, Header, description = "bytes=START-[END]"),
           ("If-None-Match" = Option<String>, Header, description = "The ETag (the quoted id)")),
    responses((status = 200, description = "The whole bundle", content_type = "application/octet-stream"),
              (status = 206, description = "The requested range", content_type = "application/octet-stream"),
              (status = 304, description = "Not modified"),
              (status = 416, body = edgefleet_wire::api::v1::ErrorBody), (status = 404, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 401, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn download_bundle(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let caller = auth(&s, &headers)?;
    if let Caller::Operator { .. } = caller {
        require_role(&caller, Role::Viewer)?;
    }
    let rec = s
        .store
        .get_bundle(&id)?
        .ok_or_else(|| ApiError::not_found("bundle"))?;
    let path = s
        .registry
        .path(&rec.id)
        .ok_or_else(|| ApiError::not_found("bundle"))?;
    let etag = format!("\"{}\"", rec.id);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let size = rec.size;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, size));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, size.saturating_sub(1)),
        Some(Ok((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
        Some(Err(())) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                axum::Json(edgefleet_wire::api::v1::ErrorBody::new(
                    "range_not_satisfiable",
                    format!("the bundle has {size} bytes"),
                )),
            )
                .into_response());
        }
    };
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| Error::io(&path, e))?;
    s.metrics
        .downloads
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| Error::io(&path, e))?;
    let len = if size == 0 { 0 } else { end - start + 1 };
    let stream = tokio_util::io::ReaderStream::new(file.take(len));
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

/// Device ids: 1..=64 of `[A-Za-z0-9._-]`, safe in paths and MQTT topics.
fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[utoipa::path(post, path = "/api/v1/devices/enroll", tag = "devices",
    request_body = edgefleet_wire::device::EnrollRequest,
    responses((status = 201, body = edgefleet_wire::device::EnrollResponse),
              (status = 400, body = edgefleet_wire::api::v1::ErrorBody), (status = 401, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 409, description = "Already enrolled", body = edgefleet_wire::api::v1::ErrorBody)))]
async fn enroll(State(s): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let req: EnrollRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("enroll request: {e}")))?;
    let token_ok = s
        .enrollment_tokens
        .iter()
        .any(|t| sha256_hex(t) == sha256_hex(&req.enrollment_token));
    if !token_ok {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "bad_enrollment_token",
            "the enrollment token is not valid",
        ));
    }
    if !valid_device_id(&req.device_id) {
        return Err(ApiError::bad_request(
            "bad_device_id",
            "device ids are 1-64 characters of A-Z a-z 0-9 . _ -, not starting with '.'",
        ));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| Error::Store(format!("random: {e}")))?;
    let credential = hex::encode(secret);
    let device = DeviceRecord::enrolled(
        req.device_id.clone(),
        req.tags,
        req.arch,
        req.agent_version,
        sha256_hex(&credential),
        now(),
    );
    // Claimed atomically: two boards enrolling under one id cannot both win.
    if !s.store.insert_device(&device)? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "device_exists",
            format!("device {:?} is already enrolled", req.device_id),
        ));
    }
    Ok((
        StatusCode::CREATED,
        axum::Json(EnrollResponse {
            device_id: device.id,
            credential,
        }),
    )
        .into_response())
}

/// The device as operators see it (no credential hash).
pub(crate) fn device_view(d: &DeviceRecord) -> DeviceView {
    let report = d.report.as_ref();
    DeviceView {
        id: d.id.clone(),
        tags: d.tags.clone(),
        arch: d.arch.clone(),
        agent_version: d.agent_version.clone(),
        enrolled_at: d.enrolled_at,
        last_seen: d.last_seen,
        desired: d.desired.clone(),
        rollout: d.desired_rollout.clone(),
        active: report.and_then(|r| r.active.clone()),
        staged: report.and_then(|r| r.staged.clone()),
        last_failed: report.and_then(|r| r.last_failed.clone()),
        state: report.map(|r| r.state),
        reason: report.and_then(|r| r.reason.clone()),
        health: report.map(|r| r.health.clone()),
        last_known_good: report.and_then(|r| r.last_known_good.clone()),
        shadow: report.and_then(|r| r.shadow.clone()),
        online: d.online,
        telemetry: d.telemetry.clone(),
        events: d.events.clone(),
    }
}

fn parse_tag(s: &str) -> ApiResult<(String, String)> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| ApiError::bad_request("bad_filter", format!("tag filter {s:?}: use k=v")))
}

#[utoipa::path(get, path = "/api/v1/devices", tag = "devices",
    params(("tag" = Option<String>, Query, description = "k=v, repeatable"),
           ("status" = Option<String>, Query, description = "Reported update state"),
           ("version" = Option<String>, Query, description = "Reported active version")),
    responses((status = 200, body = Vec<DeviceView>), (status = 400, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 401, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn list_devices(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult<Response> {
    require_role(&auth(&s, &headers)?, Role::Viewer)?;
    let mut tags = Vec::new();
    let (mut status, mut version) = (None, None);
    for (k, v) in q {
        match k.as_str() {
            "tag" => tags.push(parse_tag(&v)?),
            "status" => status = Some(v),
            "version" => version = Some(v),
            other => {
                return Err(ApiError::bad_request(
                    "bad_filter",
                    format!("unknown filter {other:?}; use tag, status, version"),
                ));
            }
        }
    }
    let devices: Vec<_> = s
        .store
        .list_devices()?
        .iter()
        .filter(|d| tags.iter().all(|(k, v)| d.tags.get(k) == Some(v)))
        .filter(|d| {
            status.as_ref().is_none_or(|st| {
                d.report
                    .as_ref()
                    .is_some_and(|r| r.state.as_str() == st.as_str())
            })
        })
        .filter(|d| {
            version.as_ref().is_none_or(|ver| {
                d.report
                    .as_ref()
                    .and_then(|r| r.active.as_ref())
                    .is_some_and(|a| &a.version == ver)
            })
        })
        .map(device_view)
        .collect();
    Ok(axum::Json(devices).into_response())
}

#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path)),
    responses((status = 200, body = DeviceView), (status = 404, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 401, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn get_device(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    require_role(&auth(&s, &headers)?, Role::Viewer)?;
    let d = s
        .store
        .get_device(&id)?
        .ok_or_else(|| ApiError::not_found("device"))?;
    Ok(axum::Json(device_view(&d)).into_response())
}

#[utoipa::path(patch, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path)), request_body = PatchDevice,
    responses((status = 200, body = DeviceView), (status = 400, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 404, body = edgefleet_wire::api::v1::ErrorBody), (status = 401, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 403, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn patch_device(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let caller = auth(&s, &headers)?;
    require_role(&caller, Role::Operator)?;
    let patch: PatchDevice = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("patch: {e}")))?;
    let d = s
        .store
        .update_device(&id, &mut |d| {
            d.tags.clone_from(&patch.tags);
            true
        })?
        .ok_or_else(|| ApiError::not_found("device"))?;
    audit(&s, &caller, "device.tags", &id)?;
    Ok(axum::Json(device_view(&d)).into_response())
}

fn desired_of(s: &AppState, d: &DeviceRecord) -> ApiResult<DesiredState> {
    // The rollout's gates become the device's watch limits, so a device
    // rolls itself back on the same numbers that would pause the rollout.
    let rollout = match (&d.desired_rollout, d.desired_rollback) {
        (Some(id), false) => s.store.get_rollout(id)?,
        _ => None,
    };
    let watch = rollout.as_ref().map(|r| WatchPolicy {
        max_error_rate: r.spec.gates.max_error_rate,
        max_p95_latency_ms: r.spec.gates.max_p95_latency_ms,
    });
    let shadow = rollout.and_then(|r| r.spec.shadow);
    Ok(DesiredState {
        download: d
            .desired
            .as_ref()
            .map(|b| format!("/api/v1/bundles/{}/download", b.id)),
        bundle: d.desired.clone(),
        rollout_id: d.desired_rollout.clone(),
        rollback: d.desired_rollback,
        watch,
        shadow,
    })
}

#[utoipa::path(get, path = "/api/v1/device/desired", tag = "device",
    params(("If-None-Match" = Option<String>, Header)),
    responses((status = 200, body = edgefleet_wire::device::DesiredState), (status = 304, description = "Unchanged"),
              (status = 401, body = edgefleet_wire::api::v1::ErrorBody), (status = 403, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn device_desired(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    // The credential names the device: there is no way to ask for another's.
    let device = require_device(auth(&s, &headers)?)?;
    let desired = desired_of(&s, &device)?;
    let body = serde_json::to_vec(&desired).map_err(|e| Error::Store(e.to_string()))?;
    let etag = format!("\"{}\"", &sha256_hex(&String::from_utf8_lossy(&body))[..32]);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == etag)
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok((
        StatusCode::OK,
        [
            (header::ETAG, etag),
            (header::CONTENT_TYPE, "application/json".to_string()),
        ],
        body,
    )
        .into_response())
}

#[utoipa::path(post, path = "/api/v1/device/report", tag = "device",
    request_body = edgefleet_wire::device::DeviceReport,
    responses((status = 204, description = "Recorded"), (status = 400, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 401, body = edgefleet_wire::api::v1::ErrorBody), (status = 403, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn device_report(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let device = require_device(auth(&s, &headers)?)?;
    let report: DeviceReport = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("report: {e}")))?;
    // The device is the source of truth for what it runs: record it as is,
    // including a fallback to an older bundle. Only these two fields: the
    // rest of the record may have changed since `auth` read it.
    let at = now();
    s.store
        .update_device(&device.id, &mut |d| {
            d.report = Some(report.clone());
            d.last_seen = Some(at);
            true
        })?
        .ok_or_else(|| ApiError::not_found("device"))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "server",
    responses((status = 200, body = Vec<AuditEntry>), (status = 401, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn list_audit(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    require_role(&auth(&s, &headers)?, Role::Viewer)?;
    Ok(axum::Json(s.store.list_audit()?).into_response())
}

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> Self {
        match e {
            ControllerError::NotFound => ApiError::not_found("rollout"),
            ControllerError::Rollout(r @ crate::rollout::RolloutError::NotAllowed(..)) => {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "transition_not_allowed",
                    r.to_string(),
                )
            }
            ControllerError::Rollout(r) => ApiError::bad_request("invalid_rollout", r.to_string()),
            ControllerError::Store(e) => e.into(),
        }
    }
}

#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts",
    request_body = CreateRollout,
    responses((status = 201, body = RolloutView), (status = 400, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 401, body = edgefleet_wire::api::v1::ErrorBody), (status = 403, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn create_rollout(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let caller = auth(&s, &headers)?;
    require_role(&caller, Role::Operator)?;
    let req: CreateRollout = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("rollout: {e}")))?;
    let bundle = s.store.get_bundle(&req.bundle)?.ok_or_else(|| {
        ApiError::bad_request(
            "unknown_bundle",
            format!("no bundle {:?}; push it first", req.bundle),
        )
    })?;
    let mut id_bytes = [0u8; 8];
    getrandom::fill(&mut id_bytes).map_err(|e| Error::Store(format!("random: {e}")))?;
    let spec = RolloutSpec {
        bundle: bundle.to_ref(),
        selector: req.selector,
        stages: req.stages,
        gates: req.gates,
        shadow: req.shadow,
    };
    let r = s
        .controller
        .create(hex::encode(id_bytes), bundle.to_ref(), spec, now())
        .await?;
    audit(&s, &caller, "rollout.create", &r.id)?;
    Ok((StatusCode::CREATED, axum::Json(s.controller.progress(&r)?)).into_response())
}

#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts",
    responses((status = 200, body = Vec<RolloutView>), (status = 401, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn list_rollouts(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    require_role(&auth(&s, &headers)?, Role::Viewer)?;
    Ok(axum::Json(s.controller.progress_all()?).into_response())
}

#[utoipa::path(get, path = "/api/v1/rollouts/{id}", tag = "rollouts",
    params(("id" = String, Path)),
    responses((status = 200, body = RolloutView), (status = 404, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 401, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn get_rollout(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    require_role(&auth(&s, &headers)?, Role::Viewer)?;
    let r = s
        .store
        .get_rollout(&id)?
        .ok_or_else(|| ApiError::not_found("rollout"))?;
    Ok(axum::Json(s.controller.progress(&r)?).into_response())
}

#[utoipa::path(post, path = "/api/v1/rollouts/{id}/{action}", tag = "rollouts",
    params(("id" = String, Path), ("action" = String, Path, description = "pause, resume, abort or promote")),
    responses((status = 200, body = RolloutView), (status = 400, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 404, body = edgefleet_wire::api::v1::ErrorBody), (status = 409, description = "Not allowed in this phase", body = edgefleet_wire::api::v1::ErrorBody),
              (status = 401, body = edgefleet_wire::api::v1::ErrorBody), (status = 403, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
async fn rollout_action(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Response> {
    let caller = auth(&s, &headers)?;
    require_role(&caller, Role::Operator)?;
    let cmd = match RolloutAction::parse(&action) {
        Some(RolloutAction::Pause) => Command::Pause,
        Some(RolloutAction::Resume) => Command::Resume,
        Some(RolloutAction::Abort) => Command::Abort,
        Some(RolloutAction::Promote) => Command::Promote,
        None => {
            return Err(ApiError::not_found(&format!(
                "action {action:?} (use pause, resume, abort, promote)"
            )));
        }
    };
    let r = s.controller.command(&id, cmd, now()).await?;
    audit(&s, &caller, &format!("rollout.{action}"), &id)?;
    Ok(axum::Json(s.controller.progress(&r)?).into_response())
}
