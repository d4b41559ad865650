//! The one adapter to the Consul agent: register, deregister, refresh a TTL check, list the
//! agent's services and checks for the resync, and read the catalog's checks of the agent's
//! node to compare with them, each counted and logged here. Speaks only Consul's HTTP API;
//! knows nothing of Docker or of what the registrar holds.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use switchyard_consul::{
    AgentCheck, AgentService, CheckState, CheckStatus, Client, Error, QueryOptions,
    ServiceRegistration,
};

use crate::metrics::{FailureOp, Metrics};
use crate::reconcile::Drift;

/// How long a stopping container's instance may wait in maintenance for the catalog to show
/// it before it is deregistered (about a millisecond on a healthy agent).
const MAINTENANCE_WITHIN: std::time::Duration = std::time::Duration::from_millis(500);

/// How long each read that compares the agent with the catalog may take: an agent answers
/// from memory and a server a stale read too; one that does not is asked again at the next
/// comparison rather than hold up the event loop.
const CATALOG_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// The node's Consul agent, with the metrics every call reports to.
pub struct Consul {
    client: Client,
    metrics: Arc<Metrics>,
}

impl Consul {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Consul {
        Consul { client, metrics }
    }

    /// Registers (or replaces) `reg`; the error says why the agent did not take it.
    pub async fn register(&self, reg: &ServiceRegistration, drift: Drift) -> Result<(), String> {
        let op = self.client.register_service(reg);
        self.write(FailureOp::Register, &reg.id, op).await?;
        self.metrics.registrations.inc();
        if let Some(kind) = drift.kind() {
            self.metrics.repaired(kind);
        }
        tracing::info!(service = %reg.name, id = %reg.id, address = %format!("{}:{}", reg.address, reg.port), drift = drift.as_str(), "registered");
        Ok(())
    }

    /// Deregisters a stopping container's instance, putting it in maintenance first.
    ///
    /// Maintenance makes the instance critical, which Consul's list of critical checks
    /// shows, so that an lb following many services through that list (rather than a query
    /// per service) stops routing to it as fast as to a failing one: a deregistration alone
    /// moves only the catalog's index, which does not say which service changed. The agent
    /// syncs its changes to the servers in the background, and would merge a maintenance
    /// followed at once by a deregistration into the deregistration alone: so the
    /// deregistration waits until the catalog holds the maintenance check, for
    /// `MAINTENANCE_WITHIN` at most (traffic stops at the maintenance already). Maintenance
    /// that fails or is not seen in time changes nothing else: the deregistration follows.
    /// The maintenance reason carries when Docker reported the stop (`at_us`) to the lb.
    /// `entered`: the instance was put in maintenance already ([`Consul::enter_maintenance`]).
    pub async fn drain_and_deregister(
        &self,
        reg: &ServiceRegistration,
        why: &str,
        at_us: u64,
        entered: bool,
    ) -> Result<(), String> {
        let started = tokio::time::Instant::now();
        let check = format!("_service_maintenance:{}", reg.id);
        let seen = async {
            if !entered {
                self.enter_maintenance(reg, why, at_us).await?;
            }
            let mut q = switchyard_consul::QueryOptions::default();
            loop {
                let r = self.client.health_checks(&reg.name, &q).await?;
                if r.value.iter().any(|c| c.check_id == check) {
                    return Ok::<_, Error>(());
                }
                q.index = r.meta.index.max(1);
                q.wait = Some(MAINTENANCE_WITHIN);
            }
        };
        match tokio::time::timeout(MAINTENANCE_WITHIN, seen).await {
            Ok(Ok(())) => {
                tracing::debug!(id = %reg.id, took = ?started.elapsed(), "in maintenance")
            }
            Ok(Err(e)) => {
                self.metrics.failed(FailureOp::Maintenance);
                tracing::warn!(id = %reg.id, error = %e, "maintenance before deregistration failed; deregistering anyway");
            }
            Err(_) => {
                self.metrics.failed(FailureOp::Maintenance);
                tracing::warn!(id = %reg.id, within = ?MAINTENANCE_WITHIN, "maintenance not seen in the catalog in time; deregistering anyway");
            }
        }
        self.deregister(&reg.id, why, Drift::None).await
    }

    /// Puts a stopping instance in maintenance, the reason carrying when Docker reported the
    /// stop (`at_us`): the first half of [`Consul::drain_and_deregister`].
    pub async fn enter_maintenance(
        &self,
        reg: &ServiceRegistration,
        why: &str,
        at_us: u64,
    ) -> Result<(), Error> {
        let reason = switchyard_consul::stamp::note(&format!("switchyard: {why}"), at_us);
        self.client.enable_maintenance(&reg.id, &reason).await
    }

    /// A failure leaves the entry ours in Consul, so the next resync removes it.
    pub async fn deregister(&self, id: &str, why: &str, drift: Drift) -> Result<(), String> {
        let op = self.client.deregister_service(id);
        self.write(FailureOp::Deregister, id, op).await?;
        self.metrics.deregistrations.inc();
        if let Some(kind) = drift.kind() {
            self.metrics.repaired(kind);
        }
        tracing::info!(id = %id, why, drift = drift.as_str(), "deregistered");
        Ok(())
    }

    pub async fn update_ttl(&self, check: &str, status: CheckStatus, output: &str) {
        let op = self.client.update_ttl(check, status, output);
        let _ = self.write(FailureOp::Ttl, check, op).await;
    }

    /// Every service on the agent, ours and others'; the resync reports the error.
    pub async fn agent_services(&self) -> Result<HashMap<String, AgentService>, Error> {
        self.call(FailureOp::ConsulList, self.client.agent_services())
            .await
    }

    /// Every check on the agent, with the agent's node name in each; bounded, and counted,
    /// like the catalog read it goes with (a slow answer here does not call the agent down).
    pub async fn agent_checks(&self) -> Result<HashMap<String, AgentCheck>, Error> {
        let q = QueryOptions {
            timeout: Some(CATALOG_WITHIN),
            ..QueryOptions::default()
        };
        self.call(FailureOp::ConsulCatalog, self.client.agent_checks(&q))
            .await
    }

    /// The checks the catalog holds for `node`, or `None` while the server that answered
    /// knows no leader. A stale read: any server answers at once, where a read from the
    /// leader would wait out Consul's RPC hold (7 s) during an election, holding up the
    /// registrar's event loop; a server that still follows a leader has what it took.
    pub async fn catalog_checks(&self, node: &str) -> Result<Option<Vec<CheckState>>, Error> {
        let q = QueryOptions {
            stale: true,
            timeout: Some(CATALOG_WITHIN),
            ..QueryOptions::default()
        };
        let read = self.client.health_node(node, &q);
        let r = self.call(FailureOp::ConsulCatalog, read).await?;
        Ok(r.meta.known_leader.then_some(r.value))
    }

    /// A write is logged here, once: nobody waits on its answer, and the next resync retries it.
    /// The error, in words, is for the journal.
    async fn write(
        &self,
        op: FailureOp,
        id: &str,
        call: impl Future<Output = Result<(), Error>>,
    ) -> Result<(), String> {
        match self.call(op, call).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == "acl_denied" => {
                tracing::warn!(id = %id, error = %e, "{} refused: the registrar's Consul token needs service:write on its services and node:read; the next resync retries", op.as_str());
                Err(format!("refused by Consul's ACLs: {e}"))
            }
            Err(e) => {
                tracing::warn!(id = %id, error = %e, "{} failed; the next resync retries", op.as_str());
                Err(e.to_string())
            }
        }
    }

    /// Every call to the agent goes through here: `consul_up` follows its answer, and a
    /// failure is counted under `op`.
    async fn call<T>(
        &self,
        op: FailureOp,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let result = call.await;
        // A TTL refresh also fails for a check the agent no longer holds, with the agent up,
        // so it does not move `consul_up`; nor does a refusal (a token without the right to
        // write): an agent that answers is up, and the failure is counted under `op`.
        // The comparison's reads are bounded to a second and the catalog's fails while the
        // cluster has no leader, with the agent up.
        if !matches!(op, FailureOp::Ttl | FailureOp::ConsulCatalog) {
            let up = match &result {
                Ok(_) => true,
                Err(e) => !matches!(e.kind(), "transport" | "timeout" | "body" | "status_5xx"),
            };
            self.metrics.consul_up.set(i64::from(up));
        }
        if result.is_err() {
            self.metrics.failed(op);
        }
        result
    }
}
