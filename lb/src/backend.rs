//! One upstream address and everything that must outlive a routing-table swap: its in-flight
//! count, passive-health (ejection) state and pooled connections.
//!
//! Tables hold `Arc<Backend>`; the discovery builder hands the same `Arc` to every new table while
//! the address stays in Consul, so pools and ejections survive reloads.
//!
//! HTTP/1.1 backends get a pool of idle connections, one request at a time on each. HTTP/2 (h2c)
//! backends get one shared connection that multiplexes every request, made again when it closes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use crossbeam_queue::SegQueue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use switchyard_consul::tags::UpstreamProto;
use tokio::net::TcpStream;

use crate::body::UpstreamBody;
use crate::timer::LazyTimer;

/// A connection to a backend, ready for one request.
pub enum Sender {
    H1(H1),
    /// A handle on the backend's shared HTTP/2 connection.
    H2(http2::SendRequest<UpstreamBody>),
}

/// No response head within the response timeout.
#[derive(Debug)]
pub struct TimedOut;

/// What sending a request gives: the response head, or the request back when it never left
/// (`TrySendError::take_message`).
pub type Sent = Result<Response<Incoming>, TrySendError<Request<UpstreamBody>>>;

impl Sender {
    /// Sends `req` and waits at most `timeout` for the response head.
    pub async fn send(
        &mut self,
        req: Request<UpstreamBody>,
        timeout: Duration,
    ) -> Result<Sent, TimedOut> {
        match self {
            Sender::H1(h1) => h1.send(req, timeout).await,
            Sender::H2(s) => tokio::time::timeout(timeout, s.try_send_request(req))
                .await
                .map_err(|_| TimedOut),
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }

    /// For a request that may switch protocols: hyper hands an upgraded connection over only
    /// from a connection future that runs apart, so this one moves to a task of its own (and
    /// never comes back to the request path).
    pub fn run_apart(&mut self) {
        if let Sender::H1(H1 { conn, .. }) = self {
            if let Some(conn) = conn.take() {
                tokio::spawn(async move {
                    // Ends when the backend closes it, the last sender is dropped, or the
                    // connection is handed to a tunnel.
                    let _ = (*conn).with_upgrades().await;
                });
            }
        }
    }
}

type H1Conn = http1::Connection<TokioIo<TcpStream>, UpstreamBody>;

/// An HTTP/1.1 connection to a backend, driven by whoever holds it: inside the task of the
/// client connection whose request it serves, rather than in a task of its own that a request
/// and its response would have to be handed to and back through channels. In the pool, nobody
/// polls it; a close that arrived meanwhile is seen at the next checkout.
pub struct H1 {
    sender: http1::SendRequest<UpstreamBody>,
    /// hyper's connection state machine; `None` once it ended, or while it runs apart.
    conn: Option<Box<H1Conn>>,
    /// Bounds the wait for each response head.
    timer: LazyTimer,
}

impl H1 {
    /// Drives the connection (when this holder drives it) and then polls `f`, which waits on
    /// something only the connection moves: the response, its body, the sender's readiness.
    pub fn poll_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut http1::SendRequest<UpstreamBody>, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let Some(conn) = &mut self.conn else {
            return f(&mut self.sender, cx);
        };
        if Pin::new(&mut **conn).poll(cx).is_ready() {
            // Closed or failed: dropping it resolves whatever waits on it with an error.
            self.conn = None;
        }
        // What `f` waits on moves only when the connection does, and the connection was just
        // polled with this task's waker: registering the waker there too would only poll
        // this task again for nothing.
        f(&mut self.sender, &mut Context::from_waker(Waker::noop()))
    }

    async fn send(
        &mut self,
        req: Request<UpstreamBody>,
        timeout: Duration,
    ) -> Result<Sent, TimedOut> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut response = std::pin::pin!(self.sender.try_send_request(req));
        std::future::poll_fn(|cx| {
            if let Poll::Ready(sent) = self.poll_with(cx, |_, cx| response.as_mut().poll(cx)) {
                return Poll::Ready(Ok(sent));
            }
            // Most responses come long before the timeout: see `LazyTimer`.
            if self.timer.poll_until(cx, deadline).is_ready() {
                return Poll::Ready(Err(TimedOut));
            }
            Poll::Pending
        })
        .await
    }

    /// Lets the connection catch up with its socket without anyone to wake: it sees the end
    /// of the exchange it served, or a close from the backend.
    fn settle(&mut self) {
        let _ = self.poll_with(&mut Context::from_waker(Waker::noop()), |_, _| {
            Poll::Ready(())
        });
    }

    fn is_usable(&self) -> bool {
        !self.sender.is_closed() && self.sender.is_ready()
    }
}

/// Most bytes hyper buffers per HTTP/1.1 connection, each way. hyper's default (about
/// 400 KiB) lets a large response grow a read buffer that size per upstream connection, and
/// a new one each time the last is still on its way to the client.
pub const MAX_BUF: usize = 64 * 1024;

/// Milliseconds on a process-wide monotonic clock; cheap enough for the request path.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Why a connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("connect to {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: hyper::Error,
    },
}

struct Idle {
    h1: H1,
    since_ms: u64,
}

/// Settings that govern every backend, from the config.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    pub eject_failures: u32,
    pub eject_base: Duration,
    pub eject_max: Duration,
}

pub struct Backend {
    /// `host:port`, also the metric label and the pool key.
    pub addr: String,
    pub proto: UpstreamProto,
    /// The shared HTTP/2 connection, for h2c backends.
    h2: ArcSwapOption<http2::SendRequest<UpstreamBody>>,
    /// Serialises making the HTTP/2 connection, so a burst of requests opens one, not many.
    h2_connecting: tokio::sync::Mutex<()>,
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// Ejections since the last success; sets the next ejection's length.
    ejections: AtomicU32,
    /// `now_ms()` until which the backend is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    requests: AtomicU64,
    /// Grows in small blocks only when used: a table of thousands of backends that are rarely
    /// hit costs no pool memory up front.
    idle: SegQueue<Idle>,
    idle_len: AtomicUsize,
    max_idle: usize,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("addr", &self.addr).finish()
    }
}

impl Backend {
    pub fn new(addr: String, proto: UpstreamProto, max_idle: usize) -> Backend {
        Backend {
            addr,
            proto,
            h2: ArcSwapOption::empty(),
            h2_connecting: tokio::sync::Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            idle: SegQueue::new(),
            idle_len: AtomicUsize::new(0),
            max_idle: max_idle.max(1),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    /// Remaining ejection, for the admin view.
    pub fn ejected_for(&self, now_ms: u64) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now_ms).then(|| Duration::from_millis(until - now_ms))
    }

    pub fn start_request(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end_request(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// A response came back: the backend is reachable again.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A connect failure or timeout. Returns true when this call ejected the backend.
    pub fn record_failure(&self, s: &BackendSettings) -> bool {
        let now = now_ms();
        // Failures while ejected (traffic only reaches it when every backend is out) do not
        // count towards the next ejection.
        if self.is_ejected(now) {
            return false;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < s.eject_failures {
            return false;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let length = s.eject_base.saturating_mul(1 << n).min(s.eject_max);
        self.ejected_until
            .store(now + length.as_millis() as u64, Ordering::Relaxed);
        // Idle connections to a failing backend are suspect; new ones will be made on return.
        while self.pop_idle().is_some() {}
        self.h2.store(None);
        true
    }

    /// A pooled connection that is ready for a request, or a new one.
    /// Returns the sender and whether it was reused.
    pub async fn checkout(&self, s: &BackendSettings) -> Result<(Sender, bool), ConnectError> {
        let pooled = match self.proto {
            UpstreamProto::H2c => self.live_h2().map(Sender::H2),
            _ => self.pooled_h1(s).map(Sender::H1),
        };
        if let Some(sender) = pooled {
            return Ok((sender, true));
        }
        // Connecting is rare and its future is large (connect, handshake, timeouts): boxed, so
        // that every request's future, which hyper keeps allocated per client connection, stays
        // small.
        Box::pin(self.open(s)).await
    }

    fn pooled_h1(&self, s: &BackendSettings) -> Option<H1> {
        let now = now_ms();
        let max_idle_ms = s.idle_timeout.as_millis() as u64;
        while let Some(mut idle) = self.pop_idle() {
            if now.saturating_sub(idle.since_ms) >= max_idle_ms {
                continue;
            }
            idle.h1.settle();
            if idle.h1.is_usable() {
                return Some(idle.h1);
            }
        }
        None
    }

    /// A new connection; for h2c, the one another request made meanwhile if there is one
    /// (then reported as reused).
    async fn open(&self, s: &BackendSettings) -> Result<(Sender, bool), ConnectError> {
        if self.proto == UpstreamProto::H2c {
            return self.open_h2(s).await;
        }
        let stream = self.connect(s).await?;
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(MAX_BUF)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| self.handshake_error(source))?;
        let h1 = H1 {
            sender,
            conn: Some(Box::new(conn)),
            timer: LazyTimer::default(),
        };
        Ok((Sender::H1(h1), false))
    }

    async fn open_h2(&self, s: &BackendSettings) -> Result<(Sender, bool), ConnectError> {
        let _one_at_a_time = self.h2_connecting.lock().await;
        if let Some(sender) = self.live_h2() {
            return Ok((Sender::H2(sender), true));
        }
        let stream = self.connect(s).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Pings find a backend that vanished without a FIN (a killed container's address).
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| self.handshake_error(source))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.h2.store(Some(std::sync::Arc::new(sender.clone())));
        Ok((Sender::H2(sender), false))
    }

    fn live_h2(&self) -> Option<http2::SendRequest<UpstreamBody>> {
        let guard = self.h2.load();
        let sender = guard.as_deref()?;
        (!sender.is_closed()).then(|| sender.clone())
    }

    fn handshake_error(&self, source: hyper::Error) -> ConnectError {
        ConnectError::Handshake {
            addr: self.addr.clone(),
            source,
        }
    }

    async fn connect(&self, s: &BackendSettings) -> Result<TcpStream, ConnectError> {
        let stream =
            match tokio::time::timeout(s.connect_timeout, TcpStream::connect(&*self.addr)).await {
                Err(_) => {
                    return Err(ConnectError::Timeout {
                        addr: self.addr.clone(),
                        after: s.connect_timeout,
                    })
                }
                Ok(Err(source)) => {
                    return Err(ConnectError::Io {
                        addr: self.addr.clone(),
                        source,
                    })
                }
                Ok(Ok(stream)) => stream,
            };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Gives a connection back once the response it carried is complete. It is settled
    /// (polled once) at its next checkout, which must poll it then anyway to see a close that
    /// arrived while it was pooled; polling it here too would be work done twice.
    pub fn checkin(&self, h1: H1) {
        if h1.sender.is_closed() {
            return;
        }
        // A full pool means the backend has more idle connections than we keep; dropping this
        // one closes it.
        if self.idle_len.fetch_add(1, Ordering::AcqRel) >= self.max_idle {
            self.idle_len.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        self.idle.push(Idle {
            h1,
            since_ms: now_ms(),
        });
    }

    fn pop_idle(&self) -> Option<Idle> {
        let idle = self.idle.pop()?;
        self.idle_len.fetch_sub(1, Ordering::AcqRel);
        Some(idle)
    }

    pub fn idle_connections(&self) -> usize {
        self.idle_len.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(failures: u32) -> BackendSettings {
        BackendSettings {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_idle: 4,
            eject_failures: failures,
            eject_base: Duration::from_secs(5),
            eject_max: Duration::from_secs(12),
        }
    }

    #[test]
    fn ejection_needs_consecutive_failures_and_grows_to_the_cap() {
        let b = Backend::new("127.0.0.1:1".into(), UpstreamProto::Http1, 4);
        let s = settings(2);
        assert!(!b.record_failure(&s));
        b.record_success();
        assert!(!b.record_failure(&s), "success reset the count");
        assert!(b.record_failure(&s), "two in a row eject");
        let now = now_ms();
        let first = b.ejected_for(now).unwrap();
        assert!(first <= Duration::from_secs(5) && first > Duration::from_secs(4));
        assert!(
            !b.record_failure(&s) && !b.record_failure(&s),
            "no double ejection"
        );
        // Expire it by hand, then fail again: the next ejection is longer, capped at 12 s.
        b.ejected_until.store(1, Ordering::Relaxed);
        b.record_failure(&s);
        assert!(b.record_failure(&s));
        let second = b.ejected_for(now_ms()).unwrap();
        assert!(second > Duration::from_secs(9) && second <= Duration::from_secs(10));
        b.ejected_until.store(1, Ordering::Relaxed);
        b.record_failure(&s);
        b.record_failure(&s);
        assert!(b.ejected_for(now_ms()).unwrap() <= Duration::from_secs(12));
    }
}
