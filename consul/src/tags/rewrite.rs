//! The rewriting part of the tag contract: how a request is changed on its way to an instance,
//! and its response on the way back. Plain validated data; the lb applies it.
//!
//! Grammar, with the tag prefix `P` (one value per key, so that each tag is one Docker label):
//! - `P.strip=true`: the matched route prefix is cut from the path (`/api/users` on route
//!   `/api` reaches the instance as `/users`; `/api` as `/`).
//! - `P.prepend=/PATH`: PATH is put in front of the path (after any strip).
//! - `P.host=NAME[:PORT]`: the `Host` the instance sees; `X-Forwarded-Host` keeps the client's.
//! - `P.request.set.NAME=VALUE`, `P.request.add.NAME=VALUE`, `P.request.remove=NAME[,NAME]`:
//!   header fields of the forwarded request (remove, then set, then add).
//! - `P.response.set.NAME=VALUE`, `P.response.add.NAME=VALUE`, `P.response.remove=NAME[,NAME]`:
//!   the same for the response.
//! - `P.rewrite.location=true`: a redirect's `Location` that names a path of the instance's
//!   (the rewritten path space) is mapped back into the client's. Off by default.
//! - `P.rewrite.cookie-path=true`: the same for the `Path` of `Set-Cookie`. Off by default.
//!
//! Fields that frame or route the message (`Content-Length`, `Transfer-Encoding`, hop-by-hop
//! fields, `Host`, `X-Switchyard-Version`) and the ones the lb writes or vouches for itself
//! (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`, `X-Request-Id`, `X-Switchyard-Error`) cannot
//! be edited: a tag must not be able to desynchronise a connection or forge the lb's word.

use super::{is_tchar, MAX_PATH_LEN};

/// Header edits are few per instance; more is a mistake (and would cost every request).
const MAX_EDITS: usize = 32;
const MAX_VALUE_LEN: usize = 1024;
const MAX_HOST_LEN: usize = 253;

/// Fields no tag may edit (lower case).
const NOT_EDITABLE: &[&str] = &[
    "connection",
    "content-length",
    "forwarded",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
    "x-switchyard-error",
    "x-switchyard-version",
];

/// What an instance's tags ask to change in the requests it gets and the responses it gives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rewrite {
    pub strip: bool,
    /// Starts with `/`, no trailing `/`.
    pub prepend: Option<String>,
    /// `NAME[:PORT]`, lower case.
    pub host: Option<String>,
    pub request: HeaderEdits,
    pub response: HeaderEdits,
    pub location: bool,
    pub cookie_path: bool,
}

impl Rewrite {
    /// Whether the tags asked for nothing: such an instance costs the request path nothing.
    pub fn is_empty(&self) -> bool {
        *self == Rewrite::default()
    }

    /// Whether the path the instance sees differs from the client's.
    pub fn moves_path(&self) -> bool {
        self.strip || self.prepend.is_some()
    }
}

/// Edits of one message's header fields. Names are lower-case tokens; values are valid field
/// values (visible ASCII, spaces and tabs inside).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeaderEdits {
    pub remove: Vec<String>,
    /// One value per name: a later tag for the same name replaces it.
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    fn len(&self) -> usize {
        self.remove.len() + self.set.len() + self.add.len()
    }
}

/// Whether a tag key belongs to rewriting at all.
pub(super) fn is_rewrite_key(key: &str) -> bool {
    matches!(key, "strip" | "prepend" | "host")
        || key.starts_with("rewrite.")
        || key.starts_with("request.")
        || key.starts_with("response.")
}

/// Whether a rewrite key is about header fields (its errors are counted apart).
pub(super) fn is_header_key(key: &str) -> bool {
    key.starts_with("request.") || key.starts_with("response.")
}

/// Applies one rewrite tag (`key=value`, key without the prefix) to `rw`.
pub(super) fn apply_tag(rw: &mut Rewrite, key: &str, value: &str) -> Result<(), &'static str> {
    match key {
        "strip" => rw.strip = flag(value, "strip must be true or false")?,
        "prepend" => rw.prepend = Some(prefix_path(value)?),
        "host" => rw.host = Some(host(value)?),
        "rewrite.location" => rw.location = flag(value, "rewrite.location must be true or false")?,
        "rewrite.cookie-path" => {
            rw.cookie_path = flag(value, "rewrite.cookie-path must be true or false")?
        }
        _ => {
            let (edits, op) = if let Some(op) = key.strip_prefix("request.") {
                (&mut rw.request, op)
            } else if let Some(op) = key.strip_prefix("response.") {
                (&mut rw.response, op)
            } else {
                return Err("unknown rewrite key (expected strip, prepend, host, rewrite.location or rewrite.cookie-path)");
            };
            edit(edits, op, value)?;
        }
    }
    Ok(())
}

fn edit(edits: &mut HeaderEdits, op: &str, value: &str) -> Result<(), &'static str> {
    if edits.len() >= MAX_EDITS {
        return Err("at most 32 header edits per message");
    }
    if op == "remove" {
        let mut names = Vec::new();
        for name in value.split(',').map(str::trim) {
            names.push(field_name(name)?);
        }
        for name in names {
            if !edits.remove.contains(&name) {
                edits.remove.push(name);
            }
        }
        return Ok(());
    }
    let (verb, name) = op
        .split_once('.')
        .ok_or("expected request.set.NAME, request.add.NAME or request.remove")?;
    let name = field_name(name)?;
    let value = field_value(value)?;
    match verb {
        "set" => {
            edits.set.retain(|(n, _)| *n != name);
            edits.set.push((name, value));
        }
        "add" => edits.add.push((name, value)),
        _ => return Err("expected set.NAME, add.NAME or remove"),
    }
    Ok(())
}

fn flag(value: &str, detail: &'static str) -> Result<bool, &'static str> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(detail),
    }
}

/// A path to put in front: absolute, plain, without a trailing `/` (kept off so that
/// `/v1` + `/users` is `/v1/users`).
fn prefix_path(value: &str) -> Result<String, &'static str> {
    const BAD: &str =
        "prepend must be a plain absolute path like /v1, without '?', '#', '%', ';' or '//'";
    if !value.starts_with('/')
        || value.len() > MAX_PATH_LEN
        || !value.bytes().all(|b| b.is_ascii_graphic())
        || value.contains(['?', '#', '%', ';', '\\'])
        || value.contains("//")
        || value.split('/').any(|s| s == "." || s == "..")
    {
        return Err(BAD);
    }
    let trimmed = value.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err("prepend of / changes nothing; leave the tag out");
    }
    Ok(trimmed.to_string())
}

/// `NAME[:PORT]`: a DNS name or an IPv4 address, an optional port.
fn host(value: &str) -> Result<String, &'static str> {
    const BAD: &str = "host must be a DNS name with an optional :port";
    let (name, port) = match value.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (value, None),
    };
    if name.is_empty()
        || name.len() > MAX_HOST_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        || name.starts_with('.')
        || port.is_some_and(|p| p.parse::<u16>().is_err())
    {
        return Err(BAD);
    }
    Ok(value.to_ascii_lowercase())
}

fn field_name(name: &str) -> Result<String, &'static str> {
    if name.is_empty() || name.len() > 128 || !name.bytes().all(is_tchar) {
        return Err("a header name must be a token (letters, digits, '-')");
    }
    let name = name.to_ascii_lowercase();
    if NOT_EDITABLE.contains(&name.as_str()) {
        return Err("that header frames, routes or is written by the lb: it cannot be edited");
    }
    Ok(name)
}

/// RFC 9110 5.5 `field-value`, without obs-text: visible ASCII, with spaces and tabs inside.
fn field_value(value: &str) -> Result<String, &'static str> {
    let b = value.as_bytes();
    if b.len() > MAX_VALUE_LEN
        || !b
            .iter()
            .all(|&c| c.is_ascii_graphic() || c == b' ' || c == b'\t')
        || b.first().is_some_and(|&c| c == b' ' || c == b'\t')
        || b.last().is_some_and(|&c| c == b' ' || c == b'\t')
    {
        return Err("a header value must be visible ASCII (spaces inside), at most 1024 bytes");
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::{parse_tags, TagErrorKind};
    use super::*;

    fn parse(tags: &[&str]) -> (Rewrite, Vec<TagErrorKind>) {
        let (r, errs) = parse_tags("lb", tags.iter().copied());
        (r.rewrite, errs.iter().map(|e| e.kind).collect())
    }

    #[test]
    fn a_full_rewrite() {
        let (rw, errs) = parse(&[
            "lb.route=/api",
            "lb.strip=true",
            "lb.prepend=/v2/",
            "lb.host=Users.internal:8080",
            "lb.request.set.X-Env=prod, eu",
            "lb.request.set.x-env=staging",
            "lb.request.add.X-Tag=a",
            "lb.request.add.X-Tag=b",
            "lb.request.remove=Cookie, X-Debug",
            "lb.response.set.Strict-Transport-Security=max-age=63072000",
            "lb.response.remove=server",
            "lb.rewrite.location=true",
            "lb.rewrite.cookie-path=yes",
        ]);
        assert!(errs.is_empty(), "{errs:?}");
        assert!(rw.strip && rw.location && rw.cookie_path);
        assert_eq!(rw.prepend.as_deref(), Some("/v2"));
        assert_eq!(rw.host.as_deref(), Some("users.internal:8080"));
        assert_eq!(rw.request.set, [("x-env".into(), "staging".into())]);
        assert_eq!(
            rw.request.add,
            [("x-tag".into(), "a".into()), ("x-tag".into(), "b".into())]
        );
        assert_eq!(rw.request.remove, ["cookie", "x-debug"]);
        assert_eq!(
            rw.response.set,
            [(
                "strict-transport-security".into(),
                "max-age=63072000".into()
            )]
        );
        assert_eq!(rw.response.remove, ["server"]);
        assert!(!rw.is_empty() && rw.moves_path());
    }

    #[test]
    fn nothing_asked_is_empty() {
        let (rw, errs) = parse(&["lb.route=/", "lb.strip=false", "lb.weight=5"]);
        assert!(errs.is_empty());
        assert!(rw.is_empty());
    }

    #[test]
    fn bad_tags_are_refused_one_by_one() {
        let cases = [
            ("lb.strip=maybe", TagErrorKind::BadRewrite),
            ("lb.prepend=v1", TagErrorKind::BadRewrite),
            ("lb.prepend=/a/../b", TagErrorKind::BadRewrite),
            ("lb.prepend=/a?b", TagErrorKind::BadRewrite),
            ("lb.prepend=/", TagErrorKind::BadRewrite),
            ("lb.host=a b", TagErrorKind::BadRewrite),
            ("lb.host=a:http", TagErrorKind::BadRewrite),
            ("lb.rewrite.location=sure", TagErrorKind::BadRewrite),
            ("lb.rewrite.everything=true", TagErrorKind::BadRewrite),
            ("lb.request.set.Content-Length=0", TagErrorKind::BadHeader),
            (
                "lb.request.set.Transfer-Encoding=chunked",
                TagErrorKind::BadHeader,
            ),
            ("lb.request.set.Host=evil", TagErrorKind::BadHeader),
            (
                "lb.request.set.X-Forwarded-For=1.2.3.4",
                TagErrorKind::BadHeader,
            ),
            ("lb.response.set.X-Request-Id=1", TagErrorKind::BadHeader),
            ("lb.request.set.Bad Name=1", TagErrorKind::BadHeader),
            ("lb.request.set.X-A=line\u{7f}", TagErrorKind::BadHeader),
            ("lb.request.set.X-A= padded", TagErrorKind::BadHeader),
            ("lb.request.set.X-A=caf\u{e9}", TagErrorKind::BadHeader),
            ("lb.request.remove=x-a,,x-b", TagErrorKind::BadHeader),
            ("lb.request.remove=connection", TagErrorKind::BadHeader),
            ("lb.request.replace.X-A=1", TagErrorKind::BadHeader),
            ("lb.request.set=1", TagErrorKind::BadHeader),
        ];
        for (tag, want) in cases {
            let (rw, errs) = parse(&["lb.route=/", tag, "lb.response.remove=server"]);
            assert_eq!(errs, [want], "{tag}");
            // The instance's other tags still apply.
            assert_eq!(rw.response.remove, ["server"], "{tag}");
            assert!(
                rw.request.is_empty() && !rw.strip && rw.prepend.is_none(),
                "{tag}"
            );
        }
    }

    #[test]
    fn edits_are_bounded() {
        let tags: Vec<String> = (0..40).map(|i| format!("lb.request.add.x-{i}=v")).collect();
        let (r, errs) = parse_tags("lb", tags.iter().map(String::as_str));
        assert_eq!(r.rewrite.request.add.len(), MAX_EDITS);
        assert_eq!(errs.len(), 40 - MAX_EDITS);
    }
}
