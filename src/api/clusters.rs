//! `/api/v1/clusters`: register, list, read, delete, and status history.
//!
//! Reads answer from bytes the registry rendered ahead of time, with a weak `ETag`; with
//! `If-None-Match` naming the current tag they answer `304`, and with `?wait=` as well (on the
//! list and on one cluster) they are held until the tag changes: a blocking query, for watching
//! through GET. A held request waits on the registry's change channels, never polls: it costs a
//! timer and a channel receiver until something it shows changes.

use std::convert::Infallible;
use std::task::Poll;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ractor::{ActorRef, RactorErr, call_t};
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::audit::AuditSubject;
use super::listener::Deferred;
use super::openapi::{ClusterList, ErrorBody, HistoryList};
use super::{ApiError, AppState, REGISTRY_CALL_TIMEOUT_MS, ask, registry_unavailable};
use crate::cluster::ClusterView;
use crate::domain::{
    ClusterId, ClusterName, ClusterStatus, Credentials, Endpoint, ProxmoxUser, Secret, TokenId,
};
use crate::registry::views::{
    Cursor, Etag, ListFilter, ListQuery, Page, ReadCluster, ReadList, Rendered,
};
use crate::registry::{ClusterPatch, NewCluster, RegistrationId, RegistryError, RegistryMsg};
use crate::tls::Fingerprint;

/// The longest a blocking query may be held (inclusive).
const MAX_WAIT: Duration = Duration::from_secs(5 * 60);
/// The largest page.
const MAX_LIMIT: usize = 1000;
/// The query parameters of `GET /api/v1/clusters`.
const LIST_PARAMETERS: &[&str] = &["status", "name", "limit", "cursor", "wait"];
/// The query parameters of `GET /api/v1/clusters/{id}`.
const CLUSTER_PARAMETERS: &[&str] = &["wait"];
/// `GET /api/v1/clusters/{id}/history` takes none.
const HISTORY_PARAMETERS: &[&str] = &[];

/// The query string as name/value pairs, decoded; validated by [`Parameters::parse`].
type QueryPairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// List clusters, newest first (`created_at`, then `id`, descending); optionally filtered,
/// paged, and held until the list changes.
#[utoipa::path(get, path = "/api/v1/clusters", tag = "clusters",
    params(
        // The query parameters (status, name, limit, cursor, wait) are declared in
        // `openapi.rs`, as one object: only there can the document say that `cursor` needs
        // `limit` and that other parameters are refused.
        ("If-None-Match" = Option<String>, Header,
            description = "Tags from earlier answers (or `*`), compared weakly: 304 while \
                one of them is current."),
    ),
    responses(
        (status = 200, description = "The clusters the filter keeps: `{\"clusters\", \"total\"}`, \
            and `next_cursor` with `limit`; `total` counts every cluster the filter keeps, on \
            every page", body = ClusterList,
            headers(("ETag" = String, description = "Weak tag, `W/\"…\"`; `last_checked_at` \
                alone does not change it"))),
        (status = 304, description = "Not modified: `If-None-Match` names the current tag (when \
            `wait` passed, or at shutdown, still); empty body",
            headers(("ETag" = String, description = "The current tag"))),
        (status = 400, description = "An unknown, empty, repeated or invalid query parameter; \
            `details.field` names it", body = ErrorBody),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn clusters_list(
    State(state): State<AppState>,
    precondition: IfNoneMatch,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let (list_query, wait) = {
        let mut parameters = Parameters::parse(query, LIST_PARAMETERS)?;
        (parse_list_query(&mut parameters)?, parameters.wait()?)
    };
    BlockingRead::new(
        state,
        Watched::List(Box::new(list_query)),
        precondition,
        wait,
    )
    .answer()
    .await
}

/// A body rendered by the registry, sent as is with its tag.
fn fresh(rendered: Rendered) -> Response {
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        rendered.body,
    )
        .into_response();
    set_etag(response.headers_mut(), rendered.etag);
    response
}

/// `304 Not Modified`: no body, the same tag.
fn not_modified(etag: Etag) -> Response {
    let mut response = StatusCode::NOT_MODIFIED.into_response();
    set_etag(response.headers_mut(), etag);
    response
}

fn set_etag(headers: &mut HeaderMap, etag: Etag) {
    // `W/"` and hex digits: always a valid header value.
    if let Ok(value) = HeaderValue::try_from(etag.header()) {
        headers.insert(header::ETAG, value);
    }
}

/// One cluster; optionally held until it changes.
#[utoipa::path(get, path = "/api/v1/clusters/{id}", tag = "clusters",
    params(
        ("id" = String, Path, format = Uuid, description = "Cluster id (UUID)"),
        ("wait" = Option<String>, Query, example = "30s",
            description = "With `If-None-Match`: hold the request until the tag differs \
                (then 200), the cluster is deleted (then 404) or this long has passed (then \
                304). A whole number with a unit, `ms`, `s` or `m`, at most 5m. Ignored \
                without `If-None-Match`."),
        ("If-None-Match" = Option<String>, Header,
            description = "Tags from earlier answers (or `*`), compared weakly: 304 while \
                one of them is current."),
    ),
    responses(
        (status = 200, description = "The cluster", body = ClusterView,
            headers(("ETag" = String, description = "Weak tag, `W/\"…\"`; `last_checked_at` \
                alone does not change it"))),
        (status = 304, description = "Not modified: `If-None-Match` names the current tag (when \
            `wait` passed, or at shutdown, still); empty body",
            headers(("ETag" = String, description = "The current tag"))),
        (status = 400, description = "An unknown, empty, repeated or invalid query parameter; \
            `details.field` names it", body = ErrorBody),
        (status = 404, description = "Cluster not found", body = ErrorBody),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn clusters_get(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    precondition: IfNoneMatch,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let id = parse_cluster_id(id)?;
    let wait = Parameters::parse(query, CLUSTER_PARAMETERS)?.wait()?;
    BlockingRead::new(state, Watched::Cluster(id), precondition, wait)
        .answer()
        .await
}

/// What a read shows: one cluster, or a list.
enum Watched {
    Cluster(ClusterId),
    /// Boxed: most held requests watch one cluster.
    List(Box<ListQuery>),
}

/// The channel that tells a held read that what it shows may have changed.
enum Changes {
    /// Sees the cluster's every new tag; closed when it is deleted.
    Cluster(watch::Receiver<Etag>),
    /// Sees every change of any tag in the list; closed when the registry stops.
    List(watch::Receiver<u64>),
}

impl Changes {
    async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        match self {
            Self::Cluster(changes) => changes.changed().await,
            Self::List(changes) => changes.changed().await,
        }
    }
}

impl Watched {
    /// The current representation, and the channel of its next change.
    async fn read(
        &self,
        registry: &ActorRef<RegistryMsg>,
    ) -> Result<(Rendered, Changes), ApiError> {
        match self {
            Self::Cluster(id) => {
                let ReadCluster { rendered, changes } = call_t!(
                    registry,
                    RegistryMsg::ReadCluster,
                    REGISTRY_CALL_TIMEOUT_MS,
                    *id
                )
                .map_err(registry_unavailable)?
                .ok_or(ApiError::ClusterNotFound)?;
                Ok((rendered, Changes::Cluster(changes)))
            }
            Self::List(query) => {
                let ReadList { snapshot, changes } = ask(registry, RegistryMsg::ReadList).await?;
                Ok((snapshot.query(query), Changes::List(changes)))
            }
        }
    }

    /// Whether a closed channel means this is gone, so that reading again answers as a fresh
    /// read would (404), rather than that the registry stopped.
    fn gone_when_closed(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Logs, at debug, that a request for this is held while its tag is `etag`.
    fn log_holding(&self, etag: Etag) {
        match self {
            Self::Cluster(id) => tracing::debug!(
                route = "/api/v1/clusters/{id}",
                cluster_id = %id,
                etag = %etag.header(),
                "holding a blocking query"
            ),
            Self::List(_) => tracing::debug!(
                route = "/api/v1/clusters",
                etag = %etag.header(),
                "holding a blocking query"
            ),
        }
    }
}

/// A read that is held while the client has what it shows, when the request allows: a
/// blocking query.
struct BlockingRead {
    registry: ActorRef<RegistryMsg>,
    shutdown: watch::Receiver<bool>,
    watched: Watched,
    precondition: IfNoneMatch,
    /// Until when the request may be held; `None` answers at once.
    deadline: Option<Instant>,
}

impl BlockingRead {
    fn new(
        state: AppState,
        watched: Watched,
        precondition: IfNoneMatch,
        wait: Option<Duration>,
    ) -> Self {
        Self {
            registry: state.registry,
            shutdown: state.shutdown,
            watched,
            deadline: precondition.deadline(wait),
            precondition,
        }
    }

    /// The answer now, or a deferred one when the request is held.
    async fn answer(mut self) -> Result<Response, ApiError> {
        let (rendered, changes) = self.watched.read(&self.registry).await?;
        match self.precondition.hold(rendered, self.deadline) {
            Verdict::Answer(answer) => Ok(answer),
            Verdict::Hold(etag, deadline) => {
                self.watched.log_holding(etag);
                let held = Held {
                    registry: self.registry,
                    shutdown: self.shutdown,
                    watched: self.watched,
                    precondition: self.precondition,
                    etag,
                    deadline,
                    changes,
                };
                Ok(Deferred::respond(not_modified(etag), held.answer()))
            }
        }
    }
}

/// A held request: all it keeps while it waits. Neither the representation nor the request
/// (the router has let go of it: [`Deferred`]), but a tag, a channel receiver and a timer, so
/// that thousands of them cost little memory, and no CPU until something they show changes.
struct Held {
    registry: ActorRef<RegistryMsg>,
    shutdown: watch::Receiver<bool>,
    watched: Watched,
    precondition: IfNoneMatch,
    /// The tag of what the client has.
    etag: Etag,
    deadline: Instant,
    changes: Changes,
}

impl Held {
    /// Waits, without polling, until the tag differs from what the client has (200), the
    /// cluster is gone (404), the wait ends or the daemon stops (304).
    ///
    /// Not an `async fn`: its arguments would be kept twice in its state, once as arguments
    /// and once as the locals they are moved to.
    // Written out for the size of the state each held request keeps; see above.
    #[allow(clippy::manual_async_fn)]
    fn answer(mut self) -> impl Future<Output = Response> + Send + 'static {
        async move {
            loop {
                let wake = tokio::select! {
                    changed = self.changes.changed() => match changed {
                        Ok(()) => Wake::Changed,
                        Err(_) => Wake::Closed,
                    },
                    () = tokio::time::sleep_until(self.deadline) => Wake::Done,
                    () = stopping(&self.shutdown) => Wake::Done,
                };
                match wake {
                    // Something it shows changed, maybe not what this request shows: compare
                    // again.
                    Wake::Changed => {}
                    Wake::Closed if self.watched.gone_when_closed() => {}
                    Wake::Closed | Wake::Done => return not_modified(self.etag),
                }
                // Boxed, so that what a registry call needs is not kept while the request
                // waits.
                let rendered;
                (rendered, self.changes) = match Box::pin(self.watched.read(&self.registry)).await {
                    Ok(read) => read,
                    Err(error) => return error.into_response(),
                };
                match self.precondition.hold(rendered, Some(self.deadline)) {
                    Verdict::Answer(answer) => return answer,
                    Verdict::Hold(etag, _) => {
                        self.etag = etag;
                        self.watched.log_holding(etag);
                    }
                }
            }
        }
    }
}

/// Resolves once the daemon is stopping, checked each time it is polled, without a waiter of
/// its own: the request's connection watches for the stop and, once it comes, polls the
/// request's answer again ([`super::listener`]). A shutdown sender dropped without ever
/// saying so is not a shutdown: then this never resolves, rather than ending every wait at
/// once.
fn stopping(shutdown: &watch::Receiver<bool>) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(|_| {
        if *shutdown.borrow() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
}

/// What a read does with the representation it got.
enum Verdict {
    /// Answer now.
    Answer(Response),
    /// Hold the request until the tag differs or the deadline.
    Hold(Etag, Instant),
}

/// Why a held request stopped waiting.
enum Wake {
    /// The channel saw a new value.
    Changed,
    /// The channel's sender is gone: the cluster was deleted, or the registry stopped.
    Closed,
    /// The wait is over, or the daemon is stopping.
    Done,
}

/// The request's `If-None-Match`: the tags it names, compared weakly (RFC 9110 §13.1.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum IfNoneMatch {
    /// No such header: answer in full, at once.
    Absent,
    /// `*`: any current representation matches.
    Any,
    /// These tags; one that this server never issued matches nothing and is left out.
    Tags(Vec<Etag>),
}

impl IfNoneMatch {
    fn from_headers(headers: &HeaderMap) -> Self {
        let mut values = headers.get_all(header::IF_NONE_MATCH).iter().peekable();
        if values.peek().is_none() {
            return Self::Absent;
        }
        let mut tags = Vec::new();
        // A value that is not text names no tag of ours; the others still count.
        for value in values.filter_map(|v| v.to_str().ok()) {
            for tag in value.split(',') {
                if tag.trim() == "*" {
                    return Self::Any;
                }
                tags.extend(Etag::parse(tag));
            }
        }
        Self::Tags(tags)
    }

    /// Whether the current representation, tagged `etag`, is one the client has.
    fn matches(&self, etag: Etag) -> bool {
        match self {
            Self::Absent => false,
            Self::Any => true,
            Self::Tags(tags) => tags.contains(&etag),
        }
    }

    /// The answer to give now (the representation, or 304 when there is nothing to wait
    /// for), or the tag and deadline to hold the request with. A held `*` then waits for a
    /// change from what it first matched, not for any representation at all, which it would
    /// match forever.
    fn hold(&mut self, rendered: Rendered, deadline: Option<Instant>) -> Verdict {
        if !self.matches(rendered.etag) {
            return Verdict::Answer(fresh(rendered));
        }
        let etag = rendered.etag;
        if *self == Self::Any {
            *self = Self::Tags(vec![etag]);
        }
        match deadline {
            Some(deadline) => Verdict::Hold(etag, deadline),
            None => Verdict::Answer(not_modified(etag)),
        }
    }

    /// Until when a request may be held: only with a tag to compare and a `wait`.
    fn deadline(&self, wait: Option<Duration>) -> Option<Instant> {
        match self {
            Self::Absent => None,
            Self::Any | Self::Tags(_) => wait.map(|wait| Instant::now() + wait),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IfNoneMatch {
    type Rejection = Infallible;

    /// Reads the header in place rather than copying the whole header map.
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(Self::from_headers(&parts.headers))
    }
}

/// The query parameters of one request: each known to the endpoint, given once, not empty.
/// A typo such as `?staus=` must be an error, not a silently unfiltered answer.
struct Parameters(Vec<(&'static str, String)>);

impl Parameters {
    fn parse(query: QueryPairs, allowed: &[&'static str]) -> Result<Self, ApiError> {
        let Query(pairs) = query.map_err(|rejection| {
            ApiError::bad_request(
                "Query string is invalid",
                json!({ "field": "query", "reason": rejection.body_text() }),
            )
        })?;
        let mut known: Vec<(&'static str, String)> = Vec::with_capacity(pairs.len());
        for (name, value) in pairs {
            let Some(&parameter) = allowed.iter().find(|a| **a == name) else {
                let reason = if allowed.is_empty() {
                    "this endpoint takes no query parameters".to_owned()
                } else {
                    format!("not a parameter here; expected {}", allowed.join(", "))
                };
                return Err(ApiError::bad_request(
                    "Unknown query parameter",
                    json!({ "field": name, "reason": reason }),
                ));
            };
            if value.is_empty() {
                return Err(invalid(
                    parameter,
                    "Query parameter is empty",
                    "must not be empty; leave the parameter out instead",
                ));
            }
            if known.iter().any(|(seen, _)| *seen == parameter) {
                return Err(invalid(
                    parameter,
                    "Query parameter is repeated",
                    "give it once (several statuses as one comma-separated list)",
                ));
            }
            known.push((parameter, value));
        }
        Ok(Self(known))
    }

    fn take(&mut self, name: &str) -> Option<String> {
        let index = self
            .0
            .iter()
            .position(|(parameter, _)| *parameter == name)?;
        Some(self.0.swap_remove(index).1)
    }

    /// `wait`: a whole number of milliseconds, seconds or minutes (`500ms`, `30s`, `2m`), at
    /// most [`MAX_WAIT`]. One plain form, so that the OpenAPI document can state it exactly.
    fn wait(&mut self) -> Result<Option<Duration>, ApiError> {
        let Some(raw) = self.take("wait") else {
            return Ok(None);
        };
        let bad = |reason: String| invalid("wait", "Wait is invalid", reason);
        let unit_at = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
        let (number, unit) = raw.split_at(unit_at);
        if unit.is_empty() {
            return Err(bad(format!(
                "{raw:?} has no unit; give a duration such as 30s or 2m"
            )));
        }
        let per_unit = match unit {
            _ if number.is_empty() => None,
            "ms" => Some(Duration::from_millis(1)),
            "s" => Some(Duration::from_secs(1)),
            "m" => Some(Duration::from_secs(60)),
            _ => None,
        };
        let Some(per_unit) = per_unit else {
            return Err(bad(format!(
                "{raw:?} is not a duration: a whole number with ms, s or m, e.g. 30s or 2m"
            )));
        };
        let wait = number
            .parse::<u32>()
            .ok()
            .and_then(|count| per_unit.checked_mul(count))
            .filter(|wait| *wait <= MAX_WAIT)
            .ok_or_else(|| bad(format!("{raw:?} is over the maximum of 5m")))?;
        Ok(Some(wait))
    }
}

/// A `400` naming the parameter, shaped like a field's validation error.
fn invalid(parameter: &str, message: &str, reason: impl Into<String>) -> ApiError {
    ApiError::bad_request(
        message,
        json!({ "field": parameter, "reason": reason.into() }),
    )
}

fn parse_list_query(parameters: &mut Parameters) -> Result<ListQuery, ApiError> {
    let statuses = parameters
        .take("status")
        .map(|raw| parse_statuses(&raw))
        .transpose()?;
    let name_prefix = parameters.take("name");
    let limit = parameters
        .take("limit")
        .map(|raw| match raw.parse::<usize>() {
            Ok(limit) if (1..=MAX_LIMIT).contains(&limit) => Ok(limit),
            _ => Err(invalid(
                "limit",
                "Limit is invalid",
                format!("{raw:?} is not a whole number from 1 to {MAX_LIMIT}"),
            )),
        })
        .transpose()?;
    let after = parameters
        .take("cursor")
        .map(|raw| {
            Cursor::decode(&raw).ok_or_else(|| {
                invalid(
                    "cursor",
                    "Cursor is invalid",
                    "not a cursor this server issued; pass next_cursor from the previous page as is",
                )
            })
        })
        .transpose()?;
    let page = match (limit, after) {
        (Some(limit), after) => Some(Page { limit, after }),
        (None, None) => None,
        (None, Some(_)) => {
            return Err(invalid(
                "cursor",
                "Cursor needs a limit",
                "a cursor continues a page: pass limit as well",
            ));
        }
    };
    Ok(ListQuery {
        filter: ListFilter {
            statuses,
            name_prefix,
        },
        page,
    })
}

/// `healthy,degraded`: any of the four statuses, lowercase, comma-separated.
fn parse_statuses(raw: &str) -> Result<Vec<ClusterStatus>, ApiError> {
    raw.split(',')
        .map(|name| match name.trim() {
            "healthy" => Ok(ClusterStatus::Healthy),
            "degraded" => Ok(ClusterStatus::Degraded),
            "unhealthy" => Ok(ClusterStatus::Unhealthy),
            "unknown" => Ok(ClusterStatus::Unknown),
            other => Err(invalid(
                "status",
                "Status filter is invalid",
                format!(
                    "unknown status {other:?}; expected healthy, degraded, unhealthy or unknown \
                     (lowercase, comma-separated)"
                ),
            )),
        })
        .collect()
}

/// Deregister a cluster: its monitor stops and its history is deleted.
#[utoipa::path(delete, path = "/api/v1/clusters/{id}", tag = "clusters",
    params(("id" = String, Path, format = Uuid, description = "Cluster id (UUID)")),
    responses(
        (status = 204, description = "Deleted; empty body"),
        (status = 404, description = "Cluster not found", body = ErrorBody),
        (status = 500, description = "The change could not be stored", body = ErrorBody),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn clusters_delete(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match parse_cluster_id(id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let registry = &state.registry;
    let subject = AuditSubject::lookup(registry, id).await;
    // Like a registration, a deletion waits for its durable commit, however slow the disk.
    let deleted = answer_of(ractor::call!(registry, RegistryMsg::Delete, id));
    subject.tag(deleted.map(|()| StatusCode::NO_CONTENT))
}

/// Register a cluster. Proxmox is probed (login, version, cluster status) before anything is
/// stored.
#[utoipa::path(post, path = "/api/v1/clusters", tag = "clusters",
    request_body(content = ref("#/components/schemas/RegisterRequest"),
        content_type = "application/json"),
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
) -> Response {
    let mut subject = AuditSubject::default();
    let answer = register_cluster(&state, body, &mut subject).await;
    subject.tag(answer)
}

/// Registers the cluster `body` describes; `subject` learns its name and id as they become
/// known, for the audit line.
async fn register_cluster(
    state: &AppState,
    body: Result<Json<Value>, JsonRejection>,
    subject: &mut AuditSubject,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let request = parse_registration(body)?;
    subject.name = Some(request.name.to_string());
    let registration = RegistrationId::new_v4();
    // If the client goes away, this handler is dropped mid-await: the guard then tells the
    // registry to drop the reservation and the probe.
    let _guard = CancelOnDrop {
        registry: state.registry.clone(),
        registration,
    };
    // No timeout of our own: the registry bounds the probe, and once the cluster is being
    // stored only the disk decides; giving up then would answer an error for a cluster that
    // still appears. A registry that dies drops the reply, which ends the wait.
    let registry = &state.registry;
    let view = answer_of(ractor::call!(
        registry,
        RegistryMsg::Register,
        registration,
        request
    ))?;
    *subject = AuditSubject::of(&view);
    let location = HeaderValue::from_str(&format!("/api/v1/clusters/{}", view.id))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    )
        .into_response())
}

/// The media types a `PATCH` body may have: JSON, or a JSON merge patch (RFC 7396), which
/// is what the body is.
fn patch_media_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some("application/json" | "application/merge-patch+json") => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType),
    }
}

/// Change a cluster's name, endpoint, credentials or pin without registering it again. A body
/// with any connection field (`api_endpoint`, `username`, `password`, `token_id`,
/// `token_secret`, `fingerprint`) is verified against Proxmox exactly as a registration is,
/// before anything changes; on failure nothing changes. `{}` changes nothing.
#[utoipa::path(patch, path = "/api/v1/clusters/{id}", tag = "clusters",
    params(("id" = String, Path, format = Uuid, description = "Cluster id (UUID)")),
    request_body(
        description = "Any of the registration's fields; `fingerprint: null` removes the pin",
        content(
            (ref("#/components/schemas/ClusterPatch") = "application/json"),
            (ref("#/components/schemas/ClusterPatch") = "application/merge-patch+json"),
        )
    ),
    responses(
        (status = 200, description = "Changed (or `{}`: unchanged); the Cluster as the \
            verification saw it", body = ClusterView),
        (status = 400, description = "Invalid body or field, an unknown field, `null` for \
            anything but `fingerprint`, or a body that would leave the cluster with both or \
            neither a password and a token", body = ErrorBody),
        (status = 401, description = "Proxmox rejected the credentials", body = ErrorBody),
        (status = 403, description = "Insufficient privileges on Proxmox (Sys.Audit on /)",
            body = ErrorBody),
        (status = 404, description = "Cluster not found", body = ErrorBody),
        (status = 409, description = "Cluster already exists: another cluster has this name",
            body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Content-Type is not application/json or \
            application/merge-patch+json", body = ErrorBody),
        (status = 500, description = "The change could not be stored", body = ErrorBody),
        (status = 502, description = "Failed to connect to Proxmox", body = ErrorBody),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn clusters_patch(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let id = match parse_cluster_id(id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let mut subject = AuditSubject::lookup(&state.registry, id).await;
    let answer = change_cluster(&state, id, &headers, body).await;
    if let Ok(view) = &answer {
        subject = AuditSubject::of(view);
    }
    subject.tag(answer.map(Json))
}

async fn change_cluster(
    state: &AppState,
    id: ClusterId,
    headers: &HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<ClusterView, ApiError> {
    patch_media_type(headers)?;
    let Json(body) = body?;
    let patch = parse_patch(body)?;
    let registry = &state.registry;
    // Like a registration: the registry bounds the probe, and the disk decides the rest.
    answer_of(ractor::call!(registry, RegistryMsg::Patch, id, patch))
}

/// Check the cluster now, through its monitor, and answer with the Cluster after the check,
/// whatever it found: a failed check is a 200 whose body shows the failure. Requests that
/// overlap, and a check already in flight, share one check.
#[utoipa::path(post, path = "/api/v1/clusters/{id}/check", tag = "clusters",
    params(("id" = String, Path, format = Uuid, description = "Cluster id (UUID)")),
    responses(
        (status = 200, description = "The Cluster after the check (`status_reason`, \
            `last_error` show a failure)", body = ClusterView),
        (status = 404, description = "Cluster not found", body = ErrorBody),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn clusters_check(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match parse_cluster_id(id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let registry = &state.registry;
    // The registry answers within the check deadline.
    let answer = answer_of(ractor::call!(registry, RegistryMsg::CheckNow, id));
    let subject = match &answer {
        Ok(view) => AuditSubject::of(view),
        Err(_) => AuditSubject {
            id: Some(id),
            name: None,
        },
    };
    subject.tag(answer.map(Json))
}

/// A cluster's recent status transitions, newest first.
#[utoipa::path(get, path = "/api/v1/clusters/{id}/history", tag = "clusters",
    params(
        ("id" = String, Path, format = Uuid, description = "Cluster id (UUID)"),
        ("If-None-Match" = Option<String>, Header,
            description = "Tags from earlier answers (or `*`), compared weakly: 304 while \
                one of them is current."),
    ),
    responses(
        (status = 200, description = "Status transitions, newest first", body = HistoryList,
            headers(("ETag" = String, description = "Weak tag, `W/\"…\"`"))),
        (status = 304, description = "Not modified: `If-None-Match` names the current tag; \
            empty body", headers(("ETag" = String, description = "The current tag"))),
        (status = 400, description = "A query parameter: this endpoint takes none; \
            `details.field` names it", body = ErrorBody),
        (status = 404, description = "Cluster not found", body = ErrorBody),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn clusters_history(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    precondition: IfNoneMatch,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let id = parse_cluster_id(id)?;
    Parameters::parse(query, HISTORY_PARAMETERS)?;
    let registry = &state.registry;
    let history = call_t!(
        registry,
        RegistryMsg::ReadHistory,
        REGISTRY_CALL_TIMEOUT_MS,
        id
    )
    .map_err(registry_unavailable)?
    .ok_or(ApiError::ClusterNotFound)?;
    if precondition.matches(history.etag) {
        return Ok(not_modified(history.etag));
    }
    Ok(fresh(history))
}

/// The registry's answer to a write, or why it gave none.
fn answer_of<T>(
    reply: Result<Result<T, RegistryError>, RactorErr<RegistryMsg>>,
) -> Result<T, ApiError> {
    reply.map_err(registry_unavailable)?.map_err(ApiError::from)
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
        (None, Some(token_id), Some(secret)) => Ok(Credentials::Token {
            secret: self::token_secret(secret)?,
            token_id: TokenId::parse(token_id, &username)?,
            username,
        }),
    }
}

/// A token secret as Proxmox can take it: it travels in an Authorization header, which
/// Proxmox cuts at `;`.
fn token_secret(raw: &str) -> Result<Secret, ApiError> {
    if !raw.chars().all(|c| c.is_ascii_graphic() && c != ';') {
        return Err(ApiError::bad_request(
            "Token secret is invalid",
            json!({
                "field": "token_secret",
                "reason": "must be printable ASCII without spaces or ';' (Proxmox shows it as a UUID)",
            }),
        ));
    }
    Ok(Secret::new(raw))
}

/// The settings a `PATCH` may change.
const PATCH_FIELDS: &[&str] = &[
    "name",
    "api_endpoint",
    "username",
    "password",
    "token_id",
    "token_secret",
    "fingerprint",
];

/// A `PATCH` body, checked field by field with the rules of registration. What depends on
/// the stored settings (a token id without its secret, a pin on http) the registry checks.
fn parse_patch(body: Value) -> Result<ClusterPatch, ApiError> {
    let Value::Object(fields) = body else {
        return Err(ApiError::bad_request(
            "Request body must be a JSON object",
            json!({ "reason": format!("expected an object with any of {}", PATCH_FIELDS.join(", ")) }),
        ));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|key| !PATCH_FIELDS.contains(&key.as_str()))
    {
        return Err(ApiError::bad_request(
            format!("Unknown field {unknown}"),
            json!({
                "field": unknown,
                "reason": format!("not a setting; send any of {}", PATCH_FIELDS.join(", ")),
            }),
        ));
    }
    if let Some((field, _)) = fields
        .iter()
        .find(|(key, value)| value.is_null() && key.as_str() != "fingerprint")
    {
        return Err(ApiError::bad_request(
            format!("Field {field} must be a string"),
            json!({ "field": field, "reason": "only fingerprint may be null (to remove the pin)" }),
        ));
    }
    let non_empty = |field: &'static str, message: &str| -> Result<Option<&str>, ApiError> {
        match optional_string(&fields, field)? {
            Some("") => Err(ApiError::bad_request(
                message,
                json!({ "field": field, "reason": "must not be empty" }),
            )),
            other => Ok(other),
        }
    };
    let password = non_empty("password", "Password is required")?;
    let token_id = non_empty("token_id", "Token ID is required")?;
    let token_secret = non_empty("token_secret", "Token secret is required")?;
    if password.is_some() && (token_id.is_some() || token_secret.is_some()) {
        return Err(ApiError::bad_request(
            "Give either a password or an API token, not both",
            json!({
                "fields": ["password", "token_id", "token_secret"],
                "reason": "send password, or token_id and token_secret",
            }),
        ));
    }
    let fingerprint = match fields.get("fingerprint") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(_) => optional_string(&fields, "fingerprint")?
            .map(Fingerprint::parse)
            .transpose()?
            .map(Some),
    };
    Ok(ClusterPatch {
        name: optional_string(&fields, "name")?
            .map(ClusterName::parse)
            .transpose()?,
        endpoint: optional_string(&fields, "api_endpoint")?
            .map(Endpoint::parse)
            .transpose()?,
        username: optional_string(&fields, "username")?
            .map(ProxmoxUser::parse)
            .transpose()?,
        password: password.map(Secret::new),
        token_id: token_id.map(str::to_owned),
        token_secret: token_secret.map(self::token_secret).transpose()?,
        fingerprint,
    })
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
