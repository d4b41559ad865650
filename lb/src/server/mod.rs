//! Accepting client connections on the plain and TLS listeners: HTTP/1.1 with keep-alive and
//! upgrades, HTTP/2 (ALPN `h2` over TLS, or prior knowledge on the plain port when enabled),
//! head-size and header-count limits, a header-read timeout (for HTTP/2: preface and first
//! request) and an HTTP/2 idle timeout, a write timeout for clients that stop reading
//! ([`stall`]), and a graceful drain that lets in-flight requests and upgraded tunnels finish.
//!
//! Every connection task and tunnel holds a clone of one `mpsc::Sender`; the drain is over when
//! the receiver sees all of them dropped. Plain HTTP/1.1 connections are parked between
//! requests ([`parking`]) and wait in the listener's [`lot`]; a drain closes a parked
//! connection at once.

pub mod accept;
pub mod listen;
pub mod lot;
pub mod offered;
pub mod parking;
pub mod proxy_header;
pub mod spread;
pub mod stall;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::rt::{Read, Write};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use self::accept::Acceptor;
use self::lot::Lot;
use self::spread::Spread;
use self::stall::{StallIo, StreamExec, StreamStall, WriteStall};
use self::tls::{Tls, ALPN_H2};
use crate::metrics::{ClientErrorKind, ClientProtocol, Held};
use crate::proxy::{Drain, Peer, Slot};
use crate::server::offered::Offered;
use crate::server::parking::{Exchange, ParkingIo, Tracked};
use crate::Shared;

/// Most bytes hyper buffers per client connection, each way. hyper's default (about 400 KiB)
/// lets a large upload grow a read buffer that size per connection.
const MAX_BUF: usize = 64 * 1024;

/// The first read of a new connection: most request heads and TLS ClientHellos (post-quantum
/// key shares included) fit; the rest of a longer one comes with the next read.
const FIRST_READ: usize = 4096;

/// A new connection's first read, plain or TLS, once the socket is reported readable: on the
/// stack (inside the poll, so the task does not carry the buffer), and what came is kept by
/// `keep` in an allocation of its size, not a 4 KiB buffer made and freed per connection
/// (each on glibc's slow path, when the lb used glibc's allocator). `None` when the client
/// left. A read as hyper's are made, not `try_read`:
/// a short read clears the socket's readiness, so the next read waits for more without a
/// system call. Pending (the readiness was stale, or the task's budget is spent) has the task
/// woken.
fn poll_first_read<T>(
    stream: &mut TcpStream,
    cx: &mut std::task::Context<'_>,
    keep: impl FnOnce(&[u8]) -> T,
) -> Poll<std::io::Result<Option<T>>> {
    ready!(stream.poll_read_ready(cx))?;
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_READ];
    let mut buf = ReadBuf::uninit(&mut space);
    ready!(Pin::new(&mut *stream).poll_read(cx, &mut buf))?;
    Poll::Ready(Ok((!buf.filled().is_empty()).then(|| keep(buf.filled()))))
}

/// What a client connection needs from its listener.
struct Listener {
    shared: Arc<Shared>,
    tls: Option<Arc<Tls>>,
    h1: http1::Builder,
    /// For parked connections: their `ParkingIo` keeps the header timeout, with a timer that
    /// is not remade for every request as hyper's is.
    h1_parking: http1::Builder,
    h2: http2::Builder<StreamExec>,
    /// Where plain HTTP/1.1 connections wait between requests.
    lot: Lot<Parked>,
    /// `client_connections` for HTTP/1.1 and for HTTP/2 on this listener: looked up once,
    /// not by label for every connection.
    served: [prometheus::IntCounter; 2],
    stop: watch::Receiver<bool>,
    drain: Drain,
}

/// What a parked connection keeps besides its socket.
type Parked = (Arc<Peer>, Held);

/// Serves the proxy on `listener` (TLS when `tls` is given) until `stop` flips, then waits up
/// to `drain` for open connections to finish their requests and upgraded connections to end;
/// those still open then are closed. Returns how many connections were still open.
///
/// Runs on the worker whose runtime it is polled on; `spread` is this worker's share of the
/// listener's connections.
pub async fn serve_proxy(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut spread: Spread,
    tls: Option<Arc<Tls>>,
    stop: watch::Receiver<bool>,
    drain: Duration,
) -> usize {
    let cfg = &shared.config;
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(cfg.client_header_timeout)
        .max_header_size(cfg.max_header_bytes)
        .max_headers(cfg.max_headers)
        .max_buf_size(MAX_BUF.max(cfg.max_header_bytes));
    // Never `writev(false)` for plain connections: hyper would copy body frames into its own
    // buffer, and a spliced body's are placeholders (`parking`).
    let mut h1_parking = h1.clone();
    h1_parking.header_read_timeout(None);
    let mut h2 = http2::Builder::new(StreamExec {
        timeout: cfg.client_write_timeout,
        shared: shared.clone(),
    });
    h2.timer(TokioTimer::new())
        // Pings find clients that vanished without a FIN; HTTP/2 has no header timeout.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256)
        // What a stream may hold for a client that does not take it (hyper's default is
        // about 400 KiB per stream), as an HTTP/1.1 connection holds (`UNSENT_HIGH`).
        .max_send_buf_size(64 * 1024)
        .max_header_list_size(cfg.max_header_bytes as u32);
    let (alive, mut all_gone) = mpsc::channel::<Infallible>(1);
    let (close_tunnels, tunnels_closed) = watch::channel(false);
    let (lot, waiting) = lot::lot(shared.metrics.client_connections_parked.clone());
    let over_tls = if tls.is_some() { "true" } else { "false" };
    let served = [ClientProtocol::Http1, ClientProtocol::H2].map(|p| {
        shared
            .metrics
            .client_connections
            .with_label_values(&[p.as_str(), over_tls])
    });
    let ctx = Arc::new(Listener {
        shared: shared.clone(),
        served,
        tls,
        h1,
        h1_parking,
        h2,
        lot,
        stop: stop.clone(),
        drain: Drain {
            alive,
            close: tunnels_closed,
        },
    });
    if ctx.tls.is_none() {
        // Ends when `stop` flips, dropping its hold on the listener context.
        let resumes = ctx.clone();
        tokio::spawn(waiting.run(
            cfg.client_header_timeout,
            stop.clone(),
            move |stream, (peer, open)| {
                tokio::spawn(
                    resumes
                        .clone()
                        .serve_parking(stream, Bytes::new(), peer, open),
                );
            },
        ));
    }
    let mut acceptor = Acceptor::new(listener, if ctx.tls.is_some() { "tls" } else { "proxy" });
    let accepted = shared
        .metrics
        .worker_connections
        .with_label_values(&[&crate::worker::index().to_string()]);
    let start = |(stream, peer, slot): spread::Placed| {
        accepted.inc();
        if !listen::NODELAY_INHERITED {
            let _ = stream.set_nodelay(true);
        }
        // Two task types: a plain connection's task then holds none of the TLS and HTTP/2
        // state, which would otherwise size every connection's future.
        // Boxed first: the runtime moves a task's future several times on its way into the
        // task and writes its stage twice more, each a copy of the whole future (some 600
        // bytes for a plain connection), where a box is one copy and a pointer after it.
        if ctx.tls.is_some() {
            tokio::spawn(Box::pin(ctx.clone().tls_connection(stream, peer, slot)));
        } else {
            tokio::spawn(Box::pin(ctx.clone().plain_connection(stream, peer, slot)));
        }
    };
    // In a fixed order (no random pick per connection), the stop first, so that a flood of
    // connections does not hide it.
    let mut stopped = StopWait::new(&stop);
    loop {
        let placed = tokio::select! {
            // A moved connection before one of this worker's own: it was accepted earlier,
            // and moves come only while this worker holds fewer connections than another.
            biased;
            () = std::future::poll_fn(|cx| stopped.poll(cx)) => break,
            placed = std::future::poll_fn(|cx| spread.poll_next(cx, &shared.metrics)) => Some(placed),
            (stream, addr, limit) = acceptor.accept(Some(&shared.connection_slots), &shared.metrics) => {
                spread.place(stream, addr, limit, &shared.metrics)
            }
        };
        if let Some(placed) = placed {
            start(placed);
        }
    }
    drop(acceptor);
    // Connections another worker moved here as the stop came are served like those accepted
    // here, so the drain waits for them; a move from now on fails, and its sender serves it.
    for placed in spread.close(&shared.metrics) {
        start(placed);
    }
    // Connection tasks hold the listener context, and with it a drain sender; tunnels hold
    // their own. Ours goes now, so `recv` returns `None` once the last of them ends.
    drop(ctx);
    let open = shared.metrics.client_connections_open.get();
    tracing::info!(open_connections = open, "stopped accepting; draining");
    if tokio::time::timeout(drain, all_gone.recv()).await.is_ok() {
        return 0;
    }
    let left = shared.metrics.client_connections_open.get().max(0) as usize
        + shared.metrics.upgraded_open.get().max(0) as usize;
    tracing::warn!(left, "drain timeout reached; closing remaining connections");
    // Tunnels get a FIN on both sides rather than a reset when the process exits.
    let _ = close_tunnels.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(1), all_gone.recv()).await;
    left
}

/// The accept loop's wait for the stop, one for the whole loop. A `changed()` made for each
/// connection would take a place in the watch's waiter list and give it back each time, and
/// one kept and polled takes the list's lock and the task's budget at every poll; this one
/// takes its place once, and each poll after it is one atomic read, while the waker it left
/// there is the one polling.
struct StopWait {
    seen: watch::Receiver<bool>,
    /// Out of the task's budget: a wait the budget turned away would have taken no place in
    /// the list, and nothing would wake the loop for the stop.
    wait: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The waker left in the list, once `wait` was Pending.
    waiting: Option<std::task::Waker>,
}

impl StopWait {
    fn new(stop: &watch::Receiver<bool>) -> StopWait {
        let mut waiter = stop.clone();
        StopWait {
            seen: stop.clone(),
            wait: Box::pin(tokio::task::coop::unconstrained(async move {
                let _ = waiter.changed().await;
            })),
            waiting: None,
        }
    }

    /// Ready once the value changed or the sender is gone.
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if let Some(waker) = &self.waiting {
            if waker.will_wake(cx.waker()) {
                return match self.seen.has_changed() {
                    Ok(false) => Poll::Pending,
                    _ => Poll::Ready(()),
                };
            }
        }
        if self.wait.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        self.waiting = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Listener {
    async fn tls_connection(self: Arc<Self>, mut stream: TcpStream, addr: SocketAddr, slot: Slot) {
        let _open = Held::new(&self.shared.metrics.client_connections_open);
        let Some(tls) = &self.tls else { return };
        let Some(addr) = self.client_addr(&mut stream, addr).await else {
            return;
        };
        // The socket under the TLS layer, for a look at how fast the client takes responses.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let Some(stream) = tls.accept(stream, &self.shared.metrics).await else {
            return;
        };
        let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
        self.serve(TokioIo::new(stream), (addr, fd), true, h2, slot)
            .await;
    }

    async fn plain_connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        addr: SocketAddr,
        slot: Slot,
    ) {
        let open = Held::new(&self.shared.metrics.client_connections_open);
        let Some(addr) = self.client_addr(&mut stream, addr).await else {
            return;
        };
        let config = &self.shared.config;
        if config.h2c && starts_with_h2_preface(&stream, config.client_header_timeout).await {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
            Box::pin(self.serve(TokioIo::new(stream), (addr, fd), false, true, slot)).await;
            return;
        }
        self.count_protocol(false);
        let Some(first) = self.first_bytes(&mut stream, addr).await else {
            return;
        };
        let peer = self.peer(addr, (false, false), slot);
        self.serve_parking(stream, first, peer, open).await;
    }

    /// Plain HTTP/1.1, parked between requests (see [`parking`]): runs hyper for as long as
    /// requests follow each other, then parks the socket in the [`lot`], which resumes it
    /// here on a new task when the next request comes. `stream` must have bytes to read, or
    /// `leftover` some already read.
    async fn serve_parking(
        self: Arc<Self>,
        mut stream: TcpStream,
        mut leftover: Bytes,
        peer: Arc<Peer>,
        open: Held,
    ) {
        let mut stop = self.stop.clone();
        loop {
            // Boxed: hyper's connection state is then allocated while requests come and
            // freed when the connection parks, instead of sizing the task for its whole life.
            match Box::pin(self.serve_until_parked(stream, leftover, &peer, &mut stop)).await {
                // The read that parked the connection cleared its readiness: the lot waits
                // for the next byte.
                Some((parked, read)) if read.is_empty() => {
                    return self.lot.park(parked, (peer, open))
                }
                Some((parked, read)) => {
                    stream = parked;
                    // What hyper had read of the next head shares hyper's whole read buffer
                    // (8 KiB): a connection going round again keeps a copy of the bytes.
                    leftover = Bytes::copy_from_slice(&read);
                }
                None => return,
            }
        }
    }

    /// Reads the first bytes of a new connection's first request, holding no buffer while it
    /// waits for them: `None` when the client left, sent nothing within the head timeout
    /// (counted), or the drain began. hyper reads them first: one read where a look at the
    /// first byte and then hyper's read took two system calls.
    async fn first_bytes(&self, stream: &mut TcpStream, addr: SocketAddr) -> Option<Bytes> {
        let arrived =
            std::future::poll_fn(|cx| poll_first_read(stream, cx, Bytes::copy_from_slice));
        let timeout = self.shared.config.client_header_timeout;
        let mut stop = self.stop.clone();
        tokio::select! {
            // The bytes first: they are most often there already, and then the stop is never
            // waited for (a place taken in the watch's waiter list and given back).
            biased;
            r = tokio::time::timeout(timeout, arrived) => match r {
                Ok(Ok(first)) => first,
                Ok(Err(_)) => None,
                Err(_) => {
                    // Counted as hyper would have: the client never sent a request.
                    self.count_error(ClientErrorKind::HeaderTimeout, addr, "no request head in time");
                    None
                }
            },
            _ = stop.wait_for(|s| *s) => None,
        }
    }

    /// Serves requests with hyper until the connection parks, then gives back the socket and
    /// the bytes hyper had read of the next head; `None` when the connection ended.
    async fn serve_until_parked(
        &self,
        stream: TcpStream,
        leftover: Bytes,
        peer: &Arc<Peer>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<(TcpStream, Bytes)> {
        let addr = peer.addr;
        let shared = &self.shared;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let io = ParkingIo::new(stream, leftover, peer.clone(), &shared.config);
        let (shared2, peer2) = (shared.clone(), peer.clone());
        let offered = Offered::default();
        let offered2 = &offered;
        let svc = service_fn(move |req| {
            let exchange = Exchange::start(peer2.clone());
            offered2.note(&req);
            if parking::ends_connection(&req) {
                peer2.exchanges.set_last();
            }
            let (shared, peer) = (shared2.clone(), peer2.clone());
            async move {
                let splice_min = shared.config.splice_min;
                let resp = if crate::proxy::sampled(&shared) {
                    crate::proxy::handle_logged(shared, req, peer).await
                } else {
                    crate::proxy::handle(shared, req, peer).await
                };
                Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, exchange, None, splice_min)))
            }
        });
        let mut conn = self.h1_parking.serve_connection(io, svc).with_upgrades();
        let result = tokio::select! {
            biased;
            r = parking::turns(&mut conn, peer, fd) => r,
            _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                Pin::new(&mut conn).graceful_shutdown();
                parking::turns(&mut conn, peer, fd).await
            }
        };
        // Read after every round, so that it never outlives the round that parked.
        let parked = peer.exchanges.take_parked();
        match conn.into_parts() {
            Some(parts) if parts.io.parked() => {
                // hyper saw the end of input we made up; an error here is only about the
                // partial head it held, which the next round reads first.
                Some((parts.io.into_stream(), parts.read_buf))
            }
            Some(parts) if parts.io.timed_out() => {
                self.count_error(ClientErrorKind::HeaderTimeout, addr, parking::HEAD_TIMEOUT);
                None
            }
            // hyper ended the connection as an upgrade, which a request had offered, when it
            // saw the end of input we made up: the switch was not made (a connection pinned
            // to a tunnel does not park).
            None if parked => offered
                .take_back::<ParkingIo>()
                .map(|(io, read)| (io.into_stream(), read)),
            _ => {
                if let Err(e) = result {
                    self.count_hyper_error(&e, addr);
                }
                None
            }
        }
    }

    /// Serves a TLS connection, or a cleartext HTTP/2 one; `fd` is the client's socket
    /// under `io`.
    async fn serve<I>(
        &self,
        io: I,
        (addr, fd): (SocketAddr, std::os::fd::RawFd),
        tls: bool,
        h2: bool,
        slot: Slot,
    ) where
        I: Read + Write + Unpin + Send + 'static,
    {
        let shared = &self.shared;
        self.count_protocol(h2);
        let peer = self.peer(addr, (tls, h2), slot);
        let (shared2, peer2) = (shared.clone(), peer.clone());
        let offered = Offered::default();
        let offered2 = &offered;
        let svc = service_fn(move |req| {
            let exchange = Exchange::start(peer2.clone());
            offered2.note(&req);
            let (shared, peer) = (shared2.clone(), peer2.clone());
            async move {
                // Inside an HTTP/2 stream's task: its stall cell, for the write timeout.
                let stall = StreamStall::current();
                let resp = if crate::proxy::sampled(&shared) {
                    crate::proxy::handle_logged(shared, req, peer).await
                } else {
                    crate::proxy::handle(shared, req, peer).await
                };
                Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, exchange, stall, 0)))
            }
        });
        let stall = WriteStall::new(
            shared.config.client_write_timeout,
            shared.config.client_notsent_lowat,
        );
        let io = StallIo::new(io, stall, (!h2).then(|| (peer.clone(), fd)));
        let mut stop = self.stop.clone();
        // Both connection types finish in-flight requests after `graceful_shutdown`.
        macro_rules! drive {
            ($conn:expr) => {{
                let conn = $conn;
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                }
            }};
        }
        let result = if h2 {
            self.drive_h2(self.h2.serve_connection(io, svc), &peer, addr)
                .await
        } else {
            let result = drive!(self.h1.serve_connection(io, svc).with_upgrades());
            // A tunnel holds its pin until it ends, and it runs on this worker's thread: it
            // has not run since hyper handed it the socket, and holds the pin still. (On a
            // runtime of several threads it could have taken the socket and ended already.)
            debug_assert_eq!(
                tokio::runtime::Handle::current().runtime_flavor(),
                tokio::runtime::RuntimeFlavor::CurrentThread
            );
            if result.is_ok() && !peer.exchanges.pinned.load(Ordering::Relaxed) {
                self.close_declined::<I>(&offered, addr).await;
            }
            result
        };
        if let Err(e) = result {
            self.count_hyper_error(&e, addr);
        }
    }

    /// Closes a connection that hyper ended as an upgrade the lb did not make, as hyper
    /// closes any other (with TLS, `close_notify` first), and counts its failure as hyper's
    /// would be: the socket's write timeout bounds it.
    #[cold]
    async fn close_declined<I>(&self, offered: &Offered, addr: SocketAddr)
    where
        I: Read + Write + Unpin + Send + 'static,
    {
        let Some((mut io, _)) = offered.take_back::<StallIo<I>>() else {
            return;
        };
        if let Err(e) = std::future::poll_fn(|cx| Pin::new(&mut io).poll_shutdown(cx)).await {
            let kind = if stall::is_write_timeout(&e) {
                ClientErrorKind::WriteTimeout
            } else {
                ClientErrorKind::Io
            };
            self.count_error(kind, addr, e);
        }
    }

    /// Drives an HTTP/2 connection, which has no header timeout of its own: a client must send
    /// the preface and a first request within the header timeout, and a connection with no
    /// open stream for `LB_H2_IDLE_TIMEOUT` is closed with a GOAWAY. Keep-alive pings alone
    /// would keep an idle client, or one that never sent the preface, for good.
    async fn drive_h2<I, S, B>(
        &self,
        conn: http2::Connection<I, S, StreamExec>,
        peer: &Peer,
        addr: SocketAddr,
    ) -> Result<(), hyper::Error>
    where
        S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        I: Read + Write + Unpin,
        B: http_body::Body + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        StreamExec: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
    {
        let config = &self.shared.config;
        let mut stop = self.stop.clone();
        tokio::pin!(conn);
        let exchanges = &peer.exchanges;
        let mut seen = exchanges.done();
        let mut first = true;
        // Idle is checked four times per timeout: a connection closes between one and one
        // and a quarter timeouts after its last stream, with one timer wake per check.
        let tick = config.h2_idle_timeout / 4;
        let mut deadline = tokio::time::Instant::now() + config.client_header_timeout;
        let mut idle = Duration::ZERO;
        loop {
            tokio::select! {
                r = conn.as_mut() => return r,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    return conn.await;
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
            let done = exchanges.done();
            let busy = exchanges.open.load(std::sync::atomic::Ordering::Relaxed) != 0;
            if busy || done != seen {
                (seen, first, idle) = (done, false, Duration::ZERO);
            } else if first {
                self.count_error(
                    ClientErrorKind::HeaderTimeout,
                    addr,
                    "no HTTP/2 request in time",
                );
                break;
            } else {
                idle += tick;
                if idle >= config.h2_idle_timeout {
                    tracing::debug!(peer = %addr, "idle HTTP/2 connection closed");
                    break;
                }
            }
            deadline = tokio::time::Instant::now() + tick;
        }
        // A GOAWAY, then a bounded wait: a client that never completed the preface, or does
        // not answer the GOAWAY's ping, must not hold the connection.
        conn.as_mut().graceful_shutdown();
        tokio::time::timeout(GOAWAY_GRACE, conn)
            .await
            .unwrap_or(Ok(()))
    }

    /// The client's address: the connection's peer, or, on a listener behind an L4 balancer
    /// (`LB_PROXY_PROTOCOL`, `LB_TLS_PROXY_PROTOCOL`), the one its PROXY header names when the
    /// peer that sent it is a trusted proxy (as nginx's `set_real_ip_from`): anyone else who
    /// reaches the listener could name any address. `None` when the header is missing or
    /// malformed: the connection is refused.
    async fn client_addr(&self, stream: &mut TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
        let config = &self.shared.config;
        let expected = if self.tls.is_some() {
            config.tls_proxy_protocol
        } else {
            config.proxy_protocol
        };
        if !expected {
            return Some(peer);
        }
        match proxy_header::read(stream, config.client_header_timeout).await {
            Ok(Some(addr)) if self.trusted(peer) => Some(addr),
            Ok(_) => Some(peer),
            Err(e) => {
                self.count_error(ClientErrorKind::ProxyHeader, peer, e);
                None
            }
        }
    }

    /// The client end of a connection: `(tls, h2)` says how it speaks.
    fn peer(&self, addr: SocketAddr, protocol: (bool, bool), slot: Slot) -> Arc<Peer> {
        let trusted = self.trusted(addr);
        Arc::new(Peer::new(addr, protocol, trusted, self.drain.clone(), slot))
    }

    /// Whether a client address is a trusted proxy's (its forwarding fields are kept).
    fn trusted(&self, addr: SocketAddr) -> bool {
        let nets = &self.shared.config.trusted_proxies;
        !nets.is_empty() && nets.iter().any(|n| n.contains(addr.ip()))
    }

    fn count_protocol(&self, h2: bool) {
        self.served[usize::from(h2)].inc();
    }

    fn count_hyper_error(&self, e: &hyper::Error, addr: SocketAddr) {
        let kind = if stall::is_write_timeout(e) {
            ClientErrorKind::WriteTimeout
        } else if e.is_timeout() {
            ClientErrorKind::HeaderTimeout
        } else if e.is_parse_too_large() {
            ClientErrorKind::HeadTooLarge
        } else if e.is_parse() || e.is_parse_status() {
            ClientErrorKind::Malformed
        } else if e.is_incomplete_message() {
            ClientErrorKind::Incomplete
        } else {
            ClientErrorKind::Io
        };
        self.count_error(kind, addr, e);
    }

    fn count_error(&self, kind: ClientErrorKind, addr: SocketAddr, e: impl std::fmt::Display) {
        self.shared.metrics.client_connection_errors.inc(kind);
        tracing::debug!(peer = %addr, error = %e, kind = kind.as_str(), "client connection ended with an error");
    }
}

/// How long a closing HTTP/2 connection may take to end after its GOAWAY.
const GOAWAY_GRACE: Duration = Duration::from_secs(2);

/// Whether a plain connection opens with the HTTP/2 preface (`PRI * HTTP/2.0`), without
/// consuming it. No HTTP/1 method is `PRI`, so four bytes decide. A client that sends nothing
/// is bounded by `timeout`, as a slow HTTP/1 head would be.
async fn starts_with_h2_preface(stream: &TcpStream, timeout: Duration) -> bool {
    const PREFACE: &[u8; 4] = b"PRI ";
    let sniff = async {
        let mut buf = [0u8; 4];
        // The first bytes almost always arrive in one segment; a split start is polled briefly.
        for _ in 0..100 {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if buf[..n] != PREFACE[..n] => return false,
                Ok(4) => return true,
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        false
    };
    tokio::time::timeout(timeout, sniff).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A plain listener's context, with the sender of its `stop`.
    fn listener() -> (Arc<Listener>, watch::Sender<bool>) {
        let config = crate::config::Config::from_lookup(|_| None).unwrap();
        let shared = Arc::new(Shared::new(config));
        let (alive, _) = mpsc::channel(1);
        let (_, close) = watch::channel(false);
        let (stopping, stop) = watch::channel(false);
        let (lot, _) = lot::lot(shared.metrics.client_connections_parked.clone());
        let served = [0, 1].map(|_| prometheus::IntCounter::new("t", "t").unwrap());
        let ctx = Arc::new(Listener {
            served,
            h2: http2::Builder::new(StreamExec {
                timeout: Duration::from_secs(1),
                shared: shared.clone(),
            }),
            shared,
            tls: None,
            h1: http1::Builder::new(),
            h1_parking: http1::Builder::new(),
            lot,
            stop,
            drain: Drain { alive, close },
        });
        (ctx, stopping)
    }

    /// The accept loop's stop wait, woken by other branches in between (as a connection
    /// being accepted wakes the loop), ends when the stop comes and when its sender goes,
    /// also when its first poll comes with the task's budget spent.
    #[tokio::test]
    async fn the_accept_loops_stop_wait_ends_at_the_stop() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for (drop_sender, spent) in [(false, false), (true, false), (false, true)] {
            let (stopping, stop) = watch::channel(false);
            let mut stopped = StopWait::new(&stop);
            let (tick, mut ticks) = mpsc::unbounded_channel::<()>();
            let woken = Arc::new(AtomicUsize::new(0));
            let seen = woken.clone();
            let waiter = tokio::spawn(async move {
                if spent {
                    // `select!` itself yields on a spent budget, so the wait is polled
                    // first on its own.
                    while tokio::task::coop::has_budget_remaining() {
                        tokio::task::consume_budget().await;
                    }
                    let first = std::future::poll_fn(|cx| Poll::Ready(stopped.poll(cx))).await;
                    assert!(first.is_pending());
                }
                loop {
                    tokio::select! {
                        biased;
                        () = std::future::poll_fn(|cx| stopped.poll(cx)) => return,
                        _ = ticks.recv() => seen.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
            for _ in 0..3 {
                tick.send(()).unwrap();
            }
            for _ in 0..1000 {
                if woken.load(Ordering::Relaxed) == 3 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(woken.load(Ordering::Relaxed), 3);
            assert!(!waiter.is_finished());
            if drop_sender {
                drop(stopping);
            } else {
                stopping.send(true).unwrap();
            }
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("the stop woke the wait")
                .unwrap();
        }
    }

    /// A new connection's first read, made with the task's work budget spent: its Pending
    /// comes from the budget, not the socket, and the task must yield and read again, not
    /// spin (which would hold a worker thread for good).
    #[test]
    fn the_first_read_yields_when_the_task_budget_is_spent() {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (ctx, _stopping) = listener();
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
                let (mut server, addr) = l.accept().await.unwrap();
                client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
                server.readable().await.unwrap();
                while tokio::task::coop::has_budget_remaining() {
                    tokio::task::consume_budget().await;
                }
                let _ = done.send(ctx.first_bytes(&mut server, addr).await);
            });
        });
        let first = result
            .recv_timeout(Duration::from_secs(10))
            .expect("the first read returned");
        assert_eq!(first.as_deref(), Some(&b"GET / HTTP/1.1\r\n\r\n"[..]));
    }
}
