//! Configuration: embedded defaults, then an optional TOML file, then `PROXMOXER_*`
//! environment variables, validated once. Every error names the key at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::domain::Cidr;

/// `server.listen`: loopback only until an operator decides otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// `storage.database`, relative to the working directory.
pub const DEFAULT_DATABASE: &str = "data/proxmoxer.redb";
/// The key file's name, beside the database or in `$CREDENTIALS_DIRECTORY`.
pub const KEY_FILE_NAME: &str = "proxmoxer.key";
/// `monitor.interval`.
pub const DEFAULT_MONITOR_INTERVAL: Duration = Duration::from_secs(30);
/// `monitor.failure_threshold`.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// `proxmox.timeout`: above pveproxy's 3 s delay on authentication failures.
pub const DEFAULT_PROXMOX_TIMEOUT: Duration = Duration::from_secs(10);
/// `server.shutdown_grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// `server.header_timeout`: a request's headers are a few hundred bytes.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `server.request_timeout`: registration bodies are a few hundred bytes too.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// `server.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;
/// `log.level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Clusters are watched through all their members unless this is turned off.
pub const DEFAULT_MEMBER_DISCOVERY: bool = true;
/// `storage.etcd.prefix`: every key proxmoxer writes in etcd starts with it.
pub const DEFAULT_ETCD_PREFIX: &str = "/proxmoxer";
/// `storage.etcd.lease_ttl`: how long a silent leader keeps its role.
pub const DEFAULT_ETCD_LEASE_TTL: Duration = Duration::from_secs(10);
/// etcd refuses leases shorter than its election timeout allows; below this, leadership would
/// flap on any network hiccup.
const MIN_ETCD_LEASE_TTL: Duration = Duration::from_secs(1);
const MAX_ETCD_LEASE_TTL: Duration = Duration::from_secs(300);

/// A configuration problem, naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file cannot be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML, or has an unknown key or a value of the wrong type.
    #[error("invalid configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range or malformed; `key` names the key or environment variable.
    #[error("invalid value for {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `server.listen`: the REST API's address.
    pub listen: SocketAddr,
    /// `server.shutdown_grace`: how long in-flight requests may finish after a stop signal.
    pub shutdown_grace: Duration,
    /// `server.header_timeout`: how long a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// `server.request_timeout`: how long a client may take to send a request's body.
    pub request_timeout: Duration,
    /// `server.max_connections`: API connections served at once.
    pub max_connections: usize,
    /// `storage.database`: the redb file.
    pub database: PathBuf,
    /// `storage.key_file`: the key sealing stored credentials.
    pub key_file: PathBuf,
    /// `monitor.interval`: how often each cluster is checked.
    pub monitor_interval: Duration,
    /// `monitor.failure_threshold`: failed checks in a row before a cluster is unhealthy.
    pub failure_threshold: u32,
    /// `proxmox.timeout`: the whole-request timeout of every call to Proxmox.
    pub proxmox_timeout: Duration,
    /// `log.level`: a tracing filter.
    pub log_level: String,
    /// `log.format`: text or JSON lines.
    pub log_format: LogFormat,
    /// `tls.ca_file`: a PEM bundle trusted besides the system roots.
    pub tls_ca_file: Option<PathBuf>,
    /// `tls.insecure_skip_verify`: accept any certificate from clusters without a pin.
    pub tls_insecure_skip_verify: bool,
    /// `monitor.member_discovery`: watch a cluster through all its members.
    pub member_discovery: bool,
    /// `proxmox.member_networks`: the only networks discovered members are contacted in.
    pub member_networks: Vec<Cidr>,
    /// `api.tokens_file`: the API tokens; none means no token is configured.
    pub api_tokens_file: Option<PathBuf>,
    /// `api.allow_unauthenticated`: serve a non-loopback listener without tokens.
    pub api_allow_unauthenticated: bool,
    /// `storage.backend`: where the registry is stored.
    pub backend: StorageBackend,
    /// `storage.etcd.*`: used when `backend` is [`StorageBackend::Etcd`].
    pub etcd: EtcdConfig,
}

/// Where the registry is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// The embedded redb file: one instance, nothing else to run.
    #[default]
    Redb,
    /// An etcd cluster shared by several instances, one of them leading.
    Etcd,
}

/// How to reach the etcd cluster that holds the registry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, e.g. `https://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Every key proxmoxer writes starts with this, so one etcd can serve other users too.
    pub prefix: String,
    /// The leader's lease: another instance takes over this long after the leader went silent.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// etcd user, when etcd has authentication enabled.
    pub username: Option<String>,
    /// A file holding that user's password (never the password itself in the configuration).
    pub password_file: Option<PathBuf>,
    /// A PEM bundle of the CA that signed etcd's server certificates.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for etcd's mutual TLS, with `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            prefix: DEFAULT_ETCD_PREFIX.to_owned(),
            lease_ttl: DEFAULT_ETCD_LEASE_TTL,
            username: None,
            password_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    server: ServerSection,
    storage: StorageSection,
    monitor: MonitorSection,
    proxmox: ProxmoxSection,
    tls: TlsSection,
    log: LogSection,
    api: ApiSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ApiSection {
    tokens_file: Option<PathBuf>,
    allow_unauthenticated: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TlsSection {
    ca_file: Option<PathBuf>,
    insecure_skip_verify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ServerSection {
    listen: String,
    #[serde(with = "humantime_serde")]
    shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    header_timeout: Duration,
    #[serde(with = "humantime_serde")]
    request_timeout: Duration,
    max_connections: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct StorageSection {
    backend: StorageBackend,
    database: PathBuf,
    key_file: Option<PathBuf>,
    etcd: EtcdConfig,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Redb,
            database: PathBuf::from(DEFAULT_DATABASE),
            key_file: None,
            etcd: EtcdConfig::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct MonitorSection {
    #[serde(with = "humantime_serde")]
    interval: Duration,
    failure_threshold: u32,
    member_discovery: bool,
}

impl Default for MonitorSection {
    fn default() -> Self {
        Self {
            interval: DEFAULT_MONITOR_INTERVAL,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            member_discovery: DEFAULT_MEMBER_DISCOVERY,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ProxmoxSection {
    #[serde(with = "humantime_serde")]
    timeout: Duration,
    member_networks: Vec<String>,
}

impl Default for ProxmoxSection {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_PROXMOX_TIMEOUT,
            member_networks: Vec::new(),
        }
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (without timestamps under journald, which adds its own).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LogSection {
    level: String,
    format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: DEFAULT_LOG_LEVEL.to_owned(),
            format: LogFormat::Text,
        }
    }
}

impl Config {
    /// Loads the configuration from the process environment and, when given, a TOML file.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(file, |name| std::env::var(name).ok())
    }

    /// Like [`Config::load`], with the environment supplied by `env` (for tests).
    pub fn load_with(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut raw = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };

        let mut listen_key = "server.listen";
        if let Some(v) = env("PROXMOXER_LISTEN") {
            raw.server.listen = v;
            listen_key = "PROXMOXER_LISTEN";
        }
        if let Some(v) = env("PROXMOXER_DATABASE") {
            raw.storage.database = PathBuf::from(v);
        }
        if let Some(v) = env("PROXMOXER_KEY_FILE") {
            raw.storage.key_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env("PROXMOXER_STORAGE_BACKEND") {
            raw.storage.backend = match v.trim() {
                "redb" => StorageBackend::Redb,
                "etcd" => StorageBackend::Etcd,
                other => {
                    return Err(invalid(
                        "PROXMOXER_STORAGE_BACKEND",
                        format!("{other:?} is not redb or etcd"),
                    ));
                }
            };
        }
        if let Some(v) = env("PROXMOXER_STORAGE_ETCD_ENDPOINTS") {
            raw.storage.etcd.endpoints = v
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(v) = env("PROXMOXER_STORAGE_ETCD_PREFIX") {
            raw.storage.etcd.prefix = v;
        }
        if let Some(v) = env("PROXMOXER_STORAGE_ETCD_LEASE_TTL") {
            raw.storage.etcd.lease_ttl = parse_duration("PROXMOXER_STORAGE_ETCD_LEASE_TTL", &v)?;
        }
        if let Some(v) = env("PROXMOXER_MONITOR_INTERVAL") {
            raw.monitor.interval = parse_duration("PROXMOXER_MONITOR_INTERVAL", &v)?;
        }
        if let Some(v) = env("PROXMOXER_MONITOR_FAILURE_THRESHOLD") {
            raw.monitor.failure_threshold = v.trim().parse().map_err(|_| {
                invalid(
                    "PROXMOXER_MONITOR_FAILURE_THRESHOLD",
                    format!("{v:?} is not a whole number"),
                )
            })?;
        }
        if let Some(v) = env("PROXMOXER_PROXMOX_TIMEOUT") {
            raw.proxmox.timeout = parse_duration("PROXMOXER_PROXMOX_TIMEOUT", &v)?;
        }
        let mut networks_key = "proxmox.member_networks";
        if let Some(v) = env("PROXMOXER_PROXMOX_MEMBER_NETWORKS") {
            raw.proxmox.member_networks = v
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect();
            networks_key = "PROXMOXER_PROXMOX_MEMBER_NETWORKS";
        }
        if let Some(v) = env("PROXMOXER_MONITOR_MEMBER_DISCOVERY") {
            raw.monitor.member_discovery = parse_bool("PROXMOXER_MONITOR_MEMBER_DISCOVERY", &v)?;
        }
        if let Some(v) = env("PROXMOXER_TLS_CA_FILE") {
            raw.tls.ca_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env("PROXMOXER_TLS_INSECURE_SKIP_VERIFY") {
            raw.tls.insecure_skip_verify = parse_bool("PROXMOXER_TLS_INSECURE_SKIP_VERIFY", &v)?;
        }
        let mut tokens_file_key = "api.tokens_file";
        if let Some(v) = env("PROXMOXER_API_TOKENS_FILE") {
            raw.api.tokens_file = Some(PathBuf::from(v));
            tokens_file_key = "PROXMOXER_API_TOKENS_FILE";
        }
        if let Some(v) = env("PROXMOXER_API_ALLOW_UNAUTHENTICATED") {
            raw.api.allow_unauthenticated = parse_bool("PROXMOXER_API_ALLOW_UNAUTHENTICATED", &v)?;
        }
        let mut level_key = "log.level";
        if let Some(v) = env("PROXMOXER_LOG") {
            raw.log.level = v;
            level_key = "PROXMOXER_LOG";
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
            return Err(invalid(level_key, e.to_string()));
        }
        if let Some(v) = env("PROXMOXER_LOG_FORMAT") {
            raw.log.format = match v.trim().to_ascii_lowercase().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(invalid(
                        "PROXMOXER_LOG_FORMAT",
                        format!("{v:?} is not text or json"),
                    ));
                }
            };
        }

        let listen = raw.server.listen.parse::<SocketAddr>().map_err(|_| {
            invalid(
                listen_key,
                format!(
                    "{:?} is not an address:port such as 127.0.0.1:8080",
                    raw.server.listen
                ),
            )
        })?;
        if raw.storage.database.as_os_str().is_empty() {
            return Err(invalid("storage.database", "must not be empty"));
        }
        check_range(
            &raw.monitor.interval,
            "monitor.interval",
            MAX_MONITOR_INTERVAL,
        )?;
        if raw.monitor.failure_threshold == 0 {
            return Err(invalid("monitor.failure_threshold", "must be at least 1"));
        }
        check_range(&raw.proxmox.timeout, "proxmox.timeout", MAX_PROXMOX_TIMEOUT)?;
        check_range(
            &raw.server.shutdown_grace,
            "server.shutdown_grace",
            MAX_SHUTDOWN_GRACE,
        )?;
        check_range(
            &raw.server.header_timeout,
            "server.header_timeout",
            MAX_HEADER_TIMEOUT,
        )?;
        check_range(
            &raw.server.request_timeout,
            "server.request_timeout",
            MAX_REQUEST_TIMEOUT,
        )?;
        if !(1..=MAX_CONNECTIONS).contains(&raw.server.max_connections) {
            return Err(invalid(
                "server.max_connections",
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        let member_networks = raw
            .proxmox
            .member_networks
            .iter()
            .map(|net| Cidr::parse(net).map_err(|e| invalid(networks_key, e)))
            .collect::<Result<Vec<_>, _>>()?;
        // An empty value is more likely a broken template than a wish to drop authentication.
        if raw
            .api
            .tokens_file
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            return Err(invalid(
                tokens_file_key,
                "must not be empty; leave it out to run without API tokens",
            ));
        }
        check_etcd(&raw.storage)?;
        let key_file = match raw.storage.key_file {
            Some(path) if path.as_os_str().is_empty() => {
                return Err(invalid("storage.key_file", "must not be empty"));
            }
            Some(path) => path,
            None => default_key_file(&raw.storage.database, env("CREDENTIALS_DIRECTORY")),
        };
        Ok(Self {
            listen,
            shutdown_grace: raw.server.shutdown_grace,
            header_timeout: raw.server.header_timeout,
            request_timeout: raw.server.request_timeout,
            max_connections: raw.server.max_connections,
            database: raw.storage.database,
            key_file,
            monitor_interval: raw.monitor.interval,
            failure_threshold: raw.monitor.failure_threshold,
            proxmox_timeout: raw.proxmox.timeout,
            log_level: raw.log.level,
            log_format: raw.log.format,
            tls_ca_file: raw.tls.ca_file.filter(|p| !p.as_os_str().is_empty()),
            tls_insecure_skip_verify: raw.tls.insecure_skip_verify,
            member_discovery: raw.monitor.member_discovery,
            member_networks,
            api_tokens_file: raw.api.tokens_file,
            api_allow_unauthenticated: raw.api.allow_unauthenticated,
            backend: raw.storage.backend,
            etcd: raw.storage.etcd,
        })
    }
}

fn check_etcd(storage: &StorageSection) -> Result<(), ConfigError> {
    let etcd = &storage.etcd;
    if storage.backend == StorageBackend::Etcd && etcd.endpoints.is_empty() {
        return Err(invalid(
            "storage.etcd.endpoints",
            "must list at least one etcd client URL when storage.backend is etcd",
        ));
    }
    if let Some(bad) = etcd.endpoints.iter().find(|e| e.trim().is_empty()) {
        return Err(invalid(
            "storage.etcd.endpoints",
            format!("{bad:?} is not a URL"),
        ));
    }
    // The prefix ends every key range; a bare "/" or a trailing slash would make
    // "/proxmoxer/" and "/proxmoxer2/" overlap or double the separator.
    if !etcd.prefix.starts_with('/') || etcd.prefix.len() < 2 || etcd.prefix.ends_with('/') {
        return Err(invalid(
            "storage.etcd.prefix",
            "must start with / and not end with it, e.g. /proxmoxer",
        ));
    }
    if etcd.lease_ttl < MIN_ETCD_LEASE_TTL || etcd.lease_ttl > MAX_ETCD_LEASE_TTL {
        return Err(invalid(
            "storage.etcd.lease_ttl",
            format!(
                "must be between {} and {}",
                humantime::format_duration(MIN_ETCD_LEASE_TTL),
                humantime::format_duration(MAX_ETCD_LEASE_TTL)
            ),
        ));
    }
    if etcd.client_cert_file.is_some() != etcd.client_key_file.is_some() {
        return Err(invalid(
            "storage.etcd.client_cert_file",
            "client_cert_file and client_key_file go together",
        ));
    }
    if etcd.password_file.is_some() && etcd.username.is_none() {
        return Err(invalid(
            "storage.etcd.password_file",
            "needs storage.etcd.username",
        ));
    }
    Ok(())
}

/// Under systemd, `LoadCredential=proxmoxer.key:...` puts the key in `$CREDENTIALS_DIRECTORY`;
/// otherwise it lives beside the database.
fn default_key_file(database: &Path, credentials_dir: Option<String>) -> PathBuf {
    if let Some(dir) = credentials_dir {
        let candidate = Path::new(&dir).join(KEY_FILE_NAME);
        if candidate.exists() {
            return candidate;
        }
    }
    database
        .parent()
        .unwrap_or_else(|| Path::new(""))
        .join(KEY_FILE_NAME)
}

/// Bounds keep derived periods (stale windows, back-offs) far from overflow, and catch typos
/// such as `30d` for `30s`.
const MAX_MONITOR_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);
const MAX_PROXMOX_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(60 * 60);
/// Longer than any client needs, short enough that a stalled client cannot hold a connection
/// for long.
const MAX_HEADER_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// Linux's default ceiling on open files per process (`fs.nr_open`).
const MAX_CONNECTIONS: usize = 1 << 20;

fn check_range(value: &Duration, key: &str, max: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    if *value > max {
        return Err(invalid(
            key,
            format!(
                "{} is more than the maximum of {}",
                humantime::format_duration(*value),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(invalid(key, format!("{value:?} is not true or false"))),
    }
}

fn parse_duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        invalid(
            key,
            format!("{value:?} is not a duration such as 30s or 500ms ({e})"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("proxmoxer.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).expect("write config");
        }
        Config::load_with(file.map(|_| path.as_path()), |k| env.get(k).cloned())
    }

    #[test]
    fn defaults_need_no_file() {
        let config = load(None, &[]).expect("defaults are valid");
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().expect("addr"));
        assert_eq!(config.database, PathBuf::from(DEFAULT_DATABASE));
        assert_eq!(config.key_file, PathBuf::from("data/proxmoxer.key"));
        assert_eq!(config.monitor_interval, DEFAULT_MONITOR_INTERVAL);
        assert_eq!(config.failure_threshold, 3);
        assert_eq!(config.proxmox_timeout, DEFAULT_PROXMOX_TIMEOUT);
    }

    #[test]
    fn the_example_file_matches_the_defaults_but_for_the_tokens_file() {
        let example = include_str!("../config/proxmoxer.toml");
        let mut shipped = load(Some(example), &[]).expect("example is valid");
        // Installed, the API must not run open by accident; from a checkout, it may.
        assert_eq!(
            shipped.api_tokens_file.take(),
            Some(PathBuf::from("/etc/proxmoxer/api-tokens"))
        );
        assert_eq!(shipped, load(None, &[]).expect("defaults"));
    }

    #[test]
    fn the_api_section_and_its_environment_overrides() {
        let defaults = load(None, &[]).expect("defaults");
        assert_eq!(defaults.api_tokens_file, None);
        assert!(!defaults.api_allow_unauthenticated);
        let file = "[api]\ntokens_file = \"/etc/a\"\nallow_unauthenticated = true\n";
        let config = load(Some(file), &[]).expect("valid");
        assert_eq!(config.api_tokens_file, Some(PathBuf::from("/etc/a")));
        assert!(config.api_allow_unauthenticated);
        let config = load(
            Some(file),
            &[
                ("PROXMOXER_API_TOKENS_FILE", "/run/b"),
                ("PROXMOXER_API_ALLOW_UNAUTHENTICATED", "false"),
            ],
        )
        .expect("valid");
        assert_eq!(config.api_tokens_file, Some(PathBuf::from("/run/b")));
        assert!(!config.api_allow_unauthenticated);
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = load(
            Some("[monitor]\ninterval = \"1m\"\n[proxmox]\ntimeout = \"5s\"\n"),
            &[
                ("PROXMOXER_MONITOR_INTERVAL", "500ms"),
                ("PROXMOXER_LISTEN", "0.0.0.0:9000"),
                ("PROXMOXER_DATABASE", "/var/lib/proxmoxer/db.redb"),
            ],
        )
        .expect("valid");
        assert_eq!(config.monitor_interval, Duration::from_millis(500));
        assert_eq!(config.proxmox_timeout, Duration::from_secs(5));
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(
            config.key_file,
            PathBuf::from("/var/lib/proxmoxer/proxmoxer.key")
        );
    }

    #[test]
    fn the_etcd_backend_takes_its_settings_from_file_and_environment() {
        let config = load(
            Some("[storage]\nbackend = \"etcd\"\n[storage.etcd]\nendpoints = [\"http://10.0.0.1:2379\"]\n"),
            &[
                (
                    "PROXMOXER_STORAGE_ETCD_ENDPOINTS",
                    "http://127.0.0.1:2379, http://127.0.0.2:2379",
                ),
                ("PROXMOXER_STORAGE_ETCD_PREFIX", "/site-a"),
                ("PROXMOXER_STORAGE_ETCD_LEASE_TTL", "4s"),
            ],
        )
        .expect("valid");
        assert_eq!(config.backend, StorageBackend::Etcd);
        assert_eq!(
            config.etcd.endpoints,
            ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]
        );
        assert_eq!(config.etcd.prefix, "/site-a");
        assert_eq!(config.etcd.lease_ttl, Duration::from_secs(4));
        let defaults = load(None, &[]).expect("valid");
        assert_eq!(defaults.backend, StorageBackend::Redb);
        assert_eq!(defaults.etcd.prefix, DEFAULT_ETCD_PREFIX);
        assert_eq!(defaults.etcd.lease_ttl, DEFAULT_ETCD_LEASE_TTL);
    }

    #[test]
    fn errors_name_the_key() {
        type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                None,
                &[("PROXMOXER_MONITOR_INTERVAL", "often")],
                "PROXMOXER_MONITOR_INTERVAL",
            ),
            (
                None,
                &[("PROXMOXER_LISTEN", "localhost")],
                "PROXMOXER_LISTEN",
            ),
            (
                Some("[server]\nlisten = \"localhost\"\n"),
                &[],
                "server.listen",
            ),
            (
                None,
                &[("PROXMOXER_PROXMOX_TIMEOUT", "300000000000years")],
                "proxmox.timeout",
            ),
            (
                None,
                &[("PROXMOXER_MONITOR_INTERVAL", "30d")],
                "monitor.interval",
            ),
            (
                None,
                &[("PROXMOXER_MONITOR_FAILURE_THRESHOLD", "0")],
                "monitor.failure_threshold",
            ),
            (Some("[monitor]\ninterval = 5\n"), &[], "interval"),
            (Some("[monitr]\n"), &[], "monitr"),
            (
                Some("[server]\nheader_timeout = \"0s\"\n"),
                &[],
                "server.header_timeout",
            ),
            (
                Some("[server]\nrequest_timeout = \"2h\"\n"),
                &[],
                "server.request_timeout",
            ),
            (
                Some("[server]\nmax_connections = 0\n"),
                &[],
                "server.max_connections",
            ),
            (
                None,
                &[("PROXMOXER_PROXMOX_MEMBER_NETWORKS", "127.0.0.0/8,lan")],
                "PROXMOXER_PROXMOX_MEMBER_NETWORKS",
            ),
            (
                Some("[proxmox]\nmember_networks = [\"127.0.0.0/99\"]\n"),
                &[],
                "proxmox.member_networks",
            ),
            (
                None,
                &[("PROXMOXER_STORAGE_BACKEND", "postgres")],
                "PROXMOXER_STORAGE_BACKEND",
            ),
            (
                None,
                &[("PROXMOXER_STORAGE_BACKEND", "etcd")],
                "storage.etcd.endpoints",
            ),
            (
                Some("[storage.etcd]\nprefix = \"/\"\n"),
                &[],
                "storage.etcd.prefix",
            ),
            (
                None,
                &[("PROXMOXER_STORAGE_ETCD_LEASE_TTL", "100ms")],
                "storage.etcd.lease_ttl",
            ),
            (
                Some("[storage.etcd]\nclient_cert_file = \"/etc/c.pem\"\n"),
                &[],
                "storage.etcd.client_cert_file",
            ),
            (
                None,
                &[("PROXMOXER_MONITOR_MEMBER_DISCOVERY", "maybe")],
                "PROXMOXER_MONITOR_MEMBER_DISCOVERY",
            ),
            (
                None,
                &[("PROXMOXER_API_TOKENS_FILE", "")],
                "PROXMOXER_API_TOKENS_FILE",
            ),
            (Some("[api]\ntokens_file = \"\"\n"), &[], "api.tokens_file"),
            (
                None,
                &[("PROXMOXER_API_ALLOW_UNAUTHENTICATED", "maybe")],
                "PROXMOXER_API_ALLOW_UNAUTHENTICATED",
            ),
        ];
        for (file, env, key) in cases {
            let error = load(*file, env).expect_err("must be refused").to_string();
            assert!(error.contains(key), "{error:?} should name {key}");
        }
    }
}
