//! Admin endpoints: per-batch enrollment tokens, and the audit log.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use edgefleet_wire::api::v1::{
    AuditEntry, CreateEnrollmentToken, CreatedEnrollmentToken, EnrollmentTokenView, ErrorBody,
};
use edgefleet_wire::time::unix_now as now;
use serde::Deserialize;

use super::{ApiError, ApiResult, AppState, read_json};
use crate::auth::{Action, sha256_hex};
use crate::error::Error;
use crate::store::{EnrollmentToken, Write};

fn view(t: &EnrollmentToken) -> EnrollmentTokenView {
    EnrollmentTokenView {
        name: t.name.clone(),
        tags: t.tags.clone(),
        allowed_tags: t.allowed_tags.clone(),
        expires_at: t.expires_at,
        max_uses: t.max_uses,
        uses: t.uses,
        created_at: t.created_at,
        created_by: t.created_by.clone(),
        revoked_at: t.revoked_at,
    }
}

#[utoipa::path(post, path = "/api/v1/enrollment-tokens", tag = "admin",
    request_body = CreateEnrollmentToken,
    responses((status = 201, description = "Created; `token` is shown only now", body = CreatedEnrollmentToken),
              (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_token(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let caller = s.allow(&headers, Action::ManageEnrollmentTokens)?;
    let req: CreateEnrollmentToken = read_json(&s, body, &headers, "enrollment token").await?;
    if !super::devices::valid_device_id(&req.name) {
        return Err(ApiError::bad_request(
            "bad_name",
            "token names are 1-64 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    if req.max_uses == 0 || req.expires_in_secs == 0 || req.expires_in_secs > 366 * 86_400 {
        return Err(ApiError::bad_request(
            "bad_token",
            "max_uses must be at least 1 and expires_in_secs within 1..=31622400",
        ));
    }
    let mut secret = [0u8; 24];
    getrandom::fill(&mut secret).map_err(|e| Error::Store(format!("random: {e}")))?;
    let token = format!("eft_{}", hex::encode(secret));
    let at = now();
    let t = EnrollmentToken {
        name: req.name.clone(),
        token_sha256: sha256_hex(&token),
        tags: req.tags,
        allowed_tags: req.allowed_tags,
        expires_at: at + req.expires_in_secs,
        max_uses: req.max_uses,
        uses: 0,
        created_at: at,
        created_by: caller.name(),
        revoked_at: None,
    };
    if !s.enrollment.add(t.clone()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "token_exists",
            format!("an enrollment token named {:?} exists", req.name),
        ));
    }
    s.commit(vec![
        Write::EnrollmentToken(t.clone()),
        s.audit_write(&caller, "token.create", &t.name),
    ])
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedEnrollmentToken {
            token,
            view: view(&t),
        }),
    )
        .into_response())
}

#[utoipa::path(get, path = "/api/v1/enrollment-tokens", tag = "admin",
    responses((status = 200, body = Vec<EnrollmentTokenView>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_tokens(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Vec<EnrollmentTokenView>>> {
    s.allow(&headers, Action::ManageEnrollmentTokens)?;
    Ok(axum::Json(s.enrollment.list().iter().map(view).collect()))
}

#[utoipa::path(delete, path = "/api/v1/enrollment-tokens/{name}", tag = "admin",
    params(("name" = String, Path)),
    responses((status = 200, description = "Revoked", body = EnrollmentTokenView), (status = 404, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_token(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<EnrollmentTokenView>> {
    let caller = s.allow(&headers, Action::ManageEnrollmentTokens)?;
    let t = s
        .enrollment
        .revoke(&name, now())
        .ok_or_else(|| ApiError::not_found("enrollment token"))?;
    s.commit(vec![
        Write::EnrollmentToken(t.clone()),
        s.audit_write(&caller, "token.revoke", &name),
    ])
    .await?;
    Ok(axum::Json(view(&t)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    /// Entries after this position (the `X-Next-Position` of a page).
    after: Option<u64>,
    /// At most this many (default 1000).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "admin",
    params(AuditQuery),
    responses((status = 200, description = "Oldest first", body = Vec<AuditEntry>), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Response> {
    s.allow(&headers, Action::ReadAudit)?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let store = s.store.clone();
    let entries = tokio::task::spawn_blocking(move || store.audit(q.after, limit))
        .await
        .map_err(|e| Error::Store(e.to_string()))??;
    let next = entries.last().map(|(p, _)| *p);
    let body: Vec<AuditEntry> = entries.into_iter().map(|(_, e)| e).collect();
    let mut r = axum::Json(body).into_response();
    if let Some(p) = next
        && let Ok(v) = axum::http::HeaderValue::from_str(&p.to_string())
    {
        r.headers_mut().insert("x-next-position", v);
    }
    Ok(r)
}
