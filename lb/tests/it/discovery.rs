//! The table follows Consul: passing instances in, failing and deregistered ones out, the last
//! table kept while Consul is away, a resync when it comes back empty.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::balancing::wait_routed;
use crate::support::{
    catalog_delete, catalog_write, connections_to, eventually, spread, spread_ok, Backend,
    CatalogInstance, Consul, Http, Lb,
};
use testkit::cluster::ConsulCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_gets_traffic_once_passing() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    b.set_healthy(false);
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    consul.register("b", "web", b.port(), &["lb.route=/"]).await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    // Registered but critical: no traffic.
    let seen = spread_ok(&http, &lb.url("/"), 50).await;
    assert_eq!(seen.get("b"), None, "{seen:?}");
    b.set_healthy(true);
    eventually(
        "b to receive traffic once passing",
        Duration::from_secs(10),
        || async { spread(&http, &lb.url("/"), 20).await.contains_key("b") },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_and_deregistered_instances_get_nothing() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    consul.register("b", "web", b.port(), &["lb.route=/"]).await;
    let lb = Lb::start(&consul, &[("LB_ROUTE_LINGER", "3s")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 2).await;

    b.set_healthy(false);
    wait_routed(&lb, &http, "*/", 1).await;
    let served = b.served();
    spread_ok(&http, &lb.url("/"), 50).await;
    assert_eq!(b.served(), served, "a critical instance got requests");

    consul.deregister("a").await;
    // The route still exists (b is registered) but nothing passes: 503, said by the lb.
    eventually(
        "503 once no instance passes",
        Duration::from_secs(10),
        || async {
            http.get(&lb.url("/"))
                .await
                .is_ok_and(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        },
    )
    .await;
    let r = http.get(&lb.url("/")).await.unwrap();
    assert!(r.body.contains("no healthy backend"), "{}", r.body);
    assert_eq!(r.headers["x-switchyard-error"], "no_backend");
    assert_eq!(r.headers["retry-after"], "5");

    // The last instance deregistered: the route lingers as a 503 (a deploy or an outage is
    // "try again", not "no such thing"), then goes after LB_ROUTE_LINGER.
    consul.deregister("b").await;
    let lingering = || async {
        lb.metric(&http, "lb_routes_lingering", &[])
            .await
            .unwrap_or(0.0)
    };
    eventually(
        "the route to linger once its last instance left",
        Duration::from_secs(10),
        || async { lingering().await == 1.0 },
    )
    .await;
    let r = http.get(&lb.url("/")).await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.headers["retry-after"], "5");
    assert_eq!(r.headers["x-switchyard-error"], "no_backend");
    eventually(
        "404 once the route is gone",
        Duration::from_secs(10),
        || async {
            http.get(&lb.url("/"))
                .await
                .is_ok_and(|r| r.status == StatusCode::NOT_FOUND)
        },
    )
    .await;
    assert_eq!(lingering().await, 0.0);
    let r = http.get(&lb.url("/nothing")).await.unwrap();
    assert!(r.body.contains("no route for host"), "{}", r.body);
    assert!(
        lb.metric(&http, "lb_local_responses_total", &[("reason", "no_route")])
            .await
            .unwrap()
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_down_keeps_the_last_table_and_a_fresh_consul_resyncs() {
    let mut consul = Consul::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    assert_eq!(
        lb.metric(&http, "lb_table_age_seconds", &[]).await,
        Some(0.0)
    );

    consul.stop();
    eventually(
        "the lb to notice Consul is down",
        Duration::from_secs(10),
        || async { lb.metric(&http, "lb_consul_up", &[]).await == Some(0.0) },
    )
    .await;
    let seen = spread_ok(&http, &lb.url("/"), 100).await;
    assert_eq!(
        seen.get("a"),
        Some(&100),
        "traffic must go on with the last table"
    );
    eventually("table age to grow", Duration::from_secs(5), || async {
        lb.metric(&http, "lb_table_age_seconds", &[])
            .await
            .is_some_and(|age| age > 0.5)
    })
    .await;
    let ready = http.get(&lb.admin_url("/readyz")).await.unwrap();
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "an lb with a last-known table stays ready"
    );
    assert!(
        lb.metric(&http, "lb_consul_watch_errors_total", &[])
            .await
            .unwrap()
            >= 1.0
    );

    // A fresh Consul knows nothing of `a`; only `b` is registered there.
    consul.start_again().await;
    consul.register("b", "web", b.port(), &["lb.route=/"]).await;
    eventually(
        "the lb to resync to the fresh Consul",
        Duration::from_secs(15),
        || async {
            let seen = spread(&http, &lb.url("/"), 10).await;
            seen.get("b") == Some(&10)
        },
    )
    .await;
    // Each watch recovers on its own backoff schedule.
    eventually("every watch to recover", Duration::from_secs(5), || async {
        lb.metric(&http, "lb_consul_up", &[]).await == Some(1.0)
            && lb.metric(&http, "lb_table_age_seconds", &[]).await == Some(0.0)
    })
    .await;
}

/// Consul restarted with no state (a dev agent, a server rescheduled without its volume)
/// answers with its index gone backwards: what it forgot is held, still routed, until its
/// service is registered again or `LB_STATE_LOSS_GRACE` passes, so a paced load through the
/// restart and the re-registration 5 s later loses no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_restarted_empty_loses_no_request() {
    let mut consul = Consul::start().await;
    let (a, b, c) = futures_join3().await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    consul.register("b", "web", b.port(), &["lb.route=/"]).await;
    consul
        .register("c", "api", c.port(), &["lb.route=/api"])
        .await;
    let lb = Lb::start(
        &consul,
        &[
            ("LB_STATE_LOSS_GRACE", "9s"),
            ("LB_ROUTE_LINGER", "0s"),
            ("LB_CONSUL_BACKOFF_MAX", "500ms"),
        ],
    )
    .await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 2).await;
    wait_routed(&lb, &http, "*/api", 1).await;

    // A paced load on `/` from before the restart until after the re-registration.
    let load = PacedLoad::start(lb.url("/"));
    tokio::time::sleep(Duration::from_millis(500)).await;

    consul.stop();
    consul.start_again().await;
    let restarted = std::time::Instant::now();
    let held = |watch: &'static str| {
        let (lb, http) = (&lb, &http);
        async move {
            lb.metric(http, "lb_consul_held", &[("watch", watch)])
                .await
                .unwrap_or(0.0)
        }
    };
    eventually(
        "the lb to hold what the empty Consul forgot",
        Duration::from_secs(5),
        || async { held("health").await == 3.0 && held("catalog").await == 2.0 },
    )
    .await;
    let routes = http.get(&lb.admin_url("/routes")).await.unwrap().body;
    assert_eq!(routes.matches("\"held\": true").count(), 3, "{routes}");
    assert_eq!(
        http.get(&lb.url("/api/x")).await.unwrap().status,
        StatusCode::OK,
        "a held instance is still routed"
    );

    // The registrar's part, 5 s after the restart: `web` again, `api` never.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(restarted.elapsed())).await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    consul.register("b", "web", b.port(), &["lb.route=/"]).await;
    eventually(
        "web's hold to end once it is registered again",
        Duration::from_secs(5),
        || async { held("health").await == 1.0 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (sent, failed) = load.finish().await;
    println!("{sent} requests through a Consul restart, {failed} failed");
    assert!(sent > 100, "{sent}");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");

    // `api` is never registered again: its route goes when the grace is over (`/api/x` then
    // belongs to `/`).
    eventually(
        "api to go after the grace",
        Duration::from_secs(15),
        || async {
            let routes = http.get(&lb.admin_url("/routes")).await.unwrap().body;
            !routes.contains("\"*/api\"")
        },
    )
    .await;
    let r = http.get(&lb.url("/api/x")).await.unwrap();
    assert_ne!(r.headers["x-backend"], "c");
    assert!(restarted.elapsed() >= Duration::from_secs(8));
    // Each watch's grace runs from its own first look at the empty Consul.
    eventually("every hold to end", Duration::from_secs(5), || async {
        held("health").await + held("catalog").await == 0.0
    })
    .await;
}

/// One instance Consul describes in a form the lb cannot read (a port past 65535) is left
/// out with a warning and a metric; the rest of its service still follows Consul.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_odd_instance_does_not_freeze_its_service() {
    let consul = Consul::start().await;
    let (a, b, _c) = futures_join3().await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;

    let odd = r#"{"ID": "odd", "Name": "web", "Address": "127.0.0.1", "Port": 70000,
                  "Tags": ["lb.route=/"]}"#;
    let put = http::Request::put(format!("{}/v1/agent/service/register", consul.addr()))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            odd.as_bytes(),
        )))
        .unwrap();
    let r = http.send(put).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // A change after it: the service must still follow Consul.
    consul.register("b", "web", b.port(), &["lb.route=/"]).await;
    wait_routed(&lb, &http, "*/", 2).await;
    let skipped = lb
        .metric(
            &http,
            "lb_consul_watch_errors_total",
            &[("watch", "health"), ("kind", "bad_entry")],
        )
        .await
        .unwrap_or(0.0);
    assert!(skipped >= 1.0, "{skipped}");
    assert!(lb.log().contains("left out instances"), "{}", lb.log());
}

/// Consul paused (SIGSTOP: its socket still accepts, nothing answers) for three blocking
/// waits: the lb notices within a wait and its margin, serves its table meanwhile without a
/// failed request, and follows Consul again once it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_consul_is_noticed_and_costs_no_request() {
    let consul = Consul::start().await;
    let (a, b, _c) = futures_join3().await;
    // A TTL check, not an HTTP one: an HTTP check in flight when Consul is stopped times out
    // when it resumes, and Consul then rightly reports the only instance critical, which
    // the lb follows (a run saw 46 of 412 requests fail so).
    consul
        .register_ttl("a", "web", a.port(), &["lb.route=/"])
        .await;
    consul.set_ttl("a", true).await;
    let lb = Lb::start(&consul, &[("LB_CONSUL_WAIT", "2s")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let pid = consul.pid().expect("Consul runs").to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };

    let load = PacedLoad::start(lb.url("/"));

    signal("-STOP");
    let paused = std::time::Instant::now();
    // Every read is bounded by wait + wait/16 + 7 s (as Consul's own client): 9.1 s here.
    eventually(
        "the lb to notice the paused Consul",
        Duration::from_secs(15),
        || async { lb.metric(&http, "lb_consul_up", &[]).await == Some(0.0) },
    )
    .await;
    let noticed = paused.elapsed();
    println!("a paused Consul noticed after {noticed:?}");
    assert!(noticed < Duration::from_secs(12), "{noticed:?}");
    // Three waits in all.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(paused.elapsed())).await;
    signal("-CONT");
    consul.register("b", "web", b.port(), &["lb.route=/"]).await;
    wait_routed(&lb, &http, "*/", 2).await;
    eventually(
        "the lb to see Consul up again",
        Duration::from_secs(15),
        || async { lb.metric(&http, "lb_consul_up", &[]).await == Some(1.0) },
    )
    .await;
    let (sent, failed) = load.finish().await;
    println!("{sent} requests through a paused Consul, {failed} failed");
    assert!(sent > 100, "{sent}");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
}

/// A real cluster of three servers and a client agent, as on a node: the leader is killed
/// (SIGKILL) under load. The lb reads with `?stale` through the client agent, so any server
/// answers: through the election its table stays as it was (the same generation, the same
/// backends) and no request fails; under the new leader it follows Consul again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_consul_leader_under_load_changes_nothing_and_fails_no_request() {
    let mut cluster = ConsulCluster::start().await;
    let agent = &cluster.agent;
    let (a, b, c) = futures_join3().await;
    agent.register("a", "web", a.port(), &["lb.route=/"]).await;
    agent.register("b", "web", b.port(), &["lb.route=/"]).await;
    let lb = Lb::start(agent, &[("LB_CONSUL_WAIT", "2s")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 2).await;
    // Settled: the generation stays put while nothing changes.
    // The table's generation and each route's backends with their state (not the counters).
    let table = || async {
        let v = lb.routes(&http).await;
        let mut backends: Vec<String> = v["routes"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["backends"].as_array().unwrap().iter())
            .map(|b| {
                format!(
                    "{} {} {} {}",
                    b["instance"], b["addr"], b["state"], b["held"]
                )
            })
            .collect();
        backends.sort();
        (v["generation"].as_u64().unwrap(), backends)
    };
    let mut before = table().await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = table().await;
        if now == before {
            break;
        }
        before = now;
    }
    let load = PacedLoad::start(lb.url("/"));

    let old = cluster.kill_leader().await;
    let killed = std::time::Instant::now();
    // Through the election and three blocking waits after it, the table does not move.
    let mut elected = None;
    while killed.elapsed() < Duration::from_secs(30) {
        assert_eq!(table().await, before, "the table moved during the election");
        if elected.is_none() && cluster.leader().await.is_some_and(|l| l != old) {
            elected = Some(killed.elapsed());
        }
        if elected.is_some_and(|e| killed.elapsed() > e + Duration::from_secs(6)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elected = elected.expect("a new leader within 30 s");
    println!("a new Consul leader after {elected:?}");

    cluster
        .agent
        .register("c", "web", c.port(), &["lb.route=/"])
        .await;
    wait_routed(&lb, &http, "*/", 3).await;
    let (sent, failed) = load.finish().await;
    println!("{sent} requests through a Consul leader election, {failed} failed");
    assert!(sent > 100, "{sent}");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
}

/// With `LB_SNAPSHOT_FILE`, an lb started while Consul does not answer serves what it last
/// learned at once, marked as from the snapshot, and takes Consul's answer the moment it
/// comes; a file that is not a snapshot is refused, by name, and the lb starts empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_serves_a_cold_start_without_consul() {
    let mut consul = Consul::start().await;
    let (a, b, _c) = futures_join3().await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    let dir = std::env::temp_dir().join(format!("lb-snapshot-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snap = dir.join("lb.snapshot");
    let snap_s = snap.to_str().unwrap().to_string();
    let settings = [("LB_SNAPSHOT_FILE", snap_s.as_str())];
    let http = Http::new();
    {
        let lb = Lb::start(&consul, &settings).await;
        wait_routed(&lb, &http, "*/", 1).await;
        // Stopped at once after it routes `a`: what the writer's pace has not written yet is
        // written when the lb stops.
        let mut lb = lb;
        lb.signal(libc::SIGTERM);
        assert!(lb.wait_exit(Duration::from_secs(15)).await.is_some());
        let written = std::fs::read_to_string(&snap).unwrap();
        assert!(
            written.contains("\"ID\":\"a\"") && !written.contains("critical"),
            "{written}"
        );
    }

    // Consul gone; the lb restarted.
    consul.stop();
    let started = std::time::Instant::now();
    let lb = Lb::spawn(&consul, &settings);
    eventually(
        "a proxied answer from the snapshot",
        Duration::from_secs(10),
        || async {
            http.get(&lb.url("/"))
                .await
                .is_ok_and(|r| r.status == StatusCode::OK && r.body == "a")
        },
    )
    .await;
    println!(
        "first proxied request {:?} after the lb's start",
        started.elapsed()
    );
    let routes = http.get(&lb.admin_url("/routes")).await.unwrap().body;
    assert!(routes.contains("\"from_snapshot\": true"), "{routes}");
    assert_eq!(
        lb.metric(&http, "lb_table_from_snapshot", &[]).await,
        Some(1.0)
    );
    let ready = http.get(&lb.admin_url("/readyz")).await.unwrap();
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "an lb serving a snapshot is ready"
    );

    // Consul back (a dev agent: empty) with `b` only: its answer replaces the snapshot.
    consul.start_again().await;
    consul.register("b", "web", b.port(), &["lb.route=/"]).await;
    eventually(
        "Consul's answer to replace the snapshot",
        Duration::from_secs(15),
        || async { spread(&http, &lb.url("/"), 10).await.get("b") == Some(&10) },
    )
    .await;
    assert_eq!(
        lb.metric(&http, "lb_table_from_snapshot", &[]).await,
        Some(0.0)
    );
    drop(lb);

    // Not a snapshot: refused with a line naming the file; no table until Consul answers.
    std::fs::write(&snap, b"not a snapshot").unwrap();
    consul.stop();
    let lb = Lb::spawn(&consul, &settings);
    eventually(
        "the refusal in the log",
        Duration::from_secs(10),
        || async {
            let log = lb.log();
            log.contains("refusing the snapshot") && log.contains("lb.snapshot")
        },
    )
    .await;
    let ready = http.get(&lb.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        lb.metric(&http, "lb_snapshot_errors_total", &[("op", "load")])
            .await,
        Some(1.0)
    );
    drop(lb);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `GET` requests one after another, 20 ms apart (at most 3,000), counting those that were
/// not a 200, until `finish`.
struct PacedLoad {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl PacedLoad {
    fn start(url: String) -> PacedLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let task = {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            tokio::spawn(async move {
                let http = Http::new();
                while !stop.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < 3000 {
                    sent.fetch_add(1, Ordering::Relaxed);
                    if !http
                        .get(&url)
                        .await
                        .is_ok_and(|r| r.status == StatusCode::OK)
                    {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        PacedLoad {
            stop,
            sent,
            failed,
            task,
        }
    }

    /// Stops the load; (sent, failed).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

async fn futures_join3() -> (Backend, Backend, Backend) {
    tokio::join!(
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_route_tags_are_ignored_with_a_warning_and_a_metric() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    let tags = [
        "lb.route=/ok",
        "lb.weight=lots",
        "lb.route=bad host/x",
        "lb.colour=red",
        "unrelated",
    ];
    consul.register("a", "web", a.port(), &tags).await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/ok", 1).await;
    assert_eq!(
        http.get(&lb.url("/ok")).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        http.get(&lb.url("/x")).await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    for reason in ["bad_weight", "bad_route", "unknown_key"] {
        let n = lb
            .metric(&http, "lb_route_tag_errors_total", &[("reason", reason)])
            .await;
        assert_eq!(n, Some(1.0), "{reason}");
    }
    let log = lb.log();
    assert!(
        log.contains("ignoring malformed routing tag") && log.contains("lb.weight=lots"),
        "{log}"
    );
}

/// Steady load while instances come and go: every request must succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_no_request() {
    let consul = Consul::start().await;
    let backends: Vec<Backend> = futures_join(["a", "b", "c", "d"]).await;
    for b in &backends[..2] {
        consul
            .register(&b.name, "web", b.port(), &["lb.route=/"])
            .await;
    }
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 2).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, http, url) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            http.clone(),
            lb.url("/"),
        );
        load.push(tokio::spawn(async move {
            // Bounded in count and time as well as by the stop flag.
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            for _ in 0..1_000_000 {
                if stop.load(Ordering::Relaxed) || std::time::Instant::now() > deadline {
                    break;
                }
                match http.get(&url).await {
                    Ok(r) if r.status == StatusCode::OK => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let reloads_before = lb
        .metric(&http, "lb_table_reloads_total", &[])
        .await
        .unwrap();
    for round in 0..6 {
        for b in &backends[2..] {
            consul
                .register(&b.name, "web", b.port(), &["lb.route=/"])
                .await;
        }
        wait_routed(&lb, &http, "*/", 4).await;
        for b in &backends[2..] {
            consul.deregister(&b.name).await;
        }
        wait_routed(&lb, &http, "*/", 2).await;
        backends[round % 2].set_healthy(false);
        wait_routed(&lb, &http, "*/", 1).await;
        backends[round % 2].set_healthy(true);
        wait_routed(&lb, &http, "*/", 2).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let reloads = lb
        .metric(&http, "lb_table_reloads_total", &[])
        .await
        .unwrap()
        - reloads_before;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("reloads under load: {reloads} reloads, {ok} requests ok, {failed} failed");
    assert!(reloads >= 24.0, "only {reloads} reloads happened");
    assert!(ok > 500, "too little load: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during reloads",
        ok + failed
    );
}

async fn futures_join<const N: usize>(names: [&str; N]) -> Vec<Backend> {
    let mut out = Vec::new();
    for n in names {
        out.push(Backend::start(n).await);
    }
    out
}

/// 5,000 routed services of 4 instances each, on an agent with Consul's default limits (200
/// connections per client address, which one blocking query per service overran past about
/// 190 services): the first 16 services get a blocking query each, the rest are followed
/// through a handful of connections, and each kind of change is followed: an instance's
/// check, a new instance, one deregistered, and an instance without checks that joins a
/// service or changes its port (which only the catalog's index shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_services_through_a_handful_of_connections() {
    const SERVICES: usize = 5_000;
    const PER: usize = 4;
    let consul = Consul::start().await;
    let instance = |s: usize, i: usize| CatalogInstance {
        node: format!("ext-{}", (s * PER + i) % 50),
        id: format!("s{s}-{i}"),
        service: format!("s{s}"),
        tags: vec![format!("lb.route=s{s}.test/")],
        port: 1 + i as u16,
        check: Some("passing"),
    };
    let all: Vec<_> = (0..SERVICES)
        .flat_map(|s| (0..PER).map(move |i| (s, i)))
        .map(|(s, i)| instance(s, i))
        .collect();
    catalog_write(&consul, &all).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    const BLOCKING: usize = 16;
    let lb = Lb::start(&consul, &[("LB_CONSUL_SERVICE_WATCHES", "16")]).await;
    let http = Http::new();
    eventually("every service routed", Duration::from_secs(120), || async {
        lb.metric(&http, "lb_table_routes", &[])
            .await
            .is_some_and(|n| n >= SERVICES as f64)
    })
    .await;
    // A handful besides the blocking queries, once connections opened in a burst and left
    // idle have closed.
    let few = || async {
        eventually(
            "a handful of connections to Consul",
            Duration::from_secs(10),
            || async { connections_to(lb.pid(), consul.http_port) <= BLOCKING + 12 },
        )
        .await;
        connections_to(lb.pid(), consul.http_port)
    };
    eprintln!(
        "{SERVICES} services routed; the lb holds {} connections to Consul",
        few().await
    );
    let gone = |s: usize| -> Vec<CatalogInstance> { (0..PER).map(|i| instance(s, i)).collect() };
    // An instance of service `s` on a node of its own.
    let real = |s: usize, id: &str, port: u16, check: Option<&'static str>| CatalogInstance {
        node: "real".into(),
        id: id.into(),
        port,
        check,
        ..instance(s, 0)
    };
    let ok = StatusCode::OK;
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;

    // s0 has a blocking query of its own (the first in name order): its checks fail.
    let mut failing: Vec<_> = (0..PER).map(|i| instance(0, i)).collect();
    for f in &mut failing {
        f.check = Some("critical");
    }
    catalog_write(&consul, &failing).await;
    host_answers(&lb, &http, "s0.test", unavailable, None).await;

    // s42: its instances replaced by a real one with a passing check, then that check fails.
    catalog_write(&consul, &[real(42, "s42-a", a.port(), Some("passing"))]).await;
    catalog_delete(&consul, &gone(42)).await;
    host_answers(&lb, &http, "s42.test", ok, Some("a")).await;
    catalog_write(&consul, &[real(42, "s42-a", a.port(), Some("critical"))]).await;
    host_answers(&lb, &http, "s42.test", unavailable, None).await;

    // s77: an instance without checks joins a service whose instances all have checks: only
    // the catalog moves, and a sweep finds it.
    catalog_write(&consul, &[real(77, "s77-b", b.port(), None)]).await;
    host_answers(&lb, &http, "s77.test", ok, Some("b")).await;
    let sweeps = lb
        .metric(
            &http,
            "lb_consul_sweeps_total",
            &[("reason", "unexplained")],
        )
        .await
        .unwrap_or(0.0);
    assert!(sweeps >= 1.0, "the new instance was found by a sweep");
    catalog_delete(&consul, &gone(77)).await;
    // It changes its port: the lb knows s77 has an instance without checks, and reads it on
    // the catalog's change.
    catalog_write(&consul, &[real(77, "s77-b", a.port(), None)]).await;
    host_answers(&lb, &http, "s77.test", ok, Some("a")).await;
    let reads = lb
        .metric(&http, "lb_consul_service_reads_total", &[])
        .await
        .unwrap_or(0.0);
    let held = few().await;
    eprintln!("after the changes: {held} connections, {reads} service reads, {sweeps} sweeps");
}

/// Waits until a GET for `host` through the lb answers `status`, from `backend` when given.
async fn host_answers(lb: &Lb, http: &Http, host: &str, status: StatusCode, backend: Option<&str>) {
    let what = format!("{host} to answer {status} from {backend:?}");
    eventually(&what, Duration::from_secs(20), || async {
        http.get_host(&lb.url("/"), host).await.is_ok_and(|r| {
            r.status == status
                && backend.is_none_or(|b| r.headers.get("x-backend").is_some_and(|v| v == b))
        })
    })
    .await;
}

/// The registrar stamps when Docker reported a change; the lb measures from that stamp to the
/// table that shows it, per phase, and counts a stamp ahead of its clock as skew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_is_measured_per_phase_from_the_docker_time_stamps() {
    use switchyard_consul::{stamp, CheckRegistration, CheckStatus, ServiceRegistration};
    let now = switchyard_daemon::clock::unix_us;
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let count = |phase: &'static str| {
        let (lb, http) = (&lb, &http);
        async move {
            lb.metric(http, "lb_propagation_seconds_count", &[("phase", phase)])
                .await
                .unwrap_or(0.0)
        }
    };
    // Waits until `phase` has one observation, no longer than the time since `stamp`.
    let measured = |phase: &'static str, stamp: u64| {
        let (lb, http) = (&lb, &http);
        async move {
            eventually(
                &format!("{phase} measured"),
                Duration::from_secs(10),
                || async {
                    lb.metric(http, "lb_propagation_seconds_count", &[("phase", phase)])
                        .await
                        == Some(1.0)
                },
            )
            .await;
            let bound = (now() - stamp) as f64 / 1e6;
            let took = (lb.metric(http, "lb_propagation_seconds_sum", &[("phase", phase)]))
                .await
                .unwrap();
            assert!(
                (0.0..=bound).contains(&took),
                "{phase}: 0 <= {took} <= {bound}"
            );
        }
    };
    // a was there before the lb's first table: nothing measured.
    assert_eq!(count("registered").await, 0.0);

    // As the registrar registers a container with a HEALTHCHECK: started now, starting.
    let started = now();
    let reg = |id: &str, port: u16, started: u64| ServiceRegistration {
        id: id.into(),
        name: "web".into(),
        tags: vec!["lb.route=/".into()],
        address: "127.0.0.1".into(),
        port,
        meta: [(stamp::META_STARTED_AT.to_string(), started.to_string())].into(),
        checks: vec![CheckRegistration {
            check_id: Some(format!("{id}-ttl")),
            ttl: Some("10m".into()),
            status: Some(CheckStatus::Critical),
            ..Default::default()
        }],
    };
    consul
        .client
        .register_service(&reg("b", b.port(), started))
        .await
        .unwrap();
    measured("registered", started).await;
    assert_eq!(count("healthy").await, 0.0, "b is not passing yet");

    // Docker reports it healthy: the TTL output carries when.
    let healthy = now();
    let output = stamp::note("Docker health: healthy", healthy);
    consul
        .client
        .update_ttl("b-ttl", CheckStatus::Passing, &output)
        .await
        .unwrap();
    wait_routed(&lb, &http, "*/", 2).await;
    measured("healthy", healthy).await;

    // Told to stop: the maintenance reason carries when.
    let stopped = now();
    let reason = stamp::note("switchyard: kill", stopped);
    consul
        .client
        .enable_maintenance("b", &reason)
        .await
        .unwrap();
    wait_routed(&lb, &http, "*/", 1).await;
    measured("stopped", stopped).await;
    consul.deregister("b").await;

    // A registrar whose clock runs a minute ahead: reported as skew, not as a delay.
    consul
        .client
        .register_service(&reg("c", b.port(), now() + 60_000_000))
        .await
        .unwrap();
    eventually("the skew counted", Duration::from_secs(10), || async {
        lb.metric(
            &http,
            "lb_propagation_clock_skew_total",
            &[("phase", "registered")],
        )
        .await
            == Some(1.0)
    })
    .await;
    assert_eq!(count("registered").await, 1.0);
    let skew = lb
        .metric(&http, "lb_propagation_clock_skew_seconds", &[])
        .await
        .unwrap();
    assert!(skew > 50.0 && skew <= 60.0, "{skew}");
}
