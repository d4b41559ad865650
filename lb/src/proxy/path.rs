//! The request path as the lb routes and forwards it: one normal form, so that the path a
//! route matched is the path its backend gets. Dot segments are removed (RFC 3986 5.2.4, with
//! `%2E` read as the dot it encodes) and empty segments merged; what could still cross a route
//! boundary on a backend that reads paths differently is refused.
//!
//! Refused with a 400: a backslash, plain or encoded, and an encoded slash (`\`, `%5C`, `%2F`,
//! in a segment or its `;` parameters), which some backends read as a separator after the lb
//! matched, and a dot segment carrying `;` parameters (`/..;/`), which servlet containers read
//! as a plain dot segment.

use std::borrow::Cow;

/// The normal form of `path` (the path of a request target, without its query), borrowed when
/// it is already normal, as nearly every path is.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, &'static str> {
    // `*` (OPTIONS) and the like are not paths to normalise.
    if is_plain(path) || !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = path.ends_with('/');
    for raw in path.split('/').filter(|s| !s.is_empty()) {
        separator_free(raw)?;
        let (name, params) = raw
            .split_once(';')
            .map_or((raw, None), |(n, p)| (n, Some(p)));
        let dots = dot_segment(name);
        if dots.is_some() && params.is_some() {
            return Err("a dot segment with parameters in the path");
        }
        match dots {
            Some(1) => trailing_slash = true,
            Some(_) => {
                out.pop();
                trailing_slash = true;
            }
            None => {
                out.push(raw);
                trailing_slash = path.ends_with('/');
            }
        }
    }
    let mut normal = String::with_capacity(path.len());
    for segment in &out {
        normal.push('/');
        push_decoding_unreserved(&mut normal, segment)?;
    }
    if trailing_slash || normal.is_empty() {
        normal.push('/');
    }
    Ok(if normal == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(normal)
    })
}

/// Appends `segment` with its percent-encoded unreserved characters decoded (RFC 3986
/// 6.2.2.2: `%61` is `a`), so that a name cannot hide from a route's prefix; other escapes stay
/// as they are. A `%` not followed by two hex digits is malformed (and could be decoded into
/// a new escape by a second pass), so it is refused.
fn push_decoding_unreserved(out: &mut String, segment: &str) -> Result<(), &'static str> {
    let b = segment.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            let run = b[i..]
                .iter()
                .position(|&c| c == b'%')
                .unwrap_or(b.len() - i);
            out.push_str(&segment[i..i + run]);
            i += run;
            continue;
        }
        let hex = |c: u8| (c as char).to_digit(16);
        let (Some(hi), Some(lo)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err("a malformed percent-encoding in the path");
        };
        let c = (hi * 16 + lo) as u8;
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(c as char);
        } else {
            out.push_str(&segment[i..i + 3]);
        }
        i += 3;
    }
    Ok(())
}

/// The path as routes match it: each segment without its `;` parameters, which servlet
/// containers drop before they route (`/admin;x/y` is their `/admin/y`). Borrowed when there
/// are none.
pub fn without_params(path: &str) -> Cow<'_, str> {
    // A byte scan: `str::contains(char)` costs a searcher's setup on every request.
    if !path.as_bytes().contains(&b';') {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment.split(';').next().unwrap_or(""));
    }
    Cow::Owned(out)
}

/// Whether a path needs no work: no percent sign, no `;`, no backslash, no `//` and no
/// segment that starts with a dot. One pass over the bytes.
fn is_plain(path: &str) -> bool {
    let b = path.as_bytes();
    !b.iter().enumerate().any(|(i, &c)| {
        c == b'%'
            || c == b';'
            || c == b'\\'
            || (c == b'/' && matches!(b.get(i + 1), Some(b'/' | b'.')))
    })
}

/// Refuses a segment (parameters included) that a backend could read as two: a backslash,
/// which WHATWG URL parsers and IIS take for a slash, or an encoded slash or backslash.
fn separator_free(segment: &str) -> Result<(), &'static str> {
    let b = segment.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'\\' {
            return Err("a backslash in the path");
        }
        if c == b'%' && i + 2 < b.len() {
            let code = [b[i + 1], b[i + 2].to_ascii_uppercase()];
            if code == *b"2F" || code == *b"5C" {
                return Err("an encoded slash or backslash in the path");
            }
        }
    }
    Ok(())
}

/// `Some(1)` for `.`, `Some(2)` for `..` (either written with `%2E`), `None` for any other
/// segment.
fn dot_segment(segment: &str) -> Option<u8> {
    let mut dots = 0u8;
    let mut other = false;
    let b = segment.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let code = [b[i + 1].to_ascii_uppercase(), b[i + 2].to_ascii_uppercase()];
            match &code {
                b"2E" => dots = dots.saturating_add(1),
                _ => other = true,
            }
            i += 3;
            continue;
        }
        if b[i] == b'.' {
            dots = dots.saturating_add(1);
        } else {
            other = true;
        }
        i += 1;
    }
    (!other && (1..=2).contains(&dots)).then_some(dots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let n = |p: &str| normalize(p).map(Cow::into_owned);
        for same in [
            "/",
            "/api",
            "/api/users/",
            "/a.b/c",
            "/.well-known/x",
            "/a;v=1/b",
            "/x%20y",
        ] {
            assert_eq!(n(same).as_deref(), Ok(same), "{same}");
        }
        assert!(matches!(normalize("/api/users"), Ok(Cow::Borrowed(_))));
        assert_eq!(
            n("/%61dmin/%7Euser/%20x").as_deref(),
            Ok("/admin/~user/%20x")
        );
        assert!(n("/100%").is_err() && n("/%%361").is_err() && n("/%zz").is_err());
        assert_eq!(without_params("/admin;x/y;v=1"), "/admin/y");
        assert!(matches!(without_params("/a/b"), Cow::Borrowed(_)));
        for (path, normal) in [
            ("/api/../admin", "/admin"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E./admin", "/admin"),
            ("/api/./x", "/api/x"),
            ("//admin", "/admin"),
            ("/api//x//", "/api/x/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/../../x", "/x"),
            ("/..", "/"),
        ] {
            assert_eq!(n(path).as_deref(), Ok(normal), "{path}");
        }
        let dots = format!("/a/{}/b", ".".repeat(300));
        assert_eq!(
            n(&dots).as_deref(),
            Ok(&*dots),
            "300 dots are a name, not a climb"
        );
        for refused in [
            "/api%2fadmin",
            "/api/%2F/x",
            "/api/..;/admin",
            "/a/.;x/b",
            "/a%5Cb",
            "/api/..\\internal",
            "/api/x;a=%2F..%2F..%2Finternal",
            "/api/x;a=%5c",
        ] {
            assert!(n(refused).is_err(), "{refused}");
        }
    }
}
