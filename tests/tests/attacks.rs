//! Attack suite (issue 14), with the real binaries: each attempt is refused,
//! says why, and leaves nothing behind that a later legitimate use would
//! notice. Attacks covered by other suites are listed in
//! docs/SECURITY-TESTS.md with the test that covers them.
//!
//! Here:
//! - a join token replayed after the server restarted (the single-use mark
//!   is in the datastore, not in memory);
//! - an agent that trusts another CA than the server's, with a token valid
//!   on that server: it refuses the server at the TLS handshake (a server
//!   certificate for `/sigil/server` from a foreign CA), and the token
//!   stays unused, so the legitimate agent attests with it afterwards;
//! - an agent configured for another trust domain than the server's.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sigil_tests::{Cluster, bin, log_count, wait_for};

const LONG: Duration = Duration::from_secs(30);

/// Runs `sigil-agent run` with `config` and `token`, logging to `log`;
/// returns its exit status once it ends, killing it after `LONG`.
fn agent_run(config: &Path, token: &str, log: &Path) -> Option<std::process::ExitStatus> {
    let out = std::fs::File::create(log).unwrap();
    let mut child: Child = Command::new(bin("sigil-agent"))
        .args(["run", "--config"])
        .arg(config)
        .args(["--join-token", token])
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < LONG {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// The cluster's agent config, moved to its own data dir and sockets.
fn second_agent_config(
    c: &Cluster,
    name: &str,
    edit: impl Fn(String) -> String,
) -> std::path::PathBuf {
    let base = c.write_agent_config_with("");
    let cfg = std::fs::read_to_string(base)
        .unwrap()
        .replace("/agent/", &format!("/{name}/"));
    let path = c.dir.0.join(format!("{name}.toml"));
    std::fs::write(&path, edit(cfg)).unwrap();
    path
}

#[test]
fn a_join_token_replayed_after_a_server_restart_is_refused() {
    let mut c = Cluster::start();
    let token = c.token("spiffe://example.org/replayed");
    let cfg1 = second_agent_config(&c, "first", |s| s);
    let log1 = c.dir.0.join("first.log");
    let out = std::fs::File::create(&log1).unwrap();
    let mut first = Command::new(bin("sigil-agent"))
        .args(["run", "--config"])
        .arg(&cfg1)
        .args(["--join-token", &token])
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap();
    wait_for("the first attestation", LONG, || {
        log_count(&c.dir.0, "first.log", "node attested") > 0
    });
    let _ = first.kill();
    let _ = first.wait();

    c.stop_server();
    c.start_server();
    let cfg2 = second_agent_config(&c, "replay", |s| s);
    let log2 = c.dir.0.join("replay.log");
    let status = agent_run(&cfg2, &token, &log2).expect("the replaying agent gives up");
    assert!(!status.success());
    let err = std::fs::read_to_string(&log2).unwrap();
    assert!(err.contains("unknown or already used"), "{err}");
    // The server recorded the refusal.
    assert!(
        log_count(&c.dir.0, "server.log", "node attestation refused") > 0,
        "{}",
        c.logs()
    );
}

#[test]
fn an_agent_refuses_a_server_whose_certificate_is_from_a_foreign_ca_and_the_token_stays_unused() {
    // Two servers for the same trust domain, each with its own CA: the
    // agent trusts the first, and is pointed at the second.
    let trusted = Cluster::start();
    let impostor = Cluster::start();
    let token = impostor.token("spiffe://example.org/lured");
    let cfg = second_agent_config(&trusted, "lured", |s| {
        s.replace(
            &format!("server_port = {}", trusted.port),
            &format!("server_port = {}", impostor.port),
        )
    });
    let log = trusted.dir.0.join("lured.log");
    let status = agent_run(&cfg, &token, &log).expect("the lured agent gives up");
    assert!(!status.success());
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        err.contains("does not chain to the trust bundle"),
        "no certificate error in: {err}"
    );
    // Nothing was presented to the impostor: its token is still good for
    // an agent that trusts it.
    let honest = second_agent_config(&impostor, "honest", |s| s);
    let out = std::fs::File::create(impostor.dir.0.join("honest.log")).unwrap();
    let mut ok = Command::new(bin("sigil-agent"))
        .args(["run", "--config"])
        .arg(&honest)
        .args(["--join-token", &token])
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap();
    wait_for(
        "the honest agent to attest with the same token",
        LONG,
        || log_count(&impostor.dir.0, "honest.log", "node attested") > 0,
    );
    let _ = ok.kill();
    let _ = ok.wait();
}

#[test]
fn an_agent_configured_for_another_trust_domain_is_refused() {
    let c = Cluster::start();
    let token = c.token("spiffe://example.org/wrong-td");
    let cfg = second_agent_config(&c, "other-td", |s| {
        s.replace(
            "trust_domain = \"example.org\"",
            "trust_domain = \"other.org\"",
        )
    });
    let log = c.dir.0.join("other-td.log");
    let status = agent_run(&cfg, &token, &log).expect("the agent gives up");
    assert!(!status.success());
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        err.contains("expected spiffe://other.org/sigil/server"),
        "the refusal does not name the expected server ID: {err}"
    );
    assert_eq!(
        log_count(&c.dir.0, "other-td.log", "node attested"),
        0,
        "{err}"
    );
}

#[test]
fn the_admin_sockets_refuse_another_uid() {
    if sigil_tests::my_uid() != 0 {
        eprintln!("skipped: needs root (setpriv to uid 65534)");
        return;
    }
    let c = Cluster::with_agent();
    let agent_admin = c.dir.0.join("agent/private/admin.sock");
    let as_nobody = |program: &str, args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(bin(program))
            .args(args)
            .output()
            .unwrap()
    };
    for (program, socket) in [
        ("sigil-server", c.admin_socket()),
        ("sigil-agent", agent_admin.clone()),
    ] {
        let s = socket.to_str().unwrap();
        // Root is served: the socket works.
        let root = Command::new(bin(program))
            .args(["healthcheck", "--admin-socket", s])
            .output()
            .unwrap();
        assert!(root.status.success(), "{program} as root: {root:?}");
        let out = as_nobody(program, &["healthcheck", "--admin-socket", s]);
        assert!(!out.status.success(), "{program} served uid 65534");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(s),
            "{program}: the refusal does not name the socket: {err}"
        );
    }
}

/// An mTLS agent-API channel to `c`'s server presenting the agent SVID
/// stored in `data_dir` (as a stolen or misused agent credential would be).
async fn agent_channel(c: &Cluster, data_dir: &Path) -> tonic::transport::Channel {
    let chain = sigil_core::x509::pem_to_certs(
        &std::fs::read_to_string(data_dir.join("agent_svid.pem")).unwrap(),
    )
    .unwrap();
    let key = pem::parse(std::fs::read(data_dir.join("agent_svid.key")).unwrap())
        .unwrap()
        .contents()
        .to_vec();
    let bundle = sigil_core::x509::pem_to_certs(&c.server_ok(&["bundle", "show"])).unwrap();
    let tls = sigil_tests::svid_tls_connector(
        Some((&chain, &key)),
        bundle,
        "spiffe://example.org/sigil/server",
    );
    let port = c.port;
    tonic::transport::Endpoint::from_static("http://sigil-server")
        .connect_with_connector(tower::service_fn(move |_| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let name = rustls_pki_types::ServerName::try_from("sigil-server").unwrap();
                let s = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap()
}

#[tokio::test]
async fn an_agent_can_neither_mint_nor_sync_another_agents_entries() {
    use sigil_proto::agent::agent_api_client::AgentApiClient;
    use sigil_proto::agent::{CsrForEntry as Csr, MintX509SvidsRequest, SyncRequest};
    let c = Cluster::with_agent();
    let other = c.start_extra_agent("agent-b", "spiffe://example.org/agent-b");
    let own = c.create_entry(
        "spiffe://example.org/a-workload",
        &["--selector", "unix:uid:4301"],
    );
    let foreign = c.create_entry_under(
        &other.id,
        "spiffe://example.org/b-workload",
        &["--selector", "unix:uid:4302"],
    );
    // Agent A's own credential, used directly against the agent API.
    let mut api = AgentApiClient::new(agent_channel(&c, &c.dir.0.join("agent/data")).await);
    let (csr, _key) = sigil_core::x509::new_key_and_csr().unwrap();
    let resp = api
        .mint_x509_svids(MintX509SvidsRequest {
            csrs: vec![
                Csr {
                    entry_id: foreign.clone(),
                    csr: csr.clone(),
                },
                Csr {
                    entry_id: own.clone(),
                    csr,
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let by_id = |id: &str| resp.results.iter().find(|r| r.entry_id == id).unwrap();
    let refused = by_id(&foreign);
    assert!(
        refused.svid_chain.is_empty(),
        "agent A got an SVID for agent B's entry"
    );
    assert!(
        refused.error.contains("is not authorized for this agent"),
        "{}",
        refused.error
    );
    // The same call minted A's own entry: the refusal is per entry.
    let minted = by_id(&own);
    assert!(minted.error.is_empty(), "{}", minted.error);
    assert!(!minted.svid_chain.is_empty());

    // A's sync stream carries A's entries and none of B's.
    let mut st = api
        .sync(SyncRequest { deltas: false })
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    loop {
        let m = tokio::time::timeout(LONG, st.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        ids.extend(m.entries.iter().map(|e| e.id.clone()));
        if !m.more {
            break;
        }
    }
    assert!(ids.contains(&own), "{ids:?}");
    assert!(
        !ids.contains(&foreign),
        "agent A was sent agent B's entry: {ids:?}"
    );
}
