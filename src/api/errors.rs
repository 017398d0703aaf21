//! The one place where core errors become HTTP statuses and `{"code", "message"}` bodies.
//!
//! [`ErrorCode`] is the whole vocabulary: each code has its default status and the
//! rejection-metric label it is counted under. Every error response carries its code in
//! the response's extensions too (see [`ErrorJson`] and [`json_error`]), so the rejection
//! counter in `api/mod.rs` reads it from there instead of parsing bodies.

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::Object;
use poem_openapi::payload::{Json, Payload};
use poem_openapi::registry::{MetaSchemaRef, Registry};

pub use crate::error_code::ErrorCode;

use crate::execution::{ExecuteError, LimitExceeded};
use crate::runtimes::LookupError;

/// Every error response has this body.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct ErrorBody {
    /// A stable, machine-readable error code.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl poem_openapi::types::Example for ErrorBody {
    fn example() -> Self {
        ErrorBody {
            code: ErrorCode::UnknownRuntime,
            message: "unknown runtime `cobol`; known runtimes: python3, node, bash".into(),
        }
    }
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }

    /// A request that poem-openapi could not parse (bad JSON, missing field, wrong type),
    /// with a message that names the field but not the parser's types.
    pub fn from_parse_error(err: &poem::Error) -> Self {
        let code = match err.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            _ => ErrorCode::BadRequest,
        };
        ErrorBody::new(code, describe_error(err))
    }
}

/// An error body as an operation's payload: `Json<ErrorBody>` in the spec and on the wire,
/// and, on the response, its [`ErrorCode`] in the extensions (for the rejection counter)
/// and the code's status (which an operation's response variant then sets to its own).
pub struct ErrorJson(pub ErrorBody);

impl Payload for ErrorJson {
    const CONTENT_TYPE: &'static str = <Json<ErrorBody> as Payload>::CONTENT_TYPE;

    fn check_content_type(content_type: &str) -> bool {
        <Json<ErrorBody> as Payload>::check_content_type(content_type)
    }

    fn schema_ref() -> MetaSchemaRef {
        <Json<ErrorBody> as Payload>::schema_ref()
    }

    fn register(registry: &mut Registry) {
        <Json<ErrorBody> as Payload>::register(registry);
    }
}

impl IntoResponse for ErrorJson {
    fn into_response(self) -> Response {
        let code = self.0.code;
        let mut resp = Json(self.0).into_response();
        resp.set_status(code.status());
        resp.extensions_mut().insert(code);
        resp
    }
}

/// A `{"code", "message"}` response at the code's status.
pub(crate) fn json_error(code: ErrorCode, message: impl Into<String>) -> Response {
    ErrorJson(ErrorBody::new(code, message)).into_response()
}

/// [`json_error`] at another status than the code's own: `busy` from the HTTP guards
/// (503), and the 4xx poem chose for an error filed under `bad_request`.
pub(crate) fn json_error_with_status(
    status: StatusCode,
    code: ErrorCode,
    message: impl Into<String>,
) -> Response {
    let mut resp = json_error(code, message);
    resp.set_status(status);
    resp
}

/// An error's message for clients. A request body poem-openapi could not parse is told as
/// the field and the reason, "unknown field \`memory\` in \`limits\`", not as "parse request
/// payload error: failed to parse "RequestLimits": unknown field \`memory\`. (occurred while
/// parsing "optional_RequestLimits") (occurred while parsing "ExecuteRequest")".
pub(crate) fn describe_error(err: &poem::Error) -> String {
    match err.downcast_ref::<poem_openapi::error::ParseRequestPayloadError>() {
        Some(e) => describe_parse_failure(&e.reason),
        None => err.to_string(),
    }
}

/// Request types by their poem-openapi name: where in the body one sits (empty for the
/// body itself) and what it must be. The test below keeps the names in step with the types.
pub(super) const REQUEST_TYPES: &[(&str, &str, &str)] = &[
    ("ExecuteRequest", "", "a JSON object"),
    ("SubmitCodeRequest", "", "a JSON object"),
    ("RequestLimits", "`limits`", "a JSON object"),
    ("CompileLimits", "`compile_limits`", "a JSON object"),
    ("FileInput", "an item of `files`", "a JSON object"),
    ("list_FileInput", "`files`", "a list of file objects"),
    ("TestInput", "an item of `tests`", "a JSON object"),
    ("list_TestInput", "`tests`", "a list of test objects"),
    ("Encoding", "`encoding`", "`utf8` or `base64`"),
];

fn request_type(name: &str) -> Option<(&'static str, &'static str)> {
    let name = name.strip_prefix("optional_").unwrap_or(name);
    REQUEST_TYPES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|&(_, place, what)| (place, what))
}

/// What a scalar type poem-openapi names must be.
fn scalar(name: &str) -> String {
    let name = name.strip_prefix("optional_").unwrap_or(name);
    match name {
        "string" => "a JSON string".into(),
        "boolean" => "true or false".into(),
        n if n.starts_with("integer(u") => "a non-negative integer".into(),
        n if n.starts_with("integer") => "an integer".into(),
        n if n.starts_with("number") => "a number".into(),
        n if n.starts_with("list_") => "a list".into(),
        n => format!("`{n}`"),
    }
}

/// The reason poem-openapi gives (see `poem_openapi::types::ParseError`), told without its
/// type names. A reason in none of its shapes is serde_json's: the body is not JSON.
pub(super) fn describe_parse_failure(reason: &str) -> String {
    const CHAIN: &str = " (occurred while parsing \"";
    // Each type the failure passed through on its way out (peeled outermost first).
    let mut chain = Vec::new();
    let mut rest = reason;
    while let Some(inner) = rest.strip_suffix("\")") {
        let Some(at) = inner.rfind(CHAIN) else { break };
        let name = &inner[at + CHAIN.len()..];
        if name.contains(['"', '\\']) {
            break;
        }
        chain.push(name);
        rest = &inner[..at];
    }
    chain.reverse();
    let rest = rest.strip_suffix('.').unwrap_or(rest);
    // The failure's own type, and what it says.
    let (own, text) = if let Some(r) = rest.strip_prefix("failed to parse \"") {
        match r.split_once("\": ") {
            Some((own, text)) => (own, text.to_string()),
            None => return format!("invalid request body: {rest}"),
        }
    } else if let Some(r) = rest.strip_prefix("Expected input type \"") {
        match r.split_once("\", found ") {
            Some((own, found)) => {
                let text = match request_type(own) {
                    Some(("", what)) => format!("the body must be {what}, found {found}"),
                    Some((place, what)) => format!("{place} must be {what}, found {found}"),
                    None => format!("expected {}, found {found}", scalar(own)),
                };
                // The failing value's place is named; say where it sits.
                (chain.first().copied().unwrap_or(""), text)
            }
            None => return format!("invalid request body: {rest}"),
        }
    } else if let Some(r) = rest.strip_prefix("Type \"") {
        let own = r.split('"').next().unwrap_or_default();
        let text = match request_type(own) {
            Some(("", _)) => "the body is missing".to_string(),
            Some((place, _)) => format!("{place} is missing"),
            None => "a required field is missing".to_string(),
        };
        (chain.first().copied().unwrap_or(""), text)
    } else {
        return format!("invalid JSON: {reason}");
    };
    // The innermost object the failure happened in (its own type, for an unknown field).
    let place = std::iter::once(own)
        .chain(chain.iter().copied())
        .filter(|n| !n.starts_with("optional_") && !n.starts_with("list_"))
        .find_map(request_type)
        .map_or("", |(place, _)| place);
    if place.is_empty() {
        text
    } else {
        format!("{text} in {place}")
    }
}

/// A request error with its HTTP meaning, before it is put into an operation's response enum.
#[derive(Debug)]
pub enum ApiError {
    /// 422: the request is well-formed but names something unusable.
    Unprocessable(ErrorBody),
    /// 429 with Retry-After.
    Busy(ErrorBody),
    /// 503 with Retry-After: the daemon is shutting down.
    Unavailable(ErrorBody),
    /// 500: our fault, never the request's.
    Internal(ErrorBody),
}

impl From<LookupError> for ApiError {
    fn from(e: LookupError) -> Self {
        let code = match e {
            LookupError::Unknown { .. } => ErrorCode::UnknownRuntime,
            LookupError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            LookupError::Unavailable { .. } => ErrorCode::RuntimeUnavailable,
        };
        ApiError::Unprocessable(ErrorBody::new(code, e.to_string()))
    }
}

impl From<LimitExceeded> for ApiError {
    fn from(e: LimitExceeded) -> Self {
        ApiError::Unprocessable(ErrorBody::new(ErrorCode::LimitExceeded, e.to_string()))
    }
}

impl From<ExecuteError> for ApiError {
    fn from(e: ExecuteError) -> Self {
        match e {
            ExecuteError::Busy(b) => ApiError::Busy(ErrorBody::new(ErrorCode::Busy, b.to_string())),
            // Nobody reads this answer; it is still a typed one.
            ExecuteError::Abandoned => {
                ApiError::Busy(ErrorBody::new(ErrorCode::Busy, e.to_string()))
            }
            ExecuteError::ShuttingDown { .. } => {
                ApiError::Unavailable(ErrorBody::new(ErrorCode::ShuttingDown, e.to_string()))
            }
            ExecuteError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                ApiError::Internal(ErrorBody::new(
                    ErrorCode::InternalError,
                    crate::execution::without_host_paths(&m.to_string()),
                ))
            }
        }
    }
}

/// Seconds a client should wait after a 429.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// Implements `From<ApiError>` and the bad-request handler for an operation's response enum
/// that has `BadRequest`, `PayloadTooLarge`, `Unprocessable`, `Busy` and `Internal` variants
/// of [`ErrorJson`].
macro_rules! error_variants {
    ($response:ty) => {
        impl From<$crate::api::errors::ApiError> for $response {
            fn from(e: $crate::api::errors::ApiError) -> Self {
                use $crate::api::errors::{ApiError, ErrorJson};
                match e {
                    ApiError::Unprocessable(b) => Self::Unprocessable(ErrorJson(b)),
                    ApiError::Busy(b) => {
                        Self::Busy(ErrorJson(b), $crate::api::errors::RETRY_AFTER_SECONDS)
                    }
                    ApiError::Unavailable(b) => {
                        Self::Unavailable(ErrorJson(b), $crate::api::errors::RETRY_AFTER_SECONDS)
                    }
                    ApiError::Internal(b) => Self::Internal(ErrorJson(b)),
                }
            }
        }

        impl $response {
            fn bad_request(err: poem::Error) -> Self {
                use $crate::api::errors::{ErrorBody, ErrorCode, ErrorJson};
                let body = ErrorBody::from_parse_error(&err);
                match body.code {
                    ErrorCode::PayloadTooLarge => Self::PayloadTooLarge(ErrorJson(body)),
                    ErrorCode::UnsupportedMediaType => Self::UnsupportedMediaType(ErrorJson(body)),
                    _ => Self::BadRequest(ErrorJson(body)),
                }
            }
        }
    };
}
pub(crate) use error_variants;
