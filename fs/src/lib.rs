//! sigil-fs: how Sigil's server and agent keep secrets on disk, and which
//! files and directories they are willing to trust.
//!
//! - [`ensure_private_dir`] — create a `data_dir` (mode 0700) or accept an
//!   existing one only if it is a real directory owned by this process's
//!   effective uid (or root), not writable by group or others, in a parent
//!   that others cannot use to replace it. A directory we own that is merely
//!   readable by others is tightened to 0700; nothing we do not own is ever
//!   chmod'ed.
//! - [`read_private_file`] — read a secret (a key file, a join token): it
//!   must be owned by us or root and carry no group/other bits. Inside a
//!   `data_dir` it is opened with `O_NOFOLLOW` ([`Links::Refuse`]).
//! - [`read_trusted_file`] / [`check_trusted_file`] — a public file that
//!   is nevertheless trusted (a stored bundle, a stored certificate, the
//!   datastore): owned by us or root, not writable by group or others.
//! - [`check_private_file`] — the same test as [`read_private_file`] for
//!   a path given in a config file (symlinks followed, the target checked).
//! - [`write_atomic`] — write a file through a temporary file created with
//!   the final mode (never briefly world-readable) and an atomic rename.
//! - [`bind_socket`] — bind a Unix socket in a private directory with a
//!   given mode, replacing a stale one.
//!
//! Ancestors: only the immediate parent of a `data_dir` is checked (as
//! OpenSSH's `StrictModes` checks the directories it cares about, not the
//! whole path). The parent must be owned by us or root and must not be
//! writable by group or others, unless it has the sticky bit (like `/tmp`,
//! mode 1777): there others may create entries but cannot rename or remove
//! ours, and a directory someone else pre-created there is refused by the
//! owner check.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;

/// Whether a symbolic link may stand where a file is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Follow it and check its target (paths an operator configured, which
    /// are often links into a secret store).
    Follow,
    /// Refuse it (`O_NOFOLLOW`): files Sigil itself keeps in its `data_dir`.
    Refuse,
}

/// A file or directory Sigil refuses to trust, or could not examine. Every
/// variant names the path; the trust variants also give its owner and mode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The path could not be opened or examined.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A symbolic link stands where a real file or directory is expected.
    #[error(
        "{path} is a symbolic link; a real {expected} is expected here and the link is not followed"
    )]
    Symlink {
        /// The link.
        path: PathBuf,
        /// `directory` or `file`.
        expected: &'static str,
    },
    /// The path exists but is not the kind of object expected.
    #[error("{path} is not a {expected}")]
    WrongType {
        /// The path.
        path: PathBuf,
        /// `directory` or `regular file`.
        expected: &'static str,
    },
    /// Owned by someone other than this process's uid or root.
    #[error(
        "{path} is owned by uid {uid} (mode {mode:04o}), not by this process's uid {euid} or root; refusing to use it (left unchanged)"
    )]
    Owner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
        /// This process's effective uid.
        euid: u32,
    },
    /// Writable by group or others, who could replace or plant its contents.
    #[error(
        "{path} (owner uid {uid}, mode {mode:04o}) is writable by group or others, who could replace what it holds; refusing to use it (left unchanged: check its contents, then chmod go-w)"
    )]
    Writable {
        /// The path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// A secret that group or others can read or write.
    #[error(
        "{path} (owner uid {uid}, mode {mode:04o}) is accessible by group or others; it must be mode 0600 or stricter (chmod 600)"
    )]
    Exposed {
        /// The path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
    },
}

impl TrustError {
    /// True when the path simply does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, TrustError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    fn io(path: &Path, source: std::io::Error) -> Self {
        TrustError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<TrustError> for std::io::Error {
    fn from(e: TrustError) -> Self {
        let kind = match &e {
            TrustError::Io { source, .. } => source.kind(),
            _ => std::io::ErrorKind::PermissionDenied,
        };
        std::io::Error::new(kind, e)
    }
}

/// This process's effective uid, the owner its files must have.
fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn owner_ok(uid: u32) -> bool {
    uid == euid() || uid == 0
}

fn check_owner(path: &Path, m: &fs::Metadata) -> Result<(), TrustError> {
    if owner_ok(m.uid()) {
        Ok(())
    } else {
        Err(TrustError::Owner {
            path: path.to_path_buf(),
            uid: m.uid(),
            mode: m.mode() & 0o7777,
            euid: euid(),
        })
    }
}

/// The immediate parent of `dir` must not let anyone else replace `dir`.
fn check_parent(parent: &Path) -> Result<(), TrustError> {
    let m = fs::metadata(parent).map_err(|e| TrustError::io(parent, e))?;
    if !m.is_dir() {
        return Err(TrustError::WrongType {
            path: parent.to_path_buf(),
            expected: "directory",
        });
    }
    check_owner(parent, &m)?;
    let sticky = m.mode() & 0o1000 != 0;
    if m.mode() & 0o022 != 0 && !sticky {
        return Err(TrustError::Writable {
            path: parent.to_path_buf(),
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(())
}

fn is_errno(e: &std::io::Error, errno: nix::errno::Errno) -> bool {
    e.raw_os_error() == Some(errno as i32)
}

/// Creates `dir` with mode 0700, or accepts an existing `dir` only if it is
/// a real directory (not a symlink) owned by this process's uid or root,
/// writable by nobody else, whose parent nobody else can write to (a sticky
/// parent such as `/tmp` is fine). An owned directory that others can merely
/// read or search is tightened to 0700; a directory owned by root while we
/// are not root is never changed, so it must already be private. Missing
/// ancestors are created with mode 0755. Errors name the path, its owner and
/// its mode.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| TrustError::io(parent, e))?;
    }
    check_parent(parent)?;
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(TrustError::io(dir, e).into()),
    }
    let lm = fs::symlink_metadata(dir).map_err(|e| TrustError::io(dir, e))?;
    if lm.file_type().is_symlink() {
        return Err(TrustError::Symlink {
            path: dir.to_path_buf(),
            expected: "directory",
        }
        .into());
    }
    // Examine and fix the directory through one descriptor opened without
    // following links, so what we check is what we chmod.
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC).bits())
        .open(dir)
        .map_err(|e| {
            if is_errno(&e, nix::errno::Errno::ELOOP) {
                TrustError::Symlink {
                    path: dir.to_path_buf(),
                    expected: "directory",
                }
            } else if is_errno(&e, nix::errno::Errno::ENOTDIR) {
                TrustError::WrongType {
                    path: dir.to_path_buf(),
                    expected: "directory",
                }
            } else {
                TrustError::io(dir, e)
            }
        })?;
    let m = f.metadata().map_err(|e| TrustError::io(dir, e))?;
    check_owner(dir, &m)?;
    let mode = m.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(TrustError::Writable {
            path: dir.to_path_buf(),
            uid: m.uid(),
            mode,
        }
        .into());
    }
    if mode & 0o077 != 0 {
        if m.uid() != euid() {
            // Root's directory, and we are not root: not ours to change.
            return Err(TrustError::Exposed {
                path: dir.to_path_buf(),
                uid: m.uid(),
                mode,
            }
            .into());
        }
        f.set_permissions(fs::Permissions::from_mode(0o700))
            .map_err(|e| TrustError::io(dir, e))?;
    }
    Ok(())
}

/// Opens `path` for reading (without following a final symlink when
/// `links` is [`Links::Refuse`], and without blocking on a FIFO) and returns
/// the file with its metadata, which must describe a regular file owned by
/// us or root.
fn open_owned(path: &Path, links: Links) -> Result<(fs::File, fs::Metadata), TrustError> {
    let mut flags = OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    if links == Links::Refuse {
        flags |= OFlag::O_NOFOLLOW;
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
        .map_err(|e| {
            if links == Links::Refuse && is_errno(&e, nix::errno::Errno::ELOOP) {
                TrustError::Symlink {
                    path: path.to_path_buf(),
                    expected: "file",
                }
            } else {
                TrustError::io(path, e)
            }
        })?;
    let m = f.metadata().map_err(|e| TrustError::io(path, e))?;
    if !m.is_file() {
        return Err(TrustError::WrongType {
            path: path.to_path_buf(),
            expected: "regular file",
        });
    }
    check_owner(path, &m)?;
    Ok((f, m))
}

fn read_all(path: &Path, mut f: fs::File) -> Result<Vec<u8>, TrustError> {
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .map_err(|e| TrustError::io(path, e))?;
    Ok(buf)
}

fn private_mode(path: &Path, m: &fs::Metadata) -> Result<(), TrustError> {
    if m.mode() & 0o077 != 0 {
        return Err(TrustError::Exposed {
            path: path.to_path_buf(),
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(())
}

fn not_writable(path: &Path, m: &fs::Metadata) -> Result<(), TrustError> {
    if m.mode() & 0o022 != 0 {
        return Err(TrustError::Writable {
            path: path.to_path_buf(),
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Reads a secret: a regular file owned by this process's uid or root with
/// no group/other permission bits. The checks are made on the open file, so
/// the file read is the file checked.
pub fn read_private_file(path: &Path, links: Links) -> Result<Vec<u8>, TrustError> {
    let (f, m) = open_owned(path, links)?;
    private_mode(path, &m)?;
    read_all(path, f)
}

/// Reads a public file whose contents are trusted (a CA bundle, a
/// certificate): owned by us or root and not writable by group or others.
pub fn read_trusted_file(path: &Path, links: Links) -> Result<Vec<u8>, TrustError> {
    let (f, m) = open_owned(path, links)?;
    not_writable(path, &m)?;
    read_all(path, f)
}

/// Checks, without reading it, that `path` is a regular file owned by us or
/// root and not writable by group or others (for files another library
/// opens, such as the datastore).
pub fn check_trusted_file(path: &Path, links: Links) -> Result<(), TrustError> {
    let (_, m) = open_owned(path, links)?;
    not_writable(path, &m)
}

/// Checks that the key file at `path` (symlinks followed) is owned by this
/// process's uid or root and not accessible to group or others (0600 or
/// stricter). The error names the file, its owner and its mode.
pub fn check_private_file(path: &Path) -> Result<(), String> {
    let (_, m) = open_owned(path, Links::Follow).map_err(|e| e.to_string())?;
    private_mode(path, &m).map_err(|e| e.to_string())
}

/// Writes `data` to `path` with mode `mode`: a temporary file beside it is
/// created with that mode (`O_EXCL`, so never through a planted link),
/// synced, then renamed over `path`.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sigil-fs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn chmod(p: &Path, m: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn chown(p: &Path, uid: u32) {
        nix::unistd::chown(p, Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
    }

    #[test]
    fn written_files_have_the_mode_and_pass_the_check() {
        let d = scratch("write").join("data");
        ensure_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        let f = d.join("key.pem");
        write_atomic(&f, b"one", 0o600).unwrap();
        write_atomic(&f, b"two", 0o600).unwrap();
        assert_eq!(read_private_file(&f, Links::Refuse).unwrap(), b"two");
        assert_eq!(mode(&f), 0o600);
        assert!(check_private_file(&f).is_ok());
        assert!(!d.join("key.tmp").exists());
        fs::remove_dir_all(d.parent().unwrap()).unwrap();
    }

    #[test]
    fn an_own_readable_data_dir_is_tightened_and_missing_parents_created() {
        let s = scratch("tighten");
        let d = s.join("a/b/data");
        ensure_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&s.join("a/b")), 0o755);
        chmod(&d, 0o755);
        ensure_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        fs::remove_dir_all(&s).unwrap();
    }

    #[test]
    fn a_group_or_world_writable_data_dir_is_refused_and_left_alone() {
        let s = scratch("writable");
        let d = s.join("data");
        fs::create_dir(&d).unwrap();
        chmod(&d, 0o777);
        let e = ensure_private_dir(&d).unwrap_err().to_string();
        assert!(e.contains(&d.display().to_string()), "{e}");
        assert!(e.contains("0777") && e.contains("uid"), "{e}");
        assert_eq!(mode(&d), 0o777, "not chmod'ed");
        fs::remove_dir_all(&s).unwrap();
    }

    #[test]
    fn a_symlinked_data_dir_is_refused_and_its_target_untouched() {
        let s = scratch("link");
        let target = s.join("target");
        fs::create_dir(&target).unwrap();
        chmod(&target, 0o755);
        let link = s.join("data");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = ensure_private_dir(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link") && e.contains("data"), "{e}");
        assert_eq!(mode(&target), 0o755, "target not chmod'ed");
        fs::remove_dir_all(&s).unwrap();
    }

    #[test]
    fn a_writable_parent_without_sticky_bit_is_refused_but_tmp_is_fine() {
        let s = scratch("parent");
        chmod(&s, 0o777);
        let e = ensure_private_dir(&s.join("data")).unwrap_err().to_string();
        assert!(
            e.contains("0777") && e.contains(&s.display().to_string()),
            "{e}"
        );
        assert!(!s.join("data").exists(), "nothing created");
        // Sticky and world-writable, like /tmp.
        chmod(&s, 0o1777);
        ensure_private_dir(&s.join("data")).unwrap();
        chmod(&s, 0o755);
        fs::remove_dir_all(&s).unwrap();
        // /tmp itself (root-owned, 1777) is an acceptable parent.
        let t = std::env::temp_dir().join(format!("sigil-fs-tmpparent-{}", std::process::id()));
        let _ = fs::remove_dir_all(&t);
        ensure_private_dir(&t).unwrap();
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn a_foreign_owned_data_dir_or_key_is_refused_naming_owner_and_mode() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let s = scratch("foreign");
        let d = s.join("data");
        fs::create_dir(&d).unwrap();
        chmod(&d, 0o700);
        chown(&d, 65534);
        let e = ensure_private_dir(&d).unwrap_err().to_string();
        assert!(e.contains("uid 65534") && e.contains("0700"), "{e}");
        assert_eq!(fs::metadata(&d).unwrap().uid(), 65534, "not changed");

        // A foreign-owned parent is refused too.
        let p = s.join("theirs");
        fs::create_dir(&p).unwrap();
        chown(&p, 65534);
        let e = ensure_private_dir(&p.join("data")).unwrap_err().to_string();
        assert!(e.contains("uid 65534") && e.contains("theirs"), "{e}");

        let own = s.join("own");
        ensure_private_dir(&own).unwrap();
        let k = own.join("keys.json");
        write_atomic(&k, b"{}", 0o600).unwrap();
        chown(&k, 65534);
        let e = read_private_file(&k, Links::Refuse)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("uid 65534") && e.contains("0600") && e.contains("keys.json"),
            "{e}"
        );
        let e = check_private_file(&k).unwrap_err();
        assert!(e.contains("uid 65534"), "{e}");
        let e = read_trusted_file(&k, Links::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("uid 65534"), "{e}");
        fs::remove_dir_all(&s).unwrap();
    }

    #[test]
    fn sockets_get_a_private_parent_and_their_mode() {
        let d = scratch("sock");
        let path = d.join("sub/admin.sock");
        let l = bind_socket(&path, 0o700, 0o600, |p| {
            std::os::unix::net::UnixListener::bind(p)
        })
        .unwrap();
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
    fn readable_or_linked_key_files_are_refused() {
        let d = scratch("check").join("data");
        ensure_private_dir(&d).unwrap();
        let f = d.join("key.pem");
        write_atomic(&f, b"k", 0o644).unwrap();
        let e = check_private_file(&f).unwrap_err();
        assert!(e.contains("key.pem") && e.contains("0644"), "{e}");
        let e = read_private_file(&f, Links::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key.pem") && e.contains("0644"), "{e}");
        // Public but trusted: readable is fine, writable by others is not.
        assert_eq!(read_trusted_file(&f, Links::Refuse).unwrap(), b"k");
        chmod(&f, 0o666);
        let e = read_trusted_file(&f, Links::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0666") && e.contains("writable"), "{e}");
        chmod(&f, 0o600);
        let link = d.join("link.pem");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let e = read_private_file(&link, Links::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("symbolic link") && e.contains("link.pem"), "{e}");
        // An operator-configured path may be a link; its target is checked.
        assert_eq!(read_private_file(&link, Links::Follow).unwrap(), b"k");
        let missing = read_private_file(&d.join("missing"), Links::Refuse).unwrap_err();
        assert!(missing.is_not_found(), "{missing}");
        assert!(check_private_file(&d.join("missing")).is_err());
        fs::remove_dir_all(d.parent().unwrap()).unwrap();
    }
}
