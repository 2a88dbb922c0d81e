//! Rollouts: create (stages, gates, shadow), list, status from memory, and
//! the operator commands.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use edgefleet_wire::api::v1::{CreateRollout, ErrorBody, RolloutAction, RolloutView};
use edgefleet_wire::time::unix_now as now;

use super::{ApiError, ApiResult, AppState, read_json};
use crate::auth::Action;
use crate::controller::ControllerError;
use crate::rollout::{Command, RolloutSpec};

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
            ControllerError::Write(e) => e.into(),
            ControllerError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            ControllerError::Invalid(m) => ApiError::bad_request("invalid_experiment", m),
        }
    }
}

#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts",
    request_body = CreateRollout,
    responses((status = 201, body = RolloutView), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let caller = s.allow(&headers, Action::ManageRollouts)?;
    let req: CreateRollout = read_json(&s, body, &headers, "rollout").await?;
    let bundle = super::bundles::resolve(&s, &req.bundle).map_err(|_| {
        ApiError::bad_request(
            "unknown_bundle",
            format!("no bundle {:?}; push it first", req.bundle),
        )
    })?;
    let id = super::random_id()?;
    let spec = RolloutSpec {
        bundle: bundle.to_ref(),
        selector: req.selector,
        stages: req.stages,
        gates: req.gates,
        shadow: req.shadow,
        window: req.window,
    };
    let view = s.controller.create(id.clone(), spec, now()).await?;
    s.commit(vec![s.audit_write(&caller, "rollout.create", &id)])
        .await?;
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts",
    responses((status = 200, description = "Newest first", body = Vec<RolloutView>), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Vec<RolloutView>>> {
    s.allow(&headers, Action::ReadFleet)?;
    Ok(axum::Json(s.controller.views()))
}

/// The rollout an id or a unique prefix names.
fn resolve(s: &AppState, id: &str) -> ApiResult<RolloutView> {
    if let Some(v) = s.controller.view(id) {
        return Ok(v);
    }
    let matches: Vec<RolloutView> = if id.len() >= 4 {
        s.controller
            .views()
            .into_iter()
            .filter(|v| v.id.starts_with(id))
            .collect()
    } else {
        Vec::new()
    };
    match matches.len() {
        1 => Ok(matches
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::not_found("rollout"))?),
        0 => Err(ApiError::not_found("rollout")),
        n => Err(ApiError::bad_request(
            "ambiguous_id",
            format!("{id} matches {n} rollouts; give more characters"),
        )),
    }
}

#[utoipa::path(get, path = "/api/v1/rollouts/{id}", tag = "rollouts",
    params(("id" = String, Path, description = "The rollout id or a unique prefix of 4+ characters")),
    responses((status = 200, body = RolloutView), (status = 404, body = ErrorBody),
              (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_one(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<RolloutView>> {
    s.allow(&headers, Action::ReadFleet)?;
    Ok(axum::Json(resolve(&s, &id)?))
}

#[utoipa::path(post, path = "/api/v1/rollouts/{id}/{action}", tag = "rollouts",
    params(("id" = String, Path), ("action" = RolloutAction, Path, description = "pause, resume, abort or promote")),
    responses((status = 200, body = RolloutView), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, description = "Not allowed in this phase", body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn action(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<axum::Json<RolloutView>> {
    let caller = s.allow(&headers, Action::ManageRollouts)?;
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
    let id = resolve(&s, &id)?.id;
    let view = s.controller.command(&id, cmd, now()).await?;
    s.commit(vec![s.audit_write(
        &caller,
        &format!("rollout.{action}"),
        &id,
    )])
    .await?;
    Ok(axum::Json(view))
}
