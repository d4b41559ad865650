//! The forwarding fields against hostile request fields (`name: value` lines): the HTTP/1.1
//! rendering parses back as a valid field section and carries the same fields as the HTTP/2
//! rendering, for trusted and untrusted peers alike.
#![no_main]
use bytes::{BufMut, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

use lb::proxy::{Forwarded, Peer};
use lb::upstream::HeadFields;

fn pairs(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = h
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n').take(40) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let id = HeaderValue::from_static("req-1");
    let rewritten = HeaderValue::from_static("client.example");
    for (trusted, own_length) in [(false, false), (true, true)] {
        let peer = Peer::outside("192.0.2.1:4000".parse().unwrap(), trusted, trusted);
        // A rewritten Host's X-Forwarded-Host too, for the trusted case.
        let fwd = Forwarded {
            peer: &peer,
            request_id: &id,
            client_host: trusted.then_some(&rewritten),
        };
        let mut wire = BytesMut::new();
        fwd.encode_h1(&headers, own_length, &mut wire);
        wire.put_slice(b"\r\n");
        let mut parsed = [httparse::EMPTY_HEADER; 128];
        let httparse::Status::Complete((_, fields)) =
            httparse::parse_headers(&wire, &mut parsed).expect("the rendering parses")
        else {
            panic!("incomplete rendering");
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
            h2.remove(http::header::CONTENT_LENGTH);
        }
        assert_eq!(pairs(&h1), pairs(&h2));
    }
});
