//! Refuse request bodies over `server.max_body_bytes` with a JSON 413, whether or not the
//! client sent Content-Length (a chunked body is read up to the limit, never past it).

use poem::http::StatusCode;
use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result};

use super::errors::ErrorBody;

pub struct BodyLimit(pub usize);

impl<E: Endpoint> Middleware<E> for BodyLimit {
    type Output = BodyLimitEndpoint<E>;

    fn transform(&self, ep: E) -> Self::Output {
        BodyLimitEndpoint {
            inner: ep,
            max: self.0,
        }
    }
}

pub struct BodyLimitEndpoint<E> {
    inner: E,
    max: usize,
}

pub(crate) fn json_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = ErrorBody::new(code, message);
    let json = serde_json::json!({ "code": body.code, "message": body.message });
    poem::web::Json(json).with_status(status).into_response()
}

impl<E: Endpoint> Endpoint for BodyLimitEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> Result<Self::Output> {
        let too_large = || {
            json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "request body is larger than the limit of {} bytes",
                    self.max
                ),
            )
        };
        let declared = req
            .header(poem::http::header::CONTENT_LENGTH)
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.max) {
            return Ok(too_large());
        }
        if declared.is_none() {
            match req.take_body().into_bytes_limit(self.max).await {
                Ok(bytes) => req.set_body(bytes),
                Err(poem::error::ReadBodyError::PayloadTooLarge) => return Ok(too_large()),
                Err(e) => {
                    return Ok(json_error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        e.to_string(),
                    ));
                }
            }
        }
        self.inner.call(req).await.map(IntoResponse::into_response)
    }
}
