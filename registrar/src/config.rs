//! The registrar's whole configuration as one value, read like the lb's: `REGISTRAR_*`
//! variables or the matching `--flags`, every error reported at once. Only reads settings; it
//! neither connects nor acts (`DOCKER_HOST` selects the engine, bollard reads it).

use std::net::SocketAddr;
use std::time::Duration;

use switchyard_daemon::settings::{positive_duration, Reader, Setting};

pub const SETTINGS: &[Setting] = &[
    ("REGISTRAR_CONSUL_ADDR", "http://127.0.0.1:8500", "the node's Consul agent: http://, https://, or unix:///path (CONSUL_HTTP_ADDR is honoured)"),
    ("REGISTRAR_CONSUL_TOKEN", "", "ACL token, needs service:write and node:read (CONSUL_HTTP_TOKEN is honoured)"),
    ("REGISTRAR_CONSUL_TOKEN_FILE", "", "file holding the ACL token, e.g. a swarm secret; read at start (CONSUL_HTTP_TOKEN_FILE is honoured)"),
    ("REGISTRAR_CONSUL_CACERT", "", "PEM CA certificates an https:// agent is verified against (default: the system's; CONSUL_CACERT is honoured)"),
    ("REGISTRAR_CONSUL_CLIENT_CERT", "", "PEM certificate chain shown to an agent that verifies clients (CONSUL_CLIENT_CERT is honoured)"),
    ("REGISTRAR_CONSUL_CLIENT_KEY", "", "PEM private key of REGISTRAR_CONSUL_CLIENT_CERT (CONSUL_CLIENT_KEY is honoured)"),
    ("REGISTRAR_CONSUL_TLS_SERVER_NAME", "", "name the agent's certificate must carry when it is not the address's host (CONSUL_TLS_SERVER_NAME is honoured)"),
    ("REGISTRAR_NODE", "", "this node's name in service IDs and ownership meta (default: the swarm node ID, else the engine's hostname)"),
    ("REGISTRAR_LABEL_PREFIX", "switchyard", "prefix of the container labels read (switchyard.enable=true opts in)"),
    ("REGISTRAR_TAG_PREFIX", "lb", "prefix of the routing tags written (must match the lb's LB_TAG_PREFIX)"),
    ("REGISTRAR_NETWORK", "", "network whose address is registered when the container has no network label"),
    ("REGISTRAR_ONLY_LABEL", "", "only consider containers carrying this label (key or key=value), e.g. one stack"),
    ("REGISTRAR_RESYNC", "30s", "full two-way reconcile period"),
    ("REGISTRAR_CHECK_INTERVAL", "5s", "HTTP/TCP check interval when the container sets none"),
    ("REGISTRAR_CHECK_TIMEOUT", "2s", "HTTP/TCP check timeout when the container sets none"),
    ("REGISTRAR_DEREGISTER_CRITICAL_AFTER", "10m", "Consul removes an instance critical this long (the safety net for lost nodes; min 1m)"),
    ("REGISTRAR_TTL", "90s", "TTL of checks that mirror Docker health; refreshed on every event and resync"),
    ("REGISTRAR_ADMIN_LISTEN", "0.0.0.0:9091", "admin listener: /metrics /healthz /readyz /containers"),
    ("REGISTRAR_LOG_FORMAT", "text", "text | json (level from RUST_LOG, default info)"),
];

#[derive(Debug, Clone)]
pub struct Config {
    /// Where the node's agent is and who the registrar is to it.
    pub consul: switchyard_consul::Settings,
    pub node: Option<String>,
    pub label_prefix: String,
    pub tag_prefix: String,
    pub network: Option<String>,
    pub only_label: Option<(String, Option<String>)>,
    pub resync: Duration,
    pub check_interval: Duration,
    pub check_timeout: Duration,
    pub deregister_critical_after: Duration,
    pub ttl: Duration,
    pub admin_listen: SocketAddr,
    pub json_logs: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{0}")]
pub struct ConfigError(pub String);

fn word(s: &str) -> Option<String> {
    Some(s.to_string()).filter(|s| !s.is_empty() && !s.contains(['=', ' ', ',']))
}

impl Config {
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut p = Reader::new(SETTINGS, lookup);
        let optional = |s: String| Some(s).filter(|s| !s.is_empty());
        let cfg = Config {
            consul: switchyard_consul::Settings::read("REGISTRAR", |name, alias| {
                p.optional(name, Some(alias))
            }),
            node: optional(p.raw("REGISTRAR_NODE", None)),
            label_prefix: p.get(
                "REGISTRAR_LABEL_PREFIX",
                word,
                "a word without '=', ',' or spaces",
            ),
            tag_prefix: p.get(
                "REGISTRAR_TAG_PREFIX",
                word,
                "a word without '=', ',' or spaces",
            ),
            network: optional(p.raw("REGISTRAR_NETWORK", None)),
            only_label: optional(p.raw("REGISTRAR_ONLY_LABEL", None)).map(|s| {
                match s.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (s, None),
                }
            }),
            resync: p.get(
                "REGISTRAR_RESYNC",
                |s| positive_duration(s).filter(|d| *d >= Duration::from_secs(1)),
                "a duration of at least 1s",
            ),
            check_interval: p.get(
                "REGISTRAR_CHECK_INTERVAL",
                positive_duration,
                "a duration like 5s",
            ),
            check_timeout: p.get(
                "REGISTRAR_CHECK_TIMEOUT",
                positive_duration,
                "a duration like 2s",
            ),
            deregister_critical_after: p.get(
                "REGISTRAR_DEREGISTER_CRITICAL_AFTER",
                |s| positive_duration(s).filter(|d| *d >= Duration::from_secs(60)),
                "a duration of at least 1m (Consul's minimum)",
            ),
            ttl: p.get("REGISTRAR_TTL", positive_duration, "a duration like 90s"),
            admin_listen: p.get(
                "REGISTRAR_ADMIN_LISTEN",
                |s| s.parse().ok(),
                "a socket address",
            ),
            json_logs: p.get(
                "REGISTRAR_LOG_FORMAT",
                |s| match s {
                    "text" => Some(false),
                    "json" => Some(true),
                    _ => None,
                },
                "text or json",
            ),
        };
        if cfg.ttl <= cfg.resync {
            p.error(format!("REGISTRAR_TTL ({:?}) must be longer than REGISTRAR_RESYNC ({:?}), which refreshes it", cfg.ttl, cfg.resync));
        }
        // Builds a client once, so that an unusable address or file is an error now.
        if let Err(e) = switchyard_consul::Client::connect(&cfg.consul) {
            let setting = e.setting().unwrap_or("CONSUL_ADDR");
            p.error(format!("REGISTRAR_{setting}: {e}"));
        }
        p.finish().map_err(ConfigError)?;
        Ok(cfg)
    }

    pub fn lookup_from_args_and_env(
        args: &[String],
    ) -> Result<impl Fn(&str) -> Option<String>, ConfigError> {
        switchyard_daemon::settings::lookup_from_args_and_env("REGISTRAR_", SETTINGS, args)
            .map_err(ConfigError)
    }

    pub fn help() -> String {
        switchyard_daemon::settings::help(
            "registrar: registers opted-in Docker containers and swarm tasks in Consul",
            "REGISTRAR_",
            SETTINGS,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_and_errors() {
        let c = from(&[]).unwrap();
        assert_eq!(c.resync, Duration::from_secs(30));
        assert_eq!(c.only_label, None);
        let c = from(&[("REGISTRAR_ONLY_LABEL", "com.docker.stack.namespace=shop")]).unwrap();
        assert_eq!(
            c.only_label,
            Some(("com.docker.stack.namespace".into(), Some("shop".into())))
        );
        let err = from(&[
            ("REGISTRAR_DEREGISTER_CRITICAL_AFTER", "30s"),
            ("REGISTRAR_TTL", "10s"),
            ("REGISTRAR_LABEL_PREFIX", "a b"),
        ])
        .unwrap_err()
        .to_string();
        for needle in [
            "REGISTRAR_DEREGISTER_CRITICAL_AFTER",
            "REGISTRAR_TTL",
            "REGISTRAR_LABEL_PREFIX",
        ] {
            assert!(err.contains(needle), "{needle} missing in {err}");
        }
    }
}
