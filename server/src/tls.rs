//! TLS for the agent API: the server presents its own X.509-SVID
//! (`spiffe://<td>/sigil/server`, renewed at half-life) and optionally
//! verifies an agent's client SVID against the currently published CAs
//! (so agents keep connecting across a CA rotation). The client
//! certificate is optional at the TLS layer because node attestation happens
//! before an agent has one; every RPC but `Attest` requires it.

use crate::error::StartupError;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_core::ids::server_id;
use sigil_core::tls::SpiffeClientVerifier;
use sigil_core::x509::{SvidInfo, new_key_and_csr};

use crate::state::ServerState;

/// Serves whatever server SVID is current.
#[derive(Debug)]
pub struct ServerCertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ServerCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

/// A TLS setup error.
fn tls_err(e: impl std::fmt::Display) -> StartupError {
    StartupError::Tls(e.to_string())
}

/// Issues a server SVID; returns it and its notAfter.
fn issue(state: &ServerState) -> Result<(Arc<CertifiedKey>, i64), StartupError> {
    let (csr, key) = new_key_and_csr().map_err(tls_err)?;
    let id = server_id(state.trust_domain());
    let ca = state.ca();
    let leaf = ca
        .sign_svid(
            &csr,
            sigil_core::x509::CsrSignature::Verify,
            &id,
            &[],
            state.cfg.agent_svid_ttl,
        )
        .map_err(tls_err)?;
    let not_after = SvidInfo::from_der(&leaf).map_err(tls_err)?.not_after;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(tls_err)?;
    let chain = ca
        .svid_chain(leaf)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    Ok((Arc::new(CertifiedKey::new(chain, signer)), not_after))
}

/// Builds the rustls server config and returns the task that renews the
/// server SVID at half-life.
pub fn server_config(
    state: Arc<ServerState>,
) -> Result<
    (
        Arc<rustls::ServerConfig>,
        Arc<ServerCertResolver>,
        impl Future<Output = ()>,
    ),
    StartupError,
> {
    let (ck, mut not_after) = issue(&state)?;
    let resolver = Arc::new(ServerCertResolver {
        current: RwLock::new(ck),
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SpiffeClientVerifier::new(
        state.shared_bundle(),
        provider.clone(),
    ));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver.clone());
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let shared_resolver = resolver.clone();
    let renew = async move {
        loop {
            let now = sigil_core::now_unix();
            let wait = ((not_after - now) / 2).max(1) as u64;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            match issue(&state) {
                Ok((ck, na)) => {
                    if let Ok(mut cur) = resolver.current.write() {
                        *cur = ck;
                    }
                    not_after = na;
                    tracing::debug!("renewed server SVID");
                }
                Err(e) => tracing::error!(error = %e, "server SVID renewal failed; retrying"),
            }
        }
    };
    Ok((Arc::new(cfg), shared_resolver, renew))
}

/// TLS for the `https_spiffe` bundle endpoint: the server's SVID, no client
/// authentication, HTTP/1.1.
pub fn bundle_endpoint_spiffe(
    resolver: Arc<ServerCertResolver>,
) -> Result<Arc<rustls::ServerConfig>, StartupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// TLS for the `https_web` bundle endpoint: a Web PKI certificate from files.
pub fn bundle_endpoint_web(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, StartupError> {
    let cert =
        |e: &dyn std::fmt::Display| StartupError::file("bundle_endpoint.cert_path", cert_path, e);
    let bad_key =
        |e: &dyn std::fmt::Display| StartupError::file("bundle_endpoint.key_path", key_path, e);
    let cert_text = std::fs::read_to_string(cert_path).map_err(|e| cert(&e))?;
    let chain = sigil_core::x509::pem_to_certs(&cert_text).map_err(|e| cert(&e))?;
    sigil_fs::check_private_file(key_path).map_err(|e| bad_key(&e))?;
    let key_text = std::fs::read_to_string(key_path).map_err(|e| bad_key(&e))?;
    let key_pem = pem::parse_many(&key_text)
        .map_err(|e| bad_key(&e))?
        .into_iter()
        .find(|p| p.tag().ends_with("PRIVATE KEY"))
        .ok_or_else(|| bad_key(&"no PRIVATE KEY block"))?;
    let key = match key_pem.tag() {
        "PRIVATE KEY" => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pem.into_contents())),
        "EC PRIVATE KEY" => PrivateKeyDer::Sec1(key_pem.into_contents().into()),
        "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(key_pem.into_contents().into()),
        other => return Err(bad_key(&format!("unsupported key block {other}"))),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(chain.into_iter().map(CertificateDer::from).collect(), key)
        .map_err(|e| bad_key(&e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
