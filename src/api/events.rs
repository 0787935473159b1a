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
/// The header a reconnecting client names the last event it received with.
const LAST_EVENT_ID: &str = "last-event-id";
/// The event that tells a client its view may be incomplete and it should list again.
const RESYNC: &str = "resync";

/// A stream of `cluster.registered`, `cluster.updated` and `cluster.deregistered` events.
/// Send `Last-Event-ID` to resume; a `resync` event means events were lost: list again.
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    params(("Last-Event-ID" = Option<u64>, Header,
        description = "Resume after this event id: the `id` of the last event received. An id \
            that is not a whole number from 0 to 18446744073709551615 is refused; one that was \
            never issued, or is no longer buffered, starts the stream with `resync`.")),
    responses(
        (status = 200, description = "Server-sent events, each a ClusterEvent: `event`, `id` \
            and JSON `data`", content_type = "text/event-stream",
            body = ref("#/components/schemas/ClusterEvent")),
        (status = 400, description = "Last-Event-ID is not an event id; `details.field` names it",
            body = ErrorBody),
        (status = 503, description = "The registry did not answer", body = ErrorBody),
    ))]
pub(super) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let last_event_id = headers
        .get(LAST_EVENT_ID)
        .map(|value| parse_event_id(value.as_bytes()))
        .transpose()?;
    let registry = &state.registry;
    let subscription = call_t!(
        registry,
        RegistryMsg::Subscribe,
        REGISTRY_CALL_TIMEOUT_MS,
        last_event_id
    )
    .map_err(registry_unavailable)?;

    let mut pending = VecDeque::new();
    if subscription.gap {
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

/// An event id as this server writes them: decimal digits of an unsigned 64-bit number. Anything
/// else is no id a client could have received, so it is refused rather than guessed at.
fn parse_event_id(raw: &[u8]) -> Result<u64, ApiError> {
    std::str::from_utf8(raw)
        .ok()
        .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "Last-Event-ID is invalid",
                json!({
                    "field": "Last-Event-ID",
                    "reason": format!(
                        "must be the id of an event, a whole number from 0 to {}",
                        u64::MAX
                    ),
                }),
            )
        })
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
