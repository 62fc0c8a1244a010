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
//! - an agent configured for another trust domain than the server's;
//! - the admin sockets used by another uid;
//! - an agent minting or syncing another agent's entries with its own SVID;
//! - a mint call over the batch cap (refused whole, nothing signed or
//!   recorded; a call at the cap is one audited batch);
//! - x509pop proofs that do not answer the server's challenge: a signature
//!   over another nonce, and a signature replayed from an earlier
//!   successful attestation (a test gRPC client speaking `Attest`).
//!
//! The federation attacks (a hostile bundle endpoint) are in
//! `attacks_federation.rs`, the HTTP/2 floods on the Workload API socket
//! in `attacks_h2.rs`.

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
    let csr = tonic::codegen::Bytes::from(csr);
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

/// The serials of each `x509_svids_issued` record in `c`'s audit trail, in
/// order, with the entry IDs they were issued under.
fn issued_batches(c: &Cluster) -> Vec<Vec<(String, String)>> {
    c.server_ok(&["audit", "export"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"]["kind"] == "x509_svids_issued")
        .map(|r| {
            r["event"]["svids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s["entry_id"].as_str().unwrap().to_string(),
                        s["serial"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn a_mint_call_over_the_batch_cap_is_refused_whole_and_one_at_the_cap_is_one_audited_batch() {
    use sigil_proto::agent::agent_api_client::AgentApiClient;
    use sigil_proto::agent::{CsrForEntry as Csr, MAX_MINT_BATCH, MintX509SvidsRequest};
    let c = Cluster::with_agent();
    let own = c.create_entry(
        "spiffe://example.org/batch-workload",
        &["--selector", "unix:uid:4303"],
    );
    // The running agent mints the entry once by itself: wait for its
    // record, so that every record after `before` is one of this test's.
    wait_for("the agent's own mint of the entry, audited", LONG, || {
        issued_batches(&c)
            .iter()
            .flatten()
            .any(|(entry, _)| *entry == own)
    });
    let before = issued_batches(&c);
    let mut api = AgentApiClient::new(agent_channel(&c, &c.dir.0.join("agent/data")).await);
    let (csr, _key) = sigil_core::x509::new_key_and_csr().unwrap();
    let call = |n: usize| MintX509SvidsRequest {
        csrs: vec![
            Csr {
                entry_id: own.clone(),
                csr: csr.clone().into(),
            };
            n
        ],
    };

    let refused = api
        .mint_x509_svids(call(MAX_MINT_BATCH + 1))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("`csrs`")
            && refused.message().contains(&MAX_MINT_BATCH.to_string()),
        "{}",
        refused.message()
    );

    // The agent's batch size, the cap itself, is signed in one call, and
    // both messages stay under gRPC's default 4 MiB decoding limit, which
    // the agent's client keeps.
    let full = call(MAX_MINT_BATCH);
    let request_len = prost::Message::encoded_len(&full);
    let resp = api.mint_x509_svids(full).await.unwrap().into_inner();
    let response_len = prost::Message::encoded_len(&resp);
    eprintln!("a full mint call: request {request_len} B, response {response_len} B");
    assert!(request_len < 4 << 20 && response_len < 4 << 20);
    assert_eq!(resp.results.len(), MAX_MINT_BATCH);
    let mut serials = std::collections::BTreeSet::new();
    for r in &resp.results {
        assert!(r.error.is_empty(), "{}", r.error);
        let leaf = sigil_core::x509::SvidInfo::from_der(&r.svid_chain[0]).unwrap();
        assert_eq!(
            leaf.spiffe_id.to_string(),
            "spiffe://example.org/batch-workload"
        );
        serials.insert(leaf.serial);
    }
    assert_eq!(serials.len(), MAX_MINT_BATCH, "serials repeat");

    // One record since `before`: the call at the cap, listing every SVID it
    // returned. The refused call signed and recorded nothing.
    let after = issued_batches(&c);
    assert_eq!(after[..before.len()], before[..], "the trail was rewritten");
    let new = &after[before.len()..];
    assert_eq!(new.len(), 1, "expected one new record, got {}", new.len());
    let recorded: std::collections::BTreeSet<String> = new[0]
        .iter()
        .map(|(entry, serial)| {
            assert_eq!(*entry, own);
            serial.clone()
        })
        .collect();
    assert_eq!(recorded, serials);
}

/// An agent-API channel to `c`'s server without a client certificate, as
/// a node that has not attested yet opens one.
async fn node_channel(c: &Cluster) -> tonic::transport::Channel {
    let bundle = sigil_core::x509::pem_to_certs(&c.server_ok(&["bundle", "show"])).unwrap();
    let tls = sigil_tests::svid_tls_connector(None, bundle, "spiffe://example.org/sigil/server");
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

/// One x509pop `Attest` conversation presenting `node`'s chain and
/// answering the server's challenge with `answer(nonce)`: the nonce the
/// server sent, the signature sent, and the outcome.
async fn x509pop_attest(
    c: &Cluster,
    node: &sigil_attestors::x509pop::NodeKey,
    answer: impl FnOnce(&[u8]) -> Vec<u8>,
) -> (
    Vec<u8>,
    Vec<u8>,
    Result<sigil_proto::agent::AttestResult, tonic::Status>,
) {
    use sigil_proto::agent::agent_api_client::AgentApiClient;
    use sigil_proto::agent::attest_begin::Evidence;
    use sigil_proto::agent::attest_request::Step as ReqStep;
    use sigil_proto::agent::attest_response::Step as RespStep;
    use sigil_proto::agent::{AttestBegin, AttestRequest, X509PopEvidence, X509PopResponse};
    let (csr, _key) = sigil_core::x509::new_key_and_csr().unwrap();
    let (out, rx) = tokio::sync::mpsc::channel(2);
    out.send(AttestRequest {
        step: Some(ReqStep::Begin(AttestBegin {
            evidence: Some(Evidence::X509pop(X509PopEvidence {
                chain: node.chain.clone(),
            })),
            csr,
        })),
    })
    .await
    .unwrap();
    let mut api = AgentApiClient::new(node_channel(c).await);
    let mut inbound = match api
        .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(st) => return (vec![], vec![], Err(st)),
    };
    let first = tokio::time::timeout(LONG, inbound.message())
        .await
        .expect("a challenge in time");
    let nonce = match first {
        Ok(Some(m)) => match m.step {
            Some(RespStep::X509popChallenge(ch)) => ch.nonce,
            other => panic!("expected an x509pop challenge, got {other:?}"),
        },
        Ok(None) => panic!("the server ended the stream before its challenge"),
        Err(st) => return (vec![], vec![], Err(st)),
    };
    let signature = answer(&nonce);
    out.send(AttestRequest {
        step: Some(ReqStep::X509popResponse(X509PopResponse {
            signature: signature.clone(),
        })),
    })
    .await
    .unwrap();
    let result = match tokio::time::timeout(LONG, inbound.message())
        .await
        .expect("an answer in time")
    {
        Ok(Some(m)) => match m.step {
            Some(RespStep::Result(r)) => Ok(r),
            other => panic!("expected a result, got {other:?}"),
        },
        Ok(None) => panic!("the server ended the stream without a result"),
        Err(st) => Err(st),
    };
    (nonce, signature, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_signatures_over_another_nonce_or_replayed_are_refused() {
    let pki = sigil_tests::Scratch::new("pop-attack");
    sigil_tests::pki::x509pop_node(&pki.0, "nodeca", "node-1");
    let c = Cluster::start_with(&format!(
        "[x509pop]\nca_bundle_path = \"{}/nodeca.pem\"\n",
        pki.0.display()
    ));
    let read = |f: &str| std::fs::read_to_string(pki.0.join(f)).unwrap();
    let node =
        sigil_attestors::x509pop::NodeKey::load(&read("node-1.pem"), &read("node-1.key")).unwrap();
    let refusals = || log_count(&c.dir.0, "server.log", "node attestation refused");
    let no_agents = |c: &Cluster| {
        c.agents_json()["agents"]
            .as_array()
            .is_none_or(Vec::is_empty)
    };

    // 1. A valid certificate, but the signature covers a nonce of the
    //    client's choosing rather than the server's challenge.
    let (nonce, _, r) = x509pop_attest(&c, &node, |nonce| {
        let mut other = nonce.to_vec();
        other[0] ^= 0xff;
        node.sign(&other).unwrap()
    })
    .await;
    assert_eq!(nonce.len(), 32);
    let st = r.expect_err("a signature over another nonce was accepted");
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    assert!(
        st.message().contains("x509pop signature does not verify"),
        "{st:?}"
    );
    wait_for("the refusal in the server log", LONG, || refusals() >= 1);
    assert!(no_agents(&c), "{}", c.agents_json());

    // 2. A genuine attestation, whose challenge and answer are recorded ...
    let (nonce1, sig1, r) = x509pop_attest(&c, &node, |n| node.sign(n).unwrap()).await;
    let first = r.expect("a correct x509pop attestation");
    assert!(
        first
            .spiffe_id
            .starts_with("spiffe://example.org/sigil/agent/x509pop/"),
        "{}",
        first.spiffe_id
    );
    let agents = c.agents_json();
    assert_eq!(
        agents["agents"].as_array().map_or(0, Vec::len),
        1,
        "{agents}"
    );

    // ... replayed in a later conversation: the server's nonce is new, so
    //     the old signature does not cover it.
    let (nonce2, _, r) = x509pop_attest(&c, &node, |_| sig1.clone()).await;
    assert_ne!(nonce1, nonce2, "the server repeated a challenge");
    let st = r.expect_err("a replayed x509pop signature was accepted");
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    assert!(
        st.message().contains("x509pop signature does not verify"),
        "{st:?}"
    );
    wait_for("the second refusal in the server log", LONG, || {
        refusals() >= 2
    });
    assert_eq!(
        c.agents_json(),
        agents,
        "a refused replay changed the agent record"
    );
    let log = std::fs::read_to_string(c.dir.0.join("server.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("node attestation refused")
            && l.contains("PermissionDenied")
            && l.contains("x509pop signature does not verify")),
        "the refusal is not logged with its reason"
    );

    // 3. The same certificate, signing the server's nonce, still attests.
    let (_, _, r) = x509pop_attest(&c, &node, |n| node.sign(n).unwrap()).await;
    let again = r.expect("a correct attestation after the refusals");
    assert_eq!(again.spiffe_id, first.spiffe_id);
}
