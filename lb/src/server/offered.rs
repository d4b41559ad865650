//! The switch of protocols a connection's requests offered, as hyper holds it, so that a
//! connection whose switch the lb did not make gets its socket back.
//!
//! hyper keeps the switch the last such request offered (any HTTP/1.1 request naming an
//! `Upgrade`, and `CONNECT`) pending until the connection ends, and then ends the connection
//! as an upgrade, whether the switch was made or not: it hands the socket to the request's
//! handle instead of closing it. When the lb did not make the switch, that handle went with
//! the request, and the socket with it: a plain connection could not park, and a TLS one was
//! dropped without its `close_notify`. A copy of the handle, kept here, takes it back. Knows
//! nothing of what a switch is for; the tunnel that takes one up holds its own copy.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::rt::{Read, Write};
use hyper::upgrade::OnUpgrade;

/// The handle of the last switch a request on the connection offered.
#[derive(Default)]
pub struct Offered(Mutex<Option<OnUpgrade>>);

impl Offered {
    /// Keeps `req`'s handle, if it has one (most have none: one look at an empty map).
    #[inline]
    pub fn note<B>(&self, req: &http::Request<B>) {
        if let Some(on) = req.extensions().get::<OnUpgrade>() {
            self.keep(on);
        }
    }

    #[cold]
    fn keep(&self, on: &OnUpgrade) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(on.clone());
    }

    /// After hyper ended the connection as an upgrade that no tunnel took up: the socket as
    /// hyper had it, and the bytes it had read. Only then: the handle's channel may be
    /// received from once, and a tunnel's copy must be the one to take the socket of a
    /// switch that was made.
    #[cold]
    pub fn take_back<T: Read + Write + Unpin + 'static>(&self) -> Option<(T, Bytes)> {
        let on = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        // hyper hands the socket over before it returns: the handle is ready. Polled outside
        // the task's budget, which could otherwise make a ready channel answer `Pending`.
        let mut on = tokio::task::unconstrained(on);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(Ok(upgraded)) = Pin::new(&mut on).poll(&mut cx) else {
            return None;
        };
        let parts = upgraded.downcast::<T>().ok()?;
        Some((parts.io, parts.read_buf))
    }
}
