//! The scenarios of issue 5, one module each, and `all`.

pub(crate) mod bare_rpc;
pub(crate) mod fetch;
pub(crate) mod fetch_docker;
pub(crate) mod kill;
pub(crate) mod mint;
pub(crate) mod propagation;
pub(crate) mod scale;
pub(crate) mod scale_cluster;
pub(crate) mod sign_limit;
pub(crate) mod soak;
pub(crate) mod startup;
pub(crate) mod task;

use crate::Result;
use crate::harness::nproc;
use crate::report::{Record, Reporter, progress};

/// Where and on what the figures were measured.
fn meta(quick: bool) -> Record {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kb| (kb / 1024.0 / 1024.0).round())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let commit_env = std::env::var("SIGIL_BENCH_COMMIT").ok();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let profile = if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    Record::new("meta")
        .with("date", date)
        .with(
            "commit",
            match commit_env {
                Some(c) => c,
                None if dirty => format!("{commit}+dirty"),
                None => commit,
            },
        )
        .with("nproc", nproc())
        .with("cpu", cpu)
        .with("mem_gib", mem_gib)
        .with("kernel", kernel)
        .with("loadavg_at_start", loadavg)
        .with("profile", profile)
        .with("quick", quick)
        .with("command", format!("sigil-bench {}", args.join(" ")))
}

/// Runs every scenario; a failing scenario is reported and the rest still run.
pub(crate) async fn all(quick: bool, rep: &mut Reporter) -> Result<()> {
    rep.emit(meta(quick));
    rep.table("meta");
    let mut failed = Vec::new();
    macro_rules! step {
        ($name:literal, $e:expr) => {
            if let Err(e) = $e {
                progress(format!("{} failed: {e}", $name));
                failed.push($name);
            }
        };
    }
    step!(
        "sign-limit",
        sign_limit::run(&Default::default(), quick, rep).await
    );
    step!("mint", mint::run(&Default::default(), quick, rep).await);
    step!("fetch", fetch::run(&Default::default(), quick, rep).await);
    step!(
        "propagation",
        propagation::run(&Default::default(), quick, rep).await
    );
    step!("kill", kill::run(&Default::default(), quick, rep).await);
    step!("scale", scale::run(&Default::default(), quick, rep).await);
    step!(
        "startup",
        startup::run(&Default::default(), quick, rep).await
    );
    step!("task", task::run(&Default::default(), quick, rep).await);
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("scenarios failed: {}", failed.join(", ")).into())
    }
}
