//! `propagation`: time from an entry create/update/delete returning on the
//! admin socket to the affected workload stream receiving the update.
//!
//! Setup: one real server, `--agents` real agent processes (own data dir and
//! sockets), `--entries` entries spread over them. Each agent has one entry
//! matching the bench process (`unix:uid:<uid>`, so the bench's Workload API
//! stream always has an identity) and entries for other workloads (selectors
//! nothing here matches; the agent still mints their SVIDs, as it would in
//! production). The bench keeps one FetchX509SVID stream open per agent.
//!
//! Changes go round-robin over the agents, in rounds of create (a new entry
//! matching the bench: the stream must show its freshly minted SVID), update
//! (the entry's hint: the stream must show the new hint), delete (the SVID
//! must disappear). The clock starts when the admin call returns — the same
//! instant `sigil-server entry create|update|delete` would exit, minus
//! process teardown — and stops when the bench's stream reader receives the
//! matching message. A message that arrives before the call returns counts
//! as 0.
//!
//! `--servers 2`: two servers share a throwaway PostgreSQL 15 (started
//! with initdb/pg_ctl, as the tests do); the agents are attested to and
//! synced from server B while every change is made on server A, so the
//! figure includes A's commit, the change feed (NOTIFY, then B's read of
//! the events table) and B's push.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::Result;
use crate::clients::{admin, workload};
use crate::harness::{Agent, Bins, Scratch, Server, TD, my_uid_selector, other_uid_selector};
use crate::report::{Record, Reporter, progress};
use crate::stats::Samples;

#[derive(clap::Args, Default)]
pub(crate) struct Args {
    /// Agent processes (default 10; 2 with --quick).
    #[arg(long)]
    agents: Option<usize>,
    /// Entries in total over all agents (default 1000; 20 with --quick).
    #[arg(long)]
    entries: Option<usize>,
    /// Changes measured (default 200; 12 with --quick).
    #[arg(long)]
    changes: Option<usize>,
    /// 1 (redb, default) or 2 (two servers on one PostgreSQL: changes on
    /// the first, agents on the second).
    #[arg(long, default_value_t = 1)]
    servers: usize,
}

/// One message of one agent's stream: (agent, when, [(spiffe_id, hint)]).
type StreamMsg = (usize, Instant, Vec<(String, String)>);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Create,
    Update,
    Delete,
}

pub(crate) async fn run(a: &Args, quick: bool, rep: &mut Reporter) -> Result<()> {
    let n_agents = a.agents.unwrap_or(if quick { 2 } else { 10 }).max(1);
    let n_entries = a.entries.unwrap_or(if quick { 20 } else { 1000 });
    let n_changes = a.changes.unwrap_or(if quick { 12 } else { 200 });
    let per_agent = (n_entries / n_agents).max(1);

    let bins = Bins::locate()?;
    let scratch = Scratch::new("propagation")?;
    // `_pg` and `_writer` live to the end of the run.
    let (_pg, _writer, server, mut adm) = match a.servers {
        1 => {
            let server = Server::start(&bins, &scratch.0, None).await?;
            let adm = server.admin.clone();
            (None, None, server, adm)
        }
        2 => {
            let pg = sigil_tests::pg::start("bench-propagation")
                .ok_or("PostgreSQL is needed for --servers 2")?;
            pg.create_db("sigil");
            let section = pg.datastore_section("sigil", &scratch.0.join("pgpass"));
            let (dir_a, dir_b) = (scratch.0.join("a"), scratch.0.join("b"));
            std::fs::create_dir_all(&dir_a)?;
            std::fs::create_dir_all(&dir_b)?;
            let writer = Server::start_with(&bins, &dir_a, None, &section).await?;
            let server = Server::start_with(&bins, &dir_b, None, &section).await?;
            let adm = writer.admin.clone();
            (Some(pg), Some(writer), server, adm)
        }
        n => return Err(format!("--servers {n}: 1 or 2").into()),
    };
    let mut agents: Vec<Agent> = (0..n_agents)
        .map(|i| Agent::configure(&server, &scratch.0, &format!("agent-{i}")))
        .collect::<Result<_>>()?;
    progress(format!(
        "propagation: {n_agents} agents, {} entries, {n_changes} changes",
        per_agent * n_agents
    ));
    let mut entries = Vec::new();
    for (i, ag) in agents.iter().enumerate() {
        let mut base = admin::entry(
            &format!("spiffe://{TD}/bench/agent-{i}/base"),
            &ag.spiffe_id,
            &[my_uid_selector()],
        );
        base.hint = "base".into();
        entries.push(base);
        for j in 1..per_agent {
            entries.push(admin::entry(
                &format!("spiffe://{TD}/bench/agent-{i}/other-{j}"),
                &ag.spiffe_id,
                &[other_uid_selector(j)],
            ));
        }
    }
    admin::create_many(&adm, entries, 8).await?;
    for ag in &mut agents {
        ag.start(&bins, &server).await?;
    }
    for ag in &mut agents {
        ag.wait_ready(per_agent as u64, per_agent as u64, Duration::from_secs(120))
            .await?;
    }

    // One Workload API stream per agent, read by its own task.
    let (tx, mut rx) = mpsc::unbounded_channel::<StreamMsg>();
    let mut readers = tokio::task::JoinSet::new();
    for (i, ag) in agents.iter().enumerate() {
        let mut c = workload::connect(&ag.socket).await?;
        let mut stream = c
            .fetch_x509svid(workload::x509_request())
            .await?
            .into_inner();
        let tx = tx.clone();
        readers.spawn(async move {
            let _keep = c;
            while let Ok(Some(m)) = stream.message().await {
                let at = Instant::now();
                let svids = m.svids.into_iter().map(|s| (s.spiffe_id, s.hint)).collect();
                if tx.send((i, at, svids)).is_err() {
                    return;
                }
            }
        });
    }
    for _ in 0..n_agents {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await?
            .ok_or("stream readers ended")?;
    }

    let mut transient: Vec<Option<(String, String)>> = vec![None; n_agents];
    // (op, from return, from call start, admin call duration)
    let mut results: Vec<(Op, Duration, Duration, Duration)> = Vec::new();
    for k in 0..n_changes {
        let i = k % n_agents;
        let round = k / n_agents;
        let op = match round % 3 {
            0 => Op::Create,
            1 => Op::Update,
            _ => Op::Delete,
        };
        let t_call = Instant::now();
        // The SPIFFE ID to look for and the hint it must carry (None: gone).
        let (want_id, want_hint) = match op {
            Op::Create => {
                let id = format!("spiffe://{TD}/bench/agent-{i}/t{round}");
                let mut e = admin::entry(&id, &agents[i].spiffe_id, &[my_uid_selector()]);
                e.hint = "t".into();
                let e = admin::create(&mut adm, e).await?;
                transient[i] = Some((e.id, id.clone()));
                (id, Some("t".to_string()))
            }
            Op::Update => {
                let (eid, id) = transient[i].clone().ok_or("no entry to update")?;
                let hint = format!("u{round}");
                admin::set_hint(&mut adm, &eid, &hint).await?;
                (id, Some(hint))
            }
            Op::Delete => {
                let (eid, id) = transient[i].take().ok_or("no entry to delete")?;
                admin::delete(&mut adm, &eid).await?;
                (id, None)
            }
        };
        let t_ret = Instant::now();
        let deadline = t_ret + Duration::from_secs(10);
        loop {
            let (ag, at, svids) = tokio::time::timeout_at(deadline.into(), rx.recv())
                .await
                .map_err(|_| {
                    format!("change {k} ({op:?} on agent-{i}) not seen on the stream within 10 s")
                })?
                .ok_or("stream readers ended")?;
            if ag != i {
                continue;
            }
            let found = svids.iter().find(|(id, _)| *id == want_id);
            let matches = match (&want_hint, found) {
                (Some(h), Some((_, got))) => got == h,
                (None, None) => true,
                _ => false,
            };
            if matches {
                results.push((
                    op,
                    at.saturating_duration_since(t_ret),
                    at.saturating_duration_since(t_call),
                    t_ret - t_call,
                ));
                break;
            }
        }
    }
    readers.abort_all();

    let all = Samples::from_durations(results.iter().map(|r| r.1));
    let from_call = Samples::from_durations(results.iter().map(|r| r.2));
    let calls = Samples::from_durations(results.iter().map(|r| r.3));
    let of = |op: Op| Samples::from_durations(results.iter().filter(|r| r.0 == op).map(|r| r.1));
    let (c, u, d) = (of(Op::Create), of(Op::Update), of(Op::Delete));
    rep.emit(
        Record::new("propagation")
            .f("p50_ms", all.q_ms(0.5))
            .f("p99_ms", all.q_ms(0.99))
            .f("max_ms", all.max_ms())
            .with("changes", all.len())
            .with("agents", n_agents)
            .with("entries", per_agent * n_agents)
            .with("servers", a.servers)
            .f("create_p50_ms", c.q_ms(0.5))
            .f("create_p99_ms", c.q_ms(0.99))
            .f("update_p50_ms", u.q_ms(0.5))
            .f("update_p99_ms", u.q_ms(0.99))
            .f("delete_p50_ms", d.q_ms(0.5))
            .f("delete_p99_ms", d.q_ms(0.99))
            .f("from_call_p50_ms", from_call.q_ms(0.5))
            .f("from_call_p99_ms", from_call.q_ms(0.99))
            .f("admin_call_p50_ms", calls.q_ms(0.5)),
    );
    rep.table("propagation");
    Ok(())
}
