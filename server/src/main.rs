//! sigil-server: the Sigil CA and registration server, and the operator CLI
//! that drives it over its admin socket (modelled on spire-server).

use sigil_server::{cli, config, limits, run};

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
    #[command(flatten)]
    Admin(cli::Command),
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

/// A multi-threaded runtime whose blocking pool holds at most
/// `blocking_threads` threads (see `limits::blocking_threads`).
fn runtime(blocking_threads: usize) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(blocking_threads)
        .thread_keep_alive(limits::BLOCKING_KEEP_ALIVE)
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))
}

/// glibc malloc arenas the server runs with unless `MALLOC_ARENA_MAX` is
/// already set. glibc's default is 8 per core, and a new arena is made
/// whenever two threads contend for one; each keeps the memory freed into
/// it. In `sigil-bench soak` new arenas kept appearing for the whole run and
/// the server's anonymous memory grew with them, while heaptrack showed a
/// live heap of about 1 MiB; with two arenas it levels off once the redb
/// cache is full (figures in docs/SECURITY-TESTS.md).
const MALLOC_ARENAS: &str = "2";

/// Restarts this process image with `MALLOC_ARENA_MAX` set, when it is not.
/// glibc reads the variable only at start, and changing it in-process needs
/// `mallopt` (unsafe FFI, which this workspace forbids), so `run` execs
/// itself once: same pid, arguments and environment otherwise. If the exec
/// fails the server carries on with glibc's default, and says so.
#[cfg(target_env = "gnu")]
fn cap_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MALLOC_ARENA_MAX";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env(VAR, MALLOC_ARENAS)
        .exec();
    eprintln!("warning: cannot re-exec with {VAR}={MALLOC_ARENAS} ({err}); using glibc's default");
}

#[cfg(not(target_env = "gnu"))]
fn cap_malloc_arenas() {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Run { .. }) {
        cap_malloc_arenas();
    }
    let result = match cli.cmd {
        Cmd::Run { config } => config::ServerConfig::load(&config)
            .map_err(|e| e.to_string())
            .and_then(|cfg| {
                let rt = runtime(limits::blocking_threads(&cfg.datastore))?;
                init_tracing(&cfg.log_level);
                rt.block_on(run::run(cfg)).map_err(|e| e.to_string())
            }),
        Cmd::Admin(c) => runtime(limits::BLOCKING_THREADS)
            .and_then(|rt| rt.block_on(cli::run(c)).map_err(|e| e.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
