//! The routing contract carried in Consul service tags: the registrar writes it, the lb reads it.
//!
//! Grammar, with the configurable prefix `P` (default `lb`):
//! - `P.route=[HOST][/PATH]`: route requests for HOST (any host when empty or `*`) whose path is
//!   PATH or below it (segment-wise: `/v1` matches `/v1` and `/v1/x`, not `/v1beta`). Repeat the
//!   tag for several routes. `P.route=api.example.com/v1`, `P.route=/`, `P.route=*/static`.
//! - `P.weight=N`: relative weight of this instance, 0..=1000 (default 100; 0 drains it).
//! - `P.enable=false`: opt this instance out although it carries routes.
//! - `P.proto=http1|h2c`: how the lb talks to this instance: HTTP/1.1 (default) or HTTP/2 with
//!   prior knowledge, which gRPC backends need (`h2` is accepted for `h2c`).
//! - `P.redirect=https`: plain-HTTP requests to this instance's routes get a 308 to HTTPS.
//! - `P.upgrade=PROTO[,PROTO]`: protocol switches (RFC 9110 7.8) this instance accepts beyond
//!   the lb's own list, e.g. `P.upgrade=mqtt`. `h2c` is never accepted: an h2c upgrade would
//!   carry requests past the lb's per-request policy.
//!
//! - `P.sticky=lb-cookie[:NAME]|cookie:NAME|header:NAME`: session affinity on this instance's
//!   routes, by a cookie the lb issues (default name `sy-affinity`), an existing cookie, or a
//!   header. Instances of a route should agree; when they differ, `lb-cookie` wins over
//!   `cookie`, then `header`, then the smaller name.
//! - `P.version=NAME`: the version this instance runs (a token, e.g. `v2`): traffic is split
//!   between a service's versions by the weights in Consul KV, and a request may pin one.
//! - Rewriting of the request and the response: `P.strip`, `P.prepend`, `P.host`,
//!   `P.request.*`, `P.response.*`, `P.rewrite.*` ([`rewrite`]).
//!
//! Tags without the prefix are not ours and are ignored; a malformed tag of ours is reported and
//! ignored, the instance's other tags still apply.

use std::fmt;

mod rewrite;

pub use rewrite::{HeaderEdits, Rewrite};

pub const DEFAULT_PREFIX: &str = "lb";
pub const DEFAULT_WEIGHT: u32 = 100;
pub const MAX_WEIGHT: u32 = 1000;
const MAX_HOST_LEN: usize = 253;
const MAX_PATH_LEN: usize = 1024;
/// An upgrade tag names a few protocols, each a short token; more is a mistake.
const MAX_UPGRADES: usize = 8;
const MAX_UPGRADE_LEN: usize = 32;

/// Where a route applies: an exact host or any host, and a path prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    /// Lower-case host without port; `None` matches any host.
    pub host: Option<String>,
    /// Starts with `/`; no trailing `/` except the root itself.
    pub prefix: String,
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Some(h) => write!(f, "{h}{}", self.prefix),
            None => write!(f, "*{}", self.prefix),
        }
    }
}

/// The protocol the lb speaks to an instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UpstreamProto {
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (RFC 9113 3.3).
    H2c,
}

impl UpstreamProto {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProto::Http1 => "http1",
            UpstreamProto::H2c => "h2c",
        }
    }
}

/// What an instance's tags say about routing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRouting {
    pub routes: Vec<RouteKey>,
    pub weight: u32,
    pub enabled: bool,
    pub proto: UpstreamProto,
    pub redirect_https: bool,
    /// Lower-case protocol names this instance accepts as upgrades, beyond the lb's list.
    pub upgrades: Vec<String>,
    /// How requests to this instance and its responses are changed on the way.
    pub rewrite: Rewrite,
    pub sticky: Option<Sticky>,
    pub version: Option<String>,
}

/// The cookie name the lb issues by default for `P.sticky=lb-cookie`.
pub const DEFAULT_AFFINITY_COOKIE: &str = "sy-affinity";

/// What a sticky route keys its requests on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sticky {
    /// A cookie of this name, issued by the lb to clients that have none.
    LbCookie(String),
    /// An existing cookie of the application's (a session ID); requests without it are
    /// balanced as on any route.
    Cookie(String),
    /// A request header field (lower case); requests without it are balanced as on any route.
    Header(String),
}

impl fmt::Display for Sticky {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sticky::LbCookie(n) => write!(f, "lb-cookie:{n}"),
            Sticky::Cookie(n) => write!(f, "cookie:{n}"),
            Sticky::Header(n) => write!(f, "header:{n}"),
        }
    }
}

/// One tag of ours that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagError {
    pub tag: String,
    pub kind: TagErrorKind,
    pub detail: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TagErrorKind {
    BadRoute,
    BadWeight,
    BadEnable,
    BadProto,
    BadRedirect,
    BadUpgrade,
    BadRewrite,
    BadHeader,
    BadSticky,
    BadVersion,
    UnknownKey,
}

impl TagErrorKind {
    /// A bounded metric label.
    pub const ALL: [TagErrorKind; 11] = [
        TagErrorKind::BadRoute,
        TagErrorKind::BadWeight,
        TagErrorKind::BadEnable,
        TagErrorKind::BadProto,
        TagErrorKind::BadRedirect,
        TagErrorKind::BadUpgrade,
        TagErrorKind::BadRewrite,
        TagErrorKind::BadHeader,
        TagErrorKind::BadSticky,
        TagErrorKind::BadVersion,
        TagErrorKind::UnknownKey,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TagErrorKind::BadRoute => "bad_route",
            TagErrorKind::BadWeight => "bad_weight",
            TagErrorKind::BadEnable => "bad_enable",
            TagErrorKind::BadProto => "bad_proto",
            TagErrorKind::BadRedirect => "bad_redirect",
            TagErrorKind::BadUpgrade => "bad_upgrade",
            TagErrorKind::BadRewrite => "bad_rewrite",
            TagErrorKind::BadHeader => "bad_header",
            TagErrorKind::BadSticky => "bad_sticky",
            TagErrorKind::BadVersion => "bad_version",
            TagErrorKind::UnknownKey => "unknown_key",
        }
    }
}

impl fmt::Display for TagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tag {:?}: {}", self.tag, self.detail)
    }
}

/// Parses one instance's tags. Never fails as a whole: bad tags come back as errors beside the
/// routing that the good ones describe.
pub fn parse_tags<'a>(
    prefix: &str,
    tags: impl IntoIterator<Item = &'a str>,
) -> (InstanceRouting, Vec<TagError>) {
    let mut routing = InstanceRouting {
        routes: Vec::new(),
        weight: DEFAULT_WEIGHT,
        enabled: true,
        proto: UpstreamProto::Http1,
        redirect_https: false,
        upgrades: Vec::new(),
        rewrite: Rewrite::default(),
        sticky: None,
        version: None,
    };
    let mut errors = Vec::new();
    for tag in tags {
        let Some(rest) = tag.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        let err = |kind, detail| TagError {
            tag: tag.to_string(),
            kind,
            detail,
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        match key {
            "route" => match parse_route(value) {
                Ok(r) => {
                    if !routing.routes.contains(&r) {
                        routing.routes.push(r);
                    }
                }
                Err(detail) => errors.push(err(TagErrorKind::BadRoute, detail)),
            },
            "weight" => match value.parse::<u32>() {
                Ok(w) if w <= MAX_WEIGHT => routing.weight = w,
                _ => errors.push(err(
                    TagErrorKind::BadWeight,
                    "weight must be an integer 0..=1000",
                )),
            },
            "enable" => match value {
                "true" | "1" | "yes" => routing.enabled = true,
                "false" | "0" | "no" => routing.enabled = false,
                _ => errors.push(err(TagErrorKind::BadEnable, "enable must be true or false")),
            },
            "proto" => match value {
                "http1" | "http" => routing.proto = UpstreamProto::Http1,
                "h2c" | "h2" | "grpc" => routing.proto = UpstreamProto::H2c,
                _ => errors.push(err(TagErrorKind::BadProto, "proto must be http1 or h2c")),
            },
            "redirect" => match value {
                "https" => routing.redirect_https = true,
                "false" | "none" => routing.redirect_https = false,
                _ => errors.push(err(TagErrorKind::BadRedirect, "redirect must be https")),
            },
            "upgrade" => match parse_upgrades(value) {
                Ok(protocols) => {
                    for p in protocols {
                        if !routing.upgrades.contains(&p) {
                            routing.upgrades.push(p);
                        }
                    }
                }
                Err(detail) => errors.push(err(TagErrorKind::BadUpgrade, detail)),
            },
            "version" => match is_version(value) {
                true => routing.version = Some(value.to_string()),
                false => errors.push(err(
                    TagErrorKind::BadVersion,
                    "version must be a token of at most 64 characters (letters, digits, '-', '.', '_')",
                )),
            },
            "sticky" => match parse_sticky(value) {
                Ok(s) => routing.sticky = Some(s),
                Err(detail) => errors.push(err(TagErrorKind::BadSticky, detail)),
            },
            key if rewrite::is_rewrite_key(key) => {
                if let Err(detail) = rewrite::apply_tag(&mut routing.rewrite, key, value) {
                    let kind = if rewrite::is_header_key(key) {
                        TagErrorKind::BadHeader
                    } else {
                        TagErrorKind::BadRewrite
                    };
                    errors.push(err(kind, detail));
                }
            }
            _ => errors.push(err(
                TagErrorKind::UnknownKey,
                "unknown key (expected route, weight, enable, proto, redirect, upgrade, sticky, version, strip, prepend, host, request.*, response.* or rewrite.*)",
            )),
        }
    }
    (routing, errors)
}

/// A version name: what a KV weights entry and a pinning header name it by.
pub fn is_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// `lb-cookie[:NAME]`, `cookie:NAME` or `header:NAME`. Cookie names are RFC 6265 tokens;
/// header names tokens, lower-cased.
fn parse_sticky(value: &str) -> Result<Sticky, &'static str> {
    const BAD: &str = "sticky must be lb-cookie[:NAME], cookie:NAME or header:NAME (NAME a token)";
    let (kind, name) = value.split_once(':').unwrap_or((value, ""));
    let token = |n: &str| !n.is_empty() && n.len() <= 64 && n.bytes().all(is_tchar);
    match kind {
        "lb-cookie" if name.is_empty() => Ok(Sticky::LbCookie(DEFAULT_AFFINITY_COOKIE.into())),
        "lb-cookie" if token(name) => Ok(Sticky::LbCookie(name.into())),
        "cookie" if token(name) => Ok(Sticky::Cookie(name.into())),
        "header" if token(name) => Ok(Sticky::Header(name.to_ascii_lowercase())),
        _ => Err(BAD),
    }
}

/// Parses the value of a route tag: `[HOST][/PATH]`.
/// `PROTO[,PROTO]`: protocol names (RFC 9110 7.8 `protocol-name`, a token), lower-cased.
/// The whole tag is refused when any name is bad, so a typo never half-applies.
fn parse_upgrades(value: &str) -> Result<Vec<String>, &'static str> {
    let names: Vec<&str> = value.split(',').map(str::trim).collect();
    if names.len() > MAX_UPGRADES {
        return Err("upgrade names at most 8 protocols");
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        if name.is_empty() || name.len() > MAX_UPGRADE_LEN || !name.bytes().all(is_tchar) {
            return Err("upgrade must be protocol names (tokens) separated by commas");
        }
        if name.eq_ignore_ascii_case("h2c") {
            return Err("h2c upgrades are never forwarded");
        }
        out.push(name.to_ascii_lowercase());
    }
    Ok(out)
}

/// RFC 9110 5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub fn parse_route(value: &str) -> Result<RouteKey, &'static str> {
    if value.is_empty() {
        return Err("empty route (use / for every request)");
    }
    let (host, path) = match value.find('/') {
        Some(i) => value.split_at(i),
        None => (value, "/"),
    };
    let host = match host {
        "" | "*" => None,
        h => {
            let h = h.to_ascii_lowercase();
            // An explicit port in the route would never match: the lb compares hosts without it.
            if h.len() > MAX_HOST_LEN
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
                || h.starts_with('.')
                || h.ends_with('.')
            {
                return Err("host must be a DNS name (letters, digits, '-', '.'), no port");
            }
            Some(h)
        }
    };
    if path.len() > MAX_PATH_LEN
        || !path.bytes().all(|b| b.is_ascii_graphic())
        || path.contains(['?', '#', '*'])
        || path.contains("//")
    {
        return Err("path must be a plain absolute path without '?', '#', '*' or '//'");
    }
    let prefix = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    Ok(RouteKey {
        host,
        prefix: prefix.to_string(),
    })
}

/// Whether `path` is `prefix` or below it, segment-wise.
pub fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(host: Option<&str>, prefix: &str) -> RouteKey {
        RouteKey {
            host: host.map(str::to_string),
            prefix: prefix.to_string(),
        }
    }

    #[test]
    fn routes() {
        let ok = [
            ("/", key(None, "/")),
            ("*/", key(None, "/")),
            ("*/static/", key(None, "/static")),
            ("api.example.com", key(Some("api.example.com"), "/")),
            ("API.Example.com/v1", key(Some("api.example.com"), "/v1")),
            ("api.example.com/v1/", key(Some("api.example.com"), "/v1")),
            ("/v1/users", key(None, "/v1/users")),
        ];
        for (raw, want) in ok {
            assert_eq!(parse_route(raw), Ok(want), "{raw}");
        }
        for bad in [
            "",
            "api.example.com:80/v1",
            "/a b",
            "/a?b",
            "/a//b",
            "bad host/",
            ".x/",
            "/*",
        ] {
            assert!(parse_route(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn tags_with_errors_keep_the_good_parts() {
        let (r, errs) = parse_tags(
            "lb",
            [
                "lb.route=/",
                "lb.route=api.example.com/v1",
                "lb.route=/",
                "lb.weight=50",
                "lb.weight=lots",
                "lb.colour=red",
                "lb.route=",
                "other",
                "lbx.route=/nope",
                "traefik.enable=true",
            ],
        );
        assert_eq!(
            r.routes,
            vec![key(None, "/"), key(Some("api.example.com"), "/v1")]
        );
        assert_eq!(r.weight, 50);
        assert!(r.enabled);
        let kinds: Vec<_> = errs.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec![
                TagErrorKind::BadWeight,
                TagErrorKind::UnknownKey,
                TagErrorKind::BadRoute
            ]
        );
    }

    #[test]
    fn opt_out_and_custom_prefix() {
        let (r, errs) = parse_tags("edge", ["edge.route=/", "edge.enable=false", "lb.route=/x"]);
        assert!(!r.enabled);
        assert_eq!(r.routes, vec![key(None, "/")]);
        assert!(errs.is_empty());
    }

    #[test]
    fn protocol_and_redirect() {
        let (r, errs) = parse_tags("lb", ["lb.route=/", "lb.proto=h2c", "lb.redirect=https"]);
        assert_eq!(r.proto, UpstreamProto::H2c);
        assert!(r.redirect_https);
        assert!(errs.is_empty());
        let (r, errs) = parse_tags("lb", ["lb.proto=spdy", "lb.redirect=ftp"]);
        assert_eq!(r.proto, UpstreamProto::Http1);
        assert!(!r.redirect_https);
        let kinds: Vec<_> = errs.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [TagErrorKind::BadProto, TagErrorKind::BadRedirect]);
    }

    #[test]
    fn upgrades() {
        let tags = ["lb.upgrade=MQTT, irc", "lb.upgrade=mqtt"];
        let (r, errs) = parse_tags("lb", tags);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(r.upgrades, ["mqtt", "irc"]);
        for bad in ["", "h2c", "mqtt,H2C", "a b", "mqtt,", "irc/2", "x\\"] {
            let (r, errs) = parse_tags("lb", [format!("lb.upgrade={bad}").as_str()]);
            assert!(r.upgrades.is_empty(), "{bad:?}");
            assert_eq!(errs[0].kind, TagErrorKind::BadUpgrade, "{bad:?}");
        }
    }

    #[test]
    fn sticky() {
        let cases = [
            (
                "lb-cookie",
                Sticky::LbCookie(DEFAULT_AFFINITY_COOKIE.into()),
            ),
            ("lb-cookie:route", Sticky::LbCookie("route".into())),
            ("cookie:JSESSIONID", Sticky::Cookie("JSESSIONID".into())),
            ("header:X-User", Sticky::Header("x-user".into())),
        ];
        for (v, want) in cases {
            let (r, errs) = parse_tags("lb", [format!("lb.sticky={v}").as_str()]);
            assert!(errs.is_empty(), "{v}");
            assert_eq!(r.sticky, Some(want));
        }
        for bad in ["", "cookie", "cookie:", "header:a b", "ip", "lb-cookie:a;b"] {
            let (r, errs) = parse_tags("lb", [format!("lb.sticky={bad}").as_str()]);
            assert_eq!(r.sticky, None, "{bad}");
            assert_eq!(errs[0].kind, TagErrorKind::BadSticky, "{bad}");
        }
    }

    #[test]
    fn segment_matching() {
        let cases = [
            ("/", "/anything", true),
            ("/v1", "/v1", true),
            ("/v1", "/v1/", true),
            ("/v1", "/v1/users", true),
            ("/v1", "/v1beta", false),
            ("/v1", "/v", false),
            ("/v1/users", "/v1", false),
        ];
        for (prefix, path, want) in cases {
            assert_eq!(path_matches(prefix, path), want, "{prefix} vs {path}");
        }
    }
}
