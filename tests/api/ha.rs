//! Several instances sharing one registry in etcd (feature `etcd`): every instance serves the
//! whole API and sees the others' writes, names stay unique across instances, one instance leads
//! and monitors, another takes over when it dies or freezes, an etcd outage costs writes but not
//! reads, one etcd member of three may fail, and a redb registry migrates into etcd.
//!
//! Each test runs its own etcd on loopback ports (see [`crate::etcd_server`]) and says it is
//! skipped when etcd is not installed, unless `PROXMOXER_REQUIRE_ETCD=1`. Leases last 2 s and
//! monitors check every 200 ms; deadlines for failover are the promised `lease_ttl` + two
//! monitor intervals plus slack for a loaded machine, and measured times are printed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{ETAG, IF_NONE_MATCH};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::UnixDatagram;

use crate::etcd_server::{EtcdCluster, EtcdLink, EtcdServer, send_signal};
use crate::fake_pve::{DEFAULT_USER, FakePve};
use crate::helpers::{
    STATUS_PATH, TestApp, TestAppBuilder, WAIT, describe, fake_pve, fetch_cluster, history, id_of,
    json_of, list_clusters, proxmoxer_command, register_body, register_fake, register_fake_id,
    wait_for_member_probes, wait_until,
};

/// `PROXMOXER_STORAGE_ETCD_LEASE_TTL` of every instance.
const LEASE_TTL: Duration = Duration::from_secs(2);
const LEASE_TTL_SETTING: &str = "2s";
/// `PROXMOXER_MONITOR_INTERVAL` of every instance.
const MONITOR_INTERVAL: Duration = Duration::from_millis(200);
const MONITOR_INTERVAL_SETTING: &str = "200ms";
/// Added to the promised failover time: a loaded CI machine delays processes by seconds.
const FAILOVER_SLACK: Duration = Duration::from_secs(5);
/// The lease of the instances that see an etcd member die: longer than etcd's own election
/// (about a second here), so that only a lease kept alive through the dead member alone ends.
const MEMBER_LOSS_LEASE_TTL: Duration = Duration::from_secs(4);
const MEMBER_LOSS_LEASE_TTL_SETTING: &str = "4s";
/// How soon a write on one instance must show on the others (the promise is 1 s).
const VISIBLE_WITHIN: Duration = Duration::from_secs(3);
/// How long `proxmoxer migrate` may run against a local etcd.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Status reads by the new leader that must pass after a deposed leader resumed, before the
/// registry is checked for its late writes: about two seconds of monitoring.
const CHECKS_AFTER_RESUME: u64 = 10;
/// The daemon's debug logs without one line per request: the tests poll `/health` every 20 ms.
/// Keeps the line each held blocking query logs.
const LOG_FILTER: &str = "info,proxmoxer=debug,proxmoxer::api=info,proxmoxer::api::clusters=debug";
/// What the daemon logs, at debug, each time it starts holding a blocking query.
const HELD_LOG: &str = "holding a blocking query";
/// Bound for a held request: over its 30 s wait.
const HELD_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const STEPPED_DOWN_LOG: &str = "no longer the leader";
const UNAVAILABLE_MESSAGE: &str = "Storage unavailable";

// --- harness self-tests: etcd alone -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_harness_single_member_stops_and_starts_on_its_data() {
    let Some(mut etcd) = EtcdServer::single("etcd_harness_single_member").await else {
        return;
    };
    assert!(etcd.is_healthy().await);
    etcd.put("harness", "kept").await;

    etcd.stop().await;
    assert!(!etcd.is_running());
    assert!(!etcd.is_healthy().await, "a stopped member does not answer");

    etcd.start().await;
    assert!(etcd.is_healthy().await);
    assert_eq!(
        etcd.get("harness").await.as_deref(),
        Some("kept"),
        "the data directory survives a stop"
    );

    etcd.kill();
    assert!(!etcd.is_running());
    etcd.start().await;
    assert_eq!(etcd.get("harness").await.as_deref(), Some("kept"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_harness_three_members_survive_losing_their_leader() {
    let Some(mut cluster) = EtcdCluster::three("etcd_harness_three_members").await else {
        return;
    };
    assert_eq!(cluster.healthy_members().await, 3);
    assert_eq!(cluster.endpoints().split(',').count(), 3);
    let leader = wait_for_etcd_leader(&cluster).await;
    cluster.member(leader).put("before", "1").await;

    cluster.member_mut(leader).kill();
    let mut new_leader = None;
    let elected = wait_until(
        async || {
            new_leader = cluster.leader().await.filter(|&index| index != leader);
            new_leader.is_some() && cluster.healthy_members().await == 2
        },
        WAIT,
    )
    .await;
    assert!(elected, "no new etcd leader among the two survivors");
    let survivor = new_leader.expect("elected");
    cluster.member(survivor).put("after", "2").await;
    assert_eq!(
        cluster.member(survivor).get("before").await.as_deref(),
        Some("1")
    );

    cluster.member_mut(leader).start().await;
    assert_eq!(cluster.healthy_members().await, 3);
    let rejoined = wait_until(
        async || cluster.member(leader).get("after").await.as_deref() == Some("2"),
        WAIT,
    )
    .await;
    assert!(rejoined, "the restarted member catches up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_harness_a_link_relays_until_cut_and_again_when_restored() {
    let Some(etcd) = EtcdServer::single("etcd_harness_a_link").await else {
        return;
    };
    let link = EtcdLink::to(&etcd).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("a client");
    let health = format!("{}/health", link.url());
    let answers = async || {
        client
            .get(&health)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    };
    assert!(answers().await, "etcd answers through the link");

    link.cut();
    assert!(!answers().await, "nothing passes a cut link");
    assert!(etcd.is_healthy().await, "etcd itself still answers");

    link.restore();
    assert!(answers().await, "the link relays again");
}

// --- several instances, one registry ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_leads_and_says_so_in_health_and_metrics() {
    let Some(etcd) = EtcdServer::single("one_instance_leads").await else {
        return;
    };
    let registry = SharedRegistry::new("one-leader", etcd.endpoints());
    let apps = registry.spawn_instances(3).await;
    let all: Vec<&TestApp> = apps.iter().collect();

    let leader = wait_for_one_leader(&all).await;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("read the hostname")
        .trim()
        .to_owned();
    let leader_pid = apps[leader].pid().expect("started");
    for (index, app) in apps.iter().enumerate() {
        let (status, body) = json_of(app.get_health().await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "ok", "{body}");
        assert_eq!(body["clusters"], 0, "{body}");
        assert_eq!(
            body["leader"],
            format!("{hostname}:{leader_pid}"),
            "instance {index} names the leader by host and process id"
        );
        let (role, flag) = if index == leader {
            ("leader", 1.0)
        } else {
            ("follower", 0.0)
        };
        assert_eq!(body["role"], role, "instance {index}: {body}");
        assert_eq!(
            metric(app, "proxmoxer_leader").await,
            Some(flag),
            "instance {index}"
        );
        assert!(
            !app.db_path().exists(),
            "with etcd no redb database is made at {}",
            app.db_path().display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_instance_shows_on_the_others() {
    let Some(etcd) = EtcdServer::single("a_write_shows_on_the_others").await else {
        return;
    };
    let fake = fake_pve().await;
    let registry = SharedRegistry::new("visible", etcd.endpoints());
    let apps = registry.spawn_instances(3).await;
    wait_for_one_leader(&apps.iter().collect::<Vec<_>>()).await;

    let mut registered = Vec::new();
    for (writer, app) in apps.iter().enumerate() {
        let name = format!("visible-{writer}");
        let created = register_fake(app, &fake, &name).await;
        let acknowledged = Instant::now();
        for (reader, other) in apps.iter().enumerate().filter(|(i, _)| *i != writer) {
            let mut seen = Value::Null;
            let visible = wait_until(
                async || {
                    let (status, body) = json_of(other.get_cluster(id_of(&created)).await).await;
                    seen = body;
                    status == StatusCode::OK
                },
                VISIBLE_WITHIN,
            )
            .await;
            assert!(
                visible,
                "{name}, registered on instance {writer}, is not on instance {reader} after \
                 {VISIBLE_WITHIN:?}; last answer: {seen}"
            );
            report(&format!(
                "{name}: registered on instance {writer}, visible on instance {reader} after {:?}",
                acknowledged.elapsed()
            ));
            assert_eq!(identity(&seen), identity(&created), "{seen}");
        }
        registered.push(created);
    }
    for app in &apps {
        let list = list_clusters(app).await;
        assert_eq!(list["total"], 3, "{list}");
    }

    // A rename on one instance shows on the others; a name taken through another instance is
    // refused.
    let renamed = id_of(&registered[1]);
    let (status, body) = patch(&apps[0], &renamed, &json!({"name": "renamed"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let renamed_at = Instant::now();
    for (reader, other) in apps.iter().enumerate().skip(1) {
        let shown = wait_until(
            async || fetch_cluster(other, &renamed).await["name"] == "renamed",
            VISIBLE_WITHIN,
        )
        .await;
        assert!(shown, "the rename did not reach instance {reader}");
        report(&format!(
            "rename on instance 0 seen on instance {reader} after {:?}",
            renamed_at.elapsed()
        ));
    }
    let (status, body) = patch(&apps[2], &renamed, &json!({"name": "visible-0"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "Conflict", "{body}");

    // A delete on one instance removes it from the others.
    let gone = id_of(&registered[0]);
    let response = apps[2].delete_cluster(&gone).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let deleted_at = Instant::now();
    for (reader, other) in apps.iter().enumerate().take(2) {
        let removed = wait_until(
            async || other.get_cluster(&gone).await.status() == StatusCode::NOT_FOUND,
            VISIBLE_WITHIN,
        )
        .await;
        assert!(removed, "the delete did not reach instance {reader}");
        report(&format!(
            "delete on instance 2 seen on instance {reader} after {:?}",
            deleted_at.elapsed()
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_read_on_a_follower_is_released_by_changes_made_elsewhere() {
    let Some(etcd) = EtcdServer::single("a_held_read_on_a_follower").await else {
        return;
    };
    let fake = fake_pve().await;
    let registry = SharedRegistry::new("held-read", etcd.endpoints());
    let apps = registry.spawn_instances(2).await;
    let leader = wait_for_one_leader(&apps.iter().collect::<Vec<_>>()).await;
    let follower = &apps[1 - leader];
    let id = register_fake_id(&apps[leader], &fake, "watched").await;
    // Settled: every member probed once, so the follower's tags stand still until a change.
    wait_for_member_probes(follower, &id).await;

    let list_tag = etag(&follower.get_clusters().await);
    let list_watch = spawn_held_get(follower, "/clusters?wait=30s", &list_tag);
    wait_held(follower, 1).await;
    let registered_at = Instant::now();
    register_fake(&apps[leader], &fake, "second").await;
    let (answered_at, response) = list_watch.await.expect("the list watch");
    let (status, list) = json_of(response).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["total"], 2, "{list}");
    let took = answered_at.duration_since(registered_at);
    report(&format!(
        "a held list on the follower released {took:?} after a registration on the leader"
    ));
    assert!(
        took < VISIBLE_WITHIN,
        "released {took:?} after the registration"
    );

    let cluster_tag = etag(&follower.get_cluster(&id).await);
    let cluster_watch = spawn_held_get(follower, &format!("/clusters/{id}?wait=30s"), &cluster_tag);
    wait_held(follower, 2).await;
    let changed_at = Instant::now();
    fake.set_node_online("pve3", false);
    let (answered_at, response) = cluster_watch.await.expect("the cluster watch");
    let (status, cluster) = json_of(response).await;
    assert_eq!(status, StatusCode::OK, "{cluster}");
    assert_eq!(cluster["status"], "degraded", "{cluster}");
    report(&format!(
        "a held read of a cluster on the follower released {:?} after the node went offline",
        answered_at.duration_since(changed_at)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_name_registrations_at_once_on_two_instances_give_one_201() {
    let Some(etcd) = EtcdServer::single("same_name_at_once").await else {
        return;
    };
    let fake = fake_pve().await;
    let registry = SharedRegistry::new("same-name", etcd.endpoints());
    let apps = registry.spawn_instances(2).await;

    for round in 0..5 {
        let body = register_body(&fake, &format!("contested-{round}"));
        let (first, second) =
            tokio::join!(apps[0].post_clusters(&body), apps[1].post_clusters(&body));
        let (first, second) = (json_of(first).await, json_of(second).await);
        let mut statuses = [first.0, second.0];
        statuses.sort();
        assert_eq!(
            statuses,
            [StatusCode::CREATED, StatusCode::CONFLICT],
            "round {round}: {first:?} and {second:?}"
        );
        let (winner, loser) = if first.0 == StatusCode::CREATED {
            (first.1, second.1)
        } else {
            (second.1, first.1)
        };
        assert_eq!(loser["code"], "Conflict", "{loser}");
        assert_eq!(loser["message"], "Cluster already exists", "{loser}");

        for app in &apps {
            let mut names = Vec::new();
            let one = wait_until(
                async || {
                    names = cluster_names(app).await;
                    names.contains(&winner["name"].as_str().unwrap_or_default().to_owned())
                },
                VISIBLE_WITHIN,
            )
            .await;
            assert!(one, "round {round}: {winner} not listed: {names:?}");
            assert_eq!(
                names.iter().filter(|n| **n == winner["name"]).count(),
                1,
                "{names:?}"
            );
            fetch_cluster(app, &id_of(&winner)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_hands_monitoring_to_another_instance() {
    let Some(etcd) = EtcdServer::single("killing_the_leader").await else {
        return;
    };
    let fake = fake_pve().await;
    let registry = SharedRegistry::new("leader-killed", etcd.endpoints());
    let mut apps = registry.spawn_instances(3).await;
    let id = register_fake_id(&apps[0], &fake, "watched").await;
    let old = wait_for_one_leader(&apps.iter().collect::<Vec<_>>()).await;
    wait_until_all_show(&apps.iter().collect::<Vec<_>>(), &id, "healthy", "ok").await;

    apps[old].kill9().await;
    let killed_at = Instant::now();
    fake.set_node_online("pve3", false);

    let survivors: Vec<&TestApp> = apps
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != old)
        .map(|(_, app)| app)
        .collect();
    let deadline = failover_deadline();
    let mut leader_after = None;
    let mut degraded_after = None;
    let mut last = Vec::new();
    let took_over = wait_until(
        async || {
            if leader_after.is_none() && leader_among(&survivors).await.is_some() {
                leader_after = Some(killed_at.elapsed());
            }
            if degraded_after.is_none() {
                last = snapshots(&survivors, &id).await;
                if last
                    .iter()
                    .all(|c| c["status"] == "degraded" && c["status_reason"] == "node_offline")
                {
                    degraded_after = Some(killed_at.elapsed());
                }
            }
            leader_after.is_some() && degraded_after.is_some()
        },
        deadline,
    )
    .await;
    report(&format!(
        "after kill -9 of the leader: new leader after {leader_after:?}, node offline seen by \
         every survivor after {degraded_after:?} (promised within {:?})",
        LEASE_TTL + 2 * MONITOR_INTERVAL
    ));
    assert!(
        took_over,
        "within {deadline:?} of killing the leader: new leader after {leader_after:?}, \
         offline node seen after {degraded_after:?}; survivors show {}",
        summaries(&last)
    );

    let new = leader_among(&survivors).await.expect("a leader");
    for (index, app) in survivors.iter().enumerate() {
        let flag = if index == new { 1.0 } else { 0.0 };
        assert_eq!(metric(app, "proxmoxer_leader").await, Some(flag));
    }
    let degraded = fetch_cluster(survivors[new], &id).await;
    assert_eq!(degraded["nodes_online"], 2, "{degraded}");
    assert_eq!(degraded["node_count"], 3, "{degraded}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_registration_is_lost_when_the_leader_dies() {
    let Some(etcd) = EtcdServer::single("no_registration_lost").await else {
        return;
    };
    let fake = fake_pve().await;
    let registry = SharedRegistry::new("none-lost", etcd.endpoints());
    let mut apps = registry.spawn_instances(3).await;
    let leader = wait_for_one_leader(&apps.iter().collect::<Vec<_>>()).await;

    let writers: Vec<Writer> = apps
        .iter()
        .enumerate()
        .map(|(index, app)| Writer::start(app, &fake, &format!("kept-{index}")))
        .collect();
    let going = wait_until(
        async || {
            writers
                .iter()
                .all(|writer| writer.acknowledged().len() >= 3)
        },
        WAIT,
    )
    .await;
    assert!(
        going,
        "every instance acknowledges registrations before the kill"
    );

    apps[leader].kill9().await;
    let at_kill: Vec<usize> = writers.iter().map(|w| w.acknowledged().len()).collect();
    let continued = wait_until(
        async || {
            writers
                .iter()
                .enumerate()
                .filter(|(index, _)| *index != leader)
                .all(|(index, writer)| writer.acknowledged().len() >= at_kill[index] + 3)
        },
        failover_deadline(),
    )
    .await;
    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    for (index, writer) in writers.into_iter().enumerate() {
        let (kept, other) = writer.stop().await;
        acknowledged.extend(kept);
        if index != leader {
            refused.extend(other);
        }
    }
    assert!(
        continued,
        "the survivors stopped acknowledging registrations after the leader died"
    );
    assert!(
        refused.is_empty(),
        "the surviving instances refused registrations: {refused:?}"
    );
    report(&format!(
        "{} registrations acknowledged around the kill",
        acknowledged.len()
    ));

    let mut survivors: Vec<&TestApp> = apps
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, app)| app)
        .collect();
    // And one started afterwards, which can only know them from etcd.
    let late = registry.instance().spawn().await;
    survivors.push(&late);
    for app in survivors {
        let mut missing = Vec::new();
        let all_there = wait_until(
            async || {
                let listed = cluster_ids_by_name(app).await;
                missing = acknowledged
                    .iter()
                    .filter(|(name, id)| !listed.contains(&(name.clone(), id.clone())))
                    .cloned()
                    .collect();
                missing.is_empty()
            },
            WAIT,
        )
        .await;
        assert!(all_there, "acknowledged but missing: {missing:?}");
        let names = cluster_names(app).await;
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "no name twice: {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_steps_down_when_it_resumes_and_every_instance_converges() {
    let Some(etcd) = EtcdServer::single("a_frozen_leader").await else {
        return;
    };
    let fake = fake_pve().await;
    let registry = SharedRegistry::new("frozen", etcd.endpoints());
    let apps = registry.spawn_instances(3).await;
    let all: Vec<&TestApp> = apps.iter().collect();
    let old = wait_for_one_leader(&all).await;
    // Through a follower: the leader alone monitors it all the same.
    let id = register_fake_id(&apps[(old + 1) % apps.len()], &fake, "watched").await;
    wait_until_all_show(&all, &id, "healthy", "ok").await;
    let old_id = leader_id(&apps[old]).await;

    signal(&apps[old], "STOP");
    let frozen_at = Instant::now();
    fake.set_node_online("pve3", false);
    let others: Vec<&TestApp> = apps
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != old)
        .map(|(_, app)| app)
        .collect();
    let deadline = failover_deadline();
    let mut last = Vec::new();
    let took_over = wait_until(
        async || {
            last = snapshots(&others, &id).await;
            leader_among(&others).await.is_some() && last.iter().all(|c| c["status"] == "degraded")
        },
        deadline,
    )
    .await;
    report(&format!(
        "leader frozen: another leads and the offline node shows after {:?}",
        frozen_at.elapsed()
    ));
    assert!(
        took_over,
        "within {deadline:?} of freezing the leader no other instance led and showed the \
         offline node; they show {}",
        summaries(&last)
    );
    let new = leader_among(&others).await.expect("a leader");
    let new_id = leader_id(others[new]).await;
    assert_ne!(new_id, old_id);

    signal(&apps[old], "CONT");
    let mut seen = Value::Null;
    let stepped_down = wait_until(
        async || {
            seen = json_of(apps[old].get_health().await).await.1;
            seen["role"] == "follower" && seen["leader"] == new_id.as_str()
        },
        WAIT,
    )
    .await;
    assert!(
        stepped_down,
        "the resumed old leader does not follow {new_id}: {seen}"
    );
    assert_eq!(metric(&apps[old], "proxmoxer_leader").await, Some(0.0));
    let logged = wait_until(async || apps[old].logs().contains(STEPPED_DOWN_LOG), WAIT).await;
    assert!(logged, "the old leader logs {STEPPED_DOWN_LOG:?}");
    wait_until_all_show(&all, &id, "degraded", "node_offline").await;

    // The new leader keeps checking for a while; whatever the old one still had in flight when
    // it resumed must not show anywhere.
    let checks = fake.requests(STATUS_PATH);
    let checked = wait_until(
        async || fake.requests(STATUS_PATH) >= checks + CHECKS_AFTER_RESUME,
        WAIT,
    )
    .await;
    assert!(checked, "the new leader keeps monitoring");
    assert_eq!(leader_among(&all).await, Some(others_index(old, new)));
    for app in &all {
        let cluster = fetch_cluster(app, &id).await;
        assert_eq!(cluster["status"], "degraded", "{cluster}");
        assert_eq!(cluster["nodes_online"], 2, "{cluster}");
    }
    let transitions = wait_for_one_history(&all, &id).await;
    assert_eq!(
        steps(&transitions),
        [("healthy", "degraded"), ("unknown", "healthy")],
        "one change, made by the new leader: {transitions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_yields_before_another_leads_and_rejoins_as_a_follower() {
    let Some(etcd) = EtcdServer::single("a_leader_cut_off").await else {
        return;
    };
    let link = EtcdLink::to(&etcd).await;
    let fake = fake_pve().await;
    let registry = SharedRegistry::new("cut-off", etcd.endpoints());
    // The instance behind the link starts first, so that it leads.
    let cut_off = registry
        .instance()
        .env("PROXMOXER_STORAGE_ETCD_ENDPOINTS", link.url())
        .spawn()
        .await;
    wait_for_one_leader(&[&cut_off]).await;
    let others = registry.spawn_instances(2).await;
    let all: Vec<&TestApp> = std::iter::once(&cut_off).chain(&others).collect();
    assert_eq!(
        wait_for_one_leader(&all).await,
        0,
        "the first instance leads"
    );
    let id = register_fake_id(&others[0], &fake, "watched").await;
    wait_until_all_show(&all, &id, "healthy", "ok").await;
    let old_id = leader_id(&cut_off).await;

    link.cut();
    let cut_at = Instant::now();
    fake.set_node_online("pve3", false);
    let survivors: Vec<&TestApp> = others.iter().collect();
    let deadline = failover_deadline();
    let mut yielded_after = None;
    let mut new_leader_after = None;
    let mut both_leading = None;
    let mut last = Vec::new();
    let took_over = wait_until(
        async || {
            // The survivors first: a leader seen there and then the cut-off instance still
            // saying it leads means both led at that moment.
            let new_leader = leader_among(&survivors).await;
            last = snapshots(&survivors, &id).await;
            let still_leading = metric(&cut_off, "proxmoxer_leader").await == Some(1.0);
            if new_leader.is_some() && still_leading {
                both_leading.get_or_insert(cut_at.elapsed());
            }
            if !still_leading {
                yielded_after.get_or_insert(cut_at.elapsed());
            }
            if new_leader.is_some() {
                new_leader_after.get_or_insert(cut_at.elapsed());
            }
            yielded_after.is_some()
                && new_leader.is_some()
                && last.iter().all(|c| c["status"] == "degraded")
        },
        deadline,
    )
    .await;
    report(&format!(
        "leader cut off from etcd: it stopped leading after {yielded_after:?}, another led \
         after {new_leader_after:?}"
    ));
    assert_eq!(
        both_leading, None,
        "the cut-off leader still said it led while another did"
    );
    assert!(
        took_over,
        "within {deadline:?} of the cut: stopped leading after {yielded_after:?}, another led \
         after {new_leader_after:?}; survivors show {}",
        summaries(&last)
    );
    let new_id = leader_id(survivors[leader_among(&survivors).await.expect("a leader")]).await;
    assert_ne!(new_id, old_id);

    // Cut off, it still answers reads from memory and says etcd is out of reach.
    let (status, body) = json_of(cut_off.get_health().await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "ServiceUnavailable", "{body}");
    fetch_cluster(&cut_off, &id).await;

    link.restore();
    let mut seen = Value::Null;
    let rejoined = wait_until(
        async || {
            seen = json_of(cut_off.get_health().await).await.1;
            seen["role"] == "follower" && seen["leader"] == new_id.as_str()
        },
        WAIT,
    )
    .await;
    assert!(rejoined, "after the cut healed: {seen}");
    let logged = wait_until(async || cut_off.logs().contains(STEPPED_DOWN_LOG), WAIT).await;
    assert!(logged, "the old leader logs {STEPPED_DOWN_LOG:?}");
    wait_until_all_show(&all, &id, "degraded", "node_offline").await;
    let transitions = wait_for_one_history(&all, &id).await;
    assert_eq!(
        steps(&transitions),
        [("healthy", "degraded"), ("unknown", "healthy")],
        "{transitions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_keeps_reads_refuses_writes_and_heals_by_itself() {
    let Some(mut etcd) = EtcdServer::single("an_etcd_outage").await else {
        return;
    };
    let fake = fake_pve().await;
    let registry = SharedRegistry::new("outage", etcd.endpoints());
    let mut apps = registry.spawn_instances(2).await;
    let before = register_fake(&apps[0], &fake, "before").await;
    let id = id_of(&before);
    wait_until_visible(&apps[1], &id).await;
    let pids: Vec<Option<u32>> = apps.iter().map(TestApp::pid).collect();

    etcd.stop().await;
    for (index, app) in apps.iter().enumerate() {
        let mut seen = (StatusCode::OK, Value::Null);
        let noticed = wait_until(
            async || {
                seen = json_of(app.get_health().await).await;
                seen.0 == StatusCode::SERVICE_UNAVAILABLE
            },
            WAIT,
        )
        .await;
        assert!(
            noticed,
            "instance {index}: /health during the outage: {seen:?}"
        );
        assert_eq!(seen.1["code"], "ServiceUnavailable", "{:?}", seen.1);

        let list = list_clusters(app).await;
        assert_eq!(list["total"], 1, "reads go on from memory: {list}");
        let fetched = fetch_cluster(app, &id).await;
        assert_eq!(identity(&fetched), identity(&before));

        let (status, body) = json_of(
            app.post_clusters(&register_body(&fake, &format!("during-{index}")))
                .await,
        )
        .await;
        assert_unavailable("POST during the outage", status, &body);
        let (status, body) = patch(app, &id, &json!({"name": "renamed"})).await;
        assert_unavailable("PATCH during the outage", status, &body);
        let (status, body) = json_of(app.delete_cluster(&id).await).await;
        assert_unavailable("DELETE during the outage", status, &body);
    }

    etcd.start().await;
    let restarted_at = Instant::now();
    for (index, app) in apps.iter().enumerate() {
        let mut seen = (StatusCode::OK, Value::Null);
        let healed = wait_until(
            async || {
                seen = json_of(app.get_health().await).await;
                seen.0 == StatusCode::OK
            },
            WAIT,
        )
        .await;
        assert!(
            healed,
            "instance {index}: /health after etcd returned: {seen:?}"
        );
    }
    report(&format!(
        "etcd back: every instance healthy after {:?}",
        restarted_at.elapsed()
    ));
    wait_for_one_leader(&apps.iter().collect::<Vec<_>>()).await;
    let after = register_fake_id(&apps[1], &fake, "after").await;
    wait_until_visible(&apps[0], &after).await;
    for app in &mut apps {
        let names = cluster_names(app).await;
        assert_eq!(
            names,
            ["after", "before"],
            "nothing refused was stored, renamed or deleted"
        );
        assert!(app.is_running(), "the daemons were never restarted");
    }
    let pids_after: Vec<Option<u32>> = apps.iter().map(TestApp::pid).collect();
    assert_eq!(pids, pids_after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_etcd_outage_the_systemd_watchdog_is_still_fed() {
    let Some(mut etcd) = EtcdServer::single("watchdog_during_an_outage").await else {
        return;
    };
    let fake = fake_pve().await;
    let registry = SharedRegistry::new("watchdog", etcd.endpoints());
    let builder = registry.instance();
    let socket_path = builder.data_dir().join("notify.sock");
    let notify = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    let app = builder
        .env("NOTIFY_SOCKET", socket_path.display().to_string())
        .env("WATCHDOG_USEC", "200000")
        .spawn()
        .await;
    wait_for_notification(&notify, "READY=1").await;
    // A status change waiting to be stored when etcd goes: writes then fail too.
    let id = register_fake_id(&app, &fake, "watched").await;
    wait_for_member_probes(&app, &id).await;

    etcd.stop().await;
    fake.set_node_online("pve3", false);
    let noticed = wait_until(
        async || app.get_health().await.status() == StatusCode::SERVICE_UNAVAILABLE,
        WAIT,
    )
    .await;
    assert!(noticed, "/health says etcd is out of reach");
    wait_until_all_show(&[&app], &id, "degraded", "node_offline").await;
    // Only pings sent from now on count.
    let mut buffer = [0_u8; 4096];
    while notify.try_recv(&mut buffer).is_ok() {}
    for _ in 0..3 {
        wait_for_notification(&notify, "WATCHDOG=1").await;
    }

    etcd.start().await;
    let healed = wait_until(
        async || app.get_health().await.status() == StatusCode::OK,
        WAIT,
    )
    .await;
    assert!(healed, "/health recovers with etcd");
    wait_for_notification(&notify, "WATCHDOG=1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_etcd_member_of_three_interrupts_nothing() {
    let Some(mut cluster) = EtcdCluster::three("losing_one_etcd_member").await else {
        return;
    };
    let fake = fake_pve().await;
    let etcd_leader = wait_for_etcd_leader(&cluster).await;
    // The raft leader first, so the instances most likely talk to the member that dies.
    let order: Vec<usize> = std::iter::once(etcd_leader)
        .chain((0..3).filter(|&i| i != etcd_leader))
        .collect();
    let registry = SharedRegistry::new("member-lost", cluster.endpoints_in_order(&order));
    let mut apps = Vec::new();
    for _ in 0..2 {
        apps.push(
            registry
                .instance()
                .env(
                    "PROXMOXER_STORAGE_ETCD_LEASE_TTL",
                    MEMBER_LOSS_LEASE_TTL_SETTING,
                )
                .spawn()
                .await,
        );
    }
    let all: Vec<&TestApp> = apps.iter().collect();
    let leader = wait_for_one_leader(&all).await;
    let mut ids = vec![register_fake_id(&apps[0], &fake, "first").await];

    cluster.member_mut(etcd_leader).kill();
    let killed_at = Instant::now();
    let mut rounds_with_new_leader = 0;
    let mut round = 0;
    // Past a whole lease: a lease kept alive only through the dead member would have ended.
    while rounds_with_new_leader < 3 || killed_at.elapsed() < MEMBER_LOSS_LEASE_TTL {
        assert!(
            killed_at.elapsed() < WAIT,
            "etcd elected no new leader within {WAIT:?}"
        );
        for (index, app) in apps.iter().enumerate() {
            let name = format!("during-{round}-{index}");
            let (status, body) =
                json_of(app.post_clusters(&register_body(&fake, &name)).await).await;
            let after = killed_at.elapsed();
            assert_eq!(
                status,
                StatusCode::CREATED,
                "instance {index}, {after:?} after the member died: {body}"
            );
            ids.push(id_of(&body));
            let response = app.get_clusters().await;
            assert_eq!(response.status(), StatusCode::OK);
            let (status, body) = json_of(app.get_health().await).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "instance {index}, {after:?} after the member died: {body}"
            );
        }
        if cluster.leader().await.is_some_and(|i| i != etcd_leader) {
            rounds_with_new_leader += 1;
        }
        round += 1;
    }
    report(&format!(
        "{} registrations through the loss of the etcd leader in {:?}",
        ids.len() - 1,
        killed_at.elapsed()
    ));
    for app in &apps {
        for id in &ids {
            wait_until_visible(app, id).await;
        }
    }
    assert_eq!(
        leader_among(&all).await,
        Some(leader),
        "the same instance leads (and monitors) throughout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_copies_a_redb_registry_into_etcd_once_and_refuses_a_different_namesake() {
    let Some(etcd) = EtcdServer::single("migrate_from_redb").await else {
        return;
    };
    let fake = fake_pve().await;
    let mut redb = TestApp::spawn().await;
    let alpha = register_fake(&redb, &fake, "alpha").await;
    let beta = register_fake(&redb, &fake, "beta").await;
    let status = redb.terminate().await;
    assert!(status.success(), "{status}");
    let registry = SharedRegistry::with_key("migrate", etcd.endpoints(), redb.key_path());

    let first = registry.migrate(&redb.db_path()).await;
    assert!(first.status.success(), "{}", describe(&first));
    let mut expected = vec![identity(&alpha), identity(&beta)];
    expected.sort();
    let app = registry.instance().spawn().await;
    assert_eq!(identities(&app).await, expected);
    let fetched = fetch_cluster(&app, &id_of(&alpha)).await;
    assert_eq!(fetched["proxmox_version"], alpha["proxmox_version"]);
    // The credentials came along sealed with the same key: the leader logs in with them anew.
    fake.invalidate_tickets();
    fake.set_node_online("pve3", false);
    wait_until_all_show(&[&app], &id_of(&alpha), "degraded", "node_offline").await;
    wait_until_all_show(&[&app], &id_of(&beta), "degraded", "node_offline").await;
    fake.set_node_online("pve3", true);

    let again = registry.migrate(&redb.db_path()).await;
    assert!(again.status.success(), "a second run: {}", describe(&again));
    let fresh = registry.instance().spawn().await;
    assert_eq!(
        identities(&fresh).await,
        expected,
        "nothing duplicated by the second run"
    );

    // Another registry with its own cluster called alpha, sealed with the same key.
    let mut other = TestApp::builder()
        .env("PROXMOXER_KEY_FILE", redb.key_path().display().to_string())
        .spawn()
        .await;
    let namesake = register_fake(&other, &fake, "alpha").await;
    assert_ne!(id_of(&namesake), id_of(&alpha));
    let status = other.terminate().await;
    assert!(status.success(), "{status}");
    let refused = registry.migrate(&other.db_path()).await;
    assert!(
        !refused.status.success(),
        "a different alpha must be refused: {}",
        describe(&refused)
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("alpha"),
        "the refusal names the cluster: {}",
        describe(&refused)
    );
    let unchanged = registry.instance().spawn().await;
    assert_eq!(identities(&unchanged).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_on_a_follower_reaches_the_leaders_monitor() {
    let Some(etcd) = EtcdServer::single("change_on_a_follower").await else {
        return;
    };
    let fake = fake_pve().await;
    let registry = SharedRegistry::new("change-on-follower", etcd.endpoints());
    let apps = registry.spawn_instances(2).await;
    let all: Vec<&TestApp> = apps.iter().collect();
    let leader = wait_for_one_leader(&all).await;
    let follower = &apps[1 - leader];
    let id = register_fake_id(follower, &fake, "lab").await;
    wait_until_all_show(&all, &id, "healthy", "ok").await;

    // The password is rotated on Proxmox: the leader's monitor is refused...
    fake.set_password(DEFAULT_USER, "rotated-password");
    fake.invalidate_tickets();
    wait_until_all_show(&all, &id, "unhealthy", "auth_failed").await;

    // ...until an operator hands the new one to the follower, which stores it in etcd.
    let response = follower
        .client
        .patch(follower.api_url(&format!("/clusters/{id}")))
        .header("content-type", "application/json")
        .body(json!({"password": "rotated-password", "name": "lab-eu"}).to_string())
        .send()
        .await
        .expect("PATCH");
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["name"], "lab-eu", "{body}");

    // The leader's monitor logs in with it: every instance shows the cluster healthy again
    // under its new name, and the change is in the history the leader serves.
    wait_until_all_show(&all, &id, "healthy", "ok").await;
    for app in &all {
        assert_eq!(fetch_cluster(app, &id).await["name"], "lab-eu");
    }
    let (status, body) = history(&apps[leader], &id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let changed: Vec<&Value> = body["transitions"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter(|t| t["reason"] == "settings_changed")
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(changed.len(), 1, "{body}");
    let fields = changed[0]["fields"].to_string();
    assert!(
        fields.contains("password") && fields.contains("name"),
        "{body}"
    );
    assert!(
        !body.to_string().contains("rotated-password"),
        "the history names fields, never values"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_another_key_refuses_to_start() {
    let Some(etcd) = EtcdServer::single("another_key").await else {
        return;
    };
    let fake = fake_pve().await;
    let registry = SharedRegistry::new("another-key", etcd.endpoints());
    let app = registry.instance().spawn().await;
    let id = register_fake_id(&app, &fake, "sealed").await;

    let other_key_dir = TempDir::new().expect("a temporary directory");
    let other_key = generate_key(other_key_dir.path());
    let started = Instant::now();
    let (status, stderr) = registry
        .instance()
        .env("PROXMOXER_KEY_FILE", other_key.display().to_string())
        .spawn_expect_failure()
        .await;
    report(&format!(
        "an instance with another key exited with {status} after {:?}",
        started.elapsed()
    ));
    assert!(
        stderr.to_lowercase().contains("key"),
        "the message says it is the key: {stderr}"
    );
    let cluster = fetch_cluster(&app, &id).await;
    assert_eq!(cluster["name"], "sealed");
    let (status, body) = json_of(app.get_health().await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

// --- the shared registry ------------------------------------------------------------------------

/// What the instances of one test share: etcd's endpoints, a prefix of their own and one key.
struct SharedRegistry {
    endpoints: String,
    prefix: String,
    key_file: PathBuf,
    _key_dir: Option<TempDir>,
}

impl SharedRegistry {
    /// A registry under `/proxmoxer-test/<name>` with a key made for it.
    fn new(name: &str, endpoints: String) -> Self {
        let key_dir = tempfile::Builder::new()
            .prefix("proxmoxer-ha-key-")
            .tempdir()
            .expect("a temporary key directory");
        let key_file = generate_key(key_dir.path());
        Self {
            endpoints,
            prefix: format!("/proxmoxer-test/{name}"),
            key_file,
            _key_dir: Some(key_dir),
        }
    }

    /// Like [`Self::new`] with an existing key file.
    fn with_key(name: &str, endpoints: String, key_file: PathBuf) -> Self {
        Self {
            endpoints,
            prefix: format!("/proxmoxer-test/{name}"),
            key_file,
            _key_dir: None,
        }
    }

    fn etcd_env(&self) -> [(&'static str, String); 5] {
        [
            ("PROXMOXER_STORAGE_BACKEND", "etcd".to_owned()),
            ("PROXMOXER_STORAGE_ETCD_ENDPOINTS", self.endpoints.clone()),
            ("PROXMOXER_STORAGE_ETCD_PREFIX", self.prefix.clone()),
            (
                "PROXMOXER_STORAGE_ETCD_LEASE_TTL",
                LEASE_TTL_SETTING.to_owned(),
            ),
            ("PROXMOXER_KEY_FILE", self.key_file.display().to_string()),
        ]
    }

    /// A daemon on this registry, checking every [`MONITOR_INTERVAL`].
    fn instance(&self) -> TestAppBuilder {
        self.etcd_env().into_iter().fold(
            TestApp::builder()
                .env("PROXMOXER_MONITOR_INTERVAL", MONITOR_INTERVAL_SETTING)
                .env("PROXMOXER_PROXMOX_TIMEOUT", "1s")
                .env("RUST_LOG", LOG_FILTER),
            |builder, (key, value)| builder.env(key, value),
        )
    }

    async fn spawn_instances(&self, count: usize) -> Vec<TestApp> {
        let mut apps = Vec::new();
        for _ in 0..count {
            apps.push(self.instance().spawn().await);
        }
        apps
    }

    /// Runs `proxmoxer migrate --from-redb <database>` against this registry.
    async fn migrate(&self, database: &Path) -> Output {
        let mut command = proxmoxer_command();
        command
            .args(["migrate", "--from-redb"])
            .arg(database)
            .envs(self.etcd_env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        run_with_deadline(command, MIGRATE_TIMEOUT).await
    }
}

/// `proxmoxer generate-key <dir>/proxmoxer.key`, which must succeed.
pub(crate) fn generate_key(dir: &Path) -> PathBuf {
    let path = dir.join("proxmoxer.key");
    let output = proxmoxer_command()
        .arg("generate-key")
        .arg(&path)
        .output()
        .expect("run proxmoxer generate-key");
    assert!(output.status.success(), "{}", describe(&output));
    path
}

async fn run_with_deadline(mut command: Command, timeout: Duration) -> Output {
    let mut child = command.spawn().expect("start proxmoxer");
    let deadline = Instant::now() + timeout;
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let output = child
                .wait_with_output()
                .expect("collect the killed command");
            panic!("still running after {timeout:?}: {}", describe(&output));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
        .wait_with_output()
        .expect("collect the command's output")
}

// --- leadership ---------------------------------------------------------------------------------

/// `lease_ttl` + two monitor intervals, as promised, plus [`FAILOVER_SLACK`].
fn failover_deadline() -> Duration {
    LEASE_TTL + 2 * MONITOR_INTERVAL + FAILOVER_SLACK
}

/// The index of the one instance that says it leads, when every instance answers `/health` 200,
/// exactly one says `leader`, the others `follower`, and all name the same leader, whose id ends
/// in its process id; `None` otherwise.
async fn leader_among(apps: &[&TestApp]) -> Option<usize> {
    let mut leaders = Vec::new();
    let mut named = Vec::new();
    for (index, app) in apps.iter().enumerate() {
        let (status, body) = json_of(app.get_health().await).await;
        if status != StatusCode::OK {
            return None;
        }
        match body["role"].as_str() {
            Some("leader") => leaders.push(index),
            Some("follower") => {}
            _ => return None,
        }
        named.push(body["leader"].as_str()?.to_owned());
    }
    let [leader] = leaders[..] else {
        return None;
    };
    let pid = apps[leader].pid()?;
    let agreed = named.iter().all(|id| *id == named[leader]);
    (agreed && named[leader].ends_with(&format!(":{pid}"))).then_some(leader)
}

/// Waits until [`leader_among`] finds one and returns its index; panics with every instance's
/// `/health` after [`WAIT`].
async fn wait_for_one_leader(apps: &[&TestApp]) -> usize {
    let mut leader = None;
    let found = wait_until(
        async || {
            leader = leader_among(apps).await;
            leader.is_some()
        },
        WAIT,
    )
    .await;
    if !found {
        let mut healths = Vec::new();
        for app in apps {
            healths.push((app.pid(), json_of(app.get_health().await).await));
        }
        panic!("no single agreed leader within {WAIT:?}: {healths:?}");
    }
    leader.expect("found")
}

/// The `leader` an instance's `/health` names.
async fn leader_id(app: &TestApp) -> String {
    let (_, body) = json_of(app.get_health().await).await;
    body["leader"]
        .as_str()
        .unwrap_or_else(|| panic!("/health names a leader: {body}"))
        .to_owned()
}

/// The index in the list of all instances of `index` in the list without `skipped`.
fn others_index(skipped: usize, index: usize) -> usize {
    if index >= skipped { index + 1 } else { index }
}

fn signal(app: &TestApp, signal: &str) {
    send_signal(app.pid().expect("the daemon was started"), signal);
}

async fn wait_for_etcd_leader(cluster: &EtcdCluster) -> usize {
    let mut leader = None;
    let found = wait_until(
        async || {
            leader = cluster.leader().await;
            leader.is_some()
        },
        WAIT,
    )
    .await;
    assert!(found, "the etcd members agree on no leader");
    leader.expect("found")
}

// --- what the instances show --------------------------------------------------------------------

/// A sample of `/metrics`, by its exact name without labels.
async fn metric(app: &TestApp, name: &str) -> Option<f64> {
    let text = app
        .client
        .get(format!("{}/metrics", app.base_url()))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("read /metrics");
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
}

fn identity(cluster: &Value) -> (String, String, String, String) {
    let field = |name: &str| cluster[name].as_str().unwrap_or_default().to_owned();
    (
        field("id"),
        field("name"),
        field("api_endpoint"),
        field("created_at"),
    )
}

async fn identities(app: &TestApp) -> Vec<(String, String, String, String)> {
    let list = list_clusters(app).await;
    let mut identities: Vec<_> = list["clusters"]
        .as_array()
        .unwrap_or_else(|| panic!("a clusters array: {list}"))
        .iter()
        .map(identity)
        .collect();
    identities.sort();
    identities
}

/// Every listed cluster's name, sorted.
async fn cluster_names(app: &TestApp) -> Vec<String> {
    let mut names: Vec<String> = cluster_ids_by_name(app)
        .await
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    names.sort();
    names
}

/// `(name, id)` of every cluster listed; the whole list, however long.
async fn cluster_ids_by_name(app: &TestApp) -> Vec<(String, String)> {
    identities(app)
        .await
        .into_iter()
        .map(|(id, name, _, _)| (name, id))
        .collect()
}

async fn snapshots(apps: &[&TestApp], id: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    for app in apps {
        seen.push(fetch_cluster(app, id).await);
    }
    seen
}

async fn wait_until_all_show(apps: &[&TestApp], id: &str, status: &str, reason: &str) {
    let mut last = Vec::new();
    let shown = wait_until(
        async || {
            last = snapshots(apps, id).await;
            last.iter()
                .all(|c| c["status"] == status && c["status_reason"] == reason)
        },
        WAIT,
    )
    .await;
    assert!(
        shown,
        "not every instance shows {status}/{reason}: {}",
        summaries(&last)
    );
}

/// One line per snapshot for assertion messages: status, reason and when it was last checked.
fn summaries(snapshots: &[Value]) -> String {
    snapshots
        .iter()
        .map(|c| {
            format!(
                "[{} {}/{} nodes_online {} last_checked_at {} updated_at {}]",
                c["name"],
                c["status"],
                c["status_reason"],
                c["nodes_online"],
                c["last_checked_at"],
                c["updated_at"]
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits until every instance shows the same history of the cluster and returns its
/// transitions, newest first; panics with each instance's after [`WAIT`].
async fn wait_for_one_history(apps: &[&TestApp], id: &str) -> Vec<Value> {
    let mut histories = Vec::new();
    let agreed = wait_until(
        async || {
            histories.clear();
            for app in apps {
                let (status, body) = history(app, id).await;
                assert_eq!(status, StatusCode::OK, "{body}");
                histories.push(body["transitions"].clone());
            }
            histories.iter().all(|h| *h == histories[0])
        },
        WAIT,
    )
    .await;
    assert!(
        agreed,
        "the instances show different histories after {WAIT:?}: {histories:?}"
    );
    histories[0].as_array().cloned().unwrap_or_default()
}

/// `(from, to)` of each transition.
fn steps(transitions: &[Value]) -> Vec<(&str, &str)> {
    transitions
        .iter()
        .map(|t| {
            (
                t["from"].as_str().unwrap_or_default(),
                t["to"].as_str().unwrap_or_default(),
            )
        })
        .collect()
}

async fn wait_until_visible(app: &TestApp, id: &str) {
    let visible = wait_until(
        async || app.get_cluster(id).await.status() == StatusCode::OK,
        WAIT,
    )
    .await;
    assert!(visible, "cluster {id} never showed on {}", app.base_url());
}

/// The response's `ETag`, which must be there.
fn etag(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(ETAG)
        .and_then(|tag| tag.to_str().ok())
        .unwrap_or_else(|| panic!("no ETag on {} {}", response.status(), response.url()))
        .to_owned()
}

/// Sends `GET /api/v1<path_and_query>` with `If-None-Match: <tag>` from a task of its own, so
/// that the test can act while it is held; the task answers with when the response came.
fn spawn_held_get(
    app: &TestApp,
    path_and_query: &str,
    tag: &str,
) -> tokio::task::JoinHandle<(Instant, reqwest::Response)> {
    let request = app
        .client
        .get(app.api_url(path_and_query))
        .header(IF_NONE_MATCH, tag)
        .timeout(HELD_REQUEST_TIMEOUT);
    let what = path_and_query.to_owned();
    tokio::spawn(async move {
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {what}: {e}"));
        (Instant::now(), response)
    })
}

/// Waits until the instance has started holding `times` blocking queries.
async fn wait_held(app: &TestApp, times: usize) {
    let held = wait_until(async || app.logs().matches(HELD_LOG).count() >= times, WAIT).await;
    assert!(held, "the instance did not hold {times} blocking queries");
}

/// `PATCH /api/v1/clusters/{id}` with `body`.
async fn patch(app: &TestApp, id: &str, body: &Value) -> (StatusCode, Value) {
    let response = app
        .client
        .patch(app.api_url(&format!("/clusters/{id}")))
        .json(body)
        .send()
        .await
        .expect("PATCH /api/v1/clusters/{id}");
    json_of(response).await
}

fn assert_unavailable(what: &str, status: StatusCode, body: &Value) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {body}");
    assert_eq!(body["code"], "ServiceUnavailable", "{what}: {body}");
    assert_eq!(body["message"], UNAVAILABLE_MESSAGE, "{what}: {body}");
    assert!(body["details"].is_object(), "{what}: {body}");
}

/// Reads systemd notifications until one has the line `line`; panics after [`WAIT`].
async fn wait_for_notification(socket: &UnixDatagram, line: &str) {
    let mut received = Vec::new();
    let mut buffer = vec![0_u8; 64 * 1024];
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let length = socket
                .recv(&mut buffer)
                .await
                .expect("receive a notification");
            let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
            if message.lines().any(|l| l == line) {
                return;
            }
            received.push(message);
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "no notification with {line} within {WAIT:?}; received: {received:?}"
    );
}

/// Prints past the test harness's capture, for figures worth seeing in every run.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "ha: {line}");
}

// --- registrations in the background ------------------------------------------------------------

/// Registers clusters named `<prefix>-<n>` on one instance, one after another, until stopped
/// or until the instance stops answering; keeps what was acknowledged and what was refused.
struct Writer {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Writer {
    fn start(app: &TestApp, fake: &FakePve, prefix: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let client = app.client.clone();
        let url = app.api_url("/clusters");
        let fake_url = fake.url();
        let prefix = prefix.to_owned();
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            let acknowledged = Arc::clone(&acknowledged);
            async move {
                let mut refused = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let name = format!("{prefix}-{n}");
                    let body = crate::helpers::register_body_at(&fake_url, &name);
                    let Ok(response) = client.post(&url).json(&body).send().await else {
                        // The instance is gone: nothing more to acknowledge.
                        break;
                    };
                    let status = response.status();
                    let Ok(text) = response.text().await else {
                        break;
                    };
                    if status == StatusCode::CREATED {
                        let cluster: Value =
                            serde_json::from_str(&text).expect("a 201 carries the cluster");
                        acknowledged
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push((name, id_of(&cluster)));
                    } else {
                        refused.push(format!("{name}: {status} {text}"));
                    }
                }
                refused
            }
        });
        Self {
            stop,
            acknowledged,
            task,
        }
    }

    fn acknowledged(&self) -> Vec<(String, String)> {
        self.acknowledged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops after the registration in flight; returns the acknowledged `(name, id)`s and the
    /// refusals.
    async fn stop(self) -> (Vec<(String, String)>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let acknowledged = Arc::clone(&self.acknowledged);
        let refused = self.task.await.expect("the writer task ends");
        let acknowledged = acknowledged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (acknowledged, refused)
    }
}
