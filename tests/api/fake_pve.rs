//! A fake Proxmox VE 8.x API server (`pveproxy`) for integration tests.
//!
//! It serves plain HTTP on `127.0.0.1` and reproduces what `proxmoxer` relies on, including the
//! awkward parts of the real server (sources: `pve-api-facts.md`, pve-http-server
//! `AnyEvent.pm`, pve-manager `HTTPServer.pm`, pve-access-control):
//!
//! - auth failures are 401s with the cause in the reason phrase and an empty body, padded to
//!   [`DEFAULT_AUTH_FAILURE_DELAY`] after the request started;
//! - handler errors carry `{"data":null,"message":"…"}` (the `message` only from 8.4 on, as
//!   pve-http-server 5.2.0 added it), parameter errors an `errors` map;
//! - every response with status ≥ 400 says `Connection: close` and closes the connection;
//! - kept-alive connections are closed after [`DEFAULT_KEEP_ALIVE_IDLE`] without a request, and
//!   after 100 requests;
//! - `/cluster/status` and `/nodes` come back in a different order on every call, with 0/1
//!   integers instead of booleans.
//!
//! Not reproduced: TLS (so no certificate or fingerprint on the wire), gzip bodies, the
//! `/api2/extjs` and `/api2/html` formatters, forwarding to other nodes (fake 595/596 with
//! [`FakePve::fail_all`]), completing a second factor (every `tfa-challenge` answer fails),
//! authkey rotation (use [`FakePve::invalidate_tickets`]), and ACL paths other than `/`.

// Shared by every test module of the `api` binary; each test uses only some of the controls.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use axum::serve::{IncomingStream, Listener};
use hyper::ext::ReasonPhrase;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

/// The user that [`FakePve::start`] creates, with `Sys.Audit` on `/`.
pub const DEFAULT_USER: &str = "root@pam";
/// The password of [`DEFAULT_USER`].
pub const DEFAULT_PASSWORD: &str = "secret-password";
/// The cluster name that [`FakePve::start`] reports.
pub const DEFAULT_CLUSTER: &str = "prod";
/// The nodes of [`DEFAULT_CLUSTER`], all online; the first one answers (`local: 1`).
pub const DEFAULT_NODES: [&str; 3] = ["pve1", "pve2", "pve3"];
/// The pve-manager version that [`FakePve::start`] reports.
pub const DEFAULT_VERSION: &str = "8.4.1";
/// pveproxy answers every 401 no earlier than this after the request arrived.
pub const DEFAULT_AUTH_FAILURE_DELAY: Duration = Duration::from_secs(3);
/// pveproxy closes a kept-alive connection that has been idle this long.
pub const DEFAULT_KEEP_ALIVE_IDLE: Duration = Duration::from_secs(5);

/// Tickets and CSRF tokens are accepted while `-300 s < age < 7200 s` (pve-access-control).
const TICKET_LIFETIME_SECS: i64 = 7200;
const TICKET_CLOCK_SKEW_SECS: i64 = 300;
const MAX_REQUESTS_PER_CONNECTION: u64 = 100;
/// The POST body limit of pve-http-server ≥ 5.2.1.
const MAX_POST_BYTES: usize = 512 * 1024;
const MAX_RECORDED_REQUESTS: usize = 10_000;
const CSRF_HEADER: &str = "csrfpreventiontoken";
const JSON_CONTENT_TYPE: &str = "application/json;charset=UTF-8";
/// `create_ticket` has `additionalProperties => 0`; anything else is a 400.
const LOGIN_PARAMS: &[&str] = &[
    "username",
    "password",
    "realm",
    "otp",
    "path",
    "privs",
    "new-format",
    "tfa-challenge",
];

/// A handle on a running fake Proxmox VE server. Clones share the same server; the server stops
/// when the last clone is dropped.
#[derive(Clone)]
pub struct FakePve {
    shared: Arc<Shared>,
    _server: Arc<ServerTask>,
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path and query, exactly as sent.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RecordedRequest {
    /// The body as (lossy) UTF-8, e.g. to check a login form.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

struct Shared {
    addr: SocketAddr,
    down: AtomicBool,
    keep_alive_idle_ms: AtomicU64,
    state: Mutex<FakeState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        // A test that panicked while holding the lock must not turn every later request into a
        // second panic inside the server.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    fn keep_alive_idle(&self) -> Duration {
        Duration::from_millis(self.keep_alive_idle_ms.load(Ordering::SeqCst))
    }
}

struct ServerTask(JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl FakePve {
    /// Starts a server on a random port of 127.0.0.1: user [`DEFAULT_USER`] with
    /// [`DEFAULT_PASSWORD`], cluster [`DEFAULT_CLUSTER`] with [`DEFAULT_NODES`] all online and
    /// quorate, version [`DEFAULT_VERSION`].
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Proxmox VE listener");
        let addr = listener
            .local_addr()
            .expect("local address of the fake Proxmox VE listener");
        let shared = Arc::new(Shared {
            addr,
            down: AtomicBool::new(false),
            keep_alive_idle_ms: AtomicU64::new(duration_ms(DEFAULT_KEEP_ALIVE_IDLE)),
            state: Mutex::new(FakeState::new()),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let listener = FakeListener {
            listener,
            shared: Arc::clone(&shared),
        };
        let task = tokio::spawn(async move {
            let make_service = app.into_make_service_with_connect_info::<ConnInfo>();
            if let Err(error) = axum::serve(listener, make_service).await {
                eprintln!("fake Proxmox VE server stopped: {error}");
            }
        });
        Self {
            shared,
            _server: Arc::new(ServerTask(task)),
        }
    }

    /// `http://127.0.0.1:PORT`, the value to register as `api_endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The socket address behind [`Self::url`], for raw TCP checks.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    // --- users, tokens, tickets -------------------------------------------------------------
    // The `set_*`/`deny_*`/`grant_*` calls panic on an unknown user, to surface typos in tests.

    /// Adds (or replaces) a user. New users hold `Sys.Audit` on `/` (the `PVEAuditor` role).
    pub fn add_user(&self, user: &str, password: &str) {
        self.shared.lock().users.insert(
            user.to_owned(),
            Account {
                password: password.to_owned(),
                two_factor: false,
                sys_audit: true,
            },
        );
    }

    /// Deletes a user and its API tokens; tickets it holds stop working.
    pub fn remove_user(&self, user: &str) {
        let mut state = self.shared.lock();
        state.users.remove(user);
        state
            .tokens
            .retain(|id, _| id.rsplit_once('!').is_none_or(|(owner, _)| owner != user));
    }

    /// Changes a user's password; tickets already issued stay valid, as on real Proxmox.
    pub fn set_password(&self, user: &str, password: &str) {
        self.shared.lock().account_mut(user).password = password.to_owned();
    }

    /// With two-factor on, a password login answers `NeedTFA: 1` and a half ticket.
    pub fn set_two_factor(&self, user: &str, enabled: bool) {
        self.shared.lock().account_mut(user).two_factor = enabled;
    }

    /// Takes `Sys.Audit` on `/` away: `/cluster/status` answers 403, `/nodes` drops the stats
    /// and logins no longer report `clustername`.
    pub fn deny_sys_audit(&self, user: &str) {
        self.shared.lock().account_mut(user).sys_audit = false;
    }

    /// Gives `Sys.Audit` on `/` back.
    pub fn grant_sys_audit(&self, user: &str) {
        self.shared.lock().account_mut(user).sys_audit = true;
    }

    /// Adds an API token `user!tokenid` whose effective rights include `Sys.Audit` on `/` when
    /// `has_sys_audit` (a privsep token needs its own ACL for that). Creates `user` with a random
    /// password if it does not exist yet.
    pub fn add_token(&self, user: &str, tokenid: &str, secret: &str, has_sys_audit: bool) {
        let mut state = self.shared.lock();
        state
            .users
            .entry(user.to_owned())
            .or_insert_with(|| Account {
                password: hex::encode(random_bytes(16)),
                two_factor: false,
                sys_audit: true,
            });
        state.tokens.insert(
            format!("{user}!{tokenid}"),
            ApiToken {
                secret: secret.to_owned(),
                sys_audit: has_sys_audit,
            },
        );
    }

    /// Deletes the token `user!tokenid`; requests with it get 401 from then on.
    pub fn remove_token(&self, user: &str, tokenid: &str) {
        self.shared
            .lock()
            .tokens
            .remove(&format!("{user}!{tokenid}"));
    }

    /// Makes every ticket and CSRF token issued so far invalid, like a forged or foreign ticket.
    pub fn invalidate_tickets(&self) {
        let mut state = self.shared.lock();
        state.tickets.clear();
        state.csrf_tokens.clear();
    }

    /// Moves the fake's clock forward, which ages tickets: after 7200 s they are refused.
    pub fn advance_clock(&self, by: Duration) {
        self.shared.lock().clock_offset += by;
    }

    // --- cluster shape ----------------------------------------------------------------------

    /// Replaces the topology with a cluster of `nodes` (`(name, online)`), numbered from 1 with
    /// IPs 10.0.0.11, 10.0.0.12, …. The first node is the one answering (`local: 1`). Quorum is
    /// the majority of online nodes.
    pub fn set_cluster(&self, name: &str, nodes: &[(&str, bool)]) {
        assert!(!nodes.is_empty(), "a cluster needs at least one node");
        let nodes = nodes
            .iter()
            .enumerate()
            .map(|(index, (node, online))| {
                let mut node = FakeNode::new(node, index + 1);
                node.online = *online;
                node
            })
            .collect();
        let mut state = self.shared.lock();
        state.config_version += 1;
        let config_version = state.config_version;
        let mut cluster = Cluster {
            name: name.to_owned(),
            nodes,
            quorate: true,
            config_version,
        };
        cluster.recompute_quorum();
        state.topology = Topology::Cluster(cluster);
    }

    /// Replaces the topology with a single node that is in no cluster.
    pub fn set_standalone(&self, node: &str) {
        let mut node = FakeNode::new(node, 0);
        node.ip = "192.168.1.10".to_owned();
        self.shared.lock().topology = Topology::Standalone(node);
    }

    /// Forces the quorum flag; the next [`Self::set_node_online`] recomputes it.
    pub fn set_quorate(&self, quorate: bool) {
        self.shared.lock().cluster_mut().quorate = quorate;
    }

    /// Marks a cluster member online or offline and recomputes quorum from the majority.
    pub fn set_node_online(&self, name: &str, online: bool) {
        let mut state = self.shared.lock();
        let cluster = state.cluster_mut();
        cluster.node_mut(name).online = online;
        cluster.recompute_quorum();
    }

    /// A stale node has no RRD data (pvestatd stopped), so `/nodes` reports it as `unknown`.
    pub fn set_node_stale(&self, name: &str, stale: bool) {
        let mut state = self.shared.lock();
        match &mut state.topology {
            Topology::Cluster(cluster) => cluster.node_mut(name).stale = stale,
            Topology::Standalone(node) if node.name == name => node.stale = stale,
            Topology::Standalone(node) => {
                panic!("no node {name:?}; the fake is standalone {:?}", node.name)
            }
        }
    }

    /// `ssl_fingerprint` of a node as `/nodes` reports it (upper-case hex pairs with colons).
    pub fn node_fingerprint(&self, name: &str) -> Option<String> {
        let state = self.shared.lock();
        state
            .topology
            .nodes()
            .iter()
            .find(|node| node.name == name)
            .map(|node| node.fingerprint.clone())
    }

    /// Sets the pve-manager version: `"8.4.1"`-style (release `8.4`) or `"7.4-3"`-style (release
    /// `7.4`). Versions before 8.4 leave `message` out of error bodies, as pveproxy did before
    /// pve-http-server 5.2.0; 8.4.17+ and 9.1.5+ answer `Authentication failed!` for bad tickets
    /// and tokens.
    pub fn set_version(&self, version: &str) {
        let mut state = self.shared.lock();
        state.version = version.to_owned();
        state.repoid = repoid_for(version);
    }

    // --- failure modes ----------------------------------------------------------------------

    /// Waits this long before answering anything (including failures).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().latency = latency;
    }

    /// How long 401s are held back (default [`DEFAULT_AUTH_FAILURE_DELAY`]).
    pub fn set_auth_failure_delay(&self, delay: Duration) {
        self.shared.lock().auth_failure_delay = delay;
    }

    /// How long a kept-alive connection may stay idle (default [`DEFAULT_KEEP_ALIVE_IDLE`]).
    pub fn set_keep_alive_idle(&self, idle: Duration) {
        self.shared
            .keep_alive_idle_ms
            .store(duration_ms(idle), Ordering::SeqCst);
    }

    /// Answers every request with this status, reason phrase and an empty body, e.g.
    /// `(500, "cluster not ready - no quorum?")` or `(595, "No route to host")`.
    pub fn fail_all(&self, failure: Option<(u16, &str)>) {
        if let Some((status, _)) = failure {
            assert!(
                StatusCode::from_u16(status).is_ok(),
                "{status} cannot be sent as an HTTP status"
            );
        }
        self.shared.lock().fail_all = failure.map(|(status, reason)| (status, reason.to_owned()));
    }

    /// Answers every request `301 Moved Permanently` with `Location: <target>`.
    pub fn set_redirect(&self, target: Option<String>) {
        self.shared.lock().redirect = target;
    }

    /// Answers every request 200 with an HTML page, as a web server that is not Proxmox would.
    pub fn set_garbage(&self, garbage: bool) {
        self.shared.lock().garbage = garbage;
    }

    /// While down, new connections are reset right after accept and open ones are reset on their
    /// next read or write, so clients see the server as unreachable.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    // --- observations -----------------------------------------------------------------------

    /// Full tickets issued by `POST /access/ticket`, refreshes included.
    pub fn logins(&self) -> u64 {
        self.shared.lock().stats.logins
    }

    /// Tickets issued by presenting a still-valid ticket as the password.
    pub fn ticket_refreshes(&self) -> u64 {
        self.shared.lock().stats.refreshes
    }

    /// `POST /access/ticket` calls answered 401.
    pub fn failed_logins(&self) -> u64 {
        self.shared.lock().stats.failed_logins
    }

    /// Requests received for `path` (e.g. `"/api2/json/cluster/status"`), whatever the answer.
    pub fn requests(&self, path: &str) -> u64 {
        self.shared
            .lock()
            .stats
            .per_path
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Requests received on any path.
    pub fn total_requests(&self) -> u64 {
        self.shared.lock().stats.total
    }

    /// The most recent request for `path`.
    pub fn last_request(&self, path: &str) -> Option<RecordedRequest> {
        self.shared.lock().stats.last.get(path).cloned()
    }

    /// Headers of the most recent request for `path`.
    pub fn last_request_headers(&self, path: &str) -> Option<HeaderMap> {
        self.last_request(path).map(|request| request.headers)
    }

    /// Every request received so far (the most recent 10 000), oldest first.
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().stats.log.iter().cloned().collect()
    }

    /// Zeroes the counters and forgets recorded requests.
    pub fn reset_counters(&self) {
        self.shared.lock().stats = Stats::default();
    }
}

// --- state --------------------------------------------------------------------------------------

#[derive(Clone)]
struct Account {
    password: String,
    two_factor: bool,
    sys_audit: bool,
}

struct ApiToken {
    secret: String,
    sys_audit: bool,
}

struct IssuedTicket {
    user: String,
    issued_at: i64,
    /// A `!tfa!` half ticket, waiting for the second factor.
    tfa_pending: bool,
}

struct IssuedCsrf {
    user: String,
    issued_at: i64,
}

struct FakeNode {
    name: String,
    nodeid: usize,
    ip: String,
    online: bool,
    stale: bool,
    fingerprint: String,
}

impl FakeNode {
    fn new(name: &str, nodeid: usize) -> Self {
        Self {
            name: name.to_owned(),
            nodeid,
            ip: format!("10.0.0.{}", 10 + nodeid),
            online: true,
            stale: false,
            fingerprint: random_bytes(32)
                .iter()
                .map(|byte| format!("{byte:02X}"))
                .collect::<Vec<_>>()
                .join(":"),
        }
    }
}

struct Cluster {
    name: String,
    nodes: Vec<FakeNode>,
    quorate: bool,
    config_version: u64,
}

impl Cluster {
    fn recompute_quorum(&mut self) {
        let online = self.nodes.iter().filter(|node| node.online).count();
        self.quorate = online * 2 > self.nodes.len();
    }

    fn node_mut(&mut self, name: &str) -> &mut FakeNode {
        let known: Vec<String> = self.nodes.iter().map(|node| node.name.clone()).collect();
        self.nodes
            .iter_mut()
            .find(|node| node.name == name)
            .unwrap_or_else(|| panic!("no node {name:?} in the fake cluster; nodes are {known:?}"))
    }
}

enum Topology {
    Cluster(Cluster),
    Standalone(FakeNode),
}

impl Topology {
    fn nodes(&self) -> &[FakeNode] {
        match self {
            Self::Cluster(cluster) => &cluster.nodes,
            Self::Standalone(node) => std::slice::from_ref(node),
        }
    }
}

#[derive(Default)]
struct Stats {
    logins: u64,
    refreshes: u64,
    failed_logins: u64,
    total: u64,
    per_path: HashMap<String, u64>,
    last: HashMap<String, RecordedRequest>,
    log: VecDeque<RecordedRequest>,
}

struct FakeState {
    users: HashMap<String, Account>,
    /// Keyed by the full token id `user@realm!name`.
    tokens: HashMap<String, ApiToken>,
    tickets: HashMap<String, IssuedTicket>,
    csrf_tokens: HashMap<String, IssuedCsrf>,
    topology: Topology,
    config_version: u64,
    version: String,
    repoid: String,
    boot_time: i64,
    latency: Duration,
    auth_failure_delay: Duration,
    fail_all: Option<(u16, String)>,
    redirect: Option<String>,
    garbage: bool,
    clock_offset: Duration,
    stats: Stats,
}

impl FakeState {
    fn new() -> Self {
        let mut users = HashMap::new();
        users.insert(
            DEFAULT_USER.to_owned(),
            Account {
                password: DEFAULT_PASSWORD.to_owned(),
                two_factor: false,
                sys_audit: true,
            },
        );
        let nodes = DEFAULT_NODES
            .iter()
            .enumerate()
            .map(|(index, name)| FakeNode::new(name, index + 1))
            .collect();
        let mut state = Self {
            users,
            tokens: HashMap::new(),
            tickets: HashMap::new(),
            csrf_tokens: HashMap::new(),
            topology: Topology::Cluster(Cluster {
                name: DEFAULT_CLUSTER.to_owned(),
                nodes,
                quorate: true,
                config_version: DEFAULT_NODES.len() as u64,
            }),
            config_version: DEFAULT_NODES.len() as u64,
            version: DEFAULT_VERSION.to_owned(),
            repoid: repoid_for(DEFAULT_VERSION),
            boot_time: 0,
            latency: Duration::ZERO,
            auth_failure_delay: DEFAULT_AUTH_FAILURE_DELAY,
            fail_all: None,
            redirect: None,
            garbage: false,
            clock_offset: Duration::ZERO,
            stats: Stats::default(),
        };
        state.boot_time = state.now_secs() - 86_400;
        state
    }

    fn now_secs(&self) -> i64 {
        let now = SystemTime::now() + self.clock_offset;
        now.duration_since(UNIX_EPOCH).map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        })
    }

    fn account_mut(&mut self, user: &str) -> &mut Account {
        self.users
            .get_mut(user)
            .unwrap_or_else(|| panic!("the fake Proxmox VE has no user {user:?}; add_user first"))
    }

    fn cluster_mut(&mut self) -> &mut Cluster {
        match &mut self.topology {
            Topology::Cluster(cluster) => cluster,
            Topology::Standalone(node) => {
                panic!(
                    "the fake is a standalone node {:?}, not a cluster",
                    node.name
                )
            }
        }
    }

    fn version_triple(&self) -> (u32, u32, u32) {
        let mut parts = self
            .version
            .split(['.', '-'])
            .map(|part| part.parse::<u32>().unwrap_or(0));
        let mut next = || parts.next().unwrap_or(0);
        (next(), next(), next())
    }

    /// pve-http-server 5.2.0 (PVE 8.4) added `message` to JSON error bodies.
    fn has_body_messages(&self) -> bool {
        self.version_triple() >= (8, 4, 0)
    }

    /// pve-manager 8.4.17 / 9.1.5 replaced the specific ticket and token errors.
    fn has_generic_auth_errors(&self) -> bool {
        let version = self.version_triple();
        ((8, 4, 17)..(9, 0, 0)).contains(&version) || version >= (9, 1, 5)
    }

    fn record(&mut self, parts: &Parts, body: &Bytes) -> Duration {
        let path = parts.uri.path().to_owned();
        let request = RecordedRequest {
            method: parts.method.clone(),
            uri: parts
                .uri
                .path_and_query()
                .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned()),
            headers: parts.headers.clone(),
            body: body.clone(),
        };
        let stats = &mut self.stats;
        stats.total += 1;
        *stats.per_path.entry(path.clone()).or_default() += 1;
        stats.last.insert(path, request.clone());
        if stats.log.len() >= MAX_RECORDED_REQUESTS {
            stats.log.pop_front();
        }
        stats.log.push_back(request);
        self.latency
    }

    /// Decides the whole answer synchronously, so the lock is never held across an `.await`.
    fn answer(&mut self, parts: &Parts, body: &Bytes, started: Instant) -> Answer {
        if let Some((status, reason)) = &self.fail_all {
            return Answer::now(reply(*status, Some(reason), None, Vec::new()));
        }
        if let Some(target) = &self.redirect {
            let mut response = reply(301, Some("Moved Permanently"), None, Vec::new());
            if let Ok(location) = HeaderValue::from_str(target) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            return Answer::now(response);
        }
        if self.garbage {
            return Answer::now(html_page(
                "<html><head><title>Welcome to nginx!</title></head>\
                 <body><h1>Welcome to nginx!</h1></body></html>",
            ));
        }

        // The order of checks follows pve-http-server's `unshift_read_header`: method,
        // transfer encoding, URI format, authentication, then body and handler lookup.
        let method = parts.method.as_str();
        if !matches!(method, "GET" | "POST" | "PUT" | "DELETE") {
            return Answer::now(empty(501, &format!("method '{method}' not available")));
        }
        if let Some(encoding) = parts.headers.get(header::TRANSFER_ENCODING) {
            let encoding = header_text(encoding);
            let reason = if encoding.eq_ignore_ascii_case("chunked") {
                "chunked transfer encoding not supported".to_owned()
            } else {
                format!("Unknown transfer encoding '{encoding}'")
            };
            return Answer::now(empty(501, &reason));
        }
        let path = percent_decode(parts.uri.path(), false);
        let Some(rest) = path.strip_prefix("/api2") else {
            return Answer::now(static_page(method, &path));
        };
        let Some((format, rel)) = split_format(rest) else {
            return Answer::now(empty(501, "no such uri"));
        };
        let auth = match self.authenticate(method, &rel, &parts.headers) {
            Ok(auth) => auth,
            Err(reason) => {
                return Answer::until(empty(401, &reason), started + self.auth_failure_delay);
            }
        };
        if content_length(&parts.headers) > 0 && !matches!(method, "POST" | "PUT") {
            return Answer::now(empty(
                501,
                &format!("Unexpected content for method '{method}'"),
            ));
        }
        if format != "json" {
            return Answer::now(empty(501, &format!("no formatter for uri {rel}, {format}")));
        }
        self.route(method, &rel, parts, body, &auth, started)
    }

    fn route(
        &mut self,
        method: &str,
        rel: &str,
        parts: &Parts,
        body: &Bytes,
        auth: &Auth,
        started: Instant,
    ) -> Answer {
        let route: Vec<&str> = rel.split('/').filter(|part| !part.is_empty()).collect();
        let response = match (method, route.as_slice()) {
            ("GET", []) => json_data(json!([
                {"subdir": "version"}, {"subdir": "cluster"}, {"subdir": "nodes"},
                {"subdir": "storage"}, {"subdir": "pools"}, {"subdir": "access"},
            ])),
            ("GET", ["version"]) => json_data(json!({
                "version": self.version,
                "release": release_of(&self.version),
                "repoid": self.repoid,
            })),
            ("GET", ["cluster", "status"]) => self.cluster_status(auth),
            ("GET", ["nodes"]) => self.nodes(auth),
            ("GET", ["access", "ticket"]) => json_data(Value::Null),
            ("GET", ["access", "domains"]) => json_data(json!([
                {"realm": "pam", "type": "pam", "comment": "Linux PAM standard authentication"},
                {"realm": "pve", "type": "pve", "comment": "Proxmox VE authentication server"},
            ])),
            ("POST", ["access", "ticket"]) => return self.login(parts, body, auth, started),
            _ => self.api_error(
                501,
                &format!("Method '{method} {rel}' not implemented"),
                None,
            ),
        };
        Answer::now(response)
    }

    // --- authentication ---------------------------------------------------------------------

    /// pve-manager `auth_handler`: the error is the 401 reason phrase.
    fn authenticate(&self, method: &str, rel: &str, headers: &HeaderMap) -> Result<Auth, String> {
        let cookies = headers
            .get_all(header::COOKIE)
            .iter()
            .map(header_text)
            .collect::<Vec<_>>()
            .join("; ");
        let authorization = headers.get(header::AUTHORIZATION).map(header_text);
        // A cookie wins over `Authorization: PVEAuthCookie=…`, which wins over a token.
        let ticket = extract_auth_value(&cookies, "PVEAuthCookie").or_else(|| {
            authorization
                .as_deref()
                .and_then(|value| extract_auth_value(value, "PVEAuthCookie"))
        });
        let api_token = match &ticket {
            Some(_) => None,
            None => authorization
                .as_deref()
                .and_then(|value| extract_auth_value(value, "PVEAPIToken")),
        };

        let open = matches!(
            (method, rel),
            ("GET", "/access/domains")
                | ("GET" | "POST", "/access/ticket")
                | ("POST", "/access/vncticket")
                | ("POST", "/access/openid/login")
                | ("POST", "/access/openid/auth-url")
        );
        if open {
            return Ok(Auth {
                principal: None,
                api_token: api_token.is_some(),
            });
        }
        if let Some(token) = api_token {
            return self.verify_token(&token).map(|principal| Auth {
                principal: Some(principal),
                api_token: true,
            });
        }

        let ticket = ticket.ok_or("No ticket")?;
        let invalid = if self.has_generic_auth_errors() {
            "Authentication failed!"
        } else {
            "permission denied - invalid PVE ticket"
        };
        let issued = self.verify_ticket(&ticket).ok_or(invalid)?;
        if issued.tfa_pending {
            return Err("No ticket".to_owned());
        }
        let account = self
            .users
            .get(&issued.user)
            .ok_or_else(|| format!("no such user ('{}')", issued.user))?;
        if method != "GET" {
            let csrf = headers.get(CSRF_HEADER).map(header_text);
            if !csrf.is_some_and(|token| self.verify_csrf(&issued.user, &token)) {
                return Err("Permission denied - invalid csrf token".to_owned());
            }
        }
        Ok(Auth {
            principal: Some(Principal {
                sys_audit: account.sys_audit,
            }),
            api_token: false,
        })
    }

    /// pve-access-control `verify_token`: `user@realm!name=secret`, split at the last `=`.
    fn verify_token(&self, value: &str) -> Result<Principal, String> {
        let generic = self.has_generic_auth_errors();
        let fail = |specific: String| {
            if generic {
                "Authentication failed!".to_owned()
            } else {
                specific
            }
        };
        let (tokenid, secret) = value
            .rsplit_once('=')
            .ok_or_else(|| fail("no tokenid specified".to_owned()))?;
        let (user, name) = tokenid
            .rsplit_once('!')
            .filter(|(user, name)| !user.is_empty() && is_token_name(name))
            .ok_or_else(|| {
                fail(format!(
                    "'{tokenid}' is not a valid token ID - not able to split into user and token parts"
                ))
            })?;
        if !self.users.contains_key(user) {
            return Err(fail(format!("no such user ('{user}')")));
        }
        let token = self
            .tokens
            .get(tokenid)
            .ok_or_else(|| fail(format!("no such token '{name}' for user '{user}'")))?;
        if token.secret != secret {
            return Err(fail("invalid token value!".to_owned()));
        }
        Ok(Principal {
            sys_audit: token.sys_audit,
        })
    }

    fn ticket_age_ok(&self, issued_at: i64) -> bool {
        let age = self.now_secs() - issued_at;
        age > -TICKET_CLOCK_SKEW_SECS && age < TICKET_LIFETIME_SECS
    }

    fn verify_ticket(&self, ticket: &str) -> Option<&IssuedTicket> {
        self.tickets
            .get(ticket)
            .filter(|issued| self.ticket_age_ok(issued.issued_at))
    }

    /// The CSRF token is bound to the user name, not to one ticket.
    fn verify_csrf(&self, user: &str, token: &str) -> bool {
        self.csrf_tokens
            .get(token)
            .is_some_and(|issued| issued.user == user && self.ticket_age_ok(issued.issued_at))
    }

    fn mint_ticket(&mut self, data: &str, user: &str, tfa_pending: bool) -> String {
        let now = self.now_secs();
        // An RSA-2048 signature, base64 with padding, as `PVE::Ticket::assemble_rsa_ticket`.
        let ticket = format!(
            "PVE:{}:{now:08X}::{}",
            data.replace(':', "%3A"),
            base64(&random_bytes(256), true)
        );
        self.tickets.insert(
            ticket.clone(),
            IssuedTicket {
                user: user.to_owned(),
                issued_at: now,
                tfa_pending,
            },
        );
        ticket
    }

    fn mint_csrf(&mut self, user: &str) -> String {
        let now = self.now_secs();
        // `Digest::SHA::hmac_sha256_base64` leaves the padding off.
        let token = format!("{now:08X}:{}", base64(&random_bytes(32), false));
        self.csrf_tokens.insert(
            token.clone(),
            IssuedCsrf {
                user: user.to_owned(),
                issued_at: now,
            },
        );
        token
    }

    // --- handlers ---------------------------------------------------------------------------

    /// `POST /access/ticket` (pve-access-control `create_ticket`).
    fn login(&mut self, parts: &Parts, body: &Bytes, auth: &Auth, started: Instant) -> Answer {
        if auth.api_token {
            return Answer::now(self.api_error(
                403,
                "Permission check failed (URI '/access/ticket' not available with API token, \
                 need proper ticket.\n)\n",
                None,
            ));
        }
        let params = match extract_params(parts, body) {
            Ok(params) => params,
            Err(reason) => return Answer::now(empty(501, &reason)),
        };
        if let Err(errors) = validate_login_params(&params) {
            return Answer::now(self.api_error(
                400,
                "Parameter verification failed.\n",
                Some(errors),
            ));
        }
        let param = |name: &str| params.get(name).cloned().flatten();
        let mut username = param("username").unwrap_or_default();
        if let Some(realm) = param("realm").filter(|realm| !realm.is_empty()) {
            username = format!("{username}@{realm}");
        }
        let password = param("password").unwrap_or_default();
        let verify = param("path").zip(param("privs"));
        let result = match verify {
            Some((path, privs)) => self.verify_auth(&username, &password, &path, &privs),
            None => self.create_ticket(&username, &password, param("tfa-challenge").as_deref()),
        };
        match result {
            Some(data) => Answer::now(json_data(data)),
            None => {
                self.stats.failed_logins += 1;
                let response = self.api_error(401, "authentication failure\n", None);
                Answer::until(response, started + self.auth_failure_delay)
            }
        }
    }

    fn create_ticket(
        &mut self,
        username: &str,
        password: &str,
        tfa_challenge: Option<&str>,
    ) -> Option<Value> {
        let account = self.users.get(username)?.clone();
        // A valid full ticket of the same user (or of root@pam) refreshes without a password or
        // second factor.
        let refresh = tfa_challenge.is_none()
            && self.verify_ticket(password).is_some_and(|issued| {
                !issued.tfa_pending && (issued.user == username || issued.user == DEFAULT_USER)
            });
        let need_tfa = if refresh {
            false
        } else {
            if tfa_challenge.is_some() || account.password != password {
                return None;
            }
            account.two_factor
        };

        let ticket = if need_tfa {
            let challenge = percent_encode(r#"{"totp":true}"#);
            self.mint_ticket(&format!("!tfa!{challenge}"), username, true)
        } else {
            self.stats.logins += 1;
            if refresh {
                self.stats.refreshes += 1;
            }
            self.mint_ticket(username, username, false)
        };
        let csrf = self.mint_csrf(username);
        let mut data = json!({
            "username": username,
            "ticket": ticket,
            "CSRFPreventionToken": csrf,
        });
        if need_tfa {
            data["NeedTFA"] = json!(1);
        } else {
            data["cap"] = capabilities(username, account.sys_audit);
        }
        if let Topology::Cluster(cluster) = &self.topology
            && account.sys_audit
        {
            data["clustername"] = json!(cluster.name);
        }
        Some(data)
    }

    /// The `path` + `privs` form only checks credentials and privileges.
    fn verify_auth(
        &self,
        username: &str,
        password: &str,
        path: &str,
        privs: &str,
    ) -> Option<Value> {
        let account = self.users.get(username)?;
        let by_ticket = self
            .verify_ticket(password)
            .is_some_and(|issued| !issued.tfa_pending && issued.user == username);
        if !by_ticket && account.password != password {
            return None;
        }
        let privs: Vec<&str> = privs
            .split([',', ';', ' '])
            .filter(|privilege| !privilege.is_empty())
            .collect();
        let allowed = !privs.is_empty()
            && (username == DEFAULT_USER
                || (path == "/" && account.sys_audit && privs.iter().all(|p| *p == "Sys.Audit")));
        allowed.then(|| json!({ "username": username }))
    }

    /// `GET /cluster/status`: Sys.Audit on `/`, entries in random (Perl hash) order.
    fn cluster_status(&self, auth: &Auth) -> Response {
        if !auth.sys_audit() {
            return self.api_error(403, "Permission check failed (/, Sys.Audit)\n", None);
        }
        let mut entries = Vec::new();
        match &self.topology {
            Topology::Cluster(cluster) => {
                entries.push(json!({
                    "type": "cluster",
                    "id": "cluster",
                    "name": cluster.name,
                    "nodes": cluster.nodes.len(),
                    "quorate": flag(cluster.quorate),
                    "version": cluster.config_version,
                }));
                for (index, node) in cluster.nodes.iter().enumerate() {
                    entries.push(json!({
                        "type": "node",
                        "id": format!("node/{}", node.name),
                        "name": node.name,
                        "nodeid": node.nodeid,
                        "ip": node.ip,
                        "local": flag(index == 0),
                        "online": flag(node.online),
                        "level": "",
                    }));
                }
            }
            Topology::Standalone(node) => entries.push(json!({
                "type": "node",
                "id": format!("node/{}", node.name),
                "name": node.name,
                "nodeid": 0,
                "ip": node.ip,
                "local": 1,
                "online": 1,
                "level": "",
            })),
        }
        shuffle(&mut entries);
        json_data(Value::Array(entries))
    }

    /// `GET /nodes` (pve-manager `Nodes.pm` index and `API2Tools::extract_node_stats`).
    fn nodes(&self, auth: &Auth) -> Response {
        let audit = auth.sys_audit();
        let clustered = matches!(self.topology, Topology::Cluster(_));
        let uptime = (self.now_secs() - self.boot_time).max(0);
        let mut entries: Vec<Value> = self
            .topology
            .nodes()
            .iter()
            .map(|node| {
                let mut entry = json!({
                    "id": format!("node/{}", node.name),
                    "node": node.name,
                    "type": "node",
                    "status": "unknown",
                });
                if !node.stale {
                    if !clustered || node.online {
                        entry["status"] = json!("online");
                        if audit {
                            entry["uptime"] = json!(uptime);
                            entry["cpu"] = json!(0.01 + random_fraction() * 0.24);
                            entry["mem"] = json!(4_000_000_000 + random_u64() % 8_000_000_000);
                            entry["disk"] = json!(5_368_709_120_u64);
                        }
                    }
                    // RRD data lingers for a while after a node goes offline.
                    entry["level"] = json!("");
                    if audit {
                        entry["maxcpu"] = json!(16);
                        entry["maxmem"] = json!(67_305_984_000_u64);
                        entry["maxdisk"] = json!(100_861_726_720_u64);
                    }
                }
                if clustered && !node.online {
                    entry["status"] = json!("offline");
                }
                entry["ssl_fingerprint"] = json!(node.fingerprint);
                entry
            })
            .collect();
        shuffle(&mut entries);
        json_data(Value::Array(entries))
    }

    /// A handler error: the first line of `message` is the reason phrase; from 8.4 on the body
    /// carries the whole message too.
    fn api_error(&self, status: u16, message: &str, errors: Option<Value>) -> Response {
        let mut body = Map::new();
        body.insert("data".to_owned(), Value::Null);
        if let Some(errors) = errors {
            body.insert("errors".to_owned(), errors);
        }
        if self.has_body_messages() {
            body.insert("message".to_owned(), json!(message));
        }
        reply(
            status,
            Some(message),
            Some(JSON_CONTENT_TYPE),
            Value::Object(body).to_string().into_bytes(),
        )
    }
}

struct Auth {
    /// `None` for the calls that need no authentication.
    principal: Option<Principal>,
    /// Whether a `PVEAPIToken` header came along, verified or not.
    api_token: bool,
}

impl Auth {
    fn sys_audit(&self) -> bool {
        self.principal
            .as_ref()
            .is_some_and(|principal| principal.sys_audit)
    }
}

struct Principal {
    sys_audit: bool,
}

struct Answer {
    response: Response,
    /// Auth failures must not leave before this instant.
    not_before: Option<Instant>,
}

impl Answer {
    fn now(response: Response) -> Self {
        Self {
            response,
            not_before: None,
        }
    }

    fn until(response: Response, not_before: Instant) -> Self {
        Self {
            response,
            not_before: Some(not_before),
        }
    }
}

// --- HTTP plumbing ------------------------------------------------------------------------------

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnInfo>,
    request: Request,
) -> Response {
    let busy = conn.state.begin_request();
    let (parts, body) = request.into_parts();
    let close_after =
        wants_close(&parts.headers) || busy.nth_request >= MAX_REQUESTS_PER_CONNECTION;
    if content_length(&parts.headers) > MAX_POST_BYTES as u64 {
        shared.lock().record(&parts, &Bytes::new());
        return finish(empty(501, "for data too large"), true);
    }
    let Ok(body) = axum::body::to_bytes(body, MAX_POST_BYTES).await else {
        // The client went away or sent a broken body; nobody reads this answer.
        return finish(empty(400, "bad request body"), true);
    };
    let latency = shared.lock().record(&parts, &body);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let started = Instant::now();
    let answer = shared.lock().answer(&parts, &body, started);
    if let Some(not_before) = answer.not_before {
        tokio::time::sleep_until(not_before).await;
    }
    finish(answer.response, close_after)
}

/// Adds the headers pveproxy puts on every response.
fn finish(mut response: Response, close_after: bool) -> Response {
    let close = close_after || response.status().as_u16() >= 400;
    let now = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let headers = response.headers_mut();
    headers.insert(
        header::SERVER,
        HeaderValue::from_static("pve-api-daemon/3.0"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=0"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if let Ok(expires) = HeaderValue::from_str(&now) {
        headers.insert(header::EXPIRES, expires);
    }
    headers.insert(
        header::CONNECTION,
        HeaderValue::from_static(if close { "close" } else { "Keep-Alive" }),
    );
    response
}

fn reply(
    status: u16,
    reason: Option<&str>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(content_type) = content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    // pveproxy sends only the first line of the message as the reason phrase.
    let reason = reason
        .and_then(|reason| reason.lines().next())
        .unwrap_or("");
    if !reason.is_empty()
        && let Ok(phrase) = ReasonPhrase::try_from(reason.as_bytes())
    {
        response.extensions_mut().insert(phrase);
    }
    response
}

fn empty(status: u16, reason: &str) -> Response {
    reply(status, Some(reason), None, Vec::new())
}

fn json_data(data: Value) -> Response {
    let body = json!({ "data": data }).to_string().into_bytes();
    reply(200, None, Some(JSON_CONTENT_TYPE), body)
}

fn html_page(html: &str) -> Response {
    let body = format!("<!DOCTYPE html>\n{html}\n").into_bytes();
    reply(200, None, Some("text/html;charset=UTF-8"), body)
}

fn static_page(method: &str, path: &str) -> Response {
    if method == "GET" && path == "/" {
        return html_page(
            "<html><head><title>pve1 - Proxmox Virtual Environment</title></head><body></body></html>",
        );
    }
    empty(501, &format!("no such file '{path}'"))
}

fn flag(value: bool) -> u8 {
    u8::from(value)
}

fn capabilities(user: &str, sys_audit: bool) -> Value {
    if user == DEFAULT_USER {
        return json!({
            "vms": {"VM.Allocate": 1, "VM.Audit": 1, "VM.Config.Options": 1, "VM.PowerMgmt": 1, "VM.Console": 1},
            "storage": {"Datastore.Allocate": 1, "Datastore.AllocateSpace": 1, "Datastore.Audit": 1},
            "access": {"User.Modify": 1, "Group.Allocate": 1, "Permissions.Modify": 1, "Sys.Audit": 1},
            "nodes": {"Sys.Audit": 1, "Sys.Console": 1, "Sys.Modify": 1, "Sys.PowerMgmt": 1, "Sys.Syslog": 1},
            "dc": {"Sys.Audit": 1, "Sys.Modify": 1, "SDN.Allocate": 1, "SDN.Audit": 1},
            "sdn": {"SDN.Allocate": 1, "SDN.Audit": 1, "SDN.Use": 1},
            "mapping": {"Mapping.Audit": 1, "Mapping.Modify": 1, "Mapping.Use": 1},
        });
    }
    let audit = if sys_audit {
        json!({"Sys.Audit": 1})
    } else {
        json!({})
    };
    json!({
        "vms": {}, "storage": {}, "access": {}, "nodes": audit, "dc": audit, "sdn": {}, "mapping": {},
    })
}

/// `^/api2/+([a-z][a-z0-9]+)(/.*)?$` after the `/api2` prefix.
fn split_format(rest: &str) -> Option<(String, String)> {
    let trimmed = rest.trim_start_matches('/');
    if trimmed.len() == rest.len() {
        return None;
    }
    let (format, rel) = trimmed.split_at(trimmed.find('/').unwrap_or(trimmed.len()));
    let mut chars = format.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && format.len() >= 2
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    valid.then(|| {
        let rel = if rel.is_empty() { "/" } else { rel };
        (format.to_owned(), rel.to_owned())
    })
}

/// pve-http-server `extract_auth_value`: `key=value` or `key value` at the start or after
/// whitespace, up to `;`, percent-decoded. An empty value counts as absent.
fn extract_auth_value(header: &str, key: &str) -> Option<String> {
    let mut from = 0;
    while let Some(found) = header[from..].find(key) {
        let start = from + found;
        let after = &header[start + key.len()..];
        let at_word_start = header[..start]
            .chars()
            .next_back()
            .is_none_or(char::is_whitespace);
        if at_word_start && (after.starts_with('=') || after.starts_with(' ')) {
            let value = after[1..].split(';').next().unwrap_or_default();
            return (!value.is_empty()).then(|| percent_decode(value, false));
        }
        from = start + key.len();
    }
    None
}

fn is_token_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

type Params = HashMap<String, Option<String>>;

/// pve-http-server `extract_params`: a form or JSON body, with URL query parameters on top.
fn extract_params(parts: &Parts, body: &Bytes) -> Result<Params, String> {
    let mut params = Params::new();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(header_text)
        .unwrap_or_default();
    let media_type = content_type
        .split([';', ','])
        .next()
        .unwrap_or_default()
        .trim();
    if media_type == "application/json" {
        let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
            return Err("malformed JSON string".to_owned());
        };
        for (key, value) in object {
            let value = match value {
                Value::Null => None,
                Value::String(text) => Some(text),
                Value::Bool(flag) => Some(u8::from(flag).to_string()),
                other => Some(other.to_string()),
            };
            params.insert(key, value);
        }
    } else {
        decode_urlencoded(&String::from_utf8_lossy(body), &mut params);
    }
    if let Some(query) = parts.uri.query() {
        let mut query_params = Params::new();
        decode_urlencoded(query, &mut query_params);
        params.extend(query_params);
    }
    params.remove("_dc");
    Ok(params)
}

/// pve-http-server `decode_urlencoded`, quirks included: `+` is a space, only the text up to a
/// second `=` counts, an empty value is undefined, repeated keys are joined with NUL.
fn decode_urlencoded(data: &str, params: &mut Params) {
    for pair in data.split(['&', ';']).filter(|pair| !pair.is_empty()) {
        let mut fields = pair.split('=');
        let key = percent_decode(fields.next().unwrap_or_default(), true);
        let value = fields
            .next()
            .filter(|value| !value.is_empty())
            .map(|value| percent_decode(value, true));
        match (params.get_mut(&key), value) {
            (Some(Some(old)), Some(value)) => *old = format!("{old}\0{value}"),
            (_, value) => {
                params.insert(key, value);
            }
        }
    }
}

fn validate_login_params(params: &Params) -> Result<(), Value> {
    let mut errors = Map::new();
    for key in params.keys() {
        if !LOGIN_PARAMS.contains(&key.as_str()) {
            errors.insert(
                key.clone(),
                json!("property is not defined in schema and the schema does not allow additional properties"),
            );
        }
    }
    for required in ["username", "password"] {
        if !matches!(params.get(required), Some(Some(_))) {
            errors.insert(
                required.to_owned(),
                json!("property is missing and it is not optional"),
            );
        }
    }
    if let Some(Some(username)) = params.get("username")
        && username.chars().count() > 64
    {
        errors.insert(
            "username".to_owned(),
            json!("value may only be 64 characters long"),
        );
    }
    if let Some(Some(value)) = params.get("new-format")
        && !matches!(
            value.to_ascii_lowercase().as_str(),
            "0" | "1" | "true" | "false" | "yes" | "no" | "on" | "off"
        )
    {
        errors.insert(
            "new-format".to_owned(),
            json!(format!("type check ('boolean') failed - got '{value}'")),
        );
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Value::Object(errors))
    }
}

fn content_length(headers: &HeaderMap) -> u64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| header_text(value).trim().parse().ok())
        .unwrap_or(0)
}

fn wants_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|value| header_text(value).to_ascii_lowercase().contains("close"))
}

fn header_text(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

fn percent_decode(input: &str, plus_as_space: bool) -> String {
    fn hex_value(byte: u8) -> Option<u8> {
        char::from(byte)
            .to_digit(16)
            .and_then(|digit| u8::try_from(digit).ok())
    }
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        let escaped = (byte == b'%')
            .then(|| {
                Some((
                    hex_value(*bytes.get(index + 1)?)?,
                    hex_value(*bytes.get(index + 2)?)?,
                ))
            })
            .flatten();
        if let Some((high, low)) = escaped {
            out.push((high << 4) | low);
            index += 3;
            continue;
        }
        out.push(if plus_as_space && byte == b'+' {
            b' '
        } else {
            byte
        });
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Escapes everything but RFC 3986 unreserved characters, like Perl's `uri_escape`.
fn percent_encode(input: &str) -> String {
    input
        .bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                char::from(byte).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

fn base64(bytes: &[u8], pad: bool) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |index: usize| u32::from(chunk.get(index).copied().unwrap_or(0));
        let group = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for position in 0..4 {
            if position <= chunk.len() {
                let sextet = (group >> (18 - 6 * position)) & 0x3f;
                out.push(char::from(ALPHABET[sextet as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Unpredictable enough for a fake: std's per-instance randomly keyed SipHash over a counter,
/// which needs no extra crate.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

fn random_fraction() -> f64 {
    // 53 random bits fill an f64 mantissa exactly.
    (random_u64() >> 11) as f64 / (1_u64 << 53) as f64
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        bytes.extend_from_slice(&random_u64().to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// Fisher–Yates, standing in for Perl's hash order.
fn shuffle<T>(items: &mut [T]) {
    for last in (1..items.len()).rev() {
        let pick = usize::try_from(random_u64() % (last as u64 + 1)).unwrap_or(0);
        items.swap(last, pick);
    }
}

/// 7.x reports an 8-hex `repoid`, 8.x and later 16 hex digits.
fn repoid_for(version: &str) -> String {
    let major: u32 = version
        .split(['.', '-'])
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or(8);
    hex::encode(random_bytes(if major >= 8 { 8 } else { 4 }))
}

/// `7.4-3` → `7.4` (the Debian upstream part); `8.4.1` → `8.4` (the first two dot parts).
fn release_of(version: &str) -> String {
    if let Some((upstream, _)) = version.split_once('-') {
        return upstream.to_owned();
    }
    version.split('.').take(2).collect::<Vec<_>>().join(".")
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

// --- connections --------------------------------------------------------------------------------

/// Accepts like a `TcpListener`, except that while the fake is down it resets every new
/// connection, and it wraps sockets in [`FakeIo`].
struct FakeListener {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Listener for FakeListener {
    type Io = FakeIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    if self.shared.is_down() {
                        // Zero linger turns the close into a RST: "connection reset by peer".
                        let _ = stream.set_zero_linger();
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let io = FakeIo {
                        stream,
                        shared: Arc::clone(&self.shared),
                        conn: Arc::new(ConnState::new()),
                        idle_timer: None,
                    };
                    return (io, peer);
                }
                // Running out of file descriptors is the usual cause; axum backs off the same way.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// Per-connection bookkeeping shared between the socket wrapper and the handler.
struct ConnState {
    in_flight: AtomicUsize,
    requests: AtomicU64,
    last_activity: Mutex<Instant>,
}

impl ConnState {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_activity: Mutex::new(Instant::now()),
        }
    }

    fn touch(&self) {
        *self
            .last_activity
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    fn last_activity(&self) -> Instant {
        *self
            .last_activity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn begin_request(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let nth_request = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        Busy {
            conn: Arc::clone(self),
            nth_request,
        }
    }
}

/// Marks a connection busy while a handler runs, so the idle timer does not cut it off.
struct Busy {
    conn: Arc<ConnState>,
    nth_request: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.conn.touch();
        self.conn.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct ConnInfo {
    state: Arc<ConnState>,
}

impl Connected<IncomingStream<'_, FakeListener>> for ConnInfo {
    fn connect_info(stream: IncomingStream<'_, FakeListener>) -> Self {
        Self {
            state: Arc::clone(&stream.io().conn),
        }
    }
}

/// A socket that fails while the fake is down and reports end-of-file once the connection has
/// been idle for the keep-alive timeout, which makes hyper close it the way pveproxy does.
struct FakeIo {
    stream: TcpStream,
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    idle_timer: Option<Pin<Box<Sleep>>>,
}

impl FakeIo {
    fn reset(&self) -> io::Error {
        let _ = self.stream.set_zero_linger();
        io::Error::from(io::ErrorKind::ConnectionReset)
    }

    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let now = Instant::now();
            let idle = self.shared.keep_alive_idle();
            let deadline = if self.conn.in_flight.load(Ordering::SeqCst) > 0 {
                now + idle
            } else {
                self.conn.last_activity() + idle
            };
            if deadline <= now {
                return Poll::Ready(Ok(()));
            }
            let timer = self
                .idle_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl AsyncRead for FakeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shared.is_down() {
            return Poll::Ready(Err(this.reset()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.conn.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => this.poll_idle(cx),
        }
    }
}

impl AsyncWrite for FakeIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.shared.is_down() {
            return Poll::Ready(Err(this.reset()));
        }
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            this.conn.touch();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.shared.is_down() {
            return Poll::Ready(Err(this.reset()));
        }
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            this.conn.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shared.is_down() {
            return Poll::Ready(Err(this.reset()));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_with_and_without_padding() {
        assert_eq!(base64(b"", true), "");
        assert_eq!(base64(b"f", true), "Zg==");
        assert_eq!(base64(b"fo", true), "Zm8=");
        assert_eq!(base64(b"foo", true), "Zm9v");
        assert_eq!(base64(b"fo", false), "Zm8");
        assert_eq!(base64(&[0xfb, 0xff], true), "+/8=");
    }

    #[test]
    fn release_is_derived_like_pve_manager_does() {
        assert_eq!(release_of("8.4.1"), "8.4");
        assert_eq!(release_of("9.0.3"), "9.0");
        assert_eq!(release_of("7.4-3"), "7.4");
    }

    #[test]
    fn auth_values_are_found_only_at_word_starts_and_percent_decoded() {
        assert_eq!(
            extract_auth_value(
                "a=b; PVEAuthCookie=PVE%3Aroot%40pam:1::x+y=",
                "PVEAuthCookie"
            ),
            Some("PVE:root@pam:1::x+y=".to_owned())
        );
        assert_eq!(
            extract_auth_value("XPVEAuthCookie=nope", "PVEAuthCookie"),
            None
        );
        assert_eq!(
            extract_auth_value("PVEAPIToken root@pam!t=a=b", "PVEAPIToken"),
            Some("root@pam!t=a=b".to_owned())
        );
        assert_eq!(extract_auth_value("PVEAuthCookie=", "PVEAuthCookie"), None);
    }

    #[test]
    fn form_decoding_keeps_the_perl_quirks() {
        let mut params = Params::new();
        decode_urlencoded(
            "username=root%40pam&password=&otp=a=b&x=1;x=2&p=a+b",
            &mut params,
        );
        assert_eq!(params["username"].as_deref(), Some("root@pam"));
        assert_eq!(params["password"], None);
        assert_eq!(params["otp"].as_deref(), Some("a"));
        assert_eq!(params["x"].as_deref(), Some("1\u{0}2"));
        assert_eq!(params["p"].as_deref(), Some("a b"));
    }

    #[test]
    fn api_format_is_split_like_split_abs_uri() {
        assert_eq!(
            split_format("/json/cluster/status"),
            Some(("json".to_owned(), "/cluster/status".to_owned()))
        );
        assert_eq!(
            split_format("//json"),
            Some(("json".to_owned(), "/".to_owned()))
        );
        assert_eq!(split_format("/JSON/x"), None);
        assert_eq!(split_format("json/x"), None);
        assert_eq!(split_format(""), None);
    }
}
