//! X.509 pieces of the SPIFFE X509-SVID spec: the signing CA, minting leaf
//! SVIDs from CSRs, and reading SVIDs back.
//!
//! What the CA signs is decided here, never by the CSR: the CSR contributes
//! only its public key (whether its self-signature is verified is the
//! caller's choice, see [`CsrSignature`]). Every leaf has exactly one URI
//! SAN, `CA:FALSE`, key usage `digitalSignature` and EKU server+client auth;
//! the CA certificate is `CA:TRUE` with `keyCertSign`/`cRLSign`.

use std::sync::Arc;
use std::time::Duration;

mod ca_key;
mod crl;
mod csr;
mod leaf;
mod upstream;

pub use crl::CrlEntry;
pub use upstream::{UpstreamError, UpstreamIssuer, UpstreamPart};

use ca_key::CaKey;
use csr::CsrKey;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PublicKeyData, SanType,
    SerialNumber,
};
use spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::signer::{ExternalKey, check_p256_point};

/// How far back a new certificate's notBefore is set, to absorb clock skew.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Whether the CA verifies a CSR's self-signature (its proof that the
/// requester holds the private key) before signing over the CSR's key.
///
/// An ECDSA verification costs about three signatures, so verifying every
/// CSR caps minting at roughly a quarter of the signing rate. Workload CSRs
/// arrive only over an agent's mTLS connection, for entries that agent is
/// authorized for, from keys the agent generated: a compromised agent could
/// generate fresh keys and obtain the same SVIDs anyway, so the check does
/// not narrow what it can get. SECURITY.md explains the trade-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrSignature {
    /// Verify the self-signature; refuse the CSR if it does not verify.
    Verify,
    /// Parse the CSR and check its key type, but trust the channel for
    /// possession of the key.
    TrustChannel,
}

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
    /// The CA's external key (a PKCS#11 token) did not sign.
    #[error("{0}")]
    Signer(String),
}

fn crypto(e: impl std::fmt::Display) -> X509Error {
    X509Error::Crypto(e.to_string())
}

/// 16 bytes from the OS CSPRNG, drawn 4 KiB at a time per thread: one
/// `getrandom` call serves 256 serials, instead of one call per SVID.
pub(crate) fn random_16() -> [u8; 16] {
    use std::cell::RefCell;
    thread_local! {
        static POOL: RefCell<(Box<[u8; 4096]>, usize)> = RefCell::new((Box::new([0; 4096]), 4096));
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let (buf, used) = &mut *p;
        if *used + 16 > buf.len() {
            **buf = crate::ids::random_bytes::<4096>();
            *used = 0;
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&buf[*used..*used + 16]);
        // Never hand out the same bytes twice.
        buf[*used..*used + 16].fill(0);
        *used += 16;
        out
    })
}

fn random_serial_bytes() -> [u8; 16] {
    let mut b = random_16();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and without a leading zero byte
    b
}

/// A 16-byte serial as lowercase hex, without `hex::encode`'s
/// char-at-a-time collect (this runs once per SVID signed).
fn hex_serial(serial: &[u8; 16]) -> String {
    let mut text = [0u8; 32];
    // Cannot fail: the output is exactly twice the input's length.
    let _ = hex::encode_to_slice(serial, &mut text);
    // Hex digits are ASCII, so this never falls back.
    String::from_utf8(text.to_vec()).unwrap_or_default()
}

fn random_serial() -> SerialNumber {
    SerialNumber::from_slice(&random_serial_bytes())
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
    issuer: Issuer<'static, CaKey>,
    /// The encoding every leaf of this CA shares.
    template: leaf::Template,
    cert_der: Vec<u8>,
    /// The CA certificate's subject key identifier, repeated as the
    /// authority key identifier of the CRLs it signs.
    key_id: Option<Vec<u8>>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    trust_domain: TrustDomain,
    /// What SVID chains carry after this CA (its upstream CA and their
    /// intermediates); empty for a self-signed CA.
    chain: Vec<Vec<u8>>,
    /// The certificate names itself as issuer (a self-signed root).
    self_issued: bool,
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
        Self::generate_under(td, ttl, None)
    }

    /// [`Ca::generate`], but issued by `upstream` when given: an
    /// intermediate CA whose life ends no later than the upstream path's,
    /// and whose SVID chains carry the upstream intermediates.
    pub fn generate_under(
        td: &TrustDomain,
        ttl: Duration,
        upstream: Option<&UpstreamIssuer>,
    ) -> Result<(Ca, String), X509Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
        let key_pem = key.serialize_pem();
        let ca = Ca::issue(td, ttl, CaKey::Local(key), upstream)?;
        Ok((ca, key_pem))
    }

    /// Generates a new CA valid for `ttl` over an external ECDSA P-256
    /// key (which signs the certificate and everything the CA signs).
    pub fn generate_external(
        td: &TrustDomain,
        ttl: Duration,
        key: Arc<dyn ExternalKey>,
    ) -> Result<Ca, X509Error> {
        check_p256_point(key.public_point()).map_err(X509Error::Signer)?;
        Ca::issue(td, ttl, CaKey::external(key), None)
    }

    /// A new CA certificate over `key`, self-signed or issued by
    /// `upstream`, and the CA.
    fn issue(
        td: &TrustDomain,
        ttl: Duration,
        key: CaKey,
        upstream: Option<&UpstreamIssuer>,
    ) -> Result<Ca, X509Error> {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Sigil");
        dn.push(DnType::CommonName, format!("Sigil CA {td}"));
        // Every CA of the trust domain gets its own name: CRLs are matched
        // to certificates by issuer name (webpki compares nothing else), so
        // two published CAs with one name would have each other's CRLs
        // checked against the wrong key during a rotation.
        dn.push(
            DnType::OrganizationalUnitName,
            format!("ca-{}", hex::encode(&random_16()[..8])),
        );
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
        let cert = match upstream {
            None => params.self_signed(&key),
            Some(up) => up.sign(params, &key),
        }
        .map_err(|e| key.rcgen_error(e))?;
        let ca = Ca::with_key(cert.der(), key, td)?;
        Ok(match upstream {
            None => ca,
            Some(up) => ca.with_chain(up.chain().to_vec()),
        })
    }

    /// Loads a CA from its DER certificate and PKCS#8 PEM key.
    pub fn load(cert_der: &[u8], key_pem: &str, td: &TrustDomain) -> Result<Ca, X509Error> {
        let key = KeyPair::from_pem(key_pem).map_err(crypto)?;
        Ca::with_key(cert_der, CaKey::Local(key), td)
    }

    /// Loads a CA from its DER certificate and the external key it was
    /// made over (the certificate must name that key).
    pub fn load_external(
        cert_der: &[u8],
        key: Arc<dyn ExternalKey>,
        td: &TrustDomain,
    ) -> Result<Ca, X509Error> {
        check_p256_point(key.public_point()).map_err(X509Error::Signer)?;
        Ca::with_key(cert_der, CaKey::external(key), td)
    }

    /// The external key this CA signs with, if it has one.
    pub fn external_key(&self) -> Option<&Arc<dyn ExternalKey>> {
        match self.issuer.key() {
            CaKey::Local(_) => None,
            CaKey::External(e) => Some(&e.key),
        }
    }

    fn with_key(cert_der: &[u8], key: CaKey, td: &TrustDomain) -> Result<Ca, X509Error> {
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
        let sig_alg = if key.algorithm() == &PKCS_ECDSA_P256_SHA256 {
            leaf::ECDSA_SHA256
        } else if key.algorithm() == &PKCS_ECDSA_P384_SHA384 {
            leaf::ECDSA_SHA384
        } else {
            return Err(X509Error::Certificate(
                "CA key must be ECDSA P-256 or P-384".into(),
            ));
        };
        let key_id = parsed
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0),
                _ => None,
            });
        let template = leaf::Template::new(sig_alg, parsed.subject().as_raw(), key_id);
        let key_id = key_id.map(<[u8]>::to_vec);
        let issuer = Issuer::from_ca_cert_der(&cert_der.to_vec().into(), key).map_err(crypto)?;
        Ok(Ca {
            issuer,
            template,
            cert_der: cert_der.to_vec(),
            key_id,
            not_before,
            not_after,
            trust_domain: td.clone(),
            chain: Vec::new(),
            self_issued: parsed.subject().as_raw() == parsed.issuer().as_raw(),
        })
    }

    /// This CA with `chain` (its upstream CA and their intermediates, DER)
    /// carried after it in every SVID chain.
    pub fn with_chain(mut self, chain: Vec<Vec<u8>>) -> Ca {
        self.chain = chain;
        self
    }

    /// What SVID chains carry after the leaf: nothing for a self-signed
    /// CA (it is in the bundle); for an upstream-signed one, this CA and
    /// the upstream intermediates, up to but not including a root.
    pub fn chain_after_leaf(&self) -> Vec<Vec<u8>> {
        if self.chain.is_empty() && self.self_issued {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(1 + self.chain.len());
        out.push(self.cert_der.clone());
        out.extend(self.chain.iter().cloned());
        out
    }

    /// `leaf` followed by [`Ca::chain_after_leaf`]: the X.509-SVID chain as
    /// served (`[leaf]` alone for a self-signed CA).
    pub fn svid_chain(&self, leaf: Vec<u8>) -> Vec<Vec<u8>> {
        let mut out = vec![leaf];
        out.extend(self.chain_after_leaf());
        out
    }

    /// Whether the CA certificate names itself as issuer (self-signed).
    pub fn is_self_issued(&self) -> bool {
        self.self_issued
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
        check: CsrSignature,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<Vec<u8>, X509Error> {
        self.sign_svid_at(csr_der, check, id, dns_names, ttl, crate::now_unix())
            .map(|s| s.der)
    }

    /// [`Ca::sign_svid`] for a leaf issued at `now` (Unix seconds), also
    /// returning the leaf's serial and `notAfter` as they were encoded (for
    /// the audit trail, without re-parsing the certificate). `notBefore` is
    /// `now` less [`BACKDATE`] and `notAfter` is `now` plus `ttl` (clamped
    /// to the CA's expiry), to the second. A caller that capped `ttl`
    /// against `now` (an entry's expiry, a task's deadline) therefore gets a
    /// leaf that ends no later than the cap, however much time passes
    /// between the two; a mint batch also reads the clock once instead of
    /// once per leaf.
    pub fn sign_svid_at(
        &self,
        csr_der: &[u8],
        check: CsrSignature,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        now: i64,
    ) -> Result<SignedSvid, X509Error> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(X509Error::Certificate(format!(
                "{id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        for d in dns_names {
            if !d.is_ascii() {
                return Err(X509Error::Certificate(format!(
                    "dns name {d:?}: not an IA5 (ASCII) string"
                )));
            }
        }
        let key = csr_public_key(csr_der, check)?;
        let now = OffsetDateTime::from_unix_timestamp(now)
            .map_err(|e| X509Error::Certificate(format!("issue time {now}: {e}")))?;
        let serial = random_serial_bytes();
        let not_after = offset(now, ttl, true).min(self.not_after);
        let leaf = leaf::Leaf {
            serial: &serial,
            not_before: offset(now, BACKDATE, false),
            not_after,
            spki: key.spki,
            public_key: key.point,
            spiffe_id: id,
            dns_names,
        };
        let der = self
            .template
            .certificate(&leaf, |tbs| self.issuer.key().sign_der(tbs))?;
        Ok(SignedSvid {
            der,
            serial: hex_serial(&serial),
            // Certificate times have whole seconds: the encoding drops the
            // fraction, as `unix_timestamp` does.
            not_after: not_after.unix_timestamp(),
        })
    }
}

/// A leaf signed by [`Ca::sign_svid_at`].
#[derive(Debug, Clone)]
pub struct SignedSvid {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Its serial number, lowercase hex (as [`SvidInfo::serial`] reads it).
    pub serial: String,
    /// Its `notAfter`, Unix seconds.
    pub not_after: i64,
}

/// Parses a PKCS#10 CSR, checks that its key is ECDSA P-256 or P-384 and,
/// with [`CsrSignature::Verify`], that its self-signature verifies.
///
/// Both modes read the CSR with the strict DER walk first, so they accept
/// the same encodings: x509-parser alone accepts some that are not DER
/// (an AlgorithmIdentifier tagged `[APPLICATION 16]` instead of SEQUENCE,
/// which the self-signature does not cover; found by fuzz/fuzz_targets/csr.rs).
fn csr_public_key(csr_der: &[u8], check: CsrSignature) -> Result<CsrKey<'_>, X509Error> {
    let strict = csr::public_key(csr_der)?;
    if check == CsrSignature::TrustChannel {
        return Ok(strict);
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(csr_der).map_err(|e| X509Error::Csr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(X509Error::Csr("trailing bytes after the CSR".into()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(X509Error::CsrKeyType);
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .ok_or(X509Error::CsrKeyType)?;
    let point_len = csr::point_len(curve.as_bytes())?;
    // The BIT STRING ends the SubjectPublicKeyInfo: borrow the point from
    // the raw DER (which outlives the parsed CSR).
    let raw: &[u8] = spki.raw;
    let point = raw
        .get(raw.len().saturating_sub(point_len)..)
        .filter(|p| **p == *spki.subject_public_key.data)
        .unwrap_or_default();
    csr::check_point(point, point_len)?;
    if spki.raw != strict.spki || point != strict.point {
        return Err(X509Error::Csr(
            "the CSR's key reads differently in two DER parsers".into(),
        ));
    }
    csr.verify_signature()
        .map_err(|e| X509Error::Csr(format!("signature does not verify: {e}")))?;
    Ok(strict)
}

/// The key a CSR would be signed over, as `(SubjectPublicKeyInfo DER,
/// uncompressed point)`: the strict DER walk for
/// [`CsrSignature::TrustChannel`], x509-parser and the self-signature for
/// [`CsrSignature::Verify`]. For the fuzz targets, which compare the two.
#[doc(hidden)]
pub fn csr_key(csr_der: &[u8], check: CsrSignature) -> Result<(&[u8], &[u8]), X509Error> {
    csr_public_key(csr_der, check).map(|k| (k.spki, k.point))
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

/// Splits concatenated DER certificates (the Workload API's `x509_svid`
/// and `bundle` fields) into one DER blob each, in order.
pub fn split_der_certs(mut b: &[u8]) -> Result<Vec<Vec<u8>>, X509Error> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (rest, _) =
            X509Certificate::from_der(b).map_err(|e| X509Error::Certificate(e.to_string()))?;
        out.push(b[..b.len() - rest.len()].to_vec());
        b = rest;
    }
    Ok(out)
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

    /// Signs a fresh CSR for `spiffe://example.org/svc` at `at`.
    fn sign_at(ca: &Ca, ttl: Duration, at: i64) -> Result<SignedSvid, X509Error> {
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let (csr, _key) = new_key_and_csr().unwrap();
        ca.sign_svid_at(&csr, CsrSignature::TrustChannel, &id, &[], ttl, at)
    }

    #[test]
    fn issued_serial_and_expiry_match_the_signed_leaf() {
        let (ca, _) = Ca::generate(&td(), Duration::from_secs(3600)).unwrap();
        for ttl in [1, 300, 7200] {
            let s = sign_at(&ca, Duration::from_secs(ttl), crate::now_unix()).unwrap();
            let info = SvidInfo::from_der(&s.der).unwrap();
            assert_eq!(s.serial, info.serial);
            assert_eq!(s.serial.len(), 32);
            assert_eq!(s.not_after, info.not_after);
        }
    }

    #[test]
    fn a_leaf_signed_at_a_given_time_is_dated_from_it_not_from_the_clock() {
        let (ca, _) = Ca::generate(&td(), Duration::from_secs(86_400)).unwrap();
        // Far enough from the wall clock that reading it would show.
        let at = crate::now_unix() - 1_000;
        let s = sign_at(&ca, Duration::from_secs(300), at).unwrap();
        let info = SvidInfo::from_der(&s.der).unwrap();
        assert_eq!(info.not_before, at - BACKDATE.as_secs() as i64);
        assert_eq!(info.not_after, at + 300);
        assert_eq!(s.not_after, at + 300);
        // Still clamped to the CA's own expiry.
        let late = sign_at(&ca, Duration::from_secs(86_400 * 30), at).unwrap();
        assert_eq!(late.not_after, ca.not_after().unix_timestamp());
        // A time the certificate cannot carry is an error, not a panic.
        assert!(matches!(
            sign_at(&ca, Duration::from_secs(1), i64::MAX),
            Err(X509Error::Certificate(_))
        ));
    }

    #[test]
    fn minted_svid_meets_the_x509_svid_profile() {
        let (ca, key_pem) = Ca::generate(&td(), Duration::from_secs(3600)).unwrap();
        let (csr, _key) = new_key_and_csr().unwrap();
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let der = ca
            .sign_svid(
                &csr,
                CsrSignature::Verify,
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
        // webpki (what rustls uses) accepts it as client and server cert.
        for server in [true, false] {
            let got = crate::tls::verify_svid_chain(
                &[ca.cert_der().to_vec()],
                &der.clone().into(),
                &[],
                rustls_pki_types::UnixTime::now(),
                server,
            )
            .unwrap();
            assert_eq!(got, id);
        }
        // SANs: the URI, then the DNS name, which is also the CN; the
        // authority key ID is the CA's subject key ID.
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(
            sans,
            ["URI(spiffe://example.org/svc)", "DNSName(svc.example.org)"]
        );
        assert_eq!(
            leaf.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "svc.example.org"
        );
        let key_id = |c: &X509Certificate<'_>| {
            c.extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                    _ => None,
                })
        };
        let aki = leaf
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        assert!(key_id(&ca_cert).is_some());
        assert_eq!(aki, key_id(&ca_cert));
        assert!(key_id(&leaf).is_some());
        assert_eq!(leaf.issuer().as_raw(), ca_cert.subject().as_raw());
        assert_eq!(leaf.public_key().raw, {
            let (_, req) =
                x509_parser::certification_request::X509CertificationRequest::from_der(&csr)
                    .unwrap();
            req.certification_request_info.subject_pki.raw
        });

        let ca2 = Ca::load(ca.cert_der(), &key_pem, &td()).unwrap();
        let der2 = ca2
            .sign_svid(
                &csr,
                CsrSignature::Verify,
                &id,
                &[],
                Duration::from_secs(60),
            )
            .unwrap();
        let (_, leaf2) = X509Certificate::from_der(&der2).unwrap();
        leaf2.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn leaves_past_2049_use_generalized_time() {
        let thirty_years = Duration::from_secs(30 * 365 * 86_400);
        let (ca, _) = Ca::generate(&td(), thirty_years).unwrap();
        let (csr, _) = new_key_and_csr().unwrap();
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let der = ca
            .sign_svid(&csr, CsrSignature::Verify, &id, &[], thirty_years)
            .unwrap();
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        let want = OffsetDateTime::now_utc().unix_timestamp() + thirty_years.as_secs() as i64;
        let got = leaf.validity().not_after.timestamp();
        assert!(
            (want - got).abs() < 60,
            "notAfter {got}, expected about {want}"
        );
        let (_, ca_cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn svid_lifetime_never_exceeds_the_ca() {
        let (ca, _) = Ca::generate(&td(), Duration::from_secs(100)).unwrap();
        let (csr, _) = new_key_and_csr().unwrap();
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let der = ca
            .sign_svid(
                &csr,
                CsrSignature::Verify,
                &id,
                &[],
                Duration::from_secs(10_000),
            )
            .unwrap();
        let info = SvidInfo::from_der(&der).unwrap();
        assert!(info.not_after <= ca.not_after().unix_timestamp());
    }

    #[test]
    fn bad_csrs_and_foreign_ids_are_refused() {
        let (ca, _) = Ca::generate(&td(), Duration::from_secs(100)).unwrap();
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        assert!(matches!(
            ca.sign_svid(
                b"garbage",
                CsrSignature::TrustChannel,
                &id,
                &[],
                Duration::from_secs(5)
            ),
            Err(X509Error::Csr(_))
        ));
        let (mut csr, _) = new_key_and_csr().unwrap();
        let n = csr.len();
        csr[n - 5] ^= 0xff; // break the signature
        assert!(matches!(
            ca.sign_svid(&csr, CsrSignature::Verify, &id, &[], Duration::from_secs(5)),
            Err(X509Error::Csr(_))
        ));
        // Without verification the broken signature passes, but a key of
        // the wrong type or a malformed point is still refused.
        assert!(
            ca.sign_svid(
                &csr,
                CsrSignature::TrustChannel,
                &id,
                &[],
                Duration::from_secs(5)
            )
            .is_ok()
        );
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let ed_csr = CertificateParams::default().serialize_request(&ed).unwrap();
        for check in [CsrSignature::Verify, CsrSignature::TrustChannel] {
            assert_eq!(
                ca.sign_svid(ed_csr.der(), check, &id, &[], Duration::from_secs(5)),
                Err(X509Error::CsrKeyType)
            );
        }
        let (csr, _) = new_key_and_csr().unwrap();
        let other = SpiffeId::new("spiffe://other.org/svc").unwrap();
        assert!(
            ca.sign_svid(
                &csr,
                CsrSignature::Verify,
                &other,
                &[],
                Duration::from_secs(5)
            )
            .is_err()
        );
    }

    #[test]
    fn verified_csrs_must_be_der_outside_the_signed_part_too() {
        // Found by fuzz/fuzz_targets/csr.rs: the signatureAlgorithm SEQUENCE
        // retagged [APPLICATION 16] (0x70). The self-signature does not
        // cover it and x509-parser accepted it; openssl and the strict walk
        // refuse it.
        let (csr, _) = new_key_and_csr().unwrap();
        let alg = [
            0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
        ];
        let at = csr.windows(alg.len()).rposition(|w| w == alg).unwrap();
        let mut bad = csr.clone();
        bad[at] = 0x70;
        for check in [CsrSignature::Verify, CsrSignature::TrustChannel] {
            assert!(csr_public_key(&csr, check).is_ok());
            assert!(
                matches!(csr_public_key(&bad, check), Err(X509Error::Csr(_))),
                "{check:?}"
            );
        }
    }

    #[test]
    fn ca_key_mismatch_is_refused() {
        let (ca, _) = Ca::generate(&td(), Duration::from_secs(100)).unwrap();
        let (_, other_key) = Ca::generate(&td(), Duration::from_secs(100)).unwrap();
        assert!(Ca::load(ca.cert_der(), &other_key, &td()).is_err());
    }
}
