//! The executor: admission, then per stage (compile?, run) prepare the slot, build the
//! sandboxed command with the runtime's backend, and hand it to the shared runner.

use std::sync::Arc;
use std::time::Instant;

use super::admission::Admission;
use super::observer::ExecutionObserver;
use super::report::{ExecutionReport, StageReport, StageStatus};
use super::runner::{RunContext, run_stage};
use super::sandbox::{BwrapBackend, ProcessBackend, SandboxBackend, StagePlan};
use super::slots::{MemoryEnforcement, Slot, SlotOptions, SlotPool};
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

pub struct Executor {
    admission: Admission,
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
        Ok(Executor {
            admission: Admission::new(count, settings.execution.queue_size),
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
            slots: self.slots.slots.len(),
            queue: self.queue,
            work_root: self.slots.root.clone(),
            cgroup_dir: self.slots.cgroup_dir(),
        }
    }

    pub fn running(&self) -> usize {
        self.admission.running()
    }

    pub fn waiting(&self) -> usize {
        self.admission.waiting()
    }

    /// Run `/bin/true` through the default backend, so a host where the sandbox cannot work
    /// (no user namespaces, a blocking seccomp profile) fails at start-up, not per request.
    pub async fn self_test(&self) -> Result<(), String> {
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
            availability: crate::runtimes::Availability {
                available: true,
                reason: None,
            },
        };
        let request = ExecutionRequest::single_file(Arc::new(probe), Vec::new());
        let lease = self
            .admission
            .acquire(|| {})
            .await
            .map_err(|e| e.to_string())?;
        let report = self.run_stages(&request, lease.index).await;
        self.slots.clear(lease.index);
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
    /// that goes away cannot leave a sandbox running or a slot taken.
    pub async fn execute(
        self: &Arc<Self>,
        request: ExecutionRequest,
    ) -> Result<ExecutionReport, ExecuteError> {
        let arrived = Instant::now();
        let lease = match self.admission.acquire(|| self.observer.queued()).await {
            Ok(lease) => lease,
            Err(busy) => {
                self.observer.rejected_busy();
                return Err(busy.into());
            }
        };
        self.observer.dequeued(arrived.elapsed(), true);
        let this = Arc::clone(self);
        let task = tokio::spawn(async move {
            let runtime = request.runtime.name.clone();
            this.observer.started(&runtime);
            let started = Instant::now();
            let report = this.run_stages(&request, lease.index).await;
            this.slots.clear(lease.index);
            drop(lease);
            this.observer.finished(&runtime, &report, started.elapsed());
            report
        });
        task.await
            .map_err(|e| ExecuteError::Internal(format!("execution task failed: {e}")))
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
        let slot = match self.slots.prepare(
            slot_index,
            &request.files,
            workdir_bytes,
            request.limits.memory_bytes,
        ) {
            Ok(slot) => slot,
            Err(e) => return fail(format!("preparing the work dir: {e}"), request.limits),
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
    ) -> StageReport {
        let mut argv = fill_template(template, &request.entry);
        argv.extend(args.iter().cloned());
        match resolve_command(&argv[0], &self.sandbox_path) {
            // `./name` is a program the compile stage built in the work dir.
            _ if argv[0].starts_with("./") => {}
            Some(path) => argv[0] = path.to_string_lossy().into_owned(),
            None => {
                return StageReport::internal(
                    format!("command `{}` is not installed", argv[0]),
                    limits,
                );
            }
        }
        if let Some(cg) = &slot.cgroup {
            if let Err(e) = cg.prepare(limits.memory_bytes) {
                return StageReport::internal(e, limits);
            }
        }
        let plan = StagePlan {
            argv,
            env: &request.runtime.env,
            ro_binds: &request.runtime.ro_binds,
            slot_dir: &slot.dir,
            path: &self.sandbox_path,
        };
        let command = match backend.build(&plan) {
            Ok(c) => c,
            Err(e) => return StageReport::internal(e, limits),
        };
        let is_bwrap = backend.kind() == BackendKind::Bwrap;
        let launcher = slot.launcher();
        run_stage(
            command,
            RunContext {
                uid: slot.uid,
                cgroup: slot.cgroup.as_ref(),
                limits,
                stdin,
                backend_processes: if is_bwrap { 2 } else { 0 },
                exit_code_encodes_signal: is_bwrap,
                launcher: launcher.as_deref(),
            },
        )
        .await
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
