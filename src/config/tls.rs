//! `[amqp.tls]`: a private CA and a client certificate for `amqps://`
//! brokers (contract §2).
//!
//! The files are read and parsed when the configuration is validated, so a
//! missing or wrong file stops the program at start-up with the key's name
//! instead of failing every connection attempt later; that includes a
//! client certificate rustls cannot present (X.509 v1). Messages about the
//! key file never quote its content.

use std::path::{Path, PathBuf};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[amqp.tls]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file of the CA(s) that signed the broker's certificate, trusted in
    /// addition to the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for brokers that require one.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate; its content is never
    /// printed (the path is).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

impl TlsSettings {
    /// Whether any TLS setting is given.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client_cert_file.is_some() || self.client_key_file.is_some()
    }

    /// Reads and checks the files into lapin's TLS configuration (the
    /// system's roots alone when nothing is set).
    pub fn load(&self) -> Result<OwnedTLSConfig, ConfigError> {
        let cert_chain = match &self.ca_file {
            Some(path) => {
                let pem = read("amqp.tls.ca_file", path)?;
                certificates("amqp.tls.ca_file", path, &pem)?;
                Some(String::from_utf8(pem).map_err(|_| {
                    ConfigError::invalid(
                        "amqp.tls.ca_file",
                        format!("{} is not a PEM text file", path.display()),
                    )
                })?)
            }
            None => None,
        };
        let identity = match (&self.client_cert_file, &self.client_key_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "amqp.tls.client_key_file",
                    "is required when amqp.tls.client_cert_file is set",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "amqp.tls.client_cert_file",
                    "is required when amqp.tls.client_key_file is set",
                ));
            }
            (Some(cert_path), Some(key_path)) => {
                let pem = read(CLIENT_CERT_KEY, cert_path)?;
                certificates(CLIENT_CERT_KEY, cert_path, &pem)?;
                usable_as_client_certificate(cert_path, &pem)?;
                let key = read("amqp.tls.client_key_file", key_path)?;
                // The parser's error can quote a line of the file: never
                // shown for the key.
                if PrivateKeyDer::from_pem_slice(&key).is_err() {
                    return Err(ConfigError::invalid(
                        "amqp.tls.client_key_file",
                        format!(
                            "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                            key_path.display()
                        ),
                    ));
                }
                Some(OwnedIdentity::PKCS8 { pem, key })
            }
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }

    /// The lines of the client key file, so that the log writer can mask
    /// them should anything ever print them. Empty when unset or unreadable
    /// (validation reports that).
    pub(super) fn key_secrets(&self) -> Vec<String> {
        let Some(text) = self
            .client_key_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        else {
            return Vec::new();
        };
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("-----"))
            .map(str::to_owned)
            .collect()
    }
}

/// The key of the client certificate, named by every message about it.
const CLIENT_CERT_KEY: &str = "amqp.tls.client_cert_file";

/// How to make a client certificate rustls can present.
const REISSUE: &str = "re-issue it as an X.509 v3 certificate with extendedKeyUsage=clientAuth (openssl x509 -req makes v1 unless given -extfile with a line 'extendedKeyUsage=clientAuth')";

/// Checks that rustls can present the first certificate of `pem` (the
/// client's own). rustls parses it with webpki, which takes X.509 v3 only:
/// an X.509 v1 certificate, what `openssl x509 -req` makes without
/// `-extfile`, fails every handshake before it starts, in a way the
/// connection error reports as the broker's certificate not being trusted.
fn usable_as_client_certificate(path: &Path, pem: &[u8]) -> Result<(), ConfigError> {
    // `certificates` has checked that there is one and that it is PEM.
    let Some(Ok(der)) = CertificateDer::pem_slice_iter(pem).next() else {
        return Ok(());
    };
    match webpki::EndEntityCert::try_from(&der) {
        Ok(_) => Ok(()),
        Err(webpki::Error::UnsupportedCertVersion) => Err(ConfigError::invalid(
            CLIENT_CERT_KEY,
            format!(
                "{} is an X.509 v1 certificate, which TLS (rustls) cannot use as a client certificate: {REISSUE}",
                path.display()
            ),
        )),
        Err(e) => Err(ConfigError::invalid(
            CLIENT_CERT_KEY,
            format!(
                "{} holds a certificate TLS (rustls) cannot use as a client certificate ({e}): {REISSUE}",
                path.display()
            ),
        )),
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))
}

fn certificates(key: &'static str, path: &Path, pem: &[u8]) -> Result<(), ConfigError> {
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        match cert {
            Ok(_) => found += 1,
            Err(e) => {
                return Err(ConfigError::invalid(
                    key,
                    format!("{} is not valid PEM: {e}", path.display()),
                ));
            }
        }
    }
    if found == 0 {
        return Err(ConfigError::invalid(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(())
}
