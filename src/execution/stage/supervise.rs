//! Supervising a started stage: stdin in, stdout and stderr out through caps measured as
//! the JSON they become (past the cap the run is stopped: `output_limit`), and a wait for
//! the exit, the wall clock, an overflow, or the CPU budget. Where the cgroups account
//! CPU, the whole tree's usage is polled (sleeping remaining budget / cores, so it never
//! oversleeps), because RLIMIT_CPU, which stays as the kernel's backstop, counts per
//! process and in whole seconds. Killing goes to the stage's process group (the sandbox's
//! pid namespace takes every descendant with it) and to anything left in the slot's
//! cgroup; the leader is reaped only after the kill, so its process-group id cannot be
//! reused in between.

use std::ffi::c_int;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{Notify, watch};

use super::spawn::Spawned;
use super::{RunContext, outcome};
use crate::execution::pool::cgroup::MemoryCgroup;
use crate::execution::report::{LimitKind, StageReport, StageStatus};

/// How long pipes may stay open after the stage's process tree is gone or killed.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Taken just before a stage may start running: its wall time and CPU use count from here.
pub(crate) struct StageStart {
    at: Instant,
    /// The slot's cgroup CPU counter, where there is one.
    cpu: Option<Duration>,
    /// The slot's OOM-kill count. Taken here, before the stage is handed its command: a
    /// memory bomb can be OOM-killed within a millisecond, before supervision begins, and a
    /// baseline taken then would already include its kill.
    oom_kills: u64,
}

impl StageStart {
    pub(crate) fn now(ctx: &RunContext<'_>) -> StageStart {
        StageStart {
            at: Instant::now(),
            cpu: ctx.cgroup.and_then(MemoryCgroup::cpu_usage),
            oom_kills: ctx.cgroup.map(MemoryCgroup::oom_kills).unwrap_or(0),
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
    let oom_before = start.oom_kills;
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
                message: Some(format!(
                    "{}: the run's memory use got a process of its sandbox killed",
                    LimitKind::Memory.describe(&limits)
                )),
                ..StageReport::internal("no exit status (the memory limit was hit)", limits)
            };
        }
        return StageReport::internal("lost track of the stage's process", limits);
    };
    let (mut exit_code, mut signal) = decode_status(exit.status);
    if let Some(status) = ctx.status_pipe.and_then(read_reported_status) {
        (exit_code, signal) = decode_status(status);
    } else if ctx.exit_code_encodes_signal
        && let Some(code) = exit_code.filter(|c| (129..=128 + 64).contains(c))
    {
        exit_code = None;
        signal = Some(code - 128);
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

    let (limit_hit, status) = outcome::classify(&outcome::Observed {
        limit_hit,
        truncated: stdout_truncated || stderr_truncated,
        oom_killed,
        exit_code,
        signal,
        cpu_time,
        cpu_budget_ms: limits.cpu_time_ms,
    });
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
        message: limit_hit.map(|limit| limit.describe(&limits)),
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
}
