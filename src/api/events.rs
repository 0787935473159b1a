//! `GET /api/v1/events`: cluster changes as server-sent events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use ractor::call_t;
use serde_json::json;
use tokio::sync::{broadcast, watch};

use super::openapi::ErrorBody;
use super::{ApiError, AppState, REGISTRY_CALL_TIMEOUT_MS, registry_unavailable};
use crate::events::{CLIENT_BUFFER, ClusterEvent};
use crate::registry::RegistryMsg;

/// Proxies commonly cut connections idle for 60 s; a comment well within that keeps them.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The event that tells a client its view may be incomplete and it should list again.
const RESYNC: &str = "resync";

/// A stream of `cluster.registered`, `cluster.updated` and `cluster.deregistered` events.
/// Send `Last-Event-ID` to resume; a `resync` event means events were lost: list again.
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    params(("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id")),
    responses(
        (status = 200, description = "Server-sent events; each `data` is a Cluster object \
            (or `{\"id\"}` for cluster.deregistered)", content_type = "text/event-stream", body = String),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // An id we cannot read is one we never issued: the client must re-list, not silently
    // miss events.
    let (last_event_id, unreadable_id) = match headers.get("last-event-id") {
        None => (None, false),
        Some(value) => match value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(id) => (Some(id), false),
            None => (None, true),
        },
    };
    let registry = &state.registry;
    let subscription = call_t!(
        registry,
        RegistryMsg::Subscribe,
        REGISTRY_CALL_TIMEOUT_MS,
        last_event_id
    )
    .map_err(registry_unavailable)?;

    let mut pending = VecDeque::new();
    if subscription.gap || unreadable_id {
        pending.push_back(resync(
            "the events after Last-Event-ID are no longer buffered; list the clusters again",
        ));
    }
    pending.extend(subscription.replay.iter().map(|e| to_sse(e)));
    let feed = Feed {
        pending,
        live: subscription.live,
        shutdown: state.shutdown.clone(),
        finished: false,
    };
    Ok(
        Sse::new(stream::unfold(feed, Feed::next))
            .keep_alive(KeepAlive::new().interval(KEEP_ALIVE)),
    )
}

struct Feed {
    pending: VecDeque<Event>,
    live: broadcast::Receiver<Arc<ClusterEvent>>,
    shutdown: watch::Receiver<bool>,
    finished: bool,
}

impl Feed {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        if let Some(event) = self.pending.pop_front() {
            return Some((Ok(event), self));
        }
        if self.finished {
            return None;
        }
        let Self {
            live,
            shutdown,
            finished,
            ..
        } = &mut self;
        let event = tokio::select! {
            received = live.recv() => match received {
                Ok(event) => to_sse(&event),
                // The client could not keep up: rather than buffer without bound, close its
                // stream after telling it to list again.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    *finished = true;
                    resync(&format!(
                        "this client fell {missed} events behind (the limit is {CLIENT_BUFFER}); \
                         list the clusters again and reconnect"
                    ))
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            },
            _ = shutdown.wait_for(|stop| *stop) => return None,
        };
        Some((Ok(event), self))
    }
}

fn to_sse(event: &ClusterEvent) -> Event {
    Event::default()
        .id(event.id.to_string())
        .event(event.kind.as_str())
        .data(event.data.to_string())
}

fn resync(reason: &str) -> Event {
    Event::default()
        .event(RESYNC)
        .data(json!({ "reason": reason }).to_string())
}
