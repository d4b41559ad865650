//! Plain HTTP/1.1 client connections that hold no buffers while idle between requests.
//!
//! hyper keeps a connection's read and write buffers (8 KiB each), its in-flight slot and its
//! header timer for as long as the connection lives, so an idle keep-alive client costs about
//! 20 KiB. nginx and HAProxy free their buffers when a connection goes idle; so do we. The
//! socket sits under hyper in a [`ParkingIo`]. When hyper asks for the next request head, no
//! exchange is open, every response byte has reached the socket and the socket has nothing to
//! read for [`PARK_AFTER`], the `ParkingIo` reports end of input. hyper ends the connection
//! cleanly without shutting the socket down (see `poll_shutdown`); the server takes the socket
//! back (through the handle of a switch a request offered, when hyper ends the connection as
//! an upgrade: [`super::offered`]). With nothing read of a next request, it parks it in its
//! listener's lot ([`super::lot`]), which holds it without a task until it turns readable;
//! then hyper starts on it again.
//!
//! A response body spliced from its backend (`LB_SPLICE_MIN`, [`crate::splice`]) reaches
//! hyper as placeholders, which the `ParkingIo` writes from the connection's pipe. That
//! needs hyper to queue body frames as they are (its vectored writes), never to copy them
//! into its own buffer: the server's builder for these connections must not set
//! `writev(false)`.
//!
//! A partial head that hyper had already buffered (a pipelining client) is not lost: hyper
//! returns it with the socket, and the next connection reads it first.
//!
//! hyper's header timer is off for these connections: the `ParkingIo` keeps the header
//! timeout too, with the same timer it parks by.
//!
//! The last response of a connection whose client asked to close it is written corked
//! (`TCP_CORK`, on Linux): hyper writes it and ends the connection in the same turn, and
//! the socket is shut down, which sends the response's last bytes with the FIN in one
//! segment. A client that closes
//! at once acknowledges both with its own FIN, where a response and a FIN sent apart took
//! two segments more (an acknowledgement of the response, then the FIN). A response still
//! being written when hyper returns unfinished, a body that streams, is uncorked then
//! ([`turns`]): corking never holds bytes past the turn that wrote them. The shutdown,
//! which the socket gets only then (`PeerOfSocket`), is there because a close drops corked
//! bytes unsent when the client sent any that nobody read. An interim `100 Continue`, when
//! it is the first write, takes the cork and the uncork, and the final response goes as
//! without.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use hyper::rt::{Read, ReadBufCursor, Write};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::Config;
use crate::field_list;
use crate::server::stall::{client_took, StreamStall, WriteStall};
use crate::splice::{self, Front};
use crate::time::LazyTimer;

use crate::proxy::Peer;
use crate::proxy::ProxyBody;
use crate::upstream::BoxError;

/// How long a connection stays idle before it parks. Under load a client's next request
/// follows within milliseconds, and parking then would only trade buffers back and forth
/// (measured: 7% more CPU per request at 256 connections when parking at once).
pub const PARK_AFTER: Duration = Duration::from_millis(50);

/// One request from the moment hyper hands it to the service until hyper has written its
/// response to the end (and dropped the body), or dropped the request's future.
pub struct Exchange(Arc<Peer>);

impl Exchange {
    pub fn start(peer: Arc<Peer>) -> Exchange {
        peer.exchanges.open.fetch_add(1, Ordering::Relaxed);
        Exchange(peer)
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let e = &self.0.exchanges;
        e.open.fetch_sub(1, Ordering::Relaxed);
        e.done.fetch_add(1, Ordering::Release);
    }
}

/// A response body that ends its exchange when hyper drops it.
pub struct Tracked {
    body: ProxyBody,
    exchange: Exchange,
    /// On HTTP/2: the stream's stall cell, told what the body hands hyper.
    stall: Option<Arc<StreamStall>>,
}

impl Tracked {
    /// `stall`: on HTTP/2, the stream's stall cell. Without one, the connection is HTTP/1.1
    /// and its socket reports what it wrote ([`Exchanges::wrote`]): the body holds back while
    /// the client is not taking what hyper has.
    ///
    /// `splice_min`: the body is spliced from the backend's socket to the client's when the
    /// response says it is at least this long (0: never). Only for a plain HTTP/1.1
    /// connection: the placeholders the body then hands hyper are bytes only its `ParkingIo`
    /// can write. Whether it is, is kept in the connection's pipe (armed), not here: one
    /// field more made hyper move each response's body with calls to `memcpy` (about 130
    /// instructions per request), and an HTTP/1.1 connection has one response body at a time.
    pub fn new(
        body: ProxyBody,
        exchange: Exchange,
        stall: Option<Arc<StreamStall>>,
        splice_min: u64,
    ) -> Tracked {
        if splice_min != 0 {
            let length = body.size_hint().exact();
            let pipe = &exchange.0.pipe;
            pipe.arm(length.is_some_and(|n| n >= splice_min));
        }
        Tracked {
            body,
            exchange,
            stall,
        }
    }
}

impl Drop for Tracked {
    /// A spliced body whose bytes have all been written gives its pipe back (else the write
    /// that empties the pipe does): a connection holds a pipe only while it splices.
    fn drop(&mut self) {
        let pipe = &self.exchange.0.pipe;
        if self.stall.is_none() && pipe.armed() {
            pipe.arm(false);
            if pipe.held() == 0 {
                pipe.release();
            }
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let exchanges = &this.exchange.0.exchanges;
        if let Some(stall) = &this.stall {
            let polled = Pin::new(&mut this.body).poll_frame(cx);
            stall.polled(&polled);
            return polled;
        }
        if exchanges.hold_body() {
            return Poll::Pending;
        }
        if exchanges.lagging() {
            this.body.client_lags();
        }
        let pipe = &this.exchange.0.pipe;
        let polled = this.body.poll_frame_piped(cx, pipe.armed().then_some(pipe));
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                exchanges.handed(data.len());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket as hyper sees it on a plain HTTP/1.1 connection.
///
/// It also keeps the time between exchanges, in place of hyper's header timer: parking after
/// [`PARK_AFTER`] of idleness, and failing a request head that takes longer than the header
/// timeout to arrive in full.
pub struct ParkingIo {
    /// Before `stream`: fields drop in order, and this one may still shut the socket down.
    peer: PeerOfSocket,
    stream: TcpStream,
    /// Bytes an earlier hyper connection on this socket had read but not parsed.
    prefix: Bytes,
    /// `Exchanges::done` when bytes last arrived: parking needs an exchange finished since, so
    /// a request being read or answered is never cut.
    seen: u32,
    /// The last write could not complete: hyper still holds response bytes.
    write_blocked: bool,
    /// A read found nothing while an exchange was open. hyper will not read again after the
    /// exchange ends (it remembers the read as blocked): the spell between exchanges then
    /// starts from the write that ends the response.
    read_waiting: bool,
    /// `Exchanges::done` when the current spell between exchanges began, and when.
    spell: u32,
    spell_start: Instant,
    head_timeout: Duration,
    /// Wakes the task by the end of the current spell.
    timer: LazyTimer,
    write_stall: WriteStall,
    parked: bool,
    timed_out: bool,
    /// The last response's first write has looked at corking the socket.
    cork_tried: bool,
    /// Bodies may be spliced (`LB_SPLICE_MIN`): writes look for placeholders.
    splices: bool,
}

/// Whether hyper closes the connection once it has answered `req` (RFC 9112 section 9.3):
/// HTTP/1.1 with the `close` option, HTTP/1.0 without `keep-alive`. Errs towards `false`,
/// which only costs a timer that the close then drops.
pub fn ends_connection<B>(req: &http::Request<B>) -> bool {
    let has = |option| field_list::contains(req.headers(), &http::header::CONNECTION, option);
    match req.version() {
        http::Version::HTTP_11 => has("close"),
        http::Version::HTTP_10 => !has("keep-alive"),
        _ => false,
    }
}

/// Why a connection was closed for a slow request head, in its error and in the log.
pub const HEAD_TIMEOUT: &str = "no complete request head in time";

/// What a read with nothing to read means between exchanges.
enum Between {
    Wait,
    Park,
    HeadTimeout,
}

impl ParkingIo {
    pub fn new(stream: TcpStream, prefix: Bytes, peer: Arc<Peer>, config: &Config) -> ParkingIo {
        let seen = peer.exchanges.done();
        ParkingIo {
            peer: PeerOfSocket {
                fd: std::os::fd::AsRawFd::as_raw_fd(&stream),
                peer,
            },
            stream,
            prefix,
            seen,
            write_blocked: false,
            read_waiting: false,
            spell: seen,
            spell_start: Instant::now(),
            head_timeout: config.client_header_timeout,
            timer: LazyTimer::default(),
            write_stall: WriteStall::new(config.client_write_timeout, config.client_notsent_lowat),
            parked: false,
            timed_out: false,
            cork_tried: false,
            splices: config.splice_min != 0,
        }
    }

    /// Whether this connection ended because it went idle, rather than closed.
    pub fn parked(&self) -> bool {
        self.parked
    }

    /// Whether this connection ended because a request head took too long.
    pub fn timed_out(&self) -> bool {
        self.timed_out
    }

    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Called when a read finds nothing. Between exchanges, the spell since the last one ended
    /// (or since this round began) is either idle, and parks after [`PARK_AFTER`], or has
    /// part of a request head, which must be complete within the header timeout.
    ///
    /// Under load the next request follows within microseconds: the deadline moves on with
    /// every request, which a [`LazyTimer`] follows without a timer-wheel update each time.
    fn between_exchanges(&mut self, cx: &mut Context<'_>) -> Between {
        let e = &self.peer.exchanges;
        if e.pinned.load(Ordering::Relaxed) {
            return Between::Wait;
        }
        if e.open.load(Ordering::Relaxed) != 0 {
            self.read_waiting = true;
            return Between::Wait;
        }
        self.read_waiting = false;
        let done = e.done();
        if done != self.spell {
            self.spell = done;
            self.spell_start = Instant::now();
        }
        let idle = done != self.seen && !self.write_blocked;
        let deadline = self.spell_start + if idle { PARK_AFTER } else { self.head_timeout };
        if self.timer.poll_until(cx, deadline).is_pending() {
            return Between::Wait;
        }
        if idle {
            Between::Park
        } else {
            Between::HeadTimeout
        }
    }

    /// Accounts for `n` bytes the socket took; `true` when a response body held back for this
    /// client may go on. After a large write, or while the client lags, looks at how much the
    /// kernel holds that is not on its way yet: a client that does not keep up makes the
    /// response's backend reads small (see `Exchanges`).
    fn after_progress(&mut self, n: usize) -> bool {
        use std::os::fd::AsRawFd;
        client_took(
            &self.peer,
            self.stream.as_raw_fd(),
            n,
            self.write_stall.lag_above(),
        )
    }

    /// Writes up to `max` bytes that placeholders stand for, from the connection's pipe. The
    /// drain that empties the pipe wakes the task for a body waiting to fill it again, or,
    /// once the body has ended, gives the pipe back (`Tracked`'s drop gives it back when the
    /// last placeholder was written before the body ended).
    fn poll_splice(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<usize>> {
        use std::os::fd::AsRawFd;
        let fd = self.stream.as_raw_fd();
        let pipe = &self.peer.pipe;
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self
                .stream
                .try_io(tokio::io::Interest::WRITABLE, || pipe.drain_to(fd, max))
            {
                Ok((n, wake)) => {
                    if wake {
                        cx.waker().wake_by_ref();
                    } else if pipe.held() == 0 && !pipe.armed() {
                        // The body ended (`Tracked`'s drop disarmed the pipe) and its last
                        // bytes are out; a next response arms it only once hyper's queue is
                        // empty, so none stands for bytes in it.
                        pipe.release();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Before a write: corks the socket if this is the connection's last response, once (see
    /// the module's note). Not a tunnel's, whose bytes must flow as they come.
    #[inline]
    fn before_write(&mut self) {
        if !self.cork_tried && self.peer.exchanges.last() {
            self.cork();
        }
    }

    #[cold]
    fn cork(&mut self) {
        self.cork_tried = true;
        let e = &self.peer.exchanges;
        if e.pinned.load(Ordering::Relaxed) {
            return;
        }
        #[cfg(target_os = "linux")]
        match crate::sockopt::set_tcp(&self.stream, libc::TCP_CORK, 1) {
            Ok(()) => e.set_corked(),
            Err(error) => cork_refused(&error),
        }
    }

    /// Tracks whether hyper still holds response bytes: a connection parks only once they
    /// have all reached the socket.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Pending => self.write_blocked = true,
            Poll::Ready(Ok(n)) if self.after_progress(n) => {
                // A response body held back for this client can go on.
                self.write_blocked = false;
                cx.waker().wake_by_ref();
            }
            Poll::Ready(Ok(n)) if n > 0 && std::mem::take(&mut self.write_blocked) => {
                // hyper polls for the next request only once; the response's last bytes may
                // have left after that poll. Poll again so an idle connection still parks.
                cx.waker().wake_by_ref();
            }
            // The exchange a read waited on has ended: arm the timer of the spell that begins,
            // as hyper's next read would have (but hyper reads again only when woken). After
            // the last exchange hyper closes the connection, and no spell begins.
            Poll::Ready(Ok(n))
                if n > 0
                    && self.read_waiting
                    && !self.peer.exchanges.last()
                    && self.peer.exchanges.open.load(Ordering::Relaxed) == 0
                    && !matches!(self.between_exchanges(cx), Between::Wait) =>
            {
                // Already due: let the read side act on it.
                cx.waker().wake_by_ref();
            }
            _ => {}
        }
        polled
    }
}

impl Read for ParkingIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // Let go of the buffer it was read into.
                this.prefix = Bytes::new();
            }
            this.seen = this.peer.exchanges.done();
            return Poll::Ready(Ok(()));
        }
        if this.parked {
            return Poll::Ready(Ok(()));
        }
        // SAFETY: tokio's `ReadBuf` only writes initialised bytes into the uninitialised
        // slice, and `advance` below covers exactly the bytes it filled.
        let n = unsafe {
            let mut tbuf = tokio::io::ReadBuf::uninit(buf.as_mut());
            match Pin::new(&mut this.stream).poll_read(cx, &mut tbuf) {
                Poll::Ready(Ok(())) => tbuf.filled().len(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    return match this.between_exchanges(cx) {
                        Between::Wait => Poll::Pending,
                        Between::Park => {
                            // An idle connection holds no pipe (every byte was written).
                            this.peer.pipe.release();
                            this.parked = true;
                            this.peer.exchanges.set_parked();
                            Poll::Ready(Ok(()))
                        }
                        Between::HeadTimeout => {
                            this.timed_out = true;
                            Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, HEAD_TIMEOUT)))
                        }
                    };
                }
            }
        };
        if n > 0 {
            this.seen = this.peer.exchanges.done();
        }
        // SAFETY: `n` bytes were just filled.
        unsafe { buf.advance(n) };
        Poll::Ready(Ok(()))
    }
}

impl Write for ParkingIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.before_write();
        let polled = if this.splices && splice::is_placeholder(buf) {
            this.poll_splice(cx, buf.len())
        } else {
            Pin::new(&mut this.stream).poll_write(cx, buf)
        };
        let polled = this.write_stall.check(cx, polled);
        this.after_write(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.before_write();
        // Placeholders and plain bytes never share a system call: what goes first goes alone.
        let polled = match this.splices.then(|| splice::front(bufs)) {
            None => Pin::new(&mut this.stream).poll_write_vectored(cx, bufs),
            Some(Front::Plain(n)) => Pin::new(&mut this.stream).poll_write_vectored(cx, &bufs[..n]),
            Some(Front::Piped(n)) => this.poll_splice(cx, n),
        };
        let polled = this.write_stall.check(cx, polled);
        this.after_write(cx, polled)
    }

    /// Always: hyper then queues body frames as they are, for `poll_write_vectored`, rather
    /// than copying them into its own buffer, which would turn placeholders into zeros.
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.parked {
            // The connection is idle, not closing: the socket goes back to the server.
            return Poll::Ready(Ok(()));
        }
        if !this.peer.exchanges.pinned.load(Ordering::Relaxed) {
            // hyper is done with the connection, and the server drops the socket as soon as
            // hyper returns: the close sends the FIN, after every byte written, as a shutdown
            // would one system call earlier (nginx closes alike); a corked socket is shut
            // down as it is dropped (`PeerOfSocket`). A tunnel's half-close, which keeps
            // reading, still shuts its side down.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

/// A `ParkingIo`'s peer, and the socket it is read from: dropped still corked, it shuts
/// the socket down before the socket closes. A close alone would send the corked response
/// with the FIN too, but drops it unsent, for a reset, when the client sent bytes that
/// nobody read; the shutdown sends both first (the close still resets such a connection
/// after them). The one place for every way a corked connection ends: hyper closing it
/// (the socket is dropped in the same turn), giving up on an error, or ending it as an
/// upgrade (a request on it offered one, taken or not), when hyper hands the socket on and
/// drops it.
struct PeerOfSocket {
    peer: Arc<Peer>,
    fd: std::os::fd::RawFd,
}

impl std::ops::Deref for PeerOfSocket {
    type Target = Arc<Peer>;

    fn deref(&self) -> &Arc<Peer> {
        &self.peer
    }
}

impl Drop for PeerOfSocket {
    fn drop(&mut self) {
        if self.peer.exchanges.take_corked() {
            shut_down(self.fd);
        }
    }
}

#[cold]
fn shut_down(fd: std::os::fd::RawFd) {
    // SAFETY: a call on the descriptor of the socket the `ParkingIo` holds, which drops it
    // only after this field. A failure (the client already gone) leaves nothing to send.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Drives `conn`, a plain HTTP/1.1 connection's hyper future over a [`ParkingIo`] on `fd`,
/// for the server: a turn that corked the socket for the last response and leaves the
/// connection open (the response is not all written yet) uncorks it, so that what was
/// written goes out now. Once `conn` is done it holds the socket no longer (an upgrade hands
/// it on), and `fd` is not touched: the `ParkingIo` sends what is corked.
pub fn turns<'a, F: Future + Unpin>(
    conn: &'a mut F,
    peer: &'a Peer,
    fd: std::os::fd::RawFd,
) -> impl Future<Output = F::Output> + 'a {
    std::future::poll_fn(move |cx| {
        let polled = Pin::new(&mut *conn).poll(cx);
        if polled.is_pending() && peer.exchanges.take_corked() {
            uncork(fd);
        }
        polled
    })
}

#[cold]
fn uncork(fd: std::os::fd::RawFd) {
    #[cfg(target_os = "linux")]
    if let Err(error) = crate::sockopt::set_tcp(&fd, libc::TCP_CORK, 0) {
        // The kernel sends corked bytes within 200 ms on its own.
        if crate::metrics::socket_option_refused(crate::metrics::SocketOption::Cork) {
            tracing::warn!(%error, "TCP_CORK not cleared: a streaming response's bytes may wait up to 200 ms");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = fd;
}

/// Counts a refused cork; warns of the first.
#[cfg(target_os = "linux")]
fn cork_refused(error: &io::Error) {
    if crate::metrics::socket_option_refused(crate::metrics::SocketOption::Cork) {
        tracing::warn!(%error, "TCP_CORK refused: a closing connection's last response and its FIN go apart");
    }
}

#[cfg(test)]
mod tests {
    use super::ends_connection;
    use http::{Request, Version};

    fn req(version: Version, connection: &[&str]) -> Request<()> {
        let mut b = Request::builder().version(version).uri("/");
        for c in connection {
            b = b.header(http::header::CONNECTION, *c);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_last_exchange_is_the_one_hyper_closes_after() {
        assert!(!ends_connection(&req(Version::HTTP_11, &[])));
        assert!(ends_connection(&req(Version::HTTP_11, &["close"])));
        assert!(ends_connection(&req(Version::HTTP_11, &["Upgrade, Close"])));
        assert!(ends_connection(&req(Version::HTTP_11, &["te", "close"])));
        assert!(!ends_connection(&req(
            Version::HTTP_11,
            &["closed, keep-alive"]
        )));
        assert!(ends_connection(&req(Version::HTTP_10, &[])));
        assert!(!ends_connection(&req(Version::HTTP_10, &["Keep-Alive"])));
        assert!(!ends_connection(&req(Version::HTTP_2, &["close"])));
    }
}
