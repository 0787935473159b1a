//! The v1 API as an operator uses it: registering, listing, reading and deleting clusters,
//! and every error the specification names.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fake_pve::{DEFAULT_PASSWORD, DEFAULT_USER, FakePve};
use crate::helpers::{TestApp, cluster_count, register_body, register_body_at, register_fake_id};

/// Asserts the specification's error shape and returns the body.
async fn expect_error(
    response: reqwest::Response,
    status: StatusCode,
    code: &str,
    message: &str,
) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body: Value = response.json().await.expect("error body is JSON");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["message"], message, "{body}");
    assert!(
        body.as_object().is_some_and(|o| o.contains_key("details")),
        "{body}"
    );
    body
}

fn is_rfc3339_utc_seconds(value: &Value) -> bool {
    value.as_str().is_some_and(|s| {
        s.len() == 20 && s.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(s).is_ok()
    })
}

#[tokio::test]
async fn registering_a_cluster_returns_201_with_the_cluster_and_its_location() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;

    let response = app
        .post_clusters(&register_body(&fake, "prod-cluster"))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .expect("201 carries a Location");
    let cluster: Value = response.json().await.expect("JSON body");

    let id = cluster["id"].as_str().expect("id is a string");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "id {id} is a UUID");
    assert_eq!(location, format!("/api/v1/clusters/{id}"));
    assert_eq!(cluster["name"], "prod-cluster");
    assert_eq!(cluster["api_endpoint"], fake.url());
    assert_eq!(cluster["status"], "healthy");
    assert_eq!(cluster["proxmox_version"], "8.4.1");
    assert_eq!(cluster["node_count"], 3);
    assert_eq!(cluster["nodes_online"], 3);
    assert_eq!(cluster["quorate"], true);
    assert_eq!(cluster["status_reason"], "ok");
    assert_eq!(cluster["last_error"], Value::Null);
    assert!(is_rfc3339_utc_seconds(&cluster["created_at"]), "{cluster}");
    assert!(is_rfc3339_utc_seconds(&cluster["updated_at"]), "{cluster}");
    assert!(cluster.get("password").is_none() && !cluster.to_string().contains(DEFAULT_PASSWORD));

    // The probe is the one the issue names: a form login, then version and cluster status.
    assert_eq!(fake.logins(), 1);
    let login = fake
        .last_request("/api2/json/access/ticket")
        .expect("the daemon logged in");
    assert!(
        login
            .headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded")),
        "login must be form-encoded"
    );
    assert!(fake.requests("/api2/json/version") >= 1);
    assert!(fake.requests("/api2/json/cluster/status") >= 1);

    let fetched = app.get_cluster(id).await;
    assert_eq!(fetched.status(), StatusCode::OK);
    let fetched: Value = fetched.json().await.expect("JSON");
    assert_eq!(fetched["id"], cluster["id"]);
    assert_eq!(fetched["name"], cluster["name"]);
    assert_eq!(fetched["created_at"], cluster["created_at"]);

    let list: Value = app.get_clusters().await.json().await.expect("JSON");
    assert_eq!(list["total"], 1);
    assert_eq!(list["clusters"][0]["id"], cluster["id"]);
}

#[tokio::test]
async fn the_list_starts_empty_and_is_newest_first() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;

    let response = app.get_clusters().await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body, json!({ "clusters": [], "total": 0 }));

    for name in ["first", "second", "third"] {
        assert_eq!(
            app.post_clusters(&register_body(&fake, name))
                .await
                .status(),
            StatusCode::CREATED
        );
    }
    let body: Value = app.get_clusters().await.json().await.expect("JSON");
    assert_eq!(body["total"], 3);
    let names: Vec<&str> = body["clusters"]
        .as_array()
        .expect("clusters is an array")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["third", "second", "first"]);
}

#[tokio::test]
async fn the_probe_decides_the_initial_status() {
    let app = TestApp::spawn().await;

    let standalone = FakePve::start().await;
    standalone.set_standalone("pve");
    let body: Value = app
        .post_clusters(&register_body(&standalone, "homelab"))
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(body["status"], "healthy", "{body}");
    assert_eq!(body["node_count"], 1);
    assert_eq!(body["quorate"], Value::Null);

    let degraded = FakePve::start().await;
    degraded.set_node_online("pve3", false);
    let body: Value = app
        .post_clusters(&register_body(&degraded, "one-node-down"))
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["node_count"], 3, "offline nodes still count");
    assert_eq!(body["nodes_online"], 2);

    let no_quorum = FakePve::start().await;
    no_quorum.set_cluster("split", &[("a", true), ("b", false), ("c", false)]);
    let body: Value = app
        .post_clusters(&register_body(&no_quorum, "split"))
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(body["status"], "unhealthy", "{body}");
    assert_eq!(body["status_reason"], "quorum_lost");
    assert_eq!(body["quorate"], false);
}

#[tokio::test]
async fn a_wrong_password_is_401_and_stores_nothing() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;
    let mut body = register_body(&fake, "prod");
    body["password"] = json!("not-the-password");

    // Real Proxmox answers a bad password after 3 s; the fake keeps that delay.
    let response = app.post_clusters(&body).await;
    expect_error(
        response,
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "Authentication failed",
    )
    .await;
    assert_eq!(fake.failed_logins(), 1);
    assert_eq!(cluster_count(&app).await, 0);
    assert!(!app.logs().contains("not-the-password"));
}

#[tokio::test]
async fn a_two_factor_account_is_401_and_points_to_api_tokens() {
    let fake = FakePve::start().await;
    fake.set_two_factor(DEFAULT_USER, true);
    let app = TestApp::spawn().await;

    let response = app.post_clusters(&register_body(&fake, "prod")).await;
    let body = expect_error(
        response,
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "Authentication failed",
    )
    .await;
    let reason = body["details"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("two-factor") && reason.contains("token"),
        "{body}"
    );
    assert_eq!(cluster_count(&app).await, 0);
}

#[tokio::test]
async fn a_user_without_sys_audit_is_403_naming_the_privilege() {
    let fake = FakePve::start().await;
    fake.deny_sys_audit(DEFAULT_USER);
    let app = TestApp::spawn().await;

    let response = app.post_clusters(&register_body(&fake, "prod")).await;
    let body = expect_error(
        response,
        StatusCode::FORBIDDEN,
        "Forbidden",
        "Insufficient privileges on Proxmox",
    )
    .await;
    assert_eq!(body["details"]["privilege"], "Sys.Audit", "{body}");
    assert_eq!(body["details"]["path"], "/", "{body}");
    assert_eq!(cluster_count(&app).await, 0);
}

#[tokio::test]
async fn proxmox_failures_are_502_with_the_reason() {
    let app = TestApp::builder()
        .env("PROXMOXER_PROXMOX_TIMEOUT", "500ms")
        .spawn()
        .await;

    let refused = {
        // Bind and drop: nothing listens on this port any more.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        addr
    };
    let response = app
        .post_clusters(&register_body_at(&format!("http://{refused}"), "refused"))
        .await;
    let body = expect_error(
        response,
        StatusCode::BAD_GATEWAY,
        "BadGateway",
        "Failed to connect to Proxmox",
    )
    .await;
    assert_eq!(body["details"]["reason"], "connection refused", "{body}");

    let response = app
        .post_clusters(&register_body_at("https://pve.invalid:8006", "no-dns"))
        .await;
    expect_error(
        response,
        StatusCode::BAD_GATEWAY,
        "BadGateway",
        "Failed to connect to Proxmox",
    )
    .await;

    let failing = FakePve::start().await;
    failing.fail_all(Some((500, "cluster not ready - no quorum?")));
    let response = app.post_clusters(&register_body(&failing, "failing")).await;
    let body = expect_error(
        response,
        StatusCode::BAD_GATEWAY,
        "BadGateway",
        "Failed to connect to Proxmox",
    )
    .await;
    let reason = body["details"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("500") && reason.contains("cluster not ready"),
        "{body}"
    );

    let not_proxmox = FakePve::start().await;
    not_proxmox.set_garbage(true);
    let response = app
        .post_clusters(&register_body(&not_proxmox, "web-server"))
        .await;
    expect_error(
        response,
        StatusCode::BAD_GATEWAY,
        "BadGateway",
        "Failed to connect to Proxmox",
    )
    .await;

    let slow = FakePve::start().await;
    slow.set_latency(Duration::from_secs(3));
    let response = app.post_clusters(&register_body(&slow, "slow")).await;
    let body = expect_error(
        response,
        StatusCode::BAD_GATEWAY,
        "BadGateway",
        "Failed to connect to Proxmox",
    )
    .await;
    assert_eq!(body["details"]["reason"], "timed out after 500ms", "{body}");

    assert_eq!(cluster_count(&app).await, 0);
}

#[tokio::test]
async fn a_redirect_is_never_followed() {
    let elsewhere = FakePve::start().await;
    let redirecting = FakePve::start().await;
    redirecting.set_redirect(Some(format!("{}/api2/json/access/ticket", elsewhere.url())));
    let app = TestApp::spawn().await;

    let response = app
        .post_clusters(&register_body(&redirecting, "moved"))
        .await;
    let body = expect_error(
        response,
        StatusCode::BAD_GATEWAY,
        "BadGateway",
        "Failed to connect to Proxmox",
    )
    .await;
    assert!(
        body["details"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("redirect"),
        "{body}"
    );
    assert_eq!(
        elsewhere.total_requests(),
        0,
        "credentials must not reach another host"
    );
    assert_eq!(cluster_count(&app).await, 0);
}

#[tokio::test]
async fn a_taken_name_is_409() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;
    assert_eq!(
        app.post_clusters(&register_body(&fake, "prod"))
            .await
            .status(),
        StatusCode::CREATED
    );

    let other = FakePve::start().await;
    let response = app.post_clusters(&register_body(&other, "prod")).await;
    expect_error(
        response,
        StatusCode::CONFLICT,
        "Conflict",
        "Cluster already exists",
    )
    .await;
    assert_eq!(
        other.total_requests(),
        0,
        "a taken name is refused before any probe"
    );
    assert_eq!(cluster_count(&app).await, 1);
}

#[tokio::test]
async fn invalid_fields_are_400_naming_the_field_and_change_nothing() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;
    let valid = register_body(&fake, "prod");
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().expect("object").remove(field);
        body
    };
    let cases: Vec<(Value, &str, &str)> = vec![
        (without("name"), "name", "Cluster name is required"),
        (with("name", json!("")), "name", "Cluster name is required"),
        (
            with("name", json!("   ")),
            "name",
            "Cluster name is required",
        ),
        (
            with("name", json!(null)),
            "name",
            "Cluster name is required",
        ),
        (
            with("name", json!("x".repeat(256))),
            "name",
            "Cluster name is too long",
        ),
        (
            with("name", json!("bad\nname")),
            "name",
            "Cluster name is invalid",
        ),
        (
            with("name", json!(42)),
            "name",
            "Field name must be a string",
        ),
        (
            without("api_endpoint"),
            "api_endpoint",
            "API endpoint is required",
        ),
        (
            with("api_endpoint", json!("pve.example.com:8006")),
            "api_endpoint",
            "API endpoint is invalid",
        ),
        (
            with("api_endpoint", json!("ftp://pve.example.com")),
            "api_endpoint",
            "API endpoint is invalid",
        ),
        (
            with("api_endpoint", json!("https://")),
            "api_endpoint",
            "API endpoint is invalid",
        ),
        (
            with("api_endpoint", json!(["https://pve"])),
            "api_endpoint",
            "Field api_endpoint must be a string",
        ),
        (without("username"), "username", "Username is required"),
        (
            with("username", json!("root")),
            "username",
            "Username is invalid",
        ),
        (
            with("username", json!("root@")),
            "username",
            "Username is invalid",
        ),
        (without("password"), "password", "Password is required"),
        (
            with("password", json!("")),
            "password",
            "Password is required",
        ),
        (
            with("password", json!(true)),
            "password",
            "Field password must be a string",
        ),
    ];
    for (body, field, message) in cases {
        let response = app.post_clusters(&body).await;
        let error = expect_error(response, StatusCode::BAD_REQUEST, "BadRequest", message).await;
        assert_eq!(error["details"]["field"], field, "{body} -> {error}");
    }
    // A 255-character name is fine.
    let response = app
        .post_clusters(&with("name", json!("n".repeat(255))))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(cluster_count(&app).await, 1);
    assert_eq!(fake.logins(), 1, "invalid requests never reach Proxmox");
}

#[tokio::test]
async fn the_endpoint_is_normalised() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;
    let mut body = register_body(&fake, "prod");
    body["api_endpoint"] = json!(format!("{}/api2/json/", fake.url()));
    let cluster: Value = app.post_clusters(&body).await.json().await.expect("JSON");
    assert_eq!(cluster["api_endpoint"], fake.url());
}

#[tokio::test]
async fn bodies_that_are_not_a_json_object_are_refused() {
    let app = TestApp::spawn().await;
    let json_type = Some("application/json");

    let response = app.post_clusters_raw("{\"name\": ", json_type).await;
    expect_error(
        response,
        StatusCode::BAD_REQUEST,
        "BadRequest",
        "Request body is not valid JSON",
    )
    .await;
    let response = app.post_clusters_raw("", json_type).await;
    expect_error(
        response,
        StatusCode::BAD_REQUEST,
        "BadRequest",
        "Request body is not valid JSON",
    )
    .await;
    for body in ["[1, 2]", "\"prod\"", "null", "42"] {
        let response = app.post_clusters_raw(body, json_type).await;
        expect_error(
            response,
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Request body must be a JSON object",
        )
        .await;
    }

    let response = app.post_clusters_raw("{}", None).await;
    expect_error(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UnsupportedMediaType",
        "Content-Type must be application/json",
    )
    .await;
    let response = app.post_clusters_raw("{}", Some("text/plain")).await;
    expect_error(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UnsupportedMediaType",
        "Content-Type must be application/json",
    )
    .await;

    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(70 * 1024));
    let response = app.post_clusters_raw(&huge, json_type).await;
    expect_error(
        response,
        StatusCode::PAYLOAD_TOO_LARGE,
        "PayloadTooLarge",
        "Request body is too large",
    )
    .await;

    assert_eq!(cluster_count(&app).await, 0);
}

#[tokio::test]
async fn unknown_clusters_routes_and_methods_are_json_errors() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;

    let unknown = uuid::Uuid::now_v7();
    expect_error(
        app.get_cluster(unknown).await,
        StatusCode::NOT_FOUND,
        "NotFound",
        "Cluster not found",
    )
    .await;
    expect_error(
        app.delete_cluster(unknown).await,
        StatusCode::NOT_FOUND,
        "NotFound",
        "Cluster not found",
    )
    .await;
    expect_error(
        app.get_cluster("not-a-uuid").await,
        StatusCode::NOT_FOUND,
        "NotFound",
        "Cluster not found",
    )
    .await;
    expect_error(
        app.delete_cluster("42").await,
        StatusCode::NOT_FOUND,
        "NotFound",
        "Cluster not found",
    )
    .await;

    let response = app
        .client
        .get(app.api_url("/nodes"))
        .send()
        .await
        .expect("GET");
    expect_error(
        response,
        StatusCode::NOT_FOUND,
        "NotFound",
        "Route not found",
    )
    .await;
    let response = app
        .client
        .put(app.api_url("/clusters"))
        .send()
        .await
        .expect("PUT");
    expect_error(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "Method not allowed",
    )
    .await;
    let id = register_fake_id(&app, &fake, "prod").await;
    let response = app
        .client
        .post(app.api_url(&format!("/clusters/{id}")))
        .send()
        .await
        .expect("POST");
    expect_error(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "Method not allowed",
    )
    .await;
}

#[tokio::test]
async fn deleting_a_cluster_is_204_with_an_empty_body_then_404() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;
    let id = register_fake_id(&app, &fake, "prod").await;

    let response = app.delete_cluster(&id).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response.bytes().await.expect("body").is_empty());
    expect_error(
        app.get_cluster(&id).await,
        StatusCode::NOT_FOUND,
        "NotFound",
        "Cluster not found",
    )
    .await;
    expect_error(
        app.delete_cluster(&id).await,
        StatusCode::NOT_FOUND,
        "NotFound",
        "Cluster not found",
    )
    .await;
    assert_eq!(cluster_count(&app).await, 0);

    // The name is free again.
    assert_eq!(
        app.post_clusters(&register_body(&fake, "prod"))
            .await
            .status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn health_answers_with_the_cluster_count() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;
    let response = app.get_health().await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.json::<Value>().await.expect("JSON");
    // One instance on redb leads itself; its id is host:pid.
    let pid = app.pid().expect("pid");
    let leader = body["leader"].as_str().expect("leader id").to_owned();
    assert!(leader.ends_with(&format!(":{pid}")), "{body}");
    assert_eq!(
        body,
        json!({"status": "ok", "clusters": 0, "role": "standalone", "leader": leader})
    );
    app.post_clusters(&register_body(&fake, "prod")).await;
    let body: Value = app.get_health().await.json().await.expect("JSON");
    assert_eq!(body["clusters"], 1);
}

#[tokio::test]
async fn concurrent_registrations_of_one_name_give_exactly_one_201() {
    let fake = FakePve::start().await;
    // Slow answers make the registrations overlap for certain.
    fake.set_latency(Duration::from_millis(300));
    let app = TestApp::spawn().await;
    let body = register_body(&fake, "prod");

    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let request = app.client.post(app.api_url("/clusters")).json(&body);
        attempts.spawn(async move { request.send().await.map(|r| r.status()) });
    }
    let statuses: Vec<StatusCode> = attempts
        .join_all()
        .await
        .into_iter()
        .map(|r| r.expect("the daemon answers"))
        .collect();
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let conflicts = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((created, conflicts), (1, 7), "{statuses:?}");
    assert_eq!(cluster_count(&app).await, 1);
}

#[tokio::test]
async fn a_slow_proxmox_does_not_delay_other_requests() {
    let fake = FakePve::start().await;
    fake.set_latency(Duration::from_secs(3));
    let app = TestApp::spawn().await;

    let body = register_body(&fake, "slow");
    let registration = app.post_clusters(&body);
    tokio::pin!(registration);
    // Start the registration, then ask for the list while it waits on Proxmox.
    let list = tokio::select! {
        _ = &mut registration => panic!("registration finished before it could overlap"),
        () = tokio::time::sleep(Duration::from_millis(300)) => app.get_clusters().await,
    };
    assert_eq!(list.status(), StatusCode::OK);
    assert!(
        fake.logins() == 0,
        "the registration is still waiting on Proxmox while the list answered"
    );
    let health = app.get_health().await;
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(registration.await.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_client_that_gives_up_mid_registration_leaves_no_reservation() {
    let fake = FakePve::start().await;
    fake.set_latency(Duration::from_secs(2));
    let app = TestApp::spawn().await;
    let body = register_body(&fake, "prod");

    let impatient = app
        .client
        .post(app.api_url("/clusters"))
        .json(&body)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(impatient.is_err(), "the first client gave up");

    fake.set_latency(Duration::ZERO);
    // Once the daemon notices the disconnect, the name is free again: a retry is a 201, not a
    // 409 against a reservation nobody holds.
    let mut status = StatusCode::CONFLICT;
    for _ in 0..50 {
        status = app.post_clusters(&body).await.status();
        if status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(cluster_count(&app).await, 1);
}
