//! `sigil-agent run`: attest (or reuse the stored identity), start the
//! renewal, sync and cache tasks, and serve the Workload API and the agent
//! admin socket until SIGINT/SIGTERM.

use std::path::Path;
use std::sync::Arc;

use sigil_proto::admin::agent_admin_api_server::{AgentAdminApi, AgentAdminApiServer};
use sigil_proto::admin::{
    AgentHealthResponse, DebugSelectorsRequest, DebugSelectorsResponse, HealthRequest,
};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use sigil_core::limits::ConnLimiter;

use crate::attestation::Prover;
use crate::cache::{Cache, Snapshot};
use crate::config::{AgentConfig, NodeAttestor};
use crate::node::{self, AgentSvid, ServerLink};
use crate::workload_api::WorkloadApi;
use crate::workload_socket;

struct AgentAdmin {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    svid: watch::Receiver<AgentSvid>,
    attestors: Arc<sigil_attestors::workload::AttestorSet>,
    connections: ConnLimiter<u32>,
}

/// Only root and the agent's own uid may use the admin socket (it is also 0600).
fn check_admin_peer<T>(req: &Request<T>) -> Result<(), Status> {
    let uid = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid());
    let own = nix::unistd::geteuid().as_raw();
    if matches!(uid, Some(u) if u == 0 || u == own) {
        Ok(())
    } else {
        Err(Status::permission_denied(
            "only root or the agent's uid may use the agent admin socket",
        ))
    }
}

#[tonic::async_trait]
impl AgentAdminApi for AgentAdmin {
    async fn agent_health(
        &self,
        req: Request<HealthRequest>,
    ) -> Result<Response<AgentHealthResponse>, Status> {
        check_admin_peer(&req)?;
        let snap = self.snapshots.borrow().clone();
        let svid = self.svid.borrow().clone();
        let c = self.connections.stats();
        Ok(Response::new(AgentHealthResponse {
            workload_connections: c.open as u64,
            workload_connections_max: c.total as u64,
            workload_connections_per_uid_max: c.per_key as u64,
            workload_connections_reserve: c.reserve as u64,
            workload_uids_at_cap: c.keys_at_cap as u64,
            workload_busiest_uid_connections: c.busiest_key as u64,
            workload_connections_refused: c.refused,
            spiffe_id: svid.spiffe_id.to_string(),
            trust_domain: svid.spiffe_id.trust_domain_name().to_string(),
            synced: snap.synced,
            entries: snap.entries.len() as u64,
            svids: snap.svids.len() as u64,
            agent_svid_expires_at: svid.not_after,
        }))
    }

    async fn debug_selectors(
        &self,
        req: Request<DebugSelectorsRequest>,
    ) -> Result<Response<DebugSelectorsResponse>, Status> {
        check_admin_peer(&req)?;
        let snap = self.snapshots.borrow().clone();
        crate::debug_selectors::answer(&self.attestors, &snap, req.into_inner().pid)
            .await
            .map(Response::new)
    }
}

fn bind_private_socket(path: &Path) -> std::io::Result<UnixListener> {
    sigil_fs::bind_socket(path, 0o700, 0o600, |p| UnixListener::bind(p))
}

pub async fn run(cfg: AgentConfig, join_token: Option<String>) -> Result<(), String> {
    // Each Workload API connection costs a socket and a pidfd: take what the
    // hard limit allows, then fit the connection caps to it.
    let nofile = workload_socket::raise_nofile_limit();
    let connections = cfg.limits.limiter(nofile);
    sigil_fs::ensure_private_dir(&cfg.data_dir)
        .map_err(|e| format!("data_dir {}: {e}", cfg.data_dir.display()))?;
    // x509pop/TPM agents always need their prover (renewal re-attests); a
    // join-token agent only for its first attestation.
    let stored = node::load_identity(&cfg.data_dir, &cfg.trust_domain)?;
    let token = join_token.or_else(|| cfg.join_token.clone());
    let prover = match (&cfg.node_attestor, &stored) {
        (NodeAttestor::JoinToken, Some(_)) => None,
        _ => Some(Arc::new(Prover::from_config(&cfg, token)?)),
    };
    let (svid, bundle) = match stored {
        Some(found) => {
            tracing::info!(spiffe_id = %found.0.spiffe_id, "using stored agent identity");
            found
        }
        None => {
            let prover = prover
                .as_ref()
                .ok_or("no prover for the first attestation")?;
            let (svid, bundle) = node::bootstrap_attest(&cfg, prover).await?;
            node::store_identity(&cfg.data_dir, &svid, &bundle)?;
            tracing::info!(spiffe_id = %svid.spiffe_id, "node attested");
            (svid, bundle)
        }
    };

    let link = ServerLink::new(cfg.clone(), svid, bundle.clone(), prover)?;
    let (sync_tx, sync_rx) = mpsc::channel(16);
    let (cache, snapshots) = Cache::new(
        cfg.trust_domain.clone(),
        link.channel.subscribe(),
        sync_rx,
        bundle,
        cfg.serve_offline_for,
    );
    tokio::spawn(cache.run());
    tokio::spawn(link.clone().sync_loop(sync_tx));
    tokio::spawn(link.clone().renew_loop());

    let attestors = Arc::new(cfg.workload_attestors.build());
    tracing::info!(attestors = ?attestors.kinds(), "workload attestors enabled");
    let api_listener = workload_socket::bind_public_socket(&cfg.socket_path)
        .map_err(|e| format!("socket_path {}: {e}", cfg.socket_path.display()))?;
    let admin_listener = bind_private_socket(&cfg.admin_socket)
        .map_err(|e| format!("admin_socket {}: {e}", cfg.admin_socket.display()))?;

    if let Some(addr) = cfg.telemetry.listen {
        let exporter = crate::metrics::AgentExporter {
            snapshots: snapshots.clone(),
            svid: link.svid.subscribe(),
            connections: connections.clone(),
        };
        sigil_telemetry::serve(addr, Arc::new(exporter))
            .await
            .map_err(|e| format!("telemetry.prometheus_port {addr}: {e}"))?;
    }
    let api = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(workload_socket::CONCURRENCY_PER_CONNECTION)
        .timeout(workload_socket::REQUEST_TIMEOUT)
        .max_concurrent_streams(workload_socket::MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(workload_socket::MAX_HEADER_LIST)
        .initial_stream_window_size(workload_socket::WINDOW)
        .initial_connection_window_size(workload_socket::WINDOW)
        .layer(crate::metrics::workload_api_layer())
        .add_service(WorkloadApi::new(
            snapshots.clone(),
            link.channel.subscribe(),
            attestors.clone(),
        ))
        .add_service(crate::task_api::TaskApi::new(
            snapshots.clone(),
            link.channel.subscribe(),
            attestors.clone(),
        ))
        .add_service(crate::delegation_api::DelegationApi::new(
            snapshots.clone(),
            link.channel.subscribe(),
            attestors.clone(),
        ))
        .add_service(crate::sds::Sds::new(snapshots.clone(), attestors.clone()))
        .serve_with_incoming_shutdown(
            workload_socket::incoming(api_listener, connections.clone(), cfg.limits.idle_timeout),
            shutdown_signal(),
        );
    let admin = tonic::transport::Server::builder()
        .add_service(AgentAdminApiServer::new(AgentAdmin {
            snapshots,
            svid: link.svid.subscribe(),
            attestors,
            connections: connections.clone(),
        }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(admin_listener), shutdown_signal());
    let caps = connections.caps();
    tracing::info!(
        socket = %cfg.socket_path.display(),
        max_connections = caps.total,
        max_connections_per_uid = caps.per_key,
        idle_timeout = ?cfg.limits.idle_timeout,
        nofile,
        "sigil-agent serving the Workload API"
    );
    // Workload API streams are long-lived: short grace period, then exit.
    let r = tokio::select! {
        r = async { tokio::try_join!(api, admin) } => r.map(|_| ()).map_err(|e| e.to_string()),
        _ = async { shutdown_signal().await; tokio::time::sleep(std::time::Duration::from_millis(500)).await } => Ok(()),
    };
    let _ = std::fs::remove_file(&cfg.socket_path);
    let _ = std::fs::remove_file(&cfg.admin_socket);
    tracing::info!("sigil-agent stopped");
    r
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
