//! What the console (and dashboards, and scripts) read besides the
//! inventory: the fleet at a glance, a device's recent telemetry, and a
//! stream of change notices (server-sent events) so views stay live
//! without polling every resource.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use edgefleet_wire::api::v1::{ErrorBody, FleetSummary, TelemetryPoint};

use super::{ApiError, ApiResult, AppState};
use crate::auth::Action;
use crate::fleet::lock;

/// Change streams open at once; more are answered 503.
pub const MAX_STREAMS: usize = 256;

/// How often a stream looks for changes.
const STREAM_TICK: Duration = Duration::from_millis(500);

/// Counts the fleet (one pass over the devices, no store reads).
pub fn summary_of(s: &AppState) -> FleetSummary {
    let mut out = FleetSummary::default();
    for cell in s.fleet.cells() {
        let d = lock(&cell);
        let r = &d.rec;
        out.devices += 1;
        let report = r.report();
        *out.by_state
            .entry(report.map_or("unreported", |r| r.state.as_str()).into())
            .or_default() += 1;
        let model = report.and_then(|r| r.active.as_ref()).map_or_else(
            || "none".to_string(),
            |a| format!("{}@{}", a.name, a.version),
        );
        *out.by_version.entry(model).or_default() += 1;
        let board = r
            .identity
            .tags
            .get("board")
            .cloned()
            .unwrap_or_else(|| "none".into());
        *out.by_board.entry(board).or_default() += 1;
        let presence = match r.live.online {
            Some(true) => "online",
            Some(false) => "offline",
            None => "unknown",
        };
        *out.by_presence.entry(presence.into()).or_default() += 1;
    }
    let phases = s.controller.phases();
    out.rollouts = ["running", "paused", "completed", "aborted"]
        .into_iter()
        .map(|p| (p.to_string(), phases.get(p).copied().unwrap_or(0)))
        .collect::<BTreeMap<_, _>>();
    out
}

#[utoipa::path(get, path = "/api/v1/summary", tag = "devices",
    responses((status = 200, body = FleetSummary), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn summary(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<axum::Json<FleetSummary>> {
    s.allow(&headers, Action::ReadFleet)?;
    Ok(axum::Json(summary_of(&s)))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry", tag = "devices",
    params(("id" = String, Path)),
    responses((status = 200, body = Vec<TelemetryPoint>, description = "Oldest first; at most 60 points, in memory since the server started"),
              (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn telemetry(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Vec<TelemetryPoint>>> {
    s.allow(&headers, Action::ReadFleet)?;
    let cell = s.fleet.get(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no device {id:?}"),
        )
    })?;
    let points = lock(&cell).history.iter().cloned().collect();
    Ok(axum::Json(points))
}

/// A number that changes whenever anything a view shows may have changed:
/// every committed write (reports, telemetry, rollouts, the inventory)
/// and every change of the inventory's membership.
fn fingerprint(s: &AppState) -> u64 {
    s.writer
        .metrics
        .writes
        .load(Relaxed)
        .wrapping_add(s.writer.metrics.batches.load(Relaxed))
        .wrapping_add(s.fleet.generation() << 32)
}

#[utoipa::path(get, path = "/api/v1/stream", tag = "devices",
    responses((status = 200, description = "Server-sent events: `change` (data: a change number) whenever the fleet or a rollout changed, at most twice a second", content_type = "text/event-stream"),
              (status = 401, body = ErrorBody),
              (status = 503, body = ErrorBody, description = "Too many streams open")),
    security(("bearer" = [])))]
pub async fn stream(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    s.allow(&headers, Action::ReadFleet)?;
    let permit = s.streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!("at most {MAX_STREAMS} change streams may be open"),
        )
        .retry_after(5)
    })?;
    let events =
        futures_util::stream::unfold((s, None::<u64>, permit), |(s, last, permit)| async move {
            let mut now = fingerprint(&s);
            if last.is_some() {
                let mut tick = tokio::time::interval(STREAM_TICK);
                tick.tick().await;
                while Some(now) == last {
                    tokio::select! {
                        _ = tick.tick() => now = fingerprint(&s),
                        () = s.stop.cancelled() => return None,
                    }
                }
            }
            let ev = Event::default().event("change").data(now.to_string());
            Some((
                Ok::<_, std::convert::Infallible>(ev),
                (s, Some(now), permit),
            ))
        });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
