//! `soak`: a long run of many workloads against one real server and agent,
//! to show that nothing leaks or drifts over time (issue "Hardening", Load).
//!
//! Setup: one server, one agent. The bench process is every workload: it
//! opens `--workloads` Workload API connections (one Unix socket each, as
//! separate processes would), and on each:
//!
//! - keeps one FetchX509SVID stream open for the whole run and checks every
//!   message it receives;
//! - every `--fetch-interval` seconds fetches again (a new stream, first
//!   message, dropped), and on every fourth such tick also fetches a
//!   JWT-SVID for audience `soak`.
//!
//! The entry the workloads match has an X.509-SVID TTL of `--svid-ttl`
//! (default 120 s), so the agent rotates it about every minute. Every
//! `--churn-interval` seconds the bench creates an entry that matches the
//! workloads and, once five exist, deletes the oldest, so every stream sees
//! entries come and go. The server also holds entries for other workloads.
//!
//! Every X.509-SVID received is checked: the chain verifies against the
//! bundle in the same message (webpki, the response's CRLs applied) at the
//! moment it arrives, the URI SAN is the `spiffe_id` field, and the private
//! key is the leaf's. Every JWT-SVID is validated with the JWT bundle from
//! the Workload API (signature, `exp`, `aud`, `sub`). Every
//! `--openssl-interval` seconds one SVID just received is also written to
//! PEM files and checked with `openssl verify`, a verifier no one here
//! wrote. Once a minute the RSS and open descriptor count of the server
//! and agent are read from /proc.
//!
//! The scenario fails if any RPC, check or stream failed; the record gives
//! the counts, rotations seen per stream, and RSS/descriptors at the start
//! (every stream open and served), end and maximum, with the slope over the
//! second half of the run.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, UnixTime};
use sigil_core::TrustDomain;
use sigil_core::jwt::JwtBundle;
use sigil_proto::workload::{JwtBundlesRequest, JwtsvidRequest, X509svid, X509svidResponse};

use crate::Result;
use crate::clients::{admin, workload};
use crate::harness::{Agent, Bins, Scratch, Server, TD, my_uid_selector, other_uid_selector};
use crate::report::{Record, Reporter, progress};

#[derive(clap::Args, Default)]
pub(crate) struct Args {
    /// Length of the run in minutes (default 60; 1 with --quick).
    #[arg(long)]
    minutes: Option<f64>,
    /// Workload API connections, each with an open stream (default 1000; 50 with --quick).
    #[arg(long)]
    workloads: Option<usize>,
    /// Seconds between a workload's fetches (default 5).
    #[arg(long)]
    fetch_interval: Option<f64>,
    /// Seconds between entry changes (default 10; 5 with --quick).
    #[arg(long)]
    churn_interval: Option<f64>,
    /// X.509-SVID TTL of the entries, in seconds (default 120; 20 with --quick).
    #[arg(long)]
    svid_ttl: Option<i64>,
    /// Seconds between `openssl verify` spot checks (default 30; 5 with --quick).
    #[arg(long)]
    openssl_interval: Option<f64>,
    /// Entries for other workloads on the agent (default 100; 10 with --quick).
    #[arg(long)]
    other_entries: Option<usize>,
    /// The server's `datastore.cache_mib` (default: the server's default).
    #[arg(long)]
    redb_cache_mib: Option<u32>,
}

/// Counters shared by every workload task.
#[derive(Default)]
struct Counters {
    x509_checked: AtomicU64,
    jwt_checked: AtomicU64,
    fetches: AtomicU64,
    stream_messages: AtomicU64,
    errors: AtomicU64,
    openssl_ok: AtomicU64,
    openssl_checks: AtomicU64,
    first_errors: Mutex<Vec<String>>,
    /// The latest SVID a stream received, for the openssl spot check.
    latest: Mutex<Option<X509svid>>,
}

impl Counters {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Relaxed);
        if let Ok(mut v) = self.first_errors.lock()
            && v.len() < 20
        {
            progress(format!("soak: error: {what}"));
            v.push(what);
        }
    }
}

/// The JWT bundles as the Workload API last sent them.
type JwtBundles = Arc<Mutex<BTreeMap<TrustDomain, JwtBundle>>>;

/// One reading of a process.
#[derive(Clone, Copy, Debug)]
struct Reading {
    at_min: f64,
    rss_kib: u64,
    fds: u64,
}

fn read_proc(pid: u32, at_min: f64) -> Result<Reading> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or("VmRSS missing")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(Reading {
        at_min,
        rss_kib,
        fds,
    })
}

/// Least-squares slope of `f` over the readings, per minute.
fn slope(rs: &[Reading], f: impl Fn(&Reading) -> f64) -> f64 {
    let n = rs.len() as f64;
    if rs.len() < 2 {
        return 0.0;
    }
    let mx = rs.iter().map(|r| r.at_min).sum::<f64>() / n;
    let my = rs.iter().map(&f).sum::<f64>() / n;
    let sxy: f64 = rs.iter().map(|r| (r.at_min - mx) * (f(r) - my)).sum();
    let sxx: f64 = rs.iter().map(|r| (r.at_min - mx).powi(2)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

/// Checks one X.509-SVID as a relying party would; returns its serial.
fn check_x509(s: &X509svid, crls: &[bytes::Bytes]) -> std::result::Result<Vec<u8>, String> {
    let chain = sigil_core::x509::split_der_certs(&s.x509_svid).map_err(|e| e.to_string())?;
    let roots = sigil_core::x509::split_der_certs(&s.bundle).map_err(|e| e.to_string())?;
    let (leaf, rest) = chain.split_first().ok_or("empty x509_svid")?;
    let inter: Vec<CertificateDer<'_>> =
        rest.iter().map(|c| CertificateDer::from(&c[..])).collect();
    let id = sigil_core::tls::verify_svid_chain_with_crls(
        &roots,
        &CertificateDer::from(&leaf[..]),
        &inter,
        UnixTime::now(),
        false,
        crls,
    )?;
    if id.to_string() != s.spiffe_id {
        return Err(format!(
            "URI SAN {id} differs from spiffe_id {}",
            s.spiffe_id
        ));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &s.x509_svid_key,
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|e| format!("x509_svid_key: {e}"))?;
    use ring::signature::KeyPair;
    if key.public_key().as_ref() != cert.public_key().subject_public_key.data.as_ref() {
        return Err(format!("{}: the key is not the leaf's", s.spiffe_id));
    }
    Ok(cert.raw_serial().to_vec())
}

/// Checks every SVID of a response; counts them.
fn check_response(m: &X509svidResponse, c: &Counters, what: &str) -> Vec<(String, Vec<u8>)> {
    if m.svids.is_empty() {
        c.error(format!("{what}: a response without SVIDs"));
    }
    let mut out = Vec::new();
    for s in &m.svids {
        match check_x509(s, &m.crl) {
            Ok(serial) => {
                c.x509_checked.fetch_add(1, Relaxed);
                out.push((s.spiffe_id.clone(), serial));
            }
            Err(e) => c.error(format!("{what}: {}: {e}", s.spiffe_id)),
        }
    }
    out
}

fn jwt_request() -> tonic::Request<JwtsvidRequest> {
    let mut req = tonic::Request::new(JwtsvidRequest {
        audience: vec!["soak".into()],
        spiffe_id: String::new(),
    });
    req.metadata_mut().insert(
        sigil_proto::WORKLOAD_API_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

fn jwt_bundles_request() -> tonic::Request<JwtBundlesRequest> {
    let mut req = tonic::Request::new(JwtBundlesRequest::default());
    req.metadata_mut().insert(
        sigil_proto::WORKLOAD_API_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// Keeps `bundles` equal to what the agent's FetchJWTBundles stream sends.
async fn watch_jwt_bundles(
    mut c: workload::Client,
    bundles: JwtBundles,
    first: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let mut stream = c
        .fetch_jwt_bundles(jwt_bundles_request())
        .await?
        .into_inner();
    let mut first = Some(first);
    while let Some(m) = stream.message().await? {
        let mut map = BTreeMap::new();
        for (td, doc) in m.bundles {
            let name = td.strip_prefix("spiffe://").unwrap_or(&td);
            let td = TrustDomain::new(name).map_err(|e| format!("bundle key {td:?}: {e}"))?;
            map.insert(td, JwtBundle::from_jwks(&doc)?);
        }
        if let Ok(mut b) = bundles.lock() {
            *b = map;
        }
        if let Some(f) = first.take() {
            let _ = f.send(());
        }
    }
    Ok(())
}

/// One workload's open stream, until `end`; returns the distinct serials
/// of `watched` it saw (rotations + 1).
async fn stream_task(
    mut c: workload::Client,
    watched: String,
    counters: Arc<Counters>,
    end: Instant,
    share_latest: bool,
) -> usize {
    let mut serials = std::collections::HashSet::new();
    let mut stream = match c.fetch_x509svid(workload::x509_request()).await {
        Ok(s) => s.into_inner(),
        Err(e) => {
            counters.error(format!("stream open: {e}"));
            return 0;
        }
    };
    loop {
        let next = tokio::time::timeout_at(end.into(), stream.message()).await;
        let m = match next {
            Err(_) => return serials.len(),
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => {
                counters.error("a stream ended before the run did".into());
                return serials.len();
            }
            Ok(Err(e)) => {
                counters.error(format!("stream: {e}"));
                return serials.len();
            }
        };
        counters.stream_messages.fetch_add(1, Relaxed);
        for (id, serial) in check_response(&m, &counters, "stream") {
            if id == watched {
                serials.insert(serial);
            }
        }
        if share_latest && let (Some(s), Ok(mut l)) = (m.svids.first(), counters.latest.lock()) {
            *l = Some(s.clone());
        }
    }
}

/// One workload's periodic fetches (X.509, and JWT every fourth), until `end`.
async fn fetch_task(
    mut c: workload::Client,
    offset: Duration,
    interval: Duration,
    counters: Arc<Counters>,
    bundles: JwtBundles,
    end: Instant,
) {
    let mut tick = tokio::time::interval_at((Instant::now() + offset).into(), interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            return;
        }
        n += 1;
        counters.fetches.fetch_add(1, Relaxed);
        match c.fetch_x509svid(workload::x509_request()).await {
            Ok(s) => match s.into_inner().message().await {
                Ok(Some(m)) => {
                    check_response(&m, &counters, "fetch");
                }
                Ok(None) => counters.error("fetch: stream ended without a message".into()),
                Err(e) => counters.error(format!("fetch: {e}")),
            },
            Err(e) => counters.error(format!("fetch: {e}")),
        }
        if !n.is_multiple_of(4) {
            continue;
        }
        match c.fetch_jwtsvid(jwt_request()).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.svids.is_empty() {
                    counters.error("jwt: a response without SVIDs".into());
                }
                for s in r.svids {
                    let checked = bundles
                        .lock()
                        .map_err(|_| "bundle lock poisoned".to_string())
                        .and_then(|b| {
                            sigil_core::jwt::validate(&s.svid, "soak", &b)
                                .map_err(|e| e.to_string())
                        });
                    match checked {
                        Ok(v) if v.spiffe_id.to_string() == s.spiffe_id => {
                            counters.jwt_checked.fetch_add(1, Relaxed);
                        }
                        Ok(v) => counters.error(format!(
                            "jwt: sub {} differs from spiffe_id {}",
                            v.spiffe_id, s.spiffe_id
                        )),
                        Err(e) => counters.error(format!("jwt: {}: {e}", s.spiffe_id)),
                    }
                }
            }
            Err(e) => counters.error(format!("jwt: {e}")),
        }
    }
}

/// `openssl verify` of the latest SVID a stream received.
fn openssl_check(dir: &Path, s: &X509svid) -> std::result::Result<(), String> {
    let chain = sigil_core::x509::split_der_certs(&s.x509_svid).map_err(|e| e.to_string())?;
    let roots = sigil_core::x509::split_der_certs(&s.bundle).map_err(|e| e.to_string())?;
    let (leaf, rest) = chain.split_first().ok_or("empty x509_svid")?;
    let write = |name: &str, ders: &[Vec<u8>]| -> std::result::Result<std::path::PathBuf, String> {
        let p = dir.join(name);
        std::fs::write(
            &p,
            sigil_core::x509::certs_to_pem(ders.iter().map(Vec::as_slice)),
        )
        .map_err(|e| e.to_string())?;
        Ok(p)
    };
    let leaf_p = write("leaf.pem", std::slice::from_ref(leaf))?;
    let roots_p = write("bundle.pem", &roots)?;
    let mut cmd = std::process::Command::new("openssl");
    cmd.arg("verify").arg("-CAfile").arg(&roots_p);
    if !rest.is_empty() {
        cmd.arg("-untrusted").arg(write("chain.pem", rest)?);
    }
    let out = cmd
        .arg(&leaf_p)
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && text.trim_end().ends_with(": OK") {
        Ok(())
    } else {
        Err(format!(
            "openssl verify of {}: {} {}",
            s.spiffe_id,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Raises this process's descriptor limit to its hard limit (the
/// workloads' sockets); children inherit it.
fn raise_nofile() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

pub(crate) async fn run(a: &Args, quick: bool, rep: &mut Reporter) -> Result<()> {
    let minutes = a.minutes.unwrap_or(if quick { 1.0 } else { 60.0 });
    let n = a.workloads.unwrap_or(if quick { 50 } else { 1000 }).max(1);
    let fetch_every = Duration::from_secs_f64(a.fetch_interval.unwrap_or(5.0).max(0.05));
    let churn_every = Duration::from_secs_f64(
        a.churn_interval
            .unwrap_or(if quick { 5.0 } else { 10.0 })
            .max(0.1),
    );
    let ttl = a.svid_ttl.unwrap_or(if quick { 20 } else { 120 }).max(10);
    let openssl_every = Duration::from_secs_f64(
        a.openssl_interval
            .unwrap_or(if quick { 5.0 } else { 30.0 })
            .max(1.0),
    );
    let sample_every = Duration::from_secs(if quick { 10 } else { 60 });
    let n_other = a.other_entries.unwrap_or(if quick { 10 } else { 100 });
    let nofile = raise_nofile()?;
    if (n as u64) * 2 + 256 > nofile {
        return Err(
            format!("{n} workloads need more descriptors than RLIMIT_NOFILE {nofile}").into(),
        );
    }

    let bins = Bins::locate()?;
    let scratch = Scratch::new("soak")?;
    let extra = match a.redb_cache_mib {
        Some(m) => format!("[datastore]\nkind = \"redb\"\ncache_mib = {m}\n"),
        None => String::new(),
    };
    let server = Server::start_with(&bins, &scratch.0, None, &extra).await?;
    let db_path = scratch.0.join("server/datastore.redb");
    let db_kib = || {
        std::fs::metadata(&db_path)
            .map(|m| m.len() / 1024)
            .unwrap_or(0)
    };
    let adm = server.admin.clone();
    let mut agent = Agent::configure(&server, &scratch.0, "agent-0")?;
    let watched = format!("spiffe://{TD}/soak/workload");
    let mut base = admin::entry(&watched, &agent.spiffe_id, &[my_uid_selector()]);
    base.x509_svid_ttl = ttl;
    let mut entries = vec![base];
    for j in 0..n_other {
        let mut e = admin::entry(
            &format!("spiffe://{TD}/soak/other-{j}"),
            &agent.spiffe_id,
            &[other_uid_selector(j)],
        );
        e.x509_svid_ttl = ttl;
        entries.push(e);
    }
    admin::create_many(&adm, entries, 8).await?;
    agent.start(&bins, &server).await?;
    let want = (n_other + 1) as u64;
    agent
        .wait_ready(want, want, Duration::from_secs(120))
        .await?;
    progress(format!(
        "soak: {minutes} min, {n} workloads, fetch every {fetch_every:?}, churn every \
         {churn_every:?}, SVID TTL {ttl} s"
    ));

    let counters = Arc::new(Counters::default());
    let bundles: JwtBundles = Arc::default();
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(workload::connect(&agent.socket).await?);
    }
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(watch_jwt_bundles(
        clients[0].clone(),
        bundles.clone(),
        first_tx,
    ));
    tokio::time::timeout(Duration::from_secs(10), first_rx)
        .await
        .map_err(|_| "no JWT bundle within 10 s")??;

    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(minutes * 60.0);
    let mut streams = tokio::task::JoinSet::new();
    let mut fetchers = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        streams.spawn(stream_task(
            c.clone(),
            watched.clone(),
            counters.clone(),
            end,
            i == 0,
        ));
        let offset = fetch_every.mul_f64(i as f64 / n as f64);
        fetchers.spawn(fetch_task(
            c.clone(),
            offset,
            fetch_every,
            counters.clone(),
            bundles.clone(),
            end,
        ));
    }
    drop(clients);

    // Entry churn.
    let churn = {
        let mut adm = adm.clone();
        let parent = agent.spiffe_id.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut live = std::collections::VecDeque::new();
            let (mut created, mut deleted) = (0u64, 0u64);
            let mut tick = tokio::time::interval(churn_every);
            tick.tick().await;
            while Instant::now() + churn_every < end {
                tick.tick().await;
                let mut e = admin::entry(
                    &format!("spiffe://{TD}/soak/churn-{created}"),
                    &parent,
                    &[my_uid_selector()],
                );
                e.x509_svid_ttl = ttl;
                match admin::create(&mut adm, e).await {
                    Ok(e) => {
                        created += 1;
                        live.push_back(e.id);
                    }
                    Err(err) => counters.error(format!("churn create: {err}")),
                }
                if live.len() > 4
                    && let Some(id) = live.pop_front()
                {
                    match admin::delete(&mut adm, &id).await {
                        Ok(()) => deleted += 1,
                        Err(err) => counters.error(format!("churn delete: {err}")),
                    }
                }
            }
            (created, deleted)
        })
    };

    // Readings and spot checks until the end.
    let (server_pid, agent_pid) = (server.proc.pid(), agent.proc()?.pid());
    // The start readings: once every stream has delivered its first message.
    let open_by = Instant::now() + Duration::from_secs(60);
    while counters.stream_messages.load(Relaxed) < n as u64 {
        if Instant::now() > open_by {
            return Err("soak: not every stream delivered an SVID within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m0 = t0.elapsed().as_secs_f64() / 60.0;
    let mut server_r = vec![read_proc(server_pid, m0)?];
    let mut agent_r = vec![read_proc(agent_pid, m0)?];
    let db_kib_start = db_kib();
    let mut next_sample = t0 + sample_every;
    let mut next_openssl = t0 + openssl_every;
    let ssl_dir = scratch.0.join("openssl");
    std::fs::create_dir_all(&ssl_dir)?;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let wake = next_sample.min(next_openssl).min(end);
        tokio::time::sleep_until(wake.into()).await;
        let now = Instant::now();
        if now >= next_openssl {
            next_openssl += openssl_every;
            let latest = counters.latest.lock().ok().and_then(|l| l.clone());
            if let Some(s) = latest {
                counters.openssl_checks.fetch_add(1, Relaxed);
                match openssl_check(&ssl_dir, &s) {
                    Ok(()) => {
                        counters.openssl_ok.fetch_add(1, Relaxed);
                    }
                    Err(e) => counters.error(e),
                }
            }
        }
        if now >= next_sample || now >= end {
            next_sample += sample_every;
            let m = t0.elapsed().as_secs_f64() / 60.0;
            agent.proc.as_mut().ok_or("agent gone")?.check_alive()?;
            let (s, g) = (read_proc(server_pid, m)?, read_proc(agent_pid, m)?);
            progress(format!(
                "soak: {m:.1} min: x509 {} jwt {} errors {} | server {} KiB {} fds, \
                 datastore {} KiB | agent {} KiB {} fds",
                counters.x509_checked.load(Relaxed),
                counters.jwt_checked.load(Relaxed),
                counters.errors.load(Relaxed),
                s.rss_kib,
                s.fds,
                db_kib(),
                g.rss_kib,
                g.fds
            ));
            server_r.push(s);
            agent_r.push(g);
        }
    }
    let mut serials = Vec::new();
    while let Some(r) = streams.join_next().await {
        serials.push(r.unwrap_or(0));
    }
    while fetchers.join_next().await.is_some() {}
    let (created, deleted) = churn.await.unwrap_or((0, 0));
    watcher.abort();
    let m = t0.elapsed().as_secs_f64() / 60.0;
    server_r.push(read_proc(server_pid, m)?);
    agent_r.push(read_proc(agent_pid, m)?);

    let rotations: Vec<u64> = serials.iter().map(|s| s.saturating_sub(1) as u64).collect();
    let rot_min = rotations.iter().copied().min().unwrap_or(0);
    let rot_mean = rotations.iter().sum::<u64>() as f64 / rotations.len().max(1) as f64;
    let half = |rs: &[Reading]| rs[rs.len() / 2..].to_vec();
    let first = |rs: &[Reading]| rs.first().copied();
    let last = |rs: &[Reading]| rs.last().copied();
    let max = |rs: &[Reading], f: fn(&Reading) -> u64| rs.iter().map(f).max().unwrap_or(0);
    let (s0, s1) = (
        first(&server_r).ok_or("no reading")?,
        last(&server_r).ok_or("no reading")?,
    );
    let (g0, g1) = (
        first(&agent_r).ok_or("no reading")?,
        last(&agent_r).ok_or("no reading")?,
    );
    let errors = counters.errors.load(Relaxed);
    rep.emit(
        Record::new("soak")
            .f("minutes", m)
            .with("workloads", n)
            .with("errors", errors)
            .with("x509_checked", counters.x509_checked.load(Relaxed))
            .with("jwt_checked", counters.jwt_checked.load(Relaxed))
            .with("fetches", counters.fetches.load(Relaxed))
            .with("stream_messages", counters.stream_messages.load(Relaxed))
            .with("openssl_ok", counters.openssl_ok.load(Relaxed))
            .with("openssl_checks", counters.openssl_checks.load(Relaxed))
            .with("rotations_per_stream_min", rot_min)
            .f("rotations_per_stream_mean", rot_mean)
            .with("entries_created", created)
            .with("entries_deleted", deleted)
            .with("server_rss_kib_start", s0.rss_kib)
            .with("server_rss_kib_end", s1.rss_kib)
            .with("server_rss_kib_max", max(&server_r, |r| r.rss_kib))
            .f(
                "server_rss_slope_kib_per_min_2nd_half",
                slope(&half(&server_r), |r| r.rss_kib as f64),
            )
            .with("server_db_kib_start", db_kib_start)
            .with("server_db_kib_end", db_kib())
            .with("server_fds_start", s0.fds)
            .with("server_fds_end", s1.fds)
            .with("server_fds_max", max(&server_r, |r| r.fds))
            .with("agent_rss_kib_start", g0.rss_kib)
            .with("agent_rss_kib_end", g1.rss_kib)
            .with("agent_rss_kib_max", max(&agent_r, |r| r.rss_kib))
            .f(
                "agent_rss_slope_kib_per_min_2nd_half",
                slope(&half(&agent_r), |r| r.rss_kib as f64),
            )
            .with("agent_fds_start", g0.fds)
            .with("agent_fds_end", g1.fds)
            .with("agent_fds_max", max(&agent_r, |r| r.fds)),
    );
    rep.table("soak");
    if errors > 0 {
        let first = counters
            .first_errors
            .lock()
            .map(|v| v.join("\n  "))
            .unwrap_or_default();
        return Err(format!("soak: {errors} errors; the first:\n  {first}").into());
    }
    if minutes * 60.0 > ttl as f64 && rot_min == 0 {
        return Err("soak: a stream saw no rotation of its SVID".into());
    }
    Ok(())
}
