//! Every metric the lb exports, declared once with its name, help and labels.
//!
//! The request path never looks a label up: per-route and per-backend handles are resolved when
//! a table is built and carried in it. Label values that belong to a route or backend are
//! removed when it leaves the table, so label sets stay bounded by what Consul holds.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub const REQUESTS_TOTAL: &str = "lb_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "lb_request_duration_seconds";
pub const REQUESTS_IN_FLIGHT: &str = "lb_requests_in_flight";
pub const LOCAL_RESPONSES_TOTAL: &str = "lb_local_responses_total";
pub const RETRIES_TOTAL: &str = "lb_retries_total";
pub const RETRY_BUDGET_EXHAUSTED_TOTAL: &str = "lb_retry_budget_exhausted_total";
pub const UPSTREAM_ERRORS_TOTAL: &str = "lb_upstream_errors_total";
pub const UPSTREAM_CONNECTIONS_TOTAL: &str = "lb_upstream_connections_total";
pub const BACKEND_EJECTIONS_TOTAL: &str = "lb_backend_ejections_total";
pub const BACKENDS: &str = "lb_backends";
pub const TABLE_RELOADS_TOTAL: &str = "lb_table_reloads_total";
pub const TABLE_RELOAD_DURATION_SECONDS: &str = "lb_table_reload_duration_seconds";
pub const TABLE_AGE_SECONDS: &str = "lb_table_age_seconds";
pub const TABLE_ROUTES: &str = "lb_table_routes";
pub const CONSUL_WATCH_ERRORS_TOTAL: &str = "lb_consul_watch_errors_total";
pub const CONSUL_UP: &str = "lb_consul_up";
pub const CONSUL_WATCHES: &str = "lb_consul_watches";
pub const CONSUL_LAST_CONTACT_SECONDS: &str = "lb_consul_last_contact_seconds";
pub const CONSUL_KNOWN_LEADER: &str = "lb_consul_known_leader";
pub const ROUTE_TAG_ERRORS_TOTAL: &str = "lb_route_tag_errors_total";
pub const CLIENT_CONNECTIONS_OPEN: &str = "lb_client_connections_open";
pub const CLIENT_CONNECTIONS_TOTAL: &str = "lb_client_connections_total";
pub const CLIENT_CONNECTION_ERRORS_TOTAL: &str = "lb_client_connection_errors_total";
pub const TLS_HANDSHAKES_TOTAL: &str = "lb_tls_handshakes_total";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "lb_tls_handshake_failures_total";
pub const TLS_CERTIFICATE_RELOADS_TOTAL: &str = "lb_tls_certificate_reloads_total";
pub const TLS_CERTIFICATE_NOT_AFTER: &str = "lb_tls_certificate_not_after_timestamp_seconds";
pub const UPGRADES_TOTAL: &str = "lb_upgrades_total";
pub const UPGRADED_CONNECTIONS_OPEN: &str = "lb_upgraded_connections_open";
pub const HTTPS_REDIRECTS_TOTAL: &str = "lb_https_redirects_total";

/// Status classes 1xx..5xx, the index into per-backend counters.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Label values known in advance. Their series start at zero, so a rate over them reads 0
/// instead of "no data" before the first event (Prometheus' instrumentation advice).
pub const RETRY_REASONS: [&str; 3] = ["connect", "reset", "timeout"];
pub const UPSTREAM_ERROR_KINDS: [&str; 6] = [
    "connect",
    "connect_timeout",
    "stale_connection",
    "reset",
    "response_timeout",
    // A response body that broke off or broke its framing after the head was passed on.
    "body",
];
pub const WATCH_NAMES: [&str; 2] = ["catalog", "health"];
/// Not a Consul error kind: an answer the watch refused to believe (see discovery).
pub const DISTRUSTED_ANSWER: &str = "suspicious_empty";
/// Local responses that happen before any route is chosen; their route label is empty.
pub const ROUTELESS_REASONS: [&str; 3] = ["no_table", "no_route", "bad_request"];
pub const CLIENT_ERROR_KINDS: [&str; 6] = [
    "accept",
    "header_timeout",
    "head_too_large",
    "malformed",
    "incomplete",
    "io",
];

/// Client connection protocols (`protocol` label) and whether TLS carried them (`tls`).
pub const CLIENT_PROTOCOLS: [&str; 2] = ["http/1.1", "h2"];
pub const UPGRADE_PROTOCOLS: [&str; 2] = ["websocket", "other"];
pub const TLS_VERSIONS: [&str; 2] = ["1.2", "1.3"];
pub const TLS_ALPN: [&str; 3] = ["h2", "http/1.1", "none"];
pub const CERT_RELOAD_RESULTS: [&str; 2] = ["replaced", "rejected"];

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    pub registry: Registry,
    /// route, backend, class
    pub requests: IntCounterVec,
    /// route
    pub request_duration: HistogramVec,
    pub in_flight: IntGauge,
    /// route, reason
    pub local_responses: IntCounterVec,
    /// reason
    pub retries: IntCounterVec,
    pub retry_budget_exhausted: IntCounter,
    /// kind
    pub upstream_errors: IntCounterVec,
    pub upstream_connections: IntCounter,
    pub ejections: IntCounter,
    /// route, state
    pub backends: IntGaugeVec,
    pub table_reloads: IntCounter,
    pub table_reload_duration: Histogram,
    pub table_age: prometheus::Gauge,
    pub table_routes: IntGauge,
    /// watch, kind
    pub consul_watch_errors: IntCounterVec,
    pub consul_up: IntGauge,
    pub consul_watches: IntGauge,
    pub consul_last_contact: prometheus::Gauge,
    pub consul_known_leader: IntGauge,
    /// reason
    pub route_tag_errors: IntCounterVec,
    pub client_connections_open: IntGauge,
    /// protocol, tls
    pub client_connections: IntCounterVec,
    /// kind
    pub client_connection_errors: IntCounterVec,
    /// version, alpn
    pub tls_handshakes: IntCounterVec,
    /// reason
    pub tls_handshake_failures: IntCounterVec,
    /// result
    pub tls_cert_reloads: IntCounterVec,
    /// cert
    pub tls_cert_not_after: IntGaugeVec,
    /// protocol
    pub upgrades: IntCounterVec,
    pub upgraded_open: IntGauge,
    pub https_redirects: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone()))
                .expect("metric names are unique");
            m
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let counter = |name: &str, help: &str| {
            reg(
                &registry,
                IntCounter::new(name, help).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(&registry, IntGauge::new(name, help).expect("valid metric"))
        };
        let fgauge = |name: &str, help: &str| {
            reg(
                &registry,
                prometheus::Gauge::new(name, help).expect("valid metric"),
            )
        };
        let m = Metrics {
            requests: counter_vec(REQUESTS_TOTAL, "Proxied requests answered by a backend, by route, backend and status class.", &["route", "backend", "class"]),
            request_duration: reg(&registry, HistogramVec::new(
                HistogramOpts::new(REQUEST_DURATION_SECONDS, "Time from request head to the end of the response body, by route.").buckets(LATENCY_BUCKETS.to_vec()),
                &["route"]).expect("valid metric")),
            in_flight: gauge(REQUESTS_IN_FLIGHT, "Requests being proxied now."),
            local_responses: counter_vec(LOCAL_RESPONSES_TOTAL, "Responses the lb produced itself (404 no route, 502, 503, 504...), by route and reason.", &["route", "reason"]),
            retries: counter_vec(RETRIES_TOTAL, "Requests retried on another backend, by reason.", &["reason"]),
            retry_budget_exhausted: counter(RETRY_BUDGET_EXHAUSTED_TOTAL, "Retries refused because the retry budget was spent."),
            upstream_errors: counter_vec(UPSTREAM_ERRORS_TOTAL, "Failures talking to backends, by kind.", &["kind"]),
            upstream_connections: counter(UPSTREAM_CONNECTIONS_TOTAL, "Upstream connections opened (pooled connections are reused)."),
            ejections: counter(BACKEND_EJECTIONS_TOTAL, "Backends ejected by passive health checking."),
            backends: reg(&registry, IntGaugeVec::new(Opts::new(BACKENDS, "Backends per route and state (healthy, ejected)."), &["route", "state"]).expect("valid metric")),
            table_reloads: counter(TABLE_RELOADS_TOTAL, "Routing tables published."),
            table_reload_duration: reg(&registry, Histogram::with_opts(
                HistogramOpts::new(TABLE_RELOAD_DURATION_SECONDS, "Time to build and publish a routing table.")
                    .buckets(vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0])).expect("valid metric")),
            table_age: fgauge(TABLE_AGE_SECONDS, "Seconds since Consul last confirmed the routing table (0 while the watches are healthy)."),
            table_routes: gauge(TABLE_ROUTES, "Routes in the live table."),
            consul_watch_errors: counter_vec(CONSUL_WATCH_ERRORS_TOTAL, "Failed Consul reads, by watch (catalog, health) and kind.", &["watch", "kind"]),
            consul_up: gauge(CONSUL_UP, "1 while the last Consul read succeeded."),
            consul_watches: gauge(CONSUL_WATCHES, "Blocking queries the lb keeps open on Consul (the catalog, and one per routed service); each holds one HTTP connection."),
            consul_last_contact: fgauge(CONSUL_LAST_CONTACT_SECONDS, "X-Consul-LastContact of the last read: staleness of the answering server."),
            consul_known_leader: gauge(CONSUL_KNOWN_LEADER, "X-Consul-KnownLeader of the last read."),
            route_tag_errors: counter_vec(ROUTE_TAG_ERRORS_TOTAL, "Malformed routing tags ignored, by reason (counted once per distinct tag).", &["reason"]),
            client_connections_open: gauge(CLIENT_CONNECTIONS_OPEN, "Client connections open now."),
            client_connections: counter_vec(CLIENT_CONNECTIONS_TOTAL, "Client connections served, by protocol (http/1.1, h2) and whether over TLS.", &["protocol", "tls"]),
            client_connection_errors: counter_vec(CLIENT_CONNECTION_ERRORS_TOTAL, "Client connections that ended in a protocol error (malformed request, header timeout...).", &["kind"]),
            tls_handshakes: counter_vec(TLS_HANDSHAKES_TOTAL, "TLS handshakes completed, by TLS version and negotiated ALPN protocol.", &["version", "alpn"]),
            tls_handshake_failures: counter_vec(TLS_HANDSHAKE_FAILURES_TOTAL, "TLS handshakes that failed, by reason (not_tls: plain HTTP on the TLS port).", &["reason"]),
            tls_cert_reloads: counter_vec(TLS_CERTIFICATE_RELOADS_TOTAL, "Certificate files reloaded (replaced) or refused at reload, the old one kept (rejected).", &["result"]),
            tls_cert_not_after: reg(&registry, IntGaugeVec::new(Opts::new(TLS_CERTIFICATE_NOT_AFTER, "Expiry (notAfter, Unix seconds) of each certificate in service, by its first DNS name."), &["cert"]).expect("valid metric")),
            upgrades: counter_vec(UPGRADES_TOTAL, "Connections upgraded (101) and tunnelled to a backend, by protocol.", &["protocol"]),
            upgraded_open: gauge(UPGRADED_CONNECTIONS_OPEN, "Upgraded connections (WebSocket...) open now."),
            https_redirects: counter(HTTPS_REDIRECTS_TOTAL, "Plain-HTTP requests redirected to HTTPS."),
            registry,
        };
        for reason in RETRY_REASONS {
            m.retries.with_label_values(&[reason]);
        }
        for kind in UPSTREAM_ERROR_KINDS {
            m.upstream_errors.with_label_values(&[kind]);
        }
        for watch in WATCH_NAMES {
            for kind in switchyard_consul::Error::KINDS
                .into_iter()
                .chain([DISTRUSTED_ANSWER])
            {
                m.consul_watch_errors.with_label_values(&[watch, kind]);
            }
        }
        for reason in ROUTELESS_REASONS {
            m.local_responses.with_label_values(&["", reason]);
        }
        for kind in switchyard_consul::tags::TagErrorKind::ALL {
            m.route_tag_errors.with_label_values(&[kind.as_str()]);
        }
        for kind in CLIENT_ERROR_KINDS {
            m.client_connection_errors.with_label_values(&[kind]);
        }
        for protocol in CLIENT_PROTOCOLS {
            for tls in ["false", "true"] {
                m.client_connections.with_label_values(&[protocol, tls]);
            }
        }
        for version in TLS_VERSIONS {
            for alpn in TLS_ALPN {
                m.tls_handshakes.with_label_values(&[version, alpn]);
            }
        }
        for reason in crate::server::tls::HANDSHAKE_FAILURE_REASONS {
            m.tls_handshake_failures.with_label_values(&[reason]);
        }
        for result in CERT_RELOAD_RESULTS {
            m.tls_cert_reloads.with_label_values(&[result]);
        }
        for protocol in UPGRADE_PROTOCOLS {
            m.upgrades.with_label_values(&[protocol]);
        }
        m
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        use prometheus::Encoder as _;
        let mut buf = Vec::with_capacity(16 * 1024);
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
