//! `/api/v2`: a drop-in for Piston's v2 API (engineer-man/piston, `docs/api-v2.md` and
//! `api/src/api/v2.js`), so Piston clients work unchanged. A thin mapping over the same core
//! as `/api/v1`: requests become an [`ExecutionRequest`] run through [`AppState::run`]
//! (admission, response budget, client-gone, metrics), reports become Piston's shapes.
//!
//! What is Piston's here, on purpose: field names, `null` for an absent `code`, `signal`,
//! `message`, `status`..., signal names (`SIGKILL`), isolate's status codes (`RE`, `SG`,
//! `TO`, `OL`, `EL`, `XX`), the error body `{"message"}` with status 400 for every request
//! problem, the messages of `v2.js`'s checks, `run` copying `compile` when compiling failed,
//! stdin getting a trailing newline, `-1` meaning "no limit" (here: the maximum).
//!
//! Languages: a request's `language` selects every runtime whose `language`, name or alias
//! it equals (any case); `version` is a node-semver range (`*`, `3`, `3.x`, `^3.10`,
//! `>=3 <4`, `3.11.2`, `a || b`) matched against the runtime's version read as
//! `MAJOR.MINOR.PATCH`; the highest matching version wins. `GET /api/v2/runtimes` lists
//! each available runtime under its `language` (Piston's names: `python`, `javascript`,
//! `c++`...), with the runtime's name and aliases as `aliases` and the name as `runtime`
//! when it differs from the language.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine as _;
use poem::web::Data;
use poem::{Request, RequestBody};
use poem_openapi::payload::Json;
use poem_openapi::registry::{MetaMediaType, MetaRequest, MetaSchema, MetaSchemaRef, Registry};
use poem_openapi::types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use poem_openapi::{ApiExtractor, ApiExtractorType, ApiResponse, Enum, ExtractParamOptions};
use poem_openapi::{Object, OpenApi};
use serde_json::{Map, Value};

use super::errors::{ApiError, ErrorCode};
use super::{ApiTags, AppState, RequestId};
use crate::execution::{
    ExecutionReport, ExecutionRequest, LimitExceeded, Limits, LimitsOverride, SourceFile,
    StageReport, StageStatus, validate_file_name,
};
use crate::runtimes::{Runtime, RuntimeSet};

const MAX_FILES: usize = 64;

// ---- Schemas (what the spec publishes; the body is read by `parse_request`, which keeps
// Piston's own checks and messages).

/// How a file's `content` is encoded (Piston's `files[].encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "PistonEncoding", rename_all = "lowercase")]
pub enum PistonEncoding {
    /// Plain UTF-8 text (the default).
    Utf8,
    /// Base64 of arbitrary bytes.
    Base64,
    /// Hexadecimal digits, two per byte.
    Hex,
}

/// One file of a Piston execution.
#[derive(Debug, Clone, Object)]
#[oai(rename = "PistonFile", skip_serializing_if_is_none)]
pub struct PistonFile {
    /// Path relative to the work dir, no `..`. Absent: the runtime's file name for the file
    /// that runs, `file{i}.code` for the others.
    pub name: Option<String>,
    /// The file's content, encoded as `encoding` says.
    pub content: String,
    /// `utf8` (default), `base64` or `hex`; the first `utf8` file is the one that runs, the
    /// others are data.
    pub encoding: Option<PistonEncoding>,
}

/// A Piston v2 execution request. Unknown fields are ignored, as Piston does.
#[derive(Debug, Clone, Object)]
#[oai(rename = "PistonExecuteRequest", example, skip_serializing_if_is_none)]
pub struct PistonExecuteRequest {
    /// A language as `GET /api/v2/runtimes` lists it (`python`), or one of its aliases
    /// (`python3`, `py`).
    pub language: String,
    /// A node-semver range over the version: `*` for any, `3`, `3.x`, `^3.10`, `>=3 <4` or
    /// an exact version from `GET /api/v2/runtimes`.
    pub version: String,
    /// The files; at least one must be `utf8` encoded.
    pub files: Vec<PistonFile>,
    /// Standard input of the run stage; a trailing newline is added when missing (as
    /// Piston does).
    pub stdin: Option<String>,
    /// Arguments appended to the run command.
    pub args: Option<Vec<String>>,
    /// Wall-clock limit of the compile stage, in ms; at most the runtime's compile limit
    /// (its default). `-1` or `0`: that limit.
    #[oai(validator(minimum(value = "-1")))]
    pub compile_timeout: Option<i64>,
    /// Wall-clock limit of the run stage, in ms; at most the runtime's maximum. `-1` or
    /// `0`: the maximum; absent: the runtime's default.
    #[oai(validator(minimum(value = "-1")))]
    pub run_timeout: Option<i64>,
    /// CPU-time limit of the compile stage, in ms (as `compile_timeout`).
    #[oai(validator(minimum(value = "-1")))]
    pub compile_cpu_time: Option<i64>,
    /// CPU-time limit of the run stage, in ms (as `run_timeout`).
    #[oai(validator(minimum(value = "-1")))]
    pub run_cpu_time: Option<i64>,
    /// Memory limit of the compile stage, in bytes (as `compile_timeout`).
    #[oai(validator(minimum(value = "-1")))]
    pub compile_memory_limit: Option<i64>,
    /// Memory limit of the run stage, in bytes (as `run_timeout`).
    #[oai(validator(minimum(value = "-1")))]
    pub run_memory_limit: Option<i64>,
}

impl poem_openapi::types::Example for PistonExecuteRequest {
    fn example() -> Self {
        PistonExecuteRequest {
            language: "python".into(),
            version: "3".into(),
            files: vec![PistonFile {
                name: Some("main.py".into()),
                content: "import sys\nprint(input(), sys.argv[1:])\n".into(),
                encoding: None,
            }],
            stdin: Some("hello".into()),
            args: Some(vec!["1".into(), "2".into()]),
            compile_timeout: None,
            run_timeout: Some(3000),
            compile_cpu_time: None,
            run_cpu_time: None,
            compile_memory_limit: Some(-1),
            run_memory_limit: Some(-1),
        }
    }
}

/// A value that is always present, as `null` when absent: Piston's convention for `code`,
/// `signal` and the other stage fields (published as `nullable`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nullable<T>(pub Option<T>);

impl<T: Type> Type for Nullable<T> {
    const IS_REQUIRED: bool = true;
    type RawValueType = T::RawValueType;
    type RawElementValueType = T::RawElementValueType;

    fn name() -> Cow<'static, str> {
        format!("nullable_{}", T::name()).into()
    }

    fn schema_ref() -> MetaSchemaRef {
        match T::schema_ref() {
            MetaSchemaRef::Inline(mut schema) => {
                schema.nullable = true;
                MetaSchemaRef::Inline(schema)
            }
            reference => MetaSchemaRef::Inline(Box::new(MetaSchema {
                nullable: true,
                all_of: vec![reference],
                ..MetaSchema::ANY
            })),
        }
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        self.0.as_ref().and_then(Type::as_raw_value)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        match &self.0 {
            Some(value) => value.raw_element_iter(),
            None => Box::new(std::iter::empty()),
        }
    }
}

impl<T: ToJSON> ToJSON for Nullable<T> {
    fn to_json(&self) -> Option<Value> {
        Some(
            self.0
                .as_ref()
                .and_then(ToJSON::to_json)
                .unwrap_or(Value::Null),
        )
    }
}

impl<T: ParseFromJSON> ParseFromJSON for Nullable<T> {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            None | Some(Value::Null) => Ok(Nullable(None)),
            value => T::parse_from_json(value)
                .map(|v| Nullable(Some(v)))
                .map_err(ParseError::propagate),
        }
    }
}

/// The result of one stage, in Piston's shape.
#[derive(Debug, Clone, PartialEq, Object)]
#[oai(rename = "PistonStageResult")]
pub struct PistonStage {
    /// stdout (bytes that are not UTF-8 become U+FFFD).
    pub stdout: String,
    /// stderr (bytes that are not UTF-8 become U+FFFD).
    pub stderr: String,
    /// stdout followed by stderr. Piston interleaves them in the order they were written;
    /// this server captures the two streams separately, so it concatenates them.
    pub output: String,
    /// The exit code; `null` when a signal ended the process.
    pub code: Nullable<i32>,
    /// The signal that ended the process (`SIGKILL`, `SIGSEGV`...), `null` if none did.
    /// A stage stopped at a time or output limit reports `SIGKILL`, as Piston does.
    pub signal: Nullable<String>,
    /// What happened, for people (`Time limit exceeded`, `Exited with error status 1`...).
    pub message: Nullable<String>,
    /// Piston's (isolate's) status: `RE` exited non-zero, `SG` died on a signal (also the
    /// memory limit), `TO` timed out (wall clock or CPU), `OL` / `EL` stdout / stderr over
    /// the output limit, `XX` the sandbox failed; `null` when the stage exited 0.
    pub status: Nullable<String>,
    /// CPU time of the stage in milliseconds.
    pub cpu_time: Nullable<u64>,
    /// Wall-clock time of the stage in milliseconds.
    pub wall_time: Nullable<u64>,
    /// Peak memory of the stage in bytes.
    pub memory: Nullable<u64>,
}

/// The result of a Piston execution.
#[derive(Debug, Object)]
#[oai(rename = "PistonExecuteResponse", example)]
pub struct PistonExecuteResponse {
    /// The runtime's language (its name in `GET /api/v2/runtimes`, never the alias asked).
    pub language: String,
    /// The runtime's version.
    pub version: String,
    /// The run stage; when compiling failed, a copy of `compile` (as Piston answers).
    pub run: PistonStage,
    /// The compile stage; present only for runtimes that compile.
    #[oai(skip_serializing_if_is_none)]
    pub compile: Option<PistonStage>,
}

impl poem_openapi::types::Example for PistonExecuteResponse {
    fn example() -> Self {
        PistonExecuteResponse {
            language: "python".into(),
            version: "3.11.2".into(),
            run: PistonStage {
                stdout: "hello ['1', '2']\n".into(),
                stderr: String::new(),
                output: "hello ['1', '2']\n".into(),
                code: Nullable(Some(0)),
                signal: Nullable(None),
                message: Nullable(None),
                status: Nullable(None),
                cpu_time: Nullable(Some(18)),
                wall_time: Nullable(Some(24)),
                memory: Nullable(Some(9_437_184)),
            },
            compile: None,
        }
    }
}

/// A runtime as Piston lists it.
#[derive(Debug, Object)]
#[oai(rename = "PistonRuntime", skip_serializing_if_is_none)]
pub struct PistonRuntime {
    /// The language (`python`, `javascript`, `c++`...); requests may name it.
    pub language: String,
    /// The runtime's version as `MAJOR.MINOR.PATCH` (`0.0.0` when it is unknown).
    pub version: String,
    /// Other names requests may use: this server's runtime name and its aliases.
    pub aliases: Vec<String>,
    /// This server's runtime name, when it differs from `language` (`node` for
    /// `javascript`).
    pub runtime: Option<String>,
}

/// Piston's error body.
#[derive(Debug, Clone, Object)]
#[oai(rename = "PistonError", example)]
pub struct PistonError {
    /// What went wrong.
    pub message: String,
}

impl poem_openapi::types::Example for PistonError {
    fn example() -> Self {
        PistonError {
            message: "cobol-* runtime is unknown".into(),
        }
    }
}

// ---- The request body: JSON, whatever the Content-Type says it is, within reason.

/// The body of `POST /api/v2/execute`, taken as JSON when its `Content-Type` is JSON,
/// `text/plain` or absent: Piston clients built on `fetch` (such as `piston-client`) send
/// JSON without setting the header, which fetch then labels `text/plain`. Other media
/// types are refused with 415, as Piston refuses them.
pub enum PistonBody {
    Bytes(Vec<u8>),
    Unsupported(String),
}

fn accepted_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.split_once('/') {
        Some(("application", subtype)) => subtype == "json" || subtype.ends_with("+json"),
        Some(("text", "plain")) => true,
        _ => false,
    }
}

impl<'a> ApiExtractor<'a> for PistonBody {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        <PistonExecuteRequest as Type>::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType {
                content_type: "application/json",
                schema: <PistonExecuteRequest as Type>::schema_ref(),
            }],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        if let Some(content_type) = request.content_type()
            && !accepted_media_type(content_type)
        {
            return Ok(PistonBody::Unsupported(content_type.to_string()));
        }
        let bytes = body.take()?.into_vec().await?;
        Ok(PistonBody::Bytes(bytes))
    }
}

// ---- Answers.

#[allow(clippy::large_enum_variant)]
#[derive(ApiResponse)]
#[oai(bad_request_handler = "PistonExecuteResult::bad_request")]
pub enum PistonExecuteResult {
    /// The program ran, whatever its outcome (see each stage's `status`).
    #[oai(status = 200)]
    Ok(Json<PistonExecuteResponse>),
    /// The request cannot run: a missing or wrongly typed field, an unknown language or
    /// version, a limit above the maximum, bad files (Piston answers all of these 400).
    #[oai(status = 400)]
    BadRequest(Json<PistonError>),
    /// A valid API key is required (only when `server.api_keys` is set).
    #[oai(status = 401)]
    Unauthorized(
        Json<PistonError>,
        #[oai(header = "WWW-Authenticate")] String,
    ),
    /// The body is larger than `server.max_body_bytes`.
    #[oai(status = 413)]
    PayloadTooLarge(Json<PistonError>),
    /// The body is neither JSON nor `text/plain`.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<PistonError>),
    /// Every slot is busy and the queue is full; retry after the given seconds.
    #[oai(status = 429)]
    Busy(Json<PistonError>, #[oai(header = "Retry-After")] u64),
    /// The daemon is shutting down: the submission was not run, or was killed when the
    /// shutdown grace period ended; send it again after the given seconds.
    #[oai(status = 503)]
    Unavailable(Json<PistonError>, #[oai(header = "Retry-After")] u64),
    /// The daemon failed; not caused by the request.
    #[oai(status = 500)]
    Internal(Json<PistonError>),
}

impl PistonExecuteResult {
    fn bad_request(err: poem::Error) -> Self {
        let body = Json(PistonError {
            message: super::errors::describe_error(&err),
        });
        match err.status() {
            poem::http::StatusCode::PAYLOAD_TOO_LARGE => PistonExecuteResult::PayloadTooLarge(body),
            _ => PistonExecuteResult::BadRequest(body),
        }
    }
}

/// Why a request is refused: the answer's status, the code it is counted under in
/// `mde_requests_rejected_total`, and Piston's message.
#[derive(Debug)]
struct Refusal {
    status: RefusalStatus,
    code: ErrorCode,
    message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefusalStatus {
    BadRequest,
    Unauthorized,
    UnsupportedMediaType,
    Busy,
    Unavailable,
    Internal,
}

impl Refusal {
    fn bad(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status: RefusalStatus::BadRequest,
            code,
            message: message.into(),
        }
    }

    /// A malformed request (Piston's field checks).
    fn field(message: impl Into<String>) -> Refusal {
        Refusal::bad(ErrorCode::BadRequest, message)
    }

    fn into_result(self) -> PistonExecuteResult {
        let body = Json(PistonError {
            message: self.message,
        });
        match self.status {
            RefusalStatus::BadRequest => PistonExecuteResult::BadRequest(body),
            RefusalStatus::Unauthorized => PistonExecuteResult::Unauthorized(body, "Bearer".into()),
            RefusalStatus::UnsupportedMediaType => PistonExecuteResult::UnsupportedMediaType(body),
            RefusalStatus::Busy => {
                PistonExecuteResult::Busy(body, super::errors::RETRY_AFTER_SECONDS)
            }
            RefusalStatus::Unavailable => {
                PistonExecuteResult::Unavailable(body, super::errors::RETRY_AFTER_SECONDS)
            }
            RefusalStatus::Internal => PistonExecuteResult::Internal(body),
        }
    }
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        match e {
            // Piston answers 400 for everything a request gets wrong.
            ApiError::Unprocessable(b) => Refusal::bad(b.code, b.message),
            ApiError::Busy(b) => Refusal {
                status: RefusalStatus::Busy,
                code: b.code,
                message: b.message,
            },
            ApiError::Unavailable(b) => Refusal {
                status: RefusalStatus::Unavailable,
                code: b.code,
                message: b.message,
            },
            ApiError::Internal(b) => Refusal {
                status: RefusalStatus::Internal,
                code: b.code,
                message: b.message,
            },
        }
    }
}

#[derive(ApiResponse)]
pub enum PistonRuntimesResult {
    /// Every runtime that can run here.
    #[oai(status = 200)]
    Ok(Json<Vec<PistonRuntime>>),
    /// A valid API key is required (only when `server.api_keys` is set).
    #[oai(status = 401)]
    Unauthorized(
        Json<PistonError>,
        #[oai(header = "WWW-Authenticate")] String,
    ),
}

/// With `server.api_keys` set, these routes need a key as `/api/v1` does (checked here as
/// well as by the router's middleware, which may not list `/api/v2`).
fn unauthorized(state: &AppState, req: &Request) -> Option<Refusal> {
    let keys = &state.api_keys;
    if keys.is_empty() || keys.accepts(super::presented_key(req)) {
        return None;
    }
    Some(Refusal {
        status: RefusalStatus::Unauthorized,
        code: ErrorCode::Unauthorized,
        message: "a valid API key is required: send `Authorization: Bearer <key>` or \
                  `X-API-Key: <key>`"
            .into(),
    })
}

pub struct PistonApi;

#[OpenApi(prefix_path = "/api/v2")]
impl PistonApi {
    /// List runtimes (Piston v2)
    ///
    /// Piston's `GET /api/v2/runtimes`: every runtime that can run here, under its
    /// language, with its version and the other names a request may use.
    #[oai(path = "/runtimes", method = "get", tag = "ApiTags::Piston")]
    async fn runtimes(&self, state: Data<&AppState>, req: &Request) -> PistonRuntimesResult {
        if let Some(refusal) = unauthorized(&state, req) {
            return PistonRuntimesResult::Unauthorized(
                Json(PistonError {
                    message: refusal.message,
                }),
                "Bearer".into(),
            );
        }
        let set = state.runtimes.snapshot();
        PistonRuntimesResult::Ok(Json(
            set.runtimes
                .iter()
                .filter(|r| r.availability.available)
                .map(|r| to_piston_runtime(r))
                .collect(),
        ))
    }

    /// Run a program (Piston v2)
    ///
    /// Piston's `POST /api/v2/execute`: runs `files` with the runtime `language` and
    /// `version` select, with optional stdin, args and limits, and answers with the `run`
    /// stage (and the `compile` stage for compiled languages) in Piston's shape. `output` is
    /// stdout followed by stderr. Errors are `{"message"}` bodies, 400 for anything the
    /// request gets wrong. The body is read as JSON even when labelled `text/plain` or not
    /// labelled at all (as fetch-based Piston clients send it).
    #[oai(path = "/execute", method = "post", tag = "ApiTags::Piston")]
    async fn execute(
        &self,
        state: Data<&AppState>,
        request_id: Data<&RequestId>,
        req: &Request,
        body: PistonBody,
    ) -> PistonExecuteResult {
        match run_piston(&state, &request_id, req, body).await {
            Ok(response) => PistonExecuteResult::Ok(Json(response)),
            Err(refusal) => {
                if refusal.status != RefusalStatus::Internal {
                    state.metrics.rejected(refusal.code);
                }
                refusal.into_result()
            }
        }
    }
}

async fn run_piston(
    state: &AppState,
    request_id: &RequestId,
    req: &Request,
    body: PistonBody,
) -> Result<PistonExecuteResponse, Refusal> {
    if let Some(refusal) = unauthorized(state, req) {
        return Err(refusal);
    }
    let bytes = match body {
        PistonBody::Bytes(bytes) => bytes,
        PistonBody::Unsupported(content_type) => {
            return Err(Refusal {
                status: RefusalStatus::UnsupportedMediaType,
                code: ErrorCode::BadRequest,
                message: format!(
                    "requests must be of type application/json (this one is `{content_type}`)"
                ),
            });
        }
    };
    let request = parse_request(&state.runtimes.snapshot(), &bytes)?;
    let runtime = Arc::clone(&request.runtime);
    let report = state
        .run(request_id, request)
        .await
        .map_err(Refusal::from)?;
    Ok(to_response(&runtime, &report))
}

// ---- Request mapping.

/// Piston's `v2.js` checks, in its order and with its messages, then ours.
fn parse_request(set: &RuntimeSet, bytes: &[u8]) -> Result<ExecutionRequest, Refusal> {
    let value: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(bytes)
            .map_err(|e| Refusal::field(format!("the body is not valid JSON: {e}")))?
    };
    // Piston reads fields off whatever the body is; anything but an object has none.
    let empty = Map::new();
    let body = value.as_object().unwrap_or(&empty);
    let language = match body.get("language") {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        _ => return Err(Refusal::field("language is required as a string")),
    };
    let version = match body.get("version") {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        _ => return Err(Refusal::field("version is required as a string")),
    };
    let Some(Value::Array(files)) = body.get("files") else {
        return Err(Refusal::field("files is required as an array"));
    };
    if let Some(i) = files
        .iter()
        .position(|f| !matches!(f.get("content"), Some(Value::String(_))))
    {
        return Err(Refusal::field(format!(
            "files[{i}].content is required as a string"
        )));
    }
    let runtime = choose_runtime(set, language, version)?;
    let encodings = files
        .iter()
        .enumerate()
        .map(|(i, f)| file_encoding(i, f))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(entry_index) = encodings.iter().position(|e| *e == PistonEncoding::Utf8) else {
        return Err(Refusal::field(
            "files must include at least one utf8 encoded file",
        ));
    };
    let (limits, runtime) = apply_limits(body, runtime)?;

    if files.len() > MAX_FILES {
        return Err(Refusal::bad(
            ErrorCode::InvalidRequest,
            format!("files must hold at most {MAX_FILES} files"),
        ));
    }
    let mut sources = Vec::with_capacity(files.len());
    for (i, (file, encoding)) in files.iter().zip(&encodings).enumerate() {
        let name = match file.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                return Err(Refusal::field(format!("files[{i}].name must be a string")));
            }
        };
        let name = name.unwrap_or_else(|| {
            if i == entry_index {
                // The entry is utf8: its text is its content (Java: named after its class).
                let text = file.get("content").and_then(Value::as_str);
                runtime.file_name_for(text.unwrap_or_default().as_bytes())
            } else {
                format!("file{i}.code")
            }
        });
        validate_file_name(&name).map_err(|e| invalid(format!("files[{i}]: {e}")))?;
        if sources.iter().any(|f: &SourceFile| f.name == name) {
            return Err(invalid(format!("files[{i}]: duplicate file name `{name}`")));
        }
        let content = file
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let content = decode(content, *encoding)
            .map_err(|e| invalid(format!("files[{i}] (`{name}`): {e}")))?;
        sources.push(SourceFile { name, content });
    }
    let entry = sources[entry_index].name.clone();

    let mut stdin = match body.get("stdin") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(Refusal::field("stdin must be a string")),
    };
    // Piston adds a trailing newline when there is none (even to an empty stdin).
    if !stdin.ends_with('\n') {
        stdin.push('\n');
    }
    let args = match body.get("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|a| a.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Refusal::field("args must be an array of strings"))?,
        Some(_) => return Err(Refusal::field("args must be an array of strings")),
    };

    let request = ExecutionRequest {
        runtime,
        files: sources,
        entry,
        stdin: stdin.into_bytes(),
        args,
        limits,
    };
    request.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(request)
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal::bad(ErrorCode::InvalidRequest, message)
}

/// A file's encoding: Piston takes `base64` and `hex`, and anything else as `utf8`.
fn file_encoding(i: usize, file: &Value) -> Result<PistonEncoding, Refusal> {
    match file.get("encoding") {
        None | Some(Value::Null) => Ok(PistonEncoding::Utf8),
        Some(Value::String(s)) => Ok(match s.as_str() {
            "base64" => PistonEncoding::Base64,
            "hex" => PistonEncoding::Hex,
            _ => PistonEncoding::Utf8,
        }),
        Some(_) => Err(Refusal::field(format!(
            "files[{i}].encoding must be a string"
        ))),
    }
}

/// Why a file's content could not be decoded.
#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error("invalid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("invalid hex: {0}")]
    Hex(&'static str),
}

fn decode(content: &str, encoding: PistonEncoding) -> Result<Vec<u8>, DecodeError> {
    match encoding {
        PistonEncoding::Utf8 => Ok(content.as_bytes().to_vec()),
        PistonEncoding::Base64 => {
            // Node's decoder, which Piston uses, also takes the URL-safe alphabet, missing
            // padding and whitespace.
            let text: String = content
                .chars()
                .filter(|c| !c.is_ascii_whitespace())
                .map(|c| match c {
                    '-' => '+',
                    '_' => '/',
                    c => c,
                })
                .collect();
            let engine = base64::engine::GeneralPurpose::new(
                &base64::alphabet::STANDARD,
                base64::engine::GeneralPurposeConfig::new()
                    .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
                    .with_decode_allow_trailing_bits(true),
            );
            Ok(engine.decode(text.as_bytes())?)
        }
        PistonEncoding::Hex => {
            let digits = content.trim().as_bytes();
            if !digits.len().is_multiple_of(2) {
                return Err(DecodeError::Hex("an odd number of digits"));
            }
            digits
                .chunks(2)
                .map(|pair| {
                    let high = (pair[0] as char).to_digit(16);
                    let low = (pair[1] as char).to_digit(16);
                    match (high, low) {
                        (Some(h), Some(l)) => Ok((h * 16 + l) as u8),
                        _ => Err(DecodeError::Hex("a character that is not a hex digit")),
                    }
                })
                .collect()
        }
    }
}

/// The runtime `language` and `version` select: among the runtimes whose language, name or
/// alias is `language` (any case) and whose version satisfies the range, the highest
/// version (the first in runtimes.toml on a tie).
fn choose_runtime(
    set: &RuntimeSet,
    language: &str,
    version: &str,
) -> Result<Arc<Runtime>, Refusal> {
    let unknown = || {
        Refusal::bad(
            ErrorCode::UnknownRuntime,
            format!("{language}-{version} runtime is unknown"),
        )
    };
    let range = semver::Range::parse(version);
    let matching: Vec<&Arc<Runtime>> = set
        .runtimes
        .iter()
        .filter(|r| names_of(r).any(|n| n.eq_ignore_ascii_case(language)))
        .filter(|r| {
            range
                .as_ref()
                .is_some_and(|range| range.matches(semver::of(r.version.as_deref())))
        })
        .collect();
    let best = matching.iter().filter(|r| r.availability.available).fold(
        None::<&Arc<Runtime>>,
        |best, r| match best {
            Some(b) if semver::of(b.version.as_deref()) >= semver::of(r.version.as_deref()) => {
                Some(b)
            }
            _ => Some(r),
        },
    );
    match (best, matching.first()) {
        (Some(r), _) => Ok(Arc::clone(r)),
        (None, Some(r)) => Err(Refusal::bad(
            ErrorCode::RuntimeUnavailable,
            format!(
                "{language}-{version} runtime is not available on this server: {}",
                r.availability.reason.clone().unwrap_or_default()
            ),
        )),
        (None, None) => Err(unknown()),
    }
}

/// Every name a runtime answers to here: its language, name and aliases.
fn names_of(r: &Runtime) -> impl Iterator<Item = &str> {
    std::iter::once(r.language.as_str())
        .chain(std::iter::once(r.name.as_str()))
        .chain(r.aliases.iter().map(String::as_str))
}

fn to_piston_runtime(r: &Runtime) -> PistonRuntime {
    let mut aliases: Vec<String> = Vec::new();
    for name in std::iter::once(&r.name).chain(&r.aliases) {
        if *name != r.language && !aliases.contains(name) {
            aliases.push(name.clone());
        }
    }
    PistonRuntime {
        language: r.language.clone(),
        version: semver::display(semver::of(r.version.as_deref())),
        aliases,
        runtime: (r.name != r.language).then(|| r.name.clone()),
    }
}

/// A limit a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    /// `-1` or `0`: no limit beyond the ceiling.
    Ceiling,
    Value(u64),
}

/// Piston's limit fields: (name, stage is compile, our field).
const LIMIT_FIELDS: [(&str, bool, &str); 6] = [
    ("compile_memory_limit", true, "memory_bytes"),
    ("run_memory_limit", false, "memory_bytes"),
    ("compile_timeout", true, "wall_time_ms"),
    ("run_timeout", false, "wall_time_ms"),
    ("compile_cpu_time", true, "cpu_time_ms"),
    ("run_cpu_time", false, "cpu_time_ms"),
];

fn asked_limit(body: &Map<String, Value>, name: &str) -> Result<Option<Asked>, Refusal> {
    let number = match body.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::MAX),
        Some(_) => {
            return Err(Refusal::field(format!(
                "If specified, {name} must be a number"
            )));
        }
    };
    if number == 0.0 || number == -1.0 {
        Ok(Some(Asked::Ceiling))
    } else if number < 0.0 {
        Err(Refusal::field(format!("{name} must be non-negative")))
    } else {
        // Piston takes fractions of a millisecond or byte; a limit here is whole ones.
        Ok(Some(Asked::Value(number.ceil() as u64)))
    }
}

/// The run stage's limits, and the runtime with the compile stage's limits the request asks
/// for (the same `Arc` when it asks for none, so warm sandboxes still suit it).
fn apply_limits(
    body: &Map<String, Value>,
    runtime: Arc<Runtime>,
) -> Result<(Limits, Arc<Runtime>), Refusal> {
    let mut run = LimitsOverride::default();
    let mut compile = LimitsOverride::default();
    for (name, is_compile, field) in LIMIT_FIELDS {
        let Some(asked) = asked_limit(body, name)? else {
            continue;
        };
        let (over, ceiling) = if is_compile {
            (&mut compile, &runtime.compile_limits)
        } else {
            (&mut run, &runtime.max_limits)
        };
        let ceiling_value = ceiling
            .entries()
            .into_iter()
            .find(|(n, _)| *n == field)
            .map_or(u64::MAX, |(_, v)| v);
        let value = match asked {
            Asked::Ceiling => ceiling_value,
            Asked::Value(v) => v,
        };
        match field {
            "memory_bytes" => over.memory_bytes = Some(value),
            "wall_time_ms" => over.wall_time_ms = Some(value),
            _ => over.cpu_time_ms = Some(value),
        }
    }
    let refuse = |is_compile: bool| {
        move |e: LimitExceeded| {
            let name = LIMIT_FIELDS
                .iter()
                .find(|(_, c, f)| *c == is_compile && *f == e.field)
                .map_or(e.field, |(n, _, _)| *n);
            let message = if e.requested > e.maximum {
                format!("{name} cannot exceed the configured limit of {}", e.maximum)
            } else {
                format!("{name} must be at least {}", e.minimum)
            };
            Refusal::bad(ErrorCode::LimitExceeded, message)
        }
    };
    let limits = runtime
        .limits
        .apply_request(&run, &runtime.max_limits)
        .map_err(refuse(false))?;
    // Compile limits mean nothing to a runtime without a compile stage (piston-client sends
    // them with every request). A compile stage's defaults are its ceilings: a request may
    // only lower them.
    if runtime.compile.is_none() {
        return Ok((limits, runtime));
    }
    let compile_limits = runtime
        .compile_limits
        .apply_request(&compile, &runtime.compile_limits)
        .map_err(refuse(true))?;
    if compile_limits == runtime.compile_limits {
        return Ok((limits, runtime));
    }
    let runtime = Arc::new(Runtime {
        compile_limits,
        ..Runtime::clone(&runtime)
    });
    Ok((limits, runtime))
}

// ---- Report mapping.

fn to_response(runtime: &Runtime, report: &ExecutionReport) -> PistonExecuteResponse {
    let compile = report.compile.as_ref().map(to_stage);
    let run = match (&report.run, &compile) {
        (Some(run), _) => to_stage(run),
        // Piston: "Backward compatibility when the run stage is not started".
        (None, Some(compile)) => compile.clone(),
        (None, None) => PistonStage {
            stdout: String::new(),
            stderr: String::new(),
            output: String::new(),
            code: Nullable(None),
            signal: Nullable(None),
            message: Nullable(Some("the sandbox produced no result".into())),
            status: Nullable(Some(STATUS_INTERNAL.into())),
            cpu_time: Nullable(None),
            wall_time: Nullable(None),
            memory: Nullable(None),
        },
    };
    PistonExecuteResponse {
        language: runtime.language.clone(),
        version: semver::display(semver::of(runtime.version.as_deref())),
        run,
        compile,
    }
}

const STATUS_RUNTIME_ERROR: &str = "RE";
const STATUS_SIGNALED: &str = "SG";
const STATUS_TIMEOUT: &str = "TO";
const STATUS_STDOUT_LIMIT: &str = "OL";
const STATUS_STDERR_LIMIT: &str = "EL";
const STATUS_INTERNAL: &str = "XX";
const SIGKILL: i32 = 9;

/// `(status, message, code, signal)` of a stage, as Piston (through isolate) reports them.
fn outcome(
    stage: &StageReport,
) -> (
    Option<&'static str>,
    Option<String>,
    Option<i32>,
    Option<i32>,
) {
    let killed =
        |status, message: &str| (Some(status), Some(message.to_string()), None, Some(SIGKILL));
    match stage.status {
        StageStatus::Ok => (None, None, stage.exit_code, stage.signal),
        StageStatus::Timeout => match stage.limit {
            Some(crate::execution::LimitKind::CpuTime) => {
                killed(STATUS_TIMEOUT, "Time limit exceeded")
            }
            _ => killed(STATUS_TIMEOUT, "Time limit exceeded (wall clock)"),
        },
        StageStatus::OutputLimit if stage.stderr_truncated && !stage.stdout_truncated => {
            killed(STATUS_STDERR_LIMIT, "stderr length exceeded")
        }
        StageStatus::OutputLimit => killed(STATUS_STDOUT_LIMIT, "stdout length exceeded"),
        StageStatus::InternalError => (
            Some(STATUS_INTERNAL),
            Some(
                stage
                    .message
                    .clone()
                    .unwrap_or_else(|| "the sandbox failed".into()),
            ),
            None,
            None,
        ),
        StageStatus::MemoryLimit => {
            let status = if stage.signal.is_some() {
                STATUS_SIGNALED
            } else {
                STATUS_RUNTIME_ERROR
            };
            let code = stage.signal.map_or(stage.exit_code, |_| None);
            (
                Some(status),
                Some("Memory limit exceeded".into()),
                code,
                stage.signal,
            )
        }
        StageStatus::RuntimeError | StageStatus::CompileError => {
            match (stage.signal, stage.exit_code) {
                (Some(signal), _) => (
                    Some(STATUS_SIGNALED),
                    Some(format!("Caught fatal signal {signal}")),
                    None,
                    Some(signal),
                ),
                (None, Some(code)) if code != 0 => (
                    Some(STATUS_RUNTIME_ERROR),
                    Some(format!("Exited with error status {code}")),
                    Some(code),
                    None,
                ),
                (None, code) => (None, None, code, None),
            }
        }
    }
}

fn to_stage(stage: &StageReport) -> PistonStage {
    let stdout = String::from_utf8_lossy(&stage.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&stage.stderr).into_owned();
    let (status, message, code, signal) = outcome(stage);
    PistonStage {
        output: format!("{stdout}{stderr}"),
        stdout,
        stderr,
        code: Nullable(code),
        signal: Nullable(signal.and_then(signal_name).map(str::to_string)),
        message: Nullable(message),
        status: Nullable(status.map(str::to_string)),
        cpu_time: Nullable(stage.cpu_time.map(|d| d.as_millis() as u64)),
        wall_time: Nullable(Some(stage.wall_time.as_millis() as u64)),
        memory: Nullable(stage.peak_memory_bytes),
    }
}

/// Linux's name of a signal; `None` past the standard ones (Piston answers `null` too).
fn signal_name(signal: i32) -> Option<&'static str> {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    usize::try_from(signal)
        .ok()
        .and_then(|n| n.checked_sub(1))
        .and_then(|i| NAMES.get(i).copied())
}

/// The part of node-semver that Piston's version selectors use: versions as
/// `MAJOR.MINOR.PATCH` (pre-release tags ignored), ranges of comparators (`=`, `<`, `<=`,
/// `>`, `>=`, `^`, `~`, X-ranges `1.x` / `1.2.*` / `*`, partial versions, `A - B`), space
/// for "and", `||` for "or".
mod semver {
    pub(super) type Version = (u64, u64, u64);

    /// A runtime's version read as semver: its first dotted number, padded with zeros;
    /// `0.0.0` when it has none.
    pub(super) fn of(version: Option<&str>) -> Version {
        let text = version.unwrap_or_default();
        let start = text
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(text.len());
        let mut numbers = [0u64; 3];
        for (slot, part) in numbers.iter_mut().zip(text[start..].split('.')) {
            let end = part
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(part.len());
            if end == 0 {
                break;
            }
            *slot = part[..end].parse().unwrap_or(0);
            // `12.2.0-14` is 12.2.0, `1.2-rc.3` is 1.2.0, `17 (build 5)` is 17.0.0.
            if end < part.len() {
                break;
            }
        }
        (numbers[0], numbers[1], numbers[2])
    }

    pub(super) fn display((major, minor, patch): Version) -> String {
        format!("{major}.{minor}.{patch}")
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Op {
        Lt,
        Le,
        Gt,
        Ge,
        Eq,
    }

    /// A parsed range: alternatives (`||`), each a list of comparators that must all hold.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) struct Range(Vec<Vec<(Op, Version)>>);

    /// A partial version: its given numbers (`1.2` is `[1, 2]`), wildcards dropped.
    fn partial(text: &str) -> Option<Vec<u64>> {
        let text = text.strip_prefix(['v', 'V']).unwrap_or(text);
        // Pre-release and build tags are not compared.
        let text = text.split(['-', '+']).next().unwrap_or_default();
        let mut numbers = Vec::new();
        let mut wildcard = false;
        for (i, part) in text.split('.').enumerate() {
            match part {
                _ if i >= 3 => return None,
                "x" | "X" | "*" => wildcard = true,
                "" if i == 0 => wildcard = true,
                digits if !wildcard && digits.bytes().all(|b| b.is_ascii_digit()) => {
                    numbers.push(digits.parse().ok()?);
                }
                _ => return None,
            }
        }
        Some(numbers)
    }

    fn padded(numbers: &[u64]) -> Version {
        let at = |i: usize| numbers.get(i).copied().unwrap_or(0);
        (at(0), at(1), at(2))
    }

    /// The first version past a partial one: `1` gives 2.0.0, `1.2` gives 1.3.0.
    fn bump(numbers: &[u64]) -> Option<Version> {
        match numbers {
            [a] => Some((a.checked_add(1)?, 0, 0)),
            [a, b] => Some((*a, b.checked_add(1)?, 0)),
            _ => None,
        }
    }

    fn comparator(op: &str, numbers: &[u64]) -> Option<Vec<(Op, Version)>> {
        if !matches!(op, "" | "=" | "<" | "<=" | ">" | ">=" | "~" | "~>" | "^") {
            return None;
        }
        let low = padded(numbers);
        let exact = numbers.len() == 3;
        if numbers.is_empty() {
            // `*`, `>=*`...: anything; `<*`, `>*`: nothing.
            return Some(match op {
                "<" | ">" => vec![(Op::Lt, (0, 0, 0))],
                _ => Vec::new(),
            });
        }
        let upper = match op {
            "~" | "~>" => match numbers {
                [a] => (a.checked_add(1)?, 0, 0),
                [a, b, ..] => (*a, b.checked_add(1)?, 0),
                [] => return None,
            },
            "^" => match numbers {
                [a, ..] if *a > 0 => (a.checked_add(1)?, 0, 0),
                [_] => (1, 0, 0),
                [_, b] => (0, b.checked_add(1)?, 0),
                [_, b, _] if *b > 0 => (0, b.checked_add(1)?, 0),
                [_, _, c] => (0, 0, c.checked_add(1)?),
                _ => return None,
            },
            _ => (0, 0, 0),
        };
        Some(match op {
            "~" | "~>" | "^" => vec![(Op::Ge, low), (Op::Lt, upper)],
            "" | "=" if exact => vec![(Op::Eq, low)],
            "" | "=" => vec![(Op::Ge, low), (Op::Lt, bump(numbers)?)],
            ">" if exact => vec![(Op::Gt, low)],
            ">" => vec![(Op::Ge, bump(numbers)?)],
            ">=" => vec![(Op::Ge, low)],
            "<" => vec![(Op::Lt, low)],
            "<=" if exact => vec![(Op::Le, low)],
            _ => vec![(Op::Lt, bump(numbers)?)],
        })
    }

    impl Range {
        /// `None` for text that is no range (node-semver matches nothing then).
        pub(super) fn parse(text: &str) -> Option<Range> {
            let mut alternatives = Vec::new();
            for alternative in text.split("||") {
                let tokens: Vec<&str> = alternative.split_whitespace().collect();
                let mut all = Vec::new();
                let mut i = 0;
                while i < tokens.len() {
                    // `A - B`: from A up to B, inclusive.
                    if tokens.get(i + 1) == Some(&"-") {
                        let low = partial(tokens[i])?;
                        let high = partial(tokens.get(i + 2)?)?;
                        all.extend(comparator(">=", &low)?);
                        all.extend(comparator("<=", &high)?);
                        i += 3;
                        continue;
                    }
                    let token = tokens[i];
                    let split = token
                        .find(|c: char| !matches!(c, '<' | '>' | '=' | '~' | '^'))
                        .unwrap_or(token.len());
                    let (op, rest) = token.split_at(split);
                    // An operator alone takes the next token (`>= 3`).
                    let rest = if rest.is_empty() && !op.is_empty() {
                        i += 1;
                        *tokens.get(i)?
                    } else {
                        rest
                    };
                    all.extend(comparator(op, &partial(rest)?)?);
                    i += 1;
                }
                alternatives.push(all);
            }
            Some(Range(alternatives))
        }

        pub(super) fn matches(&self, version: Version) -> bool {
            self.0.iter().any(|all| {
                all.iter().all(|&(op, v)| match op {
                    Op::Lt => version < v,
                    Op::Le => version <= v,
                    Op::Gt => version > v,
                    Op::Ge => version >= v,
                    Op::Eq => version == v,
                })
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::execution::LimitKind;

    #[test]
    fn versions_read_as_semver() {
        assert_eq!(semver::of(Some("3.11.2")), (3, 11, 2));
        assert_eq!(semver::of(Some("v5.36.0")), (5, 36, 0));
        assert_eq!(semver::of(Some("1.19")), (1, 19, 0));
        assert_eq!(semver::of(Some("17")), (17, 0, 0));
        assert_eq!(semver::of(Some("12.2.0-14")), (12, 2, 0));
        assert_eq!(semver::of(Some("unknown")), (0, 0, 0));
        assert_eq!(semver::of(None), (0, 0, 0));
        assert_eq!(semver::display((3, 11, 2)), "3.11.2");
    }

    #[test]
    fn ranges_match_as_node_semver_does() {
        let v = (3, 11, 2);
        let yes = [
            "*",
            "x",
            "3",
            "3.x",
            "3.11",
            "3.11.x",
            "3.11.2",
            "=3.11.2",
            "v3.11.2",
            "^3",
            "^3.10",
            "~3.11",
            "~3.11.0",
            ">=3",
            ">= 3",
            ">3.10",
            "<4",
            "<=3.11",
            ">=3 <4",
            "2 || 3",
            "3.0 - 3.12",
            "^3.11.2",
            "~>3.11",
            "3.11.2+build",
        ];
        for r in yes {
            let range = semver::Range::parse(r).unwrap_or_else(|| panic!("`{r}` parses"));
            assert!(range.matches(v), "`{r}` should match 3.11.2");
        }
        let no = [
            "2",
            "4.x",
            "3.10",
            "3.11.3",
            ">3.11",
            ">3.11.2",
            "<3.11.2",
            "<=3.10",
            "^3.12",
            "~3.10",
            "^2",
            ">=4 || <3",
            "<*",
            "3.0 - 3.10",
        ];
        for r in no {
            let range = semver::Range::parse(r).unwrap_or_else(|| panic!("`{r}` parses"));
            assert!(!range.matches(v), "`{r}` should not match 3.11.2");
        }
        for bad in ["banana", "3.x.1", "1.2.3.4", ">=", "1 -", "=>3", "3."] {
            assert!(semver::Range::parse(bad).is_none(), "`{bad}` is no range");
        }
        // Major version zero: `^` stays within the minor (or patch).
        let caret = |r: &str, v| semver::Range::parse(r).is_some_and(|r| r.matches(v));
        assert!(caret("^0.2.3", (0, 2, 9)) && !caret("^0.2.3", (0, 3, 0)));
        assert!(caret("^0.0.3", (0, 0, 3)) && !caret("^0.0.3", (0, 0, 4)));
        assert!(caret("^0.2", (0, 2, 9)) && !caret("^0.2", (0, 3, 0)));
        assert!(caret("^0", (0, 9, 0)) && !caret("^0", (1, 0, 0)));
    }

    #[test]
    fn signals_have_linux_names() {
        assert_eq!(signal_name(9), Some("SIGKILL"));
        assert_eq!(signal_name(11), Some("SIGSEGV"));
        assert_eq!(signal_name(31), Some("SIGSYS"));
        assert_eq!(signal_name(1), Some("SIGHUP"));
        assert_eq!(signal_name(0), None);
        assert_eq!(signal_name(40), None);
        assert_eq!(signal_name(-3), None);
    }

    fn stage(status: StageStatus) -> StageReport {
        StageReport {
            status,
            stdout: b"out\n".to_vec(),
            stderr: b"err\n".to_vec(),
            stdout_truncated: false,
            stderr_truncated: false,
            exit_code: None,
            signal: None,
            limit: None,
            wall_time: Duration::from_millis(12),
            cpu_time: Some(Duration::from_millis(7)),
            peak_memory_bytes: Some(4096),
            limits: Limits::default_run(),
            message: None,
        }
    }

    #[test]
    fn stages_map_to_piston_statuses() {
        let show = |s: &StageReport| {
            let p = to_stage(s);
            (p.status.0, p.code.0, p.signal.0, p.message.0)
        };
        let mut ok = stage(StageStatus::Ok);
        ok.exit_code = Some(0);
        assert_eq!(show(&ok), (None, Some(0), None, None));
        let p = to_stage(&ok);
        assert_eq!(p.output, "out\nerr\n");
        assert_eq!(
            (p.cpu_time.0, p.wall_time.0, p.memory.0),
            (Some(7), Some(12), Some(4096))
        );

        let mut exited = stage(StageStatus::RuntimeError);
        exited.exit_code = Some(3);
        assert_eq!(
            show(&exited),
            (
                Some("RE".into()),
                Some(3),
                None,
                Some("Exited with error status 3".into())
            )
        );
        let mut segv = stage(StageStatus::RuntimeError);
        segv.signal = Some(11);
        assert_eq!(
            show(&segv),
            (
                Some("SG".into()),
                None,
                Some("SIGSEGV".into()),
                Some("Caught fatal signal 11".into())
            )
        );
        let mut wall = stage(StageStatus::Timeout);
        wall.limit = Some(LimitKind::WallTime);
        wall.signal = Some(9);
        assert_eq!(
            show(&wall),
            (
                Some("TO".into()),
                None,
                Some("SIGKILL".into()),
                Some("Time limit exceeded (wall clock)".into())
            )
        );
        let mut cpu = stage(StageStatus::Timeout);
        cpu.limit = Some(LimitKind::CpuTime);
        assert_eq!(show(&cpu).0, Some("TO".into()));
        let mut out = stage(StageStatus::OutputLimit);
        out.stdout_truncated = true;
        out.exit_code = Some(0);
        assert_eq!(show(&out).0, Some("OL".into()));
        assert_eq!(show(&out).1, None);
        assert_eq!(show(&out).2, Some("SIGKILL".into()));
        let mut err = stage(StageStatus::OutputLimit);
        err.stderr_truncated = true;
        assert_eq!(show(&err).0, Some("EL".into()));
        let mut oom = stage(StageStatus::MemoryLimit);
        oom.signal = Some(9);
        assert_eq!(
            show(&oom),
            (
                Some("SG".into()),
                None,
                Some("SIGKILL".into()),
                Some("Memory limit exceeded".into())
            )
        );
        let mut internal = stage(StageStatus::InternalError);
        internal.message = Some("no bwrap".into());
        assert_eq!(
            show(&internal),
            (Some("XX".into()), None, None, Some("no bwrap".into()))
        );
        let mut compile = stage(StageStatus::CompileError);
        compile.exit_code = Some(1);
        assert_eq!(show(&compile).0, Some("RE".into()));
    }

    #[test]
    fn a_failed_compile_is_also_the_run() {
        let runtime = Runtime::ad_hoc(
            "c",
            "main.c",
            &["./main"],
            Some(&["gcc", "{file}"]),
            crate::config::BackendKind::Process,
        );
        let mut compile = stage(StageStatus::CompileError);
        compile.exit_code = Some(1);
        let report = ExecutionReport {
            compile: Some(compile),
            run: None,
            compile_cached: false,
        };
        let response = to_response(&runtime, &report);
        assert_eq!(Some(&response.run), response.compile.as_ref());
        assert_eq!(response.version, "0.0.0");
    }

    #[test]
    fn nulls_are_sent_and_published() {
        let stage = to_stage(&stage(StageStatus::Ok));
        let json = stage.to_json().unwrap_or_default();
        assert_eq!(json["signal"], Value::Null);
        assert!(json.as_object().is_some_and(|o| o.contains_key("status")));
        match <Nullable<i32> as Type>::schema_ref() {
            MetaSchemaRef::Inline(schema) => assert!(schema.nullable),
            MetaSchemaRef::Reference(r) => panic!("inline schema expected, got {r}"),
        }
    }

    #[test]
    fn bodies_are_json_whatever_their_label() {
        assert!(accepted_media_type("application/json"));
        assert!(accepted_media_type("application/json; charset=utf-8"));
        assert!(accepted_media_type("text/plain;charset=UTF-8"));
        assert!(accepted_media_type("application/vnd.api+json"));
        assert!(!accepted_media_type("application/x-www-form-urlencoded"));
        assert!(!accepted_media_type("multipart/form-data; boundary=x"));
        assert!(!accepted_media_type("not a type"));
    }

    #[test]
    fn file_contents_decode_as_node_does() {
        let b64 = |s| decode(s, PistonEncoding::Base64).ok();
        assert_eq!(b64("aGk="), Some(b"hi".to_vec()));
        assert_eq!(b64("aGk"), Some(b"hi".to_vec()));
        assert_eq!(b64("aG k=\n"), Some(b"hi".to_vec()));
        assert_eq!(b64("-_8="), Some(vec![0xfb, 0xff]));
        assert_eq!(b64("!!!"), None);
        let hex = |s| decode(s, PistonEncoding::Hex).ok();
        assert_eq!(hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(hex("0g"), None);
        assert_eq!(hex("abc"), None);
    }
}
