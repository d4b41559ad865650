//! Registration latency with the real Docker Engine and Consul:
//! - start -> passing: `docker run -d` returning (the container is started) until Consul's
//!   health API lists the instance as passing. Its HTTP check runs every second, and Consul
//!   runs a new check's first probe after a random stagger within that interval, so this is
//!   dominated by the check interval, not by the registrar.
//! - start -> registered: the same, until the instance is listed at all (critical or not).
//! - stop -> deregistered: `docker stop` issued until Consul no longer lists the instance
//!   (web-sample keeps serving 3 s after SIGTERM, so this happens well before exit).
//!
//! `cargo bench -p registrar --bench latency` (RUNS=20 by default).

#[path = "../tests/it/support.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{instances, scope, Consul, Container, Registrar};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let consul = Consul::start().await;
    let s = scope("bench");
    let _reg = Registrar::start(&consul, &s, &[("RUST_LOG", "warn")]).await;
    support::test_image();
    let labels = [
        ("switchyard.enable", "true"),
        ("switchyard.service", "web"),
        ("switchyard.check.path", "/health"),
        ("switchyard.check.interval", "1s"),
    ];
    let (mut registered, mut passing, mut gone) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let c = Container::run(
            &s,
            &format!("r{i}"),
            &labels,
            &[("WEB_DRAIN_DELAY", "3")],
            &["--no-healthcheck"],
        );
        let started = Instant::now();
        let mut seen = None;
        loop {
            let now = instances(&consul, "web").await;
            if seen.is_none() && !now.is_empty() {
                seen = Some(started.elapsed());
            }
            if now.iter().any(|(_, _, s)| s == "passing") {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "never passing");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        passing.push(started.elapsed());
        registered.push(seen.expect("listed before passing"));
        let stop_at = Instant::now();
        let stop = c.stop_async();
        while !instances(&consul, "web").await.is_empty() {
            assert!(
                stop_at.elapsed() < Duration::from_secs(30),
                "never deregistered"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        gone.push(stop_at.elapsed());
        stop.join().unwrap();
        drop(c);
    }
    println!(
        "registration latency over {runs} containers (real Docker {}, Consul 1.8.7):",
        support::sh(std::process::Command::new("docker").args([
            "version",
            "-f",
            "{{.Server.Version}}"
        ]))
    );
    println!("| measure | median | p99 | max |");
    println!("|---|---|---|---|");
    for (what, v) in [
        (
            "docker run -> registered (listed in Consul)",
            &mut registered,
        ),
        (
            "docker run -> passing in Consul (1 s HTTP check)",
            &mut passing,
        ),
        ("docker stop -> deregistered", &mut gone),
    ] {
        v.sort();
        let q = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "| {what} | {:.0} ms | {:.0} ms | {:.0} ms |",
            ms(q(0.5)),
            ms(q(0.99)),
            ms(*v.last().unwrap())
        );
    }
}
