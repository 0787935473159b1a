//! Cluster change events for `GET /api/v1/events`.
//!
//! The registry publishes every change here. Live subscribers read from a broadcast channel
//! whose ring buffer bounds each client: one that falls behind is cut off and told to re-list,
//! so a slow client never slows the registry. A bounded replay buffer lets a reconnecting
//! client resume from `Last-Event-ID`.

use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

/// How many recent events a reconnecting client can resume from.
const REPLAY_CAPACITY: usize = 1024;
/// How many events one client may fall behind before it is dropped.
pub const CLIENT_BUFFER: usize = 256;

/// What happened to a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Registered,
    Updated,
    Deregistered,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "cluster.registered",
            Self::Updated => "cluster.updated",
            Self::Deregistered => "cluster.deregistered",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterEvent {
    pub id: u64,
    pub kind: EventKind,
    /// The Cluster object, or `{"id": ...}` for a deregistration.
    pub data: Value,
}

/// What a new subscriber gets: the events it missed, then the live feed.
pub struct Subscription {
    pub replay: Vec<Arc<ClusterEvent>>,
    /// The client's `Last-Event-ID` is older than the replay buffer: it must re-list.
    pub gap: bool,
    pub live: broadcast::Receiver<Arc<ClusterEvent>>,
}

pub struct EventHub {
    next_id: u64,
    recent: VecDeque<Arc<ClusterEvent>>,
    sender: broadcast::Sender<Arc<ClusterEvent>>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}

impl EventHub {
    pub fn new() -> Self {
        // Ids start from the clock, so they keep increasing across restarts and an id from
        // before a restart reads as a gap rather than as a position in the new sequence.
        let start = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(1);
        let (sender, _) = broadcast::channel(CLIENT_BUFFER);
        Self {
            next_id: start,
            recent: VecDeque::with_capacity(REPLAY_CAPACITY),
            sender,
        }
    }

    pub fn publish(&mut self, kind: EventKind, data: Value) {
        let event = Arc::new(ClusterEvent {
            id: self.next_id,
            kind,
            data,
        });
        self.next_id += 1;
        if self.recent.len() == REPLAY_CAPACITY {
            self.recent.pop_front();
        }
        self.recent.push_back(event.clone());
        // No subscriber is not an error.
        let _ = self.sender.send(event);
    }

    /// Subscribes, replaying what came after `last_event_id`. Called inside the registry, so
    /// no event falls between the replay and the live feed.
    pub fn subscribe(&self, last_event_id: Option<u64>) -> Subscription {
        let live = self.sender.subscribe();
        let Some(last) = last_event_id else {
            return Subscription {
                replay: Vec::new(),
                gap: false,
                live,
            };
        };
        let oldest_kept = self.recent.front().map_or(self.next_id, |e| e.id);
        // Everything after `last` must still be buffered, and `last` must be one we issued.
        let gap = last.saturating_add(1) < oldest_kept || last >= self.next_id;
        let replay = if gap {
            Vec::new()
        } else {
            self.recent
                .iter()
                .filter(|e| e.id > last)
                .cloned()
                .collect()
        };
        Subscription { replay, gap, live }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resuming_replays_only_what_came_after() {
        let mut hub = EventHub::new();
        hub.publish(EventKind::Registered, json!({"n": 1}));
        let first = hub.recent[0].id;
        hub.publish(EventKind::Updated, json!({"n": 2}));
        hub.publish(EventKind::Deregistered, json!({"n": 3}));
        let sub = hub.subscribe(Some(first));
        assert!(!sub.gap);
        let ids: Vec<u64> = sub.replay.iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![first + 1, first + 2]);
        assert!(hub.subscribe(Some(first + 2)).replay.is_empty());
        assert!(!hub.subscribe(Some(first + 2)).gap);
    }

    #[test]
    fn an_id_older_than_the_buffer_is_a_gap() {
        let mut hub = EventHub::new();
        let before = hub.next_id;
        for n in 0..(REPLAY_CAPACITY + 10) {
            hub.publish(EventKind::Updated, json!({ "n": n }));
        }
        assert!(hub.subscribe(Some(before)).gap);
        assert!(hub.subscribe(Some(1)).gap);
        assert!(hub.subscribe(Some(u64::MAX - 1)).gap, "an id never issued");
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_it_lagged() {
        let mut hub = EventHub::new();
        let mut sub = hub.subscribe(None);
        for n in 0..(CLIENT_BUFFER + 1) {
            hub.publish(EventKind::Updated, json!({ "n": n }));
        }
        assert!(matches!(
            sub.live.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
    }
}
