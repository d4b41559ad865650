//! HTTP's comma-separated field lists (RFC 9110 5.6.1), read one way on both sides of the
//! proxy: `Connection`, `TE`, `Transfer-Encoding` and the like. Knows nothing of what the
//! tokens mean.

use http::header::{AsHeaderName, HeaderMap, HeaderValue};

/// The items of one field line, trimmed; empty items (`a, , b`) are skipped. A value that is
/// not visible ASCII has none.
pub fn items(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether any `name` field lists `token` (tokens are case-insensitive).
pub fn contains(headers: &HeaderMap, name: impl AsHeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| items(v).any(|t| t.eq_ignore_ascii_case(token)))
}

/// The last item of a field line, the one that decides (a transfer coding's final coding).
pub fn last(value: &HeaderValue) -> Option<&str> {
    items(value).last()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    #[test]
    fn lists() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static(" , close"));
        assert!(contains(&h, header::CONNECTION, "upgrade"));
        assert!(contains(&h, header::CONNECTION, "CLOSE"));
        assert!(!contains(&h, header::CONNECTION, "keep"));
        assert!(!contains(&h, header::TE, "trailers"));
        let v = HeaderValue::from_static("gzip, chunked ");
        assert_eq!(items(&v).collect::<Vec<_>>(), ["gzip", "chunked"]);
        assert_eq!(last(&v), Some("chunked"));
        assert_eq!(last(&HeaderValue::from_static("")), None);
    }
}
