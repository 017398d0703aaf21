//! Every error code the daemon answers with (a leaf module): the code string, its
//! default status, and the rejection-metric label it is counted under. The API publishes
//! it in the spec; metrics count it; nothing else spells a code.

use poem::http::StatusCode;
use poem_openapi::Enum;

/// A stable, machine-readable error code, with its status: 400 `bad_request`, 401
/// `unauthorized`, 404 `not_found`, 405 `method_not_allowed`, 408 `request_timeout`, 413
/// `payload_too_large`; 422 `unknown_runtime`, `version_mismatch`, `runtime_unavailable`,
/// `limit_exceeded`, `invalid_request`; `busy` with `Retry-After`, 429 when every slot and
/// the queue are taken, 503 when too many request bodies or connections are in flight; 503
/// `shutting_down` with `Retry-After` while the daemon drains; 500 `internal_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Enum)]
#[oai(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: malformed JSON, or a field missing, unknown or of the wrong type.
    BadRequest,
    /// 413: the body is larger than `server.max_body_bytes`.
    PayloadTooLarge,
    /// 415: the body is not `application/json` (or has no `Content-Type`).
    UnsupportedMediaType,
    /// 408: the body did not arrive within `server.body_read_timeout_ms`.
    RequestTimeout,
    /// 422: no runtime has that name or alias.
    UnknownRuntime,
    /// 422: the runtime has no version matching the selector.
    VersionMismatch,
    /// 422: the runtime is configured but cannot run here.
    RuntimeUnavailable,
    /// 422: a limit above the runtime's maximum.
    LimitExceeded,
    /// 422: files, entry or arguments that cannot be run.
    InvalidRequest,
    /// 429 (slots and queue full, or no room for the answer in time); 503 from the HTTP
    /// guards (request bodies or connections in flight).
    Busy,
    /// 503: the daemon is shutting down; the submission was not run, or was killed at the
    /// end of the shutdown grace period. Retry (another replica runs it).
    ShuttingDown,
    /// 404.
    NotFound,
    /// 405.
    MethodNotAllowed,
    /// 401: a valid API key is required.
    Unauthorized,
    /// 500: our fault, never the request's.
    InternalError,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::BadRequest,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::RequestTimeout,
        ErrorCode::UnknownRuntime,
        ErrorCode::VersionMismatch,
        ErrorCode::RuntimeUnavailable,
        ErrorCode::LimitExceeded,
        ErrorCode::InvalidRequest,
        ErrorCode::Busy,
        ErrorCode::ShuttingDown,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Unauthorized,
        ErrorCode::InternalError,
    ];

    /// The code as sent in bodies (the same string the spec's enum publishes).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::UnknownRuntime => "unknown_runtime",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::RuntimeUnavailable => "runtime_unavailable",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Busy => "busy",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::InternalError => "internal_error",
        }
    }

    /// The status this code is answered with. The one exception is `busy` from the HTTP
    /// guards, answered 503 (see `api::errors::json_error_with_status`); and the route-level handler
    /// keeps whatever 4xx poem chose for an error it files under `bad_request`.
    pub const fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::UnknownRuntime
            | ErrorCode::VersionMismatch
            | ErrorCode::RuntimeUnavailable
            | ErrorCode::LimitExceeded
            | ErrorCode::InvalidRequest => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::Busy => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `reason` label a rejected submission (a 4xx answer) is counted under in
    /// `mde_requests_rejected_total`: the code of its group. Several codes share a label
    /// (the label set is fixed: dashboards and alerts use it).
    pub const fn reject_reason(self) -> ErrorCode {
        match self {
            ErrorCode::VersionMismatch => ErrorCode::UnknownRuntime,
            ErrorCode::PayloadTooLarge
            | ErrorCode::UnknownRuntime
            | ErrorCode::RuntimeUnavailable
            | ErrorCode::LimitExceeded
            | ErrorCode::Busy
            | ErrorCode::ShuttingDown
            | ErrorCode::Unauthorized => self,
            ErrorCode::BadRequest
            | ErrorCode::RequestTimeout
            | ErrorCode::InvalidRequest
            | ErrorCode::NotFound
            | ErrorCode::MethodNotAllowed
            | ErrorCode::InternalError
            | ErrorCode::UnsupportedMediaType => ErrorCode::BadRequest,
        }
    }

    /// Every `reason` label value (each series exists from start-up, at 0).
    pub const REJECT_REASONS: [ErrorCode; 8] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownRuntime,
        ErrorCode::RuntimeUnavailable,
        ErrorCode::LimitExceeded,
        ErrorCode::PayloadTooLarge,
        ErrorCode::Busy,
        ErrorCode::ShuttingDown,
        ErrorCode::Unauthorized,
    ];

    /// The code for an error poem itself raised with `status` (no route, wrong method...).
    pub fn for_status(status: StatusCode) -> ErrorCode {
        match status {
            StatusCode::NOT_FOUND => ErrorCode::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            s if s.is_server_error() => ErrorCode::InternalError,
            _ => ErrorCode::BadRequest,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
