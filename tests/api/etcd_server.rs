//! Real etcd servers on loopback for the tests of the etcd backend: one member
//! ([`EtcdServer::single`]) or a cluster of three ([`EtcdCluster::three`]), each member with a
//! temporary data directory and random ports on 127.0.0.1, tuned so that leases of 2 s work and
//! a lost member is noticed quickly. Members can be stopped and started again on the same data
//! directory, or killed; every member still running is killed when its owner is dropped. An
//! [`EtcdLink`] relays one instance's connections to a member, so that a test can cut that
//! instance alone off from etcd.
//!
//! The tests need Debian's `etcd-server` (the `etcd` binary). Without it they say so and pass,
//! unless `PROXMOXER_REQUIRE_ETCD=1` (as in CI), when they fail.

use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::{AbortHandle, JoinHandle};

/// Set to `1` where the etcd tests must run: a missing `etcd` then fails them.
pub const REQUIRE_ETCD: &str = "PROXMOXER_REQUIRE_ETCD";
/// How long a member (or a whole new cluster) may take to report itself healthy.
pub const ETCD_START: Duration = Duration::from_secs(20);

const ETCD_BINARY: &str = "etcd";
/// Raft heartbeats every 50 ms and elections after 500 ms without one: a new raft leader within
/// about a second of losing one, and a minimum lease TTL of 1 s (etcd's is 1.5 election
/// timeouts), well under the 2 s leases of the tests.
const HEARTBEAT_MS: &str = "50";
const ELECTION_TIMEOUT_MS: &str = "500";
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
/// Ports are picked free and then released before etcd binds them, so another process can take
/// one in between; a launch that fails that way is retried on new ports.
const LAUNCH_ATTEMPTS: usize = 3;
const LOG_TAIL_LINES: usize = 40;

/// One etcd member: its own process, data directory and log, listening for clients and peers on
/// 127.0.0.1.
pub struct EtcdServer {
    name: String,
    binary: PathBuf,
    client_url: String,
    peer_url: String,
    /// The members of the cluster it was created in, as `--initial-cluster` wants them.
    initial_cluster: String,
    cluster_token: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    http: reqwest::Client,
    // Last: removed after the process is gone.
    _dir: TempDir,
}

/// Three etcd members forming one cluster; a majority (two) keeps it writable.
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
}

/// The `etcd` binary, or `None` after saying why `test` is skipped; with [`REQUIRE_ETCD`] set,
/// a missing binary fails the test instead.
pub fn etcd_binary(test: &str) -> Option<PathBuf> {
    if let Some(binary) = find_program(ETCD_BINARY) {
        return Some(binary);
    }
    let why = "no etcd on PATH (install Debian's etcd-server)";
    assert!(
        std::env::var(REQUIRE_ETCD).as_deref() != Ok("1"),
        "{test}: {REQUIRE_ETCD}=1 but {why}"
    );
    // Straight to stderr: the test harness hides what a passing test prints.
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {why}");
    None
}

impl EtcdServer {
    /// Starts a one-member etcd and waits until it is healthy; `None` when `test` is skipped
    /// for lack of etcd (see [`etcd_binary`]).
    pub async fn single(test: &str) -> Option<Self> {
        let binary = etcd_binary(test)?;
        for attempt in 1..=LAUNCH_ATTEMPTS {
            let mut members = unstarted_members(&binary, "etcd-single", 1);
            let mut server = members.pop().expect("one member");
            server.launch();
            if server.wait_until_healthy().await {
                return Some(server);
            }
            server.give_up(attempt);
        }
        unreachable!("give_up panics on the last attempt")
    }

    /// `http://127.0.0.1:PORT`, where clients connect.
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// `127.0.0.1:PORT`, where clients connect.
    pub fn client_addr(&self) -> &str {
        self.client_url
            .strip_prefix("http://")
            .expect("client URLs are plain http")
    }

    /// The value of `PROXMOXER_STORAGE_ETCD_ENDPOINTS` for this member alone.
    pub fn endpoints(&self) -> String {
        self.client_url.clone()
    }

    /// Whether the process runs (it may still be unhealthy).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Stops the member with SIGTERM, as an administrator would, and waits for it to exit
    /// (SIGKILL after a while). Its data directory stays for [`Self::start`].
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            send_signal(child.id(), "TERM");
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(POLL).await;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the member with SIGKILL, as a crash or a lost host would. Its data directory stays
    /// for [`Self::start`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the stopped or killed member again on the same ports and data directory and waits
    /// until it is healthy (for a cluster member: until it is back in a cluster with a leader).
    pub async fn start(&mut self) {
        assert!(
            !self.is_running(),
            "etcd member {} is already running",
            self.name
        );
        self.launch();
        assert!(
            self.wait_until_healthy().await,
            "etcd member {} was not healthy within {ETCD_START:?} of its restart; log:\n{}",
            self.name,
            self.log_tail()
        );
    }

    /// Whether the member answers `GET /health` with `{"health":"true"}`: it serves clients and
    /// its cluster has a leader.
    pub async fn is_healthy(&self) -> bool {
        let Ok(response) = self
            .http
            .get(format!("{}/health", self.client_url))
            .send()
            .await
        else {
            return false;
        };
        let Ok(body) = response.json::<Value>().await else {
            return false;
        };
        body["health"] == "true"
    }

    /// The member's raft status through etcd's JSON gateway: `(member_id, leader_id)`.
    pub async fn raft_status(&self) -> Option<(String, String)> {
        let response = self
            .http
            .post(format!("{}/v3/maintenance/status", self.client_url))
            .body("{}")
            .send()
            .await
            .ok()?;
        let body: Value = response.json().await.ok()?;
        let member = body["header"]["member_id"].as_str()?.to_owned();
        let leader = body["leader"].as_str()?.to_owned();
        Some((member, leader))
    }

    /// Writes `key` = `value` through etcd's JSON gateway; panics unless etcd acknowledges it.
    pub async fn put(&self, key: &str, value: &str) {
        let body = json!({"key": BASE64.encode(key), "value": BASE64.encode(value)});
        let response = self
            .http
            .post(format!("{}/v3/kv/put", self.client_url))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("put {key} on etcd member {}: {e}", self.name));
        assert!(
            response.status().is_success(),
            "put {key} on etcd member {}: {}",
            self.name,
            response.status()
        );
    }

    /// The value of `key` through etcd's JSON gateway; `None` when it is absent or the member
    /// does not answer.
    pub async fn get(&self, key: &str) -> Option<String> {
        let response = self
            .http
            .post(format!("{}/v3/kv/range", self.client_url))
            .json(&json!({"key": BASE64.encode(key)}))
            .send()
            .await
            .ok()?;
        let body: Value = response.json().await.ok()?;
        let value = BASE64.decode(body["kvs"][0]["value"].as_str()?).ok()?;
        String::from_utf8(value).ok()
    }

    /// The last lines etcd logged, for assertion messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(LOG_TAIL_LINES);
        lines[start..].join("\n")
    }

    fn launch(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open the etcd log");
        let log_err = log.try_clone().expect("clone the etcd log handle");
        let child = Command::new(&self.binary)
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.cluster_token])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", HEARTBEAT_MS])
            .args(["--election-timeout", ELECTION_TIMEOUT_MS])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .env_remove("ETCDCTL_API")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        self.child = Some(child);
    }

    /// Polls `/health` until it says true; false when the process exited (e.g. its port was
    /// taken) or [`ETCD_START`] passed.
    async fn wait_until_healthy(&mut self) -> bool {
        let deadline = Instant::now() + ETCD_START;
        while Instant::now() < deadline {
            if !self.is_running() {
                return false;
            }
            if self.is_healthy().await {
                return true;
            }
            tokio::time::sleep(POLL).await;
        }
        false
    }

    /// Kills a member that did not come up; panics with its log after the last attempt.
    fn give_up(&mut self, attempt: usize) {
        self.kill();
        assert!(
            attempt < LAUNCH_ATTEMPTS,
            "etcd member {} was not healthy within {ETCD_START:?} (attempt {attempt}); log:\n{}",
            self.name,
            self.log_tail()
        );
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- etcd {} log ({}) ----\n{}\n---- end of etcd log ----",
                self.name,
                self.log_path.display(),
                self.log_tail()
            );
        }
        self.kill();
    }
}

impl EtcdCluster {
    /// Starts three members as one new cluster and waits until each is healthy; `None` when
    /// `test` is skipped for lack of etcd (see [`etcd_binary`]).
    pub async fn three(test: &str) -> Option<Self> {
        let binary = etcd_binary(test)?;
        for attempt in 1..=LAUNCH_ATTEMPTS {
            let mut members = unstarted_members(&binary, "etcd-three", 3);
            // Together: each member waits for the others before its cluster has a leader.
            for member in &mut members {
                member.launch();
            }
            let mut healthy = true;
            for member in &mut members {
                healthy = healthy && member.wait_until_healthy().await;
            }
            if healthy {
                return Some(Self { members });
            }
            for member in &mut members {
                member.give_up(attempt);
            }
        }
        unreachable!("give_up panics on the last attempt")
    }

    /// The value of `PROXMOXER_STORAGE_ETCD_ENDPOINTS`: every member's client URL, in order.
    pub fn endpoints(&self) -> String {
        self.endpoints_in_order(&[0, 1, 2])
    }

    /// Like [`Self::endpoints`], listing the members in `order` (indices).
    pub fn endpoints_in_order(&self, order: &[usize]) -> String {
        order
            .iter()
            .map(|&index| self.members[index].client_url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The member at `index` (0, 1 or 2).
    pub fn member(&self, index: usize) -> &EtcdServer {
        &self.members[index]
    }

    /// The member at `index`, to stop, kill or start it.
    pub fn member_mut(&mut self, index: usize) -> &mut EtcdServer {
        &mut self.members[index]
    }

    /// The index of the member that is the raft leader, as the running members agree; `None`
    /// while they do not (e.g. during an election).
    pub async fn leader(&self) -> Option<usize> {
        let mut statuses = Vec::new();
        for member in &self.members {
            statuses.push(member.raft_status().await);
        }
        let leader_id = statuses.iter().flatten().map(|(_, leader)| leader).next()?;
        let agreed = statuses
            .iter()
            .flatten()
            .all(|(_, leader)| leader == leader_id);
        if !agreed {
            return None;
        }
        statuses
            .iter()
            .position(|status| status.as_ref().is_some_and(|(id, _)| id == leader_id))
    }

    /// How many members answer `/health` with true.
    pub async fn healthy_members(&self) -> usize {
        let mut healthy = 0;
        for member in &self.members {
            if member.is_healthy().await {
                healthy += 1;
            }
        }
        healthy
    }
}

/// A TCP relay on 127.0.0.1 in front of one etcd member, to cut one instance off from etcd
/// while the others still reach it: [`Self::cut`] closes every relayed connection and closes
/// new ones at once until [`Self::restore`].
pub struct EtcdLink {
    url: String,
    state: Arc<LinkState>,
    acceptor: JoinHandle<()>,
}

#[derive(Default)]
struct LinkState {
    cut: AtomicBool,
    /// The relayed connections; under the lock, so that none starts unseen during a cut.
    relays: Mutex<Vec<AbortHandle>>,
}

impl EtcdLink {
    /// Starts relaying to `member`'s client port.
    pub async fn to(member: &EtcdServer) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the etcd link");
        let url = format!(
            "http://{}",
            listener.local_addr().expect("the link's address")
        );
        let target = member.client_addr().to_owned();
        let state = Arc::new(LinkState::default());
        let acceptor = tokio::spawn({
            let state = Arc::clone(&state);
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let mut relays = state.relays.lock().unwrap_or_else(PoisonError::into_inner);
                    if state.cut.load(Ordering::SeqCst) {
                        continue;
                    }
                    let target = target.clone();
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    relays.retain(|relay| !relay.is_finished());
                    relays.push(relay.abort_handle());
                }
            }
        });
        Self {
            url,
            state,
            acceptor,
        }
    }

    /// `http://127.0.0.1:PORT`, for `PROXMOXER_STORAGE_ETCD_ENDPOINTS`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Closes every relayed connection; new ones are closed as soon as they are accepted.
    pub fn cut(&self) {
        let mut relays = self
            .state
            .relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.state.cut.store(true, Ordering::SeqCst);
        for relay in relays.drain(..) {
            relay.abort();
        }
    }

    /// Relays new connections again.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for EtcdLink {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

/// `count` members named `<prefix>-<i>` of one new cluster, each with two free ports on
/// 127.0.0.1 and a temporary directory (in /dev/shm when there is one: fsyncs on a shared
/// disk would slow raft down enough to cost elections with these short timeouts).
fn unstarted_members(binary: &Path, prefix: &str, count: usize) -> Vec<EtcdServer> {
    let ports = free_loopback_ports(2 * count);
    let token = format!("{prefix}-{}", ports[0]);
    let urls: Vec<(String, String)> = (0..count)
        .map(|i| {
            (
                format!("http://127.0.0.1:{}", ports[2 * i]),
                format!("http://127.0.0.1:{}", ports[2 * i + 1]),
            )
        })
        .collect();
    let initial_cluster = urls
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("{prefix}-{i}={peer}"))
        .collect::<Vec<_>>()
        .join(",");
    urls.into_iter()
        .enumerate()
        .map(|(i, (client_url, peer_url))| {
            let dir = temp_dir();
            EtcdServer {
                name: format!("{prefix}-{i}"),
                binary: binary.to_owned(),
                client_url,
                peer_url,
                initial_cluster: initial_cluster.clone(),
                cluster_token: token.clone(),
                data_dir: dir.path().join("data"),
                log_path: dir.path().join("etcd.log"),
                child: None,
                http: http_client(),
                _dir: dir,
            }
        })
        .collect()
}

fn temp_dir() -> TempDir {
    let mut builder = tempfile::Builder::new();
    builder.prefix("proxmoxer-etcd-");
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = builder.tempdir_in(shm)
    {
        return dir;
    }
    builder
        .tempdir()
        .expect("create a temporary etcd directory")
}

/// `count` distinct ports that were free on 127.0.0.1 a moment ago.
fn free_loopback_ports(count: usize) -> Vec<u16> {
    // All bound at once so that they differ, then released for etcd.
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("a bound address").port())
        .collect()
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .build()
        .expect("build the etcd health client")
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `kill -SIGNAL PID`, which must succeed.
pub(crate) fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(
        status.success(),
        "kill -{signal} {pid} failed with {status}"
    );
}
