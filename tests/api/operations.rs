//! What an operator runs the daemon with: the server-sent event stream, status history,
//! Prometheus metrics, the OpenAPI document, request ids, JSON logs, systemd notifications and
//! the command-line subcommands.
//!
//! Monitors check every 100 ms so changes show up fast. Conditions are awaited with bounded
//! polling, and every read of an event stream or of the notify socket is bounded by [`WAIT`];
//! nothing here sleeps for a fixed time or asserts on how long something took. (One test waits
//! for the daemon's own timestamps to pass its 2 s flush interval before crashing it.)

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::{Value, json};
use tokio::net::UnixDatagram;

use crate::fake_pve::FakePve;
use crate::helpers::{
    STATUS_PATH, TestApp, WAIT, fake_pve, fast_daemon, fetch_cluster, history, id_of, json_of,
    register_body, register_fake, register_fake_id, wait_for_cluster, wait_for_member_probes,
    wait_until,
};
use crate::helpers::{describe, proxmoxer_command};

/// Waits until the fake has answered `checks` more cluster-status calls, i.e. the monitor has
/// run that many more checks.
async fn wait_for_checks(fake: &FakePve, checks: u64) {
    let start = fake.requests(STATUS_PATH);
    let held = wait_until(async || fake.requests(STATUS_PATH) >= start + checks, WAIT).await;
    assert!(held, "the monitor did not run {checks} more checks");
}

/// Asserts the `{"code","message","details"}` error shape.
fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, message: &str) {
    assert_eq!(status, expected, "{body}");
    let code: String = expected
        .canonical_reason()
        .expect("a standard status")
        .split_whitespace()
        .collect();
    assert_eq!(body["code"], code.as_str(), "{body}");
    assert_eq!(body["message"], message, "{body}");
    assert!(
        body.as_object().is_some_and(|o| o.contains_key("details")),
        "{body}"
    );
}

// --- server-sent events -------------------------------------------------------------------------

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

impl SseEvent {
    fn kind(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {self:?}"))
    }

    /// The numeric `id:`; every cluster event must carry one.
    fn number(&self) -> u64 {
        self.id
            .as_deref()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("the event has no numeric id: {self:?}"))
    }
}

/// A client of `GET /api/v1/events` that parses the stream as it arrives.
struct EventStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl EventStream {
    /// Connects, optionally resuming after `last_event_id`. Once this returns, the daemon has
    /// subscribed this client: it answers only after subscribing.
    async fn connect(app: &TestApp, last_event_id: Option<&str>) -> Self {
        // Not the app's client: its whole-request timeout would cut a long stream.
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("build the event stream client");
        let mut request = client
            .get(app.api_url("/events"))
            .header(ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("the event stream answers within WAIT")
            .expect("GET /api/v1/events");
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "content type {content_type:?}"
        );
        Self {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next event, skipping comments such as keep-alives; `None` once the server has ended
    /// the stream. Panics if nothing arrives within [`WAIT`].
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(block) = self.take_block() {
                if let Some(event) = parse_event(&block) {
                    return Some(event);
                }
            }
            let chunk = tokio::time::timeout(WAIT, self.response.chunk())
                .await
                .unwrap_or_else(|_| panic!("no event within {WAIT:?}"))
                .expect("read the event stream");
            match chunk {
                Some(bytes) => self.buffer.extend(bytes.iter().filter(|b| **b != b'\r')),
                None => {
                    let rest = String::from_utf8_lossy(&self.buffer);
                    assert!(
                        rest.trim().is_empty(),
                        "the stream ended mid-event: {rest:?}"
                    );
                    return None;
                }
            }
        }
    }

    /// The next event, which must be of `kind`.
    async fn expect(&mut self, kind: &str) -> SseEvent {
        let event = self
            .next()
            .await
            .unwrap_or_else(|| panic!("the stream ended while waiting for {kind}"));
        assert_eq!(event.kind(), kind, "{event:?}");
        event
    }

    /// Right after a registration the monitor probes the members no check used, and their
    /// reachability is an update of its own: reads up to it, so the next event is what the
    /// test caused. Returns that update.
    async fn skip_member_probes(&mut self) -> SseEvent {
        loop {
            let event = self.expect("cluster.updated").await;
            let probed = event.json()["members"]
                .as_array()
                .is_some_and(|members| members.iter().all(|m| !m["reachable"].is_null()));
            if probed {
                return event;
            }
        }
    }

    /// The next event of `kind`, reading past updates: member probes publish some on their own
    /// timing.
    async fn expect_past_updates(&mut self, kind: &str) -> SseEvent {
        loop {
            let event = self.expect_some().await;
            if event.kind() == kind {
                return event;
            }
            assert_eq!(event.kind(), "cluster.updated", "{event:?}");
        }
    }

    /// The next update that satisfies `condition`, reading past others.
    async fn expect_update(&mut self, condition: impl Fn(&Value) -> bool) -> SseEvent {
        loop {
            let event = self.expect("cluster.updated").await;
            if condition(&event.json()) {
                return event;
            }
        }
    }

    /// Whether the stream ends after nothing but updates.
    async fn ends_past_updates(&mut self) -> bool {
        while let Some(event) = self.next().await {
            if event.kind() != "cluster.updated" {
                return false;
            }
        }
        true
    }

    async fn expect_some(&mut self) -> SseEvent {
        self.next().await.expect("the stream goes on")
    }

    /// A complete block (up to a blank line), if one is buffered.
    fn take_block(&mut self) -> Option<String> {
        let end = self.buffer.windows(2).position(|w| w == b"\n\n")?;
        let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
        Some(String::from_utf8(block).expect("the event stream is UTF-8"))
    }
}

/// The event a block dispatches, or `None` for a comment-only block.
fn parse_event(block: &str) -> Option<SseEvent> {
    let mut id = None;
    let mut event = None;
    let mut data: Vec<&str> = Vec::new();
    for line in block
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with(':'))
    {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_owned()),
            "event" => event = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    (id.is_some() || event.is_some() || !data.is_empty()).then(|| SseEvent {
        id,
        event,
        data: data.join("\n"),
    })
}

fn assert_increasing(events: &[&SseEvent]) {
    let ids: Vec<u64> = events.iter().map(|e| e.number()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "event ids strictly increase: {ids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_sees_a_cluster_registered_degraded_and_deregistered() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let mut stream = EventStream::connect(&app, None).await;

    // Refused registrations publish nothing: the first event is the one that succeeds.
    let mut wrong = register_body(&fake, "events");
    wrong["password"] = json!("not-the-password");
    assert_eq!(
        app.post_clusters(&wrong).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let created = register_fake(&app, &fake, "events").await;
    let id = id_of(&created);
    let registered = stream.expect("cluster.registered").await;
    assert_eq!(
        registered.json(),
        created,
        "the data is the Cluster object the registration returned"
    );
    let probed = stream.skip_member_probes().await;

    // Checks that change nothing shown publish nothing: the next event is the degradation.
    wait_for_checks(&fake, 3).await;
    fake.set_node_online("pve3", false);
    let updated = stream.expect("cluster.updated").await;
    let data = updated.json();
    assert_eq!(data["id"], id.as_str(), "{data}");
    assert_eq!(data["status"], "degraded", "{data}");
    assert_eq!(data["status_reason"], "node_offline", "{data}");
    assert_eq!(data["nodes_online"], 2, "{data}");
    assert_eq!(data["name"], "events", "{data}");

    let response = app.delete_cluster(&id).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let deregistered = stream.expect("cluster.deregistered").await;
    assert_eq!(deregistered.json(), json!({ "id": id }));

    assert_increasing(&[&registered, &probed, &updated, &deregistered]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resuming_with_last_event_id_gets_what_it_missed_then_live_events() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let mut stream = EventStream::connect(&app, None).await;
    let id = register_fake_id(&app, &fake, "resume").await;
    stream.expect("cluster.registered").await;
    let first = stream.skip_member_probes().await;
    wait_for_checks(&fake, 1).await;
    fake.set_node_online("pve2", false);
    // Everything published after `first`, whatever a busy machine adds in between, up to the
    // degradation and then the deregistration.
    let mut missed = Vec::new();
    loop {
        let event = stream.expect_some().await;
        let degraded = event.kind() == "cluster.updated" && event.json()["status"] == "degraded";
        missed.push(event);
        if degraded {
            break;
        }
    }
    assert_eq!(
        app.delete_cluster(&id).await.status(),
        StatusCode::NO_CONTENT
    );
    loop {
        let event = stream.expect_some().await;
        let deregistered = event.kind() == "cluster.deregistered";
        missed.push(event);
        if deregistered {
            break;
        }
    }
    drop(stream);

    let first_id = first.id.clone().expect("an id");
    let mut resumed = EventStream::connect(&app, Some(&first_id)).await;
    for expected in &missed {
        assert_eq!(
            resumed.next().await.as_ref(),
            Some(expected),
            "the replay starts right after Last-Event-ID and repeats what was published"
        );
    }
    let third = missed.last().cloned().expect("the deregistration");
    let second = missed[0].clone();
    // Then the live feed, with ids still increasing.
    fake.set_node_online("pve2", true);
    let again = register_fake(&app, &fake, "resume").await;
    let live = resumed.expect("cluster.registered").await;
    assert_eq!(live.json(), again);
    assert_increasing(&[&first, &second, &third, &live]);

    // Resuming from the newest event replays nothing.
    let newest = live.id.clone().expect("an id");
    let mut caught_up = EventStream::connect(&app, Some(&newest)).await;
    assert_eq!(
        app.delete_cluster(id_of(&again)).await.status(),
        StatusCode::NO_CONTENT
    );
    let next = caught_up.expect_past_updates("cluster.deregistered").await;
    assert_eq!(next.json(), json!({ "id": id_of(&again) }));
    assert_increasing(&[&live, &next]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_event_id_that_was_never_issued_gets_a_resync_first() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;

    let mut stream = EventStream::connect(&app, Some("1")).await;
    let resync = stream.expect("resync").await;
    let reason = resync.json()["reason"].clone();
    assert!(
        reason.as_str().is_some_and(|r| !r.is_empty()),
        "resync says why in a JSON reason: {resync:?}"
    );
    // The stream goes on with live events.
    let created = register_fake(&app, &fake, "resync").await;
    let registered = stream.expect("cluster.registered").await;
    assert_eq!(registered.json(), created);

    // An id from the future was never issued either.
    let future = (registered.number() + 1_000).to_string();
    let mut stream = EventStream::connect(&app, Some(&future)).await;
    stream.expect("resync").await;
    assert_eq!(
        app.delete_cluster(id_of(&created)).await.status(),
        StatusCode::NO_CONTENT
    );
    stream.expect_past_updates("cluster.deregistered").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_event_id_that_is_not_an_event_id_is_refused() {
    let app = fast_daemon().spawn().await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("build a client");
    for not_an_id in [
        "not-a-number",
        "18446744073709551616",
        "-5",
        "+5",
        "1.0",
        "",
    ] {
        let response = client
            .get(app.api_url("/events"))
            .header(ACCEPT, "text/event-stream")
            .header("Last-Event-ID", not_an_id)
            .send()
            .await
            .expect("GET /api/v1/events");
        let (status, body) = json_of(response).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{not_an_id:?}: {body}");
        assert_eq!(body["code"], "BadRequest", "{body}");
        assert_eq!(body["message"], "Last-Event-ID is invalid", "{body}");
        assert_eq!(body["details"]["field"], "Last-Event-ID", "{body}");
    }
    // The largest id is one, even if it was never issued: a resync, not an error.
    let mut stream = EventStream::connect(&app, Some(&u64::MAX.to_string())).await;
    stream.expect("resync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_is_sent_when_a_shown_field_changes_while_the_status_stays() {
    let fake = fake_pve().await;
    let nodes = ["pve1", "pve2", "pve3", "pve4", "pve5"];
    fake.set_cluster("big", &nodes.map(|n| (n, true)));
    let app = fast_daemon().spawn().await;
    let mut stream = EventStream::connect(&app, None).await;
    let id = register_fake_id(&app, &fake, "five-nodes").await;
    let registered = stream.expect("cluster.registered").await;
    stream.skip_member_probes().await;

    fake.set_node_online("pve5", false);
    let one_down = stream.expect("cluster.updated").await;
    assert_eq!(one_down.json()["status"], "degraded");
    assert_eq!(one_down.json()["nodes_online"], 4);

    // Still quorate (3 of 5) and still degraded: only nodes_online changes.
    fake.set_node_online("pve4", false);
    let two_down = stream.expect("cluster.updated").await;
    let data = two_down.json();
    assert_eq!(data["id"], id.as_str(), "{data}");
    assert_eq!(data["status"], "degraded", "{data}");
    assert_eq!(data["nodes_online"], 3, "{data}");
    assert_eq!(data["quorate"], true, "{data}");

    // A failure below the threshold keeps the status but shows last_error.
    fake.fail_all(Some((500, "cluster not ready - no quorum?")));
    let failing = stream.expect("cluster.updated").await;
    let data = failing.json();
    assert_eq!(data["status"], "degraded", "{data}");
    assert!(
        data["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{data}"
    );
    let mut events = vec![registered, one_down, two_down, failing];
    loop {
        let next = stream.expect("cluster.updated").await;
        let unhealthy = next.json()["status"] == "unhealthy";
        events.push(next);
        if unhealthy {
            break;
        }
    }
    assert_increasing(&events.iter().collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_an_old_last_event_id_gets_a_resync_and_new_ids_are_larger() {
    let fake = fake_pve().await;
    let mut app = fast_daemon().spawn().await;
    let mut stream = EventStream::connect(&app, None).await;
    let id = register_fake_id(&app, &fake, "restarted").await;
    let before = stream.expect("cluster.registered").await;
    drop(stream);

    app.restart().await;
    wait_for_cluster(&app, &id, "healthy after the restart", |c| {
        c["status"] == "healthy"
    })
    .await;
    let old_id = before.id.clone().expect("an id");
    let mut stream = EventStream::connect(&app, Some(&old_id)).await;
    stream.expect("resync").await;
    fake.set_node_online("pve3", false);
    let after = stream.expect_update(|c| c["status"] == "degraded").await;
    assert_increasing(&[&before, &after]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_event_streams_and_the_daemon_exits_cleanly() {
    let fake = fake_pve().await;
    // A grace period far beyond the harness's shutdown timeout: a stream holding shutdown open
    // would make `terminate` fail instead of the daemon giving up on it.
    let mut app = fast_daemon()
        .config_toml("[server]\nshutdown_grace = \"10m\"\n")
        .spawn()
        .await;
    let mut stream = EventStream::connect(&app, None).await;
    let mut idle = EventStream::connect(&app, None).await;
    register_fake(&app, &fake, "sigterm").await;
    stream.expect("cluster.registered").await;

    let status = app.terminate().await;
    assert!(status.success(), "exit status {status}");
    assert!(
        stream.ends_past_updates().await,
        "the stream ends on shutdown"
    );
    // The other stream still holds its undelivered event, then ends.
    idle.expect("cluster.registered").await;
    assert!(idle.ends_past_updates().await);
    assert!(
        !app.logs().contains("grace period over"),
        "shutdown waited for the grace period:\n{}",
        app.logs()
    );
}

// --- status history -----------------------------------------------------------------------------

/// The transitions of a 200 history, checking the envelope and each entry's shape.
async fn transitions(app: &TestApp, id: &str) -> Vec<Value> {
    let (status, body) = history(app, id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let list = body["transitions"]
        .as_array()
        .unwrap_or_else(|| panic!("transitions is an array: {body}"))
        .clone();
    assert_eq!(body["total"], list.len(), "{body}");
    for transition in &list {
        let keys: BTreeSet<&str> = transition
            .as_object()
            .unwrap_or_else(|| panic!("a transition is an object: {transition}"))
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["at", "from", "to", "reason", "error"]),
            "{transition}"
        );
        let at = transition["at"].as_str().unwrap_or_default();
        assert!(
            chrono::DateTime::parse_from_rfc3339(at).is_ok(),
            "at is RFC 3339: {transition}"
        );
    }
    let times: Vec<&str> = list.iter().filter_map(|t| t["at"].as_str()).collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {body}"
    );
    list
}

/// `(from, to, reason)` of each transition.
fn steps(transitions: &[Value]) -> Vec<(String, String, String)> {
    transitions
        .iter()
        .map(|t| {
            let text = |key: &str| t[key].as_str().unwrap_or_default().to_owned();
            (text("from"), text("to"), text("reason"))
        })
        .collect()
}

fn step(from: &str, to: &str, reason: &str) -> (String, String, String) {
    (from.to_owned(), to.to_owned(), reason.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_records_registration_and_status_changes_and_survives_a_restart() {
    let fake = fake_pve().await;
    let mut app = fast_daemon().spawn().await;
    let created = register_fake(&app, &fake, "history").await;
    let id = id_of(&created);

    let first = transitions(&app, &id).await;
    assert_eq!(steps(&first), vec![step("unknown", "healthy", "ok")]);
    assert_eq!(first[0]["at"], created["created_at"], "{first:?}");
    assert_eq!(first[0]["error"], Value::Null);

    fake.set_node_online("pve3", false);
    let mut seen = Vec::new();
    let changed = wait_until(
        async || {
            seen = transitions(&app, &id).await;
            seen.len() >= 2
        },
        WAIT,
    )
    .await;
    assert!(
        changed,
        "no transition for the node going offline: {seen:?}"
    );
    assert_eq!(
        steps(&seen),
        vec![
            step("healthy", "degraded", "node_offline"),
            step("unknown", "healthy", "ok"),
        ]
    );
    assert_eq!(seen[1], first[0], "older entries stay as they were");

    app.restart().await;
    let after = wait_for_cluster(&app, &id, "degraded after the restart", |c| {
        c["status"] == "degraded"
    })
    .await;
    let kept = transitions(&app, &id).await;
    assert!(
        kept.len() >= 2 && kept[kept.len() - 2..] == seen[..],
        "the transitions from before the restart are kept: before {seen:?}, after {kept:?}"
    );
    assert_eq!(kept[0]["to"], "degraded", "{after}; {kept:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_is_in_the_history_even_after_a_crash() {
    let fake = fake_pve().await;
    let mut app = fast_daemon().spawn().await;
    let created = register_fake(&app, &fake, "crash").await;
    let id = id_of(&created);
    app.kill9().await;
    app.restart().await;

    let list = transitions(&app, &id).await;
    let oldest = list
        .last()
        .unwrap_or_else(|| panic!("no history: {list:?}"));
    assert_eq!(
        steps(std::slice::from_ref(oldest)),
        vec![step("unknown", "healthy", "ok")]
    );
    assert_eq!(oldest["at"], created["created_at"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_change_survives_a_crash_once_the_flush_interval_has_passed() {
    let fake = fake_pve().await;
    let mut app = fast_daemon().spawn().await;
    let id = register_fake_id(&app, &fake, "flushed").await;
    fake.set_node_online("pve3", false);
    let degraded = wait_for_cluster(&app, &id, "degraded", |c| c["status"] == "degraded").await;
    let before = transitions(&app, &id).await;
    assert_eq!(before.len(), 2, "{before:?}");

    // The registry writes changes every 2 s. Wait until the daemon's own clock shows a check
    // more than 3 s after the change (timestamps have whole seconds), then crash it.
    let changed_at =
        chrono::DateTime::parse_from_rfc3339(degraded["updated_at"].as_str().expect("updated_at"))
            .expect("RFC 3339");
    wait_for_cluster(&app, &id, "a check 4 s after the change", |c| {
        c["last_checked_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| t - changed_at >= chrono::TimeDelta::seconds(4))
    })
    .await;
    app.kill9().await;
    app.restart().await;

    let after = transitions(&app, &id).await;
    assert!(
        after.len() >= 2 && after[after.len() - 2..] == before[..],
        "the change made before the crash is kept: before {before:?}, after {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_of_an_unknown_or_deleted_cluster_is_not_found_and_a_new_one_starts_fresh() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;

    for id in [uuid::Uuid::new_v4().to_string(), "not-a-uuid".to_owned()] {
        let (status, body) = history(&app, &id).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "Cluster not found");
    }

    let old = register_fake_id(&app, &fake, "reused").await;
    fake.set_node_online("pve3", false);
    wait_for_cluster(&app, &old, "degraded", |c| c["status"] == "degraded").await;
    assert_eq!(transitions(&app, &old).await.len(), 2);
    assert_eq!(
        app.delete_cluster(&old).await.status(),
        StatusCode::NO_CONTENT
    );
    let (status, body) = history(&app, &old).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "Cluster not found");

    fake.set_node_online("pve3", true);
    let new = register_fake_id(&app, &fake, "reused").await;
    assert_ne!(new, old);
    assert_eq!(
        steps(&transitions(&app, &new).await),
        vec![step("unknown", "healthy", "ok")],
        "a cluster registered again under the same name starts a fresh history"
    );
}

// --- metrics ------------------------------------------------------------------------------------

/// One sample of the text exposition format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses every sample line, unescaping label values; panics on a malformed line.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let malformed = || -> ! { panic!("malformed exposition line: {line:?}") };
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| malformed());
        let name = line[..name_end].to_owned();
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after_brace) = rest.strip_prefix('{') {
            let mut chars = after_brace.char_indices().peekable();
            loop {
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    malformed();
                }
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(c @ ('\\' | '"')) => value.push(c),
                            _ => malformed(),
                        },
                        Some('"') => break,
                        Some(c) => value.push(c),
                        None => malformed(),
                    }
                }
                labels.insert(key, value);
                match chars.next() {
                    Some((_, ',')) if chars.peek().map(|(_, c)| *c) == Some('}') => {
                        let (at, _) = chars.next().unwrap_or_else(|| malformed());
                        rest = &after_brace[at + 1..];
                        break;
                    }
                    Some((_, ',')) => {}
                    Some((at, '}')) => {
                        rest = &after_brace[at + 1..];
                        break;
                    }
                    _ => malformed(),
                }
            }
        }
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| malformed());
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// A scrape of `/metrics`: the raw text and its samples.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    /// Samples of `name` whose labels include every one of `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample of `name` with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.find(name, labels)
            .into_iter()
            .find(|s| s.labels.len() == labels.len())
            .map(|s| s.value)
    }

    fn expect(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in the scrape:\n{}", self.text))
    }
}

async fn scrape(app: &TestApp) -> Scrape {
    let response = app
        .client
        .get(format!("{}/metrics", app.base_url()))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain"),
        "content type {content_type:?}"
    );
    let text = response.text().await.expect("read /metrics");
    let samples = parse_exposition(&text);
    Scrape { text, samples }
}

/// Scrapes until `condition` holds on a scrape and returns it; panics after [`WAIT`].
async fn wait_for_scrape(
    app: &TestApp,
    what: &str,
    mut condition: impl FnMut(&Scrape) -> bool,
) -> Scrape {
    let mut last = None;
    let held = wait_until(
        async || {
            let current = scrape(app).await;
            let done = condition(&current);
            last = Some(current);
            done
        },
        WAIT,
    )
    .await;
    let last = last.expect("scraped at least once");
    assert!(
        held,
        "timed out waiting for {what}; last scrape:\n{}",
        last.text
    );
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_cluster_gauges_checks_logins_and_requests_by_route_template() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let a = register_fake_id(&app, &fake, "metrics-a").await;
    let odd_name = r#"say "hi" \ bye"#;
    let b = register_fake_id(&app, &fake, odd_name).await;
    fetch_cluster(&app, &a).await;
    let (status, _) = history(&app, &a).await;
    assert_eq!(status, StatusCode::OK);
    let mut wrong = register_body(&fake, "metrics-wrong-password");
    wrong["password"] = json!("not-the-password");
    let (status, _) = json_of(app.post_clusters(&wrong).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let unrouted = uuid::Uuid::new_v4().to_string();
    let response = app
        .client
        .get(app.api_url(&format!("/no-such-route/{unrouted}")))
        .send()
        .await
        .expect("GET an unknown route");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let m = wait_for_scrape(&app, "checks by both monitors", |m| {
        m.value("proxmoxer_check_duration_seconds_count", &[])
            .is_some_and(|n| n >= 2.0)
    })
    .await;

    assert_eq!(
        m.expect("proxmoxer_clusters", &[("status", "healthy")]),
        2.0
    );
    for status in ["degraded", "unhealthy", "unknown"] {
        assert_eq!(m.expect("proxmoxer_clusters", &[("status", status)]), 0.0);
    }
    for (id, name) in [(&a, "metrics-a"), (&b, odd_name)] {
        let who = [("id", id.as_str()), ("name", name)];
        let with = |extra: (&'static str, &'static str)| {
            let mut labels = who.to_vec();
            labels.push(extra);
            labels
        };
        assert_eq!(
            m.expect("proxmoxer_cluster_status", &with(("status", "healthy"))),
            1.0
        );
        assert_eq!(
            m.expect("proxmoxer_cluster_status", &with(("status", "degraded"))),
            0.0
        );
        assert_eq!(m.expect("proxmoxer_cluster_nodes", &who), 3.0);
        assert_eq!(m.expect("proxmoxer_cluster_nodes_online", &who), 3.0);
        let since = m.expect("proxmoxer_cluster_seconds_since_last_success", &who);
        assert!(since >= 0.0, "{since}");
    }
    assert!(
        m.text.contains(r#"name="say \"hi\" \\ bye""#),
        "label values escape quotes and backslashes:\n{}",
        m.text
    );

    assert!(
        !m.find("proxmoxer_check_duration_seconds_bucket", &[("le", "+Inf")])
            .is_empty(),
        "{}",
        m.text
    );
    assert!(
        m.expect(
            "proxmoxer_proxmox_logins_total",
            &[("kind", "login"), ("outcome", "success")]
        ) >= 2.0
    );
    assert!(
        m.expect(
            "proxmoxer_proxmox_logins_total",
            &[("kind", "login"), ("outcome", "rejected")]
        ) >= 1.0
    );

    let requests = "proxmoxer_http_requests_total";
    let post = |status| {
        [
            ("method", "POST"),
            ("route", "/api/v1/clusters"),
            ("status", status),
        ]
    };
    assert_eq!(m.expect(requests, &post("201")), 2.0);
    assert_eq!(m.expect(requests, &post("401")), 1.0);
    let get = |route, status| [("method", "GET"), ("route", route), ("status", status)];
    assert!(m.expect(requests, &get("/api/v1/clusters/{id}", "200")) >= 1.0);
    assert!(m.expect(requests, &get("/api/v1/clusters/{id}/history", "200")) >= 1.0);
    assert!(
        !m.find(
            "proxmoxer_http_request_duration_seconds_bucket",
            &[("method", "POST"), ("route", "/api/v1/clusters")]
        )
        .is_empty(),
        "{}",
        m.text
    );
    let concrete: Vec<&Sample> = m
        .samples
        .iter()
        .filter(|s| {
            s.labels
                .get("route")
                .is_some_and(|r| r.contains(a.as_str()) || r.contains(&unrouted))
        })
        .collect();
    assert!(
        concrete.is_empty(),
        "routes are labelled by template, never by concrete path: {concrete:?}"
    );

    // A node going offline shows in the gauges.
    fake.set_node_online("pve3", false);
    let m = wait_for_scrape(&app, "both clusters degraded", |m| {
        m.value("proxmoxer_clusters", &[("status", "degraded")]) == Some(2.0)
    })
    .await;
    let who = [("id", a.as_str()), ("name", "metrics-a")];
    assert_eq!(m.expect("proxmoxer_cluster_nodes_online", &who), 2.0);
    assert_eq!(
        m.expect(
            "proxmoxer_cluster_status",
            &[("id", &a), ("name", "metrics-a"), ("status", "degraded")]
        ),
        1.0
    );

    // A deleted cluster's series go with it.
    assert_eq!(
        app.delete_cluster(&a).await.status(),
        StatusCode::NO_CONTENT
    );
    let m = scrape(&app).await;
    let left: Vec<&Sample> = m
        .samples
        .iter()
        .filter(|s| s.labels.get("id") == Some(&a))
        .collect();
    assert!(left.is_empty(), "series of a deleted cluster: {left:?}");
    assert_eq!(
        m.expect("proxmoxer_clusters", &[("status", "degraded")]),
        1.0
    );
    assert_eq!(
        m.expect(
            "proxmoxer_cluster_nodes",
            &[("id", b.as_str()), ("name", odd_name)]
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quorum_gauge_follows_proxmox_and_is_absent_for_a_standalone_node() {
    let fake = fake_pve().await;
    let standalone = fake_pve().await;
    standalone.set_standalone("solo");
    let app = fast_daemon().spawn().await;
    let id = register_fake_id(&app, &fake, "quorum").await;
    let solo = register_fake_id(&app, &standalone, "solo").await;
    let who = [("id", id.as_str()), ("name", "quorum")];

    let m = wait_for_scrape(&app, "the cluster quorate", |m| {
        m.value("proxmoxer_cluster_quorate", &who) == Some(1.0)
    })
    .await;
    assert_eq!(
        m.expect(
            "proxmoxer_cluster_status",
            &[("id", &solo), ("name", "solo"), ("status", "healthy")]
        ),
        1.0,
        "the standalone node has been checked"
    );
    assert!(
        m.find("proxmoxer_cluster_quorate", &[("id", &solo)])
            .is_empty(),
        "a standalone node needs no quorum:\n{}",
        m.text
    );

    fake.set_quorate(false);
    let m = wait_for_scrape(&app, "quorum lost", |m| {
        m.value("proxmoxer_cluster_quorate", &who) == Some(0.0)
    })
    .await;
    assert_eq!(
        m.expect(
            "proxmoxer_cluster_status",
            &[("id", &id), ("name", "quorum"), ("status", "unhealthy")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_checks_are_counted_by_the_reason_the_cluster_shows() {
    let fake = fake_pve().await;
    let mut app = fast_daemon().spawn().await;
    let id = register_fake_id(&app, &fake, "failing").await;

    fake.set_down(true);
    let down = wait_for_cluster(&app, &id, "unhealthy", |c| c["status"] == "unhealthy").await;
    let reason = down["status_reason"].as_str().expect("a reason").to_owned();
    let m = scrape(&app).await;
    assert!(
        m.expect("proxmoxer_check_failures_total", &[("reason", &reason)]) >= 1.0,
        "{}",
        m.text
    );
    let failures: f64 = m
        .find("proxmoxer_check_failures_total", &[])
        .iter()
        .map(|s| s.value)
        .sum();
    assert!(
        failures >= 3.0,
        "unhealthy after 3 failed checks, so at least 3 are counted:\n{}",
        m.text
    );
    assert_eq!(
        m.expect(
            "proxmoxer_cluster_status",
            &[("id", &id), ("name", "failing"), ("status", "unhealthy")]
        ),
        1.0
    );

    // The history says why.
    let list = transitions(&app, &id).await;
    assert_eq!(
        steps(&list[..1]),
        vec![step("healthy", "unhealthy", &reason)],
        "{list:?}"
    );
    assert_eq!(list[0]["error"], down["last_error"], "{list:?}");

    // After a restart nothing has answered yet: no seconds since a success.
    app.restart().await;
    let m = scrape(&app).await;
    assert!(
        !m.find("proxmoxer_cluster_nodes", &[("id", &id)]).is_empty(),
        "the cluster is still exposed:\n{}",
        m.text
    );
    assert!(
        m.find(
            "proxmoxer_cluster_seconds_since_last_success",
            &[("id", &id)]
        )
        .is_empty(),
        "absent until a check has succeeded:\n{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_are_counted_as_other_and_add_no_series_of_their_own() {
    let app = TestApp::spawn().await;
    let invented = ["FOO", "BREW", "PROPFIND", "get", "X-SCAN-1"];
    let urls = [
        app.api_url("/clusters"),
        format!("{}/health", app.base_url()),
        app.api_url("/no-such-route"),
    ];
    let mut sent = 0.0;
    for name in invented {
        let method = reqwest::Method::from_bytes(name.as_bytes()).expect("a valid method token");
        for url in &urls {
            let response = app
                .client
                .request(method.clone(), url)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{name} {url}: {e}"));
            assert!(
                response.status().is_client_error(),
                "{name} {url}: {}",
                response.status()
            );
            sent += 1.0;
        }
    }

    let requests = "proxmoxer_http_requests_total";
    let counted = |m: &Scrape| -> f64 {
        m.find(requests, &[("method", "other")])
            .iter()
            .map(|s| s.value)
            .sum()
    };
    let m = wait_for_scrape(&app, "every invented request counted", |m| {
        counted(m) >= sent
    })
    .await;
    assert_eq!(counted(&m), sent, "{}", m.text);
    assert!(
        !m.find(
            "proxmoxer_http_request_duration_seconds_count",
            &[("method", "other")]
        )
        .is_empty(),
        "{}",
        m.text
    );
    let standard = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "other",
    ];
    let minted: Vec<&Sample> = m
        .samples
        .iter()
        .filter(|s| {
            s.labels
                .get("method")
                .is_some_and(|method| !standard.contains(&method.as_str()))
        })
        .collect();
    assert!(
        minted.is_empty(),
        "series labelled with an invented method: {minted:?}"
    );
    for name in invented {
        assert!(
            !m.text.contains(&format!("method=\"{name}\"")),
            "{name} is a label value:\n{}",
            m.text
        );
    }
}

// --- OpenAPI ------------------------------------------------------------------------------------

/// Every route the daemon serves, as (path template, method).
const ROUTES: [(&str, &str); 11] = [
    ("/api/v1/clusters", "get"),
    ("/api/v1/clusters", "post"),
    ("/api/v1/clusters/{id}", "get"),
    ("/api/v1/clusters/{id}", "patch"),
    ("/api/v1/clusters/{id}", "delete"),
    ("/api/v1/clusters/{id}/check", "post"),
    ("/api/v1/clusters/{id}/history", "get"),
    ("/api/v1/events", "get"),
    ("/api/v1/openapi.json", "get"),
    ("/health", "get"),
    ("/metrics", "get"),
];

/// Statuses the daemon really answered, by (path template, method).
#[derive(Default)]
struct Observed(BTreeSet<(&'static str, &'static str, u16)>);

impl Observed {
    fn record(&mut self, route: &'static str, method: &'static str, response: &reqwest::Response) {
        self.0.insert((route, method, response.status().as_u16()));
    }
}

/// Follows a local `$ref` (`#/components/schemas/Name`).
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(pointer) => {
            let pointer = pointer
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("a local $ref: {pointer}"));
            doc.pointer(pointer)
                .unwrap_or_else(|| panic!("$ref {pointer} resolves"))
        }
        None => schema,
    }
}

/// Every `$ref` anywhere in `value`.
fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                match (key.as_str(), child) {
                    ("$ref", Value::String(target)) => found.push(target),
                    _ => refs(child, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|child| refs(child, found)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route_and_every_status_the_daemon_answers() {
    let fake = fake_pve().await;
    let down = fake_pve().await;
    down.set_down(true);
    fake.add_user("auditor@pve", "auditor-password");
    fake.deny_sys_audit("auditor@pve");
    let app = fast_daemon().spawn().await;
    let mut seen = Observed::default();

    let response = app
        .client
        .get(app.api_url("/openapi.json"))
        .send()
        .await
        .expect("GET openapi.json");
    seen.record("/api/v1/openapi.json", "get", &response);
    let (status, doc) = json_of(response).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "an OpenAPI 3 document: {}",
        doc["openapi"]
    );

    // Collect what the daemon really answers on each route.
    let clusters = "/api/v1/clusters";
    let by_id = "/api/v1/clusters/{id}";
    let history_route = "/api/v1/clusters/{id}/history";
    seen.record("/health", "get", &app.get_health().await);
    let metrics = app
        .client
        .get(format!("{}/metrics", app.base_url()))
        .send()
        .await
        .expect("GET /metrics");
    seen.record("/metrics", "get", &metrics);
    let events = EventStream::connect(&app, None).await;
    seen.record("/api/v1/events", "get", &events.response);
    drop(events);

    let body = register_body(&fake, "documented");
    let created = app.post_clusters(&body).await;
    seen.record(clusters, "post", &created);
    let id = id_of(&json_of(created).await.1);
    seen.record(clusters, "post", &app.post_clusters(&body).await); // 409
    seen.record(clusters, "post", &app.post_clusters(&json!({})).await); // 400
    let json_type = Some("application/json");
    let malformed = app.post_clusters_raw("{", json_type).await; // 400
    seen.record(clusters, "post", &malformed);
    let plain = app.post_clusters_raw("{}", Some("text/plain")).await; // 415
    seen.record(clusters, "post", &plain);
    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(70 * 1024));
    seen.record(
        clusters,
        "post",
        &app.post_clusters_raw(&huge, json_type).await,
    ); // 413
    let mut wrong = register_body(&fake, "wrong-password");
    wrong["password"] = json!("not-the-password");
    seen.record(clusters, "post", &app.post_clusters(&wrong).await); // 401
    let auditor = json!({
        "name": "no-sys-audit",
        "api_endpoint": fake.url(),
        "username": "auditor@pve",
        "password": "auditor-password",
    });
    seen.record(clusters, "post", &app.post_clusters(&auditor).await); // 403
    let unreachable = register_body(&down, "unreachable");
    seen.record(clusters, "post", &app.post_clusters(&unreachable).await); // 502
    seen.record(clusters, "get", &app.get_clusters().await);

    let unknown = uuid::Uuid::new_v4().to_string();
    for target in [id.as_str(), unknown.as_str(), "not-a-uuid"] {
        seen.record(by_id, "get", &app.get_cluster(target).await);
        let response = app
            .client
            .get(app.api_url(&format!("/clusters/{target}/history")))
            .send()
            .await
            .expect("GET history");
        seen.record(history_route, "get", &response);
    }
    seen.record(by_id, "delete", &app.delete_cluster(&id).await); // 204
    seen.record(by_id, "delete", &app.delete_cluster(&id).await); // 404

    let expected: BTreeSet<u16> = [201, 400, 401, 403, 409, 413, 415, 502].into();
    let post_statuses: BTreeSet<u16> = seen
        .0
        .iter()
        .filter(|(route, method, _)| *route == clusters && *method == "post")
        .map(|(_, _, status)| *status)
        .collect();
    assert_eq!(
        post_statuses, expected,
        "the requests above produce each registration status"
    );
    for (route, method, status) in [(by_id, "delete", 204), (by_id, "get", 404)] {
        assert!(
            seen.0.contains(&(route, method, status)),
            "{route} {method} {status}"
        );
    }

    // Exactly the routes the daemon serves are documented.
    let paths = doc["paths"].as_object().expect("paths is an object");
    let documented: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flatten()
                .filter(|(method, _)| {
                    [
                        "get", "put", "post", "delete", "patch", "head", "options", "trace",
                    ]
                    .contains(&method.as_str())
                })
                .map(move |(method, _)| (path.clone(), method.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(path, method)| ((*path).to_owned(), (*method).to_owned()))
        .collect();
    assert_eq!(documented, served, "documented operations vs served routes");

    // Every status the daemon answered is documented for its operation.
    let undocumented: Vec<String> = seen
        .0
        .iter()
        .filter(|(route, method, status)| {
            doc["paths"][*route][*method]["responses"]
                .get(status.to_string())
                .is_none()
        })
        .map(|(route, method, status)| format!("{} {route} -> {status}", method.to_uppercase()))
        .collect();
    assert!(
        undocumented.is_empty(),
        "answered but not documented: {undocumented:?}"
    );

    // Error responses carry the {code, message, details} schema.
    let mut without_schema = Vec::new();
    for (path, method) in ROUTES {
        let responses = doc["paths"][path][method]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} has responses"));
        for (status, response) in responses {
            if status.parse::<u16>().map_or(true, |s| s < 400) {
                continue;
            }
            let response = resolve(&doc, response);
            let schema = resolve(&doc, &response["content"]["application/json"]["schema"]);
            let properties = schema["properties"].as_object();
            let complete = properties.is_some_and(|p| {
                ["code", "message", "details"]
                    .iter()
                    .all(|key| p.contains_key(*key))
            });
            if !complete {
                without_schema.push(format!("{method} {path} {status}: {response}"));
            }
        }
    }
    assert!(
        without_schema.is_empty(),
        "error responses without the error schema: {without_schema:#?}"
    );

    // Non-JSON bodies and headers are described as served.
    let content = |path: &str, status: &str| {
        doc["paths"][path]["get"]["responses"][status]["content"]
            .as_object()
            .map(|c| c.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(content("/api/v1/events", "200"), vec!["text/event-stream"]);
    assert_eq!(content("/metrics", "200"), vec!["text/plain"]);
    let parameters = doc["paths"]["/api/v1/events"]["get"]["parameters"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        parameters
            .iter()
            .any(|p| p["name"] == "Last-Event-ID" && p["in"] == "header"),
        "Last-Event-ID is documented: {parameters:?}"
    );
    let created = &doc["paths"][clusters]["post"]["responses"]["201"];
    assert!(
        created["headers"].get("Location").is_some(),
        "201 documents Location: {created}"
    );

    // Every reference in the document resolves.
    let mut targets = Vec::new();
    refs(&doc, &mut targets);
    for target in targets {
        let pointer = target.strip_prefix('#').unwrap_or(target);
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {target}");
    }
}

// --- request ids and logs -----------------------------------------------------------------------

fn request_id(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no X-Request-Id in {:?}", response.headers()))
        .to_owned()
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated_and_logged_with_each_request() {
    let app = TestApp::spawn().await;

    let response = app
        .client
        .get(format!("{}/health", app.base_url()))
        .header("X-Request-Id", "abc-123")
        .send()
        .await
        .expect("GET /health");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(request_id(&response), "abc-123");

    let first = request_id(&app.get_health().await);
    let second = request_id(&app.get_clusters().await);
    for generated in [&first, &second] {
        assert!(
            uuid::Uuid::parse_str(generated).is_ok(),
            "a generated request id is a UUID: {generated:?}"
        );
    }
    assert_ne!(first, second, "each request gets its own id");

    let unknown = uuid::Uuid::new_v4();
    let response = app
        .client
        .get(app.api_url(&format!("/clusters/{unknown}")))
        .header("X-Request-Id", "lookup-7")
        .send()
        .await
        .expect("GET a cluster");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(request_id(&response), "lookup-7", "errors carry the id too");

    let expectations = [
        ("abc-123", ["GET", "/health", "200"]),
        (first.as_str(), ["GET", "/health", "200"]),
        (second.as_str(), ["GET", "/api/v1/clusters", "200"]),
        ("lookup-7", ["GET", "/api/v1/clusters/{id}", "404"]),
    ];
    for (id, parts) in expectations {
        let mut line = None;
        let logged = wait_until(
            async || {
                line = app
                    .logs()
                    .lines()
                    .find(|l| l.contains(id))
                    .map(str::to_owned);
                line.is_some()
            },
            WAIT,
        )
        .await;
        assert!(logged, "no log line for request {id}:\n{}", app.logs());
        let line = line.unwrap_or_default();
        assert!(line.contains("DEBUG"), "logged at debug: {line}");
        assert!(line.contains("latency"), "with the latency: {line}");
        for part in parts {
            assert!(line.contains(part), "{part} in {line}");
        }
    }
    assert!(
        !app.logs().contains(&unknown.to_string()),
        "the route template is logged, not the concrete path:\n{}",
        app.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_json_log_format_every_line_on_stderr_is_a_json_object() {
    let fake = fake_pve().await;
    let mut app = fast_daemon()
        .env("PROXMOXER_LOG_FORMAT", "json")
        .spawn()
        .await;
    let id = register_fake_id(&app, &fake, "json-logs").await;
    let mut wrong = register_body(&fake, "json-wrong-password");
    wrong["password"] = json!("not-the-password");
    assert_eq!(
        app.post_clusters(&wrong).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let response = app
        .client
        .get(format!("{}/health", app.base_url()))
        .header("X-Request-Id", "json-request")
        .send()
        .await
        .expect("GET /health");
    assert_eq!(response.status(), StatusCode::OK);
    fake.set_down(true);
    wait_for_cluster(&app, &id, "unhealthy", |c| c["status"] == "unhealthy").await;
    let status = app.terminate().await;
    assert!(status.success(), "exit status {status}");

    let logs = app.logs();
    let lines: Vec<Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a stderr line is not JSON ({e}): {line:?}"));
            assert!(value.is_object(), "a JSON object: {line}");
            value
        })
        .collect();
    let message = |l: &Value| {
        l["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        lines
            .iter()
            .any(|l| message(l).contains("listening on http://")),
        "{logs}"
    );
    assert!(lines.iter().any(|l| message(l) == "stopped"), "{logs}");
    let request = lines
        .iter()
        .find(|l| l["fields"]["request_id"] == "json-request")
        .unwrap_or_else(|| panic!("no request line for json-request:\n{logs}"));
    assert_eq!(request["level"], "DEBUG", "{request}");
    assert_eq!(request["fields"]["method"], "GET", "{request}");
    assert_eq!(request["fields"]["route"], "/health", "{request}");
    assert_eq!(request["fields"]["status"], 200, "{request}");
    assert!(request["fields"]["latency_ms"].is_number(), "{request}");
}

#[tokio::test]
async fn with_json_log_format_a_failed_start_writes_only_json_lines() {
    // Hold the port, so the daemon cannot listen on it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("the bound address");
    let (_, stderr) = TestApp::builder()
        .env("PROXMOXER_LOG_FORMAT", "json")
        .env("PROXMOXER_LISTEN", addr.to_string())
        .spawn_expect_failure()
        .await;
    let not_json: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| serde_json::from_str::<Value>(l).map_or(true, |v| !v.is_object()))
        .collect();
    assert!(
        not_json.is_empty(),
        "lines that are not JSON objects: {not_json:?}; stderr:\n{stderr}"
    );
    assert!(stderr.contains(&addr.to_string()), "says why: {stderr}");
}

// --- systemd ------------------------------------------------------------------------------------

/// A stand-in for systemd's notify socket.
struct NotifySocket {
    socket: UnixDatagram,
    received: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &Path) -> Self {
        Self {
            socket: UnixDatagram::bind(path).expect("bind the notify socket"),
            received: Vec::new(),
        }
    }

    /// Reads messages until one satisfies `condition` and returns it; panics after [`WAIT`].
    async fn wait_for(&mut self, what: &str, condition: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut buffer = vec![0_u8; 64 * 1024];
        loop {
            let received = tokio::time::timeout_at(deadline, self.socket.recv(&mut buffer))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no notification with {what} within {WAIT:?}; received: {:?}",
                        self.received
                    )
                })
                .expect("receive a notification");
            let message = String::from_utf8_lossy(&buffer[..received]).into_owned();
            self.received.push(message.clone());
            if condition(&message) {
                return message;
            }
        }
    }
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

fn status_line(message: &str) -> Option<&str> {
    message.lines().find_map(|l| l.strip_prefix("STATUS="))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_told_when_the_daemon_is_ready_and_when_it_stops() {
    let fake = fake_pve().await;
    let builder = fast_daemon();
    let socket_path = builder.data_dir().join("notify.sock");
    let mut notify = NotifySocket::bind(&socket_path);
    let mut app = builder
        .env("NOTIFY_SOCKET", socket_path.display().to_string())
        .spawn()
        .await;

    let ready = notify.wait_for("READY=1", |m| has_line(m, "READY=1")).await;
    assert_eq!(
        status_line(&ready),
        Some("0 clusters: 0 healthy, 0 degraded, 0 unhealthy, 0 unknown"),
        "{ready:?}"
    );
    register_fake(&app, &fake, "notify").await;

    // A restart stops (STOPPING=1) and becomes ready again with the loaded cluster.
    app.restart().await;
    notify
        .wait_for("STOPPING=1", |m| has_line(m, "STOPPING=1"))
        .await;
    let ready = notify.wait_for("READY=1", |m| has_line(m, "READY=1")).await;
    let status = status_line(&ready).unwrap_or_else(|| panic!("a status line: {ready:?}"));
    assert!(status.starts_with("1 clusters: "), "{ready:?}");

    let status = app.terminate().await;
    assert!(status.success(), "exit status {status}");
    notify
        .wait_for("STOPPING=1", |m| has_line(m, "STOPPING=1"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_systemd_watchdog_the_daemon_pings_it_with_a_fresh_status() {
    let fake = fake_pve().await;
    let builder = fast_daemon();
    let socket_path = builder.data_dir().join("notify.sock");
    let mut notify = NotifySocket::bind(&socket_path);
    let mut app = builder
        .env("NOTIFY_SOCKET", socket_path.display().to_string())
        .env("WATCHDOG_USEC", "200000")
        .spawn()
        .await;

    notify.wait_for("READY=1", |m| has_line(m, "READY=1")).await;
    for _ in 0..3 {
        notify
            .wait_for("WATCHDOG=1", |m| has_line(m, "WATCHDOG=1"))
            .await;
    }
    register_fake(&app, &fake, "watchdog").await;
    let ping = notify
        .wait_for("a watchdog ping counting the new cluster", |m| {
            has_line(m, "WATCHDOG=1")
                && status_line(m).is_some_and(|s| s.starts_with("1 clusters: 1 healthy"))
        })
        .await;
    assert_eq!(
        status_line(&ping),
        Some("1 clusters: 1 healthy, 0 degraded, 0 unhealthy, 0 unknown")
    );

    let status = app.terminate().await;
    assert!(status.success(), "exit status {status}");
    notify
        .wait_for("STOPPING=1", |m| has_line(m, "STOPPING=1"))
        .await;
}

// --- command line -------------------------------------------------------------------------------

/// The binary with none of the developer's `PROXMOXER_*` settings, run in `dir`.
fn proxmoxer(dir: &Path) -> Command {
    let mut command = proxmoxer_command();
    command.current_dir(dir);
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run proxmoxer")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("proxmoxer-cli-")
        .tempdir()
        .expect("create a temporary directory")
}

#[test]
fn check_config_accepts_a_valid_file_or_none_and_creates_nothing() {
    let dir = tempdir();
    let config = dir.path().join("proxmoxer.toml");
    std::fs::write(
        &config,
        "[monitor]\ninterval = \"5s\"\nfailure_threshold = 2\n[log]\nformat = \"json\"\n",
    )
    .expect("write the config");

    let output = run(proxmoxer(dir.path())
        .arg("check-config")
        .arg("--config")
        .arg(&config));
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("every 5s"), "{}", describe(&output));

    let output = run(proxmoxer(dir.path())
        .arg("check-config")
        .env("PROXMOXER_CONFIG", &config));
    assert!(output.status.success(), "{}", describe(&output));

    let output = run(proxmoxer(dir.path()).arg("check-config"));
    assert!(output.status.success(), "{}", describe(&output));

    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list the directory")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        entries,
        vec![std::ffi::OsString::from("proxmoxer.toml")],
        "check-config creates no database or key"
    );
}

#[test]
fn check_config_names_a_misspelled_key() {
    let dir = tempdir();
    let config = dir.path().join("proxmoxer.toml");
    std::fs::write(&config, "[monitor]\nfailure_treshold = 3\n").expect("write the config");
    let output = run(proxmoxer(dir.path())
        .arg("check-config")
        .arg("--config")
        .arg(&config));
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("failure_treshold"),
        "{}",
        describe(&output)
    );
}

#[test]
fn check_config_names_an_invalid_environment_variable() {
    let dir = tempdir();
    let output = run(proxmoxer(dir.path())
        .arg("check-config")
        .env("PROXMOXER_MONITOR_INTERVAL", "often"));
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("PROXMOXER_MONITOR_INTERVAL"),
        "{}",
        describe(&output)
    );
}

#[test]
fn check_config_refuses_a_rust_log_filter_the_daemon_would_refuse() {
    let dir = tempdir();
    let database = dir.path().join("proxmoxer.redb");
    let mut daemon = proxmoxer(dir.path())
        .env("RUST_LOG", "[[not a filter")
        .env("PROXMOXER_LISTEN", "127.0.0.1:0")
        .env("PROXMOXER_DATABASE", &database)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the daemon");
    let deadline = std::time::Instant::now() + WAIT;
    let daemon_refuses = loop {
        if let Some(status) = daemon.try_wait().expect("poll the daemon") {
            break !status.success();
        }
        if std::time::Instant::now() >= deadline {
            // Still running: it accepted the filter.
            let _ = daemon.kill();
            let _ = daemon.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    let check = run(proxmoxer(dir.path())
        .arg("check-config")
        .env("RUST_LOG", "[[not a filter"));
    assert_eq!(
        !check.status.success(),
        daemon_refuses,
        "check-config must refuse exactly what the daemon refuses (the daemon refuses: \
         {daemon_refuses}): {}",
        describe(&check)
    );
    if daemon_refuses {
        assert!(
            String::from_utf8_lossy(&check.stderr).contains("RUST_LOG"),
            "{}",
            describe(&check)
        );
    }
}

#[test]
fn generate_key_creates_a_private_key_file_and_never_overwrites_one() {
    let dir = tempdir();
    let path = dir.path().join("proxmoxer.key");
    let output = run(proxmoxer(dir.path()).arg("generate-key").arg(&path));
    assert!(output.status.success(), "{}", describe(&output));
    let metadata = std::fs::metadata(&path).expect("the key file exists");
    assert_eq!(
        metadata.permissions().mode() & 0o777,
        0o600,
        "the key file is private"
    );
    let key = std::fs::read(&path).expect("read the key");
    assert!(!key.is_empty());

    let output = run(proxmoxer(dir.path()).arg("generate-key").arg(&path));
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(!output.stderr.is_empty(), "{}", describe(&output));
    assert_eq!(
        std::fs::read(&path).expect("read the key"),
        key,
        "unchanged"
    );

    let planted = dir.path().join("planted.key");
    std::fs::write(&planted, "keep me\n").expect("plant a file");
    let output = run(proxmoxer(dir.path()).arg("generate-key").arg(&planted));
    assert!(!output.status.success(), "{}", describe(&output));
    assert_eq!(
        std::fs::read_to_string(&planted).expect("read the planted file"),
        "keep me\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_uses_a_key_made_by_generate_key() {
    let fake = fake_pve().await;
    let builder = fast_daemon();
    let key = builder.data_dir().join("generated.key");
    let output = run(proxmoxer(builder.data_dir()).arg("generate-key").arg(&key));
    assert!(output.status.success(), "{}", describe(&output));
    let original = std::fs::read(&key).expect("read the key");

    let mut app = builder
        .env("PROXMOXER_KEY_FILE", key.display().to_string())
        .spawn()
        .await;
    let id = register_fake_id(&app, &fake, "sealed").await;
    app.restart().await;
    wait_for_cluster(&app, &id, "healthy after the restart", |c| {
        c["status"] == "healthy"
    })
    .await;
    assert!(
        !app.all_logs().contains("generating a new credential key"),
        "{}",
        app.all_logs()
    );
    assert_eq!(std::fs::read(&key).expect("read the key"), original);
    assert_eq!(app.key_path(), key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_query_is_tagged_logged_and_counted_when_it_answers() {
    let fake = fake_pve().await;
    let app = fast_daemon().env("RUST_LOG", "debug").spawn().await;
    let id = register_fake_id(&app, &fake, "held").await;
    // Past the member probes after registration, which change what is shown.
    wait_for_member_probes(&app, &id).await;
    let url = app.api_url(&format!("/clusters/{id}"));
    let first = app.client.get(&url).send().await.expect("GET");
    let tag = first.headers()["etag"].to_str().expect("tag").to_owned();

    let held = app
        .client
        .get(format!("{url}?wait=1s"))
        .header("if-none-match", &tag)
        .header("x-request-id", "held-query-1")
        .send()
        .await
        .expect("held GET");
    assert_eq!(held.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(held.headers()["x-request-id"], "held-query-1");
    assert_eq!(held.headers()["etag"].to_str().expect("tag"), tag);

    let route = [
        ("method", "GET"),
        ("route", "/api/v1/clusters/{id}"),
        ("status", "304"),
    ];
    let m = wait_for_scrape(&app, "the held query counted", |m| {
        m.value("proxmoxer_http_requests_total", &route).is_some()
    })
    .await;
    assert_eq!(m.expect("proxmoxer_http_requests_total", &route), 1.0);
    // Timed at its answer, not when the handler let go of it: the wait is in the histogram.
    let timed = m.expect(
        "proxmoxer_http_request_duration_seconds_sum",
        &[("method", "GET"), ("route", "/api/v1/clusters/{id}")],
    );
    assert!(timed >= 0.9, "{}", m.text);
    assert!(
        wait_until(
            async || app
                .logs()
                .lines()
                .any(|l| l.contains("held-query-1") && l.contains("304")),
            WAIT
        )
        .await,
        "the request's log line names its id and status:\n{}",
        app.logs()
    );
}
