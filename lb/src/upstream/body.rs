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
    /// The client's body, of which at most `left` more bytes may pass.
    Incoming { body: Incoming, left: u64 },
    /// A request without a body, or the replay of one for a retry.
    Empty,
}

impl UpstreamBody {
    /// The client's body, cut off with `BodyError::TooLarge` past `limit` bytes.
    pub fn limited(body: Incoming, limit: Option<u64>) -> UpstreamBody {
        UpstreamBody::Incoming {
            body,
            left: limit.unwrap_or(u64::MAX),
        }
    }
}

/// Why a client's request body did not reach the backend whole: the client's doing, never the
/// backend's.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the client's request body broke off: {0}")]
    Client(#[from] hyper::Error),
    #[error("the request body is larger than allowed")]
    TooLarge,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Incoming { body, left } => {
                match std::task::ready!(Pin::new(body).poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            let n = data.len() as u64;
                            if n > *left {
                                return Poll::Ready(Some(Err(BodyError::TooLarge)));
                            }
                            *left -= n;
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
                    None => Poll::Ready(None),
                }
            }
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Incoming { body, .. } => body.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Incoming { body, .. } => body.size_hint(),
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
