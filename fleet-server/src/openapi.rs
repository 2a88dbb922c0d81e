//! The OpenAPI document of the fleet server's HTTP API, generated with
//! utoipa from the handlers' annotations, served at
//! `GET /api/v1/openapi.json` and committed as `docs/openapi.json`.
//! Regenerate the file with `UPDATE_OPENAPI=1 cargo test -p fleet-server openapi`.

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use edgefleet_wire::api::v1::{ErrorBody, ErrorDetail};
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::api::AppState;
use crate::auth::{Action, Caller, require};

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An operator token (viewer, operator, admin) or a device credential from enrollment",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "edgefleet fleet server",
        description = "Bundle registry, device inventory, desired/reported state and staged rollouts gated on model health. Errors are `{\"error\": {\"code\", \"message\"}}`; bad input is always a 4xx."
    ),
    paths(
        crate::metrics::serve,
        crate::api::bundles::push,
        crate::api::bundles::list,
        crate::api::bundles::get_one,
        crate::api::bundles::download,
        crate::api::devices::enroll,
        crate::api::devices::list,
        crate::api::devices::get_one,
        crate::api::devices::patch,
        crate::api::devices::revoke,
        crate::api::devices::decommission,
        crate::api::console::summary,
        crate::api::console::telemetry,
        crate::api::console::stream,
        crate::api::device::desired,
        crate::api::device::report,
        crate::api::admin::audit,
        crate::api::admin::create_token,
        crate::api::admin::list_tokens,
        crate::api::admin::revoke_token,
        crate::api::trust::get,
        crate::api::trust::rotate,
        crate::api::rollouts::create,
        crate::api::rollouts::list,
        crate::api::rollouts::get_one,
        crate::api::rollouts::action,
        crate::api::experiments::create,
        crate::api::experiments::list,
        crate::api::experiments::get_one,
        crate::api::experiments::action,
        crate::api::windows::list,
        crate::api::windows::put,
        crate::api::windows::delete,
        crate::mqtt::http_auth,
        crate::mqtt::http_acl,
        serve,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth),
    tags(
        (name = "bundles", description = "Signed model bundles (content-addressed, immutable)"),
        (name = "devices", description = "Enrollment and the inventory"),
        (name = "device", description = "Endpoints for devices, with their own credential"),
        (name = "rollouts", description = "Staged rollouts with health gates"),
        (name = "experiments", description = "A/B experiments and bandits between two bundles, with always-valid verdicts"),
        (name = "windows", description = "Maintenance windows on devices and tags: when devices may activate a new model"),
        (name = "admin", description = "Enrollment tokens, the audit log, trust-root rotation"),
        (name = "mqtt", description = "Auth and ACL decisions for external brokers (EMQX HTTP auth/authorization)"),
        (name = "server", description = "Metrics, this document"),
    )
)]
struct ApiDoc;

/// The document, pretty-printed (stable: utoipa keeps paths and schemas
/// in sorted maps).
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.to_pretty_json()
        .map(|mut s| {
            s.push('\n');
            s
        })
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}\n"))
}

/// `GET /api/v1/openapi.json` (any authenticated caller).
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "server",
    responses((status = 200, description = "This document", content_type = "application/json"),
              (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn serve(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let caller = match s.caller(&headers, None) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    // Devices may read it too (it documents their protocol).
    if let Caller::Operator { .. } = caller
        && let Err(e) = require(&caller, Action::ReadFleet)
    {
        return e.into_response();
    }
    ([(header::CONTENT_TYPE, "application/json")], document()).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn committed_openapi_document_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let now = document();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &now).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == now,
            "docs/openapi.json is stale: run `UPDATE_OPENAPI=1 cargo test -p fleet-server openapi` and commit it"
        );
    }

    #[test]
    fn documents_every_route_of_the_router() {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/metrics",
            "/api/v1/bundles",
            "/api/v1/bundles/{id}",
            "/api/v1/bundles/{id}/download",
            "/api/v1/devices/enroll",
            "/api/v1/devices",
            "/api/v1/devices/{id}",
            "/api/v1/device/desired",
            "/api/v1/device/report",
            "/api/v1/audit",
            "/api/v1/rollouts",
            "/api/v1/rollouts/{id}",
            "/api/v1/rollouts/{id}/{action}",
            "/api/v1/openapi.json",
            "/api/v1/devices/{id}/revoke",
            "/api/v1/enrollment-tokens",
            "/api/v1/enrollment-tokens/{name}",
            "/api/v1/mqtt/auth",
            "/api/v1/mqtt/acl",
        ] {
            assert!(paths.contains_key(p), "{p} is not documented");
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        assert!(doc["components"]["schemas"]["DeviceReport"].is_object());
    }

    /// Every body is a named, typed schema: no `{"type": "object"}` without
    /// properties anywhere in the document.
    #[test]
    fn no_body_is_an_untyped_object() {
        fn walk(v: &serde_json::Value, at: &str, bad: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    let untyped = m.get("type").and_then(|t| t.as_str()) == Some("object")
                        && ![
                            "properties",
                            "additionalProperties",
                            "allOf",
                            "oneOf",
                            "anyOf",
                        ]
                        .iter()
                        .any(|k| m.contains_key(*k));
                    if untyped {
                        bad.push(at.to_string());
                    }
                    for (k, x) in m {
                        walk(x, &format!("{at}/{k}"), bad);
                    }
                }
                serde_json::Value::Array(a) => {
                    for (i, x) in a.iter().enumerate() {
                        walk(x, &format!("{at}/{i}"), bad);
                    }
                }
                _ => {}
            }
        }
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        let mut bad = Vec::new();
        walk(&doc, "", &mut bad);
        assert!(bad.is_empty(), "untyped objects at {bad:?}");
        for s in [
            "DeviceView",
            "RolloutView",
            "StageProgress",
            "Decision",
            "Phase",
            "CreateRollout",
        ] {
            assert!(doc["components"]["schemas"][s].is_object(), "{s} missing");
        }
    }
}
