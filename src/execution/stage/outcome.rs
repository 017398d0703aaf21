//! How a stage ended, as a pure function of what the runner observed: which limit (if any)
//! ended it, and the stage's status. Kept apart from the processes and pipes so that every
//! case is a line in a table test.

use std::time::Duration;

use crate::execution::report::{LimitKind, StageStatus};

/// What the runner saw of a finished stage.
#[derive(Debug, Clone, Copy)]
pub(super) struct Observed {
    /// The limit the runner itself enforced (wall clock, output cap, CPU budget), if any.
    pub(super) limit_hit: Option<LimitKind>,
    /// stdout or stderr passed the output cap.
    pub(super) truncated: bool,
    /// The slot's cgroup counted an OOM kill during the stage.
    pub(super) oom_killed: bool,
    pub(super) exit_code: Option<i32>,
    pub(super) signal: Option<i32>,
    /// CPU time of the whole tree.
    pub(super) cpu_time: Duration,
    pub(super) cpu_budget_ms: u64,
}

/// The limit that ended the stage and its status. The order matters: the runner's own
/// verdict first, then output (the cap was passed just as the program ended), memory (an
/// OOM kill shows as SIGKILL), CPU (RLIMIT_CPU's SIGXCPU, or SIGKILL at its hard limit one
/// second later, once the whole budget in whole seconds was used), then file size.
pub(super) fn classify(o: &Observed) -> (Option<LimitKind>, StageStatus) {
    let rlimit_cpu_spent = o.cpu_time.as_millis() as u64 >= o.cpu_budget_ms.div_ceil(1000) * 1000;
    let limit = o.limit_hit.or(if o.truncated {
        Some(LimitKind::Output)
    } else if o.oom_killed {
        Some(LimitKind::Memory)
    } else if o.signal == Some(libc::SIGXCPU)
        || (o.signal == Some(libc::SIGKILL) && rlimit_cpu_spent)
    {
        Some(LimitKind::CpuTime)
    } else if o.signal == Some(libc::SIGXFSZ) {
        Some(LimitKind::FileSize)
    } else {
        None
    });
    let status = match limit {
        Some(LimitKind::Output) => StageStatus::OutputLimit,
        Some(LimitKind::WallTime | LimitKind::CpuTime) => StageStatus::Timeout,
        Some(LimitKind::Memory) => StageStatus::MemoryLimit,
        Some(LimitKind::FileSize) => StageStatus::RuntimeError,
        None if o.exit_code == Some(0) => StageStatus::Ok,
        None => StageStatus::RuntimeError,
    };
    (limit, status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use LimitKind::*;
    use StageStatus::*;

    #[test]
    fn every_ending_gets_its_limit_and_status() {
        let base = Observed {
            limit_hit: None,
            truncated: false,
            oom_killed: false,
            exit_code: Some(0),
            signal: None,
            cpu_time: Duration::from_millis(10),
            cpu_budget_ms: 1000,
        };
        let exited = |code| Observed {
            exit_code: Some(code),
            ..base
        };
        let killed = |sig| Observed {
            exit_code: None,
            signal: Some(sig),
            ..base
        };
        let cases: Vec<(&str, Observed, Option<LimitKind>, StageStatus)> = vec![
            ("exit 0", base, None, Ok),
            ("exit 1", exited(1), None, RuntimeError),
            ("exit 137 is not a kill", exited(137), None, RuntimeError),
            ("a segfault", killed(libc::SIGSEGV), None, RuntimeError),
            (
                "the wall clock",
                Observed {
                    limit_hit: Some(WallTime),
                    ..killed(libc::SIGKILL)
                },
                Some(WallTime),
                Timeout,
            ),
            (
                "the runner's CPU budget",
                Observed {
                    limit_hit: Some(CpuTime),
                    ..killed(libc::SIGKILL)
                },
                Some(CpuTime),
                Timeout,
            ),
            (
                "the runner's verdict wins over an OOM",
                Observed {
                    limit_hit: Some(WallTime),
                    oom_killed: true,
                    ..killed(libc::SIGKILL)
                },
                Some(WallTime),
                Timeout,
            ),
            (
                "output passed the cap as it exited 0",
                Observed {
                    truncated: true,
                    ..base
                },
                Some(Output),
                OutputLimit,
            ),
            (
                "an OOM kill",
                Observed {
                    oom_killed: true,
                    ..killed(libc::SIGKILL)
                },
                Some(Memory),
                MemoryLimit,
            ),
            ("SIGXCPU", killed(libc::SIGXCPU), Some(CpuTime), Timeout),
            (
                "SIGKILL after the whole RLIMIT_CPU budget",
                Observed {
                    cpu_time: Duration::from_millis(1000),
                    ..killed(libc::SIGKILL)
                },
                Some(CpuTime),
                Timeout,
            ),
            (
                "SIGKILL with CPU to spare is the program's own",
                killed(libc::SIGKILL),
                None,
                RuntimeError,
            ),
            (
                "SIGXFSZ",
                killed(libc::SIGXFSZ),
                Some(FileSize),
                RuntimeError,
            ),
        ];
        for (name, observed, limit, status) in cases {
            assert_eq!(classify(&observed), (limit, status), "{name}");
        }
    }
}
