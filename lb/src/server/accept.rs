//! Accepting connections without spinning and within a limit: a failed accept (out of file
//! descriptors: EMFILE, ENFILE; ENOBUFS) backs off with jitter, counted and logged once per
//! streak, and accepting waits while the most client connections allowed are open (the
//! kernel's backlog holds the next ones meanwhile). Knows nothing of what a connection carries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_daemon::backoff::Backoff;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{ClientErrorKind, Metrics};

/// A listener's accept loop state.
pub struct Acceptor {
    listener: TcpListener,
    /// Which listener, for logs.
    name: &'static str,
    backoff: Backoff,
}

impl Acceptor {
    pub fn new(listener: TcpListener, name: &'static str) -> Acceptor {
        Acceptor {
            listener,
            name,
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_secs(1)),
        }
    }

    /// The next connection, with a slot of `slots` when given (held for the connection's life
    /// by its permit). Never fails: errors are waited out.
    pub async fn accept(
        &mut self,
        slots: Option<&Arc<Semaphore>>,
        metrics: &Metrics,
    ) -> (TcpStream, SocketAddr, Option<OwnedSemaphorePermit>) {
        let permit = match slots {
            None => None,
            Some(slots) => Some(match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    metrics.accept_paused.inc();
                    tracing::warn!(
                        listener = self.name,
                        "connection limit reached; accepting waits for a connection to end"
                    );
                    slots
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed")
                }
            }),
        };
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    if self.backoff.failing() {
                        tracing::info!(listener = self.name, "accepting again");
                        self.backoff.reset();
                    }
                    return (stream, addr, permit);
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
