//! The storage backend as every build shows it: the embedded redb registry is a standalone
//! instance, and a binary built without the `etcd` feature refuses the etcd backend saying how
//! to build one that has it. The etcd backend itself is tested in `ha`.

use reqwest::StatusCode;

use crate::helpers::{TestApp, json_of};

#[tokio::test]
async fn with_redb_the_instance_is_standalone() {
    let app = TestApp::spawn().await;
    let (status, body) = json_of(app.get_health().await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["role"], "standalone", "{body}");
}

#[cfg(not(feature = "etcd"))]
#[tokio::test]
async fn the_etcd_backend_without_the_feature_stops_the_daemon_saying_how_to_build_it() {
    let (_, stderr) = TestApp::builder()
        .env("PROXMOXER_STORAGE_BACKEND", "etcd")
        .env("PROXMOXER_STORAGE_ETCD_ENDPOINTS", "http://127.0.0.1:2379")
        .spawn_expect_failure()
        .await;
    assert!(
        stderr.contains("--features etcd"),
        "the message says how to build with etcd: {stderr}"
    );
}
