//! The lb as an HTTP client of its backends: per-address state that survives table swaps
//! (in-flight, ejection, the connection pool), the HTTP/1.1 codec, the HTTP/2 handle, and the
//! client's retry budget. It knows nothing of routes, client connections or the shared state.

mod backend;
mod body;
pub mod h1;
mod retry_budget;

use std::time::Duration;

use bytes::BytesMut;
use http::{HeaderMap, Request, Response};
use hyper::client::conn::http2;

pub use backend::{Backend, BackendSettings, ConnectError};
pub use body::{BodyError, BoxError, Upstream, UpstreamBody};
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

/// How long a send may wait, and on whom.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For the response head, counted while the backend holds the exchange up: once it has
    /// every byte of the request the client has sent so far.
    pub response: Duration,
    /// For the next bytes of the client's request body.
    pub client_body: Duration,
}

impl Sender {
    /// Sends a request with its fields rendered by `fields`, and waits for the response head
    /// within `timeouts`. `parts` stay with the caller, for a retry. (HTTP/2 backends: the
    /// response timeout covers the whole send.)
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
            Sender::H2(s) => {
                let mut parts = clone_parts(parts);
                fields.apply(&mut parts.headers);
                let req = Request::from_parts(parts, body);
                match tokio::time::timeout(timeouts.response, s.try_send_request(req)).await {
                    Err(_) => Err(SendError::TimedOut),
                    Ok(Ok(resp)) => Ok(resp.map(Upstream::H2)),
                    Ok(Err(mut e)) => Err(match e.take_message() {
                        Some(req) => SendError::NotSent(req.into_body()),
                        None => SendError::Failed(e.into_error().into()),
                    }),
                }
            }
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }
}

fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = p.method.clone();
    parts.uri = p.uri.clone();
    parts.version = p.version;
    parts.headers = p.headers.clone();
    parts
}
