//! `sigil-agent api debug selectors --pid N [--output json]`: what a
//! process attests to (every enabled attestor, exactly as the Workload API
//! would attest it) and which of the agent's entries it matches. Served on
//! the agent admin socket (root or the agent's uid only), for operators
//! writing entries.

use std::path::PathBuf;

use clap::Args;
use sigil_attestors::workload::AttestorSet;
use sigil_attestors::workload::unix::Peer;
use sigil_proto::admin::agent_admin_api_client::AgentAdminApiClient;
use sigil_proto::admin::{
    DebugEntry, DebugSelectorsRequest, DebugSelectorsResponse, FailedAttestor,
};
use tonic::Status;

use crate::cache::Snapshot;
use crate::config::DEFAULT_ADMIN_SOCKET;

/// Flags of `api debug selectors`.
#[derive(Args, Clone)]
pub struct DebugSelectorsArgs {
    /// The process to attest.
    #[arg(long)]
    pid: i32,
    /// Agent admin socket.
    #[arg(long, env = "SIGIL_AGENT_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
    /// `json` for machine-readable output.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

/// The admin-socket side: attests `pid` with every enabled attestor.
pub async fn answer(
    attestors: &AttestorSet,
    snap: &Snapshot,
    pid: i32,
) -> Result<DebugSelectorsResponse, Status> {
    let peer = Peer::from_pid(pid)
        .map_err(|e| Status::invalid_argument(format!("invalid field `pid`: {e}")))?;
    let attested = attestors
        .attest(std::sync::Arc::new(peer))
        .await
        .map_err(|e| Status::failed_precondition(format!("pid {pid}: {e}")))?;
    let entries = snap
        .entitled(&attested.selectors)
        .into_iter()
        .map(|e| DebugEntry {
            id: e.id.clone(),
            spiffe_id: e.spiffe_id.to_string(),
            selectors: e.selectors.iter().map(ToString::to_string).collect(),
        })
        .collect();
    Ok(DebugSelectorsResponse {
        pid,
        selectors: attested.selectors.iter().map(ToString::to_string).collect(),
        attestors: attestors.kinds().into_iter().map(String::from).collect(),
        failed: attested
            .failed
            .iter()
            .map(|(k, e)| FailedAttestor {
                kind: (*k).to_string(),
                error: e.to_string(),
            })
            .collect(),
        entries,
    })
}

/// The CLI side.
pub async fn run(args: DebugSelectorsArgs) -> Result<(), String> {
    let path = args
        .admin_socket
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
    let channel = sigil_proto::unix::channel(&path).await?;
    let r = AgentAdminApiClient::new(channel)
        .debug_selectors(DebugSelectorsRequest { pid: args.pid })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    if args.output == "json" {
        let v = serde_json::json!({
            "pid": r.pid,
            "attestors": r.attestors,
            "selectors": r.selectors,
            "failed": r.failed.iter().map(|f| serde_json::json!({"attestor": f.kind, "error": f.error})).collect::<Vec<_>>(),
            "entries": r.entries.iter().map(|e| serde_json::json!({"id": e.id, "spiffe_id": e.spiffe_id, "selectors": e.selectors})).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!("PID        : {}", r.pid);
    println!("Attestors  : {}", r.attestors.join(", "));
    for s in &r.selectors {
        println!("Selector   : {s}");
    }
    for f in &r.failed {
        println!("Failed     : {} ({})", f.kind, f.error);
    }
    if r.entries.is_empty() {
        println!("Entries    : none match");
    }
    for e in &r.entries {
        println!("Entry      : {} {}", e.id, e.spiffe_id);
    }
    Ok(())
}
