//! Validated values that cross the API edge. Past the HTTP layer, code only takes these types,
//! so a name, endpoint or user that reached the registry is known to be well formed.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Error texts shown and stored (`last_error`, history) are at most this long, so an error
/// that quotes a huge answer cannot bloat every read and every stored record.
pub const MAX_ERROR_TEXT_BYTES: usize = 1024;

/// `text` cut to [`MAX_ERROR_TEXT_BYTES`] on a character boundary.
pub fn capped_error_text(mut text: String) -> String {
    if text.len() > MAX_ERROR_TEXT_BYTES {
        let mut end = MAX_ERROR_TEXT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Clusters are keyed by UUIDv7, so the store's key order is creation order.
pub type ClusterId = uuid::Uuid;

/// Why a value from the client was refused: which field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    pub field: &'static str,
    pub message: String,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: &'static str, message: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
            reason: reason.into(),
        }
    }
}

const MAX_NAME_CHARS: usize = 255;
/// Proxmox limits user ids to 64 characters (`/access/ticket` schema).
const MAX_USERNAME_CHARS: usize = 64;

/// A cluster's display name: unique in the registry, trimmed, 1..=255 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClusterName(String);

impl ClusterName {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        // Length and control characters are judged on the name as sent, so that the rule is
        // one a JSON Schema can state (maxLength, a pattern); only then is it trimmed.
        if raw.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "name",
                "Cluster name is invalid",
                "must not contain control characters",
            ));
        }
        if raw.chars().count() > MAX_NAME_CHARS {
            return Err(ValidationError::new(
                "name",
                "Cluster name is too long",
                format!("must be at most {MAX_NAME_CHARS} characters"),
            ));
        }
        let name = raw.trim();
        if name.is_empty() {
            return Err(ValidationError::new(
                "name",
                "Cluster name is required",
                "must not be empty or blank",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The base URL of a Proxmox API, normalised to `scheme://host[:port][/prefix]` without a
/// trailing slash or `/api2/json`, so that the client can append `/api2/json/...` itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Endpoint(String);

impl Endpoint {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let invalid = |reason: &str| {
            ValidationError::new("api_endpoint", "API endpoint is invalid", reason.to_owned())
        };
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(ValidationError::new(
                "api_endpoint",
                "API endpoint is required",
                "must not be empty",
            ));
        }
        let url = reqwest::Url::parse(raw)
            .map_err(|e| invalid(&format!("must be an absolute http or https URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("scheme must be http or https"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("must name a host"));
        }
        // Credentials belong in their own fields, never in a URL that gets shown and logged.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("must not contain credentials"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("must not contain a query or fragment"));
        }
        let mut normalised = url.as_str().trim_end_matches('/').to_owned();
        if let Some(stripped) = normalised.strip_suffix("/api2/json") {
            normalised = stripped.trim_end_matches('/').to_owned();
        }
        Ok(Self(normalised))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_https(&self) -> bool {
        self.0.starts_with("https://")
    }

    /// The URL of an API path such as `/version`.
    pub fn api_url(&self, path: &str) -> String {
        format!("{}/api2/json{path}", self.0)
    }

    /// Another cluster member's endpoint: `address` with this endpoint's scheme and port, as
    /// pveproxy itself reaches its peers (brackets around IPv6 addresses).
    pub fn for_member(&self, address: &str) -> Option<Endpoint> {
        let url = reqwest::Url::parse(&self.0).ok()?;
        let port = url.port_or_known_default()?;
        let address = address.trim().trim_start_matches('[').trim_end_matches(']');
        if address.is_empty() {
            return None;
        }
        let host = match address.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => address.to_owned(),
        };
        Endpoint::parse(&format!("{}://{host}:{port}", url.scheme())).ok()
    }
}

/// An IP network in CIDR notation, such as `10.0.0.0/24` or `fd00::/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Accepts `address/prefix`, or a bare address meaning that one host.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        let (address, prefix) = match raw.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (raw, None),
        };
        let network: std::net::IpAddr = address
            .parse()
            .map_err(|_| format!("{raw:?} is not a network such as 10.0.0.0/24"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{raw:?} has a prefix length outside 0..={max}"))?,
        };
        Ok(Self { network, prefix })
    }

    /// Whether `address` lies in this network. IPv4 and IPv6 never match each other.
    pub fn contains(&self, address: std::net::IpAddr) -> bool {
        fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
            let keep = u32::from(prefix.min(width));
            if keep == 0 {
                0
            } else {
                bits >> (u32::from(width) - keep)
            }
        }
        match (self.network, address) {
            (std::net::IpAddr::V4(net), std::net::IpAddr::V4(addr)) => {
                masked(u128::from(u32::from(net)), self.prefix, 32)
                    == masked(u128::from(u32::from(addr)), self.prefix, 32)
            }
            (std::net::IpAddr::V6(net), std::net::IpAddr::V6(addr)) => {
                masked(u128::from(net), self.prefix, 128)
                    == masked(u128::from(addr), self.prefix, 128)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Proxmox user id, `user@realm`, as `/access/ticket` expects it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProxmoxUser(String);

impl ProxmoxUser {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let invalid = |reason: &str| {
            ValidationError::new("username", "Username is invalid", reason.to_owned())
        };
        if raw.trim().is_empty() {
            return Err(ValidationError::new(
                "username",
                "Username is required",
                "must not be empty",
            ));
        }
        if raw.chars().count() > MAX_USERNAME_CHARS {
            return Err(invalid(&format!(
                "must be at most {MAX_USERNAME_CHARS} characters"
            )));
        }
        let Some((user, realm)) = raw.rsplit_once('@') else {
            return Err(invalid("must have the form user@realm, e.g. root@pam"));
        };
        let user_ok = !user.is_empty()
            && !user
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == ':' || c == '/');
        // Realm ids follow Proxmox's `pve-realm` format: a letter, then letters, digits, . - _
        let realm_ok = realm.len() >= 2
            && realm.starts_with(|c: char| c.is_ascii_alphabetic())
            && realm
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !user_ok || !realm_ok {
            return Err(invalid("must have the form user@realm, e.g. root@pam"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProxmoxUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A password, token secret or ticket. It is never printed: `Debug` and `Display` show `***`,
/// and it is not `Serialize`, so it cannot end up in a response or a stored record by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A Proxmox API token's name, the part after `!` in `user@realm!name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenId(String);

impl TokenId {
    /// Accepts the bare name, or the full `user@realm!name` when its user is `username`.
    pub fn parse(raw: &str, username: &ProxmoxUser) -> Result<Self, ValidationError> {
        let invalid =
            |reason: String| ValidationError::new("token_id", "Token ID is invalid", reason);
        let name = match raw.split_once('!') {
            Some((user, name)) if user == username.as_str() => name,
            Some((user, _)) => {
                return Err(invalid(format!(
                    "names the token of {user}, but username is {username}"
                )));
            }
            None => raw,
        };
        // Proxmox's token name format: a letter, then letters, digits, . - _
        let valid = name.len() >= 2
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !valid {
            return Err(invalid(
                "must be the token name, e.g. monitoring (a letter, then letters, digits, . - _)"
                    .to_owned(),
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Which kind of secret a cluster authenticates with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    #[default]
    Password,
    Token,
}

/// How a registered cluster authenticates to Proxmox.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// A ticket login with the user's password.
    Password {
        username: ProxmoxUser,
        password: Secret,
    },
    /// An API token: no login, a `PVEAPIToken` header on every request.
    Token {
        username: ProxmoxUser,
        token_id: TokenId,
        secret: Secret,
    },
}

impl Credentials {
    pub fn username(&self) -> &ProxmoxUser {
        match self {
            Self::Password { username, .. } | Self::Token { username, .. } => username,
        }
    }

    /// The password or token secret: what gets sealed at rest.
    pub fn secret(&self) -> &Secret {
        match self {
            Self::Password { password, .. } => password,
            Self::Token { secret, .. } => secret,
        }
    }

    pub fn method(&self) -> AuthMethod {
        match self {
            Self::Password { .. } => AuthMethod::Password,
            Self::Token { .. } => AuthMethod::Token,
        }
    }

    pub fn token_id(&self) -> Option<&TokenId> {
        match self {
            Self::Password { .. } => None,
            Self::Token { token_id, .. } => Some(token_id),
        }
    }
}

/// The health the API reports for a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClusterStatus {
    Healthy,
    Degraded,
    Unhealthy,
    Unknown,
}

impl fmt::Display for ClusterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Unhealthy => "unhealthy",
            Self::Unknown => "unknown",
        })
    }
}

/// A stable, machine-readable code for why a cluster has its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusReason {
    Ok,
    NodeOffline,
    QuorumLost,
    Unreachable,
    Timeout,
    TlsError,
    AuthFailed,
    Forbidden,
    BadResponse,
    NotChecked,
    Stale,
    /// History only: a node joined the cluster.
    MemberJoined,
    /// History only: a node left the cluster.
    MemberLeft,
    /// History only: a member's certificate pin was replaced by one a verified member vouched
    /// for.
    PinRotated,
    /// History only: checks are now answered by another member.
    Failover,
    /// History only: an operator changed the cluster's settings; `fields` names them.
    SettingsChanged,
}

impl fmt::Display for StatusReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "ok",
            Self::NodeOffline => "node_offline",
            Self::QuorumLost => "quorum_lost",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::TlsError => "tls_error",
            Self::AuthFailed => "auth_failed",
            Self::Forbidden => "forbidden",
            Self::BadResponse => "bad_response",
            Self::NotChecked => "not_checked",
            Self::Stale => "stale",
            Self::MemberJoined => "member_joined",
            Self::MemberLeft => "member_left",
            Self::PinRotated => "pin_rotated",
            Self::Failover => "failover",
            Self::SettingsChanged => "settings_changed",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_endpoints_take_the_registered_scheme_and_port() {
        let registered = Endpoint::parse("https://pve1.example.com:8006").expect("endpoint");
        assert_eq!(
            registered.for_member("127.0.0.3").map(|e| e.0),
            Some("https://127.0.0.3:8006".to_owned())
        );
        assert_eq!(
            registered.for_member("::1").map(|e| e.0),
            Some("https://[::1]:8006".to_owned())
        );
        let plain = Endpoint::parse("http://127.0.0.2:41000").expect("endpoint");
        assert_eq!(
            plain.for_member("127.0.0.4").map(|e| e.0),
            Some("http://127.0.0.4:41000".to_owned())
        );
        assert_eq!(registered.for_member(""), None);
    }

    #[test]
    fn error_texts_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_TEXT_BYTES);
        let cut = capped_error_text(long);
        assert!(cut.len() <= MAX_ERROR_TEXT_BYTES && cut.len() >= MAX_ERROR_TEXT_BYTES - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(capped_error_text("short".into()), "short");
    }

    #[test]
    fn networks_contain_their_addresses_only() {
        let net = Cidr::parse("127.0.0.0/30").expect("cidr");
        assert!(net.contains("127.0.0.3".parse().expect("ip")));
        assert!(!net.contains("127.0.0.4".parse().expect("ip")));
        assert!(!net.contains("::1".parse().expect("ip")));
        let host = Cidr::parse("127.0.0.2").expect("bare address");
        assert!(host.contains("127.0.0.2".parse().expect("ip")));
        assert!(!host.contains("127.0.0.3".parse().expect("ip")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .expect("all")
                .contains("127.9.9.9".parse().expect("ip"))
        );
        assert!(
            Cidr::parse("fd00::/8")
                .expect("v6")
                .contains("fd12::1".parse().expect("ip"))
        );
        for bad in ["", "127.0.0.0/33", "pve1/24", "127.0.0.0/x"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoint_drops_trailing_slash_and_api_prefix() {
        for raw in [
            "https://pve.example.com:8006",
            "https://pve.example.com:8006/",
            "https://pve.example.com:8006/api2/json",
            "https://pve.example.com:8006/api2/json/",
            "https://PVE.example.com:8006/",
        ] {
            assert_eq!(
                Endpoint::parse(raw).map(|e| e.0),
                Ok("https://pve.example.com:8006".to_owned()),
                "{raw}"
            );
        }
    }

    #[test]
    fn endpoint_refuses_what_is_not_an_http_url() {
        for raw in [
            "",
            "pve.example.com:8006",
            "ftp://pve.example.com",
            "https://",
            "https://user:pw@pve.example.com",
            "/api2/json",
            "https://pve.example.com:8006/?x=1",
        ] {
            assert!(Endpoint::parse(raw).is_err(), "{raw} should be refused");
        }
    }

    #[test]
    fn username_needs_user_and_realm() {
        assert!(ProxmoxUser::parse("root@pam").is_ok());
        assert!(ProxmoxUser::parse("monitor@pve").is_ok());
        assert!(ProxmoxUser::parse("first.last@corp-ad").is_ok());
        for raw in [
            "root",
            "@pam",
            "root@",
            "root@p",
            "ro ot@pam",
            "root@pam!tok",
        ] {
            assert!(ProxmoxUser::parse(raw).is_err(), "{raw} should be refused");
        }
    }

    #[test]
    fn name_is_trimmed_and_bounded() {
        assert_eq!(
            ClusterName::parse("  prod ").map(|n| n.0),
            Ok("prod".into())
        );
        assert_eq!(
            ClusterName::parse("   ").map_err(|e| e.message),
            Err("Cluster name is required".into())
        );
        assert!(ClusterName::parse(&"x".repeat(255)).is_ok());
        assert!(ClusterName::parse(&"x".repeat(256)).is_err());
        assert!(ClusterName::parse("a\nb").is_err());
        // Judged as sent: a trailing newline is a control character, padding counts.
        assert!(ClusterName::parse("prod\n").is_err());
        assert!(ClusterName::parse(&format!(" {}", "x".repeat(255))).is_err());
    }

    #[test]
    fn token_ids_are_names_or_full_ids_of_the_same_user() {
        let user = ProxmoxUser::parse("monitor@pve").expect("user");
        assert_eq!(
            TokenId::parse("health", &user).map(|t| t.0),
            Ok("health".into())
        );
        assert_eq!(
            TokenId::parse("monitor@pve!health", &user).map(|t| t.0),
            Ok("health".into())
        );
        for raw in ["", "1abc", "a", "he alth", "root@pam!health", "health="] {
            assert!(
                TokenId::parse(raw, &user).is_err(),
                "{raw} should be refused"
            );
        }
    }

    #[test]
    fn status_reasons_display_as_they_serialise() {
        use StatusReason::*;
        for reason in [
            Ok,
            NodeOffline,
            QuorumLost,
            Unreachable,
            Timeout,
            TlsError,
            AuthFailed,
            Forbidden,
            BadResponse,
            NotChecked,
            Stale,
            MemberJoined,
            MemberLeft,
            PinRotated,
            Failover,
            SettingsChanged,
        ] {
            assert_eq!(
                serde_json::to_value(reason).ok(),
                Some(serde_json::Value::String(reason.to_string()))
            );
        }
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "*** ***");
    }
}
