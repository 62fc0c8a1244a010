//! sigil-agent: the Sigil node agent and the workload-side CLI (modelled on
//! spire-agent).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sigil_agent::{cli, config, run};

#[derive(Parser)]
#[command(
    name = "sigil-agent",
    version,
    about = "Sigil node agent and Workload API CLI"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run {
        /// Path to agent.toml.
        #[arg(long)]
        config: PathBuf,
        /// Join token for the first node attestation. Every local user can
        /// read it in /proc/PID/cmdline: prefer --join-token-file or the
        /// SIGIL_JOIN_TOKEN environment variable.
        #[arg(long, conflicts_with = "join_token_file")]
        join_token: Option<String>,
        /// File holding the join token (owned by the agent's uid or root,
        /// mode 0600 or stricter). Without either flag the token is read from
        /// SIGIL_JOIN_TOKEN, then from the config's join_token.
        #[arg(long, value_name = "PATH")]
        join_token_file: Option<PathBuf>,
    },
    /// Check that the agent is up and synced.
    Healthcheck {
        /// Agent admin socket.
        #[arg(long, env = "SIGIL_AGENT_ADMIN_SOCKET")]
        admin_socket: Option<PathBuf>,
        /// Print details.
        #[arg(long)]
        verbose: bool,
    },
    /// Call the Workload API.
    #[command(subcommand)]
    Api(cli::ApiCmd),
    /// TPM helpers for enrolling a node.
    #[command(subcommand)]
    Tpm(cli::TpmCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Run {
                config,
                join_token,
                join_token_file,
            } => {
                let cfg = config::AgentConfig::load(&config).map_err(|e| e.to_string())?;
                let token = cli::join_token(
                    join_token,
                    join_token_file.as_deref(),
                    std::env::var_os("SIGIL_JOIN_TOKEN"),
                )?;
                let filter = tracing_subscriber::EnvFilter::try_from_env("SIGIL_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_level));
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr)
                    .try_init();
                if matches!(token, Some((_, cli::TokenSource::Flag))) {
                    tracing::warn!(
                        "--join-token is visible to every local user in /proc/PID/cmdline; prefer --join-token-file or SIGIL_JOIN_TOKEN"
                    );
                }
                run::run(cfg, token.map(|(t, _)| t)).await
            }
            Cmd::Healthcheck {
                admin_socket,
                verbose,
            } => cli::healthcheck(admin_socket, verbose).await,
            Cmd::Api(c) => cli::api(c).await,
            Cmd::Tpm(c) => cli::tpm(c).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
