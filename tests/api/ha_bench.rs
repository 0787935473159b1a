//! Benchmark of three instances sharing one registry in a three-member etcd (feature `etcd`):
//! registrations spread over the instances, the time from kill -9 of the leader to a status
//! change seen through a follower, and reads on a follower against a single redb instance holding
//! as many clusters, with the same load generator in the same run. It prints figures and asserts
//! nothing about time, which is noise on a shared machine. Run it against an optimised build:
//!
//! ```sh
//! cargo test --release --features etcd --test api ha_bench -- --ignored --nocapture --test-threads 1
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::bench::{
    CLUSTERS, CONCURRENCY, LOAD_DURATION, load_expecting, percentile, register_range, rss_kib,
    throughput,
};
use crate::etcd_server::EtcdCluster;
use crate::fake_pve::FakePve;
use crate::ha::generate_key;
use crate::helpers::{
    STATUS_PATH, TestApp, TestAppBuilder, WAIT, json_of, register_body, wait_until,
};

/// `PROXMOXER_MONITOR_INTERVAL` of every instance, the redb one included.
const MONITOR_INTERVAL: Duration = Duration::from_secs(2);
const MONITOR_INTERVAL_SETTING: &str = "2s";
/// `PROXMOXER_STORAGE_ETCD_LEASE_TTL` of the etcd instances.
const LEASE_TTL: Duration = Duration::from_secs(3);
const LEASE_TTL_SETTING: &str = "3s";
const PREFIX: &str = "/proxmoxer-bench";
const INSTANCES: usize = 3;
/// The node the fake reports offline from the moment the leader is killed.
const FAILING_NODE: &str = "pve3";
/// Bound on waits for replication, monitoring and failover: far past what is promised, so that a
/// slow machine yields a late figure rather than none.
const PATIENCE: Duration = Duration::from_secs(120);
/// Read rounds per target, alternating follower and redb, so the figures show their own noise.
const READ_ROUNDS: usize = 2;
/// Lines of an instance's log shown when something does not happen.
const LOG_TAIL_LINES: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
async fn bench_three_instances_on_a_three_member_etcd() {
    let Some(etcd) = EtcdCluster::three("bench_three_instances_on_etcd").await else {
        return;
    };
    let fake = FakePve::start().await;
    let key_dir = tempfile::Builder::new()
        .prefix("proxmoxer-ha-bench-key-")
        .tempdir()
        .expect("a temporary key directory");
    let key_file = generate_key(key_dir.path());
    let mut apps = Vec::new();
    for _ in 0..INSTANCES {
        apps.push(instance(&etcd, &key_file).spawn().await);
    }
    let leader = wait_for_one_leader(&apps).await;
    println!(
        "{INSTANCES} instances on a 3-member etcd, monitor interval {MONITOR_INTERVAL:?}, \
         lease_ttl {LEASE_TTL:?}; instance {leader} leads"
    );
    print_rss("idle", &apps, None, &etcd);

    // 1. Registrations, spread round-robin over the instances.
    let (rate, refused) = register_across(&apps, &fake, CLUSTERS).await;
    let committed = etcd_count(&etcd, &format!("{PREFIX}/clusters/")).await;
    println!(
        "registered {CLUSTERS} clusters over {INSTANCES} instances, {CONCURRENCY} concurrent: \
         {rate:.0}/s; clusters in etcd when the last answer came: {committed:?}"
    );
    assert!(
        refused.is_empty(),
        "{} registrations refused, e.g. {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    assert_eq!(
        committed,
        Some(CLUSTERS as u64),
        "every 201 comes after etcd committed"
    );
    let replicated = Instant::now();
    for (index, app) in apps.iter().enumerate() {
        let listed = wait_until(
            async || count_with_status(app, None).await == Some(CLUSTERS as u64),
            PATIENCE,
        )
        .await;
        assert!(listed, "instance {index} never listed {CLUSTERS} clusters");
    }
    println!(
        "every instance listed all {CLUSTERS} after {:?} more",
        replicated.elapsed()
    );
    wait_until_every_instance_shows(&apps, "healthy").await;

    // 3. Reads on a follower against a single redb instance with as many clusters.
    let mut redb = TestApp::builder()
        .env("PROXMOXER_MONITOR_INTERVAL", MONITOR_INTERVAL_SETTING)
        .env("RUST_LOG", "info")
        .spawn()
        .await;
    let redb_rate = register_range(&redb, &fake, 0, CLUSTERS).await;
    println!(
        "for comparison, one redb instance registered {CLUSTERS} at {redb_rate:.0}/s \
         (each a durable local commit)"
    );
    wait_until_every_instance_shows(std::slice::from_ref(&redb), "healthy").await;
    let follower = (leader + 1) % INSTANCES;
    compare_reads(&apps[follower], &redb).await;
    print_rss("after the reads", &apps, Some(&redb), &etcd);
    redb.terminate().await;

    // 2. Failover: kill -9 of the leader, a node offline at the same moment.
    let survivors: Vec<usize> = (0..INSTANCES).filter(|&i| i != leader).collect();
    let killed_at = Instant::now();
    apps[leader].kill9().await;
    fake.set_node_online(FAILING_NODE, false);
    // Nothing else checks the fake now: any new status call comes from a new leader's monitors.
    let checks_at_kill = fake.requests(STATUS_PATH);
    let mut checks_resumed = None;
    let mut seen = vec![Seen::default(); INSTANCES];
    let all = CLUSTERS as u64;
    let finished = wait_until(
        async || {
            if checks_resumed.is_none() && fake.requests(STATUS_PATH) > checks_at_kill {
                checks_resumed = Some(killed_at.elapsed());
            }
            for &index in &survivors {
                let seen = &mut seen[index];
                if seen.leads.is_none() && role(&apps[index]).await.as_deref() == Some("leader") {
                    seen.leads = Some(killed_at.elapsed());
                }
                let degraded = count_with_status(&apps[index], Some("degraded")).await;
                if seen.first_degraded.is_none() && degraded.is_some_and(|n| n > 0) {
                    seen.first_degraded = Some(killed_at.elapsed());
                }
                if seen.all_degraded.is_none() && degraded == Some(all) {
                    seen.all_degraded = Some(killed_at.elapsed());
                }
            }
            survivors.iter().any(|&i| seen[i].leads.is_some())
                && survivors.iter().all(|&i| seen[i].all_degraded.is_some())
        },
        PATIENCE,
    )
    .await;
    let new_leader = survivors.iter().copied().find(|&i| seen[i].leads.is_some());
    println!(
        "after kill -9 of the leader: the fake saw the first status check again after \
         {checks_resumed:?}"
    );
    for &index in &survivors {
        let what = if Some(index) == new_leader {
            "new leader"
        } else {
            "follower"
        };
        let s = &seen[index];
        println!(
            "after kill -9 of the leader ({FAILING_NODE} offline at the kill): instance {index} \
             ({what}) leads after {:?}, shows a first cluster degraded after {:?}, all {CLUSTERS} \
             after {:?} (promised: monitors resumed within lease_ttl + 2 intervals = {:?})",
            s.leads,
            s.first_degraded,
            s.all_degraded,
            LEASE_TTL + 2 * MONITOR_INTERVAL
        );
    }
    if !finished {
        for &index in &survivors {
            println!(
                "---- instance {index}, last {LOG_TAIL_LINES} log lines ----\n{}",
                tail(&apps[index].logs(), LOG_TAIL_LINES)
            );
        }
    }
    assert!(
        finished,
        "the failover did not complete within {PATIENCE:?}: {seen:?}"
    );
    let remaining: Vec<&TestApp> = survivors.iter().map(|&i| &apps[i]).collect();
    for app in &remaining {
        if let Some(pid) = app.pid() {
            println!(
                "RSS after the failover, pid {pid}: {} KiB",
                rss_kib(pid).unwrap_or(0)
            );
        }
    }
}

/// What one surviving instance showed after the kill, as time since the kill.
#[derive(Clone, Debug, Default)]
struct Seen {
    leads: Option<Duration>,
    first_degraded: Option<Duration>,
    all_degraded: Option<Duration>,
}

/// A daemon on the shared registry in `etcd`, sealing credentials with `key_file`.
fn instance(etcd: &EtcdCluster, key_file: &Path) -> TestAppBuilder {
    TestApp::builder()
        .env("PROXMOXER_MONITOR_INTERVAL", MONITOR_INTERVAL_SETTING)
        .env("PROXMOXER_STORAGE_BACKEND", "etcd")
        .env("PROXMOXER_STORAGE_ETCD_ENDPOINTS", etcd.endpoints())
        .env("PROXMOXER_STORAGE_ETCD_PREFIX", PREFIX)
        .env("PROXMOXER_STORAGE_ETCD_LEASE_TTL", LEASE_TTL_SETTING)
        .env("PROXMOXER_KEY_FILE", key_file.display().to_string())
        // No per-request debug lines: logging is not what is measured.
        .env("RUST_LOG", "info")
}

/// Waits until exactly one instance says it leads and the others follow; returns its index.
async fn wait_for_one_leader(apps: &[TestApp]) -> usize {
    let mut roles = Vec::new();
    let agreed = wait_until(
        async || {
            roles.clear();
            for app in apps {
                roles.push(role(app).await);
            }
            roles
                .iter()
                .filter(|r| r.as_deref() == Some("leader"))
                .count()
                == 1
                && roles.iter().all(|r| r.is_some())
        },
        WAIT,
    )
    .await;
    assert!(agreed, "no single leader within {WAIT:?}: {roles:?}");
    roles
        .iter()
        .position(|r| r.as_deref() == Some("leader"))
        .expect("one leader")
}

/// The `role` an instance's `/health` states, when it answers 200.
async fn role(app: &TestApp) -> Option<String> {
    let response = app.get_health().await;
    let (status, body) = json_of(response).await;
    if status != StatusCode::OK {
        return None;
    }
    body["role"].as_str().map(str::to_owned)
}

/// Registers `count` clusters, the n-th on instance n mod 3, [`CONCURRENCY`] at a time; returns
/// the rate per second and every answer that was not a 201.
async fn register_across(apps: &[TestApp], fake: &FakePve, count: usize) -> (f64, Vec<String>) {
    let started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut registrations = tokio::task::JoinSet::new();
    for n in 0..count {
        let app = &apps[n % apps.len()];
        let name = format!("cluster-{n:05}");
        let request = app
            .client
            .post(app.api_url("/clusters"))
            .json(&register_body(fake, &name));
        let permit = Arc::clone(&semaphore);
        registrations.spawn(async move {
            let _permit = permit.acquire_owned().await.expect("semaphore");
            match request.send().await {
                Ok(response) if response.status() == StatusCode::CREATED => None,
                Ok(response) => {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    Some(format!("{name}: {status} {body}"))
                }
                Err(e) => Some(format!("{name}: {e}")),
            }
        });
    }
    let refused: Vec<String> = registrations
        .join_all()
        .await
        .into_iter()
        .flatten()
        .collect();
    (count as f64 / started.elapsed().as_secs_f64(), refused)
}

/// How many keys start with `prefix`, read from the first etcd member through its JSON gateway.
async fn etcd_count(etcd: &EtcdCluster, prefix: &str) -> Option<u64> {
    let mut range_end = prefix.as_bytes().to_vec();
    let last = range_end.last_mut()?;
    *last += 1;
    let response = reqwest::Client::new()
        .post(format!("{}/v3/kv/range", etcd.member(0).client_url()))
        .json(&json!({
            "key": BASE64.encode(prefix),
            "range_end": BASE64.encode(range_end),
            "count_only": true,
        }))
        .send()
        .await
        .ok()?;
    let body: Value = response.json().await.ok()?;
    // The gateway renders 64-bit integers as strings and leaves out zeros.
    match &body["count"] {
        Value::String(count) => count.parse().ok(),
        Value::Null => body.get("header").map(|_| 0),
        other => other.as_u64(),
    }
}

/// `total` of `GET /api/v1/clusters?limit=1`, filtered by `status` when given.
async fn count_with_status(app: &TestApp, status: Option<&str>) -> Option<u64> {
    let filter = status.map(|s| format!("&status={s}")).unwrap_or_default();
    let response = app
        .client
        .get(app.api_url(&format!("/clusters?limit=1{filter}")))
        .send()
        .await
        .ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    let body: Value = response.json().await.ok()?;
    body["total"].as_u64()
}

async fn wait_until_every_instance_shows(apps: &[TestApp], status: &str) {
    let started = Instant::now();
    for (index, app) in apps.iter().enumerate() {
        let mut last = None;
        let shown = wait_until(
            async || {
                last = count_with_status(app, Some(status)).await;
                last == Some(CLUSTERS as u64)
            },
            PATIENCE,
        )
        .await;
        assert!(
            shown,
            "instance {index} shows {last:?} of {CLUSTERS} clusters {status}; log:\n{}",
            tail(&app.logs(), LOG_TAIL_LINES)
        );
    }
    println!(
        "all {CLUSTERS} clusters {status} on {} instance(s) after {:?} more",
        apps.len(),
        started.elapsed()
    );
}

/// GET by id and the whole list on `follower` and on `redb`, alternating, [`READ_ROUNDS`] times.
async fn compare_reads(follower: &TestApp, redb: &TestApp) {
    let targets = [("follower", follower), ("redb", redb)];
    let mut one_urls = Vec::new();
    for (_, app) in targets {
        let list: Value = app.get_clusters().await.json().await.expect("JSON");
        let first = list["clusters"]
            .as_array()
            .and_then(|clusters| clusters.iter().find(|c| c["name"] == "cluster-00000"))
            .and_then(|c| c["id"].as_str())
            .expect("cluster-00000 is listed")
            .to_owned();
        one_urls.push(app.api_url(&format!("/clusters/{first}")));
    }
    let list_bytes = follower
        .get_clusters()
        .await
        .bytes()
        .await
        .expect("the list")
        .len();
    for round in 1..=READ_ROUNDS {
        for (what, path) in [
            ("GET /api/v1/clusters/{id}", None),
            ("GET /api/v1/clusters", Some("/clusters")),
        ] {
            let mut figures = Vec::new();
            for (index, (name, app)) in targets.iter().enumerate() {
                let url = path.map_or_else(|| one_urls[index].clone(), |p| app.api_url(p));
                let latencies =
                    load_expecting(&app.client, &url, None, StatusCode::OK, LOAD_DURATION).await;
                figures.push(format!(
                    "{name} {:.0} req/s (p50 {:?}, p99 {:?})",
                    throughput(&latencies, LOAD_DURATION),
                    percentile(&latencies, 0.50),
                    percentile(&latencies, 0.99),
                ));
            }
            let size = path
                .map(|_| format!(", {} KiB", list_bytes / 1024))
                .unwrap_or_default();
            println!(
                "round {round}, {what} ({CLUSTERS} clusters{size}, {CONCURRENCY} connections): {}",
                figures.join(" vs ")
            );
        }
    }
}

fn print_rss(when: &str, apps: &[TestApp], redb: Option<&TestApp>, etcd: &EtcdCluster) {
    let of = |app: &TestApp| app.pid().and_then(rss_kib).unwrap_or(0);
    let instances: Vec<String> = apps.iter().map(|app| format!("{} KiB", of(app))).collect();
    let members: Vec<String> = (0..INSTANCES)
        .map(|i| {
            let rss = etcd_pid(etcd.member(i).client_url()).and_then(rss_kib);
            format!("{} KiB", rss.unwrap_or(0))
        })
        .collect();
    let redb = redb.map(|app| format!("; redb instance {} KiB", of(app)));
    println!(
        "RSS {when}: instances {}; etcd members {}{}",
        instances.join(", "),
        members.join(", "),
        redb.unwrap_or_default()
    );
}

/// The process id of the etcd member listening for clients at `client_url`, found by its
/// command line.
fn etcd_pid(client_url: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|b| *b == 0);
            let program = args.next()?;
            let is_etcd = program.ends_with(b"etcd");
            let listens = args.any(|arg| arg == client_url.as_bytes());
            (is_etcd && listens).then_some(pid)
        })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
