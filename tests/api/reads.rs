//! Reads: weak ETags and `304 Not Modified`, blocking queries (`If-None-Match` with `?wait=`),
//! and the list's filters, pages and cursors, with their `400`s.
//!
//! Monitors check every 100 ms. Conditions are awaited with bounded polling; that a held
//! request is parked is read from the daemon's debug log (it logs each time it starts holding
//! one), so nothing sleeps for a fixed time. The fake's request counters prove that checks ran
//! while a tag stood still.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{ETAG, IF_NONE_MATCH};
use serde_json::Value;

use crate::fake_pve::FakePve;
use crate::helpers::{
    STATUS_PATH, TestApp, WAIT, fake_pve, fast_daemon, fetch_cluster, id_of, json_of,
    register_fake, register_fake_id, timestamp, wait_for_cluster_skipping_stale,
    wait_for_member_probes, wait_until,
};

/// What the daemon logs, at debug, each time it starts holding a blocking query.
const PARKED: &str = "holding a blocking query";
/// Per-request bound for requests that may be held: over the longest wait these tests use.
const HELD_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// A held request must come back well within its 30 s wait once what it shows changes. The
/// change itself takes a check (100 ms) to be seen.
const RELEASE_BOUND: Duration = Duration::from_secs(5);

/// `GET /api/v1<path_and_query>`, with `If-None-Match` when given, allowed to be held.
async fn get(
    app: &TestApp,
    path_and_query: &str,
    if_none_match: Option<&str>,
) -> reqwest::Response {
    let mut request = app
        .client
        .get(app.api_url(path_and_query))
        .timeout(HELD_REQUEST_TIMEOUT);
    if let Some(tags) = if_none_match {
        request = request.header(IF_NONE_MATCH, tags);
    }
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"))
}

/// Sends the GET from a task of its own, so that a test can act while it is held; the task
/// answers with when the response came and the response.
fn spawn_get(
    app: &TestApp,
    path_and_query: &str,
    if_none_match: Option<&str>,
) -> tokio::task::JoinHandle<(Instant, reqwest::Response)> {
    let mut request = app
        .client
        .get(app.api_url(path_and_query))
        .timeout(HELD_REQUEST_TIMEOUT);
    if let Some(tags) = if_none_match {
        request = request.header(IF_NONE_MATCH, tags);
    }
    let what = path_and_query.to_owned();
    tokio::spawn(async move {
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {what}: {e}"));
        (Instant::now(), response)
    })
}

/// The response's `ETag`, which must be there and weak: `W/"…"`.
fn etag(response: &reqwest::Response) -> String {
    let tag = response
        .headers()
        .get(ETAG)
        .unwrap_or_else(|| panic!("no ETag on {} {}", response.status(), response.url()))
        .to_str()
        .expect("an ASCII ETag")
        .to_owned();
    assert!(
        tag.starts_with("W/\"") && tag.ends_with('"') && tag.len() > 4,
        "a weak tag: {tag}"
    );
    tag
}

/// `(tag, body)` of a `200`.
async fn tagged(response: reqwest::Response) -> (String, Value) {
    let tag = etag(&response);
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (tag, body)
}

/// Asserts a `304` with no body and the tag `expected`.
async fn assert_not_modified(response: reqwest::Response, expected: &str) {
    assert_eq!(
        response.status(),
        StatusCode::NOT_MODIFIED,
        "{}",
        response.url()
    );
    assert_eq!(etag(&response), expected);
    let body = response.bytes().await.expect("read the 304 body");
    assert!(body.is_empty(), "a 304 has no body: {body:?}");
}

/// How many times the daemon started holding a request whose log line contains `needle`.
fn times_parked(app: &TestApp, needle: &str) -> usize {
    app.logs()
        .lines()
        .filter(|line| line.contains(PARKED) && line.contains(needle))
        .count()
}

/// Waits until the daemon has started holding such a request at least `times` times.
async fn wait_parked(app: &TestApp, needle: &str, times: usize) {
    let held = wait_until(async || times_parked(app, needle) >= times, WAIT).await;
    assert!(
        held,
        "the daemon did not hold a request ({needle}) {times} times within {WAIT:?}"
    );
}

/// The log line of a held list request.
const LIST_PARKED: &str = "route=\"/api/v1/clusters\"";

/// The log line of a held request for one cluster.
fn cluster_parked(id: &str) -> String {
    format!("cluster_id={id}")
}

/// Registers a cluster and waits until what it shows has settled (every member probed once),
/// so that its tag stands still until a test changes something.
async fn settled_cluster(app: &TestApp, fake: &FakePve, name: &str) -> String {
    let id = register_fake_id(app, fake, name).await;
    wait_for_member_probes(app, &id).await;
    id
}

/// The names in a list body, in order.
fn names(list: &Value) -> Vec<String> {
    list["clusters"]
        .as_array()
        .unwrap_or_else(|| panic!("clusters is an array: {list}"))
        .iter()
        .map(|c| {
            c["name"]
                .as_str()
                .unwrap_or_else(|| panic!("a name: {c}"))
                .to_owned()
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

/// The keys of a JSON object.
fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("an object: {value}"))
        .keys()
        .cloned()
        .collect()
}

/// The list at `path_and_query`, which must answer 200.
async fn list(app: &TestApp, path_and_query: &str) -> Value {
    let (status, body) = json_of(get(app, path_and_query, None).await).await;
    assert_eq!(status, StatusCode::OK, "{path_and_query}: {body}");
    body
}

// --- ETags and 304 ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_weak_and_stand_still_while_only_last_checked_at_moves() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let id = settled_cluster(&app, &fake, "steady").await;
    let cluster_path = format!("/clusters/{id}");
    let history_path = format!("/clusters/{id}/history");

    let (cluster_tag, first) = tagged(get(&app, &cluster_path, None).await).await;
    let (list_tag, _) = tagged(get(&app, "/clusters", None).await).await;
    let (history_tag, history) = tagged(get(&app, &history_path, None).await).await;
    assert!(history["transitions"].is_array(), "{history}");
    let checks = fake.requests(STATUS_PATH);

    // `last_checked_at` has a resolution of a second: wait for a check in a later one.
    let later = wait_for_cluster_skipping_stale(&app, &id, "a check a second later", |c| {
        timestamp(c, "last_checked_at") > timestamp(&first, "last_checked_at")
    })
    .await;
    // A later second can come with the very next check.
    assert!(
        fake.requests(STATUS_PATH) > checks,
        "the monitor kept checking"
    );
    assert_eq!(later["status"], first["status"], "{later}");

    let (tag, body) = tagged(get(&app, &cluster_path, None).await).await;
    assert_ne!(body["last_checked_at"], first["last_checked_at"]);
    assert_eq!(
        tag, cluster_tag,
        "last_checked_at alone does not change the tag"
    );
    let (tag, _) = tagged(get(&app, "/clusters", None).await).await;
    assert_eq!(tag, list_tag);
    let (tag, _) = tagged(get(&app, &history_path, None).await).await;
    assert_eq!(tag, history_tag);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_none_match_with_the_current_tag_answers_304_without_a_body() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let id = settled_cluster(&app, &fake, "cached").await;
    let cluster_path = format!("/clusters/{id}");
    let history_path = format!("/clusters/{id}/history");

    for path in [
        cluster_path.as_str(),
        history_path.as_str(),
        "/clusters",
        "/clusters?status=healthy",
        "/clusters?limit=1",
    ] {
        let (tag, _) = tagged(get(&app, path, None).await).await;
        assert_not_modified(get(&app, path, Some(&tag)).await, &tag).await;
        assert_not_modified(get(&app, path, Some("*")).await, &tag).await;
        // One of a list, among tags this server never issued.
        let among = format!("W/\"0000000000000000\", {tag}, \"not-ours\"");
        assert_not_modified(get(&app, path, Some(&among)).await, &tag).await;
        // Weak comparison: the strong form of the same opaque tag matches too.
        let strong = tag.trim_start_matches("W/").to_owned();
        assert_not_modified(get(&app, path, Some(&strong)).await, &tag).await;
        // Another tag gets the representation.
        let other = get(&app, path, Some("W/\"0000000000000000\"")).await;
        let (again, _) = tagged(other).await;
        assert_eq!(again, tag, "{path}");
    }

    // `*` matches a representation that exists, not one that does not.
    let unknown = uuid::Uuid::new_v4();
    let missing = get(&app, &format!("/clusters/{unknown}"), Some("*")).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

// --- blocking queries ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_query_is_released_by_a_status_change() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let id = settled_cluster(&app, &fake, "watched").await;
    let (cluster_tag, _) = tagged(get(&app, &format!("/clusters/{id}"), None).await).await;
    let (list_tag, _) = tagged(get(&app, "/clusters", None).await).await;

    let cluster_watch = spawn_get(
        &app,
        &format!("/clusters/{id}?wait=30s"),
        Some(&cluster_tag),
    );
    let list_watch = spawn_get(&app, "/clusters?wait=30s", Some(&list_tag));
    wait_parked(&app, &cluster_parked(&id), 1).await;
    wait_parked(&app, LIST_PARKED, 1).await;
    assert!(!cluster_watch.is_finished() && !list_watch.is_finished());

    let changed_at = Instant::now();
    fake.set_node_online("pve3", false);
    let (answered_at, response) = cluster_watch.await.expect("the cluster watch");
    let (tag, cluster) = tagged(response).await;
    assert_eq!(cluster["status"], "degraded", "{cluster}");
    assert_ne!(tag, cluster_tag);
    let took = answered_at.duration_since(changed_at);
    assert!(took < RELEASE_BOUND, "released {took:?} after the change");

    let (answered_at, response) = list_watch.await.expect("the list watch");
    let (tag, listed) = tagged(response).await;
    assert_eq!(listed["clusters"][0]["status"], "degraded", "{listed}");
    assert_ne!(tag, list_tag);
    let took = answered_at.duration_since(changed_at);
    assert!(took < RELEASE_BOUND, "released {took:?} after the change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_star_waits_for_a_change_from_what_it_first_saw() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let id = settled_cluster(&app, &fake, "starred").await;

    let watch = spawn_get(&app, &format!("/clusters/{id}?wait=30s"), Some("*"));
    wait_parked(&app, &cluster_parked(&id), 1).await;
    assert!(!watch.is_finished());
    fake.set_node_online("pve3", false);
    let (_, response) = watch.await.expect("the watch");
    let (_, cluster) = tagged(response).await;
    assert_eq!(cluster["status"], "degraded", "{cluster}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_filtered_list_waits_through_changes_it_does_not_show() {
    let watched_fake = fake_pve().await;
    let other_fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let id = settled_cluster(&app, &watched_fake, "will-degrade").await;
    let path = "/clusters?status=degraded&wait=30s";
    let (tag, empty) = tagged(get(&app, "/clusters?status=degraded", None).await).await;
    assert_eq!(empty["total"], 0, "{empty}");

    let watch = spawn_get(&app, path, Some(&tag));
    wait_parked(&app, LIST_PARKED, 1).await;
    // The list changes, the degraded clusters do not: the request wakes and is held again.
    let other = settled_cluster(&app, &other_fake, "stays-healthy").await;
    wait_parked(&app, LIST_PARKED, 2).await;
    assert!(
        !watch.is_finished(),
        "answered on a change it does not show"
    );

    let changed_at = Instant::now();
    watched_fake.set_node_online("pve3", false);
    let (answered_at, response) = watch.await.expect("the list watch");
    let (new_tag, listed) = tagged(response).await;
    assert_ne!(new_tag, tag);
    assert_eq!(names(&listed), ["will-degrade"], "{listed}");
    assert_eq!(listed["total"], 1, "{listed}");
    assert_eq!(listed["clusters"][0]["id"], id.as_str());
    let took = answered_at.duration_since(changed_at);
    assert!(took < RELEASE_BOUND, "released {took:?} after the change");
    assert_eq!(fetch_cluster(&app, &other).await["status"], "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_query_answers_304_when_its_wait_ends() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let id = settled_cluster(&app, &fake, "quiet").await;
    let (tag, _) = tagged(get(&app, &format!("/clusters/{id}"), None).await).await;
    let (list_tag, _) = tagged(get(&app, "/clusters", None).await).await;
    let checks = fake.requests(STATUS_PATH);

    let cluster_path = format!("/clusters/{id}?wait=1s");
    let started = Instant::now();
    let (cluster, listed) = tokio::join!(
        get(&app, &cluster_path, Some(&tag)),
        get(&app, "/clusters?wait=1s", Some(&list_tag)),
    );
    let took = started.elapsed();
    assert_not_modified(cluster, &tag).await;
    assert_not_modified(listed, &list_tag).await;
    assert!(
        took >= Duration::from_millis(900),
        "held for the wait: {took:?}"
    );
    assert!(took < RELEASE_BOUND, "not much longer: {took:?}");
    assert!(
        fake.requests(STATUS_PATH) > checks,
        "checks ran while the requests were held"
    );

    // Without If-None-Match, `wait` changes nothing: the answer is immediate.
    let started = Instant::now();
    let (again, _) = tagged(get(&app, &format!("/clusters/{id}?wait=5m"), None).await).await;
    assert_eq!(again, tag);
    assert!(started.elapsed() < RELEASE_BOUND);
    // A tag that is not current is answered at once too, even with the longest wait.
    let stale = get(&app, "/clusters?wait=5m", Some("W/\"0000000000000000\"")).await;
    let (again, _) = tagged(stale).await;
    assert_eq!(again, list_tag);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_queries_answer_304_at_once_when_the_daemon_stops() {
    let fake = fake_pve().await;
    let mut app = fast_daemon().spawn().await;
    let id = settled_cluster(&app, &fake, "stopping").await;
    let (tag, _) = tagged(get(&app, &format!("/clusters/{id}"), None).await).await;
    let (list_tag, _) = tagged(get(&app, "/clusters", None).await).await;
    let cluster_watch = spawn_get(&app, &format!("/clusters/{id}?wait=5m"), Some(&tag));
    let list_watch = spawn_get(&app, "/clusters?wait=5m", Some(&list_tag));
    wait_parked(&app, &cluster_parked(&id), 1).await;
    wait_parked(&app, LIST_PARKED, 1).await;

    let stopped_at = Instant::now();
    let status = app.terminate().await;
    assert!(status.success(), "exit status {status}");
    for watch in [cluster_watch, list_watch] {
        let (answered_at, response) = watch.await.expect("the watch");
        let expected = if response.url().path().ends_with("/clusters") {
            &list_tag
        } else {
            &tag
        };
        assert_not_modified(response, expected).await;
        let took = answered_at.duration_since(stopped_at);
        assert!(took < RELEASE_BOUND, "answered {took:?} after SIGTERM");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_query_on_a_deleted_cluster_answers_404() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let id = settled_cluster(&app, &fake, "short-lived").await;
    let (tag, _) = tagged(get(&app, &format!("/clusters/{id}"), None).await).await;
    let watch = spawn_get(&app, &format!("/clusters/{id}?wait=30s"), Some(&tag));
    wait_parked(&app, &cluster_parked(&id), 1).await;

    let deleted_at = Instant::now();
    assert_eq!(
        app.delete_cluster(&id).await.status(),
        StatusCode::NO_CONTENT
    );
    let (answered_at, response) = watch.await.expect("the watch");
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["code"], "NotFound", "{body}");
    let took = answered_at.duration_since(deleted_at);
    assert!(took < RELEASE_BOUND, "answered {took:?} after the deletion");
}

// --- filters and pages --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_filters_by_status_and_name_prefix() {
    let healthy = fake_pve().await;
    let degraded = fake_pve().await;
    let app = fast_daemon().spawn().await;
    for (fake, name) in [
        (&healthy, "web-1"),
        (&healthy, "db-1"),
        (&healthy, "web-2"),
        (&degraded, "web-3"),
        (&degraded, "db-2"),
    ] {
        register_fake(&app, fake, name).await;
    }
    degraded.set_node_online("pve3", false);
    let shown = |status: &'static str| {
        move |list: &Value| {
            list["clusters"].as_array().is_some_and(|clusters| {
                clusters.len() == 2 && clusters.iter().all(|c| c["status"] == status)
            })
        }
    };
    let mut last = Value::Null;
    let settled = wait_until(
        async || {
            last = list(&app, "/clusters?status=degraded").await;
            shown("degraded")(&last)
        },
        WAIT,
    )
    .await;
    assert!(
        settled,
        "both clusters of the degraded fake show degraded: {last}"
    );
    assert_eq!(names(&last), ["db-2", "web-3"], "newest first");
    assert_eq!(last["total"], 2);
    assert_eq!(keys(&last), set(&["clusters", "total"]));

    let cases: [(&str, &[&str]); 8] = [
        ("/clusters?status=degraded,unhealthy", &["db-2", "web-3"]),
        ("/clusters?status=unhealthy", &[]),
        ("/clusters?status=unknown", &[]),
        ("/clusters?name=web-", &["web-3", "web-2", "web-1"]),
        ("/clusters?name=web-&status=degraded", &["web-3"]),
        // Case-sensitive prefixes.
        ("/clusters?name=WEB", &[]),
        ("/clusters?name=db-1", &["db-1"]),
        (
            "/clusters?status=healthy,degraded,unhealthy,unknown",
            &["db-2", "web-3", "web-2", "db-1", "web-1"],
        ),
    ];
    for (path, expected) in cases {
        let body = list(&app, path).await;
        assert_eq!(names(&body), expected, "{path}: {body}");
        assert_eq!(body["total"], expected.len(), "{path}: {body}");
        assert_eq!(keys(&body), set(&["clusters", "total"]));
    }
    // The healthy ones may flap to unknown on a loaded machine; filter on what they show.
    let healthy_now = list(&app, "/clusters?status=healthy").await;
    for cluster in healthy_now["clusters"].as_array().expect("an array") {
        assert_eq!(cluster["status"], "healthy", "{cluster}");
    }
}

/// Walks every page of `path` (which has a `limit`), asserting each page's `total`; returns
/// the names in order.
async fn walk_pages(app: &TestApp, path: &str, total: usize, per_page: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..=total {
        let page_path = match &cursor {
            Some(cursor) => format!("{path}&cursor={cursor}"),
            None => path.to_owned(),
        };
        let page = list(app, &page_path).await;
        assert_eq!(page["total"], total, "{page_path}: {page}");
        assert_eq!(
            keys(&page),
            ["clusters", "next_cursor", "total"]
                .map(String::from)
                .into()
        );
        let names = names(&page);
        assert!(names.len() <= per_page, "{page}");
        seen.extend(names);
        match &page["next_cursor"] {
            Value::Null => return seen,
            Value::String(next) => cursor = Some(next.clone()),
            other => panic!("next_cursor is a string or null: {other}"),
        }
    }
    panic!("more pages than clusters: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_walk_the_list_newest_first() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let mut registered = Vec::new();
    for n in 1..=5 {
        let name = format!("{}-{n}", if n % 2 == 0 { "even" } else { "odd" });
        register_fake(&app, &fake, &name).await;
        registered.insert(0, name);
    }
    assert_eq!(
        walk_pages(&app, "/clusters?limit=2", 5, 2).await,
        registered
    );
    assert_eq!(
        walk_pages(&app, "/clusters?limit=1000", 5, 1000).await,
        registered
    );
    assert_eq!(
        walk_pages(&app, "/clusters?limit=1&name=odd-", 3, 1).await,
        ["odd-5", "odd-3", "odd-1"]
    );
    let empty = list(&app, "/clusters?limit=3&name=none").await;
    assert_eq!(empty["clusters"], Value::Array(Vec::new()));
    assert_eq!(empty["total"], 0);
    assert_eq!(empty["next_cursor"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_stays_valid_when_clusters_come_and_go_between_pages() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let mut ids = Vec::new();
    for n in 1..=5 {
        ids.push(register_fake_id(&app, &fake, &format!("c{n}")).await);
    }

    let first = list(&app, "/clusters?limit=2").await;
    assert_eq!(names(&first), ["c5", "c4"]);
    assert_eq!(first["total"], 5);
    let cursor = first["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("a next page: {first}"))
        .to_owned();

    // The cursor's own cluster and one not yet seen go away; a newer one arrives.
    assert_eq!(
        app.delete_cluster(&ids[3]).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.delete_cluster(&ids[1]).await.status(),
        StatusCode::NO_CONTENT
    );
    register_fake(&app, &fake, "c6").await;

    let second = list(&app, &format!("/clusters?limit=2&cursor={cursor}")).await;
    assert_eq!(names(&second), ["c3", "c1"], "{second}");
    assert_eq!(second["total"], 4, "c1, c3, c5 and c6: {second}");
    assert_eq!(second["next_cursor"], Value::Null, "{second}");

    // Every cluster that existed throughout was seen exactly once.
    let seen: Vec<String> = names(&first).into_iter().chain(names(&second)).collect();
    for throughout in ["c1", "c3", "c5"] {
        assert_eq!(
            seen.iter().filter(|name| *name == throughout).count(),
            1,
            "{throughout} in {seen:?}"
        );
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no repeats: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_parameters_the_list_has_the_seed_shape() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let empty = get(&app, "/clusters", None).await;
    etag(&empty);
    assert_eq!(
        empty.text().await.expect("the body"),
        r#"{"clusters":[],"total":0}"#
    );
    let id = id_of(&register_fake(&app, &fake, "seed").await);
    let body = list(&app, "/clusters").await;
    assert_eq!(keys(&body), set(&["clusters", "total"]));
    assert_eq!(body["total"], 1);
    let one = fetch_cluster(&app, &id).await;
    assert_eq!(keys(&body["clusters"][0]), keys(&one));
}

// --- bad parameters -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_400_naming_the_parameter() {
    let fake = fake_pve().await;
    let app = fast_daemon().spawn().await;
    let id = register_fake_id(&app, &fake, "strict").await;
    let page = list(&app, "/clusters?limit=1").await;
    let cursor = page["next_cursor"].as_str().map(str::to_owned);
    assert_eq!(cursor, None, "one cluster: one page");
    let page = list(
        &app,
        "/clusters?limit=1&status=healthy,degraded,unhealthy,unknown",
    )
    .await;
    assert_eq!(page["total"], 1);
    register_fake(&app, &fake, "second").await;
    let page = list(&app, "/clusters?limit=1").await;
    let cursor = page["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("a next page: {page}"))
        .to_owned();

    let one = format!("/clusters/{id}");
    let history = format!("/clusters/{id}/history");
    let cases: Vec<(String, &str)> = vec![
        ("/clusters?staus=healthy".into(), "staus"),
        ("/clusters?status=".into(), "status"),
        ("/clusters?status".into(), "status"),
        ("/clusters?name=".into(), "name"),
        ("/clusters?status=Healthy".into(), "status"),
        ("/clusters?status=bogus".into(), "status"),
        ("/clusters?status=healthy,".into(), "status"),
        ("/clusters?status=healthy&status=degraded".into(), "status"),
        ("/clusters?limit=0".into(), "limit"),
        ("/clusters?limit=1001".into(), "limit"),
        ("/clusters?limit=abc".into(), "limit"),
        ("/clusters?limit=-1".into(), "limit"),
        ("/clusters?limit=".into(), "limit"),
        ("/clusters?limit=2&cursor=nonsense".into(), "cursor"),
        (
            format!("/clusters?limit=2&cursor={}", cursor.to_uppercase()),
            "cursor",
        ),
        (
            format!("/clusters?limit=2&cursor={}", &cursor[2..]),
            "cursor",
        ),
        (format!("/clusters?cursor={cursor}"), "cursor"),
        ("/clusters?cursor=".into(), "cursor"),
        ("/clusters?wait=30".into(), "wait"),
        ("/clusters?wait=0".into(), "wait"),
        ("/clusters?wait=6m".into(), "wait"),
        ("/clusters?wait=5m1ms".into(), "wait"),
        ("/clusters?wait=soon".into(), "wait"),
        ("/clusters?wait=".into(), "wait"),
        (format!("{one}?limit=5"), "limit"),
        (format!("{one}?status=healthy"), "status"),
        (format!("{one}?wait=30"), "wait"),
        (format!("{one}?wait=6m"), "wait"),
        (format!("{history}?wait=1s"), "wait"),
        (format!("{history}?limit=1"), "limit"),
    ];
    for (path, field) in &cases {
        // With a tag, as a watcher would send them: a bad parameter is never held.
        for if_none_match in [None, Some("*")] {
            let (status, body) = json_of(get(&app, path, if_none_match).await).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
            assert_eq!(body["code"], "BadRequest", "{path}: {body}");
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{path}: {body}"
            );
            assert_eq!(body["details"]["field"], *field, "{path}: {body}");
            assert!(
                body["details"]["reason"]
                    .as_str()
                    .is_some_and(|r| !r.is_empty()),
                "{path}: {body}"
            );
        }
    }

    // The boundaries themselves are fine.
    for path in [
        "/clusters?limit=1".to_owned(),
        "/clusters?limit=1000".to_owned(),
        "/clusters?wait=5m".to_owned(),
        "/clusters?wait=0s".to_owned(),
        format!("/clusters?limit=1&cursor={cursor}"),
        format!("{one}?wait=300s"),
    ] {
        let response = get(&app, &path, None).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}
