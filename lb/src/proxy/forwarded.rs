//! The fields the lb adds to every request it forwards (`X-Forwarded-*`, `X-Request-Id`), in
//! one place for both renderings: HTTP/1.1 field lines written as the head is encoded, and a
//! header map for HTTP/2. A test holds the two to the same result. Knows nothing of routes.

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::peer::Peer;
use crate::upstream::HeadFields;

pub(super) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The fields the lb adds to every request it forwards: `X-Forwarded-For` (appended to when
/// the peer is a trusted proxy, else replaced), `X-Forwarded-Proto`, `X-Forwarded-Host` (from
/// `Host`) and `X-Request-Id` (replacing what the client sent). From a peer that is not a
/// trusted proxy, `Forwarded` and `X-Real-IP` do not pass either: a client must not name its
/// own address to the backend. An HTTP/1.1 head gets them as it is encoded, with no insert into the
/// request's header map; an HTTP/2 request gets them through `apply`.
///
/// The peer is held by reference (its address rendered once per connection, whether it came
/// over TLS, whether it is a trusted proxy): this value lives in every request's future.
pub struct Forwarded<'a> {
    pub peer: &'a Peer,
    pub request_id: &'a HeaderValue,
    /// The client's `Host`, when the request's was rewritten for its backend: what
    /// `X-Forwarded-Host` says.
    pub client_host: Option<&'a HeaderValue>,
}

impl Forwarded<'_> {
    pub fn proto(&self) -> &'static str {
        if self.peer.tls {
            "https"
        } else {
            "http"
        }
    }

    /// Whether the lb sets this field itself, replacing the client's, or drops it.
    pub fn replaces(&self, name: &HeaderName) -> bool {
        *name == X_FORWARDED_PROTO
            || *name == X_FORWARDED_HOST
            || *name == X_REQUEST_ID
            || (!self.peer.trusted && (*name == header::FORWARDED || *name == X_REAL_IP))
    }
}

impl HeadFields for Forwarded<'_> {
    fn encode_h1(&self, headers: &HeaderMap, own_length: bool, b: &mut BytesMut) {
        let mut host = None;
        // X-Forwarded-For values come one after another; the line stays open for the next
        // one and the client's address closes it.
        let (mut xff_open, mut xff_done) = (false, false);
        for (name, value) in headers {
            if *name == X_FORWARDED_FOR {
                if self.peer.trusted && value.to_str().is_ok() {
                    b.put_slice(if xff_open {
                        b", "
                    } else {
                        b"x-forwarded-for: "
                    });
                    b.put_slice(value.as_bytes());
                    xff_open = true;
                }
                continue;
            }
            if xff_open {
                close_xff(b, self);
                (xff_open, xff_done) = (false, true);
            }
            // A body's framing is the codec's to state, from what it will send.
            if (own_length && name == header::CONTENT_LENGTH) || self.replaces(name) {
                continue;
            }
            if name == header::HOST && host.is_none() {
                host = Some(value);
            }
            b.put_slice(name.as_str().as_bytes());
            b.put_slice(b": ");
            b.put_slice(value.as_bytes());
            b.put_slice(b"\r\n");
        }
        if xff_open {
            close_xff(b, self);
        } else if !xff_done {
            b.put_slice(b"x-forwarded-for: ");
            b.put_slice(self.peer.ip.as_bytes());
            b.put_slice(b"\r\n");
        }
        b.put_slice(b"x-forwarded-proto: ");
        b.put_slice(self.proto().as_bytes());
        // An empty Host (a request with no authority) names nothing to forward.
        if let Some(host) = self.client_host.or(host).filter(|h| !h.is_empty()) {
            b.put_slice(b"\r\nx-forwarded-host: ");
            b.put_slice(host.as_bytes());
        }
        b.put_slice(b"\r\nx-request-id: ");
        b.put_slice(self.request_id.as_bytes());
        b.put_slice(b"\r\n");
    }

    fn apply(&self, headers: &mut HeaderMap) {
        let prev: Vec<&str> = match self.peer.trusted {
            true => headers
                .get_all(X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect(),
            false => Vec::new(),
        };
        let xff = if prev.is_empty() {
            self.peer.ip.clone()
        } else {
            let ip = self.peer.ip.to_str().expect("built from an IP address");
            HeaderValue::from_str(&format!("{}, {ip}", prev.join(", ")))
                .unwrap_or_else(|_| self.peer.ip.clone())
        };
        headers.insert(X_FORWARDED_FOR, xff);
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(self.proto()));
        let host = self.client_host.or(headers.get(header::HOST));
        match host.filter(|h| !h.is_empty()).cloned() {
            Some(host) => headers.insert(X_FORWARDED_HOST, host),
            None => headers.remove(X_FORWARDED_HOST),
        };
        headers.insert(X_REQUEST_ID, self.request_id.clone());
        if !self.peer.trusted {
            headers.remove(header::FORWARDED);
            headers.remove(X_REAL_IP);
        }
    }
}

fn close_xff(b: &mut BytesMut, fwd: &Forwarded<'_>) {
    b.put_slice(b", ");
    b.put_slice(fwd.peer.ip.as_bytes());
    b.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::headers::{strip_request_hop_by_hop, HopByHop};

    fn test_peer(tls: bool, trusted: bool) -> Peer {
        Peer::outside("127.0.0.2:5555".parse().unwrap(), tls, trusted)
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
        let present = HopByHop::of(&headers);
        strip_request_hop_by_hop(&mut headers, present);
        let peer = test_peer(false, true);
        let id = HeaderValue::from_static("abc");
        let fwd = Forwarded {
            peer: &peer,
            request_id: &id,
            client_host: None,
        };
        fwd.apply(&mut headers);
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
        let present = HopByHop::of(&grpc);
        strip_request_hop_by_hop(&mut grpc, present);
        assert_eq!(grpc["te"], "trailers", "gRPC's TE: trailers passes");
        let tls_peer = test_peer(true, true);
        let fwd = Forwarded {
            peer: &tls_peer,
            ..fwd
        };
        fwd.apply(&mut grpc);
        assert_eq!(grpc["x-forwarded-proto"], "https");
        assert!(!grpc.contains_key("x-forwarded-host"));
    }

    /// A field section as sorted (name, value) pairs, to compare renderings.
    fn pairs(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn both_renderings_agree() {
        let id = HeaderValue::from_static("req-1");
        let cases: &[&[(&str, &str)]] = &[
            &[],
            &[("host", "a.example"), ("accept", "*/*")],
            &[("x-forwarded-for", "10.0.0.1"), ("host", "a.example")],
            &[
                ("x-forwarded-for", "10.0.0.1"),
                ("x-forwarded-for", "10.0.0.2"),
                ("accept", "*/*"),
            ],
            &[
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "forged.example"),
                ("x-request-id", "forged"),
                ("content-length", "5"),
                ("host", "b.example:8080"),
            ],
            &[("host", "first.example"), ("host", "second.example")],
            &[("host", ""), ("x-forwarded-host", "forged")],
            &[
                ("x-forwarded-for", "198.51.100.1"),
                ("forwarded", "for=198.51.100.1"),
                ("x-real-ip", "198.51.100.1"),
                ("accept", "*/*"),
            ],
        ];
        let rewritten = HeaderValue::from_static("client.example");
        let combos = [(false, false), (false, true), (true, false), (true, true)];
        for ((tls, trusted), client_host) in combos
            .into_iter()
            .flat_map(|c| [(c, None), (c, Some(&rewritten))])
        {
            let peer = test_peer(tls, trusted);
            let fwd = Forwarded {
                peer: &peer,
                request_id: &id,
                client_host,
            };
            for case in cases {
                let mut headers = HeaderMap::new();
                for (n, v) in *case {
                    headers.append(*n, HeaderValue::from_static(v));
                }
                for own_length in [false, true] {
                    let mut wire = BytesMut::new();
                    fwd.encode_h1(&headers, own_length, &mut wire);
                    wire.put_slice(b"\r\n");
                    let mut parsed = [httparse::EMPTY_HEADER; 32];
                    let httparse::Status::Complete((_, fields)) =
                        httparse::parse_headers(&wire, &mut parsed).unwrap()
                    else {
                        panic!("incomplete rendering of {case:?}");
                    };
                    let mut h1 = HeaderMap::new();
                    for f in fields {
                        h1.append(
                            HeaderName::from_bytes(f.name.as_bytes()).unwrap(),
                            HeaderValue::from_bytes(f.value).unwrap(),
                        );
                    }
                    let mut h2 = headers.clone();
                    fwd.apply(&mut h2);
                    if own_length {
                        h2.remove(header::CONTENT_LENGTH);
                    }
                    assert_eq!(
                        pairs(&h1),
                        pairs(&h2),
                        "{case:?}, tls {tls}, trusted {trusted}"
                    );
                    if client_host.is_some() {
                        assert_eq!(h2.get(X_FORWARDED_HOST), client_host, "{case:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn untrusted_peers_cannot_name_their_own_address() {
        let peer = test_peer(false, false);
        let id = HeaderValue::from_static("abc");
        let fwd = Forwarded {
            peer: &peer,
            request_id: &id,
            client_host: None,
        };
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        headers.insert(
            header::FORWARDED,
            HeaderValue::from_static("for=198.51.100.1"),
        );
        headers.insert(X_REAL_IP, HeaderValue::from_static("198.51.100.1"));
        fwd.apply(&mut headers);
        assert_eq!(headers["x-forwarded-for"], "127.0.0.2");
        assert!(!headers.contains_key(header::FORWARDED));
        assert!(!headers.contains_key(X_REAL_IP));
    }
}
