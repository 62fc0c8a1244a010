//! `sigil-server healthcheck [--verbose] [--output json]`: exits non-zero
//! when the server does not answer or cannot reach its datastore.

use clap::Args;
use sigil_proto::admin::HealthRequest;

use super::{AdminArgs, CliError, Output, OutputArgs, connect, render};

/// Flags of `healthcheck`.
#[derive(Args)]
pub struct HealthArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Also print entry/agent counts and the signing queue.
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    out: OutputArgs,
}

/// Runs `sigil-server healthcheck`.
pub async fn healthcheck(a: HealthArgs) -> Result<(), CliError> {
    let h = connect(&a.admin)
        .await?
        .health(HealthRequest {})
        .await?
        .into_inner();
    // Up but unable to reach its datastore: reported, and a failure.
    let ds = h.datastore.clone().unwrap_or_default();
    let unhealthy = (!ds.reachable).then(|| CliError::Unhealthy {
        target: ds.target.clone(),
        reason: ds.error.clone(),
    });
    if a.out.output == Output::Json {
        render::print_json(&render::health_json(&h))?;
        return unhealthy.map_or(Ok(()), Err);
    }
    match &unhealthy {
        None => println!("Server is healthy."),
        Some(_) => println!("Server is up, but its datastore is unreachable."),
    }
    if a.verbose {
        render::print_health(&h);
    }
    unhealthy.map_or(Ok(()), Err)
}
