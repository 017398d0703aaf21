//! The executor: admission, then per stage (compile?, run) prepare the slot, build the
//! sandboxed command with the runtime's backend, and hand it to the shared runner.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use super::admission::{Admission, SlotLease};
use super::launcher::launcher_executable;
use super::observer::ExecutionObserver;
use super::report::{ExecutionReport, StageReport, StageStatus};
use super::runner::{RunContext, Spawned, StageStart, rlimits, run_stage, start_stage, supervise};
use super::sandbox::{BwrapBackend, ProcessBackend, SandboxBackend, StagePlan};
use super::slots::{MemoryEnforcement, Slot, SlotOptions, SlotPool};
use super::stage_exec::ExecSpec;
use super::warm::{WarmRequest, warm_command};
use super::{ExecuteError, ExecutionRequest, Limits};
use crate::config::{BackendKind, Settings};
use crate::runtimes::{Runtime, resolve_command};

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
}

impl ExecutorInfo {
    /// True when the default backend isolates submissions.
    pub fn isolated(&self) -> bool {
        self.backend == BackendKind::Bwrap
    }
}

/// A bubblewrap sandbox set up ahead of the stage it will run (see `stage_exec.rs`).
struct PreparedSandbox {
    spawned: Spawned,
    /// What it waits for.
    waiting: Waiting,
    /// Read end of the pipe the helper reports the stage's wait status on.
    status: OwnedFd,
    /// The runtime paths bound into it: a runtime needing others gets a fresh sandbox.
    binds: Vec<PathBuf>,
}

enum Waiting {
    /// The helper waits for any stage's command on this pipe.
    Command(OwnedFd),
    /// A started interpreter of `runtime` waits for its program on `request` (see
    /// `warm.rs`); it suits only that runtime, as loaded then (a reload makes a new one).
    Warm {
        runtime: Arc<Runtime>,
        request: OwnedFd,
    },
}

impl PreparedSandbox {
    /// End it unused, and wait for that, so the slot's launcher is free again.
    async fn discard(self, cgroup: Option<&super::cgroup::MemoryCgroup>) {
        // Closing the pipe unread makes the waiting program exit; the kill makes sure.
        drop(self.waiting);
        self.spawned.discard(cgroup).await;
    }

    fn is_warm(&self) -> bool {
        matches!(self.waiting, Waiting::Warm { .. })
    }

    fn suits(&mut self, runtime: &Arc<Runtime>) -> bool {
        let waits_for_it = match &self.waiting {
            Waiting::Command(_) => true,
            Waiting::Warm { runtime: warm, .. } => Arc::ptr_eq(warm, runtime),
        };
        waits_for_it
            && runtime.backend == BackendKind::Bwrap
            && runtime.ro_binds.iter().all(|b| self.binds.contains(b))
            && !self.spawned.has_exited()
    }
}

pub struct Executor {
    admission: Admission,
    /// One prepared sandbox per idle slot, by slot index.
    prepared: Vec<Mutex<Option<PreparedSandbox>>>,
    /// Every runtime bind seen so far, so later prepared sandboxes suit those runtimes too.
    prepared_binds: Mutex<Vec<PathBuf>>,
    /// Per slot: the warm runtime its next prepared sandbox starts: the default one at
    /// first, then the runtime the slot last ran if that is warm, else none (plain).
    warm_for: Vec<Mutex<Option<Arc<Runtime>>>>,
    /// The binary bound into every bubblewrap sandbox as the stage-exec helper (its pid 1).
    helper: Option<PathBuf>,
    /// Whether idle slots keep a prepared sandbox (`sandbox.prepare_sandboxes`).
    prepare_idle: bool,
    max_limits: Limits,
    in_flight: std::sync::atomic::AtomicUsize,
    slots: SlotPool,
    bwrap: Option<BwrapBackend>,
    bwrap_error: Option<String>,
    process: ProcessBackend,
    backend: BackendKind,
    sandbox_path: String,
    queue: usize,
    observer: Arc<dyn ExecutionObserver>,
}

impl Executor {
    /// Prepare slots and backends. Fails when the configured backend cannot work here.
    pub fn new(settings: &Settings, observer: Arc<dyn ExecutionObserver>) -> Result<Self, String> {
        let sandbox = &settings.sandbox;
        let (bwrap, bwrap_error) =
            match BwrapBackend::new(&sandbox.bwrap_path, &sandbox.path, sandbox.ro_binds.clone()) {
                Ok(b) => (Some(b), None),
                Err(e) => (None, Some(e)),
            };
        if sandbox.backend == BackendKind::Bwrap {
            if let Some(e) = &bwrap_error {
                return Err(e.clone());
            }
        }
        let count = settings.slots();
        let workdir_bytes = settings.limits.workdir_bytes;
        let slots = SlotPool::new(&SlotOptions {
            count,
            work_root: &settings.execution.work_root,
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
        Ok(Executor {
            admission: Admission::new(
                count,
                settings.execution.queue_size,
                std::time::Duration::from_millis(settings.execution.max_queue_wait_ms),
            ),
            prepared: (0..count).map(|_| Mutex::new(None)).collect(),
            prepared_binds: Mutex::new(Vec::new()),
            warm_for: (0..count).map(|_| Mutex::new(None)).collect(),
            helper,
            prepare_idle: sandbox.prepare_sandboxes,
            max_limits: settings.max_limits,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            slots,
            bwrap,
            bwrap_error,
            process: ProcessBackend,
            backend: sandbox.backend,
            sandbox_path: sandbox.path.clone(),
            queue: settings.execution.queue_size,
            observer,
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
        }
    }

    /// Executions running now (a slot that is only preparing its next sandbox is not one).
    pub fn running(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn waiting(&self) -> usize {
        self.admission.waiting()
    }

    /// Slots taken out of service because they could not be cleaned after a run.
    pub fn slots_out_of_service(&self) -> usize {
        self.admission.retired()
    }

    /// Run `/bin/true` through the default backend, so a host where the sandbox cannot work
    /// (no user namespaces, a blocking seccomp profile) fails at start-up, not per request.
    pub async fn self_test(self: &Arc<Self>) -> Result<(), String> {
        let probe = Runtime {
            name: "self-test".into(),
            aliases: Vec::new(),
            language: "sh".into(),
            version: None,
            version_command: None,
            file_name: "probe".into(),
            run: vec!["true".into()],
            compile: None,
            env: Vec::new(),
            ro_binds: Vec::new(),
            limits: Limits::default_run(),
            max_limits: Limits::default_max(),
            compile_limits: Limits::default_compile(),
            backend: self.backend,
            warm: None,
            availability: crate::runtimes::Availability {
                available: true,
                reason: None,
            },
        };
        let request = ExecutionRequest::single_file(Arc::new(probe), Vec::new());
        let lease = self.admission.acquire().await.map_err(|e| e.to_string())?;
        let report = self
            .run_in_slot(request, lease, false)
            .await
            .map_err(|e| e.to_string())?;
        match report.run {
            Some(run) if run.status == StageStatus::Ok => Ok(()),
            Some(run) => Err(format!(
                "the {} sandbox does not work on this host: {}{}",
                self.backend.as_str(),
                run.message.unwrap_or_default(),
                String::from_utf8_lossy(&run.stderr).trim()
            )),
            None => Err("sandbox self-test produced no result".into()),
        }
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
        let lease = tokio::select! {
            lease = self.admission.acquire() => lease?,
            () = abandoned => return Err(ExecuteError::Abandoned),
        };
        self.observer.admitted(arrived.elapsed());
        self.run_in_slot(request, lease, true).await
    }

    /// Run the stages in their own task and answer as soon as the report exists; the task
    /// then prepares the slot's next sandbox before it gives the slot back.
    async fn run_in_slot(
        self: &Arc<Self>,
        request: ExecutionRequest,
        lease: SlotLease,
        observe: bool,
    ) -> Result<ExecutionReport, ExecuteError> {
        let (tx, rx) = oneshot::channel();
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let runtime = request.runtime.name.clone();
            let started = Instant::now();
            this.in_flight
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let report = this.run_stages(&request, lease.index).await;
            this.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            if observe {
                this.observer.finished(&runtime, &report, started.elapsed());
            }
            let _ = tx.send(report);
            // The slot's next sandbox suits what it just ran: warm for a warm runtime,
            // plain (any runtime's command) otherwise. The start-up self-test (not
            // observed) leaves the slot as it was.
            if observe {
                if let Some(Ok(mut warm)) = this.warm_for.get(lease.index).map(|m| m.lock()) {
                    *warm = warmable(&request.runtime).then(|| Arc::clone(&request.runtime));
                }
            }
            this.settle_slot(lease.index).await;
            match this.slots.reset(lease.index) {
                Ok(_) => {
                    this.prepare_sandbox(lease.index).await;
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
        rx.await
            .map_err(|_| ExecuteError::Internal("the execution task failed".into()))
    }

    /// Give every idle slot a prepared sandbox (at start-up; afterwards each run prepares
    /// its slot's next one), with `default` waiting started in it when it is a warm runtime.
    pub async fn prepare_idle_slots(self: &Arc<Self>, default: Option<Arc<Runtime>>) {
        if self.helper.is_none() || !self.prepare_idle {
            return;
        }
        if let Some(runtime) = default.filter(|r| warmable(r)) {
            for cell in &self.warm_for {
                if let Ok(mut warm) = cell.lock() {
                    *warm = Some(Arc::clone(&runtime));
                }
            }
        }
        // Hold every lease until all slots are visited, so each slot gets its turn.
        let mut leases = Vec::with_capacity(self.slots.slots.len());
        for _ in 0..self.slots.slots.len() {
            let Ok(lease) = self.admission.acquire().await else {
                return;
            };
            let already = self
                .prepared
                .get(lease.index)
                .and_then(|m| m.lock().ok().map(|p| p.is_some()))
                .unwrap_or(true);
            if !already {
                self.prepare_sandbox(lease.index).await;
            }
            leases.push(lease);
        }
    }

    /// Wait (briefly) until nothing of the last run is left in the slot's cgroup, so no
    /// dying process counts against the next run's process limit.
    async fn settle_slot(&self, index: usize) {
        let Some(slot) = self.slots.slots.get(index) else {
            return;
        };
        let Some(cg) = &slot.cgroup else {
            return;
        };
        let launcher = slot.launcher().and_then(|l| l.pid());
        for _ in 0..400 {
            if cg.is_empty(launcher) {
                return;
            }
            cg.kill_all(launcher);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tracing::warn!(slot = index, "processes of the last run are still exiting");
    }

    /// Set up a sandbox in slot `index` that waits for its next stage (best effort).
    async fn prepare_sandbox(&self, index: usize) {
        if self.bwrap.is_none() || self.helper.is_none() || !self.prepare_idle {
            return;
        }
        // The slot's dirs are fresh: `reset` ran after its last run (or at start-up).
        let Some(slot) = self.slots.slots.get(index) else {
            return;
        };
        let binds = self
            .prepared_binds
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default();
        let warm = self
            .warm_for
            .get(index)
            .and_then(|m| m.lock().ok().and_then(|w| w.clone()));
        match self.start_prepared(slot, binds, warm).await {
            Ok(prepared) => {
                if let Some(Ok(mut cell)) = self.prepared.get(index).map(|m| m.lock()) {
                    *cell = Some(prepared);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot start a prepared sandbox"),
        }
    }

    /// Start a bubblewrap sandbox on `slot`'s dirs whose helper waits for a stage's command,
    /// or, with `warm`, has already started that runtime's interpreter waiting for a program.
    async fn start_prepared(
        &self,
        slot: &Slot,
        binds: Vec<PathBuf>,
        warm: Option<Arc<Runtime>>,
    ) -> Result<PreparedSandbox, String> {
        let (Some(bwrap), Some(helper)) = (&self.bwrap, &self.helper) else {
            return Err("prepared sandboxes are off".into());
        };
        let prepared = bwrap.build_prepared(
            &slot.dir,
            &self.sandbox_path,
            &binds,
            helper,
            warm.is_some(),
        )?;
        let ctx = RunContext {
            uid: slot.uid,
            cgroup: slot.cgroup.as_ref(),
            // Upper bounds only: the helper lowers them to the stage's limits before exec.
            limits: self.max_limits,
            stdin: &[],
            // Outside the sandbox's user namespace the count under this ceiling holds
            // bubblewrap's outer process and the helper (the sandbox's pid 1), besides
            // the stage.
            backend_processes: 2,
            exit_code_encodes_signal: true,
            status_pipe: None,
            launcher: slot.launcher(),
        };
        // The warm interpreter's command, ready before the sandbox starts; if it cannot be
        // made, the sandbox waits for any command instead.
        let warm = match (warm, prepared.warm) {
            (Some(runtime), Some((request, fd))) => match self.warm_spec(&runtime, slot, fd) {
                Ok(json) => Some((runtime, request, json)),
                Err(e) => {
                    tracing::warn!(runtime = %runtime.name, error = %e, "cannot warm");
                    None
                }
            },
            _ => None,
        };
        if let (Some((runtime, ..)), Some(cg)) = (&warm, &slot.cgroup) {
            // Room for the interpreter to start in, whatever the last run's limit was; the
            // stage's own limit is set when it is handed over.
            cg.prepare(runtime.max_limits.memory_bytes)?;
        }
        let spawned = start_stage(prepared.command, &ctx).await?;
        let (waiting, warm_command) = match warm {
            Some((runtime, request, json)) => (
                Waiting::Warm { runtime, request },
                Some((prepared.control, json)),
            ),
            None => (Waiting::Command(prepared.control), None),
        };
        let sandbox = PreparedSandbox {
            spawned,
            waiting,
            status: prepared.status,
            binds,
        };
        // Written once the helper runs (a pipe holds only so much before it is read).
        if let Some((control, json)) = warm_command {
            if !hand_over(control, json).await {
                sandbox.discard(slot.cgroup.as_ref()).await;
                return Err("the prepared sandbox did not take the warm command".into());
            }
        }
        Ok(sandbox)
    }

    /// The helper's command that starts `runtime`'s interpreter waiting on `fd`, under the
    /// runtime's maximum limits (the interpreter lowers them per request).
    fn warm_spec(
        &self,
        runtime: &Runtime,
        slot: &Slot,
        fd: std::ffi::c_int,
    ) -> Result<Vec<u8>, String> {
        let kind = runtime.warm.ok_or("not a warm runtime")?;
        let mut argv = warm_command(kind, &runtime.run, fd).into_iter();
        let program = argv.next().unwrap_or_default();
        let program = resolve_command(&program, &self.sandbox_path)
            .ok_or_else(|| format!("command `{program}` is not installed"))?;
        let ctx = RunContext {
            uid: slot.uid,
            cgroup: slot.cgroup.as_ref(),
            limits: runtime.max_limits,
            stdin: &[],
            backend_processes: 1,
            exit_code_encodes_signal: true,
            status_pipe: None,
            launcher: None,
        };
        let spec = exec_spec(
            program.as_os_str().as_encoded_bytes().to_vec(),
            argv,
            &self.sandbox_path,
            &runtime.env,
            &ctx,
        );
        serde_json::to_vec(&spec).map_err(|e| e.to_string())
    }

    /// End a prepared sandbox that will not be used, and wait for it, so the slot's
    /// launcher is free and no reply of it is left unread.
    async fn discard(&self, prepared: Option<PreparedSandbox>, index: usize) {
        if let Some(prepared) = prepared {
            let cgroup = self.slots.slots.get(index).and_then(|s| s.cgroup.as_ref());
            prepared.discard(cgroup).await;
        }
    }

    /// Take slot `index`'s prepared sandbox if it suits `runtime`; discard it otherwise (a
    /// slot's launcher serves one sandbox at a time).
    async fn take_prepared(&self, index: usize, runtime: &Arc<Runtime>) -> Option<PreparedSandbox> {
        let taken = self.prepared.get(index)?.lock().ok()?.take();
        let mut prepared = taken?;
        if prepared.suits(runtime) {
            return Some(prepared);
        }
        if let Ok(mut seen) = self.prepared_binds.lock() {
            for bind in &runtime.ro_binds {
                if !seen.contains(bind) {
                    seen.push(bind.clone());
                }
            }
        }
        self.discard(Some(prepared), index).await;
        None
    }

    async fn run_stages(&self, request: &ExecutionRequest, slot_index: usize) -> ExecutionReport {
        let runtime = &request.runtime;
        let fail = |message: String, limits: Limits| ExecutionReport {
            compile: None,
            run: Some(StageReport::internal(message, limits)),
        };
        let backend: &dyn SandboxBackend = match runtime.backend {
            BackendKind::Process => &self.process,
            BackendKind::Bwrap => match &self.bwrap {
                Some(b) => b,
                None => {
                    return fail(
                        self.bwrap_error
                            .clone()
                            .unwrap_or_else(|| "bwrap unavailable".into()),
                        request.limits,
                    );
                }
            },
        };
        let workdir_bytes = match runtime.compile {
            Some(_) => request
                .limits
                .workdir_bytes
                .max(runtime.compile_limits.workdir_bytes),
            None => request.limits.workdir_bytes,
        };
        let mut prepared = self.take_prepared(slot_index, runtime).await;
        let slot = match self.slots.prepare(
            slot_index,
            &request.files,
            workdir_bytes,
            prepared.is_none(),
        ) {
            Ok(slot) => slot,
            Err(e) => {
                self.discard(prepared.take(), slot_index).await;
                return fail(format!("preparing the work dir: {e}"), request.limits);
            }
        };

        let mut compile_report = None;
        if let Some(command) = &runtime.compile {
            let report = self
                .run_one(
                    backend,
                    slot,
                    command,
                    &[],
                    request,
                    runtime.compile_limits,
                    &[],
                    prepared.take(),
                )
                .await;
            if report.status != StageStatus::Ok {
                let mut report = report;
                if report.status == StageStatus::RuntimeError {
                    report.status = StageStatus::CompileError;
                }
                return ExecutionReport {
                    compile: Some(report),
                    run: None,
                };
            }
            compile_report = Some(report);
            // The tmpfs was sized for the compile: `workdir_bytes` holds for the run too, and
            // the compiler's output cannot be deleted to make room.
            if let Err(e) = self
                .slots
                .seal_compile_output(slot_index)
                .and_then(|()| self.slots.resize(slot_index, request.limits.workdir_bytes))
            {
                return ExecutionReport {
                    compile: compile_report,
                    run: Some(StageReport::internal(
                        format!("sizing the work dir: {e}"),
                        request.limits,
                    )),
                };
            }
        }
        let run = self
            .run_one(
                backend,
                slot,
                &runtime.run,
                &request.args,
                request,
                request.limits,
                &request.stdin,
                prepared.take(),
            )
            .await;
        ExecutionReport {
            compile: compile_report,
            run: Some(run),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_one(
        &self,
        backend: &dyn SandboxBackend,
        slot: &Slot,
        template: &[String],
        args: &[String],
        request: &ExecutionRequest,
        limits: Limits,
        stdin: &[u8],
        prepared: Option<PreparedSandbox>,
    ) -> StageReport {
        let mut argv = fill_template(template, &request.entry);
        argv.extend(args.iter().cloned());
        match resolve_command(&argv[0], &self.sandbox_path) {
            // `./name` is a program the compile stage built in the work dir.
            _ if argv[0].starts_with("./") => {}
            Some(path) => argv[0] = path.to_string_lossy().into_owned(),
            None => {
                if let Some(p) = prepared {
                    p.discard(slot.cgroup.as_ref()).await;
                }
                return StageReport::internal(
                    format!("command `{}` is not installed", argv[0]),
                    limits,
                );
            }
        }
        let mut prepared = prepared;
        if let Some(cg) = &slot.cgroup {
            // A waiting interpreter already holds memory. Below a quarter of the stage's limit
            // it is kept; above, it goes first and the stage starts cold (lowering the limit
            // under its usage would fail on cgroup v1 and OOM-kill it, uncounted, on v2).
            if prepared.as_ref().is_some_and(PreparedSandbox::is_warm)
                && cg
                    .usage_bytes()
                    .is_none_or(|used| used > limits.memory_bytes / 4)
            {
                if let Some(p) = prepared.take() {
                    p.discard(Some(cg)).await;
                }
            }
            if let Err(e) = cg.prepare(limits.memory_bytes) {
                if let Some(p) = prepared.take() {
                    p.discard(Some(cg)).await;
                }
                return StageReport::internal(e, limits);
            }
        }
        let is_bwrap = backend.kind() == BackendKind::Bwrap;
        let ctx = RunContext {
            uid: slot.uid,
            cgroup: slot.cgroup.as_ref(),
            limits,
            stdin,
            backend_processes: if is_bwrap { 2 } else { 0 },
            exit_code_encodes_signal: is_bwrap,
            status_pipe: None,
            launcher: slot.launcher(),
        };
        // Every bubblewrap stage goes through the stage-exec helper (which reports exact
        // exit statuses): the slot's prepared sandbox when it suits, else one started now,
        // on the work dir as the earlier stage left it.
        let prepared = match prepared {
            Some(p) => Some(p),
            None if is_bwrap && self.helper.is_some() => {
                match self
                    .start_prepared(slot, request.runtime.ro_binds.clone(), None)
                    .await
                {
                    Ok(p) => Some(p),
                    Err(e) => return StageReport::internal(e, limits),
                }
            }
            None => None,
        };
        if let Some(prepared) = prepared {
            // A warm interpreter gets the program's own argv: from `{file}` on.
            let program_argv = template
                .iter()
                .position(|a| a == "{file}")
                .and_then(|at| argv.get(at..))
                .map(<[String]>::to_vec)
                .unwrap_or_default();
            return self
                .run_prepared(prepared, argv, program_argv, &request.runtime.env, &ctx)
                .await;
        }
        let plan = StagePlan {
            argv,
            env: &request.runtime.env,
            ro_binds: &request.runtime.ro_binds,
            ro_binds_at: &[],
            slot_dir: &slot.dir,
            path: &self.sandbox_path,
        };
        let command = match backend.build(&plan) {
            Ok(c) => c,
            Err(e) => return StageReport::internal(e, limits),
        };
        run_stage(command, ctx).await
    }

    /// Hand the stage to the prepared sandbox: its command to the waiting helper, or its
    /// program to the waiting interpreter.
    async fn run_prepared(
        &self,
        prepared: PreparedSandbox,
        argv: Vec<String>,
        program_argv: Vec<String>,
        runtime_env: &[(String, String)],
        ctx: &RunContext<'_>,
    ) -> StageReport {
        // Inside the sandbox's user namespace the helper (its pid 1) shares the stage's
        // count (the user namespace was made under the looser ceiling above).
        let ctx = &RunContext {
            backend_processes: 1,
            status_pipe: Some(&prepared.status),
            launcher: ctx.launcher.clone(),
            ..*ctx
        };
        let (pipe, json) = match prepared.waiting {
            Waiting::Command(control) => {
                let mut argv = argv.into_iter();
                let program = argv.next().unwrap_or_default().into_bytes();
                let spec = exec_spec(program, argv, &self.sandbox_path, runtime_env, ctx);
                (control, serde_json::to_vec(&spec))
            }
            Waiting::Warm { request, .. } => {
                let warm = WarmRequest::new(program_argv, &rlimits(ctx));
                (request, Ok(warm.encode()))
            }
        };
        let json = match json {
            Ok(j) => j,
            Err(e) => return StageReport::internal(e.to_string(), ctx.limits),
        };
        let start = StageStart::now(ctx);
        if !hand_over(pipe, json).await {
            prepared.spawned.discard(ctx.cgroup).await;
            return StageReport::internal(
                "the prepared sandbox did not take the command",
                ctx.limits,
            );
        }
        supervise(prepared.spawned, ctx, start).await
    }
}

/// Write `bytes` to what waits in a prepared sandbox, in a blocking task: a large command
/// may not fit the pipe at once, and the reader reads while we write. False if it failed.
async fn hand_over(pipe: OwnedFd, bytes: Vec<u8>) -> bool {
    let written = tokio::task::spawn_blocking(move || {
        std::io::Write::write_all(&mut std::fs::File::from(pipe), &bytes)
    })
    .await;
    matches!(written, Ok(Ok(())))
}

/// The helper's command: `program` and `args`, the sandbox's environment plus the
/// runtime's, and the stage's rlimits.
fn exec_spec(
    program: Vec<u8>,
    args: impl Iterator<Item = String>,
    sandbox_path: &str,
    runtime_env: &[(String, String)],
    ctx: &RunContext<'_>,
) -> ExecSpec {
    let bytes = |s: &std::ffi::OsStr| s.as_encoded_bytes().to_vec();
    ExecSpec {
        program,
        args: args.map(String::into_bytes).collect(),
        env: super::sandbox::sandboxed_env(sandbox_path, runtime_env)
            .iter()
            .map(|(k, v)| (bytes(k), bytes(v)))
            .collect(),
        rlimits: rlimits(ctx),
    }
}

/// Replace `{file}` with the entry file's name and `{stem}` with that name's final
/// component without its extension.
fn fill_template(template: &[String], entry: &str) -> Vec<String> {
    let base = entry.rsplit('/').next().unwrap_or(entry);
    let stem = base.rsplit_once('.').map_or(base, |(stem, _)| stem);
    template
        .iter()
        .map(|part| part.replace("{file}", entry).replace("{stem}", stem))
        .collect()
}

/// Whether idle sandboxes may keep `runtime` started (see `warm.rs`).
fn warmable(runtime: &Runtime) -> bool {
    runtime.warm.is_some()
        && runtime.compile.is_none()
        && runtime.backend == BackendKind::Bwrap
        && runtime.availability.available
}

#[cfg(test)]
mod tests {
    #[test]
    fn templates_fill_file_and_stem() {
        let t = vec![
            "java".to_string(),
            "-cp".into(),
            ".".into(),
            "{stem}".into(),
        ];
        assert_eq!(
            super::fill_template(&t, "src/Main.java"),
            vec!["java", "-cp", ".", "Main"]
        );
        let t = vec!["python3".to_string(), "{file}".into()];
        assert_eq!(
            super::fill_template(&t, "main.py"),
            vec!["python3", "main.py"]
        );
    }
}
