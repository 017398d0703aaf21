//! `POST /submit_code`: the original service's contract, kept exactly.

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::errors::{ApiError, ErrorBody, ErrorCode, ErrorJson, error_variants};
use super::text::Text;
use super::{ApiTags, AppState, RequestId};
use crate::execution::{ExecutionReport, ExecutionRequest, LimitKind, StageStatus};

/// A program to run.
#[derive(Debug, Object)]
#[oai(example)]
pub struct SubmitCodeRequest {
    /// The source code to run, saved as the runtime's file (`main.py` for python3).
    #[oai(deserialize_with = "super::text::code_required")]
    pub code: Text,
    /// Optional runtime name or alias (see `GET /api/v1/runtimes`); python3 when absent.
    #[oai(deserialize_with = "super::text::runtime")]
    pub runtime: Option<Text>,
}

impl poem_openapi::types::Example for SubmitCodeRequest {
    fn example() -> Self {
        SubmitCodeRequest {
            code: "print(\"Hello from FastAPI!\")".into(),
            runtime: None,
        }
    }
}

/// The result, in the original service's shape.
#[derive(Debug, Object)]
#[oai(example)]
pub struct SubmitCodeResponse {
    /// `success` when the program exited with code 0, else `failure`.
    pub status: String,
    /// Everything the program wrote to stdout (invalid UTF-8 is replaced by U+FFFD).
    pub output: String,
    /// Everything it wrote to stderr; on a timeout, `TimeoutExpired: Command exceeded N
    /// seconds.`; when a limit stopped it, a last line names that limit.
    pub error: String,
    /// The exit code; -1 on a timeout; minus the signal number when a signal killed it.
    pub return_code: i32,
    /// True when the program ran out of time (wall clock or CPU).
    pub timeout: bool,
    /// True when stdout or stderr was cut at the output limit (an addition to the original
    /// contract; older clients can ignore it).
    pub truncated: bool,
}

impl poem_openapi::types::Example for SubmitCodeResponse {
    fn example() -> Self {
        SubmitCodeResponse {
            status: "success".into(),
            output: "Hello from FastAPI!\n".into(),
            error: String::new(),
            return_code: 0,
            timeout: false,
            truncated: false,
        }
    }
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "SubmitResponse::bad_request")]
pub enum SubmitResponse {
    /// The program ran (whatever its outcome: see `status`).
    #[oai(status = 200)]
    Ok(Json<SubmitCodeResponse>),
    /// The body is not valid JSON or lacks `code`.
    #[oai(status = 400)]
    BadRequest(ErrorJson),
    /// A valid API key is required (only when `server.api_keys` is set).
    #[oai(status = 401)]
    Unauthorized(ErrorJson),
    /// The body is larger than `server.max_body_bytes`.
    #[oai(status = 413)]
    PayloadTooLarge(ErrorJson),
    /// The body is not JSON (`Content-Type: application/json`).
    #[oai(status = 415)]
    UnsupportedMediaType(ErrorJson),
    /// The runtime is unknown or not installed on this server.
    #[oai(status = 422)]
    Unprocessable(ErrorJson),
    /// Every slot is busy and the queue is full; retry after the given seconds.
    #[oai(status = 429)]
    Busy(ErrorJson, #[oai(header = "Retry-After")] u64),
    /// The daemon is shutting down (draining before a restart or a scale-down): the
    /// submission was not run, or was killed when the shutdown grace period ended. Send it
    /// again after the given seconds; behind a load balancer another replica runs it.
    #[oai(status = 503)]
    Unavailable(ErrorJson, #[oai(header = "Retry-After")] u64),
    /// The sandbox failed; not caused by the request.
    #[oai(status = 500)]
    Internal(ErrorJson),
}

error_variants!(SubmitResponse);

pub struct SubmitApi;

#[OpenApi]
impl SubmitApi {
    /// Run a program (original contract)
    ///
    /// Runs `code` with the default runtime (python3) or the one named in `runtime`, in the
    /// sandbox and under the server's default limits, and answers in the original
    /// service's shape.
    #[oai(path = "/submit_code", method = "post", tag = "ApiTags::Execution")]
    async fn submit_code(
        &self,
        state: poem::web::Data<&AppState>,
        request_id: poem::web::Data<&RequestId>,
        body: Json<SubmitCodeRequest>,
    ) -> SubmitResponse {
        let body = body.0;
        let runtime = match state
            .runtimes
            .snapshot()
            .resolve(body.runtime.as_deref(), None)
        {
            Ok(r) => r,
            Err(e) => return ApiError::from(e).into(),
        };
        let request = ExecutionRequest::single_file(runtime, body.code.into_string());
        if let Err(e) = request.validate() {
            return ApiError::Unprocessable(ErrorBody::new(
                ErrorCode::InvalidRequest,
                e.to_string(),
            ))
            .into();
        }
        match state.run(&request_id, request).await {
            Ok(report) => match to_seed_shape(&report) {
                Some(response) => SubmitResponse::Ok(Json(response)),
                None => ApiError::Internal(ErrorBody::new(
                    ErrorCode::InternalError,
                    report
                        .final_stage()
                        .and_then(|s| s.message.clone())
                        .unwrap_or_else(|| "the sandbox failed".into()),
                ))
                .into(),
            },
            Err(e) => e.into(),
        }
    }
}

fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        (ms / 1000).to_string()
    } else {
        format!("{}", ms as f64 / 1000.0)
    }
}

/// Map a report to the original shape; `None` for an internal error (answered as 500).
fn to_seed_shape(report: &ExecutionReport) -> Option<SubmitCodeResponse> {
    let stage = report.final_stage()?;
    if stage.status == StageStatus::InternalError {
        return None;
    }
    let output = String::from_utf8_lossy(&stage.stdout).into_owned();
    let mut error = String::from_utf8_lossy(&stage.stderr).into_owned();
    let limits = &stage.limits;
    let limit_line = match stage.limit {
        // The original service answered exactly this, with nothing else in `error`, for any
        // run that ran out of time; which clock it was (and the partial output) is in
        // `/api/v1/execute`'s answer.
        Some(LimitKind::WallTime) => {
            error = format!(
                "TimeoutExpired: Command exceeded {} seconds.",
                seconds(limits.wall_time_ms)
            );
            None
        }
        Some(LimitKind::CpuTime) => {
            error = format!(
                "TimeoutExpired: Command exceeded {} seconds.",
                seconds(limits.cpu_time_ms)
            );
            None
        }
        Some(LimitKind::Memory) => Some(format!(
            "MemoryLimitExceeded: Command exceeded {} bytes of memory.",
            limits.memory_bytes
        )),
        Some(LimitKind::Output) => Some(format!(
            "OutputLimitExceeded: Command wrote more than {} bytes to one stream and was stopped.",
            limits.output_bytes
        )),
        Some(LimitKind::FileSize) => Some(format!(
            "FileSizeLimitExceeded: Command wrote a file larger than {} bytes.",
            limits.file_size_bytes
        )),
        None => None,
    };
    if let Some(line) = limit_line {
        if !error.is_empty() && !error.ends_with('\n') {
            error.push('\n');
        }
        error.push_str(&line);
    }
    let timeout = matches!(stage.limit, Some(LimitKind::WallTime | LimitKind::CpuTime));
    let return_code = if timeout {
        -1
    } else {
        stage.exit_code.or(stage.signal.map(|s| -s)).unwrap_or(-1)
    };
    let success = stage.status == StageStatus::Ok && report.run.is_some();
    Some(SubmitCodeResponse {
        status: if success { "success" } else { "failure" }.into(),
        output,
        error,
        return_code,
        timeout,
        truncated: stage.stdout_truncated || stage.stderr_truncated,
    })
}
