//! The response body the client gets: a backend's response streamed through, or an answer
//! the lb made itself, either one counted for the access log when it sampled the request. Its
//! guard settles the request's accounting when the response ends or is dropped, and gives the
//! backend connection back to the pool.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::access_log::Record;
use crate::metrics::{Metrics, UpstreamErrorKind};
use crate::routing::Route;
use crate::splice::{self, BodyPipe};
use crate::upstream::{Backend, BoxError, Sender, Upstream};
use crate::Shared;

pub enum ProxyBody {
    Upstream {
        inner: Upstream,
        guard: ResponseGuard,
    },
    Local(Option<Bytes>),
    /// A response the access log sampled (`logged`).
    Logged(Box<Logged>),
}

impl ProxyBody {
    pub fn local(text: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Local(Some(text.into()))
    }

    /// The client is not taking the response as fast as the backend sends it: read the
    /// backend in small pieces (see `h1::Conn::consumer_lags`).
    pub fn client_lags(&mut self) {
        if let ProxyBody::Logged(l) = self {
            return l.inner.client_lags();
        }
        if let ProxyBody::Upstream {
            inner: Upstream::H1,
            guard,
        } = self
        {
            if let Some(Sender::H1(conn)) = &mut guard.sender {
                conn.consumer_lags();
            }
        }
    }
}

impl ProxyBody {
    /// The next frame, as `poll_frame`; given a `pipe`, an HTTP/1.1 backend's body of known
    /// length goes through it, in placeholders for its writer to splice (`crate::splice`).
    #[inline]
    pub fn poll_frame_piped(
        &mut self,
        cx: &mut Context<'_>,
        pipe: Option<&BodyPipe>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            ProxyBody::Upstream { inner, guard } => match (inner, &mut guard.sender) {
                // Read from the backend's connection in this task, as the client takes it.
                (Upstream::H1, Some(Sender::H1(conn))) => {
                    let polled = conn.poll_frame(cx, pipe);
                    if let Some(pipe) = pipe {
                        count_splice(pipe, &polled, &guard.in_flight.shared.metrics);
                    }
                    match polled {
                        // The head has gone to the client: all that is left is to cut it off.
                        Poll::Ready(Some(Err(e))) => {
                            let m = &guard.in_flight.shared.metrics;
                            m.upstream_errors.inc(UpstreamErrorKind::Body);
                            tracing::debug!(backend = %guard.in_flight.backend.addr, error = %e, "upstream response body failed");
                            Poll::Ready(Some(Err(e.into())))
                        }
                        polled => polled.map_err(|e| e.into()),
                    }
                }
                (Upstream::H2(body), _) => Pin::new(body).poll_frame(cx).map_err(|e| e.into()),
                _ => Poll::Ready(None),
            },
            ProxyBody::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Logged(l) => l.poll_frame(cx, pipe),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut().poll_frame_piped(cx, None)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { inner, guard } => match (inner, &guard.sender) {
                (Upstream::H1, Some(Sender::H1(conn))) => conn.body_done(),
                (Upstream::H2(body), _) => body.is_end_stream(),
                _ => true,
            },
            ProxyBody::Local(data) => data.is_none(),
            ProxyBody::Logged(l) => l.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { inner, guard } => match (inner, &guard.sender) {
                (Upstream::H1, Some(Sender::H1(conn))) => conn.body_size_hint(),
                (Upstream::H2(body), _) => body.size_hint(),
                _ => SizeHint::with_exact(0),
            },
            ProxyBody::Local(Some(d)) => SizeHint::with_exact(d.len() as u64),
            ProxyBody::Local(None) => SizeHint::with_exact(0),
            ProxyBody::Logged(l) => l.size_hint(),
        }
    }
}

/// Counts what a body offered a pipe did with it: the bytes a placeholder stands for, or the
/// refusal of a pipe (none to be had: the body is then copied).
fn count_splice<E>(pipe: &BodyPipe, polled: &Poll<Option<Result<Frame<Bytes>, E>>>, m: &Metrics) {
    if let Poll::Ready(Some(Ok(frame))) = polled {
        if let Some(d) = frame.data_ref().filter(|d| splice::is_placeholder(d)) {
            m.spliced_bytes.inc_by(d.len() as u64);
        }
    }
    if pipe.take_refusal() {
        m.splice_refused.inc();
    }
}

/// A request counted in flight, for its backend (which p2c balances on, and which
/// `LB_BACKEND_MAX_CONNECTIONS` caps) and for the gauge, from just before it connects (or
/// checks out a pooled connection) until this is dropped: when its response ends, when the
/// attempt fails, or when the client leaves and the request's future is dropped mid-await.
pub struct InFlight {
    pub backend: Arc<Backend>,
    pub shared: Arc<Shared>,
}

impl InFlight {
    pub fn start(shared: &Arc<Shared>, backend: &Arc<Backend>) -> InFlight {
        backend.start_request();
        InFlight::counted(shared, backend)
    }

    /// Counts the request in flight unless the backend already has `cap` in flight.
    pub fn admit(shared: &Arc<Shared>, backend: &Arc<Backend>, cap: usize) -> Option<InFlight> {
        backend
            .try_start_request(cap)
            .then(|| InFlight::counted(shared, backend))
    }

    fn counted(shared: &Arc<Shared>, backend: &Arc<Backend>) -> InFlight {
        shared.metrics.in_flight.inc();
        InFlight {
            backend: backend.clone(),
            shared: shared.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.end_request();
        self.shared.metrics.in_flight.dec();
    }
}

/// Lives as long as a proxied response. Dropping it ends the request's time in flight and in
/// the route's latency histogram, and gives the upstream connection back to the pool when the
/// exchange completed cleanly.
pub struct ResponseGuard {
    pub in_flight: InFlight,
    pub route: Arc<Route>,
    pub start: Instant,
    pub sender: Option<Sender>,
    /// Backends tried for it (1 when the first answered).
    pub attempts: u32,
}

impl Drop for ResponseGuard {
    fn drop(&mut self) {
        self.route
            .latency
            .observe(self.start.elapsed().as_secs_f64());
        // An HTTP/2 handle is a clone of the shared connection: nothing to give back. An
        // HTTP/1.1 connection whose response was not read to its end is dropped (closed) there.
        if let Some(Sender::H1(conn)) = self.sender.take() {
            self.in_flight.backend.checkin(conn);
        }
    }
}

/// A sampled response's body: the response's own, counted as it goes.
pub struct Logged {
    pub(super) inner: ProxyBody,
    record: Option<Record>,
    start: Instant,
    done: bool,
    shared: Arc<Shared>,
}

impl Logged {
    pub(super) fn new(
        inner: ProxyBody,
        record: Record,
        start: Instant,
        shared: Arc<Shared>,
    ) -> Logged {
        Logged {
            inner,
            record: Some(record),
            start,
            done: false,
            shared,
        }
    }

    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        pipe: Option<&BodyPipe>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = self.inner.poll_frame_piped(cx, pipe);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(r)) = (frame.data_ref(), self.record.as_mut()) {
                    r.bytes_out += d.len() as u64;
                }
            }
            Poll::Ready(None) => self.done = true,
            _ => {}
        }
        polled
    }

    pub(super) fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let Some(mut r) = self.record.take() else {
            return;
        };
        r.duration = self.start.elapsed();
        // The server stops polling once the body says it has ended.
        if !(self.done || self.inner.is_end_stream()) && r.error.is_none() {
            r.error = Some("incomplete");
        }
        if let Some(log) = &self.shared.access_log {
            log.write(r);
        }
    }
}
