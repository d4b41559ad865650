//! Convergence delay: how long after Consul reports a change the lb's traffic follows it.
//!
//! For each cycle an instance is registered (critical), its TTL check set to passing, and later
//! deregistered. A blocking query of our own records the moment Consul reports each change; a
//! probe loop through the lb records the moment its answers change (200 once the instance is
//! passing; not 200 once it is deregistered). The difference is the lb's delay.
//!
//! `cargo bench -p lb --bench convergence` (CYCLES=50 by default).

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::{Backend, Consul, Http, Lb};
use switchyard_consul::QueryOptions;

const SERVICE: &str = "conv";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cycles: usize = std::env::var("CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let consul = Consul::start().await;
    let backend = Backend::start("conv").await;
    // An unrelated catch-all route keeps the table non-trivial; `/conv` falls through to it
    // while the conv instance is not registered.
    let other = Backend::start("other").await;
    consul
        .register_ttl("other", "other", other.port(), &["lb.route=/"])
        .await;
    consul.set_ttl("other", true).await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    let url = lb.url("/conv");

    let mut up = Vec::new();
    let mut down = Vec::new();
    let mut up_from_put = Vec::new();
    for i in 0..cycles {
        consul
            .register_ttl("conv-1", SERVICE, backend.port(), &["lb.route=/conv"])
            .await;
        // The route exists once the critical instance is known: wait for its 503.
        probe_status(&http, &url, StatusCode::SERVICE_UNAVAILABLE).await;

        let seen = consul_reports(&consul, true);
        let put = Instant::now();
        consul.set_ttl("conv-1", true).await;
        let lb_at = probe_until(&http, &url, |by_conv| by_conv).await;
        let consul_at = seen.await.expect("watch task");
        up.push(lb_at.saturating_duration_since(consul_at));
        up_from_put.push(lb_at - put);

        tokio::time::sleep(Duration::from_millis(150)).await;
        let seen = consul_reports(&consul, false);
        consul.deregister("conv-1").await;
        let lb_at = probe_until(&http, &url, |by_conv| !by_conv).await;
        let consul_at = seen.await.expect("watch task");
        down.push(lb_at.saturating_duration_since(consul_at));
        if (i + 1) % 10 == 0 {
            eprintln!("{} cycles", i + 1);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    println!("convergence over {cycles} changes each (Consul reports -> lb traffic follows):");
    println!("| change | median | p99 | max |");
    println!("|---|---|---|---|");
    for (what, v) in [
        ("passing -> receives traffic", &mut up),
        ("deregistered -> no new request", &mut down),
        (
            "TTL PUT -> receives traffic (incl. Consul)",
            &mut up_from_put,
        ),
    ] {
        v.sort();
        let p = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        println!(
            "| {what} | {:.1} ms | {:.1} ms | {:.1} ms |",
            ms(p(0.5)),
            ms(p(0.99)),
            ms(*v.last().unwrap())
        );
    }
    drop(lb);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sends GETs back to back until `done(answered by the conv instance)` holds, returning when
/// it first did. (Once `/conv` is gone its requests fall through to the `/` route.) Bounded.
async fn probe_until(http: &Http, url: &str, done: impl Fn(bool) -> bool) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(url).await {
            let by_conv = r.status == StatusCode::OK
                && r.headers.get("x-backend").is_some_and(|b| b == "conv");
            if done(by_conv) {
                return Instant::now();
            }
        }
        assert!(Instant::now() < deadline, "the lb never converged");
    }
}

async fn probe_status(http: &Http, url: &str, want: StatusCode) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http.get(url).await.is_ok_and(|r| r.status == want) {
        assert!(Instant::now() < deadline, "the lb never answered {want}");
    }
}

/// Starts a blocking query on the service's passing instances and resolves when Consul reports
/// them non-empty (`passing`) or empty.
fn consul_reports(consul: &Consul, passing: bool) -> tokio::task::JoinHandle<Instant> {
    let client = consul.client.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let task = tokio::spawn(async move {
        let q = QueryOptions::default();
        let mut index = client
            .health_service(SERVICE, true, &q)
            .await
            .expect("health")
            .meta
            .index;
        let _ = ready_tx.send(());
        loop {
            let q = QueryOptions {
                index,
                wait: Some(Duration::from_secs(10)),
                stale: false,
            };
            let r = client
                .health_service(SERVICE, true, &q)
                .await
                .expect("blocking health");
            if r.value.is_empty() != passing {
                return Instant::now();
            }
            index = r.meta.index.max(1);
        }
    });
    // The watch must be in place before the change is made.
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("watch started");
    task
}
