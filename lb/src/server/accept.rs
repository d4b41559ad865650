//! Accepting connections without spinning and within a limit: a failed accept (out of file
//! descriptors: EMFILE, ENFILE; ENOBUFS) backs off with jitter, counted and logged once per
//! streak, and accepting waits while the most client connections allowed are open (the
//! kernel's backlog holds the next ones meanwhile). Knows nothing of what a connection carries.
//!
//! A place is taken once a connection is accepted, not while waiting for one: every worker
//! runs an accept loop per listener, and places held by loops waiting on a listener nobody
//! connects to would be missing from the one in use.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use switchyard_daemon::backoff::Backoff;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;

use crate::metrics::{ClientErrorKind, Metrics};
use crate::state::ConnectionSlots;

/// A listener's accept loop state.
pub struct Acceptor {
    listener: TcpListener,
    /// Which listener, for logs.
    name: &'static str,
    backoff: Backoff,
    /// A connection accepted just as another loop took the last place. It waits here for the
    /// next place rather than in the future of `accept`, which a `select!` may drop.
    unplaced: Option<(TcpStream, SocketAddr)>,
}

impl Acceptor {
    pub fn new(listener: TcpListener, name: &'static str) -> Acceptor {
        Acceptor {
            listener,
            name,
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_secs(1)),
            unplaced: None,
        }
    }

    /// The next connection, with a place of `slots` when given (held for the connection's
    /// life by its permit). Never fails: errors are waited out. Cancel-safe.
    pub async fn accept(
        &mut self,
        slots: Option<&ConnectionSlots>,
        metrics: &Metrics,
    ) -> (TcpStream, SocketAddr, Option<OwnedSemaphorePermit>) {
        let Some(slots) = slots else {
            let (stream, addr) = self.next(metrics).await;
            return (stream, addr, None);
        };
        if self.unplaced.is_none() {
            if slots.permits.available_permits() == 0 {
                Self::pause(slots, metrics);
                // Only until there is a place: it is taken once a connection comes.
                let place = slots.permits.acquire().await;
                drop(place.expect("the semaphore is never closed"));
            }
            self.unplaced = Some(self.next(metrics).await);
        }
        let permit = match slots.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                Self::pause(slots, metrics);
                let permit = slots.permits.clone().acquire_owned().await;
                permit.expect("the semaphore is never closed")
            }
        };
        // Places left after this one: the limit holds accepting back no more, and the next
        // time it does is a new pause. While every freed place is taken at once, it is one.
        if slots.permits.available_permits() > 0 && slots.full.load(Ordering::Relaxed) {
            slots.full.store(false, Ordering::Relaxed);
        }
        let (stream, addr) = self.unplaced.take().expect("accepted above");
        (stream, addr, Some(permit))
    }

    /// Counts and logs that the limit holds accepting back, once for all loops (whichever
    /// listener's loop comes first, so the log names none).
    fn pause(slots: &ConnectionSlots, metrics: &Metrics) {
        if !slots.full.swap(true, Ordering::Relaxed) {
            metrics.accept_paused.inc();
            tracing::warn!("connection limit reached; accepting waits for a connection to end");
        }
    }

    /// The next connection from the listener, errors waited out.
    async fn next(&mut self, metrics: &Metrics) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    if self.backoff.failing() {
                        tracing::info!(listener = self.name, "accepting again");
                        self.backoff.reset();
                    }
                    return (stream, addr);
                }
                Err(e) => {
                    metrics
                        .client_connection_errors
                        .inc(ClientErrorKind::Accept);
                    // Logged at the start of a streak; its end is logged above.
                    let first = !self.backoff.failing();
                    let delay = self.backoff.next_delay();
                    if first {
                        tracing::warn!(listener = self.name, error = %e, retry_in = ?delay, "accept failed; pausing");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}
