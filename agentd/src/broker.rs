//! The SPIFFE Broker Endpoint: a trusted broker (an AI-agent orchestrator
//! that launches tool processes, a node proxy) asks for the identities of a
//! workload it names by PID, and receives that workload's X.509-SVIDs,
//! JWT-SVIDs and bundles.
//!
//! - Transport: gRPC over mutual TLS on a Unix socket (`[broker]
//!   socket_path`, directory 0700, socket 0600). The agent presents its own
//!   agent SVID (the broker checks the provider's SPIFFE ID); the broker
//!   must present an X.509-SVID of this trust domain, verified against the
//!   current bundle at every handshake.
//! - Authorization: the client SVID's SPIFFE ID must be in
//!   `authorized_brokers` (PermissionDenied otherwise), and every request
//!   must carry `broker.spiffe.io: true` (InvalidArgument otherwise).
//! - The agent attests the referenced process itself, with the same
//!   attestors as a Workload API caller: the broker never supplies
//!   selectors. A PID that names no process is NotFound; a Kubernetes object
//!   reference is InvalidArgument (a node agent cannot resolve one).
//! - Streams end (PermissionDenied) when the referenced process exits: the
//!   PID is pinned by its start time, so a reused PID is not served.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prost::Message;
use sigil_attestors::workload::AttestorSet;
use sigil_attestors::workload::unix::{Peer, UnixNeeds};
use sigil_core::SpiffeId;
use sigil_core::limits::Activity;
use sigil_core::tls::{SharedBundle, SpiffeClientVerifier, SvidCertResolver};
use sigil_core::x509::SvidInfo;
use sigil_proto::BROKER_API_HEADER;
use sigil_proto::broker::api_server::{Api, ApiServer};
use sigil_proto::broker::{
    FetchJwtsvidRequest, FetchJwtsvidResponse, Jwtsvid, PID_REFERENCE_TYPE_URL,
    SubscribeToJwtBundlesRequest, SubscribeToJwtBundlesResponse, SubscribeToX509BundlesRequest,
    SubscribeToX509BundlesResponse, SubscribeToX509svidRequest, SubscribeToX509svidResponse,
    WorkloadPidReference, WorkloadReference, X509svid,
};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::transport::server::{TlsConnectInfo, UdsConnectInfo};
use tonic::{Request, Response, Status};

use crate::cache::Snapshot;
use crate::config::BrokerConfig;
use crate::node::AgentSvid;
use crate::workload_api::{self, JwtSource, UpdateStream};

/// Time allowed for a broker's TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The Broker API service.
pub struct BrokerApi {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    attestors: Arc<AttestorSet>,
    authorized: Vec<SpiffeId>,
    jwt: JwtSource,
}

/// The workload a request names, attested by the agent.
struct Referenced {
    selectors: sigil_core::selector::SelectorSet,
    peer: Arc<Peer>,
}

impl BrokerApi {
    /// Checks the header and the broker's SPIFFE ID.
    fn authorize<T>(&self, req: &Request<T>) -> Result<SpiffeId, Status> {
        if req
            .metadata()
            .get(BROKER_API_HEADER)
            .and_then(|v| v.to_str().ok())
            != Some("true")
        {
            return Err(Status::invalid_argument(
                "security header broker.spiffe.io missing from request",
            ));
        }
        let leaf = req
            .extensions()
            .get::<TlsConnectInfo<UdsConnectInfo>>()
            .and_then(|i| i.peer_certs())
            .and_then(|c| c.first().map(|c| c.to_vec()))
            .ok_or_else(|| Status::unauthenticated("a broker X.509-SVID (mTLS) is required"))?;
        let id = SvidInfo::from_der(&leaf)
            .map_err(|e| Status::unauthenticated(format!("broker certificate: {e}")))?
            .spiffe_id;
        if !self.authorized.contains(&id) {
            tracing::warn!(broker = %id, "Broker API call refused: not in broker.authorized_brokers");
            return Err(Status::permission_denied(format!(
                "{id} is not an authorized broker"
            )));
        }
        Ok(id)
    }

    /// Authorizes the broker, then attests the process `reference` names.
    async fn referenced<T>(
        &self,
        req: &Request<T>,
        reference: Option<&WorkloadReference>,
    ) -> Result<Referenced, Status> {
        let broker = self.authorize(req)?;
        let pid = pid_of(reference)?;
        let peer = Arc::new(Peer::from_pid(pid).map_err(|e| {
            Status::not_found(format!("no process with pid {pid} to broker for: {e}"))
        })?);
        let attested = self.attestors.attest(peer.clone()).await.map_err(|e| {
            tracing::info!(pid, %broker, error = %e, "brokered workload attestation failed");
            Status::not_found(format!("could not attest the process with pid {pid}"))
        })?;
        if !attested.failed.is_empty() {
            let kinds: Vec<&str> = attested.failed.iter().map(|(k, _)| *k).collect();
            return Err(Status::unavailable(format!(
                "workload attestor {} did not answer; retry",
                kinds.join(", ")
            )));
        }
        tracing::debug!(pid, %broker, "brokered workload attested");
        Ok(Referenced {
            selectors: attested.selectors,
            peer,
        })
    }

    fn stream<M, W: 'static>(
        &self,
        r: Referenced,
        build: impl Fn(&Snapshot, &sigil_core::selector::SelectorSet) -> Result<Option<W>, Status>
        + Send
        + Sync
        + 'static,
        map: fn(W) -> M,
    ) -> Result<UpdateStream<M>, Status>
    where
        M: PartialEq + Clone + 'static,
    {
        // Attested with every unix selector: nothing to re-attest for.
        let caller = workload_api::Caller {
            selectors: r.selectors,
            call: Activity::new(Instant::now()).begin(),
            peer: r.peer,
            derived: UnixNeeds::ALL,
        };
        workload_api::updates(self.snapshots.clone(), caller, None, move |s, sel| {
            build(s, sel).map(|o| o.map(map))
        })
    }
}

/// The PID of a `WorkloadPIDReference`, or why the reference is refused.
fn pid_of(reference: Option<&WorkloadReference>) -> Result<i32, Status> {
    let any = reference
        .and_then(|r| r.reference.as_ref())
        .ok_or_else(|| Status::invalid_argument("invalid field `reference`: required"))?;
    if any.type_url != PID_REFERENCE_TYPE_URL {
        return Err(Status::invalid_argument(format!(
            "invalid field `reference`: {:?} is not served here (only {PID_REFERENCE_TYPE_URL})",
            any.type_url
        )));
    }
    let pid = WorkloadPidReference::decode(any.value.as_slice())
        .map_err(|e| Status::invalid_argument(format!("invalid field `reference`: {e}")))?
        .pid;
    if pid <= 0 {
        return Err(Status::invalid_argument(
            "invalid field `reference.pid`: must be positive",
        ));
    }
    Ok(pid)
}

fn x509_svids(r: sigil_proto::workload::X509svidResponse) -> SubscribeToX509svidResponse {
    SubscribeToX509svidResponse {
        svids: r
            .svids
            .into_iter()
            .map(|s| X509svid {
                spiffe_id: s.spiffe_id,
                x509_svid: s.x509_svid.to_vec(),
                x509_svid_key: s.x509_svid_key.to_vec(),
                bundle: s.bundle.to_vec(),
                hint: s.hint,
            })
            .collect(),
        crl: r.crl.into_iter().map(|c| c.to_vec()).collect(),
        federated_bundles: r
            .federated_bundles
            .into_iter()
            .map(|(k, v)| (k, v.to_vec()))
            .collect(),
    }
}

fn x509_bundles(r: sigil_proto::workload::X509BundlesResponse) -> SubscribeToX509BundlesResponse {
    SubscribeToX509BundlesResponse {
        crl: r.crl,
        bundles: r.bundles,
    }
}

fn jwt_bundles(r: sigil_proto::workload::JwtBundlesResponse) -> SubscribeToJwtBundlesResponse {
    SubscribeToJwtBundlesResponse { bundles: r.bundles }
}

#[tonic::async_trait]
impl Api for BrokerApi {
    type SubscribeToX509SVIDStream = UpdateStream<SubscribeToX509svidResponse>;
    type SubscribeToX509BundlesStream = UpdateStream<SubscribeToX509BundlesResponse>;
    type SubscribeToJWTBundlesStream = UpdateStream<SubscribeToJwtBundlesResponse>;

    async fn subscribe_to_x509svid(
        &self,
        req: Request<SubscribeToX509svidRequest>,
    ) -> Result<Response<Self::SubscribeToX509SVIDStream>, Status> {
        let r = self
            .referenced(&req, req.get_ref().reference.as_ref())
            .await?;
        Ok(Response::new(self.stream(
            r,
            workload_api::x509_response,
            x509_svids,
        )?))
    }

    async fn subscribe_to_x509_bundles(
        &self,
        req: Request<SubscribeToX509BundlesRequest>,
    ) -> Result<Response<Self::SubscribeToX509BundlesStream>, Status> {
        let r = self
            .referenced(&req, req.get_ref().reference.as_ref())
            .await?;
        Ok(Response::new(self.stream(
            r,
            workload_api::x509_bundles_response,
            x509_bundles,
        )?))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<FetchJwtsvidRequest>,
    ) -> Result<Response<FetchJwtsvidResponse>, Status> {
        let r = self
            .referenced(&req, req.get_ref().reference.as_ref())
            .await?;
        let body = req.into_inner();
        let snap = self.snapshots.borrow().clone();
        let svids = workload_api::jwt_svids(
            &self.jwt,
            &snap,
            &r.selectors,
            body.audience,
            &body.spiffe_id,
        )
        .await?;
        Ok(Response::new(FetchJwtsvidResponse {
            svids: svids
                .into_iter()
                .map(|s| Jwtsvid {
                    spiffe_id: s.spiffe_id,
                    svid: s.svid,
                    hint: s.hint,
                })
                .collect(),
        }))
    }

    async fn subscribe_to_jwt_bundles(
        &self,
        req: Request<SubscribeToJwtBundlesRequest>,
    ) -> Result<Response<Self::SubscribeToJWTBundlesStream>, Status> {
        let r = self
            .referenced(&req, req.get_ref().reference.as_ref())
            .await?;
        Ok(Response::new(self.stream(
            r,
            workload_api::jwt_bundles_response,
            jwt_bundles,
        )?))
    }
}

/// Binds the endpoint and serves it until the process exits. The TLS
/// identity follows the agent SVID and the trust bundle as they rotate.
pub async fn start(
    cfg: BrokerConfig,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    mut svid: watch::Receiver<AgentSvid>,
    server: watch::Receiver<Channel>,
    attestors: Arc<AttestorSet>,
) -> Result<(), String> {
    let resolver = Arc::new(SvidCertResolver::default());
    let current = svid.borrow_and_update().clone();
    resolver.set(&current.chain, &current.key)?;
    let bundle: SharedBundle = Arc::new(RwLock::new(snapshots.borrow().bundle.certs.clone()));
    {
        let resolver = resolver.clone();
        tokio::spawn(async move {
            while svid.changed().await.is_ok() {
                let s = svid.borrow_and_update().clone();
                if let Err(e) = resolver.set(&s.chain, &s.key) {
                    tracing::error!(error = %e, "broker endpoint: cannot present the renewed agent SVID");
                }
            }
        });
        let bundle = bundle.clone();
        let mut snaps = snapshots.clone();
        tokio::spawn(async move {
            while snaps.changed().await.is_ok() {
                let certs = snaps.borrow_and_update().bundle.certs.clone();
                if let Ok(mut b) = bundle.write() {
                    *b = certs;
                }
            }
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SpiffeClientVerifier::required(bundle, provider.clone()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = sigil_fs::bind_socket(&cfg.socket_path, 0o700, 0o600, |p| UnixListener::bind(p))
        .map_err(|e| format!("broker.socket_path {}: {e}", cfg.socket_path.display()))?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(s)).await;
                    }
                    Ok(Err(e)) => tracing::info!(error = %e, "broker TLS handshake refused"),
                    Err(_) => tracing::info!("broker TLS handshake timed out"),
                }
            });
        }
    });
    let api = BrokerApi {
        snapshots,
        attestors,
        authorized: cfg.authorized_brokers.clone(),
        jwt: JwtSource::new(server),
    };
    tracing::info!(socket = %cfg.socket_path.display(), brokers = cfg.authorized_brokers.len(), "serving the SPIFFE Broker API");
    let serve = tonic::transport::Server::builder()
        .max_concurrent_streams(crate::workload_socket::MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(crate::workload_socket::MAX_HEADER_LIST)
        .add_service(
            ApiServer::new(api).max_decoding_message_size(crate::workload_socket::MAX_MESSAGE),
        )
        .serve_with_incoming(ReceiverStream::new(rx));
    tokio::spawn(async move {
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "broker endpoint stopped");
        }
    });
    Ok(())
}
