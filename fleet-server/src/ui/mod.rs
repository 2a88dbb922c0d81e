//! The web console under `/ui`: a static page and one script, embedded in
//! the binary, that read the same REST API as fleetctl (no second model of
//! the fleet to keep in step) and follow `/api/v1/stream` for live
//! updates. docs/console.md has the views and docs/decisions.md why plain
//! JS rather than a framework or server-side templates.
//!
//! Login is by operator token: `POST /ui/login` trades it for a session
//! cookie (HttpOnly, SameSite=Strict, Secure under TLS, 12 h). The token
//! never reaches the page's script storage. A cookie-authenticated
//! request that changes anything must carry the session's CSRF token in
//! `X-CSRF-Token` ([`Sessions::caller`]). Every page has a strict
//! Content-Security-Policy: scripts and styles from the server only, no
//! inline code, no framing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ApiResult, AppState, read_body};
use crate::auth::{Action, Caller, sha256_hex};
use crate::config::Role;

/// The session cookie.
pub const COOKIE: &str = "ef_session";
/// The header a cookie-authenticated change must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session's lifetime (absolute, not sliding).
const TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; the oldest goes first beyond it.
const MAX_SESSIONS: usize = 10_000;

/// Strict: nothing inline, nothing from elsewhere, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const ICON_SVG: &str = include_str!("assets/icon.svg");

#[derive(Clone, Debug)]
struct Session {
    name: String,
    role: Role,
    /// The operator token's sha256: the session ends with the token.
    token_sha256: String,
    csrf: String,
    created: Instant,
}

/// Console sessions, in memory (a restart logs everyone out).
#[derive(Debug, Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

fn random_hex() -> Option<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(hex::encode(b))
}

/// The value of cookie `name` in the request, if any.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Sessions {
    fn create(&self, name: String, role: Role, token_sha256: String) -> Option<(String, Session)> {
        let id = random_hex()?;
        let session = Session {
            name,
            role,
            token_sha256,
            csrf: random_hex()?,
            created: Instant::now(),
        };
        let mut m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, s| s.created.elapsed() < TTL);
        if m.len() >= MAX_SESSIONS
            && let Some(oldest) = m
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
        {
            m.remove(&oldest);
        }
        // Keyed by the id's hash: a memory dump does not hand out sessions.
        m.insert(sha256_hex(&id), session.clone());
        Some((id, session))
    }

    fn get(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let key = sha256_hex(id);
        let mut m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(&key) {
            Some(s) if s.created.elapsed() < TTL => Some(s.clone()),
            Some(_) => {
                m.remove(&key);
                None
            }
            None => None,
        }
    }

    fn remove(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            self.by_id
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&sha256_hex(id));
        }
    }

    /// The operator behind the request's session cookie, if it is valid
    /// and its token still exists. For any action but reading, the
    /// request must carry the session's CSRF token.
    pub fn caller(
        &self,
        headers: &HeaderMap,
        tokens: &crate::auth::Tokens,
        action: Option<Action>,
    ) -> ApiResult<Option<Caller>> {
        let Some(s) = self.get(headers) else {
            return Ok(None);
        };
        let Some((name, role)) = tokens.find_hash(&s.token_sha256) else {
            return Ok(None);
        };
        let reads = matches!(action, None | Some(Action::ReadFleet | Action::ReadAudit));
        if !reads {
            let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            if !sent.is_some_and(|t| constant_eq(t.as_bytes(), s.csrf.as_bytes())) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "csrf",
                    "a console action needs the session's X-CSRF-Token header",
                ));
            }
        }
        Ok(Some(Caller::Operator { name, role }))
    }
}

/// Equality in time independent of where the bytes differ.
pub(crate) fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Security headers on every console response.
fn page(content_type: &'static str, body: &'static str, cache: bool) -> Response {
    let mut r = (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response();
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if cache {
            "public, max-age=300"
        } else {
            "no-store"
        }),
    );
    r
}

async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX_HTML, false)
}

async fn app_js() -> Response {
    page("text/javascript; charset=utf-8", APP_JS, true)
}

async fn app_css() -> Response {
    page("text/css; charset=utf-8", APP_CSS, true)
}

async fn icon() -> Response {
    page("image/svg+xml", ICON_SVG, true)
}

/// `POST /ui/login`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

/// `GET /ui/session`, and the answer to a login.
#[derive(Debug, Serialize)]
struct SessionView {
    name: String,
    role: String,
    csrf: String,
    /// What the role may do in the console.
    can_manage_rollouts: bool,
}

fn view(s: &Session) -> SessionView {
    SessionView {
        name: s.name.clone(),
        role: format!("{:?}", s.role).to_lowercase(),
        csrf: s.csrf.clone(),
        can_manage_rollouts: crate::auth::allowed(s.role.into(), Action::ManageRollouts),
    }
}

fn set_cookie(s: &AppState, value: &str, max_age: u64) -> HeaderValue {
    let secure = if s.config.http.tls_cert.is_some() {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("ef_session=; Max-Age=0"))
}

async fn login(State(s): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        // A cross-site form cannot send JSON without a preflight we never
        // allow: this keeps logins from other sites out (login CSRF).
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send {\"token\": \"...\"} as application/json",
        ));
    }
    let bytes = read_body(body, &headers, 4096).await?;
    let l: Login = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("login: {e}")))?;
    let hash = sha256_hex(l.token.trim());
    let Some((name, role)) = s.tokens.find_hash(&hash) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "that is not an operator token",
        ));
    };
    if role == Role::Broker {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a broker token cannot open the console",
        ));
    }
    let (id, session) = s.sessions.create(name, role, hash).ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no randomness for a session id",
        )
    })?;
    let mut r = axum::Json(view(&session)).into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&s, &id, TTL.as_secs()));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

async fn logout(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    // Logging out is a change: it needs the CSRF token like any other.
    if s.sessions
        .caller(&headers, &s.tokens, Some(Action::ManageRollouts))?
        .is_some()
    {
        s.sessions.remove(&headers);
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&s, "", 0));
    Ok(r)
}

async fn session(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let live = s
        .sessions
        .get(&headers)
        .filter(|x| s.tokens.find_hash(&x.token_sha256).is_some());
    match live {
        Some(x) => {
            let mut r = axum::Json(view(&x)).into_response();
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(r)
        }
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "not logged in",
        )),
    }
}

async fn to_index() -> Response {
    (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, "/ui/")]).into_response()
}

/// The console's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(to_index))
        .route("/ui/", get(index))
        .route("/ui/app.js", get(app_js))
        .route("/ui/app.css", get(app_css))
        .route("/ui/icon.svg", get(icon))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/session", get(session))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn cookies_are_found_among_others() {
        let h = with_cookie("a=1; ef_session=abc; b=2");
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&with_cookie("xef_session=1"), COOKIE), None);
    }

    #[test]
    fn a_session_acts_only_with_its_csrf_token_and_its_token() {
        let tokens = crate::auth::Tokens::from_config(&[crate::config::TokenConfig {
            name: "ops".into(),
            role: Role::Operator,
            token: Some("t0ken".into()),
            token_sha256: None,
        }])
        .unwrap();
        let sessions = Sessions::default();
        let (id, s) = sessions
            .create("ops".into(), Role::Operator, sha256_hex("t0ken"))
            .unwrap();
        let mut h = with_cookie(&format!("{COOKIE}={id}"));
        // Reading needs no CSRF token.
        assert!(
            sessions
                .caller(&h, &tokens, Some(Action::ReadFleet))
                .unwrap()
                .is_some()
        );
        let e = sessions
            .caller(&h, &tokens, Some(Action::ManageRollouts))
            .unwrap_err();
        assert_eq!(e.code, "csrf");
        h.insert(CSRF_HEADER, HeaderValue::from_static("wrong"));
        assert!(
            sessions
                .caller(&h, &tokens, Some(Action::ManageRollouts))
                .is_err()
        );
        h.insert(CSRF_HEADER, HeaderValue::from_str(&s.csrf).unwrap());
        assert!(
            sessions
                .caller(&h, &tokens, Some(Action::ManageRollouts))
                .unwrap()
                .is_some()
        );
        // A token that is gone ends its sessions.
        let none = crate::auth::Tokens::default();
        assert!(sessions.caller(&h, &none, None).unwrap().is_none());
        // Unknown cookies are no session.
        let other = with_cookie(&format!("{COOKIE}=nope"));
        assert!(sessions.caller(&other, &tokens, None).unwrap().is_none());
        sessions.remove(&h);
        assert!(sessions.caller(&h, &tokens, None).unwrap().is_none());
    }
}
