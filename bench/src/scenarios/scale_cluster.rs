//! `scale --datastore postgres [--servers N]`: the same load on one server
//! with its redb file and on N servers sharing a throwaway PostgreSQL 15
//! (initdb + pg_ctl, the tests' harness), reported side by side:
//!
//! 1. attest `--agents` simulated agents spread round-robin over the
//!    servers, and a probe agent on the last server;
//! 2. create `--entries` entries on the first server with
//!    `BatchCreateEntries` (1,000 per call, one transaction each):
//!    `entries_created_per_sec`;
//! 3. wait until the probe's fresh sync on the last server holds all its
//!    entries (created last, so that server then holds every entry: each
//!    server applies the change feed in order), then open every
//!    agent's sync stream on its own server: `all_agents_synced_ms`, and
//!    each server's RSS with every stream open;
//! 4. change one of the probe's entries on the first server and time its
//!    arrival on the probe's stream on the last server:
//!    `change_to_probe_p50_ms` / `_p99_ms` (with one server, both are the
//!    same server).

use std::time::{Duration, Instant};

use sigil_proto::agent::SyncRequest;

use super::scale::{
    attest_many, entries_for, fresh_sync, open_all_streams, read_snapshot, until_hint,
};
use crate::Result;
use crate::clients::{SimAgent, admin};
use crate::harness::{Bins, Scratch, Server};
use crate::report::{Record, Reporter, progress};
use crate::stats::Samples;

/// How big the run is.
pub(crate) struct Sizes {
    pub(crate) total: usize,
    pub(crate) n_agents: usize,
    pub(crate) probe_n: usize,
    pub(crate) changes: usize,
}

/// One case: `servers == 1` is redb, more is PostgreSQL.
pub(crate) async fn run(sz: &Sizes, servers: usize, bins: &Bins, rep: &mut Reporter) -> Result<()> {
    let scratch = Scratch::new("scale-cluster")?;
    let case = if servers == 1 {
        "redb, 1 server".to_string()
    } else {
        format!("postgres, {servers} servers")
    };
    // Lives to the end of the case.
    let pg = if servers > 1 {
        let pg = sigil_tests::pg::start("bench-scale")
            .ok_or("PostgreSQL is needed for --datastore postgres")?;
        pg.create_db("sigil");
        Some(pg)
    } else {
        None
    };
    let mut section = match &pg {
        Some(pg) => pg.datastore_section("sigil", &scratch.0.join("pgpass")),
        None => String::new(),
    };
    // Every simulated agent connects from 127.0.0.1.
    section.push_str(super::scale::MANY_AGENTS_FROM_ONE_IP);
    let mut nodes: Vec<Server> = Vec::with_capacity(servers);
    for i in 0..servers {
        let dir = scratch.0.join(format!("s{i}"));
        std::fs::create_dir_all(&dir)?;
        nodes.push(Server::start_with(bins, &dir, None, &section).await?);
    }
    progress(format!(
        "scale ({case}): attesting {} simulated agents and a probe",
        sz.n_agents
    ));
    let mut sims: Vec<SimAgent> = Vec::with_capacity(sz.n_agents);
    for (k, node) in nodes.iter().enumerate() {
        let names: Vec<String> = (0..sz.n_agents)
            .filter(|i| i % servers == k)
            .map(|i| format!("sim-{i}"))
            .collect();
        sims.extend(attest_many(node, names).await?);
    }
    let last = nodes.last().ok_or("no server")?;
    let probe = attest_many(last, vec!["probe".into()])
        .await?
        .pop()
        .ok_or("no probe")?;
    let parents: Vec<String> = sims.iter().map(|s| s.spiffe_id.clone()).collect();

    progress(format!(
        "scale ({case}): creating {} entries on the first server in batches of 1,000",
        sz.total
    ));
    // The probe's entries come last: once its snapshot on the last server
    // is whole, every earlier batch has reached that server too (each
    // server applies the change feed in order).
    let mut entries = entries_for(&parents, sz.total - sz.probe_n, "c");
    entries.extend(entries_for(
        std::slice::from_ref(&probe.spiffe_id),
        sz.probe_n,
        "probe",
    ));
    let t = Instant::now();
    admin::create_batched(&nodes[0].admin, entries, 1000).await?;
    let create_rate = sz.total as f64 / t.elapsed().as_secs_f64();

    // The last server has every entry once the probe's snapshot is whole.
    let t = Instant::now();
    loop {
        let (_, snap) = fresh_sync(&probe).await?;
        if snap.entries.len() == sz.probe_n {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "the probe's server holds {} of {} entries after 120 s",
                snap.entries.len(),
                sz.probe_n
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converged_ms = t.elapsed().as_secs_f64() * 1000.0;

    progress(format!(
        "scale ({case}): opening {} sync streams",
        sz.n_agents
    ));
    let (streams, synced_entries, all_synced_ms) = open_all_streams(&sims).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss: Vec<f64> = nodes
        .iter()
        .map(|n| n.proc.mem().map(|m| m.rss_mb))
        .collect::<Result<_>>()?;

    progress(format!(
        "scale ({case}): {} changes on the first server, seen on the last",
        sz.changes
    ));
    let mut api = probe.api.clone();
    let mut pst = api.sync(SyncRequest { deltas: true }).await?.into_inner();
    let first = read_snapshot(&mut pst).await?;
    let target = first
        .entries
        .first()
        .ok_or("probe has no entries")?
        .id
        .clone();
    let mut adm = nodes[0].admin.clone();
    let mut lat = Vec::with_capacity(sz.changes);
    for k in 0..sz.changes {
        let hint = format!("h{k}");
        admin::set_hint(&mut adm, &target, &hint).await?;
        let t = Instant::now();
        until_hint(&mut pst, &target, &hint).await?;
        lat.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lat = Samples::from_durations(lat);
    let mut rec = Record::new("scale")
        .with("case", case)
        .with("entries", sz.total)
        .with("agents", sz.n_agents + 1)
        .with("servers", servers)
        .f("entries_created_per_sec", create_rate)
        .f("last_server_converged_ms", converged_ms)
        .f("all_agents_synced_ms", all_synced_ms)
        .with("all_agents_synced_entries", synced_entries)
        .f("change_to_probe_p50_ms", lat.q_ms(0.5))
        .f("change_to_probe_p99_ms", lat.q_ms(0.99));
    for (i, r) in rss.iter().enumerate() {
        rec = rec.f(&format!("server{i}_rss_mb"), *r);
    }
    rep.emit(rec);
    drop(streams);
    Ok(())
}
