//! Header edits a proxy must make between its two sides (RFC 9110 7.6.1): hop-by-hop fields
//! go, and the request takes the form of the protocol spoken to the backend.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};

use crate::field_list::{self, SCAN_NAMES_MAX};

pub(super) const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub(super) const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop fields (RFC 9110 7.6.1) besides those a `Connection` header names. `Trailer`
/// is not one (it was in RFC 2616's list): it declares the trailer fields end to end, and
/// hyper sends an HTTP/1.1 client the trailers it declares, when the client asked for them
/// with `TE: trailers`.
pub(super) const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const HOP_BY_HOP_COUNT: usize = 6;
// `HopByHop` gives each one a bit of a `u8`.
const _: () = assert!(HOP_BY_HOP_COUNT <= 8);

/// Why an HTTP/2 request is malformed (RFC 9113 8.1.1), for what the HTTP/2 layer lets
/// through: a field value with leading or trailing whitespace (8.2.1). Connection-specific
/// fields and bad pseudo-fields are refused below us, as stream errors.
pub(super) fn malformed_h2(headers: &HeaderMap) -> Option<&'static str> {
    let padded = |v: &HeaderValue| {
        let b = v.as_bytes();
        matches!(b.first(), Some(b' ' | b'\t')) || matches!(b.last(), Some(b' ' | b'\t'))
    };
    headers
        .values()
        .any(padded)
        .then_some("malformed HTTP/2 request: a field value with leading or trailing whitespace")
}

/// HTTP/1.1 to the backend: origin-form target and a Host header (HTTP/2 clients carry the
/// host in `:authority` only).
pub(super) fn to_http1_form(parts: &mut http::request::Parts) {
    if let Some(authority) = parts.uri.authority() {
        // The target's authority is what the request was routed on: it replaces any Host the
        // client sent (RFC 9112 3.2.2), so the backend sees the same name.
        if let Ok(v) = HeaderValue::from_str(super::without_userinfo(authority)) {
            parts.headers.insert(header::HOST, v);
        }
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
    } else if !field_list::present(&parts.headers, &header::HOST) {
        // HTTP/1.1 requires a Host field; with no authority to name, it is empty (RFC 9112
        // 3.2), as for an HTTP/1.0 client that sent none.
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static(""));
    }
    if parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    parts.version = Version::HTTP_11;
}

/// HTTP/2 may split `Cookie` into one field per cookie; an HTTP/1.1 message carries one,
/// joined with `; ` (RFC 9113 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// HTTP/2 to the backend: the host moves from the Host header into `:authority`, and the
/// HTTP/1-only upgrade fields go.
pub(super) fn to_http2_form(parts: &mut http::request::Parts) {
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

/// Which of [`HOP_BY_HOP`] a message carries, found in one pass over its names: bit `i` for
/// `HOP_BY_HOP[i]`. Most messages carry none, and the one pass then costs less than hashing
/// each name for a lookup; those that do carry one (a `Connection: close` on every request of
/// a client that does not keep connections) look up only what is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct HopByHop(u8);

impl HopByHop {
    const CONNECTION: u8 = 1 << 0;
    const TE: u8 = 1 << 3;
    const UPGRADE: u8 = 1 << 5;

    pub(super) fn of(headers: &HeaderMap) -> HopByHop {
        let mut present = 0;
        for k in headers.keys() {
            if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
                present |= 1 << i;
            }
        }
        HopByHop(present)
    }

    pub(super) fn any(self) -> bool {
        self.0 != 0
    }

    /// Both fields an HTTP/1.1 upgrade needs (RFC 9110 7.8): without them, no offer to read.
    pub(super) fn may_upgrade(self) -> bool {
        self.0 & (Self::CONNECTION | Self::UPGRADE) == Self::CONNECTION | Self::UPGRADE
    }
}

/// Removes a response's hop-by-hop fields.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let present = HopByHop::of(headers);
    if present.any() {
        strip_present(headers, present);
    }
}

fn strip_present(headers: &mut HeaderMap, present: HopByHop) {
    if present.0 & HopByHop::CONNECTION != 0 {
        // `HOP_BY_HOP[0]`, `Connection`: the options of every one of its lines name fields
        // that go too. The lines are copied out first (a copy shares their bytes), as the
        // map changes under them; past the first, rare, they take a vector.
        let mut lines = headers.get_all(header::CONNECTION).iter().cloned();
        let first = lines.next();
        let rest: Vec<HeaderValue> = lines.collect();
        for line in first.iter().chain(&rest) {
            for option in field_list::items(line) {
                // Host names the request's target, which the lb routed on (RFC 9112 3.2),
                // not anything of a hop's: `Connection: host` removed it, and the backend got
                // an empty one.
                if option.eq_ignore_ascii_case("host") {
                    continue;
                }
                // Names are kept in lower case; the option may be in any.
                let named = |k: &HeaderName| k.as_str().eq_ignore_ascii_case(option);
                // Up to `SCAN_NAMES_MAX` names, a pass over them finds nothing for the options
                // that name no field (`close`, by far the most common) without hashing.
                if headers.keys_len() <= SCAN_NAMES_MAX && !headers.keys().any(named) {
                    continue;
                }
                // Looked up by the text, not made into a `HeaderName`: a name that is not a
                // standard one costs no allocation.
                headers.remove(option);
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present.0 & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Removes the hop-by-hop fields of a request, all but `TE: trailers`, the one `TE` a proxy
/// passes on (gRPC needs it end to end). `present` is [`HopByHop::of`] these headers.
pub(super) fn strip_request_hop_by_hop(headers: &mut HeaderMap, present: HopByHop) {
    if !present.any() {
        return;
    }
    let trailers =
        present.0 & HopByHop::TE != 0 && field_list::contains(headers, &header::TE, "trailers");
    strip_present(headers, present);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    #[test]
    fn every_connection_line_names_fields_that_go() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("X-Hop, keep-alive"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("close", HeaderValue::from_static("2"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-end-to-end", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            left,
            ["x-end-to-end"],
            "the second Connection line was not read"
        );

        let mut h = HeaderMap::new();
        h.insert("x-end-to-end", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);

        // The target is no hop's to remove.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Host"));
        h.insert(header::HOST, HeaderValue::from_static("shop.example"));
        let present = HopByHop::of(&h);
        strip_request_hop_by_hop(&mut h, present);
        assert_eq!(h.get(header::HOST).unwrap(), "shop.example");
        assert_eq!(h.len(), 1);
    }

    /// Options are found by a pass over the names in small maps and by lookup in large ones;
    /// both remove what they name, in any case, and nothing else.
    #[test]
    fn connection_options_go_in_small_and_large_maps() {
        // Four names of the test's own: the scan's bound falls between the middle two.
        for extra in [
            0,
            SCAN_NAMES_MAX - 4,
            SCAN_NAMES_MAX - 3,
            SCAN_NAMES_MAX + 4,
        ] {
            let mut h = HeaderMap::new();
            for i in 0..extra {
                h.insert(
                    HeaderName::from_bytes(format!("x-field-{i}").as_bytes()).unwrap(),
                    HeaderValue::from_static("v"),
                );
            }
            h.insert(
                header::CONNECTION,
                HeaderValue::from_static("close,\tX-Hop , x-absent"),
            );
            h.insert("x-hop", HeaderValue::from_static("1"));
            h.insert("x-keep", HeaderValue::from_static("2"));
            h.insert(header::TE, HeaderValue::from_static("trailers, gzip"));
            let present = HopByHop::of(&h);
            strip_request_hop_by_hop(&mut h, present);
            assert_eq!(h.len(), extra + 2, "{extra} other fields");
            assert_eq!(h["x-keep"], "2");
            assert_eq!(h[header::TE], "trailers");
        }
        let mut h = HeaderMap::new();
        h.insert("x-end-to-end", HeaderValue::from_static("3"));
        assert!(!HopByHop::of(&h).any());
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        assert!(HopByHop::of(&h).any() && !HopByHop::of(&h).may_upgrade());
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(HopByHop::of(&h).may_upgrade());
    }

    #[test]
    fn http1_form_has_one_host_and_one_cookie() {
        let (mut parts, ()) = Request::get("/").body(()).unwrap().into_parts();
        parts.version = Version::HTTP_10;
        to_http1_form(&mut parts);
        assert_eq!(
            parts.headers[header::HOST],
            "",
            "HTTP/1.1 needs a Host, empty here"
        );

        let (mut parts, ()) = Request::get("http://a.example/x")
            .version(Version::HTTP_2)
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(())
            .unwrap()
            .into_parts();
        to_http1_form(&mut parts);
        let cookies: Vec<_> = parts.headers.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);
        assert_eq!(parts.headers[header::HOST], "a.example");
    }
}
