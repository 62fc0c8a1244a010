//! The Workload API socket: binding it (public, 0777) and accepting
//! connections, each pinned to its peer process when accepted (see
//! `sigil_attestors::workload::unix`) and filtered through the HTTP/2
//! `:authority` shim for gRPC C-core clients.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sigil_attestors::workload::unix::Peer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::h2_authority::AuthorityRewriter;

/// Capacity of the rewritten-bytes buffer kept across reads; a larger one
/// (after a large read) is freed once drained, so that idle connections
/// hold little memory.
const OUT_KEEP: usize = 4 * 1024;

/// A Workload API connection together with the kernel's account of its
/// peer. Bytes from the client pass through [`AuthorityRewriter`] so that
/// gRPC C-core clients (py-spiffe) are accepted.
pub struct PeerStream {
    inner: UnixStream,
    peer: Arc<Peer>,
    rewriter: AuthorityRewriter,
    /// Rewritten bytes not yet handed to the reader, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
}

impl PeerStream {
    fn new(inner: UnixStream, peer: Peer) -> Self {
        Self {
            inner,
            peer: Arc::new(peer),
            rewriter: AuthorityRewriter::default(),
            out: Vec::new(),
            out_pos: 0,
        }
    }
}

/// Connect info tonic attaches to every request of a [`PeerStream`].
#[derive(Clone)]
pub struct PeerInfo(pub Arc<Peer>);

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        PeerInfo(self.peer.clone())
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
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
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections and pins each to its peer; connections whose peer
/// cannot be read are dropped.
pub fn incoming(listener: UnixListener) -> ReceiverStream<io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((sock, _)) => match Peer::from_socket(&sock) {
                    Ok(peer) => {
                        if tx.send(Ok(PeerStream::new(sock, peer))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "dropping Workload API connection"),
                },
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
