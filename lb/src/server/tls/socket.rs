//! The socket under a TLS connection. It gives the handshake back the bytes read before it
//! (the look at whether the client speaks TLS at all), and it holds what the handshake writes
//! until the lb has to wait for the client: each flight leaves in one write, and the session
//! ticket written as the handshake ends leaves with the first response instead of in a
//! segment of its own, which cost the client a wake-up and a read on every connection.
//!
//! It knows sockets and bytes only: nothing of TLS records, HTTP or routing. The TLS layer
//! above decides nothing here; `Tls::accept` says when the handshake is over.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub struct TlsIo {
    inner: TcpStream,
    /// Read before the handshake began; the first reads return it.
    prefix: Vec<u8>,
    prefix_at: usize,
    /// Written and not yet sent.
    held: Vec<u8>,
    held_at: usize,
    /// Until the handshake is over, writes are held, and go out when a read finds nothing to
    /// read: the handshake waits for the client, which must have its flight. What the
    /// handshake left (the TLS 1.3 session ticket) goes out with the next write or at
    /// shutdown, never on a flush alone: hyper flushes, and reads to watch for the client
    /// leaving, while the request is with the upstream, and the ticket would leave alone.
    holding: bool,
}

impl TlsIo {
    pub fn new(inner: TcpStream, prefix: Vec<u8>) -> TlsIo {
        TlsIo {
            inner,
            prefix,
            prefix_at: 0,
            held: Vec::new(),
            held_at: 0,
            holding: true,
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }

    /// The handshake is over: writes go out, and what is still held leaves with the next
    /// one. The caller sends it at once if the client needs it to go on (TLS 1.2's last
    /// flight); a TLS 1.3 client needs nothing after the server's Finished.
    pub fn handshake_done(&mut self) {
        self.holding = false;
        // The buffer held whole flights, certificates included; a ticket is a few hundred
        // bytes, and a client may wait long before its first request.
        self.held = self.held.split_off(self.held_at);
        self.held.shrink_to_fit();
        self.held_at = 0;
    }

    /// Sends what is held; for a handshake that failed, its alert.
    pub fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.held_at < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.held_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held_at += n;
        }
        self.sent_held();
        Poll::Ready(Ok(()))
    }

    fn sent_held(&mut self) {
        self.held_at = 0;
        if self.holding {
            self.held.clear();
        } else {
            // Nothing is held after the handshake: the buffer goes with it.
            self.held = Vec::new();
        }
    }

    fn hold(&mut self, bufs: &[IoSlice<'_>]) -> usize {
        let mut n = 0;
        for b in bufs {
            self.held.extend_from_slice(b);
            n += b.len();
        }
        n
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix_at < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.prefix_at);
            buf.put_slice(&this.prefix[this.prefix_at..this.prefix_at + n]);
            this.prefix_at += n;
            if this.prefix_at == this.prefix.len() {
                this.prefix = Vec::new();
                this.prefix_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending if this.holding && this.held_at < this.held.len() => {
                // The handshake waits for the client: it must have the flight written for
                // it. A write that cannot finish now registers for the socket's room.
                match this.poll_send_held(cx) {
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    _ => Poll::Pending,
                }
            }
            other => other,
        }
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.holding {
            return Poll::Ready(Ok(this.hold(bufs)));
        }
        while this.held_at < this.held.len() {
            // The held bytes first, in the same system call as the caller's.
            let before = this.held.len() - this.held_at;
            let mut iov = [IoSlice::new(&[]); 8];
            iov[0] = IoSlice::new(&this.held[this.held_at..]);
            let k = 1 + bufs.len().min(iov.len() - 1);
            iov[1..k].copy_from_slice(&bufs[..k - 1]);
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &iov[..k]))?;
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            if n < before {
                this.held_at += n;
                continue;
            }
            this.sent_held();
            if n > before {
                return Poll::Ready(Ok(n - before));
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing held goes on a flush (see `holding`).
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (s, c)
    }

    #[tokio::test]
    async fn the_prefix_is_read_first_then_the_socket() {
        let (s, mut c) = pair().await;
        let mut io = TlsIo::new(s, b"abc".to_vec());
        c.write_all(b"def").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 6 {
            let mut b = [0u8; 2];
            let n = io.read(&mut b).await.unwrap();
            got.extend_from_slice(&b[..n]);
        }
        assert_eq!(got, b"abcdef");
        assert!(io.prefix.capacity() == 0, "the prefix is freed once read");
    }

    #[tokio::test]
    async fn held_bytes_leave_when_the_reader_waits_and_with_the_first_write_after() {
        let (s, mut c) = pair().await;
        let mut io = TlsIo::new(s, Vec::new());
        io.write_all(b"flight").await.unwrap();
        io.flush().await.unwrap();
        // A flush sends nothing held.
        let mut b = [0u8; 16];
        assert!(c.try_read(&mut b).is_err(), "held bytes left on a flush");
        // Waiting for the client sends them.
        let read = tokio::time::timeout(std::time::Duration::from_millis(50), io.read(&mut b));
        assert!(read.await.is_err());
        let n = c.read(&mut b).await.unwrap();
        assert_eq!(&b[..n], b"flight");

        // After the handshake: the ticket waits for the response and leaves with it.
        io.write_all(b"ticket").await.unwrap();
        io.handshake_done();
        io.flush().await.unwrap();
        // Nor a read that waits, after the handshake.
        let read = tokio::time::timeout(std::time::Duration::from_millis(20), io.read(&mut b));
        assert!(read.await.is_err());
        assert!(c.try_read(&mut b).is_err(), "the ticket left alone");
        io.write_all(b"+response").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 15 {
            let n = c.read(&mut b).await.unwrap();
            got.extend_from_slice(&b[..n]);
        }
        assert_eq!(got, b"ticket+response");
        assert_eq!(
            io.held.capacity(),
            0,
            "the held buffer is freed after the handshake"
        );
    }
}
