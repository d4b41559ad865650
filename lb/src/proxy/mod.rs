//! The request path: find the route in the current table, pick a backend, forward on a pooled
//! connection, retry when it is safe, and stream the response back.
//!
//! It reads the table through one `ArcSwap` load and takes no lock. Errors become responses
//! (404, 502, 503, 504) counted under a reason; nothing here panics on client input.

mod affinity;
mod body;
mod forward;
mod forwarded;
mod headers;
mod local;
mod logged;
mod path;
mod peer;
mod rewrite;
mod upgrade;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;

pub use body::{ProxyBody, ResponseGuard};
pub use forwarded::{Forwarded, X_FORWARDED_FOR};
pub use path::normalize as normalize_path;
pub use peer::{Drain, Exchanges, Peer, Slot};

use crate::field_list;
use crate::metrics::LocalReason;
use crate::routing::Route;
use crate::Shared;
use forward::forward;
use forwarded::X_REQUEST_ID;
use headers::{strip_request_hop_by_hop, to_http1_form};
use local::{local, redirect_to_https};
use upgrade::{upgrade_request, Upgrade, UpgradePin};

/// Whether the access log samples the next request: the server then serves it with
/// `handle_logged` instead of `handle`. (Deciding there keeps the two futures apart: a
/// function returning either would move the request's large future on every request.)
pub fn sampled(shared: &Shared) -> bool {
    shared.access_log.as_ref().is_some_and(|log| log.sampled())
}

/// `handle`, with the request's record kept and handed to the access log when its response
/// ends. Boxed: the record would otherwise grow every request's future, logged or not.
pub fn handle_logged(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: Arc<Peer>,
) -> Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>> {
    Box::pin(logged::serve(shared, req, peer))
}

/// Serves one request. Never fails: every error is a response.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: Arc<Peer>,
) -> Response<ProxyBody> {
    let request_id = request_id(req.headers());
    let (mut parts, body) = req.into_parts();
    // The lb's own answers; the request id is cloned only on these paths.
    let answer =
        |reason, route: &str, msg: &str| local(&shared, reason, route, msg, request_id.clone());

    if let Err(why) = admit(&mut parts) {
        return answer(LocalReason::BadRequest, "", why);
    }
    let host = match request_host(&parts.uri, &parts.headers, parts.version) {
        Ok(host) => host,
        Err(why) => return answer(LocalReason::BadRequest, "", why),
    };
    if !peer.tls && shared.config.https_redirect {
        return redirect_to_https(&shared, &host, &parts.uri, request_id);
    }
    let route = match find_route(&shared, &host, parts.uri.path()) {
        Ok(route) => route,
        Err((reason, msg)) => return answer(reason, "", &msg),
    };
    if !peer.tls && route.redirect_https {
        return redirect_to_https(&shared, &host, &parts.uri, request_id);
    }
    drop(host);
    // A declared length over the limit is refused before any backend sees the request; a body
    // of unknown length is cut off where it passes the limit (`UpstreamBody::limited`).
    if body_over_limit(&shared, &body) {
        let msg = "the request body is larger than this route accepts";
        return answer(LocalReason::BodyTooLarge, &route.name, msg);
    }
    if route.backends.is_empty() {
        let msg = "no healthy backend for this route";
        return answer(LocalReason::NoBackend, &route.name, msg);
    }

    // Most requests carry no hop-by-hop field (`Connection`, `Upgrade`...): one pass over the
    // names, cheaper than looking each up, spares them both the upgrade and the removal, and
    // a `Connection: close` without an `Upgrade` the reading of an offer.
    let hop = headers::HopByHop::of(&parts.headers);
    let offer = hop
        .may_upgrade()
        .then(|| {
            upgrade_request(
                &parts.headers,
                parts.version,
                &shared.config.upgrade_protocols,
                &route.upgrades,
            )
        })
        .flatten()
        .map(|protocol| (protocol, UpgradePin::new(&peer)));
    strip_request_hop_by_hop(&mut parts.headers, hop);
    let upgrade = offer.and_then(|offer| Upgrade::carry(offer, &mut parts, &peer));
    to_http1_form(&mut parts);
    shared.retry_budget.deposit();

    forward(&shared, &route, &peer, parts, body, request_id, upgrade).await
}

/// The route for a host and path in the current table, or why there is none.
fn find_route(
    shared: &Shared,
    host: &str,
    path: &str,
) -> Result<Arc<Route>, (LocalReason, Cow<'static, str>)> {
    let Some(table) = shared.table.load_full() else {
        return Err((LocalReason::NoTable, "no routing table loaded yet".into()));
    };
    match table.lookup(host, &path::without_params(path)) {
        Some(route) => Ok(route.clone()),
        None => {
            let msg = format!("no route for host {host:?} path {path:?}");
            Err((LocalReason::NoRoute, msg.into()))
        }
    }
}

/// The request's host, lower-case and without port. `None` when an HTTP/1.1 request has no
/// usable host, which RFC 9112 makes a 400. Borrowed unless it needs lower-casing, so the
/// common request allocates nothing here.
///
/// The name routed on is the name the backend gets (`to_http1_form` sets `Host` from the
/// same source): an absolute-form target's authority wins over a `Host` field (RFC 9112
/// 3.2.2); in HTTP/2, a `Host` naming another authority than `:authority` is malformed (RFC
/// 9113 8.3.1); two `Host` fields are a 400 (RFC 9112 3.2).
fn request_host<'a>(
    uri: &'a Uri,
    headers: &'a HeaderMap,
    version: Version,
) -> Result<Cow<'a, str>, &'static str> {
    let mut fields = headers.get_all(header::HOST).iter();
    let field = fields.next();
    if fields.next().is_some() {
        return Err("more than one Host header");
    }
    let raw = match (uri.authority(), field) {
        (Some(authority), field) => {
            if version == Version::HTTP_2
                && field.is_some_and(|f| {
                    !f.as_bytes()
                        .eq_ignore_ascii_case(without_userinfo(authority).as_bytes())
                })
            {
                return Err("the Host header names another authority than :authority");
            }
            authority.host()
        }
        (None, Some(v)) => {
            let s = v.to_str().map_err(|_| "invalid Host header")?;
            // RFC 9112 3.2: a Host that is no `uri-host [":" port]` is a 400; passed on, the
            // backend could read another name in it than the one routed on.
            host_of(s).ok_or("invalid Host header")?
        }
        (None, None) if version == Version::HTTP_11 => return Err("missing Host header"),
        (None, None) => "",
    };
    let host = raw.trim_end_matches('.');
    Ok(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

/// The host of a Host field value without its port, when the value is `uri-host [":" port]`
/// (RFC 9110 7.2, RFC 3986 3.2.2): a reg-name (unreserved, pct-encoded, sub-delims) or a
/// bracketed IP literal, then digits. Empty is allowed (a target without an authority). One
/// pass over the bytes: this runs for every request.
fn host_of(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    let end = if b.first() == Some(&b'[') {
        let close = b.iter().position(|&c| c == b']')?;
        let inner = &b[1..close];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|&c| c == b':' || c != b'%' && reg_name_byte(c))
        {
            return None;
        }
        close + 1
    } else {
        b.iter().position(|&c| !reg_name_byte(c)).unwrap_or(b.len())
    };
    match &b[end..] {
        [] => Some(&s[..end]),
        [b':', port @ ..] if port.iter().all(u8::is_ascii_digit) => Some(&s[..end]),
        _ => None,
    }
}

/// unreserved / pct-encoded (its `%`) / sub-delims (RFC 3986 2).
fn reg_name_byte(b: u8) -> bool {
    matches!(b,
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9'
        | b'-' | b'.' | b'_' | b'~' | b'%'
        | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=')
}

/// Refuses requests no backend may see, and puts the path in the one form it is both routed
/// and forwarded in (`path`). CONNECT asks a forward proxy for a tunnel: a reverse proxy that
/// passed it on would open one to wherever the backend reaches (and an HTTP/2 CONNECT without
/// `:authority` is malformed besides, RFC 9113 8.5).
fn admit(parts: &mut http::request::Parts) -> Result<(), &'static str> {
    if parts.method == Method::CONNECT {
        return Err("CONNECT is not served: this is a reverse proxy");
    }
    if parts.version == Version::HTTP_2 {
        if let Some(why) = headers::malformed_h2(&parts.headers) {
            return Err(why);
        }
    }
    if let Cow::Owned(normal) = path::normalize(parts.uri.path())? {
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        let target = match uri.path_and_query.as_ref().and_then(|pq| pq.query()) {
            Some(q) => format!("{normal}?{q}"),
            None => normal,
        };
        uri.path_and_query = Some(target.parse().map_err(|_| "invalid request target")?);
        parts.uri = Uri::from_parts(uri).map_err(|_| "invalid request target")?;
    }
    Ok(())
}

/// Whether the body's declared length is over `LB_MAX_BODY_BYTES`.
fn body_over_limit(shared: &Shared, body: &Incoming) -> bool {
    shared
        .config
        .max_body_bytes
        .is_some_and(|limit| http_body::Body::size_hint(body).lower() > limit)
}

/// `host[:port]` of an authority; userinfo is never forwarded (RFC 9110 4.2.4).
pub(super) fn without_userinfo(authority: &http::uri::Authority) -> &str {
    let a = authority.as_str();
    a.rsplit_once('@').map_or(a, |(_, host)| host)
}

/// The request's id: the client's when sane, else a new one. Marked sensitive, which HTTP/2's
/// header compression reads as "never index" (RFC 7541 6.2.3): a value seen once would only
/// push reusable fields out of the connection's table, and every later id was compared with
/// every id still in it (2.4% of the lb's CPU on HTTP/2 over TLS, 16 x 16 streams).
#[inline]
fn request_id(headers: &HeaderMap) -> HeaderValue {
    let mut id = match field_list::lines(headers, &X_REQUEST_ID).next() {
        Some(v)
            if !v.is_empty()
                && v.len() <= 128
                && v.as_bytes().iter().all(|c| c.is_ascii_graphic()) =>
        {
            v.clone()
        }
        _ => {
            // Two digits a byte from a table: a digit a nibble, shifted out of a `u128`, cost
            // 155 instructions a request; `from_bytes` would check every digit again.
            let mut buf = [0u8; 32];
            for (pair, byte) in buf
                .chunks_exact_mut(2)
                .zip(fastrand::u128(..).to_le_bytes())
            {
                pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
            }
            // SAFETY: hex digits are visible ASCII, which a header value may hold.
            unsafe { HeaderValue::from_maybe_shared_unchecked(Bytes::copy_from_slice(&buf)) }
        }
    };
    id.set_sensitive(true);
    id
}

/// The two lower-case hex digits of every byte.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    pairs
};

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
            request_host(&uri.parse().unwrap(), &headers, v)
                .ok()
                .map(Cow::into_owned)
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
        assert_eq!(h("/", Some(""), Version::HTTP_11).as_deref(), Some(""));
        assert_eq!(
            h("/", Some("a-b.example.:8080"), Version::HTTP_11).as_deref(),
            Some("a-b.example")
        );
        // Not `uri-host [":" port]`: refused.
        for bad in [
            "a b",
            "a/b",
            "a?b",
            "a#b",
            "u@a.example",
            "a.example:8o",
            "a:1:2",
            "[::1",
            "[]",
            "[::1]x",
            "a\\b",
            "a\"b",
        ] {
            assert_eq!(h("/", Some(bad), Version::HTTP_11), None, "{bad}");
        }
        // The target's authority wins over Host in HTTP/1.1; in HTTP/2 they must agree.
        assert_eq!(
            h(
                "http://public.example/",
                Some("admin.internal"),
                Version::HTTP_11
            )
            .as_deref(),
            Some("public.example")
        );
        assert_eq!(
            h(
                "http://u:p@a.example:81/",
                Some("a.example:81"),
                Version::HTTP_2
            )
            .as_deref(),
            Some("a.example")
        );
        assert_eq!(
            h(
                "http://public.example/",
                Some("admin.internal"),
                Version::HTTP_2
            ),
            None
        );
        let mut two = HeaderMap::new();
        two.append(header::HOST, HeaderValue::from_static("a.example"));
        two.append(header::HOST, HeaderValue::from_static("a.example"));
        let uri: Uri = "/".parse().unwrap();
        assert!(request_host(&uri, &two, Version::HTTP_11).is_err());
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("api.example.com:80"));

        assert!(matches!(
            request_host(&uri, &headers, Version::HTTP_11),
            Ok(Cow::Borrowed("api.example.com"))
        ));
    }

    #[test]
    fn request_ids_pass_through_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("client-id-1"));
        assert_eq!(request_id(&h), "client-id-1");
        assert!(request_id(&h).is_sensitive(), "never indexed by HPACK");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        let generated = request_id(&h);
        assert_eq!(generated.len(), 32);
        let hex = |c: &u8| matches!(c, b'0'..=b'9' | b'a'..=b'f');
        assert!(generated.as_bytes().iter().all(hex), "{generated:?}");
        assert_eq!((HEX_PAIRS[0], HEX_PAIRS[0x9f]), (*b"00", *b"9f"));
        assert_eq!((HEX_PAIRS[0xa0], HEX_PAIRS[0xff]), (*b"a0", *b"ff"));
        assert!(generated.is_sensitive(), "never indexed by HPACK");
        assert_ne!(generated, request_id(&HeaderMap::new()));
    }

    /// The bytes of the future that serves one request: hyper keeps it allocated for each
    /// client connection, and moving it costs a copy per poll that moves it. Pinned here so a
    /// change that grows it shows (test build: 2,584 bytes before the layering; 2,544 with
    /// `forward` split into parts; 2,560 with the in-flight guard held across the send; 2,528
    /// with the send's timeouts passed by reference; 2,632 with the request body's byte limit
    /// carried with the body and its error: 104 bytes per client connection, 1 MiB at 10,000;
    /// 2,312 with the HTTP/2 send, and its split deadlines, boxed apart; 2,320 with the
    /// pointer to an instance's rewritten head: 8 bytes per client connection, 80 KB at
    /// 10,000). Raise it only with a measurement of what it costs.
    const REQUEST_FUTURE_MAX: usize = 2320;

    #[tokio::test]
    async fn request_future_size_is_pinned() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let config = crate::config::Config::from_lookup(|_| None).unwrap();
        let shared = Arc::new(Shared::new(config));
        let peer = Arc::new(Peer::outside("127.0.0.1:1".parse().unwrap(), false, false));
        let size = Arc::new(AtomicUsize::new(0));
        let (client, server) = tokio::io::duplex(4096);
        let seen = size.clone();
        let service = hyper::service::service_fn(move |req| {
            let fut = handle(shared.clone(), req, peer.clone());
            seen.store(std::mem::size_of_val(&fut), Ordering::Relaxed);
            async move { Ok::<_, std::convert::Infallible>(fut.await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let ask = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut client = client;
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        };
        let (_, answer) = tokio::join!(conn, ask);
        assert!(answer.starts_with(b"HTTP/1.1 503"), "no table yet: 503");
        let size = size.load(Ordering::Relaxed);
        println!("request future: {size} bytes");
        assert!(
            size > 0 && size <= REQUEST_FUTURE_MAX,
            "the request future grew to {size} bytes (pinned at {REQUEST_FUTURE_MAX})"
        );
    }
}
