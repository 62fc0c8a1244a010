//! sigil-server: the Sigil CA and registration server, and the operator CLI
//! that drives it over its admin socket (modelled on spire-server).

use sigil_server::{cli, config, run};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sigil-server",
    version,
    about = "Sigil SPIFFE server and operator CLI"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Run {
        /// Path to server.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check that the server answers on its admin socket.
    Healthcheck {
        #[command(flatten)]
        admin: cli::AdminArgs,
        /// Also print entry/agent counts and the signing queue.
        #[arg(long)]
        verbose: bool,
        #[command(flatten)]
        out: cli::OutputArgs,
    },
    /// Join tokens for node attestation.
    #[command(subcommand)]
    Token(cli::TokenCmd),
    /// Registration entries.
    #[command(subcommand)]
    Entry(Box<cli::EntryCmd>),
    /// Attested agents.
    #[command(subcommand)]
    Agent(cli::AgentCmd),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(cli::BundleCmd),
    /// Kill switch: withdraw identities everywhere until lifted.
    Kill(Box<sigil_server::kill_cli::KillCmd>),
    /// The tamper-evident audit trail.
    #[command(subcommand)]
    Audit(sigil_server::audit_cli::AuditCmd),
    /// Datastore maintenance: migrate redb to PostgreSQL.
    #[command(subcommand)]
    Datastore(sigil_server::datastore_cli::DatastoreCmd),
    #[command(subcommand)]
    Approval(sigil_server::governance_cli::ApprovalCmd),
    /// Task-scoped identities: list, end.
    #[command(subcommand)]
    Task(sigil_server::task_cli::TaskCmd),
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIGIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
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
            Cmd::Run { config } => {
                let cfg = config::ServerConfig::load(&config).map_err(|e| e.to_string())?;
                init_tracing(&cfg.log_level);
                run::run(cfg).await
            }
            Cmd::Healthcheck {
                admin,
                verbose,
                out,
            } => cli::healthcheck(&admin, verbose, &out).await,
            Cmd::Token(c) => cli::token(c).await,
            Cmd::Entry(c) => cli::entry(*c).await,
            Cmd::Agent(c) => cli::agent(c).await,
            Cmd::Bundle(c) => cli::bundle(c).await,
            Cmd::Kill(c) => sigil_server::kill_cli::kill(*c).await,
            Cmd::Audit(c) => sigil_server::audit_cli::audit(c).await,
            Cmd::Datastore(c) => sigil_server::datastore_cli::datastore(c).await,
            Cmd::Approval(c) => sigil_server::governance_cli::approval(c).await,
            Cmd::Task(c) => sigil_server::task_cli::task(c).await,
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
