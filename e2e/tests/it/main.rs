//! The stack end to end on a real single-node swarm. `scripts/up` deploys it; a steady load of
//! GETs and POSTs runs through both lb replicas for the whole test while the web service is
//! scaled up and down and rolled, one lb container is killed, and Consul is stopped for a
//! minute. Every request is counted and none may fail. Then every Grafana panel's query must
//! return data from the stack's Prometheus. `scripts/down --volumes` removes it all.
//!
//! Run: `cargo test -p e2e --test it -- --ignored --nocapture` (scripts/test does).
//! `E2E_CONSUL_OUTAGE=<seconds>` shortens the Consul outage while iterating (default 60).

mod load;
mod nodes;
mod panels;
mod stack;
mod why;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use testkit::{eventually, workspace_root, Http};

use load::{Counts, Load};
use stack::{
    bucket_quantile, consul_call, consul_passing, container_started, containers, docker,
    gwbridge_ip, lb_addrs, lb_backends, lb_histogram, lb_metric, scale, service, sh, task_since,
    update_completed, Stack, PROMETHEUS,
};

/// Phase results, printed together at the end (and as they happen).
#[derive(Default)]
struct Report {
    lines: std::sync::Mutex<Vec<String>>,
}

impl Report {
    fn add(&self, line: String) {
        println!("e2e: {line}");
        self.lines.lock().unwrap().push(line);
    }
}

/// Runs one phase and reports the requests sent during it.
async fn phase<F: std::future::Future<Output = ()>>(
    report: &Report,
    load: &Load,
    name: &str,
    f: F,
) -> Counts {
    let before = load.stats.counts();
    let started = Instant::now();
    println!("e2e: -- {name}");
    f.await;
    let counts = load.stats.counts() - before;
    report.add(format!(
        "{name}: {counts} in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    counts
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "deploys the swarm stack; scripts/test runs it as its own step"]
async fn stack_end_to_end() {
    let _stack = Stack::up();
    let http = Http::new();
    let report = Report::default();

    // The registrar has no Docker socket; its node's proxy refuses anything but its reads.
    let mounts = docker(&[
        "service",
        "inspect",
        &service("registrar"),
        "-f",
        "{{json .Spec.TaskTemplate.ContainerSpec.Mounts}}",
    ]);
    assert!(!mounts.contains("docker.sock"), "{mounts}");
    let proxy = docker(&[
        "volume",
        "inspect",
        &service("docker-proxy"),
        "-f",
        "{{.Mountpoint}}",
    ]);
    let through_proxy = |method: &str, path: &str| {
        let socket = format!("{proxy}/docker.sock");
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
            .args(["--unix-socket", &socket, &format!("http://docker{path}")])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(through_proxy("GET", "/v1.41/containers/json"), "200");
    assert_eq!(through_proxy("POST", "/v1.41/containers/create"), "403");
    report.add(
        "registrar: no Docker socket mounted; through its node's proxy a container list \
         answers 200 and a container create 403"
            .into(),
    );

    // Consul denies by default: a registration without a token (anyone on the stack network
    // could try one, pointing a route at an address of theirs) is refused.
    let victim = r#"{"Name":"evil","Address":"192.0.2.1","Port":80,"Tags":["lb.route=/"]}"#;
    let (status, refusal) = consul_call(
        &http,
        http::Method::PUT,
        "/v1/agent/service/register",
        None,
        victim,
    )
    .await
    .expect("Consul's API answers on a server's gwbridge address");
    assert_eq!(status, 403, "{refusal}");
    let (status, body) = consul_call(&http, http::Method::GET, "/v1/catalog/services", None, "")
        .await
        .expect("Consul answers");
    assert_eq!(
        (status, body.as_str()),
        (200, "{}"),
        "anonymous reads see nothing"
    );
    let published = docker(&[
        "service",
        "inspect",
        &service("consul-server"),
        "-f",
        "{{json .Endpoint.Ports}}",
    ]);
    assert!(!published.contains("8500"), "{published}");
    report.add(format!(
        "consul: not published; anonymous register -> 403 ({}), anonymous catalog -> {{}}",
        refusal.trim()
    ));

    // "Why is this (not) routed", for each link that can break, from the host.
    why::scenarios(&report).await;

    // 8 workers x 25 requests/s: a steady 200 requests/s, half GET, half POST (2 KiB bodies).
    let load = Load::start(8, 25);
    let stats = load.stats.clone();
    eventually(
        "the client sees both lb replicas and three web tasks answer",
        Duration::from_secs(60),
        || async {
            load.lbs.read().unwrap().len() == 2
                && stats.answering(Duration::from_secs(2)).len() == 3
        },
    )
    .await;

    phase(&report, &load, "steady state (3 web tasks)", async {
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;

    // Scale up: every new task must receive traffic; measure from its start.
    phase(&report, &load, "scale web 3 -> 6", async {
        let known: BTreeSet<String> = stats.first_seen().into_keys().collect();
        let asked = Instant::now();
        scale("web", 6);
        eventually("six web tasks answer", Duration::from_secs(90), || async {
            stats.answering(Duration::from_secs(2)).len() == 6
        })
        .await;
        let all_answering = asked.elapsed();
        let new: Vec<(String, SystemTime)> = stats
            .first_seen()
            .into_iter()
            .filter(|(task, _)| !known.contains(task))
            .collect();
        assert_eq!(new.len(), 3, "three new tasks answered");
        let delays = |since: fn(&str) -> Option<SystemTime>| {
            let mut v: Vec<Duration> = new
                .iter()
                .map(|(task, seen)| {
                    let t = since(task).unwrap_or_else(|| panic!("no start time for {task}"));
                    seen.duration_since(t).unwrap_or_default()
                })
                .collect();
            v.sort();
            v
        };
        let list = |v: &[Duration]| v.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ");
        let (started, healthy) = (delays(container_started), delays(task_since));
        report.add(format!(
            "scale up: container start -> first proxied request: {} (HEALTHCHECK interval \
             2 s included); swarm marks it running (healthy) -> first proxied request: {}; \
             `docker service scale` -> all six answering: {}",
            list(&started),
            list(&healthy),
            ms(all_answering)
        ));
    })
    .await;

    phase(&report, &load, "scale web 6 -> 1", async {
        scale("web", 1);
        eventually(
            "one web task left, one instance in Consul, one answering",
            Duration::from_secs(90),
            || async {
                containers("web").len() == 1
                    && consul_passing(&http, "web").await == Some(1)
                    && stats.answering(Duration::from_secs(1)).len() == 1
            },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    })
    .await;

    phase(
        &report,
        &load,
        "rolling update (docker service update --force web, 1 replica, start-first)",
        async {
            let old = stats.answering(Duration::from_secs(1));
            docker(&[
                "service",
                "update",
                "--force",
                "--detach",
                &stack::service("web"),
            ]);
            eventually("the update completes", Duration::from_secs(120), || async {
                update_completed("web").await
            })
            .await;
            eventually(
                "only the new task answers",
                Duration::from_secs(60),
                || async {
                    let now = stats.answering(Duration::from_secs(1));
                    now.len() == 1 && now != old
                },
            )
            .await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        },
    )
    .await;

    phase(&report, &load, "scale web 1 -> 3", async {
        scale("web", 3);
        eventually(
            "three web tasks answer",
            Duration::from_secs(90),
            || async {
                consul_passing(&http, "web").await == Some(3)
                    && stats.answering(Duration::from_secs(1)).len() == 3
            },
        )
        .await;
    })
    .await;

    // How long each change took from Docker to both lbs' tables, as they measured it (before
    // an lb is killed and its histograms start again): the scaling and the rolling update.
    let lbs = lb_addrs().await;
    for what in ["registered", "healthy", "stopped"] {
        let (mut buckets, mut sum) = (Vec::new(), 0.0);
        for lb in &lbs {
            let label = ("phase", what);
            sum += lb_histogram(&http, *lb, "lb_propagation_seconds", label, &mut buckets)
                .await
                .unwrap_or(0.0);
        }
        let n = buckets.last().map_or(0.0, |b| b.1);
        let p = |q| bucket_quantile(&buckets, q).map_or("-".into(), |s| format!("<= {s} s"));
        let missed_series = format!("lb_propagation_missed_total{{phase=\"{what}\"}}");
        let mut missed = 0.0;
        for lb in &lbs {
            missed += lb_metric(&http, *lb, &missed_series).await.unwrap_or(0.0);
        }
        report.add(format!(
            "propagation {what} (Docker -> lb table, both lbs): {n} changes, mean {:.1} ms, \
             p50 {}, p99 {}; {missed} not measured (gone before the lb saw the change)",
            if n > 0.0 { sum / n * 1e3 } else { 0.0 },
            p(0.5),
            p(0.99)
        ));
        // A stop the lb did not see happen (deregistered before it read the maintenance) is
        // counted as missed instead.
        assert!(n + missed > 0.0, "no {what} change measured by the lbs");
        if what != "stopped" {
            assert!(n > 0.0, "no {what} change measured by the lbs");
        }
    }

    phase(&report, &load, "kill one lb container (SIGKILL)", async {
        let before = containers("lb");
        assert_eq!(before.len(), 2, "two lb replicas before the kill");
        let (victim, survivor) = (before[0].clone(), before[1].clone());
        let survivor = SocketAddr::new(gwbridge_ip(&survivor).expect("survivor address"), 8080);
        let killed = Instant::now();
        docker(&["kill", &victim]);
        let serving = Cell::new(None);
        let replacement = Cell::new(None);
        eventually(
            "swarm's replacement lb is healthy and serves",
            Duration::from_secs(90),
            || async {
                let Some(new) = containers("lb").into_iter().find(|c| !before.contains(c)) else {
                    return false;
                };
                let Some(ip) = gwbridge_ip(&new) else {
                    return false;
                };
                let addr = SocketAddr::new(ip, 8080);
                // Healthy as swarm sees it (what DNS and VIPs go by), and proxying.
                if !lb_addrs().await.contains(&addr) {
                    return false;
                }
                let ok = http
                    .get(&format!("http://{addr}/"))
                    .await
                    .is_ok_and(|r| r.status == 200);
                if ok {
                    serving.set(Some(killed.elapsed()));
                    replacement.set(Some(addr));
                }
                ok
            },
        )
        .await;
        let new = replacement.get().expect("a replacement");
        let full = Cell::new(None);
        eventually(
            "the replacement routes to the same backends as the survivor",
            Duration::from_secs(30),
            || async {
                let (a, b) = (
                    lb_backends(&http, new).await,
                    lb_backends(&http, survivor).await,
                );
                let same = a.is_some() && a == b && a.as_ref().is_some_and(|v| v.len() == 3);
                if same {
                    full.set(Some(killed.elapsed()));
                }
                same
            },
        )
        .await;
        report.add(format!(
            "lb kill: kill -> replacement healthy and proxying: {}; -> its table equals the \
             survivor's (3 backends): {}",
            ms(serving.get().unwrap()),
            ms(full.get().unwrap())
        ));
    })
    .await;

    let outage = std::env::var("E2E_CONSUL_OUTAGE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60u64);
    phase(
        &report,
        &load,
        &format!("Consul stopped for {outage} s"),
        async {
            scale("consul-server", 0);
            eventually("Consul is gone", Duration::from_secs(60), || async {
                containers("consul-server").is_empty()
            })
            .await;
            let noticing = lb_addrs().await;
            eventually(
                "both lbs notice Consul is down",
                Duration::from_secs(120),
                || async {
                    for lb in &noticing {
                        if lb_metric(&http, *lb, "lb_consul_up").await != Some(0.0) {
                            return false;
                        }
                    }
                    true
                },
            )
            .await;
            // An lb restarted while Consul is away serves the snapshot its replica slot's
            // volume holds: swarm's replacement gets the same slot, so the same volume.
            let before = containers("lb");
            let killed = Instant::now();
            docker(&["kill", &before[0]]);
            let cold = Cell::new(None);
            eventually(
                "the replacement lb serves its snapshot while Consul is down",
                Duration::from_secs(90),
                || async {
                    let Some(new) = containers("lb").into_iter().find(|c| !before.contains(c))
                    else {
                        return false;
                    };
                    let Some(ip) = gwbridge_ip(&new) else {
                        return false;
                    };
                    let addr = SocketAddr::new(ip, 8080);
                    let ok = http
                        .get(&format!("http://{addr}/"))
                        .await
                        .is_ok_and(|r| r.status == 200)
                        && lb_metric(&http, addr, "lb_table_from_snapshot").await == Some(1.0);
                    if ok {
                        cold.set(Some(killed.elapsed()));
                    }
                    ok
                },
            )
            .await;
            report.add(format!(
                "lb killed while Consul is down: kill -> its replacement proxying from its \
                 snapshot: {}",
                ms(cold.get().unwrap())
            ));
            eventually(
                "two healthy lb replicas",
                Duration::from_secs(60),
                || async { lb_addrs().await.len() == 2 },
            )
            .await;
            let lbs = lb_addrs().await;
            tokio::time::sleep(Duration::from_secs(outage)).await;
            why::cut_off(&report).await;
            let mut ages = Vec::new();
            for lb in &lbs {
                ages.push(
                    lb_metric(&http, *lb, "lb_table_age_seconds")
                        .await
                        .unwrap_or(-1.0),
                );
            }
            let back = Instant::now();
            scale("consul-server", 1);
            let recovered = Cell::new(None);
            eventually(
                "Consul is back, both lbs read it again and web has 3 passing instances",
                Duration::from_secs(120),
                || async {
                    for lb in &lbs {
                        if lb_metric(&http, *lb, "lb_consul_up").await != Some(1.0) {
                            return false;
                        }
                    }
                    let ok = consul_passing(&http, "web").await == Some(3);
                    if ok {
                        recovered.set(Some(back.elapsed()));
                    }
                    ok
                },
            )
            .await;
            report.add(format!(
                "Consul outage: lbs kept serving their last table (table age at the end of the \
                 outage: {} s); Consul restart -> both lbs synced again: {}",
                ages.iter()
                    .map(|a| format!("{a:.0}"))
                    .collect::<Vec<_>>()
                    .join(" s and "),
                ms(recovered.get().unwrap())
            ));
            tokio::time::sleep(Duration::from_secs(5)).await;
        },
    )
    .await;

    // Every Grafana panel must show data from the real stack.
    let queries = panels::queries(&workspace_root().join("grafana").join("dashboards"));
    let mut empty: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        empty.clear();
        for q in &queries {
            match panels::run(&http, PROMETHEUS, &q.expr).await {
                Ok(n) if n > 0 => {}
                Ok(_) => empty.push(format!(
                    "{} / {}: no data: {}",
                    q.dashboard, q.panel, q.expr
                )),
                Err(e) => empty.push(format!("{} / {}: {e}: {}", q.dashboard, q.panel, q.expr)),
            }
        }
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    report.add(format!(
        "grafana: {} panel queries run against Prometheus, {} without data",
        queries.len(),
        empty.len()
    ));

    // Canary, under the same load: a good version is tested pinned, then shifted 10 -> 50 ->
    // 100% with nothing failing; a bad one (half its answers 500, its tests skipped so that
    // users meet it) is rolled back at its first step, with at most that step's requests
    // failing. Then back to v1.
    let before = stats.counts();
    let (promoted, out) = canary(&["v2", "--dwell", "4"]).await;
    println!("{out}");
    assert!(promoted && out.contains("promoted v2"), "{out}");
    let good = stats.counts() - before;
    report.add(format!("canary v2 (good): promoted; {good}"));
    assert_eq!(good.failed, 0, "{}", stats.failures().join("\n"));
    let before = stats.counts();
    let bad_args = [
        "v3",
        "--env",
        "WEB_ERROR_RATE=0.5",
        "--tests",
        "true",
        "--dwell",
        "4",
    ];
    let (promoted, out) = canary(&bad_args).await;
    println!("{out}");
    assert!(!promoted && out.contains("rolled back"), "{out}");
    let bad = stats.counts() - before;
    // "10%: v3 answered N requests, ..."
    let first_step: u64 = out
        .lines()
        .find_map(|l| {
            l.split("10%: v3 answered ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no first step in {out}"));
    report.add(format!(
        "canary v3 (bad): rolled back at 10%; {bad}; v3 answered {first_step} in its step"
    ));
    assert!(
        bad.failed <= first_step,
        "{} failed, more than the first step's {first_step}",
        bad.failed
    );
    let canary_failed = bad.failed;
    canary_back_to_v1().await;

    let total = load.stop().await;
    report.add(format!("total: {total}"));
    println!(
        "e2e: ==== summary\n{}",
        report.lines.lock().unwrap().join("\n")
    );
    let failures = stats.failures();
    assert!(
        total.failed == canary_failed,
        "{} requests failed ({canary_failed} of them at the bad canary's first step); the first ones:\n{}",
        total.failed,
        failures.join("\n")
    );
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
}

/// Runs `scripts/canary` with `args`: whether it promoted, and what it said.
async fn canary(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("python3")
        .arg("scripts/canary")
        .args(args)
        .current_dir(workspace_root())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run scripts/canary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// After the canaries: v1 takes all traffic again, v2 goes (dark, so nobody notices), and
/// the weights are removed.
async fn canary_back_to_v1() {
    let consul = |args: &[&str]| {
        let mut all = vec!["scripts/consul-acl", "consul"];
        all.extend_from_slice(args);
        sh("bash", &all)
    };
    consul(&[
        "kv",
        "put",
        "switchyard/weights/web",
        r#"{"v1": 100, "v2": 0}"#,
    ]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    docker(&["service", "rm", &service("web-v2")]);
    eventually(
        "the v2 tasks to be gone",
        Duration::from_secs(60),
        || async { containers("web-v2").is_empty() },
    )
    .await;
    consul(&["kv", "delete", "switchyard/weights/web"]);
}
