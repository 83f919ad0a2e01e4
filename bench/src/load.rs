//! The HTTP load generator: N keep-alive HTTP/1.1 connections (hyper's
//! client connection, no pool: one task owns one socket), each sending its
//! next request as soon as the previous answer is read, until the deadline.
//!
//! One clock for the whole run: every connection warms up until
//! `measure_from` and stops at `end`, so the measured window is the same for
//! all of them. A request counts when it starts and ends inside the window
//! and its answer passes the workload's check; its latency (request written
//! to body read) goes into a histogram in microseconds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

/// A request that takes longer than this is counted as failed, and its
/// connection is replaced.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds of each connection's loop besides the deadline.
const MAX_REQUESTS_PER_CONNECTION: u64 = 50_000_000;
const MAX_RECONNECTS: u32 = 100;

/// Builds connection `conn`'s request number `i`.
pub type BuildRequest = dyn Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync;
/// Whether an answer is a success.
pub type CheckAnswer = fn(StatusCode, &[u8]) -> bool;

pub struct Workload {
    pub build: Box<BuildRequest>,
    pub check: CheckAnswer,
}

impl Workload {
    /// `GET path`, expecting 200.
    pub fn get(address: SocketAddr, path: &str) -> Self {
        let path = path.to_owned();
        Self {
            build: Box::new(move |_, _| {
                Request::get(path.as_str())
                    .header(hyper::header::HOST, address.to_string())
                    .body(Full::new(Bytes::new()))
                    .expect("a GET with a valid path and host")
            }),
            check: |status, _| status == StatusCode::OK,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// What one run measured.
pub struct Measured {
    pub ok: u64,
    pub failed: u64,
    /// Successful requests per second over the measured window.
    pub rate: f64,
    /// Latencies of the successful requests, in microseconds.
    pub latency: Histogram<u64>,
    /// The first failure, to say what went wrong.
    pub first_failure: Option<String>,
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

struct ConnectionResult {
    ok: u64,
    failed: u64,
    latency: Histogram<u64>,
    first_failure: Option<String>,
}

/// Runs `workload` against `address` over `window.connections` connections.
pub async fn run(
    address: SocketAddr,
    workload: Arc<Workload>,
    window: Window,
) -> anyhow::Result<Measured> {
    let measure_from = Instant::now() + window.warmup;
    let end = measure_from + window.duration;
    let tasks: Vec<_> = (0..window.connections)
        .map(|conn| {
            let workload = Arc::clone(&workload);
            tokio::spawn(connection(address, conn, workload, measure_from, end))
        })
        .collect();
    let mut measured = Measured {
        ok: 0,
        failed: 0,
        rate: 0.0,
        latency: histogram(),
        first_failure: None,
    };
    for task in tasks {
        let result = task.await?;
        measured.ok += result.ok;
        measured.failed += result.failed;
        measured.latency.add(&result.latency)?;
        if measured.first_failure.is_none() {
            measured.first_failure = result.first_failure;
        }
    }
    measured.rate = measured.ok as f64 / window.duration.as_secs_f64();
    Ok(measured)
}

async fn connection(
    address: SocketAddr,
    conn: usize,
    workload: Arc<Workload>,
    measure_from: Instant,
    end: Instant,
) -> ConnectionResult {
    let mut result = ConnectionResult {
        ok: 0,
        failed: 0,
        latency: histogram(),
        first_failure: None,
    };
    let fail = |result: &mut ConnectionResult, why: String| {
        result.failed += 1;
        result.first_failure.get_or_insert(why);
    };
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut reconnects = 0;
    for i in 0..MAX_REQUESTS_PER_CONNECTION {
        if Instant::now() >= end {
            break;
        }
        if sender.as_ref().is_none_or(SendRequest::is_closed) {
            if reconnects == MAX_RECONNECTS {
                fail(
                    &mut result,
                    format!("gave up after {MAX_RECONNECTS} reconnects"),
                );
                break;
            }
            reconnects += 1;
            match tokio::time::timeout(REQUEST_TIMEOUT, connect(address)).await {
                Ok(Ok(connected)) => sender = Some(connected),
                Ok(Err(e)) => {
                    fail(&mut result, format!("connect: {e:#}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(_) => {
                    fail(&mut result, "connect timed out".to_owned());
                    continue;
                }
            }
        }
        let Some(send) = sender.as_mut() else {
            continue;
        };
        let request = (workload.build)(conn, i);
        let began = Instant::now();
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange(send, request)).await;
        let done = Instant::now();
        let counted = began >= measure_from && done <= end;
        match answer {
            Ok(Ok((status, body))) if (workload.check)(status, &body) => {
                if counted {
                    result.ok += 1;
                    let micros = u64::try_from((done - began).as_micros()).unwrap_or(u64::MAX);
                    result.latency.saturating_record(micros.max(1));
                }
            }
            Ok(Ok((status, body))) => {
                let body = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                fail(&mut result, format!("{status}: {body}"));
            }
            Ok(Err(e)) => {
                fail(&mut result, format!("{e:#}"));
                sender = None;
            }
            Err(_) => {
                fail(&mut result, format!("no answer within {REQUEST_TIMEOUT:?}"));
                sender = None;
            }
        }
    }
    result
}

/// A keep-alive HTTP/1.1 connection; its driver runs in its own task.
pub async fn connect(address: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the server closes the socket;
        // either way the loop above sees the closed sender.
        let _ = driver.await;
    });
    Ok(sender)
}

/// Sends one request and reads the whole answer.
pub async fn exchange(
    send: &mut SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    send.ready().await?;
    let response = send.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}
