//! A standby replica's HTTP face.
//!
//! While another fleet-server holds a shared store's lease, a standby
//! listens on its own `[http] listen` address and answers:
//! - `GET /healthz` 200: the process is alive (a liveness probe must not
//!   restart a healthy standby);
//! - `GET /readyz` 503 `standby`: a load balancer that checks it sends the
//!   standby nothing (with `[http] standby_ready = "serving"`, 200 while
//!   it can answer devices itself: the balancer spreads them over every
//!   replica);
//! - `GET /metrics` (a viewer token or better, as on the active server): the build,
//!   `fleet_server_active 0` and the forwarding counters;
//! - a device's own calls, from its own copy of the fleet
//!   ([`crate::follow`], kept current by the store's change feed), with
//!   the device's certificate and request budget checked as on the active
//!   server: its check-in (`GET /api/v1/device/desired`), its report
//!   (`POST /api/v1/device/report`, stored in the shared store's inbox for
//!   the active server to apply, durable before the 204) and, with bundles
//!   in a bucket, the download of a bundle its desired state names
//!   (`GET /api/v1/bundles/{id}/download`, ranges and presigned redirects
//!   as on the active server); forwarded while the copy is not current,
//!   does not know the credential (a device enrolled a moment ago) or does
//!   not name the bundle yet;
//! - anything else is **forwarded** to the active server (its
//!   `[http] advertise_url`, from the lease row), streamed both ways, with
//!   `X-Forwarded-For`: devices and operators that reach a standby (DNS
//!   round robin, a balancer without health checks, a device configured
//!   with one replica's address) are served all the same. The client's
//!   address and its verified client certificate travel in headers that
//!   the lease row's secret vouches for ([`from_standby`] on the active
//!   server), so rate limits and `device_certs` apply to the real client.
//!   Without an active URL, or when forwarding fails, the answer is 503
//!   `standby` with `Retry-After`.
//!
//! Once it takes the lease it answers 503 `starting` while it loads the
//! store, then [`Standby::hand_over`] gives the same socket to the whole
//! server: no moment where the port refuses connections.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, ClientCert, Peer};
use crate::auth::{Action, Caller, Tokens};
use crate::error::{Error, Result};
use crate::fleet::DeviceCell;
use crate::http_error::ApiError;
use crate::metrics::Counter;
use crate::store::LeaseHolder;

/// Marks a forwarded request, with the lease row's secret: a standby
/// never forwards one again (a misconfigured `advertise_url` pointing at
/// a balancer would loop), and the active server believes the two
/// headers below only with the right secret.
pub const FORWARDED_BY: &str = "x-edgefleet-forwarded-by";
/// The client's address as the standby saw it.
pub const CLIENT_ADDR: &str = "x-edgefleet-client-addr";
/// The client certificate (DER, base64) the standby's TLS handshake
/// verified against `[http] client_ca`.
pub const CLIENT_CERT: &str = "x-edgefleet-client-cert";

/// What the standby knows and counts.
#[derive(Debug, Default)]
pub struct Shared {
    /// The active server's lease row.
    pub active: Mutex<LeaseHolder>,
    /// Set once this server holds the lease and is loading the store.
    starting: AtomicBool,
    forwarded: AtomicU64,
    forward_failures: AtomicU64,
    /// The counters of this standby's share of the ingest, once it has one.
    pub ingest: Arc<Mutex<Option<Arc<crate::ingest::IngestMetrics>>>>,
}

#[derive(Clone)]
struct Face {
    tokens: Tokens,
    shared: Arc<Shared>,
    client: reqwest::Client,
    local: Option<Arc<Local>>,
}

/// What a standby needs to answer devices' own calls itself.
#[derive(Debug)]
pub struct Local {
    /// Its copy of the fleet.
    pub copy: Arc<crate::follow::Copy>,
    /// Its own request budgets (per replica, like the active server's).
    pub limits: crate::limits::Limits,
    /// The `[http]` settings: client certificates, body and download limits.
    pub http: crate::config::HttpConfig,
    /// Device reports into the shared store's inbox.
    pub reports: crate::ingest::Ingest,
    /// The bundle bucket, once opened (not a folder: that is each
    /// server's own).
    pub blobs: std::sync::OnceLock<crate::blobs::Blobs>,
    /// Downloads sent at once at most (`[http] download_concurrency`).
    pub downloads: Arc<tokio::sync::Semaphore>,
    /// Bundle sizes looked up (bundles are content addresses: a size
    /// never changes).
    sizes: Mutex<std::collections::HashMap<String, u64>>,
    /// Downloads sent, refused at the limit, redirected to the bucket.
    pub sent: [Counter; 3],
}

/// Bundle sizes a standby remembers at most.
const SIZES: usize = 4096;
/// Reports larger than this go to the active server (the inbox takes a
/// device message of up to [`crate::ingest::MAX_PAYLOAD`]).
const REPORT_INBOX_BYTES: u64 = crate::ingest::MAX_PAYLOAD as u64 / 2;

impl Local {
    pub fn new(
        copy: Arc<crate::follow::Copy>,
        limits: crate::limits::Limits,
        http: crate::config::HttpConfig,
        reports: crate::ingest::Ingest,
    ) -> Local {
        let downloads = Arc::new(tokio::sync::Semaphore::new(
            http.download_concurrency.max(1),
        ));
        Local {
            copy,
            limits,
            http,
            reports,
            blobs: std::sync::OnceLock::new(),
            downloads,
            sizes: Mutex::default(),
            sent: Default::default(),
        }
    }

    /// The size of bundle `id` in the bucket; `None` when it is not there.
    async fn size_of(&self, blobs: &crate::blobs::Blobs, id: &str) -> Result<Option<u64>> {
        if let Some(n) = self.sizes.lock().ok().and_then(|m| m.get(id).copied()) {
            return Ok(Some(n));
        }
        let n = blobs.size(id).await?;
        if let (Some(n), Ok(mut m)) = (n, self.sizes.lock()) {
            if m.len() >= SIZES {
                m.clear();
            }
            m.insert(id.to_string(), n);
        }
        Ok(n)
    }
}

/// The standby's listener and its serving task (stopped on drop).
#[derive(Debug)]
pub struct Standby {
    listener: Arc<TcpListener>,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

/// The client a standby forwards with: no redirects followed (a device
/// must see the active server's redirect to a presigned URL), no overall
/// timeout (downloads and the console's stream are long), the active
/// server's certificate checked against `ca` or the system's CAs.
pub fn forward_client(ca: Option<&Path>) -> Result<reqwest::Client> {
    let roots = crate::server::root_store("[http] replica_ca", ca)?;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Usage(format!("[http] replica TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(3))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| Error::Usage(format!("[http] replica client: {e}")))
}

impl Standby {
    /// Serves the standby's answers on `listener` until handed over;
    /// forwards with `client`; answers check-ins with `local`.
    pub fn start(
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        idle: Duration,
        (tokens, shared): (Tokens, Arc<Shared>),
        client: reqwest::Client,
        local: Option<Arc<Local>>,
    ) -> Standby {
        let listener = Arc::new(listener);
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(not_ready))
            .route("/metrics", get(metrics))
            .route("/api/v1/device/desired", get(check_in))
            .route("/api/v1/device/report", post(report))
            .route("/api/v1/bundles/{id}/download", get(download))
            .fallback(not_serving)
            .with_state(Face {
                tokens,
                shared: shared.clone(),
                client,
                local,
            });
        let serve = crate::http::serve(listener.clone(), app, idle, tls, stop.clone());
        tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "standby listener ended");
            }
        });
        Standby {
            listener,
            shared,
            stop,
        }
    }

    /// This server took the lease: answer `starting` until handed over.
    pub fn taking_over(&self) {
        self.shared.starting.store(true, Relaxed);
    }

    /// Stops accepting (the connections open now finish their request and
    /// close) and returns the socket for the whole server.
    pub fn hand_over(self) -> Arc<TcpListener> {
        self.listener.clone()
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn unavailable(shared: &Shared, why: &str) -> Response {
    if shared.starting.load(Relaxed) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting",
            "this fleet-server took over the store's lease and is loading the fleet; retry shortly",
        )
        .into_response();
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "standby",
        format!(
            "this fleet-server is a standby: another one holds the store's lease and serves \
             (a load balancer checking /readyz sends requests there){why}"
        ),
    )
    .retry_after(2)
    .into_response()
}

/// `GET /readyz`: 503 `standby`, or with `[http] standby_ready =
/// "serving"` 200 while the copy is current and the active server known.
async fn not_ready(State(f): State<Face>) -> Response {
    let serving = f.local.as_ref().is_some_and(|l| {
        l.http.standby_ready == crate::config::StandbyReady::Serving && l.copy.fleet().is_some()
    }) && !f.shared.starting.load(Relaxed)
        && f.shared.active.lock().is_ok_and(|a| a.url.is_some());
    if serving {
        return "standby\n".into_response();
    }
    unavailable(&f.shared, "")
}

/// Hop-by-hop headers (RFC 9110 7.6.1), never passed on.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::HOST,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
}

async fn not_serving(State(f): State<Face>, req: Request) -> Response {
    let active = f
        .shared
        .active
        .lock()
        .map(|a| a.clone())
        .unwrap_or_default();
    let (Some(base), false) = (
        active.url,
        f.shared.starting.load(Relaxed) || req.headers().contains_key(FORWARDED_BY),
    ) else {
        return unavailable(&f.shared, "");
    };
    let peer = req.extensions().get::<Peer>().map(|p| p.0.ip());
    let cert = req.extensions().get::<ClientCert>().cloned();
    let (parts, body) = req.into_parts();
    let has_body = parts.headers.contains_key(header::CONTENT_LENGTH)
        || parts.headers.contains_key(header::TRANSFER_ENCODING);
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    speak_for(&mut headers, peer, cert.as_ref(), active.secret.as_deref());
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut out = f.client.request(parts.method, &url).headers(headers);
    if has_body {
        out = out.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    match out.send().await {
        Ok(r) => {
            f.shared.forwarded.fetch_add(1, Relaxed);
            let (status, mut h) = (r.status(), r.headers().clone());
            strip_hop_by_hop(&mut h);
            let mut resp = Response::new(Body::from_stream(r.bytes_stream()));
            *resp.status_mut() = status;
            *resp.headers_mut() = h;
            resp
        }
        Err(e) => {
            f.shared.forward_failures.fetch_add(1, Relaxed);
            tracing::warn!(error = %e, %url, "standby: forwarding to the active server failed");
            unavailable(&f.shared, "; forwarding to it failed")
        }
    }
}
/// A device's own call that this standby may answer: its copy is current
/// and knows the credential, and the client certificate is the device's.
/// `Err(None)`: forward it; `Err(Some(_))`: the refusal to answer.
fn device_call(
    f: &Face,
    req: &Request,
) -> std::result::Result<(Arc<Local>, String, DeviceCell), Option<ApiError>> {
    let local = f.local.clone().ok_or(None)?;
    let fleet = local.copy.fleet().ok_or(None)?;
    let caller = crate::auth::bearer(req.headers())
        .and_then(|t| crate::auth::identify(t, &f.tokens, &fleet));
    let Some(Caller::Device { id, cell }) = caller else {
        // An operator token, a credential the copy does not know (yet):
        // the active server answers.
        return Err(None);
    };
    let cert = req.extensions().get::<ClientCert>();
    if let Err(e) = crate::api::device_cert_verdict(&local.http, cert, &id) {
        local.copy.cert_refusals.fetch_add(1, Relaxed);
        return Err(Some(e));
    }
    Ok((local, id, cell))
}

/// The device's request budget, spent on a call this standby answers.
fn spend(local: &Local, id: &str) -> std::result::Result<(), ApiError> {
    local.limits.device(id).map_err(|(what, wait)| {
        local.copy.limited.fetch_add(1, Relaxed);
        crate::api::rate_limited(what, wait)
    })
}

/// A device's check-in, answered from the standby's copy of the fleet
/// when it can be (the same document and ETag the active server serves).
async fn check_in(State(f): State<Face>, req: Request) -> Response {
    let (local, id, cell) = match device_call(&f, &req) {
        Ok(c) => c,
        Err(Some(refused)) => return refused.into_response(),
        Err(None) => return not_serving(State(f), req).await,
    };
    if let Err(r) = spend(&local, &id) {
        return r.into_response();
    }
    let doc = crate::fleet::lock(&cell).doc.clone();
    local.copy.served.fetch_add(1, Relaxed);
    crate::api::device::answer_desired(&doc, req.headers())
}

/// A device's report: stored in the shared store's inbox (durable before
/// the 204), for the active server to apply as if the device had reported
/// there.
async fn report(State(f): State<Face>, req: Request) -> Response {
    let (local, id, _) = match device_call(&f, &req) {
        Ok(c) => c,
        Err(Some(refused)) => return refused.into_response(),
        Err(None) => return not_serving(State(f), req).await,
    };
    // A report too large for the inbox (the active server's limit is
    // `max_request_bytes`): the active server takes it.
    if crate::api::declared_length(req.headers()).is_some_and(|n| n > REPORT_INBOX_BYTES) {
        return not_serving(State(f), req).await;
    }
    if let Err(r) = spend(&local, &id) {
        return r.into_response();
    }
    let (parts, body) = req.into_parts();
    let limit = local.http.max_request_bytes.min(REPORT_INBOX_BYTES);
    let reported = match crate::api::read_body(body, &parts.headers, limit)
        .await
        .and_then(|bytes| crate::api::device::parse_report(&bytes))
    {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let Ok(payload) = serde_json::to_vec(&reported) else {
        return ApiError::bad_request("malformed_json", "report: cannot be stored").into_response();
    };
    let topic = format!("{}/{id}", crate::ingest::REPORT_TOPIC);
    match local.reports.submit(topic, payload.into()).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => {
            tracing::warn!(device = %id, reason = r.as_str(), "standby: cannot store a device report in the inbox");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the report could not be stored; retry later",
            )
            .retry_after(2)
            .into_response()
        }
    }
}

/// A device's download of a bundle its desired state names, from the
/// bundle bucket (or a redirect to a presigned URL of it).
async fn download(State(f): State<Face>, UrlPath(id): UrlPath<String>, req: Request) -> Response {
    let (local, device, cell) = match device_call(&f, &req) {
        Ok(c) => c,
        Err(Some(refused)) => return refused.into_response(),
        Err(None) => return not_serving(State(f), req).await,
    };
    // The copy may trail the active server by a moment: what it does not
    // name yet, the active server decides.
    let Some(blobs) = local.blobs.get() else {
        return not_serving(State(f), req).await;
    };
    if !crate::api::bundles::assigned(&cell, &id) {
        return not_serving(State(f), req).await;
    }
    let size = match local.size_of(blobs, &id).await {
        Ok(Some(n)) => n,
        Ok(None) => return not_serving(State(f), req).await,
        Err(e) => {
            tracing::warn!(error = %e, bundle = %id, "standby: cannot look a bundle up in the bucket");
            return not_serving(State(f), req).await;
        }
    };
    if let Err(r) = spend(&local, &device) {
        return r.into_response();
    }
    let [sent, refused, redirected] = &local.sent;
    crate::api::bundles::send_bundle(
        blobs,
        &local.downloads,
        [sent, refused, redirected],
        (&id, size),
        req.headers(),
    )
    .await
    .unwrap_or_else(IntoResponse::into_response)
}

async fn metrics(State(f): State<Face>, headers: HeaderMap) -> Response {
    let caller = crate::auth::bearer(&headers)
        .and_then(|t| f.tokens.find(t))
        .map(|(name, role)| Caller::Operator { name, role });
    let Some(caller) = caller else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        )
        .into_response();
    };
    if let Err(e) = crate::auth::require(&caller, Action::ReadFleet) {
        return e.into_response();
    }
    let mut out = String::new();
    crate::metrics::identity(&mut out, false);
    crate::metrics::counter(
        &mut out,
        "fleet_standby_forwarded_total",
        "Requests a standby passed on to the active server.",
        f.shared.forwarded.load(Relaxed),
    );
    crate::metrics::counter(
        &mut out,
        "fleet_standby_forward_failures_total",
        "Requests a standby could not pass on (answered 503).",
        f.shared.forward_failures.load(Relaxed),
    );
    if let Some(local) = &f.local {
        let c = &local.copy;
        for (name, help, v) in [
            (
                "fleet_standby_checkins_served_total",
                "Device check-ins this standby answered from its copy of the fleet.",
                &c.served,
            ),
            (
                "fleet_standby_fleet_changes_applied_total",
                "Device changes the store's change feed brought into the standby's copy.",
                &c.applied,
            ),
            (
                "fleet_standby_fleet_loads_total",
                "Whole loads of the standby's copy (at start and after each break of the feed).",
                &c.loads,
            ),
            (
                "fleet_standby_feed_failures_total",
                "Breaks of the store's change feed (check-ins forwarded until it is back).",
                &c.failures,
            ),
            (
                "fleet_standby_checkins_limited_total",
                "Device calls this standby refused (429) for the device's request budget.",
                &c.limited,
            ),
            (
                "fleet_client_cert_refusals_total",
                "Device requests refused for their client certificate.",
                &c.cert_refusals,
            ),
        ] {
            crate::metrics::counter(&mut out, name, help, v.load(Relaxed));
        }
        let [sent, refused, redirected] = &local.sent;
        for (name, help, v) in [
            (
                "fleet_standby_reports_stored_total",
                "Device reports this standby stored in the inbox (then answered 204) for the active server.",
                local.reports.metrics.ingested.load(Relaxed),
            ),
            (
                "fleet_standby_downloads_total",
                "Bundle downloads this standby sent from the bucket (full or ranged).",
                sent.get(),
            ),
            (
                "fleet_standby_downloads_refused_total",
                "Downloads this standby answered 503 at its concurrency limit.",
                refused.get(),
            ),
            (
                "fleet_standby_downloads_redirected_total",
                "Downloads this standby redirected to a presigned URL of the bucket.",
                redirected.get(),
            ),
        ] {
            crate::metrics::counter(&mut out, name, help, v);
        }
        crate::metrics::gauge(
            &mut out,
            "fleet_standby_fleet_devices",
            "Devices in the standby's copy of the fleet (0 while the change feed is down).",
            c.devices() as u64,
        );
    }
    let share = f.shared.ingest.lock().ok().and_then(|m| m.clone());
    if let Some(m) = share {
        crate::metrics::counter(
            &mut out,
            "fleet_standby_mqtt_messages_received_total",
            "Device messages this standby took from its share of the shared subscription.",
            m.received.load(Relaxed),
        );
        crate::metrics::counter(
            &mut out,
            "fleet_standby_mqtt_messages_stored_total",
            "Device messages this standby stored in the inbox (then acknowledged) for the active server.",
            m.ingested.load(Relaxed),
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// On the active server, outermost: a request a standby forwarded
/// carries the client's address and certificate in headers; with the
/// lease row's secret they replace the standby's own (so rate limits,
/// logs and `device_certs` see the real client). Without it they are
/// never believed: those headers are dropped from every request, and a
/// request vouched for by another secret (a standby that has not seen
/// this server's takeover yet) is answered 503 to be retried.
pub async fn from_standby(
    State(s): State<AppState>,
    mut req: Request,
    next: axum::middleware::Next,
) -> Response {
    let (mut parts, body) = req.into_parts();
    if believe(
        &mut parts.headers,
        &mut parts.extensions,
        s.replica_secret.as_deref(),
    )
    .is_err()
    {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "standby",
            "forwarded by a fleet-server that does not know this server's lease yet; retry",
        )
        .into_response();
    }
    req = Request::from_parts(parts, body);
    next.run(req).await
}

/// The standby's side: the headers that speak for the client (its
/// address, its verified certificate), vouched for by `secret`; whatever
/// the client sent under those names is dropped.
fn speak_for(
    headers: &mut HeaderMap,
    peer: Option<std::net::IpAddr>,
    cert: Option<&ClientCert>,
    secret: Option<&str>,
) {
    headers.remove(CLIENT_ADDR);
    headers.remove(CLIENT_CERT);
    if let Some(ip) = peer {
        let chain = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(before) => format!("{before}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::try_from(chain) {
            headers.insert("x-forwarded-for", v);
        }
        if let Ok(v) = HeaderValue::try_from(ip.to_string()) {
            headers.insert(CLIENT_ADDR, v);
        }
    }
    if let Some(c) = cert {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.0.as_ref());
        if let Ok(v) = HeaderValue::try_from(b64) {
            headers.insert(CLIENT_CERT, v);
        }
    }
    let vouch = secret
        .and_then(|s| HeaderValue::try_from(s).ok())
        .unwrap_or(HeaderValue::from_static("-"));
    headers.insert(FORWARDED_BY, vouch);
}

/// The active server's side: drops the forwarding headers; when `secret`
/// vouches for them, the client's address and certificate replace the
/// standby's in `ext`. `Err` for a request vouched for by another secret.
fn believe(
    headers: &mut HeaderMap,
    ext: &mut axum::http::Extensions,
    secret: Option<&str>,
) -> std::result::Result<(), ()> {
    let vouch = headers.remove(FORWARDED_BY);
    let addr = headers.remove(CLIENT_ADDR);
    let cert = headers.remove(CLIENT_CERT);
    let Some(vouch) = vouch else {
        return Ok(());
    };
    if !secret.is_some_and(|s| crate::ui::constant_eq(vouch.as_bytes(), s.as_bytes())) {
        return Err(());
    }
    if let Some(ip) = addr
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<std::net::IpAddr>().ok())
    {
        ext.insert(Peer(std::net::SocketAddr::new(ip, 0)));
    }
    ext.remove::<ClientCert>();
    if let Some(der) = cert.as_ref().and_then(|v| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_bytes())
            .ok()
    }) {
        ext.insert(ClientCert(Arc::new(
            rustls::pki_types::CertificateDer::from(der),
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ext: &axum::http::Extensions) -> Option<String> {
        ext.get::<Peer>().map(|p| p.0.ip().to_string())
    }

    #[test]
    fn a_vouched_forward_carries_the_client_and_nothing_else_is_believed() {
        let standby: std::net::IpAddr = "10.0.0.12".parse().unwrap();
        let client: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let cert = ClientCert(Arc::new(rustls::pki_types::CertificateDer::from(
            b"device cert der".to_vec(),
        )));
        // The client tries to speak for someone else; the standby replaces it.
        let mut h = HeaderMap::new();
        h.insert(CLIENT_ADDR, HeaderValue::from_static("198.51.100.1"));
        h.insert(CLIENT_CERT, HeaderValue::from_static("Zm9yZ2Vk"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.5"));
        speak_for(&mut h, Some(client), Some(&cert), Some("s3cret"));
        assert_eq!(h["x-forwarded-for"], "203.0.113.5, 192.0.2.7");
        assert_eq!(h[CLIENT_ADDR], "192.0.2.7");

        // The active server with the same secret sees the client.
        let mut ext = axum::http::Extensions::new();
        ext.insert(Peer(std::net::SocketAddr::new(standby, 40000)));
        let mut active = h.clone();
        believe(&mut active, &mut ext, Some("s3cret")).unwrap();
        assert_eq!(peer(&ext).as_deref(), Some("192.0.2.7"));
        assert_eq!(&ext.get::<ClientCert>().unwrap().0[..], b"device cert der");
        assert!(!active.contains_key(FORWARDED_BY) && !active.contains_key(CLIENT_CERT));

        // Another secret (or none: a server without standbys): refused.
        let mut ext = axum::http::Extensions::new();
        assert!(believe(&mut h.clone(), &mut ext, Some("other")).is_err());
        assert!(believe(&mut h.clone(), &mut ext, None).is_err());
        assert!(peer(&ext).is_none());

        // Without a vouch the headers are dropped, the connection's own
        // address and certificate stay.
        let mut direct = HeaderMap::new();
        direct.insert(CLIENT_ADDR, HeaderValue::from_static("198.51.100.1"));
        direct.insert(CLIENT_CERT, HeaderValue::from_static("Zm9yZ2Vk"));
        let mut ext = axum::http::Extensions::new();
        ext.insert(Peer(std::net::SocketAddr::new(client, 1)));
        believe(&mut direct, &mut ext, Some("s3cret")).unwrap();
        assert!(direct.is_empty());
        assert_eq!(peer(&ext).as_deref(), Some("192.0.2.7"));
        assert!(ext.get::<ClientCert>().is_none());
    }

    #[test]
    fn hop_by_hop_headers_stay_behind_and_end_to_end_ones_pass() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("host", "standby:7070"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("authorization", "Bearer t"),
            ("content-length", "10"),
            ("range", "bytes=5-"),
            ("if-none-match", "\"e\""),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            ["authorization", "content-length", "if-none-match", "range"]
        );
    }
}
