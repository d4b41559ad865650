//! The proxy's listening sockets, one per worker.
//!
//! On Linux, with more than one worker, each worker binds its own socket to the address, all
//! of them in one `SO_REUSEPORT` group: the kernel hands each new connection to one socket's
//! queue and wakes that worker only. With one socket shared by every worker, each new
//! connection woke them all, for one to take it and the others to find nothing (a wake-up
//! and two system calls per worker and connection). Elsewhere the workers share one socket.
//!
//! A port another socket holds still fails the start: the address is first bound without
//! the option, which no socket already there lets pass, then let go and bound by the group.
//!
//! On Linux a connection is handed over once its first bytes have come (`TCP_DEFER_ACCEPT`):
//! one wake-up per new connection, where the handshake and then the request took one each.
//! Its first bytes are acknowledged with the answer, not by a segment of their own
//! (`TCP_QUICKACK` off on the listener). How much of a response the kernel holds unsent for
//! a client is bounded on the listener too (`TCP_NOTSENT_LOWAT`, which accepted sockets
//! inherit): see [`bound_unsent`].
//!
//! Knows nothing of what connections carry, nor of how workers run.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Connections each socket's queue holds before the kernel turns more away; the standard
/// library's 128 is short for a burst of new clients, or while the connection limit holds
/// accepting back.
const BACKLOG: u32 = 1024;

/// Whether an accepted socket has `TCP_NODELAY` from its listener. Linux copies it; other
/// systems get it set on each connection.
pub const NODELAY_INHERITED: bool = cfg!(target_os = "linux");

/// Binds the first socket (worker 0's) at `addr`, where a port of 0 picks one. With
/// `workers` over one, it starts the group the others join with [`another`]. Call it on
/// worker 0's runtime. `notsent_lowat`: see [`bound_unsent`].
pub fn bind(addr: SocketAddr, workers: usize, notsent_lowat: u32) -> io::Result<TcpListener> {
    let group = cfg!(target_os = "linux") && workers > 1;
    if !group {
        return socket(addr, false, notsent_lowat);
    }
    // Fails on a port any socket holds, one in another group included; the group's own
    // bind would pass where the holder set the option too. Bound, never listening: no
    // client can land in its queue and be reset when it goes.
    let probe = new_socket(addr)?;
    probe.bind(addr)?;
    let addr = probe.local_addr()?;
    drop(probe);
    socket(addr, true, notsent_lowat)
}

/// Another worker's socket for `first`'s address, registered with the current runtime (the
/// worker's, whose reactor then wakes only its thread). `first` is from [`bind`] with more
/// than one worker, with the same `notsent_lowat`.
pub fn another(first: &TcpListener, notsent_lowat: u32) -> io::Result<TcpListener> {
    if cfg!(target_os = "linux") {
        socket(first.local_addr()?, true, notsent_lowat)
    } else {
        let _ = notsent_lowat;
        use std::os::fd::AsFd;
        // The same socket: every worker waits on one queue, and the first free one accepts.
        let copy = std::net::TcpListener::from(first.as_fd().try_clone_to_owned()?);
        // Non-blocking already: the flag belongs to the socket, which the copies share.
        TcpListener::from_std(copy)
    }
}

fn socket(addr: SocketAddr, group: bool, notsent_lowat: u32) -> io::Result<TcpListener> {
    let socket = new_socket(addr)?;
    #[cfg(target_os = "linux")]
    if group {
        socket.set_reuseport(true)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = group;
    // Responses go out as soon as they are written, whatever is still unacknowledged. Where
    // accepted sockets do not inherit it, each connection sets it again.
    if NODELAY_INHERITED {
        socket.set_nodelay(true)?;
    }
    #[cfg(target_os = "linux")]
    defer_accept(&socket);
    #[cfg(target_os = "linux")]
    bound_unsent(&socket, notsent_lowat);
    #[cfg(not(target_os = "linux"))]
    let _ = notsent_lowat;
    socket.bind(addr)?;
    let listener = socket.listen(BACKLOG)?;
    // After `listen`, which resets the socket's acknowledgement state.
    #[cfg(target_os = "linux")]
    delay_first_ack(&listener);
    Ok(listener)
}

/// Seconds a connection may stay silent before it is accepted anyway (`TCP_DEFER_ACCEPT`).
#[cfg(target_os = "linux")]
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// The kernel queues a new connection for `accept` only once its first bytes have come (the
/// client speaks first in HTTP, TLS and the PROXY protocol), or after `DEFER_ACCEPT_SECS`
/// of silence. The worker is then woken once per connection, not once for the handshake
/// and again for the request, and its first read finds the bytes there.
///
/// Only an optimisation: a kernel that refuses it leaves the listener as it was.
#[cfg(target_os = "linux")]
fn defer_accept(socket: &TcpSocket) {
    if let Err(error) = crate::sockopt::set_tcp(socket, libc::TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECS) {
        // Each worker's listening socket asks again: one warning, every refusal counted.
        if crate::metrics::socket_option_refused(crate::metrics::SocketOption::DeferAccept) {
            tracing::warn!(%error, "TCP_DEFER_ACCEPT not set: each new connection wakes a worker twice");
        }
    }
}

/// Accepted sockets start in delayed-ACK mode (`TCP_QUICKACK` off, which Linux copies from
/// the listener): a new connection's request, or its TLS hello, is acknowledged by the
/// answer the lb sends a moment later, not first by a segment of its own. A fresh socket
/// otherwise acknowledges its first bytes at once, when the lb reads them: one segment
/// more per new connection, which both ends' kernels handle (HAProxy does the same in HTTP
/// mode). Where the answer takes longer, the kernel's delayed-ACK timer (40 ms at least)
/// sends the acknowledgement, and takes the socket out of the mode; a request body arriving
/// in full segments is acknowledged every second segment either way.
///
/// Only an optimisation: a kernel that refuses it leaves the listener as it was.
#[cfg(target_os = "linux")]
fn delay_first_ack(socket: &TcpListener) {
    if let Err(error) = crate::sockopt::set_tcp(socket, libc::TCP_QUICKACK, 0) {
        if crate::metrics::socket_option_refused(crate::metrics::SocketOption::QuickAck) {
            tracing::warn!(%error, "TCP_QUICKACK not cleared: each new connection's request is acknowledged by a segment of its own");
        }
    }
}

/// A client connection's socket takes no more of a response once it holds `notsent_lowat`
/// bytes not yet on their way (`TCP_NOTSENT_LOWAT`; the kernel checks before each piece it
/// copies, of up to 64 KiB on loopback). 0 leaves the system's `net.ipv4.tcp_notsent_lowat`,
/// unbounded by default. Bytes in flight do not count, so a fast client's window stays
/// full; what a client does not take yet waits in the backend's socket, not in megabytes
/// of the lb's send buffer.
///
/// Where the lb writes faster than its client reads, an unbounded queue also moves the lb's
/// sending to the client's side: each acknowledgement the client sends makes its kernel
/// transmit the lb's queued bytes, and on loopback run the receiving too (the 1 MiB
/// benchmark row, with the load's core the bottleneck: BENCHMARKS.md).
///
/// Only an optimisation: a kernel that refuses it leaves the listener as it was.
#[cfg(target_os = "linux")]
fn bound_unsent(socket: &TcpSocket, notsent_lowat: u32) {
    // The setting is at most `c_int::MAX`.
    let Ok(value @ 1..) = libc::c_int::try_from(notsent_lowat) else {
        return;
    };
    if let Err(error) = crate::sockopt::set_tcp(socket, libc::TCP_NOTSENT_LOWAT, value) {
        if crate::metrics::socket_option_refused(crate::metrics::SocketOption::NotsentLowat) {
            tracing::warn!(%error, "TCP_NOTSENT_LOWAT not set: a client's socket may hold megabytes of a response unsent");
        }
    }
}

fn new_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind`: a restart binds despite connections of the last run that are
    // still in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `TCP_NOTSENT_LOWAT` as an accepted socket has it.
    #[cfg(target_os = "linux")]
    fn notsent_lowat(socket: &impl std::os::fd::AsRawFd) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: an open socket, and an int with its length, both outliving the call.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        value
    }

    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_acknowledgements() {
        let first = bind("127.0.0.1:0".parse().unwrap(), 2, 65536).unwrap();
        let second = another(&first, 65536).unwrap();
        let addr = first.local_addr().unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        // Enough connections that both sockets of the group get some.
        let mut clients = Vec::new();
        for _ in 0..16 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Until every connection is accepted, from whichever socket's queue it is in.
        let give_up = tokio::time::sleep(std::time::Duration::from_secs(10));
        tokio::pin!(give_up);
        let mut accepted = 0;
        while accepted < clients.len() {
            let stream = tokio::select! {
                r = first.accept() => r.unwrap().0,
                r = second.accept() => r.unwrap().0,
                _ = &mut give_up => panic!("{accepted} of {} connections accepted", clients.len()),
            };
            if NODELAY_INHERITED {
                assert!(stream.nodelay().unwrap(), "TCP_NODELAY from the listener");
            }
            // Every accepted socket bounds what it holds unsent, from either listener.
            #[cfg(target_os = "linux")]
            assert_eq!(
                notsent_lowat(&stream),
                65536,
                "TCP_NOTSENT_LOWAT from the listener"
            );
            accepted += 1;
        }
    }

    /// A client that has connected but sent nothing is not handed to a worker yet; its first
    /// bytes bring it, with the bytes ready to read.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_connection_is_accepted_once_its_first_bytes_come() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // SYN cookies on every connection (2) skip the wait: nothing to check there.
        if std::fs::read_to_string("/proc/sys/net/ipv4/tcp_syncookies")
            .is_ok_and(|v| v.trim() == "2")
        {
            return;
        }
        let listener = bind("127.0.0.1:0".parse().unwrap(), 1, 0).unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        // Well inside the one second a silent connection is held back.
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(300), listener.accept()).await;
        assert!(early.is_err(), "accepted before the client sent anything");
        client.write_all(b"GET").await.unwrap();
        let (mut stream, _) =
            tokio::time::timeout(std::time::Duration::from_secs(5), listener.accept())
                .await
                .expect("accepted once bytes came")
                .unwrap();
        let mut first = [0; 3];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET");
    }

    #[tokio::test]
    async fn a_port_held_by_another_socket_fails_the_bind() {
        // Even one that joined a group of its own.
        let holder = bind("127.0.0.1:0".parse().unwrap(), 2, 0).unwrap();
        let addr = holder.local_addr().unwrap();
        for workers in [1, 2] {
            let e = bind(addr, workers, 0).expect_err("the port is taken");
            assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{workers} workers");
        }
    }
}
