//! The upstream authority of `[upstream_authority]`: reading and checking
//! its three files at start, and what it changes in the signing keys.
//!
//! With an upstream authority every X.509 CA the server makes is an
//! intermediate issued by the upstream CA, SVID chains carry that CA and
//! the upstream intermediates, and the trust bundle is the upstream roots
//! (see `Keys`). The files are read before `data_dir` is touched, so a bad
//! upstream configuration fails the start with an error naming the key and
//! leaves nothing behind.

use std::sync::Arc;

use sigil_core::x509::{Ca, UpstreamIssuer, UpstreamPart, pem_to_certs};
use sigil_fs::{Links, read_private_file, read_trusted_file};

use crate::config::UpstreamConfig;
use crate::error::StartupError;

/// A loaded upstream authority, shared by the key rotation.
pub type Upstream = Arc<UpstreamIssuer>;

const CERT: &str = "upstream_authority.cert_path";
const KEY: &str = "upstream_authority.key_path";
const BUNDLE: &str = "upstream_authority.bundle_path";

/// Reads and checks the upstream authority's files at `now` (Unix
/// seconds): the certificate and bundle must not be writable by others,
/// the key must be private (0600 or 0400, owned by us or root). Errors
/// name the config key and the file; none carries key material.
pub fn load(cfg: &UpstreamConfig, now: i64) -> Result<Upstream, StartupError> {
    let cert_err = |e: &dyn std::fmt::Display| StartupError::file(CERT, &cfg.cert_path, e);
    let key_err = |e: &dyn std::fmt::Display| StartupError::file(KEY, &cfg.key_path, e);
    let bundle_err = |e: &dyn std::fmt::Display| StartupError::file(BUNDLE, &cfg.bundle_path, e);

    let certs = read_pem_certs(&cfg.cert_path).map_err(|e| cert_err(&e))?;
    let roots = read_pem_certs(&cfg.bundle_path).map_err(|e| bundle_err(&e))?;
    let key_pem = read_private_file(&cfg.key_path, Links::Follow).map_err(|e| key_err(&e))?;
    let key_pem = String::from_utf8(key_pem).map_err(|_| key_err(&"not UTF-8 PEM"))?;
    let key_pem = pkcs8_block(&key_pem).map_err(|e| key_err(&e))?;
    let up = UpstreamIssuer::new(certs, &key_pem, roots, now).map_err(|e| match e.part {
        UpstreamPart::Cert => cert_err(&e),
        UpstreamPart::Key => key_err(&e),
        UpstreamPart::Bundle => bundle_err(&e),
    })?;
    tracing::info!(
        chain = up.chain().len(),
        roots = up.roots_with_expiry().len(),
        not_after = %up.not_after(),
        "upstream authority loaded: X.509 CAs are issued under it"
    );
    Ok(Arc::new(up))
}

/// Every CERTIFICATE block of a PEM file that only we or root can change.
fn read_pem_certs(path: &std::path::Path) -> Result<Vec<Vec<u8>>, String> {
    let bytes = read_trusted_file(path, Links::Follow).map_err(|e| e.to_string())?;
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 PEM".to_string())?;
    pem_to_certs(&text).map_err(|e| e.to_string())
}

/// The one PKCS#8 `PRIVATE KEY` block of a key file, re-encoded as PEM;
/// other key formats are refused with the command that converts them.
fn pkcs8_block(text: &str) -> Result<String, String> {
    let blocks = pem::parse_many(text).map_err(|e| format!("bad PEM: {e}"))?;
    let mut keys = blocks
        .into_iter()
        .filter(|b| b.tag().contains("PRIVATE KEY"));
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return Err("expected exactly one PRIVATE KEY block".into());
    };
    match key.tag() {
        "PRIVATE KEY" => Ok(pem::encode(&key)),
        "ENCRYPTED PRIVATE KEY" => {
            Err("the key is encrypted; sigil-server needs it unencrypted (and mode 0600)".into())
        }
        other => Err(format!(
            "a {other} block is not PKCS#8; convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.p8`"
        )),
    }
}

/// Whether a CA kept in keys.json belongs to the current configuration,
/// and with which chain: with an upstream authority, only CAs it issued
/// (carrying its chain); without one, only self-signed CAs. A CA made
/// under another (or no) upstream is retired: its SVIDs would not verify
/// against the bundle now served.
pub fn adopt(ca: Ca, upstream: Option<&UpstreamIssuer>) -> Option<Ca> {
    let keep = match upstream {
        Some(up) => up.issued(ca.cert_der()),
        None => ca.is_self_issued(),
    };
    if !keep {
        tracing::warn!(
            not_after = %ca.not_after(),
            upstream = upstream.is_some(),
            "retiring a stored X.509 CA that the configured upstream authority did not issue; a new CA is made"
        );
        return None;
    }
    Some(match upstream {
        Some(up) => ca.with_chain(up.chain().to_vec()),
        None => ca,
    })
}

/// The roots as this server publishes them to the cluster (instead of its
/// CAs): every server with the same upstream publishes the same roots, so
/// the cluster's bundle is those roots however many servers there are.
pub fn published_roots(up: &UpstreamIssuer) -> Vec<crate::datastore::PublishedCa> {
    use base64::Engine;
    up.roots_with_expiry()
        .iter()
        .map(|(der, not_after)| crate::datastore::PublishedCa {
            der: base64::engine::general_purpose::STANDARD.encode(der),
            not_after: *not_after,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keys;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use sigil_core::TrustDomain;
    use sigil_core::jwt::JwtKeyType;
    use std::time::Duration;

    /// A root and an issuing CA it signed: (root DER, issuing DER, issuing key PEM).
    fn pki() -> (Vec<u8>, Vec<u8>, String) {
        let ca_params = |cn: &str| {
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p
        };
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params("Test Root");
        let root = root_params.self_signed(&root_key).unwrap();
        let int_key = KeyPair::generate().unwrap();
        let int = ca_params("Test Issuing CA")
            .signed_by(&int_key, &Issuer::from_params(&root_params, &root_key))
            .unwrap();
        (
            root.der().to_vec(),
            int.der().to_vec(),
            int_key.serialize_pem(),
        )
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn keys_under_an_upstream_publish_its_roots_and_retire_foreign_cas() {
        let dir = std::env::temp_dir().join(format!("sigil-upstream-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (root, int, key) = pki();
        let up = |root: &Vec<u8>, int: &Vec<u8>, key: &str| {
            Arc::new(
                UpstreamIssuer::new(
                    vec![int.clone()],
                    key,
                    vec![root.clone()],
                    sigil_core::now_unix(),
                )
                .unwrap(),
            )
        };
        let ttl = Duration::from_secs(600);
        let load = |u: Option<Upstream>| {
            Keys::load_or_create_under(&dir, &td(), ttl, JwtKeyType::EcP256, u).unwrap()
        };
        // Without upstream first: a self-signed CA, which is the bundle.
        let plain = load(None);
        let self_signed = plain.active_ca().cert_der().to_vec();
        assert_eq!(plain.x509_authorities(), vec![self_signed.clone()]);
        assert!(plain.active_ca().chain_after_leaf().is_empty());
        // With upstream: the self-signed CA is retired, the new CA is
        // issued by the upstream CA, and the bundle is the root.
        let a = load(Some(up(&root, &int, &key)));
        let ca = a.active_ca();
        assert_ne!(ca.cert_der(), self_signed.as_slice());
        assert_eq!(a.cas().len(), 1);
        assert_eq!(a.x509_authorities(), vec![root.clone()]);
        assert_eq!(
            ca.chain_after_leaf(),
            vec![ca.cert_der().to_vec(), int.clone()]
        );
        let (published, _) = a.published();
        assert_eq!(published.len(), 1);
        assert_eq!(
            base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                &published[0].der
            )
            .unwrap(),
            root
        );
        // A restart with the same upstream keeps that CA.
        let b = load(Some(up(&root, &int, &key)));
        assert_eq!(b.active_ca().cert_der(), ca.cert_der());
        // Rotation under the upstream: the successor is issued by it too,
        // and the bundle stays the root.
        let mut r = b;
        let t0 = sigil_core::now_unix();
        assert!(r.rotate(t0 + 510).unwrap());
        let next = r.active_ca();
        assert_ne!(next.cert_der(), ca.cert_der());
        assert!(up(&root, &int, &key).issued(next.cert_der()));
        assert_eq!(r.x509_authorities(), vec![root.clone()]);
        r.persist().unwrap();
        // Another upstream: both CAs are retired and a new one is made.
        let (root2, int2, key2) = pki();
        let c = load(Some(up(&root2, &int2, &key2)));
        assert_eq!(c.cas().len(), 1);
        assert!(up(&root2, &int2, &key2).issued(c.active_ca().cert_der()));
        assert_eq!(c.x509_authorities(), vec![root2]);
        // Back to no upstream: self-signed again.
        let d = load(None);
        assert!(d.active_ca().is_self_issued());
        assert_eq!(
            d.x509_authorities(),
            vec![d.active_ca().cert_der().to_vec()]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
