//! Credentials at rest: an XChaCha20-Poly1305 envelope under a 256-bit key kept in a key file.
//!
//! Each sealed secret carries its own random 192-bit nonce, and the cluster id is bound in as
//! associated data, so a ciphertext copied onto another record does not decrypt.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::domain::Secret;

const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read key file {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create key file {path}: {source}")]
    CreateKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is malformed: expected {} hex digits", KEY_BYTES * 2)]
    MalformedKey { path: PathBuf },
    #[error("the system random number generator failed")]
    Random,
    #[error("a stored secret could not be decrypted with this key")]
    Decrypt,
    #[error("a stored secret is malformed")]
    Malformed,
}

/// An encrypted secret as it is stored: hex nonce and hex ciphertext (with its tag).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    nonce: String,
    ciphertext: String,
}

impl std::fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealedSecret(..)")
    }
}

/// Seals and opens secrets under the daemon's key. `Debug` never shows the key.
pub struct Vault {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Vault(..)")
    }
}

impl Vault {
    /// Reads the key file. A missing file is `Ok(None)`, so the caller decides whether a new
    /// key may be made: that is only safe while no secret sealed under an old key exists.
    pub fn load(path: &Path) -> Result<Option<Self>, SecretsError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(SecretsError::ReadKey {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let malformed = || SecretsError::MalformedKey {
            path: path.to_owned(),
        };
        let bytes = hex::decode(text.trim()).map_err(|_| malformed())?;
        let cipher = XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| malformed())?;
        if bytes.len() != KEY_BYTES {
            return Err(malformed());
        }
        Ok(Some(Self { cipher }))
    }

    /// Generates a fresh key and writes it to `path` with mode 0600. Fails if the file exists,
    /// so an existing key is never overwritten.
    pub fn create(path: &Path) -> Result<Self, SecretsError> {
        let key = chacha20poly1305::Key::try_generate().map_err(|_| SecretsError::Random)?;
        let create_err = |source| SecretsError::CreateKey {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(create_err)?;
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(create_err)?;
        // The mode passed to open is filtered by the umask; make sure it really is 0600.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(create_err)?;
        writeln!(file, "{}", hex::encode(key.as_slice())).map_err(create_err)?;
        file.sync_all().map_err(create_err)?;
        Ok(Self {
            cipher: XChaCha20Poly1305::new(&key),
        })
    }

    pub fn seal(&self, secret: &Secret, context: &[u8]) -> Result<SealedSecret, SecretsError> {
        let nonce = XNonce::try_generate().map_err(|_| SecretsError::Random)?;
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: secret.expose().as_bytes(),
                    aad: context,
                },
            )
            .map_err(|_| SecretsError::Malformed)?;
        Ok(SealedSecret {
            nonce: hex::encode(nonce.as_slice()),
            ciphertext: hex::encode(ciphertext),
        })
    }

    pub fn open(&self, sealed: &SealedSecret, context: &[u8]) -> Result<Secret, SecretsError> {
        let nonce_bytes = hex::decode(&sealed.nonce).map_err(|_| SecretsError::Malformed)?;
        let nonce =
            XNonce::try_from(nonce_bytes.as_slice()).map_err(|_| SecretsError::Malformed)?;
        let ciphertext = hex::decode(&sealed.ciphertext).map_err(|_| SecretsError::Malformed)?;
        let plaintext = self
            .cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &ciphertext,
                    aad: context,
                },
            )
            .map_err(|_| SecretsError::Decrypt)?;
        String::from_utf8(plaintext)
            .map(Secret::new)
            .map_err(|_| SecretsError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secret_opens_only_with_its_key_and_context() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = Vault::create(&dir.path().join("a.key")).expect("create key");
        let other = Vault::create(&dir.path().join("b.key")).expect("create key");
        let sealed = vault
            .seal(&Secret::new("hunter2"), b"cluster-1")
            .expect("seal");
        assert!(!sealed.ciphertext.contains(&hex::encode("hunter2")));
        assert_eq!(
            vault.open(&sealed, b"cluster-1").expect("open").expose(),
            "hunter2"
        );
        assert!(vault.open(&sealed, b"cluster-2").is_err());
        assert!(other.open(&sealed, b"cluster-1").is_err());
    }

    #[test]
    fn key_file_is_private_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.key");
        Vault::create(&path).expect("create key");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(Vault::create(&path).is_err());
        assert!(Vault::load(&path).expect("load").is_some());
        assert!(
            Vault::load(&dir.path().join("missing"))
                .expect("load")
                .is_none()
        );
    }
}
