//! The agent's Prometheus metrics (`sigil_agent_*`), served by
//! `[telemetry] prometheus_port` (see the sigil-telemetry crate).
//!
//! Workload API calls are counted by method and status code by a tower
//! layer on the socket's server; the cache's size, its next rotation and
//! the agent's own SVID are read from the latest snapshot at each scrape.

use std::sync::{Arc, LazyLock};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use sigil_core::limits::ConnLimiter;
use sigil_telemetry::Exporter;
use sigil_telemetry::grpc::{GrpcMetrics, GrpcMetricsLayer};
use tokio::sync::watch;

use crate::cache::Snapshot;
use crate::node::AgentSvid;

/// The methods served on the Workload API socket, counted by name.
const WORKLOAD_METHODS: &[&str] = &[
    "SpiffeWorkloadAPI/FetchX509SVID",
    "SpiffeWorkloadAPI/FetchX509Bundles",
    "SpiffeWorkloadAPI/FetchJWTSVID",
    "SpiffeWorkloadAPI/FetchJWTBundles",
    "SpiffeWorkloadAPI/ValidateJWTSVID",
    "sigil.task.TaskApi/StartTask",
    "sigil.task.TaskApi/FetchTaskSvid",
    "sigil.task.TaskApi/EndTask",
    "sigil.delegation.Delegation/ExchangeToken",
    "envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
    "envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets",
    "envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets",
];

/// Every metric of the agent.
pub struct AgentMetrics {
    registry: Registry,
    pub workload_api: Arc<GrpcMetrics>,
    entries: Gauge,
    svids: Gauge,
    next_rotation: Gauge,
    synced: Gauge,
    offline: Gauge,
    agent_svid_expiry: Gauge,
    connections: Gauge,
    connections_refused: Gauge,
}

impl AgentMetrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("sigil_agent");
        let workload_api = GrpcMetrics::new(&mut r, "workload_api", WORKLOAD_METHODS);
        let m = Self {
            registry: Registry::default(),
            workload_api,
            entries: Gauge::default(),
            svids: Gauge::default(),
            next_rotation: Gauge::default(),
            synced: Gauge::default(),
            offline: Gauge::default(),
            agent_svid_expiry: Gauge::default(),
            connections: Gauge::default(),
            connections_refused: Gauge::default(),
        };
        r.register(
            "entries",
            "Entries this agent is authorized for",
            m.entries.clone(),
        );
        r.register(
            "cached_svids",
            "Workload X.509-SVIDs held in the cache",
            m.svids.clone(),
        );
        r.register_with_unit(
            "next_rotation_timestamp",
            "When the next cached X.509-SVID is due for renewal (Unix time; 0 with none cached)",
            Unit::Seconds,
            m.next_rotation.clone(),
        );
        r.register(
            "synced",
            "1 once the first entry set has arrived from the server",
            m.synced.clone(),
        );
        r.register(
            "offline",
            "1 while nothing is served: cut off from the server past serve_offline_for",
            m.offline.clone(),
        );
        r.register_with_unit(
            "svid_expiry_timestamp",
            "When the agent's own SVID expires (Unix time)",
            Unit::Seconds,
            m.agent_svid_expiry.clone(),
        );
        r.register(
            "workload_connections",
            "Workload API connections open",
            m.connections.clone(),
        );
        r.register(
            "workload_connections_refused",
            "Workload API connections refused at accept by the connection caps since start",
            m.connections_refused.clone(),
        );
        Self { registry: r, ..m }
    }
}

/// The agent's metrics.
pub static METRICS: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::new);

/// The tower layer counting Workload API calls.
pub fn workload_api_layer() -> GrpcMetricsLayer {
    GrpcMetricsLayer(METRICS.workload_api.clone())
}

/// `/metrics` and `/ready` for one agent.
pub struct AgentExporter {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub svid: watch::Receiver<AgentSvid>,
    pub connections: ConnLimiter<u32>,
}

fn gauge(g: &Gauge, v: impl TryInto<i64>) {
    g.set(v.try_into().unwrap_or(i64::MAX));
}

impl Exporter for AgentExporter {
    fn metrics(&self) -> String {
        let m = &*METRICS;
        let snap = self.snapshots.borrow().clone();
        gauge(&m.entries, snap.entries.len());
        gauge(&m.svids, snap.svids.len());
        let next = snap.svids.values().map(|s| s.refresh_at()).min();
        m.next_rotation.set(next.unwrap_or(0));
        m.synced.set(i64::from(snap.synced));
        m.offline.set(i64::from(snap.offline));
        m.agent_svid_expiry.set(self.svid.borrow().not_after);
        let c = self.connections.stats();
        gauge(&m.connections, c.open);
        gauge(&m.connections_refused, c.refused);
        sigil_telemetry::encode(&m.registry)
    }

    fn ready(&self) -> Result<(), String> {
        let snap = self.snapshots.borrow().clone();
        if !snap.synced {
            Err("no entry set from the server yet".into())
        } else if snap.offline {
            Err("cut off from the server for longer than serve_offline_for".into())
        } else {
            Ok(())
        }
    }
}
