//! HTTP's comma-separated field lists (RFC 9110 5.6.1), read one way on both sides of the
//! proxy: `Connection`, `TE`, `Transfer-Encoding` and the like. Knows nothing of what the
//! tokens mean.

use http::header::{AsHeaderName, HeaderMap, HeaderValue};

/// The items of one field line, trimmed of optional whitespace (space and tab, the only
/// whitespace a visible-ASCII value can hold); empty items (`a, , b`) are skipped. A value
/// that is not visible ASCII has none.
pub fn items(value: &HeaderValue) -> Items<'_> {
    Items {
        rest: value.to_str().unwrap_or(""),
    }
}

/// [`items`]: split and trimmed by plain byte tests. `str`'s pattern searchers cost several
/// times as much on values as short as `close`, which comes with every request of a client
/// that does not keep its connections.
pub struct Items<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Items<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        while !self.rest.is_empty() {
            let end = self
                .rest
                .bytes()
                .position(|b| b == b',')
                .unwrap_or(self.rest.len());
            // A comma is one byte: both sides of it are on character boundaries.
            let item = self.rest[..end].trim_ascii();
            self.rest = self.rest.get(end + 1..).unwrap_or("");
            if !item.is_empty() {
                return Some(item);
            }
        }
        None
    }
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
        h.append(header::CONNECTION, HeaderValue::from_static(" , close\t"));
        assert!(contains(&h, header::CONNECTION, "upgrade"));
        assert!(contains(&h, header::CONNECTION, "CLOSE"));
        assert!(!contains(&h, header::CONNECTION, "keep"));
        assert!(!contains(&h, header::TE, "trailers"));
        let v = HeaderValue::from_static("gzip, chunked ");
        assert_eq!(items(&v).collect::<Vec<_>>(), ["gzip", "chunked"]);
        assert_eq!(last(&v), Some("chunked"));
        assert_eq!(last(&HeaderValue::from_static("")), None);
        let all = |v: &'static str| {
            let v = HeaderValue::from_static(v);
            items(&v).map(str::to_owned).collect::<Vec<_>>()
        };
        assert_eq!(all("a,,b,"), ["a", "b"]);
        assert!(all(" \t, ,").is_empty());
        assert_eq!(all("close"), ["close"]);
        assert_eq!(all(",x , y\t"), ["x", "y"]);
        let not_visible = HeaderValue::from_bytes(b"a,\xffb").unwrap();
        assert_eq!(items(&not_visible).count(), 0);
    }
}
