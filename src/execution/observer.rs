//! Lifecycle hooks the core calls; metrics implement them. Every method has a no-op default so
//! the core never depends on who listens.

use std::time::Duration;

use super::ExecutionReport;

pub trait ExecutionObserver: Send + Sync {
    /// A submission started waiting for a slot.
    fn queued(&self) {}
    /// It got a slot after `wait` (or gave up waiting when `admitted` is false).
    fn dequeued(&self, _wait: Duration, _admitted: bool) {}
    /// It was turned away because the queue was full.
    fn rejected_busy(&self) {}
    /// Its first stage is about to start.
    fn started(&self, _runtime: &str) {}
    /// It finished, whatever the outcome.
    fn finished(&self, _runtime: &str, _report: &ExecutionReport, _elapsed: Duration) {}
}

/// For tests and tools that do not care.
pub struct NoopObserver;

impl ExecutionObserver for NoopObserver {}
