//! The OpenAPI 3 document: generated from the handlers' annotations and the body types, then
//! completed with what the annotations cannot say. Request bodies and the list's query are JSON
//! Schemas written out here, because their rules (a password or a token, never both; a cursor
//! only with a limit; patterns equal to the validators') need keywords the generator has no
//! attribute for. The bearer scheme and its 401/403 answers are added to every operation but
//! `GET /health` in one place, so no operation can be left out.
//!
//! Every pattern here states a rule the server enforces: a request the document calls valid
//! passes validation, and one it calls invalid is refused, so schema-driven clients and fuzzers
//! agree with the server.

use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::{OpenApi, ToSchema};

use super::ApiError;
use crate::cluster::{ClusterView, Transition};
use crate::domain::{AuthMethod, ClusterStatus, StatusReason};
use crate::proxmox::members::MemberView;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "proxmoxer",
        description = "Registry and health monitor for Proxmox VE clusters. Every operation but \
            `GET /health` needs `Authorization: Bearer <token>` when API tokens are configured.",
    ),
    paths(
        super::clusters::clusters_list,
        super::clusters::clusters_create,
        super::clusters::clusters_get,
        super::clusters::clusters_patch,
        super::clusters::clusters_delete,
        super::clusters::clusters_check,
        super::clusters::clusters_history,
        super::events::events,
        openapi_json,
        super::health,
        super::metrics,
    ),
    components(schemas(
        ClusterView,
        MemberView,
        ClusterList,
        ErrorBody,
        HistoryList,
        Transition,
        Health,
        ClusterStatus,
        StatusReason,
        AuthMethod,
    ))
)]
pub struct ApiDoc;

/// `{"clusters": [...], "total": N}`, newest first; a page (`limit`) adds `next_cursor`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterList {
    /// The clusters the filter keeps, or one page of them.
    pub clusters: Vec<ClusterView>,
    /// How many clusters the filter keeps in all, the same on every page.
    pub total: usize,
    /// Only with `limit`: pass it as `cursor` for the next page; null on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `{"transitions": [...], "total": N}`, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryList {
    /// The transitions, newest first.
    pub transitions: Vec<Transition>,
    /// How many transitions are kept.
    pub total: usize,
}

/// Every error: `code` is a PascalCase word from proxmoxer's error table, e.g. `BadRequest`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error's code, e.g. `BadRequest`, `NotFound`, `Unauthorized`.
    pub code: String,
    /// What went wrong, in words.
    pub message: String,
    /// Specifics, e.g. `{"field": "name", "reason": "..."}` (for a query parameter, `field`
    /// is its name), or null.
    pub details: Option<Value>,
}

/// `{"status": "ok", "clusters": N, "role": ..., "leader": ...}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` in a 200.
    pub status: String,
    /// How many clusters are registered.
    pub clusters: usize,
    /// `standalone` with redb; `leader` or `follower` among instances sharing etcd.
    pub role: crate::leadership::Role,
    /// The id (host:pid) of the instance running the monitors, when one is known.
    pub leader: Option<String>,
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 document", body = Object)))]
pub(super) async fn openapi_json() -> Result<Json<Value>, ApiError> {
    document()
        .map(Json)
        .map_err(|e| ApiError::Internal(format!("rendering the OpenAPI document: {e}")))
}

/// The name of the bearer security scheme.
const BEARER_AUTH: &str = "bearerAuth";

/// Operations anyone may call without a token.
const OPEN_OPERATIONS: &[(&str, &str)] = &[("/health", "get")];

/// Methods that change something, and so need a token with the admin role.
const WRITE_METHODS: &[&str] = &["post", "put", "patch", "delete"];

/// The characters Rust's `char::is_control` refuses: C0, DEL and C1.
const CONTROL: &str = r"\x00-\x1f\x7f-\x9f";

/// The whitespace `str::trim` removes that is not a control character.
const SPACE: &str = r" \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

/// `name`: no control characters anywhere, and something besides whitespace.
fn name_pattern() -> String {
    format!("^[^{CONTROL}]*[^{CONTROL}{SPACE}][^{CONTROL}]*$")
}

/// `username`: `user@realm`. The user part has no whitespace, control characters, `:` or `/`
/// (it may contain `@`: the realm follows the last one); the realm is Proxmox's `pve-realm`.
fn username_pattern() -> String {
    format!("^[^{CONTROL}{SPACE}:/]+@[A-Za-z][A-Za-z0-9._-]+$")
}

/// `api_endpoint`: an `http`/`https` URL with an ASCII host name, an IPv4 address or a bracketed
/// IPv6 address, an optional port, an optional path, and nothing else. Host names are letters,
/// digits and single hyphens, and the last label starts with a letter (a numeric last label
/// would be read as an IPv4 address). The server parses URLs more leniently (see the
/// description); everything this pattern admits, it accepts.
fn endpoint_pattern(schemes: &str) -> String {
    let label = "[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*";
    let top_label = "[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*";
    let octet = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
    let h16 = "[0-9A-Fa-f]{1,4}";
    let ipv6 = [
        format!("(?:{h16}:){{7}}{h16}"),
        format!("(?:{h16}:){{1,7}}:"),
        format!("(?:{h16}:){{1,6}}:{h16}"),
        format!("(?:{h16}:){{1,5}}(?::{h16}){{1,2}}"),
        format!("(?:{h16}:){{1,4}}(?::{h16}){{1,3}}"),
        format!("(?:{h16}:){{1,3}}(?::{h16}){{1,4}}"),
        format!("(?:{h16}:){{1,2}}(?::{h16}){{1,5}}"),
        format!("{h16}:(?::{h16}){{1,6}}"),
        format!(":(?:(?::{h16}){{1,7}}|:)"),
    ]
    .join("|");
    let host =
        format!("(?:(?:{label}\\.)*{top_label}|(?:{octet}\\.){{3}}{octet}|\\[(?:{ipv6})\\])");
    let port =
        "(?::(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?";
    let path = "(?:/[A-Za-z0-9._~-]*)*";
    format!("^{schemes}://{host}{port}{path}$")
}

/// `fingerprint`: 64 hex digits, plain or in colon-separated pairs, any case.
const FINGERPRINT_PATTERN: &str = "^(?:[0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31})$";

/// `token_id`: the token's name, as Proxmox allows it.
const TOKEN_NAME_PATTERN: &str = "^[A-Za-z][A-Za-z0-9._-]+$";

/// `token_secret`: printable ASCII without spaces or `;` (it travels in a header that Proxmox
/// cuts at `;`).
const TOKEN_SECRET_PATTERN: &str = "^[!-:<-~]+$";

/// `status`: any of the four statuses, comma-separated; whitespace around each is ignored.
fn status_filter_pattern() -> String {
    let status = "(?:healthy|degraded|unhealthy|unknown)";
    let space = format!("[\\t-\\r{SPACE}\\x85]*");
    format!("^{space}{status}{space}(?:,{space}{status}{space})*$")
}

/// `cursor`: what the server issues, 58 lowercase hex digits: version 1, the creation second
/// (from 1970 on), its nanoseconds and the id.
const CURSOR_PATTERN: &str =
    "^0100000[0-6][0-9a-f]{10}(?:[0-2][0-9a-f]{7}|3[0-9a][0-9a-f]{6})[0-9a-f]{32}$";

/// `wait`: a whole number of milliseconds, seconds or minutes, at most five minutes.
const WAIT_PATTERN: &str =
    "^0*(?:(?:[0-9]{1,5}|[12][0-9]{5}|300000)ms|(?:[0-9]{1,2}|[12][0-9]{2}|300)s|[0-5]m)$";

/// The largest `Last-Event-ID`: event ids are unsigned 64-bit numbers.
const MAX_EVENT_ID: u64 = u64::MAX;

/// The document as served: the generated one, completed.
pub fn document() -> Result<Value, serde_json::Error> {
    let mut doc = serde_json::to_value(ApiDoc::openapi())?;
    add_schemas(&mut doc);
    require_bodies(&mut doc);
    set_list_query(&mut doc);
    set_cluster_wait(&mut doc);
    set_event_id_range(&mut doc);
    add_bearer_auth(&mut doc);
    Ok(doc)
}

/// A registration and a change need a body (without one they are 415 or 400).
fn require_bodies(doc: &mut Value) {
    for pointer in [
        "/paths/~1api~1v1~1clusters/post/requestBody",
        "/paths/~1api~1v1~1clusters~1{id}/patch/requestBody",
    ] {
        if let Some(body) = doc.pointer_mut(pointer).and_then(Value::as_object_mut) {
            body.insert("required".into(), Value::Bool(true));
        }
    }
}

/// The request bodies and the event stream's events.
fn add_schemas(doc: &mut Value) {
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    schemas.insert("RegisterRequest".into(), register_request_schema());
    schemas.insert("ClusterPatch".into(), cluster_patch_schema());
    schemas.insert("ClusterEvent".into(), cluster_event_schema());
}

/// The registration's fields, each with the rule the server checks.
fn field_schemas() -> Map<String, Value> {
    let endpoint_description = "An `http` or `https` URL with a host, e.g. \
        `https://pve.example.com:8006`; a trailing `/` or `/api2/json` is dropped. No \
        credentials, query or fragment. The pattern is what clients should send; the server \
        also accepts what a WHATWG URL parser accepts (surrounding whitespace, an uppercase \
        scheme, international host names).";
    let fields = json!({
        "name": {
            "type": "string",
            "minLength": 1,
            "maxLength": 255,
            "pattern": name_pattern(),
            "description": "Unique, 1 to 255 characters, not blank, no control characters; \
                surrounding whitespace is dropped.",
            "example": "prod-cluster",
        },
        "api_endpoint": {
            "type": "string",
            "format": "uri",
            "pattern": endpoint_pattern("https?"),
            "description": endpoint_description,
            "example": "https://pve.example.com:8006",
        },
        "username": {
            "type": "string",
            "minLength": 3,
            "maxLength": 64,
            "pattern": username_pattern(),
            "description": "`user@realm`, at most 64 characters, e.g. `root@pam`; for a token, \
                the token's user.",
            "example": "root@pam",
        },
        "password": {
            "type": "string",
            "minLength": 1,
            "writeOnly": true,
            "description": "The user's password; not with a token.",
        },
        "token_id": {
            "type": "string",
            "minLength": 2,
            "pattern": TOKEN_NAME_PATTERN,
            "description": "The API token's name, e.g. `monitoring`: a letter, then letters, \
                digits, `.`, `-`, `_`. The server also accepts the full \
                `user@realm!monitoring` when `user@realm` is `username`.",
            "example": "monitoring",
        },
        "token_secret": {
            "type": "string",
            "minLength": 1,
            "pattern": TOKEN_SECRET_PATTERN,
            "writeOnly": true,
            "description": "The API token's secret: printable ASCII without spaces or `;`.",
        },
        "fingerprint": {
            "type": ["string", "null"],
            "pattern": FINGERPRINT_PATTERN,
            "description": "SHA-256 fingerprint of the node's certificate: 64 hex digits, any \
                case, optionally in colon-separated pairs. Only with an `https` endpoint.",
            "example": "3A:9F:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:C1",
        },
    });
    match fields {
        Value::Object(fields) => fields,
        _ => Map::new(),
    }
}

/// A pin needs `https`: when `fingerprint` is a string, `api_endpoint` (if present) is https.
fn pin_needs_https() -> Value {
    json!({
        "if": { "required": ["fingerprint"], "properties": { "fingerprint": { "type": "string" } } },
        "then": { "properties": { "api_endpoint": { "pattern": "^https://" } } },
    })
}

fn register_request_schema() -> Value {
    let mut properties = field_schemas();
    // Registration reads `null` as absent for every optional field.
    for optional in ["password", "token_id", "token_secret"] {
        if let Some(Value::Object(field)) = properties.get_mut(optional) {
            field.insert("type".into(), json!(["string", "null"]));
        }
    }
    json!({
        "type": "object",
        "description": "A registration: a `password`, or `token_id` with `token_secret` (exactly \
            one of the two). Unknown fields are ignored.",
        "required": ["name", "api_endpoint", "username"],
        "properties": properties,
        "allOf": [
            {
                "oneOf": [
                    {
                        "title": "password",
                        "required": ["password"],
                        "properties": {
                            "password": { "type": "string" },
                            "token_id": { "type": "null" },
                            "token_secret": { "type": "null" },
                        },
                    },
                    {
                        "title": "API token",
                        "required": ["token_id", "token_secret"],
                        "properties": {
                            "password": { "type": "null" },
                            "token_id": { "type": "string" },
                            "token_secret": { "type": "string" },
                        },
                    },
                ],
            },
            pin_needs_https(),
        ],
        "example": {
            "name": "prod-cluster",
            "api_endpoint": "https://pve.example.com:8006",
            "username": "root@pam",
            "password": "your-password",
        },
    })
}

fn cluster_patch_schema() -> Value {
    json!({
        "type": "object",
        "description": "Any of the registration's fields; `{}` changes nothing. `null` is \
            allowed only for `fingerprint` (it removes the pin). Unknown fields are refused. \
            `token_id` with `token_secret` turns a password cluster into a token cluster; \
            `password` does the reverse; a lone `token_secret` on a token cluster rotates its \
            secret. On a password cluster, `token_id` and `token_secret` come together (400 \
            otherwise); a pin needs an `https` endpoint, the stored one or the new one.",
        "properties": field_schemas(),
        "additionalProperties": false,
        "allOf": [
            {
                "not": {
                    "required": ["password"],
                    "anyOf": [ { "required": ["token_id"] }, { "required": ["token_secret"] } ],
                },
            },
            pin_needs_https(),
        ],
        "example": { "password": "the-new-password" },
    })
}

/// One event of `GET /api/v1/events`, as an SSE parser reads it: `event`, `data`, and `id`.
fn cluster_event_schema() -> Value {
    let id = json!({
        "type": "string",
        "pattern": "^[0-9]+$",
        "description": "The event id, increasing, also across restarts: send it back as \
            `Last-Event-ID` to resume.",
    });
    let json_data = |schema: Value, description: &str| {
        json!({
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": schema,
            "description": description,
        })
    };
    json!({
        "description": "A server-sent event. `cluster.registered` and `cluster.updated` carry \
            the Cluster, `cluster.deregistered` the id of the cluster that is gone, `resync` \
            (no id of its own) says events were lost and why: list the clusters again.",
        "oneOf": [
            {
                "type": "object",
                "required": ["event", "id", "data"],
                "properties": {
                    "event": { "enum": ["cluster.registered", "cluster.updated"] },
                    "id": id,
                    "data": json_data(
                        json!({ "$ref": "#/components/schemas/Cluster" }),
                        "The Cluster object, as GET shows it",
                    ),
                },
            },
            {
                "type": "object",
                "required": ["event", "id", "data"],
                "properties": {
                    "event": { "const": "cluster.deregistered" },
                    "id": id,
                    "data": json_data(
                        json!({
                            "type": "object",
                            "required": ["id"],
                            "properties": { "id": { "type": "string", "format": "uuid" } },
                            "additionalProperties": false,
                        }),
                        "`{\"id\": ...}` of the deregistered cluster",
                    ),
                },
            },
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": { "const": "resync" },
                    "id": id,
                    "data": json_data(
                        json!({
                            "type": "object",
                            "required": ["reason"],
                            "properties": { "reason": { "type": "string", "minLength": 1 } },
                            "additionalProperties": false,
                        }),
                        "`{\"reason\": ...}`: why events were lost",
                    ),
                },
            },
        ],
    })
}

/// The list's query parameters, as one exploded object: that is how OpenAPI states that
/// unknown parameters are refused and that `cursor` needs `limit`.
fn set_list_query(doc: &mut Value) {
    let Some(parameters) = doc
        .pointer_mut("/paths/~1api~1v1~1clusters/get/parameters")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    let query = json!({
        "name": "filter",
        "in": "query",
        "style": "form",
        "explode": true,
        "required": false,
        "description": "The query parameters, each at most once and none empty; any other \
            parameter is refused (400 with `details.field` naming it).",
        "schema": {
            "type": "object",
            "additionalProperties": false,
            "dependentRequired": { "cursor": ["limit"] },
            "properties": {
                "status": {
                    "type": "string",
                    "pattern": status_filter_pattern(),
                    "description": "Only clusters showing one of these statuses, \
                        comma-separated: healthy, degraded, unhealthy, unknown. The status as \
                        shown: a stale cluster is `unknown`.",
                    "example": "degraded,unhealthy",
                },
                "name": {
                    "type": "string",
                    "minLength": 1,
                    "description": "Only clusters whose name starts with this (case-sensitive).",
                    "example": "prod-",
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 1000,
                    "description": "A page of at most this many clusters; the body adds \
                        `next_cursor`.",
                },
                "cursor": {
                    "type": "string",
                    "pattern": CURSOR_PATTERN,
                    "description": "Continue after the page that gave this `next_cursor` \
                        (opaque: pass it as is; stays valid when clusters come and go). Needs \
                        `limit`.",
                },
                "wait": wait_schema(),
            },
        },
    });
    parameters.retain(|p| p["in"] != "query");
    parameters.insert(0, query);
}

/// One cluster's `wait`, with its pattern.
fn set_cluster_wait(doc: &mut Value) {
    let Some(parameters) = doc
        .pointer_mut("/paths/~1api~1v1~1clusters~1{id}/get/parameters")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for parameter in parameters.iter_mut() {
        if parameter["name"] == "wait" && parameter["in"] == "query" {
            let description = parameter["description"].clone();
            parameter["schema"] = wait_schema();
            parameter["description"] = description;
        }
    }
}

/// `wait`, for the list and for one cluster.
fn wait_schema() -> Value {
    json!({
        "type": "string",
        "pattern": WAIT_PATTERN,
        "description": "With `If-None-Match`: hold the request until the tag differs (then \
            200) or this long has passed (then 304). A whole number with a unit, `ms`, `s` or \
            `m`, at most 5m. Ignored without `If-None-Match`.",
        "example": "30s",
    })
}

/// `Last-Event-ID`: an event id, which is an unsigned 64-bit number; others are refused.
fn set_event_id_range(doc: &mut Value) {
    let Some(parameters) = doc
        .pointer_mut("/paths/~1api~1v1~1events/get/parameters")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for parameter in parameters.iter_mut() {
        if parameter["name"] == "Last-Event-ID" {
            parameter["schema"] = json!({
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_EVENT_ID,
            });
        }
    }
}

/// Declares the bearer scheme and puts it, with its 401 (and, on writes, 403), on every
/// operation but the open ones.
fn add_bearer_auth(doc: &mut Value) {
    if let Some(components) = doc.get_mut("components").and_then(Value::as_object_mut) {
        components.insert(
            "securitySchemes".into(),
            json!({
                BEARER_AUTH: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token of proxmoxer (`pmx_...`, see `proxmoxer token \
                        add`). Role `read` allows GET, the event stream and metrics; `admin` \
                        allows everything.",
                },
            }),
        );
    }
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, operation) in item.iter_mut() {
            if OPEN_OPERATIONS.contains(&(path.as_str(), method.as_str())) {
                continue;
            }
            let Some(operation) = operation.as_object_mut() else {
                continue;
            };
            operation.insert("security".into(), json!([{ BEARER_AUTH: [] }]));
            let responses = operation.entry("responses").or_insert_with(|| json!({}));
            add_response(
                responses,
                "401",
                "Authentication required: no `Authorization: Bearer` token, or an unknown one \
                 (with `WWW-Authenticate: Bearer realm=\"proxmoxer\"`)",
                json!({ "code": "Unauthorized", "message": "Authentication required", "details": {} }),
            );
            if WRITE_METHODS.contains(&method.as_str()) {
                add_response(
                    responses,
                    "403",
                    "Token lacks the admin role",
                    json!({ "code": "Forbidden", "message": "Token lacks the admin role", "details": {} }),
                );
            }
        }
    }
}

/// Adds `status` to `responses`, or, where the operation already answers it for another reason
/// (a registration's 401 when Proxmox refuses the credentials), adds this reason to it.
fn add_response(responses: &mut Value, status: &str, description: &str, example: Value) {
    let Some(responses) = responses.as_object_mut() else {
        return;
    };
    match responses.get_mut(status) {
        Some(existing) => {
            let before = existing["description"].as_str().unwrap_or_default();
            existing["description"] = json!(format!("{before}; or: {description}"));
        }
        None => {
            responses.insert(
                status.into(),
                json!({
                    "description": description,
                    "content": {
                        "application/json": {
                            "schema": { "$ref": "#/components/schemas/ErrorBody" },
                            "example": example,
                        },
                    },
                }),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document_value() -> Value {
        document().expect("the document renders")
    }

    #[test]
    fn every_operation_but_health_needs_a_bearer_token() {
        let doc = document_value();
        assert_eq!(
            doc["components"]["securitySchemes"][BEARER_AUTH],
            json!({
                "type": "http",
                "scheme": "bearer",
                "description": doc["components"]["securitySchemes"][BEARER_AUTH]["description"],
            })
        );
        let paths = doc["paths"].as_object().expect("paths");
        for (path, item) in paths {
            for (method, operation) in item.as_object().expect("a path item") {
                let open = path == "/health";
                assert_eq!(
                    operation.get("security").is_some(),
                    !open,
                    "{method} {path}"
                );
                assert_eq!(
                    operation["responses"].get("401").is_some(),
                    !open,
                    "{method} {path}"
                );
                let write = WRITE_METHODS.contains(&method.as_str());
                assert_eq!(
                    operation["responses"].get("403").is_some(),
                    write,
                    "{method} {path}: 403 only on writes"
                );
            }
        }
    }

    #[test]
    fn the_patch_and_check_operations_are_declared_with_their_statuses() {
        let doc = document_value();
        let statuses = |path: &str, method: &str| -> Vec<String> {
            doc["paths"][path][method]["responses"]
                .as_object()
                .map(|r| r.keys().cloned().collect())
                .unwrap_or_default()
        };
        let patch = statuses("/api/v1/clusters/{id}", "patch");
        for status in [
            "200", "400", "401", "403", "404", "409", "415", "500", "502",
        ] {
            assert!(
                patch.contains(&status.to_owned()),
                "PATCH {status}: {patch:?}"
            );
        }
        let content = doc["paths"]["/api/v1/clusters/{id}"]["patch"]["requestBody"]["content"]
            .as_object()
            .map(|c| c.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        assert_eq!(
            content,
            vec!["application/json", "application/merge-patch+json"]
        );
        let check = statuses("/api/v1/clusters/{id}/check", "post");
        for status in ["200", "401", "403", "404", "503"] {
            assert!(
                check.contains(&status.to_owned()),
                "check {status}: {check:?}"
            );
        }
    }

    #[test]
    fn every_reference_resolves() {
        fn refs(value: &Value, found: &mut Vec<String>) {
            match value {
                Value::Object(map) => {
                    for (key, child) in map {
                        match (key.as_str(), child) {
                            ("$ref", Value::String(target)) => found.push(target.clone()),
                            _ => refs(child, found),
                        }
                    }
                }
                Value::Array(items) => items.iter().for_each(|child| refs(child, found)),
                _ => {}
            }
        }
        let doc = document_value();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for target in found {
            let pointer = target.strip_prefix('#').expect("a local reference");
            assert!(doc.pointer(pointer).is_some(), "dangling $ref {target}");
        }
    }
}
