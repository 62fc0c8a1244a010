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

use super::{AdminArgs, CliError, Output, OutputArgs, connect, render};

/// Audit records fetched per admin call.
const PAGE: u32 = 10_000;

/// `sigil-server audit ...`.
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
) -> Result<QueryAuditRequest, CliError> {
    let id = |field: &'static str, v: Option<String>| -> Result<String, CliError> {
        match v {
            None => Ok(String::new()),
            Some(v) => sigil_core::SpiffeId::new(&v)
                .map(|id| id.to_string())
                .map_err(|e| CliError::field(field, format!("{v:?}: {e}"))),
        }
    };
    let serial = match serial {
        None => String::new(),
        Some(s) => crate::state::normalize_serial(&s)?,
    };
    if jti.as_deref() == Some("") {
        return Err(CliError::field("jti", "must not be empty"));
    }
    let since_time = match since {
        None => 0,
        Some(s) => super::parse_rfc3339(&s)
            .map_err(|reason| CliError::field("since", reason))?
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

/// The whole trail from `since`, as JSON lines.
async fn fetch(admin: &AdminArgs, since: u64) -> Result<String, CliError> {
    let mut client = connect(admin).await?;
    let mut out = String::new();
    let mut next = since;
    loop {
        let lines = client
            .export_audit(ExportAuditRequest {
                since: next,
                limit: PAGE,
            })
            .await?
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
pub async fn audit(cmd: AuditCmd) -> Result<(), CliError> {
    match cmd {
        AuditCmd::Export { since, admin } => {
            print!("{}", fetch(&admin, since).await?);
            Ok(())
        }
        AuditCmd::Verify { file, key, admin } => {
            let text = match &file {
                Some(f) => std::fs::read(f)
                    .map_err(|e| CliError::field("file", format!("{}: {e}", f.display())))?,
                None => fetch(&admin, 1).await?.into_bytes(),
            };
            let keys = key
                .iter()
                .map(|k| {
                    let bad = |e: &dyn std::fmt::Display| {
                        CliError::field("key", format!("{}: {e}", k.display()))
                    };
                    let pem = std::fs::read_to_string(k).map_err(|e| bad(&e))?;
                    AuditPublicKey::from_pem(&pem).map_err(|e| bad(&e))
                })
                .collect::<Result<Vec<_>, CliError>>()?;
            let s = audit::verify_jsonl_keys(&text, &keys)?;
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
                .await?
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
            let r = connect(&admin).await?.query_audit(req).await?.into_inner();
            for l in &r.lines {
                match out.output {
                    Output::Json => println!("{l}"),
                    Output::Pretty => println!("{}", render::audit_line(l)),
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
