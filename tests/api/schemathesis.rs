//! The OpenAPI document against the daemon, by a schema-driven fuzzer: schemathesis generates
//! requests from `GET /api/v1/openapi.json` (valid and invalid ones), sends them to a daemon with
//! clusters registered at the fake Proxmox, and checks every answer against the document. Any
//! disagreement fails the test: a valid request refused, an invalid one accepted, an undocumented
//! status, a body or event that violates its schema, a 5xx other than 502.
//!
//! Ignored by default: it needs the schemathesis CLI. `.ci/run` installs it and runs
//! `PROXMOXER_SCHEMATHESIS=/path/to/schemathesis cargo test --test api schemathesis -- --ignored`.
//!
//! Generated registrations and changes name random endpoints. The daemon gets a proxy
//! (`HTTPS_PROXY`, honoured by its HTTP client) that is a loopback listener closing every
//! connection, so none of those attempts leaves the machine or waits for a timeout: they end
//! in a quick 502. Only the fake, at 127.0.0.1, is reached directly (`NO_PROXY`).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::fake_pve::FakePve;
use crate::helpers::{TestApp, id_of, json_of, tls_fake};

/// The environment variable naming the schemathesis executable.
const SCHEMATHESIS: &str = "PROXMOXER_SCHEMATHESIS";
/// Examples per operation and phase: enough to cover every rule, small enough for a few minutes
/// on two cores.
const MAX_EXAMPLES: &str = "100";
/// How long the run may take before it is stopped and the test fails. schemathesis's own
/// `--max-time` is no bound: fuzzing repeats until it is spent.
const RUN_DEADLINE: Duration = Duration::from_secs(10 * 60);
/// The Proxmox user and API token the fuzzed cluster is registered with. A token cluster takes
/// every combination of fields a PATCH body may have, so the document's rules for PATCH hold
/// for it without exceptions (on a password cluster a lone `token_id` is refused).
const TOKEN_USER: &str = "monitor@pve";
const TOKEN_NAME: &str = "fuzzed";
const TOKEN_SECRET: &str = "5a0b7c1e-2222-3333-4444-555566667777";

/// A loopback listener that closes every connection at once: the daemon's outbound proxy, so
/// that requests for generated endpoints fail fast and stay on this machine.
struct ClosingProxy {
    url: String,
    connections: Arc<AtomicU64>,
}

impl ClosingProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the closing proxy on loopback");
        let url = format!(
            "http://{}",
            listener.local_addr().expect("the proxy's address")
        );
        let connections = Arc::new(AtomicU64::new(0));
        let counter = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                drop(stream);
            }
        });
        Self { url, connections }
    }
}

/// A bearer secret in the daemon's format: `pmx_` and 43 base64url characters.
fn api_token_secret() -> String {
    let random = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    format!("pmx_{}", &random[..43])
}

/// Writes `ci:admin:<sha256>` as the daemon's API tokens file (mode 0600).
fn write_tokens_file(path: &Path, secret: &str) {
    let hash = hex::encode(Sha256::digest(secret.as_bytes()));
    let mut file = std::fs::File::create(path).expect("create the API tokens file");
    writeln!(file, "# the schemathesis run\nci:admin:{hash}").expect("write the API tokens file");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("make the API tokens file 0600");
}

/// Registers a token cluster at `fake` and returns its id.
async fn register(app: &TestApp, auth: &Auth, fake: &FakePve, name: &str) -> String {
    let body = json!({
        "name": name,
        "api_endpoint": fake.url(),
        "username": TOKEN_USER,
        "token_id": TOKEN_NAME,
        "token_secret": TOKEN_SECRET,
    });
    let request = app.client.post(app.api_url("/clusters")).json(&body);
    let (status, cluster) = json_of(auth.apply(request).send().await.expect("register")).await;
    assert_eq!(status, StatusCode::CREATED, "{cluster}");
    id_of(&cluster)
}

/// Whether the daemon enforces API tokens, and the header to send if it does.
struct Auth {
    bearer: Option<String>,
}

impl Auth {
    fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.bearer {
            Some(secret) => request.bearer_auth(secret),
            None => request,
        }
    }
}

/// Removes from `doc` what this build of the daemon does not have yet, saying what and why.
/// Everything the document declares and the daemon serves is fuzzed; nothing it serves is
/// removed.
async fn served_part_of(mut doc: Value, app: &TestApp, auth: &Auth, id: &str) -> Value {
    let mut removed = Vec::new();
    if auth.bearer.is_none() {
        strip_security(&mut doc);
        removed.push("the bearer requirement (this daemon serves without API tokens)");
    }
    let patch = app
        .client
        .patch(app.api_url(&format!("/clusters/{id}")))
        .json(&json!({}));
    let patch = auth.apply(patch).send().await.expect("PATCH probe");
    if patch.status() == StatusCode::METHOD_NOT_ALLOWED {
        remove_operation(&mut doc, "/api/v1/clusters/{id}", "patch");
        removed.push("PATCH /api/v1/clusters/{id} (not served by this build)");
    }
    let check = app
        .client
        .post(app.api_url(&format!("/clusters/{id}/check")));
    let (status, body) = json_of(auth.apply(check).send().await.expect("check probe")).await;
    if status == StatusCode::NOT_FOUND && body["message"] == "Route not found" {
        remove_operation(&mut doc, "/api/v1/clusters/{id}/check", "post");
        removed.push("POST /api/v1/clusters/{id}/check (not served by this build)");
    }
    for what in &removed {
        eprintln!("schemathesis: left out of this run: {what}");
    }
    doc
}

fn strip_security(doc: &mut Value) {
    if let Some(paths) = doc["paths"].as_object_mut() {
        for item in paths.values_mut() {
            for operation in item
                .as_object_mut()
                .into_iter()
                .flat_map(|i| i.values_mut())
            {
                if let Some(operation) = operation.as_object_mut() {
                    operation.remove("security");
                    if let Some(responses) = operation
                        .get_mut("responses")
                        .and_then(Value::as_object_mut)
                    {
                        // Without tokens the daemon never answers 401/403 on its own account;
                        // a registration's 401/403 from Proxmox stay.
                        for status in ["401", "403"] {
                            let about_tokens = responses.get(status).is_some_and(|r| {
                                r["description"].as_str().is_some_and(|d| {
                                    d.starts_with("Authentication required")
                                        || d.starts_with("Token lacks")
                                })
                            });
                            if about_tokens {
                                responses.remove(status);
                            }
                        }
                    }
                }
            }
        }
    }
    if let Some(components) = doc["components"].as_object_mut() {
        components.remove("securitySchemes");
    }
}

fn remove_operation(doc: &mut Value, path: &str, method: &str) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    let now_empty = paths
        .get_mut(path)
        .and_then(Value::as_object_mut)
        .is_some_and(|item| {
            item.remove(method);
            item.is_empty()
        });
    if now_empty {
        paths.remove(path);
    }
}

/// schemathesis's configuration: the registered clusters as the `{id}` of every by-id operation
/// (DELETE gets one of its own, so the others keep theirs), a tag that never matches (so no
/// generated `wait` holds a request for minutes), 502 ("Failed to connect to Proxmox", the
/// answer for every generated endpoint) as the documented gateway error it is, and event streams
/// read for a second (they never end; schemathesis reads one until its request timeout).
fn config_toml(id: &str, deletable_id: &str) -> String {
    format!(
        r#"[checks.not_a_server_error]
expected-statuses = ["1xx", "2xx", "3xx", "4xx", "502"]

[parameters]
"path.id" = "{id}"
"header.If-None-Match" = 'W/"0"'

[[operations]]
include-method = "DELETE"
parameters = {{ "path.id" = "{deletable_id}" }}

[[operations]]
include-path = "/api/v1/events"
request-timeout = 1
max-stream-events = 5
"#
    )
}

/// A schemathesis hook. An invalid query can name a parameter with a value Python's requests
/// leaves out of the URL (null, `[]`, `{}`): the daemon then gets a valid query, answers 200,
/// and schemathesis, judging what it generated rather than what it sent, reports an invalid
/// request accepted. The hook sends such a parameter with an empty value instead, so that what
/// is judged is what is sent.
const HOOKS: &str = r#"import schemathesis


def _sent(value):
    """Whether requests puts anything of `value` in the query string."""
    if value is None:
        return False
    if isinstance(value, dict):
        return len(value) > 0
    if isinstance(value, (list, tuple)):
        return any(item is not None for item in value)
    return True


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.query:
        case.query = {key: value if _sent(value) else "" for key, value in case.query.items()}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the schemathesis CLI: set PROXMOXER_SCHEMATHESIS (see .ci/run)"]
async fn schemathesis_finds_the_daemon_and_its_openapi_document_in_agreement() {
    let schemathesis = std::env::var_os(SCHEMATHESIS)
        .unwrap_or_else(|| panic!("set {SCHEMATHESIS} to the schemathesis executable"));
    // Answers wrong credentials after a short delay, not pveproxy's 3 s: PATCHes with
    // generated credentials are refused quickly.
    let fake = tls_fake().await;
    fake.add_token(TOKEN_USER, TOKEN_NAME, TOKEN_SECRET, true);
    let proxy = ClosingProxy::start().await;
    let secret = api_token_secret();
    let builder = TestApp::builder();
    let dir = builder.data_dir().to_owned();
    let ca_file = dir.join("pve-root-ca.pem");
    std::fs::write(&ca_file, fake.ca_pem()).expect("write the CA file");
    let tokens_file = dir.join("api-tokens");
    write_tokens_file(&tokens_file, &secret);
    let mut builder = builder
        .env("PROXMOXER_PROXMOX_TIMEOUT", "2s")
        .env("PROXMOXER_TLS_CA_FILE", ca_file.display().to_string())
        .env(
            "PROXMOXER_API_TOKENS_FILE",
            tokens_file.display().to_string(),
        )
        .env("RUST_LOG", "info");
    for (key, value) in [
        ("HTTPS_PROXY", proxy.url.as_str()),
        ("HTTP_PROXY", &proxy.url),
        ("ALL_PROXY", &proxy.url),
        ("NO_PROXY", "127.0.0.1"),
    ] {
        builder = builder
            .env(key, value)
            .env(&key.to_ascii_lowercase(), value);
    }
    let app = builder.spawn().await;

    let unauthenticated = app
        .client
        .get(app.api_url("/clusters"))
        .send()
        .await
        .expect("GET /api/v1/clusters without a token");
    let auth = Auth {
        bearer: (unauthenticated.status() == StatusCode::UNAUTHORIZED).then(|| secret.clone()),
    };
    let id = register(&app, &auth, &fake, "fuzzed").await;
    let deletable_id = register(&app, &auth, &fake, "deleted-by-the-run").await;

    let doc = auth
        .apply(app.client.get(app.api_url("/openapi.json")))
        .send()
        .await
        .expect("GET the OpenAPI document");
    let (status, doc) = json_of(doc).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    let doc = served_part_of(doc, &app, &auth, &id).await;
    let doc_file = dir.join("openapi.json");
    std::fs::write(&doc_file, doc.to_string()).expect("write the document");
    let config_file = dir.join("schemathesis.toml");
    std::fs::write(&config_file, config_toml(&id, &deletable_id)).expect("write the config");

    let hooks_file = dir.join("schemathesis_hooks.py");
    std::fs::write(&hooks_file, HOOKS).expect("write the hooks");

    let mut command = Command::new(&schemathesis);
    command
        .arg("--config-file")
        .arg(&config_file)
        .arg("--no-color")
        .arg("run")
        .arg(&doc_file)
        .args(["--url", &app.base_url()])
        .args(["--checks", "all"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--request-timeout", "10"])
        // One worker: CPython 3.11 can fail parsing in two threads at once ("AST constructor
        // recursion depth mismatch"), and the daemon and the fake need the other core.
        .args(["--workers", "1"])
        .current_dir(&dir)
        .env("SCHEMATHESIS_HOOKS", &hooks_file)
        .stdin(Stdio::null());
    if let Some(secret) = &auth.bearer {
        command.args(["--header", &format!("Authorization: Bearer {secret}")]);
    }
    let log_file = dir.join("schemathesis.log");
    let log = std::fs::File::create(&log_file).expect("create the schemathesis log");
    let err = log.try_clone().expect("share the schemathesis log");
    command.stdout(log).stderr(err);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", schemathesis.to_string_lossy()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for schemathesis") {
            break Some(status);
        }
        if started.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let report = std::fs::read_to_string(&log_file).unwrap_or_default();
    eprintln!("{report}");
    eprintln!(
        "schemathesis: {} outbound connection attempts for generated endpoints went to the \
         closing proxy",
        proxy.connections.load(Ordering::Relaxed)
    );
    let status = status.unwrap_or_else(|| {
        panic!("schemathesis did not finish within {RUN_DEADLINE:?}:\n{report}")
    });
    assert!(
        status.success(),
        "schemathesis found disagreements ({status}):\n{report}\n--- daemon log ---\n{}",
        app.logs()
    );
    // The run reached the registered cluster, not only unknown ids.
    let metrics = auth
        .apply(app.client.get(format!("{}/metrics", app.base_url())))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the metrics text");
    let reads_of_the_cluster = r#"method="GET",route="/api/v1/clusters/{id}",status="200""#;
    assert!(
        metrics.contains(reads_of_the_cluster),
        "no by-id read found the registered cluster:\n{metrics}"
    );
}
