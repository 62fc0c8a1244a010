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
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::{Gid, Group, Uid, User};
use sigil_core::selector::{Selector, SelectorSet, escape_bytes};
use tokio::io::unix::AsyncFd;

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

/// Which of the unix attestor's costlier selectors a call derives. The
/// cheap ones (`uid`, `gid`, `user`, `group`) always are; these two cost
/// reads of `/proc` on every call and are skipped when no registration
/// entry on the agent uses them, which cannot change what a caller is
/// entitled to: an entry matches when the caller has *all* its selectors,
/// so a selector no entry names decides nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnixNeeds {
    /// `unix:supplementary_gid` (reads `/proc/<pid>/status`).
    pub groups: bool,
    /// `unix:path` and `unix:sha256` (a `readlink` and a `stat` of
    /// `/proc/<pid>/exe`, and hashing the binary when its digest is not
    /// cached).
    pub exe: bool,
}

impl UnixNeeds {
    /// Every unix selector (the operator's `api debug selectors`, the broker).
    pub const ALL: UnixNeeds = UnixNeeds {
        groups: true,
        exe: true,
    };
    /// Only the selectors that come from the socket's credentials.
    pub const NONE: UnixNeeds = UnixNeeds {
        groups: false,
        exe: false,
    };

    /// What entries with `selectors` need derived.
    pub fn of<'a>(selectors: impl IntoIterator<Item = &'a Selector>) -> UnixNeeds {
        let mut n = UnixNeeds::NONE;
        for s in selectors {
            let t = s.as_str();
            n.groups |= t.starts_with("unix:supplementary_gid:");
            n.exe |= t.starts_with("unix:path:") || t.starts_with("unix:sha256:");
        }
        n
    }

    /// Both sets together.
    pub fn union(self, other: UnixNeeds) -> UnixNeeds {
        UnixNeeds {
            groups: self.groups || other.groups,
            exe: self.exe || other.exe,
        }
    }

    /// Whether a set derived with `self` has every selector `other` needs.
    pub fn covers(self, other: UnixNeeds) -> bool {
        self.union(other) == self
    }
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
    /// Start time (clock ticks since boot) read at accept. Without a pidfd
    /// it is what pins the process; with one, the pidfd does, and the
    /// start time only dates the executable's changes (a process keeps its
    /// start time across `exec`, so one reading serves the connection).
    start_time: Option<u64>,
    /// (device, inode, ctime s, ctime ns) of `/proc/<pid>/exe` when the
    /// peer was first seen: a later change of that same inode is a binary
    /// modified under a running process, however soon after its start.
    exe_at_connect: Option<ExeStamp>,
    /// The pidfd registered with the reactor, made by the first
    /// [`Peer::exited`] and shared by every later one: a connection holds
    /// one such descriptor however many of its streams wait on it (`None`
    /// inside: no pidfd, or the reactor refused it; then waiters poll).
    exit_watch: OnceLock<Option<AsyncFd<OwnedFd>>>,
}

/// (device, inode, ctime s, ctime ns) of an executable.
type ExeStamp = (u64, u64, i64, i64);

fn exe_stamp(pid: i32) -> Option<ExeStamp> {
    fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| stamp_of(&m))
}

fn stamp_of(m: &fs::Metadata) -> ExeStamp {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
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
        // Read after the pidfd was taken: if the process has already gone
        // and its pid was reused, this may describe another process, but
        // then the pidfd is readable and every attestation fails.
        let start_time = start_time(cred.pid()).ok();
        Ok(Peer {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
            pidfd,
            start_time,
            exe_at_connect: exe_stamp(cred.pid()),
            exit_watch: OnceLock::new(),
        })
    }

    /// A peer for a process named by pid rather than by a socket (the
    /// operator's `api debug selectors --pid N`): uid and gid are the
    /// effective ones from `/proc/<pid>/status`, and the process is pinned
    /// by its start time (no pidfd), as on kernels without SO_PEERPIDFD.
    pub fn from_pid(pid: i32) -> Result<Peer, AttestError> {
        if pid <= 0 {
            return Err(AttestError::PeerCredentials(format!("invalid pid {pid}")));
        }
        let start = start_time(pid)?;
        let status = read_proc(pid, "status").map_err(|e| AttestError::Proc(pid, e.to_string()))?;
        let status = String::from_utf8_lossy(&status);
        let effective = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(|| AttestError::Proc(pid, format!("no {key} line in status")))
        };
        Ok(Peer {
            pid,
            uid: effective("Uid:")?,
            gid: effective("Gid:")?,
            pidfd: None,
            start_time: Some(start),
            exe_at_connect: exe_stamp(pid),
            exit_watch: OnceLock::new(),
        })
    }

    /// True while the process that connected is still running: its pidfd
    /// is not readable, or (without a pidfd) its start time is unchanged.
    /// Readings of `/proc/<pid>` made before a `true` describe that process.
    pub fn is_alive(&self) -> bool {
        match (&self.pidfd, self.start_time) {
            (Some(fd), _) => self.pidfd_alive(fd),
            (None, Some(t)) => start_time(self.pid).is_ok_and(|now| now == t),
            (None, None) => false,
        }
    }

    /// True when the executable the peer ran when it connected (same
    /// device and inode behind `/proc/<pid>/exe`) has had its status
    /// changed since: content rewritten, replaced (its link count
    /// dropped), chmod or chown. A stat, no hashing: cheap enough for every
    /// stream update.
    pub fn exe_changed(&self) -> bool {
        self.exe_changed_from(exe_stamp(self.pid))
    }

    /// [`Peer::exe_changed`] against a stamp of `/proc/<pid>/exe` read now.
    fn exe_changed_from(&self, now: Option<ExeStamp>) -> bool {
        matches!(
            (self.exe_at_connect, now),
            (Some(a), Some(b)) if (a.0, a.1) == (b.0, b.1) && a != b
        )
    }

    /// Resolves once the process that connected has exited (or, without a
    /// pidfd, once its pid no longer names the process that connected).
    /// A pidfd becomes readable when its process exits, so with one this
    /// waits on the reactor; without one (kernels before 6.5, or a pidfd
    /// the reactor refuses) it checks [`Peer::is_alive`] every
    /// [`EXIT_POLL`]. Used to end a Workload API stream when its caller is
    /// gone, so that a connection handed to another process (or surviving
    /// its container) stops carrying the caller's identity.
    pub async fn exited(&self) {
        if let Some(afd) = self.exit_watch() {
            // Readable means exited; a spurious wakeup is re-checked.
            while let Ok(mut guard) = afd.readable().await {
                if !self.pidfd_alive(afd.get_ref()) {
                    return;
                }
                guard.clear_ready();
            }
        }
        let mut tick = tokio::time::interval(EXIT_POLL);
        loop {
            tick.tick().await;
            if !self.is_alive() {
                return;
            }
        }
    }

    /// The pidfd's reactor registration, made once per peer (see
    /// `exit_watch`). A duplicate is registered because the original stays
    /// usable for the synchronous [`Peer::is_alive`] checks.
    fn exit_watch(&self) -> Option<&AsyncFd<OwnedFd>> {
        self.exit_watch
            .get_or_init(|| {
                let dup = self.pidfd.as_ref()?.try_clone().ok()?;
                // `with_interest` is deprecated because a borrowed raw fd
                // could be closed under the reactor; here the `AsyncFd` owns
                // `dup` (an `OwnedFd`) for its whole life, which is what
                // registration needs, and the workspace forbids the `unsafe`
                // replacement.
                #[allow(deprecated)]
                AsyncFd::with_interest(dup, tokio::io::Interest::READABLE).ok()
            })
            .as_ref()
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

/// Key of the binary-hash cache: a file is re-hashed when any of these
/// change: (device, inode, size, mtime s, mtime ns, ctime s, ctime ns).
/// Kept as separate fields (no `s * 1e9 + ns`): the owner of a file may set
/// its mtime to any value, and the sum would overflow.
type FileKey = (u64, u64, u64, i64, i64, i64, i64);

fn file_key(m: &fs::Metadata) -> FileKey {
    (
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// How much later than the computed process start an executable's ctime
/// may be before it counts as changed after start (see
/// [`UnixAttestor::attest`]).
const EXE_CHANGE_SLACK: Duration = Duration::from_secs(2);
/// How often [`Peer::exited`] checks a peer it cannot wait on.
const EXIT_POLL: Duration = Duration::from_secs(1);
/// How long a uid → user name or gid → group name answer is reused.
const NAME_TTL: Duration = Duration::from_secs(5);
/// Most uids (and, separately, gids) whose names are kept.
const NAME_CACHE_MAX: usize = 1024;
/// Most binaries whose hashes are kept.
const HASH_CACHE_MAX: usize = 4096;
/// A binary whose inode changed less than this long ago is hashed but its
/// hash is not cached (see [`UnixAttestor`]).
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// uid → user name (or gid → group name) answers with the instant they
/// were looked up. `None` names (no such user) are cached too.
#[derive(Debug, Default)]
struct NameCache {
    map: HashMap<u32, (Instant, Option<String>)>,
}

impl NameCache {
    /// The cached answer for `id`, if looked up less than [`NAME_TTL`] before `now`.
    fn get(&self, id: u32, now: Instant) -> Option<Option<String>> {
        self.map
            .get(&id)
            .filter(|(at, _)| now.saturating_duration_since(*at) < NAME_TTL)
            .map(|(_, name)| name.clone())
    }

    fn insert(&mut self, id: u32, name: Option<String>, now: Instant) {
        if self.map.len() >= NAME_CACHE_MAX && !self.map.contains_key(&id) {
            self.map
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < NAME_TTL);
            if self.map.len() >= NAME_CACHE_MAX {
                self.map.clear();
            }
        }
        self.map.insert(id, (now, name));
    }
}

/// The unix attestor. Cheap to share.
///
/// # Caching, and why it is safe
///
/// Nothing is cached per connection or per process: every attestation
/// re-derives the selectors from the kernel (`SO_PEERCRED` credentials
/// pinned at connect time, `/proc/<pid>/status`, the `/proc/<pid>/exe`
/// link), brackets those reads with the pidfd liveness check (or the
/// start-time check), and only memoizes answers that are pure functions of
/// kernel-supplied keys:
///
/// * uid → user name and gid → group name, for [`NAME_TTL`] (bounded to
///   [`NAME_CACHE_MAX`] ids each). The uid/gid themselves still come from
///   the kernel on every call; only the NSS lookup is skipped, so a rename
///   in `/etc/passwd` or `/etc/group` is seen within a few seconds.
/// * binary → SHA-256, keyed by the `stat` of the file `/proc/<pid>/exe`
///   resolves to *now* (device, inode, size, mtime, ctime with
///   nanoseconds). A process that keeps its Workload API socket and
///   `exec`s another binary therefore resolves to another inode, misses
///   the cache and is hashed afresh: its `unix:path` and `unix:sha256`
///   always describe the current executable. A binary modified in place
///   gets a new ctime, which no user can set. Because inode timestamps
///   are coarse (a kernel tick), a file changed within [`RACY_WINDOW`]
///   of hashing could be changed again with an identical key; such
///   "racily clean" files (the problem git's index has) are hashed on
///   every call until they settle, and a hash is only cached when the
///   file's stat was the same before and after reading it.
///
/// [`UnixAttestor::attest_cached`] serves a call from these caches without
/// blocking work (no NSS, no hashing), so the Workload API can run it on
/// the async runtime and keep a blocking thread for the cold path,
/// [`UnixAttestor::attest`]. Both return the same selectors.
#[derive(Debug)]
pub struct UnixAttestor {
    hashes: Mutex<HashMap<FileKey, String>>,
    users: Mutex<NameCache>,
    groups: Mutex<NameCache>,
    racy_window: Duration,
    exe_change_slack: Duration,
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self {
            hashes: Mutex::default(),
            users: Mutex::default(),
            groups: Mutex::default(),
            racy_window: RACY_WINDOW,
            exe_change_slack: EXE_CHANGE_SLACK,
        }
    }
}

impl UnixAttestor {
    /// A new attestor with empty caches.
    pub fn new() -> Self {
        Self::default()
    }

    /// Selectors for `peer`: `unix:uid`, `unix:gid`, `unix:user`,
    /// `unix:group`, `unix:supplementary_gid`, `unix:path`, `unix:sha256`.
    /// Path and hash are omitted when /proc/<pid>/exe is unreadable (the
    /// agent lacks ptrace rights over the peer); entries that require them
    /// then simply do not match. May block (NSS lookups, hashing the
    /// binary): call it from a blocking thread.
    pub fn attest(&self, peer: &Peer) -> Result<SelectorSet, AttestError> {
        self.attest_for(peer, UnixNeeds::ALL)
    }

    /// [`UnixAttestor::attest`], deriving the costlier selectors only as
    /// far as `needs` asks.
    pub fn attest_for(&self, peer: &Peer, needs: UnixNeeds) -> Result<SelectorSet, AttestError> {
        self.attest_with(peer, true, needs)?
            .ok_or_else(|| AttestError::Proc(peer.pid, "attestation incomplete".into()))
    }

    /// As [`UnixAttestor::attest`], but only if that needs no blocking
    /// work: a pidfd poll, small /proc reads and cache lookups. `Ok(None)`
    /// when a user/group name or the binary's hash is not cached (first
    /// call, expired, or the process now runs another binary): call
    /// [`UnixAttestor::attest`] then.
    pub fn attest_cached(&self, peer: &Peer) -> Result<Option<SelectorSet>, AttestError> {
        self.attest_cached_for(peer, UnixNeeds::ALL)
    }

    /// [`UnixAttestor::attest_cached`] as far as `needs` asks.
    pub fn attest_cached_for(
        &self,
        peer: &Peer,
        needs: UnixNeeds,
    ) -> Result<Option<SelectorSet>, AttestError> {
        self.attest_with(peer, false, needs)
    }

    /// `may_block = false` returns `Ok(None)` as soon as blocking work
    /// would be needed; `true` never returns `Ok(None)`.
    fn attest_with(
        &self,
        peer: &Peer,
        may_block: bool,
        needs: UnixNeeds,
    ) -> Result<Option<SelectorSet>, AttestError> {
        let pid = peer.pid;
        if pid <= 0 {
            return Err(AttestError::PeerCredentials(format!(
                "invalid peer pid {pid}"
            )));
        }
        let start_before = if peer.pidfd.is_none() {
            // Pinned at accept (or `from_pid`) when known.
            Some(match peer.start_time {
                Some(t) => t,
                None => start_time(pid)?,
            })
        } else {
            None
        };
        if let Some(fd) = &peer.pidfd
            && !peer.pidfd_alive(fd)
        {
            return Err(AttestError::ProcessGone(pid));
        }

        let Some(user) = Self::name(&self.users, peer.uid, may_block, |id| {
            User::from_uid(Uid::from_raw(id)).map(|u| u.map(|u| u.name))
        }) else {
            return Ok(None);
        };
        let Some(group) = Self::name(&self.groups, peer.gid, may_block, |id| {
            Group::from_gid(Gid::from_raw(id)).map(|g| g.map(|g| g.name))
        }) else {
            return Ok(None);
        };

        let mut set = SelectorSet::new();
        let mut add = |k: &str, v: &str| {
            if let Ok(s) = Selector::new("unix", &format!("{k}:{v}")) {
                set.insert(s);
            }
        };
        add("uid", &peer.uid.to_string());
        add("gid", &peer.gid.to_string());
        if let Some(u) = &user {
            add("user", u);
        }
        if let Some(g) = &group {
            add("group", g);
        }
        // Read as bytes: the `Name:` line is the process's comm, which its
        // owner may set to any bytes, not necessarily UTF-8. Only the
        // numeric `Uid:` and `Groups:` lines are used. Without a pidfd the
        // `Uid:` line is part of pinning the process, so it is read then
        // even when no entry uses the groups.
        let status = if needs.groups || peer.pidfd.is_none() {
            read_proc(pid, "status").map_err(|e| AttestError::Proc(pid, e.to_string()))?
        } else {
            Vec::new()
        };
        let status = String::from_utf8_lossy(&status);
        let mut proc_uid = None;
        for line in status.lines() {
            if let Some(rest) = line.strip_prefix("Groups:") {
                for g in rest.split_whitespace() {
                    if g.parse::<u32>().is_ok() {
                        add("supplementary_gid", g);
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
        // `unix:path` and `unix:sha256` only when some entry can use them.
        let exe = needs.exe.then(|| format!("/proc/{pid}/exe"));
        if let Some(exe) = exe.as_deref()
            && let Ok(path) = fs::read_link(exe)
        {
            // Lossless: non-UTF-8 bytes, `%` and control characters are
            // percent-escaped, exactly as entries must spell them.
            add("path", &escape_bytes(path.as_os_str().as_bytes()));
            // Opening (or stat-ing) /proc/<pid>/exe yields the binary the
            // process runs, even if the path was since replaced or deleted.
            // If that inode changed after the process started (content
            // rewritten, or chmod/chown), its current bytes need not be
            // what was loaded: no digest, so entries pinning one do not
            // match until the process is restarted.
            // Also no digest if the inode seen when the peer connected has
            // changed since (precise, unlike the start-time slack); an
            // exec of another binary is another inode, attested afresh.
            // One stat of the binary answers all three questions (changed
            // since connect, changed since start, which hash-cache key).
            match fs::metadata(exe) {
                Ok(meta)
                    if peer.exe_changed_from(Some(stamp_of(&meta)))
                        || self.changed_since_start(&meta, peer.start_time, pid) =>
                {
                    tracing::info!(
                        pid,
                        "executable changed after the process started: no unix:sha256"
                    );
                }
                Ok(meta) => {
                    match self.file_sha256(Path::new(&exe), &meta, may_block, SystemTime::now()) {
                        Ok(Some(hash)) => add("sha256", &hash),
                        Ok(None) => return Ok(None),
                        Err(_) => {}
                    }
                }
                // Unreadable: no digest, as when hashing fails.
                Err(_) => {}
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
        Ok(Some(set))
    }

    /// True when the executable whose stat is `meta` had its status changed
    /// (ctime: content, mode, owner, links; not settable by users) later
    /// than `exe_change_slack` after process `pid` started (at `started`
    /// ticks, as read at accept, or read now when unknown). The start time is
    /// known to about a second (boot time in /proc/stat has whole seconds),
    /// which the slack absorbs; unknown times count as unchanged.
    fn changed_since_start(&self, meta: &fs::Metadata, started: Option<u64>, pid: i32) -> bool {
        let ticks = match started {
            Some(t) => Ok(t),
            None => start_time(pid),
        };
        let (Ok(ticks), Some((btime, hz))) = (ticks, boot_clock()) else {
            return false;
        };
        let started =
            Duration::from_secs(btime) + Duration::from_secs_f64(ticks as f64 / hz as f64);
        let Ok(ctime_s) = u64::try_from(meta.ctime()) else {
            return false;
        };
        let ctime = Duration::new(ctime_s, u32::try_from(meta.ctime_nsec()).unwrap_or(0));
        ctime > started + self.exe_change_slack
    }

    /// The name of `id` from `cache`, or from `lookup` (NSS) when not
    /// cached and `may_block`. Outer `None`: not cached and may not block.
    /// A failed lookup yields no name (the selector is omitted) and is not
    /// cached.
    fn name(
        cache: &Mutex<NameCache>,
        id: u32,
        may_block: bool,
        lookup: impl FnOnce(u32) -> nix::Result<Option<String>>,
    ) -> Option<Option<String>> {
        let now = Instant::now();
        if let Ok(c) = cache.lock()
            && let Some(name) = c.get(id, now)
        {
            return Some(name);
        }
        if !may_block {
            return None;
        }
        match lookup(id) {
            Ok(name) => {
                if let Ok(mut c) = cache.lock() {
                    c.insert(id, name.clone(), Instant::now());
                }
                Some(name)
            }
            Err(_) => Some(None),
        }
    }

    /// SHA-256 of the file at `path` (following links), whose stat the
    /// caller just read as `meta`: from the cache when that stat matches,
    /// else computed if `may_block` (`Ok(None)` if not). `now` decides
    /// whether the file has settled enough to be cached.
    fn file_sha256(
        &self,
        path: &Path,
        meta: &fs::Metadata,
        may_block: bool,
        now: SystemTime,
    ) -> std::io::Result<Option<String>> {
        let key = file_key(meta);
        if let Ok(cache) = self.hashes.lock()
            && let Some(h) = cache.get(&key)
        {
            return Ok(Some(h.clone()));
        }
        if !may_block {
            return Ok(None);
        }
        let mut f = fs::File::open(path)?;
        let before = f.metadata()?;
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
        let key = file_key(&before);
        let changed = UNIX_EPOCH
            + Duration::new(
                u64::try_from(before.ctime()).unwrap_or(0),
                u32::try_from(before.ctime_nsec()).unwrap_or(0),
            );
        let settled = now
            .duration_since(changed)
            .is_ok_and(|age| age >= self.racy_window);
        if settled
            && file_key(&f.metadata()?) == key
            && let Ok(mut cache) = self.hashes.lock()
        {
            if cache.len() >= HASH_CACHE_MAX {
                cache.clear();
            }
            cache.insert(key, h.clone());
        }
        Ok(Some(h))
    }
}

/// Boot time (Unix seconds, from `btime` in /proc/stat) and clock ticks
/// per second, read once.
fn boot_clock() -> Option<(u64, u64)> {
    static CLOCK: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    *CLOCK.get_or_init(|| {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let btime = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|v| u64::try_from(v).ok())
            .filter(|v| *v > 0)?;
        Some((btime, hz))
    })
}

/// Reads `/proc/<pid>/<file>` whole. Unlike `fs::read` (and `File`'s own
/// `read_to_end`) it asks for no size hint first: a /proc file reports
/// size 0, so that `fstat` and `lseek` would be wasted on every
/// attestation.
pub(crate) fn read_proc(pid: i32, file: &str) -> std::io::Result<Vec<u8>> {
    let mut f = fs::File::open(format!("/proc/{pid}/{file}"))?;
    let mut out = Vec::with_capacity(2048);
    let mut buf = [0u8; 4096];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Process start time in clock ticks since boot (field 22 of /proc/<pid>/stat).
fn start_time(pid: i32) -> Result<u64, AttestError> {
    // Bytes, not a string: the command name (field 2) need not be UTF-8.
    let stat = read_proc(pid, "stat").map_err(|e| AttestError::Proc(pid, e.to_string()))?;
    let stat = String::from_utf8_lossy(&stat);
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
    fn only_the_unix_selectors_entries_use_are_derived() {
        let sel = |t: &str| t.parse::<Selector>().unwrap();
        assert_eq!(
            UnixNeeds::of(&[sel("unix:uid:1"), sel("k8s:ns:default")]),
            UnixNeeds::NONE
        );
        let groups = UnixNeeds::of(&[sel("unix:supplementary_gid:7")]);
        let exe = UnixNeeds::of(&[sel("unix:path:/bin/x")]);
        assert_eq!(
            exe,
            UnixNeeds::of(&[sel(&format!("unix:sha256:{}", "ab".repeat(32)))])
        );
        assert!(groups.groups && !groups.exe && exe.exe && !exe.groups);
        assert_eq!(groups.union(exe), UnixNeeds::ALL);
        assert!(UnixNeeds::ALL.covers(groups) && groups.covers(UnixNeeds::NONE));
        assert!(!groups.covers(exe) && !UnixNeeds::NONE.covers(groups));

        let (a, _b) = UnixStream::pair().unwrap();
        let peer = Peer::from_socket(&a).unwrap();
        let att = UnixAttestor::new();
        let kinds = |set: &SelectorSet| -> Vec<String> {
            set.iter()
                .map(|s| {
                    s.as_str()
                        .splitn(3, ':')
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(":")
                })
                .collect()
        };
        let all = kinds(&att.attest(&peer).unwrap());
        assert!(all.iter().any(|k| k == "unix:path"), "{all:?}");
        assert!(all.iter().any(|k| k == "unix:sha256"), "{all:?}");
        let none = kinds(&att.attest_for(&peer, UnixNeeds::NONE).unwrap());
        assert!(none.iter().any(|k| k == "unix:uid"), "{none:?}");
        assert!(
            !none.iter().any(|k| k == "unix:path" || k == "unix:sha256"),
            "{none:?}"
        );
        // With a pidfd the status file is not read, so no groups either;
        // without one it is read to pin the process, and they come along.
        if peer.pidfd.is_some() {
            assert!(
                !none.iter().any(|k| k == "unix:supplementary_gid"),
                "{none:?}"
            );
        }
        let cached = att
            .attest_cached_for(&peer, UnixNeeds::NONE)
            .unwrap()
            .unwrap();
        assert_eq!(kinds(&cached), none);
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

    fn selector_texts(set: &SelectorSet) -> Vec<String> {
        set.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn cached_attestation_needs_a_full_one_first_then_agrees_with_it() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = Peer::from_socket(&a).unwrap();
        // The test binary may have just been linked: do not let the racy
        // window keep its hash out of the cache.
        let att = UnixAttestor {
            racy_window: Duration::ZERO,
            ..UnixAttestor::new()
        };
        assert_eq!(att.attest_cached(&peer).unwrap(), None);
        let full = att.attest(&peer).unwrap();
        let cached = att.attest_cached(&peer).unwrap().unwrap();
        assert_eq!(selector_texts(&cached), selector_texts(&full));
        assert!(
            selector_texts(&cached)
                .iter()
                .any(|s| s.starts_with("unix:sha256:")),
            "{cached:?}"
        );
    }

    #[test]
    fn name_cache_answers_expire_and_stay_bounded() {
        let t0 = Instant::now();
        let mut c = NameCache::default();
        c.insert(1000, Some("alice".into()), t0);
        c.insert(1001, None, t0);
        assert_eq!(c.get(1000, t0), Some(Some("alice".into())));
        assert_eq!(c.get(1001, t0 + Duration::from_secs(1)), Some(None));
        assert_eq!(
            c.get(1000, t0 + NAME_TTL - Duration::from_millis(1)),
            Some(Some("alice".into()))
        );
        assert_eq!(c.get(1000, t0 + NAME_TTL), None);
        assert_eq!(c.get(1002, t0), None);

        for id in 0..(NAME_CACHE_MAX as u32 * 3) {
            c.insert(id, None, t0);
            assert!(c.map.len() <= NAME_CACHE_MAX);
        }
        // Expired answers make room before anything live is dropped.
        let later = t0 + NAME_TTL;
        c.insert(5, Some("live".into()), later);
        for id in 0..(NAME_CACHE_MAX as u32 - 2) {
            c.insert(100_000 + id, None, later);
        }
        assert_eq!(c.get(5, later), Some(Some("live".into())));
    }

    #[test]
    fn expired_names_are_looked_up_again() {
        let att = UnixAttestor::new();
        let calls = std::cell::Cell::new(0);
        let lookup = |_| {
            calls.set(calls.get() + 1);
            Ok(Some("bob".to_string()))
        };
        assert_eq!(UnixAttestor::name(&att.users, 7, false, lookup), None);
        assert_eq!(calls.get(), 0, "must not look up when it may not block");
        assert_eq!(
            UnixAttestor::name(&att.users, 7, true, lookup),
            Some(Some("bob".into()))
        );
        assert_eq!(
            UnixAttestor::name(&att.users, 7, false, lookup),
            Some(Some("bob".into()))
        );
        assert_eq!(calls.get(), 1);
        // Age the answer past its TTL.
        let aged = {
            let mut c = att.users.lock().unwrap();
            let e = c.map.get_mut(&7).unwrap();
            match e.0.checked_sub(NAME_TTL) {
                Some(old) => {
                    e.0 = old;
                    true
                }
                None => false, // monotonic clock too close to its origin
            }
        };
        if !aged {
            return;
        }
        assert_eq!(UnixAttestor::name(&att.users, 7, false, lookup), None);
        UnixAttestor::name(&att.users, 7, true, lookup);
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn a_changed_binary_is_hashed_again_and_racy_files_are_not_cached() {
        let dir = std::env::temp_dir().join(format!("sigil-hash-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bin");
        fs::write(&path, b"original contents").unwrap();
        let att = UnixAttestor::new();

        // Just written: hashed, but not cached while racily clean.
        let now = SystemTime::now();
        assert_eq!(
            att.file_sha256(&path, &fs::metadata(&path).unwrap(), true, now)
                .unwrap(),
            Some(sha(b"original contents"))
        );
        assert_eq!(
            att.file_sha256(&path, &fs::metadata(&path).unwrap(), false, now)
                .unwrap(),
            None
        );

        // Once settled it is cached and served without blocking work.
        let later = now + RACY_WINDOW + Duration::from_secs(1);
        att.file_sha256(&path, &fs::metadata(&path).unwrap(), true, later)
            .unwrap();
        assert_eq!(
            att.file_sha256(&path, &fs::metadata(&path).unwrap(), false, later)
                .unwrap(),
            Some(sha(b"original contents"))
        );

        // Same size, same inode, mtime put back: the ctime still moves, so
        // the cached hash is not served. (Sleep past the timestamp tick.)
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Write::write_all(&mut &f, b"tampered contents").unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        let later = SystemTime::now() + RACY_WINDOW + Duration::from_secs(1);
        assert_eq!(
            att.file_sha256(&path, &fs::metadata(&path).unwrap(), false, later)
                .unwrap(),
            None
        );
        assert_eq!(
            att.file_sha256(&path, &fs::metadata(&path).unwrap(), true, later)
                .unwrap(),
            Some(sha(b"tampered contents"))
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_peer_that_execs_another_binary_is_attested_afresh() {
        let dir = std::env::temp_dir().join(format!("sigil-exec-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let sleep = fs::canonicalize("/bin/sleep").unwrap();
        // The child keeps its socket across exec.
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import socket, os\n\
                 s = socket.socket(socket.AF_UNIX)\n\
                 s.connect({:?})\n\
                 s.set_inheritable(True)\n\
                 s.recv(1)\n\
                 os.execv({:?}, ['sleep', '30'])",
                path.to_str().unwrap(),
                sleep.to_str().unwrap(),
            ))
            .spawn()
            .unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let peer = Peer::from_socket(&conn).unwrap();
        let att = UnixAttestor {
            racy_window: Duration::ZERO,
            ..UnixAttestor::new()
        };
        let python = fs::read_link(format!("/proc/{}/exe", peer.pid)).unwrap();
        let before = selector_texts(&att.attest(&peer).unwrap());
        assert!(
            before.contains(&format!("unix:path:{}", python.display())),
            "{before:?}"
        );
        assert!(att.attest_cached(&peer).unwrap().is_some());

        std::io::Write::write_all(&mut conn, b"x").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::read_link(format!("/proc/{}/exe", peer.pid))
            .ok()
            .as_ref()
            != Some(&sleep)
        {
            assert!(Instant::now() < deadline, "child did not exec");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Another inode behind /proc/<pid>/exe: the cached path must not
        // serve it; the full attestation describes the new binary.
        assert_eq!(att.attest_cached(&peer).unwrap(), None);
        let after = selector_texts(&att.attest(&peer).unwrap());
        let want = sha(&fs::read(&sleep).unwrap());
        assert!(
            after.contains(&format!("unix:path:{}", sleep.display())),
            "{after:?}"
        );
        assert!(after.contains(&format!("unix:sha256:{want}")), "{after:?}");
        assert!(
            !after.contains(&format!("unix:path:{}", python.display())),
            "{after:?}"
        );
        let stale: Vec<_> = before
            .iter()
            .filter(|s| s.starts_with("unix:sha256:"))
            .collect();
        assert!(stale.iter().all(|s| !after.contains(s)), "{after:?}");
        assert_eq!(
            selector_texts(&att.attest_cached(&peer).unwrap().unwrap()),
            after
        );
        child.kill().unwrap();
        child.wait().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_process_whose_name_is_not_utf8_is_attested_losslessly() {
        use std::os::unix::ffi::OsStrExt;
        let dir = std::env::temp_dir().join(format!("sigil-nonutf8-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // A copy of sleep whose file name (and so comm) is not UTF-8.
        let odd = dir.join(std::ffi::OsStr::from_bytes(b"sl\xffeep%"));
        fs::copy(fs::canonicalize("/bin/sleep").unwrap(), &odd).unwrap();
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import socket, os, sys\n\
                 s = socket.socket(socket.AF_UNIX)\n\
                 s.connect(sys.argv[1])\n\
                 s.set_inheritable(True)\n\
                 s.recv(1)\n\
                 exe = os.fsencode(sys.argv[2])\n\
                 os.execv(exe, [exe, '30'])",
            )
            .arg(&path)
            .arg(&odd)
            .spawn()
            .unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let peer = Peer::from_socket(&conn).unwrap();
        std::io::Write::write_all(&mut conn, b"x").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::read_link(format!("/proc/{}/exe", peer.pid))
            .ok()
            .as_ref()
            != Some(&odd)
        {
            assert!(Instant::now() < deadline, "child did not exec");
            std::thread::sleep(Duration::from_millis(10));
        }
        let comm = fs::read(format!("/proc/{}/comm", peer.pid)).unwrap();
        assert_eq!(comm, b"sl\xffeep%\n", "the test needs a non-UTF-8 comm");
        // Both the pidfd path and the start-time fallback read /proc as bytes.
        assert!(start_time(peer.pid).unwrap() > 0);
        let got = selector_texts(&UnixAttestor::new().attest(&peer).unwrap());
        let want = format!("unix:path:{}/sl%FFeep%25", dir.display());
        assert!(got.contains(&want), "{got:?}");
        // The entry an operator writes with the same spelling parses and matches.
        let entry_selector: Selector = want.parse().unwrap();
        let set: SelectorSet = got.iter().map(|s| s.parse().unwrap()).collect();
        assert!(set.satisfies(&[entry_selector]));
        child.kill().unwrap();
        child.wait().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_executable_changed_after_start_gets_no_digest() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sigil-swap-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let bin = dir.join("worker");
        fs::copy(fs::canonicalize("/bin/sleep").unwrap(), &bin).unwrap();
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import socket, os, sys\n\
                 s = socket.socket(socket.AF_UNIX)\n\
                 s.connect(sys.argv[1])\n\
                 s.set_inheritable(True)\n\
                 s.recv(1)\n\
                 os.execv(sys.argv[2], [sys.argv[2], '30'])",
            )
            .arg(&path)
            .arg(&bin)
            .spawn()
            .unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let peer = Peer::from_socket(&conn).unwrap();
        std::io::Write::write_all(&mut conn, b"x").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::read_link(format!("/proc/{}/exe", peer.pid))
            .ok()
            .as_ref()
            != Some(&bin)
        {
            assert!(Instant::now() < deadline, "child did not exec");
            std::thread::sleep(Duration::from_millis(10));
        }
        let has_digest = |att: &UnixAttestor| {
            selector_texts(&att.attest(&peer).unwrap())
                .iter()
                .any(|s| s.starts_with("unix:sha256:"))
        };
        // Unchanged since it was started: the digest is there.
        assert!(has_digest(&UnixAttestor::new()));
        // The running binary's inode changes (a writer could have changed
        // its bytes; exec'd files refuse writes, so chmod stands in: it
        // moves the ctime the same way). No slack, so the change counts at
        // once.
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o700)).unwrap();
        let strict = UnixAttestor {
            exe_change_slack: Duration::ZERO,
            ..UnixAttestor::new()
        };
        assert!(!has_digest(&strict), "a changed executable kept its digest");
        // The other selectors stay.
        let got = selector_texts(&strict.attest(&peer).unwrap());
        assert!(got.iter().any(|s| s.starts_with("unix:path:")), "{got:?}");
        child.kill().unwrap();
        child.wait().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
    }
}
