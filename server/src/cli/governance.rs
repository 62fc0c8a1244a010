//! Governance subcommands: the access review (`entry review`, `agent
//! review`) and the approval gate (`sigil-server approval list|grant|deny`).
//!
//! `--output json` prints one JSON array of flat objects, one per row, with
//! RFC 3339 timestamps (`null` when there is none) and `reasons` as stable
//! snake_case codes: the shape an identity-governance tool ingests.

use std::time::Duration;

use clap::{Args, Subcommand};
use sigil_core::duration::parse_field;
use sigil_proto::admin::{ApprovalId, GrantApprovalRequest, ListApprovalsRequest, ReviewRequest};

use super::render::{self, approval_json, print_approval};
use super::{AdminArgs, CliError, OutputArgs, connect};

/// Longest review period accepted.
const MAX_PERIOD: Duration = Duration::from_secs(3650 * 86_400);

/// Flags of `entry review`.
#[derive(Args, Clone)]
pub struct ReviewArgs {
    /// Flag entries that issued no SVID for this long.
    #[arg(long, default_value = "30d")]
    unused_for: String,
    /// Flag entries that expire within this long.
    #[arg(long, default_value = "7d")]
    expiring_within: String,
}

/// `sigil-server approval ...`.
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

/// A review period flag in seconds.
fn period(flag: &'static str, v: &str) -> Result<i64, CliError> {
    let d = parse_field(flag, v, MAX_PERIOD)?;
    i64::try_from(d.as_secs()).map_err(|_| CliError::flag(flag, "out of range"))
}

/// Runs `sigil-server entry review`.
pub async fn entry_review(a: &AdminArgs, r: &ReviewArgs, out: &OutputArgs) -> Result<(), CliError> {
    let req = ReviewRequest {
        unused_for: period("--unused-for", &r.unused_for)?,
        expiring_within: period("--expiring-within", &r.expiring_within)?,
    };
    let rows = connect(a)
        .await?
        .review_entries(req)
        .await?
        .into_inner()
        .rows;
    render::many(
        out,
        "",
        &rows,
        |n| format!("{} to review", render::count(n, "entry", "entries")),
        render::entry_review_json,
        render::print_entry_review,
    )
}

/// Runs `sigil-server agent review`.
pub async fn agent_review(
    a: &AdminArgs,
    unused_for: &str,
    out: &OutputArgs,
) -> Result<(), CliError> {
    let req = ReviewRequest {
        unused_for: period("--unused-for", unused_for)?,
        expiring_within: 0,
    };
    let rows = connect(a)
        .await?
        .review_agents(req)
        .await?
        .into_inner()
        .rows;
    render::many(
        out,
        "",
        &rows,
        |n| format!("{} to review", render::count(n, "agent", "agents")),
        render::agent_review_json,
        render::print_agent_review,
    )
}

/// Runs `sigil-server approval ...`.
pub async fn approval(cmd: ApprovalCmd) -> Result<(), CliError> {
    match cmd {
        ApprovalCmd::List { admin, out } => {
            let v = connect(&admin)
                .await?
                .list_approvals(ListApprovalsRequest {})
                .await?
                .into_inner()
                .approvals;
            render::many(
                &out,
                "",
                &v,
                |n| {
                    format!(
                        "Found {}",
                        render::count(n, "approval request", "approval requests")
                    )
                },
                approval_json,
                print_approval,
            )
        }
        ApprovalCmd::Grant {
            admin,
            id,
            duration,
            out,
        } => {
            let d = parse_field("--for", &duration, crate::state::MAX_GRANT)?;
            let a = connect(&admin)
                .await?
                .grant_approval(GrantApprovalRequest {
                    id,
                    duration: i64::try_from(d.as_secs())
                        .map_err(|_| CliError::flag("--for", "out of range"))?,
                })
                .await?
                .into_inner();
            render::one(&out, &a, "Request granted.", approval_json, print_approval)
        }
        ApprovalCmd::Deny { admin, id, out } => {
            let a = connect(&admin)
                .await?
                .deny_approval(ApprovalId { id })
                .await?
                .into_inner();
            render::one(&out, &a, "Request denied.", approval_json, print_approval)
        }
    }
}
