//! `kill`: time from a kill returning on the admin socket to every affected
//! Workload API stream receiving the update that withdraws the identity.
//!
//! Setup as in `propagation`: one real server, `--agents` real agents,
//! `--entries` entries over them. Each agent also has `--kills / agents`
//! victim entries and one base entry matching the bench process, and one
//! Workload API stream
//! open per agent. Kills alternate between `--spiffe-id` (the victim's ID)
//! and `--entry` (the victim's entry ID); the clock stops when the agent's
//! stream shows the victim gone. Then every agent is killed as a node
//! (`--agent`), one after another, and the clock stops when its stream
//! shows no identity left (an empty update or the stream's end). Selector
//! kills are the same code path on the server as SPIFFE-ID kills (an entry
//! filter) and are not measured separately.
//!
//! CRLs: the example mTLS service (`mtls-server` from examples/, which
//! checks client leaves against the CRLs the Workload API delivers) runs on
//! agent-0's socket and admits agent-0's victims. For every kill of an
//! agent-0 victim the bench keeps presenting the victim's (unexpired)
//! certificate, fetched before the kills, until the service refuses it:
//! `crl_refused_*` is the time from the kill returning to that refusal.

use std::time::{Duration, Instant};

use sigil_proto::admin::kill_target::Target;
use tokio::sync::mpsc;

use crate::Result;
use crate::clients::{admin, mtls_admitted, workload};
use crate::harness::{
    Agent, Bins, Scratch, Server, TD, free_port, my_uid_selector, other_uid_selector,
};
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
    /// Identity kills measured, besides one agent kill per agent (default
    /// 200; 8 with --quick).
    #[arg(long)]
    kills: Option<usize>,
}

/// One message of one agent's stream: (agent, when, SPIFFE IDs; `None`
/// when the stream ended).
type StreamMsg = (usize, Instant, Option<Vec<String>>);

pub(crate) async fn run(a: &Args, quick: bool, rep: &mut Reporter) -> Result<()> {
    let n_agents = a.agents.unwrap_or(if quick { 2 } else { 10 }).max(1);
    let n_entries = a.entries.unwrap_or(if quick { 20 } else { 1000 });
    let n_kills = a.kills.unwrap_or(if quick { 8 } else { 200 });
    let per_agent = (n_entries / n_agents).max(1);
    let victims_per_agent = n_kills.div_ceil(n_agents).max(1);

    let bins = Bins::locate()?;
    let scratch = Scratch::new("kill")?;
    let server = Server::start(&bins, &scratch.0, None).await?;
    let mut agents: Vec<Agent> = (0..n_agents)
        .map(|i| Agent::configure(&server, &scratch.0, &format!("agent-{i}")))
        .collect::<Result<_>>()?;
    progress(format!(
        "kill: {n_agents} agents, {} entries, {n_kills} kills + {n_agents} agent kills",
        (per_agent + victims_per_agent + 1) * n_agents
    ));
    let mut entries = Vec::new();
    for (i, ag) in agents.iter().enumerate() {
        // Never killed by identity: the stream keeps an identity (and stays
        // open) until the agent itself is killed.
        entries.push(admin::entry(
            &format!("spiffe://{TD}/bench/agent-{i}/base"),
            &ag.spiffe_id,
            &[my_uid_selector()],
        ));
        for v in 0..victims_per_agent {
            entries.push(admin::entry(
                &format!("spiffe://{TD}/bench/agent-{i}/victim-{v}"),
                &ag.spiffe_id,
                &[my_uid_selector()],
            ));
        }
        for j in 0..per_agent {
            entries.push(admin::entry(
                &format!("spiffe://{TD}/bench/agent-{i}/other-{j}"),
                &ag.spiffe_id,
                &[other_uid_selector(j + 1)],
            ));
        }
    }
    let created = admin::create_many(&server.admin, entries, 8).await?;
    // Victim entry IDs per agent, in order.
    let mut victims: Vec<Vec<(String, String)>> = vec![Vec::new(); n_agents];
    for e in created {
        for (i, v) in victims.iter_mut().enumerate() {
            if e.spiffe_id
                .starts_with(&format!("spiffe://{TD}/bench/agent-{i}/victim-"))
            {
                v.push((e.id.clone(), e.spiffe_id.clone()));
            }
        }
    }
    let expected = (per_agent + victims_per_agent + 1) as u64;
    for ag in &mut agents {
        ag.start(&bins, &server).await?;
    }
    for ag in &mut agents {
        ag.wait_ready(expected, expected, Duration::from_secs(120))
            .await?;
    }

    // Agent-0's victims as a client would hold them: (chain, key) by ID.
    let mut held: std::collections::HashMap<String, (Vec<Vec<u8>>, Vec<u8>)> =
        std::collections::HashMap::new();
    {
        let mut c = workload::connect(&agents[0].socket).await?;
        let first = c
            .fetch_x509svid(workload::x509_request())
            .await?
            .into_inner()
            .message()
            .await?
            .ok_or("agent-0 sent no SVIDs")?;
        for s in first.svids {
            let chain = sigil_core::x509::split_der_certs(&s.x509_svid)?;
            held.insert(s.spiffe_id, (chain, s.x509_svid_key.to_vec()));
        }
    }
    let mtls_port = free_port()?;
    let mut mtls = tokio::process::Command::new(&bins.mtls_server);
    mtls.arg("--socket")
        .arg(format!("unix://{}", agents[0].socket.display()))
        .arg("--listen")
        .arg(format!("127.0.0.1:{mtls_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    for (_, id) in &victims[0] {
        mtls.arg("--allow").arg(id);
    }
    let _mtls = mtls.spawn()?;
    let probe = victims[0]
        .first()
        .and_then(|(_, id)| held.get(id))
        .ok_or("agent-0 has no victim SVID")?
        .clone();
    let ready = Instant::now() + Duration::from_secs(30);
    while !mtls_admitted(mtls_port, &probe.0, &probe.1)
        .await
        .unwrap_or(false)
    {
        if Instant::now() > ready {
            return Err("mtls-server did not admit a live victim within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
            loop {
                let msg = stream.message().await;
                let at = Instant::now();
                let ids = match msg {
                    Ok(Some(m)) => Some(m.svids.into_iter().map(|s| s.spiffe_id).collect()),
                    _ => None,
                };
                let ended = ids.is_none();
                if tx.send((i, at, ids)).is_err() || ended {
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

    let mut adm = server.admin.clone();
    let mut identity = Vec::new();
    let mut crl_refused = Vec::new();
    for k in 0..n_kills {
        let i = k % n_agents;
        let Some((entry_id, spiffe_id)) = victims[i].pop() else {
            break;
        };
        let target = if k % 2 == 0 {
            Target::SpiffeId(spiffe_id.clone())
        } else {
            Target::EntryId(entry_id)
        };
        admin::kill(&mut adm, target).await?;
        let t_ret = Instant::now();
        identity.push(wait(&mut rx, i, t_ret, |ids| !ids.contains(&spiffe_id)).await?);
        if let Some((chain, key)) = (i == 0).then(|| held.get(&spiffe_id)).flatten() {
            loop {
                if !mtls_admitted(mtls_port, chain, key).await? {
                    crl_refused.push(t_ret.elapsed());
                    break;
                }
                if t_ret.elapsed() > Duration::from_secs(10) {
                    return Err(format!("{spiffe_id} still admitted 10 s after its kill").into());
                }
            }
        }
    }
    let mut node = Vec::new();
    for (i, ag) in agents.iter().enumerate() {
        admin::kill(&mut adm, Target::AgentId(ag.spiffe_id.clone())).await?;
        let t_ret = Instant::now();
        node.push(wait(&mut rx, i, t_ret, |ids| ids.is_empty()).await?);
    }
    readers.abort_all();

    let all = Samples::from_durations(identity.iter().copied());
    let crl = Samples::from_durations(crl_refused.iter().copied());
    let nodes = Samples::from_durations(node.iter().copied());
    rep.emit(
        Record::new("kill")
            .f("p50_ms", all.q_ms(0.5))
            .f("p99_ms", all.q_ms(0.99))
            .f("max_ms", all.max_ms())
            .with("kills", all.len())
            .with("agent_kills", nodes.len())
            .with("agents", n_agents)
            .with("entries", (per_agent + victims_per_agent + 1) * n_agents)
            .f("agent_p50_ms", nodes.q_ms(0.5))
            .f("agent_p99_ms", nodes.q_ms(0.99))
            .f("crl_refused_p50_ms", crl.q_ms(0.5))
            .f("crl_refused_p99_ms", crl.q_ms(0.99))
            .with("crl_kills", crl.len()),
    );
    rep.table("kill");
    Ok(())
}

/// Waits for agent `i`'s stream to show `done` (an ended stream counts as
/// no identities); returns the time from `t_ret`.
async fn wait(
    rx: &mut mpsc::UnboundedReceiver<StreamMsg>,
    i: usize,
    t_ret: Instant,
    done: impl Fn(&[String]) -> bool,
) -> Result<Duration> {
    let deadline = t_ret + Duration::from_secs(10);
    loop {
        let (ag, at, ids) = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .map_err(|_| format!("kill on agent-{i} not seen on its stream within 10 s"))?
            .ok_or("stream readers ended")?;
        if ag != i {
            continue;
        }
        if done(ids.as_deref().unwrap_or(&[])) {
            return Ok(at.saturating_duration_since(t_ret));
        }
    }
}
