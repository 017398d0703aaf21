//! Lifecycle hooks the core calls; metrics implement them. Every method has a no-op default so
//! the core never depends on who listens.

use std::time::Duration;

use super::{ExecutionReport, StageStatus};

/// What happened in the compile cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheEvent {
    /// A compile's result was found and its compile skipped.
    Hit,
    /// No result was kept for the compile: it runs.
    Miss,
    /// This many entries were dropped (for room, or because their runtime changed).
    Evicted(u64),
}

///
/// Counts of running and waiting executions are not hooks: the executor knows them exactly
/// (`Executor::running`, `Executor::waiting`) and metrics read them at scrape time; busy
/// rejections are counted with every other rejection in the API layer.
pub trait ExecutionObserver: Send + Sync {
    /// A submission got a slot after waiting `wait` for it.
    fn admitted(&self, _wait: Duration) {}
    /// It finished, whatever the outcome.
    fn finished(&self, _runtime: &str, _report: &ExecutionReport, _elapsed: Duration) {}
    /// Its run stage was started `how`.
    fn run_started(&self, _runtime: &str, _how: StartKind) {}
    /// A slot's zygote of `runtime` was replaced (or could not start), for `reason`.
    fn zygote_restarted(&self, _runtime: &str, _reason: ZygoteRestart) {}
    /// A compile stage ran (not one whose result came from the cache).
    fn compiled(&self, _runtime: &str, _status: StageStatus) {}
    fn compile_cache(&self, _event: CacheEvent) {}
    /// The cache now holds `bytes` in `entries` entries.
    fn compile_cache_size(&self, _bytes: u64, _entries: usize) {}
}

/// How a run stage's process came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// Forked from a slot's fork server (see `sandbox/zygote`).
    Zygote,
    /// Handed to an interpreter already started in a prepared sandbox.
    Warm,
    /// Started on request (a prepared sandbox's helper or a new sandbox).
    Cold,
}

impl StartKind {
    pub const ALL: [StartKind; 3] = [StartKind::Zygote, StartKind::Warm, StartKind::Cold];

    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::Zygote => "zygote",
            StartKind::Warm => "warm",
            StartKind::Cold => "cold",
        }
    }
}

/// Why a zygote is replaced (the `reason` label of `mde_zygote_restarts_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZygoteRestart {
    /// It served `zygote_max_runs` runs.
    MaxRuns,
    /// It outlived `zygote_max_age_secs`.
    MaxAge,
    /// A run of it hit a limit, and stopping the run killed the zygote's sandbox.
    RunKilled,
    /// It held more than a quarter of a run's memory limit.
    Memory,
    /// It died, or stopped answering.
    Died,
    /// It could not start.
    StartFailed,
}

impl ZygoteRestart {
    pub const ALL: [ZygoteRestart; 6] = [
        ZygoteRestart::MaxRuns,
        ZygoteRestart::MaxAge,
        ZygoteRestart::RunKilled,
        ZygoteRestart::Memory,
        ZygoteRestart::Died,
        ZygoteRestart::StartFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ZygoteRestart::MaxRuns => "max_runs",
            ZygoteRestart::MaxAge => "max_age",
            ZygoteRestart::RunKilled => "run_killed",
            ZygoteRestart::Memory => "memory",
            ZygoteRestart::Died => "died",
            ZygoteRestart::StartFailed => "start_failed",
        }
    }
}

/// For tests and tools that do not care.
pub struct NoopObserver;

impl ExecutionObserver for NoopObserver {}
