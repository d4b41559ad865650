//! The client end of a connection as the request path sees it: its address, whether TLS
//! carried it, its listener's drain, and what its requests tell the connection's parking.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

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
    /// HTTP/2 (over TLS or cleartext). Requests reach `forward` in HTTP/1.1 form either way.
    pub(super) h2: bool,
    /// A trusted proxy (`LB_TRUSTED_PROXIES`): its forwarding fields are believed.
    pub(super) trusted: bool,
    pub(super) drain: Drain,
    pub exchanges: Exchanges,
    /// The pipe large response bodies pass through on a plain HTTP/1.1 connection
    /// (`LB_SPLICE_MIN`), while they do.
    pub pipe: crate::splice::BodyPipe,
    /// A tunnel holds the peer, so the connection counts as long as the tunnel lasts.
    _slot: Slot,
}

/// What a client connection holds for its whole life: its place under the connection limit
/// (`LB_MAX_CONNECTIONS`) and in its worker's count of connections.
#[derive(Debug, Default)]
pub struct Slot {
    pub limit: Option<OwnedSemaphorePermit>,
    pub load: Option<crate::worker::Assigned>,
}

impl Peer {
    pub fn new(
        addr: SocketAddr,
        (tls, h2): (bool, bool),
        trusted: bool,
        drain: Drain,
        slot: Slot,
    ) -> Peer {
        let ip = ip_value(addr.ip());
        Peer {
            addr,
            ip,
            tls,
            h2,
            trusted,
            drain,
            exchanges: Default::default(),
            pipe: Default::default(),
            _slot: slot,
        }
    }

    /// A peer of no connection, for rendering forwarding fields apart from a server (the
    /// fuzz targets, tests): nothing drains it.
    pub fn outside(addr: SocketAddr, tls: bool, trusted: bool) -> Peer {
        let (alive, _) = tokio::sync::mpsc::channel(1);
        let (_, close) = tokio::sync::watch::channel(false);
        Peer::new(
            addr,
            (tls, false),
            trusted,
            Drain { alive, close },
            Slot::default(),
        )
    }

    /// The most the first read of a response body of known length may take
    /// (`Sender::first_read_at_most`): what this client is handed at once, before its pace
    /// shows.
    pub(super) fn first_read(&self) -> usize {
        if self.tls || self.h2 {
            FIRST_READ_BUFFERED
        } else {
            FIRST_READ_PLAIN
        }
    }
}

/// A plain HTTP/1.1 client's socket takes what room it has at the first write and only the
/// rest waits in the lb: 64 KiB, a 64 KiB body in two reads (5-7% less of the lb's CPU per
/// response than at 32 KiB; about 45 KiB more held per slow reader, as nginx's 64 KiB of
/// proxy buffers hold).
const FIRST_READ_PLAIN: usize = 64 * 1024;
/// Over TLS the whole piece is encrypted into the session's buffers, and over HTTP/2 it
/// waits in the stream's for the client's window: the first read is held to what a lagging
/// client may have waiting ([`UNSENT_HIGH`]). At 64 KiB, slow TLS readers held 269 KiB each
/// in the lb (test `slow_tls_readers_hold_little_in_the_lb`, bound 256).
const FIRST_READ_BUFFERED: usize = UNSENT_HIGH;

/// The client's address as a header value, made once per connection. An IPv4 address is
/// written out by hand: `to_string` went through the formatting machinery and a string of
/// its own, some 1,500 instructions on every new connection.
fn ip_value(ip: std::net::IpAddr) -> HeaderValue {
    let std::net::IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string())
            .expect("an IP address is a valid header value");
    };
    let mut text = [0u8; 15];
    let mut n = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            text[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            text[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        text[n] = b'0' + octet % 10;
        n += 1;
    }
    HeaderValue::from_bytes(&text[..n]).expect("digits and dots are a valid header value")
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
    /// HTTP/1.1: response body bytes handed to hyper that have not reached the socket yet.
    /// hyper takes body frames until it holds 64 KiB whether or not the client reads them;
    /// the connection's response body waits while this is over [`UNSENT_HIGH`].
    unsent: AtomicUsize,
    /// A response body is waiting for `unsent` to fall.
    held: AtomicBool,
    /// The client's socket has more queued than is on its way: the client is not keeping up.
    lagging: AtomicBool,
    /// The client asked to close the connection after this exchange, which hyper then does:
    /// no spell between exchanges follows, and none is timed.
    last: AtomicBool,
    /// The client's socket is corked for the last response (`server::parking`): the server
    /// uncorks it if the connection outlives the turn that wrote, and the socket's holder
    /// shuts it down if the connection ends so.
    corked: AtomicBool,
    /// The connection parked (`server::parking`): hyper's end of it was no tunnel's, even
    /// when hyper ended it as an upgrade.
    parked: AtomicBool,
}

/// Whether `flag` was set, clearing it: a load, and a store only when it was set (the
/// connection's one task is the only one that sets these flags), not a locked exchange each
/// time it is looked at.
fn take(flag: &AtomicBool) -> bool {
    let set = flag.load(Ordering::Relaxed);
    if set {
        flag.store(false, Ordering::Relaxed);
    }
    set
}

/// Most response bytes an HTTP/1.1 connection holds for a client that is not taking them.
pub const UNSENT_HIGH: usize = 32 * 1024;

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

    /// The exchange under way is the connection's last: its request asked to close.
    pub fn set_last(&self) {
        self.last.store(true, Ordering::Relaxed);
    }

    pub(crate) fn last(&self) -> bool {
        self.last.load(Ordering::Relaxed)
    }

    pub(crate) fn set_corked(&self) {
        self.corked.store(true, Ordering::Relaxed);
    }

    /// Whether the socket was corked, which it is no longer taken to be. Looked at after
    /// every turn of a plain HTTP/1.1 connection.
    pub(crate) fn take_corked(&self) -> bool {
        take(&self.corked)
    }

    pub(crate) fn set_parked(&self) {
        self.parked.store(true, Ordering::Relaxed);
    }

    /// Whether the connection parked since this was last asked: once per round of hyper on
    /// the connection.
    pub(crate) fn take_parked(&self) -> bool {
        take(&self.parked)
    }

    pub(crate) fn done(&self) -> u32 {
        self.done.load(Ordering::Acquire)
    }

    /// Whether a response body must wait before handing hyper more: the client has not taken
    /// what it already has. The connection's next write that brings it down wakes the task.
    /// (The body and the socket are polled by one task: no two threads race on these.)
    pub fn hold_body(&self) -> bool {
        if self.unsent.load(Ordering::Relaxed) < UNSENT_HIGH {
            return false;
        }
        self.held.store(true, Ordering::Relaxed);
        true
    }

    /// Whether the client was last seen not keeping up with its response.
    pub fn lagging(&self) -> bool {
        self.lagging.load(Ordering::Relaxed)
    }

    pub fn set_lagging(&self, lagging: bool) {
        self.lagging.store(lagging, Ordering::Relaxed);
    }

    /// A response body handed hyper `n` bytes.
    pub fn handed(&self, n: usize) {
        let u = self.unsent.load(Ordering::Relaxed);
        self.unsent.store(u + n, Ordering::Relaxed);
    }

    /// The socket took `n` bytes (head and framing bytes count too, so `unsent` errs low);
    /// `true` when a held body may go on and the task must be woken for it.
    pub fn wrote(&self, n: usize) -> bool {
        let u = self.unsent.load(Ordering::Relaxed);
        if u == 0 {
            return false;
        }
        let left = u.saturating_sub(n);
        self.unsent.store(left, Ordering::Relaxed);
        left < UNSENT_HIGH && self.held.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_reads_as_its_text() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.1",
            "192.168.100.9",
            "1.20.100.255",
            "99.9.109.110",
            "::1",
            "::ffff:10.1.2.3",
            "2001:db8::7",
        ] {
            let addr: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(addr), addr.to_string().as_str(), "{ip}");
        }
        // Every octet value, in every place.
        for place in 0..4 {
            for v in 0..=255u8 {
                let mut octets = [1, 2, 3, 4];
                octets[place] = v;
                let addr = std::net::IpAddr::from(octets);
                assert_eq!(ip_value(addr), addr.to_string().as_str());
            }
        }
    }

    /// Only a plain HTTP/1.1 client is handed 64 KiB before its pace shows; a cleartext
    /// HTTP/2 one too reaches `forward` with its request in HTTP/1.1 form.
    #[test]
    fn only_plain_http1_clients_get_a_large_first_read() {
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        let peer = |tls, h2| Peer {
            h2,
            ..Peer::outside(addr, tls, false)
        };
        assert_eq!(peer(false, false).first_read(), 64 * 1024);
        for (tls, h2) in [(true, false), (true, true), (false, true)] {
            assert_eq!(
                peer(tls, h2).first_read(),
                UNSENT_HIGH,
                "tls {tls}, h2 {h2}"
            );
        }
    }
}
