//! rustls pieces for SPIFFE peers: certificate verifiers that check a chain
//! against a (changing) trust bundle and authorize the peer by SPIFFE ID
//! instead of DNS names, and a client certificate resolver that always
//! presents the current SVID.

use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use spiffe::SpiffeId;

use crate::x509::SvidInfo;

/// Trust bundle (DER CA certificates) shared between verifiers and whoever updates it.
pub type SharedBundle = Arc<RwLock<Vec<Vec<u8>>>>;

/// How the server is authenticated.
#[derive(Debug)]
pub enum ServerTrust {
    /// Chain to the bundle and present this SPIFFE ID.
    Spiffe {
        /// CA certificates the chain must end in.
        bundle: SharedBundle,
        /// The only SPIFFE ID the server may present.
        expected: SpiffeId,
    },
    /// Web PKI: chain to these roots and match the DNS name / IP address.
    WebPki {
        /// DER root certificates.
        roots: Vec<Vec<u8>>,
    },
    /// Accept any certificate (insecure bootstrap only).
    Insecure,
}

/// Verifies a server's certificate as an X.509-SVID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: ServerTrust,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    /// A verifier for `trust`, using `provider`'s signature algorithms.
    pub fn new(trust: ServerTrust, provider: Arc<CryptoProvider>) -> Self {
        Self { trust, provider }
    }
}

/// Verifies `end_entity` (+ intermediates) against `roots` for `usage` and
/// returns the SVID's SPIFFE ID.
pub fn verify_svid_chain<R: AsRef<[u8]>>(
    roots: &[R],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    server: bool,
) -> Result<SpiffeId, String> {
    verify_svid_chain_with_crls(
        roots,
        end_entity,
        intermediates,
        now,
        server,
        &[] as &[&[u8]],
    )
}

/// [`verify_svid_chain`], also refusing a leaf whose serial a CRL of its
/// issuer lists (`crls`: DER, as the Workload API's `crl` fields carry
/// them). A leaf whose issuer has no CRL among them is not refused for it
/// (federated trust domains need not publish CRLs); a CRL that does not
/// parse is an error, so a corrupt list never silently disables the check.
pub fn verify_svid_chain_with_crls<R: AsRef<[u8]>, C: AsRef<[u8]>>(
    roots: &[R],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    server: bool,
    crls: &[C],
) -> Result<SpiffeId, String> {
    let parsed = crls
        .iter()
        .map(|c| {
            webpki::BorrowedCertRevocationList::from_der(c.as_ref())
                .map(webpki::CertRevocationList::from)
                .map_err(|e| format!("bad CRL: {e:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&webpki::CertRevocationList<'_>> = parsed.iter().collect();
    let revocation = webpki::RevocationOptionsBuilder::new(&refs).ok().map(|b| {
        b.with_depth(webpki::RevocationCheckDepth::EndEntity)
            .with_status_policy(webpki::UnknownStatusPolicy::Allow)
            .build()
    });
    let root_ders: Vec<CertificateDer<'_>> = roots
        .iter()
        .map(|r| CertificateDer::from(r.as_ref()))
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
        revocation,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertRevoked => "certificate is revoked (listed in its CA's CRL)".to_string(),
        e => format!("certificate does not chain to the trust bundle: {e:?}"),
    })?;
    let info = SvidInfo::from_der(end_entity).map_err(|e| e.to_string())?;
    Ok(info.spiffe_id)
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.trust {
            ServerTrust::Insecure => Ok(ServerCertVerified::assertion()),
            ServerTrust::WebPki { roots } => {
                let mut store = rustls::RootCertStore::empty();
                for r in roots {
                    store.add(CertificateDer::from(r.clone()))?;
                }
                let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(store),
                    self.provider.clone(),
                )
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            ServerTrust::Spiffe { bundle, expected } => {
                let roots = bundle
                    .read()
                    .map_err(|_| rustls::Error::General("bundle lock poisoned".into()))?;
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

/// Presents the current SVID, if there is one.
#[derive(Debug, Default)]
pub struct SvidCertResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl SvidCertResolver {
    /// Replaces the presented SVID (chain DER, leaf first; PKCS#8 key).
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

/// The same SVID as a server certificate (the agent's Broker Endpoint).
impl rustls::server::ResolvesServerCert for SvidCertResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().and_then(|c| c.clone())
    }
}

impl ResolvesClientCert for SvidCertResolver {
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

/// Like [`client_config`] but for HTTP/1.1 (bundle endpoints), TLS 1.2 or 1.3.
pub fn client_config_http1(
    trust: ServerTrust,
    resolver: Arc<SvidCertResolver>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SpiffeServerVerifier::new(trust, provider.clone()));
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A TLS 1.3 client config that authenticates the server by `trust` and
/// presents the SVID held by `resolver`. ALPN is set to HTTP/2 for gRPC.
pub fn client_config(
    trust: ServerTrust,
    resolver: Arc<SvidCertResolver>,
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

/// Verifies client certificates as X.509-SVIDs chaining to the bundle.
/// Client authentication is offered but optional, so that a peer without an
/// SVID yet (an agent attesting its node) can still connect; the service
/// decides per call whether it needs one.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: SharedBundle,
    provider: Arc<CryptoProvider>,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    /// A verifier trusting whatever `bundle` holds at handshake time.
    pub fn new(bundle: SharedBundle, provider: Arc<CryptoProvider>) -> Self {
        Self {
            bundle,
            provider,
            mandatory: false,
        }
    }

    /// The same, but a client without a certificate fails the handshake.
    pub fn required(bundle: SharedBundle, provider: Arc<CryptoProvider>) -> Self {
        Self {
            bundle,
            provider,
            mandatory: true,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let roots = self
            .bundle
            .read()
            .map_err(|_| rustls::Error::General("bundle lock poisoned".into()))?;
        verify_svid_chain(&roots, end_entity, intermediates, now, false)
            .map_err(rustls::Error::General)?;
        Ok(ClientCertVerified::assertion())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509::{Ca, new_key_and_csr};
    use spiffe::TrustDomain;
    use std::time::Duration;

    #[test]
    fn chain_verification_follows_the_bundle() {
        let td = TrustDomain::new("example.org").unwrap();
        let (ca, _) = Ca::generate(&td, Duration::from_secs(600)).unwrap();
        let (other, _) = Ca::generate(&td, Duration::from_secs(600)).unwrap();
        let (csr, _) = new_key_and_csr().unwrap();
        let id = SpiffeId::new("spiffe://example.org/sigil/server").unwrap();
        let leaf = ca
            .sign_svid(
                &csr,
                crate::x509::CsrSignature::Verify,
                &id,
                &[],
                Duration::from_secs(60),
            )
            .unwrap();
        let now = UnixTime::now();
        let ee = CertificateDer::from(leaf.as_slice());
        assert_eq!(
            verify_svid_chain(&[ca.cert_der().to_vec()], &ee, &[], now, true).unwrap(),
            id
        );
        assert!(verify_svid_chain(&[other.cert_der().to_vec()], &ee, &[], now, true).is_err());
        // Both CAs published (as during a rotation): accepted.
        let both = vec![other.cert_der().to_vec(), ca.cert_der().to_vec()];
        assert!(verify_svid_chain(&both, &ee, &[], now, false).is_ok());
    }

    #[test]
    fn a_leaf_listed_in_its_cas_crl_is_refused_and_others_pass() {
        let td = TrustDomain::new("example.org").unwrap();
        let (ca, _) = Ca::generate(&td, Duration::from_secs(600)).unwrap();
        let (other, _) = Ca::generate(&td, Duration::from_secs(600)).unwrap();
        let id = SpiffeId::new("spiffe://example.org/w").unwrap();
        let mint = |ca: &Ca| {
            let (csr, _) = new_key_and_csr().unwrap();
            ca.sign_svid_at(
                &csr,
                crate::x509::CsrSignature::Verify,
                &id,
                &[],
                Duration::from_secs(60),
                crate::now_unix(),
            )
            .unwrap()
        };
        let (killed, live, foreign) = (mint(&ca), mint(&ca), mint(&other));
        let t = crate::now_unix();
        let crl = ca
            .sign_crl(
                &[crate::x509::CrlEntry {
                    serial: killed.serial.clone(),
                    revoked_at: t,
                }],
                1,
                t,
                t + 600,
            )
            .unwrap();
        let roots = vec![ca.cert_der().to_vec(), other.cert_der().to_vec()];
        let now = UnixTime::now();
        let check = |der: &[u8], crls: &[Vec<u8>]| {
            verify_svid_chain_with_crls(&roots, &CertificateDer::from(der), &[], now, false, crls)
        };
        let err = check(&killed.der, std::slice::from_ref(&crl)).unwrap_err();
        assert!(err.contains("revoked"), "{err}");
        assert_eq!(check(&live.der, std::slice::from_ref(&crl)).unwrap(), id);
        // No CRL of its issuer: not refused for it.
        assert_eq!(check(&foreign.der, std::slice::from_ref(&crl)).unwrap(), id);
        // Without CRLs the killed leaf still chains (what a relying party
        // that ignores CRLs sees).
        assert_eq!(check(&killed.der, &[]).unwrap(), id);
        // A corrupt CRL is an error, never a silent pass.
        assert!(check(&live.der, &[vec![0x30, 0x03, 1, 2, 3]]).is_err());
    }
}
