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

const CLUSTERS: usize = 1_000;
const CONCURRENCY: usize = 32;
const LOAD_DURATION: Duration = Duration::from_secs(5);

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Sends GETs to `url` from `CONCURRENCY` tasks for `LOAD_DURATION`; returns sorted latencies.
async fn load(client: &reqwest::Client, url: &str) -> Vec<Duration> {
    let mut tasks = tokio::task::JoinSet::new();
    let until = Instant::now() + LOAD_DURATION;
    for _ in 0..CONCURRENCY {
        let client = client.clone();
        let url = url.to_owned();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let started = Instant::now();
                let response = client.get(&url).send().await.expect("GET");
                assert_eq!(response.status(), StatusCode::OK);
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

    let started = Instant::now();
    let mut registrations = tokio::task::JoinSet::new();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    for n in 0..CLUSTERS {
        let request = app
            .client
            .post(app.api_url("/clusters"))
            .json(&register_body(&fake, &format!("cluster-{n:04}")));
        let permit = semaphore.clone();
        registrations.spawn(async move {
            let _permit = permit.acquire_owned().await.expect("semaphore");
            request.send().await.expect("POST").status()
        });
    }
    let statuses = registrations.join_all().await;
    let elapsed = started.elapsed();
    assert!(statuses.iter().all(|s| *s == StatusCode::CREATED));
    println!(
        "registered {CLUSTERS} clusters in {elapsed:?} ({:.0}/s, each a login + 2 calls to Proxmox and a durable commit)",
        CLUSTERS as f64 / elapsed.as_secs_f64()
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
