//! Clocks and timers for every layer: a cheap monotonic millisecond clock for the request
//! path, the wall clock (shared with the registrar) and its UTC rendering, and a timer for
//! deadlines that move on far more often than they pass. Knows nothing of what the times are
//! for.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

pub use switchyard_daemon::clock::{unix_ms, unix_us};

/// `2026-11-24T20:59:46Z` for Unix seconds.
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days (the inverse of the TLS code's days_from_civil).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

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

/// Milliseconds on the system's monotonic clock, never 0; cheap enough for the request path,
/// which reads it a few times a request (picking a backend, taking a pooled connection,
/// giving it back; more for HTTP/2 streams and tunnels).
///
/// The coarse clock: the time of the kernel's last tick (4 ms here, 10 ms on some kernels),
/// read from memory the kernel shares, with no clock read of its own, as nginx and HAProxy
/// read the time once per turn of their event loop; and no subtraction from a process start,
/// which `Instant::elapsed` needs (callgrind: about 160 user-space instructions a request
/// fewer). Every use is a span of many ticks (ejections, idle pooled connections, body and
/// write timeouts), where one tick does not matter; latencies are measured with `Instant`.
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; this clock cannot fail on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(2_524_607_999), "2049-12-31T23:59:59Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
    }

    /// The coarse clock keeps pace with the precise one, within a few ticks either way.
    #[test]
    fn now_ms_keeps_pace() {
        let (t0, m0) = (std::time::Instant::now(), now_ms());
        assert_ne!(m0, 0);
        std::thread::sleep(std::time::Duration::from_millis(60));
        let (precise, coarse) = (t0.elapsed().as_millis() as u64, now_ms() - m0);
        // Generous: a busy machine may hold the thread between the paired reads.
        assert!(
            coarse + 40 >= precise && coarse <= precise + 40,
            "{coarse} vs {precise} ms"
        );
    }
}
