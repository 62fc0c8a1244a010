//! The `unix` workload attestor.
//!
//! Identity of the caller comes from the kernel, not from the caller:
//! `SO_PEERCRED` gives pid/uid/gid at `connect()` time and `SO_PEERPIDFD`
//! (Linux 6.5+) gives a pidfd pinned to that very process. Selectors are
//! then read from `/proc/<pid>`; afterwards the pidfd is polled: if the
//! process has exited, the pid may have been reused while we read, so the
//! result is thrown away. On kernels without `SO_PEERPIDFD` the process
//! start time (field 22 of `/proc/<pid>/stat`) is read before and after and
//! must match, and the /proc uid must equal the socket's peer uid.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::{Gid, Group, Uid, User};
use sigil_core::selector::{Selector, SelectorSet};

/// Attestation of a peer failed; the caller must get no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The socket did not yield peer credentials.
    #[error("cannot read peer credentials: {0}")]
    PeerCredentials(String),
    /// The process exited or its pid was reused during attestation.
    #[error("peer process {0} exited or was replaced during attestation")]
    ProcessGone(i32),
    /// /proc could not be read for the peer.
    #[error("cannot read /proc for pid {0}: {1}")]
    Proc(i32, String),
}

/// The process at the other end of a Unix socket, as the kernel reported it
/// when the connection was made.
#[derive(Debug)]
pub struct Peer {
    /// Process ID.
    pub pid: i32,
    /// Effective user ID at connect time.
    pub uid: u32,
    /// Effective group ID at connect time.
    pub gid: u32,
    pidfd: Option<OwnedFd>,
}

impl Peer {
    /// Reads the peer of a connected Unix stream socket.
    pub fn from_socket(sock: &impl AsFd) -> Result<Peer, AttestError> {
        let cred = getsockopt(sock, sockopt::PeerCredentials)
            .map_err(|e| AttestError::PeerCredentials(e.to_string()))?;
        // SO_PEERPIDFD is absent before Linux 6.5 (ENOPROTOOPT/EINVAL): only
        // then fall back to start-time checks. Any other error (for example
        // ESRCH: the peer already exited) refuses the connection.
        let pidfd = match getsockopt(sock, sockopt::PeerPidfd) {
            Ok(fd) => Some(fd),
            Err(nix::errno::Errno::ENOPROTOOPT | nix::errno::Errno::EINVAL) => None,
            Err(e) => return Err(AttestError::PeerCredentials(format!("SO_PEERPIDFD: {e}"))),
        };
        Ok(Peer {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
            pidfd,
        })
    }

    /// True when the peer is pinned by a pidfd (kernel >= 6.5).
    pub fn has_pidfd(&self) -> bool {
        self.pidfd.is_some()
    }

    fn pidfd_alive(&self, fd: &OwnedFd) -> bool {
        // A pidfd becomes readable when its process exits.
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => true,
            Ok(_) => false,
            Err(_) => false,
        }
    }
}

/// Key of the binary-hash cache: a file is re-hashed when any of these change.
type FileKey = (u64, u64, i64, i64, u64);

/// The unix attestor. Cheap to share; it caches binary hashes by
/// (device, inode, mtime, ctime, size).
#[derive(Debug, Default)]
pub struct UnixAttestor {
    hashes: Mutex<HashMap<FileKey, String>>,
}

impl UnixAttestor {
    /// A new attestor with an empty hash cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Selectors for `peer`: `unix:uid`, `unix:gid`, `unix:user`,
    /// `unix:group`, `unix:supplementary_gid`, `unix:path`, `unix:sha256`.
    /// Path and hash are omitted when /proc/<pid>/exe is unreadable (the
    /// agent lacks ptrace rights over the peer); entries that require them
    /// then simply do not match.
    pub fn attest(&self, peer: &Peer) -> Result<SelectorSet, AttestError> {
        let pid = peer.pid;
        if pid <= 0 {
            return Err(AttestError::PeerCredentials(format!(
                "invalid peer pid {pid}"
            )));
        }
        let start_before = if peer.pidfd.is_none() {
            Some(start_time(pid)?)
        } else {
            None
        };
        if let Some(fd) = &peer.pidfd
            && !peer.pidfd_alive(fd)
        {
            return Err(AttestError::ProcessGone(pid));
        }

        let mut set = SelectorSet::new();
        let mut add = |k: &str, v: String| {
            if let Ok(s) = Selector::new("unix", &format!("{k}:{v}")) {
                set.insert(s);
            }
        };
        add("uid", peer.uid.to_string());
        add("gid", peer.gid.to_string());
        if let Ok(Some(u)) = User::from_uid(Uid::from_raw(peer.uid)) {
            add("user", u.name);
        }
        if let Ok(Some(g)) = Group::from_gid(Gid::from_raw(peer.gid)) {
            add("group", g.name);
        }
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| AttestError::Proc(pid, e.to_string()))?;
        let mut proc_uid = None;
        for line in status.lines() {
            if let Some(rest) = line.strip_prefix("Groups:") {
                for g in rest.split_whitespace() {
                    if g.parse::<u32>().is_ok() {
                        add("supplementary_gid", g.to_string());
                    }
                }
            } else if let Some(rest) = line.strip_prefix("Uid:") {
                // real, effective, saved, fs
                proc_uid = rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|u| u.parse::<u32>().ok());
            }
        }
        if let Ok(path) = fs::read_link(format!("/proc/{pid}/exe")) {
            add("path", path.to_string_lossy().into_owned());
            if let Ok(hash) = self.exe_sha256(pid) {
                add("sha256", hash);
            }
        }

        match (&peer.pidfd, start_before) {
            (Some(fd), _) => {
                if !peer.pidfd_alive(fd) {
                    return Err(AttestError::ProcessGone(pid));
                }
            }
            (None, Some(before)) => {
                if start_time(pid)? != before || proc_uid != Some(peer.uid) {
                    return Err(AttestError::ProcessGone(pid));
                }
            }
            (None, None) => return Err(AttestError::ProcessGone(pid)),
        }
        Ok(set)
    }

    fn exe_sha256(&self, pid: i32) -> std::io::Result<String> {
        // Opening /proc/<pid>/exe yields the binary the process runs, even if
        // the path was since replaced or deleted.
        let mut f = fs::File::open(format!("/proc/{pid}/exe"))?;
        let m = f.metadata()?;
        let key = (
            m.dev(),
            m.ino(),
            m.mtime_nsec() + m.mtime() * 1_000_000_000,
            m.ctime(),
            m.size(),
        );
        if let Ok(cache) = self.hashes.lock()
            && let Some(h) = cache.get(&key)
        {
            return Ok(h.clone());
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        let h = hex::encode(ctx.finish());
        if let Ok(mut cache) = self.hashes.lock() {
            if cache.len() > 4096 {
                cache.clear();
            }
            cache.insert(key, h.clone());
        }
        Ok(h)
    }
}

/// Process start time in clock ticks since boot (field 22 of /proc/<pid>/stat).
fn start_time(pid: i32) -> Result<u64, AttestError> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| AttestError::Proc(pid, e.to_string()))?;
    // The command name (field 2) may contain spaces and ')': split after the last ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| AttestError::Proc(pid, "malformed stat".into()))?;
    // `after` starts at field 3; field 22 is index 19 from there.
    after
        .split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| AttestError::Proc(pid, "malformed stat".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn attests_this_process_over_a_real_socket_pair() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = Peer::from_socket(&a).unwrap();
        assert_eq!(peer.pid, std::process::id() as i32);
        assert_eq!(peer.uid, nix::unistd::geteuid().as_raw());
        let set = UnixAttestor::new().attest(&peer).unwrap();
        let texts: Vec<String> = set.iter().map(ToString::to_string).collect();
        assert!(
            texts.contains(&format!("unix:uid:{}", peer.uid)),
            "{texts:?}"
        );
        assert!(
            texts.contains(&format!("unix:gid:{}", peer.gid)),
            "{texts:?}"
        );
        let exe = std::env::current_exe().unwrap();
        assert!(
            texts.contains(&format!("unix:path:{}", exe.display())),
            "{texts:?}"
        );
        let bytes = fs::read(&exe).unwrap();
        let want = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
        assert!(texts.contains(&format!("unix:sha256:{want}")), "{texts:?}");
    }

    #[test]
    fn a_peer_that_exits_before_attestation_gets_nothing() {
        let dir = std::env::temp_dir().join(format!("sigil-attest-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // A real child process connects and exits.
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import socket; s=socket.socket(socket.AF_UNIX); s.connect({:?})",
                path.to_str().unwrap()
            ))
            .spawn()
            .unwrap();
        let (conn, _) = listener.accept().unwrap();
        let peer = Peer::from_socket(&conn).unwrap();
        assert_eq!(peer.pid, child.id() as i32);
        child.wait().unwrap();
        let err = UnixAttestor::new().attest(&peer).unwrap_err();
        assert!(
            matches!(err, AttestError::ProcessGone(_) | AttestError::Proc(..)),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn start_time_parses_own_stat() {
        assert!(start_time(std::process::id() as i32).unwrap() > 0);
    }
}
