//! The one adapter to the Consul agent: register, deregister, refresh a TTL check, and list the
//! agent's services for the resync, each counted and logged here. Speaks only the agent API;
//! knows nothing of Docker or of what the registrar holds.

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_consul::{AgentService, CheckStatus, Client, ServiceRegistration};

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
        match self.client.register_service(reg).await {
            Ok(()) => {
                self.metrics.consul_up.set(1);
                self.metrics.registrations.inc();
                if let Some(kind) = drift.kind() {
                    self.metrics.repaired(kind);
                }
                tracing::info!(service = %reg.name, id = %reg.id, address = %format!("{}:{}", reg.address, reg.port), drift = drift.as_str(), "registered");
                true
            }
            Err(e) => {
                self.metrics.consul_up.set(0);
                self.metrics.failed(FailureOp::Register);
                tracing::warn!(id = %reg.id, error = %e, "register failed; the next resync retries");
                false
            }
        }
    }

    pub async fn deregister(&self, id: &str, why: &str, drift: Drift) {
        match self.client.deregister_service(id).await {
            Ok(()) => {
                self.metrics.consul_up.set(1);
                self.metrics.deregistrations.inc();
                if let Some(kind) = drift.kind() {
                    self.metrics.repaired(kind);
                }
                tracing::info!(id = %id, why, drift = drift.as_str(), "deregistered");
            }
            Err(e) => {
                // The entry stays owned by us in Consul, so the next resync removes it.
                self.metrics.consul_up.set(0);
                self.metrics.failed(FailureOp::Deregister);
                tracing::warn!(id = %id, error = %e, "deregister failed; the next resync retries");
            }
        }
    }

    pub async fn update_ttl(&self, check: &str, status: CheckStatus) {
        if let Err(e) = self
            .client
            .update_ttl(check, status, "mirrored from Docker health")
            .await
        {
            self.metrics.failed(FailureOp::Ttl);
            tracing::warn!(check = %check, error = %e, "TTL update failed");
        }
    }

    /// Every service on the agent, ours and others'; the caller reports the error.
    pub async fn agent_services(
        &self,
    ) -> Result<HashMap<String, AgentService>, switchyard_consul::Error> {
        let services = self.client.agent_services().await.inspect_err(|_| {
            self.metrics.consul_up.set(0);
            self.metrics.failed(FailureOp::ConsulList);
        })?;
        self.metrics.consul_up.set(1);
        Ok(services)
    }
}
