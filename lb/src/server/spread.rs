//! Spreading new connections over the workers: every worker accepts from its own listening
//! socket for the address ([`super::listen`]), and a connection accepted by a worker that
//! holds two or more more than the least loaded one is moved there ([`crate::worker::assign`])
//! before anything is read from it.
//!
//! Moves matter when connections come in a burst that one worker accepts in one go, which
//! would leave it with every long-lived connection of the burst. Under keep-alive traffic
//! they are rare; with a new connection per request about a quarter move, for two
//! `epoll_ctl` calls and a wake-up each, which measured as no cost (BENCHMARKS.md). Knows
//! nothing of what a connection carries.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::metrics::{ClientErrorKind, Metrics};
use crate::proxy::Slot;
use crate::worker;

/// A connection on its way to another worker: a socket no reactor watches until that worker
/// registers it with its own.
struct Moved {
    stream: std::net::TcpStream,
    addr: SocketAddr,
    slot: Slot,
}

/// One listener's side of the spreading, for one worker: its inbox, and every worker's.
pub struct Spread {
    me: usize,
    inbox: mpsc::UnboundedReceiver<Moved>,
    to: Arc<[mpsc::UnboundedSender<Moved>]>,
}

/// One [`Spread`] per worker, for one listener.
pub fn spread(workers: usize) -> Vec<Spread> {
    let (to, inboxes): (Vec<_>, Vec<_>) = (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
    let to: Arc<[_]> = to.into();
    inboxes
        .into_iter()
        .enumerate()
        .map(|(me, inbox)| Spread {
            me,
            inbox,
            to: to.clone(),
        })
        .collect()
}

/// A connection to serve, with what it holds for its life.
pub type Placed = (TcpStream, SocketAddr, Slot);

impl Spread {
    /// Places a connection this worker accepted: `Some` to serve it here, `None` when it was
    /// moved to another worker (or lost in the move, counted as an accept error).
    pub fn place(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
        limit: Option<OwnedSemaphorePermit>,
        metrics: &Metrics,
    ) -> Option<Placed> {
        let load = worker::assign(self.me);
        let to = load.worker();
        let slot = Slot {
            limit,
            load: Some(load),
        };
        if to == self.me {
            return Some((stream, addr, slot));
        }
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                metrics
                    .client_connection_errors
                    .inc(ClientErrorKind::Accept);
                tracing::warn!(error = %e, "a new connection could not be moved to another worker; closed");
                return None;
            }
        };
        match self.to[to].send(Moved { stream, addr, slot }) {
            Ok(()) => None,
            // That worker's drain has begun and closed its inbox: this one serves it.
            Err(mpsc::error::SendError(m)) => self.register(m, metrics),
        }
    }

    /// The next connection another worker moved here. Never ends: this worker's own sender
    /// lives as long as it does.
    pub async fn next(&mut self, metrics: &Metrics) -> Placed {
        loop {
            let Some(moved) = self.inbox.recv().await else {
                return std::future::pending().await;
            };
            if let Some(placed) = self.register(moved, metrics) {
                return placed;
            }
        }
    }

    /// Closes the inbox, so that moves to this worker fail from now on, and returns the
    /// connections already in it. Called when the worker stops accepting.
    pub fn close(&mut self, metrics: &Metrics) -> Vec<Placed> {
        self.inbox.close();
        let mut placed = Vec::new();
        while let Ok(moved) = self.inbox.try_recv() {
            placed.extend(self.register(moved, metrics));
        }
        placed
    }

    /// Registers a moved socket with this worker's reactor.
    fn register(&self, m: Moved, metrics: &Metrics) -> Option<Placed> {
        match TcpStream::from_std(m.stream) {
            Ok(stream) => Some((stream, m.addr, m.slot)),
            Err(e) => {
                metrics
                    .client_connection_errors
                    .inc(ClientErrorKind::Accept);
                tracing::warn!(error = %e, "a connection moved from another worker could not be registered; closed");
                None
            }
        }
    }
}
