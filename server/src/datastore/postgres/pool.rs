//! Connections to PostgreSQL that are safe to use from anywhere, including
//! from inside a tokio runtime: each connection is owned by its own OS
//! thread (the synchronous `postgres` client runs a private runtime, which
//! must never be entered from a runtime thread), and callers send it
//! closures over a channel and wait for the answer with a deadline. A small
//! bounded pool hands out sessions; a session whose connection failed is
//! dropped instead of returned, so the next caller reconnects.

use std::sync::{Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Row};

use super::tls::PgTls;

use crate::datastore::StoreError;

/// Longest wait for a connection to be established.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for one statement's answer (lock waits included).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a free connection when all are in use.
const POOL_WAIT: Duration = Duration::from_secs(30);

type Job = Box<dyn FnOnce(&mut Client) + Send>;

/// One connection, owned by its thread. Dropping it ends the thread and
/// closes the connection once any running statement returns.
struct Conn {
    jobs: mpsc::Sender<Job>,
}

impl Conn {
    fn open(cfg: &postgres::Config, tls: &PgTls) -> Result<Self, StoreError> {
        let (cfg, tls) = (cfg.clone(), tls.clone());
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sigil-postgres".into())
            .spawn(move || {
                let mut client = match tls.connect(&cfg) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(describe(&e)));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    job(&mut client);
                }
            })
            .map_err(|e| StoreError::Backend(format!("PostgreSQL connection thread: {e}")))?;
        match ready_rx.recv_timeout(CONNECT_TIMEOUT + Duration::from_secs(1)) {
            Ok(Ok(())) => Ok(Self { jobs }),
            Ok(Err(e)) => Err(StoreError::Backend(format!(
                "connecting to PostgreSQL: {e}"
            ))),
            Err(_) => Err(StoreError::Backend(format!(
                "connecting to PostgreSQL: no answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// A statement parameter, owned so that it can travel to the connection's
/// thread.
#[derive(Debug, Clone)]
pub(super) enum Param {
    Text(String),
    Bytes(Vec<u8>),
    Int(i64),
}

impl Param {
    fn sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Self::Text(s) => s,
            Self::Bytes(b) => b,
            Self::Int(i) => i,
        }
    }
}

/// A PostgreSQL error as text: the server's message and SQLSTATE when it
/// has one. Never contains the connection's password (the client does not
/// put it in errors).
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => {
            let mut msg = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                let more = c.to_string();
                if !msg.contains(&more) {
                    msg = format!("{msg}: {more}");
                }
                cause = c.source();
            }
            msg
        }
    }
}

/// A bounded set of connections to one database.
pub(super) struct Pool {
    cfg: postgres::Config,
    tls: PgTls,
    max: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Conn>,
    open: usize,
}

impl Pool {
    pub(super) fn new(cfg: postgres::Config, tls: PgTls, max: usize) -> Self {
        Self {
            cfg,
            tls,
            max: max.max(1),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// The client configuration connections are opened with.
    pub(super) fn config(&self) -> &postgres::Config {
        &self.cfg
    }

    /// How connections are secured.
    pub(super) fn tls(&self) -> &PgTls {
        &self.tls
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // The state is two plain fields updated together; a panic elsewhere
        // cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session on an idle connection, a new one while fewer than the
    /// pool's size are open, or the next one freed (bounded wait).
    pub(super) fn session(&self) -> Result<Session<'_>, StoreError> {
        let deadline = Instant::now() + POOL_WAIT;
        let mut st = self.lock();
        loop {
            if let Some(conn) = st.idle.pop() {
                return Ok(Session::new(self, conn));
            }
            if st.open < self.max {
                st.open += 1;
                drop(st);
                return match Conn::open(&self.cfg, &self.tls) {
                    Ok(conn) => Ok(Session::new(self, conn)),
                    Err(e) => {
                        self.release(None);
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::Backend(format!(
                    "all {} PostgreSQL connections stayed busy for {}s (datastore.pool_size)",
                    self.max,
                    POOL_WAIT.as_secs()
                )));
            }
            st = self
                .freed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Closes every idle connection: after one failed, the others (opened
    /// before the same database restart) are likely dead too.
    pub(super) fn discard_idle(&self) {
        let mut st = self.lock();
        let n = st.idle.len();
        st.idle.clear();
        st.open = st.open.saturating_sub(n);
        drop(st);
        self.freed.notify_all();
    }

    fn release(&self, conn: Option<Conn>) {
        let mut st = self.lock();
        match conn {
            Some(c) => st.idle.push(c),
            None => st.open = st.open.saturating_sub(1),
        }
        drop(st);
        self.freed.notify_one();
    }
}

/// One connection lent by the pool. Statement errors are remembered: a
/// failed connection is not returned to the pool, and a transaction in
/// which a statement failed can only roll back.
pub(super) struct Session<'p> {
    pool: &'p Pool,
    conn: Option<Conn>,
    broken: std::cell::Cell<bool>,
    failed: std::cell::Cell<bool>,
    conflict: std::cell::Cell<bool>,
    in_tx: bool,
}

impl<'p> Session<'p> {
    fn new(pool: &'p Pool, conn: Conn) -> Self {
        Self {
            pool,
            conn: Some(conn),
            broken: Default::default(),
            failed: Default::default(),
            conflict: Default::default(),
            in_tx: false,
        }
    }

    /// Whether the connection failed (it will be discarded).
    pub(super) fn broken(&self) -> bool {
        self.broken.get()
    }

    /// Whether a statement failed with a serialization failure or a
    /// deadlock: the transaction may succeed if run again.
    pub(super) fn conflicted(&self) -> bool {
        self.conflict.get()
    }

    /// Whether any statement in this session failed.
    pub(super) fn failed(&self) -> bool {
        self.failed.get()
    }

    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Some(conn) = &self.conn else {
            return Err(StoreError::Backend("PostgreSQL session closed".into()));
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |c| {
            let r = f(c).map_err(|e| {
                let retry = matches!(
                    e.code(),
                    Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
                        || *c == SqlState::T_R_DEADLOCK_DETECTED
                );
                (
                    describe(&e),
                    e.as_db_error().is_none() || e.is_closed(),
                    retry,
                )
            });
            let _ = tx.send(r);
        });
        let fail = |msg: String, broken: bool, retry: bool| {
            self.failed.set(true);
            if broken {
                self.broken.set(true);
            }
            if retry {
                self.conflict.set(true);
            }
            StoreError::Backend(format!("PostgreSQL: {msg}"))
        };
        if conn.jobs.send(job).is_err() {
            return Err(fail("connection lost".into(), true, false));
        }
        match rx.recv_timeout(CALL_TIMEOUT) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err((msg, broken, retry))) => Err(fail(msg, broken, retry)),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(fail(
                format!("no answer within {}s", CALL_TIMEOUT.as_secs()),
                true,
                false,
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(fail("connection lost".into(), true, false))
            }
        }
    }

    /// Runs statements without parameters (`BEGIN`, DDL).
    pub(super) fn batch(&self, sql: &str) -> Result<(), StoreError> {
        let sql = sql.to_owned();
        self.call(move |c| c.batch_execute(&sql))
    }

    /// One query's rows.
    pub(super) fn query(
        &self,
        sql: &'static str,
        params: Vec<Param>,
    ) -> Result<Vec<Row>, StoreError> {
        self.call(move |c| {
            let p: Vec<&(dyn ToSql + Sync)> = params.iter().map(Param::sql).collect();
            c.query(sql, &p)
        })
    }

    /// One statement's affected row count.
    pub(super) fn execute(&self, sql: &'static str, params: Vec<Param>) -> Result<u64, StoreError> {
        self.call(move |c| {
            let p: Vec<&(dyn ToSql + Sync)> = params.iter().map(Param::sql).collect();
            c.execute(sql, &p)
        })
    }

    /// Starts a transaction with `begin` (a `BEGIN …` statement).
    pub(super) fn begin(&mut self, begin: &str) -> Result<(), StoreError> {
        self.batch(begin)?;
        self.in_tx = true;
        Ok(())
    }

    /// Commits; refused (and rolled back) if any statement failed, since
    /// PostgreSQL would silently turn the COMMIT into a ROLLBACK.
    pub(super) fn commit(&mut self) -> Result<(), StoreError> {
        if self.failed() {
            self.rollback();
            return Err(StoreError::Backend(
                "PostgreSQL: a statement failed inside the transaction; rolled back".into(),
            ));
        }
        let r = self.batch("COMMIT");
        self.in_tx = false;
        r
    }

    /// Rolls back; a connection that cannot roll back is discarded.
    pub(super) fn rollback(&mut self) {
        if self.in_tx {
            self.in_tx = false;
            if self.batch("ROLLBACK").is_err() {
                self.broken.set(true);
            }
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.rollback();
        let conn = self.conn.take().filter(|_| !self.broken());
        self.pool.release(conn);
    }
}
