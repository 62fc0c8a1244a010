//! Group commit of issuance records.
//!
//! Every X.509 mint batch and every JWT-SVID is audited in a write
//! transaction that must be durable before the SVIDs are returned, and on
//! a disk each such commit has a fixed cost (an `fdatasync`, the file's
//! metadata) far above the record's own. When many agents mint at once (a
//! rotation storm, a burst of JWT requests) their records wait for each
//! other at the datastore's single writer anyway. Here they wait in one
//! queue instead: the first waiter commits every record queued so far in
//! one transaction, in queue order, and the records queued while it
//! commits go together in the next one. Nothing waits for company: a
//! record that finds no commit running is committed at once, alone.
//!
//! Each record is still its own link of the chain and still in the same
//! transaction as nothing but other issuance records, so a crash loses
//! either a whole group or none of it, and no SVID of a group is returned
//! before the group is durable. If the transaction fails, every record in
//! it gets the same error and none of their SVIDs are returned.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::datastore::{Datastore, WriteTx};
use crate::error::RegistryError;

/// One record's append, run inside the group's transaction (again, if the
/// backend retries it).
pub(super) type Append = Box<dyn FnMut(&mut dyn WriteTx) -> Result<(), RegistryError> + Send>;

/// The queue of appends waiting for a commit.
#[derive(Default)]
pub(super) struct GroupCommit {
    queue: Mutex<Queue>,
    /// Signalled whenever a group's results are posted.
    posted: Condvar,
}

#[derive(Default)]
struct Queue {
    next_ticket: u64,
    waiting: Vec<(u64, Append)>,
    /// Results of committed groups, until each waiter takes its own.
    results: HashMap<u64, Result<(), RegistryError>>,
    /// A waiter is committing a group now.
    committing: bool,
    /// Transactions committed (or failed), read by the tests.
    groups: u64,
}

impl GroupCommit {
    /// Appends one record durably: returns once the transaction holding it
    /// has committed (or failed). Blocks; call from a blocking thread.
    pub(super) fn append(&self, store: &dyn Datastore, job: Append) -> Result<(), RegistryError> {
        let mut q = self.lock();
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.waiting.push((ticket, job));
        loop {
            if let Some(r) = q.results.remove(&ticket) {
                return r;
            }
            if q.committing {
                q = self.posted.wait(q).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // This waiter commits everything queued, its own record included
            // (it is queued and has no result yet).
            q.committing = true;
            let group = std::mem::take(&mut q.waiting);
            drop(q);
            q = self.commit(store, group);
        }
    }

    /// Commits `group` in one transaction and posts its results; returns
    /// the queue locked again.
    fn commit(&self, store: &dyn Datastore, group: Vec<(u64, Append)>) -> MutexGuard<'_, Queue> {
        // Posts the results even if the transaction panics, so that no
        // waiter of the group blocks forever.
        struct Post<'a> {
            owner: &'a GroupCommit,
            tickets: Vec<u64>,
            result: Option<Result<(), RegistryError>>,
        }
        impl Drop for Post<'_> {
            fn drop(&mut self) {
                let result = self.result.take().unwrap_or_else(|| {
                    Err(RegistryError::internal(
                        "the audit transaction of this record panicked",
                    ))
                });
                let mut q = self.owner.lock();
                for t in self.tickets.drain(..) {
                    q.results.insert(t, result.clone());
                }
                q.committing = false;
                q.groups += 1;
                self.owner.posted.notify_all();
            }
        }
        let (tickets, mut jobs): (Vec<u64>, Vec<Append>) = group.into_iter().unzip();
        let mut post = Post {
            owner: self,
            tickets,
            result: None,
        };
        let result = store.write(&mut |tx| {
            for job in jobs.iter_mut() {
                job(tx)?;
            }
            Ok(())
        });
        if result.is_ok() {
            let m = &crate::metrics::METRICS;
            m.audit_issuance_commits.inc();
            m.audit_issuance_records.inc_by(jobs.len() as u64);
        }
        post.result = Some(result);
        drop(post);
        self.lock()
    }

    /// Transactions run so far.
    #[cfg(test)]
    pub(super) fn groups(&self) -> u64 {
        self.lock().groups
    }

    /// Appends waiting for the next commit.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use sigil_core::audit::{Event, KeyKind, verify};
    use sigil_core::caller::{Caller, ServerTask};

    use super::*;
    use crate::datastore::{RedbStore, append_audit_ref};

    struct Temp {
        dir: std::path::PathBuf,
        store: Arc<RedbStore>,
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn temp(name: &str) -> Temp {
        let dir = std::env::temp_dir().join(format!("sigil-group-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Arc::new(RedbStore::open(&dir.join("db.redb")).unwrap());
        Temp { dir, store }
    }

    /// A record told apart by its key ID.
    fn event(n: usize) -> Event {
        Event::KeyPrepared {
            key_kind: KeyKind::Jwt,
            key_id: format!("k{n}"),
        }
    }

    fn record(n: usize) -> Append {
        let caller = Caller::server(ServerTask::KeyRotation);
        let e = event(n);
        Box::new(move |tx| append_audit_ref(tx, &caller, &e))
    }

    /// An append that signals once it runs inside the transaction and then
    /// holds the transaction open until released.
    fn held(n: usize) -> (Append, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let mut inner = record(n);
        let job: Append = Box::new(move |tx| {
            inner(tx)?;
            let _ = entered_tx.send(());
            let _ = release_rx.recv_timeout(Duration::from_secs(30));
            Ok(())
        });
        (job, entered, release)
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn key_ids(store: &RedbStore) -> Vec<String> {
        let records = store.read().unwrap().audit_records(1, 1000).unwrap();
        if !records.is_empty() {
            verify(&records, None).unwrap();
        }
        records
            .into_iter()
            .map(|r| match r.event {
                Event::KeyPrepared { key_id, .. } => key_id,
                other => panic!("unexpected record {other:?}"),
            })
            .collect()
    }

    /// Joins `h`, failing the test if it has not returned within 30 s (a
    /// waiter left blocked).
    fn join<T: Send + 'static>(h: std::thread::JoinHandle<T>) -> std::thread::Result<T> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(h.join());
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the append returned within 30 s")
    }

    /// Starts an append of `job` on its own thread.
    fn spawn(
        gc: &Arc<GroupCommit>,
        t: &Temp,
        job: Append,
    ) -> std::thread::JoinHandle<Result<(), RegistryError>> {
        let (gc, store) = (gc.clone(), t.store.clone());
        std::thread::spawn(move || gc.append(&*store, job))
    }

    #[test]
    fn records_queued_behind_a_commit_share_the_next_one_in_order() {
        let t = temp("share");
        let gc = Arc::new(GroupCommit::default());
        // Alone: committed at once, in a transaction of its own.
        gc.append(&*t.store, record(0)).unwrap();
        assert_eq!(gc.groups(), 1);

        let (job, entered, release) = held(1);
        let first = spawn(&gc, &t, job);
        entered.recv_timeout(Duration::from_secs(30)).unwrap();
        let mut rest = Vec::new();
        for n in 2..7 {
            rest.push(spawn(&gc, &t, record(n)));
            // One at a time, so that the queue order is known.
            wait_for("the append to queue", || gc.waiting() == n - 1);
        }
        release.send(()).unwrap();
        join(first).unwrap().unwrap();
        for h in rest {
            join(h).unwrap().unwrap();
        }
        // The held one, then the five that waited for it, together.
        assert_eq!(gc.groups(), 3);
        let ids: Vec<String> = (0..7).map(|n| format!("k{n}")).collect();
        assert_eq!(key_ids(&t.store), ids);
    }

    #[test]
    fn a_failed_group_answers_every_record_in_it_and_writes_none() {
        let t = temp("fail");
        let gc = Arc::new(GroupCommit::default());
        let (job, entered, release) = held(0);
        let first = spawn(&gc, &t, job);
        entered.recv_timeout(Duration::from_secs(30)).unwrap();
        let good = spawn(&gc, &t, record(1));
        wait_for("the good append to queue", || gc.waiting() == 1);
        let bad = spawn(
            &gc,
            &t,
            Box::new(|_| Err(RegistryError::internal("refused by the test"))),
        );
        wait_for("the bad append to queue", || gc.waiting() == 2);
        release.send(()).unwrap();
        join(first).unwrap().unwrap();
        let (good, bad) = (join(good).unwrap(), join(bad).unwrap());
        for r in [good, bad] {
            let e = r.unwrap_err();
            assert!(e.to_string().contains("refused by the test"), "{e}");
        }
        assert_eq!(key_ids(&t.store), ["k0"]);
        // The queue is free again.
        gc.append(&*t.store, record(2)).unwrap();
        assert_eq!(key_ids(&t.store), ["k0", "k2"]);
    }

    #[test]
    fn a_panicking_append_leaves_no_waiter_blocked() {
        let t = temp("panic");
        let gc = Arc::new(GroupCommit::default());
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let first = spawn(
            &gc,
            &t,
            Box::new(move |_| {
                let _ = entered_tx.send(());
                let _ = release_rx.recv_timeout(Duration::from_secs(30));
                panic!("append panicked (expected by the test)");
            }),
        );
        entered.recv_timeout(Duration::from_secs(30)).unwrap();
        let after = spawn(&gc, &t, record(1));
        wait_for("the append to queue", || gc.waiting() == 1);
        release.send(()).unwrap();
        assert!(join(first).is_err(), "the panic reaches its own caller");
        join(after).unwrap().unwrap();
        assert_eq!(key_ids(&t.store), ["k1"]);
    }
}
