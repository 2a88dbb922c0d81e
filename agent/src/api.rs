//! The local inference API (HTTP/1.1, JSON or `.npz` bodies).
//!
//! Routes: `POST /v1/infer`, `GET /v1/model`, `POST /v1/feedback`,
//! `GET|POST|DELETE /v1/defer` (the app holds activations while busy),
//! `GET /v1/status`, `POST /v1/install`, `GET /healthz`, `GET /metrics`.
//! Every failure is `{"error": {"code", "message"}}` with a 4xx for bad
//! input (never a 500), 503 + `Retry-After` when the queue is full.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgefleet_wire::npz::{NpzLimits, from_npz_bytes, to_npz_bytes};
use tokio_util::sync::CancellationToken;

use crate::codec::{InferResponse, ModelRef, decode_request_within, encode_named};
use crate::engine::{Engine, InferError, SubmitError};
use crate::error::AgentError;
use crate::metrics::Metrics;

pub const NPZ_CONTENT_TYPE: &str = "application/x-npz";

/// Settings of the local API.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Where to listen. Default `127.0.0.1:8080`; anything but loopback
    /// needs a token.
    pub listen: SocketAddr,
    /// Largest accepted request body. Default 64 MiB.
    pub max_body_bytes: usize,
    /// Bearer token required on `/v1/*` and `/metrics` when set.
    pub token: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 64 * 1024 * 1024,
            token: None,
        }
    }
}

impl ApiConfig {
    /// Binding beyond loopback exposes inference to the network: require a token.
    pub fn validate(&self) -> Result<(), AgentError> {
        if !self.listen.ip().is_loopback() && self.token.as_deref().is_none_or(str::is_empty) {
            return Err(AgentError::Config(format!(
                "listening on {} (not loopback) requires an API bearer token",
                self.listen
            )));
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    max_body_bytes: usize,
    token: Option<Arc<str>>,
    control: Option<Arc<Control>>,
}

/// Extra Prometheus text appended to `/metrics`.
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// The update side of `edge-agent run`: status and sideloading.
pub struct Control {
    pub status: tokio::sync::watch::Receiver<crate::updater::Status>,
    pub sideload: tokio::sync::mpsc::Sender<crate::update::Target>,
    pub slots: crate::updater::Slots,
    pub max_bundle_bytes: u64,
    /// Extra Prometheus text (telemetry, drift), appended to /metrics.
    pub extra_metrics: Option<ExtraMetrics>,
    /// The device report as the server gets it (degraded, trust version).
    pub report: Option<Arc<dyn Fn() -> edgefleet_wire::device::DeviceReport + Send + Sync>>,
    /// Maintenance windows and the app's defers.
    pub activation: Option<Arc<crate::updater::hold::Activation>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// An API error: status, stable code, client-safe message. Rendered as
/// `edgefleet_wire::api::v1::ErrorBody`, the shape the fleet server's
/// errors have too; 503 adds `Retry-After`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(what: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = edgefleet_wire::api::v1::ErrorBody::new(self.code, self.message);
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// Builds the router.
pub fn router(engine: Arc<Engine>, metrics: Arc<Metrics>, config: &ApiConfig) -> Router {
    router_with(engine, metrics, config, None)
}

/// The router of `edge-agent run`: adds `GET /v1/status` and
/// `POST /v1/install` (sideload a bundle through the update path).
pub fn router_with(
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    config: &ApiConfig,
    control: Option<Arc<Control>>,
) -> Router {
    let state = AppState {
        engine,
        metrics,
        max_body_bytes: config.max_body_bytes,
        token: config.token.as_deref().map(Arc::from),
        control,
    };
    let protected = Router::new()
        .route("/v1/infer", post(infer))
        .route("/v1/model", get(model))
        .route("/v1/feedback", post(feedback))
        .route("/v1/status", get(status))
        .route(
            "/v1/defer",
            get(defer_get).post(defer_post).delete(defer_delete),
        )
        .route("/v1/install", post(install))
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(protected)
        .route("/healthz", get(healthz))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(state)
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            s.metrics.record_request(401, Some("unauthorized"));
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required",
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn healthz(State(s): State<AppState>) -> Response {
    match s.engine.active() {
        Some(m) => (
            StatusCode::OK,
            format!("ok {} {}\n", m.info.name, m.info.version),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_model",
            "no model is serving",
        )
        .into_response(),
    }
}

async fn model(State(s): State<AppState>) -> Response {
    match s.engine.active() {
        Some(m) => axum::Json(&m.info).into_response(),
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_model",
            "no model is serving",
        )
        .into_response(),
    }
}

/// `POST /v1/feedback`: an application outcome for the model that served
/// a request, e.g. `{"value": 1.0}` when the user accepted its answer.
/// `model` (`name@version`; `/v1/infer` answers with `X-Model-Name` and
/// `X-Model-Version`) guards
/// against crediting a model swapped in since: a mismatch is 409.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Feedback {
    value: f64,
    #[serde(default)]
    model: Option<String>,
    /// The caller's own id of the request (accepted, not stored).
    #[serde(default)]
    #[allow(dead_code)]
    request_id: Option<String>,
}

async fn feedback(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let bytes = match read_body(body, &headers, 4096).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let f: Feedback = match serde_json::from_slice(&bytes) {
        Ok(f) => f,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_feedback",
                format!("send {{\"value\": NUMBER, \"model\": \"name@version\"}}: {e}"),
            )
            .into_response();
        }
    };
    if !f.value.is_finite() {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_feedback",
            "value must be a finite number",
        )
        .into_response();
    }
    let Some(m) = s.engine.active() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_model",
            "no model is serving",
        )
        .into_response();
    };
    let serving = format!("{}@{}", m.info.name, m.info.version);
    if let Some(want) = &f.model
        && *want != serving
    {
        return ApiError::new(
            StatusCode::CONFLICT,
            "model_mismatch",
            format!("the feedback is for {want}, but {serving} is serving now"),
        )
        .into_response();
    }
    m.stats.feedback(f.value);
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"model": serving})),
    )
        .into_response()
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    use std::fmt::Write as _;
    let mut text = s.metrics.render();
    if let Some(c) = s.control.as_ref() {
        let now = c.status.borrow().record.phase.state();
        text.push_str(
            "# HELP edge_agent_update_state The update machine's state (1 for the current one).\n\
             # TYPE edge_agent_update_state gauge\n",
        );
        for st in edgefleet_wire::device::UpdateState::ALL {
            let _ = writeln!(
                text,
                "edge_agent_update_state{{state=\"{}\"}} {}",
                st.as_str(),
                u8::from(st == now)
            );
        }
    }
    if let Some(extra) = s.control.as_ref().and_then(|c| c.extra_metrics.as_ref()) {
        text.push_str(&extra());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `POST /v1/defer`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeferRequest {
    /// Busy for this many more seconds (0: not busy any more).
    seconds: u64,
    #[serde(default)]
    reason: Option<String>,
}

/// `GET/POST/DELETE /v1/defer`: the defer and what it holds.
#[derive(serde::Serialize)]
struct DeferResponse {
    #[serde(flatten)]
    defer: crate::updater::hold::DeferView,
    /// The update's state: `waiting` while a window or the app holds it.
    state: edgefleet_wire::device::UpdateState,
    /// Why the update waits, when it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    waiting: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    activate_at: Option<u64>,
}

fn activation(
    s: &AppState,
) -> Result<(Arc<Control>, Arc<crate::updater::hold::Activation>), ApiError> {
    let c = control(s)?;
    let a = c.activation.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_updater",
            "defers are handled by `edge-agent run`",
        )
    })?;
    Ok((c.clone(), a))
}

fn defer_response(c: &Control, defer: crate::updater::hold::DeferView) -> Response {
    let rec = c.status.borrow().record.clone();
    let waiting = matches!(rec.phase, crate::update::Phase::Waiting { .. });
    axum::Json(DeferResponse {
        defer,
        state: rec.phase.state(),
        waiting: rec.reason.filter(|_| waiting),
        activate_at: rec.phase.activate_at(),
    })
    .into_response()
}

async fn defer_get(State(s): State<AppState>) -> Response {
    match activation(&s) {
        Ok((c, a)) => defer_response(&c, a.view()),
        Err(e) => e.into_response(),
    }
}

async fn defer_post(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let (c, a) = match activation(&s) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let bytes = match read_body(body, &headers, 4096).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let r: DeferRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::bad_request(
                "bad_defer",
                format!("send {{\"seconds\": N, \"reason\": \"…\"}}: {e}"),
            )
            .into_response();
        }
    };
    if r.reason.as_ref().is_some_and(|x| x.len() > 200) {
        return ApiError::bad_request("bad_defer", "reason: at most 200 bytes").into_response();
    }
    let view = a.defer(r.seconds, r.reason);
    defer_response(&c, view)
}

async fn defer_delete(State(s): State<AppState>) -> Response {
    match activation(&s) {
        Ok((c, a)) => defer_response(&c, a.release()),
        Err(e) => e.into_response(),
    }
}

fn control(s: &AppState) -> Result<&Arc<Control>, ApiError> {
    s.control.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_updater",
            "updates are handled by `edge-agent run`, not `serve`",
        )
    })
}

async fn status(State(s): State<AppState>) -> Response {
    match control(&s) {
        Ok(c) => {
            let st = c.status.borrow().clone();
            let report = c.report.as_ref().map(|r| r());
            axum::Json(StatusView {
                state: st.record.phase.state(),
                record: st.record,
                step: st.step,
                degraded: report.as_ref().and_then(|r| r.degraded.clone()),
                trust_version: report.and_then(|r| r.trust_version),
            })
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/status`: the update record and the state it reports.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StatusView {
    pub state: edgefleet_wire::device::UpdateState,
    pub record: crate::update::Record,
    /// Bumped on every step of the update machine.
    pub step: u64,
    /// Set while the device runs degraded but serving (full disk, store
    /// errors, a trust rotation it cannot follow): as in its report.
    #[serde(default)]
    pub degraded: Option<String>,
    /// The trust version bundles are verified with.
    #[serde(default)]
    pub trust_version: Option<u64>,
}

/// `POST /v1/install`: the raw bundle bytes. Accepted (202) once the file
/// is on disk; verification, self-test and swap follow the same path as a
/// server update. Watch `GET /v1/status` for the outcome.
async fn install(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let c = match control(&s) {
        Ok(c) => c.clone(),
        Err(e) => return e.into_response(),
    };
    let limit = usize::try_from(c.max_bundle_bytes).unwrap_or(usize::MAX);
    let bytes = match read_body(body, &headers, limit).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let limits = edgefleet_wire::bundle::Limits::default();
    let manifest = match edgefleet_wire::bundle::read_signed(&mut &bytes[..], &limits)
        .and_then(|sg| sg.peek_unverified())
    {
        Ok(m) => m,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                e.code(),
                format!("not a readable bundle: {e}"),
            )
            .into_response();
        }
    };
    let id = edgefleet_wire::bundle::content_address(&bytes);
    let dest = c.slots.bundle(&id);
    let tmp = dest.with_extension("sideload");
    let written = tokio::task::spawn_blocking(move || {
        std::fs::write(&tmp, &bytes)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &dest)
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "cannot_store",
            "the bundle could not be written to the data dir (disk full?)",
        )
        .into_response();
    }
    let bundle = edgefleet_wire::device::BundleRef {
        id: id.clone(),
        name: manifest.name.to_string(),
        version: manifest.version.to_string(),
        sequence: manifest.sequence,
    };
    let target = crate::update::Target {
        bundle: bundle.clone(),
        download: None,
        rollback: false,
        rollout_id: None,
        watch: None,
        shadow: None,
        window: None,
    };
    if c.sideload.send(target).await.is_err() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the agent is shutting down",
        )
        .into_response();
    }
    (StatusCode::ACCEPTED, axum::Json(bundle)).into_response()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Npz,
}

fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(BodyKind::Json),
        NPZ_CONTENT_TYPE => Ok(BodyKind::Npz),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("content type {other:?}: send application/json or {NPZ_CONTENT_TYPE}"),
        )),
    }
}

async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body exceeds the {limit}-byte limit"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        if inner
            .downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            too_large()
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "body_read_failed",
                format!("reading the body: {inner}"),
            )
        }
    })
}

/// What one request for a model may carry, derived from its inputs with
/// room for honest mistakes (an extra input, a wider dtype) to be
/// reported as such.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputBudget {
    /// Data elements decoded at most, across all inputs.
    pub elements: u64,
}

impl InputBudget {
    /// Slack beyond the model's own elements.
    const SLACK_ELEMENTS: u64 = 4096;
    /// Bytes for JSON structure, names, npz headers.
    const SLACK_BYTES: u64 = 64 * 1024;

    pub fn of(inputs: &[edgefleet_wire::tensor::TensorSpec]) -> InputBudget {
        let model: u64 = inputs
            .iter()
            .map(|s| s.element_count().unwrap_or(u64::MAX / 64))
            .fold(0u64, u64::saturating_add);
        InputBudget {
            elements: model.saturating_mul(2).saturating_add(Self::SLACK_ELEMENTS),
        }
    }

    /// A JSON body: up to 48 bytes per element (`-1.2345678901234567e-300, `).
    pub fn json_body_bytes(&self) -> usize {
        usize::try_from(
            self.elements
                .saturating_mul(48)
                .saturating_add(Self::SLACK_BYTES),
        )
        .unwrap_or(usize::MAX)
    }

    /// What an .npz inflates to: 8 bytes per element at most.
    pub fn decoded_bytes(&self) -> u64 {
        self.elements
            .saturating_mul(8)
            .saturating_add(Self::SLACK_BYTES)
    }

    /// An .npz body (stored or deflated): never more than it inflates to.
    pub fn npz_body_bytes(&self) -> usize {
        usize::try_from(self.decoded_bytes().saturating_add(Self::SLACK_BYTES))
            .unwrap_or(usize::MAX)
    }
}

async fn infer(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    match infer_inner(&s, &headers, body).await {
        Ok(r) => {
            s.metrics.record_request(200, None);
            r
        }
        Err(e) => {
            s.metrics.record_request(e.status.as_u16(), Some(e.code));
            e.into_response()
        }
    }
}

async fn infer_inner(s: &AppState, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let kind = body_kind(headers)?;
    let active = s.engine.active().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_model",
            "no model is serving",
        )
    })?;
    // What the model takes bounds what a request may make the agent hold:
    // the body read, the elements decoded, the bytes an .npz inflates to.
    let budget = InputBudget::of(active.model.inputs());
    let limit = s.max_body_bytes.min(match kind {
        BodyKind::Json => budget.json_body_bytes(),
        BodyKind::Npz => budget.npz_body_bytes(),
    });
    let bytes = read_body(body, headers, limit).await?;
    let inputs = match kind {
        BodyKind::Json => decode_request_within(&bytes, budget.elements)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code, e.message))?,
        BodyKind::Npz => from_npz_bytes(
            &bytes,
            NpzLimits {
                max_entries: 256,
                max_total_bytes: budget.decoded_bytes(),
            },
        )
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_npz", e.to_string()))?,
    };
    // Validate before queueing so bad input never occupies a worker.
    active
        .model
        .check_inputs(&inputs)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    let t0 = Instant::now();
    let out = s
        .engine
        .infer_validated(inputs, &active)
        .await
        .map_err(|e| match e {
            InferError::Submit(SubmitError::QueueFull) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                "all inference workers are busy and the queue is full; retry shortly",
            ),
            InferError::Submit(SubmitError::NoModel) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_model",
                "no model is serving",
            ),
            InferError::Submit(SubmitError::Stopped) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the agent is shutting down",
            ),
            // The model changed between validation and execution.
            InferError::Runtime(e) if e.code() != "inference_failed" => {
                ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
            }
            InferError::Runtime(e) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.code(), e.to_string())
            }
        })?;
    let latency = t0.elapsed();
    s.metrics.latency.observe(latency);
    let latency_ms = latency.as_secs_f64() * 1e3;
    let info = &out.model.info;
    match kind {
        BodyKind::Json => {
            let body = InferResponse {
                outputs: encode_named(&out.outputs),
                model: ModelRef {
                    name: &info.name,
                    version: &info.version,
                },
                latency_ms,
            };
            Ok(axum::Json(body).into_response())
        }
        BodyKind::Npz => {
            let bytes = to_npz_bytes(&out.outputs).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encode_failed",
                    e.to_string(),
                )
            })?;
            let mut r = (StatusCode::OK, bytes).into_response();
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(NPZ_CONTENT_TYPE),
            );
            for (k, v) in [
                ("x-model-name", info.name.clone()),
                ("x-model-version", info.version.clone()),
                ("x-latency-ms", format!("{latency_ms:.3}")),
            ] {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    h.insert(k, v);
                }
            }
            Ok(r)
        }
    }
}
