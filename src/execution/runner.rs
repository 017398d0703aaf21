//! The shared runner: spawn a built command under the stage's limits, feed stdin, read capped
//! stdout/stderr, enforce the wall clock, kill the whole tree, and collect exit, usage and
//! peak memory. Every backend goes through here, so every backend gets the same enforcement.

use std::ffi::c_int;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{Notify, watch};

use super::Limits;
use super::cgroup::MemoryCgroup;
use super::report::{LimitKind, StageReport, StageStatus};
use super::sandbox::SandboxCommand;

/// How long pipes may stay open after the stage's process tree is gone or killed.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Everything about the slot and stage that the runner enforces.
pub(crate) struct RunContext<'a> {
    /// Run as this uid/gid (the slot's own), when the daemon is root.
    pub(crate) uid: Option<u32>,
    pub(crate) cgroup: Option<&'a MemoryCgroup>,
    pub(crate) limits: Limits,
    pub(crate) stdin: &'a [u8],
    /// Processes the backend itself needs under the same uid (bubblewrap's two).
    pub(crate) backend_processes: u64,
    /// bubblewrap reports a signal death as exit code 128 + signal.
    pub(crate) exit_code_encodes_signal: bool,
}

#[derive(Clone, Copy)]
struct Rlimit {
    resource: libc::__rlimit_resource_t,
    soft: u64,
    hard: u64,
}

fn rlimits(ctx: &RunContext<'_>) -> Vec<Rlimit> {
    let l = &ctx.limits;
    let cpu_seconds = l.cpu_time_ms.div_ceil(1000).max(1);
    let mut out = vec![
        // SIGXCPU at the soft limit, SIGKILL one second later if it is ignored.
        Rlimit {
            resource: libc::RLIMIT_CPU,
            soft: cpu_seconds,
            hard: cpu_seconds + 1,
        },
        Rlimit {
            resource: libc::RLIMIT_FSIZE,
            soft: l.file_size_bytes,
            hard: l.file_size_bytes,
        },
        Rlimit {
            resource: libc::RLIMIT_NOFILE,
            soft: l.open_files,
            hard: l.open_files,
        },
        Rlimit {
            resource: libc::RLIMIT_CORE,
            soft: 0,
            hard: 0,
        },
    ];
    // RLIMIT_NPROC counts every process of the uid, so it only means "this run's processes"
    // when the run has a uid of its own; the kernel also ignores it for root.
    if ctx.uid.is_some() {
        let n = l.processes + ctx.backend_processes;
        out.push(Rlimit {
            resource: libc::RLIMIT_NPROC,
            soft: n,
            hard: n,
        });
    }
    // Without a memory cgroup, fall back to the address-space limit.
    if ctx.cgroup.is_none() {
        out.push(Rlimit {
            resource: libc::RLIMIT_AS,
            soft: l.memory_bytes,
            hard: l.memory_bytes,
        });
    }
    out
}

/// Format `n` into `buf` without allocating (we are between fork and exec).
fn format_pid(mut n: u32, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

fn check(ret: c_int) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

struct Exit {
    status: c_int,
    rusage: libc::rusage,
}

/// Run one stage to completion. Never panics; spawn failures become `InternalError`.
pub(crate) async fn run_stage(cmd: SandboxCommand, ctx: RunContext<'_>) -> StageReport {
    let limits = ctx.limits;
    let mut cgroup_procs = Vec::new();
    for path in ctx
        .cgroup
        .map(MemoryCgroup::all_procs_paths)
        .unwrap_or_default()
    {
        match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(f) => cgroup_procs.push(f),
            Err(e) => {
                return StageReport::internal(format!("opening {}: {e}", path.display()), limits);
            }
        }
    }
    let oom_before = ctx.cgroup.map(MemoryCgroup::oom_kills).unwrap_or(0);
    let cpu_before = ctx.cgroup.and_then(MemoryCgroup::cpu_usage);

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
    let limits_list = rlimits(&ctx);
    let cgroup_fds: Vec<c_int> = cgroup_procs.iter().map(AsRawFd::as_raw_fd).collect();
    let pass_fds: Vec<c_int> = cmd.pass_fds.iter().map(AsRawFd::as_raw_fd).collect();
    let uid = ctx.uid;
    // SAFETY: the closure runs in the child between fork and exec. It only makes
    // async-signal-safe system calls and touches memory captured before the fork; it does
    // not allocate.
    unsafe {
        command.pre_exec(move || {
            // 1. Join the slot's memory cgroup first, so every later process is inside it.
            let mut buf = [0u8; 16];
            let pid = format_pid(libc::getpid() as u32, &mut buf);
            for &fd in &cgroup_fds {
                if libc::write(fd, pid.as_ptr().cast(), pid.len()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // 2. Descriptors the backend hands to the child (seccomp programs).
            for &fd in &pass_fds {
                check(libc::fcntl(fd, libc::F_SETFD, 0))?;
            }
            // 3. Limits, for this process and everything it starts.
            for l in &limits_list {
                let rl = libc::rlimit {
                    rlim_cur: l.soft,
                    rlim_max: l.hard,
                };
                check(libc::setrlimit(l.resource, &rl))?;
            }
            // 4. Drop to the slot's uid: never run submissions as host root.
            if let Some(uid) = uid {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(uid))?;
                check(libc::setuid(uid))?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            // If the daemon dies, so does the stage (set after setuid, which clears it).
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            Ok(())
        });
    }

    let started = Instant::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return StageReport::internal(
                format!("cannot start `{}`: {e}", cmd.program.display()),
                limits,
            );
        }
    };
    drop(cgroup_procs);
    drop(cmd.pass_fds);
    let pid = child.id() as libc::pid_t;

    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let pipes = (|| -> std::io::Result<_> {
        Ok((
            stdin
                .map(|s| pipe::Sender::from_owned_fd(OwnedFd::from(s)))
                .transpose()?,
            stdout
                .map(|s| pipe::Receiver::from_owned_fd(OwnedFd::from(s)))
                .transpose()?,
            stderr
                .map(|s| pipe::Receiver::from_owned_fd(OwnedFd::from(s)))
                .transpose()?,
        ))
    })();
    let (stdin, stdout, stderr) = match pipes {
        Ok(p) => p,
        Err(e) => {
            kill_tree(pid, ctx.cgroup);
            let _ = reap(pid).await;
            return StageReport::internal(format!("setting up pipes: {e}"), limits);
        }
    };

    let overflow = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let cap = usize::try_from(limits.output_bytes).unwrap_or(usize::MAX);
    let out_task = tokio::spawn(read_capped(
        stdout,
        cap,
        Arc::clone(&overflow),
        stop_rx.clone(),
    ));
    let err_task = tokio::spawn(read_capped(stderr, cap, Arc::clone(&overflow), stop_rx));
    let stdin_data = ctx.stdin.to_vec();
    let in_task = tokio::spawn(async move {
        if let Some(mut tx) = stdin {
            // A program that never reads stdin, or closes it early, is not an error.
            let _ = tx.write_all(&stdin_data).await;
        }
    });

    // Wait for exit without reaping, so the process group id stays ours until we kill it.
    let mut waiter = tokio::task::spawn_blocking(move || wait_exited(pid));
    let wall = Duration::from_millis(limits.wall_time_ms);
    let mut limit_hit = None;
    tokio::select! {
        _ = &mut waiter => {}
        _ = tokio::time::sleep(wall) => limit_hit = Some(LimitKind::WallTime),
        _ = overflow.notified() => limit_hit = Some(LimitKind::Output),
    }
    // Always kill what is left: background children of a finished program must not linger.
    kill_tree(pid, ctx.cgroup);
    if !waiter.is_finished() {
        let _ = (&mut waiter).await;
    }
    let exit = reap(pid).await;
    let wall_time = started.elapsed();
    in_task.abort();

    // The tree is dead; give the pipes a moment to drain, then stop reading.
    let drain = async {
        let out = out_task.await.unwrap_or_default();
        let err = err_task.await.unwrap_or_default();
        (out, err)
    };
    tokio::pin!(drain);
    let ((stdout, stdout_truncated), (stderr, stderr_truncated)) =
        match tokio::time::timeout(DRAIN_GRACE, &mut drain).await {
            Ok(r) => r,
            Err(_) => {
                let _ = stop_tx.send(true);
                drain.await
            }
        };
    if ctx.cgroup.is_some_and(|cg| !cg.is_empty()) {
        ctx.cgroup.map(MemoryCgroup::kill_all);
    }

    let Some(exit) = exit else {
        return StageReport::internal("lost track of the stage's process", limits);
    };
    let (mut exit_code, mut signal) = decode_status(exit.status);
    if ctx.exit_code_encodes_signal {
        if let Some(code) = exit_code.filter(|c| (129..=128 + 64).contains(c)) {
            exit_code = None;
            signal = Some(code - 128);
        }
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    // The cgroup sees every process of the run; rusage only those reaped up the chain.
    let cpu_time = match (cpu_before, ctx.cgroup.and_then(MemoryCgroup::cpu_usage)) {
        (Some(before), Some(after)) => after.saturating_sub(before),
        _ => tv(exit.rusage.ru_utime) + tv(exit.rusage.ru_stime),
    };
    let peak_memory_bytes = ctx
        .cgroup
        .and_then(MemoryCgroup::peak_bytes)
        .or(Some(exit.rusage.ru_maxrss as u64 * 1024));
    let oom_killed = ctx.cgroup.is_some_and(|cg| cg.oom_kills() > oom_before);

    if limit_hit.is_none() {
        limit_hit = if oom_killed {
            Some(LimitKind::Memory)
        } else if signal == Some(libc::SIGXCPU)
            || (signal == Some(libc::SIGKILL)
                && cpu_time.as_millis() as u64 >= limits.cpu_time_ms.div_ceil(1000) * 1000)
        {
            Some(LimitKind::CpuTime)
        } else if signal == Some(libc::SIGXFSZ) {
            Some(LimitKind::FileSize)
        } else {
            None
        };
    }
    let status = match limit_hit {
        Some(LimitKind::Output) => StageStatus::OutputLimit,
        Some(LimitKind::WallTime | LimitKind::CpuTime) => StageStatus::Timeout,
        Some(LimitKind::Memory) => StageStatus::MemoryLimit,
        Some(LimitKind::FileSize) => StageStatus::RuntimeError,
        None if exit_code == Some(0) => StageStatus::Ok,
        None => StageStatus::RuntimeError,
    };
    StageReport {
        status,
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        exit_code,
        signal,
        limit: limit_hit,
        wall_time,
        cpu_time: Some(cpu_time),
        peak_memory_bytes,
        limits,
        message: None,
    }
}

/// Read at most `cap` bytes; past that, flag truncation and tell the runner to kill.
async fn read_capped(
    rx: Option<pipe::Receiver>,
    cap: usize,
    overflow: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) -> (Vec<u8>, bool) {
    let Some(mut rx) = rx else {
        return (Vec::new(), false);
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = rx.read(&mut buf) => match read {
                Ok(0) | Err(_) => return (out, false),
                Ok(n) => {
                    let room = cap.saturating_sub(out.len());
                    if n > room {
                        out.extend_from_slice(&buf[..room]);
                        overflow.notify_one();
                        return (out, true);
                    }
                    out.extend_from_slice(&buf[..n]);
                }
            },
            _ = stop.changed() => return (out, false),
        }
    }
}

/// SIGKILL the stage's process group and everything in its cgroup.
fn kill_tree(pid: libc::pid_t, cgroup: Option<&MemoryCgroup>) {
    // SAFETY: kill(2) has no memory-safety preconditions. The group leader is not reaped
    // yet, so the group id cannot have been reused.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    if let Some(cg) = cgroup {
        cg.kill_all();
    }
}

/// Block until `pid` has exited, leaving it a zombie (WNOWAIT).
fn wait_exited(pid: libc::pid_t) {
    loop {
        // SAFETY: `info` is a valid out-pointer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let ret = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if ret == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
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
                return Some(Exit { status, rusage });
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

fn decode_status(status: c_int) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pids_format_without_allocation() {
        let mut buf = [0u8; 16];
        assert_eq!(super::format_pid(0, &mut buf), b"0");
        assert_eq!(super::format_pid(4194304, &mut buf), b"4194304");
    }
}
