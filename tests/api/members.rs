//! A cluster is its members: discovery at registration, failover when the registered node is
//! down, pins learned only over verified connections, certificate rotation, joins, quorum
//! views, standalone nodes, `member_networks` and switching discovery off.

use serde_json::{Value, json};

use crate::fake_pve::{FakeMember, FakePve};
use crate::helpers::*;

const NODES: [&str; 3] = ["pve1", "pve2", "pve3"];
const JOIN_PATH: &str = "/api2/json/cluster/config/join";

async fn plain_cluster() -> FakePve {
    let fake = FakePve::start_cluster(&NODES).await;
    fake.set_auth_failure_delay(SHORT_AUTH_DELAY);
    fake
}

async fn tls_cluster() -> FakePve {
    let fake = FakePve::start_cluster_tls(&NODES).await;
    fake.set_auth_failure_delay(SHORT_AUTH_DELAY);
    fake
}

/// Registration through the first member, trusting it by the operator's pin.
fn pinned_body(fake: &FakePve, name: &str) -> Value {
    let mut body = register_body(fake, name);
    body["fingerprint"] = json!(fake.certificate_fingerprint());
    body
}

/// The named entry of a Cluster object's `members`.
fn member<'a>(cluster: &'a Value, name: &str) -> &'a Value {
    cluster["members"]
        .as_array()
        .and_then(|members| members.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no member {name}: {cluster:#}"))
}

fn member_names(cluster: &Value) -> Vec<String> {
    cluster["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter_map(|m| m["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn every_member_reachable(cluster: &Value) -> bool {
    cluster["members"]
        .as_array()
        .is_some_and(|members| members.iter().all(|m| m["reachable"] == true))
}

/// The reasons and members of a cluster's history entries, newest first.
async fn history_entries(app: &TestApp, id: &str) -> Vec<(String, String)> {
    let (_, body) = json_of(
        app.client
            .get(app.api_url(&format!("/clusters/{id}/history")))
            .send()
            .await
            .expect("history request"),
    )
    .await;
    body["transitions"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|t| {
                    (
                        t["reason"].as_str().unwrap_or_default().to_owned(),
                        t["member"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn endpoint_of(member: &FakeMember) -> String {
    member.url()
}

#[tokio::test]
async fn registration_lists_every_member_with_its_learned_pin() {
    let fake = tls_cluster().await;
    let app = fast_daemon().spawn().await;

    let cluster = register(&app, &pinned_body(&fake, "prod")).await;

    assert_eq!(member_names(&cluster), NODES);
    for name in NODES {
        let shown = member(&cluster, name);
        let real = fake.member(name);
        assert_eq!(shown["endpoint"], endpoint_of(&real), "{shown}");
        assert_eq!(
            shown["fingerprint"],
            real.certificate_fingerprint(),
            "{shown}"
        );
        assert_eq!(shown["online"], true, "{shown}");
        assert!(shown["nodeid"].is_u64(), "{shown}");
        assert!(shown["last_error"].is_null(), "{shown}");
    }
    assert_eq!(member(&cluster, "pve1")["endpoint"], fake.url());
    assert_eq!(member(&cluster, "pve1")["reachable"], true);
    assert!(member(&cluster, "pve2")["reachable"].is_null());
    assert_eq!(cluster["active_endpoint"], fake.url());
    assert_eq!(fake.member("pve1").requests(JOIN_PATH), 1);

    // Members no check uses are probed over their pinned connections.
    let id = id_of(&cluster);
    let probed = wait_for_cluster(&app, &id, "every member probed", every_member_reachable).await;
    assert!(is_healthy(&probed), "{probed:#}");
    for name in ["pve2", "pve3"] {
        assert!(
            fake.member(name).requests("/api2/json/version") >= 1,
            "{name} was probed with GET /version"
        );
    }
    let metrics = app
        .client
        .get(format!("{}/metrics", app.base_url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains(&format!(
            "proxmoxer_cluster_member_reachable{{id=\"{id}\",cluster=\"prod\",member=\"pve2\"}} 1"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_stopped_registered_node_is_a_degraded_cluster_seen_through_another_member() {
    let fake = plain_cluster().await;
    let app = fast_daemon().spawn().await;
    let id = register_fake_id(&app, &fake, "prod").await;
    wait_for_cluster(&app, &id, "every member probed", every_member_reachable).await;
    let logins = fake.logins();

    fake.member("pve1").stop();

    let cluster = wait_for_cluster(&app, &id, "degraded through another member", |c| {
        has_status(c, "degraded", "node_offline") && c["active_endpoint"] != fake.url()
    })
    .await;
    let active = cluster["active_endpoint"].as_str().unwrap_or_default();
    assert!(
        [fake.member("pve2").url(), fake.member("pve3").url()].contains(&active.to_owned()),
        "{cluster:#}"
    );
    let cluster = wait_for_cluster(&app, &id, "pve1 unreachable", |c| {
        member(c, "pve1")["reachable"] == false
    })
    .await;
    assert_eq!(member(&cluster, "pve1")["online"], false, "{cluster:#}");
    assert!(member(&cluster, "pve1")["last_error"].is_string());
    assert_eq!(fake.logins(), logins, "failing over never logs in again");
    let history = history_entries(&app, &id).await;
    assert!(
        history.iter().any(|(reason, _)| reason == "failover"),
        "{history:?}"
    );
    assert!(
        !history.iter().any(|(reason, _)| reason == "unreachable"),
        "{history:?}"
    );
}

#[tokio::test]
async fn a_cluster_no_member_answers_is_unhealthy_until_one_returns() {
    let fake = plain_cluster().await;
    let app = fast_daemon().spawn().await;
    let id = register_fake_id(&app, &fake, "prod").await;
    wait_for_cluster(&app, &id, "every member probed", every_member_reachable).await;

    for name in NODES {
        fake.member(name).stop();
    }
    let down = wait_for_cluster(&app, &id, "unhealthy", |c| {
        has_status(c, "unhealthy", "unreachable")
    })
    .await;
    assert!(down["active_endpoint"].is_null(), "{down:#}");

    // The nodes were up all along, only out of the daemon's reach; one comes back in reach.
    fake.set_node_online("pve1", true);
    fake.set_node_online("pve2", true);
    fake.member("pve3").start();
    let back = wait_for_cluster(&app, &id, "healthy again", is_healthy).await;
    assert_eq!(
        back["active_endpoint"],
        fake.member("pve3").url(),
        "{back:#}"
    );
}

#[tokio::test]
async fn a_restarted_daemon_watches_through_a_persisted_member_while_the_registered_node_is_down() {
    let fake = plain_cluster().await;
    let mut app = fast_daemon().spawn().await;
    let id = register_fake_id(&app, &fake, "prod").await;
    wait_for_cluster(&app, &id, "every member probed", every_member_reachable).await;

    fake.member("pve1").stop();
    app.restart().await;

    let cluster = wait_for_cluster(&app, &id, "degraded through a persisted member", |c| {
        has_status(c, "degraded", "node_offline")
    })
    .await;
    assert_ne!(cluster["active_endpoint"], fake.url(), "{cluster:#}");
    assert_eq!(member_names(&cluster), NODES);
}

#[tokio::test]
async fn pins_survive_a_restart_and_fail_over_while_the_registered_node_is_down() {
    let fake = tls_cluster().await;
    let mut app = fast_daemon().spawn().await;
    let id = id_of(&register(&app, &pinned_body(&fake, "prod")).await);
    wait_for_cluster(&app, &id, "every member probed", every_member_reachable).await;

    fake.member("pve1").stop();
    app.restart().await;

    let cluster = wait_for_cluster(&app, &id, "degraded through a pinned member", |c| {
        has_status(c, "degraded", "node_offline")
    })
    .await;
    let active = cluster["active_endpoint"].as_str().unwrap_or_default();
    assert!(
        [fake.member("pve2").url(), fake.member("pve3").url()].contains(&active.to_owned()),
        "{cluster:#}"
    );
    for name in ["pve2", "pve3"] {
        assert_eq!(
            member(&cluster, name)["fingerprint"],
            fake.member(name).certificate_fingerprint()
        );
    }
}

#[tokio::test]
async fn a_renewed_member_certificate_is_adopted_too() {
    let fake = tls_cluster().await;
    let app = fast_daemon().spawn().await;
    let id = id_of(&register(&app, &pinned_body(&fake, "prod")).await);
    wait_for_cluster(&app, &id, "every member probed", every_member_reachable).await;

    fake.member("pve2").rotate_certificate();
    let renewed = fake.member("pve2").certificate_fingerprint();

    let cluster = wait_for_cluster(&app, &id, "pve2's renewed pin adopted", |c| {
        member(c, "pve2")["fingerprint"] == renewed.as_str()
            && member(c, "pve2")["reachable"] == true
    })
    .await;
    assert!(is_healthy(&cluster), "{cluster:#}");
    assert_eq!(cluster["fingerprint"], fake.certificate_fingerprint());
    let history = history_entries(&app, &id).await;
    assert!(
        history
            .iter()
            .any(|(reason, member)| reason == "pin_rotated" && member == "pve2"),
        "{history:?}"
    );
}

#[tokio::test]
async fn a_renewed_certificate_another_member_vouches_for_is_adopted() {
    let fake = tls_cluster().await;
    let app = fast_daemon().spawn().await;
    let id = id_of(&register(&app, &pinned_body(&fake, "prod")).await);
    wait_for_cluster(&app, &id, "every member probed", every_member_reachable).await;
    let old = fake.certificate_fingerprint();

    fake.member("pve1").rotate_certificate();
    let renewed = fake.member("pve1").certificate_fingerprint();
    assert_ne!(renewed, old);

    let cluster = wait_for_cluster(&app, &id, "the renewed pin adopted", |c| {
        c["fingerprint"] == renewed.as_str()
            && member(c, "pve1")["fingerprint"] == renewed.as_str()
            && member(c, "pve1")["reachable"] == true
    })
    .await;
    assert!(is_healthy(&cluster), "{cluster:#}");
    let history = history_entries(&app, &id).await;
    assert!(
        history
            .iter()
            .any(|(reason, member)| reason == "pin_rotated" && member == "pve1"),
        "{history:?}"
    );
    assert!(
        !history.iter().any(|(reason, _)| reason == "tls_error"),
        "a renewed certificate is not an outage: {history:?}"
    );
}

#[tokio::test]
async fn a_certificate_no_member_vouches_for_is_refused_and_sees_no_credentials() {
    let fake = tls_cluster().await;
    let app = fast_daemon().spawn().await;
    let id = id_of(&register(&app, &pinned_body(&fake, "prod")).await);
    wait_for_cluster(&app, &id, "every member probed", every_member_reachable).await;
    let pve2 = fake.member("pve2");
    let pinned = pve2.certificate_fingerprint();

    pve2.present_unvouched_certificate();
    let authenticated = pve2.authenticated_requests();
    let presented = pve2.certificate_fingerprint();
    assert_ne!(presented, pinned);
    // With the registered node down, checks fail over and meet the impostor.
    fake.member("pve1").stop();

    let cluster = wait_for_cluster(&app, &id, "pve2 refused for its certificate", |c| {
        member(c, "pve2")["reachable"] == false
            && member(c, "pve2")["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("tls_mismatch") && e.contains(&presented))
    })
    .await;
    assert_eq!(member(&cluster, "pve2")["fingerprint"], pinned.as_str());
    let cluster = wait_for_cluster(&app, &id, "watched through pve3", |c| {
        has_status(c, "degraded", "node_offline")
            && c["active_endpoint"] == fake.member("pve3").url()
    })
    .await;
    assert_eq!(member(&cluster, "pve2")["fingerprint"], pinned.as_str());
    assert_eq!(
        pve2.authenticated_requests(),
        authenticated,
        "nothing with credentials reaches a member whose certificate is not vouched for"
    );
}

#[tokio::test]
async fn a_joining_node_appears_with_its_pin_at_the_next_discovery() {
    let fake = tls_cluster().await;
    let app = fast_daemon().spawn().await;
    let id = id_of(&register(&app, &pinned_body(&fake, "prod")).await);

    let pve4 = fake.add_member("pve4").await;

    let cluster = wait_for_cluster(&app, &id, "pve4 discovered", |c| {
        member_names(c).contains(&"pve4".to_owned()) && member(c, "pve4")["reachable"] == true
    })
    .await;
    let shown = member(&cluster, "pve4");
    assert_eq!(shown["fingerprint"], pve4.certificate_fingerprint());
    assert_eq!(shown["endpoint"], pve4.url());
    assert_eq!(cluster["node_count"], 4);
    let history = history_entries(&app, &id).await;
    assert!(
        history
            .iter()
            .any(|(reason, member)| reason == "member_joined" && member == "pve4"),
        "{history:?}"
    );
}

#[tokio::test]
async fn the_quorate_view_wins_over_a_partitioned_member() {
    let fake = plain_cluster().await;
    let app = fast_daemon().spawn().await;
    let id = register_fake_id(&app, &fake, "prod").await;

    fake.member("pve1").set_partitioned(true);

    let cluster = wait_for_cluster(&app, &id, "the majority's view", |c| {
        has_status(c, "degraded", "node_offline") && c["quorate"] == true
    })
    .await;
    assert_ne!(cluster["active_endpoint"], fake.url(), "{cluster:#}");
    assert!(
        fake.member("pve1").requests(STATUS_PATH) >= 1,
        "the partitioned member was asked"
    );
}

#[tokio::test]
async fn a_standalone_node_is_a_single_member_whichever_way_join_information_fails() {
    for version in ["8.2.4", "9.1.1"] {
        let fake = fake_pve().await;
        fake.set_standalone("pve");
        fake.set_version(version);
        let app = fast_daemon().spawn().await;

        let cluster = register_fake(&app, &fake, "lab").await;

        assert_eq!(fake.requests(JOIN_PATH), 1, "{version}");
        assert_eq!(
            fake.requests("/api2/json/nodes"),
            0,
            "{version}: recognised as standalone, not a failed join-info call"
        );
        assert_eq!(member_names(&cluster), vec!["pve"], "{version}");
        assert_eq!(member(&cluster, "pve")["endpoint"], fake.url());
        assert_eq!(cluster["node_count"], 1);
    }
}

#[tokio::test]
async fn without_join_information_members_come_from_status_and_nodes() {
    let fake = tls_cluster().await;
    fake.set_join_info_failure(Some((500, "cluster filesystem not ready")));
    let app = fast_daemon().spawn().await;

    let cluster = register(&app, &pinned_body(&fake, "prod")).await;

    assert_eq!(member_names(&cluster), NODES);
    for name in ["pve2", "pve3"] {
        let real = fake.member(name);
        assert_eq!(
            member(&cluster, name)["fingerprint"],
            real.certificate_fingerprint()
        );
        assert_eq!(member(&cluster, name)["endpoint"], real.url());
    }
    assert!(fake.requests("/api2/json/nodes") >= 1);
}

#[tokio::test]
async fn member_networks_keep_the_daemon_away_from_addresses_outside_them() {
    let fake = plain_cluster().await;
    let app = fast_daemon()
        .env(
            "PROXMOXER_PROXMOX_MEMBER_NETWORKS",
            "127.0.0.2/32, 127.0.0.4/32",
        )
        .spawn()
        .await;
    let id = register_fake_id(&app, &fake, "prod").await;

    fake.member("pve1").stop();
    let cluster = wait_for_cluster(&app, &id, "watched through pve3", |c| {
        has_status(c, "degraded", "node_offline")
            && c["active_endpoint"] == fake.member("pve3").url()
    })
    .await;
    let pve2 = member(&cluster, "pve2");
    assert_eq!(
        pve2["endpoint"],
        fake.member("pve2").url(),
        "listed: {pve2}"
    );
    assert!(pve2["reachable"].is_null(), "{pve2}");
    assert!(
        pve2["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("member_networks")),
        "{pve2}"
    );
    assert_eq!(fake.member("pve2").connections(), 0, "never contacted");
}

#[tokio::test]
async fn with_discovery_off_only_the_registered_endpoint_is_used() {
    let fake = plain_cluster().await;
    let app = fast_daemon()
        .env("PROXMOXER_MONITOR_MEMBER_DISCOVERY", "false")
        .spawn()
        .await;
    let cluster = register_fake(&app, &fake, "prod").await;
    let id = id_of(&cluster);
    assert_eq!(member_names(&cluster), NODES);
    assert_eq!(member(&cluster, "pve1")["endpoint"], fake.url());
    assert!(
        member(&cluster, "pve2")["endpoint"].is_null(),
        "{cluster:#}"
    );

    fake.member("pve1").stop();
    wait_for_cluster(&app, &id, "unreachable", |c| {
        has_status(c, "unhealthy", "unreachable")
    })
    .await;
    assert_eq!(fake.requests(JOIN_PATH), 0);
    assert_eq!(fake.member("pve2").connections(), 0);
    assert_eq!(fake.member("pve3").connections(), 0);
}

#[tokio::test]
async fn an_unverified_connection_learns_no_pins_and_fails_over_nowhere() {
    let fake = tls_cluster().await;
    let app = fast_daemon()
        .env("PROXMOXER_TLS_INSECURE_SKIP_VERIFY", "true")
        .spawn()
        .await;
    let cluster = register_fake(&app, &fake, "lab").await;
    let id = id_of(&cluster);
    for name in ["pve2", "pve3"] {
        let shown = member(&cluster, name);
        assert_eq!(shown["endpoint"], fake.member(name).url(), "{shown}");
        assert!(shown["fingerprint"].is_null(), "{shown}");
        assert!(shown["reachable"].is_null(), "{shown}");
    }

    fake.member("pve1").stop();
    wait_for_cluster(&app, &id, "unreachable", |c| {
        has_status(c, "unhealthy", "unreachable")
    })
    .await;
    assert_eq!(fake.member("pve2").connections(), 0);
    assert_eq!(fake.member("pve3").connections(), 0);
}
