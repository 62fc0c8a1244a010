//! End-to-end: the resource limits of the agent API and the Workload API
//! (issue 15 §2) against the real binaries. Each check waits for a positive
//! event with a deadline: a connection closed by the server, a refusal, an
//! SVID fetched by another uid, a stream update delivered.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use sigil_tests::{Cluster, bin, my_uid, wait_for};
use tokio::net::TcpStream;
use tokio_stream::StreamExt;

const LONG: Duration = Duration::from_secs(30);

/// Lines a child prints, read on a thread.
fn lines(child: &mut Child) -> Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line satisfying `f`; returns it and every line seen.
fn expect_line(rx: &Receiver<String>, what: &str, f: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + LONG;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = f(&l);
                seen.push(l);
                if hit {
                    return seen;
                }
            }
            Err(RecvTimeoutError::Timeout) => panic!("timed out waiting for {what}; saw {seen:?}"),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("output ended before {what}; saw {seen:?}")
            }
        }
    }
}

/// A `conn-hog` holding `n` idle connections to `socket`, as `uid` (through
/// setpriv) unless it is ours.
struct Hog {
    child: Child,
    _stdin: ChildStdin,
    out: Receiver<String>,
}

impl Hog {
    fn start(socket: &std::path::Path, n: usize, uid: Option<u32>) -> Self {
        let mut cmd = match uid {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid",
                    &u.to_string(),
                    "--regid",
                    &u.to_string(),
                    "--clear-groups",
                ])
                .arg(bin("conn-hog"));
                c
            }
            None => Command::new(bin("conn-hog")),
        };
        let mut child = cmd
            .arg(socket)
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = lines(&mut child);
        Hog {
            child,
            _stdin: stdin,
            out,
        }
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn healthcheck(c: &Cluster) -> (bool, String) {
    let out = Command::new(bin("sigil-agent"))
        .args(["healthcheck", "--verbose", "--admin-socket"])
        .arg(c.dir.0.join("agent/private/admin.sock"))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Starts a server and an agent whose config gets `agent_extra`.
fn cluster_with_agent(server_extra: &str, agent_extra: &str) -> Cluster {
    let mut c = Cluster::start_with(server_extra);
    let token = c.token("spiffe://example.org/test-agent");
    c.agent_id = "spiffe://example.org/test-agent".into();
    c.start_agent_configured(&format!("join_token = \"{token}\"\n{agent_extra}"));
    c
}

fn fetch_x509_until_ok(c: &Cluster) -> Duration {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < LONG {
        let out = Command::new(bin("sigil-agent"))
            .args(["api", "fetch", "x509", "--socket"])
            .arg(c.api_addr())
            .output()
            .unwrap();
        if out.status.success() {
            return start.elapsed();
        }
        last = String::from_utf8_lossy(&out.stderr).to_string();
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("root could not fetch an X.509-SVID: {last}");
}

#[test]
fn a_uid_at_its_connection_cap_is_refused_while_root_is_still_served() {
    if my_uid() != 0 {
        eprintln!("skipped: needs root (setpriv to uid 65534)");
        return;
    }
    let c = cluster_with_agent("", "[limits]\nmax_connections_per_uid = 40\n");
    c.create_entry(
        "spiffe://example.org/root-workload",
        &["--selector", "unix:uid:0"],
    );

    let hog = Hog::start(&c.api_socket(), 70, Some(65534));
    expect_line(&hog.out, "70 connections opened", |l| l == "opened 70");
    // The 30 over the cap are closed by the agent at accept.
    expect_line(&hog.out, "30 connections closed", |l| l == "closed 30");

    // The agent reports it; a uid at its cap is a warning, not unhealthy.
    let mut report = String::new();
    wait_for("health to report the uid at its cap", LONG, || {
        let (ok, text) = healthcheck(&c);
        report = text;
        ok && report.contains("1 uid(s) at the per-uid cap of 40") && report.contains("40 open of")
    });
    println!("{report}");

    // Another uid is served meanwhile.
    let took = fetch_x509_until_ok(&c);
    println!(
        "root fetched an X.509-SVID {took:?} after asking, 40 idle connections held by uid 65534"
    );

    // The 40 admitted connections are still held (nothing but the 30 closed).
    let extra: Vec<String> = hog.out.try_iter().collect();
    assert!(
        extra.iter().all(|l| !l.starts_with("closed")),
        "admitted connections were closed: {extra:?}"
    );
}

#[test]
fn idle_workload_connections_are_closed_but_streams_stay_open() {
    let c = cluster_with_agent("", "[limits]\nidle_timeout = \"2s\"\n");
    let sel = format!("unix:uid:{}", my_uid());
    c.create_entry("spiffe://example.org/streamer", &["--selector", &sel]);

    block_on(async {
        let client = workload_client(&c).await;
        let mut stream = svid_stream(&client).await;

        // Five connections that never make a call are closed after the
        // idle timeout...
        let opened = Instant::now();
        let mut hog = Hog::start(&c.api_socket(), 5, None);
        expect_line(&hog.out, "5 connections opened", |l| l == "opened 5");
        let out = std::mem::replace(&mut hog.out, std::sync::mpsc::channel().1);
        tokio::task::spawn_blocking(move || {
            expect_line(&out, "5 idle connections closed", |l| l == "closed 5")
        })
        .await
        .unwrap();
        println!("idle connections closed after {:?}", opened.elapsed());

        // ... while the stream, open for longer than that, still delivers.
        c.create_entry("spiffe://example.org/streamer-2", &["--selector", &sel]);
        let update = tokio::time::timeout(LONG, async {
            loop {
                match stream.next().await {
                    Some(Ok(ctx)) if ctx.svids().len() == 2 => return,
                    Some(Ok(_)) => continue,
                    other => panic!("stream ended: {other:?}"),
                }
            }
        })
        .await;
        assert!(update.is_ok(), "no update on the long-lived stream");
    });
}

/// Runs `f` to completion on a current-thread runtime of its own.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A Workload API client of `c`'s agent.
async fn workload_client(c: &Cluster) -> spiffe::WorkloadApiClient {
    spiffe::WorkloadApiClient::connect_to(c.api_addr())
        .await
        .unwrap()
}

/// An X.509-context stream that has delivered an SVID (retried until the
/// agent has synced the caller's entry, within `LONG`).
async fn svid_stream(
    client: &spiffe::WorkloadApiClient,
) -> impl tokio_stream::Stream<Item = Result<spiffe::X509Context, spiffe::WorkloadApiError>> + use<>
{
    let start = Instant::now();
    while start.elapsed() < LONG {
        let mut s = client.stream_x509_contexts().await.unwrap();
        match tokio::time::timeout(LONG, s.next()).await {
            Ok(Some(Ok(ctx))) if !ctx.svids().is_empty() => return s,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("no X.509 stream delivered an SVID");
}

/// Descriptors process `pid` has open.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn many_streams_on_one_connection_cost_the_agent_no_descriptor_each() {
    // The connection cap counts descriptors per connection
    // (FDS_PER_CONNECTION); a stream must not add any, or one uid within
    // its connection cap could exhaust the agent's RLIMIT_NOFILE by
    // opening streams (found by the soak: one pidfd duplicate per stream).
    let c = cluster_with_agent("", "");
    let sel = format!("unix:uid:{}", my_uid());
    c.create_entry("spiffe://example.org/many-streams", &["--selector", &sel]);
    let pid = c.agent_pid().expect("agent pid");
    block_on(async {
        let client = workload_client(&c).await;
        // A stream that has delivered an SVID: the agent has set up the
        // connection's exit watch.
        let first = svid_stream(&client).await;
        let before = fd_count(pid);
        let mut streams = vec![first];
        // 15 more: with the first, the 16 calls a connection may have in
        // handlers at once, so every one of them is being served.
        for _ in 0..15 {
            streams.push(svid_stream(&client).await);
        }
        let after = fd_count(pid);
        println!("agent descriptors: {before} with 1 stream, {after} with 16 on one connection");
        // Slack of 2 for a /proc read in flight; one per stream would be +15.
        assert!(
            after <= before + 2,
            "16 streams on one connection: agent descriptors went from {before} to {after}"
        );
        drop(streams);
    });
}

/// A TLS client that does not send anything after its handshake.
fn s_client(port: u16) -> (Child, Receiver<String>) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-alpn", "h2", "-tls1_3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines(&mut child);
    (child, rx)
}

fn wait_exit(child: &mut Child, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return start.elapsed();
        }
        assert!(start.elapsed() < LONG, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tls_clients_that_never_send_a_request_are_disconnected_and_capped_per_ip() {
    // The idle timeout leaves room for six handshakes on a loaded machine.
    let c = Cluster::start_with("[limits]\nidle_timeout = \"8s\"\nmax_connections_per_ip = 6\n");
    let start = Instant::now();
    let mut held = Vec::new();
    for _ in 0..6 {
        let (child, rx) = s_client(c.port);
        expect_line(&rx, "TLS 1.3 handshake", |l| l.starts_with("New, TLSv1.3"));
        // Keep reading its output: a closed pipe would kill it (SIGPIPE).
        held.push((child, rx));
    }
    // A seventh from the same address is closed at once, before TLS.
    let (mut seventh, rx) = s_client(c.port);
    wait_exit(&mut seventh, "the seventh connection to be refused");
    let said: Vec<String> = rx.iter().collect();
    assert!(
        !said.iter().any(|l| l.starts_with("New, TLSv1.3")),
        "the seventh connection got a handshake: {said:?}"
    );
    // The six are disconnected for sending no HTTP/2 preface.
    for (i, (child, _)) in held.iter_mut().enumerate() {
        wait_exit(child, &format!("connection {i} to be closed"));
    }
    println!(
        "6 silent TLS connections closed {:?} after the first opened",
        start.elapsed()
    );
    // Their slots are free again.
    let (mut again, rx) = s_client(c.port);
    expect_line(&rx, "a new handshake after the idle ones closed", |l| {
        l.starts_with("New, TLSv1.3")
    });
    let _ = again.kill();
    let _ = again.wait();
    let log = std::fs::read_to_string(c.dir.0.join("server.log")).unwrap();
    assert!(
        log.contains("connection refused") && log.contains("peer=127.0.0.1:"),
        "refusal not logged with the peer: {log}"
    );
}

#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TLS to the agent API (server not verified: this client is the attacker),
/// with the given client certificate and key.
fn tls_config(
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> rustls::ClientConfig {
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut cfg = match client {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

async fn tls_connect(
    port: u16,
    cfg: rustls::ClientConfig,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("sigil-server").unwrap(), tcp)
        .await
        .unwrap()
}

fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://sigil-server{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// A gRPC message prefix claiming `len` bytes.
fn grpc_prefix(len: u32) -> Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&len.to_be_bytes());
    Bytes::from(b)
}

fn grpc_status(h: &http::HeaderMap) -> Option<(String, String)> {
    let code = h.get("grpc-status")?.to_str().ok()?.to_string();
    let msg = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Some((code, msg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_api_refuses_unauthenticated_and_oversized_calls_without_buffering_them() {
    let c = Cluster::start();
    let pid = c.server_pid().unwrap();
    let tls = tls_connect(c.port, tls_config(None)).await;
    let (client, mut conn) = h2::client::handshake(tls).await.unwrap();
    // Drive the connection until the server's SETTINGS are in.
    let deadline = Instant::now() + LONG;
    while conn.max_concurrent_send_streams() > 64 {
        tokio::select! {
            r = &mut conn => panic!("connection ended: {r:?}"),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        assert!(
            Instant::now() < deadline,
            "no SETTINGS_MAX_CONCURRENT_STREAMS <= 64 from the server"
        );
    }
    println!(
        "server SETTINGS_MAX_CONCURRENT_STREAMS = {}",
        conn.max_concurrent_send_streams()
    );
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let before = sigil_tests::rss_kib(pid);

    // 40 calls without a client certificate, each announcing a 4 MiB
    // message and sending 1 MiB of it: refused before the body is read.
    let chunk = Bytes::from(vec![0x41u8; 1024 * 1024]);
    let mut calls = Vec::new();
    for _ in 0..40 {
        let mut client = client.clone().ready().await.unwrap();
        let (resp, mut body) = client
            .send_request(grpc_request("/sigil.agent.AgentApi/MintX509Svids"), false)
            .unwrap();
        let _ = body.send_data(grpc_prefix(4 * 1024 * 1024 - 1), false);
        let _ = body.send_data(chunk.clone(), false);
        calls.push((resp, body));
    }
    let mut refused = 0;
    for (resp, _body) in calls {
        let resp = tokio::time::timeout(LONG, resp)
            .await
            .expect("no response to an unauthenticated call")
            .unwrap();
        let (code, msg) = grpc_status(resp.headers()).expect("a trailers-only refusal");
        assert_eq!(code, "16", "UNAUTHENTICATED expected: {msg}");
        refused += 1;
    }
    let after_mint = sigil_tests::rss_kib(pid);

    // Attest is open without a certificate, but its body is capped: a
    // 600 KiB message (under the 1 MiB message limit) is cut off at 256 KiB.
    let big = Bytes::from(vec![0x0au8; 600 * 1024]);
    let mut attests = Vec::new();
    for _ in 0..20 {
        let mut client = client.clone().ready().await.unwrap();
        let (resp, mut body) = client
            .send_request(grpc_request("/sigil.agent.AgentApi/Attest"), false)
            .unwrap();
        let _ = body.send_data(grpc_prefix(600 * 1024), false);
        let _ = body.send_data(big.clone(), false);
        attests.push((resp, body));
    }
    let mut attest_errors = Vec::new();
    for (resp, _body) in attests {
        let resp = tokio::time::timeout(LONG, resp)
            .await
            .expect("no response to Attest")
            .unwrap();
        let status = match grpc_status(resp.headers()) {
            Some(s) => s,
            None => {
                let mut body = resp.into_body();
                while let Some(d) = tokio::time::timeout(LONG, body.data()).await.unwrap() {
                    if d.is_err() {
                        break;
                    }
                }
                let trailers = tokio::time::timeout(LONG, body.trailers())
                    .await
                    .expect("no trailers on Attest")
                    .unwrap()
                    .expect("trailers");
                grpc_status(&trailers).expect("grpc-status trailer")
            }
        };
        assert_ne!(status.0, "0", "an oversized attestation succeeded");
        attest_errors.push(status);
    }
    let after_attest = sigil_tests::rss_kib(pid);
    println!(
        "server RSS: {before} KiB before, {after_mint} KiB after 40 x 1 MiB unauthenticated mint bodies ({refused} refused), {after_attest} KiB after 20 x 600 KiB Attest bodies; attest errors: {:?}",
        attest_errors.first()
    );
    assert!(
        attest_errors
            .iter()
            .all(|(_, m)| m.contains("length%20limit%20exceeded")),
        "{attest_errors:?}"
    );
    // Generous: the bodies above total 52 MiB.
    assert!(
        after_attest.saturating_sub(before) < 48 * 1024,
        "server RSS grew from {before} KiB to {after_attest} KiB"
    );
    let log = std::fs::read_to_string(c.dir.0.join("server.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("agent API call refused") && l.contains("peer=127.0.0.1:")),
        "refused call not logged with the peer"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("node attestation refused") && l.contains("peer=127.0.0.1:")),
        "refused attestation not logged with the peer"
    );
}

fn agent_identity(c: &Cluster) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let data = c.dir.0.join("agent/data");
    let chain = pem::parse_many(std::fs::read(data.join("agent_svid.pem")).unwrap())
        .unwrap()
        .into_iter()
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    let key = pem::parse(std::fs::read(data.join("agent_svid.key")).unwrap()).unwrap();
    (
        chain,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.into_contents())),
    )
}

#[test]
fn too_many_or_too_long_audiences_are_refused_naming_the_field() {
    let c = cluster_with_agent("", "");
    let sel = format!("unix:uid:{}", my_uid());
    let entry = c.create_entry("spiffe://example.org/jwt-user", &["--selector", &sel]);
    fetch_x509_until_ok(&c);

    let jwt = |auds: &[String]| {
        let mut cmd = Command::new(bin("sigil-agent"));
        cmd.args(["api", "fetch", "jwt", "--socket"])
            .arg(c.api_addr());
        for a in auds {
            cmd.args(["--audience", a]);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = jwt(&["svc".to_string()]);
    assert!(ok, "a normal audience must work: {err}");
    let many: Vec<String> = (0..17).map(|i| format!("aud-{i}")).collect();
    let (ok, err) = jwt(&many);
    assert!(
        !ok && err.contains("`audience`") && err.contains("at most 16"),
        "{err}"
    );
    let (ok, err) = jwt(&["a".repeat(2049)]);
    assert!(
        !ok && err.contains("`audience`") && err.contains("at most 2048"),
        "{err}"
    );

    // The server refuses the same, even from a genuine agent.
    block_on(async {
        let port = c.port;
        let cfg = tls_config(Some(agent_identity(&c)));
        let ch = tonic::transport::Endpoint::from_static("http://sigil-server")
            .connect_with_connector(tower::service_fn(move |_| {
                let cfg = cfg.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tls_connect(port, cfg).await,
                    ))
                }
            }))
            .await
            .unwrap();
        let mut api = sigil_proto::agent::agent_api_client::AgentApiClient::new(ch);
        let ok = api
            .mint_jwt_svid(sigil_proto::agent::MintJwtSvidRequest {
                entry_id: entry.clone(),
                audience: vec!["svc".into()],
            })
            .await;
        assert!(ok.is_ok(), "{ok:?}");
        for audience in [many.clone(), vec!["b".repeat(100_000)]] {
            let st = api
                .mint_jwt_svid(sigil_proto::agent::MintJwtSvidRequest {
                    entry_id: entry.clone(),
                    audience,
                })
                .await
                .unwrap_err();
            assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
            assert!(st.message().contains("`audience`"), "{st:?}");
        }
    });
}

/// `MALLOC_ARENA_MAX` as the process `pid` runs with, from its environment.
fn malloc_arena_max(pid: u32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    env.split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"MALLOC_ARENA_MAX=".as_slice()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .next_back()
}

/// The server bounds glibc's malloc arenas (it re-execs itself once with
/// `MALLOC_ARENA_MAX=2`; the soak found unbounded arenas growing its
/// memory) and keeps a value the operator set. Checked once it answers its
/// admin socket, so the exec is behind it.
#[test]
fn the_server_caps_malloc_arenas_unless_the_operator_chose_a_value() {
    assert!(
        std::env::var_os("MALLOC_ARENA_MAX").is_none(),
        "run this test without MALLOC_ARENA_MAX in its environment"
    );
    let c = Cluster::start_with("");
    assert_eq!(
        malloc_arena_max(c.server_pid().unwrap()).as_deref(),
        Some("2")
    );
    let healthy = c.server_cli(&["healthcheck"]);
    assert!(healthy.status.success(), "{healthy:?}");

    let own = Cluster::start_with_env("", vec![("MALLOC_ARENA_MAX".into(), "4".into())]);
    assert_eq!(
        malloc_arena_max(own.server_pid().unwrap()).as_deref(),
        Some("4")
    );
}
