//! Where parked connections wait for their next request: one task per plain listener holds
//! them all, each as a small entry (its socket, what its owner carries, an idle timer) with no
//! task of its own. When a socket turns readable (bytes, or the client's FIN or reset) its
//! connection is handed back to be served on a task of its own again; when the idle timeout
//! passes first, it is closed; when the drain begins, every parked connection is closed at
//! once.
//!
//! Why not let each connection's task wait: a tokio task is allocated 128-byte aligned and
//! sized for the largest state its connection ever reaches (1,280 bytes for a plain
//! HTTP/1.1 connection). An entry here (184 bytes, and its node in the set) is about a fifth
//! of that, and idle keep-alive clients are most of the clients an edge holds.
//!
//! Knows nothing of what a connection speaks: what it carries is its owner's.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use prometheus::IntGauge;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Sleep;

use crate::metrics::Held;

/// The way into a lot: parks connections.
pub struct Lot<C> {
    tx: mpsc::UnboundedSender<Arrival<C>>,
    parked: IntGauge,
}

/// A connection on its way into the lot, counted from here until it leaves, whichever way.
type Arrival<C> = (TcpStream, C, Held);

/// The lot's waiting side, run by [`Waiting::run`].
pub struct Waiting<C> {
    rx: mpsc::UnboundedReceiver<Arrival<C>>,
}

/// A lot: connections parked in `Lot` wait in `Waiting`'s task. `parked` counts them.
pub fn lot<C>(parked: IntGauge) -> (Lot<C>, Waiting<C>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Lot { tx, parked }, Waiting { rx })
}

impl<C> Lot<C> {
    /// Parks `stream` until it turns readable (then it is resumed with `carry`), the idle
    /// timeout passes or the drain begins (then both are dropped, which closes the socket).
    /// The last read on `stream` must have found it empty: readiness is waited for, not data.
    pub fn park(&self, stream: TcpStream, carry: C) {
        // Once the lot's task has ended (the drain began), the send fails and the connection
        // is dropped here, closed like the parked ones.
        let _ = self.tx.send((stream, carry, Held::new(&self.parked)));
    }
}

impl<C: Send + 'static> Waiting<C> {
    /// Holds parked connections until `stop` flips: each is handed to `resume` when its
    /// socket turns readable (a FIN or a reset included), or dropped after `idle` without.
    pub async fn run(
        mut self,
        idle: Duration,
        mut stop: watch::Receiver<bool>,
        resume: impl Fn(TcpStream, C),
    ) {
        let mut waiting = FuturesUnordered::new();
        // Unbiased: neither a flow of arrivals nor one of wake-ups can hold up the other.
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                Some((stream, carry, counted)) = self.rx.recv() => {
                    waiting.push(Parked {
                        conn: Some((stream, carry)),
                        idle: tokio::time::sleep(idle),
                        _counted: counted,
                    });
                }
                Some(woken) = waiting.next(), if !waiting.is_empty() => {
                    if let Some((stream, carry)) = woken {
                        resume(stream, carry);
                    }
                }
            }
        }
        // The drain: parked connections have no request under way and close now, as those
        // still on their way here do when the channel goes.
    }
}

pin_project_lite::pin_project! {
    /// One parked connection: ready with its socket and carry when the socket turns readable
    /// (or reports an error, which whoever resumes it will read), or with `None` when `idle`
    /// fires first.
    struct Parked<C> {
        conn: Option<(TcpStream, C)>,
        #[pin]
        idle: Sleep,
        _counted: Held,
    }
}

impl<C> Future for Parked<C> {
    type Output = Option<(TcpStream, C)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some((stream, _)) = this.conn.as_ref() else {
            return Poll::Ready(None);
        };
        if stream.poll_read_ready(cx).is_ready() {
            return Poll::Ready(this.conn.take());
        }
        if this.idle.poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a parked plain HTTP/1.1 connection costs besides its socket's registration and
    /// its peer: 184 bytes of entry (socket 32, carry 16, timer 112, its place in the gauge
    /// 8, and the tag), plus the FuturesUnordered node around it. Raise it only with a
    /// measurement of what it costs.
    const PARKED_MAX: usize = 184;

    #[test]
    fn a_parked_connection_is_small() {
        type Carry = (std::sync::Arc<()>, std::sync::Arc<()>);
        assert!(
            std::mem::size_of::<Parked<Carry>>() <= PARKED_MAX,
            "{}",
            std::mem::size_of::<Parked<Carry>>()
        );
    }
}
