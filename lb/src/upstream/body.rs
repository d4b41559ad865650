//! The bodies of the lb's side as a client: `UpstreamBody` carries a client's request body to
//! a backend, streaming; `Upstream` says where a proxied response's body is read from. They
//! know nothing of routes or of the client connection.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

#[derive(Debug)]
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

/// Errors of a response body on its way to the client: the backend's connection failed or
/// broke the framing. Boxed: they end the response, so their cost is paid once at most.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a proxied response's body comes from.
pub enum Upstream {
    /// The HTTP/1.1 connection in the response's guard.
    H1,
    H2(Incoming),
    /// None: a `101` whose connection became a tunnel.
    Empty,
}
