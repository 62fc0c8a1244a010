//! `sigil-server run`: wires the datastore, CA, agent API (TLS) and admin
//! socket together and serves until SIGINT/SIGTERM.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sigil_proto::admin::admin_api_server::AdminApiServer;
use sigil_proto::agent::agent_api_server::AgentApiServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};

use crate::admin_api::AdminService;
use crate::agent_api::{AgentService, Gate};
use crate::config::{DatastoreKind, EndpointProfile, ServerConfig};
use crate::datastore::{Datastore, Feed, PostgresStore, RedbStore};
use crate::endpoints;
use crate::error::StartupError;
use crate::keys::Keys;
use crate::limits::{self, Guarded, HANDSHAKE_TIMEOUT};
use crate::state::ServerState;
/// Change-feed events always kept: the newest this many...
pub const EVENTS_KEPT: u64 = 10_000;
/// ...and every event younger than this. A server further behind (stopped,
/// or cut off from the database, longer than that) reloads every record.
pub const EVENTS_MIN_AGE: Duration = Duration::from_secs(600);

/// How long in-flight calls may run after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Binds a Unix socket at `path`: creates a missing parent directory with
/// mode 0700 and leaves an existing one alone; the socket itself is 0600.
pub fn bind_private_socket(path: &Path) -> std::io::Result<UnixListener> {
    sigil_fs::bind_socket(path, 0o700, 0o600, |p| UnixListener::bind(p))
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(cfg: ServerConfig) -> Result<(), StartupError> {
    // Every agent-API connection costs a descriptor: take what the hard
    // limit allows, then fit the connection cap to it.
    // The upstream authority's files before anything else: a bad one fails
    // the start naming its key, with nothing written.
    let upstream = cfg
        .upstream_authority
        .as_ref()
        .map(|u| crate::upstream::load(u, sigil_core::now_unix()))
        .transpose()?;
    let nofile = limits::raise_nofile_limit();
    sigil_fs::ensure_private_dir(&cfg.data_dir)
        .map_err(|e| StartupError::file("data_dir", &cfg.data_dir, e))?;
    // Keys first: a planted or foreign-owned keys.json is refused before
    // anything is created in data_dir.
    let keys = Keys::load_or_create_with(
        &cfg.data_dir,
        &cfg.trust_domain,
        cfg.ca_ttl,
        cfg.jwt_key_type,
        upstream,
        crate::key_manager::KeyManager::open(&cfg.key_manager)?,
    )?;
    let (store, shared): (Arc<dyn Datastore>, Option<Arc<PostgresStore>>) = match &cfg.datastore {
        DatastoreKind::Redb { cache_mib } => (
            Arc::new(RedbStore::open_with_cache(
                &cfg.data_dir.join("datastore.redb"),
                *cache_mib,
            )?),
            None,
        ),
        DatastoreKind::Postgres(pg) => {
            let s = Arc::new(PostgresStore::open_configured(pg)?);
            (s.clone(), Some(s))
        }
    };
    // Where to follow the change feed from: taken before the state is
    // loaded, so that a change committed in between is applied (again).
    let feed_start = match &shared {
        Some(pg) => Some(pg.last_event_seq()?),
        None => None,
    };
    let state = Arc::new(ServerState::new(cfg.clone(), store, keys)?);
    if let (Some(pg), Some(last)) = (shared, feed_start) {
        follow_changes(pg, state.clone(), last)?;
    }
    state.install_audit_key(crate::state::load_or_create_audit_key(&cfg.data_dir)?)?;
    // Audit checkpoints: every audit_checkpoint_every records or
    // audit_checkpoint_interval, checked once a second.
    periodic(&state, "audit checkpoint", Duration::from_secs(1), |s| {
        s.audit_checkpoint_if_due().map(drop)
    });
    // Audit retention: prune up to a signed checkpoint, a few times per
    // retention period (at most once a minute).
    if let Some(retention) = cfg.audit_retention {
        let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        periodic(&state, "audit retention", every, |s| {
            s.audit_prune_if_due().map(drop)
        });
    }
    // Key rotation: cheap checks once a second; changes are persisted and
    // pushed to every agent by rotate_keys().
    // The cluster's published keys are refreshed in the same tick (a
    // datastore call, so off the runtime like every periodic job).
    periodic(&state, "key rotation", Duration::from_secs(1), |s| {
        let rotated = s.rotate_keys().map(drop);
        let wit = s.rotate_wit_keys().map(drop);
        s.cluster_keys_tick();
        rotated.and(wit)
    });
    // CRLs: re-signed at half their lifetime and whenever the published
    // CAs change (which rotation does); a re-signing rebuilds the withdrawn
    // set from the audit trail.
    periodic(&state, "CRL refresh", Duration::from_secs(1), |s| {
        s.refresh_crls_if_due().map(drop)
    });
    // Tasks past their deadline are recorded as ended (they issue nothing
    // from the deadline on either way).
    periodic(&state, "task deadlines", Duration::from_secs(1), |s| {
        s.end_tasks_past_deadline()
            .map(drop)
            .map_err(|e| e.to_string())
    });
    // Last-activity marks (access review): one batch write a minute.
    periodic(
        &state,
        "last-activity marks",
        Duration::from_secs(60),
        |s| s.flush_usage().map(drop),
    );

    if let Some(addr) = cfg.telemetry.listen {
        sigil_telemetry::serve(
            addr,
            Arc::new(crate::metrics::ServerExporter(state.clone())),
        )
        .await
        .map_err(|source| StartupError::Bind {
            what: "telemetry.prometheus_port",
            addr,
            source,
        })?;
    }
    let attestors = crate::node_attestation::NodeAttestors::from_config(&cfg)?;
    let issuers = crate::delegation_api::load_issuers(&state)?;
    let (tls, resolver, renew) = crate::tls::server_config(state.clone())?;
    tokio::spawn(renew);

    if let Some(be) = &cfg.bundle_endpoint {
        let tls = match be.profile {
            EndpointProfile::HttpsSpiffe => crate::tls::bundle_endpoint_spiffe(resolver.clone())?,
            EndpointProfile::HttpsWeb => {
                let (Some(c), Some(k)) = (&be.cert_path, &be.key_path) else {
                    return Err(StartupError::Key {
                        key: "bundle_endpoint",
                        reason: "https_web needs cert_path and key_path".into(),
                    });
                };
                crate::tls::bundle_endpoint_web(c, k)?
            }
        };
        endpoints::start_bundle_endpoint(state.clone(), be.addr, tls, be.refresh_hint).await?;
    }
    for f in &cfg.federation {
        tokio::spawn(endpoints::federation_loop(state.clone(), f.clone()));
    }
    if let Some(o) = &cfg.oidc {
        endpoints::start_oidc(state.clone(), o.addr, o.issuer.clone()).await?;
    }

    let addr = std::net::SocketAddr::new(cfg.bind_address, cfg.bind_port);
    let tcp = TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind {
            what: "bind",
            addr,
            source,
        })?;
    // With bind_port = 0 the log names the port actually bound.
    let addr = tcp.local_addr().unwrap_or(addr);
    let acceptor = TlsAcceptor::from(tls);
    let limiter = limits::agent_api_limiter(&cfg.limits, nofile);
    let idle = cfg.limits.idle_timeout;
    let (conn_tx, conn_rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (sock, peer) = match tcp.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // The slot is taken before the handshake, so that handshakes in
            // progress count too.
            let Some(permit) = limits::admit(&limiter, peer, "agent API") else {
                continue;
            };
            let _ = sock.set_nodelay(true);
            limits::tcp_keepalive(&sock);
            let acceptor = acceptor.clone();
            let conn_tx = conn_tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                    Ok(Ok(tls)) => {
                        let conn = Guarded::agent_api(tls, peer, permit, idle);
                        let _ = conn_tx.send(Ok::<_, std::io::Error>(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });

    let admin_listener = bind_private_socket(&cfg.admin_socket)
        .map_err(|e| StartupError::file("admin_socket", &cfg.admin_socket, e))?;

    let agent_server = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(limits::CONCURRENCY_PER_CONNECTION)
        .timeout(limits::REQUEST_TIMEOUT)
        .max_concurrent_streams(limits::MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(limits::MAX_HEADER_LIST)
        .initial_stream_window_size(limits::STREAM_WINDOW)
        .initial_connection_window_size(limits::CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(limits::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(limits::KEEPALIVE_TIMEOUT))
        .layer(crate::metrics::agent_api_layer())
        .layer(Gate::new(state.clone()))
        .add_service(
            AgentApiServer::new(AgentService::new(state.clone(), attestors))
                .max_decoding_message_size(limits::MAX_MESSAGE),
        )
        .add_service(crate::task_api::TaskAgentService::new(state.clone()))
        .add_service(crate::delegation_api::DelegationService::new(
            state.clone(),
            issuers,
        ))
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), shutdown_signal());
    // Root or the server's uid only (peer credentials), but bounded all the same.
    let admin_server = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(limits::CONCURRENCY_PER_CONNECTION)
        .max_concurrent_streams(limits::MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(limits::MAX_HEADER_LIST)
        .add_service(AdminApiServer::new(AdminService::new(state.clone())))
        .add_service(crate::task_api::TaskAdminService::new(state.clone()))
        .serve_with_incoming_shutdown(UnixListenerStream::new(admin_listener), shutdown_signal());

    tracing::info!(trust_domain = %cfg.trust_domain, %addr, admin_socket = %cfg.admin_socket.display(), "sigil-server ready");
    // Long-lived sync streams would hold a graceful shutdown open forever:
    // give in-flight calls a short grace period, then exit.
    let r = tokio::select! {
        r = async { tokio::try_join!(agent_server, admin_server) } => r.map(|_| ()).map_err(|e| StartupError::Serve {
            what: "agent API and admin socket",
            reason: e.to_string(),
        }),
        _ = async { shutdown_signal().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => Ok(()),
    };
    let _ = std::fs::remove_file(&cfg.admin_socket);
    if let Err(e) = state.flush_usage() {
        tracing::warn!(error = %e, "writing last-activity marks at shutdown failed");
    }
    tracing::info!("sigil-server stopped");
    r
}

/// Applies other servers' changes from the PostgreSQL change feed, on a
/// thread of its own: woken by their commits, and every few seconds in
/// case a notification was lost; events are read from the last one
/// applied, so nothing is skipped after a reconnect or a failed read. A
/// server that fell behind the feed's window (events it had not read were
/// pruned) reloads every record. The same thread prunes the feed once a
/// minute, keeping the newest [`EVENTS_KEPT`] events and every event of the
/// last [`EVENTS_MIN_AGE`].
fn follow_changes(
    pg: Arc<PostgresStore>,
    state: Arc<ServerState>,
    mut last: u64,
) -> Result<(), StartupError> {
    const BATCH: usize = 1000;
    const PRUNE_EVERY: Duration = Duration::from_secs(60);
    let listener = pg.listen()?;
    state.follow_feed(pg.clone(), last);
    std::thread::Builder::new()
        .name("sigil-follow".into())
        .spawn(move || {
            let mut pruned_at = std::time::Instant::now();
            loop {
                listener.wait(Duration::from_secs(2));
                if pruned_at.elapsed() >= PRUNE_EVERY {
                    pruned_at = std::time::Instant::now();
                    match pg.prune_events(EVENTS_KEPT, EVENTS_MIN_AGE) {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(events = n, "pruned the change feed"),
                        Err(e) => tracing::warn!(error = %e, "pruning the change feed failed"),
                    }
                }
                loop {
                    match pg.feed_since(last, BATCH) {
                        Ok(Feed::Behind { pruned_through }) => {
                            tracing::warn!(last, pruned_through, "behind the change feed's window: reloading every record");
                            let reloaded = pg
                                .last_event_seq()
                                .map_err(|e| e.to_string())
                                .and_then(|head| {
                                    state.reload_all().map_err(|e| e.to_string())?;
                                    Ok(head)
                                });
                            match reloaded {
                                Ok(head) => {
                                    last = head;
                                    state.feed_applied(head);
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "reloading from the datastore failed; retrying");
                                    break;
                                }
                            }
                        }
                        Ok(Feed::Events(evs)) => {
                            let Some(end) = evs.last().map(|e| e.seq) else {
                                break;
                            };
                            if let Err(e) = state.apply_changes(&evs) {
                                tracing::error!(error = %e, "applying datastore changes failed; retrying");
                                break;
                            }
                            last = end;
                            state.feed_applied(end);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reading the datastore change feed failed; retrying");
                            break;
                        }
                    }
                }
            }
        })
        .map_err(|source| StartupError::Thread {
            what: "change feed",
            source,
        })?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

/// Runs `job` every `every` for the life of the server, off the async
/// runtime (the jobs read and write the datastore). A failure is logged
/// with `what` and retried at the next tick; a job never runs twice at once.
fn periodic<E: std::fmt::Display + Send + 'static>(
    state: &Arc<ServerState>,
    what: &'static str,
    every: Duration,
    job: fn(&ServerState) -> Result<(), E>,
) {
    let state = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let s = state.clone();
            match tokio::task::spawn_blocking(move || job(&s)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "{what} failed; retrying"),
                Err(e) => tracing::error!(error = %e, "{what} task failed"),
            }
        }
    });
}
