//! The REST API. Handlers validate input, send the registry one message, await its reply
//! with a deadline, and render the answer; they never touch the store or Proxmox.

pub mod audit;
pub mod auth;
mod clusters;
mod error;
mod events;
pub mod listener;
pub mod openapi;
pub mod status_page;
pub mod token_file;

use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ractor::{ActorRef, RactorErr, RpcReplyPort, call_t};
use tokio::sync::watch;

pub use error::ApiError;

use crate::registry::RegistryMsg;

/// Registration bodies are a few hundred bytes; anything near this is not one.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long a handler waits for the registry on anything but a registration.
const REGISTRY_CALL_TIMEOUT_MS: u64 = 5_000;
const REQUEST_ID: &str = "x-request-id";
/// Longer client-supplied request ids are replaced rather than echoed into logs.
const MAX_REQUEST_ID_LEN: usize = 128;

#[derive(Clone)]
pub struct AppState {
    pub registry: ActorRef<RegistryMsg>,
    /// Turns true when the daemon stops, ending event streams so shutdown is not held open.
    pub shutdown: watch::Receiver<bool>,
    pub metrics: Option<crate::metrics::Metrics>,
    /// The API tokens in force; see [`auth`].
    pub keyring: std::sync::Arc<auth::Keyring>,
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(
            "/clusters",
            get(clusters::clusters_list).post(clusters::clusters_create),
        )
        .route(
            "/clusters/{id}",
            get(clusters::clusters_get)
                .delete(clusters::clusters_delete)
                .patch(clusters::clusters_patch),
        )
        .route("/clusters/{id}/check", post(clusters::clusters_check))
        .route("/clusters/{id}/history", get(clusters::clusters_history))
        .route("/events", get(events::events))
        .route("/openapi.json", get(openapi::openapi_json));
    Router::new()
        .nest("/api/v1", api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(status_page::routes())
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::Internal("a request handler panicked".into()).into_response()
            },
        ))
        // Around every route and both fallbacks: an unknown path needs a token too.
        .layer(axum::middleware::from_fn_with_state(
            state.keyring.clone(),
            auth::guard,
        ))
        // Outermost, so even a request whose handler panicked is logged, counted and tagged.
        .layer(axum::middleware::from_fn(observe))
        .with_state(state)
}

/// Tags each request with an id (the client's `X-Request-Id`, or a new one), echoes it, logs
/// the request at debug and counts it by route template and status. A deferred answer (a
/// blocking query) is tagged, logged and counted when it is given.
async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID_LEN
                && v.chars().all(|c| c.is_ascii_graphic())
        })
        .map_or_else(new_request_id, str::to_owned);
    let mut response = next.run(request).await;
    let observed = Observed {
        started,
        method,
        route,
        request_id,
    };
    match listener::Deferred::map(&mut response, move |answer| observed.record(answer)) {
        Ok(()) => response,
        Err(record) => record(response),
    }
}

/// What [`observe`] keeps of a request until its answer.
struct Observed {
    started: Instant,
    method: Method,
    route: String,
    request_id: String,
}

impl Observed {
    /// Echoes the request id on `response`, logs the request and counts it.
    fn record(self, mut response: Response) -> Response {
        let Self {
            started,
            method,
            route,
            request_id,
        } = self;
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID, value);
        }
        let elapsed = started.elapsed();
        let status = response.status().as_u16();
        tracing::debug!(
            %method,
            route,
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            request_id,
            "request"
        );
        let method = method_label(&method);
        metrics::counter!(
            "proxmoxer_http_requests_total",
            "method" => method,
            "route" => route.clone(),
            "status" => status.to_string(),
        )
        .increment(1);
        metrics::histogram!(
            "proxmoxer_http_request_duration_seconds",
            "method" => method,
            "route" => route,
        )
        .record(elapsed.as_secs_f64());
        response
    }
}

/// A request id unique to this process and unlikely to repeat across restarts: a random
/// prefix drawn once, then a counter. Drawing randomness per request would cost a system call
/// on every request.
fn new_request_id() -> String {
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let sequence = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix:016x}{sequence:016x}")
}

/// The standard methods (RFC 9110 and PATCH), the only ones that get their own `method` label.
static STANDARD_METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::CONNECT,
    Method::OPTIONS,
    Method::TRACE,
    Method::PATCH,
];

/// The `method` label of the request metrics: a standard method's name, anything else `other`.
/// Clients may send any token as a method, and each label value is a new series kept for the
/// daemon's lifetime, so invented methods must not reach the label.
fn method_label(method: &Method) -> &'static str {
    STANDARD_METHODS
        .iter()
        .find(|standard| *standard == method)
        .map_or("other", Method::as_str)
}

async fn route_not_found() -> ApiError {
    ApiError::RouteNotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Liveness: the registry answers.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses(
        (status = 200, description = "The registry answers", body = openapi::Health),
        (status = 503, description = "The registry did not answer, or database writes are failing",
            body = openapi::ErrorBody),
    ))]
async fn health(State(state): State<AppState>) -> Result<Json<openapi::Health>, ApiError> {
    let report = ask(&state.registry, RegistryMsg::Ping).await?;
    if let Some(problem) = report.problem {
        return Err(ApiError::Unavailable {
            reason: problem.reason().to_owned(),
        });
    }
    Ok(Json(openapi::Health {
        status: "ok".to_owned(),
        clusters: report.clusters,
        role: report.role,
        leader: report.leader,
    }))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 503, description = "The registry did not answer", body = openapi::ErrorBody),
    ))]
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let snapshot = ask(&state.registry, RegistryMsg::Snapshot).await?.figures();
    let report = ask(&state.registry, RegistryMsg::Ping).await?;
    let text = crate::metrics::render(
        state.metrics.as_ref(),
        report.role.runs_monitors(),
        &snapshot,
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_standard_methods_name_their_metric_label() {
        for method in &STANDARD_METHODS {
            assert_eq!(method_label(method), method.as_str());
        }
        for invented in [&b"FOO"[..], b"get", b"PROPFIND", b"X-GET"] {
            let method = Method::from_bytes(invented).expect("a valid method token");
            assert_eq!(method_label(&method), "other", "{method}");
        }
    }
}
