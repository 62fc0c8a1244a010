//! The SPIFFE Workload API on a Unix socket. Each connection is bound to its
//! peer process when accepted (see `sigil_attestors::workload::unix`); each
//! call attests that process and serves the SVIDs of every entry whose
//! selectors are a subset of the process's selectors.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sigil_attestors::workload::unix::{Peer, UnixAttestor};
use sigil_core::selector::SelectorSet;
use sigil_proto::WORKLOAD_API_HEADER;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::cache::Snapshot;
use crate::h2_authority::AuthorityRewriter;

/// A Workload API connection together with the kernel's account of its
/// peer. Bytes from the client pass through [`AuthorityRewriter`] so that
/// gRPC C-core clients (py-spiffe) are accepted.
pub struct PeerStream {
    inner: UnixStream,
    peer: Arc<Peer>,
    rewriter: AuthorityRewriter,
    out: Vec<u8>,
    out_pos: usize,
    scratch: Box<[u8]>,
}

impl PeerStream {
    fn new(inner: UnixStream, peer: Peer) -> Self {
        Self {
            inner,
            peer: Arc::new(peer),
            rewriter: AuthorityRewriter::default(),
            out: Vec::new(),
            out_pos: 0,
            scratch: vec![0u8; 16 * 1024].into_boxed_slice(),
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
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(())); // EOF
                    }
                    this.rewriter.feed(&this.scratch[..n], &mut this.out);
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
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
    }
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(l)
}

/// The Workload API service.
pub struct WorkloadApi {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    attestor: Arc<UnixAttestor>,
}

impl WorkloadApi {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(Self {
            snapshots,
            attestor: Arc::new(UnixAttestor::new()),
        })
    }

    /// Checks the security header and attests the caller.
    async fn caller<T>(&self, req: &Request<T>) -> Result<SelectorSet, Status> {
        let hdr = req
            .metadata()
            .get(WORKLOAD_API_HEADER)
            .and_then(|v| v.to_str().ok());
        if hdr != Some("true") {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.0.clone())
            .ok_or_else(|| Status::internal("peer information missing"))?;
        let attestor = self.attestor.clone();
        let pid = peer.pid;
        tokio::task::spawn_blocking(move || attestor.attest(&peer))
            .await
            .map_err(|_| Status::internal("attestation task failed"))?
            .map_err(|e| {
                tracing::info!(pid, error = %e, "workload attestation failed");
                Status::permission_denied("could not attest the calling process")
            })
    }
}

/// The X.509 response for a caller with `selectors`, or why there is none.
/// `Ok(None)` means: entitled, but no SVID minted yet (wait for the next snapshot).
fn x509_response(
    snap: &Snapshot,
    selectors: &SelectorSet,
) -> Result<Option<X509svidResponse>, Status> {
    let matching: Vec<_> = snap
        .entries
        .iter()
        .filter(|e| selectors.satisfies(&e.selectors))
        .collect();
    if matching.is_empty() {
        return if snap.synced {
            Err(Status::permission_denied("no identity issued"))
        } else {
            Ok(None)
        };
    }
    let svids: Vec<X509svid> = matching
        .iter()
        .filter_map(|e| snap.svids.get(&e.id).map(|s| (e, s)))
        .map(|(e, s)| X509svid {
            spiffe_id: s.spiffe_id.clone(),
            x509_svid: s.chain_der.clone(),
            x509_svid_key: s.key_der.clone(),
            bundle: snap.bundle.concat.clone(),
            hint: e.hint.clone(),
        })
        .collect();
    if svids.is_empty() {
        return Ok(None);
    }
    Ok(Some(X509svidResponse {
        svids,
        crl: vec![],
        federated_bundles: HashMap::new(),
    }))
}

fn x509_bundles_response(
    snap: &Snapshot,
    selectors: &SelectorSet,
) -> Result<Option<X509BundlesResponse>, Status> {
    let entitled = snap
        .entries
        .iter()
        .any(|e| selectors.satisfies(&e.selectors));
    if !entitled {
        return if snap.synced {
            Err(Status::permission_denied("no identity issued"))
        } else {
            Ok(None)
        };
    }
    let Some(td) = &snap.trust_domain else {
        return Ok(None);
    };
    if snap.bundle.certs.is_empty() {
        return Ok(None);
    }
    Ok(Some(X509BundlesResponse {
        crl: vec![],
        bundles: HashMap::from([(td.id_string(), snap.bundle.concat.clone())]),
    }))
}

/// Streams `build(snapshot)` to the caller whenever it changes; ends the
/// stream with the error when the caller loses its last identity.
fn stream_updates<M, F>(
    mut snaps: watch::Receiver<Arc<Snapshot>>,
    build: F,
) -> ReceiverStream<Result<M, Status>>
where
    M: PartialEq + Clone + Send + 'static,
    F: Fn(&Snapshot) -> Result<Option<M>, Status> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut last: Option<M> = None;
        loop {
            let snap = snaps.borrow_and_update().clone();
            match build(&snap) {
                Ok(Some(m)) => {
                    if last.as_ref() != Some(&m) {
                        if tx.send(Ok(m.clone())).await.is_err() {
                            return;
                        }
                        last = Some(m);
                    }
                }
                Ok(None) => {}
                Err(st) => {
                    let _ = tx.send(Err(st)).await;
                    return;
                }
            }
            tokio::select! {
                r = snaps.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ReceiverStream<Result<X509svidResponse, Status>>;
    type FetchX509BundlesStream = ReceiverStream<Result<X509BundlesResponse, Status>>;
    type FetchJWTBundlesStream = ReceiverStream<Result<JwtBundlesResponse, Status>>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let selectors = self.caller(&req).await?;
        // Refuse at once (rather than in-stream) when the caller has no identity.
        x509_response(&self.snapshots.borrow(), &selectors)?;
        Ok(Response::new(stream_updates(
            self.snapshots.clone(),
            move |s| x509_response(s, &selectors),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let selectors = self.caller(&req).await?;
        x509_bundles_response(&self.snapshots.borrow(), &selectors)?;
        Ok(Response::new(stream_updates(
            self.snapshots.clone(),
            move |s| x509_bundles_response(s, &selectors),
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        self.caller(&req).await?;
        Err(Status::unimplemented(
            "JWT-SVIDs are not available in this version",
        ))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.caller(&req).await?;
        Err(Status::unimplemented(
            "JWT bundles are not available in this version",
        ))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.caller(&req).await?;
        Err(Status::unimplemented(
            "JWT-SVID validation is not available in this version",
        ))
    }
}
