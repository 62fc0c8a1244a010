//! An upstream authority: a CA certificate and key the operator already
//! holds in an enterprise PKI (an intermediate or a root), under which the
//! trust domain's X.509 CAs are issued as intermediates instead of being
//! self-signed.
//!
//! [`UpstreamIssuer::new`] checks everything a verifier will later depend
//! on before anything is signed: the certificate is a CA that may sign
//! another CA, the key is the certificate's, every certificate on the path
//! to one of the configured roots is valid now and signed by the next, and
//! rcgen reproduces the upstream subject byte for byte as the issuer name
//! (webpki matches names by bytes). The Sigil CA's lifetime is clamped to
//! the earliest `notAfter` on that path.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Which input of an upstream authority is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamPart {
    /// The upstream CA certificate (and the chain that follows it).
    Cert,
    /// The upstream CA's private key.
    Key,
    /// The upstream roots.
    Bundle,
}

/// Why an upstream authority was refused: the part at fault and what is
/// wrong with it. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct UpstreamError {
    /// The input at fault.
    pub part: UpstreamPart,
    /// What is wrong with it.
    pub reason: String,
}

fn err(part: UpstreamPart, reason: impl Into<String>) -> UpstreamError {
    UpstreamError {
        part,
        reason: reason.into(),
    }
}

/// The upstream CA, ready to sign the trust domain's CAs.
pub struct UpstreamIssuer {
    issuer: Issuer<'static, KeyPair>,
    /// The upstream CA certificate, DER.
    cert_der: Vec<u8>,
    /// What an SVID chain carries after the Sigil CA: the upstream CA and
    /// its intermediates, without any root of the bundle.
    chain: Vec<Vec<u8>>,
    /// The upstream roots (DER) and their `notAfter`, Unix seconds.
    roots: Vec<(Vec<u8>, i64)>,
    /// The earliest `notAfter` on the path from the upstream CA to its root.
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for UpstreamIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("UpstreamIssuer")
            .field("chain", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn parse<'a>(
    part: UpstreamPart,
    what: &str,
    der: &'a [u8],
) -> Result<X509Certificate<'a>, UpstreamError> {
    let (rest, c) = X509Certificate::from_der(der)
        .map_err(|e| err(part, format!("{what} does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(err(part, format!("{what}: trailing bytes")));
    }
    Ok(c)
}

fn subject(c: &X509Certificate<'_>) -> String {
    c.subject().to_string()
}

/// Refuses a certificate outside its validity at `now`.
fn check_valid(
    part: UpstreamPart,
    what: &str,
    c: &X509Certificate<'_>,
    now: i64,
) -> Result<(), UpstreamError> {
    let v = c.validity();
    if v.not_after.timestamp() <= now {
        return Err(err(
            part,
            format!("{what} ({}) expired at {}", subject(c), v.not_after),
        ));
    }
    if v.not_before.timestamp() > now {
        return Err(err(
            part,
            format!(
                "{what} ({}) is not valid before {}",
                subject(c),
                v.not_before
            ),
        ));
    }
    Ok(())
}

/// Refuses a certificate that may not sign certificates.
fn check_ca(part: UpstreamPart, what: &str, c: &X509Certificate<'_>) -> Result<(), UpstreamError> {
    if !c.is_ca() {
        return Err(err(
            part,
            format!(
                "{what} ({}) is not a CA (no basicConstraints CA:TRUE)",
                subject(c)
            ),
        ));
    }
    if let Ok(Some(ku)) = c.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(err(
            part,
            format!("{what} ({}) lacks the keyCertSign key usage", subject(c)),
        ));
    }
    Ok(())
}

impl UpstreamIssuer {
    /// Checks and loads an upstream authority at `now` (Unix seconds).
    ///
    /// - `certs`: the upstream CA certificate first, then (optionally) its
    ///   own chain of intermediates towards a root, DER. A trailing root
    ///   that is also in `roots` is accepted and never sent in chains.
    /// - `key_pem`: the upstream CA's private key, PKCS#8 PEM.
    /// - `roots`: the upstream root certificates, DER.
    pub fn new(
        certs: Vec<Vec<u8>>,
        key_pem: &str,
        roots: Vec<Vec<u8>>,
        now: i64,
    ) -> Result<UpstreamIssuer, UpstreamError> {
        use UpstreamPart::{Bundle, Cert, Key};
        let first = certs
            .first()
            .ok_or_else(|| err(Cert, "holds no certificate"))?
            .clone();
        if roots.is_empty() {
            return Err(err(Bundle, "holds no certificate"));
        }
        let mut parsed_roots = Vec::with_capacity(roots.len());
        for (i, r) in roots.iter().enumerate() {
            let c = parse(Bundle, &format!("root #{}", i + 1), r)?;
            check_ca(Bundle, &format!("root #{}", i + 1), &c)?;
            parsed_roots.push(c);
        }
        let path: Vec<X509Certificate<'_>> = certs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let what = if i == 0 {
                    "the upstream certificate".to_string()
                } else {
                    format!("chain certificate #{}", i + 1)
                };
                let c = parse(Cert, &what, d)?;
                check_ca(Cert, &what, &c)?;
                check_valid(Cert, &what, &c, now)?;
                Ok(c)
            })
            .collect::<Result<_, UpstreamError>>()?;
        // pathLenConstraint counts the CAs below: the Sigil CA is one.
        if let Ok(Some(bc)) = path[0].basic_constraints()
            && bc.value.path_len_constraint == Some(0)
        {
            return Err(err(
                Cert,
                format!(
                    "the upstream certificate ({}) has pathLenConstraint 0: it may not issue the Sigil CA, which itself issues SVIDs",
                    subject(&path[0])
                ),
            ));
        }
        // Each certificate is signed by the next one.
        for (i, pair) in path.windows(2).enumerate() {
            pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .map_err(|_| {
                    err(
                        Cert,
                        format!(
                            "certificate #{} ({}) is not signed by the next one in the file ({})",
                            i + 1,
                            subject(&pair[0]),
                            subject(&pair[1])
                        ),
                    )
                })?;
        }
        // The last one is a root of the bundle or is signed by one.
        let last_i = path.len() - 1;
        let last = &path[last_i];
        let anchor = if roots.contains(&certs[last_i]) {
            roots.iter().position(|r| *r == certs[last_i])
        } else {
            parsed_roots.iter().position(|r| {
                r.subject().as_raw() == last.issuer().as_raw()
                    && last.verify_signature(Some(r.public_key())).is_ok()
            })
        };
        let Some(anchor) = anchor else {
            return Err(err(
                Bundle,
                format!(
                    "no root in it issued {} (issuer {})",
                    subject(last),
                    last.issuer()
                ),
            ));
        };
        check_valid(Bundle, "the root", &parsed_roots[anchor], now)?;
        let not_after_unix = path
            .iter()
            .chain(std::iter::once(&parsed_roots[anchor]))
            .map(|c| c.validity().not_after.timestamp())
            .min()
            .unwrap_or(now);
        let not_after = OffsetDateTime::from_unix_timestamp(not_after_unix)
            .map_err(|e| err(Cert, format!("notAfter out of range: {e}")))?;

        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            err(
                Key,
                format!("not a PKCS#8 PEM private key rcgen can sign with: {e}"),
            )
        })?;
        if key.subject_public_key_info().as_slice() != path[0].public_key().raw {
            return Err(err(
                Key,
                format!(
                    "does not match the upstream certificate ({})",
                    subject(&path[0])
                ),
            ));
        }
        let chain: Vec<Vec<u8>> = certs
            .iter()
            .filter(|c| !roots.contains(c))
            .cloned()
            .collect();
        let roots = roots
            .iter()
            .zip(&parsed_roots)
            .map(|(der, c)| (der.clone(), c.validity().not_after.timestamp()))
            .collect();
        drop(path);
        drop(parsed_roots);
        let issuer = Issuer::from_ca_cert_der(&first.clone().into(), key).map_err(|e| {
            err(
                Cert,
                format!("its subject cannot be used as an issuer name: {e}"),
            )
        })?;
        let up = UpstreamIssuer {
            issuer,
            cert_der: first,
            chain,
            roots,
            not_after,
        };
        up.probe()?;
        Ok(up)
    }

    /// Signs a throwaway CA and checks what a verifier will check: the
    /// issuer name is the upstream subject byte for byte (rcgen rebuilds
    /// the name, and cannot for repeated or multi-valued attributes) and
    /// the signature verifies with the upstream certificate's key.
    fn probe(&self) -> Result<(), UpstreamError> {
        let fail = |r: String| err(UpstreamPart::Cert, r);
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Sigil upstream probe");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.not_after = self.not_after;
        let cert = self
            .sign(params, &key)
            .map_err(|e| err(UpstreamPart::Key, format!("signing with it failed: {e}")))?;
        let (_, up) = X509Certificate::from_der(&self.cert_der).map_err(|e| fail(e.to_string()))?;
        let (_, probe) = X509Certificate::from_der(cert.der()).map_err(|e| fail(e.to_string()))?;
        if probe.issuer().as_raw() != up.subject().as_raw() {
            return Err(fail(format!(
                "its subject ({}) cannot be reproduced as an issuer name (repeated or multi-valued attributes are not supported)",
                up.subject()
            )));
        }
        probe
            .verify_signature(Some(up.public_key()))
            .map_err(|_| err(UpstreamPart::Key, "a certificate it signed does not verify"))?;
        Ok(())
    }

    /// Signs `params` over `key`: `notAfter` clamped to [`Self::not_after`],
    /// the authority key identifier taken from the upstream certificate.
    pub(super) fn sign(
        &self,
        mut params: CertificateParams,
        key: &impl rcgen::PublicKeyData,
    ) -> Result<rcgen::Certificate, rcgen::Error> {
        params.not_after = params.not_after.min(self.not_after);
        params.use_authority_key_identifier_extension = true;
        params.signed_by(key, &self.issuer)
    }

    /// The upstream CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The certificates an SVID chain carries after the Sigil CA: the
    /// upstream CA and its intermediates, never a root of the bundle.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// The upstream roots (DER), in the order given.
    pub fn roots(&self) -> Vec<Vec<u8>> {
        self.roots.iter().map(|(d, _)| d.clone()).collect()
    }

    /// The upstream roots with their `notAfter` (Unix seconds).
    pub fn roots_with_expiry(&self) -> &[(Vec<u8>, i64)] {
        &self.roots
    }

    /// The earliest `notAfter` on the path to the root: no CA signed by
    /// this authority outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Whether `ca_der` was issued by this upstream CA (issuer name and
    /// signature), e.g. a CA kept from before a restart.
    pub fn issued(&self, ca_der: &[u8]) -> bool {
        let (Ok((_, up)), Ok((_, ca))) = (
            X509Certificate::from_der(&self.cert_der),
            X509Certificate::from_der(ca_der),
        ) else {
            return false;
        };
        ca.issuer().as_raw() == up.subject().as_raw()
            && ca.verify_signature(Some(up.public_key())).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509::{Ca, CsrSignature, new_key_and_csr};
    use rustls_pki_types::{CertificateDer, UnixTime};
    use spiffe::{SpiffeId, TrustDomain};
    use std::time::Duration;
    use x509_parser::prelude::{GeneralName, ParsedExtension};

    struct Made {
        der: Vec<u8>,
        key: KeyPair,
        params: CertificateParams,
    }

    fn now() -> i64 {
        OffsetDateTime::now_utc().unix_timestamp()
    }

    /// A CA named `cn` valid for `days`, signed by `by` (self-signed when
    /// `None`), with `ca = false` for a leaf-shaped certificate.
    fn make(cn: &str, by: Option<&Made>, days: i64, ca: bool, path_len: Option<u8>) -> Made {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example Corp");
        params.is_ca = match (ca, path_len) {
            (false, _) => IsCa::ExplicitNoCa,
            (true, None) => IsCa::Ca(BasicConstraints::Unconstrained),
            (true, Some(n)) => IsCa::Ca(BasicConstraints::Constrained(n)),
        };
        params.key_usages = if ca {
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign]
        } else {
            vec![KeyUsagePurpose::DigitalSignature]
        };
        let t = OffsetDateTime::now_utc();
        params.not_before = t - time::Duration::hours(1);
        params.not_after = t + time::Duration::days(days);
        let cert = match by {
            None => params.self_signed(&key).unwrap(),
            Some(b) => {
                let issuer = Issuer::from_params(&b.params, &b.key);
                params.signed_by(&key, &issuer).unwrap()
            }
        };
        Made {
            der: cert.der().to_vec(),
            key,
            params,
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    /// Signs a workload SVID under a CA issued by `up` and checks it with
    /// webpki against `roots` only.
    fn svid_verifies(up: &UpstreamIssuer, roots: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, String> {
        let (ca, _) = Ca::generate_under(&td(), Duration::from_secs(3600), Some(up)).unwrap();
        let (csr, _) = new_key_and_csr().unwrap();
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let leaf = ca
            .sign_svid(
                &csr,
                CsrSignature::Verify,
                &id,
                &[],
                Duration::from_secs(60),
            )
            .unwrap();
        let chain = ca.svid_chain(leaf);
        let ints: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        crate::tls::verify_svid_chain(
            roots,
            &CertificateDer::from(chain[0].as_slice()),
            &ints,
            UnixTime::now(),
            true,
        )?;
        Ok(chain)
    }

    #[test]
    fn cas_under_an_intermediate_chain_to_the_root_only() {
        let root = make("Example Root", None, 30, true, None);
        let int = make("Example Issuing CA", Some(&root), 10, true, Some(1));
        let up = UpstreamIssuer::new(
            vec![int.der.clone()],
            &int.key.serialize_pem(),
            vec![root.der.clone()],
            now(),
        )
        .unwrap();
        assert_eq!(up.chain(), std::slice::from_ref(&int.der));
        assert_eq!(up.roots(), std::slice::from_ref(&root.der));
        let chain = svid_verifies(&up, std::slice::from_ref(&root.der)).unwrap();
        // leaf, Sigil CA, the upstream intermediate; never the root.
        assert_eq!(chain.len(), 3);
        assert_eq!(chain[2], int.der);
        assert!(!chain.contains(&root.der));
        // The Sigil CA alone is not a trust anchor for it without the chain
        // above: the root is what verifiers hold.
        let (_, sigil) = X509Certificate::from_der(&chain[1]).unwrap();
        assert!(sigil.is_ca());
        assert!(up.issued(&chain[1]));
        let ku = sigil.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let uris: Vec<String> = sigil
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(uris, ["spiffe://example.org"]);
        // The authority key ID is the intermediate's subject key ID.
        let ski = |c: &X509Certificate<'_>| {
            c.extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                    _ => None,
                })
        };
        let aki = sigil
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        let (_, int_cert) = X509Certificate::from_der(&int.der).unwrap();
        assert!(aki.is_some());
        assert_eq!(aki, ski(&int_cert));
        // A self-signed CA is not one this authority issued.
        let (own, _) = Ca::generate(&td(), Duration::from_secs(60)).unwrap();
        assert!(!up.issued(own.cert_der()));
        assert!(own.chain_after_leaf().is_empty());
    }

    #[test]
    fn a_full_chain_file_and_a_root_as_upstream_work_too() {
        let root = make("Example Root", None, 30, true, None);
        let mid = make("Example Policy CA", Some(&root), 20, true, None);
        let int = make("Example Issuing CA", Some(&mid), 10, true, None);
        // cert_path: issuing CA, policy CA, and the root (dropped from chains).
        let up = UpstreamIssuer::new(
            vec![int.der.clone(), mid.der.clone(), root.der.clone()],
            &int.key.serialize_pem(),
            vec![root.der.clone()],
            now(),
        )
        .unwrap();
        assert_eq!(up.chain(), [int.der.clone(), mid.der.clone()]);
        let chain = svid_verifies(&up, std::slice::from_ref(&root.der)).unwrap();
        assert_eq!(chain.len(), 4);
        // The root itself as the upstream CA: the chain is leaf + Sigil CA.
        let up = UpstreamIssuer::new(
            vec![root.der.clone()],
            &root.key.serialize_pem(),
            vec![root.der.clone()],
            now(),
        )
        .unwrap();
        assert!(up.chain().is_empty());
        let chain = svid_verifies(&up, std::slice::from_ref(&root.der)).unwrap();
        assert_eq!(chain.len(), 2);
    }

    #[test]
    fn the_ca_never_outlives_the_upstream_path() {
        let root = make("Example Root", None, 30, true, None);
        let int = make("Example Issuing CA", Some(&root), 1, true, None);
        let up = UpstreamIssuer::new(
            vec![int.der.clone()],
            &int.key.serialize_pem(),
            vec![root.der.clone()],
            now(),
        )
        .unwrap();
        let (ca, _) =
            Ca::generate_under(&td(), Duration::from_secs(10 * 86_400), Some(&up)).unwrap();
        let (_, int_cert) = X509Certificate::from_der(&int.der).unwrap();
        assert_eq!(
            ca.not_after().unix_timestamp(),
            int_cert.validity().not_after.timestamp()
        );
    }

    #[test]
    fn bad_upstreams_are_refused_naming_the_part() {
        let root = make("Example Root", None, 30, true, None);
        let int = make("Example Issuing CA", Some(&root), 10, true, None);
        let other = make("Other Root", None, 30, true, None);
        let part = |certs: Vec<Vec<u8>>, key: &KeyPair, roots: Vec<Vec<u8>>, at: i64| {
            UpstreamIssuer::new(certs, &key.serialize_pem(), roots, at)
                .map(drop)
                .map_err(|e| (e.part, e.reason))
        };
        // The key of another certificate.
        let e = part(
            vec![int.der.clone()],
            &root.key,
            vec![root.der.clone()],
            now(),
        )
        .unwrap_err();
        assert_eq!(e.0, UpstreamPart::Key, "{e:?}");
        assert!(e.1.contains("does not match"), "{e:?}");
        // Not a CA.
        let leafy = make("Not A CA", Some(&root), 10, false, None);
        let e = part(
            vec![leafy.der.clone()],
            &leafy.key,
            vec![root.der.clone()],
            now(),
        )
        .unwrap_err();
        assert_eq!(e.0, UpstreamPart::Cert, "{e:?}");
        assert!(e.1.contains("not a CA"), "{e:?}");
        // pathLenConstraint 0 leaves no room for the Sigil CA.
        let tight = make("Tight CA", Some(&root), 10, true, Some(0));
        let e = part(
            vec![tight.der.clone()],
            &tight.key,
            vec![root.der.clone()],
            now(),
        )
        .unwrap_err();
        assert_eq!(e.0, UpstreamPart::Cert, "{e:?}");
        assert!(e.1.contains("pathLenConstraint 0"), "{e:?}");
        // Expired (checked as of a day past its notAfter).
        let late = now() + 11 * 86_400;
        let e = part(
            vec![int.der.clone()],
            &int.key,
            vec![root.der.clone()],
            late,
        )
        .unwrap_err();
        assert_eq!(e.0, UpstreamPart::Cert, "{e:?}");
        assert!(e.1.contains("expired"), "{e:?}");
        // A bundle whose roots did not issue it.
        let e = part(
            vec![int.der.clone()],
            &int.key,
            vec![other.der.clone()],
            now(),
        )
        .unwrap_err();
        assert_eq!(e.0, UpstreamPart::Bundle, "{e:?}");
        assert!(e.1.contains("no root"), "{e:?}");
        // Empty inputs.
        let e = part(vec![], &int.key, vec![root.der.clone()], now()).unwrap_err();
        assert_eq!(e.0, UpstreamPart::Cert);
        let e = part(vec![int.der.clone()], &int.key, vec![], now()).unwrap_err();
        assert_eq!(e.0, UpstreamPart::Bundle);
        // A key that is not PEM at all.
        let e = UpstreamIssuer::new(vec![int.der.clone()], "junk", vec![root.der.clone()], now())
            .unwrap_err();
        assert_eq!(e.part, UpstreamPart::Key);
    }
}
