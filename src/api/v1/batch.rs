//! Test-case batches on `POST /api/v1/execute` (`tests`): the request's tests, their
//! bounds (from `execution.*` in the settings, each refused with a 422 that states the
//! maximum), and the answer's `tests` and `summary`. The core's `execution::BatchRequest`
//! does the running.

use std::time::{Duration, Instant};

use poem_openapi::payload::Json;
use poem_openapi::{Enum, Object};
use tokio_util::sync::CancellationToken;

use super::{
    ExecuteRequest, ExecuteResponse, ExecuteResult, StageResult, Status, Verdict, invalid,
    to_compile_stage, to_core_request, to_stage,
};
use crate::api::errors::{ApiError, ErrorBody, ErrorCode};
use crate::api::text::Text;
use crate::api::{AppState, RequestId, response_budget};
use crate::execution::{
    BatchReport, BatchRequest, BatchTest, Limits, StageStatus, StopReason, TestReport,
    validate_args,
};

/// One test of a batch.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct TestInput {
    /// A name to know the test by in the answer (not interpreted).
    #[oai(deserialize_with = "crate::api::text::test_name")]
    pub name: Option<Text>,
    /// Standard input of this test's run (UTF-8).
    #[oai(deserialize_with = "crate::api::text::stdin")]
    pub stdin: Option<Text>,
    /// Arguments of this test's run; the request's `args` when absent.
    #[oai(deserialize_with = "crate::api::text::args")]
    pub args: Option<Vec<Text>>,
    /// When given, the test passes only if stdout matches, ignoring trailing whitespace
    /// on each line and trailing blank lines (the rule of `expected_output`).
    #[oai(deserialize_with = "crate::api::text::expected_output")]
    pub expected_output: Option<Text>,
}

/// How a test went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum TestOutcome {
    /// The run ended `ok` and matched `expected_output` (if one was given).
    Passed,
    /// The run did not end `ok`, or its output did not match.
    Failed,
    /// The test did not run (see `summary.stopped`).
    Skipped,
}

/// The result of one test.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct TestResult {
    /// The test's `name`, when it had one.
    pub name: Option<String>,
    /// `passed`, `failed` or `skipped`.
    pub outcome: TestOutcome,
    /// Present when the test had an `expected_output` and its run ended `ok`.
    pub verdict: Option<Verdict>,
    /// The test's run stage; absent for a skipped test.
    pub run: Option<StageResult>,
}

/// Why tests were skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum BatchStop {
    /// Compiling failed: no test ran.
    CompileError,
    /// A test failed and `stop_at_first_failure` was set.
    FirstFailure,
    /// The batch's wall-time budget (`batch_wall_time_ms`) was spent.
    WallTime,
    /// The client went away.
    ClientGone,
    /// The daemon began to shut down; send the rest again (to another replica).
    ShuttingDown,
}

/// A batch in numbers.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct BatchSummary {
    /// Tests in the request.
    pub total: u32,
    /// Tests whose run ended `ok` and matched their `expected_output`, if any.
    pub passed: u32,
    /// Tests that ran and did not pass.
    pub failed: u32,
    /// Tests that did not run (see `stopped`).
    pub skipped: u32,
    /// Index (from 0) of the first test that failed.
    pub first_failure: Option<u32>,
    /// Why tests were skipped, when some were.
    pub stopped: Option<BatchStop>,
    /// Wall-clock time of the whole batch in milliseconds, compile included.
    pub wall_time_ms: u64,
}

/// Run a batch: check it, reserve its answer, compile once, run every test.
pub(super) async fn execute(
    state: &AppState,
    request_id: &RequestId,
    mut body: ExecuteRequest,
    tests: Vec<TestInput>,
) -> ExecuteResult {
    if body.stdin.is_some() || body.expected_output.is_some() {
        return invalid("with `tests`, give `stdin` and `expected_output` per test").into();
    }
    let stop_at_first_failure = body.stop_at_first_failure.take().unwrap_or(false);
    let wall_ms = body.batch_wall_time_ms.take();
    let names: Vec<Option<String>> = tests
        .iter()
        .map(|t| t.name.clone().map(Text::into_string))
        .collect();
    let batch = match to_core_batch(state, body, tests, stop_at_first_failure, wall_ms) {
        Ok(batch) => batch,
        Err(e) => return e.into(),
    };
    let runtime = batch.request.runtime.clone();
    match state.run_batch(request_id, batch).await {
        Ok(report) => ExecuteResult::Ok(Json(to_response(&runtime, &report, &names))),
        Err(e) => e.into(),
    }
}

fn limit_exceeded(message: String) -> ApiError {
    ApiError::Unprocessable(ErrorBody::new(ErrorCode::LimitExceeded, message))
}

fn to_core_batch(
    state: &AppState,
    body: ExecuteRequest,
    tests: Vec<TestInput>,
    stop_at_first_failure: bool,
    wall_ms: Option<u64>,
) -> Result<BatchRequest, ApiError> {
    let settings = &state.settings.execution;
    if tests.is_empty() {
        return Err(invalid("`tests` must hold at least one test"));
    }
    if tests.len() > settings.max_batch_tests {
        return Err(limit_exceeded(format!(
            "{} tests, more than the maximum of {} per batch (execution.max_batch_tests)",
            tests.len(),
            settings.max_batch_tests
        )));
    }
    let max_wall = settings.max_batch_wall_time_ms;
    let wall_ms = wall_ms.unwrap_or(max_wall);
    if !(10..=max_wall).contains(&wall_ms) {
        return Err(limit_exceeded(format!(
            "`batch_wall_time_ms` = {wall_ms} must be 10 to {max_wall} (execution.max_batch_wall_time_ms)"
        )));
    }
    let request = to_core_request(state, body)?;
    let mut input_bytes: u64 = 0;
    let mut core = Vec::with_capacity(tests.len());
    for (i, test) in tests.into_iter().enumerate() {
        let args: Vec<String> = match test.args {
            Some(args) => args.into_iter().map(Text::into_string).collect(),
            None => request.args.clone(),
        };
        validate_args(&args).map_err(|e| invalid(format!("tests[{i}]: {e}")))?;
        let stdin = test.stdin.unwrap_or_default().into_string().into_bytes();
        let expected_output = test.expected_output.map(Text::into_string);
        input_bytes += stdin.len() as u64
            + args.iter().map(|a| a.len() as u64 + 1).sum::<u64>()
            + expected_output.as_ref().map_or(0, |e| e.len() as u64);
        core.push(BatchTest {
            stdin,
            args,
            expected_output,
        });
    }
    if input_bytes > settings.max_batch_input_bytes {
        return Err(limit_exceeded(format!(
            "the tests hold {input_bytes} bytes of stdin, args and expected output, more than the maximum of {} (execution.max_batch_input_bytes)",
            settings.max_batch_input_bytes
        )));
    }
    let batch = BatchRequest {
        request,
        tests: core,
        stop_at_first_failure,
        wall_time: Duration::from_millis(wall_ms),
    };
    let answer = answer_bytes_at_most(&batch);
    let budget = state.settings.server.max_inflight_response_bytes;
    if answer > budget {
        return Err(limit_exceeded(format!(
            "the answer of {} tests could hold {answer} bytes (4 x limits.output_bytes per test), more than server.max_inflight_response_bytes ({budget}): lower limits.output_bytes or send fewer tests",
            batch.tests.len()
        )));
    }
    Ok(batch)
}

/// The most the answer to `batch` can hold: the compile stage, and a run stage per test.
fn answer_bytes_at_most(batch: &BatchRequest) -> u64 {
    const PER_TEST_BYTES: u64 = 4096;
    let first = response_budget::worst_case_bytes(&batch.request);
    let run = Limits::answer_bytes_at_most(&batch.request.limits, None);
    let others = (batch.tests.len() as u64).saturating_sub(1);
    first
        .saturating_add(others.saturating_mul(run))
        .saturating_add((batch.tests.len() as u64).saturating_mul(PER_TEST_BYTES))
}

impl AppState {
    /// Reserve the batch's answer, run it, and log one line about it.
    async fn run_batch(
        &self,
        request_id: &RequestId,
        batch: BatchRequest,
    ) -> Result<BatchReport, ApiError> {
        let started = Instant::now();
        let runtime = batch.request.runtime.name.clone();
        let tests = batch.tests.len();
        let gone = request_id.client_gone.clone();
        let wait = Duration::from_millis(self.settings.execution.max_queue_wait_ms);
        let reserve = self
            .responses
            .reserve(answer_bytes_at_most(&batch), request_id.peer);
        let reserved = tokio::select! {
            r = tokio::time::timeout(wait, reserve) => r.ok().and_then(Result::ok),
            () = gone.wait() => return Err(crate::execution::ExecuteError::Abandoned.into()),
        };
        let Some(reserved) = reserved else {
            self.metrics
                .http_refused(crate::metrics::HttpGuard::ResponseBudget);
            return Err(
                crate::execution::ExecuteError::Busy(crate::execution::Busy {
                    running: self.executor.running(),
                    waiting: self.executor.waiting(),
                })
                .into(),
            );
        };
        request_id.reservation.hold(reserved);
        // The batch stops taking tests once its client is gone.
        let cancel = CancellationToken::new();
        let watcher = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                gone.wait().await;
                cancel.cancel();
            }
        });
        let result = self.executor.execute_batch(batch, cancel).await;
        watcher.abort();
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match &result {
            Ok(report) => tracing::info!(
                request_id = %request_id.id,
                runtime = %runtime,
                tests,
                passed = report.tests.iter().filter(|t| t.passed()).count(),
                compile_cached = report.compile_cached,
                duration_ms = format_args!("{elapsed_ms:.1}"),
                "batch finished"
            ),
            Err(e) => tracing::warn!(
                request_id = %request_id.id,
                runtime = %runtime,
                outcome = "rejected",
                error = %e,
                "batch not run"
            ),
        }
        result.map_err(ApiError::from)
    }
}

fn to_response(
    runtime: &crate::runtimes::Runtime,
    report: &BatchReport,
    names: &[Option<String>],
) -> ExecuteResponse {
    let results: Vec<TestResult> = report
        .tests
        .iter()
        .enumerate()
        .map(|(i, test)| to_test(test, names.get(i).cloned().flatten()))
        .collect();
    let count = |outcome| {
        let n = results.iter().filter(|t| t.outcome == outcome).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    };
    let first_failure = report
        .tests
        .iter()
        .position(|t| t.run.is_some() && !t.passed());
    // The batch's status: the compile's when it failed, else the first failed test's run
    // status (`ok` for a wrong answer), else `ok`.
    let status = match (&report.compile, first_failure) {
        (Some(c), _) if c.status != StageStatus::Ok => c.status,
        (_, Some(i)) => report.tests[i]
            .run
            .as_ref()
            .map_or(StageStatus::InternalError, |r| r.status),
        _ => StageStatus::Ok,
    };
    ExecuteResponse {
        runtime: runtime.name.clone(),
        version: runtime.version.clone(),
        status: Status::from(status),
        compile: report
            .compile
            .as_ref()
            .map(|c| to_compile_stage(c, report.compile_cached)),
        run: None,
        verdict: None,
        summary: Some(BatchSummary {
            total: u32::try_from(results.len()).unwrap_or(u32::MAX),
            passed: count(TestOutcome::Passed),
            failed: count(TestOutcome::Failed),
            skipped: count(TestOutcome::Skipped),
            first_failure: first_failure.and_then(|i| u32::try_from(i).ok()),
            stopped: report.stopped.map(|s| match s {
                StopReason::CompileFailed => BatchStop::CompileError,
                StopReason::FirstFailure => BatchStop::FirstFailure,
                StopReason::WallTime => BatchStop::WallTime,
                StopReason::ClientGone => BatchStop::ClientGone,
                StopReason::ShuttingDown => BatchStop::ShuttingDown,
            }),
            wall_time_ms: u64::try_from(report.wall_time.as_millis()).unwrap_or(u64::MAX),
        }),
        tests: Some(results),
    }
}

fn to_test(test: &TestReport, name: Option<String>) -> TestResult {
    let outcome = match (&test.run, test.passed()) {
        (None, _) => TestOutcome::Skipped,
        (Some(_), true) => TestOutcome::Passed,
        (Some(_), false) => TestOutcome::Failed,
    };
    TestResult {
        name,
        outcome,
        verdict: test.output_matches.map(|ok| {
            if ok {
                Verdict::Accepted
            } else {
                Verdict::WrongAnswer
            }
        }),
        run: test.run.as_ref().map(to_stage),
    }
}
