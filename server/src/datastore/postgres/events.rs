//! The change feed of the PostgreSQL datastore: every write transaction
//! records which records it changed (kind and key) in the `events` table
//! and notifies channel `sigil_events` when it commits. Another server
//! reads the events after its last seen sequence number whenever it is
//! woken ([`EventListener`]), and after a reconnect, so that it converges
//! on changes it did not make.
//!
//! The feed is a bounded window: [`PostgresStore::prune_events`] deletes
//! old events and raises `events_horizon.pruned_through`; a reader whose
//! position is below it is told so ([`Feed::Behind`]) and reloads.

use std::sync::mpsc;
use std::time::Duration;

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use super::tls::PgTls;

use super::PostgresStore;
use super::pool::{Param, Session};
use crate::datastore::StoreError;

/// The notification channel.
pub(super) const CHANNEL: &str = "sigil_events";

/// What kind of record an event names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Entry,
    Agent,
    JoinToken,
    FederatedBundle,
    Kill,
    /// An approval request (issue 11).
    Approval,
    /// A server's published public keys.
    ServerKeys,
}

impl ChangeKind {
    /// The name stored in `events.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Entry => "entry",
            Self::Agent => "agent",
            Self::JoinToken => "join_token",
            Self::FederatedBundle => "federated_bundle",
            Self::Kill => "kill",
            Self::Approval => "approval",
            Self::ServerKeys => "server_keys",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "entry" => Self::Entry,
            "agent" => Self::Agent,
            "join_token" => Self::JoinToken,
            "federated_bundle" => Self::FederatedBundle,
            "kill" => Self::Kill,
            "approval" => Self::Approval,
            "server_keys" => Self::ServerKeys,
            _ => return None,
        })
    }
}

/// One changed record: created, replaced or removed (read the record to
/// know which).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    /// Position in the feed, increasing in commit order.
    pub seq: u64,
    pub kind: ChangeKind,
    /// The record's key (entry ID, agent SPIFFE ID, token hash, trust
    /// domain, kill ID).
    pub id: String,
}

/// What the feed holds after a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feed {
    /// The events after it, in order (maybe none).
    Events(Vec<ChangeEvent>),
    /// Events after it were pruned: the reader missed changes it can no
    /// longer read and must reload everything.
    Behind {
        /// The highest sequence number pruned.
        pruned_through: u64,
    },
}

impl PostgresStore {
    /// Events with `seq > after`, in order, at most `limit`, or
    /// [`Feed::Behind`] if some of them were pruned (one snapshot).
    pub fn feed_since(&self, after: u64, limit: usize) -> Result<Feed, StoreError> {
        let s = self.begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
        let rows = s.query(
            "SELECT pruned_through FROM events_horizon WHERE id = 1",
            vec![],
        )?;
        let pruned: i64 = rows
            .first()
            .and_then(|r| r.try_get(0).ok())
            .ok_or_else(|| StoreError::Corrupt("events_horizon has lost its row".into()))?;
        let pruned = u64::try_from(pruned).unwrap_or(0);
        if after < pruned {
            return Ok(Feed::Behind {
                pruned_through: pruned,
            });
        }
        self.events_in(&s, after, limit).map(Feed::Events)
    }

    /// Deletes events older than `min_age` that are not among the newest
    /// `keep`, raising the horizon to the last one deleted; returns how
    /// many went. A reader that had not reached them reloads
    /// ([`Feed::Behind`]).
    pub fn prune_events(&self, keep: u64, min_age: Duration) -> Result<u64, StoreError> {
        let mut s = self.begin("BEGIN ISOLATION LEVEL READ COMMITTED")?;
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let age = i64::try_from(min_age.as_secs()).unwrap_or(i64::MAX);
        let rows = s.query(
            "SELECT COALESCE(max(seq), 0) FROM events
             WHERE seq <= (SELECT COALESCE(max(seq), 0) FROM events) - $1
               AND EXTRACT(EPOCH FROM (now() - at))::bigint >= $2",
            vec![Param::Int(keep), Param::Int(age)],
        )?;
        let cut: i64 = rows
            .first()
            .and_then(|r| r.try_get(0).ok())
            .ok_or_else(|| StoreError::Corrupt("events: no max(seq)".into()))?;
        if cut <= 0 {
            s.rollback();
            return Ok(0);
        }
        s.execute(
            "UPDATE events_horizon SET pruned_through = GREATEST(pruned_through, $1) WHERE id = 1",
            vec![Param::Int(cut)],
        )?;
        let n = s.execute("DELETE FROM events WHERE seq <= $1", vec![Param::Int(cut)])?;
        s.commit()?;
        Ok(n)
    }

    /// Events with `seq > after`, in order, at most `limit` (pruned ones
    /// are missing: see [`Self::feed_since`]).
    pub fn events_since(&self, after: u64, limit: usize) -> Result<Vec<ChangeEvent>, StoreError> {
        let s = self.pool.session()?;
        self.events_in(&s, after, limit)
    }

    fn events_in(
        &self,
        s: &Session<'_>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangeEvent>, StoreError> {
        let rows = s.query(
            "SELECT seq, kind, id FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
            vec![
                Param::Int(i64::try_from(after).unwrap_or(i64::MAX)),
                Param::Int(i64::try_from(limit).unwrap_or(i64::MAX)),
            ],
        )?;
        rows.iter()
            .map(|r| {
                let bad = |what: String| StoreError::Corrupt(format!("event: {what}"));
                let seq: i64 = r.try_get(0).map_err(|e| bad(e.to_string()))?;
                let kind: String = r.try_get(1).map_err(|e| bad(e.to_string()))?;
                let id: String = r.try_get(2).map_err(|e| bad(e.to_string()))?;
                Ok(ChangeEvent {
                    seq: u64::try_from(seq).map_err(|_| bad(format!("seq {seq}")))?,
                    kind: ChangeKind::parse(&kind)
                        .ok_or_else(|| bad(format!("seq {seq}: unknown kind {kind:?}")))?,
                    id,
                })
            })
            .collect()
    }

    /// The last event's sequence number (0 before the first), pruned ones
    /// included.
    pub fn last_event_seq(&self) -> Result<u64, StoreError> {
        let s = self.pool.session()?;
        let rows = s.query(
            "SELECT GREATEST(
                 (SELECT COALESCE(max(seq), 0) FROM events),
                 (SELECT pruned_through FROM events_horizon WHERE id = 1))",
            vec![],
        )?;
        let seq: i64 = rows
            .first()
            .and_then(|r| r.try_get(0).ok())
            .ok_or_else(|| StoreError::Corrupt("events: no max(seq)".into()))?;
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    /// Listens for commits by any server. The listener has a connection of
    /// its own (outside the pool) and reconnects with backoff when it
    /// drops; it also wakes after each reconnect, since notifications sent
    /// meanwhile are lost and the reader must catch up.
    pub fn listen(&self) -> Result<EventListener, StoreError> {
        let cfg = self.pool.config().clone();
        let tls = self.pool.tls().clone();
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let (wake_tx, wake) = mpsc::sync_channel(1);
        let (stop, stop_rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("sigil-pg-listen".into())
            .spawn(move || {
                // Connected here, never on the caller's thread, which may
                // be driving a tokio runtime.
                let mut first = match listen_on(&cfg, &tls) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        Some(c)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut backoff = sigil_core::backoff::Backoff::new(
                    Duration::from_millis(100),
                    Duration::from_secs(5),
                );
                let stopped = || matches!(stop_rx.try_recv(), Err(mpsc::TryRecvError::Disconnected));
                loop {
                    let mut client = match first.take() {
                        Some(c) => c,
                        None => match listen_on(&cfg, &tls) {
                            Ok(c) => {
                                backoff.reset();
                                let _ = wake_tx.try_send(());
                                c
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "PostgreSQL event listener: reconnect failed; retrying");
                                std::thread::sleep(backoff.next_delay());
                                if stopped() {
                                    return;
                                }
                                continue;
                            }
                        },
                    };
                    loop {
                        if stopped() {
                            return;
                        }
                        let next = {
                            let mut n = client.notifications();
                            let r = n.timeout_iter(Duration::from_millis(250)).next();
                            r.map(|r| r.map(drop))
                        };
                        match next {
                            Ok(Some(())) => {
                                let _ = wake_tx.try_send(());
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "PostgreSQL event listener lost its connection");
                                break;
                            }
                            Ok(None) => {
                                if client.is_closed() {
                                    break;
                                }
                            }
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Backend(format!("event listener thread: {e}")))?;
        match ready.recv_timeout(super::pool::CONNECT_TIMEOUT + Duration::from_secs(1)) {
            Ok(Ok(())) => Ok(EventListener { wake, _stop: stop }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Backend(
                "event listener: no connection within the connect timeout".into(),
            )),
        }
    }
}

fn listen_on(cfg: &postgres::Config, tls: &PgTls) -> Result<Client, StoreError> {
    let mut c = tls
        .connect(cfg)
        .map_err(|e| StoreError::Backend(format!("event listener: {e}")))?;
    c.batch_execute(&format!("LISTEN {CHANNEL}"))
        .map_err(|e| StoreError::Backend(format!("event listener: {e}")))?;
    Ok(c)
}

/// Wakes when some server committed a change (or the listener
/// reconnected): read [`PostgresStore::events_since`] then. Dropping it
/// stops the listener.
pub struct EventListener {
    wake: mpsc::Receiver<()>,
    _stop: mpsc::Sender<()>,
}

impl EventListener {
    /// Waits up to `timeout` for a wake-up; false if none came.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.wake.recv_timeout(timeout).is_ok()
    }
}
