//! The Workload API socket: binding it (public, 0777) and accepting
//! connections, each pinned to its peer process when accepted (see
//! `sigil_attestors::workload::unix`) and filtered through the HTTP/2
//! `:authority` shim for gRPC C-core clients.
//!
//! Connections are bounded (see [`WorkloadLimits`]): per peer uid, in total
//! (fitted to RLIMIT_NOFILE: each costs a socket and a pidfd), with the last
//! slots reserved for uids holding few connections; and a connection with no
//! call in flight (a stream in progress is a call) is closed after the idle
//! timeout, or sooner if it never makes a first call. A connection whose
//! client stops reading is closed once the agent's writes to it have made
//! no progress for [`WRITE_STALL_TIMEOUT`]: otherwise each of its streams
//! could keep up to hyper's send buffer (400 KiB) of responses queued, with
//! flow-control windows the client is free to open wide.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Deserialize;
use sigil_attestors::workload::unix::Peer;
use sigil_core::duration::parse_duration;
use sigil_core::limits::{Activity, ConnCaps, ConnLimiter, ConnPermit};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::h2_authority::AuthorityRewriter;

/// Capacity of the rewritten-bytes buffer kept across reads; a larger one
/// (after a large read) is freed once drained, so that idle connections
/// hold little memory.
const OUT_KEEP: usize = 4 * 1024;

/// Calls one connection may have in their handlers at once.
pub const CONCURRENCY_PER_CONNECTION: usize = 16;
/// Deadline of a unary call (a JWT-SVID may need a round trip to the
/// server); streams run on.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// SETTINGS_MAX_CONCURRENT_STREAMS.
pub const MAX_CONCURRENT_STREAMS: u32 = 32;
/// SETTINGS_MAX_HEADER_LIST_SIZE.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/2 flow-control window (stream and connection): what a client may
/// send before the agent reads it.
pub const WINDOW: u32 = 64 * 1024;
/// Largest request message (a token to validate is the largest).
pub const MAX_MESSAGE: usize = 256 * 1024;

/// A connection must make its first call within this (or the idle timeout,
/// if shorter).
pub const FIRST_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection whose writes make no progress for this long (its client
/// does not read) is closed.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Descriptors a Workload API connection holds, however many streams it
/// has open: the socket, the caller's pidfd, and that pidfd's one reactor
/// registration (shared by every stream that waits for the caller to exit).
pub const FDS_PER_CONNECTION: u64 = 3;
/// Descriptors kept free for everything but Workload API connections.
pub const FD_HEADROOM: u64 = 256;
/// The last `total / 16` slots go only to uids holding fewer than this.
pub const RESERVE_PER_UID: usize = 8;

/// `[limits]` in agent.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    max_connections_per_uid: Option<usize>,
    #[serde(default)]
    idle_timeout: Option<String>,
}

/// Bounds of the Workload API socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadLimits {
    /// `limits.max_connections` (default 8192), further lowered so that
    /// [`FDS_PER_CONNECTION`] descriptors per connection fit RLIMIT_NOFILE.
    pub max_connections: usize,
    /// `limits.max_connections_per_uid` (default 1024).
    pub max_connections_per_uid: usize,
    /// `limits.idle_timeout` (default 60s).
    pub idle_timeout: Duration,
}

impl Default for WorkloadLimits {
    fn default() -> Self {
        Self {
            max_connections: 8192,
            max_connections_per_uid: 1024,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl RawLimits {
    /// Validates the table; errors name the key.
    pub fn validate(self) -> Result<WorkloadLimits, (&'static str, String)> {
        let d = WorkloadLimits::default();
        let positive = |key: &'static str, v: Option<usize>, default: usize| match v {
            Some(0) => Err((key, "must be at least 1".to_string())),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        let idle_timeout = match &self.idle_timeout {
            None => d.idle_timeout,
            Some(v) => {
                let t = parse_duration(v).map_err(|e| ("limits.idle_timeout", e.to_string()))?;
                if t < Duration::from_secs(1) || t > Duration::from_secs(24 * 3600) {
                    return Err((
                        "limits.idle_timeout",
                        format!("{v:?} is out of range (1s to 24h)"),
                    ));
                }
                t
            }
        };
        Ok(WorkloadLimits {
            max_connections: positive(
                "limits.max_connections",
                self.max_connections,
                d.max_connections,
            )?,
            max_connections_per_uid: positive(
                "limits.max_connections_per_uid",
                self.max_connections_per_uid,
                d.max_connections_per_uid,
            )?,
            idle_timeout,
        })
    }
}

impl WorkloadLimits {
    /// The per-uid limiter, its total fitted to `nofile` descriptors.
    pub fn limiter(&self, nofile: u64) -> ConnLimiter<u32> {
        let fit = usize::try_from(nofile.saturating_sub(FD_HEADROOM).max(48) / FDS_PER_CONNECTION)
            .unwrap_or(usize::MAX);
        let total = self.max_connections.min(fit);
        if total < self.max_connections {
            tracing::warn!(
                configured = self.max_connections,
                total,
                nofile,
                "limits.max_connections lowered to fit RLIMIT_NOFILE (three descriptors per connection)"
            );
        }
        ConnLimiter::new(ConnCaps {
            total,
            per_key: self.max_connections_per_uid,
            reserve: total / 16,
            reserve_per_key: RESERVE_PER_UID,
        })
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit
/// now in force.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// Fires once a connection's [`Activity`] says it has been idle too long.
struct IdleTimer {
    activity: Arc<Activity>,
    first: Duration,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleTimer {
    fn new(activity: Arc<Activity>, first: Duration, idle: Duration) -> Self {
        let at = activity
            .deadline(first, idle)
            .unwrap_or_else(|| std::time::Instant::now() + idle);
        Self {
            activity,
            first,
            idle,
            sleep: Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(at))),
        }
    }

    /// Ready once the connection is to be closed.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            std::task::ready!(self.sleep.as_mut().poll(cx));
            let now = std::time::Instant::now();
            let next = match self.activity.deadline(self.first, self.idle) {
                Some(d) if d <= now => return Poll::Ready(()),
                Some(d) => d,
                None => now + self.idle,
            };
            self.sleep
                .as_mut()
                .reset(tokio::time::Instant::from_std(next));
        }
    }
}

/// A Workload API connection together with the kernel's account of its
/// peer. Bytes from the client pass through [`AuthorityRewriter`] so that
/// gRPC C-core clients (py-spiffe) are accepted.
pub struct PeerStream {
    inner: UnixStream,
    peer: Arc<Peer>,
    activity: Arc<Activity>,
    timer: IdleTimer,
    _permit: ConnPermit<u32>,
    rewriter: AuthorityRewriter,
    /// Rewritten bytes not yet handed to the reader, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    /// How long a write may stay blocked, and the deadline of the one
    /// blocked now (none while writes go through).
    stall_timeout: Duration,
    stall: Option<Pin<Box<Sleep>>>,
}

impl PeerStream {
    fn new(inner: UnixStream, peer: Peer, permit: ConnPermit<u32>, idle: Duration) -> Self {
        Self::with_stall_timeout(inner, peer, permit, idle, WRITE_STALL_TIMEOUT)
    }

    fn with_stall_timeout(
        inner: UnixStream,
        peer: Peer,
        permit: ConnPermit<u32>,
        idle: Duration,
        stall_timeout: Duration,
    ) -> Self {
        let activity = Activity::new(std::time::Instant::now());
        Self {
            inner,
            peer: Arc::new(peer),
            timer: IdleTimer::new(activity.clone(), FIRST_CALL_TIMEOUT.min(idle), idle),
            activity,
            _permit: permit,
            rewriter: AuthorityRewriter::default(),
            out: Vec::new(),
            out_pos: 0,
            stall_timeout,
            stall: None,
        }
    }

    /// Runs one write attempt `f` on the socket, keeping the stall
    /// deadline: armed when a write blocks, cleared when one goes through,
    /// and an error (which ends the connection) once it passes.
    fn guard_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        f: impl FnOnce(Pin<&mut UnixStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match f(Pin::new(&mut self.inner), cx) {
            Poll::Ready(r) => {
                self.stall = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.stall_timeout;
                let sleep = self
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                // Polled with the writer's context: it is woken when the
                // deadline passes, and finds it passed at its next attempt.
                if sleep.as_mut().poll(cx).is_ready() {
                    tracing::info!(
                        pid = self.peer.pid,
                        uid = self.peer.uid,
                        stalled = ?timeout,
                        "closing Workload API connection: the client does not read"
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client does not read",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

/// Connect info tonic attaches to every request of a [`PeerStream`]: the
/// peer, and the connection's activity (each call holds a
/// [`sigil_core::limits::CallGuard`] from it while it runs).
#[derive(Clone)]
pub struct PeerInfo(pub Arc<Peer>, pub Arc<Activity>);

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        PeerInfo(self.peer.clone(), self.activity.clone())
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.timer.poll_expired(cx).is_ready() {
            tracing::debug!(
                pid = this.peer.pid,
                uid = this.peer.uid,
                "closing idle Workload API connection"
            );
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle connection closed",
            )));
        }
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    if this.out.capacity() > OUT_KEEP {
                        this.out = Vec::new();
                    } else {
                        this.out.clear();
                    }
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Read into the reader's own buffer (no per-connection scratch),
            // pass those bytes through the rewriter, and hand back its output
            // in their place.
            let start = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let end = buf.filled().len();
                    if end == start {
                        return Poll::Ready(Ok(())); // EOF
                    }
                    this.rewriter.feed(&buf.filled()[start..end], &mut this.out);
                    buf.set_filled(start);
                }
            }
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .guard_write(cx, |s, cx| s.poll_write(cx, buf))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .guard_write(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections and pins each to its peer. A connection over the
/// caps of `limiter` is closed at once (before a pidfd is opened for it), as
/// is one whose peer cannot be read.
pub fn incoming(
    listener: UnixListener,
    limiter: ConnLimiter<u32>,
    idle: Duration,
) -> ReceiverStream<io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    let uid = match nix::sys::socket::getsockopt(
                        &sock,
                        nix::sys::socket::sockopt::PeerCredentials,
                    ) {
                        Ok(c) => c.uid(),
                        Err(e) => {
                            tracing::warn!(error = %e, "dropping Workload API connection: no peer credentials");
                            continue;
                        }
                    };
                    let permit = match limiter.try_acquire(uid) {
                        Ok(p) => p,
                        Err(r) => {
                            let refused = limiter.stats().refused;
                            if refused.is_power_of_two() {
                                tracing::warn!(uid, refused, reason = %r, "Workload API connection refused");
                            } else {
                                tracing::debug!(uid, refused, reason = %r, "Workload API connection refused");
                            }
                            continue;
                        }
                    };
                    match Peer::from_socket(&sock) {
                        Ok(peer) => {
                            let conn = PeerStream::new(sock, peer, permit, idle);
                            if tx.send(Ok(conn)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "dropping Workload API connection"),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Workload API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Binds the public Workload API socket: parent directory 0755 if created,
/// socket 0777 so any local user may connect (authorization is by attestation).
pub fn bind_public_socket(path: &Path) -> io::Result<UnixListener> {
    sigil_fs::bind_socket(path, 0o755, 0o777, |p| UnixListener::bind(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_table_defaults_and_errors_name_the_key() {
        let d: RawLimits = toml::from_str("").unwrap();
        assert_eq!(d.validate().unwrap(), WorkloadLimits::default());
        let r: RawLimits = toml::from_str("max_connections_per_uid = 0").unwrap();
        assert_eq!(
            r.validate().unwrap_err().0,
            "limits.max_connections_per_uid"
        );
        let r: RawLimits = toml::from_str("idle_timeout = \"25h\"").unwrap();
        assert_eq!(r.validate().unwrap_err().0, "limits.idle_timeout");
        assert!(toml::from_str::<RawLimits>("max_conns = 1").is_err());
    }

    fn stream_with_stall_timeout(stall: Duration) -> (PeerStream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let peer = Peer::from_socket(&ours).unwrap();
        let permit = WorkloadLimits::default()
            .limiter(4096)
            .try_acquire(peer.uid)
            .unwrap();
        let s = PeerStream::with_stall_timeout(ours, peer, permit, Duration::from_secs(60), stall);
        (s, theirs)
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_cut_off_after_the_stall_timeout() {
        use tokio::io::AsyncWriteExt;
        let stall = Duration::from_millis(300);
        let (mut s, _theirs) = stream_with_stall_timeout(stall);
        let chunk = vec![0u8; 64 * 1024];
        let start = std::time::Instant::now();
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(10), s.write_all(&chunk)).await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => break e,
                Err(_) => panic!("a write stayed blocked past the stall timeout"),
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(start.elapsed() >= stall);
    }

    #[tokio::test]
    async fn a_client_that_reads_slowly_is_not_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The reader pauses for less than the stall timeout between reads:
        // every write blocks for a while, none for too long.
        let (mut s, mut theirs) = stream_with_stall_timeout(Duration::from_millis(500));
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            loop {
                match theirs.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..64 {
            s.write_all(&chunk).await.unwrap();
        }
        s.shutdown().await.unwrap();
        drop(s);
        assert_eq!(reader.await.unwrap(), 64 * chunk.len());
    }

    #[test]
    fn the_total_fits_three_descriptors_per_connection() {
        let l = WorkloadLimits::default();
        let lim = l.limiter(1536 + FD_HEADROOM);
        assert_eq!(lim.caps().total, 512);
        assert_eq!(lim.caps().per_key, 512, "per-uid never above the total");
        assert_eq!(lim.caps().reserve, 32);
        assert_eq!(l.limiter(1 << 20).caps().total, 8192);
    }
}
