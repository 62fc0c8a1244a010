//! One suite of the datastore interface, run against every backend: redb
//! (a fresh file per case) and PostgreSQL (a real server started by the
//! test harness, a fresh database per case). Then the PostgreSQL-only
//! behaviour: schema migrations (concurrent first start, a newer schema
//! refused), corrupt rows named, and calls from inside a tokio runtime.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use sigil_core::audit::{self, Caller, Event, ServerTask};
use sigil_core::entry::Entry;
use sigil_core::{SpiffeId, TrustDomain};
use sigil_proto::common::{Entry as PbEntry, FederatedBundle};
use sigil_server::datastore::{
    AgentRecord, ApprovalRecord, ApprovalStatus, AttestationType, ChangeKind, Datastore, Feed,
    KillRecord, KillTarget, POSTGRES_SCHEMA_VERSION, PostgresStore, PublishedCa, PublishedJwt,
    RedbStore, ServerKeysRecord, StoreError, TaskRecord, TokenRecord, UsageKind, UsageMark,
    WriteTx, append_audit,
};
use sigil_server::error::RegistryError;
use sigil_tests::pg::{self, Postgres};

type Case = (&'static str, fn(&dyn Datastore));

/// Every case of the suite; each gets an empty store.
const CASES: &[Case] = &[
    ("records_round_trip", records_round_trip),
    ("a_transaction_reads_its_own_writes", reads_its_own_writes),
    (
        "a_failed_write_writes_nothing_not_even_audit",
        failed_write_writes_nothing,
    ),
    (
        "a_read_snapshot_ignores_later_commits",
        snapshot_ignores_later_commits,
    ),
    (
        "a_token_is_taken_once_by_concurrent_takers",
        token_taken_once,
    ),
    (
        "concurrent_writers_keep_one_valid_audit_chain",
        concurrent_audit_chain,
    ),
    ("a_ban_racing_renewals_is_never_undone", ban_never_undone),
    (
        "an_audit_prefix_is_deleted_and_the_chain_goes_on",
        audit_prefix_deleted,
    ),
    (
        "approvals_and_usage_marks_round_trip",
        approvals_and_usage_marks,
    ),
    (
        "server_keys_are_stored_replaced_and_deleted_by_server",
        server_keys_by_server,
    ),
    (
        "tasks_round_trip_and_end_with_their_kill_in_one_transaction",
        tasks_round_trip,
    ),
];

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn entry(n: u32) -> Entry {
    Entry::from_proto(
        &PbEntry {
            id: format!("entry-{n:05}"),
            spiffe_id: format!("spiffe://example.org/w{n}"),
            parent_id: "spiffe://example.org/agent".into(),
            selectors: vec![format!("unix:uid:{n}")],
            dns_names: vec!["w.example.org".into()],
            // Every entry round-trips its delegable scopes (issue 11 §5).
            delegable_scopes: vec!["mail.read".into(), format!("s{n}")],
            // And the WIT-SVID opt-in.
            wit_svid: n.is_multiple_of(2),
            ..Default::default()
        },
        &td(),
    )
    .unwrap()
}

fn agent(name: &str) -> AgentRecord {
    AgentRecord {
        spiffe_id: id(&format!("spiffe://example.org/sigil/agent/x509pop/{name}")),
        attestation: AttestationType::X509Pop,
        selectors: vec!["x509pop:subject:cn:node".parse().unwrap()],
        serial: "01".into(),
        previous_serial: Some("00".into()),
        svid_expires_at: 2_000,
        last_attested_at: 1_000,
        banned: false,
        created_at: 900,
    }
}

fn token(exp: i64) -> TokenRecord {
    TokenRecord {
        spiffe_id: Some("spiffe://example.org/node".into()),
        expires_at: exp,
    }
}

fn kill(n: u32) -> KillRecord {
    KillRecord {
        id: format!("kill-{n}"),
        target: KillTarget::Entry(format!("entry-{n:05}")),
        reason: "compromised".into(),
        caller: "uid 0".into(),
        created_at: 5,
    }
}

fn bundle(sequence: u64) -> FederatedBundle {
    FederatedBundle {
        x509_authorities: vec![vec![1, 2, 3]],
        jwt_bundle: b"{\"keys\":[]}".to_vec(),
        sequence,
    }
}

fn event(n: u32) -> Event {
    Event::EntryDeleted {
        entry_id: format!("entry-{n}"),
        spiffe_id: id(&format!("spiffe://example.org/w{n}")),
        parent_id: id("spiffe://example.org/agent"),
    }
}

fn caller() -> Caller {
    Caller::server(ServerTask::Expiry)
}

fn all_audit(s: &dyn Datastore) -> Vec<audit::Record> {
    s.read().unwrap().audit_records(0, usize::MAX).unwrap()
}

fn put(s: &dyn Datastore, mut op: impl FnMut(&mut dyn WriteTx) -> Result<(), RegistryError>) {
    s.write(&mut op).unwrap();
}

fn records_round_trip(s: &dyn Datastore) {
    let a = agent("a");
    let mut b = agent("b");
    b.banned = true;
    b.previous_serial = None;
    put(s, |tx| {
        tx.put_agent(&a)?;
        tx.put_agent(&b)?;
        tx.put_entry(&entry(2))?;
        tx.put_entry(&entry(1))?;
        tx.put_token("hash-1", &token(10))?;
        tx.put_bundle("other.org", &bundle(1))?;
        tx.put_kill(&kill(1))?;
        append_audit(tx, &caller(), event(1))?;
        Ok(())
    });
    {
        let r = s.read().unwrap();
        assert_eq!(r.agent(&a.spiffe_id.to_string()).unwrap(), Some(a.clone()));
        assert_eq!(r.agent("spiffe://example.org/none").unwrap(), None);
        assert_eq!(r.agents().unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(r.agent_count().unwrap(), 2);
        assert_eq!(r.entries(&td()).unwrap(), vec![entry(1), entry(2)]);
        assert_eq!(r.entry("entry-00002", &td()).unwrap(), Some(entry(2)));
        assert_eq!(r.entry("entry-99999", &td()).unwrap(), None);
        assert_eq!(r.tokens().unwrap(), vec![token(10)]);
        assert_eq!(
            r.bundles().unwrap(),
            vec![("other.org".to_string(), bundle(1))]
        );
        assert_eq!(r.kills().unwrap(), vec![kill(1)]);
        assert_eq!(r.audit_head().unwrap().map(|h| h.seq), Some(1));
    }
    // Replacing and removing each kind.
    let mut a2 = a.clone();
    a2.serial = "02".into();
    let mut e1 = entry(1);
    e1.revision = 7;
    put(s, |tx| {
        tx.put_agent(&a2)?;
        assert!(tx.delete_agent(&b.spiffe_id.to_string())?);
        assert!(!tx.delete_agent("spiffe://example.org/none")?);
        tx.put_entry(&e1)?;
        assert!(tx.delete_entry("entry-00002")?);
        assert!(!tx.delete_entry("entry-00002")?);
        assert_eq!(tx.take_token("hash-1")?, Some(token(10)));
        assert_eq!(tx.take_token("hash-1")?, None);
        tx.put_bundle("other.org", &bundle(2))?;
        assert!(tx.delete_bundle("other.org")?);
        assert!(!tx.delete_bundle("other.org")?);
        assert_eq!(tx.take_kill("kill-1")?, Some(kill(1)));
        assert_eq!(tx.take_kill("kill-1")?, None);
        append_audit(tx, &caller(), event(2))?;
        Ok(())
    });
    let r = s.read().unwrap();
    assert_eq!(r.agents().unwrap(), vec![a2]);
    assert_eq!(r.entries(&td()).unwrap(), vec![e1]);
    assert!(r.tokens().unwrap().is_empty());
    assert!(r.bundles().unwrap().is_empty());
    assert!(r.kills().unwrap().is_empty());
    let recs = r.audit_records(1, 10).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1].event, event(2));
    assert_eq!(r.audit_records(2, 10).unwrap().len(), 1);
    assert_eq!(r.audit_records(1, 1).unwrap().len(), 1);
    assert!(r.audit_records(3, 10).unwrap().is_empty());
    audit::verify(&recs, None).unwrap();
}

fn reads_its_own_writes(s: &dyn Datastore) {
    put(s, |tx| {
        tx.put_token("t", &token(1))?;
        Ok(())
    });
    put(s, |tx| {
        tx.put_entry(&entry(1))?;
        assert_eq!(tx.entries(&td())?, vec![entry(1)]);
        tx.put_agent(&agent("a"))?;
        assert!(tx.agent(&agent("a").spiffe_id.to_string())?.is_some());
        assert_eq!(tx.agent_count()?, 1);
        assert!(tx.take_token("t")?.is_some());
        assert!(tx.tokens()?.is_empty());
        append_audit(tx, &caller(), event(1))?;
        append_audit(tx, &caller(), event(2))?;
        assert_eq!(tx.audit_head()?.map(|h| h.seq), Some(2));
        assert_eq!(tx.audit_records(1, 10)?.len(), 2);
        Ok(())
    });
    audit::verify(&all_audit(s), None).unwrap();
}

fn failed_write_writes_nothing(s: &dyn Datastore) {
    put(s, |tx| {
        tx.put_token("keep", &token(3))?;
        append_audit(tx, &caller(), event(0))?;
        Ok(())
    });
    let err = s
        .write(&mut |tx| {
            tx.put_entry(&entry(1))?;
            tx.put_agent(&agent("a"))?;
            tx.put_kill(&kill(1))?;
            tx.put_bundle("other.org", &bundle(1))?;
            tx.take_token("keep")?;
            append_audit(tx, &caller(), event(1))?;
            Err(RegistryError::denied("refused after writing"))
        })
        .unwrap_err();
    assert!(matches!(err, RegistryError::PermissionDenied(_)), "{err}");
    let r = s.read().unwrap();
    assert!(r.entries(&td()).unwrap().is_empty());
    assert_eq!(r.agent_count().unwrap(), 0);
    assert!(r.kills().unwrap().is_empty());
    assert!(r.bundles().unwrap().is_empty());
    assert_eq!(r.tokens().unwrap(), vec![token(3)]);
    assert_eq!(r.audit_head().unwrap().map(|h| h.seq), Some(1));
    assert_eq!(r.audit_records(0, 10).unwrap().len(), 1);
}

fn snapshot_ignores_later_commits(s: &dyn Datastore) {
    let r = s.read().unwrap();
    put(s, |tx| {
        tx.put_entry(&entry(1))?;
        Ok(())
    });
    assert!(r.entries(&td()).unwrap().is_empty());
    drop(r);
    assert_eq!(s.read().unwrap().entries(&td()).unwrap().len(), 1);
}

const THREADS: usize = 8;

fn token_taken_once(s: &dyn Datastore) {
    for round in 0..5 {
        let hash = format!("race-{round}");
        put(s, |tx| {
            tx.put_token(&hash, &token(round))?;
            Ok(())
        });
        let barrier = Barrier::new(THREADS);
        let winners: usize = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    sc.spawn(|| {
                        barrier.wait();
                        s.transact(|tx| {
                            let t = tx.take_token(&hash)?;
                            if t.is_some() {
                                append_audit(tx, &caller(), event(0))?;
                            }
                            Ok(t.is_some())
                        })
                        .unwrap()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap()))
                .sum()
        });
        assert_eq!(winners, 1, "round {round}: {winners} takers got the token");
    }
    assert!(s.read().unwrap().tokens().unwrap().is_empty());
    assert_eq!(audit::verify(&all_audit(s), None).unwrap().records, 5);
}

fn concurrent_audit_chain(s: &dyn Datastore) {
    const PER_THREAD: u32 = 25;
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|sc| {
        for t in 0..THREADS as u32 {
            let barrier = &barrier;
            sc.spawn(move || {
                barrier.wait();
                for i in 0..PER_THREAD {
                    let n = t * 1000 + i;
                    put(s, |tx| {
                        tx.put_entry(&entry(n))?;
                        append_audit(tx, &caller(), event(n))?;
                        Ok(())
                    });
                }
            });
        }
    });
    let recs = all_audit(s);
    let want = THREADS * PER_THREAD as usize;
    assert_eq!(recs.len(), want);
    let summary = audit::verify(&recs, None).unwrap();
    assert_eq!(summary.last_seq, want as u64);
    assert_eq!(s.read().unwrap().entries(&td()).unwrap().len(), want);
}

fn ban_never_undone(s: &dyn Datastore) {
    let a = agent("raced");
    let key = a.spiffe_id.to_string();
    put(s, |tx| {
        tx.put_agent(&a)?;
        Ok(())
    });
    let barrier = Barrier::new(THREADS + 1);
    let renewals_after_ban = AtomicUsize::new(0);
    let banned = AtomicBool::new(false);
    std::thread::scope(|sc| {
        for t in 0..THREADS {
            let (barrier, key, banned, after) = (&barrier, &key, &banned, &renewals_after_ban);
            sc.spawn(move || {
                barrier.wait();
                for i in 0..20u32 {
                    let r = s.write(&mut |tx| {
                        let mut rec = tx
                            .agent(key)?
                            .ok_or_else(|| RegistryError::not_found("agent"))?;
                        if rec.banned {
                            return Err(RegistryError::denied("banned"));
                        }
                        std::thread::yield_now();
                        rec.previous_serial = Some(rec.serial.clone());
                        rec.serial = format!("{t:02x}{i:02x}");
                        tx.put_agent(&rec)?;
                        append_audit(tx, &caller(), event(i))?;
                        Ok(())
                    });
                    match r {
                        Ok(()) => {
                            if banned.load(Ordering::SeqCst) {
                                after.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Err(RegistryError::PermissionDenied(_)) => break,
                        Err(e) => panic!("renewal failed: {e}"),
                    }
                }
            });
        }
        barrier.wait();
        put(s, |tx| {
            let mut rec = tx
                .agent(&key)?
                .ok_or_else(|| RegistryError::not_found("agent"))?;
            std::thread::yield_now();
            rec.banned = true;
            tx.put_agent(&rec)?;
            append_audit(tx, &caller(), event(9999))?;
            Ok(())
        });
        banned.store(true, Ordering::SeqCst);
    });
    let rec = s.read().unwrap().agent(&key).unwrap().unwrap();
    assert!(rec.banned, "a renewal undid the ban");
    assert_eq!(
        renewals_after_ban.load(Ordering::SeqCst),
        0,
        "a renewal committed after the ban"
    );
    audit::verify(&all_audit(s), None).unwrap();
}

fn audit_prefix_deleted(s: &dyn Datastore) {
    for n in 1..=5 {
        put(s, |tx| append_audit(tx, &caller(), event(n)));
    }
    let gone = s.transact(|tx| Ok(tx.delete_audit_through(3)?)).unwrap();
    assert_eq!(gone, 3);
    let seqs: Vec<u64> = all_audit(s).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![4, 5]);
    assert_eq!(
        s.read().unwrap().audit_head().unwrap().map(|h| h.seq),
        Some(5)
    );
    put(s, |tx| append_audit(tx, &caller(), event(6)));
    let recs = all_audit(s);
    assert_eq!(recs.last().map(|r| r.seq), Some(6));
    assert_eq!(recs[2].prev_hash, recs[1].hash);
    // Nothing left to delete below 4.
    assert_eq!(s.transact(|tx| Ok(tx.delete_audit_through(3)?)).unwrap(), 0);
}

/// Approval requests (replaced in place when decided) and last-activity
/// marks (one per kind and ID) read back as written.
fn approvals_and_usage_marks(s: &dyn Datastore) {
    let mut a = ApprovalRecord {
        id: "req-1".into(),
        entry_id: "e1".into(),
        spiffe_id: id("spiffe://example.org/w"),
        agent_id: id("spiffe://example.org/a"),
        status: ApprovalStatus::Pending,
        requested_at: 10,
        decided_at: 0,
        decided_by: String::new(),
        expires_at: 0,
    };
    put(s, |tx| Ok(tx.put_approval(&a)?));
    a.status = ApprovalStatus::Granted;
    a.decided_at = 11;
    a.decided_by = "admin uid=0 gid=4242".into();
    a.expires_at = 99;
    put(s, |tx| Ok(tx.put_approval(&a)?));
    let r = s.read().unwrap();
    assert_eq!(r.approvals().unwrap(), vec![a.clone()]);
    assert_eq!(r.approval("req-1").unwrap(), Some(a.clone()));
    assert_eq!(r.approval("nope").unwrap(), None);
    drop(r);
    let marks = [
        UsageMark {
            kind: UsageKind::Entry,
            id: "e1".into(),
            at: 5,
        },
        UsageMark {
            kind: UsageKind::Agent,
            id: "spiffe://example.org/a".into(),
            at: 6,
        },
        UsageMark {
            kind: UsageKind::Entry,
            id: "e1".into(),
            at: 7,
        },
    ];
    put(s, |tx| {
        for m in &marks {
            tx.put_usage_mark(m)?;
        }
        Ok(())
    });
    let mut got = s.read().unwrap().usage_marks().unwrap();
    got.sort_by_key(|m| m.at);
    assert_eq!(got, vec![marks[1].clone(), marks[2].clone()]);
}

/// Runs every case, each on a fresh store from `make`, and reports every
/// failing case by name.
fn server_keys(seq: u64, kid: &str) -> ServerKeysRecord {
    ServerKeysRecord {
        x509: vec![PublishedCa {
            der: "MIIB".into(),
            not_after: 2_000_000_000,
        }],
        jwt: vec![PublishedJwt {
            jwk: serde_json::json!({"kty": "EC", "kid": kid}),
            not_after: 2_000_000_000,
        }],
        // WIT-SVID keys round-trip in both backends too.
        wit: vec![PublishedJwt {
            jwk: serde_json::json!({"kty": "EC", "kid": format!("wit-{kid}"), "use": "wit-svid"}),
            not_after: 2_000_000_000,
        }],
        sequence: seq,
        published_at: 1_700_000_000,
    }
}

fn server_keys_by_server(s: &dyn Datastore) {
    put(s, |tx| {
        tx.put_server_keys("bbbb", &server_keys(1, "k-b"))?;
        tx.put_server_keys("aaaa", &server_keys(2, "k-a"))?;
        Ok(())
    });
    let got = s.read().unwrap().server_keys().unwrap();
    assert_eq!(
        got,
        vec![
            ("aaaa".to_string(), server_keys(2, "k-a")),
            ("bbbb".to_string(), server_keys(1, "k-b")),
        ]
    );
    put(s, |tx| {
        tx.put_server_keys("bbbb", &server_keys(3, "k-b2"))?;
        assert!(tx.delete_server_keys("aaaa")?);
        assert!(!tx.delete_server_keys("cccc")?);
        Ok(())
    });
    assert_eq!(
        s.read().unwrap().server_keys().unwrap(),
        vec![("bbbb".to_string(), server_keys(3, "k-b2"))]
    );
}

fn task(n: u32) -> TaskRecord {
    TaskRecord {
        id: format!("task-{n}"),
        name: format!("job {n}"),
        entry_id: "entry-00001".into(),
        entry_spiffe_id: id("spiffe://example.org/w"),
        owner: "team-ml".into(),
        agent_id: id("spiffe://example.org/sigil/agent/join_token/a"),
        spiffe_id: id(&format!("spiffe://example.org/w/task/task-{n}")),
        started_at: 100 + i64::from(n),
        deadline: 700,
        ended_at: None,
        end_reason: String::new(),
        started_by: "agent spiffe://example.org/sigil/agent/join_token/a".into(),
        ended_by: String::new(),
        kill_id: String::new(),
    }
}

fn tasks_round_trip(s: &dyn Datastore) {
    put(s, |tx| {
        tx.put_task(&task(2))?;
        tx.put_task(&task(1))?;
        append_audit(tx, &caller(), event(1))
    });
    assert_eq!(s.read().unwrap().tasks().unwrap(), vec![task(1), task(2)]);
    assert_eq!(s.read().unwrap().task("task-2").unwrap(), Some(task(2)));
    assert_eq!(s.read().unwrap().task("nope").unwrap(), None);
    // Ending: the task, its kill and the audit record commit together...
    let mut ended = task(1);
    ended.ended_at = Some(200);
    ended.end_reason = "ended".into();
    ended.ended_by = "agent x".into();
    ended.kill_id = "kill-1".into();
    put(s, |tx| {
        let mut t = tx.task("task-1")?.expect("stored");
        assert!(
            t.ended_at.is_none(),
            "the transaction reads the stored task"
        );
        t.ended_at = ended.ended_at;
        t.end_reason = ended.end_reason.clone();
        t.ended_by = ended.ended_by.clone();
        t.kill_id = ended.kill_id.clone();
        tx.put_task(&t)?;
        tx.put_kill(&kill(1))?;
        append_audit(tx, &caller(), event(2))
    });
    let r = s.read().unwrap();
    assert_eq!(r.task("task-1").unwrap(), Some(ended.clone()));
    assert_eq!(r.kills().unwrap().len(), 1);
    drop(r);
    // ... or not at all.
    let err = s.write(&mut |tx| {
        let mut t = task(2);
        t.ended_at = Some(300);
        tx.put_task(&t)?;
        tx.put_kill(&kill(2))?;
        Err(RegistryError::invalid("refused"))
    });
    assert!(err.is_err());
    let r = s.read().unwrap();
    assert_eq!(r.task("task-2").unwrap(), Some(task(2)));
    assert_eq!(r.kills().unwrap().len(), 1);
    assert_eq!(all_audit(s).len(), 2);
}

fn run_suite(backend: &str, mut make: impl FnMut(&str) -> Box<dyn Datastore>) {
    let mut failed = Vec::new();
    for (name, case) in CASES {
        let store = make(name);
        eprintln!("{backend}: {name}");
        if catch_unwind(AssertUnwindSafe(|| case(store.as_ref()))).is_err() {
            failed.push(*name);
        }
    }
    assert!(failed.is_empty(), "{backend} failed: {failed:?}");
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn redb_passes_the_datastore_suite() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("sigil-suite-redb-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    run_suite("redb", |name| {
        Box::new(RedbStore::open(&dir.0.join(format!("{name}.redb"))).unwrap())
    });
}

fn pg_config(pg: &Postgres, db: &str) -> postgres::Config {
    let mut c: postgres::Config = pg.url(db).parse().unwrap();
    c.password(pg::PASSWORD);
    c
}

fn open_db(pg: &Postgres, db: &str) -> PostgresStore {
    pg.create_db(db);
    PostgresStore::open(pg_config(pg, db), 16).unwrap()
}

#[test]
fn postgres_passes_the_datastore_suite_and_migrates_once() {
    let Some(pg) = pg::start("suite") else {
        return;
    };
    run_suite("postgres", |name| Box::new(open_db(&pg, name)));

    // Servers starting at once on an empty database: one schema, one set
    // of migrations.
    pg.create_db("racing_start");
    let barrier = Barrier::new(6);
    std::thread::scope(|sc| {
        for _ in 0..6 {
            sc.spawn(|| {
                barrier.wait();
                let s = PostgresStore::open(pg_config(&pg, "racing_start"), 2).unwrap();
                assert_eq!(s.schema_version().unwrap(), POSTGRES_SCHEMA_VERSION);
            });
        }
    });
    assert_eq!(
        pg.psql(
            "racing_start",
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM sigil_schema_migrations"
        ),
        (1..=POSTGRES_SCHEMA_VERSION)
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_eq!(
        pg.psql("racing_start", "SELECT count(*) FROM write_lock"),
        "1"
    );

    // A database upgraded by a newer binary is refused, naming both versions.
    pg.psql(
        "racing_start",
        "INSERT INTO sigil_schema_migrations (version) VALUES (999)",
    );
    let err = PostgresStore::open(pg_config(&pg, "racing_start"), 1)
        .err()
        .expect("a newer schema must be refused")
        .to_string();
    assert!(
        err.contains("999") && err.contains(&format!("sigil-server's {POSTGRES_SCHEMA_VERSION}")),
        "{err}"
    );

    // A corrupt row is an error naming it, not a panic or a dropped record.
    let s = open_db(&pg, "corrupt");
    put(&s, |tx| {
        tx.put_agent(&agent("a"))?;
        tx.put_entry(&entry(1))?;
        Ok(())
    });
    pg.psql("corrupt", "UPDATE agents SET body = '{\"spiffe_id\": 5}'");
    pg.psql("corrupt", "UPDATE entries SET body = '\\xff00'::bytea");
    let e = s.read().unwrap().agents().unwrap_err();
    assert!(
        matches!(&e, StoreError::Corrupt(m) if m.contains("sigil/agent/x509pop/a")),
        "{e}"
    );
    let e = s.read().unwrap().entries(&td()).unwrap_err();
    assert!(
        matches!(&e, StoreError::Corrupt(m) if m.contains("entry-00001")),
        "{e}"
    );

    // A wrong password: a clear error naming the database, not the password.
    let mut bad = pg_config(&pg, "corrupt");
    bad.password("not-the-password");
    let err = PostgresStore::open(bad, 1)
        .err()
        .expect("refused")
        .to_string();
    assert!(!err.contains("not-the-password"), "{err}");
    assert!(err.contains("postgres@127.0.0.1"), "{err}");

    // Called straight from async code on both runtime flavours (the
    // synchronous client must never start a runtime inside one).
    let s = Arc::new(open_db(&pg, "from_async"));
    for rt in [
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap(),
    ] {
        let s = s.clone();
        rt.block_on(async move {
            put(s.as_ref(), |tx| {
                append_audit(tx, &caller(), event(1))?;
                Ok(())
            });
            drop(s.listen().unwrap());
            assert!(s.last_event_seq().is_ok());
            let s2 = s.clone();
            tokio::spawn(async move { s2.read().unwrap().audit_head().unwrap() })
                .await
                .unwrap()
                .unwrap();
        });
    }
    assert_eq!(s.read().unwrap().audit_head().unwrap().unwrap().seq, 2);

    // A Unix socket directory as the host (percent-encoded, as documented
    // in deploy/config/server.toml), through the config parser.
    pg.create_db("over_socket");
    let dir: String = pg.socket_dir().to_str().unwrap().replace('/', "%2F");
    let cfg = sigil_server::config::ServerConfig::parse(&format!(
        "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n[datastore]\nkind = \"postgres\"\n\
         url = \"postgres://postgres@{dir}:{}/over_socket\"\n",
        pg.port()
    ))
    .unwrap();
    let sigil_server::config::DatastoreKind::Postgres(pgc) = &cfg.datastore else {
        panic!("not postgres");
    };
    let s = PostgresStore::open_configured(pgc).unwrap();
    put(&s, |tx| {
        tx.put_entry(&entry(1))?;
        Ok(())
    });
    assert_eq!(pg.psql("over_socket", "SELECT count(*) FROM entries"), "1");

    // The change feed: a second store on the same database (another
    // server) is woken by a commit and reads what changed, in order; a
    // failed write and a token that was not there add nothing.
    let a = open_db(&pg, "events");
    let b = PostgresStore::open(pg_config(&pg, "events"), 2).unwrap();
    let listener = b.listen().unwrap();
    put(&a, |tx| {
        tx.put_entry(&entry(1))?;
        tx.put_agent(&agent("a"))?;
        append_audit(tx, &caller(), event(1))?;
        Ok(())
    });
    assert!(
        listener.wait(std::time::Duration::from_secs(20)),
        "no notification after a commit"
    );
    let evs = b.events_since(0, 100).unwrap();
    let got: Vec<(ChangeKind, &str)> = evs.iter().map(|e| (e.kind, e.id.as_str())).collect();
    let agent_id = agent("a").spiffe_id.to_string();
    assert_eq!(
        got,
        vec![
            (ChangeKind::Entry, "entry-00001"),
            (ChangeKind::Agent, agent_id.as_str())
        ]
    );
    assert!(evs[0].seq < evs[1].seq);
    let last = b.last_event_seq().unwrap();
    assert_eq!(last, evs[1].seq);
    let _ = a.write(&mut |tx| {
        tx.put_entry(&entry(2))?;
        Err(RegistryError::denied("no"))
    });
    put(&a, |tx| {
        assert!(tx.take_token("absent")?.is_none());
        assert!(!tx.delete_entry("absent")?);
        tx.put_kill(&kill(1))?;
        assert!(tx.take_kill("kill-1")?.is_some());
        Ok(())
    });
    let evs = b.events_since(last, 100).unwrap();
    let got: Vec<(ChangeKind, &str)> = evs.iter().map(|e| (e.kind, e.id.as_str())).collect();
    assert_eq!(
        got,
        vec![(ChangeKind::Kill, "kill-1"), (ChangeKind::Kill, "kill-1")]
    );
    // Catch-up reads what was committed while nobody listened.
    drop(listener);
    put(&a, |tx| {
        tx.delete_entry("entry-00001")?;
        Ok(())
    });
    let evs = b.events_since(evs[1].seq, 100).unwrap();
    assert_eq!(evs.len(), 1);
    assert_eq!(
        (evs[0].kind, evs[0].id.as_str()),
        (ChangeKind::Entry, "entry-00001")
    );

    // The feed is a bounded window: pruning keeps the newest events (and
    // those younger than the minimum age); a reader behind what was pruned
    // is told so, one at or past it reads on.
    let head = b.last_event_seq().unwrap();
    assert!(matches!(b.feed_since(0, 100).unwrap(), Feed::Events(v) if v.len() == 5));
    assert_eq!(
        b.prune_events(0, std::time::Duration::from_secs(3600))
            .unwrap(),
        0,
        "pruned events younger than the minimum age"
    );
    assert_eq!(b.prune_events(2, std::time::Duration::ZERO).unwrap(), 3);
    assert_eq!(b.last_event_seq().unwrap(), head, "pruning moved the head");
    let kept = b.events_since(0, 100).unwrap();
    assert_eq!(kept.len(), 2);
    let Feed::Behind {
        pruned_through: through,
    } = b.feed_since(0, 100).unwrap()
    else {
        panic!("a reader at 0 is not behind after pruning");
    };
    assert!(through < kept[0].seq && through <= head - 2, "{through}");
    assert_eq!(b.feed_since(through, 100).unwrap(), Feed::Events(kept));
    assert_eq!(b.prune_events(2, std::time::Duration::ZERO).unwrap(), 0);

    // A database at schema 1 is brought to the current version on open.
    pg.psql(
        "events",
        "DROP TABLE events_horizon; DROP TABLE tasks; DROP TABLE server_keys; DROP TABLE approvals; DROP TABLE usage_marks; DROP TABLE events; \
         DELETE FROM sigil_schema_migrations WHERE version >= 2",
    );
    drop((a, b));
    let s = PostgresStore::open(pg_config(&pg, "events"), 1).unwrap();
    assert_eq!(s.schema_version().unwrap(), POSTGRES_SCHEMA_VERSION);
    assert_eq!(s.last_event_seq().unwrap(), 0);
    assert_eq!(s.read().unwrap().entries(&td()).unwrap().len(), 0);

    // The database goes away: reads and writes fail with an error (no
    // hang, no panic) and write nothing; once it is back the same store
    // reconnects by itself.
    let mut pg = pg;
    let s = open_db(&pg, "outage");
    put(&s, |tx| {
        tx.put_entry(&entry(1))?;
        Ok(())
    });
    {
        // Several pooled connections, all to go stale at once.
        let held: Vec<_> = (0..4).map(|_| s.read().unwrap()).collect();
        drop(held);
    }
    pg.stop();
    pg.start_server();
    for _ in 0..4 {
        s.read().unwrap();
    }
    pg.stop();
    let err = s
        .write(&mut |tx| {
            tx.put_entry(&entry(2))?;
            Ok(())
        })
        .unwrap_err();
    assert!(matches!(err, RegistryError::Store(_)), "{err}");
    assert!(s.read().is_err(), "a read while the database is down");
    pg.start_server();
    put(&s, |tx| {
        tx.put_entry(&entry(3))?;
        Ok(())
    });
    let ids: Vec<String> = s
        .read()
        .unwrap()
        .entries(&td())
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, vec!["entry-00001", "entry-00003"]);
}
