//! Processes under test: the real `sigil-server` and `sigil-agent` binaries
//! in a scratch directory, their memory and CPU from /proc, and CPU pinning.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Result;
use crate::clients::{self, admin};

/// Trust domain of every bench cluster.
pub(crate) const TD: &str = "example.org";

/// Where the binaries are: next to this executable (`target/<profile>/`).
#[derive(Clone)]
pub(crate) struct Bins {
    pub(crate) server: PathBuf,
    pub(crate) agent: PathBuf,
    /// The example mTLS service (used by `kill` for the CRL figure).
    pub(crate) mtls_server: PathBuf,
}

impl Bins {
    pub(crate) fn locate() -> Result<Bins> {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().ok_or("executable has no directory")?;
        let bins = Bins {
            server: dir.join("sigil-server"),
            agent: dir.join("sigil-agent"),
            mtls_server: dir.join("mtls-server"),
        };
        for b in [&bins.server, &bins.agent, &bins.mtls_server] {
            if !b.exists() {
                return Err(format!(
                    "{} is missing: build the binaries in the same profile first \
                     (`cargo build --workspace --bins`, or with `--release` for a release bench)",
                    b.display()
                )
                .into());
            }
        }
        Ok(bins)
    }
}

/// A scratch directory, removed on drop unless `SIGIL_BENCH_KEEP` is set.
/// Its parent is `SIGIL_BENCH_DIR` or the system temp directory.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    pub(crate) fn new(tag: &str) -> Result<Scratch> {
        let base = std::env::var_os("SIGIL_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let p = base.join(format!("sigil-bench-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p)?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("SIGIL_BENCH_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Number of online CPUs.
pub(crate) fn nproc() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Pins the calling thread to `cpu`; threads and processes it creates
/// afterwards inherit the mask.
pub(crate) fn pin_current_thread(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// Spawns `cmd` from a short-lived thread pinned to `cpu` (if any), so
/// that the child and all its threads run on that CPU only.
fn spawn_on(mut cmd: Command, cpu: Option<usize>) -> Result<Child> {
    match cpu {
        None => Ok(cmd.spawn()?),
        Some(cpu) => std::thread::scope(|s| {
            s.spawn(move || -> Result<Child> {
                pin_current_thread(cpu)?;
                Ok(cmd.spawn()?)
            })
            .join()
            .map_err(|_| "spawn thread panicked")?
        }),
    }
}

/// Runs `f` on a new thread pinned to `cpu` with its own single-threaded
/// Tokio runtime, and waits for it without blocking the caller's runtime.
pub(crate) async fn on_pinned_thread<T, F, Fut>(cpu: Option<usize>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    let h = std::thread::spawn(move || -> Result<T> {
        if let Some(cpu) = cpu {
            pin_current_thread(cpu)?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    });
    tokio::task::spawn_blocking(move || h.join().map_err(|_| "pinned thread panicked")).await??
}

/// User + system CPU time process `pid` has used so far (all threads).
pub(crate) fn cpu_time(pid: u32) -> Result<Duration> {
    let t = cpu_split(pid)?;
    Ok(t.user + t.system)
}

/// CPU time a process has used, split as the kernel accounts it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuSplit {
    /// In user space (what callgrind counts).
    pub(crate) user: Duration,
    /// In the kernel on the process's behalf (syscalls: I/O, fsync, futex).
    pub(crate) system: Duration,
}

impl std::ops::AddAssign for CpuSplit {
    fn add_assign(&mut self, o: CpuSplit) {
        self.user += o.user;
        self.system += o.system;
    }
}

impl std::ops::Sub for CpuSplit {
    type Output = CpuSplit;
    fn sub(self, o: CpuSplit) -> CpuSplit {
        CpuSplit {
            user: self.user.saturating_sub(o.user),
            system: self.system.saturating_sub(o.system),
        }
    }
}

/// [`CpuSplit`] of `pid`, from `/proc/<pid>/stat`.
pub(crate) fn cpu_split(pid: u32) -> Result<CpuSplit> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(") ").ok_or("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime); `rest` starts at field 3.
    let ticks = |i: usize| -> Result<Duration> {
        let t: u64 = f.get(i).ok_or("bad stat")?.parse()?;
        // USER_HZ is 100 on every Linux ABI.
        Ok(Duration::from_millis(t * 10))
    };
    Ok(CpuSplit {
        user: ticks(11)?,
        system: ticks(12)?,
    })
}

/// A child process, stopped (SIGTERM, then SIGKILL after 5 s) on drop.
pub(crate) struct Proc {
    child: Option<Child>,
    pub(crate) log: PathBuf,
}

/// Memory of a process from /proc/<pid>/status, in MiB.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mem {
    pub(crate) rss_mb: f64,
    pub(crate) hwm_mb: f64,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf, cpu: Option<usize>) -> Result<Proc> {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        cmd.stdout(Stdio::null()).stderr(f);
        Ok(Proc {
            child: Some(spawn_on(cmd, cpu)?),
            log,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Fails with the log's tail if the process has exited.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = &mut self.child
            && let Some(st) = c.try_wait()?
        {
            return Err(format!(
                "process exited ({st}); log {}:\n{}",
                self.log.display(),
                self.log_tail(20)
            )
            .into());
        }
        Ok(())
    }

    pub(crate) fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// VmRSS and VmHWM.
    pub(crate) fn mem(&self) -> Result<Mem> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kb = |key: &str| -> Result<f64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(key))
                .ok_or_else(|| format!("{key} missing in /proc/{}/status", self.pid()))?;
            let v: f64 = line
                .split_whitespace()
                .nth(1)
                .ok_or("bad status line")?
                .parse()?;
            Ok(v)
        };
        Ok(Mem {
            rss_mb: kb("VmRSS:")? / 1024.0,
            hwm_mb: kb("VmHWM:")? / 1024.0,
        })
    }

    /// User + system CPU time used so far (all threads).
    pub(crate) fn cpu_time(&self) -> Result<Duration> {
        cpu_time(self.pid())
    }

    /// SIGTERM, wait up to 5 s, then SIGKILL.
    pub(crate) fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running `sigil-server`.
pub(crate) struct Server {
    pub(crate) proc: Proc,
    pub(crate) port: u16,
    pub(crate) admin: admin::Client,
    pub(crate) bundle_path: PathBuf,
}

impl Server {
    /// Starts a server in `dir` (optionally pinned to `cpu`) and waits for
    /// its admin socket; writes the bundle to `dir/bundle.pem`.
    pub(crate) async fn start(bins: &Bins, dir: &Path, cpu: Option<usize>) -> Result<Server> {
        Self::start_with(bins, dir, cpu, "").await
    }

    /// As [`Server::start`], with `extra` appended to the config file.
    pub(crate) async fn start_with(
        bins: &Bins,
        dir: &Path,
        cpu: Option<usize>,
        extra: &str,
    ) -> Result<Server> {
        Self::start_with_env(bins, dir, cpu, extra, &[]).await
    }

    /// As [`Server::start_with`], with `env` set for the server process
    /// (e.g. `SOFTHSM2_CONF`).
    pub(crate) async fn start_with_env(
        bins: &Bins,
        dir: &Path,
        cpu: Option<usize>,
        extra: &str,
        env: &[(String, String)],
    ) -> Result<Server> {
        let port = free_port()?;
        let admin_socket = dir.join("server-admin/admin.sock");
        let cfg = format!(
            "trust_domain = \"{TD}\"\nbind_address = \"127.0.0.1\"\nbind_port = {port}\n\
             data_dir = \"{d}/server\"\nadmin_socket = \"{a}\"\nca_ttl = \"24h\"\n\
             default_x509_svid_ttl = \"1h\"\nlog_level = \"warn\"\n{extra}",
            d = dir.display(),
            a = admin_socket.display(),
        );
        let cfg_path = dir.join("server.toml");
        fs::write(&cfg_path, cfg)?;
        let mut cmd = Command::new(&bins.server);
        cmd.arg("run").arg("--config").arg(&cfg_path);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let mut proc = Proc::spawn(cmd, dir.join("server.log"), cpu)?;
        let sock = admin_socket.clone();
        let start = Instant::now();
        loop {
            proc.check_alive()?;
            if admin::healthy(&sock).await {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err("server did not answer on its admin socket within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        crate::report::progress(format!("sigil-server pid {} on port {port}", proc.pid()));
        let mut admin = admin::connect(&admin_socket).await?;
        let bundle_path = dir.join("bundle.pem");
        fs::write(&bundle_path, admin::bundle_pem(&mut admin).await?)?;
        Ok(Server {
            proc,
            port,
            admin,
            bundle_path,
        })
    }

    pub(crate) async fn token(&self, spiffe_id: &str) -> Result<String> {
        admin::token(&mut self.admin.clone(), spiffe_id).await
    }
}

/// A `sigil-agent` configured under `dir` (its own data dir and sockets).
pub(crate) struct Agent {
    pub(crate) spiffe_id: String,
    pub(crate) dir: PathBuf,
    pub(crate) cfg_path: PathBuf,
    pub(crate) socket: PathBuf,
    pub(crate) admin_socket: PathBuf,
    pub(crate) proc: Option<Proc>,
}

impl Agent {
    /// Writes the config of agent `name` under `base/name`.
    pub(crate) fn configure(server: &Server, base: &Path, name: &str) -> Result<Agent> {
        let dir = base.join(name);
        fs::create_dir_all(&dir)?;
        let socket = dir.join("public/api.sock");
        let admin_socket = dir.join("private/admin.sock");
        let cfg = format!(
            "trust_domain = \"{TD}\"\nserver_address = \"127.0.0.1\"\nserver_port = {port}\n\
             socket_path = \"{s}\"\nadmin_socket = \"{a}\"\ndata_dir = \"{d}/data\"\n\
             trust_bundle_path = \"{b}\"\nlog_level = \"warn\"\n",
            port = server.port,
            s = socket.display(),
            a = admin_socket.display(),
            d = dir.display(),
            b = server.bundle_path.display(),
        );
        let cfg_path = dir.join("agent.toml");
        fs::write(&cfg_path, cfg)?;
        Ok(Agent {
            spiffe_id: format!("spiffe://{TD}/bench/{name}"),
            dir,
            cfg_path,
            socket,
            admin_socket,
            proc: None,
        })
    }

    /// Starts the agent process (with a join token the first time).
    pub(crate) fn spawn(&mut self, bins: &Bins, token: Option<&str>) -> Result<()> {
        let mut cmd = Command::new(&bins.agent);
        cmd.arg("run").arg("--config").arg(&self.cfg_path);
        if let Some(t) = token {
            cmd.arg("--join-token").arg(t);
        }
        let p = Proc::spawn(cmd, self.dir.join("agent.log"), None)?;
        if std::env::var_os("SIGIL_BENCH_VERBOSE").is_some() {
            crate::report::progress(format!("sigil-agent {} pid {}", self.spiffe_id, p.pid()));
        }
        self.proc = Some(p);
        Ok(())
    }

    /// Attests with a fresh token and starts the agent.
    pub(crate) async fn start(&mut self, bins: &Bins, server: &Server) -> Result<()> {
        let token = server.token(&self.spiffe_id).await?;
        self.spawn(bins, Some(&token))
    }

    pub(crate) fn proc(&self) -> Result<&Proc> {
        self.proc.as_ref().ok_or_else(|| "agent not running".into())
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// Waits until the agent's health says synced with at least `entries`
    /// entries and `svids` SVIDs; returns the health.
    pub(crate) async fn wait_ready(
        &mut self,
        entries: u64,
        svids: u64,
        timeout: Duration,
    ) -> Result<sigil_proto::admin::AgentHealthResponse> {
        let sock = self.admin_socket.clone();
        let start = Instant::now();
        loop {
            if let Some(p) = self.proc.as_mut() {
                p.check_alive()?;
            }
            if let Some(h) = clients::agent_health(&sock).await
                && h.synced
                && h.entries >= entries
                && h.svids >= svids
            {
                return Ok(h);
            }
            if start.elapsed() > timeout {
                let tail = self.proc().map(|p| p.log_tail(5)).unwrap_or_default();
                return Err(format!(
                    "agent {} not ready ({entries} entries, {svids} SVIDs) after {timeout:?}; log:\n{tail}",
                    self.spiffe_id
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The effective uid of the bench, which attests as `unix:uid:<uid>`.
pub(crate) fn my_uid_selector() -> String {
    format!("unix:uid:{}", nix::unistd::geteuid().as_raw())
}

/// A selector no process of this bench matches (entries for other workloads).
pub(crate) fn other_uid_selector(i: usize) -> String {
    format!("unix:uid:{}", 100_000 + i)
}
