//! TLS from the server to PostgreSQL, with rustls on ring (the stack the
//! rest of the server uses), configured the way libpq is: in the URL.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | – |
//! | `prefer` (default) | when the server offers it | not checked (as libpq) |
//! | `require` | always | checked against `sslrootcert` when one is given (as libpq), else not |
//! | `verify-ca` | always | chain checked against `sslrootcert` |
//! | `verify-full` | always | chain and host name checked |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the
//! operating system's roots; `verify-ca`/`verify-full` without it use the
//! system roots (libpq would read `~/.postgresql/root.crt`). `sslcert` and
//! `sslkey` give a client certificate for `cert` authentication.
//! `tokio-postgres` knows only `disable`/`prefer`/`require`, so these
//! options are taken out of the URL before it parses the rest.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use postgres::config::SslMode;
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{Error, Result};
use crate::server::{pem_certs, pem_key};

/// How much of the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Encryption only (libpq's `prefer`/`require` without a root file).
    None,
    /// The chain, not the host name (`verify-ca`).
    Chain,
    /// Chain and host name (`verify-full`).
    Full,
}

/// The TLS options of a `[store] url`, taken out of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    /// The mode handed to the client (`require` for the `verify-*` ones);
    /// `None` leaves the client's own (`prefer` unless a key=value string
    /// says otherwise).
    pub mode: Option<SslMode>,
    pub verify: Verify,
    /// `sslrootcert`: a PEM file; `None` with `Chain`/`Full` means the
    /// system roots.
    pub root_cert: Option<PathBuf>,
    /// `sslcert` and `sslkey`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Splits the TLS options off a `postgres://` URL: the URL left for
/// `postgres::Config` and the options. Key=value connection strings are
/// passed through whole (their `sslmode` is what `tokio-postgres` reads).
pub fn split_url(url: &str) -> Result<(String, TlsOptions)> {
    let bad = |msg: String| {
        Error::Usage(format!(
            "[store] url {}: {msg}",
            super::postgres::redact(url)
        ))
    };
    let mut opts = TlsOptions {
        mode: None,
        verify: Verify::None,
        root_cert: None,
        client_cert: None,
    };
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return Ok((url.to_string(), opts));
    };
    let (mut sslmode, mut cert, mut key) = (None, None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).map_err(|e| bad(format!("{k}: {e}")))?;
        match k {
            "sslmode" => sslmode = Some(v),
            "sslrootcert" => opts.root_cert = (v != "system").then(|| PathBuf::from(v)),
            "sslcert" => cert = Some(PathBuf::from(v)),
            "sslkey" => key = Some(PathBuf::from(v)),
            _ => kept.push(pair),
        }
    }
    let root_given = query
        .split('&')
        .any(|p| p.split_once('=').is_some_and(|(k, _)| k == "sslrootcert"));
    let (mode, verify) = match sslmode.as_deref().unwrap_or("prefer") {
        "disable" | "allow" => (SslMode::Disable, Verify::None),
        "prefer" => (SslMode::Prefer, Verify::None),
        // libpq: `require` with a root file checks the chain.
        "require" if root_given => (SslMode::Require, Verify::Chain),
        "require" => (SslMode::Require, Verify::None),
        "verify-ca" => (SslMode::Require, Verify::Chain),
        "verify-full" => (SslMode::Require, Verify::Full),
        other => {
            return Err(bad(format!(
                "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )));
        }
    };
    (opts.mode, opts.verify) = (sslmode.map(|_| mode), verify);
    opts.client_cert = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err(bad("sslcert and sslkey go together".into())),
    };
    let mut rest = base.to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok((rest, opts))
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("a truncated %-escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad %-escape %{hex}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 after %-decoding".into())
}

/// The connector handed to `postgres::Config::connect`; `tokio-postgres`
/// calls it only when `sslmode` is not `disable` and the server agrees
/// to TLS.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgTls")
    }
}

impl PgTls {
    /// Reads the files `opts` names; a missing or empty one is an error
    /// naming it.
    pub fn new(opts: &TlsOptions) -> Result<PgTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = match opts.verify {
            Verify::None => None,
            Verify::Chain | Verify::Full => Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots(opts.root_cert.as_deref())?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| Error::Usage(format!("[store] sslrootcert: {e}")))?,
            ),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match chain {
            Some(webpki) if opts.verify == Verify::Full => webpki,
            chain => Arc::new(Lenient {
                chain,
                provider: provider.clone(),
            }),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Usage(format!("[store] TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &opts.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = pem_certs("[store] sslcert", cert)?;
                let key = pem_key("[store] sslkey", key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| Error::Usage(format!("[store] sslcert/sslkey: {e}")))?
            }
        };
        Ok(PgTls {
            config: Arc::new(config),
        })
    }
}

/// `sslrootcert`'s certificates, or the system's.
fn roots(file: Option<&Path>) -> Result<rustls::RootCertStore> {
    let store = crate::server::root_store("[store] sslrootcert", file)?;
    if store.is_empty() {
        return Err(Error::Usage(
            "[store] url: sslmode verify-ca/verify-full without sslrootcert needs the system's \
             CA certificates (apt-get install ca-certificates), and none were found"
                .into(),
        ));
    }
    Ok(store)
}

/// `prefer`/`require` without a root file (`chain: None`): the
/// certificate itself is not checked, as libpq. `verify-ca`: webpki's
/// verdict, except that a certificate for another host name is accepted.
/// Either way the handshake's signatures are checked, so the session is
/// encrypted to whoever holds the certificate's key.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<PgTlsConnect> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{domain}: {e}")))?;
        Ok(PgTlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

/// One connection's handshake.
#[derive(Debug)]
pub struct PgTlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let s = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(PgTlsStream(s))
        })
    }
}

/// A TLS session to the database.
#[derive(Debug)]
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    /// No `tls-server-end-point` binding: SCRAM runs without channel
    /// binding (`channel_binding=require` in the URL is refused).
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_options_leave_the_url_and_map_to_modes() {
        let (rest, o) = split_url("postgres://u:p@db:5432/fleet").unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/fleet");
        assert_eq!((o.mode, o.verify), (None, Verify::None));

        let (rest, o) = split_url(
            "postgres://u@db/fleet?connect_timeout=5&sslmode=verify-full&sslrootcert=/etc/ssl/rds%20ca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@db/fleet?connect_timeout=5");
        assert_eq!((o.mode, o.verify), (Some(SslMode::Require), Verify::Full));
        assert_eq!(
            o.root_cert.as_deref(),
            Some(Path::new("/etc/ssl/rds ca.pem"))
        );

        let (_, o) = split_url("postgres://db/f?sslmode=require").unwrap();
        assert_eq!((o.mode, o.verify), (Some(SslMode::Require), Verify::None));
        let (_, o) = split_url("postgres://db/f?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!((o.mode, o.verify), (Some(SslMode::Require), Verify::Chain));
        let (_, o) = split_url("postgres://db/f?sslmode=verify-ca&sslrootcert=system").unwrap();
        assert_eq!((o.verify, o.root_cert), (Verify::Chain, None));
        let (_, o) = split_url("postgres://db/f?sslmode=disable").unwrap();
        assert_eq!(o.mode, Some(SslMode::Disable));
        let (_, o) = split_url("postgres://db/f?sslcert=/c.pem&sslkey=/k.pem").unwrap();
        assert_eq!(
            o.client_cert,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );

        // Key=value strings pass through to the client's own parser.
        let (rest, o) = split_url("host=db sslmode=require").unwrap();
        assert_eq!((rest.as_str(), o.mode), ("host=db sslmode=require", None));
    }

    #[test]
    fn bad_options_are_named_and_the_password_is_not() {
        let e = split_url("postgres://u:hunter2@db/f?sslmode=verify-everything")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sslmode=verify-everything") && !e.contains("hunter2"),
            "{e}"
        );
        let e = split_url("postgres://db/f?sslcert=/c.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslcert and sslkey"), "{e}");
        let e = PgTls::new(&TlsOptions {
            mode: Some(SslMode::Require),
            verify: Verify::Full,
            root_cert: Some("/nonexistent/ca.pem".into()),
            client_cert: None,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
    }
}
