//! Test harness for Sigil's end-to-end tests: starts the real
//! `sigil-server` and `sigil-agent` binaries in a throwaway directory with
//! free ports, drives them through their CLIs, and stops them on drop.
//!
//! The binaries are looked up next to the test executable's target
//! directory (`target/<profile>/`); build them first with
//! `cargo build --workspace --bins` (the project's test script does).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

pub mod docker;
pub mod pg;
pub mod pki;
pub mod softhsm;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the built binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for b in ["sigil-server", "sigil-agent"] {
        assert!(
            dir.join(b).exists(),
            "{} missing: run `cargo build --workspace --bins` first",
            dir.join(b).display()
        );
    }
    dir
}

/// Path of one built binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Whether the tests run in CI (`CI` set, not empty, not `false`): there a
/// missing tool fails a test instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The async form of [`wait_for`]: polls `f` every 50 ms until it yields
/// `Some`, and returns that value; panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The address of the telemetry endpoint (`[telemetry] prometheus_port =
/// 0`) that the process logging to `name` in `dir` bound, once it logged it.
pub fn telemetry_addr(dir: &Path, name: &str) -> std::net::SocketAddr {
    const LINE: &str = "telemetry endpoint listening";
    let mut found = None;
    wait_for(
        &format!("{LINE} in {name}"),
        Duration::from_secs(20),
        || {
            let log = fs::read_to_string(dir.join(name)).unwrap_or_default();
            found = log
                .lines()
                .rev()
                .filter(|l| l.contains(LINE))
                .filter_map(|l| l.split("addr=").nth(1))
                .filter_map(|rest| rest.split_whitespace().next())
                .filter_map(|a| {
                    a.trim_end_matches(|c: char| !c.is_ascii_digit())
                        .parse()
                        .ok()
                })
                .next();
            found.is_some()
        },
    );
    found.unwrap()
}

/// `GET path` over HTTP/1.1 (`Connection: close`): status code and body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// A TLS 1.3 connector that presents the SVID `chain`/`key` (PKCS#8; none
/// when `None`) and accepts only a peer presenting `expected`, chained to
/// `bundle`: how a workload, broker or agent speaks mTLS to Sigil.
pub fn svid_tls_connector(
    svid: Option<(&[Vec<u8>], &[u8])>,
    bundle: Vec<Vec<u8>>,
    expected: &str,
) -> tokio_rustls::TlsConnector {
    use std::sync::{Arc, RwLock};
    let resolver = Arc::new(sigil_core::tls::SvidCertResolver::default());
    if let Some((chain, key)) = svid {
        resolver.set(chain, key).unwrap();
    }
    let trust = sigil_core::tls::ServerTrust::Spiffe {
        bundle: Arc::new(RwLock::new(bundle)),
        expected: sigil_core::SpiffeId::new(expected).unwrap(),
    };
    tokio_rustls::TlsConnector::from(sigil_core::tls::client_config(trust, resolver).unwrap())
}

/// The Python virtualenv `scripts/test` creates (`SIGIL_PY_VENV`, else
/// `target/pyvenv`) with py-spiffe and prometheus_client, if it exists.
pub fn py_venv() -> Option<PathBuf> {
    let venv = std::env::var_os("SIGIL_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            bin_dir()
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
                .join("pyvenv")
        });
    // A relative SIGIL_PY_VENV is taken from the workspace root, where
    // scripts/test runs (the tests themselves run in tests/).
    let venv = if venv.is_relative() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(venv)
    } else {
        venv
    };
    venv.join("bin/python3").exists().then_some(venv)
}

/// How many times `needle` occurs in the log file `name` of a test
/// directory: a negative check waits for this count to grow, proving the
/// system acted after the change it must not reflect.
pub fn log_count(dir: &Path, name: &str, needle: &str) -> usize {
    fs::read_to_string(dir.join(name))
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// A unique scratch directory under the system temp dir, world-traversable
/// so that a probe running as another uid can reach the Workload API socket.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("sigil-e2e-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn kill(child: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running server (and optionally an agent) for one test.
pub struct Cluster {
    pub dir: Scratch,
    pub port: u16,
    pub trust_domain: String,
    server: Option<Child>,
    agent: Option<Child>,
    pub agent_id: String,
    /// Extra environment for every agent process this cluster spawns (for
    /// example a faked clock through `LD_PRELOAD`).
    pub agent_env: Vec<(String, String)>,
    /// Environment variables every server process of this cluster gets
    /// (e.g. `SOFTHSM2_CONF`), see [`Cluster::start_with_env`].
    pub server_env: Vec<(String, String)>,
}

impl Cluster {
    /// Starts a server with `extra` appended to its config.
    pub fn start_with(extra: &str) -> Self {
        Self::start_td("example.org", extra)
    }

    /// Starts a server with `extra` appended to its config and `env` set
    /// in its environment (also at every restart).
    pub fn start_with_env(extra: &str, env: Vec<(String, String)>) -> Self {
        let mut c = Self::configure("example.org", extra);
        c.server_env = env;
        c.start_server();
        c
    }

    /// Starts a server for trust domain `td` with `extra` appended to its config.
    pub fn start_td(td: &str, extra: &str) -> Self {
        let mut c = Self::configure(td, extra);
        c.start_server();
        c
    }

    /// Several servers (`example.org`, each with `extra`) spawned together
    /// before any is waited for, so that their start-ups overlap; returns
    /// once every one answers its healthcheck.
    pub fn start_together(n: usize, extra: &str) -> Vec<Self> {
        let mut all: Vec<Self> = (0..n)
            .map(|_| Self::configure("example.org", extra))
            .collect();
        for c in &mut all {
            c.spawn_server();
        }
        for c in &all {
            c.wait_server();
        }
        all
    }

    /// A cluster directory and server config, nothing started.
    fn configure(td: &str, extra: &str) -> Self {
        let dir = Scratch::new("c");
        let port = free_port();
        let cfg = format!(
            "trust_domain = \"{td}\"\nbind_port = {port}\ndata_dir = \"{d}/server\"\nadmin_socket = \"{d}/admin/admin.sock\"\nlog_level = \"debug\"\n{extra}",
            d = dir.0.display()
        );
        fs::write(dir.0.join("server.toml"), cfg).unwrap();
        Cluster {
            dir,
            port,
            trust_domain: td.into(),
            server: None,
            agent: None,
            agent_id: String::new(),
            agent_env: Vec::new(),
            server_env: Vec::new(),
        }
    }

    /// A cluster directory and server config for `example.org` with
    /// `extra`, nothing started (so a test can prepare `<dir>/server`, for
    /// example mount a small filesystem there, before the server starts).
    pub fn configured(extra: &str) -> Self {
        Self::configure("example.org", extra)
    }

    /// Starts a server with the default config.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts a server and an agent attested as `spiffe://example.org/test-agent`.
    pub fn with_agent() -> Self {
        let mut c = Self::start();
        c.start_agent("spiffe://example.org/test-agent");
        c
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.dir.0.join("admin/admin.sock")
    }

    pub fn api_socket(&self) -> PathBuf {
        self.dir.0.join("agent/public/api.sock")
    }

    /// `unix:///...` address of the Workload API.
    pub fn api_addr(&self) -> String {
        format!("unix://{}", self.api_socket().display())
    }

    pub fn start_server(&mut self) {
        self.spawn_server();
        self.wait_server();
    }

    /// Spawns the server process without waiting for it.
    pub fn spawn_server(&mut self) {
        assert!(self.server.is_none(), "server already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.0.join("server.log"))
            .unwrap();
        let child = Command::new(bin("sigil-server"))
            .args(["run", "--config"])
            .arg(self.dir.0.join("server.toml"))
            .envs(self.server_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.server = Some(child);
    }

    /// Waits until the server answers `healthcheck` on its admin socket.
    pub fn wait_server(&self) {
        wait_for("server admin socket", Duration::from_secs(60), || {
            self.server_cli(&["healthcheck"]).status.success()
        });
    }

    pub fn stop_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            kill(&mut c);
        }
    }

    /// Runs a `sigil-server` subcommand against this cluster's admin socket.
    pub fn server_cli(&self, args: &[&str]) -> Output {
        Command::new(bin("sigil-server"))
            .args(args)
            .env("SIGIL_ADMIN_SOCKET", self.admin_socket())
            .output()
            .unwrap()
    }

    /// Like [`Self::server_cli`] but asserts success and returns stdout.
    pub fn server_ok(&self, args: &[&str]) -> String {
        let out = self.server_cli(args);
        assert!(
            out.status.success(),
            "sigil-server {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Generates a join token.
    pub fn token(&self, spiffe_id: &str) -> String {
        let out = self.server_ok(&[
            "token",
            "generate",
            "--spiffe-id",
            spiffe_id,
            "--output",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["value"].as_str().unwrap().to_string()
    }

    /// Writes the agent config (bundle bootstrap) and returns its path.
    pub fn write_agent_config(&self) -> PathBuf {
        self.write_agent_config_with("")
    }

    /// Writes the agent config with `extra` appended and returns its path.
    pub fn write_agent_config_with(&self, extra: &str) -> PathBuf {
        let bundle = self.server_ok(&["bundle", "show"]);
        fs::write(self.dir.0.join("bundle.pem"), bundle).unwrap();
        let d = self.dir.0.display();
        // An `extra` naming `servers` replaces server_address/server_port.
        let server = if extra.lines().any(|l| l.trim_start().starts_with("servers")) {
            String::new()
        } else {
            format!(
                "server_address = \"127.0.0.1\"\nserver_port = {}\n",
                self.port
            )
        };
        let cfg = format!(
            "trust_domain = \"{}\"\n{server}socket_path = \"{d}/agent/public/api.sock\"\nadmin_socket = \"{d}/agent/private/admin.sock\"\ndata_dir = \"{d}/agent/data\"\ntrust_bundle_path = \"{d}/bundle.pem\"\nlog_level = \"debug\"\n",
            self.trust_domain
        ) + extra;
        let p = self.dir.0.join("agent.toml");
        fs::write(&p, cfg).unwrap();
        p
    }

    /// Spawns the agent process (with a token if given), without waiting.
    pub fn spawn_agent(&self, token: Option<&str>) -> Child {
        self.spawn_agent_with(token, "")
    }

    /// Spawns the agent with `extra` agent config, without waiting.
    pub fn spawn_agent_with(&self, token: Option<&str>, extra: &str) -> Child {
        let cfg = self.write_agent_config_with(extra);
        self.spawn_agent_from(&cfg, token)
    }

    /// Spawns the agent with the config at `cfg`, without waiting.
    fn spawn_agent_from(&self, cfg: &Path, token: Option<&str>) -> Child {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.0.join("agent.log"))
            .unwrap();
        let mut cmd = Command::new(bin("sigil-agent"));
        cmd.args(["run", "--config"]).arg(cfg);
        cmd.envs(self.agent_env.iter().map(|(k, v)| (k, v)));
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap()
    }

    /// Attests and starts an agent; waits until it has synced.
    pub fn start_agent(&mut self, agent_id: &str) {
        let token = self.token(agent_id);
        let child = self.spawn_agent(Some(&token));
        self.agent = Some(child);
        self.agent_id = agent_id.to_string();
        self.wait_agent_healthy();
    }

    /// Attests and starts an agent with `extra` agent config (e.g.
    /// `[workload_attestor.docker]`); waits until it has synced.
    pub fn start_agent_with(&mut self, agent_id: &str, extra: &str) {
        let token = self.token(agent_id);
        let child = self.spawn_agent_with(Some(&token), extra);
        self.agent = Some(child);
        self.agent_id = agent_id.to_string();
        self.wait_agent_healthy();
    }

    /// Starts an agent configured with `extra` (e.g. another node attestor)
    /// and waits until it has synced.
    pub fn start_agent_configured(&mut self, extra: &str) {
        let child = self.spawn_agent_with(None, extra);
        self.agent = Some(child);
        self.wait_agent_healthy();
    }

    /// Restarts the agent from its stored identity (no token).
    pub fn restart_agent(&mut self) {
        self.stop_agent();
        self.agent = Some(self.spawn_agent(None));
        self.wait_agent_healthy();
    }

    /// Restarts the agent from its stored identity (no token) without
    /// waiting for it to sync (e.g. while the server is down).
    /// It keeps the config it had.
    pub fn respawn_agent(&mut self) {
        self.stop_agent();
        let cfg = self.dir.0.join("agent.toml");
        self.agent = Some(self.spawn_agent_from(&cfg, None));
    }

    pub fn wait_agent_healthy(&self) {
        wait_agent_admin_healthy(&self.dir.0.join("agent/private/admin.sock"));
    }

    pub fn stop_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            kill(&mut c);
        }
    }

    /// Creates an entry under this cluster's agent; returns the entry ID.
    pub fn create_entry(&self, spiffe_id: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "entry",
            "create",
            "--parent-id",
            &self.agent_id,
            "--spiffe-id",
            spiffe_id,
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&self.server_ok(&args)).unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    /// `sigil-server agent list --output json`, parsed.
    pub fn agents_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.server_ok(&["agent", "list", "--output", "json"]))
            .expect("agent list JSON")
    }

    /// Process ID of the running server.
    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// Process ID of the running agent.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// The server and agent logs, for failure messages.
    pub fn logs(&self) -> String {
        let r = |n: &str| fs::read_to_string(self.dir.0.join(n)).unwrap_or_default();
        format!(
            "--- server.log\n{}\n--- agent.log\n{}",
            r("server.log"),
            r("agent.log")
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_agent();
        self.stop_server();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// The current effective uid.
pub fn my_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// `--selector unix:uid:<my uid>` as owned strings.
pub fn my_uid_selector() -> String {
    format!("unix:uid:{}", my_uid())
}

/// Runs `openssl ARGS` in `dir`; panics with its stderr if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A second (third, …) agent of a [`Cluster`], in its own directory under
/// the cluster's, attested with its own join token. Killed on drop.
pub struct ExtraAgent {
    pub id: String,
    pub dir: PathBuf,
    child: Child,
}

impl ExtraAgent {
    /// `unix:///...` address of this agent's Workload API.
    pub fn api_addr(&self) -> String {
        format!("unix://{}/public/api.sock", self.dir.display())
    }
}

impl Drop for ExtraAgent {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

impl Cluster {
    /// Attests and starts another agent as `agent_id`, in `<dir>/<name>`;
    /// waits until it is healthy.
    pub fn start_extra_agent(&self, name: &str, agent_id: &str) -> ExtraAgent {
        let token = self.token(agent_id);
        let bundle = self.server_ok(&["bundle", "show"]);
        let dir = self.dir.0.join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("bundle.pem"), bundle).unwrap();
        let d = dir.display();
        let cfg = format!(
            "trust_domain = \"{}\"\nserver_address = \"127.0.0.1\"\nserver_port = {}\nsocket_path = \"{d}/public/api.sock\"\nadmin_socket = \"{d}/private/admin.sock\"\ndata_dir = \"{d}/data\"\ntrust_bundle_path = \"{d}/bundle.pem\"\nlog_level = \"debug\"\n",
            self.trust_domain, self.port
        );
        fs::write(dir.join("agent.toml"), cfg).unwrap();
        let log = fs::File::create(self.dir.0.join(format!("{name}.log"))).unwrap();
        let child = Command::new(bin("sigil-agent"))
            .args(["run", "--config"])
            .arg(dir.join("agent.toml"))
            .args(["--join-token", &token])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_agent_admin_healthy(&dir.join("private/admin.sock"));
        ExtraAgent {
            id: agent_id.to_string(),
            dir,
            child,
        }
    }

    /// Creates an entry under `parent`; returns the entry ID.
    pub fn create_entry_under(&self, parent: &str, spiffe_id: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "entry",
            "create",
            "--parent-id",
            parent,
            "--spiffe-id",
            spiffe_id,
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&self.server_ok(&args)).unwrap();
        v["id"].as_str().unwrap().to_string()
    }
}

/// `unix:path:<canonical path of the built binary NAME>`: the selector of
/// processes running that binary.
pub fn path_selector(name: &str) -> String {
    let p = fs::canonicalize(bin(name)).unwrap();
    format!("unix:path:{}", p.display())
}

/// The SPIFFE ID of the X.509-SVID the Workload API at `addr` serves this
/// process (through the `spiffe` crate), or the error (its text, then
/// its debug form, which carries the gRPC status message).
pub async fn fetch_x509_id(addr: &str) -> Result<String, String> {
    let client = spiffe::WorkloadApiClient::connect_to(addr)
        .await
        .map_err(|e| e.to_string())?;
    client
        .fetch_x509_svid()
        .await
        .map(|s| s.spiffe_id().to_string())
        .map_err(|e| format!("{e} ({e:?})"))
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `sigil-agent api fetch x509 --socket ADDR [--write DIR]`, as a separate
/// process (so entries selecting the `sigil-agent` binary match it).
pub fn agent_fetch_x509(addr: &str, write: Option<&Path>) -> Output {
    let mut cmd = Command::new(bin("sigil-agent"));
    cmd.args(["api", "fetch", "x509", "--socket", addr]);
    if let Some(dir) = write {
        cmd.arg("--write").arg(dir);
    }
    cmd.output().unwrap()
}

/// Every SPIFFE ID (sorted) the Workload API at `addr` serves this process
/// through the `spiffe` crate; `None` when it answers with an error.
pub async fn x509_ids(addr: &str) -> Option<Vec<String>> {
    let client = spiffe::WorkloadApiClient::connect_to(addr).await.ok()?;
    let mut v: Vec<String> = client
        .fetch_all_x509_svids()
        .await
        .ok()?
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    v.sort();
    Some(v)
}

/// Waits until `sigil-agent healthcheck` succeeds on the admin socket `sock`.
fn wait_agent_admin_healthy(sock: &Path) {
    wait_for("agent healthy", Duration::from_secs(60), || {
        Command::new(bin("sigil-agent"))
            .arg("healthcheck")
            .arg("--admin-socket")
            .arg(sock)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
}
