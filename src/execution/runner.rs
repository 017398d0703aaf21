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
use super::child::{MAX_PASS_FDS, Rlimit, pipe_pair, prepare_child};
use super::launcher::{Launcher, SpawnSpec};
use super::report::{LimitKind, StageReport, StageStatus};
use super::sandbox::SandboxCommand;

/// How long a launcher may take to report a stage's end once its tree is dead or killed.
const LAUNCHER_REPORT_GRACE: Duration = Duration::from_secs(10);

/// How long pipes may stay open after the stage's process tree is gone or killed.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

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

/// Format `n` into `buf` without allocating (we may be between fork and exec).
pub(crate) fn format_pid(mut n: u32, buf: &mut [u8; 16]) -> &[u8] {
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

/// How the stage ended: wait status, CPU time of the reaped tree, largest RSS.
struct Exit {
    status: c_int,
    cpu: Duration,
    maxrss_kb: u64,
}

/// A started stage: its pid, the parent's ends of its pipes, and how to watch its exit.
pub(crate) struct Spawned {
    pid: libc::pid_t,
    stdin: Option<pipe::Sender>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    exit_watch: ExitWatch,
}

enum ExitWatch {
    /// Forked by the daemon: a blocking thread waits for the exit without reaping it.
    Direct { waiter: tokio::task::JoinHandle<()> },
    /// Forked by the slot's launcher, which kills, reaps and reports.
    Launched {
        launcher: Arc<Launcher>,
        pid: libc::pid_t,
        result: Option<Result<(i32, u64, u64), String>>,
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
    async fn exited(&mut self) {
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
    async fn kill(&mut self, pid: libc::pid_t, cgroup: Option<&MemoryCgroup>) {
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
    async fn finish(mut self, pid: libc::pid_t, cgroup: Option<&MemoryCgroup>) -> Option<Exit> {
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
                    Some(Ok((status, cpu_us, maxrss_kb))) => Some(Exit {
                        status,
                        cpu: Duration::from_micros(cpu_us),
                        maxrss_kb,
                    }),
                    _ => None,
                }
            }
        }
    }
}

fn to_owned_pipes(
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
) -> std::io::Result<(
    Option<pipe::Sender>,
    Option<pipe::Receiver>,
    Option<pipe::Receiver>,
)> {
    Ok((
        stdin.map(pipe::Sender::from_owned_fd).transpose()?,
        stdout.map(pipe::Receiver::from_owned_fd).transpose()?,
        stderr.map(pipe::Receiver::from_owned_fd).transpose()?,
    ))
}

/// Fork from the daemon. The child joins the slot's cgroups itself (costly on cgroup v1,
/// which is why slots with cgroups use a launcher when one is available).
fn spawn_direct(cmd: SandboxCommand, ctx: &RunContext<'_>) -> Result<Spawned, String> {
    let mut cgroup_procs = Vec::new();
    for path in ctx
        .cgroup
        .map(MemoryCgroup::all_procs_paths)
        .unwrap_or_default()
    {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
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
        return Err("too many descriptors to pass".into());
    }
    let uid = ctx.uid;
    let oom_score: &'static std::ffi::CStr = if cmd.oom_protected {
        c"-1000"
    } else {
        super::child::STAGE_OOM_SCORE_C
    };
    // SAFETY: the closure runs in the child between fork and exec. It only makes
    // async-signal-safe system calls on memory captured before the fork; no allocation.
    unsafe {
        command.pre_exec(move || {
            // Join the slot's cgroups first, so every later process is inside them.
            let mut buf = [0u8; 16];
            let pid = format_pid(libc::getpid() as u32, &mut buf);
            for &fd in &cgroup_fds {
                if libc::write(fd, pid.as_ptr().cast(), pid.len()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // As root, before the uid drop: lowering the score needs the privilege (best
            // effort: without CAP_SYS_RESOURCE the stage's raised score does the job).
            let _ = super::child::set_oom_score_adj(oom_score);
            let mut scratch = [0 as c_int; MAX_PASS_FDS];
            prepare_child(&pass_fds, &mut scratch, &limits_list, uid)
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start `{}`: {e}", cmd.program.display()))?;
    let pid = child.id() as libc::pid_t;
    let (stdin, stdout, stderr) = (
        child.stdin.take().map(OwnedFd::from),
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    );
    // Wait for exit without reaping, so the process group id stays ours until we kill it.
    let waiter = tokio::task::spawn_blocking(move || wait_exited(pid));
    let watch = ExitWatch::Direct { waiter };
    match to_owned_pipes(stdin, stdout, stderr) {
        Ok((stdin, stdout, stderr)) => Ok(Spawned {
            pid,
            stdin,
            stdout,
            stderr,
            exit_watch: watch,
        }),
        Err(e) => {
            // SAFETY: as in ExitWatch::kill.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            Err(format!("setting up pipes: {e}"))
        }
    }
}

/// Have the slot's launcher fork the stage inside the slot's cgroups.
async fn spawn_launched(
    launcher: Arc<Launcher>,
    cmd: SandboxCommand,
    ctx: &RunContext<'_>,
) -> Result<Spawned, String> {
    if cmd.pass_fds.len() > MAX_PASS_FDS {
        return Err("too many descriptors to pass".into());
    }
    let (stdin_r, stdin_w) = pipe_pair()?;
    let (stdout_r, stdout_w) = pipe_pair()?;
    let (stderr_r, stderr_w) = pipe_pair()?;
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
    match to_owned_pipes(Some(stdin_w), Some(stdout_r), Some(stderr_r)) {
        Ok((stdin, stdout, stderr)) => Ok(Spawned {
            pid,
            stdin,
            stdout,
            stderr,
            exit_watch: watch,
        }),
        Err(e) => {
            launcher.kill().await;
            Err(format!("setting up pipes: {e}"))
        }
    }
}

/// Start a stage's process (through the slot's launcher when there is one).
pub(crate) async fn start_stage(
    cmd: SandboxCommand,
    ctx: &RunContext<'_>,
) -> Result<Spawned, String> {
    match ctx.launcher.clone() {
        Some(launcher) => spawn_launched(launcher, cmd, ctx).await,
        None => spawn_direct(cmd, ctx),
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

/// Taken just before a stage may start running: its wall time and CPU use count from here.
pub(crate) struct StageStart {
    at: Instant,
    /// The slot's cgroup CPU counter, where there is one.
    cpu: Option<Duration>,
}

impl StageStart {
    pub(crate) fn now(ctx: &RunContext<'_>) -> StageStart {
        StageStart {
            at: Instant::now(),
            cpu: ctx.cgroup.and_then(MemoryCgroup::cpu_usage),
        }
    }
}

/// Feed, read, time and end a started stage, and report on it.
pub(crate) async fn supervise(
    spawned: Spawned,
    ctx: &RunContext<'_>,
    start: StageStart,
) -> StageReport {
    let limits = ctx.limits;
    let oom_before = ctx.cgroup.map(MemoryCgroup::oom_kills).unwrap_or(0);
    let cpu_before = start.cpu;
    let Spawned {
        pid,
        stdin,
        stdout,
        stderr,
        mut exit_watch,
    } = spawned;

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

    let wall = Duration::from_millis(limits.wall_time_ms);
    let mut limit_hit = None;
    tokio::select! {
        _ = exit_watch.exited() => {}
        _ = tokio::time::sleep(wall) => limit_hit = Some(LimitKind::WallTime),
        _ = overflow.notified() => limit_hit = Some(LimitKind::Output),
        _ = cpu_budget_spent(ctx.cgroup, cpu_before, limits.cpu_time_ms) => {
            limit_hit = Some(LimitKind::CpuTime);
        }
    }
    if limit_hit.is_some() {
        exit_watch.kill(pid, ctx.cgroup).await;
    }
    let exit = exit_watch.finish(pid, ctx.cgroup).await;
    let wall_time = start.at.elapsed();
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

    let oom_killed = ctx.cgroup.is_some_and(|cg| cg.oom_kills() > oom_before);
    let Some(exit) = exit else {
        if oom_killed {
            // The run's memory use is what got a process of its sandbox killed.
            return StageReport {
                status: StageStatus::MemoryLimit,
                limit: Some(LimitKind::Memory),
                stdout,
                stderr,
                stdout_truncated,
                stderr_truncated,
                wall_time,
                peak_memory_bytes: ctx.cgroup.and_then(MemoryCgroup::peak_bytes),
                message: Some("the run's memory use got a process of its sandbox killed".into()),
                ..StageReport::internal("no exit status (the memory limit was hit)", limits)
            };
        }
        return StageReport::internal("lost track of the stage's process", limits);
    };
    let (mut exit_code, mut signal) = decode_status(exit.status);
    if let Some(status) = ctx.status_pipe.and_then(read_reported_status) {
        (exit_code, signal) = decode_status(status);
    } else if ctx.exit_code_encodes_signal {
        if let Some(code) = exit_code.filter(|c| (129..=128 + 64).contains(c)) {
            exit_code = None;
            signal = Some(code - 128);
        }
    }
    // The cgroup sees every process of the run; rusage only those reaped up the chain.
    let cpu_time = match (cpu_before, ctx.cgroup.and_then(MemoryCgroup::cpu_usage)) {
        (Some(before), Some(after)) => after.saturating_sub(before),
        _ => exit.cpu,
    };
    let peak_memory_bytes = ctx
        .cgroup
        .and_then(MemoryCgroup::peak_bytes)
        .or(Some(exit.maxrss_kb * 1024));

    if limit_hit.is_none() {
        limit_hit = if stdout_truncated || stderr_truncated {
            // The cap was passed just as the program ended: still an output limit.
            Some(LimitKind::Output)
        } else if oom_killed {
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

/// The wait status the stage-exec helper wrote, if it lived to write it (the pipe is
/// non-blocking, and the helper is gone by the time the sandbox has exited).
fn read_reported_status(pipe: &OwnedFd) -> Option<c_int> {
    // One byte more than a status: anything but exactly four bytes is not a report.
    let mut buf = [0u8; 5];
    // SAFETY: read into a valid buffer of `buf.len()` bytes from a descriptor we own.
    let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    (n == 4).then(|| c_int::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]))
}

/// Resolve once the stage's whole tree has used `budget_ms` of CPU, as the slot's cgroup counts
/// it. RLIMIT_CPU stays as the kernel's own backstop, but it counts per process and in whole
/// seconds, so a program that forks spinners would get the budget once per process; the cgroup
/// sees the sum. Never resolves when the host gives us no CPU accounting.
async fn cpu_budget_spent(cgroup: Option<&MemoryCgroup>, before: Option<Duration>, budget_ms: u64) {
    let (Some(cgroup), Some(before)) = (cgroup, before) else {
        return std::future::pending().await;
    };
    let budget = Duration::from_millis(budget_ms);
    // The tree cannot burn CPU faster than all cores at once, so sleeping for the remaining
    // budget divided by the core count never oversleeps it; near the end poll every 10 ms.
    // SAFETY: sysconf has no preconditions. Online CPUs, not our affinity: the tree may differ.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let cores = u32::try_from(online).unwrap_or(1).max(1);
    loop {
        let wait = match cgroup.cpu_usage() {
            Some(now) => {
                let used = now.saturating_sub(before);
                if used >= budget {
                    return;
                }
                ((budget - used) / cores).max(Duration::from_millis(10))
            }
            None => {
                // RLIMIT_CPU still holds; try again rather than stop watching.
                tracing::warn!("cannot read the slot's CPU usage");
                Duration::from_millis(100)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Read output while its cost (see [`json_prefix`]) stays within `cap`; past that, flag
/// truncation and tell the runner to kill. Counting what JSON escaping makes of control
/// characters and invalid bytes bounds the daemon's memory: 16 MiB of `\x01` would be
/// 96 MiB of `\u0001` once escaped.
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
    let mut cost = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = rx.read(&mut buf) => match read {
                Ok(0) | Err(_) => return (out, false),
                Ok(n) => {
                    let (fits, used) = json_prefix(&buf[..n], cap.saturating_sub(cost));
                    out.extend_from_slice(&buf[..fits]);
                    cost += used;
                    if fits < n {
                        overflow.notify_one();
                        return (out, true);
                    }
                }
            },
            _ = stop.changed() => return (out, false),
        }
    }
}

/// The longest prefix of `bytes` whose cost is at most `room`, and that cost. A character
/// costs its UTF-8 length, except those JSON escaping blows up: `"` and `\\` cost 2, a
/// control character that serde_json writes as `\u00XX` 6, an invalid byte 3 (the U+FFFD
/// replacing it in lossy text; base64, which the v1 API uses for such streams, is less).
/// So `output_bytes` means raw bytes for ordinary text, and a stream's JSON form is at
/// most twice the cap (all newlines or tabs, kept at 1 so that ordinary text is not cut
/// early, escaped as two characters each). A character split between
/// two reads counts as invalid bytes: a few bytes of overcount, never undercount.
pub(crate) fn json_prefix(bytes: &[u8], room: usize) -> (usize, usize) {
    let mut len = 0;
    let mut cost = 0;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            let c_cost = match c {
                '"' | '\\' => 2,
                '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 1,
                c if (c as u32) < 0x20 => 6,
                c => c.len_utf8(),
            };
            if cost + c_cost > room {
                return (len, cost);
            }
            cost += c_cost;
            len += c.len_utf8();
        }
        for _ in chunk.invalid() {
            if cost + 3 > room {
                return (len, cost);
            }
            cost += 3;
            len += 1;
        }
    }
    (len, cost)
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
    fn output_is_measured_as_json() {
        use super::json_prefix;
        // (input, room) -> (bytes kept, JSON cost)
        let cases: &[(&[u8], usize, (usize, usize))] = &[
            (b"hello", 100, (5, 5)),
            (b"hello", 3, (3, 3)),
            (b"\x01\x01", 100, (2, 12)),
            (b"\x01\x01", 11, (1, 6)),
            (b"a\nb\"", 100, (4, 5)),
            ("\u{e9}\u{e9}".as_bytes(), 3, (2, 2)),
            (b"\xff\xfe", 100, (2, 6)),
            (b"ok\xff", 4, (2, 2)),
        ];
        for &(input, room, want) in cases {
            let got = json_prefix(input, room);
            assert_eq!(got, want, "{input:?} in {room}");
            let kept = String::from_utf8_lossy(&input[..got.0]);
            let json = serde_json::to_string(&kept).expect("serializes");
            assert!(json.len() - 2 <= got.1 * 2, "{json} vs {got:?}");
        }
        // The bound holds as serde_json writes it: at most twice the cost.
        let text = "\u{1}x\"\u{1f}\u{e9}\n\\".repeat(1000);
        let (len, cost) = json_prefix(text.as_bytes(), usize::MAX);
        assert_eq!(len, text.len());
        let json = serde_json::to_string(&text).expect("serializes").len() - 2;
        assert!(json <= 2 * cost && json >= cost, "{json} vs {cost}");
    }

    #[test]
    fn pids_format_without_allocation() {
        let mut buf = [0u8; 16];
        assert_eq!(super::format_pid(0, &mut buf), b"0");
        assert_eq!(super::format_pid(4194304, &mut buf), b"4194304");
    }
}
