//! `POST /api/v1/execute`: the full execution API. Thin mappings over the core's request
//! and report types. (The runtime list is `runtimes.rs`.) Over 400 lines on purpose: the
//! request types, the answer types and the mapping between them and the core are one API
//! version, read together. Test-case batches (`tests`) are `batch.rs`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi};

use crate::api::errors::{ApiError, ErrorBody, ErrorCode, ErrorJson, error_variants};
use crate::api::text::Text;
use crate::api::{ApiTags, AppState, RequestId};

pub mod batch;
use crate::execution::{
    ExecutionReport, ExecutionRequest, LimitsOverride, SourceFile, StageReport, StageStatus,
    output_matches, validate_file_name,
};
use crate::runtimes::Runtime;

const MAX_FILES: usize = 64;
const MAX_ARGS: usize = 256;

/// How a text field is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Encoding {
    /// Plain UTF-8 text.
    Utf8,
    /// Base64 (standard alphabet, padded) of arbitrary bytes.
    Base64,
}

/// One source file.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct FileInput {
    /// Path relative to the work dir (`main.py`, `src/util.py`): no absolute paths, no `..`.
    /// Defaults to the runtime's `file_name` for the first file.
    #[oai(deserialize_with = "crate::api::text::file_name")]
    pub name: Option<Text>,
    /// The file's content, encoded as `encoding` says.
    #[oai(deserialize_with = "crate::api::text::file_content")]
    pub content: Text,
    /// `utf8` (default) or `base64`.
    pub encoding: Option<Encoding>,
}

/// Limits for this request. Each may lower the runtime's default or raise it up to the
/// runtime's and server's maximum (see `GET /api/v1/runtimes`); asking for more is a 422.
#[derive(Debug, Clone, Default, Object)]
#[oai(deny_unknown_fields)]
pub struct RequestLimits {
    /// Wall-clock time of the run stage in milliseconds.
    #[oai(deserialize_with = "crate::api::text::wall_time_ms")]
    pub wall_time_ms: Option<u64>,
    /// CPU time in milliseconds, of the whole process tree where the host's cgroups count
    /// it (see `cpu_enforcement` in `GET /health`); else per process, in whole seconds.
    #[oai(deserialize_with = "crate::api::text::cpu_time_ms")]
    pub cpu_time_ms: Option<u64>,
    /// Memory in bytes.
    #[oai(deserialize_with = "crate::api::text::memory_bytes")]
    pub memory_bytes: Option<u64>,
    /// Processes and threads.
    #[oai(deserialize_with = "crate::api::text::processes")]
    pub processes: Option<u64>,
    /// Largest file the program may write, in bytes.
    #[oai(deserialize_with = "crate::api::text::file_size_bytes")]
    pub file_size_bytes: Option<u64>,
    /// Open file descriptors.
    #[oai(deserialize_with = "crate::api::text::open_files")]
    pub open_files: Option<u64>,
    /// Bytes kept per output stream.
    #[oai(deserialize_with = "crate::api::text::output_bytes")]
    pub output_bytes: Option<u64>,
    /// Size of the work dir plus /tmp, in bytes.
    #[oai(deserialize_with = "crate::api::text::workdir_bytes")]
    pub workdir_bytes: Option<u64>,
}

/// Limits of the compile stage for this request, as `limits` for the run: each may lower
/// the runtime's compile limit or raise it up to the compile maximum (`max_compile_limits`
/// in `GET /api/v1/runtimes`); asking for more is a 422. Part of the compile cache's key.
#[derive(Debug, Clone, Default, Object)]
#[oai(deny_unknown_fields)]
pub struct CompileLimits {
    /// Wall-clock time of the compile stage in milliseconds.
    #[oai(deserialize_with = "crate::api::text::wall_time_ms")]
    pub wall_time_ms: Option<u64>,
    /// CPU time in milliseconds, of the whole compiler process tree where counted.
    #[oai(deserialize_with = "crate::api::text::cpu_time_ms")]
    pub cpu_time_ms: Option<u64>,
    /// Memory in bytes.
    #[oai(deserialize_with = "crate::api::text::memory_bytes")]
    pub memory_bytes: Option<u64>,
    /// Processes and threads.
    #[oai(deserialize_with = "crate::api::text::processes")]
    pub processes: Option<u64>,
    /// Largest file the compiler may write, in bytes.
    #[oai(deserialize_with = "crate::api::text::file_size_bytes")]
    pub file_size_bytes: Option<u64>,
    /// Open file descriptors.
    #[oai(deserialize_with = "crate::api::text::open_files")]
    pub open_files: Option<u64>,
    /// Bytes kept per output stream of the compiler.
    #[oai(deserialize_with = "crate::api::text::output_bytes")]
    pub output_bytes: Option<u64>,
    /// Size of the work dir plus /tmp during the compile, in bytes.
    #[oai(deserialize_with = "crate::api::text::workdir_bytes")]
    pub workdir_bytes: Option<u64>,
}

/// A program to run. Unknown fields are refused (400 naming the field): a typo such as
/// `limits.memory` for `limits.memory_bytes` must not run with the limit unchanged.
#[derive(Debug, Object)]
#[oai(example, deny_unknown_fields)]
pub struct ExecuteRequest {
    /// Runtime name or alias (`python3`, `py`, `c`...); the server's default when absent.
    #[oai(deserialize_with = "crate::api::text::runtime")]
    pub runtime: Option<Text>,
    /// Version selector: `3` or `3.11` matches 3.11.2; absent or `*` takes any.
    #[oai(deserialize_with = "crate::api::text::version")]
    pub version: Option<Text>,
    /// The source files; give either `files` or `code`.
    pub files: Option<Vec<FileInput>>,
    /// Shorthand for one file saved under the runtime's `file_name`.
    #[oai(deserialize_with = "crate::api::text::code")]
    pub code: Option<Text>,
    /// Name of the file the runtime runs (its `{file}`); the first file when absent.
    #[oai(deserialize_with = "crate::api::text::entry")]
    pub entry: Option<Text>,
    /// Standard input for the run stage (UTF-8).
    #[oai(deserialize_with = "crate::api::text::stdin")]
    pub stdin: Option<Text>,
    /// Command-line arguments appended to the run command.
    #[oai(deserialize_with = "crate::api::text::args")]
    pub args: Option<Vec<Text>>,
    pub limits: Option<RequestLimits>,
    /// Limits of the compile stage (compiled runtimes only).
    pub compile_limits: Option<CompileLimits>,
    /// When given, the response has a `verdict`: `accepted` if stdout equals this,
    /// ignoring trailing whitespace on each line and trailing blank lines.
    #[oai(deserialize_with = "crate::api::text::expected_output")]
    pub expected_output: Option<Text>,
    /// A batch: the program is compiled once and run once per test, each run in a fresh
    /// sandbox under `limits`; the answer has `tests` and `summary` instead of `run`.
    /// With `tests`, give `stdin` and `expected_output` per test (top-level `args` are
    /// the default of a test without its own).
    pub tests: Option<Vec<batch::TestInput>>,
    /// With `tests`: start no test after one failed (a test fails when its run does not
    /// end `ok` or its output does not match). Default false.
    pub stop_at_first_failure: Option<bool>,
    /// With `tests`: the whole batch's wall-time budget in ms (default and maximum: the
    /// server's `execution.max_batch_wall_time_ms`). No test starts after it, and a test's
    /// wall-time limit is cut to what is left of it.
    #[oai(deserialize_with = "crate::api::text::batch_wall_time_ms")]
    pub batch_wall_time_ms: Option<u64>,
}

impl poem_openapi::types::Example for ExecuteRequest {
    fn example() -> Self {
        ExecuteRequest {
            runtime: Some("python3".into()),
            version: None,
            files: Some(vec![FileInput {
                name: Some("main.py".into()),
                content:
                    "import sys\nname = sys.stdin.readline().strip()\nprint(f\"Hello, {name}!\")\n"
                        .into(),
                encoding: None,
            }]),
            code: None,
            entry: None,
            stdin: Some("world\n".into()),
            args: None,
            limits: Some(RequestLimits {
                wall_time_ms: Some(5000),
                ..Default::default()
            }),
            compile_limits: None,
            expected_output: Some("Hello, world!".into()),
            tests: None,
            stop_at_first_failure: None,
            batch_wall_time_ms: None,
        }
    }
}

/// The outcome of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum Status {
    /// Exited with code 0.
    Ok,
    /// Exited non-zero or was killed by a signal (not a limit).
    RuntimeError,
    /// Ran out of wall-clock or CPU time (`limit` says which).
    Timeout,
    /// Ran out of memory.
    MemoryLimit,
    /// Wrote more than the output limit to a stream and was stopped.
    OutputLimit,
    /// The compile stage failed; there is no run stage.
    CompileError,
    /// The sandbox failed; not the program's fault (`message` says why).
    InternalError,
}

impl From<StageStatus> for Status {
    fn from(s: StageStatus) -> Self {
        match s {
            StageStatus::Ok => Status::Ok,
            StageStatus::RuntimeError => Status::RuntimeError,
            StageStatus::Timeout => Status::Timeout,
            StageStatus::MemoryLimit => Status::MemoryLimit,
            StageStatus::OutputLimit => Status::OutputLimit,
            StageStatus::CompileError => Status::CompileError,
            StageStatus::InternalError => Status::InternalError,
        }
    }
}

/// Whether the output matched `expected_output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum Verdict {
    Accepted,
    WrongAnswer,
}

/// The result of one stage.
/// Optional fields are absent when empty, never `null` (the rule for every answer).
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct StageResult {
    pub status: Status,
    /// stdout, as UTF-8 text or, when it is not valid UTF-8, base64 (see `stdout_encoding`).
    pub stdout: String,
    pub stdout_encoding: Encoding,
    /// True when stdout was cut at the output limit.
    pub stdout_truncated: bool,
    /// stderr, encoded like stdout (see `stderr_encoding`).
    pub stderr: String,
    pub stderr_encoding: Encoding,
    /// True when stderr was cut at the output limit.
    pub stderr_truncated: bool,
    /// The exit code; absent when a signal ended the process.
    pub exit_code: Option<i32>,
    /// The signal number that ended the process, if one did.
    pub signal: Option<i32>,
    /// The limit that ended the stage: `wall_time`, `cpu_time`, `memory`, `output` or
    /// `file_size`.
    pub limit: Option<String>,
    /// Wall-clock time of the stage in milliseconds, sandbox set-up included.
    pub wall_time_ms: u64,
    /// CPU time (user + system) of the stage's processes.
    pub cpu_time_ms: Option<u64>,
    /// Peak memory of this stage: the slot cgroup's peak for this run where the kernel can
    /// reset it (cgroup v1; v2 on kernels 6.12+), else the largest single process's
    /// resident size (v2 before 6.12, or no memory cgroup).
    pub peak_memory_bytes: Option<u64>,
    /// Detail for `internal_error`; for a stage a limit ended, which limit and its value
    /// (`stopped at the wall-time limit of 2000 ms`).
    pub message: Option<String>,
    /// For the compile stage: true when this result came from the compile cache (an
    /// identical compile ran before, and its output was reused), false when it ran now.
    pub cached: Option<bool>,
}

/// The result of a submission.
#[derive(Debug, Object)]
#[oai(example, skip_serializing_if_is_none)]
pub struct ExecuteResponse {
    /// The runtime that ran (its name, even when an alias was asked for).
    pub runtime: String,
    /// The runtime's version.
    pub version: Option<String>,
    /// The outcome of the submission: the run stage's, or the compile stage's when it failed.
    pub status: Status,
    /// Present when the runtime compiles.
    pub compile: Option<StageResult>,
    /// Absent when compiling failed, and for a batch (see `tests`).
    pub run: Option<StageResult>,
    /// Present when `expected_output` was given and the run stage ended `ok`.
    pub verdict: Option<Verdict>,
    /// For a batch: one result per test, in the request's order.
    pub tests: Option<Vec<batch::TestResult>>,
    /// For a batch: how many passed and failed, and the first failure.
    pub summary: Option<batch::BatchSummary>,
}

impl poem_openapi::types::Example for ExecuteResponse {
    fn example() -> Self {
        ExecuteResponse {
            runtime: "python3".into(),
            version: Some("3.11.2".into()),
            status: Status::Ok,
            compile: None,
            run: Some(StageResult {
                status: Status::Ok,
                stdout: "Hello, world!\n".into(),
                stdout_encoding: Encoding::Utf8,
                stdout_truncated: false,
                stderr: String::new(),
                stderr_encoding: Encoding::Utf8,
                stderr_truncated: false,
                exit_code: Some(0),
                signal: None,
                limit: None,
                wall_time_ms: 24,
                cpu_time_ms: Some(18),
                peak_memory_bytes: Some(9_437_184),
                message: None,
                cached: None,
            }),
            verdict: Some(Verdict::Accepted),
            tests: None,
            summary: None,
        }
    }
}

// Built once per request and moved once: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(ApiResponse)]
#[oai(bad_request_handler = "ExecuteResult::bad_request")]
pub enum ExecuteResult {
    /// The submission ran (whatever its outcome: see `status`).
    #[oai(status = 200)]
    Ok(Json<ExecuteResponse>),
    /// The body is not valid JSON or has wrongly typed fields.
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
    /// Unknown or unavailable runtime, version mismatch, a limit above the maximum, or
    /// invalid files (`code` says which).
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
    /// The daemon failed; not caused by the request.
    #[oai(status = 500)]
    Internal(ErrorJson),
}

error_variants!(ExecuteResult);

pub struct ExecuteApi;

#[OpenApi(prefix_path = "/api/v1")]
impl ExecuteApi {
    /// Run a program
    ///
    /// Runs one or more files with a runtime, optional stdin, args and limits. Compiled
    /// runtimes get a `compile` stage first; the `run` stage is absent when compiling failed.
    /// Output that is not valid UTF-8 comes back base64 with its encoding flag set.
    #[oai(path = "/execute", method = "post", tag = "ApiTags::Execution")]
    async fn execute(
        &self,
        state: poem::web::Data<&AppState>,
        request_id: poem::web::Data<&RequestId>,
        body: Json<ExecuteRequest>,
    ) -> ExecuteResult {
        let mut body = body.0;
        if let Some(tests) = body.tests.take() {
            return batch::execute(&state, &request_id, body, tests).await;
        }
        if body.stop_at_first_failure.is_some() || body.batch_wall_time_ms.is_some() {
            return invalid("`stop_at_first_failure` and `batch_wall_time_ms` need `tests`").into();
        }
        let expected = body.expected_output.clone().map(Text::into_string);
        let request = match to_core_request(&state, body) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        let runtime = request.runtime.clone();
        match state.run(&request_id, request).await {
            Ok(report) => ExecuteResult::Ok(Json(to_response(&runtime, &report, expected))),
            Err(e) => e.into(),
        }
    }
}

pub(super) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::Unprocessable(ErrorBody::new(ErrorCode::InvalidRequest, message))
}

pub(super) fn to_core_request(
    state: &AppState,
    body: ExecuteRequest,
) -> Result<ExecutionRequest, ApiError> {
    let runtime = state
        .runtimes
        .snapshot()
        .resolve(body.runtime.as_deref(), body.version.as_deref())?;
    let inputs = match (body.files, body.code) {
        (Some(_), Some(_)) => return Err(invalid("give either `files` or `code`, not both")),
        (None, None) => return Err(invalid("give `files` or `code`")),
        (None, Some(code)) => vec![FileInput {
            name: None,
            content: code,
            encoding: None,
        }],
        (Some(files), None) => files,
    };
    if inputs.is_empty() || inputs.len() > MAX_FILES {
        return Err(invalid(format!("`files` must hold 1 to {MAX_FILES} files")));
    }
    let mut files = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate() {
        let content = match input.encoding.unwrap_or(Encoding::Utf8) {
            Encoding::Utf8 => input.content.into_string().into_bytes(),
            Encoding::Base64 => BASE64.decode(input.content.as_bytes()).map_err(|e| {
                let name = input.name.as_deref().unwrap_or(&runtime.file_name);
                invalid(format!("files[{i}] (`{name}`): invalid base64: {e}"))
            })?,
        };
        let name = match input.name {
            Some(n) => n.into_string(),
            // Java: `public class HelloWorld` is saved as `HelloWorld.java`.
            None if i == 0 => runtime.file_name_for(&content),
            None => return Err(invalid(format!("files[{i}] needs a `name`"))),
        };
        validate_file_name(&name).map_err(|e| invalid(format!("files[{i}]: {e}")))?;
        if files.iter().any(|f: &SourceFile| f.name == name) {
            return Err(invalid(format!("files[{i}]: duplicate file name `{name}`")));
        }
        files.push(SourceFile { name, content });
    }
    let entry = match body.entry {
        Some(entry) if files.iter().any(|f| *f.name == *entry) => entry.into_string(),
        Some(entry) => {
            return Err(invalid(format!(
                "`entry` names `{entry}`, which is not among the files"
            )));
        }
        None => files[0].name.clone(),
    };
    let args: Vec<String> = body
        .args
        .unwrap_or_default()
        .into_iter()
        .map(Text::into_string)
        .collect();
    if args.len() > MAX_ARGS {
        return Err(invalid(format!("at most {MAX_ARGS} `args`")));
    }
    if args.iter().any(|a| a.contains('\0')) {
        return Err(invalid("`args` must not contain NUL characters"));
    }
    let asked = body.limits.map(to_override).unwrap_or_default();
    let limits = runtime.limits.apply_request(&asked, &runtime.max_limits)?;
    let runtime = match body.compile_limits {
        None => runtime,
        Some(_) if runtime.compile.is_none() => {
            return Err(invalid(format!(
                "`compile_limits`: runtime `{}` has no compile stage",
                runtime.name
            )));
        }
        Some(asked) => {
            let asked = compile_override(asked);
            let compile_limits = runtime
                .compile_limits
                .apply_request(&asked, &runtime.max_compile_limits)
                .map_err(|e| {
                    ApiError::Unprocessable(ErrorBody::new(
                        ErrorCode::LimitExceeded,
                        format!("compile_limits: {e}"),
                    ))
                })?;
            // The request's compile stage runs under its own limits (the runtime as
            // loaded stays as it is for everyone else).
            std::sync::Arc::new(Runtime {
                compile_limits,
                ..Runtime::clone(&runtime)
            })
        }
    };
    let request = ExecutionRequest {
        runtime,
        files,
        entry,
        stdin: body.stdin.unwrap_or_default().into_string().into_bytes(),
        args,
        limits,
    };
    request.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(request)
}

fn to_override(l: RequestLimits) -> LimitsOverride {
    LimitsOverride {
        wall_time_ms: l.wall_time_ms,
        cpu_time_ms: l.cpu_time_ms,
        memory_bytes: l.memory_bytes,
        processes: l.processes,
        file_size_bytes: l.file_size_bytes,
        open_files: l.open_files,
        output_bytes: l.output_bytes,
        workdir_bytes: l.workdir_bytes,
    }
}

fn compile_override(l: CompileLimits) -> LimitsOverride {
    LimitsOverride {
        wall_time_ms: l.wall_time_ms,
        cpu_time_ms: l.cpu_time_ms,
        memory_bytes: l.memory_bytes,
        processes: l.processes,
        file_size_bytes: l.file_size_bytes,
        open_files: l.open_files,
        output_bytes: l.output_bytes,
        workdir_bytes: l.workdir_bytes,
    }
}

fn encode(bytes: &[u8]) -> (String, Encoding) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_string(), Encoding::Utf8),
        Err(_) => (BASE64.encode(bytes), Encoding::Base64),
    }
}

pub(super) fn to_stage(stage: &StageReport) -> StageResult {
    let (stdout, stdout_encoding) = encode(&stage.stdout);
    let (stderr, stderr_encoding) = encode(&stage.stderr);
    StageResult {
        status: stage.status.into(),
        stdout,
        stdout_encoding,
        stdout_truncated: stage.stdout_truncated,
        stderr,
        stderr_encoding,
        stderr_truncated: stage.stderr_truncated,
        exit_code: stage.exit_code,
        signal: stage.signal,
        limit: stage.limit.map(|l| l.as_str().to_string()),
        wall_time_ms: stage.wall_time.as_millis() as u64,
        cpu_time_ms: stage.cpu_time.map(|d| d.as_millis() as u64),
        peak_memory_bytes: stage.peak_memory_bytes,
        message: stage.message.clone(),
        cached: None,
    }
}

/// The compile stage's result, saying whether it came from the compile cache.
pub(super) fn to_compile_stage(stage: &StageReport, cached: bool) -> StageResult {
    StageResult {
        cached: Some(cached),
        ..to_stage(stage)
    }
}

fn to_response(
    runtime: &Runtime,
    report: &ExecutionReport,
    expected: Option<String>,
) -> ExecuteResponse {
    let verdict = match (&report.run, expected) {
        (Some(run), Some(expected)) if run.status == StageStatus::Ok => {
            Some(if output_matches(&run.stdout, &expected) {
                Verdict::Accepted
            } else {
                Verdict::WrongAnswer
            })
        }
        _ => None,
    };
    ExecuteResponse {
        runtime: runtime.name.clone(),
        version: runtime.version.clone(),
        status: report.status().into(),
        compile: report
            .compile
            .as_ref()
            .map(|c| to_compile_stage(c, report.compile_cached)),
        run: report.run.as_ref().map(to_stage),
        verdict,
        tests: None,
        summary: None,
    }
}
