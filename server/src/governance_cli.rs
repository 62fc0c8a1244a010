//! Governance subcommands: the access review (`entry review`, `agent
//! review`) and the approval gate (`sigil-server approval list|grant|deny`).
//!
//! `--output json` prints one JSON array of flat objects, one per row, with
//! RFC 3339 timestamps (`null` when there is none) and `reasons` as stable
//! snake_case codes: the shape an identity-governance tool ingests.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use sigil_core::duration::parse_field;
use sigil_core::rfc3339;
use sigil_proto::admin::{
    Approval, ApprovalId, GrantApprovalRequest, ListApprovalsRequest, ReviewRequest,
};

use crate::cli::{AdminArgs, Output, OutputArgs, connect, print_json, status};

/// Longest review period accepted.
const MAX_PERIOD: Duration = Duration::from_secs(3650 * 86_400);

#[derive(Args, Clone)]
pub struct ReviewArgs {
    /// Flag entries that issued no SVID for this long.
    #[arg(long, default_value = "30d")]
    unused_for: String,
    /// Flag entries that expire within this long.
    #[arg(long, default_value = "7d")]
    expiring_within: String,
}

#[derive(Subcommand)]
pub enum ApprovalCmd {
    /// List approval requests (newest first): pending, granted, denied,
    /// expired.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Grant a request: its agent may obtain the entry's SVIDs until the
    /// grant ends.
    Grant {
        #[command(flatten)]
        admin: AdminArgs,
        /// The request ID (from `approval list` or the workload's error).
        id: String,
        /// How long the grant lasts (e.g. 8h; at most 30d).
        #[arg(long = "for")]
        duration: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Deny a pending request, or end a grant in force at once.
    Deny {
        #[command(flatten)]
        admin: AdminArgs,
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

fn period(flag: &str, v: &str) -> Result<i64, String> {
    let d = parse_field(flag, v, MAX_PERIOD).map_err(|e| e.to_string())?;
    i64::try_from(d.as_secs()).map_err(|_| format!("{flag}: out of range"))
}

fn time_or_null(t: i64) -> Value {
    if t == 0 {
        Value::Null
    } else {
        json!(rfc3339(t))
    }
}

fn or_dash(t: i64) -> String {
    if t == 0 { "-".into() } else { rfc3339(t) }
}

pub async fn entry_review(a: &AdminArgs, r: &ReviewArgs, out: &OutputArgs) -> Result<(), String> {
    let req = ReviewRequest {
        unused_for: period("--unused-for", &r.unused_for)?,
        expiring_within: period("--expiring-within", &r.expiring_within)?,
    };
    let rows = connect(a)
        .await?
        .review_entries(req)
        .await
        .map_err(status)?
        .into_inner()
        .rows;
    if out.output == Output::Json {
        let v: Vec<Value> = rows
            .iter()
            .map(|row| {
                let e = row.entry.clone().unwrap_or_default();
                json!({
                    "id": e.id,
                    "spiffe_id": e.spiffe_id,
                    "parent_id": e.parent_id,
                    "owner": e.owner,
                    "description": e.description,
                    "reasons": row.reasons,
                    "last_used_at": time_or_null(row.last_used_at),
                    "expires_at": time_or_null(e.expires_at),
                    "created_at": time_or_null(e.created_at),
                    "x509_svid_ttl": e.x509_svid_ttl,
                    "jwt_svid_ttl": e.jwt_svid_ttl,
                    "require_approval": e.require_approval,
                })
            })
            .collect();
        return print_json(&Value::Array(v));
    }
    println!(
        "{} entr{} to review\n",
        rows.len(),
        if rows.len() == 1 { "y" } else { "ies" }
    );
    for row in &rows {
        let e = row.entry.clone().unwrap_or_default();
        println!("Entry ID         : {}", e.id);
        println!("SPIFFE ID        : {}", e.spiffe_id);
        println!("Parent ID        : {}", e.parent_id);
        println!(
            "Owner            : {}",
            if e.owner.is_empty() { "-" } else { &e.owner }
        );
        println!("Last used        : {}", or_dash(row.last_used_at));
        println!("Expires at       : {}", or_dash(e.expires_at));
        println!("Reasons          : {}", row.reasons.join(", "));
        println!();
    }
    Ok(())
}

pub async fn agent_review(a: &AdminArgs, unused_for: &str, out: &OutputArgs) -> Result<(), String> {
    let req = ReviewRequest {
        unused_for: period("--unused-for", unused_for)?,
        expiring_within: 0,
    };
    let rows = connect(a)
        .await?
        .review_agents(req)
        .await
        .map_err(status)?
        .into_inner()
        .rows;
    if out.output == Output::Json {
        let v: Vec<Value> = rows
            .iter()
            .map(|row| {
                let ag = row.agent.clone().unwrap_or_default();
                json!({
                    "id": ag.spiffe_id,
                    "spiffe_id": ag.spiffe_id,
                    "attestation_type": ag.attestation_type,
                    "reasons": row.reasons,
                    "last_seen_at": time_or_null(row.last_seen_at),
                    "last_attested_at": time_or_null(ag.last_attested_at),
                    "created_at": time_or_null(ag.created_at),
                    "banned": ag.banned,
                })
            })
            .collect();
        return print_json(&Value::Array(v));
    }
    println!(
        "{} agent{} to review\n",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    for row in &rows {
        let ag = row.agent.clone().unwrap_or_default();
        println!("SPIFFE ID         : {}", ag.spiffe_id);
        println!("Attestation type  : {}", ag.attestation_type);
        println!("Last seen         : {}", or_dash(row.last_seen_at));
        println!("Reasons           : {}", row.reasons.join(", "));
        println!();
    }
    Ok(())
}

fn approval_json(a: &Approval) -> Value {
    json!({
        "id": a.id,
        "entry_id": a.entry_id,
        "spiffe_id": a.spiffe_id,
        "agent_id": a.agent_id,
        "status": a.status,
        "requested_at": time_or_null(a.requested_at),
        "decided_at": time_or_null(a.decided_at),
        "decided_by": a.decided_by,
        "expires_at": time_or_null(a.expires_at),
    })
}

fn print_approval(a: &Approval) {
    println!("Request ID       : {}", a.id);
    println!("Status           : {}", a.status);
    println!("Entry ID         : {}", a.entry_id);
    println!("SPIFFE ID        : {}", a.spiffe_id);
    println!("Agent            : {}", a.agent_id);
    println!("Requested at     : {}", rfc3339(a.requested_at));
    if a.decided_at != 0 {
        println!("Decided at       : {}", rfc3339(a.decided_at));
        println!("Decided by       : {}", a.decided_by);
    }
    if a.expires_at != 0 {
        println!("Grant ends       : {}", rfc3339(a.expires_at));
    }
    println!();
}

pub async fn approval(cmd: ApprovalCmd) -> Result<(), String> {
    match cmd {
        ApprovalCmd::List { admin, out } => {
            let v = connect(&admin)
                .await?
                .list_approvals(ListApprovalsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .approvals;
            if out.output == Output::Json {
                return print_json(&Value::Array(v.iter().map(approval_json).collect()));
            }
            println!(
                "Found {} approval request{}\n",
                v.len(),
                if v.len() == 1 { "" } else { "s" }
            );
            v.iter().for_each(print_approval);
        }
        ApprovalCmd::Grant {
            admin,
            id,
            duration,
            out,
        } => {
            let d = parse_field("--for", &duration, crate::state::MAX_GRANT)
                .map_err(|e| e.to_string())?;
            let a = connect(&admin)
                .await?
                .grant_approval(GrantApprovalRequest {
                    id,
                    duration: i64::try_from(d.as_secs()).map_err(|_| "--for: out of range")?,
                })
                .await
                .map_err(status)?
                .into_inner();
            if out.output == Output::Json {
                return print_json(&approval_json(&a));
            }
            println!("Request granted.\n");
            print_approval(&a);
        }
        ApprovalCmd::Deny { admin, id, out } => {
            let a = connect(&admin)
                .await?
                .deny_approval(ApprovalId { id })
                .await
                .map_err(status)?
                .into_inner();
            if out.output == Output::Json {
                return print_json(&approval_json(&a));
            }
            println!("Request denied.\n");
            print_approval(&a);
        }
    }
    Ok(())
}
