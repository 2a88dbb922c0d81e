//! Maintenance windows on devices and tags (`/api/v1/windows`). A rollout
//! carries its own (`window` in `POST /api/v1/rollouts`). Each device's
//! desired state gets the first that applies: its own, its tags' (in tag
//! order), its rollout's; a device activates a new model only inside it.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use edgefleet_wire::api::v1::{ErrorBody, WindowEntry};
use edgefleet_wire::window::Schedule;

use super::{ApiError, ApiResult, AppState, read_json};
use crate::auth::Action;
use crate::store::Write;

/// At most this many device and tag windows.
pub const MAX_WINDOW_SCOPES: usize = 10_000;

/// `device:<id>` or `tag:<key>=<value>`, checked like device ids and tags.
fn valid_scope(scope: &str) -> Result<(), ApiError> {
    let bad = || {
        ApiError::bad_request(
            "bad_scope",
            format!("scope {scope:?}: use device:<id> or tag:<key>=<value>"),
        )
    };
    if let Some(id) = scope.strip_prefix("device:") {
        return if super::devices::valid_device_id(id) {
            Ok(())
        } else {
            Err(bad())
        };
    }
    let (k, v) = scope
        .strip_prefix("tag:")
        .and_then(|kv| kv.split_once('='))
        .ok_or_else(bad)?;
    super::devices::valid_tags(&BTreeMap::from([(k.to_string(), v.to_string())]))
}

#[utoipa::path(get, path = "/api/v1/windows", tag = "windows",
    responses((status = 200, description = "Device and tag windows, by scope", body = Vec<WindowEntry>),
              (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Vec<WindowEntry>>> {
    s.allow(&headers, Action::ReadFleet)?;
    Ok(axum::Json(
        s.fleet
            .windows()
            .iter()
            .map(|(scope, schedule)| WindowEntry {
                scope: scope.clone(),
                schedule: schedule.clone(),
            })
            .collect(),
    ))
}

#[utoipa::path(put, path = "/api/v1/windows/{scope}", tag = "windows",
    params(("scope" = String, Path, description = "device:<id> or tag:<key>=<value>")),
    request_body = Schedule,
    responses((status = 200, body = WindowEntry), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(scope): Path<String>,
    body: Body,
) -> ApiResult<axum::Json<WindowEntry>> {
    let caller = s.allow(&headers, Action::ManageRollouts)?;
    valid_scope(&scope)?;
    let schedule: Schedule = read_json(&s, body, &headers, "schedule").await?;
    crate::rollout::validate_window(&schedule)
        .map_err(|e| ApiError::bad_request("invalid_window", e))?;
    let _g = s.fleet.windows_lock.lock().await;
    let mut table = (*s.fleet.windows()).clone();
    if !table.contains_key(&scope) && table.len() >= MAX_WINDOW_SCOPES {
        return Err(ApiError::bad_request(
            "too_many_windows",
            format!("at most {MAX_WINDOW_SCOPES} device and tag windows"),
        ));
    }
    s.commit(vec![
        Write::Window(scope.clone(), Some(schedule.clone())),
        s.audit_write(&caller, "window.set", &scope),
    ])
    .await?;
    table.insert(scope.clone(), schedule.clone());
    s.fleet.set_windows(table, |r| s.controller.terms(r));
    Ok(axum::Json(WindowEntry { scope, schedule }))
}

#[utoipa::path(delete, path = "/api/v1/windows/{scope}", tag = "windows",
    params(("scope" = String, Path, description = "device:<id> or tag:<key>=<value>")),
    responses((status = 200, description = "Cleared; the window it had", body = WindowEntry), (status = 404, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(scope): Path<String>,
) -> ApiResult<axum::Json<WindowEntry>> {
    let caller = s.allow(&headers, Action::ManageRollouts)?;
    valid_scope(&scope)?;
    let _g = s.fleet.windows_lock.lock().await;
    let mut table = (*s.fleet.windows()).clone();
    let Some(schedule) = table.remove(&scope) else {
        return Err(ApiError::not_found("window"));
    };
    s.commit(vec![
        Write::Window(scope.clone(), None),
        s.audit_write(&caller, "window.clear", &scope),
    ])
    .await?;
    s.fleet.set_windows(table, |r| s.controller.terms(r));
    Ok(axum::Json(WindowEntry { scope, schedule }))
}
