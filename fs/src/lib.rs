//! sigil-fs: how Sigil's server and agent keep secrets on disk.
//!
//! - [`ensure_private_dir`] — create a directory and force mode 0700.
//! - [`write_atomic`] — write a file through a temporary file created with
//!   the final mode (never briefly world-readable) and an atomic rename.
//! - [`bind_socket`] — bind a Unix socket in a private directory with a
//!   given mode, replacing a stale one.
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

/// Binds a Unix socket at `path` with `bind` and sets the socket file to
/// `mode`: a missing parent directory is created with `parent_mode` (an
/// existing one is left as the operator made it), and a stale socket from a
/// previous run is removed first.
pub fn bind_socket<L>(
    path: &Path,
    parent_mode: u32,
    mode: u32,
    bind: impl FnOnce(&Path) -> std::io::Result<L>,
) -> std::io::Result<L> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        fs::create_dir_all(parent)?;
        fs::set_permissions(parent, fs::Permissions::from_mode(parent_mode))?;
    }
    if path.exists() {
        fs::remove_file(path)?;
    }
    let listener = bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(listener)
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
    fn sockets_get_a_private_parent_and_their_mode() {
        let d = scratch("sock");
        let path = d.join("sub/admin.sock");
        let l = bind_socket(&path, 0o700, 0o600, |p| {
            std::os::unix::net::UnixListener::bind(p)
        })
        .unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&d.join("sub")), 0o700);
        drop(l);
        // A stale socket file is replaced.
        bind_socket(&path, 0o700, 0o600, |p| {
            std::os::unix::net::UnixListener::bind(p)
        })
        .unwrap();
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
