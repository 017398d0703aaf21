//! Prepared sandboxes: after each run (and at start-up) a slot gets a bubblewrap sandbox
//! that is fully set up and runs the stage-exec helper, blocked on a pipe, so a request
//! skips bubblewrap's ~10 ms of set-up. A request hands it the command, environment and
//! rlimits; the helper forks the stage and reports its raw wait status on a second pipe
//! (bubblewrap's own exit code folds a signal into 128+n, so `exit(137)` would read as
//! SIGKILL). A runtime needing binds the prepared sandbox lacks, and later stages (the run
//! after a compile), start the same kind of sandbox on the spot and hand it the command at
//! once, so every bubblewrap stage has exact exit statuses; later prepared sandboxes
//! include the new binds.
//!
//! **Warm.** For a runtime marked `warm` the helper gets its command at once, with `{file}`
//! replaced by a bootstrap (`warm.rs`), under the runtime's maximum limits: the interpreter
//! starts and blocks on a third pipe. A request then writes only the program's argv and the
//! stage's rlimits there; the bootstrap lowers its limits and runs the entry file as
//! `__main__`, after dropping `sys.path[0]` (the work dir, where the submission's files may
//! land while it starts). A slot's next sandbox is warm for the warm runtime it last ran
//! (all start warm for the default), plain after any other; a warm one suits only that
//! runtime as loaded then (`Arc` identity, so a reload retires it). A warm interpreter
//! holding more than a quarter of the stage's memory limit is dropped and the stage starts
//! cold (cgroup v2 would OOM-kill it when the limit is lowered). Free slots are handed out
//! least recently used first, so the slot just given back (still warming) goes last.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use super::warm::{Bootstrap, warm_command};
use super::{Executor, ExecutorError};
use crate::config::BackendKind;
use crate::execution::observer::ZygoteRestart;
use crate::execution::pool::Slot;
use crate::execution::sandbox::stage_exec::ExecSpec;
use crate::execution::stage::{RunContext, Spawned, rlimits, start_stage};
use crate::runtimes::{Runtime, resolve_command};

/// A bubblewrap sandbox set up ahead of the stage it will run (see `stage_exec.rs`).
pub(super) struct PreparedSandbox {
    pub(super) spawned: Spawned,
    /// What it waits for.
    pub(super) waiting: Waiting,
    /// Read end of the pipe the helper reports the stage's wait status on (a zygote's
    /// runs each have their own).
    pub(super) status: Option<OwnedFd>,
    /// The runtime paths bound into it: a runtime needing others gets a fresh sandbox.
    pub(super) binds: Vec<PathBuf>,
}

pub(super) enum Waiting {
    /// The helper waits for any stage's command on this pipe.
    Command(OwnedFd),
    /// A started interpreter of `runtime` waits for its program on `request` (see
    /// `warm.rs`); it suits only that runtime, as loaded then (a reload makes a new one).
    Warm {
        runtime: Arc<Runtime>,
        request: OwnedFd,
    },
    /// A fork server of `runtime` (as loaded then) serving runs on `control`, until it has
    /// served its share or grown too old (see `zygote.rs`).
    Zygote(ZygoteState),
}

/// A running zygote, as its slot keeps it (see `zygote.rs`).
pub(crate) struct ZygoteState {
    pub(super) runtime: Arc<Runtime>,
    pub(super) control: OwnedFd,
    pub(super) runs: u64,
    pub(super) started: std::time::Instant,
    pub(super) max_runs: u64,
    pub(super) max_age: std::time::Duration,
}

impl ZygoteState {
    /// Whether it may serve `runtime`'s next run.
    pub(super) fn serves(&self, runtime: &Arc<Runtime>) -> bool {
        Arc::ptr_eq(&self.runtime, runtime) && self.worn_out().is_none()
    }

    /// Why it must be replaced now, if it must: the reason `mde_zygote_restarts_total`
    /// counts.
    pub(super) fn worn_out(&self) -> Option<ZygoteRestart> {
        if self.runs >= self.max_runs {
            Some(ZygoteRestart::MaxRuns)
        } else if self.started.elapsed() >= self.max_age {
            Some(ZygoteRestart::MaxAge)
        } else {
            None
        }
    }
}

impl PreparedSandbox {
    /// End it unused, and wait for that, so the slot's launcher is free again.
    pub(super) async fn discard(
        self,
        cgroup: Option<&crate::execution::pool::cgroup::MemoryCgroup>,
    ) {
        // Closing the pipe unread makes the waiting program exit; the kill makes sure.
        drop(self.waiting);
        self.spawned.discard(cgroup).await;
    }

    pub(super) fn is_warm(&self) -> bool {
        matches!(self.waiting, Waiting::Warm { .. })
    }

    pub(super) fn is_zygote(&self) -> bool {
        matches!(self.waiting, Waiting::Zygote(_))
    }

    pub(super) fn suits(&mut self, runtime: &Arc<Runtime>) -> bool {
        let waits_for_it = match &self.waiting {
            Waiting::Command(_) => true,
            Waiting::Warm { runtime: warm, .. } => Arc::ptr_eq(warm, runtime),
            Waiting::Zygote(z) => z.serves(runtime),
        };
        waits_for_it
            && runtime.backend == BackendKind::Bwrap
            && runtime.ro_binds.iter().all(|b| self.binds.contains(b))
            && !self.spawned.has_exited()
    }
}

impl Executor {
    /// Set up a sandbox in slot `index` that waits for its next stage (best effort).
    pub(super) async fn prepare_sandbox(&self, index: usize) {
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
            .with_slot_state(index, |s| s.warm_for.clone())
            .flatten();
        match self.start_prepared(slot, binds, warm).await {
            Ok(prepared) => {
                self.with_slot_state(index, |s| s.prepared = Some(prepared));
            }
            Err(e) => tracing::warn!(error = %e, "cannot start a prepared sandbox"),
        }
    }

    /// Start a bubblewrap sandbox on `slot`'s dirs whose helper waits for a stage's command,
    /// or, with `warm`, has already started that runtime's interpreter waiting for a program.
    pub(super) async fn start_prepared(
        &self,
        slot: &Slot,
        binds: Vec<PathBuf>,
        warm: Option<Arc<Runtime>>,
    ) -> Result<PreparedSandbox, ExecutorError> {
        let (Some(bwrap), Some(helper)) = (&self.bwrap, &self.helper) else {
            return Err(ExecutorError::NoPreparedSandboxes);
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
            status: Some(prepared.status),
            binds,
        };
        // Written once the helper runs (a pipe holds only so much before it is read).
        if let Some((control, json)) = warm_command
            && !hand_over(control, json).await
        {
            sandbox.discard(slot.cgroup.as_ref()).await;
            return Err(ExecutorError::HandOverFailed);
        }
        Ok(sandbox)
    }

    /// The helper's command that starts `runtime`'s interpreter waiting on `fd`, under the
    /// runtime's maximum limits (the interpreter lowers them per request).
    pub(super) fn warm_spec(
        &self,
        runtime: &Runtime,
        slot: &Slot,
        fd: std::ffi::c_int,
    ) -> Result<Vec<u8>, ExecutorError> {
        let kind = runtime
            .warm
            .ok_or_else(|| ExecutorError::NotWarm(runtime.name.clone()))?;
        let mut argv = warm_command(kind, Bootstrap::Warm, &runtime.run, fd).into_iter();
        let program = argv.next().unwrap_or_default();
        let program = resolve_command(&program, &self.sandbox_path)
            .ok_or_else(|| ExecutorError::NotInstalled(program.clone()))?;
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
        Ok(serde_json::to_vec(&spec)?)
    }

    /// End a prepared sandbox that will not be used, and wait for it, so the slot's
    /// launcher is free and no reply of it is left unread.
    pub(super) async fn discard(&self, prepared: Option<PreparedSandbox>, index: usize) {
        if let Some(prepared) = prepared {
            let cgroup = self.slots.slots.get(index).and_then(|s| s.cgroup.as_ref());
            prepared.discard(cgroup).await;
        }
    }

    /// Take slot `index`'s prepared sandbox if it suits `runtime`; discard it otherwise (a
    /// slot's launcher serves one sandbox at a time).
    pub(super) async fn take_prepared(
        &self,
        index: usize,
        runtime: &Arc<Runtime>,
    ) -> Option<PreparedSandbox> {
        let taken = self.with_slot_state(index, |s| s.prepared.take())?;
        let mut prepared = taken?;
        if prepared.suits(runtime) {
            return Some(prepared);
        }
        // A zygote of this runtime that cannot serve is being replaced; one of another
        // runtime just gives way.
        if let Waiting::Zygote(zygote) = &prepared.waiting {
            let reason = match zygote.worn_out() {
                Some(reason) => Some(reason),
                None if prepared.spawned.has_exited() => Some(ZygoteRestart::Died),
                None => None,
            };
            if let Some(reason) = reason.filter(|_| Arc::ptr_eq(&zygote.runtime, runtime)) {
                self.zygote_replaced(zygote, reason);
            }
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
}

/// Write `bytes` to what waits in a prepared sandbox, in a blocking task: a large command
/// may not fit the pipe at once, and the reader reads while we write. False if it failed.
pub(super) async fn hand_over(pipe: OwnedFd, bytes: Vec<u8>) -> bool {
    let written = tokio::task::spawn_blocking(move || {
        std::io::Write::write_all(&mut std::fs::File::from(pipe), &bytes)
    })
    .await;
    matches!(written, Ok(Ok(())))
}

/// The helper's command: `program` and `args`, the sandbox's environment plus the
/// runtime's, and the stage's rlimits.
pub(super) fn exec_spec(
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
        env: crate::execution::sandbox::sandboxed_env(sandbox_path, runtime_env)
            .iter()
            .map(|(k, v)| (bytes(k), bytes(v)))
            .collect(),
        rlimits: rlimits(ctx),
    }
}
