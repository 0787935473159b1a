//! The REST API. Handlers validate input, send the registry one message, await its reply
//! with a deadline, and render the answer; they never touch the store or Proxmox.

mod error;

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ractor::{ActorRef, RactorErr, RpcReplyPort, call_t};
use serde_json::{Map, Value, json};

pub use error::ApiError;

use crate::cluster::ClusterView;
use crate::domain::{ClusterId, ClusterName, Credentials, Endpoint, ProxmoxUser, Secret, TokenId};
use crate::registry::{NewCluster, RegistrationId, RegistryMsg};
use crate::tls::Fingerprint;

/// Registration bodies are a few hundred bytes; anything near this is not one.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long a handler waits for the registry on anything but a registration.
const REGISTRY_CALL_TIMEOUT_MS: u64 = 5_000;

#[derive(Clone)]
pub struct AppState {
    pub registry: ActorRef<RegistryMsg>,
    /// A registration waits on up to three Proxmox calls, each bounded by the Proxmox timeout.
    pub registration_timeout: Duration,
}

pub fn router(state: AppState) -> Router {
    let clusters = Router::new()
        .route("/clusters", get(clusters_list).post(clusters_create))
        .route("/clusters/{id}", get(clusters_get).delete(clusters_delete));
    Router::new()
        .nest("/api/v1", clusters)
        .route("/health", get(health))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::Internal("a request handler panicked".into()).into_response()
            },
        ))
        .with_state(state)
}

async fn route_not_found() -> ApiError {
    ApiError::RouteNotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn health(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let clusters = ask(&state.registry, RegistryMsg::Ping).await?;
    Ok(Json(json!({ "status": "ok", "clusters": clusters })))
}

async fn clusters_list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let clusters = ask(&state.registry, RegistryMsg::List).await?;
    Ok(Json(
        json!({ "total": clusters.len(), "clusters": clusters }),
    ))
}

async fn clusters_get(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ClusterView>, ApiError> {
    let id = parse_cluster_id(id)?;
    let registry = &state.registry;
    let view = call_t!(registry, RegistryMsg::Get, REGISTRY_CALL_TIMEOUT_MS, id)
        .map_err(registry_unavailable)?;
    view.map(Json).ok_or(ApiError::ClusterNotFound)
}

async fn clusters_delete(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = parse_cluster_id(id)?;
    let registry = &state.registry;
    call_t!(registry, RegistryMsg::Delete, REGISTRY_CALL_TIMEOUT_MS, id)
        .map_err(registry_unavailable)??;
    Ok(StatusCode::NO_CONTENT)
}

async fn clusters_create(
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

async fn ask<T: Send + 'static>(
    registry: &ActorRef<RegistryMsg>,
    msg: fn(RpcReplyPort<T>) -> RegistryMsg,
) -> Result<T, ApiError> {
    call_t!(registry, msg, REGISTRY_CALL_TIMEOUT_MS).map_err(registry_unavailable)
}

fn registry_unavailable(e: RactorErr<RegistryMsg>) -> ApiError {
    let reason = match e {
        RactorErr::Timeout => "the registry did not answer in time".to_owned(),
        other => format!("the registry is not running ({other})"),
    };
    ApiError::Unavailable { reason }
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
        (None, Some(token_id), Some(secret)) => Ok(Credentials::Token {
            token_id: TokenId::parse(token_id, &username)?,
            username,
            secret: Secret::new(secret),
        }),
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
