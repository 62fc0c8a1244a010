//! `sigil-server kill`: create, list and lift kills over the admin socket.
//!
//! ```text
//! sigil-server kill --spiffe-id ID|--entry ID|--agent ID|--selector T:K:V --reason TEXT
//! sigil-server kill list [--output json]
//! sigil-server kill lift KILL_ID
//! ```

use clap::{ArgGroup, Args, Subcommand};
use sigil_proto::admin::kill_target::Target;
use sigil_proto::admin::{CreateKillRequest, KillId, KillTarget, ListKillsRequest};

use super::render::{self, kill_json, print_kill};
use super::{AdminArgs, CliError, OutputArgs, connect};

/// Withdraw identities everywhere, at once, until lifted.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
#[command(group(ArgGroup::new("target").args(["spiffe_id", "entry", "agent", "selector"]).multiple(false)))]
pub struct KillCmd {
    #[command(subcommand)]
    sub: Option<KillSub>,
    /// Every workload identity with this SPIFFE ID, on every agent.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// One entry, by ID.
    #[arg(long)]
    entry: Option<String>,
    /// A whole node: the agent and every identity it serves.
    #[arg(long)]
    agent: Option<String>,
    /// Every entry that has this selector (type:key:value).
    #[arg(long)]
    selector: Option<String>,
    /// Why (required; recorded with the kill).
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
    #[command(flatten)]
    out: OutputArgs,
}

/// `kill list` and `kill lift`.
#[derive(Subcommand)]
enum KillSub {
    /// Kills in force.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Lift a kill: what it withdrew may be issued again.
    Lift {
        /// The kill's ID.
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Runs `sigil-server kill ...`.
pub async fn kill(cmd: KillCmd) -> Result<(), CliError> {
    match cmd.sub {
        Some(KillSub::List { admin, out }) => {
            let r = connect(&admin)
                .await?
                .list_kills(ListKillsRequest {})
                .await?
                .into_inner();
            render::many(
                &out,
                "kills",
                &r.kills,
                |n| format!("Found {}", render::count(n, "kill", "kills")),
                kill_json,
                print_kill,
            )
        }
        Some(KillSub::Lift { id, admin, out }) => {
            let k = connect(&admin)
                .await?
                .lift_kill(KillId { id })
                .await?
                .into_inner();
            render::one(&out, &k, "Kill lifted.", kill_json, print_kill)
        }
        None => {
            let target = match (cmd.spiffe_id, cmd.entry, cmd.agent, cmd.selector) {
                (Some(v), None, None, None) => Target::SpiffeId(v),
                (None, Some(v), None, None) => Target::EntryId(v),
                (None, None, Some(v), None) => Target::AgentId(v),
                (None, None, None, Some(v)) => Target::Selector(v),
                _ => {
                    return Err(CliError::field(
                        "target",
                        "give exactly one of --spiffe-id, --entry, --agent, --selector",
                    ));
                }
            };
            let reason = cmd
                .reason
                .filter(|r| !r.trim().is_empty())
                .ok_or(CliError::field("reason", "--reason is required (say why)"))?;
            let k = connect(&cmd.admin)
                .await?
                .create_kill(CreateKillRequest {
                    target: Some(KillTarget {
                        target: Some(target),
                    }),
                    reason,
                })
                .await?
                .into_inner();
            render::one(&cmd.out, &k, "Kill created.", kill_json, print_kill)
        }
    }
}
