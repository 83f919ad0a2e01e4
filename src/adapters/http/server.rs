//! The listener: accepts TCP connections and serves each one with hyper's
//! HTTP/1.1 connection driver over the poem endpoint.
//!
//! poem's own `Server` sets no timer (so hyper's header timeout is off), has
//! no connection cap, spins on accept errors (a full file-descriptor table
//! makes `accept` fail at once, forever) and speaks cleartext HTTP/2, whose
//! streams multiply what one connection may hold. This loop owns those
//! decisions instead:
//!
//! - HTTP/1.1 only: an HTTP/2 preface without TLS is refused by hyper as a
//!   malformed HTTP/1 request, so one connection holds one request at a time.
//! - A connection cap: past it, a new connection gets a 503 and is closed.
//! - Back-off after accept errors that mean "out of resources".
//! - Per connection, a watchdog with three clocks: the idle clock (no
//!   request for `idle_timeout`), the head clock (a request head started but
//!   not finished within `header_timeout`) and the write clock (a response
//!   write blocked for `write_timeout`: the client stopped reading). Body
//!   uploads are bounded by the body-limit middleware, after the key check.
//!   A WebSocket leaves this watchdog at the upgrade: its transport has its
//!   own liveness rules.
//! - Graceful shutdown: stop accepting, let each connection finish its
//!   request in flight, and drop whatever is left after the grace period.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use poem::endpoint::BoxEndpoint;
use poem::http::uri::Scheme;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Addr, Endpoint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Limits of the listener and of each connection.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Open connections (WebSockets included) the server accepts at once.
    pub max_connections: usize,
    /// A request head must arrive whole within this time of its first byte.
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// A response write blocked this long (the client stopped reading)
    /// closes the connection.
    pub write_timeout: Duration,
    /// After the shutdown signal, how long requests in flight may finish.
    pub grace: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            grace: Duration::from_secs(20),
        }
    }
}

/// The answer to a connection past the cap, written before it is closed.
fn too_many_connections() -> Vec<u8> {
    let body = r#"{"detail":"The server has too many open connections; try again later"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Connections past the cap answered at once; the others are just closed.
const REFUSERS: usize = 64;

/// Reads (and drops) what the client sends for up to a second, answers 503
/// and closes.
async fn refuse(mut stream: TcpStream, refusal: Arc<[u8]>, _slot: OwnedSemaphorePermit) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = [0u8; 4096];
    let limit = Duration::from_secs(1);
    if matches!(tokio::time::timeout(limit, stream.read(&mut request)).await, Ok(Ok(n)) if n > 0) {
        let _ = tokio::time::timeout(limit, stream.write_all(&refusal)).await;
        let _ = stream.shutdown().await;
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests
/// in flight finish for up to `settings.grace`.
///
/// # Errors
/// The listener's address cannot be read.
pub async fn serve(
    listener: TcpListener,
    app: BoxEndpoint<'static>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let local = LocalAddr(Addr::SocketAddr(listener.local_addr()?));
    let app: Arc<BoxEndpoint<'static>> = Arc::new(app);
    let settings = Arc::new(settings);
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let connections = TaskTracker::new();
    // Cancelled at shutdown: each connection ends after its request.
    let finish = CancellationToken::new();
    // Cancelled after the grace period: connections still open are dropped.
    let abort = CancellationToken::new();
    let mut backoff = Backoff::default();
    let refusal: Arc<[u8]> = too_many_connections().into();
    let refusers = Arc::new(Semaphore::new(REFUSERS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            Err(error) if is_per_connection(&error) => continue,
            Err(error) => {
                let pause = backoff.next();
                tracing::warn!(%error, pause_ms = pause.as_millis(), "accept failed; pausing");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            metrics::counter!("autopoiesis_http_connections_refused_total").increment(1);
            // Answered once the client has sent its request (an HTTP client
            // takes an answer that comes first as a protocol error), by a
            // few short-lived tasks at most; past them the socket is closed.
            if let Ok(refuser) = Arc::clone(&refusers).try_acquire_owned() {
                tokio::spawn(refuse(stream, Arc::clone(&refusal), refuser));
            }
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
        connections.spawn(serve_connection(Connection {
            stream,
            permit,
            local: local.clone(),
            remote: RemoteAddr(Addr::SocketAddr(remote)),
            app: Arc::clone(&app),
            settings: Arc::clone(&settings),
            finish: finish.clone(),
            abort: abort.clone(),
        }));
    }
    drop(listener);
    finish.cancel();
    connections.close();
    if tokio::time::timeout(settings.grace, connections.wait())
        .await
        .is_err()
    {
        tracing::info!(
            connections = connections.len(),
            "grace period over: closing the remaining connections"
        );
        abort.cancel();
        connections.wait().await;
    }
    Ok(())
}

/// Errors that concern one connection only (it went away before it was
/// accepted): the next `accept` may succeed at once.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// The pause after an accept error (out of file descriptors or memory):
/// doubling from 10 ms up to 1 s, so a full table does not spin a core.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let pause = Duration::from_millis(10u64 << self.failures.min(7));
        self.failures += 1;
        pause.min(Duration::from_secs(1))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

struct Connection {
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    local: LocalAddr,
    remote: RemoteAddr,
    app: Arc<BoxEndpoint<'static>>,
    settings: Arc<ServerSettings>,
    finish: CancellationToken,
    abort: CancellationToken,
}

async fn serve_connection(connection: Connection) {
    let Connection {
        stream,
        permit,
        local,
        remote,
        app,
        settings,
        finish,
        abort,
    } = connection;
    metrics::gauge!("autopoiesis_http_connections").increment(1.0);
    let activity = Arc::new(Activity::new());
    let io = Watched {
        inner: stream,
        activity: Arc::clone(&activity),
        _permit: ConnectionPermit(permit),
    };
    let peer = remote.to_string();
    let service = hyper::service::service_fn({
        let activity = Arc::clone(&activity);
        move |req: hyper::Request<Incoming>| {
            let (app, activity) = (Arc::clone(&app), Arc::clone(&activity));
            let (local, remote) = (local.clone(), remote.clone());
            let in_flight = activity.request_started();
            async move {
                let request = poem::Request::from((req, local, remote, Scheme::HTTP));
                let response = app.get_response(request).await;
                let response: hyper::Response<_> = response.into();
                // The request counts as in flight until its body is sent
                // (or dropped): a streamed answer is not an idle connection.
                Ok::<_, Infallible>(response.map(move |body| {
                    body.map_frame(move |frame| {
                        let _ = &in_flight;
                        frame
                    })
                }))
            }
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        // The watchdog below keeps the header clock, started at the head's
        // first byte rather than when the connection became idle.
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut finishing = false;
    loop {
        tokio::select! {
            _ = &mut conn => break,
            () = finish.cancelled(), if !finishing => {
                finishing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = abort.cancelled() => break,
            expired = activity.expired(&settings) => {
                tracing::debug!(remote = %peer, clock = expired, "connection timed out");
                metrics::counter!("autopoiesis_http_connections_timed_out_total", "clock" => expired)
                    .increment(1);
                break;
            }
        }
    }
}

/// Holds a connection's place under the cap until its socket closes, also
/// when the socket lives on as an upgraded WebSocket.
struct ConnectionPermit(#[allow(dead_code)] OwnedSemaphorePermit);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        metrics::gauge!("autopoiesis_http_connections").decrement(1.0);
    }
}

/// What a connection's watchdog reads: times are milliseconds since `base`
/// plus one, 0 meaning "not set".
struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    /// When the connection last had no request in flight.
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived.
    head_started: AtomicU64,
    /// When a write started to block.
    write_blocked: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(1),
            head_started: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.head_started.store(0, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started.store(self.now(), Ordering::Relaxed);
        }
    }

    fn write_pending(&self, pending: bool) {
        let blocked = self.write_blocked.load(Ordering::Relaxed);
        if pending && blocked == 0 {
            self.write_blocked.store(self.now(), Ordering::Relaxed);
        } else if !pending && blocked != 0 {
            self.write_blocked.store(0, Ordering::Relaxed);
        }
    }

    /// The clock that runs now and when it rings, if one does.
    fn deadline(&self, settings: &ServerSettings) -> Option<(&'static str, u64)> {
        let at = |since: u64, limit: Duration| {
            since.saturating_add(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX))
        };
        let blocked = self.write_blocked.load(Ordering::SeqCst);
        if blocked != 0 {
            return Some(("write", at(blocked, settings.write_timeout)));
        }
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        match self.head_started.load(Ordering::SeqCst) {
            0 => Some((
                "idle",
                at(
                    self.idle_since.load(Ordering::SeqCst),
                    settings.idle_timeout,
                ),
            )),
            started => Some(("header", at(started, settings.header_timeout))),
        }
    }

    /// Resolves with the clock's name once one of them has run out.
    async fn expired(&self, settings: &ServerSettings) -> &'static str {
        // Clocks only move later while one runs, except that another may
        // start (a head begins on an idle connection, a write blocks while
        // a request is in flight): so look again at least this often.
        let recheck = settings
            .write_timeout
            .min(settings.header_timeout)
            .min(settings.idle_timeout)
            / 2;
        loop {
            let now = self.now();
            let wait = match self.deadline(settings) {
                Some((clock, at)) if at <= now => return clock,
                Some((_, at)) => Duration::from_millis(at - now).min(recheck),
                None => recheck,
            };
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }
}

/// A request in flight; the connection is idle again when the last drops.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        activity.idle_since.store(activity.now(), Ordering::SeqCst);
        activity.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The socket, reporting reads and blocked writes to the watchdog.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    _permit: ConnectionPermit,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.write_pending(polled.is_pending());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.write_pending(polled.is_pending());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_past_the_cap_is_a_well_formed_response() {
        let refusal = String::from_utf8(too_many_connections()).unwrap();
        let (head, body) = refusal.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }

    #[test]
    fn the_accept_backoff_doubles_up_to_a_second_and_resets() {
        let mut backoff = Backoff::default();
        let pauses: Vec<_> = (0..10).map(|_| backoff.next().as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next(), Duration::from_millis(10));
    }

    fn settings() -> ServerSettings {
        ServerSettings {
            header_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(200),
            write_timeout: Duration::from_millis(300),
            ..ServerSettings::default()
        }
    }

    #[test]
    fn an_idle_connection_runs_the_idle_clock_and_a_started_head_the_header_clock() {
        let activity = Arc::new(Activity::new());
        assert_eq!(activity.deadline(&settings()).map(|d| d.0), Some("idle"));
        activity.bytes_read();
        assert_eq!(activity.deadline(&settings()).map(|d| d.0), Some("header"));
        let in_flight = activity.request_started();
        assert_eq!(activity.deadline(&settings()), None);
        activity.write_pending(true);
        assert_eq!(activity.deadline(&settings()).map(|d| d.0), Some("write"));
        activity.write_pending(false);
        drop(in_flight);
        assert_eq!(activity.deadline(&settings()).map(|d| d.0), Some("idle"));
    }

    #[tokio::test]
    async fn the_watchdog_rings_the_clock_that_ran_out() {
        let activity = Arc::new(Activity::new());
        activity.bytes_read();
        let rang = tokio::time::timeout(Duration::from_secs(5), activity.expired(&settings()))
            .await
            .unwrap();
        assert_eq!(rang, "header");
    }
}
