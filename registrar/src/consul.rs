//! The one adapter to the Consul agent: register, deregister, refresh a TTL check, and list the
//! agent's services for the resync, each counted and logged here. Speaks only the agent API;
//! knows nothing of Docker or of what the registrar holds.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use switchyard_consul::{AgentService, CheckStatus, Client, Error, ServiceRegistration};

use crate::metrics::{FailureOp, Metrics};
use crate::reconcile::Drift;

/// The node's Consul agent, with the metrics every call reports to.
pub struct Consul {
    client: Client,
    metrics: Arc<Metrics>,
}

impl Consul {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Consul {
        Consul { client, metrics }
    }

    /// Registers (or replaces) `reg`; true when the agent took it.
    pub async fn register(&self, reg: &ServiceRegistration, drift: Drift) -> bool {
        let op = self.client.register_service(reg);
        if !self.write(FailureOp::Register, &reg.id, op).await {
            return false;
        }
        self.metrics.registrations.inc();
        if let Some(kind) = drift.kind() {
            self.metrics.repaired(kind);
        }
        tracing::info!(service = %reg.name, id = %reg.id, address = %format!("{}:{}", reg.address, reg.port), drift = drift.as_str(), "registered");
        true
    }

    /// A failure leaves the entry ours in Consul, so the next resync removes it.
    ///
    /// The instance is first put in maintenance: that makes it critical, which Consul's list
    /// of critical checks shows, so that an lb following many services through that list
    /// (rather than a query per service) stops routing to it as fast as to a failing one. A
    /// deregistration alone moves only the catalog's index, which does not say which service
    /// changed. A failed maintenance call (an instance the agent no longer has) changes
    /// nothing: the deregistration follows either way.
    pub async fn deregister(&self, id: &str, why: &str, drift: Drift) {
        let reason = format!("switchyard: {why}");
        if let Err(e) = self.client.enable_maintenance(id, &reason).await {
            tracing::debug!(id = %id, error = %e, "maintenance before deregistration failed");
        }
        let op = self.client.deregister_service(id);
        if !self.write(FailureOp::Deregister, id, op).await {
            return;
        }
        self.metrics.deregistrations.inc();
        if let Some(kind) = drift.kind() {
            self.metrics.repaired(kind);
        }
        tracing::info!(id = %id, why, drift = drift.as_str(), "deregistered");
    }

    pub async fn update_ttl(&self, check: &str, status: CheckStatus) {
        let op = self
            .client
            .update_ttl(check, status, "mirrored from Docker health");
        self.write(FailureOp::Ttl, check, op).await;
    }

    /// Every service on the agent, ours and others'; the resync reports the error.
    pub async fn agent_services(&self) -> Result<HashMap<String, AgentService>, Error> {
        self.call(FailureOp::ConsulList, self.client.agent_services())
            .await
    }

    /// A write is logged here, once: nobody waits on its answer, and the next resync retries it.
    async fn write(
        &self,
        op: FailureOp,
        id: &str,
        call: impl Future<Output = Result<(), Error>>,
    ) -> bool {
        match self.call(op, call).await {
            Ok(()) => true,
            Err(e) if e.kind() == "acl_denied" => {
                tracing::warn!(id = %id, error = %e, "{} refused: the registrar's Consul token needs service:write on its services and node:read; the next resync retries", op.as_str());
                false
            }
            Err(e) => {
                tracing::warn!(id = %id, error = %e, "{} failed; the next resync retries", op.as_str());
                false
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
        if op != FailureOp::Ttl {
            let up = match &result {
                Ok(_) => true,
                Err(e) => !matches!(e.kind(), "transport" | "timeout" | "status_5xx"),
            };
            self.metrics.consul_up.set(i64::from(up));
        }
        if result.is_err() {
            self.metrics.failed(op);
        }
        result
    }
}
