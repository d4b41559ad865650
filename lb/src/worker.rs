//! Which worker the running thread is, and how many connections each worker holds: the lb
//! runs one single-threaded runtime per worker thread, and state that must stay with one
//! runtime (an idle upstream socket is registered with the reactor of the runtime that made
//! it) is kept per worker under this index.
//!
//! Knows nothing of what is kept per worker, nor of how the threads are started or how a
//! connection moves between them. Keeps worker 0's runtime handle, for what every worker
//! shares.

use std::cell::Cell;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// One counter per worker of the client connections it holds. Made once, at start, before
/// any per-worker state; until then (and in unit tests) there is one worker.
static LOAD: OnceLock<Box<[Load]>> = OnceLock::new();

/// A worker's open connections, alone on its cache line: each connection's start and end
/// writes it.
#[derive(Default)]
#[repr(align(64))]
struct Load(AtomicUsize);

thread_local! {
    /// This thread's worker; 0 for the main thread and any thread that is not a worker.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Worker 0's runtime, which outlives the others': what all workers share and must not
/// end with one of them runs there.
static FIRST: OnceLock<tokio::runtime::Handle> = OnceLock::new();

/// Sets the number of workers, once: later calls keep the first count. Call it on worker
/// 0's runtime, before the first backend is made.
pub fn set_count(n: usize) {
    LOAD.get_or_init(|| (0..n.max(1)).map(|_| Load::default()).collect());
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        FIRST.get_or_init(|| handle);
    }
}

/// Worker 0's runtime, once [`set_count`] has run on it.
pub fn first() -> Option<&'static tokio::runtime::Handle> {
    FIRST.get()
}

/// The number of workers.
pub fn count() -> usize {
    LOAD.get().map_or(1, |l| l.len())
}

/// Marks the calling thread as worker `i`.
pub fn enter(i: usize) {
    INDEX.with(|c| c.set(i));
}

/// The calling thread's worker, always below [`count`].
pub fn index() -> usize {
    INDEX.with(Cell::get).min(count() - 1)
}

/// A connection's place in its worker's count, given back when dropped. Holds the worker's
/// index plus one, so that an `Option` of it takes no more room (every `Peer` holds one).
#[derive(Debug)]
pub struct Assigned(NonZeroU32);

impl Assigned {
    fn new(worker: usize) -> Assigned {
        // Workers are at most 1,024 (`LB_WORKERS`).
        Assigned(NonZeroU32::MIN.saturating_add(worker as u32))
    }

    /// The worker that is to serve the connection.
    pub fn worker(&self) -> usize {
        self.0.get() as usize - 1
    }
}

impl Drop for Assigned {
    fn drop(&mut self) {
        if let Some(load) = LOAD.get() {
            load[self.worker()].0.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Picks the worker for a connection that worker `accepted_by` accepted: that one, unless it
/// holds two or more connections more than the least loaded worker, which then gets it.
/// The slack of one keeps balanced workers from handing connections back and forth: moving
/// one costs two `epoll_ctl` calls and a wake-up of the other thread.
pub fn assign(accepted_by: usize) -> Assigned {
    let Some(load) = LOAD.get() else {
        return Assigned::new(0);
    };
    let to = pick(
        accepted_by.min(load.len() - 1),
        load.iter().map(|l| l.0.load(Ordering::Relaxed)),
    );
    load[to].0.fetch_add(1, Ordering::Relaxed);
    Assigned::new(to)
}

/// [`assign`]'s choice, given each worker's connections.
fn pick(me: usize, loads: impl Iterator<Item = usize> + Clone) -> usize {
    let mine = loads.clone().nth(me).unwrap_or(0);
    match loads.enumerate().min_by_key(|&(_, n)| n) {
        Some((least, fewest)) if mine > fewest + 1 => least,
        _ => me,
    }
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn a_connection_moves_only_to_a_worker_with_two_fewer() {
        let at = |me, loads: &[usize]| pick(me, loads.iter().copied());
        assert_eq!(at(0, &[0]), 0, "one worker keeps everything");
        assert_eq!(at(0, &[0, 0]), 0);
        assert_eq!(at(0, &[1, 0]), 0, "one more is within the slack");
        assert_eq!(at(0, &[2, 0]), 1, "two more move it");
        assert_eq!(at(1, &[0, 5, 3]), 0, "to the least loaded");
        assert_eq!(at(2, &[4, 4, 5]), 2);
        assert_eq!(at(2, &[7, 4, 6]), 1);
    }
}
