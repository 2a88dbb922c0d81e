//! TLS for the agent's two links: `https://` fleet servers (reqwest) and
//! `mqtts://` brokers (rumqttc). Both use rustls with the ring provider
//! (set in each config, and also installed process-wide for reqwest's own
//! clients), so no aws-lc (cmake, breaks cross builds) and no OpenSSL
//! (FACTS.md).
//!
//! Roots: the PEM bundle in `ca_file` when set (a private fleet CA, the
//! usual case on devices), else the system store (`/etc/ssl/certs`). A
//! client certificate and key, when both are set, authenticate the device
//! to the broker (mutual TLS, as AWS IoT Core and many mosquitto setups
//! require).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::error::AgentError;

/// Where a TLS client's trust and identity come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

fn tls_err(what: &str, path: &Path, detail: impl std::fmt::Display) -> AgentError {
    AgentError::Config(format!("tls {what} {}: {detail}", path.display()))
}

/// Reads every certificate of a PEM file; an empty file is an error.
fn certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, AgentError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(what, path, e))?;
    if certs.is_empty() {
        return Err(tls_err(what, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn roots(files: &TlsFiles) -> Result<RootCertStore, AgentError> {
    let mut roots = RootCertStore::empty();
    match &files.ca_file {
        Some(path) => {
            for c in certificates("ca_file", path)? {
                roots.add(c).map_err(|e| tls_err("ca_file", path, e))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(AgentError::Config(format!(
                    "tls: no usable root certificate in the system store ({} errors); \
                     set ca_file",
                    found.errors.len()
                )));
            }
        }
    }
    Ok(roots)
}

/// A rustls client config on ring for `files`.
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig, AgentError> {
    let identity = match (&files.client_cert_file, &files.client_key_file) {
        (Some(cert), Some(key)) => Some((
            cert,
            certificates("client_cert_file", cert)?,
            PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err("client_key_file", key, e))?,
        )),
        (None, None) => None,
        _ => {
            return Err(AgentError::Config(
                "tls: set both client_cert_file and client_key_file, or neither".into(),
            ));
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AgentError::Config(format!("tls: {e}")))?
        .with_root_certificates(roots(files)?);
    match identity {
        Some((path, chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_err("client_cert_file", path, e)),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// Installs ring as the process-wide rustls provider; idempotent. reqwest
/// built with `rustls-no-provider` panics when it builds a client without
/// one, so every client in this workspace goes through here.
pub fn install_provider() {
    // Err means a provider is already installed: nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `reqwest::Client::new()`, with the provider installed (system roots for
/// `https://`).
pub fn default_client() -> reqwest::Client {
    install_provider();
    reqwest::Client::new()
}

/// A reqwest client for the fleet server: TLS (ring) for `https://` URLs.
pub fn http_client(
    base_url: &str,
    files: &TlsFiles,
    builder: reqwest::ClientBuilder,
) -> Result<reqwest::Client, AgentError> {
    install_provider();
    let builder = if base_url.starts_with("https://") {
        builder.tls_backend_preconfigured(client_config(files)?)
    } else {
        builder
    };
    builder
        .build()
        .map_err(|e| AgentError::Config(format!("http client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_a_clear_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            ca_file: Some(dir.path().join("nope.pem")),
            ..TlsFiles::default()
        };
        let e = client_config(&files).unwrap_err().to_string();
        assert!(e.contains("tls ca_file") && e.contains("nope.pem"), "{e}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let files = TlsFiles {
            ca_file: Some(empty),
            ..TlsFiles::default()
        };
        let e = client_config(&files).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            ca_file: Some(dir.path().join("ca.pem")),
            client_cert_file: Some(dir.path().join("c.pem")),
            client_key_file: None,
        };
        let e = client_config(&files).unwrap_err().to_string();
        assert!(
            e.contains("both client_cert_file and client_key_file"),
            "{e}"
        );
    }
}
