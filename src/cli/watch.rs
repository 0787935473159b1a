//! `proxmoxer watch`: follows `GET /api/v1/events` and prints a line whenever a cluster is
//! registered, deregistered, or changes its status, reason or nodes online, until interrupted.
//!
//! The events carry the new state only, so the command keeps every cluster's last shown
//! state (from a first listing, then from the events) to print `old -> new`. Applying an
//! event twice changes nothing, which makes replays after a reconnect harmless; when the
//! daemon says events were lost (`resync`), the command lists the clusters again and prints
//! the differences.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Local};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::client::{ClientError, Daemon};
use super::paint::{Palette, printable};
use super::sse::SseParser;
use super::status::no_answer;

/// The daemon sends a keep-alive every 15 s; three missed mean the connection is dead.
const READ_TIMEOUT: Duration = Duration::from_secs(45);
/// For the cluster listings at start and on `resync`.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// The first wait before reconnecting; it doubles up to [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(10);
const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// Follows the daemon's events until SIGINT or SIGTERM (exit 0). Exits 3 with the reason on
/// stderr when the first connection fails or the daemon rejects the token.
pub fn run(daemon: &Daemon) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return no_answer(&ClientError::Runtime(e)),
    };
    let printer = Printer {
        palette: Palette::for_stdout(),
    };
    let result = runtime.block_on(async {
        // Installed before the first connection, so an early Ctrl-C is not the default action.
        let stop = crate::stop_signal().map_err(ClientError::Runtime)?;
        tokio::select! {
            result = follow(daemon, &printer) => result,
            () = stop => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => no_answer(&e),
    }
}

/// Why a connection's stream stopped.
enum StreamEnd {
    /// The connection broke or closed; reconnect.
    Lost(String),
    /// Nobody reads stdout any more.
    OutputClosed,
    /// Reconnecting cannot help.
    Fatal(ClientError),
}

async fn follow(daemon: &Daemon, printer: &Printer) -> Result<(), ClientError> {
    let stream_client = daemon.client(None, Some(READ_TIMEOUT))?;
    let list_client = daemon.client(Some(LIST_TIMEOUT), None)?;
    // Subscribe before listing: a change in between then arrives as an event instead of
    // being lost.
    let mut response = connect(daemon, &stream_client, None).await?;
    let mut board = Board::default();
    board.resync(list(daemon, &list_client).await?);
    note(&format!(
        "watching {} cluster{} at {} (Ctrl-C to stop)",
        board.clusters.len(),
        if board.clusters.len() == 1 { "" } else { "s" },
        daemon.base()
    ));
    let mut last_id: Option<String> = None;
    loop {
        let cause = match read_stream(
            response,
            &mut board,
            &mut last_id,
            printer,
            daemon,
            &list_client,
        )
        .await
        {
            StreamEnd::Lost(cause) => cause,
            StreamEnd::OutputClosed => return Ok(()),
            StreamEnd::Fatal(e) => return Err(e),
        };
        note(&format!(
            "proxmoxer watch: lost the event stream of {} ({cause}); reconnecting",
            daemon.base()
        ));
        response = loop {
            let response = reconnect(daemon, &stream_client, last_id.as_deref()).await?;
            if last_id.is_some() {
                break response;
            }
            // Without an event id the daemon cannot replay what happened while disconnected:
            // list again, subscribed first as at the start.
            match list(daemon, &list_client).await {
                Ok(clusters) => {
                    if !printer.print_all(board.resync(clusters)) {
                        return Ok(());
                    }
                    break response;
                }
                Err(e) if e.is_permanent() => return Err(e),
                Err(_) => {}
            }
        };
        note(&format!(
            "proxmoxer watch: reconnected to {}",
            daemon.base()
        ));
    }
}

/// A line on stderr, where it stays out of the changes on stdout; a closed stderr is no
/// reason to stop.
fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "{}", printable(text));
}

/// Retries with a doubling back-off until the daemon answers; gives up only on an answer
/// that retrying cannot change (a rejected token, a redirect).
async fn reconnect(
    daemon: &Daemon,
    client: &reqwest::Client,
    last_id: Option<&str>,
) -> Result<reqwest::Response, ClientError> {
    let mut wait = RECONNECT_FIRST;
    loop {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RECONNECT_MAX);
        match connect(daemon, client, last_id).await {
            Ok(response) => return Ok(response),
            Err(e) if e.is_permanent() => return Err(e),
            Err(_) => {}
        }
    }
}

async fn connect(
    daemon: &Daemon,
    client: &reqwest::Client,
    last_id: Option<&str>,
) -> Result<reqwest::Response, ClientError> {
    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
    if let Some(value) = last_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert(LAST_EVENT_ID, value);
    }
    let response = daemon
        .get(client, "/api/v1/events", headers, READ_TIMEOUT)
        .await?;
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with("text/event-stream") {
        return Err(ClientError::BadBody {
            url: daemon.base().to_owned(),
            cause: format!("GET /api/v1/events answered {content_type:?}, not an event stream"),
        });
    }
    Ok(response)
}

async fn list(daemon: &Daemon, client: &reqwest::Client) -> Result<Vec<Value>, ClientError> {
    let body = daemon
        .get_json(client, "/api/v1/clusters", LIST_TIMEOUT)
        .await?;
    body.get("clusters")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| ClientError::BadBody {
            url: daemon.base().to_owned(),
            cause: "no \"clusters\" list in the answer to GET /api/v1/clusters".to_owned(),
        })
}

async fn read_stream(
    mut response: reqwest::Response,
    board: &mut Board,
    last_id: &mut Option<String>,
    printer: &Printer,
    daemon: &Daemon,
    list_client: &reqwest::Client,
) -> StreamEnd {
    let mut parser = SseParser::new();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return StreamEnd::Lost("the daemon closed the stream".to_owned()),
            Err(e) => return StreamEnd::Lost(daemon.transport_error(&e, READ_TIMEOUT).to_string()),
        };
        let events = match parser.feed(&chunk) {
            Ok(events) => events,
            Err(e) => return StreamEnd::Lost(e.to_string()),
        };
        for event in events {
            if let Some(id) = event.id {
                *last_id = Some(id);
            }
            let changes = if event.event == "resync" {
                match list(daemon, list_client).await {
                    Ok(clusters) => board.resync(clusters),
                    Err(e) if e.is_permanent() => return StreamEnd::Fatal(e),
                    Err(e) => return StreamEnd::Lost(e.to_string()),
                }
            } else {
                match serde_json::from_str::<Value>(&event.data) {
                    Ok(data) => board.apply(&event.event, &data).into_iter().collect(),
                    // Not an event this version knows how to read; the next one may be.
                    Err(_) => Vec::new(),
                }
            };
            if !printer.print_all(changes) {
                return StreamEnd::OutputClosed;
            }
        }
    }
}

/// A cluster as the watch shows it.
#[derive(Debug, Clone)]
struct Shown {
    name: String,
    status: String,
    reason: String,
    /// `(online, total)`, when known.
    nodes: Option<(u64, u64)>,
    /// Why the last check failed; shown, but a new wording alone is no change.
    last_error: Option<String>,
    /// When the daemon last changed what it shows of the cluster.
    updated_at: Option<DateTime<Local>>,
}

impl Shown {
    fn from_cluster(cluster: &Value) -> Option<(String, Self)> {
        let text = |field: &str| cluster[field].as_str().map(printable);
        let id = cluster["id"].as_str()?.to_owned();
        let nodes = cluster["nodes_online"]
            .as_u64()
            .zip(cluster["node_count"].as_u64());
        let updated_at = cluster["updated_at"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Local));
        let shown = Self {
            name: text("name").unwrap_or_else(|| id.clone()),
            status: text("status").unwrap_or_else(|| "unknown".to_owned()),
            reason: text("status_reason").unwrap_or_default(),
            nodes,
            last_error: text("last_error"),
            updated_at,
        };
        Some((id, shown))
    }

    /// Whether a line is due between `self` and `other`.
    fn differs_from(&self, other: &Self) -> bool {
        self.name != other.name
            || self.status != other.status
            || self.reason != other.reason
            || self.nodes != other.nodes
    }

    /// `node_offline, 2/3 nodes online` or `unreachable: connection refused`. Node counts
    /// after a failed check are the last known ones, so they are left out then.
    fn detail(&self) -> String {
        match (&self.last_error, self.nodes) {
            (Some(error), _) => format!("{}: {error}", self.reason),
            (None, Some((online, total))) => {
                format!("{}, {online}/{total} nodes online", self.reason)
            }
            (None, None) => self.reason.clone(),
        }
    }
}

/// Something worth a line.
#[derive(Debug)]
enum Change {
    Registered(Shown),
    Changed { old: Shown, new: Shown },
    Deregistered(Shown),
}

impl Change {
    fn name(&self) -> &str {
        match self {
            Self::Registered(shown) | Self::Deregistered(shown) => &shown.name,
            Self::Changed { new, .. } => &new.name,
        }
    }

    fn line(&self, palette: Palette, now: DateTime<Local>) -> String {
        let time = |shown: &Shown| {
            shown
                .updated_at
                .unwrap_or(now)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        };
        let status = |shown: &Shown| palette.status(&shown.status, &shown.status);
        match self {
            Self::Registered(new) => format!(
                "{}  {}  registered: {}  {}",
                time(new),
                new.name,
                status(new),
                new.detail()
            ),
            Self::Changed { old, new } => {
                let renamed = if old.name == new.name {
                    String::new()
                } else {
                    format!(" (renamed from {})", old.name)
                };
                format!(
                    "{}  {}  {} -> {}  {}{renamed}",
                    time(new),
                    new.name,
                    status(old),
                    status(new),
                    new.detail()
                )
            }
            Self::Deregistered(old) => format!(
                "{}  {}  deregistered (was {})",
                now.format("%Y-%m-%d %H:%M:%S"),
                old.name,
                status(old)
            ),
        }
    }
}

/// The last shown state of every cluster, by id.
#[derive(Debug, Default)]
struct Board {
    clusters: HashMap<String, Shown>,
}

impl Board {
    /// Applies one event; returns the change to print, if any.
    fn apply(&mut self, kind: &str, data: &Value) -> Option<Change> {
        match kind {
            "cluster.registered" | "cluster.updated" => {
                let (id, new) = Shown::from_cluster(data)?;
                match self.clusters.insert(id, new.clone()) {
                    None => Some(Change::Registered(new)),
                    Some(old) if new.differs_from(&old) => Some(Change::Changed { old, new }),
                    Some(_) => None,
                }
            }
            "cluster.deregistered" => {
                let id = data["id"].as_str()?;
                self.clusters.remove(id).map(Change::Deregistered)
            }
            _ => None,
        }
    }

    /// Replaces the board with a fresh listing; returns what differs, by name.
    fn resync(&mut self, clusters: Vec<Value>) -> Vec<Change> {
        let mut previous = std::mem::take(&mut self.clusters);
        let mut changes = Vec::new();
        for (id, new) in clusters.iter().filter_map(Shown::from_cluster) {
            match previous.remove(&id) {
                None => changes.push(Change::Registered(new.clone())),
                Some(old) if new.differs_from(&old) => changes.push(Change::Changed {
                    old,
                    new: new.clone(),
                }),
                Some(_) => {}
            }
            self.clusters.insert(id, new);
        }
        changes.extend(previous.into_values().map(Change::Deregistered));
        changes.sort_by(|a, b| a.name().cmp(b.name()));
        changes
    }
}

struct Printer {
    palette: Palette,
}

impl Printer {
    /// Prints a line per change; false once stdout is closed.
    fn print_all(&self, changes: Vec<Change>) -> bool {
        let now = Local::now();
        let mut out = std::io::stdout().lock();
        for change in changes {
            if writeln!(out, "{}", change.line(self.palette, now)).is_err() {
                return false;
            }
        }
        out.flush().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(id: &str, name: &str, status: &str, reason: &str, online: u64) -> Value {
        json!({"id": id, "name": name, "status": status, "status_reason": reason,
               "last_error": null, "nodes_online": online, "node_count": 3,
               "updated_at": "2026-11-30T10:00:00Z"})
    }

    fn lines(changes: impl IntoIterator<Item = Change>) -> Vec<String> {
        let now = DateTime::parse_from_rfc3339("2026-11-30T10:05:00Z")
            .expect("RFC 3339")
            .with_timezone(&Local);
        changes
            .into_iter()
            .map(|c| {
                let line = c.line(Palette::new(false), now);
                // The time is local; the rest is what the tests are about.
                line.split_once("  ")
                    .map(|(_, rest)| rest.to_owned())
                    .unwrap_or(line)
            })
            .collect()
    }

    #[test]
    fn events_become_lines_and_repeats_print_nothing() {
        let mut board = Board::default();
        let registered = cluster("1", "prod", "healthy", "ok", 3);
        let degraded = cluster("1", "prod", "degraded", "node_offline", 2);
        let changes = [
            board.apply("cluster.registered", &registered),
            board.apply("cluster.updated", &registered),
            board.apply("cluster.updated", &degraded),
            board.apply("cluster.updated", &degraded),
            board.apply(
                "cluster.updated",
                &cluster("1", "prod", "degraded", "node_offline", 1),
            ),
            board.apply("cluster.deregistered", &json!({"id": "1"})),
            board.apply("cluster.deregistered", &json!({"id": "1"})),
        ];
        assert_eq!(
            lines(changes.into_iter().flatten()),
            [
                "prod  registered: healthy  ok, 3/3 nodes online",
                "prod  healthy -> degraded  node_offline, 2/3 nodes online",
                "prod  degraded -> degraded  node_offline, 1/3 nodes online",
                "prod  deregistered (was degraded)",
            ]
        );
    }

    #[test]
    fn a_failed_check_shows_its_error_and_a_new_wording_alone_is_no_change() {
        let mut board = Board::default();
        board.apply(
            "cluster.registered",
            &cluster("1", "prod", "healthy", "ok", 3),
        );
        let mut down = cluster("1", "prod", "unhealthy", "unreachable", 3);
        down["last_error"] = json!("connection refused");
        let change = board.apply("cluster.updated", &down);
        assert_eq!(
            lines(change),
            ["prod  healthy -> unhealthy  unreachable: connection refused"]
        );
        down["last_error"] = json!("timed out after 10s");
        assert!(board.apply("cluster.updated", &down).is_none());
    }

    #[test]
    fn a_resync_prints_what_changed_while_events_were_lost() {
        let mut board = Board::default();
        assert!(
            board
                .resync(vec![
                    cluster("1", "a", "healthy", "ok", 3),
                    cluster("2", "b", "healthy", "ok", 3),
                ])
                .len()
                == 2
        );
        let changes = board.resync(vec![
            cluster("2", "b", "degraded", "node_offline", 2),
            cluster("3", "c", "healthy", "ok", 3),
        ]);
        assert_eq!(
            lines(changes),
            [
                "a  deregistered (was healthy)",
                "b  healthy -> degraded  node_offline, 2/3 nodes online",
                "c  registered: healthy  ok, 3/3 nodes online",
            ]
        );
    }
}
