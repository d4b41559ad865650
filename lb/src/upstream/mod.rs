//! The lb as an HTTP client of its backends: per-address state that survives table swaps
//! (in-flight, ejection, the connection pool), the HTTP/1.1 codec, the HTTP/2 handle, and the
//! client's retry budget. It knows nothing of routes, client connections or the shared state.

mod backend;
mod body;
pub mod h1;
mod retry_budget;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http::{HeaderMap, Request, Response};
use hyper::client::conn::http2;

pub use backend::{Backend, BackendSettings, ConnectError};
pub use body::{BodyError, BoxError, Upstream, UpstreamBody};
use body::{BodyWatch, Overdue};
pub use retry_budget::RetryBudget;

/// Renders a request's fields for the backend: the client's, less what the caller replaces,
/// and the caller's own (the proxy's forwarding fields). The client states only the body's
/// framing; which fields a request carries is the caller's policy, not the client's.
pub trait HeadFields {
    /// Writes `headers` and the caller's own fields as HTTP/1.1 field lines into `out`,
    /// leaving out `Content-Length` when `own_length` (the codec then states the framing).
    fn encode_h1(&self, headers: &HeaderMap, own_length: bool, out: &mut BytesMut);
    /// Makes the same edits in a header map, for an HTTP/2 request.
    fn apply(&self, headers: &mut HeaderMap);
}

/// A connection to a backend, ready for one request.
pub enum Sender {
    /// A pooled HTTP/1.1 connection, driven by the task of the request it serves.
    H1(Box<h1::Conn>),
    /// A handle on the backend's shared HTTP/2 connection.
    H2(http2::SendRequest<UpstreamBody>),
}

/// How a send ended without a response.
#[derive(Debug)]
pub enum SendError {
    /// Nothing reached the backend; the body comes back for another attempt.
    NotSent(UpstreamBody),
    /// The request, or part of it, may have reached the backend.
    Failed(Box<dyn std::error::Error + Send + Sync>),
    /// The client's request body broke off while it was being sent: the client's fault,
    /// not the backend's.
    ClientBody(BodyError),
    /// No response head within the response timeout.
    TimedOut,
    /// The client sent no more of its request body within the body timeout: the client's
    /// fault, not the backend's.
    ClientBodyTimedOut,
}

/// Whether an I/O error says the peer's host gave no answer: the kernel gave up waiting
/// (ETIMEDOUT, also what TCP_USER_TIMEOUT ends a connection with) or found no route to it
/// (an unreachable host or network, which the kernel may report instead when it heard so).
pub fn from_silent_host(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ETIMEDOUT)
        || matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::HostUnreachable
                | std::io::ErrorKind::NetworkUnreachable
        )
}

/// How long a send may wait, and on whom.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For the response head, counted while the backend holds the exchange up: once it has
    /// every byte of the request the client has sent so far.
    pub response: Duration,
    /// For the next bytes of the client's request body.
    pub client_body: Duration,
    /// How long data sent to a backend may go unacknowledged (TCP_USER_TIMEOUT) before its
    /// host is taken for dead; zero: the kernel's.
    pub user: Duration,
}

impl Sender {
    /// Sends a request with its fields rendered by `fields`, and waits for the response head
    /// within `timeouts`: the client's body timeout while its next bytes are awaited, the
    /// response timeout while the backend holds the exchange up. `parts` stay with the
    /// caller, for a retry.
    pub async fn send(
        &mut self,
        parts: &http::request::Parts,
        fields: &impl HeadFields,
        body: UpstreamBody,
        timeouts: &Timeouts,
    ) -> Result<Response<Upstream>, SendError> {
        match self {
            Sender::H1(conn) => Ok(conn
                .send(parts, fields, body, timeouts)
                .await?
                .map(|()| Upstream::H1)),
            // Boxed: its deadline loop would otherwise grow every request's future, HTTP/1.1
            // ones included.
            Sender::H2(s) => Box::pin(send_h2(s, parts, fields, body, timeouts)).await,
        }
    }

    /// The first read of the next response's body, when its head gives the length, takes at
    /// most `max` bytes over HTTP/1.1: what the response's consumer is handed at once. (Set
    /// apart from `send`, whose future every request keeps.) An HTTP/2 backend's flow
    /// control sets its own.
    pub fn first_read_at_most(&mut self, max: usize) {
        if let Sender::H1(conn) = self {
            conn.first_read_max = max;
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }
}

/// `Sender::send` over the backend's HTTP/2 connection: hyper's connection task streams the
/// body, and a watch on the body says whose turn it is.
async fn send_h2(
    s: &mut http2::SendRequest<UpstreamBody>,
    parts: &http::request::Parts,
    fields: &impl HeadFields,
    body: UpstreamBody,
    timeouts: &Timeouts,
) -> Result<Response<Upstream>, SendError> {
    let mut parts = clone_parts(parts);
    fields.apply(&mut parts.headers);
    let watch = Arc::new(BodyWatch::new());
    let req = Request::from_parts(parts, body.watched(&watch));
    let sent = s.try_send_request(req);
    tokio::pin!(sent);
    let answer = loop {
        let (ms, _) = watch.remaining(timeouts.client_body, timeouts.response);
        match tokio::time::timeout(Duration::from_millis(ms), sent.as_mut()).await {
            Ok(answer) => break answer,
            // The turn may have passed meanwhile: look again.
            Err(_) => match watch.remaining(timeouts.client_body, timeouts.response) {
                (0, Overdue::Client) => return Err(SendError::ClientBodyTimedOut),
                (0, Overdue::Backend) => return Err(SendError::TimedOut),
                _ => continue,
            },
        }
    };
    match answer {
        Ok(resp) => Ok(resp.map(Upstream::H2)),
        Err(mut e) => Err(match (e.take_message(), watch.fault()) {
            (Some(req), _) => SendError::NotSent(req.into_body()),
            // hyper reset the stream for the client's body: the client's fault.
            (None, Some(fault)) => SendError::ClientBody(fault),
            (None, None) => SendError::Failed(e.into_error().into()),
        }),
    }
}

/// A request head without its extensions (which a forwarded request has none of).
pub fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = p.method.clone();
    parts.uri = p.uri.clone();
    parts.version = p.version;
    parts.headers = p.headers.clone();
    parts
}
