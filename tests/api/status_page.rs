//! The status page at `/`: how it is served, that it stays open when API tokens are
//! configured, and, in headless Chromium driven over WebDriver, that it shows every cluster
//! and follows changes live.
//!
//! The browser tests need `chromium` and `chromedriver` (Debian's `chromium` and
//! `chromium-driver`). Without them they say so and pass, unless `PROXMOXER_REQUIRE_BROWSER=1`
//! (as in CI), when they fail.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use reqwest::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    X_CONTENT_TYPE_OPTIONS,
};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::fake_pve::{DEFAULT_VERSION, FakePve};
use crate::helpers::*;

const REQUIRE_BROWSER: &str = "PROXMOXER_REQUIRE_BROWSER";
const CHROMIUM_NAMES: [&str; 3] = ["chromium", "chromium-browser", "google-chrome"];
const CHROMEDRIVER_NAMES: [&str; 1] = ["chromedriver"];
/// How soon a change on Proxmox must show on an open page: the issue's promise to a wall screen.
const LIVE_UPDATE: Duration = Duration::from_secs(3);
const DRIVER_START: Duration = Duration::from_secs(20);
const BROWSER_POLL: Duration = Duration::from_millis(50);
/// Checks every half second, so a change reaches the page well within [`LIVE_UPDATE`].
const MONITOR_INTERVAL: &str = "500ms";
const STRICT_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

// --- served without a browser -------------------------------------------------------------------

async fn get(app: &TestApp, client: &reqwest::Client, path: &str) -> reqwest::Response {
    client
        .get(format!("{}{path}", app.base_url()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn header<'a>(response: &'a reqwest::Response, name: &reqwest::header::HeaderName) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("{name} on {}", response.url()))
}

/// Asserts the headers every part of the page carries, with its content type.
fn assert_page_headers(response: &reqwest::Response, content_type: &str) {
    assert_eq!(response.status(), StatusCode::OK, "{}", response.url());
    assert_eq!(header(response, &CONTENT_TYPE), content_type);
    assert_eq!(header(response, &CONTENT_SECURITY_POLICY), STRICT_POLICY);
    assert_eq!(header(response, &X_CONTENT_TYPE_OPTIONS), "nosniff");
    assert_eq!(header(response, &CACHE_CONTROL), "no-cache");
    assert!(header(response, &ETAG).starts_with("W/\""));
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_a_strict_policy() {
    let app = TestApp::spawn().await;

    let page = get(&app, &app.client, "/").await;
    assert_page_headers(&page, "text/html; charset=utf-8");
    let etag = header(&page, &ETAG).to_owned();
    let html = page.text().await.expect("the page");
    assert!(html.starts_with("<!doctype html>"), "{html}");
    assert!(html.contains(r#"<script src="/static/status.js" defer></script>"#));
    assert!(html.contains(r#"<link rel="stylesheet" href="/static/status.css">"#));

    let script = get(&app, &app.client, "/static/status.js").await;
    assert_page_headers(&script, "text/javascript; charset=utf-8");
    assert!(
        script
            .text()
            .await
            .expect("script")
            .contains("/api/v1/events")
    );
    let style = get(&app, &app.client, "/static/status.css").await;
    assert_page_headers(&style, "text/css; charset=utf-8");
    assert!(
        style
            .text()
            .await
            .expect("style")
            .contains("prefers-color-scheme: dark")
    );

    let revalidated = app
        .client
        .get(app.base_url())
        .header(IF_NONE_MATCH, &etag)
        .send()
        .await
        .expect("GET / with If-None-Match");
    assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(&revalidated, &ETAG), etag);
    assert!(revalidated.text().await.expect("body").is_empty());

    let missing = get(&app, &app.client, "/static/other.js").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn with_api_tokens_the_page_stays_open_and_the_data_needs_a_token() {
    let (builder, secret) = TestApp::builder().api_token("viewer", "read");
    let app = builder.spawn().await;
    let anonymous = test_client(None);

    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/static/status.js", "text/javascript; charset=utf-8"),
        ("/static/status.css", "text/css; charset=utf-8"),
    ] {
        assert_page_headers(&get(&app, &anonymous, path).await, content_type);
    }
    for path in ["/api/v1/clusters", "/api/v1/events", "/static/other.js"] {
        let refused = get(&app, &anonymous, path).await;
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    // Open to reads only: anything else on the page's path is an API request like any other.
    let post = anonymous.post(app.base_url()).send().await.expect("POST /");
    assert_eq!(post.status(), StatusCode::UNAUTHORIZED);

    let reader = test_client(Some(&secret));
    assert_eq!(
        get(&app, &reader, "/api/v1/clusters").await.status(),
        StatusCode::OK
    );
}

// --- in a browser -------------------------------------------------------------------------------

/// A program on `PATH`.
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// A headless Chromium session through a chromedriver of its own on a loopback port.
struct Browser {
    client: Client,
    _driver: Driver,
    _profile: TempDir,
}

/// A running chromedriver, killed with the browsers it started when dropped.
struct Driver {
    child: Child,
    log: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- chromedriver log ----\n{}---- end of chromedriver log ----",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        // Its process group: chromedriver and the browser processes it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

/// Chromium's console, read through chromedriver's log endpoint.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &reqwest::Url,
        session_id: Option<&str>,
    ) -> Result<reqwest::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &reqwest::Url) -> (reqwest::Method, Option<String>) {
        (
            reqwest::Method::POST,
            Some(json!({ "type": "browser" }).to_string()),
        )
    }
}

/// A Chrome DevTools Protocol command, through chromedriver.
#[derive(Debug)]
struct DevTools {
    method: &'static str,
    params: Value,
}

impl WebDriverCompatibleCommand for DevTools {
    fn endpoint(
        &self,
        base_url: &reqwest::Url,
        session_id: Option<&str>,
    ) -> Result<reqwest::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/goog/cdp/execute",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &reqwest::Url) -> (reqwest::Method, Option<String>) {
        let body = json!({ "cmd": self.method, "params": self.params });
        (reqwest::Method::POST, Some(body.to_string()))
    }
}

impl Browser {
    /// Starts chromedriver and a browser session, or says why the test is skipped and returns
    /// `None`; with [`REQUIRE_BROWSER`] set, a missing browser fails the test instead.
    async fn start(test: &str) -> Option<Self> {
        let chromium = find_program(&CHROMIUM_NAMES);
        let driver = find_program(&CHROMEDRIVER_NAMES);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            let why = format!(
                "no {} on PATH (install Debian's chromium and chromium-driver)",
                if find_program(&CHROMIUM_NAMES).is_none() {
                    "chromium"
                } else {
                    "chromedriver"
                }
            );
            assert!(
                std::env::var(REQUIRE_BROWSER).as_deref() != Ok("1"),
                "{test}: {REQUIRE_BROWSER}=1 but {why}"
            );
            // Straight to stderr: the test harness hides what a passing test prints.
            let _ = writeln!(std::io::stderr(), "{test}: skipped: {why}");
            return None;
        };
        Some(Self::launch(&chromium, &driver).await)
    }

    async fn launch(chromium: &Path, driver: &Path) -> Self {
        let profile = tempfile::Builder::new()
            .prefix("proxmoxer-chromium-")
            .tempdir()
            .expect("a temporary browser profile");
        let log = profile.path().join("chromedriver.log");
        let port = free_loopback_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that the browsers it starts can be ended with it.
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let driver = Driver { child, log };
        let client = Self::connect(port, chromium, profile.path(), &driver.log).await;
        Self {
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    async fn connect(port: u16, chromium: &Path, profile: &Path, driver_log: &Path) -> Client {
        let url = format!("http://127.0.0.1:{port}");
        let status = test_client(None);
        let ready = wait_until(
            async || {
                status
                    .get(format!("{url}/status"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
            DRIVER_START,
        )
        .await;
        assert!(
            ready,
            "chromedriver did not answer on port {port} within {DRIVER_START:?}; its log:\n{}",
            std::fs::read_to_string(driver_log).unwrap_or_default()
        );
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Tests run as root in CI, where Chromium refuses its sandbox.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--no-proxy-server",
                    "--window-size=1280,720",
                    format!("--user-data-dir={}", profile.join("profile").display()),
                ],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object literal");
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "start a Chromium session: {e}; chromedriver's log:\n{}",
                    std::fs::read_to_string(driver_log).unwrap_or_default()
                )
            })
    }

    /// Console messages at `SEVERE` since the last call, as `source: message`.
    async fn console_errors(&self) -> Vec<String> {
        let entries = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .expect("read the browser's console log");
        entries
            .as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["level"] == "SEVERE")
            .map(|entry| format!("{}: {}", entry["source"], entry["message"]))
            .collect()
    }

    /// The page's rows as `(name, status, text)`, top to bottom.
    async fn rows(&self) -> Vec<(String, String, String)> {
        let rows = self
            .client
            .execute(
                "return Array.from(document.querySelectorAll('#clusters tbody tr'))
                    .map(tr => [tr.dataset.name, tr.dataset.status, tr.innerText]);",
                vec![],
            )
            .await
            .expect("read the rows");
        serde_json::from_value(rows).expect("rows are [name, status, text] triples")
    }

    /// Polls the rows until `condition` holds; panics with the last rows after `timeout`.
    async fn wait_for_rows(
        &self,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&[(String, String, String)]) -> bool,
    ) -> Vec<(String, String, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.rows().await;
            if condition(&rows) {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "the page did not show {what} within {timeout:?}; rows: {rows:#?}\nconsole: {:?}",
                self.console_errors().await
            );
            tokio::time::sleep(BROWSER_POLL).await;
        }
    }

    /// Makes the page see the system's colour scheme as `scheme` (`light` or `dark`).
    async fn prefer_color_scheme(&self, scheme: &str) {
        self.client
            .issue_cmd(DevTools {
                method: "Emulation.setEmulatedMedia",
                params: json!({ "features": [{ "name": "prefers-color-scheme", "value": scheme }] }),
            })
            .await
            .expect("emulate a colour scheme");
    }

    /// The page's background colour as the browser computes it.
    async fn background(&self) -> String {
        let colour = self
            .client
            .execute(
                "return getComputedStyle(document.body).backgroundColor;",
                vec![],
            )
            .await
            .expect("read the background colour");
        colour.as_str().unwrap_or_default().to_owned()
    }

    /// Saves a screenshot of the page under `target/` and returns its path.
    async fn screenshot(&self, file: &str) -> PathBuf {
        // The body, not the window: no empty space below the last row.
        let body = self
            .client
            .find(Locator::Css("body"))
            .await
            .expect("the page's body");
        let png = body.screenshot().await.expect("take a screenshot");
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(file);
        std::fs::write(&path, png).expect("write the screenshot");
        println!("screenshot: {}", path.display());
        path
    }

    /// Ends the browser session; the drop then ends chromedriver.
    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// A port nothing listens on right now, for chromedriver, which cannot report one it chose.
fn free_loopback_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

fn row<'a>(
    rows: &'a [(String, String, String)],
    name: &str,
) -> Option<&'a (String, String, String)> {
    rows.iter().find(|(n, _, _)| n == name)
}

fn names(rows: &[(String, String, String)]) -> Vec<&str> {
    rows.iter().map(|(name, _, _)| name.as_str()).collect()
}

/// A standalone node, `lab`.
async fn standalone_fake() -> FakePve {
    let fake = fake_pve().await;
    fake.set_standalone("lab1");
    fake
}

#[tokio::test]
async fn the_page_shows_every_cluster_worst_first_and_follows_changes_live() {
    const TEST: &str = "the_page_shows_every_cluster_worst_first_and_follows_changes_live";
    let Some(browser) = Browser::start(TEST).await else {
        return;
    };
    let app = daemon_checking_every(MONITOR_INTERVAL, "5s").spawn().await;
    let prod = FakePve::start_cluster(&["pve1", "pve2", "pve3"]).await;
    prod.set_auth_failure_delay(SHORT_AUTH_DELAY);
    let lab = standalone_fake().await;
    let backup = fake_pve().await;
    let prod_id = register_fake_id(&app, &prod, "prod").await;
    register_fake(&app, &lab, "lab").await;
    let backup_id = register_fake_id(&app, &backup, "backup").await;
    wait_for_member_probes(&app, &prod_id).await;
    backup.set_down(true);
    wait_for_cluster(&app, &backup_id, "backup unreachable", |c| {
        has_status(c, "unhealthy", "unreachable")
    })
    .await;

    browser
        .client
        .goto(&app.base_url())
        .await
        .expect("open the page");
    let rows = browser
        .wait_for_rows("the three clusters", WAIT, |rows| {
            rows.len() == 3 && row(rows, "prod").is_some_and(|(_, s, _)| s == "healthy")
        })
        .await;
    assert_eq!(
        names(&rows),
        ["backup", "lab", "prod"],
        "worst first, then by name"
    );
    let (_, _, prod_text) = row(&rows, "prod").expect("prod");
    for shown in [
        "healthy",
        "ok",
        "3/3 online",
        DEFAULT_VERSION,
        "pve2",
        "pve3",
    ] {
        assert!(prod_text.contains(shown), "{shown:?} in {prod_text:?}");
    }
    assert!(
        prod_text.contains("pve1 · answering"),
        "the answering member is marked: {prod_text:?}"
    );
    let (_, _, backup_text) = row(&rows, "backup").expect("backup");
    for shown in ["unhealthy", "unreachable"] {
        assert!(backup_text.contains(shown), "{shown:?} in {backup_text:?}");
    }
    let connection = browser
        .client
        .find(Locator::Id("connection"))
        .await
        .expect("the connection indicator");
    assert!(
        wait_until(
            async || connection.text().await.is_ok_and(|t| t == "live"),
            WAIT
        )
        .await,
        "the page follows the event stream"
    );

    // Survives only as long as the document: a reload would drop it.
    browser
        .client
        .execute("window.sameDocument = true;", vec![])
        .await
        .expect("mark the document");
    prod.set_node_online("pve3", false);
    let rows = browser
        .wait_for_rows("prod degraded", LIVE_UPDATE, |rows| {
            row(rows, "prod").is_some_and(|(_, status, text)| {
                status == "degraded" && text.contains("node_offline") && text.contains("2/3 online")
            })
        })
        .await;
    assert_eq!(names(&rows), ["backup", "prod", "lab"]);
    let (_, _, prod_text) = row(&rows, "prod").expect("prod");
    assert!(prod_text.contains("pve3 · offline"), "{prod_text:?}");
    let same_document = browser
        .client
        .execute("return window.sameDocument === true;", vec![])
        .await
        .expect("read the mark");
    assert_eq!(same_document, json!(true), "the page was not reloaded");

    browser.screenshot("status-page.png").await;

    // Light and dark follow the system.
    browser.prefer_color_scheme("light").await;
    assert_eq!(browser.background().await, "rgb(246, 247, 249)");
    browser.prefer_color_scheme("dark").await;
    assert_eq!(browser.background().await, "rgb(13, 17, 23)");
    browser.screenshot("status-page-dark.png").await;
    browser.prefer_color_scheme("light").await;

    // A phone: the rows become cards, and nothing needs scrolling sideways.
    browser
        .client
        .set_window_size(390, 844)
        .await
        .expect("a phone-sized window");
    let overflow = browser
        .client
        .execute(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
            vec![],
        )
        .await
        .expect("measure the page");
    assert!(
        overflow.as_i64().is_some_and(|px| px <= 0),
        "the page is {overflow} px wider than a phone"
    );
    browser.screenshot("status-page-phone.png").await;

    assert_eq!(
        browser.console_errors().await,
        Vec::<String>::new(),
        "no console errors"
    );
    browser.close().await;
}

/// Records the `Last-Event-ID` of every event stream request the page makes from now on.
const RECORD_STREAM_REQUESTS: &str = "
    window.streamRequests = [];
    const original = window.fetch;
    window.fetch = function (path, init) {
        if (String(path).includes('/api/v1/events')) {
            window.streamRequests.push((init && init.headers && init.headers['Last-Event-ID']) || null);
        }
        return original.apply(this, arguments);
    };";

#[tokio::test]
async fn after_a_daemon_restart_the_page_reconnects_with_the_last_event_id() {
    const TEST: &str = "after_a_daemon_restart_the_page_reconnects_with_the_last_event_id";
    let Some(browser) = Browser::start(TEST).await else {
        return;
    };
    // A fixed port, so that the restarted daemon is where the page looks for it.
    let listen = format!("127.0.0.1:{}", free_loopback_port());
    let mut app = daemon_checking_every(MONITOR_INTERVAL, "5s")
        .env("PROXMOXER_LISTEN", listen.clone())
        .spawn()
        .await;
    let prod = FakePve::start_cluster(&["pve1", "pve2", "pve3"]).await;
    prod.set_auth_failure_delay(SHORT_AUTH_DELAY);
    let prod_id = register_fake_id(&app, &prod, "prod").await;
    wait_for_member_probes(&app, &prod_id).await;

    browser
        .client
        .goto(&app.base_url())
        .await
        .expect("open the page");
    browser
        .wait_for_rows("prod healthy", WAIT, |rows| {
            row(rows, "prod").is_some_and(|(_, status, _)| status == "healthy")
        })
        .await;
    browser
        .client
        .execute(RECORD_STREAM_REQUESTS, vec![])
        .await
        .expect("record the stream requests");
    prod.set_node_online("pve3", false);
    browser
        .wait_for_rows("prod degraded", LIVE_UPDATE, |rows| {
            row(rows, "prod").is_some_and(|(_, status, _)| status == "degraded")
        })
        .await;

    app.restart().await;
    assert_eq!(
        app.addr.to_string(),
        listen,
        "the daemon came back on its port"
    );
    let held = wait_until(
        async || {
            browser
                .client
                .execute("return window.streamRequests;", vec![])
                .await
                .is_ok_and(|ids| {
                    ids.as_array()
                        .is_some_and(|ids| ids.iter().any(Value::is_string))
                })
        },
        WAIT,
    )
    .await;
    assert!(held, "the page reconnected with Last-Event-ID");
    let connection = browser
        .client
        .find(Locator::Id("connection"))
        .await
        .expect("the connection indicator");
    assert!(
        wait_until(
            async || connection.text().await.is_ok_and(|t| t == "live"),
            WAIT
        )
        .await,
        "the page follows the restarted daemon's stream"
    );
    prod.set_node_online("pve3", true);
    browser
        .wait_for_rows("prod healthy again", WAIT, |rows| {
            row(rows, "prod").is_some_and(|(_, status, _)| status == "healthy")
        })
        .await;

    // While the daemon was away the browser logged its refused connections; nothing else.
    let errors: Vec<String> = browser
        .console_errors()
        .await
        .into_iter()
        .filter(|line| !line.contains("ERR_CONNECTION_REFUSED"))
        .collect();
    assert_eq!(errors, Vec::<String>::new(), "no console errors");
    browser.close().await;
}

#[tokio::test]
async fn with_api_tokens_the_page_asks_for_one_and_then_follows_the_stream_with_it() {
    const TEST: &str = "with_api_tokens_the_page_asks_for_one_and_then_follows_the_stream_with_it";
    let Some(browser) = Browser::start(TEST).await else {
        return;
    };
    let builder = daemon_checking_every(MONITOR_INTERVAL, "5s");
    let (builder, admin) = builder.api_token("ops", "admin");
    let (builder, viewer) = builder.api_token("wall-screen", "read");
    let app = builder.bearer(&admin).spawn().await;
    let prod = FakePve::start_cluster(&["pve1", "pve2", "pve3"]).await;
    prod.set_auth_failure_delay(SHORT_AUTH_DELAY);
    register_fake(&app, &prod, "prod").await;

    browser
        .client
        .goto(&app.base_url())
        .await
        .expect("open the page");
    let form = browser
        .client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("form#login:not([hidden])"))
        .await
        .expect("the page asks for a token");
    let listed = browser
        .client
        .execute(
            "return [document.getElementById('clusters').hidden, document.getElementById('empty').hidden];",
            vec![],
        )
        .await
        .expect("read what the form shows");
    assert_eq!(listed, json!([true, true]), "nothing but the form");
    browser.screenshot("status-page-token.png").await;
    let input = form
        .find(Locator::Id("token"))
        .await
        .expect("the token field");
    input.send_keys("pmx_not-a-token").await.expect("type");
    form.find(Locator::Css("button[type=submit]"))
        .await
        .expect("the button")
        .click()
        .await
        .expect("submit");
    let refused = browser
        .client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#login-error:not([hidden])"))
        .await
        .expect("a refused token is said so");
    assert!(
        refused
            .text()
            .await
            .expect("the message")
            .contains("refused")
    );

    input.send_keys(&viewer).await.expect("type");
    form.find(Locator::Css("button[type=submit]"))
        .await
        .expect("the button")
        .click()
        .await
        .expect("submit");
    browser
        .wait_for_rows("prod", WAIT, |rows| {
            row(rows, "prod").is_some_and(|(_, status, _)| status == "healthy")
        })
        .await;
    let url = browser.client.current_url().await.expect("the URL");
    assert!(
        !url.as_str().contains(&viewer) && url.query().is_none(),
        "the token stays out of the URL: {url}"
    );

    prod.set_node_online("pve2", false);
    browser
        .wait_for_rows("prod degraded", LIVE_UPDATE, |rows| {
            row(rows, "prod").is_some_and(|(_, status, _)| status == "degraded")
        })
        .await;

    // The refused token's 401s are the browser's own network log lines; nothing else may be.
    let errors: Vec<String> = browser
        .console_errors()
        .await
        .into_iter()
        .filter(|line| !line.contains("status of 401"))
        .collect();
    assert_eq!(errors, Vec::<String>::new(), "no console errors");
    browser.close().await;
}
