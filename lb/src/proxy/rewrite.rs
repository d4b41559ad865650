//! Applying an instance's rewrite to one attempt: the request as that instance asked to get it
//! (path, `Host`, header edits), and its response's header edits and, when asked, `Location`
//! and `Set-Cookie` paths mapped back to the client's path space.
//!
//! A rewrite belongs to the instance, not the route: during a rolling update that changes it,
//! each request reaches old and new instances in the form each asked for, and a retry on
//! another instance starts again from the client's request. Instances without one never get
//! here.

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Response, Version};

use crate::routing::{Rewrite, Route};
use crate::upstream::{clone_parts, Upstream};

/// One attempt's request as the instance gets it, and the client's `Host` for
/// `X-Forwarded-Host` when `Host` was rewritten.
pub(super) struct Rewritten {
    pub parts: http::request::Parts,
    pub client_host: Option<HeaderValue>,
}

/// The head sent: the rewritten one, else the client's.
pub(super) fn head<'a>(
    parts: &'a http::request::Parts,
    rewritten: &'a Option<Box<Rewritten>>,
) -> &'a http::request::Parts {
    rewritten.as_ref().map_or(parts, |r| &r.parts)
}

/// The response of an instance with `rw` to the request `head`, made from the client's
/// `parts`, on `route`: mapped back and edited (see `response`).
pub(super) fn response_of(
    rw: &Rewrite,
    resp: &mut Response<Upstream>,
    (parts, head): (&http::request::Parts, &http::request::Parts),
    route: &Route,
    tls: bool,
) {
    let (client_host, backend_host) = (host_of(parts), host_of(head));
    let view = ClientView {
        prefix: &route.key.prefix,
        tls,
        client_host: client_host.as_deref(),
        backend_host: backend_host.as_deref(),
    };
    response(rw, resp.headers_mut(), &view);
}

/// The host a request head names: its target's authority, else its `Host`.
fn host_of(parts: &http::request::Parts) -> Option<String> {
    match parts.uri.authority() {
        Some(a) => Some(a.as_str().to_owned()),
        None => parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

/// The request for an instance with `rw`, built from the client's (`parts`, in the form the
/// connection speaks), on the route with `prefix`. `None` when the new target is no valid
/// URI (a path at the length limit with a prefix put in front).
pub(super) fn request(
    rw: &Rewrite,
    parts: &http::request::Parts,
    prefix: &str,
) -> Option<Box<Rewritten>> {
    let mut out = clone_parts(parts);
    let h2 = parts.version == Version::HTTP_2;
    if rw.moves_path() {
        let path = parts.uri.path();
        let mut target = backend_path(rw, prefix, path);
        if let Some(q) = parts.uri.query() {
            target.push('?');
            target.push_str(q);
        }
        let pq = PathAndQuery::try_from(target).ok()?;
        let mut uri = std::mem::take(&mut out.uri).into_parts();
        uri.path_and_query = Some(pq);
        out.uri = Uri::from_parts(uri).ok()?;
    }
    let mut client_host = None;
    if let Some(host) = &rw.host {
        if h2 {
            client_host = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
            let mut uri = std::mem::take(&mut out.uri).into_parts();
            uri.authority = Some(host.to_str().ok()?.parse().ok()?);
            out.uri = Uri::from_parts(uri).ok()?;
        } else {
            client_host = out.headers.insert(header::HOST, host.clone());
        }
    }
    rw.request.apply(&mut out.headers);
    Some(Box::new(Rewritten {
        parts: out,
        client_host,
    }))
}

/// The client's view, for mapping a response's paths back into it.
pub(super) struct ClientView<'a> {
    /// The matched route's prefix.
    pub prefix: &'a str,
    pub tls: bool,
    /// The `Host` the client sent, and the one the instance got.
    pub client_host: Option<&'a str>,
    pub backend_host: Option<&'a str>,
}

/// The response of an instance with `rw`: `Location` and `Set-Cookie` paths mapped back when
/// asked, then the header edits (so an edit has the last word).
pub(super) fn response(rw: &Rewrite, headers: &mut HeaderMap, view: &ClientView<'_>) {
    let moved = rw.moves_path() || rw.host.is_some();
    if moved && rw.location {
        let mapped = headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|loc| location(rw, loc, view))
            .and_then(|loc| HeaderValue::from_str(&loc).ok());
        if let Some(v) = mapped {
            headers.insert(header::LOCATION, v);
        }
    }
    if moved && rw.cookie_path && headers.contains_key(header::SET_COOKIE) {
        let cookies: Vec<HeaderValue> = headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|c| cookie_path(rw, c, view.prefix))
                    .and_then(|c| HeaderValue::from_str(&c).ok())
                    .unwrap_or_else(|| v.clone())
            })
            .collect();
        headers.remove(header::SET_COOKIE);
        for c in cookies {
            headers.append(header::SET_COOKIE, c);
        }
    }
    rw.response.apply(headers);
}

/// The path the instance gets for the client's `path` on the route with `prefix`: the
/// prefix's segments cut (`strip`, segment-wise, so `;params` on them go too), then
/// `prepend` put in front.
fn backend_path(rw: &Rewrite, prefix: &str, path: &str) -> String {
    let mut rest = path;
    if rw.strip && prefix != "/" {
        let segments = prefix.bytes().filter(|&b| b == b'/').count();
        rest = match path.match_indices('/').nth(segments) {
            Some((i, _)) => &path[i..],
            None => "",
        };
    }
    if rest.is_empty() {
        rest = "/";
    }
    match &rw.prepend {
        Some(p) => format!("{p}{rest}"),
        None => rest.to_string(),
    }
}

/// The client's path for a path of the instance's, or `None` when it lies outside what the
/// rewrite maps (below no `prepend`).
fn client_path(rw: &Rewrite, prefix: &str, path: &str) -> Option<String> {
    let mut rest = match &rw.prepend {
        Some(p) => {
            let r = path.strip_prefix(&**p)?;
            if !(r.is_empty() || r.starts_with('/')) {
                return None;
            }
            r
        }
        None => path,
    };
    if rest.is_empty() {
        rest = "/";
    }
    Some(if rw.strip && prefix != "/" {
        format!("{prefix}{rest}")
    } else {
        rest.to_string()
    })
}

/// A `Location` mapped back: an absolute path, or an absolute URI naming the host the instance
/// got. Anything else (another site, a relative path) is left as it is.
fn location(rw: &Rewrite, loc: &str, view: &ClientView<'_>) -> Option<String> {
    let (origin, rest) = if loc.starts_with('/') && !loc.starts_with("//") {
        (None, loc)
    } else {
        let (scheme, after) = loc.split_once("://")?;
        if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
            return None;
        }
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let authority = &after[..end];
        if !view
            .backend_host
            .is_some_and(|h| h.eq_ignore_ascii_case(authority))
        {
            return None;
        }
        let proto = if view.tls { "https" } else { "http" };
        let host = view.client_host.unwrap_or(authority);
        (Some(format!("{proto}://{host}")), &after[end..])
    };
    let split = rest.find(['?', '#']).unwrap_or(rest.len());
    let (path, tail) = rest.split_at(split);
    let path = if path.is_empty() { "/" } else { path };
    let mapped = if rw.moves_path() {
        client_path(rw, view.prefix, path)?
    } else {
        path.to_string()
    };
    Some(format!("{}{mapped}{tail}", origin.unwrap_or_default()))
}

/// A `Set-Cookie` with its `Path` attribute mapped back (RFC 6265 5.2.4). A path that ends at
/// the route's prefix loses its trailing `/`, so that the cookie goes with `/api` as well as
/// `/api/x`.
fn cookie_path(rw: &Rewrite, cookie: &str, prefix: &str) -> Option<String> {
    if !rw.moves_path() {
        return None;
    }
    let mut changed = false;
    let attrs: Vec<String> = cookie
        .split(';')
        .enumerate()
        .map(|(i, attr)| {
            let trimmed = attr.trim_start();
            let is_path = i > 0
                && trimmed
                    .get(..5)
                    .is_some_and(|k| k.eq_ignore_ascii_case("path="));
            if is_path {
                let value = trimmed[5..].trim();
                if value.starts_with('/') {
                    if let Some(mut p) = client_path(rw, prefix, value) {
                        if p.len() > 1 && p.ends_with('/') {
                            p.pop();
                        }
                        changed = true;
                        return format!(" Path={p}");
                    }
                }
            }
            attr.to_string()
        })
        .collect();
    changed.then(|| attrs.join(";"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_consul::tags::parse_tags;

    fn rw(tags: &[&str]) -> Rewrite {
        let (r, errs) = parse_tags("lb", tags.iter().copied());
        assert!(errs.is_empty(), "{errs:?}");
        Rewrite::compile(&r.rewrite).expect("a rewrite")
    }

    fn req(version: Version, uri: &str, host: &str) -> http::request::Parts {
        let mut b = http::Request::builder().version(version).uri(uri);
        if version != Version::HTTP_2 {
            b = b.header(header::HOST, host);
        }
        b.header("x-debug", "1").body(()).unwrap().into_parts().0
    }

    #[test]
    fn paths_are_stripped_segment_wise_and_prefixed() {
        let strip = rw(&["lb.strip=true"]);
        let both = rw(&["lb.strip=true", "lb.prepend=/v2"]);
        let prepend = rw(&["lb.prepend=/internal"]);
        let cases = [
            (&strip, "/api", "/api/users", "/users"),
            (&strip, "/api", "/api", "/"),
            (&strip, "/api", "/api/", "/"),
            (&strip, "/api", "/api;v=1/users", "/users"),
            (&strip, "/a/b", "/a/b/c/d", "/c/d"),
            (&strip, "/", "/x", "/x"),
            (&both, "/api", "/api/users", "/v2/users"),
            (&both, "/api", "/api", "/v2/"),
            (&prepend, "/api", "/api/users", "/internal/api/users"),
        ];
        for (rw, prefix, path, want) in cases {
            assert_eq!(backend_path(rw, prefix, path), want, "{prefix} {path}");
            // Mapped back, where the client's path had no params.
            if !path.contains(';') && path != "/api/" {
                assert_eq!(
                    client_path(rw, prefix, want).as_deref(),
                    Some(if path == "/api" { "/api/" } else { path }),
                    "{prefix} {want}"
                );
            }
        }
        assert_eq!(client_path(&prepend, "/", "/elsewhere"), None);
        assert_eq!(client_path(&prepend, "/", "/internalx"), None);
    }

    #[test]
    fn requests_are_rewritten_in_both_forms() {
        let r = rw(&[
            "lb.strip=true",
            "lb.prepend=/v2",
            "lb.host=users.internal",
            "lb.request.remove=x-debug",
            "lb.request.set.x-env=prod",
        ]);
        let h1 = request(
            &r,
            &req(Version::HTTP_11, "/api/u?q=1", "public.example"),
            "/api",
        )
        .unwrap();
        assert_eq!(h1.parts.uri, "/v2/u?q=1");
        assert_eq!(h1.parts.headers[header::HOST], "users.internal");
        assert_eq!(h1.client_host.as_ref().unwrap(), "public.example");
        assert_eq!(h1.parts.headers["x-env"], "prod");
        assert!(!h1.parts.headers.contains_key("x-debug"));
        let h2 = request(
            &r,
            &req(Version::HTTP_2, "http://public.example/api/u?q=1", ""),
            "/api",
        )
        .unwrap();
        assert_eq!(h2.parts.uri, "http://users.internal/v2/u?q=1");
        assert_eq!(h2.client_host.as_ref().unwrap(), "public.example");
    }

    #[test]
    fn a_target_too_long_once_rewritten_is_refused_not_sent() {
        let r = rw(&["lb.prepend=/v2"]);
        // The longest target `http` takes is 65,534 bytes.
        let long = format!("/{}", "a".repeat(65_532));
        assert!(request(&r, &req(Version::HTTP_11, &long, "h"), "/").is_none());
    }

    #[test]
    fn locations_and_cookies_are_mapped_back_only_when_asked() {
        let r = rw(&[
            "lb.strip=true",
            "lb.host=users.internal:8080",
            "lb.rewrite.location=true",
            "lb.rewrite.cookie-path=true",
            "lb.response.set.x-served-by=users",
        ]);
        let view = ClientView {
            prefix: "/api",
            tls: true,
            client_host: Some("public.example"),
            backend_host: Some("users.internal:8080"),
        };
        let cases = [
            ("/login?next=/x", "/api/login?next=/x"),
            ("/", "/api/"),
            (
                "http://users.internal:8080/a#f",
                "https://public.example/api/a#f",
            ),
            ("http://elsewhere.example/a", "http://elsewhere.example/a"),
            ("relative/path", "relative/path"),
            ("//users.internal:8080/a", "//users.internal:8080/a"),
        ];
        for (from, want) in cases {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, HeaderValue::from_str(from).unwrap());
            response(&r, &mut h, &view);
            assert_eq!(h[header::LOCATION], want, "{from}");
            assert_eq!(h["x-served-by"], "users");
        }
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("sid=1; Path=/; HttpOnly"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("pref=2; path=/settings"),
        );
        h.append(header::SET_COOKIE, HeaderValue::from_static("bare=3"));
        response(&r, &mut h, &view);
        let cookies: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(
            cookies,
            [
                "sid=1; Path=/api; HttpOnly",
                "pref=2; Path=/api/settings",
                "bare=3"
            ]
        );
        // Not asked: left alone.
        let plain = rw(&["lb.strip=true"]);
        let mut h = HeaderMap::new();
        h.insert(header::LOCATION, HeaderValue::from_static("/login"));
        h.insert(header::SET_COOKIE, HeaderValue::from_static("a=1; Path=/"));
        response(&plain, &mut h, &view);
        assert_eq!(h[header::LOCATION], "/login");
        assert_eq!(h[header::SET_COOKIE], "a=1; Path=/");
    }
}
