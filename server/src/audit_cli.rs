//! `sigil-server audit`: export the tamper-evident audit trail and verify
//! it, offline from a file or live from the server.
//!
//! ```text
//! sigil-server audit export [--since SEQ] > audit.jsonl
//! sigil-server audit verify [--file audit.jsonl] [--key PUBKEY.pem ...]
//! sigil-server audit key > audit-key.pem
//! sigil-server audit query [--spiffe-id ID] [--serial HEX] [--jti J]
//!                          [--agent ID] [--since RFC3339] [--output json]
//! ```
//!
//! `query` is answered by the server from a full scan of the chain.

use std::path::PathBuf;

use clap::Subcommand;
use sigil_core::audit::{self, AuditPublicKey};
use sigil_proto::admin::ExportAuditRequest;
use sigil_proto::admin::{GetAuditKeyRequest, QueryAuditRequest};

use crate::cli::{AdminArgs, Output, OutputArgs, connect, status};

/// Audit records fetched per admin call.
const PAGE: u32 = 10_000;

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Write the audit trail as JSON lines (one record each) to stdout.
    Export {
        /// First sequence number to export.
        #[arg(long, default_value_t = 1)]
        since: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Verify the chain: every record's hash, every link, no gaps; with
    /// --key also the signed checkpoints. Exits non-zero naming the first
    /// bad sequence number. With several servers sharing one chain, give
    /// each server's key: every checkpoint must verify with one of them.
    Verify {
        /// An export to verify offline (no server needed); without it the
        /// server's whole trail is fetched and verified.
        #[arg(long)]
        file: Option<PathBuf>,
        /// An audit public key (PEM) checkpoints may be signed with; repeat
        /// for several (one per server of a cluster).
        #[arg(long)]
        key: Vec<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the audit public key (PEM), for `audit verify --key`.
    Key {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Records matching every filter given: what an agent or identity got,
    /// when, from which node, and who allowed it.
    Query {
        /// A SPIFFE ID named anywhere in the record (workload, agent or parent).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// An X.509 certificate serial number (hex).
        #[arg(long)]
        serial: Option<String>,
        /// A JWT-SVID `jti`.
        #[arg(long)]
        jti: Option<String>,
        /// An agent ID: its attestation, its SVIDs, the entries parented to it.
        #[arg(long)]
        agent: Option<String>,
        /// Only records at or after this time (RFC 3339, e.g. 2026-01-02T15:04:05Z).
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// The filters of `audit query`, checked before anything is sent.
fn query_request(
    spiffe_id: Option<String>,
    serial: Option<String>,
    jti: Option<String>,
    agent: Option<String>,
    since: Option<String>,
) -> Result<QueryAuditRequest, String> {
    let id = |field: &str, v: Option<String>| -> Result<String, String> {
        match v {
            None => Ok(String::new()),
            Some(v) => sigil_core::SpiffeId::new(&v)
                .map(|id| id.to_string())
                .map_err(|e| format!("invalid field `{field}`: {v:?}: {e}")),
        }
    };
    let serial = match serial {
        None => String::new(),
        Some(s) => crate::state::normalize_serial(&s).map_err(|e| e.to_string())?,
    };
    if jti.as_deref() == Some("") {
        return Err("invalid field `jti`: must not be empty".into());
    }
    let since_time = match since {
        None => 0,
        Some(s) => time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
            .map_err(|e| format!("invalid field `since`: {s:?} is not an RFC 3339 time: {e}"))?
            .unix_timestamp()
            .max(1),
    };
    Ok(QueryAuditRequest {
        spiffe_id: id("spiffe-id", spiffe_id)?,
        serial,
        jti: jti.unwrap_or_default(),
        agent_id: id("agent", agent)?,
        since_time,
        limit: PAGE,
    })
}

/// One record as a line for people: seq, time, kind, caller, then the event.
fn pretty(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let mut ev = v["event"].clone();
    let kind = ev["kind"].as_str().unwrap_or("?").to_string();
    if let Some(m) = ev.as_object_mut() {
        m.remove("kind");
        m.remove("entry");
    }
    let caller = match v["caller"]["kind"].as_str() {
        Some("admin") => format!("admin(uid {})", v["caller"]["uid"]),
        Some("agent") => format!(
            "agent({})",
            v["caller"]["spiffe_id"].as_str().unwrap_or("?")
        ),
        Some("node") => format!("node({})", v["caller"]["peer"].as_str().unwrap_or("?")),
        Some("server") => format!("server({})", v["caller"]["task"].as_str().unwrap_or("?")),
        _ => v["caller"].to_string(),
    };
    format!(
        "{:>6}  {}  {:<24} {:<28} {}",
        v["seq"].as_u64().unwrap_or(0),
        v["at"].as_str().unwrap_or("?"),
        kind,
        caller,
        ev
    )
}

/// The whole trail from `since`, as JSON lines.
async fn fetch(admin: &AdminArgs, since: u64) -> Result<String, String> {
    let mut client = connect(admin).await?;
    let mut out = String::new();
    let mut next = since;
    loop {
        let lines = client
            .export_audit(ExportAuditRequest {
                since: next,
                limit: PAGE,
            })
            .await
            .map_err(status)?
            .into_inner()
            .lines;
        let n = lines.len();
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
        if n < PAGE as usize {
            return Ok(out);
        }
        next += n as u64;
    }
}

/// Runs `sigil-server audit ...`.
pub async fn audit(cmd: AuditCmd) -> Result<(), String> {
    match cmd {
        AuditCmd::Export { since, admin } => {
            print!("{}", fetch(&admin, since).await?);
            Ok(())
        }
        AuditCmd::Verify { file, key, admin } => {
            let text = match &file {
                Some(f) => std::fs::read(f)
                    .map_err(|e| format!("invalid field `file`: {}: {e}", f.display()))?,
                None => fetch(&admin, 1).await?.into_bytes(),
            };
            let keys = key
                .iter()
                .map(|k| {
                    let pem = std::fs::read_to_string(k)
                        .map_err(|e| format!("invalid field `key`: {}: {e}", k.display()))?;
                    AuditPublicKey::from_pem(&pem)
                        .map_err(|e| format!("invalid field `key`: {}: {e}", k.display()))
                })
                .collect::<Result<Vec<_>, String>>()?;
            let s = audit::verify_jsonl_keys(&text, &keys)
                .map_err(|e| format!("audit chain verification failed: {e}"))?;
            println!(
                "OK: {} records, seq {} to {}, head {}",
                s.records, s.first_seq, s.last_seq, s.head.hash
            );
            match &s.authenticity {
                audit::Authenticity::SignedThrough {
                    seq,
                    signatures,
                    key_id,
                } => println!(
                    "signed: {signatures} checkpoint signatures verified with audit key{} {key_id}, through seq {seq}; {} records after it are unsigned",
                    if key_id.contains(", ") { "s" } else { "" },
                    s.unauthenticated_tail()
                ),
                _ => println!("checkpoint signatures not checked (no --key)"),
            }
            Ok(())
        }
        AuditCmd::Key { admin } => {
            let k = connect(&admin)
                .await?
                .get_audit_key(GetAuditKeyRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print!("{}", k.public_key_pem);
            Ok(())
        }
        AuditCmd::Query {
            spiffe_id,
            serial,
            jti,
            agent,
            since,
            out,
            admin,
        } => {
            let req = query_request(spiffe_id, serial, jti, agent, since)?;
            let r = connect(&admin)
                .await?
                .query_audit(req)
                .await
                .map_err(status)?
                .into_inner();
            for l in &r.lines {
                match out.output {
                    Output::Json => println!("{l}"),
                    Output::Pretty => println!("{}", pretty(l)),
                }
            }
            if r.truncated {
                eprintln!(
                    "note: more than {} records matched; narrow the query (e.g. --since)",
                    r.lines.len()
                );
            }
            Ok(())
        }
    }
}
