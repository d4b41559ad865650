//! The client end of a connection as the request path sees it: its address, whether TLS
//! carried it, its listener's drain, and what its requests tell the connection's parking.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use http::header::HeaderValue;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};

/// A listener's drain, as connections and tunnels see it: holding `alive` keeps the drain
/// waiting; `close` turns true when the drain's time is up.
#[derive(Clone)]
pub struct Drain {
    pub alive: mpsc::Sender<Infallible>,
    pub close: watch::Receiver<bool>,
}

/// The client end of a connection, with its address already rendered as the header value
/// `X-Forwarded-For` needs: once per connection rather than once per request.
pub struct Peer {
    pub addr: SocketAddr,
    pub(super) ip: HeaderValue,
    pub tls: bool,
    /// A trusted proxy (`LB_TRUSTED_PROXIES`): its forwarding fields are believed.
    pub(super) trusted: bool,
    pub(super) drain: Drain,
    pub exchanges: Exchanges,
    /// The connection's place under the connection limit: a tunnel holds the peer, so it
    /// counts as long as the tunnel lasts.
    _slot: Option<OwnedSemaphorePermit>,
}

impl Peer {
    pub fn new(
        addr: SocketAddr,
        tls: bool,
        trusted: bool,
        drain: Drain,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Peer {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .expect("an IP address is a valid header value");
        Peer {
            addr,
            ip,
            tls,
            trusted,
            drain,
            exchanges: Default::default(),
            _slot: slot,
        }
    }
}

/// What a connection's requests tell its `ParkingIo`.
#[derive(Debug, Default)]
pub struct Exchanges {
    /// Requests whose response has not been written to the end yet.
    pub(crate) open: AtomicU32,
    /// Exchanges finished so far (wrapping).
    pub(crate) done: AtomicU32,
    /// The connection may be handed over to another protocol: never park it.
    pub(crate) pinned: AtomicBool,
}

impl Exchanges {
    /// Called for an upgrade request: the socket may become a tunnel, whose reads must never
    /// see a made-up end of input.
    pub fn pin(&self) {
        self.pinned.store(true, Ordering::Relaxed);
    }

    /// The upgrade was declined or failed: the connection is plain HTTP/1.1 again, with its
    /// parking and its header and idle timeouts.
    pub fn unpin(&self) {
        self.pinned.store(false, Ordering::Relaxed);
    }

    pub(crate) fn done(&self) -> u32 {
        self.done.load(Ordering::Acquire)
    }
}
