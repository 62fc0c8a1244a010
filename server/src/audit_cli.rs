//! `sigil-server audit`: export the tamper-evident audit trail and verify
//! it, offline from a file or live from the server.
//!
//! ```text
//! sigil-server audit export [--since SEQ] > audit.jsonl
//! sigil-server audit verify [--file audit.jsonl] [--key PUBKEY.pem]
//! ```

use std::path::PathBuf;

use clap::Subcommand;
use sigil_core::audit::{self, AuditPublicKey};
use sigil_proto::admin::ExportAuditRequest;

use crate::cli::{AdminArgs, connect, status};

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
    /// bad sequence number.
    Verify {
        /// An export to verify offline (no server needed); without it the
        /// server's whole trail is fetched and verified.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The audit public key (PEM) checkpoints must be signed with.
        #[arg(long)]
        key: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
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
            let key = match &key {
                Some(k) => {
                    let pem = std::fs::read_to_string(k)
                        .map_err(|e| format!("invalid field `key`: {}: {e}", k.display()))?;
                    Some(
                        AuditPublicKey::from_pem(&pem)
                            .map_err(|e| format!("invalid field `key`: {}: {e}", k.display()))?,
                    )
                }
                None => None,
            };
            let s = audit::verify_jsonl(&text, key.as_ref())
                .map_err(|e| format!("audit chain verification failed: {e}"))?;
            println!(
                "OK: {} records, seq {} to {}, head {}",
                s.records, s.first_seq, s.last_seq, s.head.hash
            );
            if key.is_none() {
                println!("checkpoint signatures not checked (no --key)");
            }
            Ok(())
        }
    }
}
