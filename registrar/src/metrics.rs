//! Every metric the registrar exports and every label value known in advance, declared once.
//! Knows nothing of Docker or Consul: callers report what happened through typed labels.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub const EVENTS_TOTAL: &str = "registrar_events_total";
pub const REGISTRATIONS_TOTAL: &str = "registrar_registrations_total";
pub const DEREGISTRATIONS_TOTAL: &str = "registrar_deregistrations_total";
pub const FAILURES_TOTAL: &str = "registrar_failures_total";
pub const LABEL_ERRORS_TOTAL: &str = "registrar_label_errors_total";
pub const RESYNCS_TOTAL: &str = "registrar_resyncs_total";
pub const RESYNC_DURATION_SECONDS: &str = "registrar_resync_duration_seconds";
pub const DRIFT_REPAIRED_TOTAL: &str = "registrar_drift_repaired_total";
pub const REGISTERED: &str = "registrar_registered_instances";
pub const DOCKER_UP: &str = "registrar_docker_up";
pub const CONSUL_UP: &str = "registrar_consul_up";
pub const DOCKER_RECONNECTS_TOTAL: &str = "registrar_docker_reconnects_total";

/// The operation of a failure, `registrar_failures_total{op}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOp {
    Register,
    Deregister,
    /// Putting a stopping instance in maintenance before deregistering it.
    Maintenance,
    Ttl,
    ConsulList,
    /// The reads that compare the agent with the catalog: the agent's checks, and the
    /// catalog's for the agent's node.
    ConsulCatalog,
    DockerConnect,
    DockerList,
    DockerInspect,
    DockerEvents,
}

impl FailureOp {
    /// Known in advance, so every series starts at zero: dashboards read 0, not "no data",
    /// before the first failure.
    pub const ALL: [FailureOp; 10] = [
        FailureOp::Register,
        FailureOp::Deregister,
        FailureOp::Maintenance,
        FailureOp::Ttl,
        FailureOp::ConsulList,
        FailureOp::ConsulCatalog,
        FailureOp::DockerConnect,
        FailureOp::DockerList,
        FailureOp::DockerInspect,
        FailureOp::DockerEvents,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureOp::Register => "register",
            FailureOp::Deregister => "deregister",
            FailureOp::Maintenance => "maintenance",
            FailureOp::Ttl => "ttl",
            FailureOp::ConsulList => "consul_list",
            FailureOp::ConsulCatalog => "consul_catalog",
            FailureOp::DockerConnect => "docker_connect",
            FailureOp::DockerList => "docker_list",
            FailureOp::DockerInspect => "docker_inspect",
            FailureOp::DockerEvents => "docker_events",
        }
    }
}

/// What a reconcile repaired, `registrar_drift_repaired_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftKind {
    Missing,
    Changed,
    Stale,
    /// The agent held it, the catalog did not (or held another check status): the agent's
    /// sync failed and nothing retried it yet, or the catalog lost it (a snapshot restore).
    Unsynced,
}

impl DriftKind {
    /// Known in advance, so every series starts at zero.
    pub const ALL: [DriftKind; 4] = [
        DriftKind::Missing,
        DriftKind::Changed,
        DriftKind::Stale,
        DriftKind::Unsynced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Missing => "missing",
            DriftKind::Changed => "changed",
            DriftKind::Stale => "stale",
            DriftKind::Unsynced => "unsynced",
        }
    }
}

/// The container actions the registrar acts on (others are counted as they come).
pub const EVENT_ACTIONS: [&str; 6] = ["start", "kill", "die", "stop", "pause", "health_status"];

pub struct Metrics {
    pub registry: Registry,
    /// action
    pub events: IntCounterVec,
    pub registrations: IntCounter,
    pub deregistrations: IntCounter,
    /// op: a [`FailureOp`]
    pub failures: IntCounterVec,
    /// kind
    pub label_errors: IntCounterVec,
    pub resyncs: IntCounter,
    pub resync_duration: Histogram,
    /// kind: a [`DriftKind`]
    pub drift: IntCounterVec,
    pub registered: IntGauge,
    pub docker_up: IntGauge,
    pub consul_up: IntGauge,
    pub docker_reconnects: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone()))
                .expect("metric names are unique");
            m
        }
        let vec = |name: &str, help: &str, label: &str| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
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
        let m = Metrics {
            events: vec(EVENTS_TOTAL, "Docker container events seen for opted-in containers, by action.", "action"),
            registrations: counter(REGISTRATIONS_TOTAL, "Service instances registered in Consul."),
            deregistrations: counter(DEREGISTRATIONS_TOTAL, "Service instances deregistered from Consul."),
            failures: vec(FAILURES_TOTAL, "Failed operations against Docker or Consul, by operation.", "op"),
            label_errors: vec(LABEL_ERRORS_TOTAL, "Containers skipped for unusable labels, by kind (counted once per container and label).", "kind"),
            resyncs: counter(RESYNCS_TOTAL, "Full two-way reconciles completed."),
            resync_duration: reg(&registry, Histogram::with_opts(
                HistogramOpts::new(RESYNC_DURATION_SECONDS, "Time a full reconcile took.")
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            ).expect("valid metric")),
            drift: vec(DRIFT_REPAIRED_TOTAL, "Differences between Docker and Consul repaired by a reconcile, by kind.", "kind"),
            registered: gauge(REGISTERED, "Instances this registrar holds registered."),
            docker_up: gauge(DOCKER_UP, "1 while the Docker event stream is connected."),
            consul_up: gauge(CONSUL_UP, "1 while the last Consul call succeeded."),
            docker_reconnects: counter(DOCKER_RECONNECTS_TOTAL, "Times the Docker event stream was resubscribed."),
            registry,
        };
        for op in FailureOp::ALL {
            m.failures.with_label_values(&[op.as_str()]);
        }
        for kind in DriftKind::ALL {
            m.drift.with_label_values(&[kind.as_str()]);
        }
        for action in EVENT_ACTIONS {
            m.events.with_label_values(&[action]);
        }
        m
    }

    pub fn failed(&self, op: FailureOp) {
        self.failures.with_label_values(&[op.as_str()]).inc();
    }

    pub fn repaired(&self, kind: DriftKind) {
        self.drift.with_label_values(&[kind.as_str()]).inc();
    }

    pub fn encode(&self) -> String {
        use prometheus::Encoder as _;
        let mut buf = Vec::new();
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
