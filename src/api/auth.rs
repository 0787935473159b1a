//! Who may call the API: bearer tokens from the tokens file, checked for every request before
//! it reaches a handler (unknown paths included), reloaded on SIGHUP.
//!
//! With no token configured the API is open; that is allowed only on a loopback listener,
//! unless `api.allow_unauthenticated` says otherwise. `GET /health` and the status page (which
//! holds no data) are always open.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use super::audit::{AuditRecord, AuditSubject};
use super::token_file::{Role, TokenFileError, TokenSet};

/// The caller's name in audit lines when no token was presented or needed.
pub const ANONYMOUS: &str = "anonymous";
/// Open whatever the tokens: load balancers and service managers probe it without secrets.
const HEALTH_PATH: &str = "/health";

/// Why the configured access cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The tokens file is missing, unreadable or malformed.
    #[error(transparent)]
    TokenFile(#[from] TokenFileError),
    /// A listener others can reach, with nothing to keep them out.
    #[error(
        "refusing to serve the API on {listen} without API tokens: anyone who can reach it could \
         register and delete clusters. Add a token with `proxmoxer token add NAME --role admin \
         --tokens-file PATH` and set api.tokens_file (or PROXMOXER_API_TOKENS_FILE) to PATH, \
         listen on a loopback address, or set api.allow_unauthenticated = true \
         (PROXMOXER_API_ALLOW_UNAUTHENTICATED) to run without authentication"
    )]
    Unprotected {
        /// The configured listen address.
        listen: SocketAddr,
    },
}

/// Whether only this host can connect to `addr`: 127.0.0.0/8 or `::1` (also as an
/// IPv4-mapped address).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The tokens the API accepts now, and what a reload must respect.
#[derive(Debug)]
pub struct Keyring {
    current: RwLock<Arc<TokenSet>>,
    file: Option<PathBuf>,
    listen: SocketAddr,
    allow_unauthenticated: bool,
}

impl Keyring {
    /// Loads the tokens file (when one is configured) and applies the start-up policy: a
    /// missing or malformed file, or a non-loopback `listen` with no token and no explicit
    /// `allow_unauthenticated`, is an error.
    pub fn load(
        file: Option<&Path>,
        listen: SocketAddr,
        allow_unauthenticated: bool,
    ) -> Result<Self, AccessError> {
        let tokens = match file {
            Some(path) => TokenSet::load(path)?,
            None => TokenSet::default(),
        };
        let keyring = Self {
            current: RwLock::new(Arc::new(TokenSet::default())),
            file: file.map(Path::to_owned),
            listen,
            allow_unauthenticated,
        };
        keyring.check_policy(&tokens)?;
        *keyring.write() = Arc::new(tokens);
        Ok(keyring)
    }

    fn check_policy(&self, tokens: &TokenSet) -> Result<(), AccessError> {
        if tokens.is_empty() && !is_loopback(&self.listen) && !self.allow_unauthenticated {
            return Err(AccessError::Unprotected {
                listen: self.listen,
            });
        }
        Ok(())
    }

    /// The tokens in force.
    pub fn tokens(&self) -> Arc<TokenSet> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Arc<TokenSet>> {
        self.current.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs, at start, how the API is protected.
    pub fn log_state(&self) {
        let count = self.tokens().len();
        match (&self.file, count) {
            (_, 0) if !is_loopback(&self.listen) => tracing::warn!(
                listen = %self.listen,
                "the API is served without authentication on a non-loopback address \
                 (api.allow_unauthenticated)"
            ),
            (_, 0) => tracing::info!(
                listen = %self.listen,
                "no API tokens configured: the API is open to local clients"
            ),
            (Some(file), count) => tracing::info!(
                tokens_file = %file.display(),
                tokens = count,
                "API tokens loaded: every request but GET /health and the status page needs a bearer \
                 token"
            ),
            (None, _) => {}
        }
    }

    /// Re-reads the tokens file. A file that is missing or malformed, or one that would leave
    /// a non-loopback listener without any token, keeps the tokens in force; the error says
    /// why.
    pub fn reload(&self) -> Result<usize, AccessError> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        let tokens = TokenSet::load(path)?;
        self.check_policy(&tokens)?;
        let count = tokens.len();
        *self.write() = Arc::new(tokens);
        Ok(count)
    }

    /// [`Keyring::reload`], logging the outcome.
    pub fn reload_and_log(&self) {
        match (&self.file, self.reload()) {
            (None, _) => tracing::info!("reload requested, but no API tokens file is configured"),
            (Some(file), Ok(count)) => tracing::info!(
                tokens_file = %file.display(),
                tokens = count,
                "API tokens reloaded"
            ),
            (Some(file), Err(e)) => tracing::error!(
                tokens_file = %file.display(),
                kept = self.tokens().len(),
                "API tokens not reloaded, keeping the previous ones: {e}"
            ),
        }
    }
}

/// Who is calling.
enum Caller {
    /// No token needed: none is configured, or the route is open.
    Anonymous,
    /// A configured token.
    Token { name: String, role: Role },
}

impl Caller {
    fn may_write(&self) -> bool {
        !matches!(
            self,
            Self::Token {
                role: Role::Read,
                ..
            }
        )
    }

    fn name(&self) -> &str {
        match self {
            Self::Anonymous => ANONYMOUS,
            Self::Token { name, .. } => name,
        }
    }
}

/// GET and HEAD only read; everything else (unknown methods too) needs the admin role.
fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// Why a request carries no usable token, for the log line; never the value presented.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    NoHeader,
    NotBearer,
    UnknownToken,
}

impl Refusal {
    fn log(self, client: Option<SocketAddr>, method: &Method, path: &str) {
        let client = client_label(client);
        let reason = self.as_str();
        match self {
            // Every client's first request, and every scanner's: not worth a warning.
            Self::NoHeader => {
                tracing::info!(client, %method, path, reason, "API request refused");
            }
            Self::NotBearer | Self::UnknownToken => {
                tracing::warn!(client, %method, path, reason, "API authentication failed");
            }
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::NoHeader => "no Authorization header",
            Self::NotBearer => "the Authorization header is not a bearer token",
            Self::UnknownToken => "unknown bearer token",
        }
    }
}

/// The secret of an `Authorization: Bearer <secret>` header, scheme in any case.
fn bearer(headers: &HeaderMap) -> Result<&str, Refusal> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(Refusal::NoHeader)?
        .to_str()
        .map_err(|_| Refusal::NotBearer)?;
    let (scheme, secret) = value.trim().split_once(' ').ok_or(Refusal::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Refusal::NotBearer);
    }
    Ok(secret.trim())
}

/// Authenticates and authorises every request, and writes the audit line of every write.
/// Runs around the whole router, fallbacks included, so an unknown path needs a token too.
pub(super) async fn guard(
    State(keyring): State<Arc<Keyring>>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let write = !is_read(&method);
    let tokens = keyring.tokens();
    // The common case, reads with no tokens configured, neither logs nor checks anything.
    if tokens.is_empty() && !write {
        return next.run(request).await;
    }
    let path = request.uri().path().to_owned();
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    let open_route = (path == HEALTH_PATH || super::status_page::PATHS.contains(&path.as_str()))
        && is_read(&method);

    let caller = if tokens.is_empty() || open_route {
        Caller::Anonymous
    } else {
        match identify(&tokens, request.headers()) {
            Ok(caller) => caller,
            Err(refusal) => {
                refusal.log(client, &method, &path);
                let error = ApiError::AuthenticationRequired;
                return refuse(error, ANONYMOUS, client, &method, &path, write);
            }
        }
    };

    if write && !caller.may_write() {
        tracing::warn!(
            token = caller.name(),
            client = client_label(client),
            %method,
            path,
            "API request refused: the token lacks the admin role"
        );
        let error = ApiError::AdminRoleRequired;
        return refuse(error, caller.name(), client, &method, &path, write);
    }

    let response = next.run(request).await;
    if write {
        AuditRecord {
            caller: caller.name(),
            client,
            method: &method,
            path: &path,
            subject: response.extensions().get::<AuditSubject>(),
            status: response.status().as_u16(),
        }
        .log();
    }
    response
}

/// The token whose secret the request presents.
fn identify(tokens: &TokenSet, headers: &HeaderMap) -> Result<Caller, Refusal> {
    let entry = tokens.find(bearer(headers)?).ok_or(Refusal::UnknownToken)?;
    Ok(Caller::Token {
        name: entry.name.clone(),
        role: entry.role,
    })
}

/// The client's address for log lines.
pub(super) fn client_label(client: Option<SocketAddr>) -> String {
    client.map_or_else(|| "unknown".to_owned(), |addr| addr.to_string())
}

fn refuse(
    error: ApiError,
    caller: &str,
    client: Option<SocketAddr>,
    method: &Method,
    path: &str,
    write: bool,
) -> Response {
    let response = error.into_response();
    if write {
        AuditRecord {
            caller,
            client,
            method,
            path,
            subject: None,
            status: response.status().as_u16(),
        }
        .log();
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("address")
    }

    #[test]
    fn loopback_is_127_slash_8_and_ipv6_localhost() {
        for local in [
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(is_loopback(&addr(local)), "{local}");
        }
        for remote in ["0.0.0.0:8080", "10.0.0.1:8080", "[::]:8080", "[fe80::1]:80"] {
            assert!(!is_loopback(&addr(remote)), "{remote}");
        }
    }

    #[test]
    fn a_non_loopback_listener_needs_tokens_or_an_explicit_opt_out() {
        let refused = Keyring::load(None, addr("0.0.0.0:8080"), false).expect_err("refused");
        let message = refused.to_string();
        assert!(message.contains("proxmoxer token add"), "{message}");
        assert!(message.contains("allow_unauthenticated"), "{message}");
        Keyring::load(None, addr("0.0.0.0:8080"), true).expect("explicitly allowed");
        Keyring::load(None, addr("127.0.0.1:8080"), false).expect("loopback");
    }

    #[test]
    fn a_reload_that_would_leave_a_public_listener_open_keeps_the_old_tokens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api-tokens");
        let secret = super::super::token_file::add(&path, "alice", Role::Admin).expect("add");
        let keyring = Keyring::load(Some(&path), addr("0.0.0.0:8080"), false).expect("load");
        std::fs::write(&path, "# nobody\n").expect("empty the file");
        assert!(matches!(
            keyring.reload(),
            Err(AccessError::Unprotected { .. })
        ));
        assert!(keyring.tokens().find(&secret).is_some());
        std::fs::write(&path, "alice:admin:nothex\n").expect("break the file");
        assert!(matches!(
            keyring.reload(),
            Err(AccessError::TokenFile(TokenFileError::Malformed { .. }))
        ));
        assert!(keyring.tokens().find(&secret).is_some());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_other_schemes_are_refused() {
        let mut headers = HeaderMap::new();
        assert!(matches!(bearer(&headers), Err(Refusal::NoHeader)));
        for (value, expected) in [
            ("Bearer pmx_a", Some("pmx_a")),
            ("bearer pmx_a", Some("pmx_a")),
            ("BEARER   pmx_a ", Some("pmx_a")),
            ("Basic YWxpY2U6eA==", None),
            ("pmx_a", None),
        ] {
            headers.insert(header::AUTHORIZATION, value.parse().expect("header"));
            assert_eq!(bearer(&headers).ok(), expected, "{value}");
        }
    }
}
