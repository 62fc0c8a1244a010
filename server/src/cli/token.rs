//! `sigil-server token generate [--spiffe-id ID] [--ttl 600s]`.

use clap::Subcommand;
use serde_json::json;
use sigil_core::duration::parse_field;
use sigil_core::rfc3339;
use sigil_proto::admin::GenerateTokenRequest;

use super::{AdminArgs, CliError, Output, OutputArgs, connect, render};

/// Longest join token lifetime (the server enforces the same).
const MAX_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// `sigil-server token ...`.
#[derive(Subcommand)]
pub enum TokenCmd {
    /// Generate a single-use join token.
    Generate {
        #[command(flatten)]
        admin: AdminArgs,
        /// SPIFFE ID the attested agent will get.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Token lifetime (at most 7d).
        #[arg(long, default_value = "600s", allow_hyphen_values = true)]
        ttl: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Runs `sigil-server token ...`.
pub async fn token(cmd: TokenCmd) -> Result<(), CliError> {
    let TokenCmd::Generate {
        admin,
        spiffe_id,
        ttl,
        out,
    } = cmd;
    let ttl = parse_field("--ttl", &ttl, MAX_TOKEN_TTL)?;
    let r = connect(&admin)
        .await?
        .generate_token(GenerateTokenRequest {
            spiffe_id: spiffe_id.unwrap_or_default(),
            ttl_seconds: i64::try_from(ttl.as_secs())
                .map_err(|_| CliError::flag("--ttl", "out of range"))?,
        })
        .await?
        .into_inner();
    if out.output == Output::Json {
        return render::print_json(
            &json!({"value": r.token, "spiffe_id": r.spiffe_id, "expires_at": rfc3339(r.expires_at)}),
        );
    }
    println!("Token: {}", r.token);
    Ok(())
}
