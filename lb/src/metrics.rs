//! Every metric the lb exports, declared once with its name, help and labels.
//!
//! Label values known in advance are enums declared here once (`label!`); families over one
//! such label are resolved at start ([`ByLabel`]), so counting them is an index. Per-route and
//! per-backend handles are resolved when a table is built and carried in it; an answer the lb
//! gives itself looks its (route, reason) series up, off the proxied path. Label values that
//! belong to a route or backend are removed when it leaves the table, so label sets stay
//! bounded by what Consul holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

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
pub const SPLICED_BYTES_TOTAL: &str = "lb_spliced_bytes_total";
pub const SPLICE_REFUSED_TOTAL: &str = "lb_splice_refused_total";
pub const BACKEND_EJECTIONS_TOTAL: &str = "lb_backend_ejections_total";
pub const BACKENDS: &str = "lb_backends";
pub const CONSUL_HELD: &str = "lb_consul_held";
pub const TABLE_RELOADS_TOTAL: &str = "lb_table_reloads_total";
pub const TABLE_RELOAD_DURATION_SECONDS: &str = "lb_table_reload_duration_seconds";
pub const TABLE_AGE_SECONDS: &str = "lb_table_age_seconds";
pub const TABLE_ROUTES: &str = "lb_table_routes";
pub const ROUTES_LINGERING: &str = "lb_routes_lingering";
pub const TABLE_FROM_SNAPSHOT: &str = "lb_table_from_snapshot";
pub const SNAPSHOT_ERRORS_TOTAL: &str = "lb_snapshot_errors_total";
pub const CONSUL_WATCH_ERRORS_TOTAL: &str = "lb_consul_watch_errors_total";
pub const CONSUL_UP: &str = "lb_consul_up";
pub const CONSUL_WATCHES: &str = "lb_consul_watches";
pub const CONSUL_SERVICE_READS_TOTAL: &str = "lb_consul_service_reads_total";
pub const CONSUL_SWEEPS_TOTAL: &str = "lb_consul_sweeps_total";
pub const CONSUL_LAST_CONTACT_SECONDS: &str = "lb_consul_last_contact_seconds";
pub const CONSUL_KNOWN_LEADER: &str = "lb_consul_known_leader";
pub const ROUTE_TAG_ERRORS_TOTAL: &str = "lb_route_tag_errors_total";
pub const CLIENT_CONNECTIONS_OPEN: &str = "lb_client_connections_open";
pub const CLIENT_CONNECTIONS_PARKED: &str = "lb_client_connections_parked";
pub const CLIENT_CONNECTIONS_TOTAL: &str = "lb_client_connections_total";
pub const CLIENT_CONNECTION_ERRORS_TOTAL: &str = "lb_client_connection_errors_total";
pub const TLS_HANDSHAKES_TOTAL: &str = "lb_tls_handshakes_total";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "lb_tls_handshake_failures_total";
pub const TLS_CERTIFICATE_RELOADS_TOTAL: &str = "lb_tls_certificate_reloads_total";
pub const TLS_CERTIFICATE_NOT_AFTER: &str = "lb_tls_certificate_not_after_timestamp_seconds";
pub const UPGRADES_TOTAL: &str = "lb_upgrades_total";
pub const UPGRADED_CONNECTIONS_OPEN: &str = "lb_upgraded_connections_open";
pub const HTTPS_REDIRECTS_TOTAL: &str = "lb_https_redirects_total";
pub const ACCESS_LOG_LINES_TOTAL: &str = "lb_access_log_lines_total";
pub const VERSION_WEIGHTS_ERRORS_TOTAL: &str = "lb_version_weights_errors_total";
pub const ACCESS_LOG_DROPPED_TOTAL: &str = "lb_access_log_dropped_total";
pub const ACCEPT_PAUSED_TOTAL: &str = "lb_accept_paused_total";
pub const WORKER_CONNECTIONS_TOTAL: &str = "lb_worker_connections_total";
pub const TUNNEL_IDLE_TIMEOUTS_TOTAL: &str = "lb_tunnel_idle_timeouts_total";
pub const SOCKET_OPTIONS_REFUSED_TOTAL: &str = "lb_socket_options_refused_total";
pub const PROPAGATION_SECONDS: &str = "lb_propagation_seconds";
pub const PROPAGATION_CLOCK_SKEW_TOTAL: &str = "lb_propagation_clock_skew_total";
pub const PROPAGATION_CLOCK_SKEW_SECONDS: &str = "lb_propagation_clock_skew_seconds";
pub const PROPAGATION_MISSED_TOTAL: &str = "lb_propagation_missed_total";

/// From a millisecond (the stack on one node) to a minute (a Consul outage), finest where
/// the targets are (healthy -> routed p99 < 250 ms, stopped -> unrouted p99 < 100 ms).
const PROPAGATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A label whose values are known in advance. Declared once, as an enum; call sites name a
/// variant, never a string.
pub trait Label: Copy + 'static {
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
    /// The variant's position in `ALL`.
    fn index(self) -> usize;
}

macro_rules! label {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident => $value:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $variant,)+ }
        impl Label for $name {
            const ALL: &'static [$name] = &[$($name::$variant,)+];
            fn as_str(self) -> &'static str {
                match self { $($name::$variant => $value,)+ }
            }
            fn index(self) -> usize {
                self as usize
            }
        }
        impl $name {
            pub fn as_str(self) -> &'static str {
                Label::as_str(self)
            }
        }
    };
}

label!(
    /// A change on its way from Docker to this lb's table (`phase`).
    Phase {
        /// Docker reported the container started -> the lb sees its instance in Consul.
        Registered => "registered",
        /// Docker reported the container healthy -> the lb routes to it.
        Healthy => "healthy",
        /// Docker reported the container told to stop -> the lb routes no new request to it.
        Stopped => "stopped",
    }
);

label!(
    /// A TCP option the lb sets where the kernel offers it (`option`).
    SocketOption {
        /// On each listening socket: a new connection is handed over with its first bytes.
        DeferAccept => "TCP_DEFER_ACCEPT",
        /// On each listening socket: a new connection's first bytes are acknowledged with
        /// the answer.
        QuickAck => "TCP_QUICKACK",
        /// On each listening socket: what a client's socket holds of a response, unsent.
        NotsentLowat => "TCP_NOTSENT_LOWAT",
        /// On a plain HTTP/1.1 client connection's last response: its last bytes and the
        /// FIN go in one segment.
        Cork => "TCP_CORK",
        /// On each backend connection: how long sent data may go unacknowledged.
        UserTimeout => "TCP_USER_TIMEOUT",
    }
);

/// Refusals of each [`SocketOption`] since the process started. Whether the kernel takes an
/// option is the host's condition, not one connection's or one `Metrics`' (a listener is
/// bound before the workers start, a backend connection is made deep in the request path),
/// so the family is process-wide, and every registry holds it.
fn socket_options_refused() -> &'static IntCounterVec {
    static FAMILY: OnceLock<IntCounterVec> = OnceLock::new();
    FAMILY.get_or_init(|| {
        let help = "Sockets on which the kernel refused a TCP option the lb sets where it can (TCP_DEFER_ACCEPT, TCP_QUICKACK and TCP_NOTSENT_LOWAT on listeners, TCP_CORK on a closing client connection's last response, TCP_USER_TIMEOUT on backend connections); the lb works without them.";
        let family = IntCounterVec::new(Opts::new(SOCKET_OPTIONS_REFUSED_TOTAL, help), &["option"])
            .expect("valid metric");
        for option in SocketOption::ALL {
            family.with_label_values(&[option.as_str()]);
        }
        family
    })
}

/// Counts a refusal of `option`; true for the process's first one, which the caller warns
/// about. A kernel without the option refuses it on every socket: one warning says so, the
/// counter says how often it mattered.
pub fn socket_option_refused(option: SocketOption) -> bool {
    static WARNED: [AtomicBool; SocketOption::ALL.len()] =
        [const { AtomicBool::new(false) }; SocketOption::ALL.len()];
    socket_options_refused()
        .with_label_values(&[option.as_str()])
        .inc();
    !WARNED[option.index()].swap(true, Ordering::Relaxed)
}

label!(
    /// Status class of a backend's response (`class`).
    StatusClass {
        Informational => "1xx",
        Success => "2xx",
        Redirection => "3xx",
        ClientError => "4xx",
        ServerError => "5xx",
    }
);

impl StatusClass {
    pub fn of(status: http::StatusCode) -> StatusClass {
        StatusClass::ALL[(status.as_u16() / 100).clamp(1, 5) as usize - 1]
    }
}

label!(
    /// Why a request went to another backend (`lb_retries_total{reason}`).
    RetryReason {
        Connect => "connect",
        Reset => "reset",
        Timeout => "timeout",
    }
);

label!(
    /// Failures talking to backends (`lb_upstream_errors_total{kind}`).
    UpstreamErrorKind {
        Connect => "connect",
        ConnectTimeout => "connect_timeout",
        StaleConnection => "stale_connection",
        Reset => "reset",
        /// The backend's host stopped acknowledging what was sent (LB_UPSTREAM_USER_TIMEOUT):
        /// dead or cut off, so it is ejected.
        Unacknowledged => "unacknowledged",
        ResponseTimeout => "response_timeout",
        /// A response body that broke off or broke its framing after the head was passed on.
        Body => "body",
    }
);

label!(
    /// Why the lb answered a request itself (`lb_local_responses_total{reason}`).
    LocalReason {
        NoTable => "no_table",
        NoRoute => "no_route",
        NoBackend => "no_backend",
        BadRequest => "bad_request",
        /// The client's request body stalled (408).
        ClientTimeout => "client_timeout",
        /// The request body is over `LB_MAX_BODY_BYTES` (413).
        BodyTooLarge => "body_too_large",
        UpstreamConnect => "upstream_connect",
        UpstreamTimeout => "upstream_timeout",
        UpstreamError => "upstream_error",
        /// Every backend of the route had `LB_BACKEND_MAX_CONNECTIONS` requests in flight
        /// (503 with Retry-After).
        BackendFull => "backend_full",
    }
);

impl LocalReason {
    /// Answers that happen before any route is chosen; their route label is empty.
    pub const ROUTELESS: [LocalReason; 3] = [
        LocalReason::NoTable,
        LocalReason::NoRoute,
        LocalReason::BadRequest,
    ];
}

label!(
    /// Backends of a route by passive health (`lb_backends{state}`).
    BackendState {
        Healthy => "healthy",
        Ejected => "ejected",
    }
);

label!(
    /// Consul watches (`lb_consul_watch_errors_total{watch}`).
    WatchName {
        Catalog => "catalog",
        Checks => "checks",
        Health => "health",
        Weights => "weights",
    }
);

/// Not a Consul error kind: an answer the watch refused to believe (see discovery).
pub const DISTRUSTED_ANSWER: &str = "suspicious_empty";
/// Nor this: a catalog that lists no service at all, not even Consul's own (`consul`),
/// which every datacenter with servers has. Consul answers so to a token that may read
/// nothing (none set, with ACLs in default-deny): the lb keeps what it has.
pub const NOTHING_VISIBLE: &str = "nothing_visible";
/// Not a Consul error kind either: instances of an answer left out because they did not
/// decode (a port out of range, a field of the wrong type).
pub const BAD_ENTRY: &str = "bad_entry";

label!(
    /// Why every routed service was read again (`lb_consul_sweeps_total{reason}`).
    SweepReason {
        Unexplained => "unexplained",
        Resync => "resync",
        Periodic => "periodic",
    }
);

label!(
    /// How a client connection ended in error (`lb_client_connection_errors_total{kind}`).
    ClientErrorKind {
        Accept => "accept",
        HeaderTimeout => "header_timeout",
        HeadTooLarge => "head_too_large",
        Malformed => "malformed",
        Incomplete => "incomplete",
        Io => "io",
        /// A listener that expects a PROXY protocol header got none, or a malformed one.
        ProxyHeader => "proxy_header",
        /// A response waited longer than `LB_CLIENT_WRITE_TIMEOUT` for the client to read more
        /// of it: the connection, or the HTTP/2 stream, was closed.
        WriteTimeout => "write_timeout",
    }
);

label!(
    /// Client connection protocols (`lb_client_connections_total{protocol}`).
    ClientProtocol {
        Http1 => "http/1.1",
        H2 => "h2",
    }
);

label!(
    /// Upgraded connections by protocol (`lb_upgrades_total{protocol}`).
    UpgradeProtocol {
        Websocket => "websocket",
        Other => "other",
    }
);

label!(
    /// Negotiated TLS versions (`lb_tls_handshakes_total{version}`).
    TlsVersion {
        V1_2 => "1.2",
        V1_3 => "1.3",
    }
);

label!(
    /// Negotiated ALPN protocols (`lb_tls_handshakes_total{alpn}`).
    TlsAlpn {
        H2 => "h2",
        Http1 => "http/1.1",
        None => "none",
    }
);

label!(
    /// Why a TLS handshake failed (`lb_tls_handshake_failures_total{reason}`).
    HandshakeFailure {
        /// Plain HTTP on the TLS port.
        NotTls => "not_tls",
        Timeout => "timeout",
        Eof => "eof",
        Io => "io",
        Malformed => "malformed",
        Incompatible => "incompatible",
        CertRejected => "cert_rejected",
        Alert => "alert",
        Other => "other",
    }
);

label!(
    /// Outcome of a certificate reload (`lb_tls_certificate_reloads_total{result}`).
    CertReload {
        Replaced => "replaced",
        Rejected => "rejected",
    }
);

/// A counter family over one label of known values: every series is resolved at start, so it
/// reads 0 before the first event (Prometheus' instrumentation advice), and counting is an
/// index into an array, not a label lookup.
pub struct ByLabel<L> {
    counters: Box<[IntCounter]>,
    label: std::marker::PhantomData<L>,
}

impl<L: Label> ByLabel<L> {
    fn new(family: &IntCounterVec) -> ByLabel<L> {
        ByLabel {
            counters: L::ALL
                .iter()
                .map(|l| family.with_label_values(&[l.as_str()]))
                .collect(),
            label: std::marker::PhantomData,
        }
    }

    pub fn inc(&self, label: L) {
        self.counters[label.index()].inc();
    }

    pub fn get(&self, label: L) -> u64 {
        self.counters[label.index()].get()
    }
}

/// One in a gauge for as long as it lives: raised when made, lowered when dropped, whichever
/// way its owner ends.
#[derive(Debug)]
pub struct Held(IntGauge);

impl Held {
    pub fn new(gauge: &IntGauge) -> Held {
        gauge.inc();
        Held(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

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
    pub retries: ByLabel<RetryReason>,
    pub retry_budget_exhausted: IntCounter,
    pub upstream_errors: ByLabel<UpstreamErrorKind>,
    pub upstream_connections: IntCounter,
    pub spliced_bytes: IntCounter,
    pub splice_refused: IntCounter,
    pub ejections: IntCounter,
    /// route, state
    pub backends: IntGaugeVec,
    pub consul_held: IntGaugeVec,
    pub table_reloads: IntCounter,
    pub table_reload_duration: Histogram,
    pub propagation: [Histogram; 3],
    pub propagation_skew: ByLabel<Phase>,
    pub propagation_missed: ByLabel<Phase>,
    pub propagation_skew_seconds: prometheus::Gauge,
    pub table_age: prometheus::Gauge,
    pub table_routes: IntGauge,
    pub routes_lingering: IntGauge,
    pub table_from_snapshot: IntGauge,
    pub snapshot_errors: IntCounterVec,
    /// watch, kind
    pub consul_watch_errors: IntCounterVec,
    pub consul_up: IntGauge,
    pub consul_watches: IntGauge,
    pub consul_service_reads: IntCounter,
    /// reason
    pub consul_sweeps: ByLabel<SweepReason>,
    pub consul_last_contact: prometheus::Gauge,
    pub consul_known_leader: IntGauge,
    /// reason
    pub route_tag_errors: IntCounterVec,
    pub client_connections_open: IntGauge,
    pub client_connections_parked: IntGauge,
    /// protocol, tls
    pub client_connections: IntCounterVec,
    pub client_connection_errors: ByLabel<ClientErrorKind>,
    /// version, alpn
    pub tls_handshakes: IntCounterVec,
    pub tls_handshake_failures: ByLabel<HandshakeFailure>,
    pub tls_cert_reloads: ByLabel<CertReload>,
    /// cert
    pub tls_cert_not_after: IntGaugeVec,
    pub upgrades: ByLabel<UpgradeProtocol>,
    pub upgraded_open: IntGauge,
    pub https_redirects: IntCounter,
    pub access_log_lines: IntCounter,
    pub version_weights_errors: IntCounter,
    pub access_log_dropped: IntCounter,
    pub accept_paused: IntCounter,
    /// worker
    pub worker_connections: IntCounterVec,
    pub tunnel_idle_timeouts: IntCounter,
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
            retries: ByLabel::new(&counter_vec(RETRIES_TOTAL, "Requests retried on another backend, by reason.", &["reason"])),
            retry_budget_exhausted: counter(RETRY_BUDGET_EXHAUSTED_TOTAL, "Retries refused because the retry budget was spent."),
            upstream_errors: ByLabel::new(&counter_vec(UPSTREAM_ERRORS_TOTAL, "Failures talking to backends, by kind.", &["kind"])),
            upstream_connections: counter(UPSTREAM_CONNECTIONS_TOTAL, "Upstream connections opened (pooled connections are reused)."),
            spliced_bytes: counter(SPLICED_BYTES_TOTAL, "Response body bytes moved from a backend's socket into a client connection's pipe, to be written to its socket without a copy through the lb's memory (LB_SPLICE_MIN)."),
            splice_refused: counter(SPLICE_REFUSED_TOTAL, "Times a connection got no pipe to splice a body through (the lb's pipe budget, descriptors, or the pipe size limits), so the body was copied."),
            ejections: counter(BACKEND_EJECTIONS_TOTAL, "Backends ejected by passive health checking."),
            backends: reg(&registry, IntGaugeVec::new(Opts::new(BACKENDS, "Backends per route and state (healthy, ejected)."), &["route", "state"]).expect("valid metric")),
            consul_held: reg(&registry, IntGaugeVec::new(Opts::new(CONSUL_HELD, "What a Consul that lost its state forgot and the lb holds for LB_STATE_LOSS_GRACE: routed services (watch=catalog) and instances (watch=health)."), &["watch"]).expect("valid metric")),
            table_reloads: counter(TABLE_RELOADS_TOTAL, "Routing tables published."),
            table_reload_duration: reg(&registry, Histogram::with_opts(
                HistogramOpts::new(TABLE_RELOAD_DURATION_SECONDS, "Time to build and publish a routing table.")
                    .buckets(vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0])).expect("valid metric")),
            propagation: {
                let family = reg(&registry, HistogramVec::new(
                    HistogramOpts::new(PROPAGATION_SECONDS, "Time from Docker reporting a change (the registrar's stamp) to this lb's table showing it, by phase: registered (container started -> instance seen), healthy (container healthy -> routed), stopped (container told to stop -> no new request).").buckets(PROPAGATION_BUCKETS.to_vec()),
                    &["phase"]).expect("valid metric"));
                let h = |p: Phase| family.with_label_values(&[p.as_str()]);
                [h(Phase::Registered), h(Phase::Healthy), h(Phase::Stopped)]
            },
            propagation_skew: ByLabel::new(&counter_vec(PROPAGATION_CLOCK_SKEW_TOTAL, "Changes whose Docker time was ahead of this lb's clock when it saw them (clock skew between nodes), left out of lb_propagation_seconds, by phase.", &["phase"])),
            propagation_missed: ByLabel::new(&counter_vec(PROPAGATION_MISSED_TOTAL, "Routed instances that left this lb's table without their change being measured (deregistered before the lb read the maintenance that carries the stop time), by phase.", &["phase"])),
            propagation_skew_seconds: fgauge(PROPAGATION_CLOCK_SKEW_SECONDS, "How far ahead of this lb's clock the last such time was."),
            table_age: fgauge(TABLE_AGE_SECONDS, "Seconds since Consul last confirmed the routing table (0 while the watches are healthy)."),
            table_routes: gauge(TABLE_ROUTES, "Routes in the live table."),
            snapshot_errors: counter_vec(SNAPSHOT_ERRORS_TOTAL, "LB_SNAPSHOT_FILE that could not be read (op=load: refused, the lb started without it) or written (op=write).", &["op"]),
            table_from_snapshot: gauge(TABLE_FROM_SNAPSHOT, "1 while the table is served from LB_SNAPSHOT_FILE because Consul has not answered for all of it since the start."),
            routes_lingering: gauge(ROUTES_LINGERING, "Routes whose last instance left, answering 503 until LB_ROUTE_LINGER passes."),
            consul_watch_errors: counter_vec(CONSUL_WATCH_ERRORS_TOTAL, "Failed Consul reads, by watch (catalog, checks, health) and kind.", &["watch", "kind"]),
            consul_up: gauge(CONSUL_UP, "1 while the last Consul read succeeded."),
            consul_watches: gauge(CONSUL_WATCHES, "Blocking queries the lb keeps open on Consul: the catalog, the critical and the warning checks, and one per routed service up to LB_CONSUL_SERVICE_WATCHES."),
            consul_service_reads: counter(CONSUL_SERVICE_READS_TOTAL, "Reads of one routed service's instances (/v1/health/service), made when a blocking query shows that service changed."),
            consul_sweeps: ByLabel::new(&counter_vec(CONSUL_SWEEPS_TOTAL, "Times every routed service without a blocking query of its own was read again: a catalog change nothing explained (unexplained), Consul answering again after failed reads (resync), or the 5-minute backstop (periodic).", &["reason"])),
            consul_last_contact: fgauge(CONSUL_LAST_CONTACT_SECONDS, "X-Consul-LastContact of the last read: staleness of the answering server."),
            consul_known_leader: gauge(CONSUL_KNOWN_LEADER, "X-Consul-KnownLeader of the last read."),
            route_tag_errors: counter_vec(ROUTE_TAG_ERRORS_TOTAL, "Malformed routing tags ignored, by reason (counted once per distinct tag).", &["reason"]),
            client_connections_open: gauge(CLIENT_CONNECTIONS_OPEN, "Client connections open now."),
            client_connections_parked: gauge(CLIENT_CONNECTIONS_PARKED, "Plain HTTP/1.1 client connections idle between requests now, held without a task or buffers (counted in lb_client_connections_open too)."),
            client_connections: counter_vec(CLIENT_CONNECTIONS_TOTAL, "Client connections served, by protocol (http/1.1, h2) and whether over TLS.", &["protocol", "tls"]),
            client_connection_errors: ByLabel::new(&counter_vec(CLIENT_CONNECTION_ERRORS_TOTAL, "Client connections that ended in a protocol error (malformed request, header timeout...).", &["kind"])),
            tls_handshakes: counter_vec(TLS_HANDSHAKES_TOTAL, "TLS handshakes completed, by TLS version and negotiated ALPN protocol.", &["version", "alpn"]),
            tls_handshake_failures: ByLabel::new(&counter_vec(TLS_HANDSHAKE_FAILURES_TOTAL, "TLS handshakes that failed, by reason (not_tls: plain HTTP on the TLS port).", &["reason"])),
            tls_cert_reloads: ByLabel::new(&counter_vec(TLS_CERTIFICATE_RELOADS_TOTAL, "Certificate files reloaded (replaced) or refused at reload, the old one kept (rejected).", &["result"])),
            tls_cert_not_after: reg(&registry, IntGaugeVec::new(Opts::new(TLS_CERTIFICATE_NOT_AFTER, "Expiry (notAfter, Unix seconds) of each certificate in service, by its first DNS name."), &["cert"]).expect("valid metric")),
            upgrades: ByLabel::new(&counter_vec(UPGRADES_TOTAL, "Connections upgraded (101) and tunnelled to a backend, by protocol.", &["protocol"])),
            upgraded_open: gauge(UPGRADED_CONNECTIONS_OPEN, "Upgraded connections (WebSocket...) open now."),
            https_redirects: counter(HTTPS_REDIRECTS_TOTAL, "Plain-HTTP requests redirected to HTTPS."),
            access_log_lines: counter(ACCESS_LOG_LINES_TOTAL, "Access log lines written."),
            version_weights_errors: counter(VERSION_WEIGHTS_ERRORS_TOTAL, "Version weights in Consul KV refused as malformed (the service keeps the weights it had)."),
            access_log_dropped: counter(ACCESS_LOG_DROPPED_TOTAL, "Access log lines dropped because the writer's queue was full (LB_ACCESS_LOG_BUFFER)."),
            tunnel_idle_timeouts: counter(TUNNEL_IDLE_TIMEOUTS_TOTAL, "Upgraded connections (tunnels) closed after LB_TUNNEL_IDLE_TIMEOUT without a byte either way."),
            accept_paused: counter(ACCEPT_PAUSED_TOTAL, "Times accepting waited because LB_MAX_CONNECTIONS client connections were open (once each time the limit is reached)."),
            worker_connections: counter_vec(WORKER_CONNECTIONS_TOTAL, "Client connections accepted (plain and TLS), by the worker thread that serves them (LB_WORKERS; worker 0 also runs discovery and the admin listener).", &["worker"]),
            registry,
        };
        // Process-wide (see `socket_options_refused`): each registry holds the same family.
        reg(&m.registry, socket_options_refused().clone());
        for watch in WatchName::ALL {
            for kind in switchyard_consul::Error::KINDS.into_iter().chain([
                DISTRUSTED_ANSWER,
                NOTHING_VISIBLE,
                BAD_ENTRY,
            ]) {
                m.consul_watch_errors
                    .with_label_values(&[watch.as_str(), kind]);
            }
        }
        for reason in LocalReason::ROUTELESS {
            m.local_responses.with_label_values(&["", reason.as_str()]);
        }
        for kind in switchyard_consul::tags::TagErrorKind::ALL {
            m.route_tag_errors.with_label_values(&[kind.as_str()]);
        }
        for protocol in ClientProtocol::ALL {
            for tls in ["false", "true"] {
                m.client_connections
                    .with_label_values(&[protocol.as_str(), tls]);
            }
        }
        for version in TlsVersion::ALL {
            for alpn in TlsAlpn::ALL {
                m.tls_handshakes
                    .with_label_values(&[version.as_str(), alpn.as_str()]);
            }
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
