//! Clocks and timers for every layer: a cheap monotonic millisecond clock for the request
//! path, the wall clock (shared with the registrar), and a timer for deadlines that move on far
//! more often than they pass. Knows nothing of what the times are for.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

pub use switchyard_daemon::clock::unix_ms;

/// A timer for deadlines that move on far more often than they pass: the time left for the
/// next request head on a busy keep-alive connection, or for the next response on a pooled
/// upstream connection.
///
/// Made on first use and kept for its owner's life. Moving a tokio timer to each new
/// deadline costs two timer-wheel updates; this one is moved only when it would fire late,
/// or when it fires early (set for a deadline that has since moved on). When deadlines move
/// later with every request, most polls touch no timer-wheel entry.
#[derive(Default)]
pub struct LazyTimer(Option<Pin<Box<Sleep>>>);

impl LazyTimer {
    /// Ready once `deadline` has passed; until then the task is woken by it at the latest.
    pub fn poll_until(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let timer = self
            .0
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

/// Milliseconds on a process-wide monotonic clock; cheap enough for the request path.
pub fn now_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}
