//! Holds no code: the end-to-end test of the swarm stack lives in `tests/it`. It deploys the
//! stack with `scripts/up`, drives a steady GET/POST load through both lb replicas while the
//! swarm is scaled, updated, an lb is killed and Consul is stopped, checks every Grafana
//! panel's query against the stack's Prometheus, and tears down with `scripts/down`.
