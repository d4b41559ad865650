//! Consul's blocking queries, one loop for every watch: pacing, index handling, backoff with
//! jitter, and reporting only real changes. Knows nothing of routing tables.

use std::collections::BTreeSet;
use std::sync::Arc;

use switchyard_consul::{next_index, Client, QueryMeta, QueryOptions, ServiceEntry};
use switchyard_daemon::backoff::Backoff;
use tokio::sync::mpsc;

use super::{Pace, Update, BACKOFF_BASE};
use crate::metrics::WatchName;
use crate::state::ConsulContact;
use crate::Shared;

/// Counts a watch as failing while its last call failed, and not once it is gone.
struct FailingWatch<'a> {
    contact: &'a ConsulContact,
    failing: bool,
}

impl FailingWatch<'_> {
    fn ok(&mut self, shared: &Shared, meta: QueryMeta) {
        if self.failing {
            self.failing = false;
            self.contact.watch_failing(false);
        }
        self.contact.read_ok();
        let m = &shared.metrics;
        m.consul_last_contact
            .set(meta.last_contact_ms as f64 / 1000.0);
        m.consul_known_leader.set(i64::from(meta.known_leader));
    }

    fn failed(&mut self) {
        if !self.failing {
            self.failing = true;
            self.contact.watch_failing(true);
        }
    }
}

impl Drop for FailingWatch<'_> {
    fn drop(&mut self) {
        if self.failing {
            self.contact.watch_failing(false);
        }
    }
}

/// What a watch does with one successful read.
enum Verdict<T> {
    /// A value to compare with the last one and report when it differs.
    Value(T),
    /// A read not to trust: keep the last value, reset the index and retry after a backoff.
    Distrust(&'static str),
}

/// The blocking-query loop shared by every watch: pace the reads, carry `X-Consul-Index`
/// (reset when it goes backwards, and after any failure so the first read after an outage
/// returns at once), back off with jitter on errors forever, keep the last value, and report
/// only real changes. `on_change` returns false when nobody listens any more.
async fn watch<Raw, T, R, ReadFut, J, C, ChangeFut>(
    shared: &Shared,
    watch: WatchName,
    name: &str,
    mut read: R,
    mut judge: J,
    mut on_change: C,
) where
    T: PartialEq + Clone,
    R: FnMut(QueryOptions) -> ReadFut,
    ReadFut: std::future::Future<
        Output = Result<switchyard_consul::Response<Raw>, switchyard_consul::Error>,
    >,
    J: FnMut(switchyard_consul::Response<Raw>, Option<&T>) -> Verdict<T>,
    C: FnMut(T) -> ChangeFut,
    ChangeFut: std::future::Future<Output = bool>,
{
    let cfg = &shared.config;
    let mut pace = Pace::new(cfg.consul_rate, cfg.consul_burst);
    let mut backoff = Backoff::new(BACKOFF_BASE, cfg.consul_backoff_max);
    let mut health = FailingWatch {
        contact: &shared.consul,
        failing: false,
    };
    let mut index = 0;
    let mut last: Option<T> = None;
    loop {
        pace.acquire().await;
        let q = QueryOptions {
            index,
            wait: Some(cfg.consul_wait),
            stale: cfg.consul_stale,
        };
        match read(q).await {
            Ok(resp) => {
                health.ok(shared, resp.meta);
                let got = resp.meta.index;
                match judge(resp, last.as_ref()) {
                    Verdict::Distrust(why) => {
                        shared
                            .metrics
                            .consul_watch_errors
                            .with_label_values(&[watch.as_str(), why])
                            .inc();
                        tracing::warn!(
                            watch = watch.as_str(),
                            name,
                            reason = why,
                            "ignoring a Consul answer; keeping the last one"
                        );
                        index = 0;
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Verdict::Value(value) => {
                        if backoff.failing() {
                            tracing::info!(watch = watch.as_str(), name, "Consul watch recovered");
                        }
                        backoff.reset();
                        tracing::debug!(
                            watch = watch.as_str(),
                            name,
                            sent = index,
                            got,
                            "Consul read"
                        );
                        index = next_index(index, got);
                        if last.as_ref() != Some(&value) {
                            last = Some(value.clone());
                            if !on_change(value).await {
                                return;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                health.failed();
                shared
                    .metrics
                    .consul_watch_errors
                    .with_label_values(&[watch.as_str(), e.kind()])
                    .inc();
                let delay = backoff.next_delay();
                tracing::warn!(watch = watch.as_str(), name, error = %e, retry_in = ?delay, "Consul watch failed; keeping the last answer");
                index = 0;
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Follows `/v1/catalog/services` and reports the set of routed services when it changes.
pub(super) async fn watch_catalog(shared: Arc<Shared>, client: Client, tx: mpsc::Sender<Update>) {
    let route_tag = format!("{}.route=", shared.config.tag_prefix);
    watch(
        &shared,
        WatchName::Catalog,
        "services",
        |q| {
            let client = client.clone();
            async move { client.catalog_services(&q).await }
        },
        |resp, _| {
            shared.consul.catalog_answered();
            Verdict::Value(
                resp.value
                    .into_iter()
                    .filter(|(_, tags)| tags.iter().any(|t| t.starts_with(&route_tag)))
                    .map(|(name, _)| name)
                    .collect::<BTreeSet<String>>(),
            )
        },
        |routed| {
            let tx = tx.clone();
            async move { tx.send(Update::Services(routed)).await.is_ok() }
        },
    )
    .await;
}

/// Follows `/v1/health/service/<name>` (every instance, passing or not) and reports its
/// instances when they change.
pub(super) async fn watch_service(
    shared: Arc<Shared>,
    client: Client,
    service: String,
    tx: mpsc::Sender<Update>,
) {
    watch(
        &shared,
        WatchName::Health,
        &service,
        |q| {
            let (client, service) = (client.clone(), service.clone());
            async move { client.health_service(&service, false, &q).await }
        },
        |resp, last: Option<&Vec<ServiceEntry>>| {
            // An empty answer at index <= 1 is how a racing ACL token or a freshly restarted
            // server looks; do not let it wipe instances we know about.
            if resp.value.is_empty() && resp.meta.index <= 1 && last.is_some_and(|l| !l.is_empty())
            {
                return Verdict::Distrust(crate::metrics::DISTRUSTED_ANSWER);
            }
            let mut entries = resp.value;
            entries
                .sort_by(|a, b| (&a.node.node, &a.service.id).cmp(&(&b.node.node, &b.service.id)));
            Verdict::Value(entries)
        },
        |entries| {
            let (tx, service) = (tx.clone(), service.clone());
            async move { tx.send(Update::Health { service, entries }).await.is_ok() }
        },
    )
    .await;
}
