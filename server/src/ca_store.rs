//! The CA on disk: `<data_dir>/ca.pem` and `<data_dir>/ca.key` (mode 0600,
//! in a 0700 directory). A restarted server keeps its CA; a missing or
//! expired CA is replaced by a new one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use sigil_core::TrustDomain;
use sigil_core::x509::{Ca, certs_to_pem, pem_to_certs};
use time::OffsetDateTime;

/// Creates `dir` (and parents) and forces mode 0700.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Writes `data` to `path` with mode `mode`, atomically (temp file + rename).
pub fn write_file_mode(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Checks that a key file is not readable by group or others.
pub fn check_key_mode(path: &Path) -> Result<(), String> {
    let mode = fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:o}; keys must be 0600",
            path.display(),
            mode & 0o777
        ));
    }
    Ok(())
}

/// Loads the CA from `data_dir`, or generates and persists a new one.
pub fn load_or_create(
    data_dir: &Path,
    td: &TrustDomain,
    ttl: std::time::Duration,
) -> Result<Ca, String> {
    ensure_private_dir(data_dir).map_err(|e| format!("data_dir {}: {e}", data_dir.display()))?;
    let cert_path = data_dir.join("ca.pem");
    let key_path = data_dir.join("ca.key");
    if cert_path.exists() && key_path.exists() {
        check_key_mode(&key_path)?;
        let cert_pem =
            fs::read_to_string(&cert_path).map_err(|e| format!("{}: {e}", cert_path.display()))?;
        let key_pem =
            fs::read_to_string(&key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
        let der = pem_to_certs(&cert_pem).map_err(|e| format!("{}: {e}", cert_path.display()))?;
        let ca =
            Ca::load(&der[0], &key_pem, td).map_err(|e| format!("{}: {e}", cert_path.display()))?;
        if ca.not_after() > OffsetDateTime::now_utc() {
            tracing::info!(not_after = %ca.not_after(), "loaded CA");
            return Ok(ca);
        }
        tracing::warn!("stored CA has expired; generating a new one");
    }
    let (ca, key_pem) = Ca::generate(td, ttl).map_err(|e| e.to_string())?;
    write_file_mode(&key_path, key_pem.as_bytes(), 0o600)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    write_file_mode(&cert_path, certs_to_pem([ca.cert_der()]).as_bytes(), 0o644)
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    tracing::info!(not_after = %ca.not_after(), "generated new CA");
    Ok(ca)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ca_persists_with_private_key_mode() {
        let dir = std::env::temp_dir().join(format!("sigil-ca-{}", std::process::id()));
        let td = TrustDomain::new("example.org").unwrap();
        let a = load_or_create(&dir, &td, Duration::from_secs(3600)).unwrap();
        let mode = fs::metadata(dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create(&dir, &td, Duration::from_secs(3600)).unwrap();
        assert_eq!(a.cert_der(), b.cert_der(), "restart keeps the CA");
        fs::set_permissions(dir.join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            load_or_create(&dir, &td, Duration::from_secs(3600)).is_err(),
            "world-readable key refused"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
