//! One connection's bookkeeping: its socket (with a write timeout and the connection-cap
//! permit), whether its client is gone, and what it is doing, so that at the cap only a
//! connection with nothing worth keeping is evicted.
//!
//! A connection is *busy* from the moment a request head is parsed until the answer's last
//! byte has been written (`Held` wraps every response body), except while that request is
//! still receiving its body (`ConnActivity::receiving_body`): a client that sends a head
//! and stalls its body is as evictable as an idle one, or 512 such sockets would lock
//! everyone out.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often a queued request looks at its socket for a hang-up hyper cannot see.
const HANG_UP_POLL: Duration = Duration::from_millis(200);

/// Says when the client of a request's connection has gone: closed, half-closed or reset.
/// hyper only notices an end of stream when it reads, which it does not while it holds
/// pipelined bytes; so [`ClientGone::wait`] also polls the socket for `POLLRDHUP`, which
/// the kernel raises however much unread data sits before the FIN.
#[derive(Debug, Clone, Default)]
pub struct ClientGone {
    token: CancellationToken,
    /// The connection's socket while it is open; `None` inside means closed. `None`
    /// outside: not a socket's request (tests drive the app directly), never gone.
    socket: Option<Arc<Mutex<Option<RawFd>>>>,
}

impl ClientGone {
    /// Resolves once the client is gone.
    pub async fn wait(&self) {
        let Some(socket) = &self.socket else {
            return std::future::pending().await;
        };
        loop {
            tokio::select! {
                () = self.token.cancelled() => return,
                () = tokio::time::sleep(HANG_UP_POLL) => {}
            }
            if hung_up(socket) {
                self.token.cancel();
                return;
            }
        }
    }
}

/// Whether the peer of the socket (if still open) has shut its side or reset.
fn hung_up(socket: &Mutex<Option<RawFd>>) -> bool {
    // Held while polling: the descriptor cannot be closed (and its number reused) meanwhile.
    let guard = socket
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(fd) = *guard else {
        return true;
    };
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// What a connection's requests are doing (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct ConnActivity {
    in_progress: Arc<AtomicUsize>,
    receiving: Arc<AtomicUsize>,
}

impl ConnActivity {
    pub(super) fn request_started(&self) -> Counted {
        Counted::new(&self.in_progress)
    }

    /// Held while a request's body is being received: the connection stays evictable.
    pub fn receiving_body(&self) -> Counted {
        Counted::new(&self.receiving)
    }

    pub(super) fn is_evictable(&self) -> bool {
        let in_progress = self.in_progress.load(Ordering::SeqCst);
        in_progress <= self.receiving.load(Ordering::SeqCst)
    }
}

/// Counts one in a counter while alive.
pub struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: &Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::SeqCst);
        Counted(Arc::clone(count))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in progress until it is dropped,
/// which hyper does once the last byte is written (or the connection died).
pub(super) struct Held<B> {
    pub(super) body: B,
    pub(super) _until_sent: Counted,
}

impl<B: Body + Unpin> Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The open connections, oldest first.
#[derive(Default)]
pub(super) struct Connections {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Entry>>,
}

struct Entry {
    activity: ConnActivity,
    evict: CancellationToken,
}

/// Removes a connection from [`Connections`] when its task ends.
pub(super) struct Registered {
    id: u64,
    all: Arc<Connections>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.all
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Connections {
    /// A new connection: the token that evicts it, its activity, and its registration.
    pub(super) fn register(self: &Arc<Self>) -> (CancellationToken, ConnActivity, Registered) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evict = CancellationToken::new();
        let activity = ConnActivity::default();
        if let Ok(mut open) = self.open.lock() {
            open.insert(
                id,
                Entry {
                    activity: activity.clone(),
                    evict: evict.clone(),
                },
            );
        }
        let registered = Registered {
            id,
            all: Arc::clone(self),
        };
        (evict, activity, registered)
    }

    /// Close the oldest connection with nothing worth keeping; false if there is none.
    pub(super) fn evict_oldest(&self) -> bool {
        let Ok(mut open) = self.open.lock() else {
            return false;
        };
        let idle = open
            .iter()
            .find(|(_, e)| e.activity.is_evictable())
            .map(|(id, _)| *id);
        match idle.and_then(|id| open.remove(&id)) {
            Some(entry) => {
                entry.evict.cancel();
                true
            }
            None => false,
        }
    }
}

/// One connection's socket: a write timeout, the client-gone state, and the connection-cap
/// permit, released with the socket.
pub(super) struct ConnIo {
    inner: Pin<Box<TimeoutStream<TcpStream>>>,
    gone: CancellationToken,
    socket: Arc<Mutex<Option<RawFd>>>,
    metrics: Arc<Metrics>,
    _permit: OwnedSemaphorePermit,
}

impl ConnIo {
    pub(super) fn new(
        tcp: TcpStream,
        permit: OwnedSemaphorePermit,
        write_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let socket = Arc::new(Mutex::new(Some(tcp.as_raw_fd())));
        let mut stream = TimeoutStream::new(tcp);
        // Only writes: a read is pending for as long as a handler runs (hyper watches
        // for the peer's EOF), so a read timeout would cut long executions short.
        stream.set_write_timeout(Some(write_timeout));
        metrics.connection_opened();
        ConnIo {
            inner: Box::pin(stream),
            gone: CancellationToken::new(),
            socket,
            metrics,
            _permit: permit,
        }
    }

    pub(super) fn client_gone(&self) -> ClientGone {
        ClientGone {
            token: self.gone.clone(),
            socket: Some(Arc::clone(&self.socket)),
        }
    }
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        // Before the socket closes (the fields drop after this): no poll sees its number.
        *self
            .socket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.gone.cancel();
        self.metrics.connection_closed();
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        let polled = self.inner.as_mut().poll_read(cx, buf);
        match &polled {
            // End of stream: the client closed its side, so nobody waits for an answer.
            Poll::Ready(Ok(())) if wanted && buf.filled().len() == before => self.gone.cancel(),
            Poll::Ready(Err(_)) => self.gone.cancel(),
            _ => {}
        }
        polled
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.as_mut().poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }
}
