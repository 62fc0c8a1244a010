//! The server's Prometheus metrics (`sigil_server_*`), served by
//! `[telemetry] prometheus_port` (see the sigil-telemetry crate).
//!
//! Counters and histograms are process-wide statics bumped where the event
//! happens (minting, sync, node attestation, kills, datastore failures);
//! gauges that mirror state (entries, agents, kills in force, the signing
//! queue) are read from [`ServerState`] at each scrape.

use std::sync::{Arc, LazyLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use sigil_telemetry::Exporter;
use sigil_telemetry::grpc::{GrpcMetrics, GrpcMetricsLayer};

use crate::state::ServerState;

/// Labels of `sigil_server_node_attestations_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttestationLabels {
    /// `join_token`, `x509pop`, `tpm` or `none`.
    pub r#type: String,
    /// `ok` or `refused`.
    pub result: String,
}

/// Every metric of the server.
pub struct ServerMetrics {
    registry: Registry,
    pub x509_svids_signed: Counter,
    pub jwt_svids_signed: Counter,
    pub mint_batch_duration: Histogram,
    pub signing_queue_calls: Gauge,
    pub signing_queue_csrs: Gauge,
    pub sync_streams: Gauge,
    pub sync_updates_sent: Counter,
    pub sync_sent_bytes: Counter,
    pub entries: Gauge,
    pub agents: Gauge,
    pub node_attestations: Family<AttestationLabels, Counter>,
    pub kills_created: Counter,
    pub audit_issuance_commits: Counter,
    pub audit_issuance_records: Counter,
    pub kills_in_force: Gauge,
    pub datastore_errors: Counter,
    pub agent_api: Arc<GrpcMetrics>,
}

/// The agent API's methods, counted by name.
const AGENT_API_METHODS: &[&str] = &[
    "sigil.agent.AgentApi/Attest",
    "sigil.agent.AgentApi/RenewAgent",
    "sigil.agent.AgentApi/Sync",
    "sigil.agent.AgentApi/MintX509Svids",
    "sigil.agent.AgentApi/MintJwtSvid",
];

impl ServerMetrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("sigil_server");
        let m = Self {
            x509_svids_signed: Counter::default(),
            jwt_svids_signed: Counter::default(),
            mint_batch_duration: sigil_telemetry::latency_histogram(),
            signing_queue_calls: Gauge::default(),
            signing_queue_csrs: Gauge::default(),
            sync_streams: Gauge::default(),
            sync_updates_sent: Counter::default(),
            sync_sent_bytes: Counter::default(),
            entries: Gauge::default(),
            agents: Gauge::default(),
            node_attestations: Family::default(),
            kills_created: Counter::default(),
            audit_issuance_commits: Counter::default(),
            audit_issuance_records: Counter::default(),
            kills_in_force: Gauge::default(),
            datastore_errors: Counter::default(),
            agent_api: GrpcMetrics::new(&mut r, "agent_api", AGENT_API_METHODS),
            registry: Registry::default(),
        };
        r.register(
            "x509_svids_signed",
            "Workload X.509-SVIDs signed",
            m.x509_svids_signed.clone(),
        );
        r.register(
            "jwt_svids_signed",
            "Workload JWT-SVIDs signed",
            m.jwt_svids_signed.clone(),
        );
        r.register_with_unit(
            "mint_batch_duration",
            "Time to sign and audit one MintX509Svids batch, queueing included",
            Unit::Seconds,
            m.mint_batch_duration.clone(),
        );
        r.register(
            "signing_queue_calls",
            "Mint calls waiting for a signing slot",
            m.signing_queue_calls.clone(),
        );
        r.register(
            "signing_queue_csrs",
            "CSRs in mint calls waiting for a signing slot",
            m.signing_queue_csrs.clone(),
        );
        r.register(
            "sync_streams",
            "Agent sync streams open",
            m.sync_streams.clone(),
        );
        r.register(
            "sync_updates_sent",
            "Sync messages sent to agents (chunks counted one by one)",
            m.sync_updates_sent.clone(),
        );
        r.register_with_unit(
            "sync_sent",
            "Encoded size of the sync messages sent to agents",
            Unit::Bytes,
            m.sync_sent_bytes.clone(),
        );
        r.register("entries", "Registration entries", m.entries.clone());
        r.register("agents", "Attested agents on record", m.agents.clone());
        r.register(
            "node_attestations",
            "Node attestations by attestor type and result",
            m.node_attestations.clone(),
        );
        r.register("kills_created", "Kills created", m.kills_created.clone());
        r.register(
            "audit_issuance_commits",
            "Write transactions that committed issuance audit records (one may hold several)",
            m.audit_issuance_commits.clone(),
        );
        r.register(
            "audit_issuance_records",
            "Issuance audit records committed (one per mint batch or JWT-SVID)",
            m.audit_issuance_records.clone(),
        );
        r.register("kills_in_force", "Kills in force", m.kills_in_force.clone());
        r.register(
            "datastore_errors",
            "Datastore failures reported to a caller or a periodic job",
            m.datastore_errors.clone(),
        );
        Self { registry: r, ..m }
    }
}

/// The server's metrics.
pub static METRICS: LazyLock<ServerMetrics> = LazyLock::new(ServerMetrics::new);

/// The tower layer counting agent-API calls.
pub fn agent_api_layer() -> GrpcMetricsLayer {
    GrpcMetricsLayer(METRICS.agent_api.clone())
}

/// Counts one node attestation.
pub fn node_attestation(kind: &str, ok: bool) {
    METRICS
        .node_attestations
        .get_or_create(&AttestationLabels {
            r#type: kind.to_string(),
            result: if ok { "ok" } else { "refused" }.to_string(),
        })
        .inc();
}

/// Keeps `sigil_server_sync_streams` up for the life of one stream.
pub struct SyncStreamGauge(());

impl SyncStreamGauge {
    pub fn open() -> Self {
        METRICS.sync_streams.inc();
        Self(())
    }
}

impl Drop for SyncStreamGauge {
    fn drop(&mut self) {
        METRICS.sync_streams.dec();
    }
}

/// `/metrics` and `/ready` for one server.
pub struct ServerExporter(pub Arc<ServerState>);

fn gauge(g: &Gauge, v: impl TryInto<i64>) {
    g.set(v.try_into().unwrap_or(i64::MAX));
}

impl Exporter for ServerExporter {
    fn metrics(&self) -> String {
        let m = &*METRICS;
        let s = self.0.signing.stats();
        gauge(&m.signing_queue_calls, s.waiting_calls);
        gauge(&m.signing_queue_csrs, s.waiting_csrs);
        if let Ok(n) = self.0.entry_count() {
            gauge(&m.entries, n);
        }
        // A datastore read: an unreachable datastore leaves the last value
        // (and is counted as an error).
        match self.0.agent_count() {
            Ok(n) => gauge(&m.agents, n),
            Err(_) => {
                m.datastore_errors.inc();
            }
        }
        gauge(&m.kills_in_force, self.0.kills_in_force());
        sigil_telemetry::encode(&m.registry)
    }

    fn ready(&self) -> Result<(), String> {
        match self.0.datastore_health().error {
            None => Ok(()),
            Some(e) => Err(format!("datastore: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        node_attestation("join_token", true);
        let text = sigil_telemetry::encode(&METRICS.registry);
        for name in [
            "sigil_server_x509_svids_signed_total",
            "sigil_server_jwt_svids_signed_total",
            "sigil_server_mint_batch_duration_seconds_bucket",
            "sigil_server_sync_sent_bytes_total",
            "sigil_server_sync_streams",
            "sigil_server_datastore_errors_total",
            "sigil_server_audit_issuance_commits_total",
            "sigil_server_audit_issuance_records_total",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(
            text.contains(
                "sigil_server_node_attestations_total{type=\"join_token\",result=\"ok\"}"
            ),
            "{text}"
        );
    }
}
