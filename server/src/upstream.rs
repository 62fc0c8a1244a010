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
