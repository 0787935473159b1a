//! Connections that cannot starve the daemon: clients that stop half-way through a request are
//! closed after `server.header_timeout` or `server.request_timeout` (with a 408 when they had
//! begun one), at most `server.max_connections` are served at once, and meanwhile the API and
//! the monitors keep working.
//!
//! The stalled clients are raw sockets on loopback that send the start of a request and then
//! nothing. When each was opened and when it saw its end are compared only as lower bounds:
//! a connection cannot be closed by a timeout before that timeout has run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::helpers::{
    STATUS_PATH, TestApp, WAIT, cluster_count, fake_pve, fast_daemon, id_of, is_healthy, json_of,
    register_body, register_fake_id, wait_for_cluster_skipping_stale, wait_for_member_probes,
    wait_until,
};

/// The header timeout these daemons run with.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stalled client may wait for its end: timeouts, plus time to be accepted.
const CLOSE_DEADLINE: Duration = Duration::from_secs(60);
/// The start of a request: a request line and part of a header.
const REQUEST_START: &[u8] = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Ag";

/// Raises this process's open-files limit to its hard limit and checks that it can hold
/// `sockets` more, so that a low default soft limit does not fail the test for the wrong reason.
fn allow_open_files(sockets: usize) {
    let limit = proxmoxer::limits::raise_open_files_limit();
    let needed = u64::try_from(sockets).expect("a socket count") + 1024;
    assert!(
        limit >= needed,
        "this test opens {sockets} sockets; the open-files limit is {limit} (raise the hard limit)"
    );
}

/// A daemon checking every 100 ms with these `[server]` settings.
async fn daemon(server: &str) -> TestApp {
    fast_daemon()
        .config_toml(&format!("[server]\n{server}\n"))
        .spawn()
        .await
}

/// A client connection and when it was opened.
struct Client {
    stream: TcpStream,
    opened: Instant,
}

/// Opens `count` connections, one after another, each sending `start` (if any) and no more.
async fn open_clients(addr: SocketAddr, count: usize, start: &[u8]) -> Vec<Client> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        let opened = Instant::now();
        let mut stream = TcpStream::connect(addr)
            .await
            .expect("connect to the daemon");
        if !start.is_empty() {
            stream
                .write_all(start)
                .await
                .expect("send the start of a request");
        }
        clients.push(Client { stream, opened });
    }
    clients
}

/// What a client received before the daemon closed its connection, and when it saw the end.
struct Ending {
    received: Vec<u8>,
    opened: Instant,
    closed: Instant,
}

impl Ending {
    /// How long the connection lasted, counted from before it was opened.
    fn lasted(&self) -> Duration {
        self.closed - self.opened
    }
}

/// Reads every client to its end; panics if one is still open after [`CLOSE_DEADLINE`].
async fn endings(clients: Vec<Client>) -> Vec<Ending> {
    let mut readers = JoinSet::new();
    for Client { mut stream, opened } in clients {
        readers.spawn(async move {
            let mut received = Vec::new();
            let read = tokio::time::timeout(CLOSE_DEADLINE, stream.read_to_end(&mut received));
            match read.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("reading a stalled connection failed: {e}"),
                Err(_) => panic!("a stalled connection was still open after {CLOSE_DEADLINE:?}"),
            }
            Ending {
                received,
                opened,
                closed: Instant::now(),
            }
        });
    }
    readers.join_all().await
}

/// The status code, headers (lowercased) and JSON body of a raw HTTP/1.1 response.
fn parse_response(raw: &[u8]) -> (u16, String, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    (status, head.to_ascii_lowercase(), body)
}

/// Asserts that `raw` is the API's 408 and that it closes the connection.
fn assert_request_timeout(raw: &[u8]) {
    let (status, head, body) = parse_response(raw);
    assert_eq!(status, 408, "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert_eq!(
        body,
        json!({
            "code": "RequestTimeout",
            "message": "Request took too long to arrive",
            "details": {},
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_stalled_clients_leave_the_api_and_the_monitors_working_and_are_closed_after_the_header_timeout()
 {
    const STALLED: usize = 3000;
    const IDLE: usize = 10;
    allow_open_files(STALLED + IDLE);
    let fake = fake_pve().await;
    // Room for every stalled client and this test's own requests.
    let app = daemon("header_timeout = \"2s\"\nmax_connections = 3100").await;

    let stalled = open_clients(app.addr, STALLED, REQUEST_START).await;
    let idle = open_clients(app.addr, IDLE, b"").await;

    let (status, health) = json_of(app.get_health().await).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    let (status, cluster) = json_of(app.post_clusters(&register_body(&fake, "busy")).await).await;
    assert_eq!(status, StatusCode::CREATED, "{cluster}");
    let checks_at_registration = fake.requests(STATUS_PATH);
    assert!(
        wait_until(
            async || fake.requests(STATUS_PATH) >= checks_at_registration + 2,
            WAIT
        )
        .await,
        "the monitor kept checking: {} status requests since registration",
        fake.requests(STATUS_PATH) - checks_at_registration
    );
    let checked = wait_for_cluster_skipping_stale(&app, &id_of(&cluster), "checked", |c| {
        !c["last_checked_at"].is_null()
    })
    .await;
    assert!(is_healthy(&checked), "{checked}");

    for ending in endings(stalled).await {
        assert!(
            ending.lasted() >= HEADER_TIMEOUT,
            "closed after {:?}, before the header timeout",
            ending.lasted()
        );
        assert_request_timeout(&ending.received);
    }
    for ending in endings(idle).await {
        assert!(ending.lasted() >= HEADER_TIMEOUT, "{:?}", ending.lasted());
        assert!(
            ending.received.is_empty(),
            "a connection that began no request gets no answer: {:?}",
            String::from_utf8_lossy(&ending.received)
        );
    }
    let (status, _) = json_of(app.get_health().await).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        app.logs().contains("up to 3100 API connections and about"),
        "the start-up log says what the open-files limit allows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_clients_wait_for_a_slot_while_open_event_streams_and_the_monitors_carry_on()
 {
    const MAX_CONNECTIONS: usize = 50;
    const EVENT_STREAMS: usize = 10;
    const STALLED: usize = 100;
    allow_open_files(STALLED + EVENT_STREAMS);
    let fake = fake_pve().await;
    let mut app = daemon(&format!(
        "header_timeout = \"2s\"\nmax_connections = {MAX_CONNECTIONS}"
    ))
    .await;
    // This test counts slots: its own requests must not keep one in an idle connection.
    app.client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(WAIT)
        .build()
        .expect("an HTTP client without a pool");
    let id = register_fake_id(&app, &fake, "crowded").await;
    wait_for_member_probes(&app, &id).await;

    let mut streams = Vec::with_capacity(EVENT_STREAMS);
    for _ in 0..EVENT_STREAMS {
        let mut stream = TcpStream::connect(app.addr)
            .await
            .expect("connect for events");
        stream
            .write_all(b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("ask for events");
        let mut seen = String::new();
        read_until(&mut stream, &mut seen, "HTTP/1.1 200").await;
        streams.push((stream, seen));
    }

    let stalled = open_clients(app.addr, STALLED, REQUEST_START).await;
    let first_opened = stalled[0].opened;
    let checks_before = fake.requests(STATUS_PATH);
    fake.set_node_online("pve3", false);
    for (stream, seen) in &mut streams {
        read_until(stream, seen, "degraded").await;
    }
    assert!(
        wait_until(async || fake.requests(STATUS_PATH) > checks_before, WAIT).await,
        "the monitor kept checking"
    );

    let endings = endings(stalled).await;
    for ending in &endings {
        assert_request_timeout(&ending.received);
    }
    // Slots free up no earlier than one header timeout after the first client came, and a
    // client served in a freed slot gets a whole header timeout of its own: whoever ends
    // before two timeouts had one of the slots the event streams left from the start. One
    // more may have had the slot of this test's last request, if the daemon saw that
    // connection close only after the flood began.
    let free_from_the_start = MAX_CONNECTIONS - EVENT_STREAMS + 1;
    let waited = endings
        .iter()
        .filter(|ending| ending.closed - first_opened >= 2 * HEADER_TIMEOUT)
        .count();
    assert!(
        waited >= STALLED - free_from_the_start,
        "only {waited} of {STALLED} clients waited for a slot; {MAX_CONNECTIONS} slots, \
         {EVENT_STREAMS} held by event streams"
    );
    assert!(
        app.logs()
            .contains("every API connection slot is taken; new connections wait"),
        "the operator is told the limit was reached"
    );
    let (status, _) = json_of(app.get_health().await).await;
    assert_eq!(status, StatusCode::OK);
}

/// Reads from `stream` into `seen` until it contains `needle`; panics after [`WAIT`].
async fn read_until(stream: &mut TcpStream, seen: &mut String, needle: &str) {
    let found = tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        while !seen.contains(needle) {
            let n = stream
                .read(&mut chunk)
                .await
                .expect("read the event stream");
            assert!(n > 0, "the event stream ended: {seen}");
            seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    })
    .await;
    assert!(found.is_ok(), "no {needle:?} within {WAIT:?}: {seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_past_the_request_timeout_gets_a_408_and_the_connection_closes() {
    let fake = fake_pve().await;
    let app = daemon("request_timeout = \"1s\"").await;
    let body = serde_json::to_vec(&register_body(&fake, "slow")).expect("a JSON body");
    let head = format!(
        "POST /api/v1/clusters HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    // All but the closing brace.
    request.extend_from_slice(&body[..body.len() - 1]);
    let slow = open_clients(app.addr, 1, &request).await;

    let ending = endings(slow).await.pop().expect("one client");
    assert!(
        ending.lasted() >= Duration::from_secs(1),
        "{:?}",
        ending.lasted()
    );
    assert_request_timeout(&ending.received);
    assert_eq!(cluster_count(&app).await, 0, "nothing was registered");
}
