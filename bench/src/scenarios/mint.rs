//! `mint`: X.509-SVIDs per second the server signs from agent CSR batches.
//!
//! Two measurements, each in the server's default mode (the agent's mTLS
//! channel vouches for its CSRs' keys) and with `verify_csr_signatures =
//! true` (every CSR's self-signature verified, as SPIRE does):
//! - end to end: the real `sigil-server`, pinned to one core, receives
//!   `MintX509Svids` calls of `--batch` CSRs (by default the agent's batch,
//!   `MAX_MINT_BATCH` = 1000)
//!   from a simulated agent (join token, then mTLS with its agent SVID) on
//!   another core, `--inflight` calls at a time so the server never waits
//!   for the client. CSRs are generated before the clock starts (key
//!   generation is the agent's cost). This is `svids_per_sec`, with
//!   issuance audited as always (one audit record and commit per batch);
//!   `no_audit_svids_per_sec` is the same run with the hidden server key
//!   `audit_issuance = false`, the baseline the audit's cost is read from.
//!   Each run is split into `--rounds` rounds with the sign limit of the
//!   server's core measured before the first and after each (nothing in
//!   flight then); the ratio is the SVIDs minted over the signatures that
//!   core could have made in the same seconds, so a host whose speed moves
//!   during the run moves both sides of it.
//! - in process: `sigil_core::x509::Ca::sign_svid` in a loop on one core,
//!   interleaved with sign-limit runs on the same core.
//! - with `--jwt N`, also N JWT-SVIDs through `MintJwtSvid` from one
//!   simulated agent, `--jwt-inflight` calls at a time (each for its own
//!   entry), the server pinned to one core as above: `jwt_per_sec` audited
//!   (one record per JWT-SVID, issuance records sharing commits when they
//!   wait together) and `no_audit_jwt_per_sec`, with the server's CPU per
//!   JWT-SVID for each.
//! - with `--key-manager pkcs11`, also end to end with the server's CA key
//!   in a SoftHSM2 token made for the run (`[key_manager] kind =
//!   "pkcs11"`): `pkcs11_svids_per_sec`, its ratio to the sign limit and
//!   to the default run's SVIDs/s (`pkcs11_vs_disk`).

use std::time::{Duration, Instant};

use sigil_core::x509::{Ca, CsrSignature, new_key_and_csr};
use sigil_core::{SpiffeId, TrustDomain};
use sigil_proto::agent::{
    CsrForEntry, MAX_MINT_BATCH, MintJwtSvidRequest, MintX509SvidsRequest, MintX509SvidsResponse,
};

use crate::Result;
use crate::clients::{SimAgent, admin};
use crate::harness::{
    Bins, CpuSplit, Scratch, Server, TD, cpu_split, nproc, on_pinned_thread, other_uid_selector,
};
use crate::report::{Record, Reporter, progress};
use crate::scenarios::sign_limit::{self, bench_cpu};

#[derive(clap::Args, Default)]
pub(crate) struct Args {
    /// SVIDs signed in process (default 5000; 200 with --quick).
    #[arg(long)]
    inprocess: Option<usize>,
    /// SVIDs minted through the agent API (default 20000; 200 with --quick).
    #[arg(long)]
    svids: Option<usize>,
    /// CSRs per MintX509Svids call (default 1000, the agent's batch and the
    /// server's cap; 50 with --quick).
    #[arg(long)]
    batch: Option<usize>,
    /// Calls in flight (default 2).
    #[arg(long)]
    inflight: Option<usize>,
    /// Rounds each end-to-end run is split into, the server core's sign
    /// limit measured between them (default 5; 2 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// `pkcs11`: also mint with the CA key in a SoftHSM2 token (`disk`,
    /// the default, runs only the keys.json server).
    #[arg(long, default_value = "disk", value_parser = ["disk", "pkcs11"])]
    key_manager: String,
    /// Also mint this many JWT-SVIDs through MintJwtSvid, audited and not
    /// (default 0: skipped).
    #[arg(long, default_value_t = 0)]
    jwt: usize,
    /// MintJwtSvid calls in flight, each for its own entry (default 64).
    #[arg(long, default_value_t = 64)]
    jwt_inflight: usize,
}

/// Counts the SVIDs in a response; fails on the first per-CSR error.
fn issued(resp: &MintX509SvidsResponse) -> Result<usize> {
    if let Some(r) = resp.results.iter().find(|r| !r.error.is_empty()) {
        return Err(format!("server refused entry {}: {}", r.entry_id, r.error).into());
    }
    Ok(resp
        .results
        .iter()
        .filter(|r| !r.svid_chain.is_empty())
        .count())
}

struct InProcess {
    svids_per_sec: f64,
    verify_svids_per_sec: f64,
    /// Mean sign limit measured between the rounds, on the same core.
    sign_limit: f64,
}

/// The in-process figures, in `rounds` rounds interleaved with sign-limit
/// measurements on the same core, so that the ratio does not depend on
/// how fast this (virtual) CPU happens to be at one moment.
fn in_process(n: usize, rounds: usize, slice: Duration) -> Result<InProcess> {
    let td = TrustDomain::new(TD)?;
    let (ca, _) = Ca::generate(&td, Duration::from_secs(86_400))?;
    let csrs: Vec<Vec<u8>> = (0..n)
        .map(|_| new_key_and_csr().map(|(c, _)| c))
        .collect::<std::result::Result<_, _>>()?;
    let id = SpiffeId::new(format!("spiffe://{TD}/bench/mint"))?;
    let ttl = Duration::from_secs(3600);
    for c in csrs.iter().take(50) {
        ca.sign_svid(c, CsrSignature::Verify, &id, &[], ttl)?;
    }
    let (mut t_trust, mut t_verify) = (0.0, 0.0);
    let mut limits = Vec::new();
    let per = n.div_ceil(rounds.max(1)).max(1);
    for chunk in csrs.chunks(per) {
        limits.push(sign_limit::signs_per_sec(slice)?);
        let start = Instant::now();
        for c in chunk {
            ca.sign_svid(c, CsrSignature::TrustChannel, &id, &[], ttl)?;
        }
        t_trust += start.elapsed().as_secs_f64();
        let start = Instant::now();
        for c in chunk {
            ca.sign_svid(c, CsrSignature::Verify, &id, &[], ttl)?;
        }
        t_verify += start.elapsed().as_secs_f64();
    }
    limits.push(sign_limit::signs_per_sec(slice)?);
    Ok(InProcess {
        svids_per_sec: n as f64 / t_trust,
        verify_svids_per_sec: n as f64 / t_verify,
        sign_limit: limits.iter().sum::<f64>() / limits.len() as f64,
    })
}

/// The load of one end-to-end run.
#[derive(Clone, Copy)]
struct Load {
    /// SVIDs to mint, in calls of `batch` CSRs.
    total: usize,
    batch: usize,
    /// Calls in flight.
    inflight: usize,
    /// Rounds the calls are split into, with a sign-limit measurement of
    /// the server's core before the first and after each.
    rounds: usize,
    /// How long each sign-limit measurement signs.
    slice: Duration,
}

/// One end-to-end run against a fresh server.
struct EndToEnd {
    svids_per_sec: f64,
    minted: usize,
    /// The server core's sign limit over the run: the mean of the limits
    /// measured around each round, weighted by the round's duration.
    sign_limit: f64,
    /// Highest minus lowest of those limits, over their mean.
    spread: f64,
    server_cpu_util: f64,
    /// The part of `server_cpu_util` spent in the kernel.
    server_sys_util: f64,
}

async fn end_to_end(load: Load, extra_config: &str, env: &[(String, String)]) -> Result<EndToEnd> {
    let Load {
        total,
        batch,
        inflight,
        rounds,
        slice,
    } = load;
    let server_cpu = (nproc() > 1).then_some(0);
    // The setup stays bound whole: its fields go in order (the server
    // before its directory), also on an early return.
    let mut run = setup("mint", batch, extra_config, env).await?;
    let (server, token, ids) = (
        &run.server,
        std::mem::take(&mut run.token),
        std::mem::take(&mut run.ids),
    );
    progress(format!(
        "mint: {total} SVIDs through MintX509Svids, batches of {batch}, {inflight} in flight, {rounds} rounds, server on {}",
        server_cpu.map_or("all cores".to_string(), |c| format!("CPU {c}"))
    ));
    let port = server.port;
    let pid = server.proc.pid();
    let rounds = rounds.max(1);
    let m = on_pinned_thread(bench_cpu(), move || async move {
        let sim = SimAgent::attest(port, &token).await?;
        let csrs = ids
            .iter()
            .map(|id| {
                Ok(CsrForEntry {
                    entry_id: id.clone(),
                    csr: new_key_and_csr()?.0.into(),
                    ..Default::default()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let req = MintX509SvidsRequest {
            csrs,
            ..Default::default()
        };
        // Warm-up: connection, first allocations.
        issued(
            &sim.api
                .clone()
                .mint_x509_svids(req.clone())
                .await?
                .into_inner(),
        )?;
        let per_round = total.div_ceil(batch).div_ceil(rounds).max(1);
        let mut calls_left = total.div_ceil(batch);
        let mut m = Measured::default();
        // The server's core between rounds, while nothing is in flight.
        m.limits.push(limit_on(server_cpu, slice).await?);
        while calls_left > 0 {
            let calls = per_round.min(calls_left);
            calls_left -= calls;
            let cpu0 = cpu_split(pid)?;
            let start = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            let (mut sent, mut minted) = (0, 0);
            loop {
                while set.len() < inflight && sent < calls {
                    let mut api = sim.api.clone();
                    let r = req.clone();
                    set.spawn(async move { api.mint_x509_svids(r).await });
                    sent += 1;
                }
                match set.join_next().await {
                    None => break,
                    Some(r) => minted += issued(&r??.into_inner())?,
                }
            }
            let elapsed = start.elapsed().as_secs_f64();
            let cpu = cpu_split(pid)? - cpu0;
            m.limits.push(limit_on(server_cpu, slice).await?);
            let limit = m.limits[m.limits.len() - 2..].iter().sum::<f64>() / 2.0;
            m.minted += minted;
            m.elapsed += elapsed;
            m.could_sign += elapsed * limit;
            m.cpu += cpu;
        }
        Ok(m)
    })
    .await?;
    drop(run);
    let mean = m.limits.iter().sum::<f64>() / m.limits.len() as f64;
    let (lo, hi) = m
        .limits
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), &l| {
            (lo.min(l), hi.max(l))
        });
    Ok(EndToEnd {
        svids_per_sec: m.minted as f64 / m.elapsed,
        minted: m.minted,
        sign_limit: m.could_sign / m.elapsed,
        spread: (hi - lo) / mean,
        server_cpu_util: (m.cpu.user + m.cpu.system).as_secs_f64() / m.elapsed,
        server_sys_util: m.cpu.system.as_secs_f64() / m.elapsed,
    })
}

/// A server for one run and what its simulated agent needs.
struct Setup {
    server: Server,
    /// A join token for `spiffe://<TD>/bench/<name>-agent`.
    token: String,
    /// The IDs of that agent's entries.
    ids: Vec<String>,
    /// The server's directory; declared last, so it goes after the server.
    _scratch: Scratch,
}

/// Starts a server (on CPU 0 when there are two cores) with `extra_config`
/// and `env`, and creates `n` entries for the agent `bench/<name>-agent`.
async fn setup(
    name: &str,
    n: usize,
    extra_config: &str,
    env: &[(String, String)],
) -> Result<Setup> {
    let bins = Bins::locate()?;
    let scratch = Scratch::new(name)?;
    let server_cpu = (nproc() > 1).then_some(0);
    let server = Server::start_with_env(&bins, &scratch.0, server_cpu, extra_config, env).await?;
    let agent_id = format!("spiffe://{TD}/bench/{name}-agent");
    let token = server.token(&agent_id).await?;
    let entries = (0..n)
        .map(|i| {
            admin::entry(
                &format!("spiffe://{TD}/bench/{name}/{i}"),
                &agent_id,
                &[other_uid_selector(i)],
            )
        })
        .collect();
    let ids = admin::create_many(&server.admin, entries, 8)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect();
    Ok(Setup {
        server,
        token,
        ids,
        _scratch: scratch,
    })
}

/// What one JWT-SVID run measured.
struct JwtRun {
    per_sec: f64,
    /// Server CPU time (user + system) per JWT-SVID, microseconds.
    cpu_us: f64,
}

/// `n` JWT-SVIDs through `MintJwtSvid`, `inflight` calls at a time from one
/// simulated agent, each caller for its own entry; the server on CPU 0.
async fn jwt_end_to_end(n: usize, inflight: usize, extra_config: &str) -> Result<JwtRun> {
    let inflight = inflight.clamp(1, n.max(1));
    // The setup stays bound whole: its fields go in order (the server
    // before its directory), also on an early return.
    let mut run = setup("jwt", inflight, extra_config, &[]).await?;
    let (server, token, ids) = (
        &run.server,
        std::mem::take(&mut run.token),
        std::mem::take(&mut run.ids),
    );
    progress(format!(
        "mint: {n} JWT-SVIDs through MintJwtSvid, {inflight} in flight{}",
        if extra_config.is_empty() {
            ""
        } else {
            ", issuance not audited"
        }
    ));
    let (port, pid) = (server.port, server.proc.pid());
    let (minted, elapsed, cpu) = on_pinned_thread(bench_cpu(), move || async move {
        let sim = SimAgent::attest(port, &token).await?;
        let request = |id: &str| MintJwtSvidRequest {
            entry_id: id.to_string(),
            audience: vec!["bench".to_string()],
        };
        // Warm-up: the connection, the first signature.
        sim.api.clone().mint_jwt_svid(request(&ids[0])).await?;
        let cpu0 = cpu_split(pid)?;
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for (i, id) in ids.iter().enumerate() {
            let calls = n / inflight + usize::from(i < n % inflight);
            let (mut api, req) = (sim.api.clone(), request(id));
            set.spawn(async move {
                for _ in 0..calls {
                    if api
                        .mint_jwt_svid(req.clone())
                        .await?
                        .into_inner()
                        .token
                        .is_empty()
                    {
                        return Err::<usize, crate::Error>("an empty JWT-SVID".into());
                    }
                }
                Ok(calls)
            });
        }
        let mut minted = 0;
        while let Some(r) = set.join_next().await {
            minted += r??;
        }
        let elapsed = start.elapsed().as_secs_f64();
        Ok::<_, crate::Error>((minted, elapsed, cpu_split(pid)? - cpu0))
    })
    .await?;
    drop(run);
    Ok(JwtRun {
        per_sec: minted as f64 / elapsed,
        cpu_us: 1e6 * (cpu.user + cpu.system).as_secs_f64() / minted.max(1) as f64,
    })
}

/// What the rounds of one end-to-end run add up to.
#[derive(Default)]
struct Measured {
    /// Sign limits of the server's core: before the first round and after
    /// each.
    limits: Vec<f64>,
    minted: usize,
    /// Seconds of minting, all rounds.
    elapsed: f64,
    /// Signatures the server's core could have made in those seconds: each
    /// round's duration times the mean of the limits around it.
    could_sign: f64,
    /// The server's CPU time during the rounds.
    cpu: CpuSplit,
}

/// The sign limit of the server's core, from a thread pinned there.
async fn limit_on(cpu: Option<usize>, d: Duration) -> Result<f64> {
    on_pinned_thread(cpu, move || async move { sign_limit::signs_per_sec(d) }).await
}

/// The default end-to-end run with the CA key in a fresh SoftHSM2 token.
async fn pkcs11_end_to_end(load: Load) -> Result<EndToEnd> {
    use sigil_tests::softhsm::{self, SoftHsm};
    if !softhsm::available() {
        return Err(format!(
            "--key-manager pkcs11 needs SoftHSM2 ({} and softhsm2-util): apt-get install softhsm2",
            softhsm::module().display()
        )
        .into());
    }
    let dir = Scratch::new("mint-hsm")?;
    let hsm = SoftHsm::new(&dir.0, "sigil-bench", "bench-pin-1");
    progress(format!(
        "mint: CA key in SoftHSM2 token {:?} ({})",
        hsm.label,
        softhsm::module().display()
    ));
    end_to_end(load, &hsm.key_manager_toml(), &hsm.env()).await
}

pub(crate) async fn run(a: &Args, quick: bool, rep: &mut Reporter) -> Result<()> {
    let n_in = a.inprocess.unwrap_or(if quick { 200 } else { 5000 });
    let total = a.svids.unwrap_or(if quick { 200 } else { 20_000 });
    let batch = a
        .batch
        .unwrap_or(if quick { 50 } else { MAX_MINT_BATCH })
        .max(1);
    let inflight = a.inflight.unwrap_or(2).max(1);

    let slice = Duration::from_secs_f64(if quick { 0.1 } else { 0.5 });
    progress(format!(
        "mint: {n_in} SVIDs in process (Ca::sign_svid, one core), between sign-limit runs"
    ));
    let rounds = if quick { 2 } else { 5 };
    let inp = on_pinned_thread(bench_cpu(), move || async move {
        in_process(n_in, rounds, slice)
    })
    .await?;
    let load = Load {
        total,
        batch,
        inflight,
        rounds: a.rounds.unwrap_or(rounds),
        slice,
    };

    // Baseline first: the same run with issuance audit off (a hidden
    // server key, for this comparison only), then the default (audited).
    let no_audit = end_to_end(load, "audit_issuance = false\n", &[]).await?;
    let run = end_to_end(load, "", &[]).await?;
    let verify = end_to_end(load, "verify_csr_signatures = true\n", &[]).await?;
    let jwt = match a.jwt {
        0 => None,
        n => Some((
            jwt_end_to_end(n, a.jwt_inflight, "audit_issuance = false\n").await?,
            jwt_end_to_end(n, a.jwt_inflight, "").await?,
        )),
    };
    let pkcs11 = match a.key_manager.as_str() {
        "pkcs11" => Some(pkcs11_end_to_end(load).await?),
        _ => None,
    };
    let mut record = Record::new("mint");
    if let Some(p) = &pkcs11 {
        record = record
            .f("pkcs11_svids_per_sec", p.svids_per_sec)
            .f("pkcs11_ratio", p.svids_per_sec / p.sign_limit)
            .f("pkcs11_vs_disk", p.svids_per_sec / run.svids_per_sec)
            .f("pkcs11_server_cpu_util", p.server_cpu_util);
    }
    if let Some((off, on)) = &jwt {
        record = record
            .f("jwt_per_sec", on.per_sec)
            .f("jwt_server_cpu_us", on.cpu_us)
            .f("no_audit_jwt_per_sec", off.per_sec)
            .f("no_audit_jwt_server_cpu_us", off.cpu_us)
            .with("jwt_inflight", a.jwt_inflight);
    }
    rep.emit(
        record
            .f("svids_per_sec", run.svids_per_sec)
            .f("ratio_to_sign_limit", run.svids_per_sec / run.sign_limit)
            .f("sign_limit_per_sec", run.sign_limit)
            .f("sign_limit_spread", run.spread)
            .with("svids", run.minted)
            .with("batch", batch)
            .with("inflight", inflight)
            .with("server_cores", if nproc() > 1 { 1 } else { nproc() })
            .f("server_cpu_util", run.server_cpu_util)
            .f("server_sys_util", run.server_sys_util)
            .f("no_audit_server_sys_util", no_audit.server_sys_util)
            .f("no_audit_svids_per_sec", no_audit.svids_per_sec)
            .f(
                "no_audit_ratio",
                no_audit.svids_per_sec / no_audit.sign_limit,
            )
            .f("verify_csr_svids_per_sec", verify.svids_per_sec)
            .f("verify_csr_ratio", verify.svids_per_sec / verify.sign_limit)
            .f("inprocess_svids_per_sec", inp.svids_per_sec)
            .f("inprocess_ratio", inp.svids_per_sec / inp.sign_limit)
            .f("inprocess_sign_limit_per_sec", inp.sign_limit)
            .f(
                "inprocess_verify_csr_svids_per_sec",
                inp.verify_svids_per_sec,
            )
            .f(
                "inprocess_verify_csr_ratio",
                inp.verify_svids_per_sec / inp.sign_limit,
            )
            .f("inprocess_us_per_svid", 1e6 / inp.svids_per_sec)
            .f("sign_us", 1e6 / inp.sign_limit),
    );
    rep.table("mint");
    Ok(())
}
