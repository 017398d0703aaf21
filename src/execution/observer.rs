//! Lifecycle hooks the core calls; metrics implement them. Every method has a no-op default so
//! the core never depends on who listens.

use std::time::Duration;

use super::ExecutionReport;

///
/// Counts of running and waiting executions are not hooks: the executor knows them exactly
/// (`Executor::running`, `Executor::waiting`) and metrics read them at scrape time; busy
/// rejections are counted with every other rejection in the API layer.
pub trait ExecutionObserver: Send + Sync {
    /// A submission got a slot after waiting `wait` for it.
    fn admitted(&self, _wait: Duration) {}
    /// It finished, whatever the outcome.
    fn finished(&self, _runtime: &str, _report: &ExecutionReport, _elapsed: Duration) {}
}

/// For tests and tools that do not care.
pub struct NoopObserver;

impl ExecutionObserver for NoopObserver {}
