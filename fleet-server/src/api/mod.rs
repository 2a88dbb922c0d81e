//! The fleet server's HTTP API (`/api/v1/...`). Every endpoint but
//! `/healthz`, `/readyz` and enrollment requires a bearer token: an
//! operator token with a role, or a device credential; [`crate::auth`]
//! says who may do what. Every error, on every route, is
//! `{"error": {"code", "message"}}`; bad input is always a 4xx.
//!
//! # Layout
//! - this module: the shared state, the router, body reading, the
//!   middleware (timing by route, JSON errors everywhere);
//! - [`bundles`]: push (streamed), list, get, download;
//! - [`devices`]: enrollment, the inventory, tags, revocation;
//! - [`device`]: what devices call (desired state, report);
//! - [`rollouts`]: create, list, status, pause/resume/abort/promote;
//! - [`admin`]: enrollment tokens, the audit log;
//! - [`trust`]: the trust chain and its rotation.

pub mod admin;
pub mod bundles;
pub mod console;
pub mod device;
pub mod devices;
pub mod experiments;
pub mod rollouts;
pub mod trust;
pub mod windows;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgefleet_wire::api::v1::AuditEntry;
use http_body_util::BodyExt as _;
use serde::de::DeserializeOwned;

use crate::auth::{Action, Caller, Tokens, authenticate, require};
use crate::config::ServerConfig;
use crate::controller::Controller;
use crate::enrollment::Enrollment;
use crate::fleet::Fleet;
pub use crate::http_error::ApiError;
use crate::metrics::ServerMetrics;
use crate::registry::Registry;
use crate::store::{Store, Write};
use crate::writer::{WriteError, Writer};

/// Shared state of the API handlers.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<ServerConfig>,
    pub store: Arc<dyn Store>,
    pub fleet: Arc<Fleet>,
    pub writer: Writer,
    pub controller: Arc<Controller>,
    pub registry: Arc<Registry>,
    pub trust: Arc<crate::trust::TrustChain>,
    pub tokens: Tokens,
    pub enrollment: Arc<Enrollment>,
    pub downloads: Arc<tokio::sync::Semaphore>,
    pub metrics: Arc<ServerMetrics>,
    pub limits: Arc<crate::limits::Limits>,
    /// Set when MQTT is configured.
    pub mqtt: Option<Arc<crate::mqtt::Mqtt>>,
    /// On a shared store: the counters of the standbys' inbox this server
    /// applies.
    pub inbox: Option<Arc<crate::mqtt::shared::SharedMetrics>>,
    /// Console sessions (cookie logins).
    pub sessions: Arc<crate::ui::Sessions>,
    /// Change streams (`/api/v1/stream`) that may still open.
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Cancelled when the server stops (ends long-lived responses).
    pub stop: tokio_util::sync::CancellationToken,
    /// On a shared store: the secret in this server's lease row, which
    /// vouches for what a standby forwards ([`crate::standby::from_standby`]).
    pub replica_secret: Option<Arc<str>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Refused(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            WriteError::Stopped => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping",
                "the server is shutting down",
            ),
        }
    }
}

impl AppState {
    /// The authenticated caller, if allowed to do `action`.
    pub fn allow(&self, headers: &HeaderMap, action: Action) -> ApiResult<Caller> {
        let caller = self.caller(headers, Some(action))?;
        require(&caller, action)?;
        Ok(caller)
    }

    /// Who is calling: a bearer token (operator or device), else a
    /// console session (whose changes need its CSRF token; `action` says
    /// what is asked, `None` for reading).
    pub fn caller(&self, headers: &HeaderMap, action: Option<Action>) -> ApiResult<Caller> {
        if crate::auth::bearer(headers).is_some() {
            return authenticate(headers, &self.tokens, &self.fleet);
        }
        match self.sessions.caller(headers, &self.tokens, action)? {
            Some(c) => Ok(c),
            None => authenticate(headers, &self.tokens, &self.fleet),
        }
    }

    /// An audit entry, durable before the caller hears back.
    pub fn audit_write(&self, who: &Caller, action: &str, target: &str) -> Write {
        Write::Audit(AuditEntry {
            at: edgefleet_wire::time::unix_now(),
            who: who.name(),
            action: action.into(),
            target: target.into(),
        })
    }

    /// Commits `writes` (waiting for durability).
    pub async fn commit(&self, writes: Vec<Write>) -> ApiResult<()> {
        Ok(self.writer.commit(writes).await?)
    }
}

/// A fresh 16-hex-digit id (rollouts, experiments).
pub fn random_id() -> ApiResult<String> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| crate::error::Error::Store(format!("random: {e}")))?;
    Ok(hex::encode(b))
}

/// The body length a request declares (`Content-Length`), if it declares
/// a valid one; a chunked body declares none.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads a body of at most `limit` bytes; bigger ones are refused with 413
/// before they are buffered.
pub async fn read_body(body: Body, headers: &HeaderMap, limit: u64) -> ApiResult<Vec<u8>> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request bodies are limited to {limit} bytes"),
        )
    };
    if declared_length(headers).is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request("body_error", format!("reading the request body: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() as u64 + data.len() as u64 > limit {
                return Err(too_large());
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// Reads and parses a JSON body (limited to `[http] max_request_bytes`).
pub async fn read_json<T: DeserializeOwned>(
    s: &AppState,
    body: Body,
    headers: &HeaderMap,
    what: &str,
) -> ApiResult<T> {
    let bytes = read_body(body, headers, s.config.http.max_request_bytes).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("{what}: {e}")))
}

/// Times every request by route template, method and status.
async fn timed(State(s): State<AppState>, req: Request, next: axum::middleware::Next) -> Response {
    let t0 = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().clone();
    let r = next.run(req).await;
    s.metrics
        .observe_request(&route, method.as_str(), r.status().as_u16(), t0.elapsed());
    r
}

/// Any error response that is not our JSON shape (a framework rejection)
/// becomes one.
async fn json_errors(req: Request, next: axum::middleware::Next) -> Response {
    let r = next.run(req).await;
    let status = r.status();
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return r;
    }
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", "this route does not take that method")
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("body_too_large", "the request body is too large"),
        StatusCode::NOT_FOUND => ("not_found", "no such route"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ("unsupported_media_type", "unsupported content type")
        }
        s if s.is_client_error() => ("bad_request", "the request was not understood"),
        _ => ("internal", "internal error; see the server log"),
    };
    let mut out = ApiError::new(status, code, message).into_response();
    if let Some(v) = r.headers().get(header::RETRY_AFTER) {
        out.headers_mut().insert(header::RETRY_AFTER, v.clone());
    }
    out
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/api/v1/openapi.json", get(crate::openapi::serve))
        .route("/metrics", get(crate::metrics::serve))
        .route("/api/v1/bundles", post(bundles::push).get(bundles::list))
        .route("/api/v1/bundles/{id}", get(bundles::get_one))
        .route("/api/v1/bundles/{id}/download", get(bundles::download))
        .route("/api/v1/devices/enroll", post(devices::enroll))
        .route("/api/v1/devices", get(devices::list))
        .route(
            "/api/v1/devices/{id}",
            get(devices::get_one)
                .patch(devices::patch)
                .delete(devices::decommission),
        )
        .route("/api/v1/devices/{id}/revoke", post(devices::revoke))
        .route("/api/v1/devices/{id}/telemetry", get(console::telemetry))
        .route("/api/v1/summary", get(console::summary))
        .route("/api/v1/stream", get(console::stream))
        .route("/api/v1/device/desired", get(device::desired))
        .route("/api/v1/device/report", post(device::report))
        .route("/api/v1/audit", get(admin::audit))
        .route("/api/v1/windows", get(windows::list))
        .route(
            "/api/v1/windows/{scope}",
            axum::routing::put(windows::put).delete(windows::delete),
        )
        .route("/api/v1/trust", get(trust::get).post(trust::rotate))
        .route(
            "/api/v1/enrollment-tokens",
            post(admin::create_token).get(admin::list_tokens),
        )
        .route(
            "/api/v1/enrollment-tokens/{name}",
            axum::routing::delete(admin::revoke_token),
        )
        .route("/api/v1/mqtt/auth", post(crate::mqtt::http_auth))
        .route("/api/v1/mqtt/acl", post(crate::mqtt::http_acl))
        .route(
            "/api/v1/rollouts",
            post(rollouts::create).get(rollouts::list),
        )
        .route("/api/v1/rollouts/{id}", get(rollouts::get_one))
        .route(
            "/api/v1/experiments",
            post(experiments::create).get(experiments::list),
        )
        .route("/api/v1/experiments/{id}", get(experiments::get_one))
        .route(
            "/api/v1/experiments/{id}/{action}",
            post(experiments::action),
        )
        .route("/api/v1/rollouts/{id}/{action}", post(rollouts::action))
        .merge(crate::ui::routes())
        // Inside routing, so the route template is known.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), timed))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            rate_limit,
        ))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        // Bodies are read by the handlers with their own limits (bundle
        // pushes stream to disk): axum's 2 MiB default must not apply.
        .layer(axum::extract::DefaultBodyLimit::disable())
        // Before the rate limits: they count the real client.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::standby::from_standby,
        ));
    api.layer(axum::middleware::from_fn(json_errors))
        .with_state(state)
}

/// The client's address, set by [`crate::http::serve`] on every request.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

/// The verified client certificate of the request's TLS connection, set
/// by [`crate::http::serve`] when the client sent one.
#[derive(Clone, Debug)]
pub struct ClientCert(pub Arc<rustls::pki_types::CertificateDer<'static>>);

impl ClientCert {
    /// Whether the certificate names `device_id` (a subjectAltName DNS
    /// entry; ids that are not DNS names cannot be named).
    pub fn names(&self, device_id: &str) -> bool {
        let Ok(name) = rustls::pki_types::ServerName::try_from(device_id) else {
            return false;
        };
        webpki::EndEntityCert::try_from(self.0.as_ref())
            .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
    }
}

/// Binds a device's requests to its client certificate (`[http]
/// client_ca`, `device_certs`): a certificate presented must name the
/// device; with `required`, none presented is refused too.
pub fn check_device_cert(
    s: &AppState,
    cert: Option<&ClientCert>,
    device_id: &str,
) -> ApiResult<()> {
    device_cert_verdict(&s.config.http, cert, device_id)
        .inspect_err(|_| s.metrics.client_cert_refusals.inc())
}

/// [`check_device_cert`] under `http`'s settings, uncounted (a standby
/// answering a check-in counts its own).
pub fn device_cert_verdict(
    http: &crate::config::HttpConfig,
    cert: Option<&ClientCert>,
    device_id: &str,
) -> ApiResult<()> {
    if http.client_ca.is_none() {
        return Ok(());
    }
    match cert {
        Some(c) if c.names(device_id) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "client_certificate_mismatch",
            format!("the client certificate does not name device {device_id:?}"),
        )),
        None if http.device_certs == crate::config::DeviceCerts::Required => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "client_certificate_required",
            "devices must present a client certificate issued by the fleet's device CA",
        )),
        None => Ok(()),
    }
}

/// The 429 for a request over its budget.
pub fn rate_limited(what: crate::limits::Limited, wait: std::time::Duration) -> ApiError {
    let message = match what {
        crate::limits::Limited::AuthFailures => {
            "too many failed authentications from this address; retry later"
        }
        crate::limits::Limited::Device => "this device is over its request budget; retry later",
        crate::limits::Limited::Token => "this token is over its request budget; retry later",
    };
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        .retry_after(wait.as_secs().max(1))
}

/// Rate limits ([`crate::limits`]): per device and per token for valid
/// credentials; per source address for everything else, counting the
/// failed authentications (401, refused enrollments).
async fn rate_limit(
    State(s): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let ip = req.extensions().get::<Peer>().map(|p| p.0.ip());
    // Probes and scrapes are never limited.
    let path = req.uri().path();
    if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return next.run(req).await;
    }
    // Enrollment carries its credential in the body: it is checked by the
    // handler, and only a refused one meets the address's lockout, so a
    // valid enrollment token works even from a locked-out (shared) address.
    let enroll = path == "/api/v1/devices/enroll";
    let caller = match crate::auth::bearer(req.headers()) {
        Some(t) => crate::auth::identify(t, &s.tokens, &s.fleet),
        None => s
            .sessions
            .caller(req.headers(), &s.tokens, None)
            .ok()
            .flatten(),
    };
    let verdict = match &caller {
        Some(crate::auth::Caller::Device { id, .. }) => s.limits.device(id),
        Some(crate::auth::Caller::Operator { name, .. }) => s.limits.token(name),
        None if enroll => Ok(()),
        None => ip.map_or(Ok(()), |ip| s.limits.unauthenticated(ip)),
    };
    // A device credential is only good with the device's own certificate.
    if let Some(crate::auth::Caller::Device { id, .. }) = &caller
        && let Err(e) = check_device_cert(&s, req.extensions().get::<ClientCert>(), id)
    {
        return e.into_response();
    }
    if let Err((what, wait)) = verdict {
        return rate_limited(what, wait).into_response();
    }
    let r = next.run(req).await;
    let failed =
        r.status() == StatusCode::UNAUTHORIZED || (enroll && r.status() == StatusCode::FORBIDDEN);
    if failed
        && caller.is_none()
        && let Some(ip) = ip
    {
        if enroll && let Err((_, wait)) = s.limits.unauthenticated(ip) {
            return ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many failed authentications from this address; retry later",
            )
            .retry_after(wait.as_secs().max(1))
            .into_response();
        }
        s.limits.failed(ip);
    }
    r
}

/// `GET /readyz`: the store accepts writes and the broker (if any) runs.
async fn ready(State(s): State<AppState>) -> Response {
    let backlog = s.writer.backlog();
    if backlog > 1000 {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("{backlog} store writes are waiting"),
        )
        .into_response();
    }
    "ready\n".into_response()
}
