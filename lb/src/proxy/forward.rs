//! Forwarding one request: pick a backend, check out a connection, send, and retry when it is
//! safe; the response goes back with a guard that settles the accounting. Knows nothing of
//! client connections or how the request arrived.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use hyper::body::Incoming;

use super::affinity::{self, set_cookie, Affinity};
use super::body::{InFlight, ProxyBody, ResponseGuard};
use super::forwarded::{Forwarded, X_REQUEST_ID};
use super::headers::{strip_hop_by_hop, to_http1_form, to_http2_form};
use super::local::local;
use super::peer::Peer;
use super::rewrite;
use super::upgrade::{spawn_tunnel, Upgrade};
use crate::config::{Config, VersionPin};
use crate::metrics::{LocalReason, RetryReason, StatusClass, UpstreamErrorKind};
use crate::routing::{Pin, Route, RouteBackend, Tried};
use crate::upstream::{
    Backend, BodyError, ConnectError, SendError, Sender, Upstream, UpstreamBody,
};
use crate::Shared;
use switchyard_consul::tags::Sticky;

/// What pins a request to one version of a route's instances.
pub(super) const VERSION_HEADER: header::HeaderName =
    header::HeaderName::from_static("x-switchyard-version");
pub(super) const VERSION_COOKIE: &str = "sy-version";

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
    upgrade: Option<Upgrade>,
) -> Response<ProxyBody> {
    let cfg = &shared.config;
    let start = Instant::now();
    let mut attempts = Attempts::new(&parts, body, cfg);
    while let Some(i) = pick(route, (cfg, peer), &parts, &request_id, &attempts.tried) {
        attempts.tried.push(i);
        let rb = &route.backends[i];
        let backend = &rb.backend;
        // In flight from before connecting (a backend slow to accept is busy too) until the
        // response's guard drops, the attempt fails, or the client leaves and this future is
        // dropped while it waits. With a per-backend cap, taking the place first means racing
        // requests cannot pass the cap together. A full backend is passed over at no cost to
        // the retries; when all are, the request is shed, not queued.
        let in_flight = match cfg.backend_max_connections {
            None => InFlight::start(shared, backend),
            Some(cap) => match InFlight::admit(shared, backend, cap) {
                Some(in_flight) => in_flight,
                None => {
                    attempts.last = LocalReason::BackendFull;
                    attempts.full += 1;
                    if (attempts.full as usize) < route.backends.len() {
                        continue;
                    }
                    break;
                }
            },
        };
        let mut sender = match backend.checkout(&shared.backend_settings).await {
            Ok((sender, reused)) => {
                if !reused {
                    shared.metrics.upstream_connections.inc();
                }
                sender
            }
            Err(e) => {
                if e.host_silent() {
                    attempts.tried.mark_silent(i);
                }
                connect_failed(shared, route, backend, e);
                attempts.last = LocalReason::UpstreamConnect;
                if may_retry(shared, &mut attempts.retries, RetryReason::Connect) {
                    continue;
                }
                break;
            }
        };
        // `handle` left the request in HTTP/1.1 form; only a change of protocol between
        // attempts (a route mixing h2c and HTTP/1.1 instances) converts it.
        match (sender.is_h2(), parts.version == Version::HTTP_2) {
            (true, false) => to_http2_form(&mut parts),
            (false, true) => to_http1_form(&mut parts),
            _ => {}
        }
        let body = attempts
            .body
            .take()
            .expect("body is restored before every retry");
        // The instance's rewrite works on a copy (boxed: most requests have none, and a copy
        // in place would grow every request's future); the parts stay as the client sent
        // them, for a retry elsewhere.
        let rewritten = match rb.spec.rewrite.as_deref().filter(|rw| rw.touches_request()) {
            None => None,
            Some(rw) => match rewrite::request(rw, &parts, &route.key.prefix) {
                Some(r) => Some(r),
                None => {
                    let msg = "the request target is too long once rewritten for this route";
                    return local(shared, LocalReason::BadRequest, "", msg, request_id);
                }
            },
        };
        let fwd = Forwarded {
            peer,
            request_id: &request_id,
            client_host: rewritten.as_ref().and_then(|r| r.client_host.as_ref()),
        };
        let timeouts = &shared.backend_settings.send;
        sender.first_read_at_most(peer.first_read());
        match sender
            .send(rewrite::head(&parts, &rewritten), &fwd, body, timeouts)
            .await
        {
            Ok(mut resp) => {
                let rewrite = rb.spec.rewrite.as_deref();
                if let Some(rw) = rewrite.filter(|rw| rw.touches_response()) {
                    let heads = (&parts, rewrite::head(&parts, &rewritten));
                    rewrite::response_of(rw, &mut resp, heads, route, peer.tls);
                }
                let sent = Sent {
                    route,
                    backend: rb,
                    sender,
                    start,
                    in_flight,
                    attempts: attempts.retries + 1,
                };
                // Only the lb's own cookie is ever issued.
                let issue = match route.sticky {
                    Some(Sticky::LbCookie(_)) => {
                        affinity_of(route, &parts, &request_id).filter(|a| a.issued)
                    }
                    _ => None,
                };
                let mut resp = respond(shared, sent, resp, upgrade, request_id);
                if let Some(a) = issue {
                    issue_cookie(route, a, peer.tls, resp.headers_mut());
                }
                return resp;
            }
            Err(e) => {
                drop(in_flight);
                if !attempts.failed(shared, route, i, e) {
                    break;
                }
            }
        }
    }
    give_up(shared, route, attempts.last, request_id)
}

/// One request's attempts: the backends tried, the retries spent, the body kept for the next
/// attempt, and why the last one failed.
struct Attempts {
    tried: Tried,
    retries: u32,
    stale: u32,
    /// Backends passed over for being at their cap.
    full: u32,
    /// A request may be replayed after it reached a backend only when it is idempotent and has
    /// no body we would have streamed away; a connect failure is retried whatever the method.
    replayable: bool,
    body: Option<UpstreamBody>,
    last: LocalReason,
}

impl Attempts {
    fn new(parts: &http::request::Parts, body: Incoming, cfg: &Config) -> Attempts {
        let bodyless = http_body::Body::is_end_stream(&body);
        Attempts {
            tried: Tried::default(),
            retries: 0,
            stale: 0,
            full: 0,
            replayable: bodyless && is_idempotent(&parts.method) && cfg.retries > 0,
            body: Some(if bodyless {
                UpstreamBody::Empty
            } else {
                UpstreamBody::limited(body, cfg.max_body_bytes)
            }),
            last: LocalReason::NoBackend,
        }
    }

    /// Settles a send that ended without a response: counts it, blames the backend when it
    /// is the backend's fault, and returns whether to try again (with the body restored).
    fn failed(&mut self, shared: &Shared, route: &Route, i: usize, e: SendError) -> bool {
        let m = &shared.metrics;
        let backend = &route.backends[i].backend;
        let reason = match e {
            SendError::NotSent(b) => {
                // The pooled connection closed before the request went out (a keep-alive
                // race): nothing reached the backend, so it is safe to try again, without
                // spending a retry.
                self.body = Some(b);
                m.upstream_errors.inc(UpstreamErrorKind::StaleConnection);
                if self.stale < MAX_STALE_RETRIES {
                    self.stale += 1;
                    self.tried.forget(i);
                    return true;
                }
                self.last = LocalReason::UpstreamError;
                return false;
            }
            SendError::Failed(e) if unacknowledged(&*e) => {
                // Its host stopped acknowledging (TCP_USER_TIMEOUT) or was reported
                // unreachable: dead or cut off. Its other connections are as dead, so it is
                // ejected until Consul's failure detection takes it out of the table, and the
                // retry avoids its node's other instances.
                self.tried.mark_silent(i);
                self.last = LocalReason::UpstreamError;
                m.upstream_errors.inc(UpstreamErrorKind::Unacknowledged);
                let kind = UpstreamErrorKind::Unacknowledged;
                held_against(
                    shared,
                    route,
                    backend,
                    kind,
                    "its host stopped acknowledging",
                );
                RetryReason::Reset
            }
            SendError::Failed(e) => {
                self.last = LocalReason::UpstreamError;
                m.upstream_errors.inc(UpstreamErrorKind::Reset);
                tracing::debug!(backend = %backend.addr, error = %e, "upstream request failed");
                RetryReason::Reset
            }
            SendError::ClientBody(BodyError::TooLarge) => {
                // Past LB_MAX_BODY_BYTES: the backend's request is cut off unfinished.
                self.last = LocalReason::BodyTooLarge;
                return false;
            }
            SendError::ClientBody(e) => {
                // The client stopped sending its body; hyper counts its connection's error.
                // Nothing to retry and no backend to blame.
                self.last = LocalReason::BadRequest;
                tracing::debug!(backend = %backend.addr, error = %e, "client request body broke off");
                return false;
            }
            SendError::ClientBodyTimedOut => {
                // The client stopped sending its body: a 408, never held against the backend.
                self.last = LocalReason::ClientTimeout;
                tracing::debug!(backend = %backend.addr, "client request body timed out");
                return false;
            }
            SendError::TimedOut => {
                self.last = LocalReason::UpstreamTimeout;
                m.upstream_errors.inc(UpstreamErrorKind::ResponseTimeout);
                held_against(
                    shared,
                    route,
                    backend,
                    UpstreamErrorKind::ResponseTimeout,
                    "no response within the response timeout",
                );
                RetryReason::Timeout
            }
        };
        if self.replayable && may_retry(shared, &mut self.retries, reason) {
            self.body = Some(UpstreamBody::Empty);
            return true;
        }
        false
    }
}

/// A sticky route's session key for this request (see `affinity::of`).
#[inline]
fn affinity_of(
    route: &Route,
    parts: &http::request::Parts,
    request_id: &HeaderValue,
) -> Option<Affinity> {
    let sticky = route.sticky.as_ref()?;
    affinity::of(sticky, &parts.headers, request_id)
}

/// The next backend to try: on the ring for a request with a session key, else by the
/// balancing algorithm.
#[inline]
fn pick(
    route: &Route,
    (cfg, peer): (&Config, &Peer),
    parts: &http::request::Parts,
    request_id: &HeaderValue,
    tried: &Tried,
) -> Option<usize> {
    let may_pin = match cfg.version_pin {
        VersionPin::Any => true,
        VersionPin::Trusted => peer.trusted,
        VersionPin::Off => false,
    };
    let pin = if route.versioned && may_pin {
        pin_of(&parts.headers)
    } else {
        Pin::Lit
    };
    match affinity_of(route, parts, request_id) {
        Some(a) => route.pick_affine(a.key, tried, pin, cfg.affinity_balance_permille),
        None => route.pick(cfg.balance, tried, pin),
    }
}

/// The request's version pin: the `X-Switchyard-Version` header, else the `sy-version`
/// cookie (so that a browser can be pinned too).
fn pin_of(headers: &http::HeaderMap) -> Pin<'_> {
    headers
        .get(VERSION_HEADER)
        .map(HeaderValue::as_bytes)
        .or_else(|| affinity::cookie(headers, VERSION_COOKIE))
        .map_or(Pin::Lit, Pin::Version)
}

/// The lb's affinity cookie for a client that had none, on the route's path.
fn issue_cookie(route: &Route, a: Affinity, tls: bool, headers: &mut http::HeaderMap) {
    if let Some(Sticky::LbCookie(name)) = &route.sticky {
        if let Some(c) = set_cookie(name, a.key, &route.key.prefix, tls) {
            headers.append(header::SET_COOKIE, c);
        }
    }
}

/// A failure that is the backend's: counted towards its ejection, and said when it ejects.
fn held_against(
    shared: &Shared,
    route: &Route,
    backend: &Backend,
    kind: UpstreamErrorKind,
    why: &'static str,
) {
    if backend.record_failure(&shared.backend_settings, kind) {
        shared.metrics.ejections.inc();
        tracing::warn!(backend = %backend.addr, route = %route.name, why, "backend ejected");
    }
}

/// Whether a send failed because the peer stopped acknowledging: the kernel's ETIMEDOUT on
/// an established connection, which only TCP_USER_TIMEOUT (or minutes of retransmission)
/// produces. By kind, not only by OS code: the HTTP/2 stack rebuilds I/O errors from their
/// kind. (Connect and response timeouts never get here: they are timers of the lb's own.)
fn unacknowledged(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if crate::upstream::from_silent_host(io) {
                return true;
            }
            // An OS error wrapped in another io::Error is its payload, not its source.
            cause = io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static));
            continue;
        }
        cause = c.source();
    }
    false
}

/// A connection to `backend` could not be had: counted, and held against the backend.
fn connect_failed(shared: &Shared, route: &Route, backend: &Backend, e: ConnectError) {
    let kind = if matches!(e, ConnectError::Timeout { .. }) {
        UpstreamErrorKind::ConnectTimeout
    } else {
        UpstreamErrorKind::Connect
    };
    shared.metrics.upstream_errors.inc(kind);
    if backend.record_failure(&shared.backend_settings, kind) {
        shared.metrics.ejections.inc();
        tracing::warn!(backend = %backend.addr, route = %route.name, error = %e, "backend ejected");
    } else {
        tracing::debug!(backend = %backend.addr, error = %e, "upstream connect failed");
    }
}

/// An attempt that got a response head.
struct Sent<'a> {
    route: &'a Arc<Route>,
    backend: &'a RouteBackend,
    sender: Sender,
    start: Instant,
    in_flight: InFlight,
    attempts: u32,
}

/// The backend's response on its way to the client: counted, stripped of hop-by-hop fields,
/// tunnelled when both sides switched protocols, and guarded until its body ends.
fn respond(
    shared: &Arc<Shared>,
    sent: Sent<'_>,
    resp: Response<Upstream>,
    mut upgrade: Option<Upgrade>,
    request_id: HeaderValue,
) -> Response<ProxyBody> {
    let Sent {
        route,
        backend: rb,
        sender,
        start,
        in_flight,
        attempts,
    } = sent;
    let backend = &rb.backend;
    backend.record_success();
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let (mut rparts, mut rbody) = resp.into_parts();
    rb.count_response(StatusClass::of(rparts.status), &route.name, &shared.metrics);
    let accepted_upgrade = switching.then(|| rparts.headers.get(header::UPGRADE).cloned());
    strip_hop_by_hop(&mut rparts.headers);
    // A backend's own id is as unique as ours: never indexed either (`super::request_id`).
    match rparts.headers.entry(X_REQUEST_ID) {
        http::header::Entry::Occupied(mut id) => id.get_mut().set_sensitive(true),
        http::header::Entry::Vacant(v) => {
            v.insert(request_id);
        }
    }
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
        in_flight,
        route: route.clone(),
        start,
        sender,
        attempts,
    };
    Response::from_parts(
        rparts,
        ProxyBody::Upstream {
            inner: rbody,
            guard,
        },
    )
}

/// The answer when no attempt got a response, from why the last one failed.
fn give_up(
    shared: &Shared,
    route: &Route,
    last: LocalReason,
    request_id: HeaderValue,
) -> Response<ProxyBody> {
    let msg = match last {
        LocalReason::UpstreamConnect => "no backend accepted the connection",
        LocalReason::UpstreamTimeout => "the backend did not answer in time",
        LocalReason::UpstreamError => "the backend closed the connection without a response",
        LocalReason::BadRequest => "the request body broke off or was malformed",
        LocalReason::ClientTimeout => "the request body did not arrive in time",
        LocalReason::BodyTooLarge => "the request body is larger than this route accepts",
        LocalReason::BackendFull => "every backend is at its connection limit",
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
