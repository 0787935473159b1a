//! Starts the real `proxmoxer` binary for black-box tests and talks to it over HTTP.
//!
//! Each [`TestApp`] owns a child process with its own temporary data directory, listening on a
//! random port of 127.0.0.1. Its stderr is captured (set `TEST_LOG=1` to also echo it live), and
//! the process is killed when the `TestApp` is dropped.
//!
//! Below it are the pieces several test modules share: daemons with short monitor intervals,
//! fake Proxmox servers with a short auth-failure delay, and registering, reading and waiting on
//! clusters over the API.

// Shared by every test module of the `api` binary; each test uses only some of the helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::fake_pve::{DEFAULT_PASSWORD, DEFAULT_USER, FakePve};

/// How long the daemon may take to log `listening on`.
pub const SPAWN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon may take to exit after SIGTERM.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`TestAppBuilder::spawn_expect_failure`] waits for the daemon to give up.
pub const FAILURE_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound for every wait on a condition, an event or a notification; generous because CI machines
/// are noisy.
pub const WAIT: Duration = Duration::from_secs(15);
/// pveproxy answers a rejected login after 3 s; [`fake_pve`] and [`tls_fake`] shorten that for
/// tests that are not about the delay, so that one rejected ticket does not make a check outlast
/// the 3-interval stale window of a fast monitor.
pub const SHORT_AUTH_DELAY: Duration = Duration::from_millis(50);
/// Proxmox's cluster status call: one per monitor check.
pub const STATUS_PATH: &str = "/api2/json/cluster/status";
/// Proxmox's login call.
pub const TICKET_PATH: &str = "/api2/json/access/ticket";

const DATABASE_FILE: &str = "proxmoxer.redb";
const KEY_FILE: &str = "proxmoxer.key";
const CONFIG_FILE: &str = "proxmoxer.toml";
const LISTENING_MARKER: &str = "listening on http://";
const POLL_INTERVAL: Duration = Duration::from_millis(20);
const DEFAULT_RUST_LOG: &str = "info,proxmoxer=debug";
const API_TOKENS_FILE: &str = "api-tokens";

/// A running `proxmoxer` daemon.
pub struct TestApp {
    /// Where the daemon listens; changes on [`TestApp::restart`].
    pub addr: SocketAddr,
    /// No redirects followed, no proxy, bounded timeouts.
    pub client: reqwest::Client,
    data_dir: Arc<TempDir>,
    env: BTreeMap<String, String>,
    removed_env: BTreeSet<String>,
    process: Option<Process>,
    earlier_logs: String,
}

/// Configures a daemon before it starts. Defaults: `PROXMOXER_LISTEN=127.0.0.1:0`,
/// `PROXMOXER_DATABASE=<temp dir>/proxmoxer.redb`, `RUST_LOG=info,proxmoxer=debug`.
pub struct TestAppBuilder {
    data_dir: Arc<TempDir>,
    env: BTreeMap<String, String>,
    removed_env: BTreeSet<String>,
    bearer: Option<String>,
}

impl TestApp {
    /// A builder with a fresh temporary data directory; see [`TestAppBuilder`].
    pub fn builder() -> TestAppBuilder {
        let data_dir = tempfile::Builder::new()
            .prefix("proxmoxer-test-")
            .tempdir()
            .expect("create a temporary data directory");
        TestAppBuilder::new(Arc::new(data_dir))
    }

    /// Starts a daemon with the default settings.
    pub async fn spawn() -> Self {
        Self::builder().spawn().await
    }

    /// Runs a daemon with the default settings that is expected to fail at start-up.
    pub async fn spawn_expect_failure() -> (ExitStatus, String) {
        Self::builder().spawn_expect_failure().await
    }

    /// A builder for another daemon on this one's data directory and environment, e.g. to check
    /// that a second instance refuses the database this one holds.
    pub fn second_instance(&self) -> TestAppBuilder {
        TestAppBuilder {
            data_dir: Arc::clone(&self.data_dir),
            env: self.env.clone(),
            removed_env: self.removed_env.clone(),
            bearer: None,
        }
    }

    /// `http://ADDR`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://ADDR/api/v1<path>`.
    pub fn api_url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base_url())
    }

    /// `POST /api/v1/clusters` with `body` as JSON.
    pub async fn post_clusters(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(self.api_url("/clusters"))
            .json(body)
            .send()
            .await
            .expect("POST /api/v1/clusters")
    }

    /// Sends `body` as is, with `content_type` if given.
    pub async fn post_clusters_raw(
        &self,
        body: &str,
        content_type: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.api_url("/clusters"))
            .body(body.to_owned());
        if let Some(content_type) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        request.send().await.expect("POST /api/v1/clusters")
    }

    /// `GET /api/v1/clusters`.
    pub async fn get_clusters(&self) -> reqwest::Response {
        self.client
            .get(self.api_url("/clusters"))
            .send()
            .await
            .expect("GET /api/v1/clusters")
    }

    /// `GET /api/v1/clusters/{id}`.
    pub async fn get_cluster(&self, id: impl Display) -> reqwest::Response {
        self.client
            .get(self.api_url(&format!("/clusters/{id}")))
            .send()
            .await
            .expect("GET /api/v1/clusters/{id}")
    }

    /// `DELETE /api/v1/clusters/{id}`.
    pub async fn delete_cluster(&self, id: impl Display) -> reqwest::Response {
        self.client
            .delete(self.api_url(&format!("/clusters/{id}")))
            .send()
            .await
            .expect("DELETE /api/v1/clusters/{id}")
    }

    /// `GET /health`.
    pub async fn get_health(&self) -> reqwest::Response {
        self.client
            .get(format!("{}/health", self.base_url()))
            .send()
            .await
            .expect("GET /health")
    }

    /// Everything the current (or last) daemon process wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.process
            .as_ref()
            .map(|process| process.stderr.text())
            .unwrap_or_default()
    }

    /// The stderr of every process this `TestApp` started, restarts included.
    pub fn all_logs(&self) -> String {
        format!("{}{}", self.earlier_logs, self.logs())
    }

    /// Everything the current (or last) daemon process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.process
            .as_ref()
            .map(|process| process.stdout.text())
            .unwrap_or_default()
    }

    /// The temporary directory holding the database and key; removed with the last user.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// `PROXMOXER_DATABASE` as given to the daemon.
    pub fn db_path(&self) -> PathBuf {
        self.env
            .get("PROXMOXER_DATABASE")
            .map_or_else(|| self.data_dir().join(DATABASE_FILE), PathBuf::from)
    }

    /// `PROXMOXER_KEY_FILE`, or the daemon's default beside the database.
    pub fn key_path(&self) -> PathBuf {
        if let Some(key_file) = self.env.get("PROXMOXER_KEY_FILE") {
            return PathBuf::from(key_file);
        }
        let db_path = self.db_path();
        db_path
            .parent()
            .unwrap_or_else(|| self.data_dir())
            .join(KEY_FILE)
    }

    /// The process id of the current (or last) daemon process.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|process| process.child.id())
    }

    /// Sends SIGHUP: the daemon re-reads its API tokens file.
    pub fn sighup(&self) {
        let pid = self.pid().expect("sighup: the daemon was never started");
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("run kill -HUP");
        assert!(status.success(), "kill -HUP {pid} failed with {status}");
    }

    /// Whether the daemon process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|process| matches!(process.child.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM and waits for the exit; panics with the logs if it takes longer than
    /// [`SHUTDOWN_TIMEOUT`].
    pub async fn terminate(&mut self) -> ExitStatus {
        let earlier_logs = self.earlier_logs.clone();
        let process = self
            .process
            .as_mut()
            .expect("terminate: the daemon was never started");
        if let Ok(Some(status)) = process.child.try_wait() {
            return status;
        }
        send_sigterm(process.child.id());
        match wait_for_exit(&mut process.child, SHUTDOWN_TIMEOUT).await {
            Some(status) => {
                process.drain_output().await;
                status
            }
            None => {
                let _ = process.child.kill();
                let _ = process.child.wait();
                panic!(
                    "proxmoxer did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM; logs:\n{earlier_logs}{}",
                    process.stderr.text()
                );
            }
        }
    }

    /// Kills the daemon with SIGKILL, as a crash or power loss would.
    pub async fn kill9(&mut self) -> ExitStatus {
        let process = self
            .process
            .as_mut()
            .expect("kill9: the daemon was never started");
        let _ = process.child.kill();
        let status = process.child.wait().expect("wait for the killed daemon");
        process.drain_output().await;
        status
    }

    /// Stops the daemon with SIGTERM (asserting a clean exit) unless it is already dead, then
    /// starts it again on the same data directory and environment. [`Self::addr`] changes.
    pub async fn restart(&mut self) {
        if self.is_running() {
            let status = self.terminate().await;
            assert!(
                status.success(),
                "proxmoxer exited with {status} on SIGTERM; logs:\n{}",
                self.all_logs()
            );
        }
        if let Some(process) = self.process.take() {
            self.earlier_logs.push_str(&process.stderr.text());
        }
        let (process, addr) =
            start_and_wait(&self.env, &self.removed_env, &self.earlier_logs).await;
        self.process = Some(process);
        self.addr = addr;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let Some(process) = self.process.as_mut() else {
            return;
        };
        if matches!(process.child.try_wait(), Ok(None)) {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- proxmoxer stderr ({}) ----\n{}---- end of proxmoxer stderr ----",
                self.data_dir.path().display(),
                self.all_logs(),
            );
        }
    }
}

impl TestAppBuilder {
    fn new(data_dir: Arc<TempDir>) -> Self {
        let mut env = BTreeMap::new();
        env.insert("PROXMOXER_LISTEN".to_owned(), "127.0.0.1:0".to_owned());
        env.insert(
            "PROXMOXER_DATABASE".to_owned(),
            data_dir.path().join(DATABASE_FILE).display().to_string(),
        );
        env.insert("RUST_LOG".to_owned(), DEFAULT_RUST_LOG.to_owned());
        Self {
            data_dir,
            env,
            removed_env: BTreeSet::new(),
            bearer: None,
        }
    }

    /// `<data dir>/api-tokens`, where [`Self::api_token`] keeps its tokens.
    pub fn tokens_file(&self) -> PathBuf {
        self.data_dir.path().join(API_TOKENS_FILE)
    }

    /// Adds an API token with `role` (`read` or `admin`) to [`Self::tokens_file`] through
    /// `proxmoxer token add`, points `PROXMOXER_API_TOKENS_FILE` at the file, and returns the
    /// token's secret.
    pub fn api_token(self, name: &str, role: &str) -> (Self, String) {
        let path = self.tokens_file();
        let secret = add_api_token(&path, name, role);
        (
            self.env("PROXMOXER_API_TOKENS_FILE", path.display().to_string()),
            secret,
        )
    }

    /// Makes [`TestApp::client`] send `Authorization: Bearer <secret>` with every request.
    pub fn bearer(mut self, secret: &str) -> Self {
        self.bearer = Some(secret.to_owned());
        self
    }

    /// Sets an environment variable for the daemon, replacing a default.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.removed_env.remove(key);
        self.env.insert(key.to_owned(), value.into());
        self
    }

    /// Leaves a variable unset, including the defaults above.
    pub fn env_remove(mut self, key: &str) -> Self {
        self.env.remove(key);
        self.removed_env.insert(key.to_owned());
        self
    }

    /// Writes `toml` to `<data dir>/proxmoxer.toml` and points `PROXMOXER_CONFIG` at it.
    pub fn config_toml(self, toml: &str) -> Self {
        let path = self.data_dir.path().join(CONFIG_FILE);
        std::fs::write(&path, toml).expect("write the test config file");
        self.env("PROXMOXER_CONFIG", path.display().to_string())
    }

    /// The data directory the daemon will use, e.g. to plant files before it starts.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Starts the daemon and waits until it logs `listening on http://…`; panics with its stderr
    /// if it exits first or takes longer than [`SPAWN_TIMEOUT`].
    pub async fn spawn(self) -> TestApp {
        let (process, addr) = start_and_wait(&self.env, &self.removed_env, "").await;
        let client = test_client(self.bearer.as_deref());
        TestApp {
            addr,
            client,
            data_dir: self.data_dir,
            env: self.env,
            removed_env: self.removed_env,
            process: Some(process),
            earlier_logs: String::new(),
        }
    }

    /// Runs the daemon expecting it to exit with a failure status, and returns that status and
    /// its stderr. Panics if it exits successfully or keeps running past [`FAILURE_TIMEOUT`].
    pub async fn spawn_expect_failure(self) -> (ExitStatus, String) {
        let mut process = Process::start(&self.env, &self.removed_env);
        let status = wait_for_exit(&mut process.child, FAILURE_TIMEOUT).await;
        let Some(status) = status else {
            let _ = process.child.kill();
            let _ = process.child.wait();
            process.drain_output().await;
            panic!(
                "proxmoxer was expected to fail but still ran after {FAILURE_TIMEOUT:?}; stderr:\n{}",
                process.stderr.text()
            );
        };
        process.drain_output().await;
        let stderr = process.stderr.text();
        assert!(
            !status.success(),
            "proxmoxer was expected to fail but exited with {status}; stderr:\n{stderr}"
        );
        (status, stderr)
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
/// Use it instead of fixed sleeps: `assert!(wait_until(async || …, timeout).await, "…")`.
#[must_use = "assert on the result: false means the condition never held"]
pub async fn wait_until(mut condition: impl AsyncFnMut() -> bool, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A client like [`TestApp::client`]: no redirects followed, no proxy, bounded timeouts; with
/// `bearer`, every request carries `Authorization: Bearer <bearer>`.
pub fn test_client(bearer: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(secret) = bearer {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {secret}"))
            .expect("a secret is a valid header value");
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .build()
        .expect("build the test HTTP client")
}

/// The `proxmoxer` binary with none of the developer's `PROXMOXER_*` settings, e.g. for its
/// subcommands.
pub fn proxmoxer_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_proxmoxer"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PROXMOXER_") {
            command.env_remove(&key);
        }
    }
    for key in ["NOTIFY_SOCKET", "RUST_LOG", "CREDENTIALS_DIRECTORY"] {
        command.env_remove(key);
    }
    command
}

/// `proxmoxer token add NAME --role ROLE --tokens-file PATH`, which must succeed; returns the
/// secret it printed.
pub fn add_api_token(path: &Path, name: &str, role: &str) -> String {
    let output = proxmoxer_command()
        .args(["token", "add", name, "--role", role, "--tokens-file"])
        .arg(path)
        .output()
        .expect("run proxmoxer token add");
    assert!(
        output.status.success(),
        "token add {name} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let secret = String::from_utf8(output.stdout)
        .expect("the secret is UTF-8")
        .trim()
        .to_owned();
    assert!(secret.starts_with("pmx_"), "a secret: {secret:?}");
    secret
}

// --- daemons and fakes --------------------------------------------------------------------------

/// A builder for a daemon that checks every cluster every `interval` and gives each Proxmox call
/// `proxmox_timeout`.
pub fn daemon_checking_every(interval: &str, proxmox_timeout: &str) -> TestAppBuilder {
    TestApp::builder()
        .env("PROXMOXER_MONITOR_INTERVAL", interval)
        .env("PROXMOXER_PROXMOX_TIMEOUT", proxmox_timeout)
}

/// A builder for a daemon that checks every 100 ms with a 2 s Proxmox timeout.
pub fn fast_daemon() -> TestAppBuilder {
    daemon_checking_every("100ms", "2s")
}

/// A plain-HTTP fake Proxmox that rejects logins after [`SHORT_AUTH_DELAY`].
pub async fn fake_pve() -> FakePve {
    let fake = FakePve::start().await;
    fake.set_auth_failure_delay(SHORT_AUTH_DELAY);
    fake
}

/// An HTTPS fake Proxmox with a certificate made for this test, rejecting logins after
/// [`SHORT_AUTH_DELAY`].
pub async fn tls_fake() -> FakePve {
    let fake = FakePve::start_tls().await;
    fake.set_auth_failure_delay(SHORT_AUTH_DELAY);
    fake
}

// --- the clusters API ---------------------------------------------------------------------------

/// `{"name", "api_endpoint", "username", "password"}` for registering `fake` with its default
/// credentials.
pub fn register_body(fake: &FakePve, name: &str) -> Value {
    register_body_at(&fake.url(), name)
}

/// The fakes' default credentials, registered as `name` at `endpoint`.
pub fn register_body_at(endpoint: &str, name: &str) -> Value {
    json!({
        "name": name,
        "api_endpoint": endpoint,
        "username": DEFAULT_USER,
        "password": DEFAULT_PASSWORD,
    })
}

/// The status and JSON body of a response; panics with the raw body if it is not JSON.
pub async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("read the response body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("a {status} response is not JSON ({e}): {text:?}"));
    (status, body)
}

/// Registers with `body`; expects `201` and a healthy cluster, and returns the Cluster object.
pub async fn register(app: &TestApp, body: &Value) -> Value {
    let (status, cluster) = json_of(app.post_clusters(body).await).await;
    assert_eq!(status, StatusCode::CREATED, "{body} -> {cluster}");
    assert_eq!(cluster["status"], "healthy", "{cluster}");
    cluster
}

/// Registers `fake` as `name` with its default credentials, as [`register`] does.
pub async fn register_fake(app: &TestApp, fake: &FakePve, name: &str) -> Value {
    register(app, &register_body(fake, name)).await
}

/// Registers `fake` as `name` with its default credentials, as [`register`] does, and returns
/// the new cluster's id.
pub async fn register_fake_id(app: &TestApp, fake: &FakePve, name: &str) -> String {
    id_of(&register_fake(app, fake, name).await)
}

/// The `id` of a Cluster object.
pub fn id_of(cluster: &Value) -> String {
    cluster["id"]
        .as_str()
        .unwrap_or_else(|| panic!("the cluster has a string id: {cluster}"))
        .to_owned()
}

/// `GET /api/v1/clusters/{id}`, which must answer 200.
pub async fn fetch_cluster(app: &TestApp, id: &str) -> Value {
    let (status, body) = json_of(app.get_cluster(id).await).await;
    assert_eq!(status, StatusCode::OK, "GET cluster {id}: {body}");
    body
}

/// A finished command's exit status and output, for assertion messages.
pub fn describe(output: &std::process::Output) -> String {
    format!(
        "{}\nstdout:\n{}stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `GET /api/v1/clusters/{id}/history` as (status, body).
pub async fn history(app: &TestApp, id: &str) -> (StatusCode, Value) {
    let response = app
        .client
        .get(app.api_url(&format!("/clusters/{id}/history")))
        .send()
        .await
        .expect("GET history");
    json_of(response).await
}

/// `GET /api/v1/clusters`, which must answer 200: `{"clusters": [...], "total": N}`.
pub async fn list_clusters(app: &TestApp) -> Value {
    let (status, body) = json_of(app.get_clusters().await).await;
    assert_eq!(status, StatusCode::OK, "GET clusters: {body}");
    body
}

/// The `total` of the cluster list.
pub async fn cluster_count(app: &TestApp) -> u64 {
    let list = list_clusters(app).await;
    list["total"]
        .as_u64()
        .unwrap_or_else(|| panic!("total is a number: {list}"))
}

/// Polls the cluster until `condition` holds and returns that snapshot; panics with the last one
/// seen after [`WAIT`].
pub async fn wait_for_cluster(
    app: &TestApp,
    id: &str,
    what: &str,
    mut condition: impl FnMut(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let held = wait_until(
        async || {
            last = fetch_cluster(app, id).await;
            condition(&last)
        },
        WAIT,
    )
    .await;
    assert!(
        held,
        "timed out after {WAIT:?} waiting for {what}; last seen: {last:#}"
    );
    last
}

/// [`wait_for_cluster`], except that a snapshot showing `unknown` for reason `stale` never
/// matches: with 100 ms intervals a loaded test machine can delay a check past the 3-interval
/// stale window, and the tests using this are not about that.
pub async fn wait_for_cluster_skipping_stale(
    app: &TestApp,
    id: &str,
    what: &str,
    mut condition: impl FnMut(&Value) -> bool,
) -> Value {
    wait_for_cluster(app, id, what, |snapshot| {
        snapshot["status_reason"] != "stale" && condition(snapshot)
    })
    .await
}

/// Waits until the monitor has tried every member at least once (right after registration it
/// probes those no check used, which is a shown change of its own) and returns that snapshot.
pub async fn wait_for_member_probes(app: &TestApp, id: &str) -> Value {
    wait_for_cluster_skipping_stale(app, id, "every member tried once", |c| {
        c["members"]
            .as_array()
            .is_some_and(|members| members.iter().all(|m| !m["reachable"].is_null()))
    })
    .await
}

/// A timestamp field of a Cluster object.
pub fn timestamp(cluster: &Value, field: &str) -> DateTime<Utc> {
    let text = cluster[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is a timestamp: {cluster}"));
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{field} is RFC 3339 ({e}): {cluster}"))
        .with_timezone(&Utc)
}

/// Whether a Cluster object shows `status` for `reason`.
pub fn has_status(cluster: &Value, status: &str, reason: &str) -> bool {
    cluster["status"] == status && cluster["status_reason"] == reason
}

/// Healthy, for reason `ok`, with no `last_error`.
pub fn is_healthy(cluster: &Value) -> bool {
    has_status(cluster, "healthy", "ok") && cluster["last_error"].is_null()
}

/// Asserts that the fake's last cluster status read carried the API token `user!token=secret`
/// and no ticket cookie.
pub fn assert_status_read_with_token(fake: &FakePve, user: &str, token: &str, secret: &str) {
    let headers = fake
        .last_request_headers(STATUS_PATH)
        .expect("cluster status was read");
    assert_eq!(
        headers.get("authorization").and_then(|v| v.to_str().ok()),
        Some(format!("PVEAPIToken={user}!{token}={secret}").as_str())
    );
    assert!(headers.get("cookie").is_none(), "no ticket with a token");
}

// --- process plumbing ---------------------------------------------------------------------------

struct Process {
    child: Child,
    stderr: LogBuffer,
    stdout: LogBuffer,
    readers: Vec<JoinHandle<()>>,
}

/// Output captured by a reader thread.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<String>>);

impl LogBuffer {
    fn push(&self, text: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_str(text);
    }

    fn text(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Process {
    fn start(env: &BTreeMap<String, String>, removed_env: &BTreeSet<String>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_proxmoxer"));
        // The developer's own settings must not leak into a test, nor systemd's sockets.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PROXMOXER_") {
                command.env_remove(&key);
            }
        }
        for key in [
            "JOURNAL_STREAM",
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "RUST_LOG",
        ] {
            command.env_remove(key);
        }
        command.env("NO_COLOR", "1").envs(env);
        for key in removed_env {
            command.env_remove(key);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the proxmoxer binary");
        let echo = std::env::var_os("TEST_LOG").is_some();
        let stderr = LogBuffer::default();
        let stdout = LogBuffer::default();
        let mut readers = Vec::new();
        if let Some(pipe) = child.stderr.take() {
            readers.push(capture(pipe, stderr.clone(), echo));
        }
        if let Some(pipe) = child.stdout.take() {
            readers.push(capture(pipe, stdout.clone(), echo));
        }
        Self {
            child,
            stderr,
            stdout,
            readers,
        }
    }

    /// Gives the reader threads a moment to collect what the exited process left in its pipes.
    async fn drain_output(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|reader| !reader.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

fn capture(pipe: impl Read + Send + 'static, buffer: LogBuffer, echo: bool) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    if echo {
                        eprint!("[proxmoxer] {text}");
                    }
                    buffer.push(&text);
                }
            }
        }
    })
}

async fn start_and_wait(
    env: &BTreeMap<String, String>,
    removed_env: &BTreeSet<String>,
    earlier_logs: &str,
) -> (Process, SocketAddr) {
    let mut process = Process::start(env, removed_env);
    let deadline = Instant::now() + SPAWN_TIMEOUT;
    loop {
        if let Some(addr) = listening_addr(&process.stderr.text()) {
            return (process, addr);
        }
        if let Ok(Some(status)) = process.child.try_wait() {
            process.drain_output().await;
            panic!(
                "proxmoxer exited with {status} before listening; stderr:\n{earlier_logs}{}",
                process.stderr.text()
            );
        }
        if Instant::now() >= deadline {
            let _ = process.child.kill();
            let _ = process.child.wait();
            process.drain_output().await;
            panic!(
                "proxmoxer did not log `listening on` within {SPAWN_TIMEOUT:?}; stderr:\n{earlier_logs}{}",
                process.stderr.text()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The address in the first `listening on http://ADDR` of the logs.
fn listening_addr(logs: &str) -> Option<SocketAddr> {
    let start = logs.find(LISTENING_MARKER)? + LISTENING_MARKER.len();
    let addr: String = logs[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    addr.parse().ok()
}

fn send_sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill -TERM");
    assert!(status.success(), "kill -TERM {pid} failed with {status}");
}

async fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_addr_is_found_in_plain_and_structured_logs() {
        let plain = "2025-01-01T00:00:00Z  INFO proxmoxer: listening on http://127.0.0.1:41234\n";
        assert_eq!(listening_addr(plain), "127.0.0.1:41234".parse().ok());
        let json = r#"{"level":"INFO","fields":{"message":"listening on http://127.0.0.1:5000"}}"#;
        assert_eq!(listening_addr(json), "127.0.0.1:5000".parse().ok());
        let fields = "INFO proxmoxer: listening on http://[::1]:8080/ addr=[::1]:8080\n";
        assert_eq!(listening_addr(fields), "[::1]:8080".parse().ok());
        assert_eq!(listening_addr("INFO starting\n"), None);
    }
}
