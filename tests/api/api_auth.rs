//! Bearer tokens on the API: who gets in, with which role, reloads on SIGHUP, the refusal to
//! serve the network unprotected, the `token` subcommands and the audit trail.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use serde_json::{Value, json};

use crate::fake_pve::DEFAULT_PASSWORD;
use crate::helpers::describe;
use crate::helpers::{
    TICKET_PATH, TestApp, TestAppBuilder, WAIT, add_api_token, fake_pve, id_of, json_of,
    proxmoxer_command, register_body, test_client, wait_until,
};

const LISTENING: &str = "listening on";

/// A daemon with an admin token `ops` and a read token `grafana`; its client uses `ops`.
/// Returns the daemon and both secrets.
async fn daemon_with_tokens(builder: TestAppBuilder) -> (TestApp, String, String) {
    let (builder, admin) = builder.api_token("ops", "admin");
    let (builder, read) = builder.api_token("grafana", "read");
    (builder.bearer(&admin).spawn().await, admin, read)
}

fn unauthorized_body() -> Value {
    json!({"code": "Unauthorized", "message": "Authentication required", "details": {}})
}

/// Asserts the 401 of the API's own authentication: the exact body and the challenge header.
async fn assert_unauthorized(response: reqwest::Response, what: &str) {
    let challenge = response
        .headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
    assert_eq!(body, unauthorized_body(), "{what}");
    assert_eq!(
        challenge.as_deref(),
        Some(r#"Bearer realm="proxmoxer""#),
        "{what}"
    );
}

fn token_command(path: &Path, args: &[&str]) -> Output {
    proxmoxer_command()
        .arg("token")
        .args(args)
        .arg("--tokens-file")
        .arg(path)
        .output()
        .expect("run proxmoxer token")
}

#[tokio::test]
async fn with_tokens_a_request_without_a_known_bearer_token_is_401_with_a_challenge() {
    let (app, admin, _) = daemon_with_tokens(TestApp::builder()).await;
    let anonymous = test_client(None);
    let wrong = "pmx_0000000000000000000000000000000000000000000";

    assert_unauthorized(
        anonymous
            .get(app.api_url("/clusters"))
            .send()
            .await
            .expect("GET"),
        "no Authorization header",
    )
    .await;
    assert_unauthorized(
        test_client(Some(wrong))
            .get(app.api_url("/clusters"))
            .send()
            .await
            .expect("GET"),
        "an unknown token",
    )
    .await;
    assert_unauthorized(
        anonymous
            .get(app.api_url("/clusters"))
            .header(AUTHORIZATION, format!("Basic {admin}"))
            .send()
            .await
            .expect("GET"),
        "the right secret under another scheme",
    )
    .await;
    // Checked before routing: unknown paths and wrong methods do not tell what exists.
    assert_unauthorized(
        anonymous
            .get(app.api_url("/nowhere"))
            .send()
            .await
            .expect("GET"),
        "an unknown path",
    )
    .await;
    assert_unauthorized(
        anonymous
            .put(app.api_url("/clusters"))
            .send()
            .await
            .expect("PUT"),
        "a wrong method",
    )
    .await;
    assert_unauthorized(
        anonymous
            .get(app.api_url("/openapi.json"))
            .send()
            .await
            .expect("GET"),
        "the OpenAPI document",
    )
    .await;

    // The scheme is case-insensitive.
    let response = anonymous
        .get(app.api_url("/clusters"))
        .header(AUTHORIZATION, format!("bearer {admin}"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    let (status, _) = json_of(
        app.client
            .get(app.api_url("/nowhere"))
            .send()
            .await
            .expect("GET"),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "with a token, routing answers"
    );
    let openapi = app
        .client
        .get(app.api_url("/openapi.json"))
        .send()
        .await
        .expect("GET");
    assert_eq!(openapi.status(), StatusCode::OK);

    let logs = app.logs();
    assert!(
        logs.lines()
            .any(|line| line.contains("API authentication failed")
                && line.contains("unknown bearer token")
                && line.contains("127.0.0.1:")),
        "a failed attempt is logged with the client address:\n{logs}"
    );
    assert!(!logs.contains(wrong), "the presented value is never logged");
    assert!(!logs.contains(&admin), "no secret is logged");
}

#[tokio::test]
async fn a_read_token_reads_and_only_an_admin_token_writes() {
    let fake = fake_pve().await;
    let (app, _, read) = daemon_with_tokens(TestApp::builder()).await;
    let reader = test_client(Some(&read));

    let (status, body) = json_of(
        reader
            .post(app.api_url("/clusters"))
            .json(&register_body(&fake, "by-reader"))
            .send()
            .await
            .expect("POST"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        body,
        json!({"code": "Forbidden", "message": "Token lacks the admin role", "details": {}})
    );
    assert_eq!(
        fake.requests(TICKET_PATH),
        0,
        "a refused write never reaches Proxmox"
    );

    let (status, cluster) =
        json_of(app.post_clusters(&register_body(&fake, "by-admin")).await).await;
    assert_eq!(status, StatusCode::CREATED, "{cluster}");
    let id = id_of(&cluster);

    let (status, list) = json_of(
        reader
            .get(app.api_url("/clusters"))
            .send()
            .await
            .expect("GET"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["total"], 1, "{list}");
    let response = reader
        .head(app.api_url(&format!("/clusters/{id}")))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(response.status(), StatusCode::OK, "HEAD is a read");

    let (status, body) = json_of(
        reader
            .delete(app.api_url(&format!("/clusters/{id}")))
            .send()
            .await
            .expect("DELETE"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        reader
            .get(app.api_url(&format!("/clusters/{id}")))
            .send()
            .await
            .expect("GET")
            .status(),
        StatusCode::OK,
        "the refused delete changed nothing"
    );

    assert_eq!(
        app.delete_cluster(&id).await.status(),
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn health_stays_open_while_metrics_and_the_event_stream_need_a_token() {
    let (app, _, read) = daemon_with_tokens(TestApp::builder()).await;
    let anonymous = test_client(None);
    let reader = test_client(Some(&read));

    let health = anonymous
        .get(format!("{}/health", app.base_url()))
        .send()
        .await
        .expect("GET /health");
    assert_eq!(health.status(), StatusCode::OK);

    let metrics_url = format!("{}/metrics", app.base_url());
    assert_unauthorized(
        anonymous.get(&metrics_url).send().await.expect("GET"),
        "metrics",
    )
    .await;
    let metrics = reader.get(&metrics_url).send().await.expect("GET");
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(
        metrics
            .text()
            .await
            .expect("metrics body")
            .contains("proxmoxer_"),
        "the exposition"
    );

    assert_unauthorized(
        anonymous
            .get(app.api_url("/events"))
            .header(ACCEPT, "text/event-stream")
            .send()
            .await
            .expect("GET"),
        "the event stream",
    )
    .await;
    let events = reader
        .get(app.api_url("/events"))
        .header(ACCEPT, "text/event-stream")
        .send()
        .await
        .expect("GET");
    assert_eq!(events.status(), StatusCode::OK);
    let content_type = events
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
}

#[tokio::test]
async fn sighup_rereads_the_tokens_file_and_a_malformed_one_keeps_the_old_tokens() {
    let builder = TestApp::builder();
    let path = builder.tokens_file();
    let (app, admin, _) = daemon_with_tokens(builder).await;
    let status_with = async |secret: &str| {
        test_client(Some(secret))
            .get(app.api_url("/clusters"))
            .send()
            .await
            .expect("GET")
            .status()
    };

    let later = add_api_token(&path, "later", "read");
    assert_eq!(
        status_with(&later).await,
        StatusCode::UNAUTHORIZED,
        "not before the reload"
    );
    app.sighup();
    assert!(
        wait_until(async || status_with(&later).await == StatusCode::OK, WAIT).await,
        "a token added before SIGHUP works after it"
    );

    let removed = token_command(&path, &["remove", "ops"]);
    assert!(removed.status.success(), "{}", describe(&removed));
    app.sighup();
    assert!(
        wait_until(
            async || status_with(&admin).await == StatusCode::UNAUTHORIZED,
            WAIT
        )
        .await,
        "a removed token is refused after SIGHUP"
    );

    let good = std::fs::read_to_string(&path).expect("read the tokens file");
    std::fs::write(
        &path,
        format!("{good}# a comment\nbroken:superuser:{}\n", "0".repeat(64)),
    )
    .expect("break the file");
    let line = good.lines().count() + 2;
    app.sighup();
    assert!(
        wait_until(
            async || app.logs().contains("API tokens not reloaded"),
            WAIT
        )
        .await,
        "a malformed file is reported"
    );
    let logs = app.logs();
    assert!(
        logs.contains(&format!("line {line}")) && logs.contains("unknown role"),
        "the report names the line and the fault:\n{logs}"
    );
    assert_eq!(
        status_with(&later).await,
        StatusCode::OK,
        "the previous tokens stay in force"
    );
    assert!(!logs.contains(&later) && !logs.contains(&admin));
}

#[tokio::test]
async fn a_malformed_or_missing_tokens_file_stops_the_daemon_before_it_listens() {
    let builder = TestApp::builder();
    let path = builder.tokens_file();
    std::fs::write(
        &path,
        format!(
            "# operators\nops:admin:{}\n\nops:read:{}\n",
            "a".repeat(64),
            "b".repeat(64)
        ),
    )
    .expect("write the tokens file");
    let (status, stderr) = builder
        .env("PROXMOXER_API_TOKENS_FILE", path.display().to_string())
        .spawn_expect_failure()
        .await;
    assert!(!status.success());
    assert!(
        stderr.contains("line 4") && stderr.contains("duplicate"),
        "names the line: {stderr}"
    );
    assert!(!stderr.contains(LISTENING), "{stderr}");

    let builder = TestApp::builder();
    let missing = builder.data_dir().join("api-tokns");
    let (_, stderr) = builder
        .env("PROXMOXER_API_TOKENS_FILE", missing.display().to_string())
        .spawn_expect_failure()
        .await;
    assert!(
        stderr.contains("does not exist") && stderr.contains("api-tokns"),
        "a typo in the path does not open the API: {stderr}"
    );
    assert!(!stderr.contains(LISTENING), "{stderr}");
}

#[tokio::test]
async fn a_non_loopback_listener_without_tokens_refuses_to_start() {
    // The refusal comes before binding: this daemon never listens on 0.0.0.0.
    let (_, stderr) = TestApp::builder()
        .env("PROXMOXER_LISTEN", "0.0.0.0:0")
        .spawn_expect_failure()
        .await;
    assert!(
        stderr.contains("refusing to serve the API on 0.0.0.0:0")
            && stderr.contains("proxmoxer token add"),
        "says how to add a token: {stderr}"
    );
    assert!(!stderr.contains(LISTENING), "{stderr}");

    // A tokens file without a token protects nothing either.
    let builder = TestApp::builder();
    let path = builder.tokens_file();
    std::fs::write(&path, "# nobody yet\n").expect("write the tokens file");
    let (_, stderr) = builder
        .env("PROXMOXER_LISTEN", "0.0.0.0:0")
        .env("PROXMOXER_API_TOKENS_FILE", path.display().to_string())
        .spawn_expect_failure()
        .await;
    assert!(stderr.contains("refusing to serve"), "{stderr}");
    assert!(!stderr.contains(LISTENING), "{stderr}");
}

#[test]
fn check_config_applies_the_same_rule_and_its_explicit_opt_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |allow: Option<&str>| {
        let mut command = proxmoxer_command();
        command
            .current_dir(dir.path())
            .arg("check-config")
            .env("PROXMOXER_LISTEN", "0.0.0.0:8080");
        if let Some(allow) = allow {
            command.env("PROXMOXER_API_ALLOW_UNAUTHENTICATED", allow);
        }
        command.output().expect("run check-config")
    };
    let refused = check(None);
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("allow_unauthenticated"),
        "{}",
        describe(&refused)
    );
    let allowed = check(Some("true"));
    assert!(allowed.status.success(), "{}", describe(&allowed));
    assert!(
        String::from_utf8_lossy(&allowed.stdout).contains("open to anyone"),
        "{}",
        describe(&allowed)
    );
}

#[test]
fn token_subcommands_add_list_and_remove_and_refuse_what_would_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("api-tokens");
    let secret = add_api_token(&path, "ops", "admin");
    assert_eq!(secret.len(), 4 + 43, "pmx_ and 43 base64url characters");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "created with mode 0600");
    add_api_token(&path, "grafana", "read");
    let stored = std::fs::read_to_string(&path).expect("read");
    assert!(!stored.contains(&secret), "only the hash is stored");

    let duplicate = token_command(&path, &["add", "ops", "--role", "read"]);
    assert!(!duplicate.status.success(), "{}", describe(&duplicate));
    assert!(duplicate.stdout.is_empty(), "no secret for a refused add");
    let unknown = token_command(&path, &["remove", "nobody"]);
    assert!(!unknown.status.success(), "{}", describe(&unknown));
    let bad_role = token_command(&path, &["add", "x", "--role", "owner"]);
    assert!(!bad_role.status.success(), "{}", describe(&bad_role));
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        stored,
        "refused commands change nothing"
    );

    let list = token_command(&path, &["list"]);
    assert!(list.status.success(), "{}", describe(&list));
    let listed: Vec<Vec<String>> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert_eq!(listed, [["ops", "admin"], ["grafana", "read"]]);

    // The environment variable, and the configuration file's key, name the file too.
    let removed = proxmoxer_command()
        .args(["token", "remove", "grafana"])
        .env("PROXMOXER_API_TOKENS_FILE", &path)
        .output()
        .expect("run");
    assert!(removed.status.success(), "{}", describe(&removed));
    let config = dir.path().join("proxmoxer.toml");
    std::fs::write(
        &config,
        format!("[api]\ntokens_file = \"{}\"\n", path.display()),
    )
    .expect("write the config");
    let list = proxmoxer_command()
        .args(["token", "list", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert!(list.status.success(), "{}", describe(&list));
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "ops  admin");
}

/// The `fields` of every JSON log line with target `audit`.
fn audit_lines(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["target"] == "audit")
        .map(|line| {
            assert_eq!(line["level"], "INFO", "{line}");
            line["fields"].clone()
        })
        .collect()
}

#[tokio::test]
async fn every_write_attempt_leaves_one_audit_line_without_secrets() {
    let fake = fake_pve().await;
    let (app, admin, read) =
        daemon_with_tokens(TestApp::builder().env("PROXMOXER_LOG_FORMAT", "json")).await;
    let wrong = "pmx_1111111111111111111111111111111111111111111";

    let body = register_body(&fake, "audited");
    let (status, cluster) = json_of(app.post_clusters(&body).await).await;
    assert_eq!(status, StatusCode::CREATED, "{cluster}");
    let id = id_of(&cluster);
    let (status, _) = json_of(app.post_clusters(&body).await).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let refused = test_client(Some(&read))
        .delete(app.api_url(&format!("/clusters/{id}")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let anonymous = test_client(Some(wrong))
        .post(app.api_url("/clusters"))
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.delete_cluster(&id).await.status(),
        StatusCode::NO_CONTENT
    );
    // A read is not audited.
    assert_eq!(app.get_clusters().await.status(), StatusCode::OK);

    let expected = [
        ("ops", "POST", "/api/v1/clusters".to_owned(), 201, true),
        ("ops", "POST", "/api/v1/clusters".to_owned(), 409, false),
        (
            "grafana",
            "DELETE",
            format!("/api/v1/clusters/{id}"),
            403,
            false,
        ),
        (
            "anonymous",
            "POST",
            "/api/v1/clusters".to_owned(),
            401,
            false,
        ),
        ("ops", "DELETE", format!("/api/v1/clusters/{id}"), 204, true),
    ];
    let mut lines = Vec::new();
    assert!(
        wait_until(
            async || {
                lines = audit_lines(&app.logs());
                lines.len() >= expected.len()
            },
            WAIT
        )
        .await,
        "audit lines: {lines:#?}"
    );
    assert_eq!(
        lines.len(),
        expected.len(),
        "one line per write: {lines:#?}"
    );
    for (line, (token, method, path, status, with_id)) in lines.iter().zip(&expected) {
        assert_eq!(line["token"], *token, "{line}");
        assert_eq!(line["method"], *method, "{line}");
        assert_eq!(line["path"], *path, "{line}");
        assert_eq!(line["status"], *status, "{line}");
        assert!(
            line["client"]
                .as_str()
                .is_some_and(|c| c.starts_with("127.0.0.1:")),
            "{line}"
        );
        if *with_id {
            assert_eq!(line["cluster_id"], id.as_str(), "{line}");
            assert_eq!(line["cluster_name"], "audited", "{line}");
        } else {
            assert!(line["cluster_id"].is_null(), "unknown, left out: {line}");
        }
    }
    assert_eq!(
        lines[1]["cluster_name"], "audited",
        "the refused name is known"
    );

    let logs = app.logs();
    for secret in [admin.as_str(), read.as_str(), wrong, DEFAULT_PASSWORD] {
        assert!(!logs.contains(secret), "{secret:?} appears in the logs");
    }
}
