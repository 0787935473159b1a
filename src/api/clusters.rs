//! `/api/v1/clusters`: register, list, read, delete, and status history.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ractor::{ActorRef, call_t};
use serde_json::{Map, Value, json};

use super::openapi::{ClusterList, ErrorBody, HistoryList, RegisterRequest};
use super::{ApiError, AppState, REGISTRY_CALL_TIMEOUT_MS, ask, registry_unavailable};
use crate::cluster::ClusterView;
use crate::domain::{ClusterId, ClusterName, Credentials, Endpoint, ProxmoxUser, Secret, TokenId};
use crate::registry::{NewCluster, RegistrationId, RegistryMsg};
use crate::tls::Fingerprint;

/// List every cluster, newest first.
#[utoipa::path(get, path = "/api/v1/clusters", tag = "clusters",
    responses(
        (status = 200, description = "All registered clusters", body = ClusterList),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn clusters_list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let list = ask(&state.registry, RegistryMsg::ReadList).await?;
    Ok(json_bytes(list.snapshot.full_body()))
}

/// A body rendered by the registry, sent as is.
fn json_bytes(body: axum::body::Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// One cluster.
#[utoipa::path(get, path = "/api/v1/clusters/{id}", tag = "clusters",
    params(("id" = String, Path, description = "Cluster id (UUID)")),
    responses(
        (status = 200, description = "The cluster", body = ClusterView),
        (status = 404, description = "Cluster not found", body = ErrorBody),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn clusters_get(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = parse_cluster_id(id)?;
    let registry = &state.registry;
    let read = call_t!(
        registry,
        RegistryMsg::ReadCluster,
        REGISTRY_CALL_TIMEOUT_MS,
        id
    )
    .map_err(registry_unavailable)?
    .ok_or(ApiError::ClusterNotFound)?;
    Ok(json_bytes(read.rendered.body))
}

/// Deregister a cluster: its monitor stops and its history is deleted.
#[utoipa::path(delete, path = "/api/v1/clusters/{id}", tag = "clusters",
    params(("id" = String, Path, description = "Cluster id (UUID)")),
    responses(
        (status = 204, description = "Deleted; empty body"),
        (status = 404, description = "Cluster not found", body = ErrorBody),
        (status = 500, description = "The change could not be stored", body = ErrorBody),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn clusters_delete(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = parse_cluster_id(id)?;
    let registry = &state.registry;
    call_t!(registry, RegistryMsg::Delete, REGISTRY_CALL_TIMEOUT_MS, id)
        .map_err(registry_unavailable)??;
    Ok(StatusCode::NO_CONTENT)
}

/// Register a cluster. Proxmox is probed (login, version, cluster status) before anything is
/// stored.
#[utoipa::path(post, path = "/api/v1/clusters", tag = "clusters",
    request_body(content = RegisterRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Registered", body = ClusterView,
            headers(("Location" = String, description = "/api/v1/clusters/{id}"))),
        (status = 400, description = "Invalid body or field", body = ErrorBody),
        (status = 401, description = "Proxmox rejected the credentials", body = ErrorBody),
        (status = 403, description = "Insufficient privileges on Proxmox (Sys.Audit on /)", body = ErrorBody),
        (status = 409, description = "Cluster already exists", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Content-Type is not application/json", body = ErrorBody),
        (status = 500, description = "The cluster could not be stored", body = ErrorBody),
        (status = 502, description = "Failed to connect to Proxmox", body = ErrorBody),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn clusters_create(
    State(state): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let request = parse_registration(body)?;
    let registration = RegistrationId::new_v4();
    // If the client goes away, this handler is dropped mid-await: the guard then tells the
    // registry to drop the reservation and the probe.
    let _guard = CancelOnDrop {
        registry: state.registry.clone(),
        registration,
    };
    let timeout_ms = u64::try_from(state.registration_timeout.as_millis()).unwrap_or(u64::MAX);
    let registry = &state.registry;
    let view = call_t!(
        registry,
        RegistryMsg::Register,
        timeout_ms,
        registration,
        request
    )
    .map_err(registry_unavailable)??;
    let location = HeaderValue::from_str(&format!("/api/v1/clusters/{}", view.id))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    )
        .into_response())
}

/// A cluster's recent status transitions, newest first.
#[utoipa::path(get, path = "/api/v1/clusters/{id}/history", tag = "clusters",
    params(("id" = String, Path, description = "Cluster id (UUID)")),
    responses(
        (status = 200, description = "Status transitions, newest first", body = HistoryList),
        (status = 404, description = "Cluster not found", body = ErrorBody),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn clusters_history(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = parse_cluster_id(id)?;
    let registry = &state.registry;
    let history = call_t!(
        registry,
        RegistryMsg::ReadHistory,
        REGISTRY_CALL_TIMEOUT_MS,
        id
    )
    .map_err(registry_unavailable)?
    .ok_or(ApiError::ClusterNotFound)?;
    Ok(json_bytes(history.body))
}

struct CancelOnDrop {
    registry: ActorRef<RegistryMsg>,
    registration: RegistrationId,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        // After a completed registration this is a no-op for the registry.
        let _ = self
            .registry
            .cast(RegistryMsg::CancelRegistration(self.registration));
    }
}

/// Any id that is not a UUID (or not even UTF-8) names no cluster: 404, like an unknown UUID.
fn parse_cluster_id(raw: Result<Path<String>, PathRejection>) -> Result<ClusterId, ApiError> {
    let Path(raw) = raw.map_err(|_| ApiError::ClusterNotFound)?;
    ClusterId::parse_str(&raw).map_err(|_| ApiError::ClusterNotFound)
}

fn parse_registration(body: Value) -> Result<NewCluster, ApiError> {
    let Value::Object(fields) = body else {
        return Err(ApiError::bad_request(
            "Request body must be a JSON object",
            json!({ "reason": "expected an object with name, api_endpoint, username and password" }),
        ));
    };
    let name = ClusterName::parse(required_string(
        &fields,
        "name",
        "Cluster name is required",
    )?)?;
    let endpoint = Endpoint::parse(required_string(
        &fields,
        "api_endpoint",
        "API endpoint is required",
    )?)?;
    let username = ProxmoxUser::parse(required_string(
        &fields,
        "username",
        "Username is required",
    )?)?;
    let credentials = parse_credentials(&fields, username)?;
    let fingerprint = optional_string(&fields, "fingerprint")?
        .map(Fingerprint::parse)
        .transpose()?;
    if fingerprint.is_some() && !endpoint.is_https() {
        return Err(ApiError::bad_request(
            "Fingerprint needs an https endpoint",
            json!({ "field": "fingerprint", "reason": "a certificate can only be pinned on https" }),
        ));
    }
    Ok(NewCluster {
        name,
        endpoint,
        fingerprint,
        credentials,
    })
}

/// Exactly one of a password or an API token (`token_id` with `token_secret`).
fn parse_credentials(
    fields: &Map<String, Value>,
    username: ProxmoxUser,
) -> Result<Credentials, ApiError> {
    let password = optional_string(fields, "password")?;
    let token_id = optional_string(fields, "token_id")?;
    let token_secret = optional_string(fields, "token_secret")?;
    match (password, token_id, token_secret) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(ApiError::bad_request(
            "Give either a password or an API token, not both",
            json!({
                "fields": ["password", "token_id", "token_secret"],
                "reason": "send password, or token_id and token_secret",
            }),
        )),
        (Some(""), None, None) | (None, None, None) => Err(ApiError::bad_request(
            "Password is required",
            json!({
                "field": "password",
                "reason": "send a non-empty password, or token_id and token_secret",
            }),
        )),
        (Some(password), None, None) => Ok(Credentials::Password {
            username,
            password: Secret::new(password),
        }),
        (None, Some(_), None | Some("")) => Err(ApiError::bad_request(
            "Token secret is required",
            json!({ "field": "token_secret", "reason": "token_id needs its token_secret" }),
        )),
        (None, None | Some(""), Some(_)) => Err(ApiError::bad_request(
            "Token ID is required",
            json!({ "field": "token_id", "reason": "token_secret needs its token_id" }),
        )),
        (None, Some(token_id), Some(secret)) => {
            // The secret travels in an Authorization header, which Proxmox cuts at `;`.
            if !secret.chars().all(|c| c.is_ascii_graphic() && c != ';') {
                return Err(ApiError::bad_request(
                    "Token secret is invalid",
                    json!({
                        "field": "token_secret",
                        "reason": "must be printable ASCII without spaces or ';' (Proxmox shows it as a UUID)",
                    }),
                ));
            }
            Ok(Credentials::Token {
                token_id: TokenId::parse(token_id, &username)?,
                username,
                secret: Secret::new(secret),
            })
        }
    }
}

fn required_string<'a>(
    fields: &'a Map<String, Value>,
    field: &'static str,
    missing_message: &str,
) -> Result<&'a str, ApiError> {
    optional_string(fields, field)?.ok_or_else(|| {
        ApiError::bad_request(
            missing_message,
            json!({ "field": field, "reason": "missing" }),
        )
    })
}

/// A string field; absent and `null` are both `None`.
fn optional_string<'a>(
    fields: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, ApiError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::bad_request(
            format!("Field {field} must be a string"),
            json!({ "field": field, "reason": format!("expected a string, got {}", json_type(other)) }),
        )),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
