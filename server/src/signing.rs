//! The signing queue: at most one mint batch per core signs at a time, and
//! the queue in front of it is measured.
//!
//! A rotation storm (many SVIDs expiring together) turns into waiting
//! batches here instead of an unbounded pile of blocking tasks; the peak
//! depth is reported by `sigil-server healthcheck --output json` and by the
//! `scale` benchmark.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};

/// Bounded signing with queue statistics.
#[derive(Debug)]
pub struct SigningQueue {
    permits: Semaphore,
    /// Mint calls waiting for a permit now, and their CSRs.
    waiting_calls: AtomicU64,
    waiting_csrs: AtomicU64,
    /// The most ever waiting at once.
    peak_calls: AtomicU64,
    peak_csrs: AtomicU64,
    /// X.509-SVIDs signed since start.
    signed: AtomicU64,
}

/// What [`SigningQueue::stats`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SigningStats {
    pub free_slots: u64,
    pub waiting_calls: u64,
    pub waiting_csrs: u64,
    pub peak_calls: u64,
    pub peak_csrs: u64,
    pub signed: u64,
}

/// Holds a signing slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot<'a> {
    _permit: SemaphorePermit<'a>,
    queue: &'a SigningQueue,
}

impl Slot<'_> {
    /// Counts `n` SVIDs as signed.
    pub fn signed(&self, n: usize) {
        self.queue.signed.fetch_add(n as u64, Ordering::Relaxed);
        crate::metrics::METRICS.x509_svids_signed.inc_by(n as u64);
    }
}

/// Leaves the waiting counts when the wait ends, also when the caller gives
/// up (the RPC is cancelled) while waiting.
struct Waiting<'a> {
    queue: &'a SigningQueue,
    csrs: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.queue.waiting_calls.fetch_sub(1, Ordering::Relaxed);
        self.queue
            .waiting_csrs
            .fetch_sub(self.csrs, Ordering::Relaxed);
    }
}

impl SigningQueue {
    /// A queue with `slots` batches signing at once (one per core).
    pub fn new(slots: usize) -> Self {
        Self {
            permits: Semaphore::new(slots.max(1)),
            waiting_calls: AtomicU64::new(0),
            waiting_csrs: AtomicU64::new(0),
            peak_calls: AtomicU64::new(0),
            peak_csrs: AtomicU64::new(0),
            signed: AtomicU64::new(0),
        }
    }

    /// Sized to the machine's cores.
    pub fn per_core() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    /// Waits for a slot for a batch of `csrs` CSRs. `None` once closed.
    pub async fn acquire(&self, csrs: usize) -> Option<Slot<'_>> {
        if let Ok(p) = self.permits.try_acquire() {
            return Some(Slot {
                _permit: p,
                queue: self,
            });
        }
        let csrs = csrs as u64;
        let calls = self.waiting_calls.fetch_add(1, Ordering::Relaxed) + 1;
        let queued = self.waiting_csrs.fetch_add(csrs, Ordering::Relaxed) + csrs;
        self.peak_calls.fetch_max(calls, Ordering::Relaxed);
        self.peak_csrs.fetch_max(queued, Ordering::Relaxed);
        let waiting = Waiting { queue: self, csrs };
        let permit = self.permits.acquire().await.ok();
        drop(waiting);
        permit.map(|p| Slot {
            _permit: p,
            queue: self,
        })
    }

    /// Current and peak queue depth (batches that found every slot busy).
    pub fn stats(&self) -> SigningStats {
        SigningStats {
            free_slots: self.permits.available_permits() as u64,
            waiting_calls: self.waiting_calls.load(Ordering::Relaxed),
            waiting_csrs: self.waiting_csrs.load(Ordering::Relaxed),
            peak_calls: self.peak_calls.load(Ordering::Relaxed),
            peak_csrs: self.peak_csrs.load(Ordering::Relaxed),
            signed: self.signed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_batches_are_counted_and_released() {
        let q = SigningQueue::new(1);
        let held = q.acquire(10).await.unwrap();
        held.signed(10);
        // A free slot is taken without queueing.
        assert_eq!(q.stats().peak_calls, 0);
        // Two more batches queue behind the held slot.
        let (a, b) = (q.acquire(5), q.acquire(7));
        tokio::pin!(a, b);
        assert!(futures_poll_once(a.as_mut()).await.is_none());
        assert!(futures_poll_once(b.as_mut()).await.is_none());
        let s = q.stats();
        assert_eq!((s.waiting_calls, s.waiting_csrs), (2, 12));
        assert_eq!((s.peak_calls, s.peak_csrs), (2, 12));
        drop(held);
        let slot = a.await.unwrap();
        assert_eq!(q.stats().waiting_calls, 1);
        drop(slot);
        drop(b.await.unwrap());
        let s = q.stats();
        assert_eq!((s.waiting_calls, s.waiting_csrs), (0, 0));
        assert_eq!((s.peak_calls, s.peak_csrs, s.signed), (2, 12, 10));
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_queue() {
        let q = SigningQueue::new(1);
        let held = q.acquire(1).await.unwrap();
        {
            let w = q.acquire(100);
            tokio::pin!(w);
            assert!(futures_poll_once(w.as_mut()).await.is_none());
            assert_eq!(q.stats().waiting_csrs, 100);
        }
        assert_eq!(q.stats().waiting_csrs, 0);
        drop(held);
    }

    /// Polls a future once; `Some` if it completed.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
