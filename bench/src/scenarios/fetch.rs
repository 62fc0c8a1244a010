//! `fetch`: Workload API FetchX509SVID latency and throughput against a
//! real agent serving a cached SVID.
//!
//! Each client is its own Unix-socket connection (as separate workload
//! processes would be) and runs a closed loop: open a FetchX509SVID stream
//! with the `workload.spiffe.io: true` header, wait for the first message
//! (one SVID), drop the stream, repeat. Latency is measured in the client
//! from the call to the first message. The clients run in the bench process
//! on the same machine as the agent, so they compete with it for the CPUs;
//! with a closed loop, latency at N clients is N / throughput (Little's law).
//!
//! Closed-loop clients measure capacity, not the latency a workload sees
//! (workloads fetch once and then keep the stream). So the largest client
//! count is also run open loop (`mode: "open"`): every client fetches on a
//! fixed schedule so that all of them together make `--open-rates` fetches
//! per second. Latency is measured from the send, or from the scheduled
//! instant when the client's previous fetch overran its slot (so a slow
//! agent is not hidden by the client waiting: no coordinated omission).
//!
//! Before each closed-loop count, the same clients run against the bare
//! reference (`bare_rpc`: a tonic server in its own process on a Unix
//! socket answering with the agent's own response, pre-built), and the
//! record gives `ratio_to_bare_rpc`: the agent's rate over the reference's.

use std::time::{Duration, Instant};

use crate::Result;
use crate::clients::{admin, workload};
use crate::harness::{Agent, Bins, Scratch, Server, TD, my_uid_selector, other_uid_selector};
use crate::report::{Record, Reporter, progress};
use crate::stats::Samples;

#[derive(clap::Args, Default)]
pub(crate) struct Args {
    /// Client counts, comma-separated (default 1,100,1000; 1,10,100 with --quick).
    #[arg(long, value_delimiter = ',')]
    clients: Option<Vec<usize>>,
    /// Seconds measured per client count, after a warm-up (default 5; 0.5 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Aggregate fetches per second of the open-loop runs at the largest
    /// client count, comma-separated (default 1000,5000; 500 with --quick).
    #[arg(long, value_delimiter = ',')]
    open_rates: Option<Vec<f64>>,
    /// Entries on the agent: one for the bench, the rest for other
    /// workloads, which every fetch must still skip (default 1).
    #[arg(long)]
    entries: Option<usize>,
    /// The bench's entry also pins the client binary (`unix:path` and
    /// `unix:sha256` of this executable), so every fetch derives them;
    /// without it the entry names the uid only and the agent reads neither.
    #[arg(long)]
    pin_binary: bool,
    /// Instead: the clients in Docker containers, against a unix-only agent
    /// and an agent with the docker attestor (see `fetch_docker`); default
    /// client counts 1,100.
    #[arg(long)]
    docker: bool,
}

struct ClientResult {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

async fn client_loop(
    mut c: workload::Client,
    measure_from: Instant,
    until: Instant,
) -> ClientResult {
    let mut r = ClientResult {
        latencies: Vec::new(),
        errors: 0,
        first_error: None,
    };
    loop {
        let start = Instant::now();
        if start >= until {
            return r;
        }
        let res: Result<usize> = async {
            let mut stream = c
                .fetch_x509svid(workload::x509_request())
                .await?
                .into_inner();
            let msg = stream.message().await?.ok_or("stream ended")?;
            Ok(msg.svids.len())
        }
        .await;
        let lat = start.elapsed();
        match res {
            Ok(1) => {
                if start >= measure_from {
                    r.latencies.push(lat);
                }
            }
            Ok(n) => {
                r.errors += 1;
                r.first_error
                    .get_or_insert(format!("{n} SVIDs instead of 1"));
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert(e.to_string());
            }
        }
    }
}

/// Open loop: fetch at `first + k * period` for k = 0, 1, ...
async fn open_loop(
    mut c: workload::Client,
    first: Instant,
    period: Duration,
    measure_from: Instant,
    until: Instant,
) -> ClientResult {
    let mut r = ClientResult {
        latencies: Vec::new(),
        errors: 0,
        first_error: None,
    };
    let mut at = first;
    let mut prev_done = first;
    while at < until {
        tokio::time::sleep_until(at.into()).await;
        // Late because our previous fetch overran its slot: count from the
        // schedule. Late only because of the timer's 1 ms granularity (a
        // harness artifact): count from the send.
        let base = if prev_done > at { at } else { Instant::now() };
        let res: Result<usize> = async {
            let mut stream = c
                .fetch_x509svid(workload::x509_request())
                .await?
                .into_inner();
            let msg = stream.message().await?.ok_or("stream ended")?;
            Ok(msg.svids.len())
        }
        .await;
        prev_done = Instant::now();
        let lat = prev_done - base;
        match res {
            Ok(1) if at >= measure_from => r.latencies.push(lat),
            Ok(1) => {}
            Ok(n) => {
                r.errors += 1;
                r.first_error
                    .get_or_insert(format!("{n} SVIDs instead of 1"));
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert(e.to_string());
            }
        }
        at += period;
    }
    r
}

/// `n` Workload API connections to `socket`, one per simulated workload.
async fn connect_all(socket: &std::path::Path, n: usize) -> Result<Vec<workload::Client>> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(workload::connect(socket).await?);
    }
    Ok(conns)
}

/// Runs every client (closed loop, or open loop at `open_rate` fetches/s in
/// all) for `warm` + `secs`; returns their merged results and the start.
async fn run_clients(
    conns: Vec<workload::Client>,
    open_rate: Option<f64>,
    secs: f64,
    warm: Duration,
) -> Result<(ClientResult, Instant)> {
    let n = conns.len();
    let start = Instant::now();
    let measure_from = start + warm;
    let until = measure_from + Duration::from_secs_f64(secs);
    let mut set = tokio::task::JoinSet::new();
    for (i, c) in conns.into_iter().enumerate() {
        match open_rate {
            None => set.spawn(client_loop(c, measure_from, until)),
            Some(rate) => {
                let period = Duration::from_secs_f64(n as f64 / rate);
                let first = start + period.mul_f64(i as f64 / n as f64);
                set.spawn(open_loop(c, first, period, measure_from, until))
            }
        };
    }
    let mut all = ClientResult {
        latencies: Vec::new(),
        errors: 0,
        first_error: None,
    };
    while let Some(r) = set.join_next().await {
        let r = r?;
        all.latencies.extend(r.latencies);
        all.errors += r.errors;
        if all.first_error.is_none() {
            all.first_error = r.first_error;
        }
    }
    Ok((all, start))
}

/// Closed-loop fetches per second from `n` clients of the bare reference
/// server (see `bare_rpc`), over the same client code as the agent's.
async fn bare_per_sec(
    socket: &std::path::Path,
    n: usize,
    secs: f64,
    warm: Duration,
) -> Result<f64> {
    let (r, _) = run_clients(connect_all(socket, n).await?, None, secs, warm).await?;
    if let Some(e) = r.first_error {
        return Err(format!("bare RPC reference failed: {e}").into());
    }
    Ok(r.latencies.len() as f64 / secs)
}

/// Runs one configuration and emits its record; `bare`: the reference
/// server's closed-loop rate at the same client count.
#[allow(
    clippy::too_many_arguments,
    reason = "one scenario's knobs, named at the call"
)]
async fn measure(
    agent: &Agent,
    n: usize,
    open_rate: Option<f64>,
    secs: f64,
    warm: Duration,
    agent_entries: usize,
    entry_selectors: &str,
    bare: Option<f64>,
    rep: &mut Reporter,
) -> Result<()> {
    let conns = connect_all(&agent.socket, n).await?;
    let agent_cpu0 = agent.proc()?.cpu_time()?;
    let (
        ClientResult {
            latencies: all,
            errors,
            first_error,
        },
        start,
    ) = run_clients(conns, open_rate, secs, warm).await?;
    let agent_cpu = agent.proc()?.cpu_time()? - agent_cpu0;
    let mem = agent.proc()?.mem()?;
    let s = Samples::from_durations(all);
    let mut rec = Record::new("fetch")
        .with("clients", n)
        .f("p50_us", s.q_us(0.5))
        .f("p99_us", s.q_us(0.99))
        .f("max_us", s.max_us())
        .f("per_sec", s.len() as f64 / secs)
        .with(
            "mode",
            if open_rate.is_some() {
                "open"
            } else {
                "closed"
            },
        )
        .with("fetches", s.len())
        .with("errors", errors)
        .f(
            "agent_cpu_util",
            agent_cpu.as_secs_f64() / start.elapsed().as_secs_f64(),
        )
        .f("agent_rss_mb", mem.rss_mb)
        .with("agent_entries", agent_entries)
        .with("entry_selectors", entry_selectors);
    if let Some(rate) = open_rate {
        rec = rec.f("offered_per_sec", rate);
    }
    if let Some(b) = bare {
        rec = rec
            .f("bare_rpc_per_sec", b)
            .f("ratio_to_bare_rpc", s.len() as f64 / secs / b);
    }
    if let Some(e) = first_error {
        progress(format!("fetch: {errors} failed fetches, first: {e}"));
        rec = rec.with("first_error", e);
    }
    rep.emit(rec);
    Ok(())
}

pub(crate) async fn run(a: &Args, quick: bool, rep: &mut Reporter) -> Result<()> {
    let levels = a.clients.clone().unwrap_or(if quick {
        vec![1, 10, 100]
    } else {
        vec![1, 100, 1000]
    });
    let secs = a.seconds.unwrap_or(if quick { 0.5 } else { 5.0 });
    if a.docker {
        let levels = a.clients.clone().unwrap_or(vec![1, 100]);
        return super::fetch_docker::run(&levels, secs, rep).await;
    }
    let warm = Duration::from_secs_f64((secs / 5.0).min(1.0));
    let open_rates = a.open_rates.clone().unwrap_or(if quick {
        vec![500.0]
    } else {
        vec![1000.0, 5000.0]
    });

    let bins = Bins::locate()?;
    let scratch = Scratch::new("fetch")?;
    let server = Server::start(&bins, &scratch.0, None).await?;
    let mut agent = Agent::configure(&server, &scratch.0, "agent-0")?;
    let n_entries = a.entries.unwrap_or(1).max(1);
    let mut mine = vec![my_uid_selector()];
    if a.pin_binary {
        let exe = std::fs::canonicalize(std::env::current_exe()?)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(&exe)?);
        mine.push(format!("unix:path:{}", exe.display()));
        mine.push(format!("unix:sha256:{}", hex::encode(digest)));
    }
    let entry_selectors = if a.pin_binary {
        "uid+path+sha256"
    } else {
        "uid"
    };
    let mut entries = vec![admin::entry(
        &format!("spiffe://{TD}/bench/fetch"),
        &agent.spiffe_id,
        &mine,
    )];
    entries.extend((1..n_entries).map(|j| {
        admin::entry(
            &format!("spiffe://{TD}/bench/fetch-other-{j}"),
            &agent.spiffe_id,
            &[other_uid_selector(j)],
        )
    }));
    admin::create_many(&server.admin, entries, 8).await?;
    agent.start(&bins, &server).await?;
    let n = n_entries as u64;
    agent.wait_ready(n, n, Duration::from_secs(120)).await?;

    // The reference answers with the agent's own response, captured once.
    let mut probe = workload::connect(&agent.socket).await?;
    let answer = probe
        .fetch_x509svid(workload::x509_request())
        .await?
        .into_inner()
        .message()
        .await?
        .ok_or("the agent's stream ended before its first message")?;
    drop(probe);
    let bare = super::bare_rpc::BareServer::start(&scratch.0, &answer).await?;
    for &n in &levels {
        progress(format!("fetch: {n} clients, bare RPC reference, {secs} s"));
        let b = bare_per_sec(&bare.socket, n, secs, warm).await?;
        progress(format!("fetch: {n} clients, closed loop, {secs} s"));
        measure(
            &agent,
            n,
            None,
            secs,
            warm,
            n_entries,
            entry_selectors,
            Some(b),
            rep,
        )
        .await?;
    }
    drop(bare);
    if let Some(&n) = levels.iter().max() {
        for &rate in &open_rates {
            progress(format!(
                "fetch: {n} clients, open loop at {rate} fetches/s, {secs} s"
            ));
            measure(
                &agent,
                n,
                Some(rate),
                secs,
                warm,
                n_entries,
                entry_selectors,
                None,
                rep,
            )
            .await?;
        }
    }
    rep.table("fetch");
    Ok(())
}
