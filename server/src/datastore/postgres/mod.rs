//! The PostgreSQL datastore, for several servers sharing one database.
//!
//! Tables and encodings are those of the redb backend (see
//! `schema/0001_initial.sql`): one row per record, the record's body in the
//! same encoding, parsed and validated again when read. Keeping the bodies
//! rather than one column per field means one encoding for both backends
//! (a migration copies bodies as they are) and one decoding path with its
//! checks; an index column can be added by a later migration when a query
//! needs one.
//!
//! Transactions:
//! - [`Datastore::read`] is a `REPEATABLE READ READ ONLY` snapshot, taken
//!   when `read` is called.
//! - [`Datastore::write`] runs at `READ COMMITTED` and first locks the
//!   one-row `write_lock` table `FOR UPDATE`. Writers, on every server,
//!   therefore take turns and each sees everything committed before it:
//!   read-modify-write never interleaves (a renewal cannot undo a ban), a
//!   join token is taken once, and audit appends are serialized on the
//!   chain head. Every mutation appends an audit record, so the chain
//!   serialized writers already; the lock makes it explicit and covers
//!   the reads made before the append.
//! - Serialization failures and deadlocks (SQLSTATE 40001, 40P01) are
//!   retried a bounded number of times; the mutation is re-runnable by the
//!   [`Datastore::write`] contract.
//!
//! Connections are owned by threads of their own ([`pool`]), so the store
//! can be called from async tasks and blocking threads alike.
//!
//! Every write also records which records it changed in the `events`
//! table and notifies at commit ([`events`]), so that other servers can
//! follow.

mod events;
mod migrate;
mod pool;
mod tls;

use std::time::Duration;

use postgres::Row;
use sigil_core::TrustDomain;
use sigil_core::audit;
use sigil_core::entry::Entry;
use sigil_proto::common::FederatedBundle;

pub use events::{ChangeEvent, ChangeKind, EventListener, Feed};
pub use migrate::SCHEMA_VERSION;
use pool::{Param, Pool, Session};
use tls::PgTls;

use super::records::{
    audit_head_of, decode_audit, decode_bundle, decode_entry, encode_bundle, encode_entry,
};
use super::{
    AgentRecord, ApprovalRecord, Datastore, KillRecord, ReadTx, ServerKeysRecord, StoreError,
    TaskRecord, TokenRecord, UsageMark, WriteTx,
};
use crate::error::RegistryError;

/// How often a write is attempted when it keeps conflicting.
const WRITE_ATTEMPTS: u32 = 8;

/// PostgreSQL-backed [`Datastore`].
pub struct PostgresStore {
    pool: Pool,
    /// `user@host:port/db`, for messages (never the password).
    target: String,
}

/// `user@host:port/dbname` of a client config, without the password.
pub fn describe_target(cfg: &postgres::Config) -> String {
    use postgres::config::Host;
    let host = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let port = cfg
        .get_ports()
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "{}@{}:{}/{}",
        cfg.get_user().unwrap_or(""),
        host,
        if port.is_empty() { "5432".into() } else { port },
        cfg.get_dbname().unwrap_or("")
    )
}

impl PostgresStore {
    /// Connects with `cfg` (password already set, if any), applies pending
    /// schema migrations, and keeps at most `pool_size` connections.
    pub fn open(cfg: postgres::Config, pool_size: usize) -> Result<Self, StoreError> {
        Self::open_with(cfg, PgTls::Off, pool_size)
    }

    /// [`PostgresStore::open`], with connections secured by `tls`.
    fn open_with(
        mut cfg: postgres::Config,
        tls: PgTls,
        pool_size: usize,
    ) -> Result<Self, StoreError> {
        cfg.connect_timeout(pool::CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .application_name("sigil-server");
        let target = describe_target(&cfg);
        let pool = Pool::new(cfg, tls, pool_size);
        let before = {
            let mut s = pool
                .session()
                .map_err(|e| StoreError::Backend(format!("{target}: {e}")))?;
            migrate::migrate(&mut s).map_err(|e| StoreError::Backend(format!("{target}: {e}")))?
        };
        tracing::info!(%target, schema_version = SCHEMA_VERSION, found = before, pool_size, "PostgreSQL datastore open");
        Ok(Self { pool, target })
    }

    /// Opens the database `[datastore]` names, with the password from
    /// `password_file` (which must be private: 0600 or stricter, owned by
    /// this uid or root) when one is given.
    pub fn open_configured(pg: &crate::config::PostgresConfig) -> Result<Self, StoreError> {
        let mut cfg = pg.client.clone();
        if let Some(path) = &pg.password_file {
            cfg.password(read_password(path)?);
        }
        let tls = PgTls::for_mode(pg.sslmode, pg.ca_path.as_deref())?;
        Self::open_with(cfg, tls, pg.pool_size as usize)
    }

    /// The database's schema version.
    pub fn schema_version(&self) -> Result<i32, StoreError> {
        let s = self.pool.session()?;
        migrate::current_version(&s)
    }

    /// `user@host:port/db` of the database.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// A session in a transaction started with `begin`. A stale pooled
    /// connection (e.g. after a database restart) fails at `BEGIN`, before
    /// anything was done: it and every other idle one are closed, and a
    /// fresh connection is tried once.
    fn begin(&self, begin: &str) -> Result<Session<'_>, StoreError> {
        let mut last = None;
        for _ in 0..2 {
            let mut s = self.pool.session()?;
            match s.begin(begin) {
                Ok(()) => return Ok(s),
                Err(e) if s.broken() => {
                    drop(s);
                    self.pool.discard_idle();
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Backend("PostgreSQL: no connection".into())))
    }
}

/// The password in `path`: the file's first line, which must not be empty.
fn read_password(path: &std::path::Path) -> Result<Vec<u8>, StoreError> {
    let bad = |why: String| {
        StoreError::Backend(format!("datastore.password_file {}: {why}", path.display()))
    };
    let raw = sigil_fs::read_private_file(path, sigil_fs::Links::Follow)
        .map_err(|e| bad(e.to_string()))?;
    let line = raw.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err(bad("is empty".into()));
    }
    Ok(line.to_vec())
}

/// A transaction: read-only snapshot or a write transaction.
struct PgTx<'p> {
    s: Session<'p>,
    /// Whether this write transaction recorded a change event.
    changed: bool,
}

fn text(row: &Row, i: usize, what: &str, key: &str) -> Result<String, StoreError> {
    row.try_get::<_, String>(i)
        .map_err(|e| StoreError::Corrupt(format!("{what} {key:?}: column {i}: {e}")))
}

fn bytes(row: &Row, i: usize, what: &str, key: &str) -> Result<Vec<u8>, StoreError> {
    row.try_get::<_, Vec<u8>>(i)
        .map_err(|e| StoreError::Corrupt(format!("{what} {key:?}: column {i}: {e}")))
}

fn int(row: &Row, i: usize, what: &str) -> Result<i64, StoreError> {
    row.try_get::<_, i64>(i)
        .map_err(|e| StoreError::Corrupt(format!("{what}: column {i}: {e}")))
}

/// `(key, body)` rows of a table whose key is text.
fn keyed<T>(
    rows: Vec<Row>,
    what: &str,
    body: fn(&Row, usize, &str, &str) -> Result<T, StoreError>,
) -> Result<Vec<(String, T)>, StoreError> {
    rows.iter()
        .map(|r| {
            let k = text(r, 0, what, "?")?;
            let v = body(r, 1, what, &k)?;
            Ok((k, v))
        })
        .collect()
}

/// The `(seq, line)` of a stored audit row.
fn audit_line_row(r: &Row) -> Result<(u64, String), StoreError> {
    let seq = int(r, 0, "audit record")?;
    let seq = u64::try_from(seq)
        .map_err(|_| StoreError::Corrupt(format!("audit record with seq {seq}")))?;
    Ok((seq, text(r, 1, "audit record", &seq.to_string())?))
}

fn audit_row(r: &Row) -> Result<audit::Record, StoreError> {
    let (seq, line) = audit_line_row(r)?;
    decode_audit(seq, &line)
}

/// The chain head a stored audit row leaves, read from the line's ends
/// (as the redb backend does) instead of decoding the record.
fn audit_head_row(r: &Row) -> Result<audit::Head, StoreError> {
    let (seq, line) = audit_line_row(r)?;
    audit_head_of(seq, &line)
}

fn seq_param(seq: u64) -> Result<Param, StoreError> {
    i64::try_from(seq)
        .map(Param::Int)
        .map_err(|_| StoreError::Backend(format!("audit seq {seq} out of range")))
}

fn t(s: &str) -> Param {
    Param::Text(s.to_owned())
}

impl ReadTx for PgTx<'_> {
    fn agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>, StoreError> {
        let rows = self.s.query(
            "SELECT body FROM agents WHERE spiffe_id = $1",
            vec![t(spiffe_id)],
        )?;
        rows.first()
            .map(|r| {
                AgentRecord::decode(spiffe_id, text(r, 0, "agent record", spiffe_id)?.as_bytes())
            })
            .transpose()
    }
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let rows = self.s.query(
            "SELECT spiffe_id, body FROM agents ORDER BY spiffe_id",
            vec![],
        )?;
        keyed(rows, "agent record", text)?
            .iter()
            .map(|(k, v)| AgentRecord::decode(k, v.as_bytes()))
            .collect()
    }
    fn agent_count(&self) -> Result<u64, StoreError> {
        let rows = self.s.query("SELECT count(*) FROM agents", vec![])?;
        let n = rows
            .first()
            .map(|r| int(r, 0, "agent count"))
            .transpose()?
            .unwrap_or(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }
    fn entries(&self, td: &TrustDomain) -> Result<Vec<Entry>, StoreError> {
        let rows = self
            .s
            .query("SELECT id, body FROM entries ORDER BY id", vec![])?;
        keyed(rows, "entry", bytes)?
            .iter()
            .map(|(k, v)| decode_entry(k, v, td))
            .collect()
    }
    fn entry(&self, id: &str, td: &TrustDomain) -> Result<Option<Entry>, StoreError> {
        let rows = self
            .s
            .query("SELECT body FROM entries WHERE id = $1", vec![t(id)])?;
        rows.first()
            .map(|r| decode_entry(id, &bytes(r, 0, "entry", id)?, td))
            .transpose()
    }
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = self
            .s
            .query("SELECT hash, body FROM join_tokens ORDER BY hash", vec![])?;
        keyed(rows, "join token", text)?
            .iter()
            .map(|(k, v)| TokenRecord::decode(k, v.as_bytes()))
            .collect()
    }
    fn tokens_by_hash(&self) -> Result<Vec<(String, TokenRecord)>, StoreError> {
        let rows = self
            .s
            .query("SELECT hash, body FROM join_tokens ORDER BY hash", vec![])?;
        keyed(rows, "join token", text)?
            .into_iter()
            .map(|(k, v)| TokenRecord::decode(&k, v.as_bytes()).map(|r| (k, r)))
            .collect()
    }
    fn bundles(&self) -> Result<Vec<(String, FederatedBundle)>, StoreError> {
        let rows = self.s.query(
            "SELECT trust_domain, body FROM federated_bundles ORDER BY trust_domain",
            vec![],
        )?;
        keyed(rows, "federated bundle", bytes)?
            .into_iter()
            .map(|(k, v)| decode_bundle(&k, &v).map(|b| (k, b)))
            .collect()
    }
    fn kills(&self) -> Result<Vec<KillRecord>, StoreError> {
        let rows = self
            .s
            .query("SELECT id, body FROM kills ORDER BY id", vec![])?;
        keyed(rows, "kill", text)?
            .iter()
            .map(|(k, v)| KillRecord::decode(k, v.as_bytes()))
            .collect()
    }
    fn usage_marks(&self) -> Result<Vec<UsageMark>, StoreError> {
        let rows = self
            .s
            .query("SELECT key, body FROM usage_marks ORDER BY key", vec![])?;
        keyed(rows, "usage mark", text)?
            .iter()
            .map(|(k, v)| UsageMark::decode(k, v.as_bytes()))
            .collect()
    }
    fn approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError> {
        let rows = self
            .s
            .query("SELECT id, body FROM approvals ORDER BY id", vec![])?;
        keyed(rows, "approval", text)?
            .iter()
            .map(|(k, v)| ApprovalRecord::decode(k, v.as_bytes()))
            .collect()
    }
    fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
        let rows = self
            .s
            .query("SELECT body FROM approvals WHERE id = $1", vec![t(id)])?;
        rows.first()
            .map(|r| text(r, 0, "approval", id))
            .transpose()?
            .map(|b| ApprovalRecord::decode(id, b.as_bytes()))
            .transpose()
    }
    fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let rows = self
            .s
            .query("SELECT id, body FROM tasks ORDER BY id", vec![])?;
        keyed(rows, "task", text)?
            .iter()
            .map(|(k, v)| TaskRecord::decode(k, v.as_bytes()))
            .collect()
    }
    fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let rows = self
            .s
            .query("SELECT body FROM tasks WHERE id = $1", vec![t(id)])?;
        rows.first()
            .map(|r| text(r, 0, "task", id))
            .transpose()?
            .map(|b| TaskRecord::decode(id, b.as_bytes()))
            .transpose()
    }
    fn server_keys(&self) -> Result<Vec<(String, ServerKeysRecord)>, StoreError> {
        let rows = self.s.query(
            "SELECT server_id, body FROM server_keys ORDER BY server_id",
            vec![],
        )?;
        keyed(rows, "server keys", text)?
            .into_iter()
            .map(|(k, v)| ServerKeysRecord::decode(&k, v.as_bytes()).map(|r| (k, r)))
            .collect()
    }
    fn audit_head(&self) -> Result<Option<audit::Head>, StoreError> {
        let rows = self.s.query(
            "SELECT seq, line FROM audit ORDER BY seq DESC LIMIT 1",
            vec![],
        )?;
        rows.first().map(audit_head_row).transpose()
    }
    fn audit_records(&self, since: u64, limit: usize) -> Result<Vec<audit::Record>, StoreError> {
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.s.query(
            "SELECT seq, line FROM audit WHERE seq >= $1 ORDER BY seq LIMIT $2",
            vec![Param::Int(since), Param::Int(limit)],
        )?;
        rows.iter().map(audit_row).collect()
    }
}

impl PgTx<'_> {
    /// Records that the record `id` of `kind` changed in this transaction.
    fn event(&mut self, kind: ChangeKind, id: &str) -> Result<(), StoreError> {
        self.s.execute(
            "INSERT INTO events (kind, id) VALUES ($1, $2)",
            vec![t(kind.as_str()), t(id)],
        )?;
        self.changed = true;
        Ok(())
    }
    fn upsert(
        &mut self,
        kind: ChangeKind,
        sql: &'static str,
        key: &str,
        body: Param,
    ) -> Result<(), StoreError> {
        self.s.execute(sql, vec![t(key), body])?;
        self.event(kind, key)
    }
    fn delete(
        &mut self,
        kind: ChangeKind,
        sql: &'static str,
        key: &str,
    ) -> Result<bool, StoreError> {
        let gone = self.s.execute(sql, vec![t(key)])? > 0;
        if gone {
            self.event(kind, key)?;
        }
        Ok(gone)
    }
    /// Runs a `DELETE … RETURNING body` and yields the text body, if any.
    fn take_text(
        &mut self,
        kind: ChangeKind,
        sql: &'static str,
        key: &str,
        what: &str,
    ) -> Result<Option<String>, StoreError> {
        let rows = self.s.query(sql, vec![t(key)])?;
        let body = rows.first().map(|r| text(r, 0, what, key)).transpose()?;
        if body.is_some() {
            self.event(kind, key)?;
        }
        Ok(body)
    }
    /// Notifies listeners (delivered at commit only) and commits.
    fn finish(&mut self) -> Result<(), StoreError> {
        if self.changed && !self.s.failed() {
            self.s.batch(&format!("NOTIFY {}", events::CHANNEL))?;
        }
        self.s.commit()
    }
}

impl WriteTx for PgTx<'_> {
    fn put_agent(&mut self, a: &AgentRecord) -> Result<(), StoreError> {
        let body = String::from_utf8(a.encode()?)
            .map_err(|e| StoreError::Backend(format!("agent record encoding: {e}")))?;
        self.upsert(
            ChangeKind::Agent,
            "INSERT INTO agents (spiffe_id, body) VALUES ($1, $2)
             ON CONFLICT (spiffe_id) DO UPDATE SET body = EXCLUDED.body",
            &a.spiffe_id.to_string(),
            Param::Text(body),
        )
    }
    fn delete_agent(&mut self, spiffe_id: &str) -> Result<bool, StoreError> {
        self.delete(
            ChangeKind::Agent,
            "DELETE FROM agents WHERE spiffe_id = $1",
            spiffe_id,
        )
    }
    fn put_entry(&mut self, e: &Entry) -> Result<(), StoreError> {
        self.upsert(
            ChangeKind::Entry,
            "INSERT INTO entries (id, body) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
            &e.id,
            Param::Bytes(encode_entry(e)),
        )
    }
    fn delete_entry(&mut self, id: &str) -> Result<bool, StoreError> {
        self.delete(ChangeKind::Entry, "DELETE FROM entries WHERE id = $1", id)
    }
    fn put_token(&mut self, hash: &str, tok: &TokenRecord) -> Result<(), StoreError> {
        let body = String::from_utf8(tok.encode()?)
            .map_err(|e| StoreError::Backend(format!("join token encoding: {e}")))?;
        self.upsert(
            ChangeKind::JoinToken,
            "INSERT INTO join_tokens (hash, body) VALUES ($1, $2)
             ON CONFLICT (hash) DO UPDATE SET body = EXCLUDED.body",
            hash,
            Param::Text(body),
        )
    }
    fn take_token(&mut self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.take_text(
            ChangeKind::JoinToken,
            "DELETE FROM join_tokens WHERE hash = $1 RETURNING body",
            hash,
            "join token",
        )?
        .map(|b| TokenRecord::decode(hash, b.as_bytes()))
        .transpose()
    }
    fn put_bundle(&mut self, trust_domain: &str, b: &FederatedBundle) -> Result<(), StoreError> {
        self.upsert(
            ChangeKind::FederatedBundle,
            "INSERT INTO federated_bundles (trust_domain, body) VALUES ($1, $2)
             ON CONFLICT (trust_domain) DO UPDATE SET body = EXCLUDED.body",
            trust_domain,
            Param::Bytes(encode_bundle(b)),
        )
    }
    fn delete_bundle(&mut self, trust_domain: &str) -> Result<bool, StoreError> {
        self.delete(
            ChangeKind::FederatedBundle,
            "DELETE FROM federated_bundles WHERE trust_domain = $1",
            trust_domain,
        )
    }
    fn put_server_keys(&mut self, server_id: &str, r: &ServerKeysRecord) -> Result<(), StoreError> {
        let body = String::from_utf8(r.encode()?)
            .map_err(|e| StoreError::Backend(format!("server keys encoding: {e}")))?;
        self.upsert(
            ChangeKind::ServerKeys,
            "INSERT INTO server_keys (server_id, body) VALUES ($1, $2)
             ON CONFLICT (server_id) DO UPDATE SET body = EXCLUDED.body",
            server_id,
            Param::Text(body),
        )
    }
    fn delete_server_keys(&mut self, server_id: &str) -> Result<bool, StoreError> {
        self.delete(
            ChangeKind::ServerKeys,
            "DELETE FROM server_keys WHERE server_id = $1",
            server_id,
        )
    }
    fn put_kill(&mut self, k: &KillRecord) -> Result<(), StoreError> {
        let body = String::from_utf8(k.encode()?)
            .map_err(|e| StoreError::Backend(format!("kill encoding: {e}")))?;
        self.upsert(
            ChangeKind::Kill,
            "INSERT INTO kills (id, body) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
            &k.id,
            Param::Text(body),
        )
    }
    fn take_kill(&mut self, id: &str) -> Result<Option<KillRecord>, StoreError> {
        self.take_text(
            ChangeKind::Kill,
            "DELETE FROM kills WHERE id = $1 RETURNING body",
            id,
            "kill",
        )?
        .map(|b| KillRecord::decode(id, b.as_bytes()))
        .transpose()
    }
    fn put_usage_mark(&mut self, m: &UsageMark) -> Result<(), StoreError> {
        let body = String::from_utf8(m.encode()?)
            .map_err(|e| StoreError::Backend(format!("usage mark encoding: {e}")))?;
        // Bookkeeping written in batches: no change event (other servers
        // keep their own marks in memory).
        self.s.execute(
            "INSERT INTO usage_marks (key, body) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET body = EXCLUDED.body",
            vec![t(&m.key()), Param::Text(body)],
        )?;
        Ok(())
    }
    fn put_approval(&mut self, a: &ApprovalRecord) -> Result<(), StoreError> {
        let body = String::from_utf8(a.encode()?)
            .map_err(|e| StoreError::Backend(format!("approval encoding: {e}")))?;
        self.upsert(
            ChangeKind::Approval,
            "INSERT INTO approvals (id, body) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
            &a.id,
            Param::Text(body),
        )
    }
    fn put_task(&mut self, task: &TaskRecord) -> Result<(), StoreError> {
        let body = String::from_utf8(task.encode()?)
            .map_err(|e| StoreError::Backend(format!("task encoding: {e}")))?;
        // Not in the change feed: every server reads a task from the
        // datastore whenever it uses it, and a task's end reaches the other
        // servers as the kill it makes.
        self.s.execute(
            "INSERT INTO tasks (id, body) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
            vec![t(&task.id), Param::Text(body)],
        )?;
        Ok(())
    }
    fn put_audit(&mut self, r: &audit::Record) -> Result<(), StoreError> {
        self.put_audit_line(r.seq, &r.to_jsonl_line())
    }
    fn put_audit_line(&mut self, seq: u64, line: &str) -> Result<(), StoreError> {
        self.s.execute(
            "INSERT INTO audit (seq, line) VALUES ($1, $2)",
            vec![seq_param(seq)?, Param::Text(line.to_string())],
        )?;
        Ok(())
    }
    fn delete_audit_through(&mut self, through: u64) -> Result<u64, StoreError> {
        self.s.execute(
            "DELETE FROM audit WHERE seq <= $1",
            vec![seq_param(through)?],
        )
    }
}

impl Datastore for PostgresStore {
    fn read(&self) -> Result<Box<dyn ReadTx + '_>, StoreError> {
        // The snapshot is taken at a transaction's first statement: take it
        // now, in the same round trip, so that it is the state at `read()`.
        let s = self.begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")?;
        Ok(Box::new(PgTx { s, changed: false }))
    }

    fn write(
        &self,
        op: &mut dyn FnMut(&mut dyn WriteTx) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        let mut attempt = 1;
        loop {
            let mut tx = PgTx {
                s: self.begin("BEGIN ISOLATION LEVEL READ COMMITTED")?,
                changed: false,
            };
            let locked =
                tx.s.query("SELECT id FROM write_lock WHERE id = 1 FOR UPDATE", vec![]);
            let r = match locked {
                Ok(rows) if rows.is_empty() => Err(RegistryError::Store(StoreError::Corrupt(
                    "table write_lock has lost its row".into(),
                ))),
                Ok(_) => op(&mut tx).and_then(|()| tx.finish().map_err(RegistryError::Store)),
                Err(e) => Err(e.into()),
            };
            let conflicted = tx.s.conflicted();
            tx.s.rollback();
            drop(tx);
            match r {
                Err(e) if conflicted && attempt < WRITE_ATTEMPTS => {
                    tracing::debug!(attempt, error = %e, "PostgreSQL write conflicted; retrying");
                    std::thread::sleep(Duration::from_millis(2 << attempt.min(6)));
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}
