//! TCP options that neither the standard library nor tokio sets (one checked `setsockopt`),
//! and the send-queue lengths the lb reads, which they do not expose (one checked `ioctl`).
//! Knows nothing of what the sockets carry or why an option or a length is wanted.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// Sets the TCP-level option `name` of `socket` to `value`: every TCP option the lb sets
/// takes an int.
pub fn set_tcp(socket: &impl AsRawFd, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: an open socket's descriptor, and an option value of the size the kernel reads,
    // which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the TCP-level option `name`, which the kernel reads in milliseconds, to `after`: at
/// least 1 ms, since 0 asks for the kernel's default.
pub fn set_tcp_ms(
    socket: &impl AsRawFd,
    name: libc::c_int,
    after: std::time::Duration,
) -> io::Result<()> {
    let ms = after.as_millis().clamp(1, libc::c_int::MAX as u128) as libc::c_int;
    set_tcp(socket, name, ms)
}

/// How many bytes written to `socket` its peer has not yet acknowledged, sent or not: the
/// send queue (`SIOCOUTQ`). Bytes the peer's kernel acknowledged are in the peer's hands;
/// when its application reads them no socket here can tell.
pub fn unacknowledged(socket: &impl AsRawFd) -> io::Result<usize> {
    // SIOCOUTQ and TIOCOUTQ are one request on Linux.
    send_queue(socket.as_raw_fd(), libc::TIOCOUTQ)
}

/// How many bytes written to the socket `fd` the kernel has not sent yet (`SIOCOUTQNSD`):
/// a peer that keeps up leaves next to none; bytes on the wire do not count.
pub fn unsent(fd: RawFd) -> io::Result<usize> {
    const SIOCOUTQNSD: libc::Ioctl = 0x894B;
    send_queue(fd, SIOCOUTQNSD)
}

/// One of the socket's send-queue lengths, by `ioctl` request.
fn send_queue(fd: RawFd, request: libc::Ioctl) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: an open socket's descriptor, and an int the kernel writes, which outlives the
    // call.
    let rc = unsafe { libc::ioctl(fd, request, &mut queued) };
    if rc == 0 {
        Ok(usize::try_from(queued).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}
