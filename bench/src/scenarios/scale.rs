//! `scale`: memory and sync cost with many entries and agents.
//!
//! Part 1 — the server at scale, with simulated agents (one bench process
//! opening one mTLS connection per agent, each attested with its own join
//! token, as `sigil-agent` does):
//! 1. attest `--agents` simulated agents and a probe agent;
//! 2. create `--entries`/10 entries (the probe owns `--probe-entries`, the
//!    rest spread over the agents) and time the probe's fresh sync (open the
//!    `Sync` stream on its connection, receive the first complete snapshot,
//!    all chunks up to the one without `more`) 21 times; then grow the
//!    total to `--entries` (probe unchanged) and time it again:
//!    `sync_growth_ratio` = median after / median before
//!    (`sync_growth_ratio_min`: the same with the fastest of each, less
//!    sensitive to a noisy machine);
//! 3. open every agent's sync stream (asking for deltas, as `sigil-agent`
//!    does), read each first message, then record
//!    the server's RSS, the probe's fresh sync time (`agent_sync_ms`) and
//!    the server CPU time spent per entry change while all streams are open.
//!
//! Entries are created before the agents' streams are opened, so that the
//! set-up time does not depend on how many streams each change wakes (the
//! CPU per change figure measures that separately).
//!
//! Part 2 — real `sigil-agent` processes with `--agent-entries` entries each
//! (fresh server): time from process start to synced, to every SVID minted,
//! and the agent's RSS once all SVIDs are cached. An agent whose sync never
//! completes (for example a full-set message above the 4 MiB gRPC limit) is
//! reported with `synced: false` and the error from its log.
//! `snapshot_bytes` is the size of the agent's whole entry set encoded as one
//! message (the server may send it in several chunks).

use std::time::{Duration, Instant};

use prost::Message;
use sigil_proto::agent::{SyncRequest, SyncUpdate};
use sigil_proto::common::Entry;

use crate::Result;
use crate::clients::{SimAgent, admin};
use crate::harness::{Agent, Bins, Scratch, Server, TD, other_uid_selector};
use crate::report::{Record, Reporter, progress};
use crate::stats::Samples;

#[derive(clap::Args, Default)]
pub(crate) struct Args {
    /// Total entries on the server in part 1 (default 100000; 2000 with --quick).
    #[arg(long)]
    entries: Option<usize>,
    /// Simulated agents in part 1 (default 1000; 20 with --quick).
    #[arg(long)]
    agents: Option<usize>,
    /// Entries of the probe agent in part 1 (default 1000; 100 with --quick).
    #[arg(long)]
    probe_entries: Option<usize>,
    /// Entry counts for real agents in part 2, comma-separated
    /// (default 1000,10000,50000; 100,1000 with --quick). Empty skips part 2.
    #[arg(long, value_delimiter = ',')]
    agent_entries: Option<Vec<usize>>,
    /// Skip part 1 (server at scale).
    #[arg(long)]
    skip_server: bool,
    /// Skip part 2 (real agents).
    #[arg(long)]
    skip_agents: bool,
    /// `postgres`: instead of parts 1 and 2, compare one server on redb
    /// with `--servers` servers sharing a throwaway PostgreSQL 15 (see
    /// `scale_cluster`).
    #[arg(long, default_value = "redb")]
    datastore: String,
    /// Servers in the PostgreSQL case (default 2).
    #[arg(long, default_value_t = 2)]
    servers: usize,
}

/// Server config for a bench whose simulated agents all connect from
/// 127.0.0.1: the per-address connection cap (default 256) raised above
/// the agent count.
pub(super) const MANY_AGENTS_FROM_ONE_IP: &str = "[limits]\nmax_connections_per_ip = 4096\n";

/// One complete snapshot from a sync stream: every chunk up to the one
/// without `more` (the agent applies the snapshot only then).
pub(super) struct Snapshot {
    pub(super) entries: Vec<Entry>,
    pub(super) bytes: usize,
    messages: usize,
}

pub(super) async fn read_snapshot(stream: &mut tonic::Streaming<SyncUpdate>) -> Result<Snapshot> {
    let mut snap = Snapshot {
        entries: Vec::new(),
        bytes: 0,
        messages: 0,
    };
    loop {
        let m = stream.message().await?.ok_or("sync stream ended")?;
        snap.bytes += m.encoded_len();
        snap.messages += 1;
        snap.entries.extend(m.entries);
        if !m.more {
            return Ok(snap);
        }
    }
}

/// Reads `stream` until an update shows entry `id` with hint `hint`
/// (30 s at most per update) and returns that update.
pub(super) async fn until_hint(
    stream: &mut tonic::Streaming<SyncUpdate>,
    id: &str,
    hint: &str,
) -> Result<Snapshot> {
    loop {
        let u = tokio::time::timeout(Duration::from_secs(30), read_snapshot(stream)).await??;
        if u.entries.iter().any(|e| e.id == id && e.hint == hint) {
            return Ok(u);
        }
    }
}

/// Time to the first complete snapshot on a fresh sync stream.
pub(super) async fn fresh_sync(sim: &SimAgent) -> Result<(Duration, Snapshot)> {
    let mut api = sim.api.clone();
    let start = Instant::now();
    let mut stream = api.sync(SyncRequest::default()).await?.into_inner();
    let snap = read_snapshot(&mut stream).await?;
    Ok((start.elapsed(), snap))
}

/// Median and minimum time of `repeats` fresh syncs (after a short pause so
/// that work queued by earlier steps has finished), and the snapshot size.
async fn median_sync(sim: &SimAgent, expect: usize, repeats: usize) -> Result<(f64, f64, usize)> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut d = Vec::new();
    let mut bytes = 0;
    for _ in 0..repeats {
        let (t, snap) = fresh_sync(sim).await?;
        if snap.entries.len() != expect {
            return Err(format!(
                "probe received {} entries, expected {expect}",
                snap.entries.len()
            )
            .into());
        }
        bytes = snap.bytes;
        d.push(t);
    }
    let s = Samples::from_durations(d);
    Ok((s.q_ms(0.5), s.q_ms(0.0), bytes))
}

/// Opens every agent's sync stream at once (asking for deltas, as
/// `sigil-agent` does) and reads each first complete snapshot: the open
/// streams, the entries they delivered in all, and the milliseconds until
/// the last snapshot was whole.
pub(super) async fn open_all_streams(
    sims: &[SimAgent],
) -> Result<(Vec<tonic::Streaming<SyncUpdate>>, usize, f64)> {
    let start = Instant::now();
    let mut streams = Vec::with_capacity(sims.len());
    let mut set = tokio::task::JoinSet::new();
    for s in sims {
        let mut api = s.api.clone();
        set.spawn(async move {
            let mut st = api.sync(SyncRequest { deltas: true }).await?.into_inner();
            let snap = read_snapshot(&mut st).await?;
            Ok::<_, crate::Error>((st, snap.entries.len()))
        });
    }
    let mut synced = 0;
    while let Some(r) = set.join_next().await {
        let (st, n) = r??;
        synced += n;
        streams.push(st);
    }
    Ok((streams, synced, start.elapsed().as_secs_f64() * 1000.0))
}

/// Attests `n` simulated agents, 16 at a time.
pub(super) async fn attest_many(server: &Server, names: Vec<String>) -> Result<Vec<SimAgent>> {
    let mut out = Vec::with_capacity(names.len());
    let mut set = tokio::task::JoinSet::new();
    let mut it = names.into_iter().enumerate();
    loop {
        while set.len() < 16 {
            let Some((i, name)) = it.next() else { break };
            let mut adm = server.admin.clone();
            let port = server.port;
            set.spawn(async move {
                let token = admin::token(&mut adm, &format!("spiffe://{TD}/bench/{name}")).await?;
                Ok::<_, crate::Error>((i, SimAgent::attest(port, &token).await?))
            });
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        out.push(r??);
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, s)| s).collect())
}

/// `n` entries owned by the given parents in turn, none matching the bench.
pub(super) fn entries_for(parents: &[String], n: usize, tag: &str) -> Vec<Entry> {
    (0..n)
        .map(|j| {
            let parent = &parents[j % parents.len()];
            admin::entry(
                &format!("spiffe://{TD}/bench/{tag}/{j}"),
                parent,
                &[other_uid_selector(j)],
            )
        })
        .collect()
}

async fn create_timed(server: &Server, entries: Vec<Entry>) -> Result<(f64, Vec<Entry>)> {
    let n = entries.len();
    let start = Instant::now();
    let created = admin::create_many(&server.admin, entries, 8).await?;
    Ok((n as f64 / start.elapsed().as_secs_f64(), created))
}

/// What a rotation storm measured.
struct Storm {
    svids: usize,
    seconds: f64,
    call_p50_ms: f64,
    call_max_ms: f64,
    /// Slowest admin `Health` answer while the storm ran (is the server
    /// still responsive?).
    health_max_ms: f64,
    peak_calls: u64,
    peak_csrs: u64,
}

/// A rotation storm: every simulated agent renews all its SVIDs at the same
/// moment (one `MintX509Svids` call each, as if they had all expired
/// together without jitter). CSRs come from a small pool of keys made
/// beforehand, so the bench process spends its time sending, not signing.
async fn storm(server: &Server, sims: &[SimAgent], created: &[Entry]) -> Result<Storm> {
    use sigil_proto::agent::{CsrForEntry, MintX509SvidsRequest};
    let pool = (0..32)
        .map(|_| sigil_core::x509::new_key_and_csr().map(|(c, _)| bytes::Bytes::from(c)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut by_parent: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for e in created {
        by_parent.entry(&e.parent_id).or_default().push(&e.id);
    }
    let mut set = tokio::task::JoinSet::new();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(sims.len() + 1));
    for s in sims {
        let ids = by_parent
            .get(s.spiffe_id.as_str())
            .cloned()
            .unwrap_or_default();
        let csrs: Vec<CsrForEntry> = ids
            .iter()
            .take(sigil_proto::agent::MAX_MINT_BATCH)
            .enumerate()
            .map(|(i, id)| CsrForEntry {
                entry_id: id.to_string(),
                csr: pool[i % pool.len()].clone(),
                ..Default::default()
            })
            .collect();
        let mut api = s.api.clone();
        let b = barrier.clone();
        set.spawn(async move {
            let req = MintX509SvidsRequest {
                csrs,
                ..Default::default()
            };
            b.wait().await;
            let t = Instant::now();
            let resp = api.mint_x509_svids(req).await?.into_inner();
            if let Some(r) = resp.results.iter().find(|r| !r.error.is_empty()) {
                return Err(format!("server refused entry {}: {}", r.entry_id, r.error).into());
            }
            Ok::<_, crate::Error>((t.elapsed(), resp.results.len()))
        });
    }
    let mut adm = server.admin.clone();
    let before = admin::signing(&mut adm).await?;
    barrier.wait().await;
    let start = Instant::now();
    // Probe the admin API while the storm runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let mut adm = server.admin.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                if admin::signing(&mut adm).await.is_err() {
                    break;
                }
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            worst
        })
    };
    let (mut calls, mut svids) = (Vec::new(), 0);
    while let Some(r) = set.join_next().await {
        let (d, n) = r??;
        calls.push(d);
        svids += n;
    }
    let seconds = start.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let health_max = probe.await.unwrap_or(Duration::ZERO);
    let after = admin::signing(&mut adm).await?;
    if after.svids_signed < before.svids_signed + svids as u64 {
        return Err("the server's signed count did not grow by the storm's SVIDs".into());
    }
    let calls = Samples::from_durations(calls);
    Ok(Storm {
        svids,
        seconds,
        call_p50_ms: calls.q_ms(0.5),
        call_max_ms: calls.max_ms(),
        health_max_ms: health_max.as_secs_f64() * 1000.0,
        peak_calls: after.peak_calls,
        peak_csrs: after.peak_csrs,
    })
}

async fn server_part(a: &Args, quick: bool, bins: &Bins, rep: &mut Reporter) -> Result<()> {
    let total = a.entries.unwrap_or(if quick { 2000 } else { 100_000 });
    let n_agents = a.agents.unwrap_or(if quick { 20 } else { 1000 }).max(1);
    let probe_n = a.probe_entries.unwrap_or(if quick { 100 } else { 1000 });
    let repeats = if quick { 3 } else { 21 };
    let before_total = (total / 10).max(probe_n + n_agents);
    let scratch = Scratch::new("scale")?;
    let server = Server::start_with(bins, &scratch.0, None, MANY_AGENTS_FROM_ONE_IP).await?;

    progress(format!(
        "scale: attesting {n_agents} simulated agents and a probe"
    ));
    let mut names: Vec<String> = (0..n_agents).map(|i| format!("sim-{i}")).collect();
    names.push("probe".into());
    let mut sims = attest_many(&server, names).await?;
    let probe = sims.pop().ok_or("no probe")?;
    let parents: Vec<String> = sims.iter().map(|s| s.spiffe_id.clone()).collect();

    progress(format!(
        "scale: creating {before_total} entries ({probe_n} for the probe)"
    ));
    let mut first = entries_for(std::slice::from_ref(&probe.spiffe_id), probe_n, "probe");
    first.extend(entries_for(&parents, before_total - probe_n, "a"));
    let (rate_a, mut created) = create_timed(&server, first).await?;
    let (sync_before, sync_before_min, _) = median_sync(&probe, probe_n, repeats).await?;

    progress(format!(
        "scale: growing to {total} entries ({rate_a:.0} entries/s so far)"
    ));
    let (rate_b, more) = create_timed(
        &server,
        entries_for(&parents, total.saturating_sub(before_total), "b"),
    )
    .await?;
    created.extend(more);
    let (sync_after, sync_after_min, probe_bytes) = median_sync(&probe, probe_n, repeats).await?;
    let rss_no_streams = server.proc.mem()?;

    progress(format!("scale: opening {n_agents} sync streams"));
    let (streams, synced_entries, all_synced_ms) = open_all_streams(&sims).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mem = server.proc.mem()?;
    let (agent_sync_ms, _, _) = median_sync(&probe, probe_n, repeats).await?;

    // Server CPU per entry change while every stream is open: change one
    // of the probe's entries and wait for the probe's stream to see it.
    let changes = if quick { 5 } else { 20 };
    progress(format!(
        "scale: {changes} entry changes with {} streams open",
        n_agents + 1
    ));
    let mut api = probe.api.clone();
    let mut pst = api.sync(SyncRequest { deltas: true }).await?.into_inner();
    let first = pst.message().await?.ok_or("sync stream ended")?;
    let target = first
        .entries
        .first()
        .ok_or("probe has no entries")?
        .id
        .clone();
    let mut adm = server.admin.clone();
    let cpu0 = server.proc.cpu_time()?;
    let mut lat = Vec::new();
    let mut change_bytes = Vec::new();
    for k in 0..changes {
        let hint = format!("h{k}");
        let t = Instant::now();
        admin::set_hint(&mut adm, &target, &hint).await?;
        let u = until_hint(&mut pst, &target, &hint).await?;
        change_bytes.push(u.bytes as f64);
        lat.push(t.elapsed());
        // Let every woken stream finish before the next change.
        tokio::time::sleep(Duration::from_millis(if quick { 20 } else { 200 })).await;
    }
    // Wait for the fan-out of the last change to settle, then read the CPU.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu_per_change = (server.proc.cpu_time()? - cpu0).as_secs_f64() * 1000.0 / changes as f64;
    let lat = Samples::from_durations(lat);

    progress(format!(
        "scale: rotation storm, {n_agents} agents renewing all their SVIDs at once"
    ));
    let storm = storm(&server, &sims, &created).await?;

    rep.emit(
        Record::new("scale")
            .with("case", "server")
            .with("entries", total)
            .with("agents", n_agents + 1)
            .f("server_rss_mb", mem.rss_mb)
            .f("agent_rss_mb", f64::NAN)
            .f("agent_sync_ms", agent_sync_ms)
            .f("sync_growth_ratio", sync_after / sync_before)
            .f("sync_growth_ratio_min", sync_after_min / sync_before_min)
            .with("agent_entries", probe_n)
            .f("sync_ms_at_10pct_entries", sync_before)
            .f("sync_ms_at_full_entries", sync_after)
            .f("sync_min_ms_at_10pct_entries", sync_before_min)
            .f("sync_min_ms_at_full_entries", sync_after_min)
            .with("snapshot_bytes", probe_bytes)
            .f("server_hwm_mb", mem.hwm_mb)
            .f("server_rss_mb_no_streams", rss_no_streams.rss_mb)
            .f("all_agents_synced_ms", all_synced_ms)
            .with("all_agents_synced_entries", synced_entries)
            .f("server_cpu_ms_per_change", cpu_per_change)
            .f("change_to_probe_p50_ms", lat.q_ms(0.5))
            .f(
                "change_bytes",
                change_bytes.iter().sum::<f64>() / change_bytes.len().max(1) as f64,
            )
            .f("entries_created_per_sec", (rate_a + rate_b) / 2.0)
            .with("storm_svids", storm.svids)
            .f("storm_seconds", storm.seconds)
            .f("storm_svids_per_sec", storm.svids as f64 / storm.seconds)
            .f("storm_call_p50_ms", storm.call_p50_ms)
            .f("storm_call_max_ms", storm.call_max_ms)
            .f("storm_admin_max_ms", storm.health_max_ms)
            .with("peak_signing_queue", storm.peak_calls)
            .with("peak_signing_queue_csrs", storm.peak_csrs),
    );
    drop(streams);
    Ok(())
}

async fn agent_part(a: &Args, quick: bool, bins: &Bins, rep: &mut Reporter) -> Result<()> {
    let sizes = a.agent_entries.clone().unwrap_or(if quick {
        vec![100, 1000]
    } else {
        vec![1000, 10_000, 50_000]
    });
    if sizes.is_empty() || a.skip_agents {
        return Ok(());
    }
    let scratch = Scratch::new("scale-agents")?;
    let server = Server::start(bins, &scratch.0, None).await?;
    for &n in &sizes {
        let mut agent = Agent::configure(&server, &scratch.0, &format!("agent-{n}"))?;
        progress(format!("scale: real agent with {n} entries"));
        let t_create = Instant::now();
        let created = admin::create_many(
            &server.admin,
            entries_for(std::slice::from_ref(&agent.spiffe_id), n, &format!("e{n}")),
            8,
        )
        .await?;
        let create_s = t_create.elapsed().as_secs_f64();
        // The snapshot's size as one message (what a server without
        // chunking would send).
        let sync_bytes = SyncUpdate {
            entries: created,
            bundle: vec![vec![0u8; 500]],
            revision: 1,
            ..Default::default()
        }
        .encoded_len();
        let token = server.token(&agent.spiffe_id).await?;
        let t0 = Instant::now();
        agent.spawn(bins, Some(&token))?;
        let sync_timeout = Duration::from_secs(if quick { 20 } else { 60 });
        let mut rec = Record::new("scale")
            .with("case", "agent")
            .with("agent_entries", n)
            .with("snapshot_bytes", sync_bytes)
            .f("create_entries_s", create_s);
        match agent.wait_ready(n as u64, 0, sync_timeout).await {
            Ok(_) => {
                let sync_ms = t0.elapsed().as_secs_f64() * 1000.0;
                let mint_timeout = Duration::from_secs(60 + n as u64 / 200);
                let h = agent.wait_ready(n as u64, n as u64, mint_timeout).await?;
                let all_ms = t0.elapsed().as_secs_f64() * 1000.0;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mem = agent.proc()?.mem()?;
                rec = rec
                    .with("synced", true)
                    .f("agent_rss_mb", mem.rss_mb)
                    .f("agent_sync_ms", sync_ms)
                    .f("all_svids_ms", all_ms)
                    .with("svids", h.svids)
                    .f("agent_hwm_mb", mem.hwm_mb)
                    .f("kb_per_entry", mem.rss_mb * 1024.0 / n as f64);
            }
            Err(e) => {
                let log = std::fs::read_to_string(&agent.proc()?.log).unwrap_or_default();
                let reason = log
                    .lines()
                    .rev()
                    .find(|l| l.contains("sync stream failed"))
                    .map(|l| {
                        l.split("error=")
                            .nth(1)
                            .unwrap_or(l)
                            .chars()
                            .take(120)
                            .collect::<String>()
                    })
                    .unwrap_or_else(|| e.to_string());
                progress(format!(
                    "scale: agent with {n} entries did not sync: {reason}"
                ));
                let mem = agent.proc()?.mem()?;
                rec = rec
                    .with("synced", false)
                    .f("agent_rss_mb", mem.rss_mb)
                    .with("error", reason);
            }
        }
        rep.emit(rec);
        agent.stop();
    }
    Ok(())
}

pub(crate) async fn run(a: &Args, quick: bool, rep: &mut Reporter) -> Result<()> {
    let bins = Bins::locate()?;
    match a.datastore.as_str() {
        "redb" => {}
        "postgres" => {
            let total = a.entries.unwrap_or(if quick { 2000 } else { 100_000 });
            let n_agents = a.agents.unwrap_or(if quick { 20 } else { 1000 }).max(2);
            let probe_n = a.probe_entries.unwrap_or(if quick { 100 } else { 1000 });
            let sizes = super::scale_cluster::Sizes {
                total,
                n_agents,
                probe_n,
                changes: if quick { 5 } else { 50 },
            };
            super::scale_cluster::run(&sizes, 1, &bins, rep).await?;
            super::scale_cluster::run(&sizes, a.servers.max(2), &bins, rep).await?;
            rep.table("scale");
            return Ok(());
        }
        other => return Err(format!("--datastore {other}: redb or postgres").into()),
    }
    if !a.skip_server {
        server_part(a, quick, &bins, rep).await?;
    }
    agent_part(a, quick, &bins, rep).await?;
    rep.table("scale");
    Ok(())
}
