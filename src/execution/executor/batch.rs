//! Test-case batches: one program, compiled once, run once per test.
//!
//! The compile runs in one slot (or comes from the compile cache); its output is kept out
//! of every sandbox (`pool/artifact.rs`) and each test runs in a fresh sandbox and work dir
//! of its own, with that output written in read-only, its own stdin and args, and the run
//! limits: a test sees nothing another test did, and a hostile test (fork bomb, memory
//! bomb, endless loop) ends in its own slot like any single run.
//!
//! **Admission.** The compile is admitted like a single submission (a full queue refuses
//! the batch). Each test then takes a slot of its own, in line with every other submission,
//! so a batch holds at most as many slots as the server has and runs its tests in parallel
//! only on slots that are free: a single run arriving meanwhile gets the next free slot,
//! not the batch's next test. Every test counts as an execution in the metrics.
//!
//! **Stopping.** With `stop_at_first_failure`, no test starts after one failed (tests
//! already running finish and are reported). The batch's wall-time budget bounds it as a
//! whole: no test starts after it, and a test's wall-time limit is cut to what is left of
//! it. A client that goes away, or a drain of the daemon, stops the batch the same way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::pipeline::CompileStep;
use super::{ExecuteError, Executor};
use crate::execution::report::{ExecutionReport, StageReport, StageStatus};
use crate::execution::request::ExecutionRequest;

/// One test: its input, and the output that passes it.
#[derive(Debug, Clone)]
pub struct BatchTest {
    pub stdin: Vec<u8>,
    pub args: Vec<String>,
    /// When given, the test passes only if stdout matches (see [`output_matches`]).
    pub expected_output: Option<String>,
}

/// A program and its tests.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    /// The program: runtime, files, entry and run limits (its stdin and args are unused).
    pub request: ExecutionRequest,
    pub tests: Vec<BatchTest>,
    pub stop_at_first_failure: bool,
    /// The whole batch's wall-time budget.
    pub wall_time: Duration,
}

/// Why tests were left unrun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The compile failed: no test ran.
    CompileFailed,
    /// A test failed and `stop_at_first_failure` was set.
    FirstFailure,
    /// The batch's wall-time budget was spent.
    WallTime,
    /// The client went away.
    ClientGone,
    /// The daemon began to shut down (drain).
    ShuttingDown,
}

/// How one test went; `run` is `None` for a test that did not run.
#[derive(Debug, Clone, Default)]
pub struct TestReport {
    pub run: Option<StageReport>,
    /// Whether stdout matched the expected output, when one was given and the run ended ok.
    pub output_matches: Option<bool>,
}

impl TestReport {
    /// Ran, ended ok, and matched its expected output if it had one.
    pub fn passed(&self) -> bool {
        self.run
            .as_ref()
            .is_some_and(|r| r.status == StageStatus::Ok)
            && self.output_matches != Some(false)
    }
}

#[derive(Debug, Clone)]
pub struct BatchReport {
    pub compile: Option<StageReport>,
    pub compile_cached: bool,
    /// One per test, in the request's order.
    pub tests: Vec<TestReport>,
    pub stopped: Option<StopReason>,
    pub wall_time: Duration,
}

/// The rule `expected_output` is checked by: equal after removing trailing whitespace from
/// every line and trailing blank lines (invalid UTF-8 is compared as U+FFFD).
pub fn output_matches(actual: &[u8], expected: &str) -> bool {
    fn normalized(text: &str) -> Vec<&str> {
        let mut lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
    }
    normalized(&String::from_utf8_lossy(actual)) == normalized(expected)
}

/// The batch's shared progress.
struct Progress {
    next: AtomicUsize,
    stopped: Mutex<Option<StopReason>>,
    results: Mutex<Vec<TestReport>>,
}

impl Progress {
    fn stop(&self, reason: StopReason) {
        let mut stopped = self
            .stopped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        stopped.get_or_insert(reason);
    }

    fn stopped(&self) -> Option<StopReason> {
        *self
            .stopped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Executor {
    /// Compile once, then run every test in a fresh sandbox (see the module's doc).
    /// `cancel` says the client went away. Refused only when the compile cannot be
    /// admitted (busy); every later problem is in a test's report.
    pub async fn execute_batch(
        self: &Arc<Self>,
        batch: BatchRequest,
        cancel: CancellationToken,
    ) -> Result<BatchReport, ExecuteError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + batch.wall_time;
        let BatchRequest {
            request,
            tests,
            stop_at_first_failure,
            ..
        } = batch;
        let unrun = |compile, compile_cached, run: Option<StageReport>, stopped| BatchReport {
            compile,
            compile_cached,
            tests: vec![
                TestReport {
                    run,
                    output_matches: None,
                };
                tests.len()
            ],
            stopped,
            wall_time: started.elapsed(),
        };
        let mut compile = None;
        let mut compile_cached = false;
        let step = if request.runtime.compile.is_some() {
            let built = match self.compile_step(&request, true) {
                Ok(CompileStep::Prebuilt(built)) => {
                    compile_cached = true;
                    built
                }
                Ok(step) => {
                    if self.draining() {
                        return Err(ExecuteError::ShuttingDown { killed: false });
                    }
                    let lease = tokio::select! {
                        lease = self.admission.acquire() => lease?,
                        () = cancel.cancelled() => return Err(ExecuteError::Abandoned),
                        () = self.draining.cancelled() => {
                            return Err(ExecuteError::ShuttingDown { killed: false });
                        }
                    };
                    self.observer.admitted(started.elapsed());
                    let outcome = self
                        .run_in_slot(request.clone(), lease, false, step, false)
                        .await?;
                    match outcome.built {
                        Some(built) if built.succeeded() => built,
                        _ => {
                            // The compile failed (or its output could not be kept): the
                            // batch is one failed execution, as a single run would be.
                            let report = outcome.report;
                            self.observer.finished(
                                &request.runtime.name,
                                &report,
                                started.elapsed(),
                            );
                            let stopped = report.run.is_none().then_some(StopReason::CompileFailed);
                            return Ok(unrun(report.compile, false, report.run, stopped));
                        }
                    }
                }
                Err(failed) => {
                    self.observer
                        .finished(&request.runtime.name, &failed, started.elapsed());
                    let failed = *failed;
                    return Ok(unrun(
                        failed.compile,
                        true,
                        None,
                        Some(StopReason::CompileFailed),
                    ));
                }
            };
            compile = Some(built.report.clone());
            CompileStep::Prebuilt(built)
        } else {
            CompileStep::Run {
                key: None,
                keep: false,
            }
        };

        let progress = Arc::new(Progress {
            next: AtomicUsize::new(0),
            stopped: Mutex::new(None),
            results: Mutex::new(vec![TestReport::default(); tests.len()]),
        });
        let tests = Arc::new(tests);
        let request = Arc::new(request);
        let step = Arc::new(step);
        // Never more workers than slots: each holds at most one slot at a time.
        let workers = self.slot_state.len().min(tests.len()).max(1);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (this, progress, tests, request, step, cancel) = (
                Arc::clone(self),
                Arc::clone(&progress),
                Arc::clone(&tests),
                Arc::clone(&request),
                Arc::clone(&step),
                cancel.clone(),
            );
            set.spawn(async move {
                this.batch_worker(
                    &progress,
                    &tests,
                    &request,
                    &step,
                    stop_at_first_failure,
                    deadline,
                    &cancel,
                )
                .await;
            });
        }
        while set.join_next().await.is_some() {}
        let tests = std::mem::take(
            &mut *progress
                .results
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        Ok(BatchReport {
            compile,
            compile_cached,
            tests,
            stopped: progress.stopped(),
            wall_time: started.elapsed(),
        })
    }

    /// Take the next test, a slot for it, run it; until none is left or the batch stops.
    #[allow(clippy::too_many_arguments)]
    async fn batch_worker(
        self: &Arc<Self>,
        progress: &Progress,
        tests: &[BatchTest],
        request: &ExecutionRequest,
        step: &CompileStep,
        stop_at_first_failure: bool,
        deadline: tokio::time::Instant,
        cancel: &CancellationToken,
    ) {
        loop {
            if progress.stopped().is_some() {
                return;
            }
            if cancel.is_cancelled() {
                progress.stop(StopReason::ClientGone);
                return;
            }
            let index = progress.next.fetch_add(1, Ordering::SeqCst);
            let Some(test) = tests.get(index) else {
                return;
            };
            let waited = Instant::now();
            let lease = tokio::select! {
                lease = self.admission.acquire_until(deadline) => match lease {
                    Ok(lease) => lease,
                    Err(_) => {
                        progress.stop(StopReason::WallTime);
                        return;
                    }
                },
                () = cancel.cancelled() => {
                    progress.stop(StopReason::ClientGone);
                    return;
                }
                // The daemon drains: no test starts; those running finish.
                () = self.draining.cancelled() => {
                    progress.stop(StopReason::ShuttingDown);
                    return;
                }
            };
            // A test failed while this one waited for its slot.
            if progress.stopped().is_some() {
                return;
            }
            self.observer.admitted(waited.elapsed());
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let mut run = request.clone();
            run.stdin = test.stdin.clone();
            run.args = test.args.clone();
            let left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(10);
            run.limits.wall_time_ms = run.limits.wall_time_ms.min(left_ms);
            let limits = run.limits;
            // A test that runs from the batch's compile is counted as its run alone: the
            // compile's output and memory were counted once, when it ran.
            let prebuilt = matches!(step, CompileStep::Prebuilt(_));
            let started = Instant::now();
            let report = match self
                .run_in_slot(run, lease, !prebuilt, step.clone(), true)
                .await
            {
                Ok(outcome) => outcome.report.run,
                Err(e) => Some(StageReport::internal(e, limits)),
            };
            if let (true, Some(run)) = (prebuilt, &report) {
                let counted = ExecutionReport {
                    compile: None,
                    run: Some(run.clone()),
                    compile_cached: true,
                };
                self.observer
                    .finished(&request.runtime.name, &counted, started.elapsed());
            }
            let output_matches = match (&report, &test.expected_output) {
                (Some(run), Some(expected)) if run.status == StageStatus::Ok => {
                    Some(output_matches(&run.stdout, expected))
                }
                _ => None,
            };
            let result = TestReport {
                run: report,
                output_matches,
            };
            let passed = result.passed();
            if let Some(slot) = progress
                .results
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_mut(index)
            {
                *slot = result;
            }
            if !passed && stop_at_first_failure {
                progress.stop(StopReason::FirstFailure);
            }
            if tokio::time::Instant::now() >= deadline && index + 1 < tests.len() {
                progress.stop(StopReason::WallTime);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::output_matches;

    #[test]
    fn outputs_match_up_to_trailing_whitespace() {
        assert!(output_matches(b"1 2 \n3\n\n\n", "1 2\n3"));
        assert!(output_matches(b"a\r\nb\r\n", "a\nb\n"));
        assert!(!output_matches(b"1 2\n3\n", "1  2\n3"));
        assert!(!output_matches(b" 1\n", "1"), "leading whitespace counts");
        assert!(
            !output_matches(b"1\n\n2\n", "1\n2"),
            "inner blank lines count"
        );
    }
}
