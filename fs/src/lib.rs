//! sigil-fs: how Sigil's server and agent keep secrets on disk.
//!
//! - [`ensure_private_dir`] — create a directory and force mode 0700.
//! - [`write_atomic`] — write a file through a temporary file created with
//!   the final mode (never briefly world-readable) and an atomic rename.
//! - [`check_private_file`] — refuse a key file that group or others can
//!   read or write.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and parents) and forces mode 0700.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Writes `data` to `path` with mode `mode`: a temporary file beside it is
/// created with that mode, synced, then renamed over `path`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
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

/// Checks that `path` is not accessible to group or others (a key file must
/// be 0600 or stricter). The error names the file and its mode.
pub fn check_private_file(path: &Path) -> Result<(), String> {
    let mode = fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:o}; it must not be accessible by group or others (chmod 600)",
            path.display(),
            mode & 0o777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sigil-fs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn written_files_have_the_mode_and_pass_the_check() {
        let d = scratch("write");
        ensure_private_dir(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let f = d.join("key.pem");
        write_atomic(&f, b"one", 0o600).unwrap();
        write_atomic(&f, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(check_private_file(&f).is_ok());
        assert!(!d.join("key.tmp").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn readable_key_files_are_refused() {
        let d = scratch("check");
        ensure_private_dir(&d).unwrap();
        let f = d.join("key.pem");
        write_atomic(&f, b"k", 0o644).unwrap();
        let e = check_private_file(&f).unwrap_err();
        assert!(e.contains("key.pem") && e.contains("644"), "{e}");
        assert!(check_private_file(&d.join("missing")).is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
