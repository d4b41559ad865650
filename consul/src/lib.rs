//! Consul, as lb and registrar both speak it: a small typed client for the parts of Consul's
//! HTTP API that Switchyard uses (blocking reads of the catalog and service health for the lb,
//! the agent's service endpoints for the registrar), and the routing-tag contract that travels
//! through Consul between them ([`tags`]). What the processes share besides Consul lives in
//! the `switchyard-daemon` crate.
//!
//! The client knows Consul's wire format and blocking-query rules, nothing about routing or
//! Docker.
//!
//! Why not `rs-consul`: it pulls a second HTTP stack and lacks typed access to the
//! `X-Consul-*` headers we export as metrics; this client is a few hundred lines over the hyper
//! that the lb already links.

mod client;
mod connect;
mod index;
pub mod stamp;
pub mod tags;
mod types;

pub use client::{Client, Error, QueryMeta, QueryOptions, Response, Settings};
pub use connect::{TlsError, TlsFiles};
pub use index::next_index;
pub use types::{
    AgentCheck, AgentService, CheckRegistration, CheckState, CheckStatus, HealthCheck, KvPair,
    Node, Service, ServiceEntry, ServiceRegistration,
};
