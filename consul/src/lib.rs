//! What lb and registrar truly share: a small typed client for the parts of Consul's HTTP API
//! that Switchyard uses (blocking reads of the catalog and service health for the lb, the
//! agent's service endpoints for the registrar), the routing-tag contract that travels through
//! Consul between them ([`tags`]), and how both read their settings ([`settings`]).
//!
//! The client knows Consul's wire format and blocking-query rules, nothing about routing or
//! Docker.
//!
//! Why not `rs-consul`: it pulls a second HTTP stack and lacks typed access to the
//! `X-Consul-*` headers we export as metrics; this client is a few hundred lines over the hyper
//! that the lb already links.

pub mod backoff;
mod client;
mod index;
pub mod probe;
pub mod settings;
pub mod tags;
mod types;

pub use client::{Client, Error, QueryMeta, QueryOptions, Response};
pub use index::next_index;
pub use types::{
    AgentCheck, AgentService, CheckRegistration, CheckStatus, HealthCheck, Node, Service,
    ServiceEntry, ServiceRegistration,
};
