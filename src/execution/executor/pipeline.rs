//! The pipeline of one submission in its slot: the work dir, the compile stage if the
//! runtime has one, then the run, each in its own sandbox.

use std::sync::Arc;

use super::Executor;
use super::command::{Placeholders, fill_template};
use super::prepared::{PreparedSandbox, Waiting, exec_spec, hand_over};
use super::warm::WarmRequest;
use crate::config::BackendKind;
use crate::execution::compile_cache::{BuiltOutput, CacheKey};
use crate::execution::observer::StartKind;
use crate::execution::pool::Slot;
use crate::execution::report::{ExecutionReport, StageReport, StageStatus};
use crate::execution::sandbox::{SandboxBackend, StagePlan};
use crate::execution::stage::{RunContext, StageStart, rlimits, run_stage, supervise};
use crate::execution::{ExecutionRequest, Limits};
use crate::runtimes::resolve_command;

/// How a slot gets its compile stage's result.
#[derive(Clone)]
pub(super) enum CompileStep {
    /// Run the compile here. Its result is kept in the cache under `key` when there is
    /// one, and handed back in [`StagesOutcome::built`] when `keep` (a batch's tests run
    /// from it).
    Run { key: Option<CacheKey>, keep: bool },
    /// Write an earlier identical compile's output into the work dir instead.
    Prebuilt(Arc<BuiltOutput>),
}

/// What a slot's stages produced.
pub(super) struct StagesOutcome {
    pub(super) report: ExecutionReport,
    /// The compile's result, when it ran and was asked to be kept (or was kept).
    pub(super) built: Option<Arc<BuiltOutput>>,
}

/// The compile stage's work dir: room for the compiler, and at least the run's.
pub(super) fn compile_workdir_bytes(request: &ExecutionRequest) -> u64 {
    match request.runtime.compile {
        Some(_) => request
            .limits
            .workdir_bytes
            .max(request.runtime.compile_limits.workdir_bytes),
        None => request.limits.workdir_bytes,
    }
}

impl Executor {
    /// Run `request`'s stages in slot `slot_index`: the compile (or its earlier output, see
    /// `step`), then, when `run`, the run stage.
    pub(super) async fn run_stages(
        &self,
        request: &ExecutionRequest,
        slot_index: usize,
        step: &CompileStep,
        run: bool,
    ) -> StagesOutcome {
        let runtime = &request.runtime;
        let done = |report: ExecutionReport| StagesOutcome {
            report,
            built: None,
        };
        let fail = |message: String, limits: Limits| {
            done(ExecutionReport {
                compile: None,
                run: Some(StageReport::internal(message, limits)),
                compile_cached: false,
            })
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
        let workdir_bytes = compile_workdir_bytes(request);
        let prebuilt = match step {
            CompileStep::Prebuilt(built) if runtime.compile.is_some() => Some(built),
            _ => None,
        };
        // A prebuilt work dir holds the sources as the compile left them.
        let files = if prebuilt.is_some() {
            &[][..]
        } else {
            &request.files[..]
        };
        let mut prepared = self.take_prepared(slot_index, runtime).await;
        if prepared.as_ref().is_some_and(PreparedSandbox::is_zygote) {
            // `Err`: the zygote could not take the run, which starts as if it had never been.
            if let Ok(report) = self
                .run_in_zygote(prepared.take(), request, slot_index)
                .await
            {
                return done(report);
            }
        }
        let slot = match self
            .slots
            .prepare(slot_index, files, workdir_bytes, prepared.is_none())
        {
            Ok(slot) => slot,
            Err(e) => {
                self.discard(prepared.take(), slot_index).await;
                return fail(format!("preparing the work dir: {e}"), request.limits);
            }
        };

        let mut compile_report = None;
        let mut compile_cached = false;
        let mut built = None;
        if let (Some(_), Some(prebuilt)) = (&runtime.compile, prebuilt) {
            let restored = match &prebuilt.artifact {
                Some(artifact) => self.slots.restore_box(slot_index, artifact),
                None => Ok(()),
            };
            if let Err(e) = restored {
                self.discard(prepared.take(), slot_index).await;
                return fail(
                    format!("restoring the compile's output: {e}"),
                    request.limits,
                );
            }
            compile_report = Some(prebuilt.report.clone());
            compile_cached = true;
        } else if let Some(command) = &runtime.compile {
            let mut report = self
                .run_one(
                    backend,
                    slot,
                    command,
                    &[],
                    request,
                    runtime.compile_limits,
                    &[],
                    prepared.take(),
                    false,
                )
                .await;
            if report.status == StageStatus::RuntimeError {
                report.status = StageStatus::CompileError;
            }
            self.observer.compiled(&runtime.name, report.status);
            let (key, keep) = match step {
                CompileStep::Run { key, keep } => (*key, *keep),
                CompileStep::Prebuilt(_) => (None, false),
            };
            if report.status != StageStatus::Ok {
                let output = Arc::new(BuiltOutput {
                    report: report.clone(),
                    artifact: None,
                });
                if let (Some(cache), Some(key)) = (&self.compile_cache, key) {
                    cache.put(runtime, key, Arc::clone(&output));
                }
                return StagesOutcome {
                    report: ExecutionReport {
                        compile: Some(report),
                        run: None,
                        compile_cached: false,
                    },
                    built: keep.then_some(output),
                };
            }
            if key.is_some() || keep {
                let most = workdir_bytes.saturating_mul(2);
                match self.slots.capture_box(slot_index, most) {
                    Ok(artifact) => {
                        let output = Arc::new(BuiltOutput {
                            report: report.clone(),
                            artifact: Some(artifact),
                        });
                        if let (Some(cache), Some(key)) = (&self.compile_cache, key) {
                            cache.put(runtime, key, Arc::clone(&output));
                        }
                        built = keep.then_some(output);
                    }
                    Err(e) if keep => {
                        return done(ExecutionReport {
                            compile: Some(report),
                            run: Some(StageReport::internal(
                                format!("keeping the compile's output for the tests: {e}"),
                                request.limits,
                            )),
                            compile_cached: false,
                        });
                    }
                    Err(e) => tracing::info!(error = %e, "a compile's output is not cached"),
                }
            }
            compile_report = Some(report);
        }
        if runtime.compile.is_some() {
            // The tmpfs was sized for the compile: `workdir_bytes` holds for the run too, and
            // the compiler's output cannot be deleted to make room.
            if let Err(e) = self
                .slots
                .seal_compile_output(slot_index)
                .and_then(|()| self.slots.resize(slot_index, request.limits.workdir_bytes))
            {
                return done(ExecutionReport {
                    compile: compile_report,
                    run: Some(StageReport::internal(
                        format!("sizing the work dir: {e}"),
                        request.limits,
                    )),
                    compile_cached,
                });
            }
        }
        if !run {
            self.discard(prepared.take(), slot_index).await;
            return StagesOutcome {
                report: ExecutionReport {
                    compile: compile_report,
                    run: None,
                    compile_cached,
                },
                built,
            };
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
                true,
            )
            .await;
        StagesOutcome {
            report: ExecutionReport {
                compile: compile_report,
                run: Some(run),
                compile_cached,
            },
            built,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run_one(
        &self,
        backend: &dyn SandboxBackend,
        slot: &Slot,
        template: &[String],
        args: &[String],
        request: &ExecutionRequest,
        limits: Limits,
        stdin: &[u8],
        prepared: Option<PreparedSandbox>,
        is_run_stage: bool,
    ) -> StageReport {
        let class = request.main_class();
        let mut argv = fill_template(
            template,
            &Placeholders {
                entry: &request.entry,
                class: class.as_deref(),
                memory_bytes: limits.memory_bytes,
            },
        );
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
            cg.reclaim_unheld();
            // A waiting interpreter already holds memory. Below a quarter of the stage's limit
            // it is kept; above, it goes first and the stage starts cold (lowering the limit
            // under its usage would fail on cgroup v1 and OOM-kill it, uncounted, on v2).
            if prepared.as_ref().is_some_and(PreparedSandbox::is_warm)
                && cg
                    .usage_bytes()
                    .is_none_or(|used| used > limits.memory_bytes / 4)
                && let Some(p) = prepared.take()
            {
                p.discard(Some(cg)).await;
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
        if is_run_stage {
            let how = match &prepared {
                Some(p) if p.is_warm() => StartKind::Warm,
                _ => StartKind::Cold,
            };
            self.observer.run_started(&request.runtime.name, how);
        }
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
    pub(super) async fn run_prepared(
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
            status_pipe: prepared.status.as_ref(),
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
            // `run_stages` hands a zygote its runs; no stage comes here with one.
            Waiting::Zygote(_) => {
                prepared.spawned.discard(ctx.cgroup).await;
                return StageReport::internal("a zygote was handed a stage", ctx.limits);
            }
        };
        let json = match json {
            Ok(j) => j,
            Err(e) => return StageReport::internal(e, ctx.limits),
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
