//! A fake Proxmox VE 8.x API server (`pveproxy`) for integration tests.
//!
//! It serves plain HTTP ([`FakePve::start`]) or HTTPS ([`FakePve::start_tls`]) on `127.0.0.1` and
//! reproduces what `proxmoxer` relies on, including the awkward parts of the real server (sources:
//! `pve-api-facts.md`, pve-http-server `AnyEvent.pm`, pve-manager `HTTPServer.pm`,
//! pve-access-control, pve-cluster `Setup.pm` and `ClusterConfig.pm`):
//!
//! - auth failures are 401s with the cause in the reason phrase and an empty body, padded to
//!   [`DEFAULT_AUTH_FAILURE_DELAY`] after the request started;
//! - handler errors carry `{"data":null,"message":"…"}` (the `message` only from 8.4 on, as
//!   pve-http-server 5.2.0 added it), parameter errors an `errors` map;
//! - every response with status ≥ 400 says `Connection: close` and closes the connection;
//! - kept-alive connections are closed after [`DEFAULT_KEEP_ALIVE_IDLE`] without a request, and
//!   after 100 requests;
//! - `/cluster/status` and `/nodes` come back in a different order on every call, with 0/1
//!   integers instead of booleans;
//! - `/cluster/config/join` (join info) lists every member, offline ones included, in a different
//!   order on every call, with `nodeid` and `quorum_votes` sometimes strings and sometimes
//!   numbers (they come from corosync.conf); a standalone node fails it with 500 (424 from 9.0);
//! - in HTTPS mode, a node certificate signed by a per-fake cluster CA (like `pve-ssl.pem` and
//!   `pve-root-ca.pem`), reported as the answering node's `ssl_fingerprint` and join info
//!   `pve_fp`; renewal with [`FakePve::rotate_certificate`] behaves like a pveproxy reload; plain
//!   HTTP sent to the HTTPS port is redirected to `https://` (pve-http-server ≥ 4.2-1).
//!
//! Every address the fake reports is a loopback address. With one listener, the answering node
//! reports `127.0.0.1`, where it listens, and the other nodes `127.0.1.<nodeid>`, where nothing
//! listens, so a client that tries them gets "connection refused".
//!
//! Multi-node mode ([`FakePve::start_cluster`], [`FakePve::start_cluster_tls`]): one shared
//! cluster state (users, tokens, tickets, topology, clock, counters) and one listener per member,
//! all on the same port: the first member on `127.0.0.2`, the next on `127.0.0.3`, and so on. Each
//! member answers as itself (`local: 1`, `preferred_node`), tickets from one member work on all
//! of them (the authkey is cluster-wide), and in HTTPS mode each member serves its own
//! certificate from the one cluster CA. [`FakePve::member`] gives a [`FakeMember`] handle to stop,
//! partition, re-certify or count one member; [`FakePve::add_member`] and
//! [`FakePve::remove_member`] change the membership (and the corosync config version).
//!
//! Not reproduced: RSA keys (the certificates use ECDSA P-256, which is quicker to generate),
//! gzip bodies, the `/api2/extjs` and `/api2/html` formatters, forwarding to other nodes (fake
//! 595/596 with [`FakePve::fail_all`]), completing a second factor (every `tfa-challenge` answer
//! fails), authkey rotation (use [`FakePve::invalidate_tickets`]), ACL paths other than `/`, and
//! IPv6 node addresses.

// Shared by every test module of the `api` binary; each test uses only some of the controls.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use axum::serve::{IncomingStream, Listener};
use chrono::Datelike;
use hyper::ext::ReasonPhrase;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

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
/// The first byte of a TLS record that carries a handshake message, such as a ClientHello.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// pve-cluster `Setup.pm`: the cluster CA lasts 10 years, node certificates 2.
const CA_VALIDITY_DAYS: i64 = 3650;
const NODE_CERT_VALIDITY_DAYS: i64 = 730;

/// How many ports [`FakePve::start_cluster`] tries before giving up: another process may hold the
/// port the kernel picked for the first member on one of the other member addresses.
const CLUSTER_BIND_ATTEMPTS: usize = 20;
/// The last octet of the first member's address in multi-node mode: `127.0.0.2`, so that no
/// member shares `127.0.0.1` with the single-listener fakes and the daemon under test.
const FIRST_MEMBER_HOST: u8 = 2;
/// Third octet of the addresses reported for nodes without a listener: `127.0.1.<nodeid>`.
const UNREACHABLE_NET: u8 = 1;
/// Third octet of the corosync ring addresses: `127.0.2.<nodeid>`.
const RING_NET: u8 = 2;

/// A handle on a running fake Proxmox VE server (one listener, or one per member in multi-node
/// mode). Clones share the same server; the server stops when the last clone (or
/// [`FakeMember`]) is dropped.
#[derive(Clone)]
pub struct FakePve {
    shared: Arc<Shared>,
    fleet: Arc<Fleet>,
}

/// A handle on one member of a multi-node fake, from [`FakePve::member`]: its own listener on the
/// shared cluster state. It keeps the whole fake running.
#[derive(Clone)]
pub struct FakeMember {
    fake: FakePve,
    member: Arc<Member>,
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

/// What every listener of a fake shares: the cluster as pmxcfs would hold it.
struct Shared {
    /// [`FakePve::set_down`], for every listener at once.
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

    fn keep_alive_idle(&self) -> Duration {
        Duration::from_millis(self.keep_alive_idle_ms.load(Ordering::SeqCst))
    }
}

/// One listener: the pveproxy of one node.
struct Member {
    /// The node this listener answers as; `None` with a single listener, which answers as
    /// whichever node comes first in the topology (see [`FakePve::set_cluster`]).
    node: Option<String>,
    addr: SocketAddr,
    /// [`FakeMember::stop`] (or [`FakePve::remove_member`]).
    stopped: AtomicBool,
    /// Set in HTTPS mode.
    tls: Option<TlsState>,
    stats: Mutex<MemberStats>,
    /// TCP connections accepted, whatever happened next.
    connections: AtomicU64,
}

/// Requests one listener received; the cluster-wide counters are in [`Stats`].
#[derive(Default)]
struct MemberStats {
    total: u64,
    per_path: HashMap<String, u64>,
    /// Requests that carried a ticket or an API token, valid or not.
    authenticated: u64,
}

impl Member {
    fn new(node: Option<&str>, addr: SocketAddr, tls: Option<TlsState>) -> Self {
        Self {
            node: node.map(str::to_owned),
            addr,
            stopped: AtomicBool::new(false),
            tls,
            stats: Mutex::new(MemberStats::default()),
            connections: AtomicU64::new(0),
        }
    }

    fn is_down(&self, shared: &Shared) -> bool {
        self.stopped.load(Ordering::SeqCst) || shared.down.load(Ordering::SeqCst)
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn tls(&self) -> &TlsState {
        self.tls.as_ref().expect(
            "the fake Proxmox VE serves plain HTTP; start it with start_tls or start_cluster_tls",
        )
    }

    fn stats(&self) -> MutexGuard<'_, MemberStats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, parts: &Parts) {
        let mut stats = self.stats();
        stats.total += 1;
        *stats
            .per_path
            .entry(parts.uri.path().to_owned())
            .or_default() += 1;
        if carries_credentials(&parts.headers) {
            stats.authenticated += 1;
        }
    }

    /// The name of the node this listener answers as.
    fn node_name(&self, state: &FakeState) -> String {
        match &self.node {
            Some(name) => name.clone(),
            None => state.topology.nodes()[0].name.clone(),
        }
    }

    /// Serves a fresh certificate for this node, signed by the cluster CA or by itself, and
    /// returns its fingerprint.
    fn renew(&self, shared: &Shared, self_signed: bool) -> String {
        let node = self.node_name(&shared.lock());
        let tls = self.tls();
        let cert = if self_signed {
            NodeCert::self_signed(&node, &tls.addresses)
        } else {
            tls.ca.issue(&node, &tls.addresses)
        };
        tls.serve(cert)
    }

    /// Records `fingerprint` as this node's certificate in the cluster filesystem, where join
    /// info and `/nodes` read it.
    fn vouch(&self, state: &mut FakeState, fingerprint: String) {
        match &self.node {
            None => state.tls_fingerprint = Some(fingerprint),
            Some(name) => {
                if let Some(node) = state.topology.node_mut(name) {
                    node.fingerprint = fingerprint;
                }
            }
        }
    }
}

/// The listeners of a fake. Only [`FakePve`] handles hold it, never the server tasks (they hold
/// [`Shared`] and their own [`Member`]), so dropping the last handle stops every listener.
struct Fleet {
    /// Started with [`FakePve::start_cluster`] or [`FakePve::start_cluster_tls`].
    multi: bool,
    /// The first listener, which [`FakePve::url`] and the TLS getters refer to.
    primary: Arc<Member>,
    /// The cluster CA in HTTPS mode.
    ca: Option<Arc<ClusterCa>>,
    roster: Mutex<Roster>,
}

struct Roster {
    seats: Vec<Seat>,
    /// The last octet of the address for the next member that joins.
    next_host: u8,
}

/// A member and its running server.
struct Seat {
    member: Arc<Member>,
    _server: ServerTask,
}

impl Fleet {
    fn roster(&self) -> MutexGuard<'_, Roster> {
        self.roster.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct ServerTask(JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a handler and a connection need: the cluster and the listener the request came in on.
#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    member: Arc<Member>,
}

/// Runs the HTTP server for `member` on `listener`.
fn serve(shared: &Arc<Shared>, member: &Arc<Member>, listener: TcpListener) -> ServerTask {
    let app = Router::new().fallback(handle).with_state(Ctx {
        shared: Arc::clone(shared),
        member: Arc::clone(member),
    });
    let listener = FakeListener {
        listener,
        shared: Arc::clone(shared),
        member: Arc::clone(member),
    };
    ServerTask(tokio::spawn(async move {
        let make_service = app.into_make_service_with_connect_info::<ConnInfo>();
        if let Err(error) = axum::serve(listener, make_service).await {
            eprintln!("fake Proxmox VE server stopped: {error}");
        }
    }))
}

/// Binds one listener per member on `127.0.0.2`, `127.0.0.3`, … with one port for all: the one
/// the kernel picks for the first. Another process may hold that port on a later address; then
/// everything is dropped and tried again with a new port.
async fn bind_members(count: usize) -> Vec<TcpListener> {
    let ip = |index: usize| {
        let host = u8::try_from(usize::from(FIRST_MEMBER_HOST) + index)
            .ok()
            .filter(|host| *host < u8::MAX)
            .expect("at most 253 members");
        Ipv4Addr::new(127, 0, 0, host)
    };
    let mut last_error = None;
    for _ in 0..CLUSTER_BIND_ATTEMPTS {
        let first = TcpListener::bind((ip(0), 0))
            .await
            .unwrap_or_else(|error| panic!("bind the first fake member on {}: {error}", ip(0)));
        let port = first
            .local_addr()
            .expect("local address of a fake cluster member")
            .port();
        let mut listeners = vec![first];
        for index in 1..count {
            match TcpListener::bind((ip(index), port)).await {
                Ok(listener) => listeners.push(listener),
                Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
                    last_error = Some(error);
                    break;
                }
                Err(error) => panic!(
                    "bind a fake member on {}:{port}: {error} (the fake needs all of 127.0.0.0/8 \
                     on the loopback interface, as Linux has)",
                    ip(index)
                ),
            }
        }
        if listeners.len() == count {
            return listeners;
        }
    }
    panic!(
        "no port was free on all of 127.0.0.2..{} after {CLUSTER_BIND_ATTEMPTS} tries: {last_error:?}",
        ip(count - 1)
    );
}

impl FakePve {
    /// Starts a server on a random port of 127.0.0.1: user [`DEFAULT_USER`] with
    /// [`DEFAULT_PASSWORD`], cluster [`DEFAULT_CLUSTER`] with [`DEFAULT_NODES`] all online and
    /// quorate, version [`DEFAULT_VERSION`]. The first node answers and reports `127.0.0.1` as its
    /// address; the others report addresses in `127.0.1.0/24` where nothing listens.
    pub async fn start() -> Self {
        Self::launch(false).await
    }

    /// Like [`Self::start`], but serves HTTPS like a stock node on port 8006: a node certificate
    /// for `127.0.0.1`, `::1`, `localhost` and the answering node's name, signed by a cluster CA
    /// made for this fake (see [`Self::ca_pem`] and [`Self::certificate_fingerprint`]). No ALPN,
    /// so clients speak HTTP/1.1. The TLS handshake runs in each connection's own task.
    pub async fn start_tls() -> Self {
        Self::launch(true).await
    }

    /// Starts a cluster [`DEFAULT_CLUSTER`] of `nodes` (all online, quorate, numbered from 1 in
    /// this order), each with its own plain HTTP listener on the same port: the first on
    /// `127.0.0.2`, the next on `127.0.0.3`, and so on. Users, tokens, tickets, topology, clock
    /// and the cluster-wide counters are shared; each member answers as itself. [`Self::url`],
    /// [`Self::addr`] and the TLS getters refer to the first member; see [`Self::member`] for the
    /// others. Defaults as in [`Self::start`].
    pub async fn start_cluster(nodes: &[&str]) -> Self {
        Self::launch_cluster(nodes, false).await
    }

    /// Like [`Self::start_cluster`], but every member serves HTTPS with its own certificate (for
    /// its `127.0.0.x` address, `localhost` and its node name), all signed by one cluster CA
    /// ([`Self::ca_pem`]).
    pub async fn start_cluster_tls(nodes: &[&str]) -> Self {
        Self::launch_cluster(nodes, true).await
    }

    async fn launch(tls: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Proxmox VE listener");
        let addr = listener
            .local_addr()
            .expect("local address of the fake Proxmox VE listener");
        let ca = tls.then(|| Arc::new(ClusterCa::new()));
        let tls = ca.as_ref().map(|ca| {
            let addresses = vec![addr.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST)];
            TlsState::new(Arc::clone(ca), DEFAULT_NODES[0], addresses)
        });
        let nodes: Vec<(&str, bool)> = DEFAULT_NODES.iter().map(|name| (*name, true)).collect();
        let mut state = FakeState::new(single_listener_nodes(&nodes, addr.ip()));
        state.tls_fingerprint = tls.as_ref().map(TlsState::fingerprint);
        let member = Arc::new(Member::new(None, addr, tls));
        Self::assemble(state, false, ca, vec![(member, listener)])
    }

    async fn launch_cluster(names: &[&str], tls: bool) -> Self {
        assert!(!names.is_empty(), "a cluster needs at least one node");
        for (index, name) in names.iter().enumerate() {
            assert!(
                !names[..index].contains(name),
                "node {name:?} appears twice in {names:?}"
            );
        }
        let listeners = bind_members(names.len()).await;
        let ca = tls.then(|| Arc::new(ClusterCa::new()));
        let mut nodes = Vec::new();
        let mut members = Vec::new();
        for (index, (name, listener)) in names.iter().zip(listeners).enumerate() {
            let addr = listener
                .local_addr()
                .expect("local address of a fake cluster member");
            let tls = ca
                .as_ref()
                .map(|ca| TlsState::new(Arc::clone(ca), name, vec![addr.ip()]));
            let mut node = FakeNode::new(name, index + 1);
            node.ip = addr.ip().to_string();
            if let Some(tls) = &tls {
                node.fingerprint = tls.fingerprint();
            }
            nodes.push(node);
            members.push((Arc::new(Member::new(Some(name), addr, tls)), listener));
        }
        Self::assemble(FakeState::new(nodes), true, ca, members)
    }

    fn assemble(
        state: FakeState,
        multi: bool,
        ca: Option<Arc<ClusterCa>>,
        members: Vec<(Arc<Member>, TcpListener)>,
    ) -> Self {
        let shared = Arc::new(Shared {
            down: AtomicBool::new(false),
            keep_alive_idle_ms: AtomicU64::new(duration_ms(DEFAULT_KEEP_ALIVE_IDLE)),
            state: Mutex::new(state),
        });
        let primary = Arc::clone(&members[0].0);
        let next_host = u8::try_from(usize::from(FIRST_MEMBER_HOST) + members.len())
            .expect("at most 253 members");
        let seats = members
            .into_iter()
            .map(|(member, listener)| Seat {
                _server: serve(&shared, &member, listener),
                member,
            })
            .collect();
        Self {
            shared,
            fleet: Arc::new(Fleet {
                multi,
                primary,
                ca,
                roster: Mutex::new(Roster { seats, next_host }),
            }),
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` after [`Self::start_tls`]), the value to register as
    /// `api_endpoint`. In multi-node mode, the first member's URL (`http://127.0.0.2:PORT`), even
    /// after it left.
    pub fn url(&self) -> String {
        self.fleet.primary.url()
    }

    /// The socket address behind [`Self::url`], for raw TCP checks.
    pub fn addr(&self) -> SocketAddr {
        self.fleet.primary.addr
    }

    // --- members (only after `start_cluster`/`start_cluster_tls`) ----------------------------

    /// The member running node `name`. Panics on an unknown name or a single-listener fake.
    pub fn member(&self, name: &str) -> FakeMember {
        self.assert_multi("FakePve::member");
        let roster = self.fleet.roster();
        let member = roster
            .seats
            .iter()
            .find(|seat| seat.member.node.as_deref() == Some(name))
            .map(|seat| Arc::clone(&seat.member));
        let Some(member) = member else {
            let names: Vec<&str> = roster
                .seats
                .iter()
                .filter_map(|seat| seat.member.node.as_deref())
                .collect();
            panic!("no member {name:?} in the fake cluster; members are {names:?}");
        };
        FakeMember {
            fake: self.clone(),
            member,
        }
    }

    /// Node `name` joins the cluster, like `pvecm add`: a new listener on the next `127.0.0.x`
    /// with the same port (and in HTTPS mode its own certificate from the cluster CA), the lowest
    /// free node id, a new corosync config version (so `config_digest` and the `cluster` entry's
    /// `version` change), online, quorum recomputed. Panics if the address is taken.
    pub async fn add_member(&self, name: &str) -> FakeMember {
        self.assert_multi("FakePve::add_member");
        assert!(
            self.shared.lock().topology.find(name).is_none(),
            "node {name:?} is already in the fake cluster"
        );
        let host = {
            let mut roster = self.fleet.roster();
            let host = roster.next_host;
            assert!(
                host < u8::MAX,
                "no 127.0.0.x address left for another member"
            );
            roster.next_host = host + 1;
            host
        };
        let port = self.fleet.primary.addr.port();
        let ip = Ipv4Addr::new(127, 0, 0, host);
        let listener = TcpListener::bind((ip, port)).await.unwrap_or_else(|error| {
            panic!("cannot add member {name:?}: {ip}:{port} is not free ({error})")
        });
        let addr = listener
            .local_addr()
            .expect("local address of a fake cluster member");
        let tls = self
            .fleet
            .ca
            .as_ref()
            .map(|ca| TlsState::new(Arc::clone(ca), name, vec![addr.ip()]));
        {
            let mut state = self.shared.lock();
            let cluster = state.cluster_mut();
            let nodeid = (1..)
                .find(|id| cluster.nodes.iter().all(|node| node.nodeid != *id))
                .expect("a free node id");
            let mut node = FakeNode::new(name, nodeid);
            node.ip = addr.ip().to_string();
            if let Some(tls) = &tls {
                node.fingerprint = tls.fingerprint();
            }
            cluster.nodes.push(node);
            cluster.recompute_quorum();
            state.bump_config_version();
        }
        let member = Arc::new(Member::new(Some(name), addr, tls));
        self.fleet.roster().seats.push(Seat {
            _server: serve(&self.shared, &member, listener),
            member: Arc::clone(&member),
        });
        FakeMember {
            fake: self.clone(),
            member,
        }
    }

    /// Node `name` leaves the cluster, like `pvecm delnode`: it is gone from the topology, the
    /// corosync config version goes up, quorum is recomputed, and its listener stops (open
    /// connections are reset, new ones refused). [`FakeMember`] handles on it keep their
    /// counters. Panics on an unknown name or when it is the last node.
    pub fn remove_member(&self, name: &str) {
        self.assert_multi("FakePve::remove_member");
        let seat = {
            let mut roster = self.fleet.roster();
            assert!(
                roster.seats.len() > 1,
                "cannot remove the last node {name:?}"
            );
            let index = roster
                .seats
                .iter()
                .position(|seat| seat.member.node.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no member {name:?} in the fake cluster"));
            roster.seats.remove(index)
        };
        seat.member.stopped.store(true, Ordering::SeqCst);
        // Aborts the accept loop, which closes the listening socket.
        drop(seat);
        let mut state = self.shared.lock();
        let cluster = state.cluster_mut();
        cluster.nodes.retain(|node| node.name != name);
        cluster.recompute_quorum();
        state.bump_config_version();
    }

    fn assert_multi(&self, what: &str) {
        assert!(
            self.fleet.multi,
            "{what} needs a fake started with FakePve::start_cluster or start_cluster_tls"
        );
    }

    // --- TLS (only after `start_tls`/`start_cluster_tls`; these panic on a plain HTTP fake) ---

    /// SHA-256 of the DER of the certificate served to new connections, the way Proxmox shows it:
    /// 32 upper-case hex pairs joined by `:`. `/nodes` reports it as the answering node's
    /// `ssl_fingerprint`. In multi-node mode, that of the first member.
    pub fn certificate_fingerprint(&self) -> String {
        self.tls().fingerprint()
    }

    /// The certificate served to new connections in PEM, what `/etc/pve/local/pve-ssl.pem` holds.
    pub fn certificate_pem(&self) -> String {
        self.tls().certificate_pem()
    }

    /// The cluster CA certificate in PEM, what `/etc/pve/pve-root-ca.pem` holds; trust it as a CA
    /// file to verify the node certificates, also across [`Self::rotate_certificate`].
    pub fn ca_pem(&self) -> String {
        self.tls().ca.pem.clone()
    }

    /// Renews the node certificate like `pveupdate` does and reloads like pveproxy: a new key
    /// signed by the same CA (for the answering node's current name), served to every new
    /// handshake from now on and reported by `/nodes` and join info. Connections made with the
    /// old certificate finish the request they are serving and are then closed, so pooled
    /// clients reconnect and see the new one. In multi-node mode, renews the first member's.
    pub fn rotate_certificate(&self) {
        let member = &self.fleet.primary;
        let fingerprint = member.renew(&self.shared, false);
        member.vouch(&mut self.shared.lock(), fingerprint);
    }

    /// Serves a new self-signed certificate that the cluster CA did not sign, like a node whose
    /// `pve-ssl.pem` someone regenerated by hand (so `/nodes` and join info report it). Reloads
    /// like [`Self::rotate_certificate`].
    pub fn replace_with_self_signed(&self) {
        let member = &self.fleet.primary;
        let fingerprint = member.renew(&self.shared, true);
        member.vouch(&mut self.shared.lock(), fingerprint);
    }

    fn tls(&self) -> &TlsState {
        self.fleet.primary.tls()
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

    /// Replaces the topology with a cluster of `nodes` (`(name, online)`), numbered from 1. The
    /// first node is the one answering (`local: 1`) and reports the listener's address
    /// (`127.0.0.1`); the others report `127.0.1.<nodeid>`, where nothing listens. Quorum is the
    /// majority of online nodes. Single-listener mode only; multi-node fakes change with
    /// [`Self::add_member`] and [`Self::remove_member`].
    pub fn set_cluster(&self, name: &str, nodes: &[(&str, bool)]) {
        self.assert_single("FakePve::set_cluster");
        assert!(!nodes.is_empty(), "a cluster needs at least one node");
        let nodes = single_listener_nodes(nodes, self.fleet.primary.addr.ip());
        let mut state = self.shared.lock();
        let mut cluster = Cluster {
            name: name.to_owned(),
            nodes,
            quorate: true,
            config_version: 0,
        };
        cluster.recompute_quorum();
        state.topology = Topology::Cluster(cluster);
        state.bump_config_version();
    }

    /// Replaces the topology with a single node that is in no cluster, reporting the listener's
    /// address (`127.0.0.1`). Single-listener mode only.
    pub fn set_standalone(&self, node: &str) {
        self.assert_single("FakePve::set_standalone");
        let mut node = FakeNode::new(node, 0);
        node.ip = self.fleet.primary.addr.ip().to_string();
        self.shared.lock().topology = Topology::Standalone(node);
    }

    fn assert_single(&self, what: &str) {
        assert!(
            !self.fleet.multi,
            "{what} would take the names from under the members of a multi-node fake"
        );
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

    /// `ssl_fingerprint` of a node as `/nodes` reports it and `pve_fp` as join info does
    /// (upper-case hex pairs with colons): what the cluster filesystem holds. In HTTPS mode a
    /// node with a listener reports the certificate it serves (unless a test made it serve an
    /// unvouched one, see [`FakeMember::present_unvouched_certificate`]); other nodes have
    /// made-up ones.
    pub fn node_fingerprint(&self, name: &str) -> Option<String> {
        let state = self.shared.lock();
        state
            .topology
            .nodes()
            .iter()
            .position(|node| node.name == name)
            .map(|index| state.reported_fingerprint(index).to_owned())
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

    /// Makes `GET /cluster/config/join` alone answer this status and reason phrase with the
    /// usual error body (after authentication, instead of the permission check and the handler),
    /// e.g. `(501, "Method 'GET /cluster/config/join' not implemented")`; `None` restores it.
    /// Independent of [`Self::fail_all`], which wins while set.
    pub fn set_join_info_failure(&self, failure: Option<(u16, &str)>) {
        if let Some((status, _)) = failure {
            assert!(
                StatusCode::from_u16(status).is_ok(),
                "{status} cannot be sent as an HTTP status"
            );
        }
        self.shared.lock().join_info_failure =
            failure.map(|(status, reason)| (status, reason.to_owned()));
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
    /// next read or write, so clients see the server as unreachable. In multi-node mode this
    /// takes every member down (a network cut, not a change the cluster sees); use
    /// [`FakeMember::stop`] for one node.
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

    /// Requests received for `path` (e.g. `"/api2/json/cluster/status"`), whatever the answer;
    /// in multi-node mode, by all members together.
    pub fn requests(&self, path: &str) -> u64 {
        self.shared
            .lock()
            .stats
            .per_path
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Requests received on any path (by all members together in multi-node mode).
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

    /// Zeroes the counters (the members' too) and forgets recorded requests.
    pub fn reset_counters(&self) {
        self.shared.lock().stats = Stats::default();
        for seat in &self.fleet.roster().seats {
            *seat.member.stats() = MemberStats::default();
            seat.member.connections.store(0, Ordering::SeqCst);
        }
    }
}

impl FakeMember {
    /// `http://127.0.0.x:PORT` (`https://` in HTTPS mode): this member's own endpoint.
    pub fn url(&self) -> String {
        self.member.url()
    }

    /// The socket address behind [`Self::url`].
    pub fn addr(&self) -> SocketAddr {
        self.member.addr
    }

    /// The node this member runs.
    pub fn name(&self) -> &str {
        self.member
            .node
            .as_deref()
            .expect("multi-node members have a node name")
    }

    /// The node goes down: its listener resets new and open connections (like
    /// [`FakePve::set_down`]) and the other members see it offline, with quorum recomputed.
    pub fn stop(&self) {
        self.member.stopped.store(true, Ordering::SeqCst);
        self.set_online(false);
    }

    /// Reverses [`Self::stop`]: the listener answers again and the node is online.
    pub fn start(&self) {
        self.member.stopped.store(false, Ordering::SeqCst);
        self.set_online(true);
    }

    fn set_online(&self, online: bool) {
        let name = self.name();
        let mut state = self.fake.shared.lock();
        let cluster = state.cluster_mut();
        cluster.member_mut(name).online = online;
        cluster.recompute_quorum();
    }

    /// While partitioned, this member answers as a minority node would: `/cluster/status` says
    /// `quorate: 0`, itself online and every other node offline; the other members see it
    /// offline, with quorum recomputed over the rest. `false` heals the partition.
    pub fn set_partitioned(&self, partitioned: bool) {
        let name = self.name();
        let mut state = self.fake.shared.lock();
        let cluster = state.cluster_mut();
        cluster.member_mut(name).partitioned = partitioned;
        cluster.recompute_quorum();
    }

    /// Requests this member received for `path`, whatever the answer.
    pub fn requests(&self, path: &str) -> u64 {
        self.member.stats().per_path.get(path).copied().unwrap_or(0)
    }

    /// Requests this member received on any path.
    pub fn total_requests(&self) -> u64 {
        self.member.stats().total
    }

    /// Requests this member received with credentials: a `PVEAuthCookie` cookie, or an
    /// `Authorization` header with a ticket or an API token, valid or not. Password logins do
    /// not count (see [`Self::requests`] of `/api2/json/access/ticket`).
    pub fn authenticated_requests(&self) -> u64 {
        self.member.stats().authenticated
    }

    /// TCP connections this member's listener accepted, whatever happened next: reset while
    /// stopped, failed TLS handshakes and plain HTTP on the HTTPS port included.
    pub fn connections(&self) -> u64 {
        self.member.connections.load(Ordering::SeqCst)
    }

    /// Fingerprint of the certificate this member serves to new connections (HTTPS mode only),
    /// as [`FakePve::certificate_fingerprint`].
    pub fn certificate_fingerprint(&self) -> String {
        self.member.tls().fingerprint()
    }

    /// Renews this member's certificate like `pveupdate` and pmxcfs do: a new key signed by the
    /// cluster CA, served to new handshakes, and recorded in the cluster filesystem, so join info
    /// `pve_fp` and `/nodes` `ssl_fingerprint` vouch for it on every member. Connections with the
    /// old certificate close after their current request, as in
    /// [`FakePve::rotate_certificate`].
    pub fn rotate_certificate(&self) {
        let fingerprint = self.member.renew(&self.fake.shared, false);
        self.member.vouch(&mut self.fake.shared.lock(), fingerprint);
    }

    /// Serves a new certificate, also signed by the cluster CA (so only a fingerprint check can
    /// tell), that the cluster filesystem does not know: join info and `/nodes` keep reporting
    /// the previous fingerprint. An impostor, or a node nobody vouches for.
    pub fn present_unvouched_certificate(&self) {
        self.member.renew(&self.fake.shared, false);
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
    /// `remote_node_ip`: what `/cluster/status` reports as `ip` and join info as `pve_addr`.
    ip: String,
    online: bool,
    stale: bool,
    /// [`FakeMember::set_partitioned`].
    partitioned: bool,
    /// The certificate fingerprint the cluster filesystem holds for this node.
    fingerprint: String,
}

impl FakeNode {
    /// A node that reports an address where nothing listens (`127.0.1.<nodeid>`) and a made-up
    /// fingerprint; the callers give nodes with a listener their real ones.
    fn new(name: &str, nodeid: usize) -> Self {
        Self {
            name: name.to_owned(),
            nodeid,
            ip: node_net_addr(UNREACHABLE_NET, nodeid),
            online: true,
            stale: false,
            partitioned: false,
            fingerprint: random_bytes(32)
                .iter()
                .map(|byte| format!("{byte:02X}"))
                .collect::<Vec<_>>()
                .join(":"),
        }
    }
}

/// Nodes for the single-listener mode: the first answers, so it reports the listener's address.
fn single_listener_nodes(nodes: &[(&str, bool)], local_ip: IpAddr) -> Vec<FakeNode> {
    nodes
        .iter()
        .enumerate()
        .map(|(index, (name, online))| {
            let mut node = FakeNode::new(name, index + 1);
            node.online = *online;
            if index == 0 {
                node.ip = local_ip.to_string();
            }
            node
        })
        .collect()
}

/// `127.0.<net>.<nodeid>`: loopback, and nothing of the fake listens there.
fn node_net_addr(net: u8, nodeid: usize) -> String {
    let host = u8::try_from(nodeid).expect("the fake numbers nodes up to 255");
    Ipv4Addr::new(127, 0, net, host).to_string()
}

struct Cluster {
    name: String,
    nodes: Vec<FakeNode>,
    quorate: bool,
    config_version: u64,
}

impl Cluster {
    /// Quorum as the majority sees it: a partitioned node does not count.
    fn recompute_quorum(&mut self) {
        let online = self
            .nodes
            .iter()
            .filter(|node| node.online && !node.partitioned)
            .count();
        self.quorate = online * 2 > self.nodes.len();
    }

    /// Whether `node` is online as seen from `viewer` (the answering node): a partitioned viewer
    /// sees only itself, everyone else does not see partitioned nodes.
    fn online_in_view(node: &FakeNode, viewer: Option<&FakeNode>) -> bool {
        match viewer {
            Some(viewer) if viewer.partitioned => node.name == viewer.name,
            _ => node.online && !node.partitioned,
        }
    }

    /// pve-cluster takes the SHA-1 of corosync.conf; 20 bytes of SHA-256 over the same facts
    /// keep the 40 hex digits and change with every config version.
    fn config_digest(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(format!("{}\n{}\n", self.name, self.config_version));
        for node in &self.nodes {
            hasher.update(format!("{} {} {}\n", node.name, node.nodeid, node.ip));
        }
        hex::encode(&hasher.finalize()[..20])
    }

    /// Like [`Self::node_mut`], for a member of a multi-node fake, which may have left.
    fn member_mut(&mut self, name: &str) -> &mut FakeNode {
        self.nodes
            .iter_mut()
            .find(|node| node.name == name)
            .unwrap_or_else(|| panic!("node {name:?} has left the fake cluster"))
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

    fn find(&self, name: &str) -> Option<&FakeNode> {
        self.nodes().iter().find(|node| node.name == name)
    }

    fn node_mut(&mut self, name: &str) -> Option<&mut FakeNode> {
        match self {
            Self::Cluster(cluster) => cluster.nodes.iter_mut().find(|node| node.name == name),
            Self::Standalone(node) => (node.name == name).then_some(node),
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
    /// [`FakePve::set_join_info_failure`].
    join_info_failure: Option<(u16, String)>,
    redirect: Option<String>,
    garbage: bool,
    clock_offset: Duration,
    stats: Stats,
    /// In single-listener HTTPS mode, the fingerprint the cluster filesystem holds for the
    /// answering node, whichever node that is (multi-node fakes keep it in each [`FakeNode`]).
    tls_fingerprint: Option<String>,
}

impl FakeState {
    /// Cluster [`DEFAULT_CLUSTER`] of `nodes`, as if each had joined in turn.
    fn new(nodes: Vec<FakeNode>) -> Self {
        let mut users = HashMap::new();
        users.insert(
            DEFAULT_USER.to_owned(),
            Account {
                password: DEFAULT_PASSWORD.to_owned(),
                two_factor: false,
                sys_audit: true,
            },
        );
        let config_version = nodes.len() as u64;
        let mut cluster = Cluster {
            name: DEFAULT_CLUSTER.to_owned(),
            nodes,
            quorate: true,
            config_version,
        };
        cluster.recompute_quorum();
        let mut state = Self {
            users,
            tokens: HashMap::new(),
            tickets: HashMap::new(),
            csrf_tokens: HashMap::new(),
            topology: Topology::Cluster(cluster),
            config_version,
            version: DEFAULT_VERSION.to_owned(),
            repoid: repoid_for(DEFAULT_VERSION),
            boot_time: 0,
            latency: Duration::ZERO,
            auth_failure_delay: DEFAULT_AUTH_FAILURE_DELAY,
            fail_all: None,
            join_info_failure: None,
            redirect: None,
            garbage: false,
            clock_offset: Duration::ZERO,
            stats: Stats::default(),
            tls_fingerprint: None,
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

    /// `ssl_fingerprint` and `pve_fp` of the node at `index`.
    fn reported_fingerprint(&self, index: usize) -> &str {
        match &self.tls_fingerprint {
            // Only set with a single listener, which answers as the first node.
            Some(fingerprint) if index == 0 => fingerprint,
            _ => &self.topology.nodes()[index].fingerprint,
        }
    }

    /// Where `member`'s node is in the topology; `None` once it has left.
    fn local_index(&self, member: &Member) -> Option<usize> {
        match &member.node {
            None => Some(0),
            Some(name) => self
                .topology
                .nodes()
                .iter()
                .position(|node| &node.name == name),
        }
    }

    /// A membership change: corosync.conf gets a new `config_version`.
    fn bump_config_version(&mut self) {
        self.config_version += 1;
        if let Topology::Cluster(cluster) = &mut self.topology {
            cluster.config_version = self.config_version;
        }
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
    /// `plain_on_tls`: the request came as plain HTTP to the HTTPS port.
    fn answer(
        &mut self,
        parts: &Parts,
        body: &Bytes,
        started: Instant,
        plain_on_tls: bool,
        member: &Member,
    ) -> Answer {
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
        if plain_on_tls {
            return https_redirect(parts);
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
        let local = self.local_index(member);
        self.route(&rel, parts, body, &auth, started, local)
    }

    /// `local`: the index of the answering node in the topology.
    fn route(
        &mut self,
        rel: &str,
        parts: &Parts,
        body: &Bytes,
        auth: &Auth,
        started: Instant,
        local: Option<usize>,
    ) -> Answer {
        let method = parts.method.as_str();
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
            ("GET", ["cluster", "status"]) => self.cluster_status(auth, local),
            ("GET", ["cluster", "config", "join"]) => self.join_info(auth, local),
            ("GET", ["nodes"]) => self.nodes(auth, local),
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

    /// `GET /cluster/status`: Sys.Audit on `/`, entries in random (Perl hash) order, as the node
    /// at `local` sees the cluster.
    fn cluster_status(&self, auth: &Auth, local: Option<usize>) -> Response {
        if !auth.sys_audit() {
            return self.api_error(403, "Permission check failed (/, Sys.Audit)\n", None);
        }
        let mut entries = Vec::new();
        match &self.topology {
            Topology::Cluster(cluster) => {
                let viewer = local.map(|index| &cluster.nodes[index]);
                let minority = viewer.is_some_and(|viewer| viewer.partitioned);
                entries.push(json!({
                    "type": "cluster",
                    "id": "cluster",
                    "name": cluster.name,
                    "nodes": cluster.nodes.len(),
                    "quorate": flag(cluster.quorate && !minority),
                    "version": cluster.config_version,
                }));
                for (index, node) in cluster.nodes.iter().enumerate() {
                    entries.push(json!({
                        "type": "node",
                        "id": format!("node/{}", node.name),
                        "name": node.name,
                        "nodeid": node.nodeid,
                        "ip": node.ip,
                        "local": flag(local == Some(index)),
                        "online": flag(Cluster::online_in_view(node, viewer)),
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

    /// `GET /cluster/config/join` (pve-cluster `ClusterConfig.pm` `join_info`): corosync.conf and
    /// the node certificates in the cluster filesystem, so offline nodes are listed too.
    fn join_info(&self, auth: &Auth, local: Option<usize>) -> Response {
        if let Some((status, reason)) = &self.join_info_failure {
            return self.api_error(*status, reason, None);
        }
        if !auth.sys_audit() {
            return self.api_error(403, "Permission check failed (/, Sys.Audit)\n", None);
        }
        let Topology::Cluster(cluster) = &self.topology else {
            // Older releases let the `die` become a 500; newer ones answer 424 (Failed
            // Dependency). The fake switches at 9.0.
            let status = if self.version_triple() >= (9, 0, 0) {
                424
            } else {
                500
            };
            return self.api_error(
                status,
                "node is not in a cluster, no join info available!\n",
                None,
            );
        };
        let mut nodelist: Vec<Value> = cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                json!({
                    "name": node.name,
                    "nodeid": perl_number(node.nodeid),
                    "pve_addr": node.ip,
                    "pve_fp": self.reported_fingerprint(index),
                    "quorum_votes": perl_number(1),
                    "ring0_addr": node_net_addr(RING_NET, node.nodeid),
                })
            })
            .collect();
        shuffle(&mut nodelist);
        let preferred = &cluster.nodes[local.unwrap_or(0)].name;
        json_data(json!({
            "preferred_node": preferred,
            "config_digest": cluster.config_digest(),
            "totem": {
                "cluster_name": cluster.name,
                "config_version": cluster.config_version.to_string(),
                "version": "2",
                "ip_version": "ipv4-6",
                "link_mode": "passive",
                "secauth": "on",
                "interface": {"0": {"linknumber": "0"}},
            },
            "nodelist": nodelist,
        }))
    }

    /// `GET /nodes` (pve-manager `Nodes.pm` index and `API2Tools::extract_node_stats`), as the
    /// node at `local` sees the cluster.
    fn nodes(&self, auth: &Auth, local: Option<usize>) -> Response {
        let audit = auth.sys_audit();
        let clustered = matches!(self.topology, Topology::Cluster(_));
        let viewer = local.map(|index| &self.topology.nodes()[index]);
        let uptime = (self.now_secs() - self.boot_time).max(0);
        let mut entries: Vec<Value> = self
            .topology
            .nodes()
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let online = Cluster::online_in_view(node, viewer);
                let mut entry = json!({
                    "id": format!("node/{}", node.name),
                    "node": node.name,
                    "type": "node",
                    "status": "unknown",
                });
                if !node.stale {
                    if !clustered || online {
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
                if clustered && !online {
                    entry["status"] = json!("offline");
                }
                entry["ssl_fingerprint"] = json!(self.reported_fingerprint(index));
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
    /// Close the connection after this answer even though it says `Keep-Alive`.
    disconnect: bool,
}

impl Answer {
    fn now(response: Response) -> Self {
        Self {
            response,
            not_before: None,
            disconnect: false,
        }
    }

    fn until(response: Response, not_before: Instant) -> Self {
        Self {
            response,
            not_before: Some(not_before),
            disconnect: false,
        }
    }
}

/// pve-http-server `ensure_tls_connection`: plain HTTP on the HTTPS port gets `301` (GET) or `308`
/// (other methods) to the same URI over https, with an empty body; then the server hangs up
/// although the response says `Connection: Keep-Alive`.
fn https_redirect(parts: &Parts) -> Answer {
    let Some(host) = parts.headers.get(header::HOST).map(header_text) else {
        // pveproxy dies on this and never answers; a 400 is close enough for a fake.
        return Answer::now(empty(400, "Header field 'Host' not found in request"));
    };
    let host = host
        .strip_prefix("https://")
        .or_else(|| host.strip_prefix("http://"))
        .unwrap_or(&host);
    let uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let mut response = if parts.method == Method::GET {
        empty(301, "Moved Permanently")
    } else {
        empty(308, "Permanent Redirect")
    };
    if let Ok(location) = HeaderValue::from_str(&format!("https://{host}{uri}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Answer {
        response,
        not_before: None,
        disconnect: true,
    }
}

// --- HTTP plumbing ------------------------------------------------------------------------------

async fn handle(
    State(Ctx { shared, member }): State<Ctx>,
    ConnectInfo(conn): ConnectInfo<ConnInfo>,
    request: Request,
) -> Response {
    let busy = conn.state.begin_request();
    let (parts, body) = request.into_parts();
    let close_after =
        wants_close(&parts.headers) || busy.nth_request >= MAX_REQUESTS_PER_CONNECTION;
    if content_length(&parts.headers) > MAX_POST_BYTES as u64 {
        member.record(&parts);
        shared.lock().record(&parts, &Bytes::new());
        return finish(empty(501, "for data too large"), true);
    }
    let Ok(body) = axum::body::to_bytes(body, MAX_POST_BYTES).await else {
        // The client went away or sent a broken body; nobody reads this answer.
        return finish(empty(400, "bad request body"), true);
    };
    member.record(&parts);
    let latency = shared.lock().record(&parts, &body);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let started = Instant::now();
    let plain_on_tls = conn.state.plain_on_tls.load(Ordering::SeqCst);
    let answer = shared
        .lock()
        .answer(&parts, &body, started, plain_on_tls, &member);
    if let Some(not_before) = answer.not_before {
        tokio::time::sleep_until(not_before).await;
    }
    if answer.disconnect {
        conn.state.retire();
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

/// A number read from a config file: Perl keeps it a string unless something used it as a
/// number, so JSON gets `"1"` or `1` depending on the code path. Either, at random.
fn perl_number(value: usize) -> Value {
    if random_u64() & 1 == 0 {
        json!(value)
    } else {
        json!(value.to_string())
    }
}

/// Whether a request carries credentials, valid or not: a `PVEAuthCookie` cookie, or an
/// `Authorization` header with a ticket or an API token.
fn carries_credentials(headers: &HeaderMap) -> bool {
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .any(|value| extract_auth_value(&header_text(value), "PVEAuthCookie").is_some());
    let authorization = headers.get_all(header::AUTHORIZATION).iter().any(|value| {
        let value = header_text(value);
        extract_auth_value(&value, "PVEAuthCookie").is_some()
            || extract_auth_value(&value, "PVEAPIToken").is_some()
    });
    cookie || authorization
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

/// Accepts like a `TcpListener`, except that while the fake (or this member) is down it resets
/// every new connection, and it wraps sockets in [`FakeIo`]. It does no TLS work itself: a client
/// that stalls its handshake holds up only its own connection task.
struct FakeListener {
    listener: TcpListener,
    shared: Arc<Shared>,
    member: Arc<Member>,
}

impl Listener for FakeListener {
    type Io = FakeIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.member.connections.fetch_add(1, Ordering::SeqCst);
                    if self.member.is_down(&self.shared) {
                        // Zero linger turns the close into a RST: "connection reset by peer".
                        let _ = stream.set_zero_linger();
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let transport = if self.member.tls.is_some() {
                        Transport::Sniffing(stream)
                    } else {
                        Transport::Plain(stream)
                    };
                    let io = FakeIo {
                        transport,
                        shared: Arc::clone(&self.shared),
                        member: Arc::clone(&self.member),
                        conn: Arc::new(ConnState::new()),
                        idle_timer: None,
                        rotation: None,
                        release: None,
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
    /// Plain HTTP arrived on the HTTPS port.
    plain_on_tls: AtomicBool,
    /// Close as soon as no request is in flight.
    retired: AtomicBool,
    /// Bytes have arrived since the last request finished: a request may be on its way to the
    /// handler, so the connection is not idle even with nothing in flight.
    unanswered: AtomicBool,
    /// Notified whenever a request finishes.
    released: Arc<Notify>,
}

impl ConnState {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_activity: Mutex::new(Instant::now()),
            plain_on_tls: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            unanswered: AtomicBool::new(false),
            released: Arc::new(Notify::new()),
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

    fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// No request is being read or handled.
    fn is_quiet(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0 && !self.unanswered.load(Ordering::SeqCst)
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
        self.conn.unanswered.store(false, Ordering::SeqCst);
        self.conn.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.conn.released.notify_waiters();
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

/// What runs over the TCP stream of one connection.
enum Transport {
    /// Plain HTTP: the [`FakePve::start`] mode, or plain HTTP sent to the HTTPS port.
    Plain(TcpStream),
    /// HTTPS mode before the first byte: a TLS handshake record starts TLS, anything else is
    /// plain HTTP (AnyEvent's `tls_autostart`).
    Sniffing(TcpStream),
    /// `generation` is that of the certificate being presented.
    Handshaking {
        accept: Box<tokio_rustls::Accept<TcpStream>>,
        generation: u64,
    },
    Tls {
        stream: Box<tokio_rustls::server::TlsStream<TcpStream>>,
        generation: u64,
    },
    /// The handshake failed; the socket is gone.
    Closed,
}

impl Transport {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Self::Plain(stream) | Self::Sniffing(stream) => Some(stream),
            Self::Handshaking { accept, .. } => accept.get_ref(),
            Self::Tls { stream, .. } => Some(stream.get_ref().0),
            Self::Closed => None,
        }
    }

    /// The certificate generation of an established TLS session.
    fn tls_generation(&self) -> Option<u64> {
        match self {
            Self::Tls { generation, .. } => Some(*generation),
            _ => None,
        }
    }

    /// Drives the sniffing and the handshake until the stream can carry HTTP.
    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        tls: Option<&TlsState>,
        conn: &ConnState,
    ) -> Poll<io::Result<()>> {
        loop {
            match self {
                Self::Plain(_) | Self::Tls { .. } => return Poll::Ready(Ok(())),
                Self::Closed => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
                Self::Sniffing(stream) => {
                    let mut first = [0_u8; 1];
                    let mut peeked = ReadBuf::new(&mut first);
                    ready!(stream.poll_peek(cx, &mut peeked))?;
                    let handshake = peeked.filled() == [TLS_HANDSHAKE_RECORD];
                    let Self::Sniffing(stream) = std::mem::replace(self, Self::Closed) else {
                        unreachable!("matched Sniffing above");
                    };
                    *self = match tls {
                        Some(tls) if handshake => {
                            let (generation, config) = tls.current();
                            Self::Handshaking {
                                accept: Box::new(TlsAcceptor::from(config).accept(stream)),
                                generation,
                            }
                        }
                        _ => {
                            conn.plain_on_tls.store(true, Ordering::SeqCst);
                            Self::Plain(stream)
                        }
                    };
                }
                Self::Handshaking { accept, generation } => {
                    let generation = *generation;
                    match ready!(Pin::new(&mut **accept).poll(cx)) {
                        Ok(stream) => {
                            *self = Self::Tls {
                                stream: Box::new(stream),
                                generation,
                            };
                        }
                        Err(error) => {
                            *self = Self::Closed;
                            return Poll::Ready(Err(error));
                        }
                    }
                }
            }
        }
    }

    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        tls: Option<&TlsState>,
        conn: &ConnState,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_ready(cx, tls, conn))?;
        match self {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tls { stream, .. } => Pin::new(&mut **stream).poll_read(cx, buf),
            _ => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        tls: Option<&TlsState>,
        conn: &ConnState,
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_ready(cx, tls, conn))?;
        match self {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tls { stream, .. } => Pin::new(&mut **stream).poll_write(cx, buf),
            _ => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
        tls: Option<&TlsState>,
        conn: &ConnState,
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_ready(cx, tls, conn))?;
        match self {
            Self::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Self::Tls { stream, .. } => Pin::new(&mut **stream).poll_write_vectored(cx, bufs),
            _ => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(stream) => stream.is_write_vectored(),
            Self::Tls { stream, .. } => stream.is_write_vectored(),
            _ => false,
        }
    }

    /// Nothing is buffered before the handshake completes.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Self::Tls { stream, .. } => Pin::new(&mut **stream).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// Sends `close_notify` on an established TLS session, then shuts the TCP stream down.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Plain(stream) | Self::Sniffing(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Handshaking { accept, .. } => match accept.get_mut() {
                Some(stream) => Pin::new(stream).poll_shutdown(cx),
                None => Poll::Ready(Ok(())),
            },
            Self::Tls { stream, .. } => Pin::new(&mut **stream).poll_shutdown(cx),
            Self::Closed => Poll::Ready(Ok(())),
        }
    }
}

/// A socket that fails while the fake is down and reports end-of-file once the connection has
/// been idle for the keep-alive timeout, or has been retired (a redirect of plain HTTP on the
/// HTTPS port, or a certificate change) and has no request in flight. That makes hyper close it
/// the way pveproxy does.
struct FakeIo {
    transport: Transport,
    shared: Arc<Shared>,
    /// The listener that accepted it.
    member: Arc<Member>,
    conn: Arc<ConnState>,
    idle_timer: Option<Pin<Box<Sleep>>>,
    /// Wakes an idle TLS connection when the certificate changes.
    rotation: Option<Pin<Box<OwnedNotified>>>,
    /// Wakes a retired connection when its last request finishes.
    release: Option<Pin<Box<OwnedNotified>>>,
}

impl FakeIo {
    fn is_down(&self) -> bool {
        self.member.is_down(&self.shared)
    }

    fn reset(&self) -> io::Error {
        if let Some(stream) = self.transport.tcp() {
            let _ = stream.set_zero_linger();
        }
        io::Error::from(io::ErrorKind::ConnectionReset)
    }

    /// Whether the connection should be closed now rather than kept alive: it is retired (or its
    /// certificate is outdated) and no request is being read or handled. Registers for the
    /// wakeups that can change the answer.
    fn poll_retired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            // A handler may retire the connection, and hyper does not read again on its own after
            // sending the response, so listen for the end of every request (before looking).
            let conn = &self.conn;
            self.release
                .get_or_insert_with(|| Box::pin(Arc::clone(&conn.released).notified_owned()));
            if self.conn.is_quiet()
                && (self.conn.retired.load(Ordering::SeqCst) || self.poll_outdated(cx))
            {
                return true;
            }
            let pending = self
                .release
                .as_mut()
                .is_some_and(|released| released.as_mut().poll(cx).is_pending());
            if pending {
                return false;
            }
            self.release = None;
        }
    }

    /// Whether the TLS session uses a certificate that is no longer served. Registers for a wakeup
    /// on the next certificate change while it is current.
    fn poll_outdated(&mut self, cx: &mut Context<'_>) -> bool {
        let (Some(tls), Some(generation)) =
            (self.member.tls.as_ref(), self.transport.tls_generation())
        else {
            return false;
        };
        loop {
            // Listen before looking, so a change in between still wakes us.
            let rotation = self
                .rotation
                .get_or_insert_with(|| Box::pin(Arc::clone(&tls.rotated).notified_owned()));
            if tls.generation() != generation {
                return true;
            }
            if rotation.as_mut().poll(cx).is_pending() {
                return false;
            }
            self.rotation = None;
        }
    }

    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.poll_retired(cx) {
            return Poll::Ready(Ok(()));
        }
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
        if this.is_down() {
            return Poll::Ready(Err(this.reset()));
        }
        let before = buf.filled().len();
        match this
            .transport
            .poll_read(cx, buf, this.member.tls.as_ref(), &this.conn)
        {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.conn.touch();
                    this.conn.unanswered.store(true, Ordering::SeqCst);
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
        if this.is_down() {
            return Poll::Ready(Err(this.reset()));
        }
        let result = this
            .transport
            .poll_write(cx, buf, this.member.tls.as_ref(), &this.conn);
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
        if this.is_down() {
            return Poll::Ready(Err(this.reset()));
        }
        let result =
            this.transport
                .poll_write_vectored(cx, bufs, this.member.tls.as_ref(), &this.conn);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            this.conn.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.transport.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.is_down() {
            return Poll::Ready(Err(this.reset()));
        }
        this.transport.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().transport.poll_shutdown(cx)
    }
}

// --- TLS ----------------------------------------------------------------------------------------

/// The certificates of one HTTPS listener.
struct TlsState {
    ca: Arc<ClusterCa>,
    /// The IP addresses in the certificate's SAN, kept for renewals.
    addresses: Vec<IpAddr>,
    serving: Mutex<ServedCert>,
    /// Mirrors `serving.generation`, for a lock-free check on every idle read.
    generation: AtomicU64,
    /// Notified after every certificate change.
    rotated: Arc<Notify>,
}

/// What new handshakes present.
struct ServedCert {
    generation: u64,
    config: Arc<ServerConfig>,
    pem: String,
    fingerprint: String,
}

impl TlsState {
    fn new(ca: Arc<ClusterCa>, node: &str, addresses: Vec<IpAddr>) -> Self {
        let cert = ca.issue(node, &addresses);
        let served = ServedCert::new(0, cert);
        Self {
            ca,
            addresses,
            serving: Mutex::new(served),
            generation: AtomicU64::new(0),
            rotated: Arc::new(Notify::new()),
        }
    }

    fn serving(&self) -> MutexGuard<'_, ServedCert> {
        self.serving.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> (u64, Arc<ServerConfig>) {
        let serving = self.serving();
        (serving.generation, Arc::clone(&serving.config))
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn fingerprint(&self) -> String {
        self.serving().fingerprint.clone()
    }

    fn certificate_pem(&self) -> String {
        self.serving().pem.clone()
    }

    /// Serves `cert` to new handshakes, like a pveproxy reload (a fresh `ServerConfig`, so no
    /// session resumes across it), retires connections that use the old one, and returns the new
    /// fingerprint.
    fn serve(&self, cert: NodeCert) -> String {
        let fingerprint = {
            let mut serving = self.serving();
            *serving = ServedCert::new(serving.generation + 1, cert);
            self.generation.store(serving.generation, Ordering::SeqCst);
            serving.fingerprint.clone()
        };
        self.rotated.notify_waiters();
        fingerprint
    }
}

impl ServedCert {
    fn new(generation: u64, cert: NodeCert) -> Self {
        let fingerprint = pve_fingerprint(&cert.der);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key.serialize_der()));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // Only the node certificate, as pveproxy sends `pve-ssl.pem`, which holds no chain.
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS 1.2 and 1.3 with aws-lc-rs")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der], key)
            .expect("the fake node certificate matches its key");
        Self {
            generation,
            config: Arc::new(config),
            pem: cert.pem,
            fingerprint,
        }
    }
}

/// `/etc/pve/pve-root-ca.pem` and its key.
struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl ClusterCa {
    /// `CN=Proxmox Virtual Environment, OU=<uuid>, O=PVE Cluster Manager CA`, valid 10 years.
    fn new() -> Self {
        let key = KeyPair::generate().expect("generate the fake cluster CA key");
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Proxmox Virtual Environment");
        name.push(
            DnType::OrganizationalUnitName,
            uuid::Uuid::new_v4().to_string(),
        );
        name.push(DnType::OrganizationName, "PVE Cluster Manager CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY_DAYS);
        let cert = params
            .self_signed(&key)
            .expect("self-sign the fake cluster CA");
        Self {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// A `pve-ssl.pem` for `node` at `addresses`, with a new key.
    fn issue(&self, node: &str, addresses: &[IpAddr]) -> NodeCert {
        let key = KeyPair::generate().expect("generate a fake node key");
        let mut params = node_cert_params(node, addresses);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign a fake node certificate");
        NodeCert {
            der: cert.der().clone(),
            pem: cert.pem(),
            key,
        }
    }
}

/// A node certificate and its key.
struct NodeCert {
    der: CertificateDer<'static>,
    pem: String,
    key: KeyPair,
}

impl NodeCert {
    /// The same names, but issued by itself.
    fn self_signed(node: &str, addresses: &[IpAddr]) -> Self {
        let key = KeyPair::generate().expect("generate a fake node key");
        let cert = node_cert_params(node, addresses)
            .self_signed(&key)
            .expect("self-sign a fake node certificate");
        Self {
            der: cert.der().clone(),
            pem: cert.pem(),
            key,
        }
    }
}

/// pve-cluster `Setup.pm` `gen_pve_ssl_cert`: `OU=PVE Cluster Node, O=Proxmox Virtual
/// Environment, CN=<fqdn>`, SAN with the node's (loopback) addresses, `localhost`, the node name
/// and its FQDN, valid 2 years.
fn node_cert_params(node: &str, addresses: &[IpAddr]) -> CertificateParams {
    let fqdn = format!("{node}.pve.invalid");
    let mut names: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
    names.extend(["localhost".to_owned(), node.to_owned(), fqdn.clone()]);
    let mut params = CertificateParams::new(names).expect("valid fake node certificate names");
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationalUnitName, "PVE Cluster Node");
    name.push(DnType::OrganizationName, "Proxmox Virtual Environment");
    name.push(DnType::CommonName, fqdn);
    params.distinguished_name = name;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::ContentCommitment,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut params, NODE_CERT_VALIDITY_DAYS);
    params
}

/// Valid from yesterday (midnight UTC) for `days` days from today.
fn set_validity(params: &mut CertificateParams, days: i64) {
    let date = |offset: i64| {
        let day = (chrono::Utc::now() + chrono::TimeDelta::days(offset)).date_naive();
        let narrow = |value: u32| u8::try_from(value).expect("months and days fit in a u8");
        rcgen::date_time_ymd(day.year(), narrow(day.month()), narrow(day.day()))
    };
    params.not_before = date(-1);
    params.not_after = date(days);
}

/// Net::SSLeay `X509_get_fingerprint(cert, 'sha256')`: upper-case hex pairs joined by `:`.
fn pve_fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|byte| format!("{byte:02X}"))
        .collect::<Vec<_>>()
        .join(":")
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
