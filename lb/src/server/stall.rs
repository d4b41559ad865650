//! Clients that stop reading (`LB_CLIENT_WRITE_TIMEOUT`).
//!
//! A response is streamed from the backend as the client takes it, so a client that stops
//! reading holds a backend connection (and the bytes in flight) for as long as it likes. As
//! nginx's `send_timeout`, the timeout bounds each wait for the client to take more, not the
//! whole response: a slow but moving reader is served to the end.
//!
//! Two places a response can wait on the client: the socket ([`WriteStall`], for the whole
//! connection), and, on HTTP/2, a stream's flow-control window, which a client can leave shut
//! for one stream while it reads the others ([`StreamExec`] with [`StreamStall`]). A stream
//! that times out is reset (RST_STREAM CANCEL, as h2 does for a dropped stream), which drops
//! its response body and with it the backend connection; its connection serves on.
//!
//! Knows nothing of routing or backends: only of bytes and streams waiting on the client.

use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use hyper::rt::{Read, ReadBufCursor, Write};
use tokio::time::Instant;

use crate::metrics::ClientErrorKind;
use crate::proxy::Peer;
use crate::time::{now_ms, LazyTimer};
use crate::Shared;

/// A write this large is part of a large response: worth a look at the client's pace.
const LARGE_WRITE: usize = 16 * 1024;

/// Bytes queued in the kernel for a client, not yet sent, above which the client is lagging.
/// A client that keeps up leaves next to nothing unsent (bytes on the wire do not count); one
/// that reads slowly lets the kernel's queue fill, up to about `LB_CLIENT_NOTSENT_LOWAT`
/// (megabytes without it) before a write would wait: without this, the lb would read the
/// backend in its largest pieces and hold one for as long as the client takes to drain it.
const KERNEL_BACKLOG: u32 = 64 * 1024;

/// The unsent bytes above which a client lags, for client sockets bounded at
/// `notsent_lowat` (`LB_CLIENT_NOTSENT_LOWAT`, 0: unbounded): [`KERNEL_BACKLOG`], or half
/// the bound where that is smaller, since a socket holds little more than its bound and a
/// client would otherwise never count as lagging.
fn lagging_above(notsent_lowat: u32) -> u32 {
    match notsent_lowat {
        0 => KERNEL_BACKLOG,
        n => KERNEL_BACKLOG.min(n / 2),
    }
}

/// Accounts for `n` bytes the client's socket (`fd`) took; `true` when a response body held
/// back for this client may go on. After a large write, or while the client lags, looks at
/// how much the kernel holds that is not on its way yet: a client that does not keep up makes
/// the response's backend reads small (see `Exchanges`). Plain and TLS connections alike: the
/// TLS layer writes what it encrypts straight on, so the kernel's queue tells the same.
pub fn client_took(peer: &Peer, fd: RawFd, n: usize, lagging_above: u32) -> bool {
    let e = &peer.exchanges;
    if n >= LARGE_WRITE || e.lagging() {
        // A queue that cannot be told counts as keeping up.
        e.set_lagging(crate::sockopt::unsent(fd).unwrap_or(0) > lagging_above as usize);
    }
    e.wrote(n)
}

/// The error a connection ends with when the client took nothing for the write timeout.
#[derive(Debug)]
pub struct WriteTimedOut;

impl std::fmt::Display for WriteTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client read nothing of the response in time")
    }
}

impl std::error::Error for WriteTimedOut {}

/// Whether a connection's error is a [`WriteTimedOut`].
pub fn is_write_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<WriteTimedOut>())
            {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// Fails writes to a socket that has taken nothing for the write timeout. Its timer is made
/// on the first write that has to wait, and stays unset while writes go straight through.
/// Also keeps the unsent bytes above which the socket's client lags ([`client_took`]).
pub struct WriteStall {
    timeout: Duration,
    lag_above: u32,
    since: Option<Instant>,
    timer: LazyTimer,
}

impl WriteStall {
    /// For a client socket bounded at `notsent_lowat` unsent bytes (0: unbounded).
    pub fn new(timeout: Duration, notsent_lowat: u32) -> WriteStall {
        WriteStall {
            timeout,
            lag_above: lagging_above(notsent_lowat),
            since: None,
            timer: LazyTimer::default(),
        }
    }

    /// The unsent bytes above which the client lags, for [`client_took`].
    pub fn lag_above(&self) -> u32 {
        self.lag_above
    }

    /// Passes a write's (or flush's) outcome through; one that has waited since the last
    /// progress for longer than the timeout becomes a [`WriteTimedOut`] error.
    pub fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => {
                let since = *self.since.get_or_insert_with(Instant::now);
                match self.timer.poll_until(cx, since + self.timeout) {
                    Poll::Ready(()) => {
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, WriteTimedOut)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            ready => {
                self.since = None;
                ready
            }
        }
    }
}

/// A connection's socket (plain for h2c, or TLS) with its writes bounded by [`WriteStall`].
pub struct StallIo<I> {
    inner: I,
    stall: WriteStall,
    /// HTTP/1.1: the connection's client end and its socket, told what the socket took, so
    /// that a response body held back for a slow client goes on (see `Tracked`).
    peer: Option<(Arc<Peer>, RawFd)>,
}

impl<I> StallIo<I> {
    pub fn new(inner: I, stall: WriteStall, peer: Option<(Arc<Peer>, RawFd)>) -> StallIo<I> {
        StallIo { inner, stall, peer }
    }

    fn wrote(&self, cx: &mut Context<'_>, polled: &Poll<io::Result<usize>>) {
        if let (Some((peer, fd)), Poll::Ready(Ok(n))) = (&self.peer, polled) {
            if client_took(peer, *fd, *n, self.stall.lag_above()) {
                cx.waker().wake_by_ref();
            }
        }
    }
}

impl<I: Read + Unpin> Read for StallIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<I: Write + Unpin> Write for StallIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(cx, &polled);
        this.stall.check(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(cx, &polled);
        this.stall.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.stall.check(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.stall.check(cx, polled)
    }
}

tokio::task_local! {
    /// The stall cell of the HTTP/2 stream whose task is running.
    static STREAM: Arc<StreamStall>;
}

/// When an HTTP/2 stream's response last handed hyper a frame that hyper has not come back
/// for: hyper asks for the next frame only once the stream's window has room for it.
#[derive(Default)]
pub struct StreamStall {
    /// `now_ms()` when the last frame was handed over; 0 while hyper waits on us instead.
    since_ms: AtomicU64,
}

impl StreamStall {
    /// The stall cell of the stream this task serves; `None` outside an HTTP/2 stream.
    pub fn current() -> Option<Arc<StreamStall>> {
        STREAM.try_with(Arc::clone).ok()
    }

    /// Notes what the response body gave hyper.
    pub fn polled<E>(&self, polled: &Poll<Option<Result<Frame<Bytes>, E>>>) {
        let since = match polled {
            Poll::Ready(Some(Ok(_))) => now_ms(),
            _ => 0,
        };
        self.since_ms.store(since, Ordering::Relaxed);
    }
}

/// Runs each HTTP/2 stream in a task of its own (as hyper's default executor does), ending
/// a stream whose client leaves its window shut past the write timeout.
#[derive(Clone)]
pub struct StreamExec {
    pub timeout: Duration,
    pub shared: Arc<Shared>,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let cell = Arc::new(StreamStall::default());
        tokio::spawn(Watched {
            inner: STREAM.scope(cell.clone(), fut),
            cell,
            armed_for: 0,
            deadline: Instant::now(),
            timer: LazyTimer::default(),
            exec: self.clone(),
        });
    }
}

pin_project_lite::pin_project! {
    /// A stream's task, watched for a client that stopped taking its response.
    struct Watched<F> {
        #[pin]
        inner: F,
        cell: Arc<StreamStall>,
        // The stall the timer is set for.
        armed_for: u64,
        deadline: Instant,
        timer: LazyTimer,
        exec: StreamExec,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.inner.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let since = this.cell.since_ms.load(Ordering::Relaxed);
        if since == 0 {
            // Waiting on the backend or the service, not the client. A timer set for an
            // earlier stall may still wake the task once; it then finds nothing to do.
            return Poll::Pending;
        }
        if since != *this.armed_for {
            *this.armed_for = since;
            let waited = Duration::from_millis(now_ms().saturating_sub(since));
            *this.deadline = Instant::now() + this.exec.timeout.saturating_sub(waited);
        }
        if this.timer.poll_until(cx, *this.deadline).is_pending() {
            return Poll::Pending;
        }
        // Dropping the stream's future resets the stream and drops the response body, which
        // gives up its backend connection.
        this.exec
            .shared
            .metrics
            .client_connection_errors
            .inc(ClientErrorKind::WriteTimeout);
        tracing::debug!("HTTP/2 stream closed: the client read nothing of its response in time");
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client counts as lagging below what its socket can hold unsent: a bound under twice
    /// the usual threshold lowers it, so a small `LB_CLIENT_NOTSENT_LOWAT` keeps slow clients'
    /// backend reads small.
    #[test]
    fn the_lagging_threshold_stays_under_the_sockets_bound() {
        assert_eq!(lagging_above(0), KERNEL_BACKLOG, "unbounded");
        assert_eq!(lagging_above(128 * 1024), KERNEL_BACKLOG);
        assert_eq!(lagging_above(16 * 1024), 8 * 1024);
        assert_eq!(lagging_above(1), 0);
    }
}
