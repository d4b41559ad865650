//! Backend responses as the lb's HTTP/1.1 client reads them: whatever a backend sends, the
//! decoder never panics or hangs, reads the same response however the bytes are cut into
//! reads, never hands on a Content-Length beside a Transfer-Encoding, and never gives the
//! client more or fewer body bytes than the length it forwards.
#![no_main]
use http::header;
use libfuzzer_sys::fuzz_target;

use lb::upstream::h1::{decode, Decoded};

/// What must not depend on how the input was cut into reads.
fn outcome(d: &Decoded) -> impl PartialEq + std::fmt::Debug {
    (
        d.head
            .as_ref()
            .map(|h| (h.status(), h.headers().clone()))
            .map_err(|e| e.to_string()),
        d.data.concat(),
        d.trailers.clone(),
        d.body.as_ref().map_err(|e| e.to_string()).copied(),
        d.reusable,
        d.leftover,
    )
}

fuzz_target!(|data: &[u8]| {
    // First byte: HEAD request or not, and where the reads are cut (second and third bytes).
    let [flags, a, b, input @ ..] = data else {
        return;
    };
    let head_request = flags & 1 == 1;
    let whole = decode(input, &[], head_request);
    let cut = decode(input, &[usize::from(*a), usize::from(*b)], head_request);
    // Single-byte reads for the first 256 bytes (each re-parses the head: quadratic).
    let bytes = decode(input, &[1; 256], head_request);
    assert_eq!(outcome(&whole), outcome(&cut), "cut at {a}, {b}");
    assert_eq!(outcome(&whole), outcome(&bytes), "cut into single bytes");

    let Ok(head) = &whole.head else { return };
    let status = head.status();
    let framed = !head_request && status != 204 && status != 304 && status != 101;
    let headers = head.headers();
    if framed {
        assert!(
            !(headers.contains_key(header::CONTENT_LENGTH)
                && headers.contains_key(header::TRANSFER_ENCODING)),
            "a length forwarded beside a coding"
        );
    }
    let body: usize = whole.data.iter().map(|d| d.len()).sum();
    assert!(body <= input.len());
    if let (true, Ok(true), Some(len)) = (framed, &whole.body, headers.get(header::CONTENT_LENGTH))
    {
        let len: usize = std::str::from_utf8(len.as_bytes())
            .ok()
            .and_then(|l| l.split(',').next()?.trim().parse().ok())
            .expect("a forwarded Content-Length is a number");
        assert_eq!(body, len, "a body of another length than forwarded");
    }
    if !framed {
        assert!(whole.data.is_empty(), "a body where none may be");
    }
});
