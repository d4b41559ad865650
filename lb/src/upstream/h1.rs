//! The lb's HTTP/1.1 client for backend connections: writes one request at a time on a pooled
//! connection and reads its response, in the task of the client connection it serves.
//!
//! A general client (hyper's) runs a dispatcher between the caller and the connection: a
//! channel for the request, a oneshot for the response, a body channel per response, and a
//! request handed over by value. A proxy needs none of it: the client task that holds the
//! connection writes the head straight from the request parts it keeps for a retry, reads the
//! response head into a header map that shares the read buffer, and then hands out body
//! frames cut from that same buffer as the client side asks for them.
//!
//! Framing follows RFC 9112: requests go with `Content-Length` when their body's length is
//! known and chunked otherwise; responses are read by `Content-Length`, chunked coding or to
//! the close, and interim (1xx) responses are skipped. A `101 Switching Protocols` hands the
//! socket over whole (`Conn::into_tunnel`).

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::{BodyError, HeadFields, SendError, Timeouts, UpstreamBody};
use crate::field_list;
use crate::splice::BodyPipe;
use crate::time::LazyTimer;

/// Most bytes of a response head (status line, fields) or a trailer section; past it the
/// response is refused as a 502 rather than buffered without bound.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most fields in a response head, as hyper's default.
const MAX_FIELDS: usize = 100;
/// Reads start this large and grow, while reads fill them, up to `MAX_READ`: a large body
/// then moves in few reads, and in as few writes to the client, since each read is handed on
/// as one frame (1 MiB responses: 36% less CPU than with 64 KiB reads).
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
// A fill of the pipe is at most one read's size, and a placeholder at most the pipe's.
const _: () = assert!(MAX_READ <= crate::splice::PIPE_SIZE);
/// The largest read buffer a pooled connection keeps.
const POOLED_READ_BUF: usize = 4 * MIN_READ;
/// Request body frames are copied into the write buffer until it holds this much; then it is
/// written out before more is taken.
const WRITE_HIGH: usize = 64 * 1024;
/// A request larger than this may fill the backend's receive window (a socket starts with
/// about 64 KiB): past it the user timeout is lifted (see `Conn::lift_user_timeout`).
const WINDOW_MIN: usize = 64 * 1024;

/// What went wrong on a backend connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("backend closed the connection before a complete response head")]
    Closed,
    #[error("backend connection: {0}")]
    Io(#[from] io::Error),
    #[error("invalid response from the backend: {0}")]
    Invalid(&'static str),
    #[error("the backend's response head is over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the backend closed the connection before the end of the response body")]
    BodyCut,
    #[error("reading the client's request body: {0}")]
    RequestBody(BodyError),
}

/// How the body of the response in progress is delimited, and how far it has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Framing {
    /// No response body in progress: ended, or none.
    #[default]
    Done,
    Length(u64),
    /// Chunked coding, at a chunk-size line.
    ChunkSize,
    /// Inside a chunk, with this many data bytes to go.
    Chunk(u64),
    /// The CRLF that ends a chunk's data.
    ChunkEnd,
    /// After the last chunk: an empty line, or trailer fields and then one.
    Trailers,
    /// No length given: the body ends when the backend closes the connection.
    UntilClose,
}

/// One HTTP/1.1 connection to a backend.
pub struct Conn {
    io: TcpStream,
    /// What was read, and how far the response in progress got.
    dec: Decoder,
    /// The request head and body bytes not yet written.
    wbuf: BytesMut,
    read_size: usize,
    /// The most the first read of a body of known length takes (`size_first_read`), set by
    /// the caller for each request (`Sender::first_read_at_most`).
    pub(super) first_read_max: usize,
    /// Bounds the wait for each response head.
    timer: LazyTimer,
    /// Bytes of the request in progress written so far.
    sent: usize,
    /// The request in progress passed 64 KiB, or the socket refused some of it: the user
    /// timeout is lifted (see `lift_user_timeout`) and each write the backend takes restarts
    /// the response timeout.
    large_upload: bool,
    /// In a large upload, the bytes of the request the backend had acknowledged at the last
    /// deadline: more at the next one is a backend still taking the request.
    acked: usize,
    /// The user timeout is off for the exchange in progress.
    user_timeout_lifted: bool,
}

/// The response side of a connection without its socket: bytes in, a head and body frames
/// out. Kept apart so that it can be driven from a buffer (the fuzz target does).
#[derive(Default)]
struct Decoder {
    /// Bytes read and not yet handed out: a response head in the making, or body bytes.
    rbuf: BytesMut,
    /// The size of the allocation `rbuf` was cut from. Its view says nothing of it once
    /// frames are cut off, and frames on their way to the client keep it alive.
    rbuf_alloc: usize,
    framing: Framing,
    /// Whether the connection may carry another exchange once this one ends.
    reusable: bool,
}

impl Conn {
    pub fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            dec: Decoder {
                rbuf: BytesMut::new(),
                rbuf_alloc: 0,
                framing: Framing::Done,
                reusable: true,
            },
            wbuf: BytesMut::new(),
            read_size: MIN_READ,
            first_read_max: MIN_READ,
            timer: LazyTimer::default(),
            sent: 0,
            large_upload: false,
            acked: 0,
            user_timeout_lifted: false,
        }
    }

    /// Whether a pooled connection can take a request: the last exchange ended cleanly and the
    /// backend has neither closed it nor sent anything since. Makes no system call unless
    /// the socket was reported readable since the last read.
    pub fn is_usable(&mut self) -> bool {
        if !self.dec.reusable || self.dec.framing != Framing::Done || !self.dec.rbuf.is_empty() {
            return false;
        }
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        let mut probe = tokio::io::ReadBuf::uninit(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        match tokio::io::AsyncRead::poll_read(Pin::new(&mut self.io), &mut cx, &mut probe) {
            Poll::Pending => true,
            // A close (0 bytes), an error, or bytes nobody asked for.
            Poll::Ready(_) => {
                self.dec.reusable = false;
                false
            }
        }
    }

    /// Whether the response in progress has been read to its end and the connection may go
    /// back to the pool.
    pub fn is_reusable(&self) -> bool {
        self.dec.reusable && self.dec.framing == Framing::Done && self.dec.rbuf.is_empty()
    }

    /// Lets go of buffers a large body or upload grew, before the connection waits in the
    /// pool: an idle connection keeps at most a small buffer each way. What decides is the
    /// allocation, not the room left in the view: reads that fill a large buffer leave its
    /// view with little room, and writes leave the write buffer's empty. A read buffer of up
    /// to 32 KiB stays, so that responses of a few reads do not make a new one each time.
    pub fn shrink(&mut self) {
        if self.dec.rbuf_alloc > POOLED_READ_BUF {
            self.dec.rbuf = BytesMut::new();
            self.dec.rbuf_alloc = 0;
        }
        // Never split, so it holds its allocation alone: taking the room back says how large.
        if self.wbuf.try_reclaim(2 * MIN_READ + 1) {
            self.wbuf = BytesMut::new();
        }
        self.read_size = MIN_READ;
    }

    /// The socket and the bytes the backend sent after its `101` head, for a tunnel.
    pub fn into_tunnel(self) -> (TcpStream, Bytes) {
        (self.io, self.dec.rbuf.freeze())
    }

    /// Sends a request and waits for its response head. The head is written from `parts`,
    /// which stay with the caller for a retry; the body streams while the response is awaited.
    /// The response's body is then read with `poll_frame`.
    ///
    /// Whose turn it is decides the deadline: while every byte the client sent is written and
    /// more of its body is awaited, the client's (`timeouts.client_body`, restarted by each
    /// frame); otherwise the backend's (`timeouts.response`, restarted each time the wait
    /// passes back to it and, in a large upload, each time the backend takes more of it,
    /// from the lb's writes or from its send queue), so a slow upload is never blamed on the
    /// backend.
    pub async fn send(
        &mut self,
        parts: &http::request::Parts,
        fields: &impl HeadFields,
        body: UpstreamBody,
        timeouts: &Timeouts,
    ) -> Result<Response<()>, SendError> {
        let mut deadline = tokio::time::Instant::now() + timeouts.response;
        let mut on_client = false;
        let head_request = parts.method == Method::HEAD;
        let chunked = self.encode_head(parts, fields, &body);
        let mut body = if body.is_end_stream() {
            None
        } else {
            Some(body)
        };
        self.sent = 0;
        self.large_upload = false;
        self.acked = 0;
        poll_fn(|cx| {
            let mut took_frame = false;
            let sent_before = self.sent;
            let sending = (&mut body, chunked, &mut took_frame);
            if let Err(e) = self.poll_send_body(cx, sending, timeouts.user) {
                self.dec.reusable = false;
                return Poll::Ready(Err(match (self.sent > 0, e) {
                    // The body is taken only once the head is out: it is untouched.
                    (false, Error::Io(_)) => {
                        SendError::NotSent(body.take().unwrap_or(UpstreamBody::Empty))
                    }
                    (_, Error::RequestBody(e)) => SendError::ClientBody(e),
                    (_, e) => SendError::Failed(e.into()),
                }));
            }
            match self.poll_head(cx, head_request) {
                Poll::Ready(Ok(resp)) => {
                    if body.is_some() || !self.wbuf.is_empty() {
                        // The backend answered before it had the whole request: the rest is
                        // not sent, and the connection cannot carry another request.
                        self.dec.reusable = false;
                    }
                    if self.user_timeout_lifted && self.dec.reusable {
                        self.restore_user_timeout(timeouts.user);
                    }
                    self.size_first_read();
                    return Poll::Ready(Ok(resp));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SendError::Failed(e.into()))),
                Poll::Pending => {}
            }
            let waits_on_client = body.is_some() && self.wbuf.is_empty();
            // A large upload to a backend that reads more slowly than the client sends never
            // waits on the client: what bounds it is the backend's progress, not its length.
            let backend_took = self.large_upload && self.sent != sent_before;
            if waits_on_client != on_client
                || (waits_on_client && took_frame)
                || (!waits_on_client && backend_took)
            {
                on_client = waits_on_client;
                let limit = if on_client {
                    timeouts.client_body
                } else {
                    timeouts.response
                };
                deadline = tokio::time::Instant::now() + limit;
            }
            // Most responses come long before the timeout: see `LazyTimer`.
            while self.timer.poll_until(cx, deadline).is_ready() {
                // The last megabytes of a large upload wait in the send queue after the last
                // write: a backend still taking them is still taking the request. Looked at
                // here only, not at each write: the first look after the last write may grant
                // one more timeout, never more than one without progress.
                if self.large_upload && !on_client {
                    let acked = self.unacknowledged().map(|q| self.sent.saturating_sub(q));
                    if let Some(acked) = acked.filter(|&a| a > self.acked) {
                        self.acked = acked;
                        deadline = tokio::time::Instant::now() + timeouts.response;
                        continue;
                    }
                }
                self.dec.reusable = false;
                return Poll::Ready(Err(if on_client {
                    SendError::ClientBodyTimedOut
                } else {
                    SendError::TimedOut
                }));
            }
            Poll::Pending
        })
        .await
    }

    /// Writes the request line, the fields as `fields` renders them, and the body's framing
    /// into the write buffer; returns whether the body goes chunked.
    fn encode_head(
        &mut self,
        parts: &http::request::Parts,
        fields: &impl HeadFields,
        body: &UpstreamBody,
    ) -> bool {
        let length = if body.is_end_stream() {
            None
        } else {
            Some(body.size_hint().exact())
        };
        let b = &mut self.wbuf;
        b.clear();
        b.reserve(256);
        b.put_slice(parts.method.as_str().as_bytes());
        b.put_u8(b' ');
        let target = match parts.uri.path_and_query() {
            Some(pq) => pq.as_str(),
            None => parts.uri.authority().map_or("/", |a| a.as_str()),
        };
        b.put_slice(target.as_bytes());
        b.put_slice(b" HTTP/1.1\r\n");
        fields.encode_h1(&parts.headers, length.is_some(), b);
        let chunked = match length {
            None => false,
            Some(Some(n)) => {
                b.put_slice(b"content-length: ");
                b.put_slice(itoa(n, &mut [0; 20]));
                b.put_slice(b"\r\n");
                false
            }
            Some(None) => {
                b.put_slice(b"transfer-encoding: chunked\r\n");
                true
            }
        };
        b.put_slice(b"\r\n");
        chunked
    }

    /// Writes what is buffered, refilling the buffer from the request body while it can.
    fn poll_send_body(
        &mut self,
        cx: &mut Context<'_>,
        (body, chunked, took_frame): (&mut Option<UpstreamBody>, bool, &mut bool),
        user_timeout: Duration,
    ) -> Result<(), Error> {
        loop {
            while !self.wbuf.is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, &self.wbuf) {
                    Poll::Ready(Ok(0)) => return Err(Error::Io(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.wbuf.advance(n);
                        self.sent += n;
                        if self.sent > WINDOW_MIN && !self.large_upload {
                            self.lift_user_timeout(user_timeout);
                        }
                    }
                    Poll::Ready(Err(e)) => return Err(Error::Io(e)),
                    Poll::Pending => {
                        if !self.large_upload {
                            self.lift_user_timeout(user_timeout);
                        }
                        return Ok(());
                    }
                }
            }
            let Some(b) = body.as_mut() else {
                return Ok(());
            };
            // Takes frames until the buffer is worth a write or the body has nothing ready.
            while self.wbuf.len() < WRITE_HIGH {
                match Pin::new(&mut *b).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        *took_frame = true;
                        match frame.into_data() {
                            Ok(data) if data.is_empty() => {}
                            Ok(data) => {
                                if chunked {
                                    self.wbuf.put_slice(hex(data.len(), &mut [0; 16]));
                                    self.wbuf.put_slice(b"\r\n");
                                    self.wbuf.put_slice(&data);
                                    self.wbuf.put_slice(b"\r\n");
                                } else {
                                    self.wbuf.put_slice(&data);
                                }
                            }
                            Err(frame) => {
                                if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                                    self.wbuf.put_slice(b"0\r\n");
                                    put_fields(&mut self.wbuf, &trailers);
                                    self.wbuf.put_slice(b"\r\n");
                                    *body = None;
                                    break;
                                }
                            }
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        // The client's body broke off: the backend has an incomplete request.
                        self.dec.reusable = false;
                        return Err(Error::RequestBody(e));
                    }
                    Poll::Ready(None) => {
                        if chunked {
                            self.wbuf.put_slice(b"0\r\n\r\n");
                        }
                        *body = None;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if self.wbuf.is_empty() {
                return Ok(());
            }
        }
    }

    /// The bytes written that the backend has not acknowledged; `None` if the kernel cannot
    /// say, which extends no wait.
    fn unacknowledged(&self) -> Option<usize> {
        crate::sockopt::unacknowledged(&self.io).ok()
    }

    /// Turns the user timeout off for the rest of this exchange, once the request may be
    /// more than the backend's receive window holds (or the socket already refused bytes).
    /// The kernel applies the user timeout to a window held shut as to unacknowledged data:
    /// a live backend that pauses reading an upload answers every window probe, yet would be
    /// taken for dead. Until the response head comes, the response timeout bounds the wait,
    /// restarted by each write the backend takes. Marks the request a large upload.
    fn lift_user_timeout(&mut self, user_timeout: Duration) {
        self.large_upload = true;
        if !user_timeout.is_zero() {
            // Zero is the kernel's default: no bound beyond its retransmissions.
            self.user_timeout_lifted =
                crate::sockopt::set_tcp(&self.io, libc::TCP_USER_TIMEOUT, 0).is_ok();
        }
    }

    /// Sets the user timeout again for the next exchange; a connection that could not have
    /// it back is not reused.
    fn restore_user_timeout(&mut self, user_timeout: Duration) {
        self.user_timeout_lifted = false;
        if crate::sockopt::set_tcp_ms(&self.io, libc::TCP_USER_TIMEOUT, user_timeout).is_err() {
            self.dec.reusable = false;
        }
    }

    /// Reads until a final response head is parsed; interim responses are dropped.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<Response<()>, Error>> {
        loop {
            if let Some(head) = self.dec.head(head_request).transpose() {
                return Poll::Ready(head);
            }
            if ready!(self.poll_fill(cx))? == 0 {
                self.dec.reusable = false;
                return Poll::Ready(Err(Error::Closed));
            }
        }
    }

    /// Sizes the first read of a body whose length the head gave to what is left of it, up
    /// to `first_read_max` (the caller's: what the body's consumer may be handed before its
    /// pace shows); reads grow from there as they fill. A 64 KiB body whose rest has arrived
    /// then takes two reads at 64 KiB where growing from 8 KiB took four, and as many
    /// frames and writes fewer (64 KiB responses: nginx, whose buffers are 64 KiB, was 13%
    /// ahead). Exactly what is left, not rounded up: a rest that fits the 32 KiB buffer a
    /// pooled connection keeps is read into it.
    fn size_first_read(&mut self) {
        if let Framing::Length(left) = self.dec.framing {
            let rest = left.saturating_sub(self.dec.rbuf.len() as u64);
            if rest > MIN_READ as u64 {
                let max = self.first_read_max.min(MAX_READ);
                self.read_size = rest.min(max as u64) as usize;
            }
        }
    }

    /// Reads more bytes into the read buffer; 0 means the backend closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.dec.rbuf.capacity() - self.dec.rbuf.len() < self.read_size / 2
            && !self.dec.rbuf.try_reclaim(self.read_size)
        {
            // A new buffer, not `reserve`: when this one is too small, reserve reallocates it
            // whole, copying every byte already handed on as frames along with the few left
            // (a quarter to a half of a large body's bytes copied once more).
            let mut fresh = BytesMut::with_capacity(self.dec.rbuf.len() + self.read_size);
            fresh.extend_from_slice(&self.dec.rbuf);
            self.dec.rbuf_alloc = fresh.capacity();
            self.dec.rbuf = fresh;
        }
        // At most `read_size`, whatever room the buffer has: a read is a frame handed on, and
        // a consumer that lags (`consumer_lags`) gets small ones.
        let room = (self.dec.rbuf.capacity() - self.dec.rbuf.len()).min(self.read_size);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut (&mut self.dec.rbuf).limit(room)
        ))?;
        // A read that fills the room asks for larger reads (a large body); else back down.
        self.read_size = if n == room {
            (self.read_size * 2).min(MAX_READ)
        } else {
            MIN_READ
        };
        Poll::Ready(Ok(n))
    }

    /// Whoever takes the body is not keeping up: the next reads are small again, so that what
    /// waits for it (the frames handed on, and the buffer they are cut from) stays small and
    /// the rest of the response stays in the backend's socket.
    pub fn consumer_lags(&mut self) {
        self.read_size = MIN_READ;
    }

    /// Moves the next bytes of a body with `left` bytes to go from the socket into `pipe`,
    /// and hands out a placeholder for them. The pipe takes one fill at a time: while the
    /// client's writer has not drained the last one, this waits, and the drain that empties
    /// the pipe wakes the task. Fills are sized as reads are (`poll_fill`), small while the
    /// client lags, but a short one does not shrink the next: it needs no buffer. (Fills of
    /// the whole pipe at once measured worse: see BENCHMARKS.md.)
    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        pipe: &BodyPipe,
        left: u64,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if pipe.held() > 0 {
            pipe.wait_for_room();
            return Poll::Pending;
        }
        let want = left.min(self.read_size as u64) as usize;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.io);
        let filled = loop {
            if let Err(e) = ready!(self.io.poll_read_ready(cx)) {
                break Err(e);
            }
            match self
                .io
                .try_io(tokio::io::Interest::READABLE, || pipe.fill_from(fd, want))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                filled => break filled,
            }
        };
        let n = match filled {
            Ok(0) => {
                self.dec.reusable = false;
                return Poll::Ready(Some(Err(Error::BodyCut)));
            }
            Ok(n) => n,
            Err(e) => {
                self.dec.reusable = false;
                return Poll::Ready(Some(Err(Error::Io(e))));
            }
        };
        if n == want {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        }
        self.dec.framing = match left - n as u64 {
            0 => Framing::Done,
            left => Framing::Length(left),
        };
        Poll::Ready(Some(Ok(Frame::data(crate::splice::placeholder(n)))))
    }

    /// Whether the response body has been read to its end.
    pub fn body_done(&self) -> bool {
        self.dec.framing == Framing::Done
    }

    pub fn body_size_hint(&self) -> SizeHint {
        match self.dec.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    /// The next frame of the response body: data cut from the read buffer without a copy,
    /// or the trailers of a chunked body. Given a `pipe`, a body of known length that the
    /// read buffer has handed out goes on through it: each frame is then a placeholder
    /// for the bytes moved into the pipe (see `crate::splice`).
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        pipe: Option<&BodyPipe>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            if let Some(frame) = self.dec.decode_buffered() {
                return Poll::Ready(frame);
            }
            if let (Some(pipe), Framing::Length(left)) = (pipe, self.dec.framing) {
                // Without a pipe to be had, the body is copied as any other.
                if pipe.ready() {
                    return self.poll_splice(cx, pipe, left);
                }
            }
            // Needs more bytes.
            match ready!(self.poll_fill(cx)) {
                Ok(0) if self.dec.framing == Framing::UntilClose => {
                    self.dec.framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.dec.reusable = false;
                    return Poll::Ready(Some(Err(Error::BodyCut)));
                }
                Ok(_) => {}
                Err(e) => {
                    self.dec.reusable = false;
                    return Poll::Ready(Some(Err(Error::Io(e))));
                }
            }
        }
    }
}

impl Decoder {
    /// The final response head, once the buffer holds it whole; `None` while more bytes are
    /// needed. Interim responses are dropped on the way, however many arrived in one read:
    /// a `103` and the final head in one segment must not wait for another byte.
    fn head(&mut self, head_request: bool) -> Result<Option<Response<()>>, Error> {
        while !self.rbuf.is_empty() {
            let before = self.rbuf.len();
            match self.parse_head(head_request) {
                Ok(Some(resp)) => return Ok(Some(resp)),
                // An interim response was taken off: parse what follows it.
                Ok(None) if self.rbuf.len() < before => continue,
                Ok(None) if self.rbuf.len() >= MAX_HEAD => {
                    // A head in the making: it must fit.
                    self.reusable = false;
                    return Err(Error::HeadTooLarge);
                }
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.reusable = false;
                    return Err(e);
                }
            }
        }
        Ok(None)
    }

    /// Parses a response head at the start of the read buffer. `None` when it is incomplete,
    /// or was an interim response (taken off the buffer).
    fn parse_head(&mut self, head_request: bool) -> Result<Option<Response<()>>, Error> {
        // Where each field lies in the head (name offset and length, value offset and
        // length): the head is split off the buffer only after the parser let go of it.
        let mut spans = [[0u32; 4]; MAX_FIELDS];
        let (len, code, http10, n) = {
            let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
            let mut parsed = httparse::Response::new(&mut []);
            let len = match httparse::ParserConfig::default()
                // Seen from real servers; hyper's client accepts it too.
                .allow_spaces_after_header_name_in_responses(true)
                .parse_response_with_uninit_headers(&mut parsed, &self.rbuf, &mut fields)
            {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(Error::Invalid("more than 100 header fields"))
                }
                Err(_) => return Err(Error::Invalid("malformed response head")),
            };
            let base = self.rbuf.as_ptr() as usize;
            for (span, f) in spans.iter_mut().zip(parsed.headers.iter()) {
                let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
                *span = [
                    at(f.name.as_bytes()),
                    f.name.len() as u32,
                    at(f.value),
                    f.value.len() as u32,
                ];
            }
            let http10 = parsed.version == Some(0);
            (len, parsed.code.unwrap_or(0), http10, parsed.headers.len())
        };
        let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("bad status code"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            self.rbuf.advance(len);
            return Ok(None);
        }
        let head = self.rbuf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(n);
        let mut seen = FramingFields::default();
        for &[name_at, name_len, value_at, value_len] in &spans[..n] {
            let (name_at, value_at) = (name_at as usize, value_at as usize);
            let name = HeaderName::from_bytes(&head[name_at..name_at + name_len as usize])
                .map_err(|_| Error::Invalid("bad header field name"))?;
            let value =
                HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len as usize))
                    .map_err(|_| Error::Invalid("bad header field value"))?;
            seen.note(&name, &value);
            headers.append(name, value);
        }
        self.framing = self.framing_of(status, &mut headers, seen, head_request, http10)?;

        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = Version::HTTP_11;
        *resp.headers_mut() = headers;
        Ok(Some(resp))
    }

    /// RFC 9112 6.3: how the body of this response is delimited; also whether the connection
    /// outlives it. A `Content-Length` beside `Transfer-Encoding` is removed: the coding
    /// frames the body, and a proxy must not pass on a length that contradicts it.
    fn framing_of(
        &mut self,
        status: StatusCode,
        headers: &mut HeaderMap,
        seen: FramingFields,
        head_request: bool,
        http10: bool,
    ) -> Result<Framing, Error> {
        let keep_alive = if http10 {
            seen.keep_alive_option
        } else {
            !seen.close_option
        };
        if !keep_alive {
            self.reusable = false;
        }
        if status == StatusCode::SWITCHING_PROTOCOLS {
            // The connection now carries another protocol.
            self.reusable = false;
            return Ok(Framing::Done);
        }
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Ok(Framing::Done);
        }
        if let Some(last) = &seen.last_transfer_coding {
            // Chunked must be the last coding; with any other last coding, the body runs to
            // the close. Either way Transfer-Encoding overrides Content-Length, whose presence
            // beside it makes the connection unfit for reuse, and which an intermediary must
            // remove before it forwards the message (RFC 9112 6.3): the client would read the
            // body by that length and get it cut short.
            let chunked = field_list::last(last).is_some_and(|c| c.eq_ignore_ascii_case("chunked"));
            if headers.remove(header::CONTENT_LENGTH).is_some() {
                self.reusable = false;
            }
            if chunked && !http10 {
                return Ok(Framing::ChunkSize);
            }
            self.reusable = false;
            return Ok(Framing::UntilClose);
        }
        match seen.content_length.map_err(Error::Invalid)? {
            Some(0) => Ok(Framing::Done),
            Some(n) => Ok(Framing::Length(n)),
            None => {
                self.reusable = false;
                Ok(Framing::UntilClose)
            }
        }
    }

    /// The next frame of the body from what is buffered, as `poll_frame` returns it; `None`
    /// when more bytes are needed first.
    fn decode_buffered(&mut self) -> Option<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            match self.framing {
                Framing::Done => return Some(None),
                Framing::Length(left) | Framing::Chunk(left) if !self.rbuf.is_empty() => {
                    let n = left.min(self.rbuf.len() as u64);
                    let data = self.rbuf.split_to(n as usize).freeze();
                    self.framing = match (self.framing, left - n) {
                        (Framing::Length(_), 0) => Framing::Done,
                        (Framing::Length(_), left) => Framing::Length(left),
                        (_, 0) => Framing::ChunkEnd,
                        (_, left) => Framing::Chunk(left),
                    };
                    return Some(Some(Ok(Frame::data(data))));
                }
                Framing::UntilClose if !self.rbuf.is_empty() => {
                    let data = self.rbuf.split().freeze();
                    return Some(Some(Ok(Frame::data(data))));
                }
                Framing::ChunkSize if !self.rbuf.is_empty() => {
                    match httparse::parse_chunk_size(&self.rbuf) {
                        Ok(httparse::Status::Complete((len, size))) => {
                            self.rbuf.advance(len);
                            self.framing = if size == 0 {
                                Framing::Trailers
                            } else {
                                Framing::Chunk(size)
                            };
                            continue;
                        }
                        Ok(httparse::Status::Partial) if self.rbuf.len() < MAX_HEAD => return None,
                        _ => return Some(Some(Err(self.invalid("bad chunk size line")))),
                    }
                }
                Framing::ChunkEnd if self.rbuf.len() >= 2 => {
                    if &self.rbuf[..2] != b"\r\n" {
                        return Some(Some(Err(self.invalid("chunk data not ended by CRLF"))));
                    }
                    self.rbuf.advance(2);
                    self.framing = Framing::ChunkSize;
                    continue;
                }
                Framing::Trailers if self.rbuf.len() >= 2 => {
                    if &self.rbuf[..2] == b"\r\n" {
                        self.rbuf.advance(2);
                        self.framing = Framing::Done;
                        return Some(None);
                    }
                    match self.parse_trailers() {
                        Ok(Some(trailers)) => {
                            self.framing = Framing::Done;
                            return Some(Some(Ok(Frame::trailers(trailers))));
                        }
                        Ok(None) => return None,
                        Err(e) => return Some(Some(Err(e))),
                    }
                }
                _ => return None,
            }
        }
    }

    /// The trailer section after a chunked body's last chunk, once it is whole.
    fn parse_trailers(&mut self) -> Result<Option<HeaderMap>, Error> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        match httparse::parse_headers(&self.rbuf, &mut fields) {
            Ok(httparse::Status::Complete((len, fields))) => {
                let mut trailers = HeaderMap::with_capacity(fields.len());
                for f in fields {
                    let name = HeaderName::from_bytes(f.name.as_bytes());
                    let value = HeaderValue::from_bytes(f.value);
                    if let (Ok(name), Ok(value)) = (name, value) {
                        trailers.append(name, value);
                    }
                }
                self.rbuf.advance(len);
                Ok(Some(trailers))
            }
            Ok(httparse::Status::Partial) if self.rbuf.len() < MAX_HEAD => Ok(None),
            _ => Err(self.invalid("bad trailer section")),
        }
    }

    fn invalid(&mut self, what: &'static str) -> Error {
        self.reusable = false;
        self.framing = Framing::Done;
        Error::Invalid(what)
    }
}

/// What the response decoder made of a byte stream: see `decode`.
#[derive(Debug)]
pub struct Decoded {
    /// The final head, or why there is none (`Error::Closed` when the input ended first).
    pub head: Result<Response<()>, Error>,
    /// Body data frames, in order.
    pub data: Vec<Bytes>,
    pub trailers: Option<HeaderMap>,
    /// How the body ended: `Ok(true)` read to its end, `Ok(false)` the input ended first
    /// (a cut body), `Err` refused.
    pub body: Result<bool, Error>,
    /// Whether the connection could carry another exchange afterwards.
    pub reusable: bool,
    /// Bytes of the input after the response (read ahead, never handed out).
    pub leftover: usize,
}

/// Decodes one response from `input` arriving in pieces (`cuts` gives their lengths; the
/// rest comes last, and then the backend closes), exactly as a connection reads it: the
/// parsing a backend's bytes meet, without a socket. For the fuzz target and tests.
pub fn decode(input: &[u8], cuts: &[usize], head_request: bool) -> Decoded {
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut rest = input;
    for &c in cuts {
        let (piece, r) = rest.split_at(c.min(rest.len()));
        pieces.push(piece);
        rest = r;
    }
    pieces.push(rest);
    let mut pieces = pieces.into_iter();
    let mut dec = Decoder {
        rbuf: BytesMut::new(),
        rbuf_alloc: 0,
        framing: Framing::Done,
        reusable: true,
    };
    let mut out = Decoded {
        head: Err(Error::Closed),
        data: Vec::new(),
        trailers: None,
        body: Ok(false),
        reusable: false,
        leftover: 0,
    };
    // The head: parse what is buffered, else read the next piece.
    loop {
        match dec.head(head_request) {
            Ok(Some(resp)) => {
                out.head = Ok(resp);
                break;
            }
            Ok(None) => match pieces.next() {
                Some(p) => dec.rbuf.extend_from_slice(p),
                None => return out,
            },
            Err(e) => {
                out.head = Err(e);
                return out;
            }
        }
    }
    // The body, as `Conn::poll_frame` reads it.
    let mut closed = false;
    loop {
        match dec.decode_buffered() {
            Some(None) => {
                out.body = Ok(true);
                break;
            }
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => out.data.push(data),
                Err(frame) => out.trailers = frame.into_trailers().ok(),
            },
            Some(Some(Err(e))) => {
                out.body = Err(e);
                break;
            }
            None if closed => {
                if dec.framing == Framing::UntilClose {
                    dec.framing = Framing::Done;
                    out.body = Ok(true);
                }
                dec.reusable = false;
                break;
            }
            None => match pieces.next() {
                Some(p) => dec.rbuf.extend_from_slice(p),
                None => closed = true,
            },
        }
    }
    out.leftover = dec.rbuf.len() + pieces.map(<[u8]>::len).sum::<usize>();
    // Bytes after the response, read or not, make the connection unusable (`is_usable`).
    out.reusable = dec.reusable && dec.framing == Framing::Done && out.leftover == 0;
    out
}

/// The fields that frame a response, noted while the head's fields go into its map, so that
/// `framing_of` looks none of them up there: three hashed lookups a response otherwise, about
/// 330 instructions of the 20,000 a proxied request takes.
struct FramingFields {
    /// A `Connection` field lists `close`.
    close_option: bool,
    /// A `Connection` field lists `keep-alive` (what keeps an HTTP/1.0 connection).
    keep_alive_option: bool,
    /// The last `Transfer-Encoding` field line: its last coding decides.
    last_transfer_coding: Option<HeaderValue>,
    /// Every `Content-Length` value and item agreed on this length (RFC 9112 6.3, items of a
    /// list that are all the same are one length), or why not. Only read without a
    /// `Transfer-Encoding`, which overrides it.
    content_length: Result<Option<u64>, &'static str>,
}

impl Default for FramingFields {
    fn default() -> Self {
        Self {
            close_option: false,
            keep_alive_option: false,
            last_transfer_coding: None,
            content_length: Ok(None),
        }
    }
}

impl FramingFields {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) {
        if *name == header::CONTENT_LENGTH {
            if let Ok(length) = self.content_length {
                self.content_length = content_length(length, value.as_bytes());
            }
        } else if *name == header::TRANSFER_ENCODING {
            self.last_transfer_coding = Some(value.clone());
        } else if *name == header::CONNECTION {
            for option in field_list::items(value) {
                self.close_option |= option.eq_ignore_ascii_case("close");
                self.keep_alive_option |= option.eq_ignore_ascii_case("keep-alive");
            }
        }
    }
}

/// The length so far with one more `Content-Length` field line's items.
fn content_length(mut length: Option<u64>, line: &[u8]) -> Result<Option<u64>, &'static str> {
    for part in line.split(|&b| b == b',') {
        let n = parse_length(part).ok_or("bad Content-Length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting Content-Length values");
        }
        length = Some(n);
    }
    Ok(length)
}

fn parse_length(s: &[u8]) -> Option<u64> {
    let s = s.trim_ascii();
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

fn put_fields(b: &mut BytesMut, fields: &HeaderMap) {
    for (name, value) in fields {
        b.put_slice(name.as_str().as_bytes());
        b.put_slice(b": ");
        b.put_slice(value.as_bytes());
        b.put_slice(b"\r\n");
    }
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

fn hex(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(1048576, &mut [0; 20]), b"1048576");
        assert_eq!(itoa(u64::MAX, &mut [0; 20]), b"18446744073709551615");
        assert_eq!(hex(0, &mut [0; 16]), b"0");
        assert_eq!(hex(0x1f40, &mut [0; 16]), b"1f40");
        assert_eq!(parse_length(b" 42 "), Some(42));
        assert_eq!(parse_length(b"+1"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"99999999999999999999"), None);
    }

    #[test]
    fn interim_heads_and_the_final_one_in_one_read() {
        let input = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
                      HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        for cuts in [&[][..], &[10], &[47, 1]] {
            let d = decode(input, cuts, false);
            assert_eq!(d.head.unwrap().status(), 200, "{cuts:?}");
            assert_eq!(d.data.concat(), b"ok");
            assert!(matches!(d.body, Ok(true)));
            assert!(d.reusable);
        }
    }

    #[test]
    fn the_decoder_reads_every_framing() {
        let d = decode(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n\
              2\r\nhi\r\n0\r\nX-T: 1\r\n\r\n",
            &[30],
            false,
        );
        let head = d.head.unwrap();
        assert!(!head.headers().contains_key(header::CONTENT_LENGTH));
        assert_eq!(d.data.concat(), b"hi");
        assert_eq!(d.trailers.unwrap()["x-t"], "1");
        assert!(!d.reusable, "a length beside a coding: not reused");
        let d = decode(b"HTTP/1.1 200 OK\r\n\r\nto the close", &[], false);
        assert_eq!(d.data.concat(), b"to the close");
        assert!(matches!(d.body, Ok(true)));
        let d = decode(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
            &[],
            false,
        );
        assert!(matches!(d.body, Ok(false)), "cut short");
        let d = decode(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabcd",
            &[],
            false,
        );
        assert_eq!((d.data.concat(), d.leftover), (b"ab".to_vec(), 2));
        assert!(decode(b"SMTP ready\r\n\r\n", &[], false).head.is_err());
    }

    /// The framing fields are read as the head's fields are: whether the connection outlives
    /// the response, which field frames the body, and what makes the head invalid.
    #[test]
    fn the_framing_fields_decide_reuse_and_length() {
        let reusable = |head: &str| {
            let d = decode(format!("{head}\r\n\r\nok").as_bytes(), &[], false);
            assert_eq!(d.data.concat(), b"ok", "{head}");
            d.reusable
        };
        assert!(reusable("HTTP/1.1 200 OK\r\ncontent-length: 2"));
        assert!(!reusable(
            "HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 2"
        ));
        assert!(reusable(
            "HTTP/1.1 200 OK\r\nConnection: x-a\r\ncontent-length: 2"
        ));
        assert!(!reusable("HTTP/1.0 200 OK\r\ncontent-length: 2"));
        assert!(reusable(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\ncontent-length: 2"
        ));
        assert!(reusable(
            "HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\nContent-Length: 2"
        ));
        assert!(!reusable(
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\nTransfer-Encoding: br"
        ));
        let invalid = |head: &str| {
            let d = decode(format!("{head}\r\n\r\nok").as_bytes(), &[], false);
            d.head.err().map(|e| e.to_string())
        };
        for (head, why) in [
            ("content-length: 2, 3", "conflicting Content-Length values"),
            (
                "content-length: 2\r\ncontent-length: 3",
                "conflicting Content-Length values",
            ),
            ("content-length: -2", "bad Content-Length"),
            (
                "content-length: 2\r\ncontent-length: 2,",
                "bad Content-Length",
            ),
        ] {
            let got = invalid(&format!("HTTP/1.1 200 OK\r\n{head}"));
            assert!(
                got.as_deref().is_some_and(|e| e.contains(why)),
                "{head}: {got:?}"
            );
        }
        // The last coding of the last Transfer-Encoding line decides.
        let d = decode(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 1\r\n\
              Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            &[],
            false,
        );
        assert_eq!(d.data.concat(), b"hi");
        assert!(!d
            .head
            .unwrap()
            .headers()
            .contains_key(header::CONTENT_LENGTH));
        let d = decode(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nraw",
            &[],
            false,
        );
        assert_eq!((d.data.concat(), d.reusable), (b"raw".to_vec(), false));
    }

    /// The user timeout lifted for an upload is the configured one again afterwards.
    #[tokio::test]
    async fn the_user_timeout_comes_back_after_an_upload() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (io, _accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let mut conn = Conn::new(io.unwrap());
        let user = Duration::from_millis(300);
        crate::sockopt::set_tcp(&conn.io, libc::TCP_USER_TIMEOUT, 300).unwrap();
        let get = |conn: &Conn| {
            let mut v: libc::c_int = -1;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: an open socket, and an int-sized value and length that outlive the call.
            let rc = unsafe {
                libc::getsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&conn.io),
                    libc::IPPROTO_TCP,
                    libc::TCP_USER_TIMEOUT,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            v
        };
        conn.lift_user_timeout(user);
        assert!(conn.user_timeout_lifted);
        assert_eq!(get(&conn), 0);
        conn.restore_user_timeout(user);
        assert!(!conn.user_timeout_lifted && conn.dec.reusable);
        assert_eq!(get(&conn), 300);
        // Off in the settings: nothing to lift.
        conn.lift_user_timeout(Duration::ZERO);
        assert!(!conn.user_timeout_lifted);
        assert_eq!(get(&conn), 300);
    }

    /// A connection put back in the pool keeps no large buffer, though the views it holds
    /// say little of the allocations under them: a read buffer whose bytes went out as a
    /// frame the client side still holds, and a write buffer whose bytes were all written.
    #[tokio::test]
    async fn a_pooled_connection_lets_go_of_large_buffers() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (io, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (mut backend, _) = accepted.unwrap();
        let mut conn = Conn::new(io.unwrap());

        // A read grown to 64 KiB that leaves 100 bytes of its buffer unused.
        let size = 64 * 1024;
        backend.write_all(&vec![b'x'; size - 100]).await.unwrap();
        conn.read_size = size;
        let mut read = 0;
        while read < size - 100 {
            read += poll_fn(|cx| conn.poll_fill(cx)).await.unwrap();
        }
        assert_eq!(
            conn.dec.rbuf.capacity() - read,
            100,
            "one buffer took every read"
        );
        let frame = conn.dec.rbuf.split().freeze();
        // The upload before it: written out, every byte advanced past.
        conn.wbuf.put_slice(&vec![b'y'; size]);
        conn.wbuf.advance(size);

        conn.shrink();
        drop(frame);
        // Either buffer could get its whole allocation back if it still held it.
        assert!(
            !conn.dec.rbuf.try_reclaim(POOLED_READ_BUF + 1),
            "the pooled connection still holds the read buffer's allocation"
        );
        assert!(
            !conn.wbuf.try_reclaim(2 * MIN_READ + 1),
            "the pooled connection still holds the write buffer's allocation"
        );
    }
}
