//! Where the daemon is and how to ask it: the base URL (from `--url` or the configured listen
//! address), the bearer token, and the errors a terminal command reports when the daemon does
//! not give an answer.

use std::error::Error as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, LOCATION};
use serde_json::Value;

use crate::config::{Config, ConfigError};
use crate::domain::Secret;

/// How long a connection to the daemon may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a terminal command got no usable answer from the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Without `--url` the address comes from the configuration, which could not be read.
    #[error("cannot tell where the daemon listens: {0}; pass --url")]
    Config(#[from] ConfigError),
    /// `--url` is not an http or https URL with a host.
    #[error("invalid --url {0:?}: expected http://HOST:PORT or https://HOST:PORT")]
    InvalidUrl(String),
    /// The token holds characters an HTTP header cannot carry.
    #[error("the API token is not a valid header value; check --token or PROXMOXER_TOKEN")]
    InvalidToken,
    /// The HTTP client could not be set up.
    #[error("cannot set up the HTTP client: {0}")]
    Client(reqwest::Error),
    /// No connection, or it broke before an answer.
    #[error("cannot reach proxmoxer at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    /// Connected, but no answer within the timeout.
    #[error("proxmoxer at {url} did not answer within {}", humantime::format_duration(*after))]
    Timeout { url: String, after: Duration },
    /// 401 and no token was given.
    #[error(
        "proxmoxer at {url} requires an API token (401 Unauthorized): pass --token or set \
         PROXMOXER_TOKEN (a read token is enough)"
    )]
    TokenRequired { url: String },
    /// 401 although a token was given.
    #[error(
        "proxmoxer at {url} did not accept the API token (401 Unauthorized): check --token or \
         PROXMOXER_TOKEN"
    )]
    TokenRejected { url: String },
    /// A 3xx: redirects are not followed, so a token never goes to another host.
    #[error(
        "proxmoxer at {url} answered {status} (a redirect to {location}); redirects are not \
         followed: pass the right address with --url"
    )]
    Redirected {
        url: String,
        status: StatusCode,
        location: String,
    },
    /// Any other status than the one expected, with the API's error message when it sent one.
    #[error("proxmoxer at {url} answered {status}: {message}")]
    Answered {
        url: String,
        status: StatusCode,
        message: String,
    },
    /// A success status with a body that is not what the API sends.
    #[error("proxmoxer at {url} sent an answer that is not the API's: {cause}")]
    BadBody { url: String, cause: String },
    /// The async runtime or the signal handlers could not be set up.
    #[error("cannot start: {0}")]
    Runtime(std::io::Error),
}

impl ClientError {
    /// Whether retrying cannot help: the token or the address is wrong, not the connection.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout { .. } | Self::BadBody { .. } => false,
            Self::Answered { status, .. } => !status.is_server_error(),
            _ => true,
        }
    }
}

/// The daemon to ask: its base URL and the token to send.
pub struct Daemon {
    base: String,
    token: Option<Secret>,
}

impl Daemon {
    /// `url` when given, else the listen address of the configuration read as the daemon reads
    /// it (`--config`, `PROXMOXER_CONFIG`, `PROXMOXER_LISTEN`). An empty token counts as none.
    pub fn resolve(
        url: Option<String>,
        token: Option<String>,
        config: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let base = match url {
            Some(url) => {
                let trimmed = url.trim().trim_end_matches('/');
                // A path is kept, for a daemon behind a reverse proxy under a prefix.
                let has_host = ["http://", "https://"].iter().any(|scheme| {
                    trimmed
                        .strip_prefix(scheme)
                        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
                });
                if !has_host {
                    return Err(ClientError::InvalidUrl(url));
                }
                trimmed.to_owned()
            }
            None => base_url_for(Config::load(config)?.listen),
        };
        let token = token
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .map(Secret::new);
        Ok(Self { base, token })
    }

    /// The base URL, e.g. `http://127.0.0.1:8080`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The base URL followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A client that sends the token with every request and follows no redirect. `timeout`
    /// bounds a whole request; `read_timeout` bounds each wait for more of a response.
    pub fn client(
        &self,
        timeout: Option<Duration>,
        read_timeout: Option<Duration>,
    ) -> Result<reqwest::Client, ClientError> {
        let mut headers = HeaderMap::new();
        if let Some(token) = &self.token {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| ClientError::InvalidToken)?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // The daemon runs on or near this host; a proxy from the environment would
            // more likely misroute the request (and the token) than help.
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .default_headers(headers);
        if let Some(timeout) = timeout {
            builder = builder.timeout(timeout);
        }
        if let Some(read_timeout) = read_timeout {
            builder = builder.read_timeout(read_timeout);
        }
        builder.build().map_err(ClientError::Client)
    }

    /// Sends `GET path` and returns the response if it is a 200; any other answer is an error
    /// that says what went wrong.
    pub async fn get(
        &self,
        client: &reqwest::Client,
        path: &str,
        headers: HeaderMap,
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(path);
        let response = client
            .get(&url)
            .headers(headers)
            .send()
            .await
            .map_err(|e| self.transport_error(&e, timeout))?;
        self.expect_ok(response).await
    }

    /// `GET path` as JSON.
    pub async fn get_json(
        &self,
        client: &reqwest::Client,
        path: &str,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let response = self.get(client, path, HeaderMap::new(), timeout).await?;
        let url = self.url(path);
        let text = response
            .text()
            .await
            .map_err(|e| self.transport_error(&e, timeout))?;
        serde_json::from_str(&text).map_err(|e| ClientError::BadBody {
            url,
            cause: e.to_string(),
        })
    }

    /// What a failed send or read means to the user.
    pub fn transport_error(&self, error: &reqwest::Error, timeout: Duration) -> ClientError {
        if error.is_timeout() {
            return ClientError::Timeout {
                url: self.base.clone(),
                after: timeout,
            };
        }
        ClientError::Unreachable {
            url: self.base.clone(),
            cause: cause_of(error),
        }
    }

    async fn expect_ok(
        &self,
        response: reqwest::Response,
    ) -> Result<reqwest::Response, ClientError> {
        let status = response.status();
        let url = self.base.clone();
        if status == StatusCode::OK {
            return Ok(response);
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(if self.token.is_some() {
                ClientError::TokenRejected { url }
            } else {
                ClientError::TokenRequired { url }
            });
        }
        if status.is_redirection() {
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("nowhere")
                .to_owned();
            return Err(ClientError::Redirected {
                url,
                status,
                location,
            });
        }
        // The API's errors are `{"code","message","details"}`; anything else is shown as is,
        // cut short, since it may be a proxy's HTML page.
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| {
                let text: String = body.trim().chars().take(200).collect();
                if text.is_empty() {
                    "no message".to_owned()
                } else {
                    text
                }
            });
        Err(ClientError::Answered {
            url,
            status,
            message,
        })
    }
}

/// `http://` and the listen address, with the wildcard addresses replaced by loopback: the
/// daemon listening on every address is reachable on this host's loopback.
pub fn base_url_for(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// The innermost cause of a failed request, which is the one that says what happened
/// ("connection refused"), where reqwest's own message only says that sending failed.
fn cause_of(error: &reqwest::Error) -> String {
    let mut innermost = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "connection refused (is the daemon running, and is this its address?)"
                        .to_owned()
                }
                _ => io.to_string(),
            };
        }
        innermost = cause.to_string();
        source = cause.source();
    }
    innermost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_addresses_are_asked_on_loopback() {
        let url = |listen: &str| base_url_for(listen.parse().expect("a socket address"));
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(url("[::]:8080"), "http://[::1]:8080");
        assert_eq!(url("127.0.0.1:9000"), "http://127.0.0.1:9000");
        assert_eq!(url("10.0.0.5:8080"), "http://10.0.0.5:8080");
        assert_eq!(url("[fd00::5]:8080"), "http://[fd00::5]:8080");
    }

    #[test]
    fn a_url_is_an_http_or_https_base_and_loses_its_trailing_slash() {
        let base = |url: &str| {
            Daemon::resolve(Some(url.to_owned()), None, None).map(|d| d.base().to_owned())
        };
        assert_eq!(
            base("http://127.0.0.1:8080/").ok().as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            base("https://pve-monitor:8443").ok().as_deref(),
            Some("https://pve-monitor:8443")
        );
        assert_eq!(
            base("https://mgmt.example.com/proxmoxer/").ok().as_deref(),
            Some("https://mgmt.example.com/proxmoxer")
        );
        for bad in ["127.0.0.1:8080", "ftp://host", "http://", "http:///path"] {
            assert!(
                matches!(base(bad), Err(ClientError::InvalidUrl(_))),
                "{bad} is refused"
            );
        }
    }

    #[test]
    fn a_blank_token_is_no_token_and_a_token_never_shows_in_debug_output() {
        let daemon = Daemon::resolve(Some("http://h:1".into()), Some("  ".into()), None)
            .expect("a valid URL");
        assert!(daemon.token.is_none());
        let daemon = Daemon::resolve(Some("http://h:1".into()), Some("pmx_secret".into()), None)
            .expect("a valid URL");
        let token = daemon.token.as_ref().expect("a token");
        assert!(!format!("{token:?}").contains("pmx_secret"));
    }
}
