//! Forwarding one request: pick a backend, check out a connection, send, and retry when it is
//! safe; the response goes back with a guard that settles the accounting. Knows nothing of
//! client connections or how the request arrived.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use hyper::body::Incoming;

use super::body::{ProxyBody, ResponseGuard};
use super::forwarded::{Forwarded, X_REQUEST_ID};
use super::headers::{strip_hop_by_hop, to_http1_form, to_http2_form};
use super::local::local;
use super::peer::Peer;
use super::upgrade::{spawn_tunnel, Upgrade};
use crate::metrics::{LocalReason, RetryReason, StatusClass, UpstreamErrorKind};
use crate::routing::{Route, Tried};
use crate::upstream::{SendError, Sender, Upstream, UpstreamBody};
use crate::Shared;

/// Pooled connections found closed at send time, retried without spending a retry: nothing
/// reached a backend. Bounded in case every pooled connection of a backend went stale at once.
pub(super) const MAX_STALE_RETRIES: u32 = 4;

pub(super) async fn forward(
    shared: &Arc<Shared>,
    route: &Arc<Route>,
    peer: &Peer,
    mut parts: http::request::Parts,
    body: Incoming,
    request_id: HeaderValue,
    mut upgrade: Option<Upgrade>,
) -> Response<ProxyBody> {
    let cfg = &shared.config;
    let start = Instant::now();
    // A request may be replayed after it reached a backend only when it is idempotent and has no
    // body we would have streamed away; a connect failure is retried whatever the method.
    let bodyless = http_body::Body::is_end_stream(&body);
    let replayable = bodyless && is_idempotent(&parts.method) && cfg.retries > 0;
    let mut body = Some(if bodyless {
        UpstreamBody::Empty
    } else {
        UpstreamBody::Incoming(body)
    });
    let mut tried = Tried::default();
    let mut retries = 0u32;
    let mut stale = 0u32;
    let mut last = LocalReason::NoBackend;

    while let Some(i) = route.pick(cfg.balance, &tried) {
        tried.push(i);
        let rb = &route.backends[i];
        let backend = &rb.backend;

        let (mut sender, reused) = match backend.checkout(&shared.backend_settings).await {
            Ok(s) => s,
            Err(e) => {
                last = LocalReason::UpstreamConnect;
                let kind = if matches!(e, crate::upstream::ConnectError::Timeout { .. }) {
                    UpstreamErrorKind::ConnectTimeout
                } else {
                    UpstreamErrorKind::Connect
                };
                shared.metrics.upstream_errors.inc(kind);
                if backend.record_failure(&shared.backend_settings) {
                    shared.metrics.ejections.inc();
                    tracing::warn!(backend = %backend.addr, route = %route.name, error = %e, "backend ejected");
                } else {
                    tracing::debug!(backend = %backend.addr, error = %e, "upstream connect failed");
                }
                if may_retry(shared, &mut retries, RetryReason::Connect) {
                    continue;
                }
                break;
            }
        };
        if !reused {
            shared.metrics.upstream_connections.inc();
        }
        // `handle` left the request in HTTP/1.1 form; only a change of protocol between
        // attempts (a route mixing h2c and HTTP/1.1 instances) converts it.
        match (sender.is_h2(), parts.version == Version::HTTP_2) {
            (true, false) => to_http2_form(&mut parts),
            (false, true) => to_http1_form(&mut parts),
            _ => {}
        }

        backend.start_request();
        shared.metrics.in_flight.inc();
        let end = |shared: &Shared| {
            backend.end_request();
            shared.metrics.in_flight.dec();
        };
        let b = body.take().expect("body is restored before every retry");
        let fwd = Forwarded {
            client_ip: &peer.ip,
            tls: peer.tls,
            request_id: &request_id,
        };
        // The parts stay here: a retry sends them again.
        let sent = sender.send(&parts, &fwd, b, cfg.response_timeout).await;
        let resp = match sent {
            Ok(resp) => resp,
            Err(SendError::NotSent(b)) => {
                // The pooled connection closed before the request went out (a keep-alive
                // race): nothing reached the backend, so it is safe to try again.
                end(shared);
                body = Some(b);
                shared
                    .metrics
                    .upstream_errors
                    .inc(UpstreamErrorKind::StaleConnection);
                if stale < MAX_STALE_RETRIES {
                    stale += 1;
                    tried.forget_last();
                    continue;
                }
                last = LocalReason::UpstreamError;
                break;
            }
            Err(SendError::Failed(e)) => {
                end(shared);
                last = LocalReason::UpstreamError;
                shared.metrics.upstream_errors.inc(UpstreamErrorKind::Reset);
                tracing::debug!(backend = %backend.addr, error = %e, "upstream request failed");
                if replayable && may_retry(shared, &mut retries, RetryReason::Reset) {
                    body = Some(UpstreamBody::Empty);
                    continue;
                }
                break;
            }
            Err(SendError::ClientBody(e)) => {
                // The client stopped sending its body; hyper counts its connection's error.
                // Nothing to retry and no backend to blame.
                end(shared);
                last = LocalReason::BadRequest;
                tracing::debug!(backend = %backend.addr, error = %e, "client request body broke off");
                break;
            }
            Err(SendError::TimedOut) => {
                end(shared);
                last = LocalReason::UpstreamTimeout;
                shared
                    .metrics
                    .upstream_errors
                    .inc(UpstreamErrorKind::ResponseTimeout);
                if backend.record_failure(&shared.backend_settings) {
                    shared.metrics.ejections.inc();
                    tracing::warn!(backend = %backend.addr, route = %route.name, "backend ejected after response timeout");
                }
                if replayable && may_retry(shared, &mut retries, RetryReason::Timeout) {
                    body = Some(UpstreamBody::Empty);
                    continue;
                }
                break;
            }
        };

        backend.record_success();
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let (mut rparts, mut rbody) = resp.into_parts();
        rb.count_response(StatusClass::of(rparts.status), &route.name, &shared.metrics);
        let accepted_upgrade = switching.then(|| rparts.headers.get(header::UPGRADE).cloned());
        strip_hop_by_hop(&mut rparts.headers);
        rparts.headers.entry(X_REQUEST_ID).or_insert(request_id);
        let mut sender = Some(sender);
        if let (true, Some(up), Some(Sender::H1(_))) = (switching, upgrade.take(), &sender) {
            let Some(Sender::H1(conn)) = sender.take() else {
                unreachable!("matched above")
            };
            let protocol = accepted_upgrade.flatten().unwrap_or(up.protocol.clone());
            rparts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            rparts.headers.insert(header::UPGRADE, protocol);
            // The connection now belongs to the tunnel; it never goes back to the pool.
            spawn_tunnel(shared.clone(), up, conn.into_tunnel(), backend.addr.clone());
            rbody = Upstream::Empty;
        }
        let guard = ResponseGuard {
            backend: backend.clone(),
            route: route.clone(),
            start,
            sender,
            shared: shared.clone(),
        };
        return Response::from_parts(
            rparts,
            ProxyBody::Upstream {
                inner: rbody,
                guard,
            },
        );
    }

    let msg = match last {
        LocalReason::UpstreamConnect => "no backend accepted the connection",
        LocalReason::UpstreamTimeout => "the backend did not answer in time",
        LocalReason::UpstreamError => "the backend closed the connection without a response",
        LocalReason::BadRequest => "the request body broke off or was malformed",
        _ => "no backend available",
    };
    local(shared, last, &route.name, msg, request_id)
}

pub(super) fn may_retry(shared: &Shared, retries: &mut u32, reason: RetryReason) -> bool {
    if *retries >= shared.config.retries {
        return false;
    }
    if !shared.retry_budget.withdraw() {
        shared.metrics.retry_budget_exhausted.inc();
        return false;
    }
    *retries += 1;
    shared.metrics.retries.inc(reason);
    true
}

pub(super) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}
