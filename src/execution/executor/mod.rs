//! The executor: admission, then the submission's stages in a slot (see `pipeline.rs`),
//! answering as soon as the report exists; afterwards the slot is settled, given a fresh
//! work dir and its next prepared sandbox (`prepared.rs`) before it is handed out again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

mod admission;
mod batch;
mod command;
mod pipeline;
mod prepared;
#[cfg(test)]
mod tests;
mod warm;
mod zygote;

use super::compile_cache::{CacheKey, CompileCache};
use super::observer::{ExecutionObserver, ZygoteRestart};
use super::pool::launcher::launcher_executable;
use super::pool::{MemoryEnforcement, SlotOptions, SlotPool};
use super::report::{ExecutionReport, StageReport, StageStatus};
use super::sandbox::{BwrapBackend, ProcessBackend};
use super::{ExecuteError, ExecutionRequest, Limits};
use crate::config::{BackendKind, SandboxSettings};
pub use crate::execution::request::Busy;
use crate::runtimes::Runtime;
use admission::{Admission, SlotLease};
pub use batch::{BatchReport, BatchRequest, BatchTest, StopReason, TestReport, output_matches};
use pipeline::{CompileStep, StagesOutcome, compile_workdir_bytes};
use prepared::PreparedSandbox;
use warm::warmable;
pub use zygote::ZygoteSupport;

/// What the executor enforces on this host, for start-up logs and `/health`.
#[derive(Debug, Clone)]
pub struct ExecutorInfo {
    pub backend: BackendKind,
    pub memory: MemoryEnforcement,
    pub per_slot_uid: bool,
    pub sized_workdir: bool,
    /// CPU time is limited for the whole process tree (cgroup accounting), not only per
    /// process by RLIMIT_CPU.
    pub tree_cpu_limit: bool,
    /// Each slot has a CPU controller of its own, so slots share the CPU fairly.
    pub cpu_fair: bool,
    /// Socket buffers count against each run's memory limit.
    pub socket_memory_limited: bool,
    pub slots: usize,
    pub queue: usize,
    /// This daemon's work root (slot dirs live below it); removed at shutdown.
    pub work_root: std::path::PathBuf,
    /// This daemon's memory cgroup, when one is used; removed at shutdown.
    pub cgroup_dir: Option<std::path::PathBuf>,
    /// Whether runtimes marked `zygote` are forked from zygotes here.
    pub zygotes: ZygoteSupport,
}

impl ExecutorInfo {
    /// True when the default backend isolates submissions.
    pub fn isolated(&self) -> bool {
        self.backend == BackendKind::Bwrap
    }
}

/// What the executor is built from (the binary fills it from the settings).
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// Executions that run at once (one slot each).
    pub slots: usize,
    /// Submissions that may wait for a slot, and for how long.
    pub queue_size: usize,
    pub max_queue_wait: std::time::Duration,
    /// Where slot work dirs go.
    pub work_root: PathBuf,
    /// The default size of a slot's work dir.
    pub workdir_bytes: u64,
    /// The ceilings of any stage, run or compile (prepared sandboxes start under them).
    pub max_limits: Limits,
    pub sandbox: SandboxSettings,
    /// The compile cache's bound in bytes; `None` turns it off.
    pub compile_cache_bytes: Option<u64>,
}

/// Why the executor cannot start, or a sandbox cannot be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error(transparent)]
    Sandbox(#[from] super::sandbox::SandboxError),
    #[error(transparent)]
    Pool(#[from] super::pool::PoolError),
    #[error(transparent)]
    Stage(#[from] super::stage::StageError),
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("encoding the stage's command: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("command `{0}` is not installed")]
    NotInstalled(String),
    #[error("`{0}` is not a warm runtime")]
    NotWarm(String),
    #[error("`{0}` cannot run from a zygote here")]
    NoZygote(String),
    #[error("prepared sandboxes are off")]
    NoPreparedSandboxes,
    #[error("the prepared sandbox did not take its command")]
    HandOverFailed,
    #[error("the {backend} sandbox does not work on this host: {detail}; {remedy}")]
    SelfTest {
        backend: &'static str,
        detail: String,
        /// What is missing and which flag or setting grants it (see [`remedy`]).
        remedy: String,
    },
}

/// Opting out, said after every remedy.
const OPT_OUT: &str = "or, for development only and with no isolation at all, opt out with \
    MDE_SANDBOX__BACKEND=process (see docker/README.md)";

/// What a failed sandbox self-test lacks, from bubblewrap's words, and the flag or setting
/// that grants it (docker and podman flags, the Kubernetes field, the host setting).
pub(crate) fn remedy(detail: &str) -> String {
    let lacking = if detail.contains("Can't mount proc") {
        "missing permission: mounting a fresh /proc for the sandbox's pid namespace, which the \
         kernel refuses while parts of the container's /proc are masked or read-only; grant it \
         with `--security-opt systempaths=unconfined` (docker, podman; compose \
         `security_opt: [systempaths=unconfined]`) or `securityContext.procMount: Unmasked` \
         (Kubernetes, with `hostUsers: false`)"
    } else if detail.contains("pivot_root") || detail.contains("hostname") {
        "missing permission: the pivot_root or sethostname system call, denied by the \
         container's seccomp profile (the default profiles of docker and podman deny both); \
         grant it with `--security-opt seccomp=docker/seccomp-bwrap.json` (docker, \
         podman) or `seccompProfile: {type: Localhost, localhostProfile: mde-bwrap.json}` \
         (Kubernetes, the same file on each node)"
    } else if detail.contains("namespace") || detail.contains("uid map") {
        "missing permission: creating user namespaces (unshare, clone with namespace flags), \
         denied by the container's seccomp profile or by the host; grant it with \
         `--security-opt seccomp=docker/seccomp-bwrap.json` (docker, podman; Kubernetes: the \
         Localhost seccomp profile), and on the host `sysctl user.max_user_namespaces=15000` \
         (older Debian: `kernel.unprivileged_userns_clone=1`; Ubuntu 23.10+: \
         `kernel.apparmor_restrict_unprivileged_userns=0`)"
    } else if detail.contains("Permission denied") || detail.contains("Operation not permitted") {
        "missing permission: mounting inside the sandbox (bubblewrap's binds, tmpfs, /proc), \
         denied by a security profile; check, in this order: `--security-opt \
         apparmor=unconfined` (docker, podman; Kubernetes `appArmorProfile: {type: \
         Unconfined}`), `--security-opt seccomp=docker/seccomp-bwrap.json`, `--security-opt \
         systempaths=unconfined`, and on SELinux hosts `--security-opt label=disable`"
    } else {
        "the container needs `--security-opt seccomp=docker/seccomp-bwrap.json --security-opt \
         apparmor=unconfined --security-opt systempaths=unconfined --cap-add SYS_ADMIN` \
         (docker/README.md explains each)"
    };
    format!("{lacking}; {OPT_OUT}")
}

/// What an idle slot keeps for its next run.
#[derive(Default)]
struct SlotState {
    /// The sandbox set up and waiting for the slot's next stage.
    prepared: Option<PreparedSandbox>,
    /// The warm runtime its next prepared sandbox starts: the default one at first, then
    /// the runtime the slot last ran if that is warm, else none (plain).
    warm_for: Option<Arc<Runtime>>,
    /// The last run was a zygote's, which kept it: the slot needs no settling or reset.
    zygote_kept: bool,
}

pub struct Executor {
    admission: Admission,
    /// What each slot keeps between runs, by slot index.
    slot_state: Vec<Mutex<SlotState>>,
    /// Every runtime bind seen so far, so later prepared sandboxes suit those runtimes too.
    prepared_binds: Mutex<Vec<PathBuf>>,
    /// The binary bound into every bubblewrap sandbox as the stage-exec helper (its pid 1).
    helper: Option<PathBuf>,
    /// Whether idle slots keep a prepared sandbox (`sandbox.prepare_sandboxes`).
    prepare_idle: bool,
    max_limits: Limits,
    in_flight: std::sync::atomic::AtomicUsize,
    slots: SlotPool,
    bwrap: Option<BwrapBackend>,
    /// Why bubblewrap cannot be used, when it cannot (runs that need it fail with this).
    bwrap_error: Option<String>,
    process: ProcessBackend,
    backend: BackendKind,
    sandbox_path: String,
    /// bubblewrap itself, for the self-test's diagnosis.
    bwrap_path: PathBuf,
    queue: usize,
    observer: Arc<dyn ExecutionObserver>,
    zygote_support: ZygoteSupport,
    zygote_max_runs: u64,
    zygote_max_age: std::time::Duration,
    /// Why the last zygote that could not start failed, for `/health` (cleared when one
    /// starts again).
    zygote_start_error: Mutex<Option<String>>,
    /// Cancelled when the daemon starts to drain: no new submission is admitted, queued
    /// ones are answered at once, running ones go on.
    draining: tokio_util::sync::CancellationToken,
    /// Cancelled when the drain's grace period is over: what still runs is killed and
    /// answered as killed by the shutdown.
    killing: tokio_util::sync::CancellationToken,
    compile_cache: Option<CompileCache>,
}

impl Executor {
    /// Prepare slots and backends. Fails when the configured backend cannot work here.
    pub fn new(
        opts: ExecutorOptions,
        observer: Arc<dyn ExecutionObserver>,
    ) -> Result<Self, ExecutorError> {
        let sandbox = &opts.sandbox;
        let (bwrap, bwrap_error) =
            match BwrapBackend::new(&sandbox.bwrap_path, &sandbox.path, sandbox.ro_binds.clone()) {
                Ok(b) => (Some(b), None),
                Err(e) if sandbox.backend == BackendKind::Bwrap => return Err(e.into()),
                Err(e) => (None, Some(e.to_string())),
            };
        let count = opts.slots;
        let workdir_bytes = opts.workdir_bytes;
        let slots = SlotPool::new(&SlotOptions {
            count,
            work_root: &opts.work_root,
            uid_base: sandbox.uid_base,
            memory_cgroup: sandbox.memory_cgroup,
            tmpfs_workdir: sandbox.tmpfs_workdir,
            workdir_bytes,
            use_launcher: sandbox.launcher,
        })?;
        let helper = match sandbox.backend {
            BackendKind::Bwrap => launcher_executable(),
            BackendKind::Process => None,
        };
        let zygote_support =
            ZygoteSupport::detect(sandbox, bwrap.is_some(), helper.is_some(), &slots);
        Ok(Executor {
            admission: Admission::new(count, opts.queue_size, opts.max_queue_wait),
            slot_state: (0..count).map(|_| Mutex::default()).collect(),
            prepared_binds: Mutex::new(Vec::new()),
            helper,
            prepare_idle: sandbox.prepare_sandboxes,
            max_limits: opts.max_limits,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            slots,
            bwrap,
            bwrap_error,
            process: ProcessBackend,
            backend: sandbox.backend,
            sandbox_path: sandbox.path.clone(),
            bwrap_path: sandbox.bwrap_path.clone(),
            queue: opts.queue_size,
            compile_cache: opts
                .compile_cache_bytes
                .map(|bytes| CompileCache::new(bytes, Arc::clone(&observer))),
            observer,
            zygote_support,
            zygote_max_runs: sandbox.zygote_max_runs,
            zygote_max_age: std::time::Duration::from_secs(sandbox.zygote_max_age_secs),
            zygote_start_error: Mutex::new(None),
            draining: tokio_util::sync::CancellationToken::new(),
            killing: tokio_util::sync::CancellationToken::new(),
        })
    }

    pub fn info(&self) -> ExecutorInfo {
        ExecutorInfo {
            backend: self.backend,
            memory: self.slots.memory.clone(),
            per_slot_uid: self.slots.per_slot_uid,
            sized_workdir: self.slots.sized_workdir,
            tree_cpu_limit: self.slots.tree_cpu_limit,
            cpu_fair: self.slots.cpu_fair,
            socket_memory_limited: self.slots.socket_memory_limited,
            slots: self.slots.slots.len(),
            queue: self.queue,
            work_root: self.slots.root.clone(),
            cgroup_dir: self.slots.cgroup_dir(),
            zygotes: self.zygote_support.clone(),
        }
    }

    /// Executions running now (a slot that is only preparing its next sandbox is not one).
    pub fn running(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn waiting(&self) -> usize {
        self.admission.waiting()
    }

    /// Run `f` on slot `index`'s state (a panic elsewhere never locks a slot for good).
    fn with_slot_state<R>(&self, index: usize, f: impl FnOnce(&mut SlotState) -> R) -> Option<R> {
        let cell = self.slot_state.get(index)?;
        let mut state = cell
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(f(&mut state))
    }

    /// Slots taken out of service because they could not be cleaned after a run.
    /// Record why zygotes fail to start (`None`: one served a run, all is well).
    fn note_zygote_start(&self, error: Option<String>) {
        if let Ok(mut last) = self.zygote_start_error.lock() {
            *last = error;
        }
    }

    /// Count a zygote's replacement; one that died before serving any run is a failure to
    /// start, which `/health` shows.
    fn zygote_replaced(&self, zygote: &prepared::ZygoteState, reason: ZygoteRestart) {
        let name = &zygote.runtime.name;
        self.observer.zygote_restarted(name, reason);
        tracing::debug!(runtime = %name, runs = zygote.runs, reason = reason.as_str(),
            "replacing a zygote");
        if reason == ZygoteRestart::Died && zygote.runs == 0 {
            self.note_zygote_start(Some(format!(
                "the zygote of {name} ended before it served a run (see the log)"
            )));
        }
    }

    /// Why the last zygote that failed did, until one serves a run again (for `/health`).
    pub fn zygote_start_error(&self) -> Option<String> {
        self.zygote_start_error.lock().ok().and_then(|e| e.clone())
    }

    pub fn slots_out_of_service(&self) -> usize {
        self.admission.retired()
    }

    /// Start draining (SIGTERM, SIGINT): `/ready` turns 503, new and queued submissions
    /// are refused with [`ExecuteError::ShuttingDown`], running ones finish.
    pub fn begin_drain(&self) {
        self.draining.cancel();
    }

    /// Whether the daemon is draining.
    pub fn draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Wait until nothing runs or waits (the drain is complete).
    pub async fn wait_idle(&self) {
        while self.running() > 0 || self.waiting() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The grace period is over: kill every running stage; each such submission is
    /// answered [`ExecuteError::ShuttingDown`] with `killed` set.
    pub fn kill_running(&self) {
        self.draining.cancel();
        self.killing.cancel();
    }

    /// Run `/bin/true` through the default backend, so a host where the sandbox cannot work
    /// (no user namespaces, a blocking seccomp profile) fails at start-up, not per request.
    pub async fn self_test(self: &Arc<Self>) -> Result<(), ExecutorError> {
        let probe = Runtime::ad_hoc("self-test", "probe", &["true"], None, self.backend);
        let request = ExecutionRequest::single_file(Arc::new(probe), Vec::new());
        let lease = self.admission.acquire().await?;
        // The execution task never fails to answer (it always sends a report).
        let step = CompileStep::Run {
            key: None,
            keep: false,
        };
        let report = self
            .run_in_slot(request, lease, false, step, true)
            .await
            .ok();
        match report.and_then(|r| r.report.run) {
            Some(run) if run.status == StageStatus::Ok => Ok(()),
            run => {
                let detail = run.map_or_else(
                    || "no result".into(),
                    |run| {
                        format!(
                            "{}{}",
                            run.message.unwrap_or_default(),
                            String::from_utf8_lossy(&run.stderr).trim()
                        )
                    },
                );
                // A sandbox that died before it took its command reports no words of
                // bubblewrap's: ask bubblewrap itself, so the remedy can name what lacks.
                let detail = match self.diagnose_bwrap(&detail).await {
                    Some(words) => format!("{detail}: {words}"),
                    None => detail,
                };
                Err(ExecutorError::SelfTest {
                    backend: self.backend.as_str(),
                    remedy: remedy(&detail),
                    detail,
                })
            }
        }
    }

    /// bubblewrap's own error for a minimal sandbox with the namespaces, `/proc`, hostname
    /// and pivot_root the real ones use, when `detail` does not already carry one.
    async fn diagnose_bwrap(&self, detail: &str) -> Option<String> {
        if self.backend != BackendKind::Bwrap || detail.contains("bwrap:") {
            return None;
        }
        let mut cmd = tokio::process::Command::new(&self.bwrap_path);
        cmd.args([
            "--unshare-all",
            "--die-with-parent",
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/bin",
            "/bin",
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--hostname",
            "sandbox",
            "--",
            "/usr/bin/true",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
        let out = tokio::time::timeout(std::time::Duration::from_secs(10), cmd.output())
            .await
            .ok()?
            .ok()?;
        let words = String::from_utf8_lossy(&out.stderr).trim().to_string();
        (!out.status.success() && !words.is_empty()).then_some(words)
    }

    /// Admit, run every stage, and report. The stages run in their own task, so a client
    /// that goes away cannot leave a sandbox running or a slot taken. When `abandoned`
    /// resolves while the submission still waits for a slot (its client went away), it
    /// leaves the queue at once and never runs.
    pub async fn execute(
        self: &Arc<Self>,
        request: ExecutionRequest,
        abandoned: impl std::future::Future<Output = ()>,
    ) -> Result<ExecutionReport, ExecuteError> {
        let arrived = Instant::now();
        if self.draining() {
            return Err(ExecuteError::ShuttingDown { killed: false });
        }
        let step = match self.compile_step(&request, false) {
            Ok(step) => step,
            Err(failed) => {
                // The same compile failed before: the same error, without a slot.
                self.observer
                    .finished(&request.runtime.name, &failed, arrived.elapsed());
                return Ok(*failed);
            }
        };
        let lease = tokio::select! {
            lease = self.admission.acquire() => lease?,
            () = abandoned => return Err(ExecuteError::Abandoned),
            // A queued submission is answered at once: another replica can take it now.
            () = self.draining.cancelled() => {
                return Err(ExecuteError::ShuttingDown { killed: false });
            }
        };
        self.observer.admitted(arrived.elapsed());
        self.run_in_slot(request, lease, true, step, true)
            .await
            .map(|outcome| outcome.report)
    }

    /// How `request`'s compile stage is had: from the cache, or run (and then kept under
    /// its key); `keep` hands a run compile's output back. A compile that failed before
    /// with the same inputs is the `Err`: its report, with nothing left to run.
    fn compile_step(
        &self,
        request: &ExecutionRequest,
        keep: bool,
    ) -> Result<CompileStep, Box<ExecutionReport>> {
        let (Some(_), Some(cache)) = (&request.runtime.compile, &self.compile_cache) else {
            return Ok(CompileStep::Run { key: None, keep });
        };
        let key = CacheKey::of(request, compile_workdir_bytes(request));
        match cache.get(&request.runtime, &key) {
            Some(built) if built.succeeded() => Ok(CompileStep::Prebuilt(built)),
            Some(failed) => Err(Box::new(ExecutionReport {
                compile: Some(failed.report.clone()),
                run: None,
                compile_cached: true,
            })),
            None => Ok(CompileStep::Run {
                key: Some(key),
                keep,
            }),
        }
    }

    /// Drop compile outputs of runtimes that `runtimes.toml` now defines differently.
    pub fn runtimes_changed(&self, runtimes: &[Arc<Runtime>]) {
        if let Some(cache) = &self.compile_cache {
            cache.retain_runtimes(runtimes);
        }
    }

    /// Bytes and entries the compile cache holds (`None` when it is off).
    pub fn compile_cache_size(&self) -> Option<(u64, usize)> {
        self.compile_cache.as_ref().map(CompileCache::size)
    }

    /// Run the stages in their own task and answer as soon as the report exists; the task
    /// then prepares the slot's next sandbox before it gives the slot back.
    async fn run_in_slot(
        self: &Arc<Self>,
        request: ExecutionRequest,
        lease: SlotLease,
        observe: bool,
        step: CompileStep,
        run: bool,
    ) -> Result<StagesOutcome, ExecuteError> {
        let (tx, rx) = oneshot::channel();
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let runtime = request.runtime.name.clone();
            let started = Instant::now();
            this.in_flight
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // In a task of its own, so that even a panic in the stages still reaches the
            // clean-up below: the slot is reset (or retired), never handed out dirty.
            let mut stages = tokio::spawn({
                let (this, request, index) = (Arc::clone(&this), request.clone(), lease.index);
                async move { this.run_stages(&request, index, &step, run).await }
            });
            let stages_failed = |e: tokio::task::JoinError| {
                tracing::error!(error = %e, "the stages of a run failed");
                StagesOutcome {
                    report: ExecutionReport {
                        compile: None,
                        run: Some(StageReport::internal("the stages failed", request.limits)),
                        compile_cached: false,
                    },
                    built: None,
                }
            };
            let report = tokio::select! {
                biased;
                joined = &mut stages => Ok(joined.unwrap_or_else(stages_failed)),
                () = this.killing.cancelled() => Err(()),
            };
            let outcome = match report {
                Ok(outcome) => outcome,
                Err(()) => {
                    // The shutdown grace period is over: answer first, then kill.
                    tracing::warn!(slot = lease.index, runtime = %runtime,
                        "killing a run at the end of the shutdown grace period");
                    let _ = tx.send(Err(ExecuteError::ShuttingDown { killed: true }));
                    if let Some(slot) = this.slots.slots.get(lease.index) {
                        slot.kill_everything();
                    }
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), stages).await;
                    this.in_flight
                        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    // The daemon is exiting: the slot is removed with the pool, not reused.
                    lease.retire();
                    return;
                }
            };
            this.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            if observe {
                this.observer
                    .finished(&runtime, &outcome.report, started.elapsed());
            }
            let _ = tx.send(Ok(outcome));
            // The slot's next sandbox suits what it just ran: warm for a warm runtime,
            // plain (any runtime's command) otherwise. The start-up self-test (not
            // observed) leaves the slot as it was.
            if observe {
                let next = warmable(&request.runtime).then(|| Arc::clone(&request.runtime));
                this.with_slot_state(lease.index, |s| s.warm_for = next);
            }
            // A zygote that served the run stays, and its runs leave nothing to clean: a
            // run's init reports only once it has killed and reaped everything else in the
            // run's pid namespace, and the namespace ends with it.
            if this
                .with_slot_state(lease.index, |s| std::mem::take(&mut s.zygote_kept))
                .unwrap_or(false)
            {
                drop(lease);
                return;
            }
            if !this.settle_slot(lease.index).await {
                // Something of the last run outlived every kill: it must not share the
                // slot (and its uid) with the next one.
                tracing::error!(
                    slot = lease.index,
                    "processes of the last run are still alive; taking the slot out of service"
                );
                lease.retire();
                return;
            }
            match this.slots.reset(lease.index) {
                Ok(_) => {
                    this.prepare_slot(lease.index).await;
                    drop(lease);
                }
                Err(e) => {
                    // Never hand a run the last one's leftovers: the slot goes out of
                    // service (`/ready`, `/health` and metrics say so).
                    tracing::error!(slot = lease.index, error = %e,
                        "cannot clean a slot after a run; taking it out of service");
                    lease.retire();
                }
            }
        });
        rx.await.map_err(|e| ExecuteError::Internal(Box::new(e)))?
    }

    /// Give every idle slot a prepared sandbox (at start-up; afterwards each run prepares
    /// its slot's next one), with `default` waiting started in it when it is a warm runtime.
    pub async fn prepare_idle_slots(self: &Arc<Self>, default: Option<Arc<Runtime>>) {
        if self.helper.is_none() || !self.prepare_idle {
            return;
        }
        if let Some(runtime) = default.filter(|r| warmable(r)) {
            for index in 0..self.slot_state.len() {
                self.with_slot_state(index, |s| s.warm_for = Some(Arc::clone(&runtime)));
            }
        }
        // Hold every lease until all slots are visited, so each slot gets its turn.
        let mut leases = Vec::with_capacity(self.slots.slots.len());
        for _ in 0..self.slots.slots.len() {
            let Ok(lease) = self.admission.acquire().await else {
                return;
            };
            let already = self
                .with_slot_state(lease.index, |s| s.prepared.is_some())
                .unwrap_or(true);
            if !already {
                self.prepare_slot(lease.index).await;
            }
            leases.push(lease);
        }
    }

    /// Wait (briefly) until nothing of the last run is left in the slot's cgroup, so no
    /// dying process counts against the next run's process limit.
    /// False when something is still alive after two seconds of killing.
    async fn settle_slot(&self, index: usize) -> bool {
        let Some(slot) = self.slots.slots.get(index) else {
            return true;
        };
        let Some(cg) = &slot.cgroup else {
            return true;
        };
        let launcher = slot.launcher().and_then(|l| l.pid());
        for _ in 0..400 {
            if cg.is_empty(launcher) {
                return true;
            }
            cg.kill_all(launcher);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        false
    }
}
