//! Request bodies under control: refuse bodies over `server.max_body_bytes` with a JSON 413
//! (whether or not the client sent Content-Length: a chunked body is read up to the limit,
//! never past it), read every body within `server.body_read_timeout_ms` (408), and keep
//! the bytes buffered across all requests under `server.max_inflight_body_bytes` (a
//! request waits for its share, then gets 503 with Retry-After). So 400 clients stalling
//! on 2 MiB bodies hold at most the budget, not 800 MB.

use std::sync::Arc;
use std::time::Duration;

use poem::http::StatusCode;
use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result};
use tokio::sync::Semaphore;

use super::errors::{ErrorCode, json_error, json_error_with_status};
use crate::metrics::{HttpGuard, Metrics};

/// The budget counts in KiB, so a terabyte fits the semaphore's `u32` acquisitions.
const UNIT: usize = 1024;

pub struct BodyLimit {
    budget_units: usize,
    max: usize,
    timeout: Duration,
    budget: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl BodyLimit {
    pub fn new(max: usize, inflight: usize, timeout: Duration, metrics: Arc<Metrics>) -> BodyLimit {
        let budget_units = inflight.div_ceil(UNIT);
        BodyLimit {
            budget_units,
            max,
            timeout,
            budget: Arc::new(Semaphore::new(budget_units)),
            metrics,
        }
    }
}

impl<E: Endpoint> Middleware<E> for BodyLimit {
    type Output = BodyLimitEndpoint<E>;

    fn transform(&self, ep: E) -> Self::Output {
        BodyLimitEndpoint {
            inner: ep,
            budget_units: self.budget_units,
            max: self.max,
            timeout: self.timeout,
            budget: Arc::clone(&self.budget),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

pub struct BodyLimitEndpoint<E> {
    inner: E,
    /// The budget's size, to tell when no body is buffered.
    budget_units: usize,
    max: usize,
    timeout: Duration,
    budget: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// A request's share of the body budget.
struct Share<'a> {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    budget: &'a Semaphore,
    units: usize,
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        if self.budget.available_permits() == self.units {
            return_memory_to_the_system();
        }
    }
}

/// Once no body is buffered any more, give freed heap back to the kernel (glibc keeps it
/// otherwise: a burst of large bodies left 841 MB resident with no connection open). At
/// most once a second, off the async workers.
fn return_memory_to_the_system() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST.swap(now, Ordering::Relaxed) == now {
        return;
    }
    tokio::task::spawn_blocking(|| {
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
    });
}

impl<E: Endpoint> Endpoint for BodyLimitEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> Result<Self::Output> {
        let too_large = || {
            json_error(
                ErrorCode::PayloadTooLarge,
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
        // HTTP/1.1: a request has a body when it says so (Content-Length or
        // Transfer-Encoding); one that says neither is still read (bounded) unless its
        // method never has one, so no path buffers an unbounded body.
        let says_body = declared.is_some_and(|n| n > 0)
            || req.header(poem::http::header::TRANSFER_ENCODING).is_some();
        let bodiless_method = matches!(
            *req.method(),
            poem::http::Method::GET | poem::http::Method::HEAD | poem::http::Method::OPTIONS
        );
        if declared == Some(0) || (!says_body && bodiless_method) {
            return self.inner.call(req).await.map(IntoResponse::into_response);
        }
        // A body's share of the budget: what it declared, or the most a chunked one may be.
        let units = declared.unwrap_or(self.max).div_ceil(UNIT).max(1);
        let units = u32::try_from(units).unwrap_or(u32::MAX);
        let permit = match tokio::time::timeout(
            self.timeout,
            Arc::clone(&self.budget).acquire_many_owned(units),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            _ => {
                self.metrics.http_refused(HttpGuard::BodyBudget);
                // Busy like a full queue, but 503: the daemon, not its slots, is full.
                let mut resp = json_error_with_status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Busy,
                    "too many request bodies are being received; retry in a second",
                );
                resp.headers_mut()
                    .insert(poem::http::header::RETRY_AFTER, 1.into());
                return Ok(resp);
            }
        };
        // Whatever the outcome, the share goes back, and freed memory to the system.
        let _share = Share {
            permit: Some(permit),
            budget: &self.budget,
            units: self.budget_units,
        };
        // Receiving a body does not protect the connection from eviction at the cap.
        let receiving = req
            .extensions()
            .get::<crate::server::ConnActivity>()
            .map(crate::server::ConnActivity::receiving_body);
        let read = tokio::time::timeout(self.timeout, req.take_body().into_bytes_limit(self.max));
        let read = read.await;
        drop(receiving);
        match read {
            Ok(Ok(bytes)) => req.set_body(bytes),
            Ok(Err(poem::error::ReadBodyError::PayloadTooLarge)) => return Ok(too_large()),
            Ok(Err(e)) => {
                return Ok(json_error(ErrorCode::BadRequest, e.to_string()));
            }
            Err(_) => {
                self.metrics.http_refused(HttpGuard::BodyTimeout);
                return Ok(json_error(
                    ErrorCode::RequestTimeout,
                    format!(
                        "the request body did not arrive within {} ms",
                        self.timeout.as_millis()
                    ),
                ));
            }
        }
        // Held while the request is handled: its body (and what is parsed from it) lives
        // that long.
        self.inner.call(req).await.map(IntoResponse::into_response)
    }
}
