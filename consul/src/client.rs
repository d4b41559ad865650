//! The HTTP side: building requests, reading `X-Consul-*` headers, bounding every wait.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;

use crate::connect::{Connector, TlsError, TlsFiles};
use crate::types::{
    AgentCheck, AgentService, CheckState, CheckStatus, KvPair, ServiceEntry, ServiceRegistration,
};

/// Path segments (service names, IDs) are escaped; Consul names are usually safe already.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');
/// A KV key keeps its `/` separators.
const KEY: &AsciiSet = &SEGMENT.remove(b'/');

/// Consul's Go client adds this much on top of `wait + wait/16` before it gives up on a long
/// poll; a shorter client timeout fails every long poll (consul-rust#70).
const LONG_POLL_MARGIN: Duration = Duration::from_secs(7);
/// Bound for calls that do not block on the server.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// A response larger than this is a misconfiguration, not a catalog.
const MAX_BODY: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid Consul address {addr:?}: {reason}")]
    InvalidAddress { addr: String, reason: String },
    #[error("Consul TLS file {0}")]
    Tls(#[from] TlsError),
    #[error("invalid Consul TLS server name {name:?}: {reason}")]
    ServerName { name: String, reason: String },
    #[error("Consul token file {file}: {reason}")]
    TokenFile { file: String, reason: String },
    // The message carries the causes already, so they are not also its `source`: a
    // report that walks the sources would say each twice.
    #[error("Consul request {path} failed: {}", chain(cause))]
    Transport {
        path: String,
        cause: hyper_util::client::legacy::Error,
    },
    #[error("Consul request {path} timed out after {after:?}")]
    Timeout { path: String, after: Duration },
    #[error("Consul request {path} body: {reason}")]
    Body { path: String, reason: String },
    #[error("Consul answered {status} to {path}: {body}")]
    Status {
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("Consul response to {path} is not the expected JSON: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// Every value `kind()` returns, so metrics can start each series at zero.
    pub const KINDS: [&'static str; 8] = [
        "config",
        "acl_denied",
        "transport",
        "timeout",
        "body",
        "status_5xx",
        "status_4xx",
        "decode",
    ];

    /// For an error in the settings, which one (after its prefix: `LB_` + this).
    pub fn setting(&self) -> Option<&'static str> {
        match self {
            Error::InvalidAddress { .. } => Some("CONSUL_ADDR"),
            Error::Tls(e) => Some(e.setting),
            Error::ServerName { .. } => Some("CONSUL_TLS_SERVER_NAME"),
            Error::TokenFile { .. } => Some("CONSUL_TOKEN_FILE"),
            _ => None,
        }
    }

    /// A short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidAddress { .. }
            | Error::Tls(_)
            | Error::ServerName { .. }
            | Error::TokenFile { .. } => "config",
            Error::Transport { .. } => "transport",
            Error::Timeout { .. } => "timeout",
            Error::Body { .. } => "body",
            Error::Status { status, .. } if status.is_server_error() => "status_5xx",
            // Consul answers 403 ("ACL not found", "Permission denied") to a token it does
            // not know or that may not do this; 401 is not used by the API but means the same.
            Error::Status { status, .. }
                if *status == StatusCode::FORBIDDEN || *status == StatusCode::UNAUTHORIZED =>
            {
                "acl_denied"
            }
            Error::Status { .. } => "status_4xx",
            Error::Decode { .. } => "decode",
        }
    }
}

/// Options of a read. `index` > 0 makes it a blocking query bounded by `wait`.
#[derive(Debug, Clone, Default)]
pub struct QueryOptions {
    pub index: u64,
    pub wait: Option<Duration>,
    /// Let any server answer, including one without a leader.
    pub stale: bool,
    /// How long a read that does not block may take before it fails as a timeout; `None`:
    /// 10 s. A blocking query is bounded by its `wait` instead.
    pub timeout: Option<Duration>,
}

/// The `X-Consul-*` headers of a read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryMeta {
    pub index: u64,
    pub last_contact_ms: u64,
    pub known_leader: bool,
}

#[derive(Debug, Clone)]
pub struct Response<T> {
    pub value: T,
    pub meta: QueryMeta,
    /// Entries of a list answer that did not decode, each with why: left out, so that one
    /// odd instance (a port out of range, a field of the wrong type) cannot hold up the
    /// rest of its service.
    pub skipped: Vec<String>,
}

/// A list element that decodes, or says why it does not (without failing the list).
struct Lenient<T>(Result<T, String>);

impl<'de, T: serde::de::DeserializeOwned> serde::Deserialize<'de> for Lenient<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Ok(Lenient(
            serde_json::from_value(v).map_err(|e| e.to_string()),
        ))
    }
}

/// How to reach one agent and who to be to it.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `http://host:port`, `https://host:port`, or `host:port` (HTTP).
    pub addr: String,
    /// The ACL token sent with every request.
    pub token: Option<String>,
    /// A file holding the token (a swarm secret, say), read once at start; it wins over
    /// `token`.
    pub token_file: Option<PathBuf>,
    /// For an `https://` address.
    pub tls: TlsFiles,
}

impl Settings {
    /// The settings' names after `prefix` (`LB` reads `LB_CONSUL_ADDR`, ...), each with the
    /// variable Consul's own tools read as its fallback, paired so help and reading agree.
    pub const NAMES: [(&'static str, &'static str); 7] = [
        ("CONSUL_ADDR", "CONSUL_HTTP_ADDR"),
        ("CONSUL_TOKEN", "CONSUL_HTTP_TOKEN"),
        ("CONSUL_TOKEN_FILE", "CONSUL_HTTP_TOKEN_FILE"),
        ("CONSUL_CACERT", "CONSUL_CACERT"),
        ("CONSUL_CLIENT_CERT", "CONSUL_CLIENT_CERT"),
        ("CONSUL_CLIENT_KEY", "CONSUL_CLIENT_KEY"),
        ("CONSUL_TLS_SERVER_NAME", "CONSUL_TLS_SERVER_NAME"),
    ];

    /// Reads every connection setting through `get(name, fallback)`, which answers a
    /// non-empty value or nothing.
    pub fn read(prefix: &str, mut get: impl FnMut(&str, &str) -> Option<String>) -> Settings {
        let mut value = |i: usize| {
            let (name, fallback) = Self::NAMES[i];
            get(&format!("{prefix}_{name}"), fallback)
        };
        Settings {
            addr: value(0).unwrap_or_default(),
            token: value(1),
            token_file: value(2).map(PathBuf::from),
            tls: TlsFiles {
                ca_file: value(3).map(PathBuf::from),
                cert_file: value(4).map(PathBuf::from),
                key_file: value(5).map(PathBuf::from),
                server_name: value(6),
            },
        }
    }
}

/// A cheap-to-clone handle on one Consul agent.
#[derive(Clone)]
pub struct Client {
    http: HyperClient<Connector, Full<Bytes>>,
    connector: Connector,
    /// What requests are addressed to: the agent's `http(s)://host:port`, or a fixed
    /// `http://localhost` when the connector dials a Unix socket.
    base: String,
    /// The address as given, for logs.
    addr_shown: String,
    token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr_shown)
            .finish()
    }
}

impl Client {
    /// `addr` is `http://host:port` (or `host:port`, or `unix:///path`), with no TLS settings.
    pub fn new(addr: &str, token: Option<String>) -> Result<Self, Error> {
        Self::connect(&Settings {
            addr: addr.to_string(),
            token,
            ..Settings::default()
        })
    }

    /// A client for `s`: every file it names is read now, and an unusable one is an error
    /// that names it.
    pub fn connect(s: &Settings) -> Result<Self, Error> {
        let addr = s.addr.as_str();
        // The file wins over a token, as with Consul's own tools.
        let token = match &s.token_file {
            Some(file) => Some(read_token(file)?),
            None => s.token.clone().filter(|t| !t.is_empty()),
        };
        // An agent's HTTP API on a Unix socket (`addresses { http = "unix://…" }`): reachable
        // only by who can open the file, e.g. the services of one node sharing a volume.
        if let Some(path) = addr.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(Error::InvalidAddress {
                    addr: addr.to_string(),
                    reason: "expected unix:///absolute/path".into(),
                });
            }
            let connector = Connector::unix(PathBuf::from(path));
            return Ok(Client {
                http: Self::http(connector.clone()),
                connector,
                base: "http://localhost".to_string(),
                addr_shown: addr.to_string(),
                token,
            });
        }
        let base = if addr.contains("://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", addr.trim_end_matches('/'))
        };
        let uri: Uri = base
            .parse()
            .map_err(|e: http::uri::InvalidUri| Error::InvalidAddress {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        let https = match (uri.scheme_str(), uri.host()) {
            (Some("http"), Some(_)) => false,
            (Some("https"), Some(_)) => true,
            _ => {
                return Err(Error::InvalidAddress {
                    addr: addr.to_string(),
                    reason: "expected http://host:port, https://host:port or unix:///path".into(),
                })
            }
        };
        // TLS settings apply to `https://` addresses only, as with Consul's own tools: a
        // `CONSUL_CACERT` exported for them must not stop an `http://` client.
        let tls = if https {
            let name = match &s.tls.server_name {
                Some(name) => Some(
                    rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| {
                        Error::ServerName {
                            name: name.clone(),
                            reason: e.to_string(),
                        }
                    })?,
                ),
                None => None,
            };
            Some((Arc::new(crate::connect::tls_config(&s.tls)?), name))
        } else {
            None
        };
        let connector = Connector::new(tls);
        Ok(Client {
            http: Self::http(connector.clone()),
            connector,
            addr_shown: base.clone(),
            base,
            token,
        })
    }

    /// The same agent through connections of its own: reads that are bounded in number
    /// (a few at a time) are kept apart from long polls, whose connections stay busy for
    /// minutes, so that they reuse their own few connections instead of opening new ones
    /// whenever the long polls hold every idle one.
    pub fn with_own_pool(&self) -> Client {
        Client {
            http: Self::http(self.connector.clone()),
            connector: self.connector.clone(),
            base: self.base.clone(),
            addr_shown: self.addr_shown.clone(),
            token: self.token.clone(),
        }
    }

    fn http(connector: Connector) -> HyperClient<Connector, Full<Bytes>> {
        // A request made just as another's connection goes back to the pool opens a new
        // one; idle connections close soon, so that the count follows what is in use (an
        // agent refuses more than `limits.http_max_conns_per_client`, 200 by default).
        // (Without a timer the pool only drops an expired connection when it next looks
        // at it, and idle ones stay open for good.)
        HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(3))
            .pool_timer(TokioTimer::new())
            .build(connector)
    }

    /// The agent's address, as given (`http://host:port`, `unix:///path`).
    pub fn addr(&self) -> &str {
        &self.addr_shown
    }

    /// `GET /v1/catalog/services`: every service name with the union of its instances' tags.
    pub async fn catalog_services(
        &self,
        q: &QueryOptions,
    ) -> Result<Response<HashMap<String, Vec<String>>>, Error> {
        let raw: Response<HashMap<String, Option<Vec<String>>>> = self
            .read("/v1/catalog/services".to_string(), &[], q)
            .await?;
        Ok(Response {
            value: raw
                .value
                .into_iter()
                .map(|(k, v)| (k, v.unwrap_or_default()))
                .collect(),
            meta: raw.meta,
            skipped: raw.skipped,
        })
    }

    /// `GET /v1/health/service/<name>`, only instances whose checks all pass when `passing`.
    pub async fn health_service(
        &self,
        name: &str,
        passing: bool,
        q: &QueryOptions,
    ) -> Result<Response<Vec<ServiceEntry>>, Error> {
        let path = format!("/v1/health/service/{}", utf8_percent_encode(name, SEGMENT));
        let extra: &[&str] = if passing { &["passing"] } else { &[] };
        self.read_list(path, extra, q).await
    }

    /// `GET /v1/health/state/<state>`: the checks in that state (`any` for every check in the
    /// datacenter). A blocking read of `critical` wakes only when the set of critical checks
    /// changes, and its answer is as small as that set.
    pub async fn health_state(
        &self,
        state: &str,
        q: &QueryOptions,
    ) -> Result<Response<Vec<CheckState>>, Error> {
        let path = format!("/v1/health/state/{}", utf8_percent_encode(state, SEGMENT));
        self.read_list(path, &[], q).await
    }

    /// `GET /v1/health/checks/<name>`: the checks of every instance of a service, as the
    /// catalog holds them (what the servers have, not the agent's own view).
    pub async fn health_checks(
        &self,
        name: &str,
        q: &QueryOptions,
    ) -> Result<Response<Vec<CheckState>>, Error> {
        let path = format!("/v1/health/checks/{}", utf8_percent_encode(name, SEGMENT));
        self.read_list(path, &[], q).await
    }

    /// `GET /v1/health/node/<node>`: the checks the catalog holds for one node (its own and
    /// its services'), as the servers have them.
    pub async fn health_node(
        &self,
        node: &str,
        q: &QueryOptions,
    ) -> Result<Response<Vec<CheckState>>, Error> {
        let path = format!("/v1/health/node/{}", utf8_percent_encode(node, SEGMENT));
        self.read_list(path, &[], q).await
    }

    /// `GET /v1/agent/services`: what this agent itself has registered, keyed by service ID.
    pub async fn agent_services(&self) -> Result<HashMap<String, AgentService>, Error> {
        let r: Response<HashMap<String, AgentService>> = self
            .read("/v1/agent/services".into(), &[], &QueryOptions::default())
            .await?;
        Ok(r.value)
    }

    /// `GET /v1/agent/checks`, keyed by check ID.
    pub async fn agent_checks(
        &self,
        q: &QueryOptions,
    ) -> Result<HashMap<String, AgentCheck>, Error> {
        let r: Response<HashMap<String, AgentCheck>> =
            self.read("/v1/agent/checks".into(), &[], q).await?;
        Ok(r.value)
    }

    /// `PUT /v1/agent/service/register?replace-existing-checks=true`: idempotent.
    pub async fn register_service(&self, reg: &ServiceRegistration) -> Result<(), Error> {
        let body = serde_json::to_vec(reg).expect("registration serializes");
        self.write(
            "/v1/agent/service/register?replace-existing-checks=true".into(),
            Bytes::from(body),
        )
        .await
    }

    /// `PUT /v1/agent/service/deregister/<id>`: a no-op when the ID is unknown, so safe to retry.
    pub async fn deregister_service(&self, id: &str) -> Result<(), Error> {
        let path = format!(
            "/v1/agent/service/deregister/{}",
            utf8_percent_encode(id, SEGMENT)
        );
        self.write(path, Bytes::new()).await
    }

    /// `GET /v1/kv/<prefix>?recurse`: every key under `prefix`. A prefix without keys is an
    /// empty list: Consul answers 404 then, with the index to block on.
    pub async fn kv_list(
        &self,
        prefix: &str,
        q: &QueryOptions,
    ) -> Result<Response<Vec<KvPair>>, Error> {
        let path = format!("/v1/kv/{}", utf8_percent_encode(prefix, KEY));
        let (meta, body) = self.read_body_or_missing(&path, &["recurse"], q).await?;
        let value = match body {
            Some(body) => serde_json::from_slice::<Option<Vec<KvPair>>>(&body)
                .map_err(|source| Error::Decode { path, source })?
                .unwrap_or_default(),
            None => Vec::new(),
        };
        Ok(Response {
            value,
            meta,
            skipped: Vec::new(),
        })
    }

    /// `PUT /v1/kv/<key>` with `value` as the body.
    pub async fn kv_put(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        let path = format!("/v1/kv/{}", utf8_percent_encode(key, KEY));
        self.write(path, Bytes::copy_from_slice(value)).await
    }

    /// `PUT /v1/agent/service/maintenance/<id>?enable=true`: the agent adds a critical check
    /// to the instance, so that it leaves every healthy list at once, and Consul's lists of
    /// critical checks name it (a deregistration alone shows only in the catalog's index).
    pub async fn enable_maintenance(&self, id: &str, reason: &str) -> Result<(), Error> {
        let path = format!(
            "/v1/agent/service/maintenance/{}?enable=true&reason={}",
            utf8_percent_encode(id, SEGMENT),
            utf8_percent_encode(reason, SEGMENT)
        );
        self.write(path, Bytes::new()).await
    }

    /// `PUT /v1/agent/check/update/<id>`: sets a TTL check's status and output.
    pub async fn update_ttl(
        &self,
        check_id: &str,
        status: CheckStatus,
        output: &str,
    ) -> Result<(), Error> {
        let path = format!(
            "/v1/agent/check/update/{}",
            utf8_percent_encode(check_id, SEGMENT)
        );
        let body = serde_json::json!({"Status": status.as_str(), "Output": output});
        self.write(path, Bytes::from(body.to_string())).await
    }

    /// `GET /v1/status/leader`: empty string while there is no leader.
    pub async fn leader(&self) -> Result<String, Error> {
        let r: Response<String> = self
            .read("/v1/status/leader".into(), &[], &QueryOptions::default())
            .await?;
        Ok(r.value)
    }

    async fn read<T: DeserializeOwned>(
        &self,
        path: String,
        flags: &[&str],
        q: &QueryOptions,
    ) -> Result<Response<T>, Error> {
        let (meta, body) = self.read_body(&path, flags, q).await?;
        let value =
            serde_json::from_slice(&body).map_err(|source| Error::Decode { path, source })?;
        Ok(Response {
            value,
            meta,
            skipped: Vec::new(),
        })
    }

    /// A list answer (`null` reads as empty). Decoded in one pass; only when an entry does not
    /// fit is it decoded again entry by entry, so that the odd entry is left out (and said
    /// why) instead of failing the list. The slow pass costs a `Value` per entry, which at
    /// 20,000 checks is most of the decode: it is not paid for well-formed answers.
    async fn read_list<T: DeserializeOwned>(
        &self,
        path: String,
        flags: &[&str],
        q: &QueryOptions,
    ) -> Result<Response<Vec<T>>, Error> {
        let (meta, body) = self.read_body(&path, flags, q).await?;
        if let Ok(value) = serde_json::from_slice::<Option<Vec<T>>>(&body) {
            return Ok(Response {
                value: value.unwrap_or_default(),
                meta,
                skipped: Vec::new(),
            });
        }
        let raw: Option<Vec<Lenient<T>>> =
            serde_json::from_slice(&body).map_err(|source| Error::Decode { path, source })?;
        let mut skipped = Vec::new();
        let value = raw
            .unwrap_or_default()
            .into_iter()
            .filter_map(|Lenient(entry)| entry.map_err(|e| skipped.push(e)).ok())
            .collect();
        Ok(Response {
            value,
            meta,
            skipped,
        })
    }

    async fn read_body(
        &self,
        path: &str,
        flags: &[&str],
        q: &QueryOptions,
    ) -> Result<(QueryMeta, Bytes), Error> {
        let (meta, body) = self.read_body_or_missing(path, flags, q).await?;
        let body = body.ok_or_else(|| Error::Status {
            path: path.to_string(),
            status: StatusCode::NOT_FOUND,
            body: String::new(),
        })?;
        Ok((meta, body))
    }

    /// `read_body`, with `None` for a 404 (a KV prefix without keys), which still carries
    /// the index to block on.
    async fn read_body_or_missing(
        &self,
        path: &str,
        flags: &[&str],
        q: &QueryOptions,
    ) -> Result<(QueryMeta, Option<Bytes>), Error> {
        let mut uri = path.to_string();
        let mut sep = '?';
        for flag in flags {
            let _ = write!(uri, "{sep}{flag}");
            sep = '&';
        }
        if q.stale {
            let _ = write!(uri, "{sep}stale");
            sep = '&';
        }
        let mut timeout = q.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if q.index > 0 {
            let wait = q.wait.unwrap_or(Duration::from_secs(300));
            let _ = write!(uri, "{sep}index={}&wait={}ms", q.index, wait.as_millis());
            timeout = wait + wait / 16 + LONG_POLL_MARGIN;
        }
        let (status, headers, body) = self
            .call(Method::GET, path, &uri, Bytes::new(), timeout)
            .await?;
        let missing = status == StatusCode::NOT_FOUND;
        if !status.is_success() && !missing {
            return Err(Error::Status {
                path: path.to_string(),
                status,
                body: truncate(&body),
            });
        }
        let meta = QueryMeta {
            index: header_u64(&headers, "x-consul-index"),
            last_contact_ms: header_u64(&headers, "x-consul-lastcontact"),
            known_leader: headers
                .get("x-consul-knownleader")
                .is_some_and(|v| v.as_bytes() == b"true"),
        };
        Ok((meta, (!missing).then_some(body)))
    }

    async fn write(&self, path: String, body: Bytes) -> Result<(), Error> {
        let bare = path.split('?').next().unwrap_or(&path).to_string();
        let (status, _, resp) = self
            .call(Method::PUT, &bare, &path, body, DEFAULT_TIMEOUT)
            .await?;
        if !status.is_success() {
            return Err(Error::Status {
                path: bare,
                status,
                body: truncate(&resp),
            });
        }
        Ok(())
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        path_and_query: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), Error> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path_and_query));
        if let Some(token) = &self.token {
            req = req.header("x-consul-token", token);
        }
        if !body.is_empty() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body)).map_err(|e| Error::Body {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        let fut = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|cause| Error::Transport {
                    path: path.to_string(),
                    cause,
                })?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| Error::Body {
                    path: path.to_string(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok((parts.status, parts.headers, body))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| Error::Timeout {
                path: path.to_string(),
                after: timeout,
            })?
    }
}

/// An error with its causes: the HTTP client's own says only "client error (Connect)", and
/// the cause (refused, a certificate the agent did not accept) is what an operator needs.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(out, ": {c}");
        cause = c.source();
    }
    out
}

/// The first line of `file`, trimmed: secrets written by hand often end in a newline.
fn read_token(file: &std::path::Path) -> Result<String, Error> {
    let fail = |reason: String| Error::TokenFile {
        file: file.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(file).map_err(|e| fail(e.to_string()))?;
    let token = text.lines().next().unwrap_or_default().trim();
    if token.is_empty() {
        return Err(fail("is empty".into()));
    }
    Ok(token.to_string())
}

fn header_u64(headers: &http::HeaderMap, name: &str) -> u64 {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn truncate(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(512)]);
    s.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            Client::new("127.0.0.1:8500", None).unwrap().addr(),
            "http://127.0.0.1:8500"
        );
        assert_eq!(
            Client::new("http://consul:8500/", None).unwrap().addr(),
            "http://consul:8500"
        );
        assert_eq!(
            Client::new("unix:///run/consul/http.sock", None)
                .unwrap()
                .addr(),
            "unix:///run/consul/http.sock"
        );
        assert!(Client::new("unix://relative.sock", None).is_err());
        assert!(Client::new("ftp://consul:8501", None).is_err());
        assert!(Client::new("http://", None).is_err());
    }
}
