//! A bound on the bytes of execution answers held in memory at once, whatever clients do.
//!
//! An answer can be large (up to twice `output_bytes` per stream as JSON, see the runner's
//! `json_prefix`) and a client that reads it slowly keeps it in memory. So before a
//! submission runs it reserves its worst-case answer size from
//! `server.max_inflight_response_bytes`, and the reservation is released when the answer's
//! last byte has left (or the connection died). Two rules keep slow readers from holding
//! the budget, and with it the service, for everyone:
//! - one client address holds at most a quarter of the budget; past that its submissions
//!   are answered 429 busy at once (the other clients' share is untouched);
//! - an answer must be sent at [`MIN_SEND_RATE`] after `server.write_timeout_ms` of grace;
//!   a client reading slower has its connection cut, and the reservation returns.
//!
//! A submission that cannot get its share within the queue wait is answered 429 busy, like
//! a full queue. Daemon memory for answers is then at most the budget.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use poem::Body;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::execution::{ExecutionRequest, Limits};

/// The budget counts in KiB, so large budgets fit the semaphore's `u32` acquisitions.
const UNIT: u64 = 1024;
/// The slowest an answer may be read (after the write timeout's grace).
pub(crate) const MIN_SEND_RATE: u64 = 256 * 1024;
/// The part of the budget one client address may hold.
const PEER_SHARE_DIVISOR: u64 = 4;

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
pub(crate) struct ResponseBudget {
    semaphore: Arc<Semaphore>,
    /// KiB held per client address.
    held: Arc<Mutex<HashMap<IpAddr, u64>>>,
    peer_share: u64,
    total_units: u64,
}

/// The address a share is counted under: IPv4 as is, IPv6 by its /64 (one subscriber's
/// network, which hands out addresses freely).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

/// Why no share was reserved at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// This client address already holds its share.
    PeerShare,
    /// The answer could be larger than the whole budget.
    TooLarge,
}

impl ResponseBudget {
    pub(crate) fn new(bytes: u64) -> ResponseBudget {
        let units = bytes.div_ceil(UNIT);
        ResponseBudget {
            semaphore: Arc::new(Semaphore::new(
                usize::try_from(units).unwrap_or(usize::MAX >> 4),
            )),
            held: Arc::default(),
            peer_share: units / PEER_SHARE_DIVISOR,
            total_units: units,
        }
    }

    /// Reserve `bytes` for a client at `peer`, waiting for earlier answers to leave; refused
    /// at once when that client's share is full.
    pub(crate) async fn reserve(
        &self,
        bytes: u64,
        peer: Option<IpAddr>,
    ) -> Result<Reserved, Refused> {
        let units = bytes.div_ceil(UNIT);
        // More than the whole budget could never be granted, and would block every later
        // reservation behind it (the semaphore is fair): refuse it at once.
        if units > self.total_units {
            return Err(Refused::TooLarge);
        }
        let peer = peer.map(client_key);
        // A request larger than a share alone still runs when its client holds nothing.
        if let Some(ip) = peer {
            let mut held = self
                .held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mine = held.entry(ip).or_default();
            if *mine > 0 && *mine + units > self.peer_share {
                return Err(Refused::PeerShare);
            }
            *mine += units;
        }
        let share = peer.map(|ip| PeerShare {
            held: Arc::clone(&self.held),
            ip,
            units,
        });
        let acquired = Arc::clone(&self.semaphore)
            .acquire_many_owned(u32::try_from(units).unwrap_or(u32::MAX))
            .await;
        match acquired {
            Ok(permit) => Ok(Reserved {
                bytes,
                _permit: permit,
                _share: share,
            }),
            // The semaphore is never closed; `share` gives the client's count back.
            Err(_) => Err(Refused::PeerShare),
        }
    }
}

/// A client address's part of a reservation, given back on drop.
struct PeerShare {
    held: Arc<Mutex<HashMap<IpAddr, u64>>>,
    ip: IpAddr,
    units: u64,
}

impl Drop for PeerShare {
    fn drop(&mut self) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(mine) = held.get_mut(&self.ip) {
            *mine = mine.saturating_sub(self.units);
            if *mine == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// An answer's reserved share of the budget.
pub(crate) struct Reserved {
    bytes: u64,
    _permit: OwnedSemaphorePermit,
    _share: Option<PeerShare>,
}

/// Where a handler leaves its reservation for the middleware that sends its answer.
#[derive(Clone, Default)]
pub(crate) struct Reservation(Arc<Mutex<Option<Reserved>>>);

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reservation")
    }
}

impl Reservation {
    pub(crate) fn hold(&self, reserved: Reserved) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(reserved);
        }
    }

    /// The answer's body, releasing the reservation once it has been sent in full, or once
    /// the client has read slower than [`MIN_SEND_RATE`] past `grace`.
    pub(crate) async fn attach(&self, body: Body, grace: Duration) -> Body {
        let reserved = self.0.lock().ok().and_then(|mut p| p.take());
        let Some(reserved) = reserved else {
            return body;
        };
        let deadline =
            Instant::now() + grace + Duration::from_secs(reserved.bytes.div_ceil(MIN_SEND_RATE));
        match body.into_bytes().await {
            Ok(bytes) => Body::from_async_read(HeldBytes {
                bytes: std::io::Cursor::new(bytes),
                deadline,
                _reserved: reserved,
            }),
            Err(_) => Body::empty(),
        }
    }
}

/// An answer's bytes with the reservation they hold (dropped with the body).
struct HeldBytes {
    bytes: std::io::Cursor<bytes::Bytes>,
    deadline: Instant,
    _reserved: Reserved,
}

impl AsyncRead for HeldBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if Instant::now() > self.deadline {
            // hyper ends the connection; dropping the body gives the reservation back.
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client reads its answer too slowly",
            )));
        }
        Pin::new(&mut self.bytes).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_client_holds_at_most_a_quarter_and_gets_it_back() {
        let budget = ResponseBudget::new(400 * UNIT);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = budget.reserve(60 * UNIT, Some(a)).await.expect("in share");
        assert!(
            budget.reserve(60 * UNIT, Some(a)).await.is_err(),
            "over a's share"
        );
        let other = budget
            .reserve(60 * UNIT, Some(b))
            .await
            .expect("b has its own");
        drop(first);
        assert!(
            budget.reserve(60 * UNIT, Some(a)).await.is_ok(),
            "given back"
        );
        drop(other);
        // Alone, a request larger than a share still gets through.
        assert!(budget.reserve(200 * UNIT, Some(b)).await.is_ok());
    }
}
