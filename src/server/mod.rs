//! The HTTP server loop: accept, guard, and serve connections with hyper (HTTP/1.1 only).
//!
//! poem's own `Server` leaves a hostile client too much: no header-read timeout (hyper's
//! needs a timer poem never sets), no connection cap, accept errors retried in a hot loop,
//! HTTP/2 with no stream cap, and an HTTP/1 handler that keeps running after its client
//! hung up. So the daemon runs its own small loop around hyper, and poem only routes:
//! - at most `max_connections` open; at the cap the oldest idle connection (no request in
//!   progress) is closed to make room, so idle sockets cannot lock clients out; with none
//!   idle, the new one is answered a canned 503 and closed;
//! - a request head must arrive within `header_read_timeout_ms` (this also ends idle
//!   keep-alive connections), and a write that makes no progress for `write_timeout_ms`
//!   ends the connection (a client that stops reading cannot pin a response in memory);
//! - HTTP/1.1 only: an HTTP/2 preface is a parse error, so no stream multiplexing;
//! - accept errors (EMFILE...) back off instead of spinning;
//! - each request carries a [`ClientGone`] token that fires when the peer closes or
//!   resets the connection, so a queued submission whose client left never runs.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use poem::http::uri::Scheme;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint, IntoResponse};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod connection;

pub use connection::{ClientGone, ConnActivity};
use connection::{ConnIo, Connections, Held};

use crate::config::ServerSettings;
use crate::metrics::{HttpGuard, Metrics};

/// What the loop enforces, from `server.*` settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub write_timeout: Duration,
}

impl ConnectionLimits {
    pub fn from_settings(s: &ServerSettings) -> Self {
        ConnectionLimits {
            max_connections: s.max_connections,
            header_read_timeout: Duration::from_millis(s.header_read_timeout_ms),
            write_timeout: Duration::from_millis(s.write_timeout_ms),
        }
    }
}

/// Largest request head hyper buffers per connection (it refuses larger heads).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How long to wait before accepting again after an accept error such as EMFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The canned answer to a connection over the cap (written without blocking, then closed).
fn at_capacity() -> Vec<u8> {
    let body = format!(
        r#"{{"code":"{}","message":"too many open connections; retry in a second"}}"#,
        crate::error_code::ErrorCode::Busy.as_str()
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serve `endpoint` on `listener` until `shutdown` resolves, then let open connections
/// finish their requests for up to `grace`.
pub async fn serve<E>(
    listener: TcpListener,
    endpoint: E,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()>
where
    E: Endpoint + 'static,
{
    let endpoint = Arc::new(endpoint);
    let local = LocalAddr(listener.local_addr()?.into());
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let at_capacity = at_capacity();
    let tracker = TaskTracker::new();
    let idle = Arc::new(Connections::default());
    let stop = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_transient(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    metrics.http_refused(HttpGuard::AcceptError);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let permit = match Arc::clone(&open).try_acquire_owned() {
            Ok(p) => Some(p),
            // The evicted connection's permit comes back as soon as its task sees the token.
            Err(_) if idle.evict_oldest() => {
                metrics.http_refused(HttpGuard::IdleEvicted);
                tokio::time::timeout(EVICTION_WAIT, Arc::clone(&open).acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        };
        let Some(permit) = permit else {
            metrics.http_refused(HttpGuard::Connections);
            // Best effort and never blocking: a full socket buffer just loses the body.
            let _ = tcp.try_write(&at_capacity);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let io = ConnIo::new(tcp, permit, limits.write_timeout, Arc::clone(&metrics));
        let gone = io.client_gone();
        let (endpoint, local, remote) = (
            Arc::clone(&endpoint),
            local.clone(),
            RemoteAddr(peer.into()),
        );
        let stop = stop.clone();
        let (evict, activity, registered) = idle.register();
        let activity_now = activity.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |mut req| {
                req.extensions_mut().insert(gone.clone());
                req.extensions_mut().insert(activity.clone());
                let request =
                    poem::Request::from((req, local.clone(), remote.clone(), Scheme::HTTP));
                let endpoint = Arc::clone(&endpoint);
                // In progress until its answer's last byte is written, not just produced.
                let busy = activity.request_started();
                async move {
                    let response = match endpoint.call(request).await {
                        Ok(r) => r.into_response(),
                        Err(e) => e.into_response(),
                    };
                    Ok::<_, Infallible>(hyper::Response::from(response).map(|body| Held {
                        body,
                        _until_sent: busy,
                    }))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let evicted = tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    false
                }
                _ = evict.cancelled() => true,
            };
            // Idle when it was chosen; closing it loses nothing, unless a request arrived
            // in between: then it is served (and no longer in the eviction list).
            if evicted && activity_now.is_evictable() {
                return;
            }
            let _ = conn.await;
            drop(registered);
        });
    }
    // Stop accepting; idle connections close at once, busy ones after their response.
    drop(listener);
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace period");
    }
    Ok(())
}

/// How long a new connection waits for an evicted idle one to give back its place.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// Errors about one incoming connection, not about the listener: accept again at once.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted, WouldBlock};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

/// The open-files limit cannot hold what the settings need.
#[derive(Debug, thiserror::Error)]
pub enum OpenFilesError {
    #[error("cannot read the open-files limit: {0}")]
    Read(#[source] std::io::Error),
    #[error(
        "the open-files hard limit is {hard} but {what} need {needed}: raise it (`ulimit -Hn`, \
         systemd `LimitNOFILE=`, docker `--ulimit nofile=`) or lower the setting"
    )]
    TooLow {
        hard: u64,
        needed: u64,
        what: String,
    },
}

/// Raise the soft open-files limit to the hard one (systemd's soft default is 1024), and
/// check that the hard one leaves room for every connection and every run's descriptors.
pub fn raise_open_files(needed: u64, what: &str) -> Result<u64, OpenFilesError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(OpenFilesError::Read(std::io::Error::last_os_error()));
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    if lim.rlim_max < needed {
        return Err(OpenFilesError::TooLow {
            hard: lim.rlim_max,
            needed,
            what: what.to_string(),
        });
    }
    Ok(lim.rlim_max)
}
