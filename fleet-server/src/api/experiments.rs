//! A/B experiments (crate::experiment): create, list, status with the
//! verdict, stop, conclude.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use edgefleet_wire::api::v1::{
    ConcludeExperiment, CreateExperiment, ErrorBody, ExperimentView, Metric, Stage,
};
use edgefleet_wire::time::unix_now as now;

use super::{ApiError, ApiResult, AppState, random_id, read_json};
use crate::auth::Action;
use crate::controller::{ControllerError, ExperimentCommand};
use crate::experiment::{Arm, ExperimentSpec};

fn not_found(e: ControllerError) -> ApiError {
    match e {
        ControllerError::NotFound => ApiError::not_found("experiment"),
        other => other.into(),
    }
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[utoipa::path(post, path = "/api/v1/experiments", tag = "experiments",
    request_body = CreateExperiment,
    responses((status = 201, body = ExperimentView), (status = 400, body = ErrorBody),
              (status = 409, description = "A rollout or experiment holds the devices", body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let caller = s.allow(&headers, Action::ManageRollouts)?;
    let req: CreateExperiment = read_json(&s, body, &headers, "experiment").await?;
    if !valid_name(&req.name) {
        return Err(ApiError::bad_request(
            "invalid_experiment",
            "name: 1-64 of [A-Za-z0-9._-]",
        ));
    }
    let arm = |key: &str, which: &str| {
        super::bundles::resolve(&s, key)
            .map(|b| b.to_ref())
            .map_err(|_| {
                ApiError::bad_request(
                    "unknown_bundle",
                    format!("arm {which}: no bundle {key:?}; push it first"),
                )
            })
    };
    let spec = ExperimentSpec {
        name: req.name,
        a: arm(&req.a, "a")?,
        b: arm(&req.b, "b")?,
        selector: req.selector,
        split_pct: req.split_pct.unwrap_or(50.0),
        allocation: req.allocation,
        primary: req.primary.unwrap_or(Metric::LatencyP95Ms),
        guardrail: req.guardrail,
        confidence: req.confidence.unwrap_or(0.95),
        min_share: req.min_share.unwrap_or(0.1),
        max_switches_per_hour: req.max_switches_per_hour.unwrap_or(1),
    };
    let id = random_id()?;
    let view = s
        .controller
        .create_experiment(id.clone(), spec, now())
        .await?;
    s.commit(vec![s.audit_write(&caller, "experiment.create", &id)])
        .await?;
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

#[utoipa::path(get, path = "/api/v1/experiments", tag = "experiments",
    responses((status = 200, description = "Newest first", body = Vec<ExperimentView>), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Vec<ExperimentView>>> {
    s.allow(&headers, Action::ReadFleet)?;
    Ok(axum::Json(s.controller.experiment_views()))
}

#[utoipa::path(get, path = "/api/v1/experiments/{id}", tag = "experiments",
    params(("id" = String, Path, description = "The id, a unique prefix of 4+ characters, or the name of a running experiment")),
    responses((status = 200, body = ExperimentView), (status = 404, body = ErrorBody),
              (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_one(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<ExperimentView>> {
    s.allow(&headers, Action::ReadFleet)?;
    let id = s.controller.find_experiment(&id).map_err(not_found)?;
    s.controller
        .experiment_view(&id)
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found("experiment"))
}

#[utoipa::path(post, path = "/api/v1/experiments/{id}/{action}", tag = "experiments",
    params(("id" = String, Path), ("action" = String, Path, description = "stop or conclude")),
    request_body(content = ConcludeExperiment, description = "conclude: the winner (default: the significant one) and the winner's rollout stages and gates"),
    responses((status = 200, body = ExperimentView), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, description = "Not running, or no significant winner to conclude with", body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn action(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Body,
) -> ApiResult<axum::Json<ExperimentView>> {
    let caller = s.allow(&headers, Action::ManageRollouts)?;
    let id = s.controller.find_experiment(&id).map_err(not_found)?;
    let cmd = match action.as_str() {
        "stop" => ExperimentCommand::Stop,
        "conclude" => {
            let bytes = super::read_body(body, &headers, s.config.http.max_request_bytes).await?;
            let req: ConcludeExperiment = if bytes.iter().all(u8::is_ascii_whitespace) {
                ConcludeExperiment::default()
            } else {
                serde_json::from_slice(&bytes).map_err(|e| {
                    ApiError::bad_request("malformed_json", format!("conclude: {e}"))
                })?
            };
            let winner = match req.winner.as_deref() {
                None => None,
                Some("a" | "A") => Some(Arm::A),
                Some("b" | "B") => Some(Arm::B),
                Some(other) => {
                    return Err(ApiError::bad_request(
                        "invalid_experiment",
                        format!("winner {other:?}: use a or b"),
                    ));
                }
            };
            ExperimentCommand::Conclude {
                winner,
                rollout_id: random_id()?,
                stages: req.stages.unwrap_or_else(|| {
                    vec![Stage {
                        percent: 100,
                        bake_minutes: 0,
                        bake_seconds: None,
                    }]
                }),
                gates: req.gates.unwrap_or_default(),
            }
        }
        other => {
            return Err(ApiError::not_found(&format!(
                "action {other:?} (use stop, conclude)"
            )));
        }
    };
    let view = s
        .controller
        .experiment_command(&id, cmd, now())
        .await
        .map_err(not_found)?;
    s.commit(vec![s.audit_write(
        &caller,
        &format!("experiment.{action}"),
        &id,
    )])
    .await?;
    Ok(axum::Json(view))
}
