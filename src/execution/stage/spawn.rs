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
use crate::execution::sandbox::zygote::{STATUS_LEN, Status};

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
    /// Forked by a slot's zygote: the run's init reports on the status pipe once the run's
    /// namespace is empty. Killing it means killing the zygote's whole sandbox (everything
    /// in the slot's cgroup but the launcher): the slot then starts a new zygote.
    Zygote {
        status: pipe::Receiver,
        received: Vec<u8>,
        /// `Some` once the pipe was read to its end: the status, if the init sent one.
        result: Option<Option<Exit>>,
        killed: bool,
        launcher_pid: Option<u32>,
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
            ExitWatch::Zygote { result, .. } => result.is_some(),
        }
    }

    /// For a long-lived process whose output is no run's (a zygote): its stdin closed, and
    /// what it writes logged as `what`, a line at a time, a few kilobytes at most.
    pub(crate) fn log_output(&mut self, what: String) {
        drop(self.stdin.take());
        for pipe in [self.stdout.take(), self.stderr.take()]
            .into_iter()
            .flatten()
        {
            let what = what.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(pipe).lines();
                let mut budget = 8192usize;
                while let Ok(Some(line)) = lines.next_line().await {
                    if budget > 0 {
                        budget = budget.saturating_sub(line.len());
                        tracing::warn!(process = %what, output = %line, "a zygote wrote");
                    }
                }
            });
        }
    }

    /// A zygote run's status pipe (where its init first says it has set the run up).
    pub(crate) fn zygote_status(&mut self) -> Option<&mut pipe::Receiver> {
        match &mut self.exit_watch {
            ExitWatch::Zygote { status, .. } => Some(status),
            _ => None,
        }
    }

    /// A run forked by a zygote: its stdio pipes and the pipe its init reports on.
    pub(crate) fn from_zygote(
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
        status: pipe::Receiver,
        launcher_pid: Option<u32>,
    ) -> std::io::Result<Spawned> {
        let watch = ExitWatch::Zygote {
            status,
            received: Vec::new(),
            result: None,
            killed: false,
            launcher_pid,
        };
        // No pid of ours: the run lives in namespaces below the zygote's.
        Spawned::with_pipes(0, watch, Some(stdin), Some(stdout), Some(stderr))
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
            ExitWatch::Zygote {
                status,
                received,
                result,
                ..
            } => {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; STATUS_LEN];
                while result.is_none() {
                    // Cancel-safe: bytes are kept only once a read has completed.
                    match status.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            *result = Some(Status::decode(received).map(|s| Exit {
                                status: s.wait_status,
                                cpu: Duration::from_micros(s.cpu_us),
                                maxrss_kb: s.maxrss_kb,
                            }));
                        }
                        Ok(n) => received.extend_from_slice(&buf[..n]),
                    }
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
            ExitWatch::Zygote {
                killed,
                launcher_pid,
                ..
            } => {
                *killed = true;
                if let Some(cg) = cgroup {
                    cg.kill_all(*launcher_pid);
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
        if let ExitWatch::Zygote { .. } = &self {
            // The status pipe ends with the init (or with the zygote's sandbox, killed).
            if tokio::time::timeout(LAUNCHER_REPORT_GRACE, self.exited())
                .await
                .is_err()
            {
                tracing::error!("a zygote's run did not report its end; killing the zygote");
                self.kill(pid, cgroup).await;
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
            ExitWatch::Zygote { result, killed, .. } => match result.flatten() {
                Some(exit) => Some(exit),
                // Killed by us before its init could report: it died of that SIGKILL.
                None if killed => Some(Exit {
                    status: libc::SIGKILL,
                    cpu: Duration::ZERO,
                    maxrss_kb: 0,
                }),
                None => None,
            },
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
