//! sigil-examples: what an mTLS service owner writes to use Sigil.
//!
//! Both sides take their X.509-SVID and trust bundles from the SPIFFE
//! Workload API through the `spiffe` crate's [`X509Source`] (which follows
//! rotation), present the *current* SVID on every handshake, verify the
//! peer's chain against the bundle of the peer's own trust domain, and
//! accept the peer only if its SPIFFE ID is on an allow-list. A peer from
//! another trust domain is accepted only when the workload has that trust
//! domain's bundle (its entry federates with it) *and* the peer's ID is
//! allowed. The peer's leaf is also checked against the CRLs the Workload
//! API delivers ([`crl`]): a killed peer is refused at its next handshake.

pub mod crl;

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use spiffe::{SpiffeId, TrustDomain, X509Source};

/// SVIDs and peer checks for both ends of an mTLS connection.
#[derive(Debug)]
pub struct SpiffeTls {
    source: Arc<X509Source>,
    crls: Arc<crl::Crls>,
    allowed: Vec<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl SpiffeTls {
    /// Peers must present one of `allowed`, and not be listed in `crls`.
    pub fn new(source: Arc<X509Source>, crls: Arc<crl::Crls>, allowed: Vec<SpiffeId>) -> Arc<Self> {
        Arc::new(Self {
            source,
            crls,
            allowed,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// The current SVID as a rustls key.
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let svid = self.source.svid().ok()?;
        let chain = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        ));
        let signer = self.provider.key_provider.load_private_key(key).ok()?;
        Some(Arc::new(CertifiedKey::new(chain, signer)))
    }

    /// Verifies the peer and returns its SPIFFE ID if it is allowed.
    fn check_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        server: bool,
    ) -> Result<SpiffeId, rustls::Error> {
        let claimed = sigil_core::x509::SvidInfo::from_der(end_entity)
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .spiffe_id;
        let td = TrustDomain::new(claimed.trust_domain_name())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let bundle = self
            .source
            .try_bundle_for_trust_domain(&td)
            .ok_or_else(|| {
                rustls::Error::General(format!("no bundle for trust domain {td} (not federated)"))
            })?;
        let roots: Vec<&[u8]> = bundle.authorities().iter().map(|a| a.as_bytes()).collect();
        let crls = self.crls.current();
        let id = sigil_core::tls::verify_svid_chain_with_crls(
            &roots,
            end_entity,
            intermediates,
            now,
            server,
            &crls,
        )
        .map_err(rustls::Error::General)?;
        if !self.allowed.contains(&id) {
            return Err(rustls::Error::General(format!("peer {id} is not allowed")));
        }
        Ok(id)
    }

    /// rustls server config: presents our SVID, requires an allowed client SVID.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.clone())
            .with_cert_resolver(self.clone());
        Ok(Arc::new(cfg))
    }

    /// rustls client config: presents our SVID, requires an allowed server SVID.
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_client_cert_resolver(self.clone());
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for SpiffeTls {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for SpiffeTls {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for SpiffeTls {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check_peer(end_entity, intermediates, now, false)
            .map(|_| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for SpiffeTls {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check_peer(end_entity, intermediates, now, true)
            .map(|_| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects an [`X509Source`] to the Workload API at `socket` and waits for its first SVID.
pub async fn source(socket: &str) -> Result<Arc<X509Source>, String> {
    let s = X509Source::builder()
        .endpoint(socket)
        .build()
        .await
        .map_err(|e| format!("X509Source: {e}"))?;
    Ok(Arc::new(s))
}

/// The SPIFFE ID of the SVID the source currently holds.
pub fn own_id(source: &X509Source) -> String {
    source
        .svid()
        .map(|s| s.spiffe_id().to_string())
        .unwrap_or_default()
}
