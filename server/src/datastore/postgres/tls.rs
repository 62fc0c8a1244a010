//! TLS to PostgreSQL with rustls (the server's one TLS stack), for
//! `[datastore] sslmode`:
//!
//! - `require`: the connection is encrypted; the server's certificate is
//!   not checked (as libpq, anyone on the path can still impersonate the
//!   database). With `ca_path` given it is checked as for `verify-ca`,
//!   again as libpq does when a root certificate is present;
//! - `verify-ca`: the certificate must chain to a root in `ca_path`;
//! - `verify-full`: it must chain to `ca_path` and name the host the URL
//!   connects to.
//!
//! The handshake signature is verified in every mode, and the stream
//! reports RFC 5929 `tls-server-end-point` channel binding, so SCRAM
//! authentication binds itself to this TLS session when the database
//! offers `SCRAM-SHA-256-PLUS`.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use sigil_core::tls::{ServerTrust, SpiffeServerVerifier};

use crate::config::PgSslMode;
use crate::datastore::StoreError;

/// How connections reach the database: in clear, or through rustls.
#[derive(Clone)]
pub(super) enum PgTls {
    /// `sslmode = "disable"`.
    Off,
    /// Any other mode.
    Rustls(MakeRustls),
}

impl PgTls {
    /// The connector for `mode`, reading the roots from `ca_path` when
    /// given. Errors name the key.
    pub(super) fn for_mode(mode: PgSslMode, ca_path: Option<&Path>) -> Result<PgTls, StoreError> {
        let roots = match ca_path {
            Some(p) => Some(load_roots(p)?),
            None => None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
            (PgSslMode::Disable, _) => return Ok(PgTls::Off),
            // Encryption, no identity check; the handshake signature is
            // still verified, so the session belongs to whoever holds the
            // presented certificate's key.
            (PgSslMode::Require, None) => Arc::new(SpiffeServerVerifier::new(
                ServerTrust::Insecure,
                provider.clone(),
            )),
            (PgSslMode::Require | PgSslMode::VerifyCa, Some(roots)) => Arc::new(ChainOnly {
                inner: webpki(roots, &provider)?,
            }),
            (PgSslMode::VerifyFull, Some(roots)) => webpki(roots, &provider)?,
            (PgSslMode::VerifyCa | PgSslMode::VerifyFull, None) => {
                return Err(StoreError::Backend(
                    "datastore.ca_path: required for sslmode verify-ca and verify-full".into(),
                ));
            }
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Backend(format!("datastore.sslmode: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(PgTls::Rustls(MakeRustls {
            config: Arc::new(config),
        }))
    }

    /// Opens one connection with `cfg` through this connector.
    pub(super) fn connect(
        &self,
        cfg: &postgres::Config,
    ) -> Result<postgres::Client, postgres::Error> {
        match self {
            PgTls::Off => cfg.connect(postgres::NoTls),
            PgTls::Rustls(t) => cfg.connect(t.clone()),
        }
    }
}

/// The PEM certificates of `path`, as a root store. The error names
/// `datastore.ca_path`.
fn load_roots(path: &Path) -> Result<RootCertStore, StoreError> {
    let bad =
        |why: String| StoreError::Backend(format!("datastore.ca_path {}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut store = RootCertStore::empty();
    for cert in rustls_pemfile_certs(&pem).map_err(bad)? {
        store
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    if store.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(store)
}

/// Every `CERTIFICATE` block of a PEM file.
fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))
}

fn webpki(
    roots: RootCertStore,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, StoreError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| StoreError::Backend(format!("datastore.ca_path: {e}")))
}

/// `verify-ca`: the chain must reach a configured root; the host name is
/// not compared (everything else WebPKI checks still is).
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// tokio-postgres's TLS hook, backed by rustls.
#[derive(Clone)]
pub(super) struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("datastore.url host {domain:?} is not a valid TLS server name: {e}"),
            )
        })?;
        Ok(RustlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

/// One connection's handshake.
pub(super) struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

type HandshakeFuture<S> = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = HandshakeFuture<S>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await
                .map(|s| RustlsStream(Box::new(s)))
        })
    }
}

/// An established TLS connection to the database.
pub(super) struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> postgres::tls::TlsStream for RustlsStream<S> {
    /// RFC 5929 `tls-server-end-point`: a hash of the server's certificate,
    /// with SHA-256 unless the certificate's signature uses SHA-384 or
    /// SHA-512 (MD5 and SHA-1 are replaced by SHA-256, as the RFC says).
    fn channel_binding(&self) -> ChannelBinding {
        let (_, conn) = self.0.get_ref();
        let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
            return ChannelBinding::none();
        };
        let alg = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
            Ok((_, cert)) => end_point_digest(&cert.signature_algorithm.algorithm.to_id_string()),
            Err(_) => return ChannelBinding::none(),
        };
        ChannelBinding::tls_server_end_point(
            ring::digest::digest(alg, leaf.as_ref()).as_ref().to_vec(),
        )
    }
}

/// The digest RFC 5929 §4.1 picks for a certificate signature algorithm.
fn end_point_digest(oid: &str) -> &'static ring::digest::Algorithm {
    match oid {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &ring::digest::SHA384,
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &ring::digest::SHA512,
        _ => &ring::digest::SHA256,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_need_roots_and_bad_roots_name_the_key() {
        for mode in [PgSslMode::VerifyCa, PgSslMode::VerifyFull] {
            let e = PgTls::for_mode(mode, None).err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains("datastore.ca_path")),
                "{e:?}"
            );
        }
        let dir = std::env::temp_dir().join(format!("sigil-pgtls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "no certificate here").unwrap();
        let e = PgTls::for_mode(PgSslMode::VerifyFull, Some(&junk))
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(
                |e| e.contains("datastore.ca_path") && e.contains("no PEM certificate")
            ),
            "{e:?}"
        );
        let missing = dir.join("missing.pem");
        let e = PgTls::for_mode(PgSslMode::Require, Some(&missing))
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("missing.pem")),
            "{e:?}"
        );
        assert!(matches!(
            PgTls::for_mode(PgSslMode::Require, None),
            Ok(PgTls::Rustls(_))
        ));
        assert!(matches!(
            PgTls::for_mode(PgSslMode::Disable, None),
            Ok(PgTls::Off)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn channel_binding_digest_follows_the_signature_hash() {
        assert!(std::ptr::eq(
            end_point_digest("1.2.840.10045.4.3.2"),
            &ring::digest::SHA256
        ));
        assert!(std::ptr::eq(
            end_point_digest("1.2.840.10045.4.3.3"),
            &ring::digest::SHA384
        ));
        assert!(std::ptr::eq(
            end_point_digest("1.2.840.113549.1.1.13"),
            &ring::digest::SHA512
        ));
        // SHA-1 and MD5 are upgraded to SHA-256.
        assert!(std::ptr::eq(
            end_point_digest("1.2.840.113549.1.1.5"),
            &ring::digest::SHA256
        ));
    }
}
