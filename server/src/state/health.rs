//! What `sigil-server healthcheck --verbose` reports about the datastore
//! and the cluster: the datastore's kind and target, whether it answers
//! now, and for a shared (PostgreSQL) datastore how far this server has
//! followed the change feed compared with its head.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::ServerState;
use crate::config::DatastoreKind;
use crate::datastore::PostgresStore;

/// The change feed this server follows, if any, and how far it got.
#[derive(Default)]
pub(super) struct FeedCursor {
    store: OnceLock<Arc<PostgresStore>>,
    /// The last event sequence number applied.
    seen: AtomicU64,
}

/// The datastore as the health check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatastoreHealth {
    /// `redb` or `postgres`.
    pub kind: &'static str,
    /// The redb file, or `user@host:port/db` (never a password).
    pub target: String,
    /// Why a read failed just now; `None` when the datastore answered.
    pub error: Option<String>,
    /// The PostgreSQL schema version (0 for redb or when unreachable).
    pub schema_version: i32,
    /// Change feed position: (last event applied, head); `None` without
    /// a change feed (redb) or when the head could not be read.
    pub events: Option<(u64, u64)>,
}

impl ServerState {
    /// Records that the change feed of `store` is followed from `seen`.
    pub fn follow_feed(&self, store: Arc<PostgresStore>, seen: u64) {
        let _ = self.feed.store.set(store);
        self.feed.seen.store(seen, Ordering::SeqCst);
    }

    /// Records that the change feed was applied through event `seq`.
    pub fn feed_applied(&self, seq: u64) {
        self.feed.seen.fetch_max(seq, Ordering::SeqCst);
    }

    /// Checks the datastore now (one read) and reports it. Blocking.
    pub fn datastore_health(&self) -> DatastoreHealth {
        let (kind, target) = match &self.cfg.datastore {
            DatastoreKind::Redb { .. } => (
                "redb",
                self.cfg
                    .data_dir
                    .join("datastore.redb")
                    .display()
                    .to_string(),
            ),
            DatastoreKind::Postgres(pg) => {
                ("postgres", crate::datastore::describe_target(&pg.client))
            }
        };
        let error = self
            .store
            .read()
            .and_then(|r| r.agent_count())
            .err()
            .map(|e| e.to_string());
        let mut h = DatastoreHealth {
            kind,
            target,
            error,
            schema_version: 0,
            events: None,
        };
        if let Some(pg) = self.feed.store.get()
            && h.error.is_none()
        {
            match (pg.schema_version(), pg.last_event_seq()) {
                (Ok(v), Ok(head)) => {
                    h.schema_version = v;
                    h.events = Some((self.feed.seen.load(Ordering::SeqCst), head));
                }
                (Err(e), _) | (_, Err(e)) => h.error = Some(e.to_string()),
            }
        }
        h
    }
}
