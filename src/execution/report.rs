//! What a run produced, in core terms. `api/` maps these to response shapes.

use std::time::Duration;

/// The outcome of one stage, from a small fixed set (also the metrics' outcome label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StageStatus {
    Ok,
    RuntimeError,
    Timeout,
    MemoryLimit,
    OutputLimit,
    CompileError,
    InternalError,
}

impl StageStatus {
    pub const ALL: [StageStatus; 7] = [
        StageStatus::Ok,
        StageStatus::RuntimeError,
        StageStatus::Timeout,
        StageStatus::MemoryLimit,
        StageStatus::OutputLimit,
        StageStatus::CompileError,
        StageStatus::InternalError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Ok => "ok",
            StageStatus::RuntimeError => "runtime_error",
            StageStatus::Timeout => "timeout",
            StageStatus::MemoryLimit => "memory_limit",
            StageStatus::OutputLimit => "output_limit",
            StageStatus::CompileError => "compile_error",
            StageStatus::InternalError => "internal_error",
        }
    }
}

/// Which limit ended a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    WallTime,
    CpuTime,
    Memory,
    Output,
    FileSize,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::WallTime => "wall_time",
            LimitKind::CpuTime => "cpu_time",
            LimitKind::Memory => "memory",
            LimitKind::Output => "output",
            LimitKind::FileSize => "file_size",
        }
    }
}

impl LimitKind {
    /// Which limit ended a stage, and its value, for the stage's `message`.
    pub fn describe(self, limits: &super::Limits) -> String {
        const MIB: u64 = 1024 * 1024;
        match self {
            LimitKind::WallTime => format!(
                "stopped at the wall-time limit of {} ms",
                limits.wall_time_ms
            ),
            LimitKind::CpuTime => {
                format!("stopped at the CPU-time limit of {} ms", limits.cpu_time_ms)
            }
            LimitKind::Memory if limits.memory_bytes.is_multiple_of(MIB) => format!(
                "killed at the memory limit of {} MiB",
                limits.memory_bytes / MIB
            ),
            LimitKind::Memory => format!(
                "killed at the memory limit of {} bytes",
                limits.memory_bytes
            ),
            LimitKind::Output => format!(
                "stopped: stdout or stderr passed the output limit of {} bytes",
                limits.output_bytes
            ),
            LimitKind::FileSize => format!(
                "a file passed the file-size limit of {} bytes (SIGXFSZ)",
                limits.file_size_bytes
            ),
        }
    }
}

/// The result of one stage (compile or run).
#[derive(Debug, Clone)]
pub struct StageReport {
    pub status: StageStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The exit code, when the process exited rather than being killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// The limit that ended the stage, if one did.
    pub limit: Option<LimitKind>,
    pub wall_time: Duration,
    pub cpu_time: Option<Duration>,
    pub peak_memory_bytes: Option<u64>,
    /// The limits the stage ran under, so messages can quote them.
    pub limits: super::Limits,
    /// Detail for `InternalError`; for a stage a limit ended, which limit (see
    /// [`LimitKind::describe`]).
    pub message: Option<String>,
}

impl StageReport {
    /// A stage the sandbox failed to run. The detail goes to the log; the report keeps it
    /// without host paths, since it is sent to clients.
    pub fn internal(message: impl std::fmt::Display, limits: super::Limits) -> Self {
        let message = message.to_string();
        tracing::error!(error = %message, "a stage could not run");
        StageReport {
            status: StageStatus::InternalError,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            exit_code: None,
            signal: None,
            limit: None,
            wall_time: Duration::ZERO,
            cpu_time: None,
            peak_memory_bytes: None,
            limits,
            message: Some(without_host_paths(&message)),
        }
    }
}

/// `message` with every absolute path replaced by `<path>`: messages that leave the daemon
/// must not show the host's layout (work root, cgroup paths, where binaries live).
pub fn without_host_paths(message: &str) -> String {
    const OPENERS: &[char] = &['`', '\'', '"', '(', '=', '['];
    const CLOSERS: &[char] = &['`', '\'', '"', ')', ':', ',', ']', ';'];
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars().peekable();
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if c == '/' && at_start {
            while chars
                .peek()
                .is_some_and(|n| !n.is_whitespace() && !CLOSERS.contains(n))
            {
                chars.next();
            }
            out.push_str("<path>");
            at_start = false;
            continue;
        }
        at_start = c.is_whitespace() || OPENERS.contains(&c);
        out.push(c);
    }
    out
}

/// A whole submission: the compile stage when the runtime has one, then the run stage
/// (absent when compiling failed).
#[derive(Debug, Clone)]
pub struct ExecutionReport {
    pub compile: Option<StageReport>,
    pub run: Option<StageReport>,
    /// The compile stage's result came from the compile cache: it did not run again.
    pub compile_cached: bool,
}

impl ExecutionReport {
    /// The outcome of the submission as a whole.
    pub fn status(&self) -> StageStatus {
        match (&self.compile, &self.run) {
            (_, Some(run)) => run.status,
            (Some(compile), None) => compile.status,
            (None, None) => StageStatus::InternalError,
        }
    }

    /// The stage whose result the caller sees last.
    pub fn final_stage(&self) -> Option<&StageReport> {
        self.run.as_ref().or(self.compile.as_ref())
    }

    pub fn output_bytes(&self) -> u64 {
        [&self.compile, &self.run]
            .into_iter()
            .flatten()
            .map(|s| (s.stdout.len() + s.stderr.len()) as u64)
            .sum()
    }

    pub fn peak_memory_bytes(&self) -> Option<u64> {
        [&self.compile, &self.run]
            .into_iter()
            .flatten()
            .filter_map(|s| s.peak_memory_bytes)
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::without_host_paths;

    #[test]
    fn host_paths_are_left_out_of_client_messages() {
        let cases = [
            (
                "preparing the work dir: creating /tmp/mde-x1/slot-0/box: File exists",
                "preparing the work dir: creating <path>: File exists",
            ),
            (
                "setting memory.max on /sys/fs/cgroup/mde-1/slot-0: EBUSY",
                "setting memory.max on <path>: EBUSY",
            ),
            (
                "cannot start `/usr/bin/bwrap`: denied",
                "cannot start `<path>`: denied",
            ),
            (
                "command `gcc` is not installed",
                "command `gcc` is not installed",
            ),
            ("a/b and 1/2 stay", "a/b and 1/2 stay"),
        ];
        for (given, want) in cases {
            assert_eq!(without_host_paths(given), want);
        }
    }
}
