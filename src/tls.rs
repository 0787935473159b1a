//! Whom to trust when talking TLS to Proxmox.
//!
//! A stock Proxmox node serves a certificate from its own cluster CA, which no system trusts.
//! Operators either pin the node's SHA-256 fingerprint (trusted exactly when the leaf matches,
//! chain and name unchecked) or trust a CA file such as the cluster's `pve-root-ca.pem` on top
//! of the system roots. Either way the verifier records the certificate the server presented,
//! so a refusal can tell the operator which fingerprint to compare with the GUI.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::domain::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read tls.ca_file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// The SHA-256 fingerprint of a certificate, compared as 32 bytes and shown as Proxmox shows
/// it: uppercase hex pairs joined by colons.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Accepts either case, with or without colons (the GUI shows `AB:CD:…`, PDM `ab:cd:…`).
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let hex_digits: String = raw.trim().chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&hex_digits)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok());
        bytes.map(Self).ok_or_else(|| {
            ValidationError::new(
                "fingerprint",
                "Fingerprint is invalid",
                "must be a SHA-256 fingerprint: 64 hex digits, optionally in pairs joined by colons",
            )
        })
    }

    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pairs: Vec<String> = self.0.iter().map(|b| format!("{b:02X}")).collect();
        f.write_str(&pairs.join(":"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// The certificate a server presented in the latest handshake of one client.
#[derive(Debug, Default, Clone)]
pub struct PresentedCertificate(Arc<Mutex<Option<Fingerprint>>>);

impl PresentedCertificate {
    pub fn take(&self) -> Option<Fingerprint> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn record(&self, fingerprint: Fingerprint) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(fingerprint);
    }
}

/// The daemon-wide trust settings, loaded once at start.
#[derive(Debug, Clone)]
pub struct TrustAnchors {
    provider: Arc<CryptoProvider>,
    /// `None` when neither the system nor `tls.ca_file` supplied a root: nothing chains.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    insecure_skip_verify: bool,
}

impl TrustAnchors {
    /// The system roots plus the certificates of `ca_file`.
    pub fn load(ca_file: Option<&Path>, insecure_skip_verify: bool) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::debug!(%error, "skipping an unreadable system root certificate");
        }
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = ca_file {
            let ca_error = |message: String| TlsError::CaFile {
                path: path.to_owned(),
                message,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_error(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("it holds no PEM certificate".into()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| ca_error(format!("it holds an unusable CA certificate ({e})")))?;
            }
        }
        let webpki = if roots.is_empty() {
            None
        } else {
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?,
            )
        };
        if insecure_skip_verify {
            tracing::warn!(
                "tls.insecure_skip_verify is on: certificates of clusters without a pinned \
                 fingerprint are NOT verified, and anyone on the path can read their credentials"
            );
        }
        Ok(Self {
            provider,
            webpki,
            insecure_skip_verify,
        })
    }

    /// Whether certificates of unpinned clusters are accepted unverified.
    pub fn insecure_skip_verify(&self) -> bool {
        self.insecure_skip_verify
    }

    /// A rustls client configuration for one cluster, and the handle through which it reports
    /// the certificate each handshake saw.
    pub fn client_config(
        &self,
        pin: Option<Fingerprint>,
    ) -> Result<(ClientConfig, PresentedCertificate), TlsError> {
        let presented = PresentedCertificate::default();
        let verifier = ProxmoxVerifier {
            pin,
            webpki: self.webpki.clone(),
            insecure_skip_verify: self.insecure_skip_verify,
            warn_on_skip: true,
            algorithms: self.provider.signature_verification_algorithms,
            presented: presented.clone(),
        };
        Ok((self.config_with(verifier)?, presented))
    }

    fn config_with(&self, verifier: ProxmoxVerifier) -> Result<ClientConfig, TlsError> {
        Ok(ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth())
    }
}

/// Connects to `url` and returns the fingerprint of the certificate the server presents,
/// trusted or not. Sends no credentials.
pub async fn presented_fingerprint(
    url: &str,
    timeout: std::time::Duration,
) -> Result<Fingerprint, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url} is not a URL: {e}"))?;
    if parsed.scheme() != "https" {
        return Err(format!("{url} is not an https URL"));
    }
    let anchors = TrustAnchors::load(None, false).map_err(|e| e.to_string())?;
    let presented = PresentedCertificate::default();
    let verifier = ProxmoxVerifier {
        pin: None,
        webpki: None,
        // Only looking: no credentials go over this connection.
        insecure_skip_verify: true,
        warn_on_skip: false,
        algorithms: anchors.provider.signature_verification_algorithms,
        presented: presented.clone(),
    };
    let config = anchors.config_with(verifier).map_err(|e| e.to_string())?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let outcome = client.get(parsed).send().await;
    match (presented.take(), outcome) {
        (Some(fingerprint), _) => Ok(fingerprint),
        (None, Err(e)) => Err(format!("cannot connect to {url}: {e}")),
        (None, Ok(_)) => Err(format!("{url} presented no certificate")),
    }
}

#[derive(Debug)]
struct ProxmoxVerifier {
    pin: Option<Fingerprint>,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    insecure_skip_verify: bool,
    /// Skipping verification is worth a warning, except when only looking at a certificate.
    warn_on_skip: bool,
    algorithms: WebPkiSupportedAlgorithms,
    presented: PresentedCertificate,
}

impl ServerCertVerifier for ProxmoxVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fingerprint = Fingerprint::of_der(end_entity);
        self.presented.record(fingerprint);
        if let Some(pin) = self.pin {
            return if fingerprint == pin {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            };
        }
        if self.insecure_skip_verify {
            if self.warn_on_skip {
                tracing::warn!(%fingerprint, server = ?server_name, "accepting a certificate without verifying it (tls.insecure_skip_verify)");
            }
            return Ok(ServerCertVerified::assertion());
        }
        match &self.webpki {
            Some(webpki) => webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        }
    }

    // Signatures are always checked, pin or not: a pin alone would let anyone holding a copy
    // of the public certificate impersonate the node.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUI_FORM: &str = "3A:9F:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:01:23:45:67:89:AB:CD:EF:10:32:54:76:98:BA";

    #[test]
    fn fingerprints_parse_in_any_case_with_or_without_colons() {
        let upper = Fingerprint::parse(GUI_FORM).expect("GUI form");
        let lower = Fingerprint::parse(&GUI_FORM.to_lowercase()).expect("lower case");
        let bare = Fingerprint::parse(&GUI_FORM.replace(':', "")).expect("no colons");
        assert_eq!(upper, lower);
        assert_eq!(upper, bare);
        assert_eq!(bare.to_string(), GUI_FORM);
    }

    #[test]
    fn malformed_fingerprints_are_refused() {
        for raw in [
            "",
            "3A:9F",
            &GUI_FORM.replace("3A", "ZZ"),
            &format!("{GUI_FORM}:00"),
        ] {
            assert!(Fingerprint::parse(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn a_pinned_client_configuration_builds_with_reqwest() {
        let anchors = TrustAnchors::load(None, false).expect("anchors");
        let (config, _) = anchors
            .client_config(Some(Fingerprint::parse(GUI_FORM).expect("pin")))
            .expect("config");
        // reqwest only accepts a ClientConfig of the exact rustls it links, and says so at run
        // time: building proves the versions match.
        reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .build()
            .expect("reqwest takes the configuration");
    }
}
