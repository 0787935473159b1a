//! `proxmoxer status` and `proxmoxer watch` as an operator runs them: the real binary against
//! a real daemon and fake Proxmox servers. Exit codes, order and output of the table, the
//! messages when the daemon gives no answer, tokens, and the live lines of `watch` across a
//! daemon restart and a cut connection.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;

use crate::fake_pve::{DEFAULT_USER, FakePve};
use crate::helpers::describe;
use crate::helpers::{
    SHUTDOWN_TIMEOUT, TestApp, WAIT, fake_pve, fast_daemon, has_status, proxmoxer_command,
    register_fake_id, wait_for_cluster_skipping_stale, wait_until,
};

/// Runs `proxmoxer ARGS` to completion off the async runtime.
async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().expect("run proxmoxer"))
        .await
        .expect("the command's thread")
}

fn status_at(url: &str, extra: &[&str]) -> Command {
    let mut command = proxmoxer_command();
    command.args(["status", "--url", url]).args(extra);
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The exit code, which must exist: these commands end by themselves, not by a signal.
fn code(output: &Output) -> i32 {
    output
        .status
        .code()
        .unwrap_or_else(|| panic!("ended by a signal: {}", describe(output)))
}

/// The cluster names of the table's rows, top to bottom.
fn table_names(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .skip_while(|line| !line.starts_with("NAME"))
        .skip(1)
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The whitespace-separated cells of `name`'s row.
fn row_cells(stdout: &str, name: &str) -> Vec<String> {
    stdout
        .lines()
        .find(|line| line.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("a row for {name}: {stdout}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A loopback port nothing listens on (bound, then released).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("its address").port()
}

/// Takes `name`'s registered cluster down until it is unhealthy.
async fn make_unreachable(app: &TestApp, fake: &FakePve, id: &str) {
    fake.set_down(true);
    wait_for_cluster_skipping_stale(app, id, "unhealthy", |c| {
        has_status(c, "unhealthy", "unreachable")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exits_0_with_a_plain_table_when_every_cluster_is_healthy() {
    let app = fast_daemon().spawn().await;

    let empty = run(status_at(&app.base_url(), &[])).await;
    assert_eq!(code(&empty), 0, "{}", describe(&empty));
    assert_eq!(text(&empty.stdout), "OK - no clusters registered\n");

    let (one, two) = (fake_pve().await, fake_pve().await);
    register_fake_id(&app, &one, "beta").await;
    register_fake_id(&app, &two, "alpha").await;
    let output = run(status_at(&app.base_url(), &[])).await;
    assert_eq!(code(&output), 0, "{}", describe(&output));
    let stdout = text(&output.stdout);
    assert!(
        !stdout.contains('\x1b'),
        "no escape codes into a pipe: {stdout:?}"
    );
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("OK - 2 clusters: 2 healthy"), "{stdout}");
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "STATUS", "REASON", "NODES", "VERSION", "CHECKED"]
    );
    assert_eq!(table_names(&stdout), ["alpha", "beta"], "{stdout}");
    for row in lines {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1..5], ["healthy", "ok", "3/3", "8.4.1"], "{row}");
        assert!(row.ends_with(" ago"), "checked some seconds ago: {row}");
    }
    assert!(output.stderr.is_empty(), "{}", describe(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exits_1_for_a_degraded_cluster_and_2_for_an_unhealthy_one_listing_worst_first() {
    let app = fast_daemon().spawn().await;
    let (fine, offline, down, rejected) = (
        fake_pve().await,
        fake_pve().await,
        fake_pve().await,
        fake_pve().await,
    );
    // Names in the reverse of the worst-first order, so sorting by name alone would fail.
    register_fake_id(&app, &fine, "aa-fine").await;
    let offline_id = register_fake_id(&app, &offline, "mm-node-offline").await;
    let down_id = register_fake_id(&app, &down, "zz-down").await;

    offline.set_node_online("pve3", false);
    wait_for_cluster_skipping_stale(&app, &offline_id, "degraded", |c| {
        has_status(c, "degraded", "node_offline")
    })
    .await;
    let output = run(status_at(&app.base_url(), &[])).await;
    assert_eq!(code(&output), 1, "{}", describe(&output));
    let stdout = text(&output.stdout);
    assert!(
        stdout.starts_with("WARNING - 3 clusters: 1 degraded, 2 healthy\n"),
        "{stdout}"
    );
    assert_eq!(
        table_names(&stdout),
        ["mm-node-offline", "aa-fine", "zz-down"]
    );
    assert_eq!(
        row_cells(&stdout, "mm-node-offline")[1..4],
        ["degraded", "node_offline", "2/3"],
        "status, reason and nodes online of total: {stdout}"
    );

    make_unreachable(&app, &down, &down_id).await;
    // A password changed on Proxmox: the daemon finds out at its next login.
    let rejected_id = register_fake_id(&app, &rejected, "pw-changed").await;
    rejected.set_password(DEFAULT_USER, "changed-on-proxmox");
    rejected.invalidate_tickets();
    wait_for_cluster_skipping_stale(&app, &rejected_id, "auth_failed", |c| {
        has_status(c, "unhealthy", "auth_failed")
    })
    .await;

    let output = run(status_at(&app.base_url(), &[])).await;
    assert_eq!(code(&output), 2, "{}", describe(&output));
    let stdout = text(&output.stdout);
    assert!(
        stdout.starts_with("CRITICAL - 4 clusters: 2 unhealthy, 1 degraded, 1 healthy\n"),
        "{stdout}"
    );
    assert_eq!(
        table_names(&stdout),
        ["pw-changed", "zz-down", "mm-node-offline", "aa-fine"]
    );
    assert!(
        stdout.contains("unreachable: "),
        "the error of the last check is shown: {stdout}"
    );

    let output = run(status_at(&app.base_url(), &["--json"])).await;
    assert_eq!(
        code(&output),
        2,
        "--json keeps the exit code: {}",
        describe(&output)
    );
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("--json prints JSON ({e}): {}", describe(&output)));
    assert_eq!(report["state"], "CRITICAL", "{report}");
    assert_eq!(report["exit_code"], 2, "{report}");
    assert_eq!(report["total"], 4, "{report}");
    assert_eq!(
        report["counts"],
        serde_json::json!({"unhealthy": 2, "unknown": 0, "degraded": 1, "healthy": 1})
    );
    let order: Vec<&str> = report["clusters"]
        .as_array()
        .expect("a cluster list")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        order,
        ["pw-changed", "zz-down", "mm-node-offline", "aa-fine"]
    );
    assert_eq!(report["clusters"][0]["status_reason"], "auth_failed");
    assert!(
        !text(&output.stdout).contains("changed-on-proxmox"),
        "no password in the output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exits_3_and_says_why_when_the_daemon_gives_no_answer() {
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    for extra in [&[][..], &["--json"][..]] {
        let output = run(status_at(&nowhere, extra)).await;
        assert_eq!(code(&output), 3, "{}", describe(&output));
        assert!(output.stdout.is_empty(), "{}", describe(&output));
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains(&format!("cannot reach proxmoxer at {nowhere}"))
                && stderr.contains("connection refused"),
            "{stderr}"
        );
    }

    // Something else answers at that address: a fake Proxmox knows no /api/v1/clusters.
    let not_proxmoxer = fake_pve().await;
    let output = run(status_at(&not_proxmoxer.url(), &[])).await;
    assert_eq!(code(&output), 3, "{}", describe(&output));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!("proxmoxer at {} answered", not_proxmoxer.url())),
        "{stderr}"
    );

    let bad_url = run(status_at("localhost:8080", &[])).await;
    assert_eq!(code(&bad_url), 3, "{}", describe(&bad_url));
    assert!(text(&bad_url.stderr).contains("invalid --url"));

    // A mistyped option is UNKNOWN too, not clap's usual 2, which would read as CRITICAL.
    let typo = run(status_at(&nowhere, &["--jsno"])).await;
    assert_eq!(code(&typo), 3, "{}", describe(&typo));
    assert!(text(&typo.stderr).contains("--jsno"), "{}", describe(&typo));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_finds_the_daemon_through_the_configured_listen_address() {
    let app = fast_daemon().spawn().await;
    let fake = fake_pve().await;
    register_fake_id(&app, &fake, "configured").await;

    let config = tempfile::NamedTempFile::new().expect("a config file");
    std::fs::write(
        config.path(),
        format!("[server]\nlisten = \"{}\"\n", app.addr),
    )
    .expect("write the config file");
    let mut command = proxmoxer_command();
    command.arg("status").arg("--config").arg(config.path());
    let output = run(command).await;
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(table_names(&text(&output.stdout)), ["configured"]);

    let mut command = proxmoxer_command();
    command
        .arg("status")
        .env("PROXMOXER_LISTEN", app.addr.to_string());
    let output = run(command).await;
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(table_names(&text(&output.stdout)), ["configured"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_tokens_status_and_watch_need_a_token_from_the_environment_or_the_flag() {
    let (builder, admin) = fast_daemon().api_token("ops", "admin");
    let (builder, read) = builder.api_token("grafana", "read");
    let app = builder.bearer(&admin).spawn().await;
    let fake = fake_pve().await;
    register_fake_id(&app, &fake, "guarded").await;

    let output = run(status_at(&app.base_url(), &[])).await;
    assert_eq!(code(&output), 3, "{}", describe(&output));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("requires an API token") && stderr.contains("PROXMOXER_TOKEN"),
        "{stderr}"
    );

    let mut with_env = status_at(&app.base_url(), &[]);
    with_env.env("PROXMOXER_TOKEN", &read);
    let output = run(with_env).await;
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(table_names(&text(&output.stdout)), ["guarded"]);

    let output = run(status_at(&app.base_url(), &["--token", &read])).await;
    assert_eq!(code(&output), 0, "{}", describe(&output));

    let wrong = "pmx_0000000000000000000000000000000000000000000";
    let output = run(status_at(&app.base_url(), &["--token", wrong])).await;
    assert_eq!(code(&output), 3, "{}", describe(&output));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("did not accept the API token"), "{stderr}");
    assert!(!stderr.contains(wrong), "the token is not echoed: {stderr}");

    let mut watch = proxmoxer_command();
    watch.args(["watch", "--url", &app.base_url()]);
    let output = run(watch).await;
    assert_eq!(code(&output), 3, "{}", describe(&output));
    assert!(text(&output.stderr).contains("requires an API token"));
}

/// A running `proxmoxer watch`, its output collected by reader threads; killed on drop.
struct Watch {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Watch {
    fn start(url: &str) -> Self {
        let mut child = proxmoxer_command()
            .args(["watch", "--url", url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start proxmoxer watch");
        let stdout = collect(child.stdout.take().expect("piped stdout"));
        let stderr = collect(child.stderr.take().expect("piped stderr"));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until a line of stdout contains every one of `parts`; returns that line.
    async fn wait_for_line(&self, parts: &[&str]) -> String {
        let find = || {
            self.stdout()
                .lines()
                .find(|line| parts.iter().all(|part| line.contains(part)))
                .map(str::to_owned)
        };
        let found = wait_until(async || find().is_some(), WAIT).await;
        assert!(
            found,
            "timed out after {WAIT:?} waiting for a line with {parts:?}; stdout:\n{}stderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        find().unwrap_or_default()
    }

    async fn wait_for_stderr(&self, part: &str) {
        let found = wait_until(async || self.stderr().contains(part), WAIT).await;
        assert!(
            found,
            "timed out after {WAIT:?} waiting for {part:?} on stderr; stderr:\n{}",
            self.stderr()
        );
    }

    /// Sends `signal` (e.g. `-INT`) and waits for the exit.
    async fn stop_with(&mut self, signal: &str) -> ExitStatus {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill {signal} failed");
        let mut status = None;
        let exited = wait_until(
            async || {
                status = self.child.try_wait().ok().flatten();
                status.is_some()
            },
            SHUTDOWN_TIMEOUT,
        )
        .await;
        assert!(
            exited,
            "watch did not exit on {signal}; stderr:\n{}",
            self.stderr()
        );
        status.expect("an exit status")
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buffer = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&buffer);
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = String::new();
        while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
            sink.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_str(&line);
            line.clear();
        }
    });
    buffer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_a_line_per_registration_status_change_and_deletion_until_sigint() {
    let app = fast_daemon().spawn().await;
    let fake = fake_pve().await;
    let mut watch = Watch::start(&app.base_url());
    watch
        .wait_for_stderr(&format!("watching 0 clusters at {}", app.base_url()))
        .await;

    let id = register_fake_id(&app, &fake, "watched").await;
    watch
        .wait_for_line(&["  watched  registered: healthy  ok, 3/3 nodes online"])
        .await;

    fake.set_node_online("pve2", false);
    watch
        .wait_for_line(&["  watched  healthy -> degraded  node_offline, 2/3 nodes online"])
        .await;

    let response = app.delete_cluster(&id).await;
    assert_eq!(response.status(), reqwest::StatusCode::NO_CONTENT);
    watch
        .wait_for_line(&["  watched  deregistered (was degraded)"])
        .await;

    let status = watch.stop_with("-INT").await;
    assert!(status.success(), "exit 0 on SIGINT: {status}");
    let stdout = watch.stdout();
    assert!(!stdout.contains('\x1b'), "plain into a pipe: {stdout:?}");
    for line in stdout.lines() {
        let time = line.get(..19).unwrap_or_default();
        assert!(
            chrono::NaiveDateTime::parse_from_str(time, "%Y-%m-%d %H:%M:%S").is_ok(),
            "each line starts with the time: {line}"
        );
    }
    let degraded_lines = stdout.lines().filter(|l| l.contains("-> degraded")).count();
    assert_eq!(degraded_lines, 1, "one line per change: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnects_after_a_daemon_restart_and_exits_0_on_sigterm() {
    // A fixed port, so the restarted daemon is where the watch looks for it.
    let listen = format!("127.0.0.1:{}", free_port());
    let mut app = fast_daemon()
        .env("PROXMOXER_LISTEN", listen.clone())
        .spawn()
        .await;
    let (first, second) = (fake_pve().await, fake_pve().await);
    let mut watch = Watch::start(&format!("http://{listen}"));
    watch.wait_for_stderr("watching 0 clusters").await;
    register_fake_id(&app, &first, "before-restart").await;
    watch
        .wait_for_line(&["  before-restart  registered: healthy"])
        .await;

    app.restart().await;
    watch.wait_for_stderr("lost the event stream").await;
    watch.wait_for_stderr("reconnected").await;

    register_fake_id(&app, &second, "after-restart").await;
    watch
        .wait_for_line(&["  after-restart  registered: healthy"])
        .await;
    assert_eq!(
        watch
            .stdout()
            .lines()
            .filter(|l| l.contains("before-restart  registered"))
            .count(),
        1,
        "the cluster that was there throughout is not registered twice: {}",
        watch.stdout()
    );

    let status = watch.stop_with("-TERM").await;
    assert!(status.success(), "exit 0 on SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_exits_3_when_the_daemon_cannot_be_reached_at_start() {
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let mut command = proxmoxer_command();
    command.args(["watch", "--url", &nowhere]);
    let output = run(command).await;
    assert_eq!(code(&output), 3, "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("connection refused"),
        "{}",
        describe(&output)
    );
}

/// A TCP relay to the daemon whose connections can be cut, as a network failure or a proxy
/// restart would, while the daemon keeps running.
struct CuttableRelay {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl CuttableRelay {
    async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let addr = listener.local_addr().expect("the relay's address");
        let down = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accepting = {
            let down = Arc::clone(&down);
            let connections = Arc::clone(&connections);
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if down.load(Ordering::SeqCst) {
                        continue;
                    }
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(relay);
                }
            })
        };
        Self {
            addr,
            down,
            connections,
            accepting,
        }
    }

    /// Closes every relayed connection and refuses new ones until [`Self::restore`].
    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for relay in self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            relay.abort();
        }
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for CuttableRelay {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_with_last_event_id_and_prints_what_happened_while_cut_off() {
    let app = fast_daemon().spawn().await;
    let (first, second) = (fake_pve().await, fake_pve().await);
    let relay = CuttableRelay::start(app.addr).await;
    let watch = Watch::start(&format!("http://{}", relay.addr));
    watch.wait_for_stderr("watching 0 clusters").await;
    register_fake_id(&app, &first, "seen-live").await;
    watch
        .wait_for_line(&["  seen-live  registered: healthy"])
        .await;

    relay.cut();
    watch.wait_for_stderr("lost the event stream").await;
    // Only the event buffer, replayed after the id the watch last saw, can tell it this.
    register_fake_id(&app, &second, "while-cut-off").await;
    relay.restore();
    watch.wait_for_stderr("reconnected").await;
    watch
        .wait_for_line(&["  while-cut-off  registered: healthy"])
        .await;
    let stdout = watch.stdout();
    assert_eq!(
        stdout.lines().filter(|l| l.contains("registered")).count(),
        2,
        "each registration once: {stdout}"
    );
    assert!(
        app.logs()
            .matches("route=\"/api/v1/clusters\" status=200")
            .count()
            == 1,
        "resumed from the buffer, not by listing again: {}",
        app.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_cut_off_before_any_event_lists_again_on_reconnecting() {
    let app = fast_daemon().spawn().await;
    let fake = fake_pve().await;
    let relay = CuttableRelay::start(app.addr).await;
    let watch = Watch::start(&format!("http://{}", relay.addr));
    watch.wait_for_stderr("watching 0 clusters").await;

    relay.cut();
    watch.wait_for_stderr("lost the event stream").await;
    // No event id to resume from: only a new listing can show this.
    register_fake_id(&app, &fake, "registered-unseen").await;
    relay.restore();
    watch.wait_for_stderr("reconnected").await;
    watch
        .wait_for_line(&["  registered-unseen  registered: healthy"])
        .await;
}
