//! Attack suite (issue 14), HTTP/2 floods on the agent's Workload API
//! socket, with the real binaries. Raw HTTP/2 frames are written on the
//! Unix socket (HPACK literals, no Huffman coding) so that the client can
//! break the rules a well-behaved h2 library enforces:
//! - far more concurrent streams than the agent's
//!   SETTINGS_MAX_CONCURRENT_STREAMS (32), in one write;
//! - a SETTINGS flood: 100,000 SETTINGS frames, no ACK ever read;
//! - a slow client: 32 `FetchX509SVID` streams with 2 GiB flow-control
//!   windows that never read, while updates are pushed to them; the agent
//!   closes it once its writes have been blocked for 15 s.
//!
//! During each, another workload (a fresh connection through the `spiffe`
//! crate) is still served, and the agent's RSS before and after is
//! printed and bounded. What the agent did to the flooding connection
//! (refused streams, GOAWAY, a closed socket, or writes left blocked) is
//! read off the socket and printed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sigil_tests::{Cluster, eventually, fetch_x509_id, log_count, my_uid_selector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const LONG: Duration = Duration::from_secs(30);
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[ty, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK "literal header field without indexing, new name", no Huffman.
fn hpack(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (n, v) in headers {
        b.push(0);
        b.push(u8::try_from(n.len()).unwrap());
        b.extend_from_slice(n.as_bytes());
        b.push(u8::try_from(v.len()).unwrap());
        b.extend_from_slice(v.as_bytes());
    }
    b
}

/// HEADERS and an empty request message (END_STREAM) opening a
/// `FetchX509SVID` stream on `stream`.
fn fetch_x509_svid(stream: u32) -> Vec<u8> {
    let block = hpack(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("workload.spiffe.io", "true"),
    ]);
    let mut f = frame(HEADERS, END_HEADERS, stream, &block);
    f.extend(frame(DATA, END_STREAM, stream, &[0, 0, 0, 0, 0]));
    f
}

fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in pairs {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

/// What the agent sent on a flooding connection.
#[derive(Debug, Default)]
struct Seen {
    frames: usize,
    /// Streams that got a HEADERS frame (a response).
    answered: std::collections::BTreeSet<u32>,
    refused: usize,
    /// RST_STREAM codes other than REFUSED_STREAM, and how often.
    other_resets: std::collections::BTreeMap<u32, usize>,
    settings_acks: usize,
    goaway: Option<u32>,
    closed: bool,
}

/// Reads frames from `r` into `seen` until `done(seen)` holds, the agent
/// closes the connection, or `LONG` passes (then panics naming `what`).
async fn read_until(
    r: &mut (impl AsyncReadExt + Unpin),
    seen: &mut Seen,
    what: &str,
    done: impl Fn(&Seen) -> bool,
) {
    let deadline = tokio::time::Instant::now() + LONG;
    while !done(seen) && !seen.closed {
        let mut head = [0u8; 9];
        let ok = tokio::time::timeout_at(deadline, r.read_exact(&mut head))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}: {seen:?}"));
        if ok.is_err() {
            seen.closed = true;
            break;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if tokio::time::timeout_at(deadline, r.read_exact(&mut payload))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}: {seen:?}"))
            .is_err()
        {
            seen.closed = true;
            break;
        }
        seen.frames += 1;
        match head[3] {
            HEADERS => {
                seen.answered.insert(stream);
            }
            RST_STREAM if payload.len() == 4 => {
                let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                if code == REFUSED_STREAM {
                    seen.refused += 1;
                } else {
                    *seen.other_resets.entry(code).or_default() += 1;
                }
            }
            SETTINGS if head[4] & 0x1 == 1 => seen.settings_acks += 1,
            GOAWAY if payload.len() >= 8 => {
                seen.goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
            _ => {}
        }
    }
}

/// A cluster whose agent serves this process (an entry for its uid).
fn served_cluster() -> Cluster {
    let c = Cluster::with_agent();
    c.create_entry(
        "spiffe://example.org/flood-bystander",
        &["--selector", &my_uid_selector()],
    );
    c
}

/// Another workload, on its own connection, is served while a flood runs.
async fn bystander_served(c: &Cluster, during: &str) {
    let addr = c.api_addr();
    eventually(
        &format!("another workload served during {during}"),
        LONG,
        || {
            let addr = addr.clone();
            async move { fetch_x509_id(&addr).await.ok() }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_more_streams_than_allowed_are_refused_and_others_are_served() {
    let c = served_cluster();
    bystander_served(&c, "start-up").await;
    let pid = c.agent_pid().unwrap();
    let before = sigil_tests::rss_kib(pid);
    const STREAMS: u32 = 2000;
    let sock = UnixStream::connect(c.api_socket()).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(sock);
    let mut burst = PREFACE.to_vec();
    burst.extend(settings(&[]));
    for i in 0..STREAMS {
        burst.extend(fetch_x509_svid(2 * i + 1));
    }
    let burst_len = burst.len();
    let writer = tokio::spawn(async move {
        let r = wr.write_all(&burst).await;
        (r, wr)
    });
    let mut seen = Seen::default();
    read_until(
        &mut rd,
        &mut seen,
        "the agent to refuse the streams over its limit",
        |s| s.goaway.is_some() || s.refused + s.answered.len() >= STREAMS as usize,
    )
    .await;
    bystander_served(&c, "a stream flood").await;
    let after = sigil_tests::rss_kib(pid);
    let written = tokio::time::timeout(LONG, writer).await;
    println!(
        "{STREAMS} streams in one {burst_len}-byte write: {} answered, {} refused (REFUSED_STREAM), other resets by code {:?}, GOAWAY {:?}, closed {}; write finished: {}; agent RSS {before} KiB before, {after} KiB after",
        seen.answered.len(),
        seen.refused,
        seen.other_resets,
        seen.goaway,
        seen.closed,
        matches!(written, Ok(Ok((Ok(()), _))))
    );
    assert!(
        seen.refused > 0 || seen.goaway.is_some() || seen.closed,
        "the agent took every stream: {seen:?}"
    );
    // FetchX509SVID streams stay open: no more than the advertised 32 are
    // ever answered at once.
    assert!(seen.answered.len() <= 32, "{seen:?}");
    assert!(
        after.saturating_sub(before) < 32 * 1024,
        "agent RSS grew from {before} KiB to {after} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_flood_that_never_reads_its_acks_is_throttled() {
    let c = served_cluster();
    bystander_served(&c, "start-up").await;
    let pid = c.agent_pid().unwrap();
    let before = sigil_tests::rss_kib(pid);
    const FRAMES: usize = 100_000;
    let sock = UnixStream::connect(c.api_socket()).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(sock);
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let writer = tokio::spawn(async move {
        if wr.write_all(PREFACE).await.is_err() {
            return wr;
        }
        let one = settings(&[(0x3, 100)]);
        let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 1000).collect();
        for _ in 0..FRAMES / 1000 {
            if wr.write_all(&batch).await.is_err() {
                break;
            }
            w.fetch_add(1000, Ordering::SeqCst);
        }
        wr
    });
    // The flood is under way (at least one batch in) ...
    eventually("the flood to start", LONG, || async {
        (written.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    // ... and another workload is served meanwhile.
    bystander_served(&c, "a SETTINGS flood").await;
    let mid = sigil_tests::rss_kib(pid);
    let sent_then = written.load(Ordering::SeqCst);
    // Now read what the agent sent: it ACKs what it read, one by one.
    let mut seen = Seen::default();
    read_until(&mut rd, &mut seen, "the agent's SETTINGS ACKs", |s| {
        s.settings_acks >= FRAMES || s.goaway.is_some()
    })
    .await;
    let _ = tokio::time::timeout(LONG, writer).await;
    let after = sigil_tests::rss_kib(pid);
    println!(
        "SETTINGS flood: {sent_then} of {FRAMES} frames written when the bystander was served (the agent reads no further while its ACKs are unread); then read {} ACKs, GOAWAY {:?}, closed {}; agent RSS {before} KiB before, {mid} KiB during, {after} KiB after",
        seen.settings_acks, seen.goaway, seen.closed
    );
    assert!(
        after.saturating_sub(before) < 32 * 1024 && mid.saturating_sub(before) < 32 * 1024,
        "agent RSS grew from {before} KiB to {mid}/{after} KiB"
    );
    bystander_served(&c, "after the SETTINGS flood").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_svid_streams_is_closed_and_the_agent_stays_bounded() {
    let c = served_cluster();
    bystander_served(&c, "start-up").await;
    let pid = c.agent_pid().unwrap();
    let before = sigil_tests::rss_kib(pid);
    let sock = UnixStream::connect(c.api_socket()).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(sock);
    // Huge windows: flow control does not hold the agent back, only the
    // unread socket does.
    let mut open = PREFACE.to_vec();
    open.extend(settings(&[(0x4, 0x7fff_ffff)]));
    open.extend(frame(
        WINDOW_UPDATE,
        0,
        0,
        &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
    ));
    for i in 0..32 {
        open.extend(fetch_x509_svid(2 * i + 1));
    }
    wr.write_all(&open).await.unwrap();
    // Push updates to those streams: more SVIDs for this uid, each change
    // a new, longer X509SVIDResponse on every stream.
    let sel = my_uid_selector();
    let mut ids = vec!["spiffe://example.org/flood-bystander".to_string()];
    for i in 0..20 {
        let id = format!("spiffe://example.org/slow-{i}");
        c.create_entry(&id, &["--selector", &sel]);
        ids.push(id);
    }
    ids.sort();
    // The updates went out: a fresh client sees all 21 SVIDs.
    let addr = c.api_addr();
    eventually("all 21 SVIDs served to another client", LONG, || {
        let addr = addr.clone();
        let ids = ids.clone();
        async move { (sigil_tests::x509_ids(&addr).await? == ids).then_some(()) }
    })
    .await;
    let during = sigil_tests::rss_kib(pid);
    // Its writes blocked, the agent closes the connection after the stall
    // timeout (15 s) ...
    let closing = "closing Workload API connection: the client does not read";
    let t0 = std::time::Instant::now();
    eventually("the agent to close the unread connection", LONG, || async {
        (log_count(&c.dir.0, "agent.log", closing) > 0).then_some(())
    })
    .await;
    let closed_after = t0.elapsed();
    // ... so that what the socket still holds ends in EOF.
    let mut drained = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(LONG, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => drained += n,
            Err(_) => panic!("the connection stayed open after {closing:?} ({drained} bytes read)"),
        }
    }
    bystander_served(&c, "after the slow client").await;
    let after = sigil_tests::rss_kib(pid);
    println!(
        "slow client: 32 unread FetchX509SVID streams, 20 updates pushed; closed {closed_after:?} after the updates were out, {} KiB left in the socket; agent RSS {before} KiB before, {during} KiB while unread, {after} KiB after the close",
        drained / 1024
    );
    assert!(
        during.saturating_sub(before) < 32 * 1024,
        "agent RSS grew from {before} KiB to {during} KiB"
    );
    drop(wr);
}
