//! Convergence delay: how long after Consul reports a change the lb's traffic follows it.
//!
//! For each cycle an instance with a new ID is registered (critical), its TTL check set to
//! passing, and later deregistered. A blocking query of our own records the moment Consul reports each change; a
//! probe loop through the lb records the moment its answers change (200 once the instance is
//! passing; not 200 once it is deregistered). The difference is the lb's delay.
//!
//! With `SIBLING=1` a second instance of the service, never passing, stays registered, so
//! that each change is an instance's within a service that stays (scaling, a deploy)
//! rather than the whole service coming and going (which waits for the catalog's answer).
//!
//! With `SERVICES=n`, n more routed services of 4 instances each (with passing checks, on
//! external catalog nodes) are in Consul first: the lb must follow one service's changes among
//! them. The run then also reports the lb's connections to Consul and the CPU time Consul
//! spent per change (over an idle stretch of the same length, which is subtracted).
//! With `MAINTENANCE=1` the instance is put in maintenance and deregistered once the catalog
//! shows it, as the registrar does when a container stops.
//! `IT_LB_BIN` runs another lb build (the previous release, say) in place of this one.
//!
//! `cargo bench -p lb --bench convergence` (CYCLES=50 by default).

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::{catalog_write, connections_to, Backend, CatalogInstance, Consul, Http, Lb};
use switchyard_consul::QueryOptions;

const SERVICE: &str = "conv";
/// Between the steps of a cycle: a cycle makes up to 4 changes to the service (register,
/// passing, maintenance, deregister), which must stay under the lb's per-watch read rate
/// (`LB_CONSUL_RATE`, 10/s) so that this measures convergence, not the pacing.
const PAUSE: Duration = Duration::from_millis(250);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cycles: usize = std::env::var("CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let services: usize = std::env::var("SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let consul = Consul::start().await;
    if services > 0 {
        let all: Vec<_> = (0..services * 4)
            .map(|n| CatalogInstance {
                node: format!("ext-{}", n % 50),
                id: format!("bg{}-{}", n / 4, n % 4),
                service: format!("bg{}", n / 4),
                tags: vec![format!("lb.route=bg{}.test/", n / 4)],
                port: 1 + (n % 4) as u16,
                check: Some("passing"),
            })
            .collect();
        let t = Instant::now();
        catalog_write(&consul, &all).await;
        eprintln!(
            "{} instances of {services} services registered in {:.1?}",
            all.len(),
            t.elapsed()
        );
    }
    let backend = Backend::start("conv").await;
    // An unrelated catch-all route keeps the table non-trivial; `/conv` falls through to it
    // while the conv instance is not registered.
    let other = Backend::start("other").await;
    consul
        .register_ttl("other", "other", other.port(), &["lb.route=/"])
        .await;
    consul.set_ttl("other", true).await;
    let started = Instant::now();
    if std::env::var("SIBLING").is_ok_and(|v| v == "1") {
        consul
            .register_ttl("conv-0", SERVICE, 1, &["lb.route=/conv"])
            .await;
    }
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    let url = lb.url("/conv");
    if services > 0 {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let routes = lb
                .metric(&http, "lb_table_routes", &[])
                .await
                .unwrap_or(0.0);
            if routes >= services as f64 + 1.0 {
                eprintln!(
                    "lb routes {routes} {:.1?} after its start",
                    started.elapsed()
                );
                break;
            }
            if Instant::now() > deadline {
                println!("the lb did not route all {services} services within 120 s (it routes {routes})");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let consul_pid = consul.pid().expect("consul runs") as i32;
    // Consul's CPU with the lb connected and nothing changing, over a stretch as long as the
    // cycles take, is what the changes did not cost.
    let idle_for = Duration::from_millis(300 * cycles as u64 + 2000);
    let idle = cpu_over(consul_pid, idle_for).await;
    let cycles_began = (cpu_ticks(consul_pid), Instant::now());

    let maintenance = std::env::var("MAINTENANCE").is_ok_and(|v| v == "1");
    let mut up = Vec::new();
    let mut down = Vec::new();
    let mut up_from_put = Vec::new();
    for i in 0..cycles {
        // A new ID each time, as each container (a deploy's, a scaled-up one's) has.
        // (`conv-0` is the sibling's.)
        let id = format!("conv-c{i}");
        consul
            .register_ttl(&id, SERVICE, backend.port(), &["lb.route=/conv"])
            .await;
        // The route exists once the critical instance is known: wait for its 503.
        probe_status(&http, &url, StatusCode::SERVICE_UNAVAILABLE).await;

        let seen = consul_reports(&consul, true);
        let put = Instant::now();
        consul.set_ttl(&id, true).await;
        let lb_at = probe_until(&http, &url, |by_conv| by_conv).await;
        let consul_at = seen.await.expect("watch task");
        up.push(lb_at.saturating_duration_since(consul_at));
        up_from_put.push(lb_at - put);

        tokio::time::sleep(PAUSE).await;
        let seen = consul_reports(&consul, false);
        if maintenance {
            // As the registrar stops an instance: maintenance, then the deregistration once
            // the catalog shows it (else the agent may merge the two writes into one).
            consul
                .client
                .enable_maintenance(&id, "stopping")
                .await
                .expect("maintenance");
            let check = format!("_service_maintenance:{id}");
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                let q = QueryOptions::default();
                let r = consul
                    .client
                    .health_checks(SERVICE, &q)
                    .await
                    .expect("checks");
                if r.value.iter().any(|c| c.check_id == check) {
                    break;
                }
            }
        }
        consul.deregister(&id).await;
        let lb_at = probe_until(&http, &url, |by_conv| !by_conv).await;
        let consul_at = seen.await.expect("watch task");
        down.push(lb_at.saturating_duration_since(consul_at));
        if (i + 1) % 10 == 0 {
            eprintln!("{} cycles", i + 1);
        }
        tokio::time::sleep(PAUSE).await;
    }
    let (ticks, elapsed) = (
        cpu_ticks(consul_pid) - cycles_began.0,
        cycles_began.1.elapsed(),
    );
    let idle_share = idle.0 as f64 * elapsed.as_secs_f64() / idle.1.as_secs_f64();
    let per_change_ms = (ticks as f64 - idle_share) * 10.0 / (3 * cycles) as f64;
    println!(
        "{services} more routed services; the lb holds {} connections to Consul; Consul CPU per change: {per_change_ms:.2} ms ({ticks} ticks over {elapsed:.1?}, {:.0} idle)",
        connections_to(lb.pid(), consul.http_port),
        idle_share
    );
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
    linger(&consul, &lb, &http, &backend).await;
    drop(lb);
}

/// A route whose every instance is deregistered (Consul's index moving forward) lingers as a
/// `503` with `Retry-After`: how soon after the deregistration the first `503` comes, and
/// what those answers cost beside the same lb's proxied `200`s, sequential requests each.
async fn linger(consul: &Consul, lb: &Lb, http: &Http, backend: &Backend) {
    const N: usize = 2000;
    let url = lb.url("/gone");
    consul
        .register_ttl("gone-1", "gone", backend.port(), &["lb.route=/gone"])
        .await;
    consul.set_ttl("gone-1", true).await;
    probe_status(http, &url, StatusCode::OK).await;
    let url = url.as_str();
    let timed = |want: StatusCode| async move {
        let mut v = Vec::with_capacity(N);
        for _ in 0..N {
            let t = Instant::now();
            let r = http.get(url).await.expect("an answer");
            v.push(t.elapsed());
            assert_eq!(r.status, want);
        }
        v.sort();
        v
    };
    let ok = timed(StatusCode::OK).await;
    let gone = Instant::now();
    consul.deregister("gone-1").await;
    probe_status(http, url, StatusCode::SERVICE_UNAVAILABLE).await;
    let first = gone.elapsed();
    let unavailable = timed(StatusCode::SERVICE_UNAVAILABLE).await;
    println!("every instance of a route deregistered: the first 503 {:.1} ms after the deregistration was sent", ms(first));
    println!("| {N} sequential answers | median | p99 |");
    println!("|---|---|---|");
    for (what, v) in [("proxied 200", &ok), ("lingering 503", &unavailable)] {
        let p = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        println!("| {what} | {:.3} ms | {:.3} ms |", ms(p(0.5)), ms(p(0.99)));
    }
}

/// utime + stime of `pid`, in clock ticks (1/100 s).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// Ticks `pid` spends over `d`, and `d`.
async fn cpu_over(pid: i32, d: Duration) -> (u64, Duration) {
    let (before, t) = (cpu_ticks(pid), Instant::now());
    tokio::time::sleep(d).await;
    (cpu_ticks(pid) - before, t.elapsed())
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
                ..QueryOptions::default()
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
