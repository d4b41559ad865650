//! The registrar's reading of a container: any labels (`key=value` lines), networks and ports
//! give a registration, a list of label errors, or nothing, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

use registrar::docker::ContainerInfo;
use registrar::instance::{decide, InstanceSettings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.lines();
    let ports: Vec<u16> = lines
        .next()
        .unwrap_or("")
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let labels = lines
        .map(|l| l.split_once('=').unwrap_or((l, "")))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let c = ContainerInfo {
        id: "0123456789abcdef".into(),
        name: "web-1".into(),
        labels,
        running: true,
        health: None,
        networks: vec![
            ("stack_default".into(), "10.0.1.5".into()),
            ("ingress".into(), "10.0.0.5".into()),
        ],
        exposed_tcp_ports: ports,
    };
    let s = InstanceSettings {
        node: "node-1".into(),
        label_prefix: "switchyard".into(),
        tag_prefix: "lb".into(),
        network: None,
        check_interval: Duration::from_secs(5),
        check_timeout: Duration::from_secs(2),
        deregister_critical_after: Duration::from_secs(60),
        ttl: Duration::from_secs(15),
    };
    let _ = decide(&c, &s);
});
