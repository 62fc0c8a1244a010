//! X.509 pieces of the SPIFFE X509-SVID spec: the signing CA, minting leaf
//! SVIDs from CSRs, and reading SVIDs back.
//!
//! What the CA signs is decided here, never by the CSR: the CSR contributes
//! only its (signature-checked) public key. Every leaf has exactly one URI
//! SAN, `CA:FALSE`, key usage `digitalSignature` and EKU server+client auth;
//! the CA certificate is `CA:TRUE` with `keyCertSign`/`cRLSign`.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PublicKeyData, SanType, SerialNumber,
};
use spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// How far back a new certificate's notBefore is set, to absorb clock skew.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// An X.509 operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X509Error {
    /// The CSR was not valid DER, or its signature did not verify.
    #[error("invalid csr: {0}")]
    Csr(String),
    /// The CSR's key type is not one Sigil issues for.
    #[error("invalid csr: unsupported key algorithm (use ECDSA P-256 or P-384)")]
    CsrKeyType,
    /// A certificate could not be parsed or lacks what an SVID needs.
    #[error("invalid certificate: {0}")]
    Certificate(String),
    /// Signing or key handling failed inside the crypto library.
    #[error("crypto: {0}")]
    Crypto(String),
}

fn crypto(e: impl std::fmt::Display) -> X509Error {
    X509Error::Crypto(e.to_string())
}

fn random_serial() -> SerialNumber {
    let mut b = crate::ids::random_bytes::<16>();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and without a leading zero byte
    SerialNumber::from_slice(&b)
}

fn offset(t: OffsetDateTime, d: Duration, forward: bool) -> OffsetDateTime {
    let d = time::Duration::try_from(d).unwrap_or(time::Duration::MAX);
    if forward {
        t.saturating_add(d)
    } else {
        t.saturating_sub(d)
    }
}

/// The trust domain's signing CA: key and self-signed certificate.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_der: Vec<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    trust_domain: TrustDomain,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Generates a new ECDSA P-256 CA valid for `ttl`. Returns the CA and its
    /// private key as PKCS#8 PEM for the caller to persist.
    pub fn generate(td: &TrustDomain, ttl: Duration) -> Result<(Ca, String), X509Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Sigil");
        dn.push(DnType::CommonName, format!("Sigil CA {td}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(td.id_string()).map_err(crypto)?,
        )];
        params.serial_number = Some(random_serial());
        params.not_before = offset(now, BACKDATE, false);
        params.not_after = offset(now, ttl, true);
        params.use_authority_key_identifier_extension = false;
        let cert = params.self_signed(&key).map_err(crypto)?;
        let key_pem = key.serialize_pem();
        let ca = Ca::load(cert.der(), &key_pem, td)?;
        Ok((ca, key_pem))
    }

    /// Loads a CA from its DER certificate and PKCS#8 PEM key.
    pub fn load(cert_der: &[u8], key_pem: &str, td: &TrustDomain) -> Result<Ca, X509Error> {
        let key = KeyPair::from_pem(key_pem).map_err(crypto)?;
        let (_, parsed) = X509Certificate::from_der(cert_der)
            .map_err(|e| X509Error::Certificate(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(X509Error::Certificate(
                "CA certificate lacks CA:TRUE".into(),
            ));
        }
        let cert_spki = parsed.public_key().raw;
        if cert_spki != key.subject_public_key_info().as_slice() {
            return Err(X509Error::Certificate(
                "CA certificate does not match the CA key".into(),
            ));
        }
        let not_before = parsed.validity().not_before.to_datetime();
        let not_after = parsed.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&cert_der.to_vec().into(), key).map_err(crypto)?;
        Ok(Ca {
            issuer,
            cert_der: cert_der.to_vec(),
            not_before,
            not_after,
            trust_domain: td.clone(),
        })
    }

    /// The CA certificate (DER), the trust bundle's authority.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// When the CA certificate became valid (backdated by [`BACKDATE`]).
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Signs an X.509-SVID for `id` over the public key of `csr_der`.
    /// The lifetime is `ttl`, clamped to the CA's own expiry. Only the CSR's
    /// key is used; its subject and extensions are ignored.
    pub fn sign_svid(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<Vec<u8>, X509Error> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(X509Error::Certificate(format!(
                "{id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        let csr = parse_csr(csr_der)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Sigil");
        if let Some(first) = dns_names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let mut sans = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(id.to_string()).map_err(crypto)?,
        )];
        for d in dns_names {
            sans.push(SanType::DnsName(
                rcgen::string::Ia5String::try_from(d.as_str())
                    .map_err(|e| X509Error::Certificate(format!("dns name {d:?}: {e}")))?,
            ));
        }
        params.subject_alt_names = sans;
        params.serial_number = Some(random_serial());
        params.not_before = offset(now, BACKDATE, false);
        params.not_after = offset(now, ttl, true).min(self.not_after);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(crypto)?;
        Ok(cert.der().to_vec())
    }
}

fn parse_csr(csr_der: &[u8]) -> Result<CertificateSigningRequestParams, X509Error> {
    let der = rustls_pki_csr(csr_der);
    let csr = CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| X509Error::Csr(e.to_string()))?;
    let alg = csr.public_key.algorithm();
    if alg != &PKCS_ECDSA_P256_SHA256 && alg != &PKCS_ECDSA_P384_SHA384 {
        return Err(X509Error::CsrKeyType);
    }
    Ok(csr)
}

fn rustls_pki_csr(der: &[u8]) -> rustls_pki_types::CertificateSigningRequestDer<'static> {
    der.to_vec().into()
}

/// A fresh workload/agent key and a CSR for it (no subject, no extensions:
/// the server decides the contents). Returns (CSR DER, PKCS#8 key DER).
pub fn new_key_and_csr() -> Result<(Vec<u8>, Vec<u8>), X509Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
    let params = CertificateParams::default();
    let csr = params.serialize_request(&key).map_err(crypto)?;
    Ok((csr.der().to_vec(), key.serialize_der()))
}

/// What Sigil needs to know about an X.509-SVID leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    /// The single URI SAN.
    pub spiffe_id: SpiffeId,
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// Serial number, hex.
    pub serial: String,
}

impl SvidInfo {
    /// Parses a leaf certificate and checks the SVID shape: exactly one URI
    /// SAN holding a SPIFFE ID, and not a CA.
    pub fn from_der(der: &[u8]) -> Result<SvidInfo, X509Error> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| X509Error::Certificate(e.to_string()))?;
        if cert.is_ca() {
            return Err(X509Error::Certificate("leaf SVID must not be a CA".into()));
        }
        let san = cert
            .subject_alternative_name()
            .map_err(|e| X509Error::Certificate(e.to_string()))?
            .ok_or_else(|| X509Error::Certificate("no subjectAltName".into()))?;
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        let [uri] = uris.as_slice() else {
            return Err(X509Error::Certificate(format!(
                "expected exactly one URI SAN, found {}",
                uris.len()
            )));
        };
        let spiffe_id = SpiffeId::new(uri)
            .map_err(|e| X509Error::Certificate(format!("URI SAN {uri:?}: {e}")))?;
        Ok(SvidInfo {
            spiffe_id,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            serial: cert.raw_serial_as_string().replace(':', ""),
        })
    }
}

/// PEM-encodes DER certificates, one block each, in order.
pub fn certs_to_pem<'a>(ders: impl IntoIterator<Item = &'a [u8]>) -> String {
    ders.into_iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.to_vec())))
        .collect()
}

/// Parses every CERTIFICATE block of a PEM text into DER.
pub fn pem_to_certs(text: &str) -> Result<Vec<Vec<u8>>, X509Error> {
    let blocks =
        pem::parse_many(text).map_err(|e| X509Error::Certificate(format!("bad PEM: {e}")))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.into_contents())
        .collect();
    if certs.is_empty() {
        return Err(X509Error::Certificate("no CERTIFICATE block in PEM".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::ParsedExtension;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn minted_svid_meets_the_x509_svid_profile() {
        let (ca, key_pem) = Ca::generate(&td(), Duration::from_secs(3600)).unwrap();
        let (csr, _key) = new_key_and_csr().unwrap();
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let der = ca
            .sign_svid(
                &csr,
                &id,
                &["svc.example.org".into()],
                Duration::from_secs(300),
            )
            .unwrap();
        let info = SvidInfo::from_der(&der).unwrap();
        assert_eq!(info.spiffe_id, id);
        assert!(info.not_after - info.not_before <= 310);

        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
        let bc = leaf.basic_constraints().unwrap().unwrap().value;
        assert!(!bc.ca);
        // Chain verifies against the CA key.
        let (_, ca_cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert!(ca_cert.is_ca());
        let ca_ku = ca_cert.key_usage().unwrap().unwrap().value;
        assert!(ca_ku.key_cert_sign());
        assert!(ca_cert.extensions().iter().any(|e| matches!(
            e.parsed_extension(),
            ParsedExtension::SubjectAlternativeName(_)
        )));

        // The persisted key reloads into a CA that signs verifiable SVIDs.
        let ca2 = Ca::load(ca.cert_der(), &key_pem, &td()).unwrap();
        let der2 = ca2
            .sign_svid(&csr, &id, &[], Duration::from_secs(60))
            .unwrap();
        let (_, leaf2) = X509Certificate::from_der(&der2).unwrap();
        leaf2.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn svid_lifetime_never_exceeds_the_ca() {
        let (ca, _) = Ca::generate(&td(), Duration::from_secs(100)).unwrap();
        let (csr, _) = new_key_and_csr().unwrap();
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let der = ca
            .sign_svid(&csr, &id, &[], Duration::from_secs(10_000))
            .unwrap();
        let info = SvidInfo::from_der(&der).unwrap();
        assert!(info.not_after <= ca.not_after().unix_timestamp());
    }

    #[test]
    fn bad_csrs_and_foreign_ids_are_refused() {
        let (ca, _) = Ca::generate(&td(), Duration::from_secs(100)).unwrap();
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        assert!(matches!(
            ca.sign_svid(b"garbage", &id, &[], Duration::from_secs(5)),
            Err(X509Error::Csr(_))
        ));
        let (mut csr, _) = new_key_and_csr().unwrap();
        let n = csr.len();
        csr[n - 5] ^= 0xff; // break the signature
        assert!(matches!(
            ca.sign_svid(&csr, &id, &[], Duration::from_secs(5)),
            Err(X509Error::Csr(_))
        ));
        let (csr, _) = new_key_and_csr().unwrap();
        let other = SpiffeId::new("spiffe://other.org/svc").unwrap();
        assert!(
            ca.sign_svid(&csr, &other, &[], Duration::from_secs(5))
                .is_err()
        );
    }

    #[test]
    fn ca_key_mismatch_is_refused() {
        let (ca, _) = Ca::generate(&td(), Duration::from_secs(100)).unwrap();
        let (_, other_key) = Ca::generate(&td(), Duration::from_secs(100)).unwrap();
        assert!(Ca::load(ca.cert_der(), &other_key, &td()).is_err());
    }
}
