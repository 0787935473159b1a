//! Benchmarks, not tests: they print figures and assert nothing about time, which is noise on
//! a shared machine. Run them against an optimised build:
//!
//! ```sh
//! cargo test --release --test api bench -- --ignored --nocapture --test-threads 1
//! ```

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::fake_pve::FakePve;
use crate::helpers::{TestApp, register_body, wait_until};

/// Clusters registered by the benchmarks that monitor a thousand.
pub(crate) const CLUSTERS: usize = 1_000;
/// Concurrent clients of every load generator and registration burst.
pub(crate) const CONCURRENCY: usize = 32;
/// How long each read load runs.
pub(crate) const LOAD_DURATION: Duration = Duration::from_secs(5);

/// A process's resident set size in KiB, from `/proc/<pid>/status`.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The latency at fraction `p` (0 to 1) of `sorted`.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Sends GETs to `url` from `CONCURRENCY` tasks for `LOAD_DURATION`; returns sorted latencies.
async fn load(client: &reqwest::Client, url: &str) -> Vec<Duration> {
    load_expecting(client, url, None, StatusCode::OK, LOAD_DURATION).await
}

fn report(what: &str, latencies: &[Duration]) {
    println!(
        "{what}: {:.0} req/s, p50 {:?}, p99 {:?} ({} requests, {CONCURRENCY} connections)",
        latencies.len() as f64 / LOAD_DURATION.as_secs_f64(),
        percentile(latencies, 0.50),
        percentile(latencies, 0.99),
        latencies.len(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
async fn bench_a_thousand_monitored_clusters() {
    let fake = FakePve::start().await;
    let app = TestApp::builder()
        .env("PROXMOXER_MONITOR_INTERVAL", "5s")
        .spawn()
        .await;
    let pid = app.pid().expect("daemon pid");
    println!("idle daemon RSS: {} KiB", rss_kib(pid).unwrap_or(0));

    let rate = register_range(&app, &fake, 0, CLUSTERS).await;
    println!(
        "registered {CLUSTERS} clusters at {rate:.0}/s (each a login, 3 calls to Proxmox and a durable commit)"
    );

    // Let every monitor run a few checks.
    let checks_before = fake.requests("/api2/json/cluster/status");
    let done = wait_until(
        async || fake.requests("/api2/json/cluster/status") >= checks_before + 2 * CLUSTERS as u64,
        Duration::from_secs(60),
    )
    .await;
    assert!(done, "monitors kept checking");
    println!(
        "RSS with {CLUSTERS} monitored clusters: {} KiB",
        rss_kib(pid).unwrap_or(0)
    );
    println!(
        "logins so far: {} (one per registration; monitors reuse the probe's ticket)",
        fake.logins()
    );

    let list: Value = app.get_clusters().await.json().await.expect("JSON");
    let id = list["clusters"][0]["id"].as_str().expect("id").to_owned();
    report(
        "GET /api/v1/clusters/{id}",
        &load(&app.client, &app.api_url(&format!("/clusters/{id}"))).await,
    );
    report(
        "GET /health",
        &load(&app.client, &format!("{}/health", app.base_url())).await,
    );
    report(
        &format!(
            "GET /api/v1/clusters ({CLUSTERS} clusters, ~{} KiB)",
            list.to_string().len() / 1024
        ),
        &load(&app.client, &app.api_url("/clusters")).await,
    );
    println!("RSS after load: {} KiB", rss_kib(pid).unwrap_or(0));
}

/// Like [`load`], with an optional extra header and the status every answer must have.
pub(crate) async fn load_expecting(
    client: &reqwest::Client,
    url: &str,
    header: Option<(&'static str, String)>,
    expected: StatusCode,
    duration: Duration,
) -> Vec<Duration> {
    let mut tasks = tokio::task::JoinSet::new();
    let until = Instant::now() + duration;
    for _ in 0..CONCURRENCY {
        let client = client.clone();
        let url = url.to_owned();
        let header = header.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let started = Instant::now();
                let mut request = client.get(&url);
                if let Some((name, value)) = &header {
                    request = request.header(*name, value);
                }
                let response = request.send().await.expect("GET");
                assert_eq!(response.status(), expected);
                response.bytes().await.expect("body");
                latencies.push(started.elapsed());
            }
            latencies
        });
    }
    let mut all: Vec<Duration> = tasks.join_all().await.into_iter().flatten().collect();
    all.sort();
    all
}

/// Requests per second over `duration`.
pub(crate) fn throughput(latencies: &[Duration], duration: Duration) -> f64 {
    latencies.len() as f64 / duration.as_secs_f64()
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // The kernel reports clock ticks of 1/100 s on every Linux this runs on.
    Some(Duration::from_millis(ticks * 10))
}

/// A bare axum server answering `/one` and `/list` with fixed bytes: the ceiling for a GET.
async fn bare_server(one: axum::body::Bytes, list: axum::body::Bytes) -> String {
    use axum::http::header::CONTENT_TYPE;
    let json = || [(CONTENT_TYPE, "application/json")];
    let app = axum::Router::new()
        .route(
            "/one",
            axum::routing::get(move || async move { (json(), one) }),
        )
        .route(
            "/list",
            axum::routing::get(move || async move { (json(), list) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the bare server");
    let addr = listener.local_addr().expect("bare server address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// Registers clusters `from..to` with 32 concurrent clients; returns the rate per second.
pub(crate) async fn register_range(app: &TestApp, fake: &FakePve, from: usize, to: usize) -> f64 {
    let started = Instant::now();
    let mut registrations = tokio::task::JoinSet::new();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    for n in from..to {
        let request = app
            .client
            .post(app.api_url("/clusters"))
            .json(&register_body(fake, &format!("cluster-{n:05}")));
        let permit = semaphore.clone();
        registrations.spawn(async move {
            let _permit = permit.acquire_owned().await.expect("semaphore");
            request.send().await.expect("POST").status()
        });
    }
    let statuses = registrations.join_all().await;
    assert!(statuses.iter().all(|s| *s == StatusCode::CREATED));
    (to - from) as f64 / started.elapsed().as_secs_f64()
}

/// GET by id and the list against a bare server serving the same bytes, in the same run.
async fn compare_with_bare(app: &TestApp, clusters: usize) {
    let one_url = {
        let list: Value = app.get_clusters().await.json().await.expect("JSON");
        let id = list["clusters"][0]["id"].as_str().expect("id").to_owned();
        app.api_url(&format!("/clusters/{id}"))
    };
    let one = app.client.get(&one_url).send().await.expect("GET");
    let etag = one
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let one = one.bytes().await.expect("body");
    let list_url = app.api_url("/clusters");
    let list = app
        .client
        .get(&list_url)
        .send()
        .await
        .expect("GET")
        .bytes()
        .await
        .expect("body");
    let bare = bare_server(one, list.clone()).await;
    let duration = LOAD_DURATION;
    let ok = StatusCode::OK;
    let ours = load_expecting(&app.client, &one_url, None, ok, duration).await;
    let theirs = load_expecting(&app.client, &format!("{bare}/one"), None, ok, duration).await;
    println!(
        "{clusters} clusters, GET by id: {:.0} req/s (p99 {:?}) vs bare {:.0} req/s (p99 {:?}): ratio {:.2}",
        throughput(&ours, duration),
        percentile(&ours, 0.99),
        throughput(&theirs, duration),
        percentile(&theirs, 0.99),
        throughput(&ours, duration) / throughput(&theirs, duration),
    );
    if let Some(etag) = etag {
        let not_modified = load_expecting(
            &app.client,
            &one_url,
            Some(("if-none-match", etag)),
            StatusCode::NOT_MODIFIED,
            duration,
        )
        .await;
        println!(
            "{clusters} clusters, GET by id answered 304: {:.0} req/s (p99 {:?})",
            throughput(&not_modified, duration),
            percentile(&not_modified, 0.99),
        );
    }
    let ours = load_expecting(&app.client, &list_url, None, ok, duration).await;
    let theirs = load_expecting(&app.client, &format!("{bare}/list"), None, ok, duration).await;
    println!(
        "{clusters} clusters, GET list ({} KiB): {:.0} req/s (p99 {:?}) vs bare {:.0} req/s (p99 {:?}): ratio {:.2}",
        list.len() / 1024,
        throughput(&ours, duration),
        percentile(&ours, 0.99),
        throughput(&theirs, duration),
        percentile(&theirs, 0.99),
        throughput(&ours, duration) / throughput(&theirs, duration),
    );
}

/// A daemon for the read and parking figures. Checks stay out of their way: one round at start,
/// then an hour. No per-request debug lines: logging is not what is measured. Room for ten
/// thousand parked queries on connections of their own, kept open while idle.
async fn quiet_daemon_for_many_connections() -> TestApp {
    TestApp::builder()
        .config_toml("[server]\nmax_connections = 20000\nheader_timeout = \"5m\"\n")
        .env("PROXMOXER_MONITOR_INTERVAL", "1h")
        .env("RUST_LOG", "info")
        .spawn()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
async fn bench_reads_writes_and_waits_against_a_bare_server() {
    raise_open_file_limit();
    let fake = FakePve::start().await;
    let app = quiet_daemon_for_many_connections().await;
    let pid = app.pid().expect("daemon pid");

    register_range(&app, &fake, 0, 100).await;
    // The first checks (within 5 s) and the member probes after them change what is shown.
    tokio::time::sleep(Duration::from_secs(8)).await;
    compare_with_bare(&app, 100).await;

    // Registrations, each answered after its durable commit, and reads during the burst.
    let idle = load_expecting(
        &app.client,
        &app.api_url("/clusters?limit=1"),
        None,
        StatusCode::OK,
        Duration::from_secs(2),
    )
    .await;
    let reads = {
        let client = app.client.clone();
        let url = app.api_url("/clusters?limit=1");
        tokio::spawn(async move {
            load_expecting(&client, &url, None, StatusCode::OK, Duration::from_secs(3)).await
        })
    };
    let rate = register_range(&app, &fake, 100, 10_000).await;
    let during = reads.await.expect("reads during the burst");
    println!(
        "registrations with a durable commit each, 32 concurrent: {rate:.0}/s; GET p99 idle {:?}, during the burst {:?}",
        percentile(&idle, 0.99),
        percentile(&during, 0.99),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    compare_with_bare(&app, 10_000).await;

    // Ten thousand parked blocking queries, as many as the open-file limit lets the daemon
    // serve: it gives API connections half of it, less what the load connections hold.
    let fitting = (open_file_limit() / 2).saturating_sub(1_000) as usize;
    park_blocking_queries(&app, pid, fitting.min(10_000)).await;
}

/// Raises this process's open-file limits, which the daemons it starts inherit, so that ten
/// thousand connections fit on both ends (as root; otherwise they stay as they are).
fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    const WANTED: u64 = 65_536;
    let current = getrlimit(Resource::Nofile);
    if current.maximum.is_some_and(|hard| hard < WANTED) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(WANTED),
                maximum: Some(WANTED),
            },
        );
    }
}

/// The hard open-file limit; the daemon raises its soft limit to it.
fn open_file_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX)
}

/// Opens up to `waiters` keep-alive connections, one GET each, then parks a blocking query on
/// every one (`?wait=5m` with the current tag, one cluster each), and prints what the daemon's
/// RSS and CPU make of it.
async fn park_blocking_queries(app: &TestApp, pid: u32, waiters: usize) {
    let list: Value = app.get_clusters().await.json().await.expect("JSON");
    let ids: Vec<String> = list["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .filter_map(|c| c["id"].as_str().map(str::to_owned))
        .collect();
    // Two steps, so the figures separate what an open keep-alive connection costs (any polling
    // client holds one) from what waiting on it adds.
    let rss_before = rss_kib(pid).unwrap_or(0);
    let waiters = ids.len().min(waiters);
    let connected = std::sync::Arc::new(tokio::sync::Barrier::new(waiters + 1));
    let release = std::sync::Arc::new(tokio::sync::Barrier::new(waiters + 1));
    let mut parked = tokio::task::JoinSet::new();
    // Blocking queries answered before the figures are taken: none, or the figures lie.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Connections are opened a few hundred at a time: ten thousand SYNs at once overflow the
    // listen backlog, and the dropped ones wait for TCP's retransmission back-off.
    let opening = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    for id in ids.iter().take(waiters) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .expect("client");
        let url = app.api_url(&format!("/clusters/{id}"));
        let (connected, release) = (connected.clone(), release.clone());
        let opening = opening.clone();
        let answered = answered.clone();
        parked.spawn(async move {
            let permit = opening.acquire_owned().await.expect("semaphore");
            let first = client.get(&url).send().await.expect("GET");
            let etag = first.headers().get("etag").cloned();
            first.bytes().await.expect("body");
            drop(permit);
            connected.wait().await;
            release.wait().await;
            let Some(etag) = etag else { return };
            let _ = client
                .get(format!("{url}?wait=5m"))
                .header("if-none-match", etag)
                .send()
                .await;
            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
    connected.wait().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_connected = rss_kib(pid).unwrap_or(0);
    release.wait().await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let cpu_before = cpu_time(pid).unwrap_or_default();
    let rss_parked = rss_kib(pid).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu_parked = cpu_time(pid).unwrap_or_default().saturating_sub(cpu_before);
    let waiting = rss_parked.saturating_sub(rss_connected);
    assert_eq!(
        answered.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "every blocking query is still held"
    );
    println!(
        "{waiters} keep-alive connections: RSS {rss_before} KiB before, {rss_connected} KiB connected (+{} KiB); each then parks a blocking query: {rss_parked} KiB (+{waiting} KiB for the waiting, {:.2} KiB each); daemon CPU over 10 s parked: {cpu_parked:?}",
        rss_connected.saturating_sub(rss_before),
        waiting as f64 / waiters.max(1) as f64,
    );
    parked.abort_all();
}

/// The parked section of the benchmark above on its own, with fewer clusters: a quicker figure
/// for what a parked blocking query costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
async fn bench_parked_blocking_queries() {
    const WAITERS: usize = 2_000;
    let fake = FakePve::start().await;
    let app = quiet_daemon_for_many_connections().await;
    let pid = app.pid().expect("daemon pid");
    register_range(&app, &fake, 0, WAITERS).await;
    // Past the first checks and the member probes that follow registration.
    tokio::time::sleep(Duration::from_secs(10)).await;
    park_blocking_queries(&app, pid, WAITERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
async fn bench_cpu_per_monitor_check() {
    let fake = FakePve::start().await;
    let app = TestApp::builder()
        .env("PROXMOXER_MONITOR_INTERVAL", "10s")
        .env("RUST_LOG", "info")
        .spawn()
        .await;
    let pid = app.pid().expect("daemon pid");
    register_range(&app, &fake, 0, CLUSTERS).await;
    // Past the first checks and the member probes that follow registration.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let checks_before = fake.requests("/api2/json/cluster/status");
    let cpu_before = cpu_time(pid).unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let checks = fake.requests("/api2/json/cluster/status") - checks_before;
    let cpu = cpu_time(pid).unwrap_or_default().saturating_sub(cpu_before);
    println!(
        "{CLUSTERS} clusters at a 10 s interval: {checks} checks in 30 s, daemon CPU {cpu:?}, {:.0} µs per check",
        cpu.as_micros() as f64 / checks.max(1) as f64
    );
}

/// GETs sent at a steady rate, `connections` keep-alive connections each sending one every
/// `every`, for `duration`; returns sorted latencies. A dashboard's load rather than a flood:
/// it measures how long a read waits, not how many fit. The sender has a thread and runtime
/// of its own, as a client on another machine would, so that the registration clients and
/// the fake Proxmox busy on the test's runtime do not delay its timers or its replies.
fn paced_reads(
    url: String,
    connections: usize,
    every: Duration,
    duration: Duration,
) -> std::thread::JoinHandle<Vec<Duration>> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the reader's runtime");
        runtime.block_on(async move {
            let client = reqwest::Client::new();
            let start = tokio::time::Instant::now();
            let mut senders = tokio::task::JoinSet::new();
            for n in 0..connections {
                let (client, url) = (client.clone(), url.clone());
                senders.spawn(async move {
                    let mut latencies = Vec::new();
                    let mut next = start + every.mul_f64(n as f64 / connections as f64);
                    while next < start + duration {
                        tokio::time::sleep_until(next).await;
                        // Timed from the send: the timer wakes up to a millisecond late.
                        let sent = Instant::now();
                        let response = client.get(&url).send().await.expect("GET");
                        response.bytes().await.expect("body");
                        latencies.push(sent.elapsed());
                        next += every;
                    }
                    latencies
                });
            }
            let mut all: Vec<Duration> = senders.join_all().await.into_iter().flatten().collect();
            all.sort();
            all
        })
    })
}

/// A read's latency while registrations run flat out, against the same reads on an idle
/// daemon: 1,000 GET/s of `?limit=1`, and beside them 1,000 GET/s of a path no route takes,
/// which the router answers without asking the registry: what any answer costs while the
/// burst's clients, fake Proxmox and daemon share the cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
async fn bench_read_latency_during_registrations() {
    const CONNECTIONS: usize = 4;
    const EVERY: Duration = Duration::from_millis(4);
    const WINDOW: Duration = Duration::from_secs(3);
    let fake = FakePve::start().await;
    let app = quiet_daemon_for_many_connections().await;
    register_range(&app, &fake, 0, 100).await;
    // Past the first checks and the member probes that follow registration.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let list = app.api_url("/clusters?limit=1");
    let unrouted = format!("{}/no-such-path", app.base_url());
    let readers = |window| {
        (
            paced_reads(list.clone(), CONNECTIONS, EVERY, window),
            paced_reads(unrouted.clone(), CONNECTIONS, EVERY, window),
        )
    };
    let (idle_list, idle_unrouted) = readers(WINDOW);
    let idle = (
        idle_list.join().expect("idle reads"),
        idle_unrouted.join().expect("idle reads"),
    );
    let (busy_list, busy_unrouted) = readers(WINDOW);
    let rate = register_range(&app, &fake, 100, 8_000).await;
    let busy = (
        busy_list.join().expect("reads during the burst"),
        busy_unrouted.join().expect("reads during the burst"),
    );
    println!(
        "paced GET ?limit=1 during {rate:.0} registrations/s: p50 {:?} / p99 {:?} (idle {:?} / {:?}); \
         unrouted path: p50 {:?} / p99 {:?} (idle {:?} / {:?})",
        percentile(&busy.0, 0.5),
        percentile(&busy.0, 0.99),
        percentile(&idle.0, 0.5),
        percentile(&idle.0, 0.99),
        percentile(&busy.1, 0.5),
        percentile(&busy.1, 0.99),
        percentile(&idle.1, 0.5),
        percentile(&idle.1, 0.99),
    );
}
