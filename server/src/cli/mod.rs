//! Operator subcommands of `sigil-server`: gRPC calls to the admin socket
//! and their output, human-readable by default and `--output json` for
//! tools. One module per resource; every table and JSON shape is built in
//! [`render`], and every failure is a [`CliError`].
//!
//! - [`health`] — `healthcheck`
//! - [`token`] — `token generate`
//! - [`entry`] — `entry create|list|show|update|delete|review`
//! - [`agent`] — `agent list|show|evict|ban|review`
//! - [`bundle`] — `bundle show|set|list|delete`
//! - [`kill`] — `kill`, `kill list`, `kill lift`
//! - [`audit`] — `audit export|verify|key|query`
//! - [`governance`] — access reviews and `approval list|grant|deny`
//! - [`task`] — `task list|end`
//! - [`datastore`] — `datastore migrate`

pub mod agent;
pub mod audit;
pub mod bundle;
pub mod datastore;
pub mod entry;
mod entry_file;
mod error;
pub mod governance;
pub mod health;
pub mod kill;
pub mod render;
pub mod task;
pub mod token;

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use sigil_proto::admin::admin_api_client::AdminApiClient;
use tonic::transport::{Channel, Endpoint};

pub use error::CliError;

use crate::config::DEFAULT_ADMIN_SOCKET;

/// Every operator subcommand (everything but `run`).
#[derive(Subcommand)]
pub enum Command {
    /// Check that the server answers on its admin socket.
    Healthcheck(health::HealthArgs),
    /// Join tokens for node attestation.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Registration entries.
    #[command(subcommand)]
    Entry(Box<entry::EntryCmd>),
    /// Attested agents.
    #[command(subcommand)]
    Agent(agent::AgentCmd),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(bundle::BundleCmd),
    /// Kill switch: withdraw identities everywhere until lifted.
    Kill(Box<kill::KillCmd>),
    /// The tamper-evident audit trail.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Datastore maintenance: migrate redb to PostgreSQL.
    #[command(subcommand)]
    Datastore(datastore::DatastoreCmd),
    /// The approval gate: requests from entries created with
    /// `--require-approval`.
    #[command(subcommand)]
    Approval(governance::ApprovalCmd),
    /// Task-scoped identities: list, end.
    #[command(subcommand)]
    Task(task::TaskCmd),
}

/// Runs one operator subcommand.
pub async fn run(cmd: Command) -> Result<(), CliError> {
    match cmd {
        Command::Healthcheck(a) => health::healthcheck(a).await,
        Command::Token(c) => token::token(c).await,
        Command::Entry(c) => entry::entry(*c).await,
        Command::Agent(c) => agent::agent(c).await,
        Command::Bundle(c) => bundle::bundle(c).await,
        Command::Kill(c) => kill::kill(*c).await,
        Command::Audit(c) => audit::audit(c).await,
        Command::Datastore(c) => datastore::datastore(c).await,
        Command::Approval(c) => governance::approval(c).await,
        Command::Task(c) => task::task(c).await,
    }
}

/// Where the server's admin socket is.
#[derive(Args, Clone)]
pub struct AdminArgs {
    /// Path to the server's admin socket.
    #[arg(long, env = "SIGIL_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET, global = true)]
    admin_socket: PathBuf,
}

/// Output format of a subcommand.
#[derive(Copy, Clone, ValueEnum, Default, PartialEq, Eq)]
pub enum Output {
    /// Aligned `Key : value` lines for people.
    #[default]
    Pretty,
    /// JSON for tools.
    Json,
}

/// The `--output` flag.
#[derive(Args, Clone)]
pub struct OutputArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Pretty)]
    pub(crate) output: Output,
}

/// Connects to the admin socket; fails fast, naming the path, when there
/// is no server behind it.
pub(crate) async fn connect(a: &AdminArgs) -> Result<AdminApiClient<Channel>, CliError> {
    Ok(AdminApiClient::new(admin_channel(a).await?))
}

/// A channel to the admin socket (every admin-socket service: the admin
/// API, the task service).
pub(crate) async fn admin_channel(a: &AdminArgs) -> Result<Channel, CliError> {
    let path = a.admin_socket.clone();
    if !path.exists() {
        return Err(CliError::NoSocket(path));
    }
    let ch = Endpoint::from_static("http://admin.sigil")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .map_err(|source| CliError::Connect {
            path: a.admin_socket.clone(),
            source,
        })?;
    Ok(ch)
}

/// Refuses a SPIFFE ID used only as a lookup key (too long, bad syntax)
/// before connecting, naming the flag. IDs that are stored (entries,
/// tokens) are validated by the server, whose errors name the field.
pub(crate) fn check_id(flag: &'static str, v: Option<&String>) -> Result<(), CliError> {
    match v {
        Some(s) => sigil_core::ids::parse_spiffe_id(s)
            .map(|_| ())
            .map_err(|e| CliError::flag(flag, e)),
        None => Ok(()),
    }
}

/// Parses an RFC 3339 time to unix seconds; the error says why.
pub(crate) fn parse_rfc3339(s: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}

/// An RFC 3339 time given as `flag`.
pub(crate) fn rfc3339_flag(flag: &'static str, s: &str) -> Result<i64, CliError> {
    parse_rfc3339(s).map_err(|reason| CliError::flag(flag, reason))
}
