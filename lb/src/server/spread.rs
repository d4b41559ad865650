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
use std::task::{Context, Poll, Waker};

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
    /// The waker left with the inbox by a poll that found it empty: until a send takes it
    /// (and the inbox then holds what was sent), polling again with the same waker need not
    /// leave it again.
    waiting: Option<Waker>,
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
            waiting: None,
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

    /// The next connection another worker moved here. Never ready once the inbox is closed.
    ///
    /// The accept loop polls this on every turn, for every connection it accepts itself, and
    /// moves are rare: a turn that finds the inbox empty, polled by the same task as the turn
    /// that left its waker there, is one look at the queue, without the task budget, the
    /// waker's exchange and a second look that a receive takes.
    pub fn poll_next(&mut self, cx: &mut Context<'_>, metrics: &Metrics) -> Poll<Placed> {
        if let Some(waker) = &self.waiting {
            if waker.will_wake(cx.waker()) && self.inbox.is_empty() {
                return Poll::Pending;
            }
        }
        self.waiting = None;
        loop {
            // A receive the spent budget turns away leaves no waker: it must not count as one.
            let budget = tokio::task::coop::has_budget_remaining();
            match self.inbox.poll_recv(cx) {
                Poll::Ready(Some(moved)) => {
                    if let Some(placed) = self.register(moved, metrics) {
                        return Poll::Ready(placed);
                    }
                }
                Poll::Ready(None) => return Poll::Pending,
                Poll::Pending => {
                    if budget {
                        self.waiting = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A loopback connection's accepted side, as a worker hands it over.
    fn moved(listener: &std::net::TcpListener) -> (Moved, std::net::TcpStream) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, addr) = listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        let slot = Slot {
            limit: None,
            load: None,
        };
        (Moved { stream, addr, slot }, client)
    }

    /// The inbox as the accept loop polls it, woken over and over for its own accepts (the
    /// ticks here): a connection moved in between is taken on the next wake-up, every time,
    /// also when the first poll came with the task's budget spent (and left no waker).
    #[tokio::test]
    async fn a_moved_connection_wakes_the_inbox_polled_between_other_wake_ups() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        for spent in [false, true] {
            let mut spreads = spread(2);
            let other = spreads.pop().unwrap();
            let mut mine = spreads.pop().unwrap();
            let (tick, mut ticks) = mpsc::unbounded_channel::<()>();
            let (placed, taken) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let (p, t) = (placed.clone(), taken.clone());
            let worker = tokio::spawn(async move {
                let metrics = Metrics::new();
                if spent {
                    while tokio::task::coop::has_budget_remaining() {
                        tokio::task::consume_budget().await;
                    }
                    let first =
                        std::future::poll_fn(|cx| Poll::Ready(mine.poll_next(cx, &metrics))).await;
                    assert!(first.is_pending());
                }
                let mut held = Vec::new();
                loop {
                    tokio::select! {
                        biased;
                        placed = std::future::poll_fn(|cx| mine.poll_next(cx, &metrics)) => {
                            held.push(placed);
                            p.fetch_add(1, Ordering::Relaxed);
                        }
                        tick = ticks.recv() => match tick {
                            Some(()) => _ = t.fetch_add(1, Ordering::Relaxed),
                            None => return held.len(),
                        },
                    };
                }
            });
            let mut clients = Vec::new();
            for round in 1..=3 {
                for _ in 0..3 {
                    tick.send(()).unwrap();
                }
                // The ticks are taken first: the inbox was polled empty on each wake-up.
                for _ in 0..1000 {
                    if taken.load(Ordering::Relaxed) == 3 * round {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                assert_eq!(taken.load(Ordering::Relaxed), 3 * round);
                let (m, client) = moved(&listener);
                clients.push(client);
                assert!(other.to[0].send(m).is_ok());
                for _ in 0..2000 {
                    if placed.load(Ordering::Relaxed) == round {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                assert_eq!(
                    placed.load(Ordering::Relaxed),
                    round,
                    "spent budget: {spent}"
                );
            }
            drop(tick);
            assert_eq!(worker.await.unwrap(), 3);
            assert_eq!(taken.load(Ordering::Relaxed), 9);
        }
    }
}
