//! A typed client for the few Proxmox VE API calls this daemon needs.
//!
//! Real pveproxy differs from a naive guess: error text lives in the HTTP reason phrase and
//! bodies may be empty or not JSON, booleans are the integers 0/1, a standalone node has no
//! `cluster` entry, and idle keep-alive connections are closed after 5 s.

use std::time::{Duration, Instant};

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::domain::{Credentials, Endpoint, ProxmoxUser, Secret, StatusReason};
use crate::tls::{Fingerprint, PresentedCertificate, TrustAnchors};

/// A cluster's members: discovery, trust and pin learning.
pub mod members;
/// The thread the monitors run on, apart from the API's.
pub mod runtime;
mod wire;

pub use members::{DiscoveredMember, Discovery};
pub use runtime::{ProxmoxRuntime, ProxmoxThread};
pub use wire::{ClusterHealth, StatusNode, StatusReport};
use wire::{JoinInfoData, LoginData, NodeEntry, StatusEntry, VersionData};

/// pveproxy drops keep-alive connections idle for 5 s; reusing one races that close.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Proxmox answers are small; anything bigger is not the API we expect.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Why a call to Proxmox failed, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxmoxError {
    #[error("authentication failed")]
    AuthenticationFailed,
    #[error("two-factor authentication is enabled for this user")]
    TwoFactorRequired,
    #[error("Proxmox rejected the session: {0}")]
    SessionRejected(String),
    #[error("permission denied: {0}")]
    Forbidden(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("TLS error: {0}")]
    Tls(String),
    #[error(
        "certificate not trusted: the server presented SHA-256 fingerprint {presented} ({detail})"
    )]
    CertificateNotTrusted {
        presented: Fingerprint,
        detail: String,
    },
    #[error(
        "certificate changed: the server presented SHA-256 fingerprint {presented}, but {pinned} is pinned"
    )]
    CertificateMismatch {
        presented: Fingerprint,
        pinned: Fingerprint,
    },
    #[error(
        "Proxmox answered with a redirect ({status}) to {location}; redirects are not followed"
    )]
    Redirect { status: u16, location: String },
    #[error("Proxmox answered {status} {reason}")]
    Http { status: u16, reason: String },
    #[error("unexpected answer from Proxmox: {0}")]
    BadResponse(String),
}

impl ProxmoxError {
    /// The status reason a monitor reports for this failure.
    pub fn status_reason(&self) -> StatusReason {
        match self {
            Self::AuthenticationFailed | Self::TwoFactorRequired | Self::SessionRejected(_) => {
                StatusReason::AuthFailed
            }
            Self::Forbidden(_) => StatusReason::Forbidden,
            Self::Unreachable(_) => StatusReason::Unreachable,
            Self::Timeout(_) => StatusReason::Timeout,
            Self::Tls(_)
            | Self::CertificateNotTrusted { .. }
            | Self::CertificateMismatch { .. } => StatusReason::TlsError,
            Self::Redirect { .. } | Self::BadResponse(_) => StatusReason::BadResponse,
            // A 5xx, or pveproxy's own 59x, means Proxmox cannot serve us right now.
            Self::Http { status, .. } if *status >= 500 => StatusReason::Unreachable,
            Self::Http { .. } => StatusReason::BadResponse,
        }
    }
}

/// A logged-in session: the `PVEAuthCookie` ticket and its CSRF token.
#[derive(Debug, Clone)]
pub struct Ticket {
    ticket: Secret,
    csrf_token: Secret,
    obtained_at: Instant,
}

impl Ticket {
    pub fn age(&self) -> Duration {
        self.obtained_at.elapsed()
    }
}

/// How requests authenticate: a ticket from a password login, or an API token.
#[derive(Debug, Clone)]
pub enum Session {
    Ticket(Ticket),
    /// The whole `Authorization` header value, `PVEAPIToken=user@realm!name=secret`.
    Token(Secret),
}

impl Session {
    fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        match self {
            // CSRF is only checked on writes, but sending it on reads does no harm.
            Self::Ticket(ticket) => request
                .header(
                    reqwest::header::COOKIE,
                    format!("PVEAuthCookie={}", ticket.ticket.expose()),
                )
                .header("CSRFPreventionToken", ticket.csrf_token.expose()),
            Self::Token(header) => request.header(reqwest::header::AUTHORIZATION, header.expose()),
        }
    }
}

/// What registration learns from Proxmox.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// The full pve-manager version.
    pub version: String,
    /// `/cluster/status` as the registered endpoint answered it.
    pub status: StatusReport,
    /// Who the members are, when discovery is on.
    pub discovery: Option<Discovery>,
    /// The session the monitor takes over, so a new cluster costs one login.
    pub session: Session,
}

/// A client for one Proxmox endpoint. Cheap to clone; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct ProxmoxClient {
    http: reqwest::Client,
    endpoint: Endpoint,
    timeout: Duration,
    pin: Option<Fingerprint>,
    presented: PresentedCertificate,
}

impl ProxmoxClient {
    /// `timeout` bounds every request as a whole: connect, TLS, headers and body.
    /// With a `pin`, the server is trusted exactly when its certificate has that fingerprint;
    /// without, when it chains to a root of `trust`.
    pub fn new(
        endpoint: Endpoint,
        timeout: Duration,
        trust: &TrustAnchors,
        pin: Option<Fingerprint>,
    ) -> Result<Self, ProxmoxError> {
        Self::with_pool(endpoint, timeout, trust, pin, true)
    }

    /// Like [`ProxmoxClient::new`]; without `keep_alive`, every request gets a connection of
    /// its own and none is kept. A monitor checking less often than pveproxy keeps idle
    /// connections open gains nothing from a pool but its upkeep.
    pub fn with_pool(
        endpoint: Endpoint,
        timeout: Duration,
        trust: &TrustAnchors,
        pin: Option<Fingerprint>,
        keep_alive: bool,
    ) -> Result<Self, ProxmoxError> {
        let (tls, presented) = trust
            .client_config(pin)
            .map_err(|e| ProxmoxError::Tls(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            // Credentials must never reach another host: a 3xx is an error, not a hop.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .timeout(timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(if keep_alive { usize::MAX } else { 0 })
            .user_agent(concat!("proxmoxer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProxmoxError::Tls(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            endpoint,
            timeout,
            pin,
            presented,
        })
    }

    /// Logs in, then reads the version, the cluster status and (with `discover`) the members:
    /// everything registration needs.
    pub async fn probe(
        &self,
        credentials: &Credentials,
        discover: bool,
    ) -> Result<ProbeReport, ProxmoxError> {
        let session = self.open_session(credentials).await?;
        let version = self.version(&session).await.map_err(|e| match e {
            // A token is first tried here; its rejection is a credential failure.
            ProxmoxError::SessionRejected(_) => ProxmoxError::AuthenticationFailed,
            other => other,
        })?;
        let status = self.cluster_status(&session).await?;
        let discovery = if discover {
            // A hung join-information call must not fail a registration whose checks passed.
            let discovered = tokio::time::timeout(self.timeout, self.discover(&session, &status))
                .await
                .unwrap_or(Err(ProxmoxError::Timeout(self.timeout)));
            Some(match discovered {
                Ok(discovery) => discovery,
                Err(e) => {
                    tracing::info!(endpoint = %self.endpoint, error = %e, "cannot discover members; listing those /cluster/status names");
                    Discovery::from_status_and_nodes(&status, &[])
                }
            })
        } else {
            None
        };
        Ok(ProbeReport {
            version,
            status,
            discovery,
            session,
        })
    }

    /// Logs in with a password; a token needs no login, so it costs no request.
    pub async fn open_session(&self, credentials: &Credentials) -> Result<Session, ProxmoxError> {
        match credentials {
            Credentials::Password { username, password } => self
                .request_ticket(username.as_str(), password.expose(), "login")
                .await
                .map(Session::Ticket),
            Credentials::Token {
                username,
                token_id,
                secret,
            } => Ok(Session::Token(Secret::new(format!(
                "PVEAPIToken={username}!{}={}",
                token_id.as_str(),
                secret.expose()
            )))),
        }
    }

    /// Renews a still-valid ticket by sending it as the password, which costs Proxmox no
    /// realm authentication.
    pub async fn refresh(
        &self,
        username: &ProxmoxUser,
        ticket: &Ticket,
    ) -> Result<Ticket, ProxmoxError> {
        self.request_ticket(username.as_str(), ticket.ticket.expose(), "renewal")
            .await
    }

    /// `kind` is `login` (a realm authentication) or `renewal` (a ticket as the password).
    async fn request_ticket(
        &self,
        username: &str,
        password: &str,
        kind: &'static str,
    ) -> Result<Ticket, ProxmoxError> {
        let result = self.request_ticket_once(username, password).await;
        let outcome = match &result {
            Ok(_) => "success",
            Err(ProxmoxError::AuthenticationFailed | ProxmoxError::TwoFactorRequired) => "rejected",
            Err(_) => "error",
        };
        metrics::counter!("proxmoxer_proxmox_logins_total", "kind" => kind, "outcome" => outcome)
            .increment(1);
        result
    }

    async fn request_ticket_once(
        &self,
        username: &str,
        password: &str,
    ) -> Result<Ticket, ProxmoxError> {
        let request = self
            .http
            .post(self.endpoint.api_url("/access/ticket"))
            .form(&[("username", username), ("password", password)]);
        let response = self.send(request, false).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            return Err(ProxmoxError::AuthenticationFailed);
        }
        let login: Option<LoginData> = self.read_data(check_status(response)?).await?;
        let login = login.ok_or(ProxmoxError::AuthenticationFailed)?;
        // A second factor is pending: the "ticket" is only a half ticket every other call rejects.
        if login.need_tfa.unwrap_or(false) || login.ticket.starts_with("PVE:!tfa!") {
            return Err(ProxmoxError::TwoFactorRequired);
        }
        Ok(Ticket {
            ticket: Secret::new(login.ticket),
            csrf_token: Secret::new(login.csrf_token),
            obtained_at: Instant::now(),
        })
    }

    /// `GET /version`: the full pve-manager version, e.g. `8.4.1` or `7.4-3`.
    pub async fn version(&self, session: &Session) -> Result<String, ProxmoxError> {
        let data: VersionData = self.get("/version", session).await?;
        Ok(data.version)
    }

    /// `GET /cluster/status`, which needs Sys.Audit on `/`.
    pub async fn cluster_status(&self, session: &Session) -> Result<StatusReport, ProxmoxError> {
        let entries: Vec<StatusEntry> = self.get("/cluster/status", session).await?;
        let report = StatusReport::from_entries(&entries);
        if report.health.node_count == 0 {
            return Err(ProxmoxError::BadResponse(
                "/cluster/status lists no node".into(),
            ));
        }
        Ok(report)
    }

    /// `GET /cluster/config/join` (Sys.Audit on `/`): every member with the address pveproxy
    /// uses for it and the fingerprint of the certificate it serves, offline ones included.
    async fn join_info(&self, session: &Session) -> Result<JoinInfoData, ProxmoxError> {
        self.get("/cluster/config/join", session).await
    }

    /// `GET /nodes`: every node with its `ssl_fingerprint`.
    async fn nodes(&self, session: &Session) -> Result<Vec<NodeEntry>, ProxmoxError> {
        self.get("/nodes", session).await
    }

    /// Who the cluster's members are, asked of this endpoint. `status` is this endpoint's
    /// `/cluster/status`, which names the answering node and is the fallback when join
    /// information is unavailable.
    pub async fn discover(
        &self,
        session: &Session,
        status: &StatusReport,
    ) -> Result<Discovery, ProxmoxError> {
        match self.join_info(session).await {
            Ok(info) => Ok(Discovery::from_join_info(info)),
            Err(e) if members::is_not_in_a_cluster(&e) => Ok(Discovery::standalone(status)),
            Err(e) => {
                tracing::info!(endpoint = %self.endpoint, error = %e, "cannot read join information; learning members from /cluster/status and /nodes instead");
                let nodes = self.nodes(session).await?;
                Ok(Discovery::from_status_and_nodes(status, &nodes))
            }
        }
    }

    /// `GET /version` as a reachability probe; only whether it answers matters.
    pub async fn ping(&self, session: &Session) -> Result<(), ProxmoxError> {
        self.version(session).await.map(|_| ())
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        session: &Session,
    ) -> Result<T, ProxmoxError> {
        let request =
            session.authorize(self.http.request(Method::GET, self.endpoint.api_url(path)));
        let response = self.send(request, true).await?;
        let data: Option<T> = self.read_data(check_status(response)?).await?;
        data.ok_or_else(|| ProxmoxError::BadResponse(format!("{path} answered without data")))
    }

    /// Every `/api2/json` answer wraps its payload in `{"data": ...}`; `data` may be null.
    async fn read_data<T: DeserializeOwned>(
        &self,
        mut response: Response,
    ) -> Result<Option<T>, ProxmoxError> {
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            if e.is_timeout() {
                ProxmoxError::Timeout(self.timeout)
            } else {
                ProxmoxError::Unreachable(error_chain(&e))
            }
        })? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(ProxmoxError::BadResponse("answer is too large".into()));
            }
            body.extend_from_slice(&chunk);
        }
        #[derive(Deserialize)]
        struct Envelope<T> {
            data: Option<T>,
        }
        serde_json::from_slice::<Envelope<T>>(&body)
            .map(|envelope| envelope.data)
            .map_err(|e| ProxmoxError::BadResponse(format!("not the Proxmox API's JSON ({e})")))
    }

    /// Sends a request, mapping transport failures to operator-readable errors. An idempotent
    /// request that failed on a pooled connection the server had just closed is sent once more.
    async fn send(
        &self,
        request: RequestBuilder,
        idempotent: bool,
    ) -> Result<Response, ProxmoxError> {
        let retry = if idempotent {
            request.try_clone()
        } else {
            None
        };
        // Forget the previous handshake's certificate, so a failure reports this one's.
        self.presented.take();
        match request.send().await {
            Ok(response) => Ok(response),
            Err(e) => match retry {
                Some(retry) if !e.is_timeout() && !e.is_connect() => {
                    tracing::debug!(error = %error_chain(&e), "retrying a request that failed on a reused connection");
                    retry.send().await.map_err(|e| self.transport_error(&e))
                }
                _ => Err(self.transport_error(&e)),
            },
        }
    }

    fn transport_error(&self, error: &reqwest::Error) -> ProxmoxError {
        if error.is_timeout() {
            return ProxmoxError::Timeout(self.timeout);
        }
        let chain = error_chain(error);
        if let Some(tls) = find_tls_error(error) {
            return match (tls, self.presented.take(), self.pin) {
                (rustls::Error::InvalidCertificate(_), Some(presented), Some(pinned))
                    if presented != pinned =>
                {
                    ProxmoxError::CertificateMismatch { presented, pinned }
                }
                (rustls::Error::InvalidCertificate(_), Some(presented), _) => {
                    ProxmoxError::CertificateNotTrusted {
                        presented,
                        detail: tls.to_string(),
                    }
                }
                // No certificate was judged: the handshake itself failed, e.g. the port speaks
                // plain HTTP or no common protocol version exists.
                _ => ProxmoxError::Tls(format!("TLS handshake failed: {tls}")),
            };
        }
        if let Some(io) = find_io_error(error) {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return ProxmoxError::Unreachable("connection refused".into());
                }
                std::io::ErrorKind::ConnectionReset => {
                    return ProxmoxError::Unreachable("connection reset by peer".into());
                }
                _ => {}
            }
        }
        let lower = chain.to_ascii_lowercase();
        // reqwest's and hyper's wrappers ("error sending request for url ...") add nothing an
        // operator can act on; the innermost cause does.
        let cause = innermost_cause(error);
        if lower.contains("dns error") || lower.contains("failed to lookup address") {
            let host = reqwest::Url::parse(self.endpoint.as_str())
                .ok()
                .and_then(|url| url.host_str().map(str::to_owned))
                .unwrap_or_default();
            return ProxmoxError::Unreachable(format!("cannot resolve host {host}: {cause}"));
        }
        ProxmoxError::Unreachable(cause)
    }
}

/// An error and its causes, outermost first. The causes a failed request carries sit in
/// nested `io::Error`s (tokio-rustls, then the connector), whose `source()` skips the error
/// they wrap, so those are unwrapped by hand.
fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| {
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        }
    })
}

/// The rustls error behind a failed request, if any.
fn find_tls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    causes(error).find_map(|e| e.downcast_ref::<rustls::Error>())
}

fn find_io_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    causes(error).find_map(|e| e.downcast_ref::<std::io::Error>())
}

fn innermost_cause(error: &(dyn std::error::Error + 'static)) -> String {
    causes(error)
        .last()
        .map_or_else(|| error.to_string(), ToString::to_string)
}

/// reqwest's own message is "error sending request"; the cause is further down the chain.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    for text in causes(error).map(ToString::to_string) {
        // An io::Error displays the error it wraps: show that text once.
        if parts.last() != Some(&text) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// pveproxy puts the error in the reason phrase; the body may be empty or not JSON.
fn reason_phrase(response: &Response) -> String {
    response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .or_else(|| response.status().canonical_reason().map(str::to_owned))
        .unwrap_or_default()
}

fn check_status(response: Response) -> Result<Response, ProxmoxError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    if status.is_redirection() {
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("an unnamed location")
            .to_owned();
        return Err(ProxmoxError::Redirect {
            status: status.as_u16(),
            location,
        });
    }
    let reason = reason_phrase(&response);
    Err(match status {
        StatusCode::UNAUTHORIZED => ProxmoxError::SessionRejected(reason),
        StatusCode::FORBIDDEN => ProxmoxError::Forbidden(reason),
        _ => ProxmoxError::Http {
            status: status.as_u16(),
            reason,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_stable_reasons() {
        assert_eq!(
            ProxmoxError::Timeout(Duration::from_secs(10)).to_string(),
            "timed out after 10s"
        );
        assert_eq!(
            ProxmoxError::Http {
                status: 595,
                reason: "No route to host".into()
            }
            .status_reason(),
            StatusReason::Unreachable
        );
        assert_eq!(
            ProxmoxError::Forbidden("Permission check failed (/, Sys.Audit)".into())
                .status_reason(),
            StatusReason::Forbidden
        );
    }
}
