//! `sigil-server agent list|show|evict|ban|review`: attested agents.

use clap::Subcommand;
use sigil_proto::admin::{AgentId, ListAgentsRequest};

use super::render::{self, agent_json, print_agent};
use super::{AdminArgs, CliError, OutputArgs, check_id, connect};

/// `sigil-server agent ...`.
#[derive(Subcommand)]
pub enum AgentCmd {
    /// List attested agents.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Show one agent.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        spiffe_id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Evict an agent: it must attest again.
    Evict {
        #[command(flatten)]
        admin: AdminArgs,
        spiffe_id: String,
    },
    /// Ban an agent: it may not renew, sync or re-attest.
    Ban {
        #[command(flatten)]
        admin: AdminArgs,
        spiffe_id: String,
    },
    /// Access review: agents that need attention, each with its reasons.
    Review {
        #[command(flatten)]
        admin: AdminArgs,
        /// Flag agents not seen for this long.
        #[arg(long, alias = "not-seen-for", default_value = "30d")]
        unused_for: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Runs `sigil-server agent ...`.
pub async fn agent(cmd: AgentCmd) -> Result<(), CliError> {
    if let AgentCmd::Show { spiffe_id, .. }
    | AgentCmd::Evict { spiffe_id, .. }
    | AgentCmd::Ban { spiffe_id, .. } = &cmd
    {
        check_id("SPIFFE_ID", Some(spiffe_id))?;
    }
    match cmd {
        AgentCmd::Review {
            admin,
            unused_for,
            out,
        } => super::governance::agent_review(&admin, &unused_for, &out).await,
        AgentCmd::List { admin, out } => {
            let r = connect(&admin)
                .await?
                .list_agents(ListAgentsRequest {})
                .await?
                .into_inner();
            render::many(
                &out,
                "agents",
                &r.agents,
                |n| {
                    format!(
                        "Found {}:",
                        render::count(n, "attested agent", "attested agents")
                    )
                },
                agent_json,
                print_agent,
            )
        }
        AgentCmd::Show {
            admin,
            spiffe_id,
            out,
        } => {
            let a = connect(&admin)
                .await?
                .get_agent(AgentId { spiffe_id })
                .await?
                .into_inner();
            render::one(&out, &a, "", agent_json, print_agent)
        }
        AgentCmd::Evict { admin, spiffe_id } => {
            connect(&admin)
                .await?
                .evict_agent(AgentId { spiffe_id })
                .await?;
            println!("Agent evicted successfully");
            Ok(())
        }
        AgentCmd::Ban { admin, spiffe_id } => {
            connect(&admin)
                .await?
                .ban_agent(AgentId { spiffe_id })
                .await?;
            println!("Agent banned successfully");
            Ok(())
        }
    }
}
