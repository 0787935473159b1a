//! Checks that the fake Proxmox VE behaves like pveproxy, so daemon tests can trust it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, HandshakeKind, SignatureScheme};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::fake_pve::{DEFAULT_PASSWORD, DEFAULT_USER, FakePve};
use crate::helpers::wait_until;

const SHORT_DELAY: Duration = Duration::from_millis(200);
const TICKET_PATH: &str = "/api2/json/access/ticket";
const STATUS_PATH: &str = "/api2/json/cluster/status";

async fn fake() -> FakePve {
    let fake = FakePve::start().await;
    fake.set_auth_failure_delay(SHORT_DELAY);
    fake
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("build client")
}

fn api(fake: &FakePve, path: &str) -> String {
    format!("{}/api2/json{path}", fake.url())
}

struct Login {
    ticket: String,
    csrf: String,
    data: Value,
}

async fn login_as(client: &reqwest::Client, fake: &FakePve, user: &str, password: &str) -> Login {
    let response = client
        .post(api(fake, "/access/ticket"))
        .form(&[("username", user), ("password", password)])
        .send()
        .await
        .expect("login request");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("login body");
    let data = body["data"].clone();
    Login {
        ticket: data["ticket"].as_str().expect("ticket").to_owned(),
        csrf: data["CSRFPreventionToken"]
            .as_str()
            .expect("CSRF token")
            .to_owned(),
        data,
    }
}

async fn login(client: &reqwest::Client, fake: &FakePve) -> Login {
    login_as(client, fake, DEFAULT_USER, DEFAULT_PASSWORD).await
}

async fn get_with_ticket(
    client: &reqwest::Client,
    fake: &FakePve,
    path: &str,
    ticket: &str,
) -> reqwest::Response {
    client
        .get(api(fake, path))
        .header("Cookie", format!("PVEAuthCookie={ticket}"))
        .send()
        .await
        .expect("GET request")
}

/// Sends one raw HTTP/1.1 request and reads until the server closes the connection, so the
/// status line can be checked byte for byte.
async fn raw_exchange(addr: SocketAddr, request: &str) -> String {
    let exchange = async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut sent = 0;
        while sent < request.len() {
            stream.writable().await.expect("writable");
            match stream.try_write(&request.as_bytes()[sent..]) {
                Ok(written) => sent += written,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => panic!("write failed: {error}"),
            }
        }
        let mut received = Vec::new();
        let mut buf = [0; 4096];
        loop {
            stream.readable().await.expect("readable");
            match stream.try_read(&mut buf) {
                Ok(0) => break,
                Ok(read) => received.extend_from_slice(&buf[..read]),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => panic!("read failed: {error}"),
            }
        }
        String::from_utf8_lossy(&received).into_owned()
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the fake closed the connection in time")
}

fn header_line<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response
        .lines()
        .take_while(|line| !line.is_empty())
        .find(|line| {
            line.split_once(':')
                .is_some_and(|(key, _)| key.eq_ignore_ascii_case(name))
        })
}

fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

#[tokio::test]
async fn fake_pve_login_returns_a_ticket_csrf_token_caps_and_cluster_name() {
    let fake = fake().await;
    let login = login(&client(), &fake).await;

    let parts: Vec<&str> = login.ticket.splitn(5, ':').collect();
    assert_eq!(parts[..2], ["PVE", DEFAULT_USER]);
    assert_eq!(parts[2].len(), 8);
    assert!(
        parts[2]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
    );
    assert_eq!(parts[3], "");
    assert!(parts[4].ends_with("=="), "RSA signatures are padded base64");
    let (csrf_time, csrf_sig) = login.csrf.split_once(':').expect("time:signature");
    assert_eq!(csrf_time, parts[2]);
    assert_eq!(csrf_sig.len(), 43);
    assert_eq!(login.data["username"], DEFAULT_USER);
    assert_eq!(login.data["clustername"], "prod");
    assert_eq!(login.data["cap"]["dc"]["Sys.Audit"], 1);
    assert!(login.data.get("NeedTFA").is_none());
    assert_eq!(fake.logins(), 1);
    assert_eq!(fake.requests(TICKET_PATH), 1);
}

#[tokio::test]
async fn fake_pve_login_accepts_json_bodies_and_the_realm_parameter() {
    let fake = fake().await;
    let response = client()
        .post(api(&fake, "/access/ticket"))
        .json(&serde_json::json!({
            "username": "root", "realm": "pam", "password": DEFAULT_PASSWORD, "new-format": true,
        }))
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["data"]["username"], DEFAULT_USER);
}

#[tokio::test]
async fn fake_pve_wrong_password_is_a_delayed_401_with_the_reason_phrase_on_the_wire() {
    let fake = fake().await;
    let started = Instant::now();
    let response = client()
        .post(api(&fake, "/access/ticket"))
        .form(&[("username", DEFAULT_USER), ("password", "wrong")])
        .send()
        .await
        .expect("login");
    assert!(started.elapsed() >= SHORT_DELAY, "401s must be delayed");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // reqwest keeps a non-canonical reason phrase in the response extensions.
    let reason = response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|reason| String::from_utf8_lossy(reason.as_bytes()).into_owned());
    assert_eq!(reason.as_deref(), Some("authentication failure"));
    assert_eq!(
        response.headers()["connection"],
        "close",
        "pveproxy closes the connection after every error"
    );
    let body: Value = response.json().await.expect("json body");
    assert_eq!(
        body,
        serde_json::json!({"data": null, "message": "authentication failure\n"})
    );
    assert_eq!(fake.failed_logins(), 1);
    assert_eq!(fake.logins(), 0);

    let form = "username=root%40pam&password=wrong";
    let raw = raw_exchange(
        fake.addr(),
        &format!(
            "POST {TICKET_PATH} HTTP/1.1\r\nHost: {}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            fake.addr(),
            form.len()
        ),
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 401 authentication failure\r\n"),
        "status line: {raw:?}"
    );
    assert!(header_line(&raw, "connection").is_some_and(|line| line.ends_with("close")));
}

#[tokio::test]
async fn fake_pve_missing_password_is_an_immediate_400_with_errors() {
    let fake = fake().await;
    fake.set_auth_failure_delay(Duration::from_secs(30));
    let response = client()
        .post(api(&fake, "/access/ticket"))
        .form(&[("username", DEFAULT_USER), ("bogus", "1")])
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body["errors"]["password"],
        "property is missing and it is not optional"
    );
    assert!(body["errors"]["bogus"].is_string());
    assert_eq!(body["data"], Value::Null);
}

#[tokio::test]
async fn fake_pve_requests_without_credentials_get_an_empty_delayed_401_no_ticket() {
    let fake = fake().await;
    let started = Instant::now();
    let raw = raw_exchange(
        fake.addr(),
        &format!(
            "GET /api2/json/version HTTP/1.1\r\nHost: {}\r\n\r\n",
            fake.addr()
        ),
    )
    .await;
    assert!(started.elapsed() >= SHORT_DELAY);
    assert!(raw.starts_with("HTTP/1.1 401 No ticket\r\n"), "{raw:?}");
    assert_eq!(body_of(&raw), "");

    let response = client()
        .get(api(&fake, "/access/ticket"))
        .send()
        .await
        .expect("GET ticket");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.expect("body"), r#"{"data":null}"#);
}

#[tokio::test]
async fn fake_pve_cluster_status_uses_integer_flags_and_standalone_has_no_cluster_entry() {
    let fake = fake().await;
    let client = client();
    let login = login(&client, &fake).await;
    fake.set_cluster("lab", &[("a", true), ("b", false), ("c", true)]);

    let response = get_with_ticket(&client, &fake, "/cluster/status", &login.ticket).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    let entries = body["data"].as_array().expect("array");
    assert_eq!(entries.len(), 4);
    let cluster = entries
        .iter()
        .find(|entry| entry["type"] == "cluster")
        .expect("cluster entry");
    assert_eq!(cluster["name"], "lab");
    assert_eq!(cluster["nodes"], 3);
    assert_eq!(cluster["quorate"], 1);
    let node_b = entries
        .iter()
        .find(|entry| entry["name"] == "b")
        .expect("node b");
    assert_eq!(node_b["online"], 0);
    assert_eq!(node_b["id"], "node/b");
    for entry in entries.iter().filter(|entry| entry["type"] == "node") {
        assert!(entry["online"].is_u64() && entry["local"].is_u64());
    }

    fake.set_node_online("c", false);
    let body: Value = get_with_ticket(&client, &fake, "/cluster/status", &login.ticket)
        .await
        .json()
        .await
        .expect("json");
    let cluster = body["data"]
        .as_array()
        .and_then(|entries| entries.iter().find(|entry| entry["type"] == "cluster"))
        .expect("cluster entry");
    assert_eq!(
        cluster["quorate"], 0,
        "one of three nodes online is no quorum"
    );

    fake.set_standalone("pve");
    let body: Value = get_with_ticket(&client, &fake, "/cluster/status", &login.ticket)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        body["data"],
        serde_json::json!([{
            "type": "node", "id": "node/pve", "name": "pve", "nodeid": 0,
            "ip": "192.168.1.10", "local": 1, "online": 1, "level": "",
        }])
    );
}

#[tokio::test]
async fn fake_pve_cluster_status_order_changes_between_calls() {
    let fake = fake().await;
    let client = client();
    let login = login(&client, &fake).await;
    let mut first_entries = std::collections::HashSet::new();
    for _ in 0..40 {
        let body: Value = get_with_ticket(&client, &fake, "/cluster/status", &login.ticket)
            .await
            .json()
            .await
            .expect("json");
        first_entries.insert(
            body["data"][0]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    assert!(
        first_entries.len() > 1,
        "order never changed: {first_entries:?}"
    );
}

#[tokio::test]
async fn fake_pve_cluster_status_without_sys_audit_is_403() {
    let fake = fake().await;
    fake.add_user("monitor@pve", "pw");
    fake.deny_sys_audit("monitor@pve");
    let client = client();
    let login = login_as(&client, &fake, "monitor@pve", "pw").await;
    assert!(login.data.get("clustername").is_none());

    let response = get_with_ticket(&client, &fake, "/cluster/status", &login.ticket).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let reason = response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|reason| reason.as_bytes().to_vec());
    assert_eq!(
        reason.as_deref(),
        Some(b"Permission check failed (/, Sys.Audit)".as_slice())
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body,
        serde_json::json!({"data": null, "message": "Permission check failed (/, Sys.Audit)\n"})
    );

    let nodes: Value = get_with_ticket(&client, &fake, "/nodes", &login.ticket)
        .await
        .json()
        .await
        .expect("json");
    let node = &nodes["data"][0];
    assert_eq!(node["status"], "online");
    assert!(node.get("cpu").is_none(), "no stats without Sys.Audit");
}

#[tokio::test]
async fn fake_pve_nodes_report_stats_only_for_online_nodes() {
    let fake = fake().await;
    fake.set_node_online("pve3", false);
    fake.set_node_stale("pve2", true);
    let client = client();
    let login = login(&client, &fake).await;
    let body: Value = get_with_ticket(&client, &fake, "/nodes", &login.ticket)
        .await
        .json()
        .await
        .expect("json");
    let node = |name: &str| {
        body["data"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|node| node["node"] == name))
            .cloned()
            .expect("node present")
    };
    assert_eq!(node("pve1")["status"], "online");
    assert!(node("pve1")["cpu"].is_f64());
    assert_eq!(node("pve2")["status"], "unknown");
    assert_eq!(node("pve3")["status"], "offline");
    assert!(node("pve3").get("cpu").is_none());
    let fingerprint = node("pve1")["ssl_fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_owned();
    assert_eq!(fingerprint.len(), 95);
    assert_eq!(Some(fingerprint), fake.node_fingerprint("pve1"));
}

#[tokio::test]
async fn fake_pve_version_and_release() {
    let fake = fake().await;
    let client = client();
    let login = login(&client, &fake).await;
    let body: Value = get_with_ticket(&client, &fake, "/version", &login.ticket)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["data"]["version"], "8.4.1");
    assert_eq!(body["data"]["release"], "8.4");
    assert_eq!(body["data"]["repoid"].as_str().map(str::len), Some(16));

    fake.set_version("7.4-3");
    let body: Value = get_with_ticket(&client, &fake, "/version", &login.ticket)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["data"]["release"], "7.4");
    assert_eq!(body["data"]["repoid"].as_str().map(str::len), Some(8));
}

#[tokio::test]
async fn fake_pve_write_calls_with_a_ticket_need_the_csrf_token() {
    let fake = fake().await;
    let client = client();
    let login = login(&client, &fake).await;
    let without = client
        .post(api(&fake, "/version"))
        .header("Authorization", format!("PVEAuthCookie={}", login.ticket))
        .send()
        .await
        .expect("POST");
    assert_eq!(without.status(), StatusCode::UNAUTHORIZED);
    let reason = without
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|reason| reason.as_bytes().to_vec());
    assert_eq!(
        reason.as_deref(),
        Some(b"Permission denied - invalid csrf token".as_slice())
    );

    let with = client
        .post(api(&fake, "/version"))
        .header("Cookie", format!("PVEAuthCookie={}", login.ticket))
        .header("CSRFPreventionToken", &login.csrf)
        .send()
        .await
        .expect("POST");
    assert_eq!(with.status(), StatusCode::NOT_IMPLEMENTED);
    let body: Value = with.json().await.expect("json");
    assert_eq!(body["message"], "Method 'POST /version' not implemented");
}

#[tokio::test]
async fn fake_pve_tickets_expire_after_two_hours_and_refresh_while_valid() {
    let fake = fake().await;
    let client = client();
    let first = login(&client, &fake).await;
    fake.advance_clock(Duration::from_secs(3600));
    let refreshed = login_as(&client, &fake, DEFAULT_USER, &first.ticket).await;
    assert_ne!(refreshed.ticket, first.ticket);
    assert_eq!(fake.ticket_refreshes(), 1);
    assert_eq!(fake.logins(), 2);

    fake.advance_clock(Duration::from_secs(3601));
    let expired = get_with_ticket(&client, &fake, "/version", &first.ticket).await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    let fresh = get_with_ticket(&client, &fake, "/version", &refreshed.ticket).await;
    assert_eq!(fresh.status(), StatusCode::OK);

    fake.invalidate_tickets();
    let invalid = get_with_ticket(&client, &fake, "/version", &refreshed.ticket).await;
    assert_eq!(invalid.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(invalid.text().await.expect("body"), "");
}

#[tokio::test]
async fn fake_pve_two_factor_users_get_a_half_ticket_that_is_refused() {
    let fake = fake().await;
    fake.set_two_factor(DEFAULT_USER, true);
    let client = client();
    let login = login(&client, &fake).await;
    assert_eq!(login.data["NeedTFA"], 1);
    assert!(login.data.get("cap").is_none());
    assert!(login.ticket.starts_with("PVE:!tfa!%7B"), "{}", login.ticket);
    assert_eq!(fake.logins(), 0);

    let refused = get_with_ticket(&client, &fake, "/version", &login.ticket).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn fake_pve_api_tokens_skip_login_and_csrf() {
    let fake = fake().await;
    let secret = "0c6c6c3e-1111-2222-3333-444455556666";
    fake.add_token("monitor@pve", "health", secret, true);
    let client = client();

    let status = client
        .get(api(&fake, "/cluster/status"))
        .header(
            "Authorization",
            format!("PVEAPIToken=monitor@pve!health={secret}"),
        )
        .send()
        .await
        .expect("GET");
    assert_eq!(status.status(), StatusCode::OK);

    let post = client
        .post(api(&fake, "/version"))
        .header(
            "Authorization",
            format!("PVEAPIToken monitor@pve!health={secret}"),
        )
        .send()
        .await
        .expect("POST");
    assert_eq!(
        post.status(),
        StatusCode::NOT_IMPLEMENTED,
        "tokens need no CSRF"
    );

    let bad = client
        .get(api(&fake, "/cluster/status"))
        .header("Authorization", "PVEAPIToken=monitor@pve!health=wrong")
        .send()
        .await
        .expect("GET");
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let reason = bad
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|reason| reason.as_bytes().to_vec());
    assert_eq!(reason.as_deref(), Some(b"invalid token value!".as_slice()));

    fake.add_token("audit@pve", "privsep", secret, false);
    let forbidden = client
        .get(api(&fake, "/cluster/status"))
        .header(
            "Authorization",
            format!("PVEAPIToken=audit@pve!privsep={secret}"),
        )
        .send()
        .await
        .expect("GET");
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    assert_eq!(fake.logins(), 0);
    let headers = fake.last_request_headers(STATUS_PATH).expect("recorded");
    assert!(headers.get("cookie").is_none());
}

#[tokio::test]
async fn fake_pve_unknown_paths_and_methods_are_501() {
    let fake = fake().await;
    let client = client();
    let login = login(&client, &fake).await;
    let response = get_with_ticket(&client, &fake, "/foo", &login.ticket).await;
    assert_eq!(response.status(), StatusCode::NOT_IMPLEMENTED);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["message"], "Method 'GET /foo' not implemented");

    let raw = raw_exchange(
        fake.addr(),
        &format!(
            "HEAD /api2/json/version HTTP/1.1\r\nHost: {}\r\n\r\n",
            fake.addr()
        ),
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 501 method 'HEAD' not available\r\n"),
        "{raw:?}"
    );
}

#[tokio::test]
async fn fake_pve_failure_modes_answer_every_request() {
    let fake = fake().await;
    let client = client();

    fake.fail_all(Some((595, "No route to host")));
    let raw = raw_exchange(
        fake.addr(),
        &format!(
            "GET /api2/json/version HTTP/1.1\r\nHost: {}\r\n\r\n",
            fake.addr()
        ),
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 595 No route to host\r\n"),
        "{raw:?}"
    );
    assert_eq!(body_of(&raw), "");
    fake.fail_all(None);

    fake.set_redirect(Some("https://elsewhere.example:8006/".to_owned()));
    let response = client
        .get(api(&fake, "/version"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        response.headers()["location"],
        "https://elsewhere.example:8006/"
    );
    fake.set_redirect(None);

    fake.set_garbage(true);
    let response = client
        .post(api(&fake, "/access/ticket"))
        .form(&[("username", DEFAULT_USER), ("password", DEFAULT_PASSWORD)])
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.expect("body").contains("<html>"));
    fake.set_garbage(false);

    fake.set_latency(Duration::from_millis(300));
    let started = Instant::now();
    let response = client
        .get(api(&fake, "/access/ticket"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(fake.total_requests() >= 4);
}

#[tokio::test]
async fn fake_pve_down_refuses_new_and_pooled_connections() {
    let fake = fake().await;
    let client = client();
    let up = client
        .get(api(&fake, "/access/ticket"))
        .send()
        .await
        .expect("GET while up");
    assert_eq!(up.status(), StatusCode::OK);
    up.bytes().await.expect("body");

    fake.set_down(true);
    let pooled = client.get(api(&fake, "/access/ticket")).send().await;
    assert!(
        pooled.is_err(),
        "pooled connection still answered: {pooled:?}"
    );
    let fresh = reqwest::Client::new()
        .get(api(&fake, "/access/ticket"))
        .send()
        .await;
    assert!(fresh.is_err(), "new connection still answered: {fresh:?}");

    fake.set_down(false);
    let back = client
        .get(api(&fake, "/access/ticket"))
        .send()
        .await
        .expect("GET after coming back");
    assert_eq!(back.status(), StatusCode::OK);
}

#[tokio::test]
async fn fake_pve_closes_idle_keep_alive_connections() {
    let fake = fake().await;
    let idle = Duration::from_millis(300);
    fake.set_keep_alive_idle(idle);
    let started = Instant::now();
    let raw = raw_exchange(
        fake.addr(),
        &format!(
            "GET /api2/json/access/ticket HTTP/1.1\r\nHost: {}\r\n\r\n",
            fake.addr()
        ),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw:?}");
    assert!(header_line(&raw, "connection").is_some_and(|line| line.ends_with("Keep-Alive")));
    assert!(
        started.elapsed() >= idle,
        "closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn fake_pve_slow_answers_are_not_cut_by_the_idle_timeout() {
    let fake = fake().await;
    fake.set_keep_alive_idle(Duration::from_millis(100));
    fake.set_latency(Duration::from_millis(400));
    let response = client()
        .get(api(&fake, "/access/ticket"))
        .send()
        .await
        .expect("slow GET");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn fake_pve_wait_until_polls_until_the_condition_holds() {
    let fake = fake().await;
    let client = client();
    let background = fake.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        background.add_user("late@pve", "pw");
    });
    let logged_in = wait_until(
        async || {
            client
                .post(api(&fake, "/access/ticket"))
                .form(&[("username", "late@pve"), ("password", "pw")])
                .send()
                .await
                .is_ok_and(|response| response.status() == StatusCode::OK)
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(logged_in);
}

// --- HTTPS mode ---------------------------------------------------------------------------------

async fn tls_fake() -> FakePve {
    let fake = FakePve::start_tls().await;
    fake.set_auth_failure_delay(SHORT_DELAY);
    fake
}

/// Trusts only the fake's cluster CA, as a daemon given `pve-root-ca.pem` as its CA file would.
fn ca_client(fake: &FakePve) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(fake.ca_pem().as_bytes()).expect("CA PEM");
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .tls_certs_only([ca])
        .build()
        .expect("build CA client")
}

/// Accepts whatever certificate the server shows (signatures are still checked), so a test can
/// look at it.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client configuration that accepts any certificate; it keeps its own session cache.
fn accept_any_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

async fn tls_connect_with(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    TlsConnector::from(config)
        .connect(ServerName::from(addr.ip()), tcp)
        .await
        .expect("TLS handshake")
}

/// A fresh TLS connection (no session to resume) that accepts any certificate.
async fn tls_connect(addr: SocketAddr) -> TlsStream<TcpStream> {
    tls_connect_with(addr, accept_any_config()).await
}

/// SHA-256 of the end-entity certificate the server presented, computed here independently of
/// the fake: upper-case hex pairs joined by `:`.
fn presented_fingerprint(stream: &TlsStream<TcpStream>) -> String {
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("certificates");
    let hex = hex::encode_upper(Sha256::digest(chain[0].as_ref()));
    hex.as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

async fn fingerprint_on_the_wire(fake: &FakePve) -> String {
    presented_fingerprint(&tls_connect(fake.addr()).await)
}

/// Like [`raw_exchange`], over TLS: sends one request and reads until the server closes.
async fn tls_exchange(addr: SocketAddr, request: &str) -> String {
    read_until_closed(tls_connect(addr).await, request).await
}

async fn read_until_closed(mut stream: TlsStream<TcpStream>, request: &str) -> String {
    let exchange = async {
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut received = Vec::new();
        let mut buf = [0; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(read) => received.extend_from_slice(&buf[..read]),
                // A close without close_notify.
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(error) => panic!("read failed: {error}"),
            }
        }
        String::from_utf8_lossy(&received).into_owned()
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the fake closed the TLS connection in time")
}

fn get_request(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")
}

fn is_pve_fingerprint(fingerprint: &str) -> bool {
    fingerprint.len() == 95
        && fingerprint.split(':').count() == 32
        && fingerprint.split(':').all(|pair| {
            pair.len() == 2
                && pair
                    .chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, 'A'..='F'))
        })
}

#[tokio::test]
async fn fake_pve_tls_is_refused_by_a_default_client_as_an_unknown_issuer() {
    let fake = tls_fake().await;
    assert_eq!(fake.url(), format!("https://{}", fake.addr()));
    let error = client()
        .get(api(&fake, "/access/ticket"))
        .send()
        .await
        .expect_err("a certificate from an unknown CA was accepted");
    assert!(error.is_connect(), "{error:?}");
    assert!(format!("{error:?}").contains("UnknownIssuer"), "{error:?}");
    assert_eq!(fake.total_requests(), 0);
}

#[tokio::test]
async fn fake_pve_tls_client_trusting_the_cluster_ca_logs_in_and_nodes_report_the_fingerprint() {
    let fake = tls_fake().await;
    assert!(fake.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(
        fake.certificate_pem()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let fingerprint = fake.certificate_fingerprint();
    assert!(is_pve_fingerprint(&fingerprint), "{fingerprint}");

    let client = ca_client(&fake);
    let response = client
        .get(api(&fake, "/access/ticket"))
        .send()
        .await
        .expect("GET over https");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(response.text().await.expect("body"), r#"{"data":null}"#);

    let login = login(&client, &fake).await;
    let nodes: Value = get_with_ticket(&client, &fake, "/nodes", &login.ticket)
        .await
        .json()
        .await
        .expect("nodes body");
    let reported = |name: &str| {
        nodes["data"]
            .as_array()
            .expect("node list")
            .iter()
            .find(|node| node["node"] == name)
            .and_then(|node| node["ssl_fingerprint"].as_str())
            .map(str::to_owned)
    };
    assert_eq!(reported("pve1"), Some(fingerprint.clone()));
    assert_eq!(fake.node_fingerprint("pve1"), Some(fingerprint.clone()));
    let other = reported("pve2").expect("pve2 fingerprint");
    assert!(is_pve_fingerprint(&other), "{other}");
    assert_ne!(other, fingerprint);
}

#[tokio::test]
async fn fake_pve_tls_fingerprint_is_that_of_the_presented_certificate_and_changes_on_rotation() {
    let fake = tls_fake().await;
    let before = fake.certificate_fingerprint();
    assert_eq!(fingerprint_on_the_wire(&fake).await, before);

    let client = ca_client(&fake);
    let first = client
        .get(api(&fake, "/version"))
        .header("Authorization", "PVEAPIToken=nobody")
        .send()
        .await
        .expect("GET before rotation");
    first.bytes().await.expect("body");

    fake.rotate_certificate();
    let after = fake.certificate_fingerprint();
    assert_ne!(after, before);
    assert!(is_pve_fingerprint(&after), "{after}");
    assert_eq!(fingerprint_on_the_wire(&fake).await, after);
    assert_eq!(fake.node_fingerprint("pve1"), Some(after));

    // Same CA: a client that trusts the CA keeps working, over a new connection.
    let response = client
        .get(api(&fake, "/access/ticket"))
        .send()
        .await
        .expect("GET after rotation");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn fake_pve_tls_sessions_resume_until_the_certificate_changes() {
    let fake = tls_fake().await;
    let addr = fake.addr();
    let config = accept_any_config();
    let request =
        format!("GET {TICKET_PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut handshakes = Vec::new();
    for rotate in [false, false, true] {
        if rotate {
            fake.rotate_certificate();
        }
        let stream = tls_connect_with(addr, Arc::clone(&config)).await;
        let kind = stream.get_ref().1.handshake_kind();
        let fingerprint = presented_fingerprint(&stream);
        // Reading the answer also takes in the session tickets.
        let raw = read_until_closed(stream, &request).await;
        assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw:?}");
        handshakes.push((kind, fingerprint));
    }
    assert_eq!(handshakes[0].0, Some(HandshakeKind::Full));
    assert_eq!(handshakes[1].0, Some(HandshakeKind::Resumed));
    assert_eq!(handshakes[1].1, handshakes[0].1);
    // A reload forgets the sessions: the client sees, and can check, the new certificate.
    assert_eq!(handshakes[2].0, Some(HandshakeKind::Full));
    assert_eq!(handshakes[2].1, fake.certificate_fingerprint());
    assert_ne!(handshakes[2].1, handshakes[0].1);
}

#[tokio::test]
async fn fake_pve_tls_rotation_closes_idle_connections_that_use_the_old_certificate() {
    let fake = tls_fake().await;
    fake.set_keep_alive_idle(Duration::from_secs(60));
    let addr = fake.addr();
    let exchange = tokio::spawn(async move {
        tls_exchange(addr, &get_request(addr, "/api2/json/access/ticket")).await
    });
    let path = TICKET_PATH.to_owned();
    let probe = fake.clone();
    assert!(wait_until(async || probe.requests(&path) == 1, Duration::from_secs(5)).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!exchange.is_finished(), "closed before the rotation");

    let started = Instant::now();
    fake.rotate_certificate();
    let raw = exchange.await.expect("exchange task");
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed only after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn fake_pve_tls_rotation_lets_a_request_in_flight_finish_then_closes() {
    let fake = tls_fake().await;
    fake.set_keep_alive_idle(Duration::from_secs(60));
    fake.set_latency(Duration::from_millis(400));
    let addr = fake.addr();
    let exchange = tokio::spawn(async move {
        tls_exchange(addr, &get_request(addr, "/api2/json/access/ticket")).await
    });
    let path = TICKET_PATH.to_owned();
    let probe = fake.clone();
    assert!(wait_until(async || probe.requests(&path) == 1, Duration::from_secs(5)).await);

    let started = Instant::now();
    fake.rotate_certificate();
    let raw = exchange.await.expect("exchange task");
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw:?}");
    assert_eq!(body_of(&raw), r#"{"data":null}"#);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed only after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn fake_pve_tls_rotation_does_not_cut_a_request_being_received() {
    let fake = tls_fake().await;
    fake.set_keep_alive_idle(Duration::from_secs(60));
    let addr = fake.addr();
    let mut stream = tls_connect(addr).await;
    let request = get_request(addr, TICKET_PATH);
    let (head, last) = request.split_at(request.len() - 2);
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(100)).await;

    fake.rotate_certificate();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let raw = read_until_closed(stream, last).await;
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw:?}");
    assert_eq!(body_of(&raw), r#"{"data":null}"#);
}

#[tokio::test]
async fn fake_pve_tls_self_signed_replacement_is_not_trusted_through_the_ca() {
    let fake = tls_fake().await;
    let before = fake.certificate_fingerprint();
    fake.replace_with_self_signed();
    let after = fake.certificate_fingerprint();
    assert_ne!(after, before);
    assert_eq!(fingerprint_on_the_wire(&fake).await, after);
    assert_eq!(fake.node_fingerprint("pve1"), Some(after));

    let error = ca_client(&fake)
        .get(api(&fake, "/access/ticket"))
        .send()
        .await
        .expect_err("a self-signed certificate chained to the CA");
    assert!(format!("{error:?}").contains("UnknownIssuer"), "{error:?}");

    // Back to a CA-signed certificate.
    fake.rotate_certificate();
    let response = ca_client(&fake)
        .get(api(&fake, "/access/ticket"))
        .send()
        .await
        .expect("GET after re-issuing from the CA");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn fake_pve_tls_plain_http_on_the_https_port_is_redirected_then_closed() {
    let fake = tls_fake().await;
    let addr = fake.addr();
    let raw = raw_exchange(addr, &get_request(addr, "/api2/json/version?x=1")).await;
    assert!(
        raw.starts_with("HTTP/1.1 301 Moved Permanently\r\n"),
        "{raw:?}"
    );
    assert_eq!(
        header_line(&raw, "location"),
        Some(format!("location: https://{addr}/api2/json/version?x=1").as_str())
    );
    assert!(header_line(&raw, "connection").is_some_and(|line| line.ends_with("Keep-Alive")));
    assert_eq!(body_of(&raw), "");

    let raw = raw_exchange(
        addr,
        &format!(
            "POST /api2/json/access/ticket HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
        ),
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 308 Permanent Redirect\r\n"),
        "{raw:?}"
    );

    let response = client()
        .get(format!("http://{addr}/api2/json/access/ticket"))
        .send()
        .await
        .expect("plain GET");
    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        response.headers()["location"],
        format!("https://{addr}/api2/json/access/ticket").as_str()
    );
    assert_eq!(fake.logins(), 0);
}

#[tokio::test]
async fn fake_pve_tls_down_refuses_new_and_pooled_connections() {
    let fake = tls_fake().await;
    let client = ca_client(&fake);
    let up = client
        .get(api(&fake, "/access/ticket"))
        .send()
        .await
        .expect("GET while up");
    up.bytes().await.expect("body");

    fake.set_down(true);
    let pooled = client.get(api(&fake, "/access/ticket")).send().await;
    assert!(
        pooled.is_err(),
        "pooled connection still answered: {pooled:?}"
    );
    let fresh = ca_client(&fake)
        .get(api(&fake, "/access/ticket"))
        .send()
        .await;
    assert!(fresh.is_err(), "new connection still answered: {fresh:?}");

    fake.set_down(false);
    let back = client
        .get(api(&fake, "/access/ticket"))
        .send()
        .await
        .expect("GET after coming back");
    assert_eq!(back.status(), StatusCode::OK);
}

#[tokio::test]
async fn fake_pve_tls_closes_idle_keep_alive_connections() {
    let fake = tls_fake().await;
    let idle = Duration::from_millis(300);
    fake.set_keep_alive_idle(idle);
    let started = Instant::now();
    let raw = tls_exchange(
        fake.addr(),
        &get_request(fake.addr(), "/api2/json/access/ticket"),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw:?}");
    assert!(header_line(&raw, "connection").is_some_and(|line| line.ends_with("Keep-Alive")));
    assert!(
        started.elapsed() >= idle,
        "closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn fake_pve_tls_stalled_handshakes_do_not_block_other_clients() {
    let fake = tls_fake().await;
    fake.set_keep_alive_idle(Duration::from_millis(500));
    let silent = TcpStream::connect(fake.addr()).await.expect("connect");
    let half_hello = TcpStream::connect(fake.addr()).await.expect("connect");
    half_hello.writable().await.expect("writable");
    half_hello
        .try_write(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .expect("write part of a ClientHello");

    let response = tokio::time::timeout(
        Duration::from_secs(2),
        ca_client(&fake).get(api(&fake, "/access/ticket")).send(),
    )
    .await
    .expect("answered while two handshakes stall")
    .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);

    // The stalled connections are dropped once idle, like any other.
    for stream in [silent, half_hello] {
        tokio::time::timeout(Duration::from_secs(5), closed_by_peer(&stream))
            .await
            .expect("stalled connection closed");
    }
}

/// Waits for end-of-file or a reset, skipping anything the server sends first.
async fn closed_by_peer(stream: &TcpStream) {
    let mut buf = [0; 256];
    loop {
        stream.readable().await.expect("readable");
        match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}
