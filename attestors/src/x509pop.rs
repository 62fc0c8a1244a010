//! x509pop node attestation: the node proves possession of the private key
//! of a certificate that chains to a CA the server trusts.
//!
//! Agent side: [`NodeKey`] loads the node certificate chain and key and
//! signs the server's nonce. Server side: [`verify_chain`] checks the chain
//! against the configured roots and derives the agent's unique suffix and
//! selectors; [`VerifiedNode::verify_signature`] checks the proof. The
//! signed message is `"sigil-x509pop-v1" || nonce`, so a signature made for
//! anything else cannot be replayed here.

use ring::signature::{self, KeyPair, UnparsedPublicKey};
use rustls_pki_types::{CertificateDer, UnixTime};
use sigil_core::ids::sha256_hex;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Domain separation prefix of the signed challenge.
pub const CONTEXT: &[u8] = b"sigil-x509pop-v1";

/// x509pop attestation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X509PopError {
    /// The chain is empty or unparsable.
    #[error("invalid node certificate chain: {0}")]
    Chain(String),
    /// The chain does not lead to a configured root.
    #[error("node certificate does not chain to a trusted x509pop CA: {0}")]
    Untrusted(String),
    /// The proof of possession did not verify.
    #[error("x509pop signature does not verify")]
    Signature,
    /// The key type is not supported.
    #[error("unsupported node key: {0}")]
    KeyType(String),
    /// Reading the agent's certificate or key failed.
    #[error("{0}")]
    Io(String),
}

/// A node certificate that chained to a trusted root.
#[derive(Debug, Clone)]
pub struct VerifiedNode {
    /// SHA-256 of the leaf certificate (hex): the agent ID suffix.
    pub fingerprint: String,
    /// `x509pop:*` node selectors.
    pub selectors: Vec<String>,
    spki_alg: SpkiAlg,
    public_key: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
enum SpkiAlg {
    EcP256,
    EcP384,
    Rsa,
}

/// Verifies `chain` (leaf first) against `roots` (DER) at `now`.
pub fn verify_chain(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: UnixTime,
) -> Result<VerifiedNode, X509PopError> {
    let leaf = chain
        .first()
        .ok_or_else(|| X509PopError::Chain("empty".into()))?;
    let root_ders: Vec<CertificateDer<'_>> = roots
        .iter()
        .map(|r| CertificateDer::from(r.as_slice()))
        .collect();
    let anchors = root_ders
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .map_err(|e| X509PopError::Untrusted(format!("bad CA certificate: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let ee = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| X509PopError::Chain(format!("{e:?}")))?;
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| X509PopError::Untrusted(format!("{e:?}")))?;
    let anchor_spki = path.anchor().subject_public_key_info.as_ref().to_vec();
    let ca_fingerprint = roots
        .iter()
        // The anchor holds the SPKI's contents (without the outer SEQUENCE header).
        .find(|r| {
            X509Certificate::from_der(r)
                .is_ok_and(|(_, c)| c.tbs_certificate.subject_pki.raw.ends_with(&anchor_spki))
        })
        .map(|r| sha256_hex(r))
        .unwrap_or_default();

    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| X509PopError::Chain(e.to_string()))?;
    let mut selectors = Vec::new();
    for cn in cert.subject().iter_common_name() {
        if let Ok(v) = cn.as_str() {
            selectors.push(format!("x509pop:subject:cn:{v}"));
        }
    }
    if !ca_fingerprint.is_empty() {
        selectors.push(format!("x509pop:ca:fingerprint:{ca_fingerprint}"));
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for g in &san.value.general_names {
            match g {
                GeneralName::DNSName(d) => selectors.push(format!("x509pop:san:dns:{d}")),
                GeneralName::URI(u) => selectors.push(format!("x509pop:san:uri:{u}")),
                _ => {}
            }
        }
    }
    let spki = cert.public_key();
    let (spki_alg, public_key) = match spki.algorithm.algorithm.to_id_string().as_str() {
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            let alg = match curve.as_str() {
                "1.2.840.10045.3.1.7" => SpkiAlg::EcP256,
                "1.3.132.0.34" => SpkiAlg::EcP384,
                other => return Err(X509PopError::KeyType(format!("EC curve {other}"))),
            };
            (alg, spki.subject_public_key.data.to_vec())
        }
        "1.2.840.113549.1.1.1" => (SpkiAlg::Rsa, spki.subject_public_key.data.to_vec()),
        other => return Err(X509PopError::KeyType(other.to_string())),
    };
    Ok(VerifiedNode {
        fingerprint: sha256_hex(leaf),
        selectors,
        spki_alg,
        public_key,
    })
}

impl VerifiedNode {
    /// Checks the node's signature over the challenge.
    pub fn verify_signature(&self, nonce: &[u8], sig: &[u8]) -> Result<(), X509PopError> {
        let msg = [CONTEXT, nonce].concat();
        let alg: &dyn signature::VerificationAlgorithm = match self.spki_alg {
            SpkiAlg::EcP256 => &signature::ECDSA_P256_SHA256_ASN1,
            SpkiAlg::EcP384 => &signature::ECDSA_P384_SHA384_ASN1,
            SpkiAlg::Rsa => &signature::RSA_PKCS1_2048_8192_SHA256,
        };
        UnparsedPublicKey::new(alg, &self.public_key)
            .verify(&msg, sig)
            .map_err(|_| X509PopError::Signature)
    }
}

enum Signer {
    Ec(signature::EcdsaKeyPair),
    Rsa(signature::RsaKeyPair),
}

/// The agent's node certificate chain and key.
pub struct NodeKey {
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    signer: Signer,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl NodeKey {
    /// Loads a PEM chain (leaf first) and a PKCS#8 PEM key (ECDSA P-256/P-384 or RSA).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, X509PopError> {
        let chain = sigil_core::x509::pem_to_certs(cert_pem)
            .map_err(|e| X509PopError::Io(format!("x509pop.cert_path: {e}")))?;
        let key = pem::parse_many(key_pem)
            .map_err(|e| X509PopError::Io(format!("x509pop.key_path: {e}")))?
            .into_iter()
            .find(|p| p.tag() == "PRIVATE KEY")
            .ok_or_else(|| {
                X509PopError::Io("x509pop.key_path: expected a PKCS#8 \"PRIVATE KEY\" block".into())
            })?
            .into_contents();
        let rng = ring::rand::SystemRandom::new();
        let signer = if let Ok(k) = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &key,
            &rng,
        ) {
            Signer::Ec(k)
        } else if let Ok(k) = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            &key,
            &rng,
        ) {
            Signer::Ec(k)
        } else if let Ok(k) = signature::RsaKeyPair::from_pkcs8(&key) {
            Signer::Rsa(k)
        } else {
            return Err(X509PopError::KeyType(
                "x509pop.key_path: not an ECDSA P-256/P-384 or RSA PKCS#8 key".into(),
            ));
        };
        let leaf_key = match &signer {
            Signer::Ec(k) => k.public_key().as_ref().to_vec(),
            Signer::Rsa(k) => k.public_key().as_ref().to_vec(),
        };
        let (_, leaf) =
            X509Certificate::from_der(&chain[0]).map_err(|e| X509PopError::Chain(e.to_string()))?;
        if leaf.public_key().subject_public_key.data.as_ref() != leaf_key.as_slice() {
            return Err(X509PopError::Io(
                "x509pop.key_path: the key does not match the certificate".into(),
            ));
        }
        Ok(Self { chain, signer })
    }

    /// Signs the server's challenge.
    pub fn sign(&self, nonce: &[u8]) -> Result<Vec<u8>, X509PopError> {
        let msg = [CONTEXT, nonce].concat();
        let rng = ring::rand::SystemRandom::new();
        match &self.signer {
            Signer::Ec(k) => k
                .sign(&rng, &msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| X509PopError::Signature),
            Signer::Rsa(k) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, &msg, &mut sig)
                    .map_err(|_| X509PopError::Signature)?;
                Ok(sig)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };

    fn pki() -> (Vec<u8>, String, String) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        ca.distinguished_name.push(DnType::CommonName, "Node CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let node_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::default();
        leaf.distinguished_name.push(DnType::CommonName, "node-1");
        leaf.subject_alt_names = vec![SanType::DnsName("node-1.example.org".try_into().unwrap())];
        let leaf_cert = leaf.signed_by(&node_key, &issuer).unwrap();
        (
            ca_cert.der().to_vec(),
            leaf_cert.pem(),
            node_key.serialize_pem(),
        )
    }

    #[test]
    fn possession_proof_round_trip_and_selectors() {
        let (ca, cert_pem, key_pem) = pki();
        let key = NodeKey::load(&cert_pem, &key_pem).unwrap();
        let node = verify_chain(&key.chain, std::slice::from_ref(&ca), UnixTime::now()).unwrap();
        assert!(
            node.selectors
                .contains(&"x509pop:subject:cn:node-1".to_string()),
            "{:?}",
            node.selectors
        );
        assert!(
            node.selectors
                .contains(&"x509pop:san:dns:node-1.example.org".to_string())
        );
        assert!(
            node.selectors
                .contains(&format!("x509pop:ca:fingerprint:{}", sha256_hex(&ca))),
            "{:?}",
            node.selectors
        );
        let nonce = b"fresh nonce";
        let sig = key.sign(nonce).unwrap();
        node.verify_signature(nonce, &sig).unwrap();
        assert_eq!(
            node.verify_signature(b"other nonce", &sig),
            Err(X509PopError::Signature)
        );
    }

    #[test]
    fn foreign_chain_and_mismatched_key_are_refused() {
        let (_, cert_pem, key_pem) = pki();
        let (other_ca, _, other_key) = pki();
        let key = NodeKey::load(&cert_pem, &key_pem).unwrap();
        assert!(matches!(
            verify_chain(&key.chain, &[other_ca], UnixTime::now()),
            Err(X509PopError::Untrusted(_))
        ));
        assert!(NodeKey::load(&cert_pem, &other_key).is_err());
        assert!(verify_chain(&[], &[], UnixTime::now()).is_err());
    }
}
