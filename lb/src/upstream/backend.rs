//! One upstream address and everything that must outlive a routing-table swap: its in-flight
//! count, passive-health (ejection) state and pooled connections.
//!
//! Tables hold `Arc<Backend>`; discovery's publisher hands the same `Arc` to every new table while
//! the address stays in Consul, so pools and ejections survive reloads.
//!
//! HTTP/1.1 backends get a pool of idle connections (`h1::Conn`) per worker, one request at a
//! time on each. HTTP/2 (h2c) backends get one connection that multiplexes every request of
//! every worker, made again when it closes: it runs on the worker that made it, and the
//! others' requests reach it through hyper's channel.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use switchyard_consul::tags::UpstreamProto;
use tokio::net::TcpStream;

use super::{h1, Sender, UpstreamBody};
use crate::metrics::{socket_option_refused, Label, SocketOption, UpstreamErrorKind};
use crate::time::now_ms;

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

impl ConnectError {
    /// The backend's host gave no answer: no reply to the connect within the timeout, or no
    /// route to it. A refused connect or a failed handshake came from a live host.
    pub fn host_silent(&self) -> bool {
        match self {
            ConnectError::Timeout { .. } => true,
            ConnectError::Io { source, .. } => super::from_silent_host(source),
            ConnectError::Handshake { .. } => false,
        }
    }
}

struct Idle {
    conn: Box<h1::Conn>,
    since_ms: u64,
}

/// One worker's idle connections, alone on its cache line.
#[derive(Default)]
#[repr(align(64))]
struct WorkerPool(Mutex<VecDeque<Idle>>);

impl WorkerPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Bounds how long data written to `stream` may stay unacknowledged: past it the kernel
/// drops the connection with ETIMEDOUT. A live host acknowledges within milliseconds even
/// when its application is slow, so this tells a dead or cut-off host (which sends no RST)
/// from a slow backend, long before the response timeout would. A failure here only leaves
/// the kernel's default (minutes of retransmissions), so it is not an error: it is counted,
/// and warned about once, since a kernel that refuses it refuses it on every connection.
/// Returns whether this call warned.
fn set_user_timeout(stream: &impl AsRawFd, after: Duration) -> bool {
    let Err(error) = crate::sockopt::set_tcp_ms(stream, libc::TCP_USER_TIMEOUT, after) else {
        return false;
    };
    let first = socket_option_refused(SocketOption::UserTimeout);
    if first {
        tracing::warn!(%error, "TCP_USER_TIMEOUT not set: a dead backend host is noticed only by the response timeout (warned once; lb_socket_options_refused_total counts every connection)");
    }
    first
}

/// A new connection to `addr` within the connect timeout, without Nagle's delay and with the
/// user timeout set: what HTTP/1.1 and h2c connections to a backend both start from.
async fn connect(addr: &str, s: &BackendSettings) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(s.connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(ConnectError::Timeout {
                addr: addr.to_string(),
                after: s.connect_timeout,
            })
        }
        Ok(Err(source)) => {
            return Err(ConnectError::Io {
                addr: addr.to_string(),
                source,
            })
        }
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    if !s.send.user.is_zero() {
        set_user_timeout(&stream, s.send.user);
    }
    Ok(stream)
}

/// Connects to an h2c backend and runs the connection on the calling runtime.
async fn open_h2(
    addr: String,
    s: BackendSettings,
) -> Result<http2::SendRequest<UpstreamBody>, ConnectError> {
    let stream = connect(&addr, &s).await?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Pings find a backend that vanished without a FIN (a killed container's address).
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ConnectError::Handshake { addr, source })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Settings that govern every backend, from the config.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// How long a send waits for the backend, and for the client's body.
    pub send: super::Timeouts,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    pub eject_failures: u32,
    pub eject_base: Duration,
    pub eject_max: Duration,
}

#[cfg(test)]
impl BackendSettings {
    /// One failure ejects, for a minute.
    pub fn for_tests() -> BackendSettings {
        let s = Duration::from_secs(1);
        BackendSettings {
            send: super::Timeouts {
                response: s,
                client_body: s,
                user: Duration::from_secs(5),
            },
            connect_timeout: s,
            idle_timeout: s,
            max_idle: 1,
            eject_failures: 1,
            eject_base: Duration::from_secs(60),
            eject_max: Duration::from_secs(60),
        }
    }
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
    /// The last failure held against it, for the admin view: `now_ms() << 8 | kind`; 0 for
    /// none. Written on failures only.
    last_failure: AtomicU64,
    requests: AtomicU64,
    /// Idle connections, the most recently used at the back, where checkout takes from:
    /// reusing the freshest one keeps clear of backends' short keep-alive timeouts (uvicorn and
    /// Node close after about 5 s), which the oldest one races. Allocates only when used, so
    /// a table of thousands of rarely hit backends costs no pool memory up front. The lock is
    /// held for a push or a pop, never across an await.
    ///
    /// One pool per worker ([`crate::worker`]): a socket is driven by the reactor of the
    /// runtime that made it, so a connection stays with its worker's requests. Each pool has
    /// its own cache line, so workers do not contend for one.
    idle: Box<[WorkerPool]>,
    /// Idle connections kept per worker: the configured number shared out between them.
    max_idle: usize,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("addr", &self.addr).finish()
    }
}

impl Backend {
    pub fn new(addr: String, proto: UpstreamProto, max_idle: usize) -> Backend {
        let workers = crate::worker::count();
        Backend {
            addr,
            proto,
            h2: ArcSwapOption::empty(),
            h2_connecting: tokio::sync::Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            last_failure: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            idle: (0..workers).map(|_| WorkerPool::default()).collect(),
            max_idle: max_idle.div_ceil(workers).max(1),
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

    /// Counts a request in flight if fewer than `cap` are: a backend's cap is never passed,
    /// however many requests race for its last place.
    pub fn try_start_request(&self, cap: usize) -> bool {
        let admitted = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.requests.fetch_add(1, Ordering::Relaxed);
        }
        admitted
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

    /// The last failure held against the backend, and how long ago, for the admin view.
    pub fn last_failure(&self, now_ms: u64) -> Option<(UpstreamErrorKind, Duration)> {
        let packed = self.last_failure.load(Ordering::Relaxed);
        let kind = *UpstreamErrorKind::ALL.get((packed & 0xff) as usize)?;
        let at = packed >> 8;
        (packed != 0).then(|| (kind, Duration::from_millis(now_ms.saturating_sub(at))))
    }

    /// A failure of kind `kind` that is the backend's (a connect failure or timeout, a host
    /// that stopped acknowledging, no response in time). Returns true when this call ejected
    /// the backend.
    pub fn record_failure(&self, s: &BackendSettings, kind: UpstreamErrorKind) -> bool {
        let now = now_ms();
        self.last_failure
            .store(now.max(1) << 8 | kind.index() as u64, Ordering::Relaxed);
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
        // Those of other workers are dropped by this one: closing a socket needs no reactor.
        for pool in &self.idle {
            pool.lock().clear();
        }
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

    fn pooled_h1(&self, s: &BackendSettings) -> Option<Box<h1::Conn>> {
        let now = now_ms();
        let max_idle_ms = s.idle_timeout.as_millis() as u64;
        let mut pool = self.pool();
        // The oldest wait at the front: those past the idle timeout go.
        while pool
            .front()
            .is_some_and(|i| now.saturating_sub(i.since_ms) >= max_idle_ms)
        {
            pool.pop_front();
        }
        while let Some(mut idle) = pool.pop_back() {
            // Sees a close by the backend that arrived while the connection was pooled.
            if idle.conn.is_usable() {
                return Some(idle.conn);
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
        let stream = connect(&self.addr, s).await?;
        Ok((Sender::H1(Box::new(h1::Conn::new(stream))), false))
    }

    async fn open_h2(&self, s: &BackendSettings) -> Result<(Sender, bool), ConnectError> {
        let _one_at_a_time = self.h2_connecting.lock().await;
        if let Some(sender) = self.live_h2() {
            return Ok((Sender::H2(sender), true));
        }
        // The connection carries every worker's requests, so it is made and run on worker
        // 0, whose runtime outlives the others': on another worker it would end with that
        // worker's drain, cutting what the others still had in flight on it.
        let opening = open_h2(self.addr.clone(), s.clone());
        let sender = match crate::worker::first() {
            Some(first) if crate::worker::index() != 0 => {
                first.spawn(opening).await.unwrap_or_else(|e| {
                    Err(ConnectError::Io {
                        addr: self.addr.clone(),
                        source: std::io::Error::other(e),
                    })
                })?
            }
            _ => opening.await?,
        };
        self.h2.store(Some(std::sync::Arc::new(sender.clone())));
        Ok((Sender::H2(sender), false))
    }

    fn live_h2(&self) -> Option<http2::SendRequest<UpstreamBody>> {
        let guard = self.h2.load();
        let sender = guard.as_deref()?;
        (!sender.is_closed()).then(|| sender.clone())
    }

    /// Gives a connection back once the response it carried was read to its end. Whether
    /// the backend closed it meanwhile is seen at its next checkout.
    pub fn checkin(&self, mut conn: Box<h1::Conn>) {
        if !conn.is_reusable() {
            return;
        }
        conn.shrink();
        let mut pool = self.pool();
        // A full pool means the backend has more idle connections than we keep: the oldest,
        // the likeliest to be closed by the backend soon, makes room (dropping it closes it).
        if pool.len() >= self.max_idle {
            pool.pop_front();
        }
        pool.push_back(Idle {
            conn,
            since_ms: now_ms(),
        });
    }

    /// The calling worker's pool, whether or not a thread panicked while holding it (a push
    /// or a pop leaves it consistent either way).
    fn pool(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle[crate::worker::index()].lock()
    }

    /// Idle connections in every worker's pool.
    pub fn idle_connections(&self) -> usize {
        self.idle.iter().map(|p| p.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_user_timeout_is_warned_about_once_and_every_refusal_counted() {
        // A UDP socket has no TCP options: the kernel refuses TCP_USER_TIMEOUT on it as a
        // kernel without the option refuses it on every backend connection. The count is
        // the process's: on such a kernel, other tests could add to it, so this one reads
        // what it adds.
        fn refused(metrics: &crate::metrics::Metrics) -> u64 {
            let text = metrics.encode();
            let series = "lb_socket_options_refused_total{option=\"TCP_USER_TIMEOUT\"} ";
            let at = text
                .find(series)
                .expect("the series reads 0 before any refusal")
                + series.len();
            let end = text[at..].find('\n').unwrap();
            text[at..at + end].parse().unwrap()
        }
        let metrics = crate::metrics::Metrics::new();
        let before = refused(&metrics);
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let warned: Vec<bool> = (0..3)
            .map(|_| set_user_timeout(&socket, Duration::from_secs(5)))
            .collect();
        assert_eq!(
            warned,
            [before == 0, false, false],
            "the first refusal warns, the next do not"
        );
        let after = refused(&metrics);
        assert!(
            after >= before + 3,
            "every refusal counted: {before} -> {after}"
        );
        // A socket that takes the option neither warns nor counts.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(!set_user_timeout(&stream, Duration::from_secs(5)));
    }

    fn settings(failures: u32) -> BackendSettings {
        BackendSettings {
            send: crate::upstream::Timeouts {
                response: Duration::from_secs(1),
                client_body: Duration::from_secs(1),
                user: Duration::from_secs(5),
            },
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
        assert!(!b.record_failure(&s, UpstreamErrorKind::Connect));
        b.record_success();
        assert!(
            !b.record_failure(&s, UpstreamErrorKind::Connect),
            "success reset the count"
        );
        assert!(
            b.record_failure(&s, UpstreamErrorKind::Connect),
            "two in a row eject"
        );
        let now = now_ms();
        let first = b.ejected_for(now).unwrap();
        assert!(first <= Duration::from_secs(5) && first > Duration::from_secs(4));
        assert!(
            !b.record_failure(&s, UpstreamErrorKind::Connect)
                && !b.record_failure(&s, UpstreamErrorKind::Connect),
            "no double ejection"
        );
        // Expire it by hand, then fail again: the next ejection is longer, capped at 12 s.
        b.ejected_until.store(1, Ordering::Relaxed);
        b.record_failure(&s, UpstreamErrorKind::Connect);
        assert!(b.record_failure(&s, UpstreamErrorKind::Connect));
        let second = b.ejected_for(now_ms()).unwrap();
        assert!(second > Duration::from_secs(9) && second <= Duration::from_secs(10));
        b.ejected_until.store(1, Ordering::Relaxed);
        b.record_failure(&s, UpstreamErrorKind::Connect);
        b.record_failure(&s, UpstreamErrorKind::Connect);
        assert!(b.ejected_for(now_ms()).unwrap() <= Duration::from_secs(12));
    }
}
