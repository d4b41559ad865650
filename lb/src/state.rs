//! The lb's runtime state, shared by the request path, discovery and admin: the settings, the
//! published routing table, metrics, the backend settings and retry budget, and discovery's
//! contact with Consul. It holds these parts; it knows nothing of how each is used.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::sync::Semaphore;

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::routing::RoutingTable;
use crate::time::unix_ms;
use crate::upstream::{BackendSettings, RetryBudget, Timeouts};

/// What the rest of the lb may know about discovery's contact with Consul. Discovery's
/// watches report to it; admin and metrics read it.
#[derive(Default)]
pub struct ConsulContact {
    /// Watches whose last Consul call failed.
    failing: AtomicUsize,
    /// Unix ms of the last successful Consul read; 0 before the first.
    last_ok_unix_ms: AtomicU64,
    /// Set once the catalog has answered at least once.
    catalog_ok: AtomicBool,
}

impl ConsulContact {
    /// A read succeeded just now.
    pub fn read_ok(&self) {
        self.last_ok_unix_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// The catalog has answered: the table reflects it.
    pub fn catalog_answered(&self) {
        self.catalog_ok.store(true, Ordering::Relaxed);
    }

    /// One more (`true`) or one fewer (`false`) watch whose last call failed.
    pub fn watch_failing(&self, failing: bool) {
        if failing {
            self.failing.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failing.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Seconds since Consul last confirmed the table; 0 while every watch is healthy.
    pub fn table_age(&self) -> Option<f64> {
        let last = self.last_ok_unix_ms.load(Ordering::Relaxed);
        if last == 0 {
            return None;
        }
        if self.failing.load(Ordering::Relaxed) == 0 && self.catalog_ok.load(Ordering::Relaxed) {
            return Some(0.0);
        }
        Some(unix_ms().saturating_sub(last) as f64 / 1000.0)
    }

    pub fn consul_up(&self) -> bool {
        self.failing.load(Ordering::Relaxed) == 0
            && self.last_ok_unix_ms.load(Ordering::Relaxed) > 0
    }
}

/// An instance of a routed service that is not a backend of the table, and why, as discovery
/// last saw it: what the table alone cannot tell the admin's "why" view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrouted {
    pub instance: String,
    pub node: String,
    pub addr: String,
    /// The routes its tags ask for, named as the table names them (`host/prefix`).
    pub routes: Vec<String>,
    pub why: &'static str,
    /// Its checks that do not pass: (check ID, status).
    pub failing: Vec<(String, String)>,
}

/// State shared by the request path, discovery and admin, in typed parts: each reader takes
/// the parts it needs, and only discovery writes the table and the Consul contact.
pub struct Shared {
    pub config: Config,
    /// `None` until discovery publishes the first table; the proxy reads it with one load.
    pub table: ArcSwapOption<RoutingTable>,
    pub metrics: Metrics,
    /// How the lb treats its backends (timeouts, pool, ejection), from the config.
    pub backend_settings: BackendSettings,
    pub retry_budget: RetryBudget,
    pub consul: ConsulContact,
    /// Set when shutdown begins: readiness turns false while the listeners still accept.
    pub shutting_down: AtomicBool,
    /// Held while per-route series are created or removed outside the request path: by
    /// discovery while it builds and publishes a table (removing the series of routes that
    /// left), and by admin while it refreshes the backend gauges from the table it loaded, so
    /// a refresh never re-creates the series of a route that just left.
    pub series: std::sync::Mutex<()>,
    /// The places for client connections (`LB_MAX_CONNECTIONS`), shared by every listener of
    /// every worker.
    pub connection_slots: ConnectionSlots,
    /// `None` when off (`LB_ACCESS_LOG`).
    pub access_log: Option<AccessLog>,
    /// By service, its instances that are not backends (discovery writes, admin reads).
    pub unrouted: std::sync::Mutex<std::collections::HashMap<String, Vec<Unrouted>>>,
}

/// One permit per client connection that may be open (`LB_MAX_CONNECTIONS`), held for the
/// connection's life.
pub struct ConnectionSlots {
    pub permits: Arc<Semaphore>,
    /// Set when the limit holds accepting back, until a connection is accepted with places
    /// to spare: a pause is counted and logged once however many accept loops (a plain and a
    /// TLS one per worker) wait in it, and however often a freed place is taken meanwhile.
    pub full: AtomicBool,
}

impl Shared {
    pub fn new(config: Config) -> Shared {
        let metrics = Metrics::new();
        let access_log = config.access_log.and_then(|format| {
            let (lines, dropped) = (&metrics.access_log_lines, &metrics.access_log_dropped);
            let log = AccessLog::start(
                format,
                config.access_log_sample,
                config.access_log_buffer,
                lines.clone(),
                dropped.clone(),
            );
            log.map_err(|e| tracing::error!(error = %e, "the access log could not start"))
                .ok()
        });
        Shared {
            backend_settings: BackendSettings {
                send: Timeouts {
                    response: config.response_timeout,
                    client_body: config.client_body_timeout,
                    user: config.upstream_user_timeout,
                },
                connect_timeout: config.connect_timeout,
                idle_timeout: config.upstream_idle_timeout,
                max_idle: config.upstream_max_idle,
                eject_failures: config.eject_failures,
                eject_base: config.eject_base,
                eject_max: config.eject_max,
            },
            retry_budget: RetryBudget::new(config.retry_budget),
            table: ArcSwapOption::empty(),
            metrics,
            access_log,
            consul: ConsulContact::default(),
            shutting_down: AtomicBool::new(false),
            series: std::sync::Mutex::new(()),
            unrouted: Default::default(),
            connection_slots: ConnectionSlots {
                permits: Arc::new(Semaphore::new(
                    config.max_connections.unwrap_or_else(descriptor_share),
                )),
                full: AtomicBool::new(false),
            },
            config,
        }
    }
}

/// Three quarters of the soft descriptor limit: the rest is for upstream connections, Consul
/// and files. 10,000 when the limit cannot be read.
fn descriptor_share() -> usize {
    crate::rlimit::descriptors().map_or(10_000, |n| (n / 4 * 3).max(1))
}
