//! Trust-root rotation: `GET /api/v1/trust` (the chain, for operators and
//! devices) and `POST /api/v1/trust` (an admin publishes the next signed
//! version; `fleetctl trust rotate`).

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use edgefleet_wire::api::v1::{ErrorBody, TrustView};
use edgefleet_wire::time::unix_now as now;
use edgefleet_wire::trust::SignedTrust;

use super::{ApiError, ApiResult, AppState, read_json};
use crate::auth::{Action, require};
use crate::store::Write;

#[utoipa::path(get, path = "/api/v1/trust", tag = "admin",
    responses((status = 200, description = "The trust version now and the signed chain since version 1", body = TrustView),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<axum::Json<TrustView>> {
    // Operators read it; devices walk it.
    let caller = s.caller(&headers, None)?;
    require(&caller, Action::ReadFleet).or_else(|_| require(&caller, Action::CheckIn))?;
    Ok(axum::Json(s.trust.view()))
}

#[utoipa::path(post, path = "/api/v1/trust", tag = "admin",
    request_body = SignedTrust,
    responses((status = 200, description = "Accepted: devices get it with their desired state", body = TrustView),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 409, description = "Not the next version", body = ErrorBody),
              (status = 422, description = "Signatures or contents refused", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<axum::Json<TrustView>> {
    let caller = s.allow(&headers, Action::ManageTrust)?;
    let doc: SignedTrust = read_json(&s, body, &headers, "trust document").await?;
    let refused = |e: edgefleet_wire::error::Error| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string())
    };
    let peeked = doc.peek_unverified().map_err(|e| match e {
        edgefleet_wire::error::Error::TooLarge { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string())
        }
        e => ApiError::bad_request(e.code(), e.to_string()),
    })?;
    let _one_at_a_time = s.trust.rotating.lock().await;
    let current = s.trust.current().version();
    if peeked.version != current + 1 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_next_version",
            format!(
                "trust version {} is not the next one: the current version is {current}",
                peeked.version
            ),
        ));
    }
    let next = s.trust.check_next(&doc).map_err(refused)?;
    // Publishing a root that is already stale would stop every install.
    next.check_fresh(now()).map_err(refused)?;
    s.commit(vec![
        Write::Trust(doc.clone()),
        s.audit_write(
            &caller,
            "trust.rotate",
            &format!("version {}", next.version()),
        ),
    ])
    .await?;
    let version = next.version();
    s.trust.accept(next);
    let controller = s.controller.clone();
    s.fleet.set_trust(doc, |r| controller.terms(r));
    tracing::warn!(version, by = %caller.name(), "trust root rotated");
    Ok(axum::Json(s.trust.view()))
}
