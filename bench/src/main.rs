//! sigil-bench: the benchmark harness of Sigil.
//!
//! `sigil-bench <scenario> [--json] [--quick]` starts the real `sigil-server`
//! and `sigil-agent` binaries (found next to this executable, so build them
//! first with `cargo build [--release] --workspace --bins`), drives them over
//! their public sockets, and prints a table of figures; with `--json` it
//! prints one JSON object per line on stdout (the table then goes to
//! stderr). `--quick` shrinks every scenario so that CI can prove the
//! harness still works; its figures mean nothing.
//!
//! - [`scenarios`] — one module per scenario of issue 5 (`sign-limit`,
//!   `mint`, `fetch`, `propagation`, `kill`, `scale`, `startup`), `task`
//!   (issue 11), `soak` (hardening: a long run, errors, RSS, descriptors),
//!   plus `all`.
//! - [`harness`] — scratch directories, server/agent processes, RSS and CPU
//!   readings from /proc, CPU pinning.
//! - [`clients`] — the gRPC clients the bench drives the binaries with:
//!   admin socket, agent admin socket, Workload API (Unix sockets) and a
//!   simulated agent speaking the agent API over mTLS.
//! - [`report`] — records, the human table, JSON lines and the markdown
//!   figures table of docs/PERFORMANCE.md; [`stats`] — percentiles.

#![allow(
    clippy::needless_update,
    reason = "proto messages are built with `..Default::default()` so that fields the \
              wire contract gains later do not break the bench"
)]

mod clients;
mod harness;
mod report;
mod scenarios;
mod stats;

use clap::{Parser, Subcommand};

use crate::report::Reporter;
use crate::scenarios::{fetch, kill, mint, propagation, scale, sign_limit, soak, startup, task};

/// Errors of the harness: any failure aborts the scenario with a message.
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;
/// Result of a harness step.
pub(crate) type Result<T> = std::result::Result<T, Error>;

#[derive(Parser)]
#[command(
    name = "sigil-bench",
    about = "Benchmarks of Sigil against the real binaries (see docs/PERFORMANCE.md)"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Print one JSON object per line on stdout; the table goes to stderr.
    #[arg(long, global = true)]
    json: bool,
    /// Reduced sizes, to prove the harness works (CI); figures are not meaningful.
    #[arg(long, global = true)]
    quick: bool,
}

#[derive(Subcommand)]
enum Scenario {
    /// Raw ECDSA P-256 signatures per second on one core (ring, as the CA uses via rcgen).
    SignLimit(sign_limit::Args),
    /// X.509-SVIDs per second signed from CSR batches (in-process and through the agent API).
    Mint(mint::Args),
    /// Workload API FetchX509SVID latency and throughput at 1, 100, 1000 clients.
    Fetch(fetch::Args),
    /// Entry create/update/delete to workload stream update, across several agents.
    Propagation(propagation::Args),
    /// Kill (by SPIFFE ID, entry, agent) to every affected workload stream's update.
    Kill(kill::Args),
    /// Server and agent memory and sync cost with many entries and agents.
    Scale(scale::Args),
    /// Agent restart (stored identity) to the first SVID served.
    Startup(startup::Args),
    /// Task start to task SVID in hand, next to a plain FetchX509SVID.
    Task(task::Args),
    /// Many workloads fetching and streaming for a long time: errors, RSS, descriptors.
    Soak(soak::Args),
    /// (inside a container, for `fetch --docker`) closed-loop fetches, JSON out.
    #[command(hide = true)]
    FetchClient(scenarios::fetch_docker::ClientArgs),
    /// (for `fetch`) the bare tonic reference server on a Unix socket.
    #[command(hide = true)]
    BareRpcServe(scenarios::bare_rpc::ServeArgs),
    /// Every scenario in turn with its default sizes (or `--quick` sizes).
    All,
    /// Renders JSON lines from `all --json` as the markdown figures table.
    Report(report::ReportArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut rep = Reporter::new(cli.json);
    let quick = cli.quick;
    let result = match cli.scenario {
        Scenario::SignLimit(a) => sign_limit::run(&a, quick, &mut rep).await,
        Scenario::Mint(a) => mint::run(&a, quick, &mut rep).await,
        Scenario::Fetch(a) => fetch::run(&a, quick, &mut rep).await,
        Scenario::Propagation(a) => propagation::run(&a, quick, &mut rep).await,
        Scenario::Kill(a) => kill::run(&a, quick, &mut rep).await,
        Scenario::Scale(a) => scale::run(&a, quick, &mut rep).await,
        Scenario::Startup(a) => startup::run(&a, quick, &mut rep).await,
        Scenario::Task(a) => task::run(&a, quick, &mut rep).await,
        Scenario::Soak(a) => soak::run(&a, quick, &mut rep).await,
        Scenario::FetchClient(a) => scenarios::fetch_docker::client(&a).await,
        Scenario::BareRpcServe(a) => scenarios::bare_rpc::serve(&a).await,
        Scenario::All => scenarios::all(quick, &mut rep).await,
        Scenario::Report(a) => report::render(&a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sigil-bench: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
