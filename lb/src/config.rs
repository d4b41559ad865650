//! The lb's whole configuration as one value, read through a lookup function so that `main` can
//! layer flags over the environment and tests can pass a map.
//!
//! Every setting has an `LB_*` variable and the matching `--flag` (`LB_CONNECT_TIMEOUT` is
//! `--connect-timeout`). Every invalid setting is reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use switchyard_daemon::settings::{parse_bool, parse_duration, positive_duration, Reader, Setting};

/// (env name, default, help). The README's reference is generated from this list by `lb --help`.
pub const SETTINGS: &[Setting] = &[
    ("LB_LISTEN", "0.0.0.0:8080", "proxy listener address"),
    (
        "LB_ADMIN_LISTEN",
        "0.0.0.0:9090",
        "admin listener: /metrics /healthz /readyz /routes /why",
    ),
    (
        "LB_CONSUL_ADDR",
        "http://127.0.0.1:8500",
        "Consul agent address: http://, https://, or unix:///path for an agent's HTTP API on a Unix socket (CONSUL_HTTP_ADDR is honoured)",
    ),
    (
        "LB_CONSUL_TOKEN",
        "",
        "ACL token, needs service:read and node:read (CONSUL_HTTP_TOKEN is honoured)",
    ),
    (
        "LB_CONSUL_TOKEN_FILE",
        "",
        "file holding the ACL token, e.g. a swarm secret; read at start (CONSUL_HTTP_TOKEN_FILE is honoured)",
    ),
    (
        "LB_CONSUL_CACERT",
        "",
        "PEM CA certificates an https:// agent is verified against (default: the system's; CONSUL_CACERT is honoured)",
    ),
    (
        "LB_CONSUL_CLIENT_CERT",
        "",
        "PEM certificate chain shown to an agent that verifies clients (CONSUL_CLIENT_CERT is honoured)",
    ),
    (
        "LB_CONSUL_CLIENT_KEY",
        "",
        "PEM private key of LB_CONSUL_CLIENT_CERT (CONSUL_CLIENT_KEY is honoured)",
    ),
    (
        "LB_CONSUL_TLS_SERVER_NAME",
        "",
        "name the agent's certificate must carry when it is not the address's host (CONSUL_TLS_SERVER_NAME is honoured)",
    ),
    (
        "LB_CONSUL_WAIT",
        "60s",
        "blocking-query wait; bounds how long a silent partition goes unnoticed (max 10m)",
    ),
    (
        "LB_CONSUL_STALE",
        "true",
        "read with ?stale so any server answers, even without a leader",
    ),
    (
        "LB_CONSUL_RATE",
        "10",
        "blocking queries per second per watch once the burst is spent",
    ),
    (
        "LB_CONSUL_BURST",
        "10",
        "blocking queries a watch may make back to back",
    ),
    (
        "LB_CONSUL_SERVICE_WATCHES",
        "64",
        "routed services followed by a blocking query (one Consul connection) each; the rest \
         through the checks' queries",
    ),
    (
        "LB_CONSUL_BACKOFF_MAX",
        "10s",
        "longest wait between retries when Consul fails",
    ),
    (
        "LB_INITIAL_SYNC_TIMEOUT",
        "10s",
        "publish the first table after this even if some services have not answered",
    ),
    (
        "LB_SNAPSHOT_FILE",
        "",
        "file the lb keeps what it last learned from Consul in, and serves from when started while Consul does not answer (off when empty)",
    ),
    (
        "LB_STATE_LOSS_GRACE",
        "1m",
        "instances a Consul that lost its state (index gone backwards) no longer lists stay routed this long, or until their service is registered again",
    ),
    (
        "LB_ROUTE_LINGER",
        "5m",
        "a route whose last instance left answers 503 (Retry-After) this long before it is gone (404); 0 drops it at once",
    ),
    (
        "LB_TAG_PREFIX",
        "lb",
        "prefix of the routing tags (lb.route=, lb.weight=, lb.enable=)",
    ),
    (
        "LB_BALANCE",
        "p2c",
        "p2c (least in-flight of two, weighted) | round_robin | weighted",
    ),
    (
        "LB_WEIGHTS_KV_PREFIX",
        "switchyard/weights/",
        "Consul KV prefix of the version weights: <prefix><service> holds {\"v1\": 90, \"v2\": 10} (tag version); empty: not watched",
    ),
    (
        "LB_VERSION_PIN",
        "any",
        "who may pin a request to a version (X-Switchyard-Version, cookie sy-version), dark ones included: any | trusted (peers in LB_TRUSTED_PROXIES) | off",
    ),
    (
        "LB_AFFINITY_BALANCE",
        "1.25",
        "on sticky routes (tag sticky), no backend takes more than this times its share of the route's requests in flight: a hot session key spills to the next backend on the ring (1.0 to 10)",
    ),
    ("LB_CONNECT_TIMEOUT", "2s", "upstream TCP connect timeout"),
    (
        "LB_UPSTREAM_USER_TIMEOUT",
        "5s",
        "how long data sent to a backend may go unacknowledged before the connection is dropped and the backend ejected (TCP_USER_TIMEOUT: a dead or cut-off host; on HTTP/1.1 backends lifted from when a request passes 64 KiB or the socket refuses bytes until the response head; `0s` keeps the kernel's, about 15 minutes)",
    ),
    (
        "LB_RESPONSE_TIMEOUT",
        "30s",
        "upstream time to response headers, from when the backend has the whole request (while a large upload is sent: since the backend last took a part of it)",
    ),
    (
        "LB_MAX_BODY_BYTES",
        "0",
        "largest request body accepted, in bytes (413 above); 0: no limit",
    ),
    (
        "LB_CLIENT_BODY_TIMEOUT",
        "30s",
        "longest wait for the next bytes of a request body the client is sending (408 after)",
    ),
    (
        "LB_UPSTREAM_IDLE_TIMEOUT",
        "30s",
        "pooled upstream connections idle longer are closed",
    ),
    (
        "LB_UPSTREAM_MAX_IDLE",
        "256",
        "idle pooled connections kept per backend, shared out between the workers (at least one each)",
    ),
    (
        "LB_ACCESS_LOG",
        "off",
        "one line per request on standard output: off | json | text",
    ),
    (
        "LB_ACCESS_LOG_SAMPLE",
        "1",
        "the fraction of requests logged, from 0.000001 to 1 (with LB_ACCESS_LOG)",
    ),
    (
        "LB_ACCESS_LOG_BUFFER",
        "8192",
        "lines queued for the access log's writer; a line that finds the queue full is dropped and counted, never waited for",
    ),
    (
        "LB_CLIENT_HEADER_TIMEOUT",
        "15s",
        "time for a client to send a request head; also bounds client keep-alive idle time",
    ),
    (
        "LB_CLIENT_WRITE_TIMEOUT",
        "60s",
        "longest a response may wait for a client to read more of it (the connection, or an HTTP/2 stream, is closed after)",
    ),
    (
        "LB_CLIENT_NOTSENT_LOWAT",
        "131072",
        "bytes of a response the kernel holds unsent for a client before the lb writes no more (TCP_NOTSENT_LOWAT, Linux only; up to 64 KiB over); bytes on their way do not count, and the rest waits in the backend's socket; 0: the system's net.ipv4.tcp_notsent_lowat",
    ),
    (
        "LB_SPLICE_MIN",
        "0",
        "plain HTTP/1.1 responses whose Content-Length is at least this many bytes pass from the backend's socket to the client's through a pipe (splice, Linux only), never copied through the lb's memory; 0: never (see the README on when it pays)",
    ),
    (
        "LB_H2_IDLE_TIMEOUT",
        "3m",
        "HTTP/2 client connections with no open stream this long are closed (GOAWAY)",
    ),
    (
        "LB_MAX_HEADER_BYTES",
        "65536",
        "largest request head accepted (431 above)",
    ),
    (
        "LB_MAX_CONNECTIONS",
        "auto",
        "most client connections open at once; accepting waits above (auto: 3/4 of the descriptor limit)",
    ),
    (
        "LB_MAX_HEADERS",
        "100",
        "most request header fields accepted (431 above)",
    ),
    (
        "LB_BACKEND_MAX_CONNECTIONS",
        "0",
        "most requests in flight to one backend (its busy connections); full backends are passed over, 503 when all are; 0: no limit",
    ),
    (
        "LB_RETRIES",
        "2",
        "retries per request on another backend (0 disables)",
    ),
    (
        "LB_RETRY_BUDGET",
        "0.2",
        "retries allowed as a fraction of requests, on top of a reserve of 10",
    ),
    (
        "LB_EJECT_FAILURES",
        "1",
        "consecutive connect failures or timeouts that eject a backend",
    ),
    (
        "LB_EJECT_BASE",
        "5s",
        "first ejection length; doubles on each further ejection",
    ),
    ("LB_EJECT_MAX", "60s", "longest ejection"),
    (
        "LB_DRAIN_DELAY",
        "5s",
        "on SIGTERM: readiness false, keep accepting this long",
    ),
    (
        "LB_SHUTDOWN_TIMEOUT",
        "30s",
        "on SIGTERM: then wait this long for in-flight requests",
    ),
    (
        "LB_WORKERS",
        "auto",
        "request-handling threads (auto: one per CPU this process may run on)",
    ),
    (
        "LB_TLS_LISTEN",
        "",
        "HTTPS listener address, e.g. 0.0.0.0:8443 (empty: no TLS listener)",
    ),
    (
        "LB_TLS_CERTS",
        "",
        "certificates as CERT.pem[:KEY.pem] separated by commas (key read from CERT.pem when \
         omitted); picked by SNI from their DNS names, the first is the default",
    ),
    (
        "LB_TLS_RELOAD_INTERVAL",
        "10s",
        "how often certificate files are checked for changes (0s: only on SIGHUP)",
    ),
    (
        "LB_TLS_HANDSHAKE_TIMEOUT",
        "10s",
        "time for a client to complete the TLS handshake",
    ),
    (
        "LB_HTTP2",
        "true",
        "offer HTTP/2 to TLS clients through ALPN",
    ),
    (
        "LB_H2C",
        "false",
        "also accept HTTP/2 with prior knowledge (h2c) on the plain listener",
    ),
    (
        "LB_HTTPS_REDIRECT",
        "false",
        "answer every plain-HTTP request with a 308 to HTTPS (per route: tag lb.redirect=https)",
    ),
    (
        "LB_TUNNEL_IDLE_TIMEOUT",
        "1h",
        "upgraded connections (WebSocket...) with no byte either way this long are closed",
    ),
    (
        "LB_PROXY_PROTOCOL",
        "false",
        "the plain listener expects a PROXY protocol header (v1 or v2) on every connection, as behind an L4 balancer",
    ),
    (
        "LB_TLS_PROXY_PROTOCOL",
        "false",
        "the TLS listener expects a PROXY protocol header (v1 or v2) on every connection",
    ),
    (
        "LB_TRUSTED_PROXIES",
        "",
        "networks (CIDR, comma-separated) whose X-Forwarded-For, Forwarded and X-Real-IP are kept; from others they are replaced or dropped",
    ),
    (
        "LB_UPGRADE_PROTOCOLS",
        "websocket",
        "protocols a client may switch to through the lb (Upgrade; routes add theirs with tag lb.upgrade=); others are not forwarded, h2c never",
    ),
    (
        "LB_HTTPS_PORT",
        "443",
        "the port clients reach HTTPS on, for redirect locations",
    ),
    (
        "LB_LOG_FORMAT",
        "text",
        "text | json (level from RUST_LOG, default info)",
    ),
];

/// Who may pin a request to a version (`LB_VERSION_PIN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionPin {
    Any,
    Trusted,
    Off,
}

/// The access log's line format (`LB_ACCESS_LOG`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Power of two choices on in-flight requests, weighted.
    P2c,
    RoundRobin,
    /// Deterministic weighted spread (a low-discrepancy sequence over the weights).
    Weighted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Where Consul is and who the lb is to it.
    pub consul: switchyard_consul::Settings,
    pub consul_wait: Duration,
    pub consul_stale: bool,
    pub consul_rate: f64,
    pub consul_burst: u32,
    pub consul_service_watches: usize,
    pub consul_backoff_max: Duration,
    pub initial_sync_timeout: Duration,
    pub route_linger: Duration,
    pub state_loss_grace: Duration,
    pub snapshot_file: Option<std::path::PathBuf>,
    pub tag_prefix: String,
    pub balance: Balance,
    /// Empty: version weights are not watched.
    pub weights_kv_prefix: String,
    pub version_pin: VersionPin,
    /// The bound of consistent hashing with bounded loads, in thousandths (1,250 for 1.25).
    pub affinity_balance_permille: u64,
    pub connect_timeout: Duration,
    /// TCP_USER_TIMEOUT on upstream connections; zero leaves the kernel's.
    pub upstream_user_timeout: Duration,
    pub response_timeout: Duration,
    pub client_body_timeout: Duration,
    /// `None`: no limit.
    pub max_body_bytes: Option<u64>,
    pub upstream_idle_timeout: Duration,
    pub upstream_max_idle: usize,
    /// `None`: no access log.
    pub access_log: Option<AccessLogFormat>,
    pub access_log_sample: f64,
    pub access_log_buffer: usize,
    pub client_header_timeout: Duration,
    pub client_write_timeout: Duration,
    /// `TCP_NOTSENT_LOWAT` for client connections, in bytes; 0 leaves the system's.
    pub client_notsent_lowat: u32,
    /// Plain HTTP/1.1 response bodies of at least this many bytes are spliced; 0: none.
    pub splice_min: u64,
    pub h2_idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// `None`: from the descriptor limit at start.
    pub max_connections: Option<usize>,
    /// `None`: no limit.
    pub backend_max_connections: Option<usize>,
    pub retries: u32,
    pub retry_budget: f64,
    pub eject_failures: u32,
    pub eject_base: Duration,
    pub eject_max: Duration,
    pub drain_delay: Duration,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    /// None: one per CPU in the process's affinity mask (tokio's default).
    pub workers: Option<usize>,
    pub tls_listen: Option<SocketAddr>,
    pub tls_certs: Vec<CertSource>,
    /// Zero: reload only on SIGHUP.
    pub tls_reload_interval: Duration,
    pub tls_handshake_timeout: Duration,
    pub http2: bool,
    pub h2c: bool,
    pub https_redirect: bool,
    pub tunnel_idle_timeout: Duration,
    pub proxy_protocol: bool,
    pub tls_proxy_protocol: bool,
    /// Peers whose forwarding fields are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Lower-case protocol names an `Upgrade` may ask for; never `h2c`.
    pub upgrade_protocols: Vec<String>,
    pub https_port: u16,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads every setting through `lookup(ENV_NAME)`, falling back to the default.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut p = Reader::new(SETTINGS, lookup);
        let cfg = Config {
            listen: p.get(
                "LB_LISTEN",
                |s| s.parse().ok(),
                "a socket address like 0.0.0.0:8080",
            ),
            admin_listen: p.get("LB_ADMIN_LISTEN", |s| s.parse().ok(), "a socket address"),
            consul: switchyard_consul::Settings::read("LB", |name, alias| {
                p.optional(name, Some(alias))
            }),
            consul_wait: p.get(
                "LB_CONSUL_WAIT",
                |s| {
                    parse_duration(s)
                        .filter(|d| *d >= Duration::from_secs(1) && *d <= Duration::from_secs(600))
                },
                "a duration from 1s to 10m",
            ),
            consul_stale: p.get("LB_CONSUL_STALE", parse_bool, "true or false"),
            consul_rate: p.get(
                "LB_CONSUL_RATE",
                |s| s.parse().ok().filter(|r: &f64| *r > 0.0 && r.is_finite()),
                "a positive number",
            ),
            consul_burst: p.get(
                "LB_CONSUL_BURST",
                |s| s.parse().ok().filter(|b| *b >= 1),
                "an integer >= 1",
            ),
            consul_service_watches: p.get(
                "LB_CONSUL_SERVICE_WATCHES",
                |s| s.parse().ok(),
                "an integer >= 0",
            ),
            consul_backoff_max: p.get(
                "LB_CONSUL_BACKOFF_MAX",
                positive_duration,
                "a duration like 30s",
            ),
            initial_sync_timeout: p.get("LB_INITIAL_SYNC_TIMEOUT", positive_duration, "a duration"),
            route_linger: p.get(
                "LB_ROUTE_LINGER",
                parse_duration,
                "a duration like 5m, or 0",
            ),
            state_loss_grace: p.get(
                "LB_STATE_LOSS_GRACE",
                parse_duration,
                "a duration like 1m, or 0",
            ),
            snapshot_file: Some(p.raw("LB_SNAPSHOT_FILE", None))
                .filter(|f| !f.is_empty())
                .map(std::path::PathBuf::from),
            tag_prefix: p.get(
                "LB_TAG_PREFIX",
                |s| Some(s.to_string()).filter(|s| !s.is_empty() && !s.contains(['=', ' '])),
                "a non-empty word without '=' or spaces",
            ),
            balance: p.get(
                "LB_BALANCE",
                |s| match s {
                    "p2c" => Some(Balance::P2c),
                    "round_robin" => Some(Balance::RoundRobin),
                    "weighted" => Some(Balance::Weighted),
                    _ => None,
                },
                "p2c, round_robin or weighted",
            ),
            weights_kv_prefix: p.raw("LB_WEIGHTS_KV_PREFIX", None),
            version_pin: p.get(
                "LB_VERSION_PIN",
                |s| match s {
                    "any" => Some(VersionPin::Any),
                    "trusted" => Some(VersionPin::Trusted),
                    "off" => Some(VersionPin::Off),
                    _ => None,
                },
                "any, trusted or off",
            ),
            affinity_balance_permille: p.get(
                "LB_AFFINITY_BALANCE",
                |s| {
                    let f: f64 = s.parse().ok()?;
                    (1.0..=10.0)
                        .contains(&f)
                        .then(|| (f * 1000.0).round() as u64)
                },
                "a factor from 1.0 to 10, like 1.25",
            ),
            connect_timeout: p.get(
                "LB_CONNECT_TIMEOUT",
                positive_duration,
                "a duration like 2s",
            ),
            upstream_user_timeout: p.get(
                "LB_UPSTREAM_USER_TIMEOUT",
                parse_duration,
                "a duration like 5s (0s allowed)",
            ),
            response_timeout: p.get(
                "LB_RESPONSE_TIMEOUT",
                positive_duration,
                "a duration like 30s",
            ),
            max_body_bytes: p.get(
                "LB_MAX_BODY_BYTES",
                |s| s.parse::<u64>().ok().map(|n| (n > 0).then_some(n)),
                "a number of bytes (0: no limit)",
            ),
            client_body_timeout: p.get(
                "LB_CLIENT_BODY_TIMEOUT",
                positive_duration,
                "a duration like 30s",
            ),
            upstream_idle_timeout: p.get(
                "LB_UPSTREAM_IDLE_TIMEOUT",
                positive_duration,
                "a duration",
            ),
            upstream_max_idle: p.get(
                "LB_UPSTREAM_MAX_IDLE",
                |s| s.parse().ok().filter(|n| *n >= 1),
                "an integer >= 1",
            ),
            access_log: p.get(
                "LB_ACCESS_LOG",
                |s| match s {
                    "off" | "" => Some(None),
                    "json" => Some(Some(AccessLogFormat::Json)),
                    "text" => Some(Some(AccessLogFormat::Text)),
                    _ => None,
                },
                "off, json or text",
            ),
            access_log_sample: p.get(
                "LB_ACCESS_LOG_SAMPLE",
                |s| {
                    s.parse::<f64>()
                        .ok()
                        .filter(|f| (0.000_001..=1.0).contains(f))
                },
                "a fraction from 0.000001 to 1",
            ),
            access_log_buffer: p.get(
                "LB_ACCESS_LOG_BUFFER",
                |s| s.parse().ok().filter(|n| *n >= 1),
                "an integer >= 1",
            ),
            client_header_timeout: p.get(
                "LB_CLIENT_HEADER_TIMEOUT",
                positive_duration,
                "a duration",
            ),
            client_write_timeout: p.get(
                "LB_CLIENT_WRITE_TIMEOUT",
                positive_duration,
                "a duration like 60s",
            ),
            client_notsent_lowat: p.get(
                "LB_CLIENT_NOTSENT_LOWAT",
                |s| s.parse().ok().filter(|n| *n <= i32::MAX as u32),
                "a number of bytes (0: the system's default)",
            ),
            splice_min: p.get(
                "LB_SPLICE_MIN",
                |s| s.parse().ok(),
                "a number of bytes (0: never)",
            ),
            h2_idle_timeout: p.get(
                "LB_H2_IDLE_TIMEOUT",
                positive_duration,
                "a duration like 3m",
            ),
            backend_max_connections: p.get(
                "LB_BACKEND_MAX_CONNECTIONS",
                |s| s.parse::<usize>().ok().map(|n| (n > 0).then_some(n)),
                "a number of connections (0: no limit)",
            ),
            max_header_bytes: p.get(
                "LB_MAX_HEADER_BYTES",
                |s| s.parse().ok().filter(|n| *n >= 8192),
                "an integer >= 8192",
            ),
            max_connections: p.get(
                "LB_MAX_CONNECTIONS",
                |s| match s {
                    "auto" => Some(None),
                    // Bounded: the limit becomes a semaphore, which refuses (panics on) more
                    // permits than about 2^61; no machine holds 10^7 connections anyway.
                    n => n
                        .parse()
                        .ok()
                        .filter(|n| (1..=10_000_000).contains(n))
                        .map(Some),
                },
                "auto or an integer from 1 to 10000000",
            ),
            max_headers: p.get(
                "LB_MAX_HEADERS",
                |s| s.parse().ok().filter(|n| *n >= 8),
                "an integer >= 8",
            ),
            retries: p.get(
                "LB_RETRIES",
                |s| s.parse().ok().filter(|n| *n <= 10),
                "an integer 0..=10",
            ),
            retry_budget: p.get(
                "LB_RETRY_BUDGET",
                |s| s.parse().ok().filter(|r: &f64| (0.0..=1.0).contains(r)),
                "a fraction 0..=1",
            ),
            eject_failures: p.get(
                "LB_EJECT_FAILURES",
                |s| s.parse().ok().filter(|n| *n >= 1),
                "an integer >= 1",
            ),
            eject_base: p.get("LB_EJECT_BASE", positive_duration, "a duration"),
            eject_max: p.get("LB_EJECT_MAX", positive_duration, "a duration"),
            drain_delay: p.get("LB_DRAIN_DELAY", parse_duration, "a duration (0s allowed)"),
            shutdown_timeout: p.get("LB_SHUTDOWN_TIMEOUT", positive_duration, "a duration"),
            workers: p.get(
                "LB_WORKERS",
                |s| match s {
                    "auto" => Some(None),
                    n => n.parse().ok().filter(|n| (1..=1024).contains(n)).map(Some),
                },
                "auto or a thread count from 1 to 1024",
            ),
            tls_listen: p.get(
                "LB_TLS_LISTEN",
                |s| match s {
                    "" => Some(None),
                    s => s.parse().ok().map(Some),
                },
                "empty or a socket address like 0.0.0.0:8443",
            ),
            tls_certs: p.get(
                "LB_TLS_CERTS",
                CertSource::parse_list,
                "CERT.pem[:KEY.pem] entries separated by commas",
            ),
            tls_reload_interval: p.get(
                "LB_TLS_RELOAD_INTERVAL",
                parse_duration,
                "a duration (0s: only on SIGHUP)",
            ),
            tls_handshake_timeout: p.get(
                "LB_TLS_HANDSHAKE_TIMEOUT",
                positive_duration,
                "a duration",
            ),
            http2: p.get("LB_HTTP2", parse_bool, "true or false"),
            h2c: p.get("LB_H2C", parse_bool, "true or false"),
            https_redirect: p.get("LB_HTTPS_REDIRECT", parse_bool, "true or false"),
            tunnel_idle_timeout: p.get(
                "LB_TUNNEL_IDLE_TIMEOUT",
                positive_duration,
                "a duration like 1h",
            ),
            proxy_protocol: p.get("LB_PROXY_PROTOCOL", parse_bool, "true or false"),
            tls_proxy_protocol: p.get("LB_TLS_PROXY_PROTOCOL", parse_bool, "true or false"),
            trusted_proxies: p.get(
                "LB_TRUSTED_PROXIES",
                |s| {
                    s.split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .map(IpNet::parse)
                        .collect()
                },
                "comma-separated networks like 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7",
            ),
            upgrade_protocols: p.get(
                "LB_UPGRADE_PROTOCOLS",
                |s| {
                    let names: Vec<String> = s
                        .split(',')
                        .map(|p| p.trim().to_ascii_lowercase())
                        .filter(|p| !p.is_empty())
                        .collect();
                    // h2c through a proxy is request smuggling past its per-route policy.
                    (!names.iter().any(|p| p == "h2c")).then_some(names)
                },
                "comma-separated protocol names, not h2c",
            ),
            https_port: p.get(
                "LB_HTTPS_PORT",
                |s| s.parse().ok().filter(|p| *p > 0),
                "a port 1..=65535",
            ),
            log_format: p.get(
                "LB_LOG_FORMAT",
                |s| match s {
                    "text" => Some(LogFormat::Text),
                    "json" => Some(LogFormat::Json),
                    _ => None,
                },
                "text or json",
            ),
        };
        // Builds a client once, so that an unusable address or file is an error now.
        if let Err(e) = switchyard_consul::Client::connect(&cfg.consul) {
            let setting = e.setting().unwrap_or("CONSUL_ADDR");
            p.error(format!("LB_{setting}: {e}"));
        }
        if cfg.tls_listen.is_some() && cfg.tls_certs.is_empty() {
            p.error(
                "LB_TLS_CERTS: LB_TLS_LISTEN is set, so at least one certificate is needed".into(),
            );
        }
        p.finish().map_err(ConfigError)?;
        Ok(cfg)
    }

    /// Builds a lookup over `--flag value` / `--flag=value` arguments, then the environment.
    pub fn lookup_from_args_and_env(
        args: &[String],
    ) -> Result<impl Fn(&str) -> Option<String>, ConfigError> {
        switchyard_daemon::settings::lookup_from_args_and_env("LB_", SETTINGS, args)
            .map_err(ConfigError)
    }

    /// The `--help` text: every setting, its flag, default and meaning.
    pub fn help() -> String {
        switchyard_daemon::settings::help(
            "lb: Switchyard's Consul-driven reverse proxy",
            "LB_",
            SETTINGS,
        )
    }
}

/// One certificate as configured: the chain's file and the key's (the same file when the PEM
/// holds both, as HAProxy's `crt` files do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSource {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertSource {
    /// Parses `CERT[:KEY],CERT[:KEY]...`; empty gives no certificates.
    pub fn parse_list(s: &str) -> Option<Vec<CertSource>> {
        s.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (cert, key) = e.split_once(':').unwrap_or((e, e));
                (!cert.is_empty() && !key.is_empty()).then(|| CertSource {
                    cert: cert.into(),
                    key: key.into(),
                })
            })
            .collect()
    }
}

/// A network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`); a bare address is a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Option<IpNet> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse().ok()?, Some(p.parse().ok()?)),
            None => (s.parse().ok()?, None),
        };
        let max = if matches!(addr, std::net::IpAddr::V4(_)) {
            32
        } else {
            128
        };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    /// Whether `ip` is in the network; an IPv4 address written as IPv6 (`::ffff:a.b.c.d`)
    /// counts as the IPv4 address.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let bits = |a: u128, width: u8| {
            let shift = width - self.prefix;
            if shift >= 128 {
                0
            } else {
                a >> shift
            }
        };
        match (self.addr, ip.to_canonical()) {
            (V4(net), V4(ip)) => bits(u32::from(net).into(), 32) == bits(u32::from(ip).into(), 32),
            (V6(net), V6(ip)) => bits(u128::from(net), 128) == bits(u128::from(ip), 128),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_parse() {
        let c = from(&[]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.balance, Balance::P2c);
        assert_eq!(c.consul_wait, Duration::from_secs(60));
        assert_eq!(c.consul.token, None);
        assert_eq!(c.consul.addr, "http://127.0.0.1:8500");
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let err = from(&[
            ("LB_LISTEN", "nope"),
            ("LB_BALANCE", "random"),
            ("LB_CONSUL_WAIT", "11m"),
            ("LB_CONSUL_ADDR", "ftp://x:1"),
            ("LB_WORKERS", "0"),
        ])
        .unwrap_err()
        .to_string();
        for needle in [
            "LB_LISTEN",
            "LB_BALANCE",
            "LB_CONSUL_WAIT",
            "LB_CONSUL_ADDR",
            "LB_WORKERS",
        ] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
        assert_eq!(from(&[]).unwrap().workers, None);
        assert_eq!(from(&[("LB_WORKERS", "3")]).unwrap().workers, Some(3));
    }

    #[test]
    fn consul_aliases() {
        let c = from(&[
            ("CONSUL_HTTP_ADDR", "http://c:8500"),
            ("CONSUL_HTTP_TOKEN", "t"),
        ])
        .unwrap();
        assert_eq!(c.consul.addr, "http://c:8500");
        assert_eq!(c.consul.token.as_deref(), Some("t"));
    }

    #[test]
    fn unusable_consul_files_are_named() {
        let err = from(&[
            ("LB_CONSUL_ADDR", "https://c:8501"),
            ("LB_CONSUL_CACERT", "/nonexistent/ca.pem"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let err = from(&[("LB_CONSUL_TOKEN_FILE", "/nonexistent/token")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/token"), "{err}");
        // TLS files apply to https:// only, as with Consul's own tools.
        assert!(from(&[("LB_CONSUL_CACERT", "/nonexistent/ca.pem")]).is_ok());
    }

    #[test]
    fn flags_map_to_settings() {
        let args: Vec<String> = ["--listen", "127.0.0.1:1", "--balance=round_robin"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let lookup = Config::lookup_from_args_and_env(&args).unwrap();
        let c = Config::from_lookup(lookup).unwrap();
        assert_eq!(c.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(c.balance, Balance::RoundRobin);
        assert!(Config::lookup_from_args_and_env(&["--nope=1".to_string()]).is_err());
    }

    #[test]
    fn cert_lists() {
        assert_eq!(CertSource::parse_list(""), Some(vec![]));
        let l = CertSource::parse_list("/a.pem, /b.crt:/b.key").unwrap();
        assert_eq!(l[0].cert, l[0].key);
        assert_eq!(l[1].key, PathBuf::from("/b.key"));
        assert_eq!(CertSource::parse_list("/a.pem:"), None);
    }

    #[test]
    fn networks() {
        let net = |s| IpNet::parse(s).unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(net("10.0.0.0/8").contains(ip("10.200.1.2")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(net("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!net("192.0.2.7").contains(ip("192.0.2.8")));
        assert!(net("0.0.0.0/0").contains(ip("203.0.113.1")));
        assert!(net("2001:db8::/32").contains(ip("2001:db8:1::5")));
        assert!(!net("2001:db8::/32").contains(ip("10.0.0.1")));
        assert_eq!(IpNet::parse("10.0.0.0/33"), None);
        assert_eq!(IpNet::parse("nope"), None);
        let c = from(&[("LB_TRUSTED_PROXIES", "10.0.0.0/8, ::1")]).unwrap();
        assert_eq!(c.trusted_proxies.len(), 2);
        assert!(from(&[("LB_TRUSTED_PROXIES", "10.0.0.0/8,bad")]).is_err());
    }

    #[test]
    fn connection_limits_are_bounded() {
        assert_eq!(
            from(&[("LB_MAX_CONNECTIONS", "auto")])
                .unwrap()
                .max_connections,
            None
        );
        assert_eq!(
            from(&[("LB_MAX_CONNECTIONS", "500")])
                .unwrap()
                .max_connections,
            Some(500)
        );
        for bad in ["0", "18446744073709551615", "lots"] {
            let e = from(&[("LB_MAX_CONNECTIONS", bad)]).unwrap_err();
            assert!(e.0.contains("LB_MAX_CONNECTIONS"), "{bad}: {}", e.0);
        }
    }
}
