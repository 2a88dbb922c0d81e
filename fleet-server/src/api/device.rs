//! What devices call with their own credential: the desired state (ETag,
//! served from memory) and their report (durable before the 204).

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use edgefleet_wire::api::v1::ErrorBody;
use edgefleet_wire::device::DeviceReport;

use super::{ApiError, ApiResult, AppState};
use crate::auth::{Action, Caller};
use crate::fleet::{DesiredDoc, lock};
use crate::store::Reported;

#[utoipa::path(get, path = "/api/v1/device/desired", tag = "device",
    params(("If-None-Match" = Option<String>, Header)),
    responses((status = 200, body = edgefleet_wire::device::DesiredState), (status = 304, description = "Unchanged"),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn desired(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    // The credential names the device: there is no way to ask for another's.
    let Caller::Device { cell, .. } = s.allow(&headers, Action::CheckIn)? else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this endpoint is for devices",
        ));
    };
    let doc = lock(&cell).doc.clone();
    Ok(answer_desired(&doc, &headers))
}

/// A desired-state document as served (a 304 for its ETag), by the
/// active server and by a standby from its copy alike.
pub fn answer_desired(doc: &DesiredDoc, headers: &HeaderMap) -> Response {
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == doc.etag)
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, doc.etag.clone())]).into_response();
    }
    (
        StatusCode::OK,
        [
            (header::ETAG, doc.etag.clone()),
            (header::CONTENT_TYPE, "application/json".to_string()),
        ],
        doc.body.clone(),
    )
        .into_response()
}

#[utoipa::path(post, path = "/api/v1/device/report", tag = "device",
    request_body = DeviceReport,
    responses((status = 204, description = "Recorded (durably)"), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 413, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn report(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let Caller::Device { id, cell } = s.allow(&headers, Action::Report)? else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this endpoint is for devices",
        ));
    };
    let bytes = super::read_body(body, &headers, s.config.http.max_request_bytes).await?;
    let reported = parse_report(&bytes)?;
    let writes = crate::ingest::record_report(&mut lock(&cell), &id, reported);
    s.commit(writes).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A device's report body, stamped with the time it arrived: what the
/// active server records and a standby stores in the inbox alike. The
/// device is the source of truth for what it runs, so it is kept as is,
/// a fallback to an older bundle included.
pub fn parse_report(bytes: &[u8]) -> ApiResult<Reported> {
    let report: DeviceReport = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("report: {e}")))?;
    Ok(Reported {
        report,
        at: edgefleet_wire::time::unix_now(),
    })
}
