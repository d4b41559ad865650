//! An instance's rewrite, as the request path uses it: the tags' validated strings turned into
//! header names and values once, when discovery reads the instance, never per request.
//! Applying it is the request path's (`proxy::rewrite`).

use http::header::{HeaderName, HeaderValue};
use switchyard_consul::tags;

/// A compiled `tags::Rewrite`. Equal and ordered by what the tags said.
#[derive(Debug)]
pub struct Rewrite {
    pub source: tags::Rewrite,
    pub strip: bool,
    pub prepend: Option<Box<str>>,
    pub host: Option<HeaderValue>,
    pub request: Edits,
    pub response: Edits,
    pub location: bool,
    pub cookie_path: bool,
}

#[derive(Debug, Default)]
pub struct Edits {
    pub remove: Box<[HeaderName]>,
    pub set: Box<[(HeaderName, HeaderValue)]>,
    pub add: Box<[(HeaderName, HeaderValue)]>,
}

impl Edits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Removals, then sets, then additions.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    /// `None` for an edit the contract should have refused (a bug there, not a client's
    /// input): the whole rewrite is then left out rather than half applied.
    fn compile(e: &tags::HeaderEdits) -> Option<Edits> {
        let pair = |(n, v): &(String, String)| {
            Some((
                HeaderName::from_bytes(n.as_bytes()).ok()?,
                HeaderValue::from_str(v).ok()?,
            ))
        };
        Some(Edits {
            remove: e
                .remove
                .iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect::<Option<_>>()?,
            set: e.set.iter().map(pair).collect::<Option<_>>()?,
            add: e.add.iter().map(pair).collect::<Option<_>>()?,
        })
    }
}

impl Rewrite {
    /// `None` when the tags ask for nothing, so that such instances cost nothing per request.
    pub fn compile(source: &tags::Rewrite) -> Option<Rewrite> {
        if source.is_empty() {
            return None;
        }
        Some(Rewrite {
            strip: source.strip,
            prepend: source.prepend.as_deref().map(Into::into),
            host: match &source.host {
                Some(h) => Some(HeaderValue::from_str(h).ok()?),
                None => None,
            },
            request: Edits::compile(&source.request)?,
            response: Edits::compile(&source.response)?,
            location: source.location,
            cookie_path: source.cookie_path,
            source: source.clone(),
        })
    }

    /// Whether the path the instance sees differs from the client's.
    pub fn moves_path(&self) -> bool {
        self.strip || self.prepend.is_some()
    }

    /// Whether anything changes in the request.
    pub fn touches_request(&self) -> bool {
        self.moves_path() || self.host.is_some() || !self.request.is_empty()
    }

    /// Whether anything changes in the response.
    pub fn touches_response(&self) -> bool {
        !self.response.is_empty()
            || (self.moves_path() || self.host.is_some()) && (self.location || self.cookie_path)
    }
}

impl PartialEq for Rewrite {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Rewrite {}

impl PartialOrd for Rewrite {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Rewrite {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.source.cmp(&other.source)
    }
}
