//! The request path: find the route in the current table, pick a backend, forward on a pooled
//! connection, retry when it is safe, and stream the response back.
//!
//! It reads the table through one `ArcSwap` load and takes no lock. Errors become responses
//! (404, 502, 503, 504) counted under a reason; nothing here panics on client input.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};

use crate::backend::{SendError, Sender};
use crate::body::{ProxyBody, ResponseGuard, Upstream, UpstreamBody};
use crate::routing::{Route, Tried};
use crate::Shared;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop fields (RFC 9110 7.6.1) besides those a `Connection` header names.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Pooled connections found closed at send time, retried without spending a retry: nothing
/// reached a backend. Bounded in case every pooled connection of a backend went stale at once.
const MAX_STALE_RETRIES: u32 = 4;

/// Retries allowed as a share of requests, so that a failing fleet is not hit by a retry storm.
/// Balances are kept in thousandths of a retry in one atomic.
pub struct RetryBudget {
    balance: AtomicI64,
    deposit: i64,
}

const RETRY_COST: i64 = 1000;
const RETRY_RESERVE: i64 = 10 * RETRY_COST;
const RETRY_CAP: i64 = 100 * RETRY_COST;

impl RetryBudget {
    pub fn new(ratio: f64) -> RetryBudget {
        RetryBudget {
            balance: AtomicI64::new(RETRY_RESERVE),
            deposit: (ratio * RETRY_COST as f64) as i64,
        }
    }

    fn deposit(&self) {
        if self.deposit > 0 && self.balance.load(Ordering::Relaxed) < RETRY_CAP {
            self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= RETRY_COST).then_some(b - RETRY_COST)
            })
            .is_ok()
    }
}

/// Why the lb answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalReason {
    NoTable,
    NoRoute,
    NoBackend,
    BadRequest,
    UpstreamConnect,
    UpstreamTimeout,
    UpstreamError,
}

impl LocalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalReason::NoTable => "no_table",
            LocalReason::NoRoute => "no_route",
            LocalReason::NoBackend => "no_backend",
            LocalReason::BadRequest => "bad_request",
            LocalReason::UpstreamConnect => "upstream_connect",
            LocalReason::UpstreamTimeout => "upstream_timeout",
            LocalReason::UpstreamError => "upstream_error",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            LocalReason::NoRoute => StatusCode::NOT_FOUND,
            LocalReason::BadRequest => StatusCode::BAD_REQUEST,
            LocalReason::NoTable | LocalReason::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            LocalReason::UpstreamConnect | LocalReason::UpstreamError => StatusCode::BAD_GATEWAY,
            LocalReason::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// A listener's drain, as connections and tunnels see it: holding `alive` keeps the drain
/// waiting; `close` turns true when the drain's time is up.
#[derive(Clone)]
pub struct Drain {
    pub alive: mpsc::Sender<Infallible>,
    pub close: watch::Receiver<bool>,
}

/// The client end of a connection, with its address already rendered as the header value
/// `X-Forwarded-For` needs: once per connection rather than once per request.
pub struct Peer {
    pub addr: SocketAddr,
    ip: HeaderValue,
    pub tls: bool,
    drain: Drain,
    pub exchanges: crate::parking::Exchanges,
}

impl Peer {
    pub fn new(addr: SocketAddr, tls: bool, drain: Drain) -> Peer {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .expect("an IP address is a valid header value");
        Peer {
            addr,
            ip,
            tls,
            drain,
            exchanges: Default::default(),
        }
    }
}

/// Serves one request. Never fails: every error is a response.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: Arc<Peer>,
) -> Response<ProxyBody> {
    let request_id = request_id(req.headers());
    let (mut parts, body) = req.into_parts();

    let Some(host) = request_host(&parts.uri, &parts.headers, parts.version) else {
        return local(
            &shared,
            LocalReason::BadRequest,
            "",
            "missing or invalid Host header",
            request_id,
        );
    };
    if !peer.tls && shared.config.https_redirect {
        return redirect_to_https(&shared, &host, &parts.uri, request_id);
    }
    let route = {
        let Some(table) = shared.table.load_full() else {
            return local(
                &shared,
                LocalReason::NoTable,
                "",
                "no routing table loaded yet",
                request_id,
            );
        };
        match table.lookup(&host, parts.uri.path()) {
            Some(route) => route.clone(),
            None => {
                let msg = format!("no route for host {host:?} path {:?}", parts.uri.path());
                return local(&shared, LocalReason::NoRoute, "", &msg, request_id);
            }
        }
    };
    if !peer.tls && route.redirect_https {
        return redirect_to_https(&shared, &host, &parts.uri, request_id);
    }
    drop(host);
    if route.backends.is_empty() {
        return local(
            &shared,
            LocalReason::NoBackend,
            &route.name,
            "no healthy backend for this route",
            request_id,
        );
    }

    let upgrade = upgrade_request(&parts.headers, parts.version);
    if upgrade.is_some() {
        peer.exchanges.pin();
    }
    strip_request_hop_by_hop(&mut parts.headers);
    let upgrade = upgrade.and_then(|protocol| {
        let on_client = parts.extensions.remove::<OnUpgrade>()?;
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
        Some(Upgrade {
            protocol,
            on_client,
            peer: peer.clone(),
        })
    });
    to_http1_form(&mut parts);
    shared.retry_budget.deposit();

    forward(&shared, &route, &peer, parts, body, request_id, upgrade).await
}

/// A client's request to switch protocols (WebSocket and the like), carried to the backend.
struct Upgrade {
    /// The `Upgrade` header value.
    protocol: HeaderValue,
    on_client: OnUpgrade,
    peer: Arc<Peer>,
}

/// The `Upgrade` header of an HTTP/1.1 request whose `Connection` header asks for it.
fn upgrade_request(headers: &HeaderMap, version: Version) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let asks = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// HTTP/1.1 to the backend: origin-form target and a Host header (HTTP/2 clients carry the
/// host in `:authority` only).
fn to_http1_form(parts: &mut http::request::Parts) {
    if let Some(authority) = parts.uri.authority() {
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;
}

/// HTTP/2 to the backend: the host moves from the Host header into `:authority`, and the
/// HTTP/1-only upgrade fields go.
fn to_http2_form(parts: &mut http::request::Parts) {
    if parts.uri.authority().is_none() {
        let host = parts.headers.remove(header::HOST);
        let authority = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if let Ok(uri) = Uri::try_from(format!("http://{authority}{pq}")) {
            parts.uri = uri;
        }
    }
    parts.headers.remove(header::CONNECTION);
    parts.headers.remove(header::UPGRADE);
    parts.version = Version::HTTP_2;
}

async fn forward(
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
                let kind = if matches!(e, crate::backend::ConnectError::Timeout { .. }) {
                    "connect_timeout"
                } else {
                    "connect"
                };
                shared
                    .metrics
                    .upstream_errors
                    .with_label_values(&[kind])
                    .inc();
                if backend.record_failure(&shared.backend_settings) {
                    shared.metrics.ejections.inc();
                    tracing::warn!(backend = %backend.addr, route = %route.name, error = %e, "backend ejected");
                } else {
                    tracing::debug!(backend = %backend.addr, error = %e, "upstream connect failed");
                }
                if may_retry(shared, &mut retries, "connect") {
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
                    .with_label_values(&["stale_connection"])
                    .inc();
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
                shared
                    .metrics
                    .upstream_errors
                    .with_label_values(&["reset"])
                    .inc();
                tracing::debug!(backend = %backend.addr, error = %e, "upstream request failed");
                if replayable && may_retry(shared, &mut retries, "reset") {
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
                    .with_label_values(&["response_timeout"])
                    .inc();
                if backend.record_failure(&shared.backend_settings) {
                    shared.metrics.ejections.inc();
                    tracing::warn!(backend = %backend.addr, route = %route.name, "backend ejected after response timeout");
                }
                if replayable && may_retry(shared, &mut retries, "timeout") {
                    body = Some(UpstreamBody::Empty);
                    continue;
                }
                break;
            }
        };

        backend.record_success();
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let (mut rparts, mut rbody) = resp.into_parts();
        let class = (rparts.status.as_u16() / 100).clamp(1, 5) as usize - 1;
        rb.count_response(class, &route.name, &shared.metrics);
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

/// Copies bytes both ways between the client and the backend once both sides switched
/// protocols, until either closes or the drain's time is up.
fn spawn_tunnel(
    shared: Arc<Shared>,
    up: Upgrade,
    (mut upstream, early): (tokio::net::TcpStream, Bytes),
    backend: String,
) {
    let label = if up.protocol.as_bytes().eq_ignore_ascii_case(b"websocket") {
        "websocket"
    } else {
        "other"
    };
    let Drain { alive, mut close } = up.peer.drain.clone();
    let client_addr = up.peer.addr;
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        let _alive = alive;
        let client = match up.on_client.await {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(%backend, error = %e, "upgrade did not complete");
                return;
            }
        };
        let metrics = &shared.metrics;
        metrics.upgrades.with_label_values(&[label]).inc();
        metrics.upgraded_open.inc();
        let mut client = TokioIo::new(client);
        tokio::select! {
            r = async {
                // What the backend sent right behind its 101 head goes first.
                client.write_all(&early).await?;
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await
            } => {
                if let Err(e) = r {
                    tracing::debug!(%backend, client = %client_addr, error = %e, "tunnel ended with an error");
                }
            }
            _ = async { let _ = close.wait_for(|c| *c).await; } => {
                let _ = client.shutdown().await;
                let _ = upstream.shutdown().await;
            }
        }
        metrics.upgraded_open.dec();
    });
}

fn may_retry(shared: &Shared, retries: &mut u32, reason: &'static str) -> bool {
    if *retries >= shared.config.retries {
        return false;
    }
    if !shared.retry_budget.withdraw() {
        shared.metrics.retry_budget_exhausted.inc();
        return false;
    }
    *retries += 1;
    shared.metrics.retries.with_label_values(&[reason]).inc();
    true
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The request's host, lower-case and without port. `None` when an HTTP/1.1 request has no
/// usable host, which RFC 9112 makes a 400. Borrowed unless it needs lower-casing, so the
/// common request allocates nothing here.
fn request_host<'a>(
    uri: &'a Uri,
    headers: &'a HeaderMap,
    version: Version,
) -> Option<Cow<'a, str>> {
    let raw = match uri.host() {
        Some(h) => h,
        None => match headers.get(header::HOST) {
            Some(v) => {
                let s = v.to_str().ok()?;
                // Strip a port, keeping bracketed IPv6 literals whole.
                match s.rfind(':') {
                    Some(i) if !s[i..].contains(']') => &s[..i],
                    _ => s,
                }
            }
            None if version == Version::HTTP_11 => return None,
            None => "",
        },
    };
    let host = raw.trim_end_matches('.');
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    let mut buf = [0u8; 32];
    let n = fastrand::u128(..);
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = b"0123456789abcdef"[((n >> (i * 4)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf).expect("hex is a valid header value")
}

/// Whether any hop-by-hop field is present. Most messages carry none: one pass over the
/// names costs less than hashing each of them for a removal.
fn has_hop_by_hop(headers: &HeaderMap) -> bool {
    headers.keys().any(|k| HOP_BY_HOP.contains(k))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !has_hop_by_hop(headers) {
        return;
    }
    if let Some(conn) = headers.get(header::CONNECTION) {
        if let Ok(s) = conn.to_str() {
            let named: Vec<HeaderName> = s
                .split(',')
                .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
                .collect();
            for name in named {
                headers.remove(name);
            }
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Removes the hop-by-hop fields of a request, all but `TE: trailers`, the one `TE` a proxy
/// passes on (gRPC needs it end to end).
fn strip_request_hop_by_hop(headers: &mut HeaderMap) {
    if !has_hop_by_hop(headers) {
        return;
    }
    let trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    strip_hop_by_hop(headers);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The fields the lb adds to every request it forwards: `X-Forwarded-For` (appended to),
/// `X-Forwarded-Proto`, `X-Forwarded-Host` (from `Host`) and `X-Request-Id` (replacing what
/// the client sent). The sender writes them: an HTTP/1.1 head gets them as it is encoded
/// (`h1::Conn`), with no insert into the request's header map; an HTTP/2 request gets them
/// through `add_to`.
pub struct Forwarded<'a> {
    /// The client's address, rendered once per connection.
    pub client_ip: &'a HeaderValue,
    pub tls: bool,
    pub request_id: &'a HeaderValue,
}

impl Forwarded<'_> {
    pub fn proto(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// Whether the lb sets this field itself, replacing the client's.
    pub fn replaces(name: &HeaderName) -> bool {
        *name == X_FORWARDED_PROTO || *name == X_FORWARDED_HOST || *name == X_REQUEST_ID
    }

    pub fn add_to(&self, headers: &mut HeaderMap) {
        let prev: Vec<&str> = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let xff = if prev.is_empty() {
            self.client_ip.clone()
        } else {
            let ip = self.client_ip.to_str().expect("built from an IP address");
            HeaderValue::from_str(&format!("{}, {ip}", prev.join(", ")))
                .unwrap_or_else(|_| self.client_ip.clone())
        };
        headers.insert(X_FORWARDED_FOR, xff);
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(self.proto()));
        match headers.get(header::HOST).cloned() {
            Some(host) => headers.insert(X_FORWARDED_HOST, host),
            None => headers.remove(X_FORWARDED_HOST),
        };
        headers.insert(X_REQUEST_ID, self.request_id.clone());
    }
}

/// A 308 to the same host and target over HTTPS; 308 keeps the method and body.
fn redirect_to_https(
    shared: &Shared,
    host: &str,
    uri: &Uri,
    request_id: HeaderValue,
) -> Response<ProxyBody> {
    let port = shared.config.https_port;
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = if port == 443 {
        format!("https://{host}{pq}")
    } else {
        format!("https://{host}:{port}{pq}")
    };
    let Ok(value) = HeaderValue::from_str(&location) else {
        return local(
            shared,
            LocalReason::BadRequest,
            "",
            "request target cannot be redirected",
            request_id,
        );
    };
    shared.metrics.https_redirects.inc();
    let mut resp = Response::new(ProxyBody::local(format!(
        "switchyard: this site is served over HTTPS: {location}\n"
    )));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    let h = resp.headers_mut();
    h.insert(header::LOCATION, value);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(X_REQUEST_ID, request_id);
    resp
}

fn local(
    shared: &Shared,
    reason: LocalReason,
    route: &str,
    msg: &str,
    request_id: HeaderValue,
) -> Response<ProxyBody> {
    shared
        .metrics
        .local_responses
        .with_label_values(&[route, reason.as_str()])
        .inc();
    let body = Bytes::from(format!("switchyard: {msg}\n"));
    let mut resp = Response::new(ProxyBody::local(body));
    *resp.status_mut() = reason.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(X_REQUEST_ID, request_id);
    h.insert(
        HeaderName::from_static("x-switchyard-error"),
        HeaderValue::from_static(reason.as_str()),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let h = |uri: &str, host: Option<&str>, v: Version| {
            let mut headers = HeaderMap::new();
            if let Some(host) = host {
                headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            }
            request_host(&uri.parse().unwrap(), &headers, v).map(Cow::into_owned)
        };
        assert_eq!(
            h("/", Some("API.example.com:8080"), Version::HTTP_11).as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            h("/", Some("[::1]:80"), Version::HTTP_11).as_deref(),
            Some("[::1]")
        );
        assert_eq!(
            h("/", Some("[::1]"), Version::HTTP_11).as_deref(),
            Some("[::1]")
        );
        assert_eq!(
            h("http://Abs.example/x", Some("other"), Version::HTTP_11).as_deref(),
            Some("abs.example")
        );
        assert_eq!(h("/", None, Version::HTTP_11), None);
        assert_eq!(h("/", None, Version::HTTP_10).as_deref(), Some(""));
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("api.example.com:80"));
        let uri: Uri = "/".parse().unwrap();
        assert!(matches!(
            request_host(&uri, &headers, Version::HTTP_11),
            Some(Cow::Borrowed("api.example.com"))
        ));
    }

    fn test_peer(tls: bool) -> Peer {
        let (alive, _) = mpsc::channel(1);
        let (_, close) = watch::channel(false);
        Peer::new(
            "127.0.0.2:5555".parse().unwrap(),
            tls,
            Drain { alive, close },
        )
    }

    #[test]
    fn hop_by_hop_and_forwarding_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert(header::HOST, HeaderValue::from_static("a.example"));
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.1.1.1"));
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("10.2.2.2"));
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("from-client"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        strip_request_hop_by_hop(&mut headers);
        let peer = test_peer(false);
        let id = HeaderValue::from_static("abc");
        let fwd = Forwarded {
            client_ip: &peer.ip,
            tls: peer.tls,
            request_id: &id,
        };
        fwd.add_to(&mut headers);
        for gone in ["connection", "x-secret", "keep-alive", "te"] {
            assert!(!headers.contains_key(gone), "{gone} kept");
        }
        assert_eq!(headers["x-forwarded-for"], "10.1.1.1, 10.2.2.2, 127.0.0.2");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "a.example");
        assert_eq!(headers["x-request-id"], "abc");
        assert_eq!(headers["x-kept"], "yes");

        let mut grpc = HeaderMap::new();
        grpc.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        strip_request_hop_by_hop(&mut grpc);
        assert_eq!(grpc["te"], "trailers", "gRPC's TE: trailers passes");
        let fwd = Forwarded { tls: true, ..fwd };
        fwd.add_to(&mut grpc);
        assert_eq!(grpc["x-forwarded-proto"], "https");
        assert!(!grpc.contains_key("x-forwarded-host"));
    }

    #[test]
    fn upgrade_requests_and_protocol_forms() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(
            upgrade_request(&h, Version::HTTP_11)
                .as_ref()
                .map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(upgrade_request(&h, Version::HTTP_10), None);
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        assert_eq!(upgrade_request(&h, Version::HTTP_11), None);

        let (mut parts, ()) = Request::get("/a?b=1").body(()).unwrap().into_parts();
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("svc.example:8080"));
        to_http2_form(&mut parts);
        assert_eq!(parts.uri, "http://svc.example:8080/a?b=1");
        assert!(!parts.headers.contains_key(header::HOST));
        to_http1_form(&mut parts);
        assert_eq!(parts.uri, "/a?b=1");
        assert_eq!(parts.headers[header::HOST], "svc.example:8080");
        assert_eq!(parts.version, Version::HTTP_11);
    }

    #[test]
    fn request_ids_pass_through_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("client-id-1"));
        assert_eq!(request_id(&h), "client-id-1");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        let generated = request_id(&h);
        assert_eq!(generated.len(), 32);
        assert_ne!(generated, request_id(&HeaderMap::new()));
    }

    #[test]
    fn retry_budget_has_a_reserve_and_refills_from_requests() {
        let b = RetryBudget::new(0.5);
        for _ in 0..10 {
            assert!(b.withdraw());
        }
        assert!(!b.withdraw());
        b.deposit();
        b.deposit();
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }
}
