//! The HTTP server under the routes: the accept loop, a cap on open connections, a timeout for
//! a request head and one for an idle keep-alive connection, and the drain on shutdown.
//!
//! `axum::serve` has none of these limits: a client that connected and sent nothing held its
//! file descriptor forever, and a thousand of them stopped the server. hyper's own
//! `header_read_timeout` does not fit either: it is re-armed the moment a keep-alive
//! connection goes idle, so it would also be the idle timeout. Here both are one small state
//! machine per connection ([`Phase`]), fed by the socket's reads and by the requests the
//! router is answering; a request in flight is never timed out here, however long it waits.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::Router;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::HttpConfig;

/// Connections the kernel completes and queues while every slot is taken (it caps this at
/// `net.core.somaxconn`). The 128 tokio and std use would turn a burst beyond
/// `max_connections` into dropped SYNs and client retries seconds apart.
const BACKLOG: u32 = 1024;

/// Pauses after an accept error that is the server's (out of file descriptors, of memory):
/// retrying at once would spin, and the condition lasts until connections close.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// How often "all connections in use" is logged while it lasts.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: u32,
}

impl Limits {
    /// The `[http]` settings, with `max_connections` lowered to fit `fd_limit` (the soft
    /// open-files limit, `None` when unlimited or unknown).
    pub fn new(http: &HttpConfig, fd_limit: Option<u64>) -> Self {
        let max_connections = connection_cap(http.max_connections, fd_limit);
        if max_connections < http.max_connections {
            tracing::warn!(
                configured = http.max_connections,
                max_connections,
                fd_limit,
                "http.max_connections lowered to fit the open-files limit (raise the hard limit, e.g. LimitNOFILE, to allow more)"
            );
        }
        Self {
            header_read_timeout: Duration::from_millis(http.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(http.idle_timeout_ms),
            max_connections,
        }
    }
}

/// `configured` within `fd_limit`, leaving room for what else the server opens (database
/// files and connections, plugins, the listener): a quarter of the limit, at most 256.
fn connection_cap(configured: u32, fd_limit: Option<u64>) -> u32 {
    let Some(limit) = fd_limit else {
        return configured;
    };
    let room = limit.saturating_sub((limit / 4).min(256)).max(1);
    configured.min(u32::try_from(room).unwrap_or(u32::MAX))
}

/// Raises the soft open-files limit to the hard one and returns the soft limit then in force
/// (`None`: unlimited or unknown). Every connection is a file descriptor, and the soft limit
/// many systems start a process with (1024) is far below what the hard limit allows.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let limit = getrlimit(Resource::Nofile);
        let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else {
            tracing::info!(soft = ?limit.current, hard = ?limit.maximum, "open-files limit");
            return limit.current;
        };
        if soft >= hard {
            tracing::info!(soft, hard, "open-files limit");
            return Some(soft);
        }
        let raised = Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::info!(
                    was = soft,
                    soft = hard,
                    hard,
                    "open-files limit raised to the hard limit"
                );
                Some(hard)
            }
            Err(err) => {
                tracing::warn!(soft, hard, error = %err, "cannot raise the open-files limit");
                Some(soft)
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// Listens on `addr` (the first of its addresses that binds) with a backlog of [`BACKLOG`].
pub async fn bind(addr: &str) -> io::Result<TcpListener> {
    let mut last_err = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        };
        let listener = socket.and_then(|socket| {
            // As tokio does: a restart must not wait out the old sockets' TIME_WAIT.
            #[cfg(not(windows))]
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(BACKLOG)
        });
        match listener {
            Ok(listener) => return Ok(listener),
            Err(err) => last_err = Some(err),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting, closes the
/// connections with nothing of a request received, and returns once the others have been
/// answered.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let router = TowerToHyperService::new(router);
    let limits = Arc::new(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    let (closing, closing_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    let mut backoff = Duration::ZERO;
    let mut warned_full: Option<Instant> = None;
    loop {
        if slots.available_permits() == 0
            && warned_full.is_none_or(|at| at.elapsed() >= FULL_WARNING_EVERY)
        {
            // Beyond the cap new connections wait, queued by the kernel, rather than being
            // refused: a burst costs them latency, not errors, and each slot frees within
            // a timeout when its client is slow or silent.
            tracing::warn!(
                max_connections = limits.max_connections,
                "all connections in use: new ones wait in the listen backlog"
            );
            warned_full = Some(Instant::now());
        }
        let slot = tokio::select! {
            _ = shutdown.as_mut() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.as_mut() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff = Duration::ZERO;
                    stream
                }
                // The client's doing, gone already: nothing to wait for.
                Err(err) if is_connection_error(&err) => continue,
                Err(err) => {
                    backoff = (backoff * 2).clamp(MIN_ACCEPT_BACKOFF, MAX_ACCEPT_BACKOFF);
                    tracing::error!(
                        error = %err,
                        retry_in_ms = backoff.as_millis() as u64,
                        "accept failed"
                    );
                    tokio::select! {
                        _ = shutdown.as_mut() => break,
                        _ = tokio::time::sleep(backoff) => continue,
                    }
                }
            },
        };
        tokio::spawn(connection(
            stream,
            router.clone(),
            limits.clone(),
            closing_rx.clone(),
            slot,
        ));
    }
    drop(listener);
    let _ = closing.send(true);
    // Each connection holds its slot until it ends: every slot back is every connection done.
    let _ = slots.acquire_many(limits.max_connections).await;
}

fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn connection(
    stream: TcpStream,
    router: TowerToHyperService<Router>,
    limits: Arc<Limits>,
    mut closing: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    });
    let handler = Handler {
        router,
        activity: activity.clone(),
    };
    let mut builder = http1::Builder::new();
    // Ours is in `Activity`; hyper's would also cut idle keep-alive connections.
    builder.header_read_timeout(None);
    let mut conn = pin!(builder.serve_connection(io, handler));
    let mut draining = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(err) = served {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
                return;
            }
            // Dropping the connection closes it; nothing is in flight to lose.
            timeout = activity.timed_out(&limits) => {
                tracing::debug!(timeout, "connection closed");
                return;
            }
            _ = closing.changed(), if !draining => {
                draining = true;
                if activity.awaits_a_request() {
                    return;
                }
                // Answers the request in flight, or the one arriving (its head within the
                // header timeout), then closes.
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Where a connection is between requests, and since when.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request head: since the accept for the first request, since its first
    /// byte for a later one (so a client dribbling a byte at a time gains nothing);
    /// `received`: some of it has arrived.
    Head { since: Instant, received: bool },
    /// No request in flight, nothing of the next one received, since the last response was
    /// handed to hyper.
    Idle(Instant),
    /// This many requests being answered; hyper's HTTP/1 answers one at a time, but a
    /// response body can outlive its request's handler for a moment.
    Busy(usize),
}

struct Activity {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Head {
                since: Instant::now(),
                received: false,
            }),
            changed: Notify::new(),
        }
    }

    fn update(&self, f: impl FnOnce(Phase) -> Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        *phase = f(*phase);
        drop(phase);
        self.changed.notify_one();
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bytes_read(&self) {
        if self.awaits_a_request() {
            self.update(|phase| match phase {
                Phase::Idle(_) => Phase::Head {
                    since: Instant::now(),
                    received: true,
                },
                Phase::Head { since, .. } => Phase::Head {
                    since,
                    received: true,
                },
                busy => busy,
            });
        }
    }

    /// Nothing of a request received: the connection can be closed without losing one.
    fn awaits_a_request(&self) -> bool {
        matches!(
            self.phase(),
            Phase::Idle(_)
                | Phase::Head {
                    received: false,
                    ..
                }
        )
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.update(|phase| match phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Head { .. } | Phase::Idle(_) => Phase::Busy(1),
        });
        InFlight(self.clone())
    }

    fn request_done(&self) {
        self.update(|phase| match phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        });
    }

    /// Completes, naming the timeout, once the connection has waited longer than its phase
    /// allows; never while a request is in flight.
    async fn timed_out(&self, limits: &Limits) -> &'static str {
        loop {
            let (deadline, name) = match self.phase() {
                Phase::Head { since, .. } => (since + limits.header_read_timeout, "header_read"),
                Phase::Idle(since) => (since + limits.idle_timeout, "idle"),
                Phase::Busy(_) => {
                    self.changed.notified().await;
                    continue;
                }
            };
            if Instant::now() >= deadline {
                return name;
            }
            // A change of phase moves the deadline: look again.
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.changed.notified() => {}
            }
        }
    }
}

/// A request in flight; its end (the response body dropped by hyper once written, or the
/// handler's future dropped) makes the connection idle.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

/// The router, marking each request in flight until its response body is done.
#[derive(Clone)]
struct Handler {
    router: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for Handler {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.request_started();
        let response = self.router.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket, telling [`Activity`] when bytes arrive.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_room_under_the_fd_limit() {
        assert_eq!(connection_cap(10_000, None), 10_000);
        assert_eq!(connection_cap(10_000, Some(1_048_576)), 10_000);
        // 1024, a common soft limit: 256 kept for files and database connections.
        assert_eq!(connection_cap(10_000, Some(1024)), 768);
        // Small limits keep a quarter.
        assert_eq!(connection_cap(10_000, Some(256)), 192);
        assert_eq!(connection_cap(50, Some(256)), 50);
        assert_eq!(connection_cap(10, Some(1)), 1);
    }

    #[test]
    fn only_a_connection_with_nothing_of_a_request_is_closed_at_once_on_shutdown() {
        let activity = Arc::new(Activity::new());
        assert!(activity.awaits_a_request(), "fresh");
        activity.bytes_read();
        assert!(!activity.awaits_a_request(), "part of a head received");
        let in_flight = activity.request_started();
        assert!(!activity.awaits_a_request(), "a request in flight");
        drop(in_flight);
        assert!(activity.awaits_a_request(), "idle");
    }

    #[tokio::test]
    async fn a_request_in_flight_is_never_timed_out_and_idleness_starts_at_its_end() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(300),
            max_connections: 1,
        };
        let activity = Arc::new(Activity::new());
        let start = Instant::now();
        assert_eq!(activity.timed_out(&limits).await, "header_read");
        assert!(start.elapsed() >= limits.header_read_timeout);

        let activity = Arc::new(Activity::new());
        let in_flight = activity.request_started();
        let waited = tokio::time::timeout(Duration::from_secs(1), activity.timed_out(&limits));
        assert!(
            waited.await.is_err(),
            "timed out while a request was in flight"
        );
        drop(in_flight);
        let idle_from = Instant::now();
        assert_eq!(activity.timed_out(&limits).await, "idle");
        assert!(idle_from.elapsed() >= limits.idle_timeout);

        // The first byte of the next request switches to the header timeout; later bytes do
        // not restart it.
        let activity = Arc::new(Activity::new());
        drop(activity.request_started());
        activity.bytes_read();
        let head_from = Instant::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        activity.bytes_read();
        assert_eq!(activity.timed_out(&limits).await, "header_read");
        let took = head_from.elapsed();
        assert!(took >= limits.header_read_timeout, "{took:?}");
        assert!(took < limits.idle_timeout, "{took:?}");
    }
}
