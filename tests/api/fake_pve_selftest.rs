//! Checks that the fake Proxmox VE behaves like pveproxy, so daemon tests can trust it.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
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

use crate::fake_pve::{DEFAULT_PASSWORD, DEFAULT_USER, FakeMember, FakePve};
use crate::helpers::wait_until;

const SHORT_DELAY: Duration = Duration::from_millis(200);
const TICKET_PATH: &str = "/api2/json/access/ticket";
const STATUS_PATH: &str = "/api2/json/cluster/status";
const JOIN_PATH: &str = "/api2/json/cluster/config/join";

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
    api_at(&fake.url(), path)
}

/// The API URL of `path` on the server at `base` (a [`FakePve::url`] or [`FakeMember::url`]).
fn api_at(base: &str, path: &str) -> String {
    format!("{base}/api2/json{path}")
}

struct Login {
    ticket: String,
    csrf: String,
    data: Value,
}

async fn login_as(client: &reqwest::Client, fake: &FakePve, user: &str, password: &str) -> Login {
    login_at(client, &fake.url(), user, password).await
}

async fn login_at(client: &reqwest::Client, base: &str, user: &str, password: &str) -> Login {
    let response = client
        .post(api_at(base, "/access/ticket"))
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
    assert_eq!(node_b["ip"], "127.0.1.2", "nothing listens there");
    assert_eq!(
        cluster["version"], 4,
        "set_cluster is a new corosync config"
    );
    let node_a = entries
        .iter()
        .find(|entry| entry["name"] == "a")
        .expect("node a");
    assert_eq!(node_a["local"], 1);
    assert_eq!(
        node_a["ip"],
        fake.addr().ip().to_string(),
        "the answering node reports where it listens"
    );
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
            "ip": "127.0.0.1", "local": 1, "online": 1, "level": "",
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

// --- join info and cluster members ----------------------------------------------------------------

/// `GET path` on the server at `base` with a ticket; the `data` of a 200.
async fn data_at(client: &reqwest::Client, base: &str, path: &str, ticket: &str) -> Value {
    let response = client
        .get(api_at(base, path))
        .header("Cookie", format!("PVEAuthCookie={ticket}"))
        .send()
        .await
        .expect("GET request");
    assert_eq!(response.status(), StatusCode::OK, "GET {path} on {base}");
    let body: Value = response.json().await.expect("json body");
    body["data"].clone()
}

/// The entry of `list` whose `key` is `name`.
fn entry<'a>(list: &'a Value, key: &str, name: &str) -> &'a Value {
    list.as_array()
        .expect("array")
        .iter()
        .find(|entry| entry[key] == name)
        .unwrap_or_else(|| panic!("no {key} {name:?} in {list}"))
}

/// corosync.conf values reach JSON as `1` or `"1"`.
fn number_or_numeric_string(value: &Value) -> u64 {
    value
        .as_u64()
        .or_else(|| {
            value
                .as_str()
                .filter(|text| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()))
                .and_then(|text| text.parse().ok())
        })
        .unwrap_or_else(|| panic!("{value} is neither a number nor a numeric string"))
}

fn is_loopback(address: &Value) -> bool {
    address
        .as_str()
        .and_then(|text| text.parse::<IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback())
}

fn online_flags(status: &Value) -> Vec<(String, u64)> {
    let mut flags: Vec<(String, u64)> = status
        .as_array()
        .expect("array")
        .iter()
        .filter(|entry| entry["type"] == "node")
        .map(|entry| {
            (
                entry["name"].as_str().expect("name").to_owned(),
                entry["online"].as_u64().expect("online flag"),
            )
        })
        .collect();
    flags.sort();
    flags
}

fn cluster_entry(status: &Value) -> &Value {
    entry(status, "type", "cluster")
}

fn reason_of(response: &reqwest::Response) -> Option<String> {
    response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|reason| String::from_utf8_lossy(reason.as_bytes()).into_owned())
}

#[tokio::test]
async fn fake_pve_join_info_lists_every_node_with_loopback_addresses_and_fingerprints() {
    let fake = fake().await;
    fake.set_node_online("pve3", false);
    let client = client();
    let login = login(&client, &fake).await;
    let base = fake.url();

    let join = data_at(&client, &base, "/cluster/config/join", &login.ticket).await;
    assert_eq!(join["preferred_node"], "pve1");
    let digest = join["config_digest"].as_str().expect("digest").to_owned();
    assert!(
        digest.len() == 40 && digest.bytes().all(|byte| byte.is_ascii_hexdigit()),
        "{digest}"
    );
    assert_eq!(
        join["totem"],
        serde_json::json!({
            "cluster_name": "prod", "config_version": "3", "version": "2",
            "ip_version": "ipv4-6", "link_mode": "passive", "secauth": "on",
            "interface": {"0": {"linknumber": "0"}},
        })
    );
    let nodelist = &join["nodelist"];
    assert_eq!(
        nodelist.as_array().map(Vec::len),
        Some(3),
        "offline pve3 too"
    );
    for (nodeid, name) in [(1, "pve1"), (2, "pve2"), (3, "pve3")] {
        let node = entry(nodelist, "name", name);
        assert_eq!(number_or_numeric_string(&node["nodeid"]), nodeid);
        assert_eq!(number_or_numeric_string(&node["quorum_votes"]), 1);
        assert!(is_loopback(&node["pve_addr"]), "{node}");
        assert!(is_loopback(&node["ring0_addr"]), "{node}");
        assert_ne!(node["ring0_addr"], node["pve_addr"]);
        assert_eq!(
            node["pve_fp"].as_str(),
            fake.node_fingerprint(name).as_deref()
        );
    }
    assert_eq!(
        entry(nodelist, "name", "pve1")["pve_addr"],
        fake.addr().ip().to_string()
    );
    assert_eq!(entry(nodelist, "name", "pve2")["pve_addr"], "127.0.1.2");

    // Shuffled, and the numbers come both ways.
    let mut first_names = HashSet::new();
    let mut forms = HashSet::new();
    for _ in 0..20 {
        let join = data_at(&client, &base, "/cluster/config/join", &login.ticket).await;
        let nodelist = join["nodelist"].as_array().expect("nodelist").clone();
        first_names.insert(nodelist[0]["name"].to_string());
        for node in &nodelist {
            for key in ["nodeid", "quorum_votes"] {
                number_or_numeric_string(&node[key]);
                forms.insert(node[key].is_string());
            }
        }
    }
    assert!(first_names.len() > 1, "order never changed");
    assert_eq!(forms.len(), 2, "only one of number and string seen");

    fake.set_cluster("lab", &[("a", true), ("b", true)]);
    let join = data_at(&client, &base, "/cluster/config/join", &login.ticket).await;
    assert_ne!(join["config_digest"], digest.as_str());
    assert_eq!(join["totem"]["config_version"], "4");
    assert_eq!(join["totem"]["cluster_name"], "lab");
    assert_eq!(join["preferred_node"], "a");

    fake.add_user("monitor@pve", "pw");
    fake.deny_sys_audit("monitor@pve");
    let monitor = login_as(&client, &fake, "monitor@pve", "pw").await;
    let forbidden = get_with_ticket(&client, &fake, "/cluster/config/join", &monitor.ticket).await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        reason_of(&forbidden).as_deref(),
        Some("Permission check failed (/, Sys.Audit)")
    );
}

#[tokio::test]
async fn fake_pve_join_info_on_a_standalone_node_is_500_before_9_0_and_424_from_9_0() {
    let fake = fake().await;
    fake.set_standalone("pve");
    let client = client();
    let login = login(&client, &fake).await;
    let reason = "node is not in a cluster, no join info available!";
    for (version, status, message) in [
        ("8.4.1", 500, true),
        ("8.3.5", 500, false),
        ("9.0.3", 424, true),
    ] {
        fake.set_version(version);
        let response = get_with_ticket(&client, &fake, "/cluster/config/join", &login.ticket).await;
        assert_eq!(response.status().as_u16(), status, "{version}");
        assert_eq!(reason_of(&response).as_deref(), Some(reason), "{version}");
        let body: Value = response.json().await.expect("json");
        let expected = if message {
            serde_json::json!({"data": null, "message": format!("{reason}\n")})
        } else {
            serde_json::json!({"data": null})
        };
        assert_eq!(body, expected, "{version}");
    }
}

#[tokio::test]
async fn fake_pve_join_info_failure_affects_only_join_info() {
    let fake = fake().await;
    let client = client();
    let login = login(&client, &fake).await;
    let reason = "Method 'GET /cluster/config/join' not implemented";
    fake.set_join_info_failure(Some((501, reason)));
    let response = get_with_ticket(&client, &fake, "/cluster/config/join", &login.ticket).await;
    assert_eq!(response.status(), StatusCode::NOT_IMPLEMENTED);
    assert_eq!(reason_of(&response).as_deref(), Some(reason));
    let body: Value = response.json().await.expect("json");
    assert_eq!(body, serde_json::json!({"data": null, "message": reason}));
    let status = get_with_ticket(&client, &fake, "/cluster/status", &login.ticket).await;
    assert_eq!(status.status(), StatusCode::OK);

    fake.set_join_info_failure(None);
    let response = get_with_ticket(&client, &fake, "/cluster/config/join", &login.ticket).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.requests(JOIN_PATH), 2);
}

async fn cluster_fake(nodes: &[&str]) -> (FakePve, Vec<FakeMember>) {
    let fake = FakePve::start_cluster(nodes).await;
    fake.set_auth_failure_delay(SHORT_DELAY);
    let members = nodes.iter().map(|name| fake.member(name)).collect();
    (fake, members)
}

#[tokio::test]
async fn fake_pve_cluster_members_share_one_port_and_state_and_answer_as_themselves() {
    let (fake, members) = cluster_fake(&["pve1", "pve2", "pve3"]).await;
    let port = fake.addr().port();
    for (member, host) in members.iter().zip(2..) {
        assert_eq!(member.addr(), SocketAddr::from(([127, 0, 0, host], port)));
        assert_eq!(member.url(), format!("http://127.0.0.{host}:{port}"));
    }
    assert_eq!(fake.url(), members[0].url());

    let client = client();
    // A ticket from pve1 works on every member: the authkey is cluster-wide.
    let login = login_at(&client, &members[0].url(), DEFAULT_USER, DEFAULT_PASSWORD).await;
    for member in &members {
        let status = data_at(&client, &member.url(), "/cluster/status", &login.ticket).await;
        for other in &members {
            let node = entry(&status, "name", other.name());
            assert_eq!(node["local"], u64::from(other.name() == member.name()));
            assert_eq!(node["ip"], other.addr().ip().to_string());
        }
        assert_eq!(cluster_entry(&status)["quorate"], 1);
        let join = data_at(
            &client,
            &member.url(),
            "/cluster/config/join",
            &login.ticket,
        )
        .await;
        assert_eq!(join["preferred_node"], member.name());
        let node = entry(&join["nodelist"], "name", member.name());
        assert_eq!(node["pve_addr"], member.addr().ip().to_string());
    }

    let secret = "0c6c6c3e-1111-2222-3333-444455556666";
    fake.add_token("monitor@pve", "health", secret, true);
    let with_token = client
        .get(api_at(&members[2].url(), "/cluster/status"))
        .header(
            "Authorization",
            format!("PVEAPIToken=monitor@pve!health={secret}"),
        )
        .send()
        .await
        .expect("GET with a token");
    assert_eq!(with_token.status(), StatusCode::OK);

    assert_eq!(fake.logins(), 1);
    assert_eq!(fake.requests(STATUS_PATH), 4, "the global counters add up");
    assert_eq!(members[0].requests(TICKET_PATH), 1);
    assert_eq!(
        members[0].authenticated_requests(),
        2,
        "the login does not count"
    );
    assert_eq!(members[1].requests(TICKET_PATH), 0);
    assert_eq!(members[1].requests(STATUS_PATH), 1);
    assert_eq!(members[1].authenticated_requests(), 2);
    assert_eq!(members[2].total_requests(), 3);
    assert_eq!(members[2].authenticated_requests(), 3);
    assert!(members.iter().all(|member| member.connections() >= 1));
}

#[tokio::test]
async fn fake_pve_stopped_member_refuses_connections_and_is_offline_for_the_others() {
    let (fake, members) = cluster_fake(&["pve1", "pve2", "pve3"]).await;
    let client = client();
    let login = login(&client, &fake).await;
    let base = fake.url();

    members[2].stop();
    let before = members[2].connections();
    let refused = client
        .get(api_at(&members[2].url(), "/access/ticket"))
        .send()
        .await;
    assert!(refused.is_err(), "a stopped member answered: {refused:?}");
    assert!(members[2].connections() > before, "connections are counted");
    assert_eq!(members[2].total_requests(), 0);
    let status = data_at(&client, &base, "/cluster/status", &login.ticket).await;
    assert_eq!(entry(&status, "name", "pve3")["online"], 0);
    assert_eq!(cluster_entry(&status)["quorate"], 1, "two of three");
    let nodes = data_at(&client, &base, "/nodes", &login.ticket).await;
    assert_eq!(entry(&nodes, "node", "pve3")["status"], "offline");
    let join = data_at(&client, &base, "/cluster/config/join", &login.ticket).await;
    assert_eq!(join["nodelist"].as_array().map(Vec::len), Some(3));

    members[1].stop();
    let status = data_at(&client, &base, "/cluster/status", &login.ticket).await;
    assert_eq!(cluster_entry(&status)["quorate"], 0);

    members[1].start();
    members[2].start();
    let status = data_at(&client, &members[2].url(), "/cluster/status", &login.ticket).await;
    assert_eq!(cluster_entry(&status)["quorate"], 1);
    assert!(online_flags(&status).iter().all(|(_, online)| *online == 1));
}

#[tokio::test]
async fn fake_pve_partitioned_member_sees_itself_alone_without_quorum() {
    let (fake, members) = cluster_fake(&["pve1", "pve2", "pve3"]).await;
    let client = client();
    let login = login(&client, &fake).await;

    members[2].set_partitioned(true);
    let minority = data_at(&client, &members[2].url(), "/cluster/status", &login.ticket).await;
    assert_eq!(cluster_entry(&minority)["quorate"], 0);
    assert_eq!(
        online_flags(&minority),
        [("pve1".into(), 0), ("pve2".into(), 0), ("pve3".into(), 1)]
    );
    let majority = data_at(&client, &members[0].url(), "/cluster/status", &login.ticket).await;
    assert_eq!(cluster_entry(&majority)["quorate"], 1);
    assert_eq!(
        online_flags(&majority),
        [("pve1".into(), 1), ("pve2".into(), 1), ("pve3".into(), 0)]
    );

    members[2].set_partitioned(false);
    let healed = data_at(&client, &members[2].url(), "/cluster/status", &login.ticket).await;
    assert_eq!(cluster_entry(&healed)["quorate"], 1);
    assert!(online_flags(&healed).iter().all(|(_, online)| *online == 1));
}

async fn tls_cluster_fake(nodes: &[&str]) -> (FakePve, Vec<FakeMember>) {
    let fake = FakePve::start_cluster_tls(nodes).await;
    fake.set_auth_failure_delay(SHORT_DELAY);
    let members = nodes.iter().map(|name| fake.member(name)).collect();
    (fake, members)
}

/// What the cluster vouches for: join info `pve_fp` and `/nodes` `ssl_fingerprint` of `name`,
/// which must agree.
async fn vouched_fingerprint(
    client: &reqwest::Client,
    base: &str,
    ticket: &str,
    name: &str,
) -> String {
    let join = data_at(client, base, "/cluster/config/join", ticket).await;
    let nodes = data_at(client, base, "/nodes", ticket).await;
    let pve_fp = entry(&join["nodelist"], "name", name)["pve_fp"].clone();
    assert_eq!(entry(&nodes, "node", name)["ssl_fingerprint"], pve_fp);
    pve_fp.as_str().expect("fingerprint").to_owned()
}

#[tokio::test]
async fn fake_pve_tls_cluster_members_serve_their_own_certificates_from_one_ca() {
    let (fake, members) = tls_cluster_fake(&["pve1", "pve2", "pve3"]).await;
    assert_eq!(
        fake.certificate_fingerprint(),
        members[0].certificate_fingerprint()
    );
    let client = ca_client(&fake);
    let login = login(&client, &fake).await;
    let base = fake.url();
    let mut served = HashSet::new();
    for member in &members {
        let fingerprint = member.certificate_fingerprint();
        assert!(is_pve_fingerprint(&fingerprint), "{fingerprint}");
        assert_eq!(
            presented_fingerprint(&tls_connect(member.addr()).await),
            fingerprint
        );
        assert_eq!(
            vouched_fingerprint(&client, &base, &login.ticket, member.name()).await,
            fingerprint
        );
        // Signed by the one CA, for its own address.
        let response = client
            .get(api_at(&member.url(), "/access/ticket"))
            .send()
            .await
            .expect("GET over https");
        assert_eq!(response.status(), StatusCode::OK);
        served.insert(fingerprint);
    }
    assert_eq!(served.len(), 3);

    let old = members[1].certificate_fingerprint();
    members[1].rotate_certificate();
    let renewed = members[1].certificate_fingerprint();
    assert_ne!(renewed, old);
    assert_eq!(
        presented_fingerprint(&tls_connect(members[1].addr()).await),
        renewed
    );
    assert_eq!(
        vouched_fingerprint(&client, &members[2].url(), &login.ticket, "pve2").await,
        renewed
    );
    assert_eq!(fake.node_fingerprint("pve2"), Some(renewed));

    let vouched = members[2].certificate_fingerprint();
    members[2].present_unvouched_certificate();
    let impostor = members[2].certificate_fingerprint();
    assert_ne!(impostor, vouched);
    assert_eq!(
        presented_fingerprint(&tls_connect(members[2].addr()).await),
        impostor
    );
    assert_eq!(
        vouched_fingerprint(&client, &base, &login.ticket, "pve3").await,
        vouched,
        "nobody vouches for the new certificate"
    );
    let response = client
        .get(api_at(&members[2].url(), "/access/ticket"))
        .send()
        .await
        .expect("the unvouched certificate still chains to the CA");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn fake_pve_added_member_gets_a_listener_a_new_config_and_leaves_again() {
    let (fake, members) = tls_cluster_fake(&["pve1", "pve2"]).await;
    let client = ca_client(&fake);
    let login = login(&client, &fake).await;
    let base = fake.url();
    let before = data_at(&client, &base, "/cluster/config/join", &login.ticket).await;
    assert_eq!(before["totem"]["config_version"], "2");

    let added = fake.add_member("pve3").await;
    assert_eq!(added.name(), "pve3");
    assert_eq!(
        added.addr(),
        SocketAddr::from(([127, 0, 0, 4], fake.addr().port()))
    );
    let served = presented_fingerprint(&tls_connect(added.addr()).await);
    assert_eq!(served, added.certificate_fingerprint());
    let join = data_at(
        &client,
        &members[1].url(),
        "/cluster/config/join",
        &login.ticket,
    )
    .await;
    assert_ne!(join["config_digest"], before["config_digest"]);
    assert_eq!(join["totem"]["config_version"], "3");
    let node = entry(&join["nodelist"], "name", "pve3");
    assert_eq!(node["pve_fp"], served.as_str());
    assert_eq!(number_or_numeric_string(&node["nodeid"]), 3);
    assert_eq!(node["pve_addr"], "127.0.0.4");
    let status = data_at(&client, &added.url(), "/cluster/status", &login.ticket).await;
    assert_eq!(cluster_entry(&status)["version"], 3);
    assert_eq!(cluster_entry(&status)["nodes"], 3);
    assert_eq!(entry(&status, "name", "pve3")["local"], 1);
    assert_eq!(fake.member("pve3").addr(), added.addr());

    fake.remove_member("pve3");
    let join = data_at(&client, &base, "/cluster/config/join", &login.ticket).await;
    assert_eq!(join["nodelist"].as_array().map(Vec::len), Some(2));
    assert_eq!(join["totem"]["config_version"], "4");
    assert_ne!(join["config_digest"], before["config_digest"]);
    let addr = added.addr();
    let refused = wait_until(
        async || TcpStream::connect(addr).await.is_err(),
        Duration::from_secs(5),
    )
    .await;
    assert!(refused, "the listener of a removed member still accepts");
}
