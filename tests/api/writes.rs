//! Commits run off the registry: reads and `/health` do not wait for a slow disk, a failed
//! commit is answered with 500 and leaves nothing behind, and health recovers with the disk
//! without a restart. The disk is slowed or broken through the store's fault file.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::helpers::*;

const FAULT_FILE_ENV: &str = "PROXMOXER_STORE_FAULT_FILE";
const JOIN_PATH: &str = "/api2/json/cluster/config/join";

/// A daemon whose commits obey the fault file it returns (empty: commits as usual).
async fn daemon_with_fault_file() -> (TestApp, PathBuf) {
    let builder = fast_daemon();
    let faults = builder.data_dir().join("faults");
    std::fs::write(&faults, "").expect("write the fault file");
    let app = builder
        .env(FAULT_FILE_ENV, faults.display().to_string())
        .spawn()
        .await;
    (app, faults)
}

fn set_fault(faults: &PathBuf, instruction: &str) {
    std::fs::write(faults, instruction).expect("write the fault file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_health_do_not_wait_for_a_stalled_commit() {
    let fake = fake_pve().await;
    let (app, faults) = daemon_with_fault_file().await;
    let id = register_fake_id(&app, &fake, "before").await;

    set_fault(&faults, "stall 3000");
    let registering = {
        let client = app.client.clone();
        let url = app.api_url("/clusters");
        let body = register_body(&fake, "during");
        tokio::spawn(async move {
            let started = Instant::now();
            let response = client.post(url).json(&body).send().await;
            (response.map(|r| r.status()), started.elapsed())
        })
    };
    // The registration is now waiting on its stalled commit; reads go on meanwhile.
    // Monitors never read join information on their own this soon: a second read is the
    // second registration's probe finishing.
    assert!(
        wait_until(async || fake.requests(JOIN_PATH) >= 2, WAIT).await,
        "the second registration probed Proxmox"
    );
    for _ in 0..5 {
        let started = Instant::now();
        let read = app.get_cluster(&id).await;
        assert_eq!(read.status(), StatusCode::OK);
        let health = app.get_health().await;
        assert_eq!(health.status(), StatusCode::OK);
        let list = list_clusters(&app).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "reads took {took:?} behind a 3 s commit"
        );
        assert!(!registering.is_finished(), "the commit was still stalled");
        assert_eq!(list["total"], 1, "not visible before it is durable: {list}");
    }
    set_fault(&faults, "");
    let (status, took) = registering.await.expect("the registration task");
    assert_eq!(status.expect("a response"), StatusCode::CREATED);
    assert!(
        took >= Duration::from_secs(2),
        "201 only after the durable commit"
    );
    assert_eq!(cluster_count(&app).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_disk_is_a_500_that_leaves_nothing_and_health_recovers_without_a_restart() {
    let fake = fake_pve().await;
    let (mut app, faults) = daemon_with_fault_file().await;
    let kept = register_fake_id(&app, &fake, "kept").await;

    set_fault(&faults, "fail");
    let (status, body) = json_of(app.post_clusters(&register_body(&fake, "lost")).await).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["code"], "InternalServerError", "{body}");
    let (status, body) = json_of(app.delete_cluster(&kept).await).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let list = list_clusters(&app).await;
    assert_eq!(
        list["total"], 1,
        "the failed registration is not visible: {list}"
    );
    assert_eq!(list["clusters"][0]["id"], kept.as_str(), "{list}");
    let health = app.get_health().await;
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);

    // Monitor results keep coming while the disk is broken: they wait for the retry.
    fake.set_node_online("pve3", false);
    wait_for_cluster(&app, &kept, "degraded", |c| c["status"] == "degraded").await;

    set_fault(&faults, "");
    assert!(
        wait_until(
            async || app.get_health().await.status() == StatusCode::OK,
            WAIT
        )
        .await,
        "health recovers with the disk, without a restart"
    );
    // The name of the failed registration is free, and registering works again.
    let again = app.post_clusters(&register_body(&fake, "lost")).await;
    assert_eq!(again.status(), StatusCode::CREATED);

    // What was retried reached the disk: after a crash the degraded cluster is still known,
    // and the failed registration never appears.
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.kill9().await;
    app.restart().await;
    let list = list_clusters(&app).await;
    assert_eq!(list["total"], 2, "{list}");
    let kept_after = fetch_cluster(&app, &kept).await;
    assert_eq!(kept_after["nodes_online"], 2, "{kept_after}");
}
