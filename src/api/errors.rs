//! The one place where core errors become HTTP statuses and `{"code", "message"}` bodies.

use poem_openapi::Object;

use crate::execution::{ExecuteError, LimitExceeded};
use crate::runtimes::LookupError;

/// Every error response has this body.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct ErrorBody {
    /// A stable, machine-readable error code: `bad_request`, `payload_too_large`,
    /// `request_timeout`, `unknown_runtime`, `version_mismatch`, `runtime_unavailable`,
    /// `limit_exceeded`, `invalid_request`, `busy`, `not_found`, `method_not_allowed`,
    /// `unauthorized`, `internal_error`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

impl poem_openapi::types::Example for ErrorBody {
    fn example() -> Self {
        ErrorBody {
            code: "unknown_runtime".into(),
            message: "unknown runtime `cobol`; known runtimes: python3, node, bash".into(),
        }
    }
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ErrorBody {
            code: code.into(),
            message: message.into(),
        }
    }

    /// A request that poem-openapi could not parse (bad JSON, missing field, wrong type).
    pub fn from_parse_error(err: &poem::Error) -> Self {
        let status = err.status();
        let code = match status.as_u16() {
            413 => "payload_too_large",
            _ => "bad_request",
        };
        let mut message = err.to_string();
        // poem-openapi reports a missing field as a null where a value was expected.
        if message.contains("found null") {
            message.push_str(" (a required field is missing or null)");
        }
        ErrorBody::new(code, message)
    }
}

/// A request error with its HTTP meaning, before it is put into an operation's response enum.
#[derive(Debug)]
pub enum ApiError {
    /// 422: the request is well-formed but names something unusable.
    Unprocessable(ErrorBody),
    /// 429 with Retry-After.
    Busy(ErrorBody),
    /// 500: our fault, never the request's.
    Internal(ErrorBody),
}

impl From<LookupError> for ApiError {
    fn from(e: LookupError) -> Self {
        let code = match e {
            LookupError::Unknown { .. } => "unknown_runtime",
            LookupError::VersionMismatch { .. } => "version_mismatch",
            LookupError::Unavailable { .. } => "runtime_unavailable",
        };
        ApiError::Unprocessable(ErrorBody::new(code, e.to_string()))
    }
}

impl From<LimitExceeded> for ApiError {
    fn from(e: LimitExceeded) -> Self {
        ApiError::Unprocessable(ErrorBody::new("limit_exceeded", e.to_string()))
    }
}

impl From<ExecuteError> for ApiError {
    fn from(e: ExecuteError) -> Self {
        match e {
            ExecuteError::Busy(b) => ApiError::Busy(ErrorBody::new("busy", b.to_string())),
            // Nobody reads this answer; it is still a typed one.
            ExecuteError::Abandoned => ApiError::Busy(ErrorBody::new("busy", e.to_string())),
            ExecuteError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                ApiError::Internal(ErrorBody::new(
                    "internal_error",
                    crate::execution::without_host_paths(&m),
                ))
            }
        }
    }
}

/// Seconds a client should wait after a 429.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// Implements `From<ApiError>` and the bad-request handler for an operation's response enum
/// that has `BadRequest`, `Unprocessable`, `Busy` and `Internal` variants.
macro_rules! error_variants {
    ($response:ty) => {
        impl From<$crate::api::errors::ApiError> for $response {
            fn from(e: $crate::api::errors::ApiError) -> Self {
                use $crate::api::errors::ApiError;
                match e {
                    ApiError::Unprocessable(b) => {
                        Self::Unprocessable(poem_openapi::payload::Json(b))
                    }
                    ApiError::Busy(b) => Self::Busy(
                        poem_openapi::payload::Json(b),
                        $crate::api::errors::RETRY_AFTER_SECONDS,
                    ),
                    ApiError::Internal(b) => Self::Internal(poem_openapi::payload::Json(b)),
                }
            }
        }

        impl $response {
            fn bad_request(err: poem::Error) -> Self {
                Self::BadRequest(poem_openapi::payload::Json(
                    $crate::api::errors::ErrorBody::from_parse_error(&err),
                ))
            }
        }
    };
}
pub(crate) use error_variants;
