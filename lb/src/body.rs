//! The two body types of the request path, both streaming (nothing is buffered whole):
//! `UpstreamBody` carries a client's request body to a backend; `ProxyBody` carries a backend's
//! response (or an lb-made one) to the client, and its guard settles the request's accounting
//! when the response ends or is dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::backend::{Backend, Sender};
use crate::routing::Route;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

pub enum UpstreamBody {
    Incoming(Incoming),
    /// A request without a body, or the replay of one for a retry.
    Empty,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Incoming(b) => b.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Incoming(b) => b.size_hint(),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

pub enum ProxyBody {
    Upstream {
        inner: Incoming,
        guard: ResponseGuard,
    },
    Local(Option<Bytes>),
}

impl ProxyBody {
    pub fn local(text: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Local(Some(text.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream { inner, guard } => {
                // The body arrives through the upstream connection, which this task drives.
                let polled = match &mut guard.sender {
                    Some(Sender::H1(h1)) => {
                        h1.poll_with(cx, |_, cx| Pin::new(&mut *inner).poll_frame(cx))
                    }
                    _ => Pin::new(&mut *inner).poll_frame(cx),
                };
                match &polled {
                    Poll::Ready(None) => guard.complete = true,
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => guard.complete = true,
                    _ => {}
                }
                polled
            }
            ProxyBody::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { inner, .. } => inner.is_end_stream(),
            ProxyBody::Local(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { inner, .. } => inner.size_hint(),
            ProxyBody::Local(Some(d)) => SizeHint::with_exact(d.len() as u64),
            ProxyBody::Local(None) => SizeHint::with_exact(0),
        }
    }
}

/// Lives as long as a proxied response. Dropping it ends the request for the backend's
/// in-flight count and the route's latency histogram, and gives the upstream connection back to
/// the pool when the exchange completed cleanly.
pub struct ResponseGuard {
    pub backend: Arc<Backend>,
    pub route: Arc<Route>,
    pub start: Instant,
    pub sender: Option<Sender>,
    pub complete: bool,
    pub in_flight: prometheus::IntGauge,
}

impl Drop for ResponseGuard {
    fn drop(&mut self) {
        self.backend.end_request();
        self.in_flight.dec();
        self.route
            .latency
            .observe(self.start.elapsed().as_secs_f64());
        // An HTTP/2 handle is a clone of the shared connection: nothing to give back. An
        // incomplete exchange leaves the connection unusable: dropping it closes it.
        if let (Some(Sender::H1(h1)), true) = (self.sender.take(), self.complete) {
            self.backend.checkin(h1);
        }
    }
}
