//! Connection accounting shared by the server's listeners and the agent's
//! Workload API socket, as pure logic (no sockets, no timers):
//!
//! - [`ConnLimiter`] admits a connection only while its key (a source IP
//!   address, a peer uid) holds fewer than a per-key cap and the total is
//!   under a global cap. The last `reserve` slots of the total go only to
//!   keys that hold fewer than `reserve_per_key` connections, so that a
//!   few keys at their caps cannot lock everyone else out.
//! - [`Activity`] tracks whether a connection has a call in flight and
//!   since when it has had none, so that the transport can close idle
//!   connections (and ones that never send a first request).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The caps a [`ConnLimiter`] enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnCaps {
    /// Most connections open at once, over all keys.
    pub total: usize,
    /// Most connections one key may hold.
    pub per_key: usize,
    /// How many of the `total` slots are kept for keys holding fewer than
    /// `reserve_per_key` connections.
    pub reserve: usize,
    /// A key holding fewer connections than this may use the reserve.
    pub reserve_per_key: usize,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The key already holds `max` connections.
    #[error("this peer already holds {max} connections (the per-peer cap)")]
    PerKey {
        /// The per-key cap.
        max: usize,
    },
    /// Only the reserve is left, and this key holds too many to use it.
    #[error(
        "only reserved slots are left ({open} of {total} open), and they are kept for peers holding fewer than {reserve_per_key}"
    )]
    ReserveOnly {
        /// Connections open now.
        open: usize,
        /// The total cap.
        total: usize,
        /// The reserve's per-key threshold.
        reserve_per_key: usize,
    },
    /// All `max` slots are taken.
    #[error("all {max} connection slots are in use")]
    Total {
        /// The total cap.
        max: usize,
    },
}

struct State<K> {
    open: usize,
    by_key: HashMap<K, usize>,
}

struct Shared<K> {
    caps: ConnCaps,
    state: Mutex<State<K>>,
    refused: AtomicU64,
}

/// Counts open connections per key and in total; see the module doc.
/// Cloning shares the counts.
pub struct ConnLimiter<K> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for ConnLimiter<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// A snapshot of a [`ConnLimiter`]'s counts, for health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnStats {
    /// Connections open now.
    pub open: usize,
    /// The total cap.
    pub total: usize,
    /// The per-key cap.
    pub per_key: usize,
    /// Size of the reserve.
    pub reserve: usize,
    /// Keys holding `per_key` connections right now.
    pub keys_at_cap: usize,
    /// The most connections any one key holds right now.
    pub busiest_key: usize,
    /// Connections refused since the limiter was created.
    pub refused: u64,
}

impl ConnStats {
    /// True when new connections are refused to some peers for lack of
    /// room: the reserve is in use or some key is at its cap.
    pub fn saturated(&self) -> bool {
        self.keys_at_cap > 0 || self.open >= self.total.saturating_sub(self.reserve)
    }
}

/// One admitted connection; dropping it frees the slot.
pub struct ConnPermit<K: Hash + Eq> {
    shared: Arc<Shared<K>>,
    key: Option<K>,
}

impl<K: Hash + Eq> std::fmt::Debug for ConnPermit<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnPermit")
    }
}

impl<K: Hash + Eq + Clone> ConnLimiter<K> {
    /// A limiter enforcing `caps`. A `per_key` above `total` is lowered to
    /// `total`, and a `reserve` of `total` or more to `total - per_key`.
    pub fn new(mut caps: ConnCaps) -> Self {
        caps.per_key = caps.per_key.min(caps.total);
        if caps.reserve >= caps.total {
            caps.reserve = caps.total.saturating_sub(caps.per_key);
        }
        Self {
            shared: Arc::new(Shared {
                caps,
                state: Mutex::new(State {
                    open: 0,
                    by_key: HashMap::new(),
                }),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// The caps in force (after the adjustments of [`Self::new`]).
    pub fn caps(&self) -> ConnCaps {
        self.shared.caps
    }

    /// Admits one connection for `key`, or says why not.
    pub fn try_acquire(&self, key: K) -> Result<ConnPermit<K>, Refusal> {
        let caps = self.shared.caps;
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let held = st.by_key.get(&key).copied().unwrap_or(0);
        let verdict = if held >= caps.per_key {
            Err(Refusal::PerKey { max: caps.per_key })
        } else if st.open >= caps.total {
            Err(Refusal::Total { max: caps.total })
        } else if st.open >= caps.total - caps.reserve && held >= caps.reserve_per_key {
            Err(Refusal::ReserveOnly {
                open: st.open,
                total: caps.total,
                reserve_per_key: caps.reserve_per_key,
            })
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => {
                st.open += 1;
                *st.by_key.entry(key.clone()).or_insert(0) += 1;
                Ok(ConnPermit {
                    shared: self.shared.clone(),
                    key: Some(key),
                })
            }
            Err(r) => {
                self.shared.refused.fetch_add(1, Ordering::Relaxed);
                Err(r)
            }
        }
    }

    /// The counts right now.
    pub fn stats(&self) -> ConnStats {
        let caps = self.shared.caps;
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        ConnStats {
            open: st.open,
            total: caps.total,
            per_key: caps.per_key,
            reserve: caps.reserve,
            keys_at_cap: st.by_key.values().filter(|&&n| n >= caps.per_key).count(),
            busiest_key: st.by_key.values().copied().max().unwrap_or(0),
            refused: self.shared.refused.load(Ordering::Relaxed),
        }
    }

    /// Connections `key` holds right now.
    pub fn held_by(&self, key: &K) -> usize {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.by_key.get(key).copied().unwrap_or(0)
    }
}

impl<K: Hash + Eq> Drop for ConnPermit<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.open = st.open.saturating_sub(1);
        if let Some(n) = st.by_key.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.by_key.remove(&key);
            }
        }
    }
}

/// Whether a connection is in use, for idle timeouts. A connection is busy
/// while at least one [`CallGuard`] is alive; it is idle from the moment it
/// opened (until its first call) or from the end of its last call.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    ever_busy: AtomicBool,
    /// When the last call ended, as nanoseconds after `opened`.
    idle_since_ns: AtomicU64,
}

/// One call in flight on a connection; dropping it ends the call.
#[derive(Debug)]
pub struct CallGuard {
    activity: Arc<Activity>,
}

impl Activity {
    /// A connection opened at `opened`, with nothing in flight yet.
    pub fn new(opened: Instant) -> Arc<Self> {
        Arc::new(Self {
            opened,
            in_flight: AtomicUsize::new(0),
            ever_busy: AtomicBool::new(false),
            idle_since_ns: AtomicU64::new(0),
        })
    }

    /// Marks a call as started; the connection is busy until the guard drops.
    pub fn begin(self: &Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.ever_busy.store(true, Ordering::SeqCst);
        CallGuard {
            activity: self.clone(),
        }
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// When this connection should be closed for idleness: `None` while a
    /// call is in flight; otherwise `first` after opening if no call ever
    /// started, else `idle` after the last call ended.
    pub fn deadline(&self, first: Duration, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        if !self.ever_busy.load(Ordering::SeqCst) {
            return Some(self.opened + first);
        }
        let since = Duration::from_nanos(self.idle_since_ns.load(Ordering::SeqCst));
        Some(self.opened + since + idle)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let a = &self.activity;
        let since = u64::try_from(a.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        a.idle_since_ns.fetch_max(since, Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn caps(total: usize, per_key: usize, reserve: usize, reserve_per_key: usize) -> ConnCaps {
        ConnCaps {
            total,
            per_key,
            reserve,
            reserve_per_key,
        }
    }

    #[test]
    fn a_key_at_its_cap_is_refused_while_other_keys_are_admitted() {
        let l = ConnLimiter::new(caps(100, 3, 0, 0));
        let held: Vec<_> = (0..3).map(|_| l.try_acquire(65534u32).unwrap()).collect();
        assert_eq!(
            l.try_acquire(65534).unwrap_err(),
            Refusal::PerKey { max: 3 }
        );
        let root = l.try_acquire(0).unwrap();
        let s = l.stats();
        assert_eq!(
            (s.open, s.keys_at_cap, s.busiest_key, s.refused),
            (4, 1, 3, 1)
        );
        assert!(s.saturated());
        drop(held);
        assert_eq!(l.held_by(&65534), 0);
        assert!(l.try_acquire(65534).is_ok(), "slots come back on drop");
        drop(root);
        assert_eq!(l.stats().open, 0);
    }

    #[test]
    fn the_reserve_is_kept_for_keys_with_few_connections() {
        // 10 slots, 4 reserved for keys holding fewer than 2.
        let l = ConnLimiter::new(caps(10, 5, 4, 2));
        let mut held = Vec::new();
        for k in [1u32, 2] {
            for _ in 0..3 {
                held.push(l.try_acquire(k).unwrap());
            }
        }
        // 6 open = total - reserve: keys 1 and 2 (3 each) may not go on.
        assert!(matches!(
            l.try_acquire(1).unwrap_err(),
            Refusal::ReserveOnly { open: 6, .. }
        ));
        // Fresh keys get the reserve, each up to reserve_per_key.
        held.push(l.try_acquire(3).unwrap());
        held.push(l.try_acquire(3).unwrap());
        assert!(matches!(
            l.try_acquire(3).unwrap_err(),
            Refusal::ReserveOnly { .. }
        ));
        held.push(l.try_acquire(4).unwrap());
        held.push(l.try_acquire(5).unwrap());
        assert_eq!(l.stats().open, 10);
        assert_eq!(l.try_acquire(6).unwrap_err(), Refusal::Total { max: 10 });
        assert_eq!(l.stats().refused, 3);
    }

    #[test]
    fn caps_are_made_consistent() {
        let l = ConnLimiter::<u32>::new(caps(10, 50, 10, 1));
        assert_eq!(l.caps().per_key, 10);
        assert_eq!(l.caps().reserve, 0);
        let l = ConnLimiter::<u32>::new(caps(10, 4, 20, 1));
        assert_eq!(l.caps().reserve, 6);
    }

    #[test]
    fn idle_deadline_starts_at_open_then_at_the_end_of_the_last_call() {
        let t0 = Instant::now();
        let a = Activity::new(t0);
        let first = Duration::from_secs(10);
        let idle = Duration::from_secs(60);
        assert_eq!(a.deadline(first, idle), Some(t0 + first));
        let g1 = a.begin();
        let g2 = a.begin();
        assert_eq!(a.deadline(first, idle), None);
        drop(g1);
        assert_eq!(a.deadline(first, idle), None, "one call still in flight");
        drop(g2);
        let d = a.deadline(first, idle).unwrap();
        assert!(d >= t0 + idle && d <= Instant::now() + idle, "{d:?}");
    }
}
