//! The bodies of the lb's side as a client: `UpstreamBody` carries a client's request body to
//! a backend, streaming; `Upstream` says where a proxied response's body is read from. They
//! know nothing of routes or of the client connection.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::time::now_ms;

#[derive(Debug)]
pub enum UpstreamBody {
    /// The client's body, of which at most `left` more bytes may pass; `watch` hears what it
    /// waits on, when its sender cannot see it (HTTP/2: hyper's connection task polls it).
    Incoming {
        body: Incoming,
        left: u64,
        watch: Option<Arc<BodyWatch>>,
    },
    /// A request without a body, or the replay of one for a retry.
    Empty,
}

impl UpstreamBody {
    /// The client's body, cut off with `BodyError::TooLarge` past `limit` bytes.
    pub fn limited(body: Incoming, limit: Option<u64>) -> UpstreamBody {
        UpstreamBody::Incoming {
            body,
            left: limit.unwrap_or(u64::MAX),
            watch: None,
        }
    }

    /// This body, reporting to `w` what it waits on.
    pub(super) fn watched(mut self, w: &Arc<BodyWatch>) -> UpstreamBody {
        if let UpstreamBody::Incoming { watch, .. } = &mut self {
            *watch = Some(w.clone());
        }
        self
    }
}

/// Whose turn it is while a request body streams to an HTTP/2 backend, so that the send can
/// split its deadline as the HTTP/1.1 codec does: the client's body timeout while its next
/// bytes are awaited, the backend's response timeout otherwise. Also keeps how the body
/// failed, which hyper reports only as a reset stream.
#[derive(Debug)]
pub struct BodyWatch {
    /// `now_ms()` since which the body waits on the client; 0 while it does not.
    client_since: AtomicU64,
    /// `now_ms()` when the wait last passed to the backend (a frame, the end, the start).
    backend_since: AtomicU64,
    fault: Mutex<Option<BodyError>>,
}

/// Which deadline a send is past.
#[derive(Debug, PartialEq, Eq)]
pub enum Overdue {
    Client,
    Backend,
}

impl BodyWatch {
    pub fn new() -> BodyWatch {
        BodyWatch {
            client_since: AtomicU64::new(0),
            backend_since: AtomicU64::new(now_ms()),
            fault: Mutex::new(None),
        }
    }

    /// Milliseconds from now until the deadline of whoever holds the exchange up, and who.
    pub fn remaining(&self, client_body: Duration, response: Duration) -> (u64, Overdue) {
        let now = now_ms();
        let client = self.client_since.load(Ordering::Relaxed);
        let (since, limit, who) = if client != 0 {
            (client, client_body, Overdue::Client)
        } else {
            let since = self.backend_since.load(Ordering::Relaxed);
            (since, response, Overdue::Backend)
        };
        let end = since.saturating_add(limit.as_millis() as u64);
        (end.saturating_sub(now), who)
    }

    /// How the client's body failed, if it did.
    pub fn fault(&self) -> Option<BodyError> {
        self.fault.lock().ok()?.take()
    }

    fn polled(&self, out: &Poll<Option<Result<Frame<Bytes>, BodyError>>>) {
        match out {
            Poll::Pending => {
                if self.client_since.load(Ordering::Relaxed) == 0 {
                    self.client_since.store(now_ms(), Ordering::Relaxed);
                }
            }
            Poll::Ready(r) => {
                if let Some(Err(e)) = r {
                    if let Ok(mut f) = self.fault.lock() {
                        *f = Some(e.clone());
                    }
                }
                self.backend_since.store(now_ms(), Ordering::Relaxed);
                self.client_since.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// Why a client's request body did not reach the backend whole: the client's doing, never the
/// backend's.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    /// Shared: the HTTP/2 send keeps a copy of what it hands to hyper.
    #[error("the client's request body broke off: {0}")]
    Client(Arc<hyper::Error>),
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
            UpstreamBody::Incoming { body, left, watch } => {
                let out = Pin::new(body).poll_frame(cx).map(|frame| match frame {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            let n = data.len() as u64;
                            if n > *left {
                                return Some(Err(BodyError::TooLarge));
                            }
                            *left -= n;
                        }
                        Some(Ok(frame))
                    }
                    Some(Err(e)) => Some(Err(BodyError::Client(Arc::new(e)))),
                    None => None,
                });
                if let Some(w) = watch {
                    w.polled(&out);
                }
                out
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
