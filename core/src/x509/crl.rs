//! Certificate revocation lists (RFC 5280 §5) signed by the trust domain's
//! CA: how a kill reaches relying parties that check revocation. A CRL
//! lists the serials of X.509-SVIDs that were withdrawn before their
//! expiry; it is short-lived (`nextUpdate` close to `thisUpdate`) and
//! re-signed by the server well before it goes stale.

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use time::OffsetDateTime;

use super::{Ca, X509Error};

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CrlEntry {
    /// Serial number, lowercase hex (as [`super::SvidInfo`] reads it).
    pub serial: String,
    /// When it was revoked, Unix seconds.
    pub revoked_at: i64,
}

fn at(unix: i64, field: &str) -> Result<OffsetDateTime, X509Error> {
    OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| X509Error::Certificate(format!("crl {field}: {e}")))
}

impl Ca {
    /// Signs a CRL listing `revoked`, numbered `number` (monotonic per
    /// CA), valid from `this_update` to `next_update` (Unix seconds).
    pub fn sign_crl(
        &self,
        revoked: &[CrlEntry],
        number: u64,
        this_update: i64,
        next_update: i64,
    ) -> Result<Vec<u8>, X509Error> {
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                let serial = hex::decode(&r.serial).map_err(|e| {
                    X509Error::Certificate(format!("crl serial {:?}: {e}", r.serial))
                })?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: at(r.revoked_at, "revocation time")?,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, X509Error>>()?;
        let params = CertificateRevocationListParams {
            this_update: at(this_update, "thisUpdate")?,
            next_update: at(next_update, "nextUpdate")?,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            // The CRL's authority key identifier must be the CA
            // certificate's subject key identifier for path builders
            // (openssl, webpki) to pair them.
            key_identifier_method: match &self.key_id {
                Some(id) => KeyIdMethod::PreSpecified(id.clone()),
                None => KeyIdMethod::Sha256,
            },
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|e| self.issuer.key().rcgen_error(e))?;
        Ok(crl.der().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509::CsrSignature;
    use spiffe::{SpiffeId, TrustDomain};
    use std::time::Duration;
    use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

    fn ca() -> Ca {
        let td = TrustDomain::new("example.org").unwrap_or_else(|e| panic!("{e}"));
        Ca::generate(&td, Duration::from_secs(3600))
            .unwrap_or_else(|e| panic!("{e}"))
            .0
    }

    fn leaf(ca: &Ca) -> super::super::SignedSvid {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap_or_else(|e| panic!("{e}"))
            .serialize_request(&key)
            .unwrap_or_else(|e| panic!("{e}"));
        let id = SpiffeId::new("spiffe://example.org/w").unwrap_or_else(|e| panic!("{e}"));
        ca.sign_svid_at(
            csr.der(),
            CsrSignature::Verify,
            &id,
            &[],
            Duration::from_secs(60),
            crate::now_unix(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn crl_lists_the_serials_and_verifies_with_the_ca_key() {
        let ca = ca();
        let a = leaf(&ca);
        let b = leaf(&ca);
        let now = crate::now_unix();
        let der = ca
            .sign_crl(
                &[CrlEntry {
                    serial: a.serial.clone(),
                    revoked_at: now,
                }],
                7,
                now,
                now + 600,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let (_, crl) = CertificateRevocationList::from_der(&der).unwrap_or_else(|e| panic!("{e}"));
        let serials: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect();
        assert_eq!(serials, vec![a.serial.clone()]);
        assert!(!serials.contains(&b.serial));
        assert_eq!(crl.crl_number().map(|n| n.to_string()), Some("7".into()));
        let (_, ca_cert) =
            X509Certificate::from_der(ca.cert_der()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(crl.issuer(), ca_cert.subject());
        crl.verify_signature(ca_cert.public_key())
            .unwrap_or_else(|e| panic!("CRL signature: {e}"));
        // The CRL's authority key identifier is the CA's subject key id.
        let aki = crl
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::prelude::ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        assert!(aki.is_some());
        assert_eq!(aki, ca.key_id);
    }

    #[test]
    fn bad_serial_and_inverted_validity_are_errors() {
        let ca = ca();
        let now = crate::now_unix();
        let bad = CrlEntry {
            serial: "zz".into(),
            revoked_at: now,
        };
        assert!(ca.sign_crl(&[bad], 1, now, now + 60).is_err());
        assert!(ca.sign_crl(&[], 1, now, now).is_err());
        assert!(ca.sign_crl(&[], 1, now, now + 60).is_ok());
    }
}
