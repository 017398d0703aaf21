//! Running one stage, whatever backend built its command, so every backend gets the same
//! enforcement: `spawn` starts it (forked by the daemon or by the slot's launcher) and
//! keeps track of its exit; `supervise` feeds stdin, reads capped output, enforces the
//! wall clock and the CPU budget and kills the whole tree; `outcome` classifies how it
//! ended, as a pure function of what was observed.

mod outcome;
mod spawn;
mod supervise;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::Limits;
use super::pool::cgroup::MemoryCgroup;
use super::pool::launcher::{Launcher, LauncherError};
use super::report::StageReport;
use super::sandbox::SandboxCommand;
use super::sandbox::child::Rlimit;
pub(crate) use spawn::Spawned;
pub(crate) use supervise::{StageStart, supervise};

/// Everything about the slot and stage that the runner enforces.
pub(crate) struct RunContext<'a> {
    /// Run as this uid/gid (the slot's own), when the daemon is root.
    pub(crate) uid: Option<u32>,
    pub(crate) cgroup: Option<&'a MemoryCgroup>,
    pub(crate) limits: Limits,
    pub(crate) stdin: &'a [u8],
    /// Processes the backend itself needs under the same uid, counted where the limit
    /// applies (see the engine: bubblewrap's outer process and init, and the helper).
    pub(crate) backend_processes: u64,
    /// bubblewrap reports a signal death as exit code 128 + signal.
    pub(crate) exit_code_encodes_signal: bool,
    /// Where the stage-exec helper reports the stage's exact wait status (see
    /// `stage_exec.rs`); it wins over the decoding above when it arrived.
    pub(crate) status_pipe: Option<&'a OwnedFd>,
    /// The slot's launcher, when it has one (see `launcher.rs`).
    pub(crate) launcher: Option<Arc<Launcher>>,
}

pub(crate) fn rlimits(ctx: &RunContext<'_>) -> Vec<Rlimit> {
    let l = &ctx.limits;
    let cpu_seconds = l.cpu_time_ms.div_ceil(1000).max(1);
    let limit = |resource: libc::__rlimit_resource_t, soft: u64, hard: u64| Rlimit {
        resource,
        soft,
        hard,
    };
    let mut out = vec![
        // SIGXCPU at the soft limit, SIGKILL one second later if it is ignored.
        limit(libc::RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
        limit(libc::RLIMIT_FSIZE, l.file_size_bytes, l.file_size_bytes),
        limit(libc::RLIMIT_NOFILE, l.open_files, l.open_files),
        limit(libc::RLIMIT_CORE, 0, 0),
    ];
    // RLIMIT_NPROC counts every process of the uid, so it only means "this run's processes"
    // when the run has a uid of its own; the kernel also ignores it for root.
    if ctx.uid.is_some() {
        let n = l.processes + ctx.backend_processes;
        out.push(limit(libc::RLIMIT_NPROC, n, n));
    }
    // Without a memory cgroup, fall back to the address-space limit.
    if ctx.cgroup.is_none() {
        out.push(limit(libc::RLIMIT_AS, l.memory_bytes, l.memory_bytes));
    }
    out
}

/// Why a stage could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("cannot start `{}`: {source}", program.display())]
    Start {
        program: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("too many descriptors to pass")]
    TooManyDescriptors,
    #[error(transparent)]
    Launcher(#[from] LauncherError),
}

/// Start a stage's process (through the slot's launcher when there is one).
pub(crate) async fn start_stage(
    cmd: SandboxCommand,
    ctx: &RunContext<'_>,
) -> Result<Spawned, StageError> {
    match ctx.launcher.clone() {
        Some(launcher) => spawn::launched(launcher, cmd, ctx).await,
        None => spawn::direct(cmd, ctx),
    }
}

/// Run one stage to completion. Never panics; spawn failures become `InternalError`.
pub(crate) async fn run_stage(cmd: SandboxCommand, ctx: RunContext<'_>) -> StageReport {
    let start = StageStart::now(&ctx);
    match start_stage(cmd, &ctx).await {
        Ok(spawned) => supervise(spawned, &ctx, start).await,
        Err(e) => StageReport::internal(e, ctx.limits),
    }
}
