//! A request's session key on a sticky route (tag `sticky`): read from the lb's own cookie,
//! an application cookie or a header, or issued as a new lb cookie. The key is a hash; where it
//! goes is the routing table's (`Route::pick_affine`).
//!
//! The lb's cookie holds a random value, not a backend's name or address: nothing about the
//! backends leaks to clients, a forged value only picks a place on the ring, and a session
//! keeps its backend through scaling as far as consistent hashing allows.

use http::header::{self, HeaderMap, HeaderValue};
use switchyard_consul::tags::Sticky;

use crate::routing::affinity_hash;

/// A sticky request's key, and whether the lb made it up and must set its cookie (whose value
/// is the key in hex).
#[derive(Clone, Copy)]
pub(super) struct Affinity {
    pub key: u64,
    pub issued: bool,
}

/// The key of a request on a route with `sticky`, `None` when it carries none to follow (an
/// application cookie or a header that is absent): such a request is balanced as usual.
///
/// A request without the lb's cookie gets a key made from its request ID (random unless the
/// client sent one, and a client may pick its place on the ring anyway): so the key is the
/// same each time it is asked for, and nothing needs to be kept for it across the request's
/// attempts, which would grow every request's future.
pub(super) fn of(
    sticky: &Sticky,
    headers: &HeaderMap,
    request_id: &HeaderValue,
) -> Option<Affinity> {
    let found = match sticky {
        Sticky::LbCookie(name) | Sticky::Cookie(name) => cookie(headers, name),
        Sticky::Header(name) => headers.get(name.as_str()).map(HeaderValue::as_bytes),
    };
    let key = |v: &[u8]| match (sticky, parse_hex(v)) {
        // The lb's own value is already a uniform point on the ring.
        (Sticky::LbCookie(_), Some(k)) => k,
        _ => affinity_hash(v),
    };
    match (found, sticky) {
        (Some(v), _) => Some(Affinity {
            key: key(v),
            issued: false,
        }),
        (None, Sticky::LbCookie(_)) => Some(Affinity {
            key: affinity_hash(request_id.as_bytes()),
            issued: true,
        }),
        (None, _) => None,
    }
}

/// Sixteen lower-case hex digits, as the lb writes them.
fn parse_hex(v: &[u8]) -> Option<u64> {
    if v.len() != 16 || !v.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(v).ok()?, 16).ok()
}

/// The `Set-Cookie` for an issued key: for the route's path, not readable by scripts, sent
/// only over TLS when the client came over TLS. A session cookie: it ends with the browser's
/// session, as the stickiness is meant to.
pub(super) fn set_cookie(name: &str, key: u64, path: &str, tls: bool) -> Option<HeaderValue> {
    let secure = if tls { "; Secure" } else { "" };
    let v = format!("{name}={key:016x}; Path={path}; HttpOnly; SameSite=Lax{secure}");
    HeaderValue::from_str(&v).ok()
}

/// The value of cookie `name` in the request's `Cookie` fields (RFC 6265 5.4: `name=value`
/// pairs separated by `; `; an HTTP/2 request may split them over several fields).
pub(super) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers.get_all(header::COOKIE).iter().find_map(|field| {
        field.as_bytes().split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii_start();
            let (n, v) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
            (n == name.as_bytes()).then(|| v[1..].trim_ascii_end())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_named_cookie_or_header() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; sid=abc"));
        h.append(
            header::COOKIE,
            HeaderValue::from_static("sy-affinity=00000000000000ff"),
        );
        h.insert("x-user", HeaderValue::from_static("alice"));
        let id = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
        let key = |s: Sticky| of(&s, &h, &id).map(|a| (a.key, a.issued));
        let hash = affinity_hash;
        assert_eq!(
            key(Sticky::Cookie("sid".into())),
            Some((hash(b"abc"), false))
        );
        assert_eq!(
            key(Sticky::LbCookie("sy-affinity".into())),
            Some((0xff, false))
        );
        // Not the lb's form: hashed like any other value.
        assert_eq!(key(Sticky::LbCookie("a".into())), Some((hash(b"1"), false)));
        assert_eq!(
            key(Sticky::Header("x-user".into())),
            Some((hash(b"alice"), false))
        );
        assert_eq!(key(Sticky::Cookie("si".into())), None);
        assert_eq!(key(Sticky::Header("x-none".into())), None);
        // No lb cookie yet: one is issued, and its value is the key.
        let issued = of(&Sticky::LbCookie("other".into()), &h, &id).unwrap();
        assert!(issued.issued);
        assert_eq!(issued.key, affinity_hash(id.as_bytes()));
        let c = set_cookie("other", issued.key, "/api", true).unwrap();
        let value = format!("{:016x}", issued.key);
        assert_eq!(
            c.to_str().unwrap(),
            format!("other={value}; Path=/api; HttpOnly; SameSite=Lax; Secure")
        );
        let mut back = HeaderMap::new();
        back.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other={value}")).unwrap(),
        );
        let again = of(&Sticky::LbCookie("other".into()), &back, &id).unwrap();
        assert_eq!((again.key, again.issued), (issued.key, false));
    }
}
