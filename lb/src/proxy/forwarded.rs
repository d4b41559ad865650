//! The fields the lb adds to every request it forwards (`X-Forwarded-*`, `X-Request-Id`), in
//! one place for both the HTTP/1.1 and the HTTP/2 rendering. Knows nothing of routes.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub(super) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::headers::strip_request_hop_by_hop;
    use crate::proxy::{Drain, Peer};
    use tokio::sync::{mpsc, watch};

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
}
