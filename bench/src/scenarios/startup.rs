//! `startup`: agent start from its stored identity (attested before) to the
//! first X.509-SVID served on the Workload API.
//!
//! The agent is attested once with a join token (that first start is
//! reported too, as `attest_first_svid_ms`), then stopped with SIGTERM and
//! started again `--restarts` times without a token. The clock starts just
//! before the process is spawned and stops when a FetchX509SVID stream
//! opened by the bench (retrying the connect every millisecond until the
//! socket exists) delivers its first message. The agent keeps no workload
//! SVIDs on disk, so this includes loading the identity, the TLS
//! connection, the first sync and minting the SVIDs.

use std::time::{Duration, Instant};

use crate::Result;
use crate::clients::{admin, workload};
use crate::harness::{Agent, Bins, Scratch, Server, TD, my_uid_selector, other_uid_selector};
use crate::report::{Record, Reporter, progress};
use crate::stats::Samples;

#[derive(clap::Args, Default)]
pub(crate) struct Args {
    /// Restarts measured (default 10; 2 with --quick).
    #[arg(long)]
    restarts: Option<usize>,
    /// Entries of the agent: one for the bench, the rest for other workloads (default 1).
    #[arg(long)]
    entries: Option<usize>,
}

/// From now until the first FetchX509SVID message on `agent`'s socket.
async fn first_svid(agent: &Agent, since: Instant) -> Result<Duration> {
    let deadline = since + Duration::from_secs(30);
    loop {
        if Instant::now() > deadline {
            return Err("no SVID within 30 s of the agent's start".into());
        }
        let Ok(mut c) = workload::connect(&agent.socket).await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let mut stream = c
            .fetch_x509svid(workload::x509_request())
            .await?
            .into_inner();
        let msg = tokio::time::timeout_at(deadline.into(), stream.message())
            .await??
            .ok_or("stream ended")?;
        if msg.svids.is_empty() {
            return Err("first message without SVIDs".into());
        }
        return Ok(since.elapsed());
    }
}

pub(crate) async fn run(a: &Args, quick: bool, rep: &mut Reporter) -> Result<()> {
    let restarts = a.restarts.unwrap_or(if quick { 2 } else { 10 }).max(1);
    let n = a.entries.unwrap_or(1).max(1);
    let bins = Bins::locate()?;
    let scratch = Scratch::new("startup")?;
    let server = Server::start(&bins, &scratch.0, None).await?;
    let mut agent = Agent::configure(&server, &scratch.0, "agent-0")?;
    let mut entries = vec![admin::entry(
        &format!("spiffe://{TD}/bench/startup"),
        &agent.spiffe_id,
        &[my_uid_selector()],
    )];
    entries.extend((1..n).map(|j| {
        admin::entry(
            &format!("spiffe://{TD}/bench/startup-{j}"),
            &agent.spiffe_id,
            &[other_uid_selector(j)],
        )
    }));
    admin::create_many(&server.admin, entries, 8).await?;
    let token = server.token(&agent.spiffe_id).await?;
    progress(format!(
        "startup: first start with a join token, then {restarts} restarts ({n} entries)"
    ));
    let t0 = Instant::now();
    agent.spawn(&bins, Some(&token))?;
    let attest_first = first_svid(&agent, t0).await?;
    agent
        .wait_ready(n as u64, n as u64, Duration::from_secs(60))
        .await?;

    let mut samples = Vec::new();
    for _ in 0..restarts {
        agent.stop();
        let t0 = Instant::now();
        agent.spawn(&bins, None)?;
        samples.push(first_svid(&agent, t0).await?);
        agent
            .wait_ready(n as u64, n as u64, Duration::from_secs(60))
            .await?;
    }
    let s = Samples::from_durations(samples);
    rep.emit(
        Record::new("startup")
            .f("first_svid_ms", s.q_ms(0.5))
            .f("max_ms", s.max_ms())
            .f("min_ms", s.q_ms(0.0))
            .with("restarts", s.len())
            .with("entries", n)
            .f("attest_first_svid_ms", attest_first.as_secs_f64() * 1000.0),
    );
    rep.table("startup");
    Ok(())
}
