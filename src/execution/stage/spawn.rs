//! Starting a stage's process, forked by the daemon (the child joins the slot's cgroups
//! itself) or by the slot's launcher (already inside them), and watching for its exit
//! without reaping it early, so its process group id stays ours until we kill it.

use std::ffi::c_int;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::unix::pipe;

use super::{RunContext, StageError, rlimits};
use crate::execution::pool::cgroup::MemoryCgroup;
use crate::execution::pool::launcher::{Launcher, LauncherError, SpawnSpec, StageEnd};
use crate::execution::sandbox::SandboxCommand;
use crate::execution::sandbox::child::{MAX_PASS_FDS, pipe_pair, prepare_child};

/// How long a launcher may take to report a stage's end once its tree is dead or killed.
const LAUNCHER_REPORT_GRACE: Duration = Duration::from_secs(10);

/// How the stage ended: wait status, CPU time of the reaped tree, largest RSS.
pub(super) struct Exit {
    pub(super) status: c_int,
    pub(super) cpu: Duration,
    pub(super) maxrss_kb: u64,
}

/// A started stage: its pid, the parent's ends of its pipes, and how to watch its exit.
pub(crate) struct Spawned {
    pub(super) pid: libc::pid_t,
    pub(super) stdin: Option<pipe::Sender>,
    pub(super) stdout: Option<pipe::Receiver>,
    pub(super) stderr: Option<pipe::Receiver>,
    pub(super) exit_watch: ExitWatch,
}

pub(super) enum ExitWatch {
    /// Forked by the daemon: a blocking thread waits for the exit without reaping it.
    Direct { waiter: tokio::task::JoinHandle<()> },
    /// Forked by the slot's launcher, which kills, reaps and reports.
    Launched {
        launcher: Arc<Launcher>,
        pid: libc::pid_t,
        result: Option<Result<StageEnd, LauncherError>>,
    },
}

impl Spawned {
    /// Whether the stage's process has already exited (without waiting).
    pub(crate) fn has_exited(&mut self) -> bool {
        match &mut self.exit_watch {
            ExitWatch::Direct { waiter } => waiter.is_finished(),
            ExitWatch::Launched {
                launcher,
                pid,
                result,
            } => {
                if result.is_none() {
                    *result = launcher.try_exited(*pid);
                }
                result.is_some()
            }
        }
    }

    /// Kill it and wait for it to be gone (for a prepared sandbox that is not used).
    pub(crate) async fn discard(mut self, cgroup: Option<&MemoryCgroup>) {
        self.exit_watch.kill(self.pid, cgroup).await;
        let _ = self.exit_watch.finish(self.pid, cgroup).await;
    }
}

impl ExitWatch {
    /// Resolves when the stage's leader has exited (cancel-safe).
    pub(super) async fn exited(&mut self) {
        match self {
            ExitWatch::Direct { waiter } => {
                if !waiter.is_finished() {
                    let _ = waiter.await;
                }
            }
            ExitWatch::Launched {
                launcher,
                pid,
                result,
            } => {
                if result.is_none() {
                    *result = Some(launcher.exited(*pid).await);
                }
            }
        }
    }

    /// SIGKILL the stage's whole tree now.
    pub(super) async fn kill(&mut self, pid: libc::pid_t, cgroup: Option<&MemoryCgroup>) {
        match self {
            ExitWatch::Direct { .. } => {
                // SAFETY: kill(2) has no memory-safety preconditions. The leader is not
                // reaped yet (we reap in `finish`), so the group id cannot have been reused.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                if let Some(cg) = cgroup {
                    cg.kill_all(None);
                }
            }
            ExitWatch::Launched { launcher, .. } => {
                launcher.kill().await;
                if let Some(cg) = cgroup {
                    cg.kill_all(launcher.pid());
                }
            }
        }
    }

    /// Wait for the end, kill any leftovers, reap, and collect the exit.
    pub(super) async fn finish(
        mut self,
        pid: libc::pid_t,
        cgroup: Option<&MemoryCgroup>,
    ) -> Option<Exit> {
        if let ExitWatch::Launched { launcher, .. } = &self {
            // The stage is dead or being killed; a launcher that still has not reported is
            // wedged: end it (the slot starts a new one) rather than hold the slot forever.
            let launcher = Arc::clone(launcher);
            if tokio::time::timeout(LAUNCHER_REPORT_GRACE, self.exited())
                .await
                .is_err()
            {
                tracing::error!("a slot launcher did not report a stage's end; restarting it");
                launcher.terminate();
                if let Some(cg) = cgroup {
                    cg.kill_all(None);
                }
                return None;
            }
        }
        self.exited().await;
        match self {
            ExitWatch::Direct { .. } => {
                // Background children of a finished program must not linger either.
                // SAFETY: as in `kill`; the leader is a zombie until `reap` below.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                if let Some(cg) = cgroup {
                    cg.kill_all(None);
                }
                reap(pid).await
            }
            ExitWatch::Launched {
                launcher, result, ..
            } => {
                if let Some(cg) = cgroup.filter(|cg| !cg.is_empty(launcher.pid())) {
                    cg.kill_all(launcher.pid());
                }
                match result {
                    Some(Ok(end)) => Some(Exit {
                        status: end.status,
                        cpu: Duration::from_micros(end.cpu_us),
                        maxrss_kb: end.maxrss_kb,
                    }),
                    _ => None,
                }
            }
        }
    }
}

impl Spawned {
    /// The started stage with the parent's ends of its pipes, made async.
    fn with_pipes(
        pid: libc::pid_t,
        exit_watch: ExitWatch,
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
    ) -> std::io::Result<Spawned> {
        Ok(Spawned {
            pid,
            stdin: stdin.map(pipe::Sender::from_owned_fd).transpose()?,
            stdout: stdout.map(pipe::Receiver::from_owned_fd).transpose()?,
            stderr: stderr.map(pipe::Receiver::from_owned_fd).transpose()?,
            exit_watch,
        })
    }
}

/// Fork from the daemon. The child joins the slot's cgroups itself (costly on cgroup v1,
/// which is why slots with cgroups use a launcher when one is available).
pub(super) fn direct(cmd: SandboxCommand, ctx: &RunContext<'_>) -> Result<Spawned, StageError> {
    let mut cgroup_procs = Vec::new();
    for path in ctx
        .cgroup
        .map(MemoryCgroup::all_procs_paths)
        .unwrap_or_default()
    {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|source| StageError::Io {
                what: "opening the slot's cgroup.procs",
                source,
            })?;
        cgroup_procs.push(file);
    }
    let mut command = std::process::Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .env_clear()
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cmd.cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let limits_list = rlimits(ctx);
    let cgroup_fds: Vec<c_int> = cgroup_procs.iter().map(AsRawFd::as_raw_fd).collect();
    let pass_fds: Vec<c_int> = cmd.pass_fds.iter().map(AsRawFd::as_raw_fd).collect();
    if pass_fds.len() > MAX_PASS_FDS {
        return Err(StageError::TooManyDescriptors);
    }
    let uid = ctx.uid;
    let oom_score: &'static std::ffi::CStr = if cmd.oom_protected {
        c"-1000"
    } else {
        crate::execution::sandbox::child::STAGE_OOM_SCORE_C
    };
    // SAFETY: the closure runs in the child between fork and exec. It only makes
    // async-signal-safe system calls on memory captured before the fork; no allocation.
    unsafe {
        command.pre_exec(move || {
            // Join the slot's cgroups first, so every later process is inside them.
            crate::execution::sandbox::child::join_cgroups(&cgroup_fds)?;
            // As root, before the uid drop: lowering the score needs the privilege (best
            // effort: without CAP_SYS_RESOURCE the stage's raised score does the job).
            let _ = crate::execution::sandbox::child::set_oom_score_adj(oom_score);
            let mut scratch = [0 as c_int; MAX_PASS_FDS];
            prepare_child(&pass_fds, &mut scratch, &limits_list, uid)
        });
    }
    let mut child = command.spawn().map_err(|source| StageError::Start {
        program: cmd.program.clone(),
        source,
    })?;
    let pid = child.id() as libc::pid_t;
    let (stdin, stdout, stderr) = (
        child.stdin.take().map(OwnedFd::from),
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    );
    // Wait for exit without reaping, so the process group id stays ours until we kill it.
    let waiter = tokio::task::spawn_blocking(move || wait_exited(pid));
    let watch = ExitWatch::Direct { waiter };
    match Spawned::with_pipes(pid, watch, stdin, stdout, stderr) {
        Ok(spawned) => Ok(spawned),
        Err(e) => {
            // SAFETY: as in ExitWatch::kill.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            Err(StageError::Io {
                what: "setting up pipes",
                source: e,
            })
        }
    }
}

/// Have the slot's launcher fork the stage inside the slot's cgroups.
pub(super) async fn launched(
    launcher: Arc<Launcher>,
    cmd: SandboxCommand,
    ctx: &RunContext<'_>,
) -> Result<Spawned, StageError> {
    if cmd.pass_fds.len() > MAX_PASS_FDS {
        return Err(StageError::TooManyDescriptors);
    }
    let pipe = || {
        pipe_pair().map_err(|source| StageError::Io {
            what: "pipe2",
            source,
        })
    };
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    let mut fds = vec![
        stdin_r.as_raw_fd(),
        stdout_w.as_raw_fd(),
        stderr_w.as_raw_fd(),
    ];
    fds.extend(cmd.pass_fds.iter().map(AsRawFd::as_raw_fd));
    let bytes = |s: &std::ffi::OsStr| s.as_encoded_bytes().to_vec();
    let spec = SpawnSpec {
        program: bytes(cmd.program.as_os_str()),
        args: cmd.args.iter().map(|a| bytes(a)).collect(),
        env: cmd.env.iter().map(|(k, v)| (bytes(k), bytes(v))).collect(),
        cwd: bytes(cmd.cwd.as_os_str()),
        rlimits: rlimits(ctx),
        uid: ctx.uid,
        oom_protected: cmd.oom_protected,
    };
    let pid = launcher.spawn(spec, &fds).await?;
    // The child has its copies now; ours of its ends must close so EOF can arrive.
    drop((stdin_r, stdout_w, stderr_w, cmd.pass_fds));
    let watch = ExitWatch::Launched {
        launcher: Arc::clone(&launcher),
        pid,
        result: None,
    };
    match Spawned::with_pipes(pid, watch, Some(stdin_w), Some(stdout_r), Some(stderr_r)) {
        Ok(spawned) => Ok(spawned),
        Err(e) => {
            launcher.kill().await;
            Err(StageError::Io {
                what: "setting up pipes",
                source: e,
            })
        }
    }
}

/// Block until `pid` has exited, leaving it a zombie.
fn wait_exited(pid: libc::pid_t) {
    crate::execution::sandbox::child::exited_unreaped(pid, true);
}

/// Reap `pid` and collect its resource usage.
async fn reap(pid: libc::pid_t) -> Option<Exit> {
    tokio::task::spawn_blocking(move || {
        loop {
            let mut status: c_int = 0;
            // SAFETY: both out-pointers are valid for the duration of the call.
            let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
            let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
            if ret == pid {
                let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
                return Some(Exit {
                    status,
                    cpu: tv(rusage.ru_utime) + tv(rusage.ru_stime),
                    maxrss_kb: rusage.ru_maxrss as u64,
                });
            }
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return None;
            }
        }
    })
    .await
    .ok()
    .flatten()
}
