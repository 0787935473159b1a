//! The API tokens file: who may call the API, and with which role.
//!
//! One token per line, `name:role:sha256-hex`, where the hash is the lowercase hex SHA-256 of
//! the whole secret as printed (`pmx_` and 43 base64url characters: 256 random bits). `#`
//! starts a comment line; blank lines are ignored. The secret itself is shown once, by
//! [`add`], and never stored.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Every secret starts with this, so a leaked one is recognisable in a scanner's findings.
pub const SECRET_PREFIX: &str = "pmx_";
/// 256 random bits per secret.
const SECRET_BYTES: usize = 32;
/// Token names: 1 to 64 characters out of `A-Z a-z 0-9 _ . -`.
pub const MAX_NAME_LEN: usize = 64;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// GET and HEAD requests: reads, the event stream, metrics, the OpenAPI document.
    Read,
    /// Every request, writes included.
    Admin,
}

impl Role {
    /// Parses `read` or `admin`, as written in the file and on the command line.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Self::Read),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    /// The name written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of the file: a token's name, role and the hash of its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// Names the caller in logs and audit lines; never secret.
    pub name: String,
    /// What the token may do.
    pub role: Role,
    hash: [u8; 32],
}

/// The hash is not the secret, but it has no business in logs either.
impl fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// The tokens of one version of the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenSet {
    entries: Vec<TokenEntry>,
}

/// Why a line of the file was refused; `line` counts from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct MalformedLine {
    /// The line number, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// Reading, parsing or changing the tokens file failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// A configured file that is missing must not silently open the API.
    #[error(
        "the API tokens file {0} does not exist; create it with \
         `proxmoxer token add NAME --role admin --tokens-file {0}`"
    )]
    Missing(PathBuf),
    /// The file exists but cannot be read.
    #[error("cannot read the API tokens file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// A line of the file is malformed; nothing of the file is used.
    #[error("the API tokens file {path} is malformed at {error}")]
    Malformed { path: PathBuf, error: MalformedLine },
    /// The file could not be written.
    #[error("cannot write the API tokens file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// A token name outside the allowed characters or length.
    #[error(
        "invalid token name {0:?}: use 1 to {MAX_NAME_LEN} characters out of A-Z, a-z, 0-9, \
         `_`, `.` and `-`"
    )]
    InvalidName(String),
    /// `token add` with a name the file already has.
    #[error("a token named {0:?} already exists")]
    NameTaken(String),
    /// `token remove` with a name the file does not have.
    #[error("no token named {0:?}")]
    UnknownName(String),
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// Whether `name` may name a token: 1 to 64 of `A-Z a-z 0-9 _ . -`. Keeps names free of the
/// file's separator and safe to print in logs.
pub fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl TokenSet {
    /// Parses the file's text; the first malformed line refuses the whole file.
    pub fn parse(text: &str) -> Result<Self, MalformedLine> {
        let mut entries: Vec<TokenEntry> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let malformed = |reason: String| MalformedLine { line, reason };
            let fields: Vec<&str> = content.split(':').collect();
            let [name, role, hash] = fields[..] else {
                return Err(malformed(format!(
                    "expected name:role:sha256-hex, found {} field(s)",
                    fields.len()
                )));
            };
            if !is_valid_name(name) {
                return Err(malformed(format!(
                    "invalid token name {name:?} (1 to {MAX_NAME_LEN} characters out of \
                     A-Z, a-z, 0-9, `_`, `.` and `-`)"
                )));
            }
            let role = Role::parse(role).ok_or_else(|| {
                malformed(format!("unknown role {role:?} (expected read or admin)"))
            })?;
            let hash = parse_hash(hash).ok_or_else(|| {
                malformed(format!(
                    "the hash of token {name:?} is not 64 lowercase hex digits"
                ))
            })?;
            if entries.iter().any(|entry| entry.name == name) {
                return Err(malformed(format!("duplicate token name {name:?}")));
            }
            entries.push(TokenEntry {
                name: name.to_owned(),
                role,
                hash,
            });
        }
        Ok(Self { entries })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = read(path)?.ok_or_else(|| TokenFileError::Missing(path.to_owned()))?;
        Self::parse(&text).map_err(|error| TokenFileError::Malformed {
            path: path.to_owned(),
            error,
        })
    }

    /// The tokens, in file order.
    pub fn entries(&self) -> &[TokenEntry] {
        &self.entries
    }

    /// Whether the file names no token at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The token whose secret is `presented`, if any. Every stored hash is compared, in
    /// constant time, whatever matched before: the time taken says nothing about which
    /// token, or how much of one, was right.
    pub fn find(&self, presented: &str) -> Option<&TokenEntry> {
        let hash = hash_secret(presented);
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.hash.ct_eq(&hash)) {
                found = Some(entry);
            }
        }
        found
    }
}

/// Lowercase only: the file has one spelling of each hash, so tools may compare lines.
fn parse_hash(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut hash = [0u8; 32];
    hex::decode_to_slice(text, &mut hash).ok()?;
    Some(hash)
}

/// The file's text, or `None` when it does not exist.
fn read(path: &Path) -> Result<Option<String>, TokenFileError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenFileError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A new secret: `pmx_` and 256 random bits as 43 base64url characters.
fn generate_secret() -> Result<String, TokenFileError> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes).map_err(|_| TokenFileError::Random)?;
    Ok(format!("{SECRET_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// Adds a token named `name` with `role` to the file at `path` (created with mode 0600 when
/// missing) and returns its secret, which exists nowhere else. An existing name, an invalid
/// name or a malformed file changes nothing.
pub fn add(path: &Path, name: &str, role: Role) -> Result<String, TokenFileError> {
    if !is_valid_name(name) {
        return Err(TokenFileError::InvalidName(name.to_owned()));
    }
    let existing = read(path)?;
    let text = existing.as_deref().unwrap_or_default();
    let tokens = TokenSet::parse(text).map_err(|error| TokenFileError::Malformed {
        path: path.to_owned(),
        error,
    })?;
    if tokens.entries.iter().any(|entry| entry.name == name) {
        return Err(TokenFileError::NameTaken(name.to_owned()));
    }
    let secret = generate_secret()?;
    let separator = if text.is_empty() || text.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    let line = format!(
        "{separator}{name}:{role}:{}\n",
        hex::encode(hash_secret(&secret))
    );
    let write_error = |source| TokenFileError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(write_error)?;
    if existing.is_none() {
        // The mode given to open is filtered by the umask; make sure it really is 0600.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(write_error)?;
    }
    file.write_all(line.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    Ok(secret)
}

/// Removes the token named `name` from the file at `path`, keeping every other line (comments
/// included) and the file's mode. The file is replaced in one rename, so a daemon re-reading
/// it sees the old or the new version, never half of one.
pub fn remove(path: &Path, name: &str) -> Result<(), TokenFileError> {
    let text = read(path)?.ok_or_else(|| TokenFileError::Missing(path.to_owned()))?;
    let tokens = TokenSet::parse(&text).map_err(|error| TokenFileError::Malformed {
        path: path.to_owned(),
        error,
    })?;
    if !tokens.entries.iter().any(|entry| entry.name == name) {
        return Err(TokenFileError::UnknownName(name.to_owned()));
    }
    let kept: String = text
        .split_inclusive('\n')
        .filter(|line| {
            let content = line.trim();
            content.starts_with('#') || content.split(':').next() != Some(name)
        })
        .collect();
    let write_error = |source| TokenFileError::Write {
        path: path.to_owned(),
        source,
    };
    let mode = fs::metadata(path)
        .map_err(write_error)?
        .permissions()
        .mode()
        & 0o7777;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(kept.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    })();
    if let Err(source) = written {
        let _ = fs::remove_file(&temporary);
        return Err(write_error(source));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn parses_tokens_comments_and_blank_lines() {
        let text = format!("# operators\n\nalice:admin:{HASH}\n  grafana:read:{HASH}  \n");
        let tokens = TokenSet::parse(&text).expect("valid");
        let names: Vec<_> = tokens
            .entries()
            .iter()
            .map(|e| (e.name.as_str(), e.role))
            .collect();
        assert_eq!(names, [("alice", Role::Admin), ("grafana", Role::Read)]);
    }

    #[test]
    fn malformed_lines_are_refused_with_their_number() {
        let upper = HASH.to_uppercase();
        let cases = [
            (
                format!("a:admin:{HASH}\nb:owner:{HASH}\n"),
                2,
                "unknown role",
            ),
            (format!("a:admin:{HASH}\n\na:read:{HASH}\n"), 3, "duplicate"),
            (format!("a:admin:{upper}\n"), 1, "64 lowercase hex"),
            (format!("a:admin:{}\n", &HASH[..63]), 1, "64 lowercase hex"),
            ("# c\na:admin\n".to_owned(), 2, "field"),
            (format!("a:admin:{HASH}:x\n"), 1, "field"),
            (format!("bad name:admin:{HASH}\n"), 1, "invalid token name"),
        ];
        for (text, line, reason) in cases {
            let error = TokenSet::parse(&text).expect_err(&text);
            assert_eq!(error.line, line, "{text:?}: {error}");
            assert!(error.reason.contains(reason), "{text:?}: {error}");
        }
    }

    #[test]
    fn names_follow_the_documented_rule() {
        for good in ["a", "grafana-prod", "ci.deploy_2", &"x".repeat(64)] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "a:b", "a b", "ä", &"x".repeat(65), "a\n"] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn secrets_are_prefixed_256_bit_base64url_and_found_by_their_hash() {
        let secret = generate_secret().expect("random");
        let encoded = secret.strip_prefix(SECRET_PREFIX).expect("prefix");
        assert_eq!(encoded.len(), 43);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(encoded).expect("base64url").len(),
            32
        );
        assert_ne!(secret, generate_secret().expect("random"));

        let text = format!(
            "other:read:{HASH}\nmine:admin:{}\n",
            hex::encode(hash_secret(&secret))
        );
        let tokens = TokenSet::parse(&text).expect("valid");
        assert_eq!(tokens.find(&secret).map(|e| e.name.as_str()), Some("mine"));
        assert_eq!(tokens.find("pmx_wrong"), None);
        assert_eq!(tokens.find(""), None);
    }

    #[test]
    fn add_and_remove_edit_the_file_and_refuse_what_would_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api-tokens");
        let secret = add(&path, "alice", Role::Admin).expect("add to a new file");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A comment and a last line without its newline, as an editor might leave them.
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        write!(file, "# grafana below\nbob:read:{HASH}").expect("append");
        drop(file);
        let grafana = add(&path, "grafana", Role::Read).expect("add");

        let before = fs::read_to_string(&path).expect("read");
        assert!(!before.contains(&secret) && !before.contains(&grafana));
        assert!(matches!(
            add(&path, "alice", Role::Read),
            Err(TokenFileError::NameTaken(_))
        ));
        assert!(matches!(
            remove(&path, "carol"),
            Err(TokenFileError::UnknownName(_))
        ));
        assert!(matches!(
            add(&path, "a:b", Role::Read),
            Err(TokenFileError::InvalidName(_))
        ));
        assert_eq!(fs::read_to_string(&path).expect("read"), before);

        remove(&path, "bob").expect("remove");
        let tokens = TokenSet::load(&path).expect("load");
        assert_eq!(tokens.find(&secret).map(|e| e.role), Some(Role::Admin));
        assert_eq!(tokens.find(&grafana).map(|e| e.role), Some(Role::Read));
        assert_eq!(tokens.len(), 2);
        assert!(
            fs::read_to_string(&path)
                .expect("read")
                .contains("# grafana below\n")
        );
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_missing_file_is_an_error_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api-tokens");
        assert!(matches!(
            TokenSet::load(&path),
            Err(TokenFileError::Missing(_))
        ));
        assert!(matches!(
            remove(&path, "alice"),
            Err(TokenFileError::Missing(_))
        ));
    }
}
