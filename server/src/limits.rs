//! Resource limits of the server's network listeners (agent API, bundle
//! endpoint, OIDC discovery): connection caps per source IP and in total,
//! and a transport wrapper ([`Guarded`]) that closes a connection that
//! sends no first request soon after its handshake, or has had no call in
//! flight for the idle timeout. The gRPC-level limits (streams, message
//! sizes, timeouts) are set where the servers are built, in `run.rs`, from
//! the constants here; SECURITY.md lists every value.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use sigil_core::duration::parse_duration;
use sigil_core::limits::{Activity, ConnCaps, ConnLimiter, ConnPermit};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

/// How long a client has to finish the TLS handshake, and then to send its
/// first request (for HTTP/2: the connection preface and a HEADERS frame).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of each unary agent-API call, body included (streaming calls
/// only until their response starts: `Sync` streams live on).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// SETTINGS_MAX_CONCURRENT_STREAMS of agent-API connections.
pub const MAX_CONCURRENT_STREAMS: u32 = 64;
/// Calls one agent-API connection may have in their handlers at once;
/// further streams wait (their data held back by flow control).
pub const CONCURRENCY_PER_CONNECTION: usize = 32;
/// SETTINGS_MAX_HEADER_LIST_SIZE on every HTTP/2 listener.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Largest gRPC message the agent API decodes (a 1,000-CSR mint batch is
/// about 300 KiB).
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// HTTP/2 flow-control windows of agent-API connections: what a client may
/// send before the server reads it.
pub const STREAM_WINDOW: u32 = 256 * 1024;
pub const CONNECTION_WINDOW: u32 = 512 * 1024;
/// Most request bytes one `Attest` stream may carry in total (evidence is
/// a few KiB).
pub const MAX_ATTEST_BYTES: usize = 256 * 1024;
/// Node attestations in progress at once, server-wide.
pub const MAX_ATTESTATIONS: usize = 128;
/// HTTP/2 keepalive pings on agent-API connections, and how long an
/// unanswered ping keeps the connection open.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// File descriptors kept free for everything but client connections.
pub const FD_HEADROOM: u64 = 256;

/// Threads of the blocking pool that datastore and signing work runs on,
/// beyond one per PostgreSQL connection. tokio's default (512) lets a burst
/// start hundreds of threads, each with its own stack and a claim on a
/// malloc arena; bounded, the pool cannot grow past what two cores can use,
/// and queued work waits its turn instead.
pub const BLOCKING_THREADS: usize = 16;
/// How long an idle blocking-pool thread is kept. With tokio's default
/// (10 s) the pool shrank between bursts and grew again on the next (19 to
/// 34 threads in one soak run), so fresh stacks kept being touched; kept
/// for 10 minutes, the same threads serve every burst.
pub const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(600);

/// The blocking pool's size for `datastore`: [`BLOCKING_THREADS`] for
/// signing and redb, plus a thread per PostgreSQL connection, since a call
/// holds its thread while it waits for its connection's answer.
pub fn blocking_threads(datastore: &crate::config::DatastoreKind) -> usize {
    use crate::config::DatastoreKind;
    match datastore {
        DatastoreKind::Redb { .. } => BLOCKING_THREADS,
        DatastoreKind::Postgres(pg) => BLOCKING_THREADS + pg.pool_size as usize,
    }
}

/// Bundle endpoint and OIDC discovery (HTTP/1.1, tiny public documents).
pub mod http_endpoint {
    use std::time::Duration;

    /// Connections open at once, per listener.
    pub const MAX_CONNECTIONS: usize = 512;
    /// Connections per source IP, per listener.
    pub const MAX_CONNECTIONS_PER_IP: usize = 32;
    /// Request headers must arrive within this.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// A keep-alive connection with no request for this long is closed.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// Largest buffered request head.
    pub const MAX_BUF: usize = 16 * 1024;
}

/// `[limits]` in server.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    max_connections_per_ip: Option<usize>,
    #[serde(default)]
    idle_timeout: Option<String>,
}

/// Connection caps of the agent API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `limits.max_connections` (default 4096): agent-API connections open
    /// at once, further lowered to what RLIMIT_NOFILE allows.
    pub max_connections: usize,
    /// `limits.max_connections_per_ip` (default 256).
    pub max_connections_per_ip: usize,
    /// `limits.idle_timeout` (default 5m): an agent-API connection with no
    /// call in flight for this long is closed (agents hold a `Sync` stream,
    /// so theirs never are).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_ip: 256,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

impl RawLimits {
    /// Validates the table; errors name the key.
    pub fn validate(self) -> Result<Limits, (&'static str, String)> {
        let d = Limits::default();
        let positive = |key: &'static str, v: Option<usize>, default: usize| match v {
            Some(0) => Err((key, "must be at least 1".to_string())),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        let max_connections = positive(
            "limits.max_connections",
            self.max_connections,
            d.max_connections,
        )?;
        let max_connections_per_ip = positive(
            "limits.max_connections_per_ip",
            self.max_connections_per_ip,
            d.max_connections_per_ip,
        )?;
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
        Ok(Limits {
            max_connections,
            max_connections_per_ip,
            idle_timeout,
        })
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the soft
/// limit now in force.
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

/// The caps of a listener: `total` connections, `per_ip` per source
/// address, the last sixteenth of the slots kept for sources holding
/// fewer than 4.
pub fn caps(total: usize, per_ip: usize) -> ConnCaps {
    ConnCaps {
        total,
        per_key: per_ip,
        reserve: total / 16,
        reserve_per_key: 4,
    }
}

/// The connection caps of the agent API, lowered to fit `nofile`.
pub fn agent_api_limiter(l: &Limits, nofile: u64) -> ConnLimiter<IpAddr> {
    let fit = usize::try_from(nofile.saturating_sub(FD_HEADROOM).max(16)).unwrap_or(usize::MAX);
    let total = l.max_connections.min(fit);
    if total < l.max_connections {
        tracing::warn!(
            configured = l.max_connections,
            total,
            nofile,
            "limits.max_connections lowered to fit RLIMIT_NOFILE"
        );
    }
    ConnLimiter::new(caps(total, l.max_connections_per_ip))
}

/// Admits a connection from `peer`, logging a refusal (every refusal at
/// debug, and at warn when the count of refusals reaches a power of two,
/// so that a flood does not flood the log).
pub fn admit(
    limiter: &ConnLimiter<IpAddr>,
    peer: SocketAddr,
    listener: &'static str,
) -> Option<ConnPermit<IpAddr>> {
    match limiter.try_acquire(peer.ip()) {
        Ok(p) => Some(p),
        Err(r) => {
            let refused = limiter.stats().refused;
            if refused.is_power_of_two() {
                tracing::warn!(%peer, listener, refused, reason = %r, "connection refused");
            } else {
                tracing::debug!(%peer, listener, refused, reason = %r, "connection refused");
            }
            None
        }
    }
}

/// Enables TCP keepalive (the kernel's timing) on an accepted socket, best
/// effort: dead peers are found sooner by the HTTP/2 pings and the idle
/// timeout.
pub fn tcp_keepalive(sock: &tokio::net::TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(sock, sockopt::KeepAlive, &true);
}

/// Fires once a connection's [`Activity`] says it has been idle too long.
pub struct IdleTimer {
    activity: Arc<Activity>,
    first: Duration,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleTimer {
    /// `first`: deadline for the first call after opening; `idle`: after
    /// the last call ends.
    pub fn new(activity: Arc<Activity>, first: Duration, idle: Duration) -> Self {
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

    /// Ready once the connection is to be closed; registers the waker
    /// otherwise.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
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

/// What the agent API knows about a connection; tonic attaches it to every
/// request.
#[derive(Clone)]
pub struct ConnPeer {
    /// The client's address.
    pub addr: SocketAddr,
    /// The client's certificate chain, if it presented one (verified by
    /// rustls against the published CAs).
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// Calls in flight on this connection.
    pub activity: Arc<Activity>,
}

/// A connection holding its slot in a [`ConnLimiter`] and closed (reads
/// fail with `TimedOut`) when its [`IdleTimer`] fires.
pub struct Guarded<T> {
    io: T,
    timer: IdleTimer,
    peer: ConnPeer,
    _permit: ConnPermit<IpAddr>,
}

impl<T> Guarded<T> {
    pub fn new(io: T, peer: ConnPeer, permit: ConnPermit<IpAddr>, idle: Duration) -> Self {
        let first = HANDSHAKE_TIMEOUT.min(idle);
        Self {
            io,
            timer: IdleTimer::new(peer.activity.clone(), first, idle),
            peer,
            _permit: permit,
        }
    }
}

impl Guarded<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    /// Wraps an agent-API TLS connection; the client chain is read once
    /// (TLS 1.3 without renegotiation: it cannot change).
    pub fn agent_api(
        tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        addr: SocketAddr,
        permit: ConnPermit<IpAddr>,
        idle: Duration,
    ) -> Self {
        let certs = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
        let peer = ConnPeer {
            addr,
            certs,
            activity: Activity::new(std::time::Instant::now()),
        };
        Self::new(tls, peer, permit, idle)
    }
}

impl<T> Connected for Guarded<T> {
    type ConnectInfo = ConnPeer;
    fn connect_info(&self) -> ConnPeer {
        self.peer.clone()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.timer.poll_expired(cx).is_ready() {
            tracing::debug!(peer = %self.peer.addr, "closing idle connection");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle connection closed",
            )));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_table_defaults_and_errors_name_the_key() {
        let d: RawLimits = toml::from_str("").unwrap();
        assert_eq!(d.validate().unwrap(), Limits::default());
        let r: RawLimits = toml::from_str("max_connections_per_ip = 0").unwrap();
        assert_eq!(r.validate().unwrap_err().0, "limits.max_connections_per_ip");
        let r: RawLimits = toml::from_str("idle_timeout = \"0s\"").unwrap();
        assert_eq!(r.validate().unwrap_err().0, "limits.idle_timeout");
        let r: RawLimits = toml::from_str("idle_timeout = \"2s\"").unwrap();
        assert_eq!(r.validate().unwrap().idle_timeout, Duration::from_secs(2));
        assert!(toml::from_str::<RawLimits>("bogus = 1").is_err());
    }
}
