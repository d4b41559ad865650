//! HTTP's comma-separated field lists (RFC 9110 5.6.1), read one way on both sides of the
//! proxy: `Connection`, `TE`, `Transfer-Encoding` and the like; and the lines of one field in
//! a header map, found the cheaper of two ways. Knows nothing of what the tokens mean.

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Above this many distinct names, a field is looked up by its name's hash at once; at or
/// below it, a pass over the names first finds whether it is there at all, for less than the
/// hashing (two standard names compare as one byte each). Most fields looked up on the
/// request path are absent from most messages (`Connection`, `X-Request-Id`, `TE`). A
/// request from a browser carries about a dozen names; from most programs, a few.
pub const SCAN_NAMES_MAX: usize = 16;

/// Whether `headers` has a `name` field, found by a pass over its names; `None` past
/// [`SCAN_NAMES_MAX`] of them, where hashing the name costs less.
fn scanned(headers: &HeaderMap, name: &HeaderName) -> Option<bool> {
    (headers.keys_len() <= SCAN_NAMES_MAX).then(|| headers.keys().any(|k| k == name))
}

/// Whether `headers` has a `name` field.
pub fn present(headers: &HeaderMap, name: &HeaderName) -> bool {
    scanned(headers, name).unwrap_or_else(|| headers.contains_key(name))
}

/// The lines of the `name` fields in `headers`, in order, as `HeaderMap::get_all` gives them.
/// For a field that is nearly always there (`Host`), `get_all` itself costs less.
pub fn lines<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a HeaderValue> {
    (scanned(headers, name) != Some(false))
        .then(|| headers.get_all(name).iter())
        .into_iter()
        .flatten()
}

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
pub fn contains(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    lines(headers, name).any(|v| items(v).any(|t| t.eq_ignore_ascii_case(token)))
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
        assert!(contains(&h, &header::CONNECTION, "upgrade"));
        assert!(contains(&h, &header::CONNECTION, "CLOSE"));
        assert!(!contains(&h, &header::CONNECTION, "keep"));
        assert!(!contains(&h, &header::TE, "trailers"));
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

    /// A field's lines come out as `get_all` gives them, with few names or many.
    #[test]
    fn lines_with_few_names_or_many() {
        let x_id = HeaderName::from_static("x-id");
        for names in [
            1,
            SCAN_NAMES_MAX - 1,
            SCAN_NAMES_MAX,
            SCAN_NAMES_MAX + 1,
            40,
        ] {
            let mut h = HeaderMap::new();
            h.append(header::HOST, HeaderValue::from_static("a"));
            h.append(x_id.clone(), HeaderValue::from_static("1"));
            for i in 0..names.saturating_sub(3) {
                let name = HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap();
                h.append(name, HeaderValue::from_static("v"));
            }
            h.append(header::HOST, HeaderValue::from_static("b"));
            h.append(header::CONNECTION, HeaderValue::from_static("close"));
            assert_eq!(h.keys_len(), names.max(3));
            for name in [&header::HOST, &x_id, &header::CONNECTION, &header::TE] {
                let got: Vec<_> = lines(&h, name).collect();
                assert_eq!(
                    got,
                    h.get_all(name).iter().collect::<Vec<_>>(),
                    "{name} {names}"
                );
            }
            assert_eq!(lines(&h, &header::HOST).collect::<Vec<_>>(), ["a", "b"]);
            assert!(contains(&h, &header::CONNECTION, "close"));
            assert_eq!(lines(&h, &HeaderName::from_static("x-i")).next(), None);
            for name in [&header::HOST, &x_id, &header::CONNECTION, &header::TE] {
                assert_eq!(present(&h, name), h.contains_key(name), "{name} {names}");
            }
        }
    }
}
