//! The inventory: enrollment, listing in pages, one device, tags,
//! revocation and decommissioning.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use edgefleet_wire::api::v1::{DeviceView, ErrorBody, PatchDevice};
use edgefleet_wire::device::{EnrollRequest, EnrollResponse};
use edgefleet_wire::time::unix_now as now;

use super::{ApiError, ApiResult, AppState, read_json};
use crate::auth::{Action, sha256_hex};
use crate::error::Error;
use crate::fleet::{lock, view};
use crate::store::{DeviceRecord, Identity, Part, Write};

/// Device ids: 1..=64 of `[A-Za-z0-9._-]`, safe in paths and MQTT topics.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Ids the server's own broker logins use (`fleet-server`, its
/// shared-ingest slots `fleet-server-1`, …, and the configured
/// username's): a device under one would share their password-file
/// entry and their ACL.
pub fn reserved_device_id(id: &str, mqtt: Option<&crate::config::MqttConfig>) -> bool {
    let own = mqtt.and_then(|m| m.username.as_deref());
    [Some(crate::mqtt::acl::SERVER_CLIENT_PREFIX), own]
        .into_iter()
        .flatten()
        .any(|u| {
            id.strip_prefix(u)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
        })
}

/// Tag keys and values: printable, short, no control characters.
pub(super) fn valid_tags(tags: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if tags.len() > 32 {
        return Err(ApiError::bad_request("bad_tags", "at most 32 tags"));
    }
    for (k, v) in tags {
        let ok_key = !k.is_empty()
            && k.len() <= 64
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
        let ok_value = v.len() <= 128 && !v.chars().any(char::is_control);
        if !ok_key || !ok_value {
            return Err(ApiError::bad_request(
                "bad_tags",
                format!(
                    "tag {k:?}: keys are 1-64 of A-Z a-z 0-9 . _ - /, values at most 128 characters without control characters"
                ),
            ));
        }
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/devices/enroll", tag = "devices",
    request_body = EnrollRequest,
    responses((status = 201, body = EnrollResponse),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, description = "A tag the token does not allow", body = ErrorBody),
              (status = 409, description = "Already enrolled", body = ErrorBody)))]
pub async fn enroll(
    State(s): State<AppState>,
    cert: Option<axum::Extension<super::ClientCert>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let req: EnrollRequest = read_json(&s, body, &headers, "enroll request").await?;
    // With device certificates, a stolen enrollment token alone enrolls
    // nothing: the certificate must name the id being enrolled.
    super::check_device_cert(&s, cert.as_ref().map(|c| &c.0), &req.device_id)?;
    let at = now();
    let grant = s
        .enrollment
        .admit(&req.enrollment_token, &req.tags, at)
        .map_err(|r| {
            let status = match r {
                crate::enrollment::Refusal::TagNotAllowed { .. } => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            ApiError::new(status, r.code(), r.to_string())
        })?;
    let refuse = |e: ApiError| {
        s.enrollment.release(&grant);
        e
    };
    if !valid_device_id(&req.device_id) {
        return Err(refuse(ApiError::bad_request(
            "bad_device_id",
            "device ids are 1-64 characters of A-Z a-z 0-9 . _ -, not starting with '.'",
        )));
    }
    if reserved_device_id(&req.device_id, s.config.mqtt.as_ref()) {
        return Err(refuse(ApiError::bad_request(
            "reserved_device_id",
            "this device id is a fleet-server login at the broker",
        )));
    }
    valid_tags(&grant.tags).map_err(refuse)?;
    if req.arch.len() > 32 || req.agent_version.len() > 64 {
        return Err(refuse(ApiError::bad_request(
            "bad_enroll_request",
            "arch or agent_version too long",
        )));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| Error::Store(format!("random: {e}")))?;
    let credential = hex::encode(secret);
    let rec = DeviceRecord::enrolled(
        req.device_id.clone(),
        Identity {
            tags: grant.tags.clone(),
            arch: req.arch,
            agent_version: req.agent_version,
            credential_sha256: sha256_hex(&credential),
            enrolled_at: at,
            enrolled_with: Some(grant.token_name.clone()),
            revoked_at: None,
            broker_password: match s.mqtt.as_ref().and_then(|m| m.mosquitto.as_ref()) {
                Some(_) => Some(crate::mqtt::mosquitto::hash(&credential)?),
                None => None,
            },
        },
    );
    // Claimed in memory first: two boards enrolling under one id cannot
    // both win.
    if !s.fleet.insert(rec.clone()) {
        return Err(refuse(ApiError::new(
            StatusCode::CONFLICT,
            "device_exists",
            format!("device {:?} is already enrolled", req.device_id),
        )));
    }
    let mut writes = vec![Write::NewDevice(Box::new(rec))];
    if let Some(t) = grant.used.clone() {
        writes.push(Write::EnrollmentToken(t));
    }
    if let Err(e) = s.commit(writes).await {
        s.fleet.remove(&req.device_id);
        return Err(refuse(e));
    }
    if let Some(sync) = s.mqtt.as_ref().and_then(|m| m.mosquitto.as_ref()) {
        sync.changed();
    }
    tracing::info!(device = %req.device_id, token = %grant.token_name, "device enrolled");
    Ok((
        StatusCode::CREATED,
        axum::Json(EnrollResponse {
            device_id: req.device_id,
            credential,
        }),
    )
        .into_response())
}

/// Page size of `GET /api/v1/devices` unless `limit` says otherwise.
pub const DEFAULT_PAGE: usize = 500;
pub const MAX_PAGE: usize = 1000;

#[utoipa::path(get, path = "/api/v1/devices", tag = "devices",
    params(("tag" = Option<String>, Query, description = "k=v, repeatable"),
           ("status" = Option<String>, Query, description = "Reported update state"),
           ("version" = Option<String>, Query, description = "Reported active version"),
           ("online" = Option<bool>, Query, description = "MQTT online state"),
           ("rollout" = Option<String>, Query, description = "The rollout that assigned the device its desired bundle (full id)"),
           ("limit" = Option<usize>, Query, description = "Page size, 1..=1000 (default 500)"),
           ("cursor" = Option<String>, Query, description = "The last id of the previous page")),
    responses((status = 200, description = "One page, in id order; a `Link: <…>; rel=\"next\"` header points to the next", body = Vec<DeviceView>),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult<Response> {
    s.allow(&headers, Action::ReadFleet)?;
    let mut tags = Vec::new();
    let (mut status, mut version, mut online, mut cursor) = (None, None, None, None);
    let mut rollout: Option<String> = None;
    let mut limit = DEFAULT_PAGE;
    for (k, v) in &q {
        match k.as_str() {
            "tag" => tags.push(
                v.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| {
                        ApiError::bad_request("bad_filter", format!("tag filter {v:?}: use k=v"))
                    })?,
            ),
            "status" => status = Some(v.clone()),
            "version" => version = Some(v.clone()),
            "rollout" => rollout = Some(v.clone()),
            "online" => {
                online =
                    Some(v.parse::<bool>().map_err(|_| {
                        ApiError::bad_request("bad_filter", "online is true or false")
                    })?);
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request("bad_filter", format!("limit is 1..={MAX_PAGE}"))
                    })?;
            }
            "cursor" => cursor = Some(v.clone()),
            other => {
                return Err(ApiError::bad_request(
                    "bad_filter",
                    format!(
                        "unknown filter {other:?}; use tag, status, version, online, rollout, limit, cursor"
                    ),
                ));
            }
        }
    }
    let (page, more) = s.fleet.page(cursor.as_deref(), limit, |d| {
        tags.iter().all(|(k, v)| d.identity.tags.get(k) == Some(v))
            && status
                .as_ref()
                .is_none_or(|st| d.report().is_some_and(|r| r.state.as_str() == st.as_str()))
            && version.as_ref().is_none_or(|ver| {
                d.report()
                    .and_then(|r| r.active.as_ref())
                    .is_some_and(|a| &a.version == ver)
            })
            && online.is_none_or(|o| d.live.online.unwrap_or(false) == o)
            && rollout
                .as_ref()
                .is_none_or(|r| d.desired.rollout.as_deref() == Some(r.as_str()))
    });
    let mut r = axum::Json(&page).into_response();
    if more && let Some(last) = page.last() {
        let mut query: Vec<String> = q
            .iter()
            .filter(|(k, _)| k != "cursor")
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect();
        query.push(format!("cursor={}", urlencode(&last.id)));
        if let Ok(v) = HeaderValue::from_str(&format!(
            "</api/v1/devices?{}>; rel=\"next\"",
            query.join("&")
        )) {
            r.headers_mut().insert(header::LINK, v);
        }
    }
    Ok(r)
}

fn urlencode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path)),
    responses((status = 200, body = DeviceView), (status = 404, body = ErrorBody),
              (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_one(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<DeviceView>> {
    s.allow(&headers, Action::ReadFleet)?;
    let cell = s
        .fleet
        .get(&id)
        .ok_or_else(|| ApiError::not_found("device"))?;
    let v = view_with_window(&s, &lock(&cell).rec);
    Ok(axum::Json(v))
}

/// The device view with the maintenance window that applies to it.
fn view_with_window(s: &AppState, rec: &crate::store::DeviceRecord) -> DeviceView {
    let mut v = view(rec);
    let terms = s.controller.terms(rec.desired.rollout.as_deref());
    v.window = s.fleet.window_of(rec, &terms);
    v
}

#[utoipa::path(patch, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path)), request_body = PatchDevice,
    responses((status = 200, body = DeviceView), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn patch(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult<axum::Json<DeviceView>> {
    let caller = s.allow(&headers, Action::TagDevices)?;
    let patch: PatchDevice = read_json(&s, body, &headers, "patch").await?;
    valid_tags(&patch.tags)?;
    let cell = s
        .fleet
        .get(&id)
        .ok_or_else(|| ApiError::not_found("device"))?;
    let identity = {
        let mut d = lock(&cell);
        d.rec.identity.tags.clone_from(&patch.tags);
        d.rec.identity.clone()
    };
    s.fleet.touch_generation();
    s.commit(vec![
        Write::Device(id.clone(), Part::Identity(identity)),
        s.audit_write(&caller, "device.tags", &id),
    ])
    .await?;
    // New tags may bring other tag windows.
    let v = {
        let mut d = lock(&cell);
        let terms = s.controller.terms(d.rec.desired.rollout.as_deref());
        s.fleet.rebuild(&mut d, &terms);
        view_with_window(&s, &d.rec)
    };
    Ok(axum::Json(v))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", tag = "devices",
    params(("id" = String, Path)),
    responses((status = 200, description = "The credential is dead: API and broker refuse it", body = DeviceView),
              (status = 404, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<DeviceView>> {
    let caller = s.allow(&headers, Action::RevokeDevices)?;
    let cell = s
        .fleet
        .get(&id)
        .ok_or_else(|| ApiError::not_found("device"))?;
    let (identity, cred) = {
        let mut d = lock(&cell);
        d.rec.identity.revoked_at.get_or_insert(now());
        (
            d.rec.identity.clone(),
            d.rec.identity.credential_sha256.clone(),
        )
    };
    s.fleet.forget_credential(&cred);
    if let Some(m) = &s.mqtt {
        m.disconnect(&id);
    }
    s.commit(vec![
        Write::Device(id.clone(), Part::Identity(identity)),
        s.audit_write(&caller, "device.revoke", &id),
    ])
    .await?;
    tracing::warn!(device = %id, by = %caller.name(), "device credential revoked");
    let v = view(&lock(&cell).rec);
    Ok(axum::Json(v))
}

#[utoipa::path(delete, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path)),
    responses((status = 204, description = "Decommissioned: forgotten, its credential dead"),
              (status = 404, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn decommission(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let caller = s.allow(&headers, Action::RevokeDevices)?;
    s.fleet
        .remove(&id)
        .ok_or_else(|| ApiError::not_found("device"))?;
    if let Some(m) = &s.mqtt {
        m.disconnect(&id);
    }
    s.commit(vec![
        Write::RemoveDevice(id.clone()),
        s.audit_write(&caller, "device.decommission", &id),
    ])
    .await?;
    tracing::warn!(device = %id, by = %caller.name(), "device decommissioned");
    Ok(StatusCode::NO_CONTENT.into_response())
}
