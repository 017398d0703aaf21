//! Admission: at most `slots` executions run at once and at most `queue` wait; one more is
//! refused at once (the API answers 429). Each admitted execution holds a slot index, which
//! picks its uid, cgroup and work dir.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::execution::request::Busy;

pub(crate) struct Admission {
    semaphore: Arc<Semaphore>,
    /// Free slots, least recently used first: a slot that was just given back is still
    /// preparing its next sandbox (and warming its interpreter), so it goes last.
    free: Arc<Mutex<VecDeque<usize>>>,
    waiting: AtomicUsize,
    /// Slots taken out of service because they could not be cleaned (see `SlotLease::retire`).
    retired: Arc<AtomicUsize>,
    slots: usize,
    queue: usize,
    /// The longest a submission may wait in the queue.
    max_wait: Duration,
}

/// An admitted execution's slot; returned to the pool on drop.
pub(crate) struct SlotLease {
    pub(crate) index: usize,
    free: Arc<Mutex<VecDeque<usize>>>,
    retired: Arc<AtomicUsize>,
    /// `None` once retired: the permit is forgotten, so capacity shrinks by one.
    permit: Option<OwnedSemaphorePermit>,
}

impl SlotLease {
    /// Take the slot out of service for good: it is never handed out again, and the
    /// server's capacity shrinks by one (readiness and metrics report it).
    pub(crate) fn retire(mut self) {
        if let Some(permit) = self.permit.take() {
            permit.forget();
            self.retired.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        if self.permit.is_none() {
            return;
        }
        match self.free.lock() {
            Ok(mut free) => free.push_back(self.index),
            Err(poisoned) => poisoned.into_inner().push_back(self.index),
        }
    }
}

impl Admission {
    pub(crate) fn new(slots: usize, queue: usize, max_wait: Duration) -> Self {
        Admission {
            semaphore: Arc::new(Semaphore::new(slots)),
            free: Arc::new(Mutex::new((0..slots).collect())),
            waiting: AtomicUsize::new(0),
            retired: Arc::new(AtomicUsize::new(0)),
            slots,
            queue,
            max_wait,
        }
    }

    pub(crate) fn running(&self) -> usize {
        (self.slots - self.retired()).saturating_sub(self.semaphore.available_permits())
    }

    /// Slots out of service (they could not be cleaned after a run).
    pub(crate) fn retired(&self) -> usize {
        self.retired.load(Ordering::SeqCst)
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Take a free slot, waiting in the queue if there is room in it.
    pub(crate) async fn acquire(&self) -> Result<SlotLease, Busy> {
        let permit = match Arc::clone(&self.semaphore).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Reserve a queue place atomically so concurrent arrivals cannot overfill it.
                let reserved = self
                    .waiting
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                        (w < self.queue).then_some(w + 1)
                    });
                if reserved.is_err() {
                    return Err(Busy {
                        running: self.running(),
                        waiting: self.waiting(),
                    });
                }
                self.wait_in_line(tokio::time::Instant::now() + self.max_wait)
                    .await?
            }
        };
        self.lease(permit)
    }

    /// A slot for the next test of a batch that was admitted already: in line with every
    /// other submission (first come, first served, so a batch never starves single runs),
    /// counted as waiting, but without taking one of the queue's places; until `deadline`
    /// (the batch's own wall-time budget) rather than the queue's wait.
    pub(crate) async fn acquire_until(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<SlotLease, Busy> {
        let permit = match Arc::clone(&self.semaphore).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                self.wait_in_line(deadline).await?
            }
        };
        self.lease(permit)
    }

    /// Wait for a permit until `deadline`, counted in `waiting` (the caller has added
    /// itself); dropping this future (the client left) gives the place back at once.
    async fn wait_in_line(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<OwnedSemaphorePermit, Busy> {
        let _leave = QueueGuard(&self.waiting);
        match tokio::time::timeout_at(deadline, Arc::clone(&self.semaphore).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Busy {
                running: self.running(),
                waiting: self.waiting(),
            }),
        }
    }

    fn lease(&self, permit: OwnedSemaphorePermit) -> Result<SlotLease, Busy> {
        let index = match self.free.lock() {
            Ok(mut free) => free.pop_front(),
            Err(poisoned) => poisoned.into_inner().pop_front(),
        };
        // The semaphore guarantees a free index; a missing one would be a bug, refuse safely.
        let Some(index) = index else {
            return Err(Busy {
                running: self.running(),
                waiting: self.waiting(),
            });
        };
        Ok(SlotLease {
            index,
            free: Arc::clone(&self.free),
            retired: Arc::clone(&self.retired),
            permit: Some(permit),
        })
    }
}

/// Leaves the queue even when the waiting future is dropped (client went away).
struct QueueGuard<'a>(&'a AtomicUsize);

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let admission = Arc::new(Admission::new(1, 1, Duration::from_secs(60)));
        let first = admission.acquire().await.expect("a free slot");
        let waiter = {
            let admission = Arc::clone(&admission);
            tokio::spawn(async move { admission.acquire().await.map(|l| l.index) })
        };
        // Let the waiter take the one queue place.
        while admission.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = admission.acquire().await;
        assert!(refused.is_err(), "the third submission must be refused");
        drop(first);
        let index = waiter
            .await
            .expect("join")
            .expect("admitted after the slot freed");
        assert_eq!(index, 0);
        assert_eq!(admission.waiting(), 0);
    }

    #[tokio::test]
    async fn a_queued_submission_waits_no_longer_than_allowed() {
        let admission = Admission::new(1, 4, Duration::from_millis(50));
        let _held = admission.acquire().await.expect("a free slot");
        let started = std::time::Instant::now();
        assert!(admission.acquire().await.is_err(), "the wait must end");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(admission.waiting(), 0, "and give its place back");
    }

    #[tokio::test]
    async fn a_retired_slot_is_never_handed_out_again() {
        let admission = Admission::new(2, 0, Duration::from_secs(60));
        let first = admission.acquire().await.expect("a free slot");
        let bad = first.index;
        first.retire();
        assert_eq!(admission.retired(), 1);
        assert_eq!(admission.running(), 0);
        for _ in 0..3 {
            let lease = admission.acquire().await.expect("the other slot");
            assert_ne!(lease.index, bad);
            assert_eq!(admission.running(), 1);
            assert!(
                admission.acquire().await.is_err(),
                "one slot left, no queue"
            );
        }
    }
}
