//! Zygotes in the executor: a slot whose last run was of a `zygote` runtime keeps that
//! runtime's fork server (see `sandbox/zygote`) as its resident sandbox, in place of a
//! prepared one, and hands it run after run without settling or resetting the slot
//! between them (each run has its own namespaces and tmpfs, and its init empties its pid
//! namespace before it reports).
//!
//! A zygote is replaced, off the request's path, when it has served `zygote_max_runs` runs
//! or is `zygote_max_age_secs` old, when a run of it had to be killed (a kill takes the
//! zygote's whole sandbox with it), when it holds more than a quarter of a run's memory
//! limit, and when it dies or stops answering. A run it cannot take (the zygote is dead,
//! hangs, or its child cannot set up) starts as if there had been no zygote: nothing of it
//! had been written or run yet.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use super::command::{Placeholders, fill_template};
use super::prepared::{PreparedSandbox, Waiting, ZygoteState, hand_over};
use super::warm::{Bootstrap, warm_command, warmable};
use super::{Executor, ExecutorError};
use crate::config::SandboxSettings;
use crate::execution::ExecutionRequest;
use crate::execution::observer::{StartKind, ZygoteRestart};
use crate::execution::pool::{Slot, SlotPool};
use crate::execution::report::{ExecutionReport, LimitKind};
use crate::execution::sandbox::ZYGOTE_CONTROL_FD;
use crate::execution::sandbox::child::pipe_pair;
use crate::execution::sandbox::zygote::{LIBRARY_FILE, RunRequest, STARTED};
use crate::execution::stage::{RunContext, Spawned, StageStart, rlimits, start_stage, supervise};
use crate::runtimes::{Runtime, resolve_command};

/// How long a zygote may take to have a run's init set up before the run goes elsewhere.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Processes of a zygote's sandbox besides a run's: bubblewrap's outer process and init,
/// the zygote, and the run's init (the run's process limit is on top of these).
const ZYGOTE_PROCESSES: u64 = 4;
/// Of those, the ones its RLIMIT_NPROC counts with the run's (measured: all but
/// bubblewrap's outer process, which runs in the host's user namespace).
const ZYGOTE_PROCESSES_IN_USERNS: u64 = 3;

/// Whether this host can run zygotes, and if not, why (shown by `/health`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZygoteSupport {
    Available { library: PathBuf },
    Unavailable(String),
}

impl ZygoteSupport {
    pub(super) fn detect(
        settings: &SandboxSettings,
        bubblewrap: bool,
        helper: bool,
        slots: &SlotPool,
    ) -> ZygoteSupport {
        let no = |why: &str| ZygoteSupport::Unavailable(why.to_owned());
        if !settings.zygotes {
            return no("turned off by sandbox.zygotes");
        }
        if !cfg!(target_arch = "x86_64") {
            return no("the fork server is built for x86_64 only");
        }
        if !settings.prepare_sandboxes {
            return no("needs sandbox.prepare_sandboxes");
        }
        if !bubblewrap || !helper {
            return no("needs the bubblewrap backend");
        }
        if slots
            .slots
            .iter()
            .any(|s| s.cgroup.is_none() || s.launcher().is_none())
        {
            return no("needs a memory cgroup and a launcher per slot (a daemon running as root)");
        }
        match find_library() {
            Some(library) => ZygoteSupport::Available { library },
            None => ZygoteSupport::Unavailable(format!(
                "the fork-server library {LIBRARY_FILE} is not next to the daemon's binary"
            )),
        }
    }
}

/// The fork-server library next to the daemon's binary, or where cargo leaves it (in
/// `target/debug`, or only in `target/debug/deps` after `cargo test`): the newest found,
/// so a stale copy from an older build is never the one loaded.
fn find_library() -> Option<PathBuf> {
    let exe = crate::execution::pool::launcher::launcher_executable()
        .or_else(|| std::env::current_exe().ok())?;
    let dirs: Vec<PathBuf> = exe.ancestors().skip(1).take(3).map(PathBuf::from).collect();
    dirs.iter()
        .flat_map(|dir| [dir.join(LIBRARY_FILE), dir.join("deps").join(LIBRARY_FILE)])
        .filter_map(|p| {
            let modified = std::fs::metadata(&p).ok()?.modified().ok()?;
            p.is_file().then_some((modified, p))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, p)| p)
}

impl Executor {
    /// Give slot `index` its next resident sandbox: the zygote of the runtime it last ran
    /// when that has one here, else a prepared sandbox (warm or plain).
    pub(super) async fn prepare_slot(&self, index: usize) {
        let warm = self
            .with_slot_state(index, |s| s.warm_for.clone())
            .flatten()
            .filter(|r| self.zygote_serves(r));
        if let (Some(runtime), Some(slot)) = (warm, self.slots.slots.get(index)) {
            match self.start_zygote(slot, &runtime).await {
                Ok(zygote) => {
                    self.with_slot_state(index, |s| s.prepared = Some(zygote));
                    return;
                }
                // A warm interpreter is the fallback.
                Err(e) => {
                    self.observer
                        .zygote_restarted(&runtime.name, ZygoteRestart::StartFailed);
                    tracing::warn!(runtime = %runtime.name, error = %e, "cannot start a zygote");
                    self.note_zygote_start(Some(format!("the zygote of {}: {e}", runtime.name)));
                }
            }
        }
        self.prepare_sandbox(index).await;
    }

    /// Whether `runtime`'s runs are forked from zygotes here.
    pub(crate) fn zygote_serves(&self, runtime: &Runtime) -> bool {
        runtime.zygote
            && warmable(runtime)
            && matches!(self.zygote_support, ZygoteSupport::Available { .. })
    }

    /// Start `runtime`'s zygote in `slot`, in a sandbox of its own on the slot's dirs.
    pub(super) async fn start_zygote(
        &self,
        slot: &Slot,
        runtime: &Arc<Runtime>,
    ) -> Result<PreparedSandbox, ExecutorError> {
        let unavailable = || ExecutorError::NoZygote(runtime.name.clone());
        let ZygoteSupport::Available { library } = &self.zygote_support else {
            return Err(unavailable());
        };
        let (Some(bwrap), Some(cgroup)) = (&self.bwrap, &slot.cgroup) else {
            return Err(unavailable());
        };
        let kind = runtime
            .warm
            .ok_or_else(|| ExecutorError::NotWarm(runtime.name.clone()))?;
        let mut argv = warm_command(kind, Bootstrap::Zygote, &runtime.run, ZYGOTE_CONTROL_FD);
        let program = argv.first().cloned().unwrap_or_default();
        let resolved = resolve_command(&program, &self.sandbox_path)
            .ok_or_else(|| ExecutorError::NotInstalled(program.clone()))?;
        argv[0] = resolved.to_string_lossy().into_owned();
        let (command, control) = bwrap.build_zygote(
            &slot.dir,
            &self.sandbox_path,
            (&runtime.ro_binds, &runtime.env),
            &library.clone(),
            argv,
        )?;
        // Room to start in, whatever the last run's limit was; each run sets its own.
        cgroup.prepare(runtime.max_limits.memory_bytes)?;
        let ctx = RunContext {
            uid: slot.uid,
            cgroup: Some(cgroup),
            // Upper bounds only: every run lowers them to its own.
            limits: runtime.max_limits,
            stdin: &[],
            backend_processes: ZYGOTE_PROCESSES,
            exit_code_encodes_signal: true,
            status_pipe: None,
            launcher: slot.launcher(),
        };
        let mut spawned = start_stage(command, &ctx).await?;
        spawned.log_output(format!("zygote of {}", runtime.name));
        Ok(PreparedSandbox {
            spawned,
            waiting: Waiting::Zygote(ZygoteState {
                runtime: Arc::clone(runtime),
                control,
                runs: 0,
                started: Instant::now(),
                max_runs: self.zygote_max_runs,
                max_age: self.zygote_max_age,
            }),
            status: None,
            binds: runtime.ro_binds.clone(),
        })
    }

    /// Run `request` in slot `index`'s zygote. `Err` when the zygote could not take it
    /// (then nothing of it has run, and the zygote is gone): the caller runs it as usual.
    pub(super) async fn run_in_zygote(
        &self,
        prepared: Option<PreparedSandbox>,
        request: &ExecutionRequest,
        index: usize,
    ) -> Result<ExecutionReport, ()> {
        let Some(mut prepared) = prepared else {
            return Err(());
        };
        let runtime = &request.runtime;
        let limits = request.limits;
        let Some((slot, cgroup)) = self
            .slots
            .slots
            .get(index)
            .and_then(|s| s.cgroup.as_ref().map(|cg| (s, cg)))
        else {
            self.retire_zygote(prepared, index, ZygoteRestart::Died)
                .await;
            return Err(());
        };
        // As for a warm interpreter: a zygote holding more than a quarter of the run's
        // limit goes (lowering the limit under its usage fails on v1, OOM-kills on v2).
        // What earlier runs left in caches is given back first, or it would count.
        cgroup.reclaim_unheld();
        let fits = cgroup
            .usage_bytes()
            .is_some_and(|used| used <= limits.memory_bytes / 4);
        if !fits || cgroup.prepare(limits.memory_bytes).is_err() {
            self.retire_zygote(prepared, index, ZygoteRestart::Memory)
                .await;
            return Err(());
        }
        let Waiting::Zygote(state) = &mut prepared.waiting else {
            return Err(());
        };
        let ctx = RunContext {
            uid: slot.uid,
            cgroup: Some(cgroup),
            limits,
            stdin: &request.stdin,
            backend_processes: ZYGOTE_PROCESSES_IN_USERNS,
            exit_code_encodes_signal: false,
            status_pipe: None,
            launcher: slot.launcher(),
        };
        let launcher_pid = ctx.launcher.as_ref().and_then(|l| l.pid());
        let start = StageStart::now(&ctx);
        let handed = hand_run(&state.control, request, &ctx).await;
        let Some((spawned, request_pipe, encoded)) = handed else {
            self.retire_zygote(prepared, index, ZygoteRestart::Died)
                .await;
            return Err(());
        };
        // The request goes to the run, never through the zygote's memory.
        if !hand_over(request_pipe, encoded).await {
            cgroup.kill_all(launcher_pid);
            self.retire_zygote(prepared, index, ZygoteRestart::Died)
                .await;
            return Err(());
        }
        let Some(spawned) = started(spawned).await else {
            cgroup.kill_all(launcher_pid);
            self.retire_zygote(prepared, index, ZygoteRestart::Died)
                .await;
            return Err(());
        };
        if let Waiting::Zygote(state) = &mut prepared.waiting {
            state.runs += 1;
        }
        self.observer.run_started(&runtime.name, StartKind::Zygote);
        self.note_zygote_start(None);
        let report = supervise(spawned, &ctx, start).await;
        // A run stopped at a limit was stopped by killing the zygote's sandbox.
        let killed = matches!(
            report.limit,
            Some(LimitKind::WallTime | LimitKind::Output | LimitKind::CpuTime)
        );
        let reason = if killed {
            Some(ZygoteRestart::RunKilled)
        } else if prepared.spawned.has_exited() {
            Some(ZygoteRestart::Died)
        } else {
            match &prepared.waiting {
                Waiting::Zygote(state) => state.worn_out(),
                _ => Some(ZygoteRestart::Died),
            }
        };
        match reason {
            None => {
                self.with_slot_state(index, |s| {
                    s.prepared = Some(prepared);
                    s.zygote_kept = true;
                });
            }
            Some(reason) => self.retire_zygote(prepared, index, reason).await,
        }
        Ok(ExecutionReport {
            compile: None,
            run: Some(report),
            compile_cached: false,
        })
    }

    /// End a zygote (its slot is then settled and reset, and starts a new one).
    async fn retire_zygote(&self, zygote: PreparedSandbox, index: usize, reason: ZygoteRestart) {
        if let Waiting::Zygote(state) = &zygote.waiting {
            self.zygote_replaced(state, reason);
        }
        self.discard(Some(zygote), index).await;
    }
}

/// Send the zygote the descriptors of one run. Returns the run (its stdio and status
/// pipes) and what to write on its request pipe; `None` if the zygote is gone.
async fn hand_run(
    control: &OwnedFd,
    request: &ExecutionRequest,
    ctx: &RunContext<'_>,
) -> Option<(Spawned, OwnedFd, Vec<u8>)> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let (request_r, request_w) = pipe_pair().ok()?;
    let (status_r, status_w) = pipe_pair().ok()?;
    let (stdin_r, stdin_w) = pipe_pair().ok()?;
    let (stdout_r, stdout_w) = pipe_pair().ok()?;
    let (stderr_r, stderr_w) = pipe_pair().ok()?;
    let fds = [
        request_r.as_raw_fd(),
        status_w.as_raw_fd(),
        stdin_r.as_raw_fd(),
        stdout_w.as_raw_fd(),
        stderr_w.as_raw_fd(),
    ];
    let byte = [b'r'];
    let iov = [std::io::IoSlice::new(&byte)];
    // The zygote reads its socket as soon as it is idle, and holds one message at most:
    // this never blocks for long. MSG_NOSIGNAL: a dead zygote is an error, not a SIGPIPE.
    sendmsg::<()>(
        control.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        None,
    )
    .ok()?;
    // The run's init has them now; ours must close so the pipes can reach EOF.
    drop((request_r, status_w, stdin_r, stdout_w, stderr_w));
    let runtime = &request.runtime;
    // The program's own argv, from `{file}` on, as a warm interpreter gets it.
    let mut argv = fill_template(
        &runtime.run,
        &Placeholders {
            entry: &request.entry,
            class: request.main_class().as_deref(),
            memory_bytes: request.limits.memory_bytes,
        },
    );
    argv.extend(request.args.iter().cloned());
    let program_argv = runtime
        .run
        .iter()
        .position(|a| a == "{file}")
        .and_then(|at| argv.get(at..))
        .map(<[String]>::to_vec)
        .unwrap_or_default();
    let encoded = RunRequest {
        workdir_bytes: ctx.limits.workdir_bytes,
        rlimits: rlimits(ctx),
        argv: program_argv.into_iter().map(String::into_bytes).collect(),
        files: request
            .files
            .iter()
            .map(|f| (f.name.clone().into_bytes(), f.content.clone()))
            .collect(),
    }
    .encode();
    let status = pipe::Receiver::from_owned_fd(status_r).ok()?;
    let launcher_pid = ctx.launcher.as_ref().and_then(|l| l.pid());
    let spawned = Spawned::from_zygote(stdin_w, stdout_r, stderr_r, status, launcher_pid).ok()?;
    Some((spawned, request_w, encoded))
}

/// Wait for the run's init to say the run is set up; the run, ready to supervise, or
/// `None` if it failed or did not answer in time.
async fn started(mut spawned: Spawned) -> Option<Spawned> {
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(START_TIMEOUT, spawned.zygote_status()?.read(&mut byte));
    match read.await {
        Ok(Ok(1)) if &byte == STARTED => Some(spawned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bootstrap_loads_the_library_where_the_sandbox_binds_it() {
        let run = ["python3", "{file}"].map(String::from);
        let argv = super::warm_command(
            crate::runtimes::WarmKind::Python,
            super::Bootstrap::Zygote,
            &run,
            10,
        );
        assert!(argv[2].contains(crate::execution::sandbox::zygote::LIBRARY_PATH));
    }
}
