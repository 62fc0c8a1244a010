//! `fetch --docker`: FetchX509SVID latency with the clients inside Docker
//! containers, once against an agent with only the `unix` attestor and
//! once against an agent with `[workload_attestor.docker]` enabled (cached
//! metadata, `cache_ttl = "5s"`), in the same run on the same dockerd.
//!
//! Each run starts one container (`--network none`, the agent's socket
//! directory bind-mounted, an image made by `docker import` from this
//! binary and the libraries `ldd` lists) running the hidden
//! `sigil-bench fetch-client` subcommand: N connections in a closed loop,
//! as `fetch` does, latencies measured inside the container and printed as
//! one JSON line. The docker agent's entry needs a container label
//! (`docker:label:bench:fetch`), so every fetch went through the Engine
//! API answer (or its cache). dockerd is the one on /var/run/docker.sock,
//! else the tests' one under /tmp/sigil-test-dockerd, else one started
//! here (`--iptables=false --bridge=none`) and stopped at the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::Result;
use crate::clients::{admin, workload};
use crate::harness::{Agent, Bins, Scratch, Server, TD, my_uid_selector};
use crate::report::{Record, Reporter, progress};
use crate::stats::Samples;

const IMAGE: &str = "sigil-bench-client:latest";

fn docker(sock: &str, args: &[&str]) -> std::io::Result<Output> {
    Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{sock}"))
        .args(args)
        .output()
}

fn answers(sock: &str) -> bool {
    Path::new(sock).exists()
        && docker(sock, &["version", "--format", "{{.Server.Version}}"])
            .is_ok_and(|o| o.status.success())
}

/// A dockerd socket, and the daemon if this run started it.
fn engine(scratch: &Path) -> Result<(String, Option<Child>)> {
    for s in [
        "/var/run/docker.sock",
        "/tmp/sigil-test-dockerd/docker.sock",
    ] {
        if answers(s) {
            return Ok((s.to_string(), None));
        }
    }
    let dir = scratch.join("dockerd");
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("docker.sock").display().to_string();
    let child = Command::new("dockerd")
        .args([
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--host",
            &format!("unix://{sock}"),
            "--data-root",
            &dir.join("data").display().to_string(),
            "--exec-root",
            &dir.join("exec").display().to_string(),
            "--pidfile",
            &dir.join("docker.pid").display().to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("dockerd.log"))?)
        .spawn()
        .map_err(|e| format!("dockerd (Debian: docker.io): {e}"))?;
    let start = Instant::now();
    while !answers(&sock) {
        if start.elapsed() > Duration::from_secs(90) {
            return Err(format!("dockerd did not answer on {sock} within 90 s").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((sock, Some(child)))
}

/// `docker import` of this binary and its libraries.
fn import_image(sock: &str, scratch: &Path) -> Result<()> {
    let me = std::env::current_exe()?;
    let root = scratch.join("image-root");
    let mut files: Vec<PathBuf> = vec![me.clone()];
    let out = Command::new("ldd").arg(&me).output()?;
    for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if word.starts_with('/') {
            files.push(PathBuf::from(word));
        }
    }
    for f in &files {
        let dest = if f == &me {
            root.join("sigil-bench")
        } else {
            root.join(f.strip_prefix("/")?)
        };
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::copy(f, &dest).map_err(|e| format!("copy {}: {e}", f.display()))?;
    }
    let tar = scratch.join("image.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    if !st.success() {
        return Err("tar of the client image failed".into());
    }
    let out = docker(sock, &["import", &tar.display().to_string(), IMAGE])?;
    if !out.status.success() {
        return Err(format!(
            "docker import: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// `sigil-bench fetch-client` (inside a container): closed-loop fetches.
#[derive(clap::Args)]
pub(crate) struct ClientArgs {
    #[arg(long)]
    socket: PathBuf,
    #[arg(long)]
    clients: usize,
    #[arg(long)]
    seconds: f64,
    #[arg(long)]
    warm: f64,
}

/// Runs the clients and prints `{"latencies_ns": [...], "errors": N,
/// "first_error": ...}`.
pub(crate) async fn client(a: &ClientArgs) -> Result<()> {
    let mut conns = Vec::with_capacity(a.clients);
    for _ in 0..a.clients {
        conns.push(workload::connect(&a.socket).await?);
    }
    let measure_from = Instant::now() + Duration::from_secs_f64(a.warm);
    let until = measure_from + Duration::from_secs_f64(a.seconds);
    let mut set = tokio::task::JoinSet::new();
    for mut c in conns {
        set.spawn(async move {
            let (mut lat, mut errors, mut first_error) = (Vec::new(), 0u64, None::<String>);
            loop {
                let start = Instant::now();
                if start >= until {
                    return (lat, errors, first_error);
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
                match res {
                    Ok(1) if start >= measure_from => {
                        lat.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
                    }
                    Ok(1) => {}
                    Ok(n) => {
                        errors += 1;
                        first_error.get_or_insert(format!("{n} SVIDs instead of 1"));
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                }
            }
        });
    }
    let (mut all, mut errors, mut first) = (Vec::new(), 0, None);
    while let Some(r) = set.join_next().await {
        let (l, e, f) = r?;
        all.extend(l);
        errors += e;
        if first.is_none() {
            first = f;
        }
    }
    println!(
        "{}",
        serde_json::json!({"latencies_ns": all, "errors": errors, "first_error": first})
    );
    Ok(())
}

/// One container run against `agent`; emits its record.
#[allow(clippy::too_many_arguments)]
fn measure(
    sock: &str,
    agent: &Agent,
    attestors: &str,
    labels: &[&str],
    n: usize,
    secs: f64,
    warm: f64,
    rep: &mut Reporter,
) -> Result<()> {
    let dir = agent
        .socket
        .parent()
        .ok_or("agent socket has no directory")?;
    let mount = format!("{}:/sigil:ro", dir.display());
    let (n_s, secs_s, warm_s) = (n.to_string(), secs.to_string(), warm.to_string());
    let mut args = vec!["run", "--rm", "--network", "none", "-v", &mount];
    for l in labels {
        args.extend(["--label", l]);
    }
    args.extend([
        IMAGE,
        "/sigil-bench",
        "fetch-client",
        "--socket",
        "/sigil/api.sock",
        "--clients",
        &n_s,
        "--seconds",
        &secs_s,
        "--warm",
        &warm_s,
    ]);
    let agent_cpu0 = agent.proc()?.cpu_time()?;
    let start = Instant::now();
    let out = docker(sock, &args)?;
    let wall = start.elapsed();
    if !out.status.success() {
        return Err(format!(
            "docker run of the client: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    let agent_cpu = agent.proc()?.cpu_time()? - agent_cpu0;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "client output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let lat: Vec<Duration> = v["latencies_ns"]
        .as_array()
        .ok_or("client output: no latencies_ns")?
        .iter()
        .filter_map(|x| x.as_u64())
        .map(Duration::from_nanos)
        .collect();
    let errors = v["errors"].as_u64().unwrap_or(0);
    let s = Samples::from_durations(lat);
    let mut rec = Record::new("fetch_docker")
        .with("attestors", attestors)
        .with("clients", n)
        .f("p50_us", s.q_us(0.5))
        .f("p99_us", s.q_us(0.99))
        .f("max_us", s.max_us())
        .f("per_sec", s.len() as f64 / secs)
        .with("fetches", s.len())
        .with("errors", errors)
        .f(
            "agent_cpu_util",
            agent_cpu.as_secs_f64() / wall.as_secs_f64(),
        );
    if let Some(e) = v["first_error"].as_str() {
        progress(format!(
            "fetch --docker: {errors} failed fetches, first: {e}"
        ));
        rec = rec.with("first_error", e);
    }
    rep.emit(rec);
    Ok(())
}

pub(crate) async fn run(levels: &[usize], secs: f64, rep: &mut Reporter) -> Result<()> {
    let warm = (secs / 5.0).min(1.0);
    let bins = Bins::locate()?;
    let scratch = Scratch::new("fetch-docker")?;
    let (sock, mut daemon) = engine(&scratch.0)?;
    let result = async {
        import_image(&sock, &scratch.0)?;
        // The unix attestor re-hashes an executable whose inode changed in
        // the last 2 s (its racy window) on every call; the freshly
        // imported binary must be older than that, or the first run would
        // measure hashing 30 MB per fetch.
        let imported = Instant::now();
        let server = Server::start(&bins, &scratch.0, None).await?;
        let mut plain = Agent::configure(&server, &scratch.0, "agent-unix")?;
        let mut dock = Agent::configure(&server, &scratch.0, "agent-docker")?;
        let cfg = std::fs::read_to_string(&dock.cfg_path)?;
        std::fs::write(
            &dock.cfg_path,
            format!(
                "{cfg}[workload_attestor.docker]\nsocket_path = \"{sock}\"\ncache_ttl = \"5s\"\ntimeout = \"2s\"\n"
            ),
        )?;
        let entries = vec![
            admin::entry(
                &format!("spiffe://{TD}/bench/fetch-unix"),
                &plain.spiffe_id,
                &[my_uid_selector()],
            ),
            admin::entry(
                &format!("spiffe://{TD}/bench/fetch-docker"),
                &dock.spiffe_id,
                &[my_uid_selector(), "docker:label:bench:fetch".to_string()],
            ),
        ];
        admin::create_many(&server.admin, entries, 2).await?;
        for a in [&mut plain, &mut dock] {
            a.start(&bins, &server).await?;
            a.wait_ready(1, 1, Duration::from_secs(120)).await?;
        }
        let settled = imported + Duration::from_secs(3);
        tokio::time::sleep_until(settled.into()).await;
        for &n in levels {
            progress(format!("fetch --docker: {n} clients in a container, unix only"));
            measure(&sock, &plain, "unix", &[], n, secs, warm, rep)?;
            progress(format!("fetch --docker: {n} clients in a container, unix+docker"));
            measure(&sock, &dock, "unix+docker", &["bench=fetch"], n, secs, warm, rep)?;
        }
        rep.table("fetch_docker");
        Ok::<(), crate::Error>(())
    }
    .await;
    if let Some(d) = daemon.as_mut() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = d.wait();
    }
    result
}
