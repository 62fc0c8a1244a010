//! rustls pieces for talking to the server as a SPIFFE peer: a server
//! certificate verifier that checks the chain against the current trust
//! bundle and the server's SPIFFE ID (no DNS names involved), and a client
//! certificate resolver that always presents the agent's current SVID.

use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use sigil_core::SpiffeId;
use sigil_core::x509::SvidInfo;

/// Trust bundle shared between the verifier and whoever updates it.
pub type SharedBundle = Arc<RwLock<Vec<Vec<u8>>>>;

/// How the server is authenticated.
#[derive(Debug)]
pub enum ServerTrust {
    /// Chain to the bundle and present this SPIFFE ID.
    Spiffe {
        bundle: SharedBundle,
        expected: SpiffeId,
    },
    /// Accept any certificate (insecure bootstrap only).
    Insecure,
}

#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: ServerTrust,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(trust: ServerTrust, provider: Arc<CryptoProvider>) -> Self {
        Self { trust, provider }
    }
}

/// Verifies `end_entity` (+ intermediates) against `roots` for `usage` and
/// returns the SVID's SPIFFE ID.
pub fn verify_svid_chain(
    roots: &[Vec<u8>],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    server: bool,
) -> Result<SpiffeId, String> {
    let root_ders: Vec<CertificateDer<'_>> = roots
        .iter()
        .map(|r| CertificateDer::from(r.as_slice()))
        .collect();
    let anchors = root_ders
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .map_err(|e| format!("bad bundle certificate: {e:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ee = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| format!("bad certificate: {e:?}"))?;
    let usage = if server {
        webpki::KeyUsage::server_auth()
    } else {
        webpki::KeyUsage::client_auth()
    };
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(|e| format!("certificate does not chain to the trust bundle: {e:?}"))?;
    let info = SvidInfo::from_der(end_entity).map_err(|e| e.to_string())?;
    Ok(info.spiffe_id)
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.trust {
            ServerTrust::Insecure => Ok(ServerCertVerified::assertion()),
            ServerTrust::Spiffe { bundle, expected } => {
                let roots = bundle
                    .read()
                    .map_err(|_| rustls::Error::General("bundle lock poisoned".into()))?
                    .clone();
                let id = verify_svid_chain(&roots, end_entity, intermediates, now, true)
                    .map_err(rustls::Error::General)?;
                if &id != expected {
                    return Err(rustls::Error::General(format!(
                        "server presented {id}, expected {expected}"
                    )));
                }
                Ok(ServerCertVerified::assertion())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Presents the agent's current SVID, if it has one.
#[derive(Debug, Default)]
pub struct AgentCertResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl AgentCertResolver {
    /// Replaces the presented SVID.
    pub fn set(&self, chain: &[Vec<u8>], pkcs8_key: &[u8]) -> Result<(), String> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8_key.to_vec()));
        let signer =
            rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| e.to_string())?;
        let chain = chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let ck = Arc::new(CertifiedKey::new(chain, signer));
        *self
            .current
            .write()
            .map_err(|_| "resolver lock poisoned".to_string())? = Some(ck);
        Ok(())
    }
}

impl ResolvesClientCert for AgentCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    fn has_certs(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }
}

/// A TLS 1.3 client config for the agent API.
pub fn client_config(
    trust: ServerTrust,
    resolver: Arc<AgentCertResolver>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SpiffeServerVerifier::new(trust, provider.clone()));
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}
