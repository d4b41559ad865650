//! The lb's integration tests: a real Consul agent, real HTTP backends and the real lb binary.

mod access_log;
mod balancing;
mod consul_auth;
mod discovery;
mod hostile;
mod keepalive;
mod resilience;
mod rewrite;
mod sticky;
mod support;
mod tls;
mod upgrades;
mod upstream_h1;
mod versions;
mod why;
