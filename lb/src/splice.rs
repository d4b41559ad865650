//! Moving bytes from one socket to another through a pipe, without copying them into user
//! space (`splice(2)`, Linux), and the placeholder frames that stand for them on the way.
//!
//! Bytes moved with `splice` are in a pipe, not in memory, yet may have to pass through code
//! that deals in buffers and counts their lengths. They pass as a placeholder: a slice of
//! [`PLACEHOLDER`] as long as the bytes it stands for. The writer that finds such a slice at
//! the front of what it is asked to write moves that many bytes out of the pipe instead.
//! Bytes leave the pipe in the order they entered it, and placeholders reach the writer in
//! the order they were made, so each placeholder's bytes are the pipe's next ones. The pipe
//! holds at most one fill at a time (see [`BodyPipe::fill_from`]). Whatever carries the
//! placeholders must pass them on as they are, never copy their bytes: a copy is zeros.
//!
//! Knows nothing of the protocol the bytes belong to, of which socket is whose, or of when
//! splicing pays: the callers decide.

use std::cell::RefCell;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;

/// The most bytes a pipe holds, and so the largest placeholder: the size each pipe is given
/// (`F_SETPIPE_SZ`; the system's default is 64 KiB). A pipe counts its room in pages, one
/// page at least for each piece of a socket's queue, so a fill may stop short of it.
pub const PIPE_SIZE: usize = 256 * 1024;

/// What placeholders are cut from. Its address is the mark: no real buffer lies inside a
/// static of the program. Nobody reads it: its 256 KiB of the binary's read-only data are
/// never paged in.
static PLACEHOLDER: [u8; PIPE_SIZE] = [0; PIPE_SIZE];

/// Pipes kept per thread for the next body, empty; more are closed.
const POOLED: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// The pipes open in the process, pooled or in use.
static OPEN: Budget = Budget::new();

/// A count of open things held to a most.
struct Budget(AtomicUsize);

impl Budget {
    const fn new() -> Budget {
        Budget(AtomicUsize::new(0))
    }

    /// Counts one more, unless `max` are open.
    fn take(&self, max: usize) -> bool {
        let more = |n: usize| (n < max).then_some(n + 1);
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, more)
            .is_ok()
    }

    fn give(&self) {
        let was = self.0.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(was > 0, "a place given back that was never taken");
    }

    fn open(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// The most pipes open at once: a sixteenth of the soft descriptor limit, two descriptors
/// each, so an eighth of the descriptors. The connection limit (`LB_MAX_CONNECTIONS=auto`,
/// three quarters) leaves the rest to backends, Consul and files; without this, bodies
/// spliced at once could take it all and leave the lb unable to accept or connect. Read
/// once.
fn max_pipes() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| crate::rlimit::descriptors().map_or(4096, |n| (n / 16).max(1)))
}

/// A frame standing for the next `n` bytes of the pipe (`n` at most [`PIPE_SIZE`]).
pub fn placeholder(n: usize) -> Bytes {
    Bytes::from_static(&PLACEHOLDER[..n])
}

/// Whether `s` stands for piped bytes. An empty slice never does.
#[inline]
pub fn is_placeholder(s: &[u8]) -> bool {
    let from_base = (s.as_ptr() as usize).wrapping_sub(PLACEHOLDER.as_ptr() as usize);
    from_base < PIPE_SIZE && !s.is_empty()
}

/// What the front of a vectored write holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Front {
    /// This many bytes, in placeholders, before any plain slice.
    Piped(usize),
    /// This many plain slices before the first placeholder (all of them when there is none).
    Plain(usize),
}

/// Looks at the slices of a vectored write: placeholders and plain bytes go in separate
/// system calls, in order.
pub fn front(bufs: &[io::IoSlice<'_>]) -> Front {
    let Some(first) = bufs.iter().position(|b| is_placeholder(b)) else {
        return Front::Plain(bufs.len());
    };
    if bufs[..first].iter().any(|b| !b.is_empty()) {
        return Front::Plain(first);
    }
    let piped = bufs[first..].iter().take_while(|b| is_placeholder(b));
    Front::Piped(piped.map(|b| b.len()).sum())
}

/// A pipe, both ends non-blocking.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// From this thread's pool, or a new one of [`PIPE_SIZE`]. Fails when [`max_pipes`] are
    /// open, when the system has no descriptor, or when it refuses the size: past
    /// `fs.pipe-max-size`, or once the user's pipes hold more pages than
    /// `fs.pipe-user-pages-soft` allows (each of these takes 64).
    fn take() -> io::Result<Pipe> {
        // `try_with`: a connection may end while its thread is being torn down.
        if let Ok(Some(p)) = POOL.try_with(|pool| pool.borrow_mut().pop()) {
            return Ok(p);
        }
        let max = max_pipes();
        if !OPEN.take(max) {
            return Err(io::Error::other(format!(
                "{max} pipes are open, an eighth of the descriptor limit's worth"
            )));
        }
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is two ints, which the kernel fills on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            OPEN.give();
            return Err(io::Error::last_os_error());
        }
        // SAFETY: two new descriptors, owned by nothing else. From here the pipe's drop
        // gives its place in `OPEN` back.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // SAFETY: a pipe's descriptor; the size is an int argument.
        let size = unsafe {
            libc::fcntl(
                pipe.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(pipe)
    }

    /// Back to this thread's pool, if it is empty, the pool has room and half the budget is
    /// free; closed otherwise.
    fn give_back(self) {
        let mut queued: libc::c_int = 0;
        // SAFETY: a pipe's descriptor, and an int the kernel writes.
        let rc = unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut queued) };
        if rc != 0 || queued != 0 {
            // Bytes of one body must never reach another's client.
            return;
        }
        // Only while half the budget is free: pools never shrink, and a pipe idle in one
        // worker's pool would otherwise count against the others' bodies for good.
        if OPEN.open() > max_pipes() / 2 {
            return;
        }
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOLED {
                pool.push(self);
            }
        });
    }
}

impl Drop for Pipe {
    /// Its descriptors close (`OwnedFd`): one place more for a pipe.
    fn drop(&mut self) {
        OPEN.give();
    }
}

/// A pipe between two sockets that one task fills from one and drains into the other, taken
/// from the thread's pool when first needed and given back by `release`. The task is the only
/// user, so the atomics here never race; they are atomics because the state that holds this
/// must be `Sync`.
#[derive(Debug, Default)]
pub struct BodyPipe {
    /// The read and write ends, `read << 32 | write`; 0 while there is no pipe.
    fds: AtomicU64,
    /// Bytes filled in and not drained yet.
    held: AtomicU32,
    /// A fill waits for the pipe to empty: the drain that empties it wakes the task.
    waiting: AtomicBool,
    /// No pipe was to be had ([`REFUSED`], or [`REFUSAL_SEEN`]): not asked again until
    /// `release`, so that each read does not try and fail anew.
    refused: AtomicU8,
    /// The bytes in progress are to go through the pipe: the user's own mark, kept here
    /// for it.
    armed: AtomicBool,
}

/// `BodyPipe::refused`: no pipe was to be had, not counted yet.
const REFUSED: u8 = 1;
/// `BodyPipe::refused`: a refusal `take_refusal` has reported.
const REFUSAL_SEEN: u8 = 2;

/// `BodyPipe::fds` for a pipe's read and write ends.
fn pack(read: RawFd, write: RawFd) -> u64 {
    (read as u32 as u64) << 32 | write as u32 as u64
}

/// A pipe's read and write ends from `BodyPipe::fds`.
fn unpack(fds: u64) -> (RawFd, RawFd) {
    ((fds >> 32) as RawFd, fds as u32 as RawFd)
}

impl BodyPipe {
    fn ends(&self) -> Option<(RawFd, RawFd)> {
        let fds = self.fds.load(Ordering::Relaxed);
        (fds != 0).then_some(unpack(fds))
    }

    /// Whether a pipe is ready for a fill, taking one if there is none: `false` when none is
    /// to be had, past [`max_pipes`] or refused by the system (warned once per process), and
    /// the bytes must be copied instead.
    pub fn ready(&self) -> bool {
        if self.ends().is_some() {
            return true;
        }
        if self.refused.load(Ordering::Relaxed) != 0 {
            return false;
        }
        match Pipe::take() {
            Ok(pipe) => {
                // Open until `release` makes a `Pipe` of them again.
                let pipe = ManuallyDrop::new(pipe);
                let fds = pack(pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
                self.fds.store(fds, Ordering::Relaxed);
                true
            }
            Err(error) => {
                self.refused.store(REFUSED, Ordering::Relaxed);
                static WARNED: AtomicBool = AtomicBool::new(false);
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "no pipe to splice through: copying instead");
                }
                false
            }
        }
    }

    /// Whether no pipe was to be had since this was last asked: once per refusal, for
    /// the caller to count.
    pub fn take_refusal(&self) -> bool {
        let refused = self.refused.load(Ordering::Relaxed) == REFUSED;
        if refused {
            self.refused.store(REFUSAL_SEEN, Ordering::Relaxed);
        }
        refused
    }

    /// Marks whether the bytes in progress go through the pipe.
    pub fn arm(&self, armed: bool) {
        self.armed.store(armed, Ordering::Relaxed);
    }

    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    /// Bytes in the pipe that no write has taken yet.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed) as usize
    }

    /// A fill waits for the pipe to be drained: the drain that empties it says so.
    pub fn wait_for_room(&self) {
        self.waiting.store(true, Ordering::Relaxed);
    }

    /// Moves up to `max` bytes (at most [`PIPE_SIZE`]) from the socket `from` into the pipe,
    /// which must be [`ready`](Self::ready) and empty: with nothing in the pipe, `WouldBlock`
    /// can only mean the socket has nothing to read, never that the pipe is full. `Ok(0)`:
    /// the socket's peer closed it.
    pub fn fill_from(&self, from: RawFd, max: usize) -> io::Result<usize> {
        let Some((_, write)) = self.ends() else {
            return Err(io::Error::other("no pipe to splice into"));
        };
        if self.held() != 0 {
            // Its EAGAIN could then mean a full pipe, taken for an empty socket.
            return Err(io::Error::other("a fill of a pipe that is not empty"));
        }
        let n = splice(from, write, max.min(PIPE_SIZE))?;
        self.held.store(n as u32, Ordering::Relaxed);
        Ok(n)
    }

    /// Moves up to `max` of the bytes the pipe holds into the socket `to`. The writer calls
    /// it for placeholders only, which stand for bytes in the pipe: finding none is a broken
    /// promise, failed rather than written around. Returns the bytes moved and whether a
    /// fill waits for the task to be woken (the pipe is empty now).
    pub fn drain_to(&self, to: RawFd, max: usize) -> io::Result<(usize, bool)> {
        let held = self.held();
        let Some((read, _)) = self.ends().filter(|_| held > 0) else {
            return Err(io::Error::other(
                "a spliced body's bytes are missing from its pipe",
            ));
        };
        let n = splice(read, to, max.min(held))?;
        let left = held - n;
        self.held.store(left as u32, Ordering::Relaxed);
        let wake = left == 0 && self.waiting.swap(false, Ordering::Relaxed);
        Ok((n, wake))
    }

    /// Lets go of the pipe until it is needed again: back to the thread's pool when empty,
    /// closed otherwise. A refusal is forgotten: the next need asks again.
    pub fn release(&self) {
        self.refused.store(0, Ordering::Relaxed);
        let fds = self.fds.swap(0, Ordering::Relaxed);
        if fds == 0 {
            return;
        }
        let held = self.held.swap(0, Ordering::Relaxed);
        self.waiting.store(false, Ordering::Relaxed);
        let (read, write) = unpack(fds);
        // SAFETY: the two descriptors `ready` took ownership of, which nothing else closes.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(read),
                write: OwnedFd::from_raw_fd(write),
            }
        };
        if held == 0 {
            pipe.give_back();
        }
    }
}

impl Drop for BodyPipe {
    fn drop(&mut self) {
        self.release();
    }
}

/// One non-blocking `splice` between two descriptors, one of them a pipe.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: open descriptors; no offsets (neither end is seekable).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// The tests that open pipes, one at a time: `OPEN` is the process's.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn placeholders_are_told_from_plain_bytes() {
        let p = placeholder(10);
        let plain = vec![0u8; 10];
        assert!(is_placeholder(&p));
        assert!(is_placeholder(&placeholder(PIPE_SIZE)[PIPE_SIZE - 1..]));
        assert!(!is_placeholder(&plain));
        assert!(!is_placeholder(&placeholder(0)));
        let (a, b) = (placeholder(3), placeholder(4));
        let bufs = |v: &[&[u8]]| front(&v.iter().map(|b| io::IoSlice::new(b)).collect::<Vec<_>>());
        assert_eq!(bufs(&[&plain, &a]), Front::Plain(1));
        assert_eq!(bufs(&[&a, &b, &plain]), Front::Piped(7));
        assert_eq!(bufs(&[&plain, &plain]), Front::Plain(2));
        assert_eq!(bufs(&[&[], &a]), Front::Piped(3));
        assert_eq!(bufs(&[]), Front::Plain(0));
    }

    /// Bytes go from one socket to another through the pipe unchanged, and the pipe goes
    /// back to the pool only when empty.
    #[test]
    fn bytes_pass_through_the_pipe_in_order() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut src = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (from, _) = l.accept().unwrap();
        let to = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut dst, _) = l.accept().unwrap();
        from.set_nonblocking(true).unwrap();
        to.set_nonblocking(true).unwrap();
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        src.write_all(&body).unwrap();
        drop(src);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            dst.read_to_end(&mut got).unwrap();
            got
        });
        let pipe = BodyPipe::default();
        let retry = |e: &io::Error| {
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        loop {
            assert!(pipe.ready());
            let n = match pipe.fill_from(from.as_raw_fd(), 40_000) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    retry(&e);
                    continue;
                }
            };
            assert_eq!(pipe.held(), n);
            pipe.wait_for_room();
            let mut out = 0;
            while out < n {
                match pipe.drain_to(to.as_raw_fd(), n - out) {
                    Ok((m, wake)) => {
                        out += m;
                        assert_eq!(wake, out == n);
                    }
                    Err(e) => retry(&e),
                }
            }
        }
        let err = pipe.drain_to(to.as_raw_fd(), 1).unwrap_err();
        assert!(err.to_string().contains("missing"));
        drop(to);
        assert_eq!(reader.join().unwrap(), body);
        pipe.release();
        assert_eq!(POOL.with(|p| p.borrow().len()), 1);
    }

    #[test]
    fn the_budget_holds_open_pipes_to_its_most() {
        let b = Budget::new();
        assert!(b.take(2) && b.take(2));
        assert!(!b.take(2), "a third past a most of two");
        b.give();
        assert!(b.take(2));
    }

    /// Every pipe opened is counted until it closes: in use, pooled, and when its thread's
    /// pool goes with the thread.
    #[test]
    fn open_pipes_are_counted_until_they_close() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let start = OPEN.open();
        std::thread::spawn(move || {
            let (a, b) = (BodyPipe::default(), BodyPipe::default());
            assert!(a.ready() && b.ready());
            assert_eq!(OPEN.open(), start + 2);
            // Released empty: pooled, still open; taken again from the pool.
            a.release();
            assert_eq!(OPEN.open(), start + 2);
            assert!(a.ready());
            assert_eq!(OPEN.open(), start + 2);
            drop(a);
            drop(b);
            assert_eq!(OPEN.open(), start + 2, "both pooled");
        })
        .join()
        .unwrap();
        assert_eq!(OPEN.open(), start, "the thread's pool closed with it");
    }
}
