//! The registrar's integration tests: the real Docker Engine, a real Consul agent, the real
//! registrar binary.

mod support;

use std::time::{Duration, Instant};

use support::{eventually, instances, scope, Consul, Container, Registrar};
use switchyard_consul::{stamp, QueryOptions, ServiceRegistration};

const WEB: &[(&str, &str)] = &[
    ("switchyard.enable", "true"),
    ("switchyard.service", "web"),
    ("switchyard.route", "/"),
    ("switchyard.check.path", "/health"),
    ("switchyard.check.interval", "1s"),
];

async fn wait_passing(consul: &Consul, service: &str, n: usize) {
    // Generous: on a loaded machine (the suite's tests run side by side) a swarm task's
    // 1 s Docker health probe can keep it "starting" for most of 20 s.
    eventually(
        &format!("{n} passing instances of {service}"),
        Duration::from_secs(40),
        || async {
            let i = instances(consul, service).await;
            i.len() == n && i.iter().all(|(_, _, s)| s == "passing")
        },
    )
    .await;
}

/// Asks web-sample in `c` to fail its health (`POST /fault?health=fail`).
async fn fail_health(c: &Container) -> testkit::Reply {
    let url = format!("http://{}:8000/fault?health=fail", c.ip());
    let req = http::Request::post(&url).body(Default::default()).unwrap();
    support::Http::new().send(req).await.unwrap()
}

async fn wait_count(consul: &Consul, service: &str, n: usize) {
    eventually(
        &format!("{n} instances of {service}"),
        Duration::from_secs(20),
        || async { instances(consul, service).await.len() == n },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labelled_container_is_registered_with_its_address_and_a_passing_check() {
    let consul = Consul::start().await;
    let s = scope("basic");
    let _reg = Registrar::start(&consul, &s, &[]).await;
    let c = Container::run(&s, "a", WEB, &[], &["--no-healthcheck"]);
    wait_passing(&consul, "web", 1).await;
    let entry = &consul
        .client
        .health_service("web", true, &QueryOptions::default())
        .await
        .unwrap()
        .value[0];
    assert_eq!(entry.address(), c.ip());
    assert_eq!(entry.service.port, 8000);
    assert!(
        entry.service.tags.contains(&"lb.route=/".to_string()),
        "{:?}",
        entry.service.tags
    );
    assert_eq!(entry.service.meta["switchyard-container"], c.id);
    // Without `WEB_FAULTS=on` nobody can make it fail through its public route.
    let r = fail_health(&c).await;
    assert_eq!(r.status, 403, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_stop_deregisters_before_the_container_exits() {
    let consul = Consul::start().await;
    let s = scope("stop");
    let _reg = Registrar::start(&consul, &s, &[]).await;
    // web-sample keeps serving 3 s after SIGTERM: the window in which it must already be gone.
    let c = Container::run(
        &s,
        "a",
        WEB,
        &[("WEB_DRAIN_DELAY", "3")],
        &["--no-healthcheck"],
    );
    wait_passing(&consul, "web", 1).await;
    let stop = c.stop_async();
    wait_count(&consul, "web", 0).await;
    assert!(c.running(), "deregistered only after the container exited");
    stop.join().unwrap();
}

/// A stopping container is first put in maintenance, then deregistered: Consul's list of
/// critical checks names it on the way out, which is what an lb that follows many services
/// through that list (not a query each) needs to stop routing to it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_container_shows_in_the_critical_checks_before_it_is_deregistered() {
    let consul = Consul::start().await;
    let s = scope("maint");
    let _reg = Registrar::start(&consul, &s, &[]).await;
    let c = Container::run(&s, "a", WEB, &[], &["--no-healthcheck"]);
    wait_passing(&consul, "web", 1).await;
    let client = consul.client.clone();
    let critical = move |index: u64| {
        let client = client.clone();
        async move {
            let q = QueryOptions {
                index,
                wait: Some(Duration::from_secs(10)),
                ..QueryOptions::default()
            };
            client.health_state("critical", &q).await.unwrap()
        }
    };
    let mut index = critical(0).await.meta.index;
    // Follows the list as an lb does, from before the stop until the instance is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let watch = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(answer) = tokio::time::timeout_at(deadline, critical(index)).await {
            index = answer.meta.index;
            seen.extend(
                answer
                    .value
                    .into_iter()
                    .map(|c| (c.service_name, c.check_id)),
            );
            // The instance's own TCP check may fail first, when it runs as the container
            // dies: that is not the maintenance, so the watch goes on.
            if seen.iter().any(|(service, check)| {
                service == "web" && check.starts_with("_service_maintenance:")
            }) {
                break;
            }
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.kill();
    wait_count(&consul, "web", 0).await;
    let seen = watch.await.unwrap();
    assert!(
        seen.iter()
            .any(|(service, check)| service == "web" && check.starts_with("_service_maintenance:")),
        "the stopping container never showed in the critical checks; they showed {seen:?}"
    );
}

/// An instance removed from Consul behind the registrar's back cannot be put in maintenance
/// when its container stops: the failure is counted and logged, the registrar stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_maintenance_is_counted_and_the_registrar_lives_on() {
    let consul = Consul::start().await;
    let s = scope("maintfail");
    // No resync during the test: it would register the instance again.
    let reg = Registrar::start(
        &consul,
        &s,
        &[("REGISTRAR_RESYNC", "1h"), ("REGISTRAR_TTL", "2h")],
    )
    .await;
    let c = Container::run(&s, "a", WEB, &[], &["--no-healthcheck"]);
    wait_passing(&consul, "web", 1).await;
    let services = consul.client.agent_services().await.unwrap();
    let id = services
        .values()
        .find(|s| s.service == "web")
        .unwrap()
        .id
        .clone();
    consul.deregister(&id).await;
    assert_eq!(
        reg.metric("registrar_failures_total", Some(("op", "maintenance")))
            .await,
        0.0
    );
    c.kill();
    eventually(
        "the failed maintenance to be counted",
        Duration::from_secs(20),
        || async {
            reg.metric("registrar_failures_total", Some(("op", "maintenance")))
                .await
                >= 1.0
        },
    )
    .await;
    assert!(
        reg.log()
            .contains("maintenance before deregistration failed"),
        "{}",
        reg.log()
    );
    let ready = support::Http::new()
        .get(&format!("http://{}/readyz", reg.admin))
        .await
        .unwrap();
    assert_eq!(ready.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_kill_deregisters() {
    let consul = Consul::start().await;
    let s = scope("kill");
    let _reg = Registrar::start(&consul, &s, &[]).await;
    let c = Container::run(&s, "a", WEB, &[], &["--no-healthcheck"]);
    wait_passing(&consul, "web", 1).await;
    c.kill();
    wait_count(&consul, "web", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlabelled_and_badly_labelled_containers_are_skipped_and_the_rest_registered() {
    let consul = Consul::start().await;
    let s = scope("labels");
    let reg = Registrar::start(&consul, &s, &[]).await;
    let _plain = Container::run(
        &s,
        "plain",
        &[("switchyard.service", "plain")],
        &[],
        &["--no-healthcheck"],
    );
    let bad_labels = [
        ("switchyard.enable", "true"),
        ("switchyard.service", "bad"),
        ("switchyard.port", "http"),
    ];
    let bad = Container::run(&s, "bad", &bad_labels, &[], &["--no-healthcheck"]);
    let bad_lb = [
        ("switchyard.enable", "true"),
        ("switchyard.service", "bad-lb"),
        ("switchyard.lb.strip", "maybe"),
    ];
    let _bad_lb = Container::run(&s, "bad-lb", &bad_lb, &[], &["--no-healthcheck"]);
    // An lb setting becomes one tag, whole, commas and all.
    let cache = (
        "switchyard.lb.response.set.cache-control",
        "private, max-age=0",
    );
    let good_labels = [WEB, &[cache]].concat();
    let _good = Container::run(&s, "good", &good_labels, &[], &["--no-healthcheck"]);
    wait_passing(&consul, "web", 1).await;
    let entries = consul
        .client
        .health_service("web", false, &Default::default())
        .await
        .unwrap()
        .value;
    let tags = &entries[0].service.tags;
    assert!(
        tags.iter()
            .any(|t| t == "lb.response.set.cache-control=private, max-age=0"),
        "{tags:?}"
    );
    eventually(
        "the bad label to be counted",
        Duration::from_secs(10),
        || async {
            reg.metric("registrar_label_errors_total", Some(("kind", "bad_port")))
                .await
                == 1.0
        },
    )
    .await;
    eventually(
        "the bad lb setting to be counted",
        Duration::from_secs(10),
        || async {
            reg.metric(
                "registrar_label_errors_total",
                Some(("kind", "bad_lb_setting")),
            )
            .await
                == 1.0
        },
    )
    .await;
    assert!(instances(&consul, "bad").await.is_empty());
    assert!(instances(&consul, "bad-lb").await.is_empty());
    assert!(instances(&consul, "plain").await.is_empty());
    let log = reg.log();
    assert!(
        log.contains("unusable label")
            && log.contains("switchyard.port")
            && log.contains(&bad.name),
        "{log}"
    );
    // Still working after the bad input.
    let _second = Container::run(&s, "good2", WEB, &[], &["--no-healthcheck"]);
    wait_passing(&consul, "web", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_downtime_consul_matches_docker_exactly() {
    let consul = Consul::start().await;
    let s = scope("downtime");
    let mut reg = Registrar::start(&consul, &s, &[]).await;
    let c1 = Container::run(&s, "c1", WEB, &[], &["--no-healthcheck"]);
    let c2 = Container::run(&s, "c2", WEB, &[], &["--no-healthcheck"]);
    wait_passing(&consul, "web", 2).await;

    reg.crash();
    c1.remove();
    let c3 = Container::run(&s, "c3", WEB, &[], &["--no-healthcheck"]);
    // An entry of ours whose container never existed (a lost event, a crashed host).
    let mut meta = std::collections::HashMap::new();
    meta.insert("switchyard-node".to_string(), reg.node.clone());
    meta.insert(
        "switchyard-container".to_string(),
        "0000deadbeef".to_string(),
    );
    let orphan = ServiceRegistration {
        id: "web-orphan".into(),
        name: "web".into(),
        address: "10.9.9.9".into(),
        port: 1,
        meta,
        ..Default::default()
    };
    consul.client.register_service(&orphan).await.unwrap();
    // Someone else's entry must survive.
    let foreign = ServiceRegistration {
        id: "web-foreign".into(),
        name: "web".into(),
        address: "10.9.9.8".into(),
        port: 1,
        ..Default::default()
    };
    consul.client.register_service(&foreign).await.unwrap();

    reg.restart().await;
    let want = {
        let mut v = vec![c2.ip(), c3.ip(), "10.9.9.8".to_string()];
        v.sort();
        v
    };
    eventually(
        "Consul to match Docker",
        Duration::from_secs(20),
        || async {
            let mut have: Vec<String> = instances(&consul, "web")
                .await
                .into_iter()
                .map(|(a, _, _)| a)
                .collect();
            have.sort();
            have == want
        },
    )
    .await;
    assert!(
        reg.metric("registrar_drift_repaired_total", Some(("kind", "stale")))
            .await
            >= 1.0
    );
    drop(c2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consul_restarted_empty_is_repopulated_within_one_resync() {
    let mut consul = Consul::start().await;
    let s = scope("consul-restart");
    let reg = Registrar::start(&consul, &s, &[]).await;
    let _c = Container::run(&s, "a", WEB, &[], &["--no-healthcheck"]);
    wait_passing(&consul, "web", 1).await;
    consul.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    consul.start_again().await;
    let back = Instant::now();
    wait_passing(&consul, "web", 1).await;
    // REGISTRAR_RESYNC is 2 s in the tests; add the check interval and some slack.
    assert!(
        back.elapsed() < Duration::from_secs(10),
        "took {:?}",
        back.elapsed()
    );
    assert!(
        reg.metric("registrar_drift_repaired_total", Some(("kind", "missing")))
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_health_is_mirrored_into_a_ttl_check() {
    let consul = Consul::start().await;
    let s = scope("health");
    let _reg = Registrar::start(&consul, &s, &[]).await;
    let labels = [("switchyard.enable", "true"), ("switchyard.service", "web")];
    let before = switchyard_daemon::clock::unix_us();
    let c = Container::run(&s, "a", &labels, &[("WEB_FAULTS", "on")], &[]);
    // The image's HEALTHCHECK probes every second: starting (critical), then healthy (passing).
    wait_passing(&consul, "web", 1).await;
    let after = switchyard_daemon::clock::unix_us();
    let entry = consul
        .client
        .health_service("web", false, &QueryOptions::default())
        .await
        .unwrap()
        .value
        .remove(0);
    let check = &entry.checks;
    assert!(
        check.iter().any(|c| c.check_id.ends_with(":check")),
        "{check:?}"
    );
    // When Docker reported the start and the health travel with the instance, for the lb to
    // measure how long they took to reach its table (Docker's clock is this machine's).
    let started = entry.service.meta[stamp::META_STARTED_AT]
        .parse::<u64>()
        .unwrap();
    let healthy = check
        .iter()
        .find_map(|c| c.output_at)
        .expect("a stamped TTL output");
    assert!(
        before <= started && started <= healthy && healthy <= after,
        "{before} <= started {started} <= healthy {healthy} <= {after}"
    );
    // Make the container report unhealthy: Docker says so, and Consul follows.
    let r = fail_health(&c).await;
    assert_eq!(r.status, 200);
    eventually(
        "the TTL check to turn critical",
        Duration::from_secs(20),
        || async {
            instances(&consul, "web")
                .await
                .iter()
                .any(|(_, _, s)| s == "critical")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_tasks_are_registered_by_service_and_removed_before_they_exit_on_scale_down() {
    let consul = Consul::start().await;
    let s = scope("swarm");
    let namespace = format!("sy{}", std::process::id());
    let _reg = Registrar::start(&consul, &s, &[]).await;
    // No check path: the image's Docker HEALTHCHECK is mirrored into a TTL check.
    let svc = support::SwarmService::create(
        &s,
        &namespace,
        "web",
        &[("switchyard.enable", "true"), ("switchyard.route", "/")],
        &[("WEB_DRAIN_DELAY", "4")],
    );
    wait_passing(&consul, "web", 1).await;
    let entry = &consul
        .client
        .health_service("web", true, &QueryOptions::default())
        .await
        .unwrap()
        .value[0];
    let tasks = svc.tasks();
    assert_eq!(
        entry.address(),
        tasks[0].1,
        "registered on the stack's overlay network"
    );
    assert!(entry.service.meta["swarm-task"].starts_with(&format!("{namespace}_web.1.")));

    svc.scale(2);
    wait_passing(&consul, "web", 2).await;
    svc.scale(1);
    wait_count(&consul, "web", 1).await;
    // Swarm sends SIGTERM and the task serves its 4 s drain: it must be out of Consul already.
    let still_running = svc.tasks().len();
    assert_eq!(
        still_running, 2,
        "the stopping task should still be running while deregistered"
    );
}

/// Consul with ACLs in default-deny and HTTPS that verifies clients. A token that may only
/// read gets every write refused: the registrar counts and logs it, stays up and ready, and
/// does not call Consul down. With the minimal policy (write on the services it registers,
/// read on nodes), a CA and a client certificate, it registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_acls_and_tls_a_read_only_token_is_reported_and_the_minimal_one_registers() {
    let ca = testkit::pki::Ca::new("registrar-acl");
    let (consul, https) = Consul::start_secured(&ca).await;
    let (_, reader) = consul
        .acl_token("registrar-read", r#"service_prefix "" { policy = "read" }"#)
        .await;
    let minimal = r#"
service "web" { policy = "write" }
node_prefix "" { policy = "read" }
"#;
    let (_, writer) = consul.acl_token("registrar", minimal).await;
    let cert = ca.leaf("registrar-client", &["registrar"]);
    let (ca_pem, crt, key) = (
        ca.ca_pem().display().to_string(),
        cert.crt.display().to_string(),
        cert.key.display().to_string(),
    );
    let secure = |token: &str| {
        let token_file = ca.dir.join(format!("token-{}", &token[..8]));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        [
            ("REGISTRAR_CONSUL_ADDR", https.clone()),
            ("REGISTRAR_CONSUL_CACERT", ca_pem.clone()),
            ("REGISTRAR_CONSUL_CLIENT_CERT", crt.clone()),
            ("REGISTRAR_CONSUL_CLIENT_KEY", key.clone()),
            (
                "REGISTRAR_CONSUL_TOKEN_FILE",
                token_file.display().to_string(),
            ),
        ]
    };
    let s = scope("acl");
    let _c = Container::run(&s, "a", WEB, &[], &["--no-healthcheck"]);

    let read_only = secure(&reader);
    let pairs: Vec<(&str, &str)> = read_only.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut reg = Registrar::start(&consul, &s, &pairs).await;
    eventually(
        "the refused registration to be counted",
        Duration::from_secs(20),
        || async {
            reg.metric("registrar_failures_total", Some(("op", "register")))
                .await
                >= 1.0
        },
    )
    .await;
    assert_eq!(reg.metric("registrar_consul_up", None).await, 1.0);
    assert!(reg.log().contains("register refused"), "{}", reg.log());
    assert!(instances(&consul, "web").await.is_empty());
    reg.crash();

    let minimal = secure(&writer);
    let pairs: Vec<(&str, &str)> = minimal.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut reg = Registrar::start(&consul, &s, &pairs).await;
    wait_passing(&consul, "web", 1).await;
    // It compares the agent with the catalog through the ACLs, and finds them alike: long
    // enough for a difference to have been acted on (5 s, then a comparison 2 s apart).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let unsynced = Some(("kind", "unsynced"));
    let repaired = "registrar_drift_repaired_total";
    assert_eq!(reg.metric(repaired, unsynced).await, 0.0);
    assert!(!reg.log().contains("not compared"), "{}", reg.log());
    reg.crash();

    // Without node:read, Consul filters the node's own checks out of the catalog's answer
    // rather than refuse: the registrar says once that it cannot compare, and registers
    // nothing again.
    let (_, blind) = consul
        .acl_token("registrar-no-node", r#"service "web" { policy = "write" }"#)
        .await;
    let blind = secure(&blind);
    let pairs: Vec<(&str, &str)> = blind.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let reg = Registrar::start(&consul, &s, &pairs).await;
    eventually(
        "the registrar to say it cannot compare",
        Duration::from_secs(20),
        || async { reg.log().contains("not compared") },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(reg.metric(repaired, unsynced).await, 0.0);
    assert_eq!(
        reg.log().matches("not compared").count(),
        1,
        "{}",
        reg.log()
    );
    assert_eq!(instances(&consul, "web").await.len(), 1);
}

/// A real cluster of three servers and a client agent, as on a node. The leader and one more
/// server are killed (SIGKILL): without a quorum there is no leader until one comes back.
/// Meanwhile one container starts and another is killed. The registrar writes to its node's
/// agent, which takes the writes without a leader and syncs them once there is one again:
/// afterwards Consul, read from a server, matches Docker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_consul_leader_registrations_and_deregistrations_land_once_one_is_elected() {
    let mut cluster = testkit::cluster::ConsulCluster::start().await;
    let s = scope("election");
    let _reg = Registrar::start(&cluster.agent, &s, &[]).await;
    let a = Container::run(&s, "a", WEB, &[], &["--no-healthcheck"]);
    wait_passing(&cluster.agent, "web", 1).await;

    let leader = cluster.kill_leader().await;
    let follower = (0..3).find(|&i| i != leader).unwrap();
    cluster.servers[follower].stop();
    let survivor = (0..3).find(|&i| i != leader && i != follower).unwrap();
    eventually(
        "the surviving server to know it has no leader",
        Duration::from_secs(20),
        || async {
            cluster.servers[survivor]
                .client
                .leader()
                .await
                .is_ok_and(|l| l.is_empty())
        },
    )
    .await;
    let b = Container::run(&s, "b", WEB, &[], &["--no-healthcheck"]);
    a.kill();
    // The agent holds what Docker runs, with no leader to write it to.
    let (a_ip, b_ip) = (a.ip(), b.ip());
    eventually(
        "the agent to hold b and not a",
        Duration::from_secs(20),
        || async {
            let Ok(services) = cluster.agent.client.agent_services().await else {
                return false;
            };
            let web: Vec<&str> = services
                .values()
                .filter(|s| s.service == "web")
                .map(|s| s.address.as_str())
                .collect();
            web == [b_ip.as_str()]
                || (web.contains(&b_ip.as_str()) && !web.contains(&a_ip.as_str()))
        },
    )
    .await;
    assert_eq!(
        cluster.servers[survivor]
            .client
            .leader()
            .await
            .ok()
            .as_deref(),
        Some(""),
        "still no leader when the agent holds the changes"
    );

    let back = Instant::now();
    cluster.servers[follower].start_again().await;
    println!(
        "a leader again {:?} after a server came back",
        back.elapsed()
    );
    let want = vec![(b_ip.clone(), 8000, "passing".to_string())];
    eventually(
        "Consul to match Docker once there is a leader",
        Duration::from_secs(30),
        || async { instances(&cluster.servers[survivor], "web").await == want },
    )
    .await;
}

/// The catalog loses an instance its agent still holds, as when the servers restore an older
/// snapshot, or as when the agent's sync of it failed (no leader, a refusal by the servers'
/// ACLs) and nothing retried it. The agent would send it again only at its next full sync, a
/// minute or two later, and the lbs read the catalog; the registrar, comparing the two on its
/// resync, registers it again, which makes the agent send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_the_catalog_lost_behind_its_agent_is_registered_again() {
    let consul = Consul::start().await;
    let s = scope("unsynced");
    let reg = Registrar::start(&consul, &s, &[]).await;
    let a = Container::run(&s, "a", WEB, &[], &["--no-healthcheck"]);
    let b = Container::run(&s, "b", WEB, &[], &["--no-healthcheck"]);
    wait_passing(&consul, "web", 2).await;
    let checks = consul
        .client
        .agent_checks(&QueryOptions::default())
        .await
        .expect("agent checks");
    let services = consul
        .client
        .agent_services()
        .await
        .expect("agent services");
    let b_id = services
        .values()
        .find(|s| s.address == b.ip())
        .map(|s| s.id.clone())
        .expect("b on the agent");
    let node = checks
        .values()
        .find(|c| c.service_id == b_id)
        .map(|c| c.node.clone())
        .expect("b's check");

    consul.catalog_deregister(&node, &b_id).await;
    assert_eq!(
        instances(&consul, "web").await.len(),
        1,
        "b out of the catalog"
    );
    let lost = Instant::now();
    let want = {
        let mut w = vec![
            (a.ip(), 8000, "passing".to_string()),
            (b.ip(), 8000, "passing".to_string()),
        ];
        w.sort();
        w
    };
    // The agent's own full sync comes a minute or more after its start.
    eventually(
        "the catalog to hold b again",
        Duration::from_secs(15),
        || async {
            let mut have = instances(&consul, "web").await;
            have.sort();
            have == want
        },
    )
    .await;
    println!(
        "b back in the catalog {:?} after it was lost",
        lost.elapsed()
    );
    // With its check (an instance synced without one would read as passing whatever its
    // health), and marked as registered again.
    let entries = consul
        .client
        .health_service("web", false, &QueryOptions::default())
        .await
        .expect("health read")
        .value;
    let entry = entries
        .iter()
        .find(|e| e.service.id == b_id)
        .expect("b in the catalog");
    assert!(
        entry
            .checks
            .iter()
            .any(|c| c.check_id == format!("{b_id}:check")),
        "{:?}",
        entry.checks
    );
    assert!(entry
        .service
        .meta
        .contains_key("switchyard-registered-again"));
    // Once: nothing is registered again while the two agree.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        reg.metric("registrar_drift_repaired_total", Some(("kind", "unsynced")))
            .await,
        1.0
    );
    assert!(reg.log().contains("registering it again"), "{}", reg.log());
}

/// Real HAProxy with the repo's allow-list (`docker-proxy/haproxy.cfg`) in front of the
/// engine's socket, killed when dropped.
struct DockerProxy {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl DockerProxy {
    fn start() -> DockerProxy {
        let root = testkit::workspace_root();
        let dir = root
            .join("target")
            .join("it-logs")
            .join(format!("docker-proxy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("docker.sock");
        let _ = std::fs::remove_file(&socket);
        let engine = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(str::to_string))
            .unwrap_or_else(|| "/var/run/docker.sock".into());
        let haproxy = ["/usr/sbin/haproxy", "haproxy"]
            .into_iter()
            .find(|p| std::process::Command::new(p).arg("-v").output().is_ok())
            .expect("haproxy: run scripts/install-deps");
        let child = std::process::Command::new(haproxy)
            .arg("-db")
            .arg("-f")
            .arg(root.join("docker-proxy/haproxy.cfg"))
            .env("PROXY_SOCKET", &socket)
            .env("DOCKER_SOCKET", engine)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start haproxy");
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(socket.exists(), "haproxy did not bind {socket:?}");
        DockerProxy { child, socket }
    }

    /// The status the proxy answers `method path` with.
    fn status(&self, method: &str, path: &str) -> String {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
            .args(["-H", "content-type: application/json", "--unix-socket"])
            .arg(&self.socket)
            .arg(format!("http://docker{path}"))
            .args(if method == "POST" {
                &["-d", "{}"][..]
            } else {
                &[][..]
            })
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The registrar needs no Docker socket: through the allow-list proxy it registers and
/// deregisters as before, while a write through the same proxy (creating a container,
/// exec, reading images) gets 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_docker_allow_list_it_registers_and_writes_are_refused() {
    let proxy = DockerProxy::start();
    let consul = Consul::start().await;
    let s = scope("proxy");
    let host = format!("unix://{}", proxy.socket.display());
    let _reg = Registrar::start(&consul, &s, &[("DOCKER_HOST", host.as_str())]).await;
    let c = Container::run(&s, "a", WEB, &[], &["--no-healthcheck"]);
    wait_passing(&consul, "web", 1).await;
    c.kill();
    wait_count(&consul, "web", 0).await;
    for (method, path, want) in [
        ("GET", "/v1.41/containers/json", "200"),
        ("POST", "/v1.41/containers/create", "403"),
        ("POST", &format!("/v1.41/containers/{}/exec", c.id), "403"),
        ("GET", "/v1.41/images/json", "403"),
        ("DELETE", &format!("/v1.41/containers/{}", c.id), "403"),
    ] {
        assert_eq!(proxy.status(method, path), want, "{method} {path}");
    }
}

/// `/containers`: what the registrar decided for each container of its node, and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_says_what_was_decided_for_each_container_and_why() {
    let consul = Consul::start().await;
    let s = scope("journal");
    // No resync during the test: one that ran between the kill and its event would
    // deregister the instance first, "by the reconcile".
    let settings = [("REGISTRAR_RESYNC", "1h"), ("REGISTRAR_TTL", "2h")];
    let reg = Registrar::start(&consul, &s, &settings).await;
    let good = Container::run(&s, "good", WEB, &[], &["--no-healthcheck"]);
    let bad_port = [
        ("switchyard.enable", "true"),
        ("switchyard.service", "bad"),
        ("switchyard.port", "http"),
    ];
    let _bad = Container::run(&s, "bad", &bad_port, &[], &["--no-healthcheck"]);
    let elsewhere = [
        ("switchyard.enable", "true"),
        ("switchyard.service", "elsewhere"),
        ("switchyard.network", "the-stack-network"),
    ];
    let _elsewhere = Container::run(&s, "elsewhere", &elsewhere, &[], &["--no-healthcheck"]);
    let plain = [("switchyard.service", "plain")];
    let _plain = Container::run(&s, "plain", &plain, &[], &["--no-healthcheck"]);
    wait_passing(&consul, "web", 1).await;
    let http = support::Http::new();
    let journal = || async {
        let url = format!("http://{}/containers", reg.admin);
        let body = http.get(&url).await.unwrap().body;
        let entries: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        entries
    };
    let entry = |entries: &[serde_json::Value], name: &str| {
        entries
            .iter()
            .find(|e| e["name"] == format!("sy-{s}-{name}"))
            .cloned()
            .unwrap_or_else(|| panic!("no entry for {name} in {entries:#?}"))
    };
    eventually("four decisions", Duration::from_secs(10), || async {
        journal().await.len() >= 4
    })
    .await;
    let entries = journal().await;
    let g = entry(&entries, "good");
    assert_eq!(g["decision"], "registered", "{g:#}");
    assert_eq!(g["service"], "web");
    assert_eq!(g["address"], format!("{}:8000", good.ip()));
    assert_eq!(
        g["check"],
        format!("HTTP GET http://{}:8000/health every 1s", good.ip())
    );
    assert_eq!(g["consul"], "register: ok");
    let b = entry(&entries, "bad");
    assert_eq!(b["decision"], "skipped");
    assert_eq!(
        b["reasons"][0],
        "label switchyard.port: \"http\" is not a port number"
    );
    let p = entry(&entries, "plain");
    assert_eq!(p["decision"], "skipped");
    assert_eq!(
        p["reasons"][0],
        "not opted in: label switchyard.enable=true is missing"
    );
    let e = entry(&entries, "elsewhere");
    assert_eq!(e["decision"], "skipped");
    let why = e["reasons"][0].as_str().unwrap();
    assert!(
        why.starts_with("label switchyard.network: not attached to network \"the-stack-network\""),
        "{why}"
    );

    // Told to stop: deregistered, on which event, and Consul's answer.
    good.kill();
    wait_count(&consul, "web", 0).await;
    eventually(
        "the deregistration in the journal",
        Duration::from_secs(10),
        || async { entry(&journal().await, "good")["decision"] == "deregistered" },
    )
    .await;
    let g = entry(&journal().await, "good");
    assert_eq!(g["reasons"][0], "on Docker's \"kill\" event", "{g:#}");
    assert_eq!(g["consul"], "deregister: ok");
}
