//! A request the access log sampled: served like any other, its response body wrapped so that
//! the record is finished (bytes out, duration, whether it completed) when the body ends or
//! is dropped, and handed to the log. Requests the log did not sample never come here.

use std::sync::Arc;
use std::time::Instant;

use http::header;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;

use super::body::{Logged, ProxyBody};
use super::local::LocalAnswer;
use super::peer::Peer;
use crate::access_log::Record;
use crate::time::unix_ms;
use crate::Shared;

pub(super) async fn serve(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    peer: Arc<Peer>,
) -> Response<ProxyBody> {
    // The ID `handle` will use: a sane one the client sent passes as it is, so one made up
    // here is put where `handle` reads it.
    let request_id = super::request_id(req.headers());
    req.headers_mut()
        .insert(super::X_REQUEST_ID, request_id.clone());
    let start = Instant::now();
    let unix_ms = unix_ms();
    let host = match req.uri().authority() {
        Some(a) => super::without_userinfo(a).to_string(),
        None => req
            .headers()
            .get(header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .unwrap_or_default(),
    };
    let mut record = Record {
        unix_ms,
        request_id,
        client: peer.addr,
        method: req.method().clone(),
        host,
        target: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        version: req.version(),
        status: 0,
        bytes_in: req.body().size_hint().exact(),
        bytes_out: 0,
        duration: Default::default(),
        ttfb: None,
        route: String::new(),
        backend: None,
        attempts: 0,
        error: None,
    };
    let resp = super::handle(shared.clone(), req, peer).await;
    let (mut parts, body) = resp.into_parts();
    record.status = parts.status.as_u16();
    match &body {
        ProxyBody::Upstream { guard, .. } => {
            record.ttfb = Some(start.elapsed());
            record.route = guard.route.name.clone();
            record.backend = Some(guard.in_flight.backend.addr.clone());
            record.attempts = guard.attempts;
        }
        _ => {
            if let Some(a) = parts.extensions.remove::<LocalAnswer>() {
                record.route = a.route.into();
                record.error = Some(a.reason.as_str());
            }
        }
    }
    let logged = Logged::new(body, record, start, shared);
    Response::from_parts(parts, ProxyBody::Logged(Box::new(logged)))
}
