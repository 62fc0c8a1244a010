//! `sigil-server kill`: create, list and lift kills over the admin socket.
//!
//! ```text
//! sigil-server kill --spiffe-id ID|--entry ID|--agent ID|--selector T:K:V --reason TEXT
//! sigil-server kill list [--output json]
//! sigil-server kill lift KILL_ID
//! ```

use clap::{ArgGroup, Args, Subcommand};
use serde_json::{Value, json};
use sigil_core::rfc3339;
use sigil_proto::admin::kill_target::Target;
use sigil_proto::admin::{CreateKillRequest, Kill, KillId, KillTarget, ListKillsRequest};

use crate::cli::{AdminArgs, Output, OutputArgs, connect, print_json, status};

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

fn target_parts(t: &Option<KillTarget>) -> (&'static str, String) {
    match t.as_ref().and_then(|t| t.target.as_ref()) {
        Some(Target::SpiffeId(v)) => ("spiffe_id", v.clone()),
        Some(Target::EntryId(v)) => ("entry", v.clone()),
        Some(Target::AgentId(v)) => ("agent", v.clone()),
        Some(Target::Selector(v)) => ("selector", v.clone()),
        None => ("none", String::new()),
    }
}

fn kill_json(k: &Kill) -> Value {
    let (kind, value) = target_parts(&k.target);
    json!({
        "id": k.id,
        "target": { "kind": kind, "value": value },
        "reason": k.reason,
        "caller": k.caller,
        "created_at": rfc3339(k.created_at),
    })
}

fn print_kill(k: &Kill) {
    let (kind, value) = target_parts(&k.target);
    println!("Kill ID           : {}", k.id);
    println!("Target            : {kind} {value}");
    println!("Reason            : {}", k.reason);
    println!("Caller            : {}", k.caller);
    println!("Created at        : {}", rfc3339(k.created_at));
}

fn show(out: &OutputArgs, k: &Kill, headline: &str) -> Result<(), String> {
    if out.output == Output::Json {
        return print_json(&kill_json(k));
    }
    println!("{headline}\n");
    print_kill(k);
    Ok(())
}

/// Runs `sigil-server kill ...`.
pub async fn kill(cmd: KillCmd) -> Result<(), String> {
    match cmd.sub {
        Some(KillSub::List { admin, out }) => {
            let r = connect(&admin)
                .await?
                .list_kills(ListKillsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if out.output == Output::Json {
                return print_json(
                    &json!({"kills": r.kills.iter().map(kill_json).collect::<Vec<_>>()}),
                );
            }
            println!(
                "Found {} kill{}",
                r.kills.len(),
                if r.kills.len() == 1 { "" } else { "s" }
            );
            for k in &r.kills {
                println!();
                print_kill(k);
            }
            Ok(())
        }
        Some(KillSub::Lift { id, admin, out }) => {
            let k = connect(&admin)
                .await?
                .lift_kill(KillId { id })
                .await
                .map_err(status)?
                .into_inner();
            show(&out, &k, "Kill lifted.")
        }
        None => {
            let target = match (cmd.spiffe_id, cmd.entry, cmd.agent, cmd.selector) {
                (Some(v), None, None, None) => Target::SpiffeId(v),
                (None, Some(v), None, None) => Target::EntryId(v),
                (None, None, Some(v), None) => Target::AgentId(v),
                (None, None, None, Some(v)) => Target::Selector(v),
                _ => {
                    return Err(
                        "invalid field `target`: give exactly one of --spiffe-id, --entry, --agent, --selector"
                            .into(),
                    );
                }
            };
            let reason = cmd
                .reason
                .filter(|r| !r.trim().is_empty())
                .ok_or("invalid field `reason`: --reason is required (say why)")?;
            let k = connect(&cmd.admin)
                .await?
                .create_kill(CreateKillRequest {
                    target: Some(KillTarget {
                        target: Some(target),
                    }),
                    reason,
                })
                .await
                .map_err(status)?
                .into_inner();
            show(&cmd.out, &k, "Kill created.")
        }
    }
}
