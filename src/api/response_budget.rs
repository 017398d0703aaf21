//! A bound on the bytes of execution answers held in memory at once, whatever clients do.
//!
//! An answer can be large (up to twice `output_bytes` per stream as JSON, see the runner's
//! `json_prefix`) and a client that reads it slowly keeps it in memory. So before a
//! submission runs it reserves its worst-case answer size from `server.max_inflight_response_bytes`,
//! and the reservation is released only when the answer's last byte has left (or the
//! connection died). A submission that cannot get its share within the queue wait is
//! answered 429 busy, like a full queue. Daemon memory for answers is then at most the
//! budget, however many clients stop reading.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use poem::Body;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::execution::{ExecutionRequest, Limits};

/// The budget counts in KiB, so large budgets fit the semaphore's `u32` acquisitions.
const UNIT: u64 = 1024;
/// The most an answer to `request` can hold, as JSON.
pub(crate) fn worst_case_bytes(request: &ExecutionRequest) -> u64 {
    let compile = request
        .runtime
        .compile
        .as_ref()
        .map(|_| &request.runtime.compile_limits);
    Limits::answer_bytes_at_most(&request.limits, compile)
}

#[derive(Clone)]
pub(crate) struct ResponseBudget(Arc<Semaphore>);

impl ResponseBudget {
    pub(crate) fn new(bytes: u64) -> ResponseBudget {
        let units = usize::try_from(bytes.div_ceil(UNIT)).unwrap_or(usize::MAX >> 4);
        ResponseBudget(Arc::new(Semaphore::new(units)))
    }

    /// Reserve `bytes`, waiting for earlier answers to leave.
    pub(crate) async fn reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX);
        Arc::clone(&self.0).acquire_many_owned(units).await.ok()
    }
}

/// Where a handler leaves its reservation for the middleware that sends its answer.
#[derive(Clone, Default)]
pub(crate) struct Reservation(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reservation")
    }
}

impl Reservation {
    pub(crate) fn hold(&self, permit: OwnedSemaphorePermit) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(permit);
        }
    }

    /// The answer's body, releasing the reservation once it has been sent in full.
    pub(crate) async fn attach(&self, body: Body) -> Body {
        let permit = self.0.lock().ok().and_then(|mut p| p.take());
        let Some(permit) = permit else {
            return body;
        };
        match body.into_bytes().await {
            Ok(bytes) => Body::from_async_read(HeldBytes {
                bytes: std::io::Cursor::new(bytes),
                _permit: permit,
            }),
            Err(_) => Body::empty(),
        }
    }
}

/// An answer's bytes with the reservation they hold (dropped with the body).
struct HeldBytes {
    bytes: std::io::Cursor<bytes::Bytes>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for HeldBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.bytes).poll_read(cx, buf)
    }
}
