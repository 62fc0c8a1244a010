//! End-to-end: what the real binaries refuse to trust or accept (issue 15,
//! points 3-5): foreign-owned, world-writable or symlinked data_dirs and key
//! files (server and agent), out-of-range entry fields through the CLI and
//! the admin API, config keys out of range, and the join token from a file
//! or the environment.
//!
//! Tests that chown to uid 65534 need root and say "skipped" otherwise.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sigil_tests::{Cluster, Scratch, bin, free_port, my_uid_selector};

const LONG: Duration = Duration::from_secs(20);
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn chown(p: &Path, uid: u32) {
    nix::unistd::chown(p, Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Waits (with a deadline) for a process that is expected to refuse to
/// start; returns its output.
fn expect_exit(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > LONG {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {LONG:?} (it should have refused to start): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes a server config for `data_dir` in `dir` and returns its path.
fn server_config(dir: &Path, data_dir: &Path, extra: &str) -> PathBuf {
    let cfg = format!(
        "trust_domain = \"example.org\"\nbind_port = {}\ndata_dir = \"{}\"\nadmin_socket = \"{}/admin/admin.sock\"\n{extra}",
        free_port(),
        data_dir.display(),
        dir.display()
    );
    let p = dir.join("server.toml");
    fs::write(&p, cfg).unwrap();
    p
}

fn run_server(cfg: &Path) -> Output {
    let mut cmd = Command::new(bin("sigil-server"));
    cmd.args(["run", "--config"]).arg(cfg);
    expect_exit(cmd)
}

fn assert_refused(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "accepted: {}", stderr(out));
    let err = stderr(out);
    for n in needles {
        assert!(err.contains(n), "error does not mention {n:?}: {err}");
    }
}

#[test]
fn server_refuses_a_foreign_owned_data_dir_and_leaves_it_alone() {
    if !is_root() {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let s = Scratch::new("ib-foreign");
    let data = s.0.join("server");
    fs::create_dir(&data).unwrap();
    chmod(&data, 0o777);
    chown(&data, NOBODY);
    let out = run_server(&server_config(&s.0, &data, ""));
    assert_refused(
        &out,
        &["data_dir", &data.display().to_string(), "uid 65534", "0777"],
    );
    let m = fs::metadata(&data).unwrap();
    assert_eq!(m.uid(), NOBODY, "owner unchanged");
    assert_eq!(m.mode() & 0o7777, 0o777, "not chmod'ed");
    assert_eq!(fs::read_dir(&data).unwrap().count(), 0, "nothing written");

    // The same directory at 0700, still not ours.
    chmod(&data, 0o700);
    let out = run_server(&server_config(&s.0, &data, ""));
    assert_refused(&out, &["uid 65534", "0700"]);
}

#[test]
fn server_refuses_a_planted_keys_file() {
    if !is_root() {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let s = Scratch::new("ib-keys");
    let data = s.0.join("server");
    fs::create_dir(&data).unwrap();
    chmod(&data, 0o700);
    let keys = data.join("keys.json");
    fs::write(&keys, "{}").unwrap();
    chmod(&keys, 0o600);
    chown(&keys, NOBODY);
    let out = run_server(&server_config(&s.0, &data, ""));
    assert_refused(&out, &[&keys.display().to_string(), "uid 65534", "0600"]);
    assert_eq!(fs::read_to_string(&keys).unwrap(), "{}", "not replaced");
    assert_eq!(fs::metadata(&keys).unwrap().uid(), NOBODY);
}

#[test]
fn server_refuses_a_symlinked_data_dir_and_a_writable_parent() {
    let s = Scratch::new("ib-link");
    let target = s.0.join("elsewhere");
    fs::create_dir(&target).unwrap();
    chmod(&target, 0o755);
    let link = s.0.join("server");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = run_server(&server_config(&s.0, &link, ""));
    assert_refused(
        &out,
        &["data_dir", "symbolic link", &link.display().to_string()],
    );
    assert_eq!(mode(&target), 0o755, "the link's target was not chmod'ed");
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0, "nothing written");

    // A parent anyone may write to (no sticky bit) lets anyone swap data_dir.
    let open = s.0.join("open");
    fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let out = run_server(&server_config(&s.0, &open.join("server"), ""));
    assert_refused(&out, &[&open.display().to_string(), "0777", "writable"]);
    assert!(!open.join("server").exists());
}

#[test]
fn agent_refuses_a_symlinked_or_foreign_data_dir() {
    let c = Cluster::start();
    let data = c.dir.0.join("agent/data");
    let target = c.dir.0.join("agent-elsewhere");
    fs::create_dir_all(&target).unwrap();
    chmod(&target, 0o755);
    fs::create_dir_all(data.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&target, &data).unwrap();
    let token = c.token("spiffe://example.org/ib-agent");
    let cfg = c.write_agent_config();
    let agent = |token: &str| {
        let mut cmd = Command::new(bin("sigil-agent"));
        cmd.args(["run", "--config"])
            .arg(&cfg)
            .args(["--join-token", token]);
        expect_exit(cmd)
    };
    let out = agent(&token);
    assert_refused(
        &out,
        &["data_dir", "symbolic link", &data.display().to_string()],
    );
    assert_eq!(mode(&target), 0o755, "target not chmod'ed");
    fs::remove_file(&data).unwrap();

    if !is_root() {
        eprintln!("skipped the foreign-owner half: needs root to chown");
        return;
    }
    fs::create_dir(&data).unwrap();
    chmod(&data, 0o777);
    chown(&data, NOBODY);
    let out = agent(&token);
    assert_refused(
        &out,
        &["data_dir", &data.display().to_string(), "uid 65534", "0777"],
    );
    assert_eq!(mode(&data), 0o777, "not chmod'ed");
    assert_eq!(fs::metadata(&data).unwrap().uid(), NOBODY);
    assert_eq!(fs::read_dir(&data).unwrap().count(), 0, "nothing written");
    // The refused attempts never reached the server: the token still works.
    fs::remove_dir(&data).unwrap();
    let mut child = Command::new(bin("sigil-agent"))
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--join-token", &token])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.wait_agent_healthy();
    stop(&mut child);
}

#[test]
fn agent_refuses_a_stored_bundle_it_cannot_trust() {
    if !is_root() {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let mut c = Cluster::with_agent();
    c.stop_agent();
    let bundle = c.dir.0.join("agent/data/bundle.pem");
    chown(&bundle, NOBODY);
    let cfg = c.write_agent_config();
    let mut cmd = Command::new(bin("sigil-agent"));
    cmd.args(["run", "--config"]).arg(&cfg);
    let out = expect_exit(cmd);
    assert_refused(&out, &[&bundle.display().to_string(), "uid 65534", "0644"]);
    assert_eq!(fs::metadata(&bundle).unwrap().uid(), NOBODY, "not replaced");
    // Ours again: the agent starts from its stored identity.
    chown(&bundle, 0);
    c.restart_agent();
}

fn stop(child: &mut Child) {
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

#[test]
fn entry_create_refuses_each_bad_input_naming_the_field() {
    let c = Cluster::start();
    let sel = my_uid_selector();
    let long_id = format!("spiffe://example.org/{}", "a".repeat(3000));
    let past = "2001-01-01T00:00:00Z";
    let create = |spiffe_id: &str, parent_id: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "entry",
            "create",
            "--parent-id",
            parent_id,
            "--spiffe-id",
            spiffe_id,
            "--selector",
            &sel,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let base = |extra: &[&str]| create("spiffe://example.org/x", "spiffe://example.org/a", extra);
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (
            create(&long_id, "spiffe://example.org/a", &[]),
            &["spiffe_id", "2048"],
        ),
        (
            create("spiffe://example.org/x", &long_id, &[]),
            &["parent_id", "2048"],
        ),
        (base(&["--dns", "127.0.0.1"]), &["dns", "IP address"]),
        (base(&["--dns", "::1"]), &["dns", "IP address"]),
        (base(&["--dns", &"a".repeat(64)]), &["dns", "63"]),
        (
            base(&["--hint", "invoice\u{202E}fdp.exe"]),
            &["hint", "U+202E"],
        ),
        (base(&["--hint", &"h".repeat(300)]), &["hint", "256"]),
        (base(&["--expires-at", past]), &["expires-at", "future"]),
        (
            base(&["--x509-ttl", "9223372036854775808"]),
            &["--x509-ttl", "30d"],
        ),
        (base(&["--x509-ttl", "-5"]), &["--x509-ttl", "30d"]),
        (base(&["--jwt-ttl", "-5"]), &["--jwt-ttl", "30d"]),
        (base(&["--jwt-ttl", "31d"]), &["--jwt-ttl", "30d"]),
        (
            vec![
                "token".into(),
                "generate".into(),
                "--spiffe-id".into(),
                long_id.clone(),
            ],
            &["spiffe_id", "2048"],
        ),
        (
            vec![
                "token".into(),
                "generate".into(),
                "--ttl".into(),
                "-5".into(),
            ],
            &["--ttl", "7d"],
        ),
    ];
    let before = c.server_ok(&["entry", "list", "--output", "json"]);
    for (args, needles) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = c.server_cli(&args);
        assert!(
            !out.status.success(),
            "{:?} was accepted",
            &args[..args.len().min(8)]
        );
        let err = stderr(&out);
        for n in *needles {
            assert!(err.contains(n), "error does not name {n:?}: {err}");
        }
        assert!(
            err.len() < 1000,
            "the error echoes the input: {}",
            err.len()
        );
    }
    assert_eq!(
        c.server_ok(&["entry", "list", "--output", "json"]),
        before,
        "a refused request changed state"
    );

    // An existing entry cannot be given a past expiry either.
    let created = c.server_ok(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/a",
        "--spiffe-id",
        "spiffe://example.org/y",
        "--selector",
        &sel,
        "--output",
        "json",
    ]);
    let id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = c.server_ok(&["entry", "list", "--output", "json"]);
    let out = c.server_cli(&["entry", "update", &id, "--expires-at", past]);
    assert_refused(&out, &["expires-at"]);
    let out = c.server_cli(&["entry", "update", &id, "--x509-ttl", "-5"]);
    assert_refused(&out, &["--x509-ttl", "30d"]);
    assert_eq!(
        c.server_ok(&["entry", "list", "--output", "json"]),
        before,
        "a refused request changed state"
    );
}

/// The server enforces the bounds itself, not only the CLI: the same bad
/// entries sent straight to the admin API are refused naming the field.
#[test]
fn admin_api_refuses_bad_entries_without_the_cli() {
    use sigil_proto::admin::admin_api_client::AdminApiClient;
    use sigil_proto::admin::{GenerateTokenRequest, ListEntriesRequest, UpdateEntryRequest};
    use sigil_proto::common::Entry;
    let c = Cluster::start();
    let path = c.admin_socket();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_static("http://admin")
            .connect_with_connector(tower::service_fn(move |_| {
                let p = path.clone();
                async move {
                    tokio::net::UnixStream::connect(p)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await
            .unwrap();
        let mut api = AdminApiClient::new(ch);
        let good = Entry {
            spiffe_id: "spiffe://example.org/x".into(),
            parent_id: "spiffe://example.org/a".into(),
            selectors: vec!["unix:uid:0".into()],
            ..Default::default()
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let long = format!("spiffe://example.org/{}", "a".repeat(100_000));
        type Mutation<'a> = Box<dyn Fn(&mut Entry) + 'a>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("spiffe_id", Box::new(|e| e.spiffe_id = long.clone())),
            ("parent_id", Box::new(|e| e.parent_id = long.clone())),
            ("expires_at", Box::new(move |e| e.expires_at = now - 10)),
            ("dns", Box::new(|e| e.dns_names = vec!["10.1.2.3".into()])),
            ("hint", Box::new(|e| e.hint = "\u{202E}".into())),
            ("x509_svid_ttl", Box::new(|e| e.x509_svid_ttl = i64::MIN)),
        ];
        for (field, mutate) in &cases {
            let mut e = good.clone();
            mutate(&mut e);
            let st = api.create_entry(e).await.unwrap_err();
            assert_eq!(st.code(), tonic::Code::InvalidArgument, "{field}: {st:?}");
            assert!(
                st.message().contains(&format!("`{field}`")),
                "{field}: {}",
                st.message()
            );
        }
        let list = api
            .list_entries(ListEntriesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(list.entries.is_empty(), "nothing was created");

        let made = api.create_entry(good.clone()).await.unwrap().into_inner();
        let mut upd = made.clone();
        upd.expires_at = now - 10;
        let st = api
            .update_entry(UpdateEntryRequest {
                entry: Some(upd),
                set_fields: vec!["expires_at".into()],
            })
            .await
            .unwrap_err();
        assert!(st.message().contains("`expires_at`"), "{}", st.message());

        let st = api
            .generate_token(GenerateTokenRequest {
                spiffe_id: long.clone(),
                ttl_seconds: 60,
            })
            .await
            .unwrap_err();
        assert!(
            st.message().contains("spiffe_id") && st.message().contains("2048"),
            "{}",
            st.message()
        );
        assert!(st.message().len() < 500, "the ID is not echoed");
    });
}

#[test]
fn config_errors_name_the_key() {
    let s = Scratch::new("ib-config");
    let data = s.0.join("server");
    for (extra, needles) in [
        (
            "agent_svid_ttl = \"999999999d\"\n",
            &["agent_svid_ttl", "30d"][..],
        ),
        ("ca_ttl = \"9999d\"\n", &["ca_ttl", "365d"][..]),
        ("log_level = \"bogus\"\n", &["log_level", "bogus"][..]),
    ] {
        let out = run_server(&server_config(&s.0, &data, extra));
        assert_refused(&out, needles);
    }
    // A relative data_dir (server_config() writes an absolute one).
    let cfg = s.0.join("relative.toml");
    fs::write(
        &cfg,
        "trust_domain = \"example.org\"\ndata_dir = \"var/sigil\"\n",
    )
    .unwrap();
    let out = run_server(&cfg);
    assert_refused(&out, &["data_dir", "absolute"]);
    assert!(!data.exists(), "nothing created");

    // The agent: relative data_dir, bogus log_level.
    for (body, needles) in [
        (
            "data_dir = \"agent-data\"\ninsecure_bootstrap = true\n",
            &["data_dir", "absolute"][..],
        ),
        (
            "data_dir = \"/tmp/sigil-unused\"\ninsecure_bootstrap = true\nlog_level = \"loud\"\n",
            &["log_level", "loud"][..],
        ),
    ] {
        let cfg = s.0.join("agent.toml");
        fs::write(
            &cfg,
            format!("trust_domain = \"example.org\"\nserver_address = \"127.0.0.1\"\n{body}"),
        )
        .unwrap();
        let mut cmd = Command::new(bin("sigil-agent"));
        cmd.args(["run", "--config"]).arg(&cfg);
        assert_refused(&expect_exit(cmd), needles);
    }
}

/// Starts an agent with `prepare` applied to its command, waits until it
/// is healthy, and checks the server lists `agent_id`.
fn attest_with(c: &Cluster, agent_id: &str, prepare: impl FnOnce(&mut Command)) {
    let cfg = c.write_agent_config();
    let mut cmd = Command::new(bin("sigil-agent"));
    cmd.args(["run", "--config"]).arg(&cfg);
    prepare(&mut cmd);
    let log = fs::File::create(c.dir.0.join("agent.log")).unwrap();
    let mut child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
    c.wait_agent_healthy();
    let agents = c.agents_json().to_string();
    stop(&mut child);
    assert!(agents.contains(agent_id), "{agents}");
}

#[test]
fn join_token_from_a_file() {
    let c = Cluster::start();
    let id = "spiffe://example.org/file-agent";
    let token = c.token(id);
    let file = c.dir.0.join("join-token");
    fs::write(&file, format!("{token}\n")).unwrap();

    // A token file others can read is refused like a key file.
    chmod(&file, 0o644);
    let mut cmd = Command::new(bin("sigil-agent"));
    cmd.args(["run", "--config"])
        .arg(c.write_agent_config())
        .arg("--join-token-file")
        .arg(&file);
    let out = expect_exit(cmd);
    assert_refused(
        &out,
        &["--join-token-file", &file.display().to_string(), "0644"],
    );

    chmod(&file, 0o600);
    attest_with(&c, id, |cmd| {
        cmd.arg("--join-token-file").arg(&file);
    });
}

#[test]
fn join_token_from_the_environment() {
    let c = Cluster::start();
    let id = "spiffe://example.org/env-agent";
    let token = c.token(id);
    attest_with(&c, id, |cmd| {
        cmd.env("SIGIL_JOIN_TOKEN", &token);
    });
}

#[test]
fn help_documents_the_join_token_sources() {
    let out = Command::new(bin("sigil-agent"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for n in ["--join-token-file", "SIGIL_JOIN_TOKEN", "/proc/PID/cmdline"] {
        assert!(help.contains(n), "--help does not mention {n}: {help}");
    }
}

#[test]
fn agent_cli_refuses_an_over_long_spiffe_id_naming_the_flag() {
    let long_id = format!("spiffe://example.org/{}", "a".repeat(3000));
    let out = Command::new(bin("sigil-agent"))
        .args(["api", "fetch", "jwt", "--audience", "aud", "--spiffe-id"])
        .arg(&long_id)
        .args(["--socket", "unix:///nonexistent/api.sock"])
        .output()
        .unwrap();
    assert_refused(&out, &["--spiffe-id", "2048"]);
    assert!(stderr(&out).len() < 500, "the ID is not echoed");
}
