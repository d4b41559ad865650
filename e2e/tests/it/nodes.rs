//! The stack on a real four-node swarm (`scripts/nodes`): three Consul servers, an agent per
//! node, ACLs in default-deny, both lbs published on their own edge nodes. A paced client
//! that knows both edge nodes sends GETs for the whole test while web is rolled, a node is
//! cut off for 30 s, and the node holding the Consul leader is killed; every request is
//! counted, none may fail or take a second.
//!
//! Run: `cargo test -p e2e --test it -- --ignored --nocapture nodes_end_to_end` (scripts/test
//! does). `E2E_REUSE=1` runs against nodes and a stack that are already up; `E2E_KEEP=1`
//! leaves them up.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{eventually, workspace_root, Http};

use crate::load::Load;
use crate::stack::{lb_backends, sh, try_sh, STACK};
use crate::{ms, phase, Report};

const NODE: &str = "switchyard-node-";

/// The nodes, up and deployed by `scripts/nodes up` and `scripts/nodes deploy`; torn down by
/// `scripts/nodes down` when dropped.
struct Nodes {
    keep: bool,
}

fn nodes_script(args: &[&str]) -> bool {
    Command::new("bash")
        .arg("scripts/nodes")
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Nodes {
    fn up() -> Nodes {
        let reuse = std::env::var("E2E_REUSE").is_ok_and(|v| v == "1");
        let keep = std::env::var("E2E_KEEP").is_ok_and(|v| v == "1");
        let nodes = Nodes { keep };
        if !reuse {
            // Images first: the nodes load them from this machine.
            assert!(
                Command::new("bash")
                    .arg("scripts/images")
                    .current_dir(workspace_root())
                    .stdin(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                "scripts/images failed"
            );
            assert!(nodes_script(&["up", "4"]), "scripts/nodes up failed");
            assert!(nodes_script(&["deploy"]), "scripts/nodes deploy failed");
        }
        nodes
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("e2e: E2E_KEEP=1, leaving the nodes up");
            return;
        }
        nodes_script(&["down"]);
    }
}

/// `docker …` run by node `i`'s engine.
fn in_node(i: usize, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["exec", &format!("{NODE}{i}")[..], "docker"]
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    all.extend(args.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    try_sh("docker", &refs)
}

/// Node number (1-based) of every running task of `service`, by task name.
fn tasks_on_nodes(from: usize, service: &str) -> Vec<(String, usize)> {
    in_node(
        from,
        &[
            "service",
            "ps",
            "-f",
            "desired-state=running",
            "--format",
            "{{.Name}}.{{.ID}} {{.Node}}",
            &format!("{STACK}_{service}"),
        ],
    )
    .unwrap_or_default()
    .lines()
    .filter_map(|l| {
        let (task, node) = l.split_once(' ')?;
        Some((task.to_string(), node.strip_prefix("node-")?.parse().ok()?))
    })
    .collect()
}

/// The stack-network addresses of `service`'s containers running on node `i`.
fn overlay_ips(i: usize, service: &str) -> BTreeSet<String> {
    let ids = in_node(
        i,
        &[
            "ps",
            "-q",
            "-f",
            &format!("label=com.docker.swarm.service.name={STACK}_{service}"),
        ],
    )
    .unwrap_or_default();
    ids.lines()
        .filter_map(|id| {
            in_node(
                i,
                &[
                    "inspect",
                    "-f",
                    &format!("{{{{(index .NetworkSettings.Networks \"{STACK}_switchyard\").IPAddress}}}}"),
                    id,
                ],
            )
            .ok()
        })
        .filter(|ip| !ip.is_empty())
        .collect()
}

/// The backend addresses (`ip:port`) the lb at `lb` routes to, from its admin `/routes`.
async fn routed(http: &Http, lb: SocketAddr) -> Option<BTreeSet<String>> {
    let backends = lb_backends(http, lb).await?;
    Some(
        backends
            .iter()
            .filter_map(|b| b.rsplit_once(' ').map(|(_, addr)| addr.to_string()))
            .collect(),
    )
}

fn ip_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(ip, _)| ip)
}

/// Web instances Consul lists per agent node (`agent-node-<i>` -> count), and in all.
fn consul_web_per_node() -> Option<(BTreeMap<String, usize>, usize)> {
    let out = consul(&["catalog", "nodes", "-service", "web"]).ok()?;
    let mut per = BTreeMap::new();
    let mut all = 0;
    for line in out.lines().skip(1) {
        if let Some(node) = line.split_whitespace().next() {
            *per.entry(node.to_string()).or_default() += 1;
            all += 1;
        }
    }
    Some((per, all))
}

/// Whether Consul lists exactly the web tasks Docker runs on each of `nodes`: as many
/// instances on each node's agent as the node runs web containers (a duplicate or an orphan
/// would add one, a missing registration take one away). `(consul, docker)` when not.
fn consul_matches_docker(nodes: &[usize]) -> Result<(), String> {
    let (per, _) = consul_web_per_node().ok_or("consul catalog nodes failed")?;
    let mut want = BTreeMap::new();
    for i in nodes {
        let n = overlay_ips(*i, "web").len();
        if n > 0 {
            want.insert(format!("agent-node-{i}"), n);
        }
    }
    let have: BTreeMap<String, usize> = per
        .into_iter()
        .filter(|(node, _)| nodes.iter().any(|i| *node == format!("agent-node-{i}")))
        .collect();
    if have == want {
        Ok(())
    } else {
        Err(format!("Consul {have:?}, Docker {want:?}"))
    }
}

/// `consul` CLI arguments run in a server task with the management token.
fn consul(args: &[&str]) -> Result<String, String> {
    let mut all = vec!["scripts/consul-acl", "consul"];
    all.extend(args);
    let out = Command::new("bash")
        .args(&all)
        .env("SWITCHYARD_NODES", "1")
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn percentiles(load: &Load) -> String {
    let (q, max) = load.stats.latency(&[0.5, 0.99, 0.999]);
    if q.is_empty() {
        return "no answers".into();
    }
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
        q[0].as_secs_f64() * 1e3,
        q[1].as_secs_f64() * 1e3,
        q[2].as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    )
}

/// The state of `service`'s last update (`completed`, `updating`, ...).
fn update_state(service: &str) -> String {
    in_node(
        1,
        &[
            "service",
            "inspect",
            "-f",
            "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
            &format!("{STACK}_{service}"),
        ],
    )
    .unwrap_or_default()
}

/// Runs a blocking call (the docker CLI) off the runtime's threads, which the load's
/// requests, and their latencies, need.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking call")
}

/// Consul servers that are voters now, and whether one of them leads.
fn voters() -> (usize, bool) {
    let peers = consul(&["operator", "raft", "list-peers"]).unwrap_or_default();
    let rows: Vec<Vec<&str>> = peers
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    (
        rows.iter().filter(|r| r.get(4) == Some(&"true")).count(),
        rows.iter().any(|r| r.get(3) == Some(&"leader")),
    )
}

/// The node (1-based) whose Consul server leads now.
fn leader_node() -> Option<usize> {
    let peers = consul(&["operator", "raft", "list-peers"]).ok()?;
    peers
        .lines()
        .find(|l| l.split_whitespace().nth(3) == Some("leader"))?
        .split_whitespace()
        .next()?
        .strip_prefix("server-node-")?
        .parse()
        .ok()
}

fn node_ip(i: usize) -> String {
    sh(
        "docker",
        &[
            "inspect",
            "-f",
            "{{(index .NetworkSettings.Networks \"switchyard-nodes\").IPAddress}}",
            &format!("{NODE}{i}"),
        ],
    )
}

/// Every lb's routed backends, once each answers.
async fn tables(http: &Http, lbs: &[SocketAddr]) -> Option<Vec<BTreeSet<String>>> {
    let mut out = Vec::new();
    for lb in lbs {
        out.push(routed(http, *lb).await?);
    }
    Some(out)
}

/// The stack-network addresses of every running web container, over `nodes`.
fn web_ips(nodes: &[usize]) -> BTreeSet<String> {
    nodes.iter().flat_map(|i| overlay_ips(*i, "web")).collect()
}

/// Waits until every lb routes exactly the web containers running on `nodes` (no orphan, no
/// duplicate, none missing); returns how long that took.
async fn tables_match_docker(
    http: &Http,
    lbs: &[SocketAddr],
    nodes: &[usize],
    what: &str,
) -> Duration {
    /// Prints the last state seen when the wait fails, to tell whether Docker or an lb lagged,
    /// and then each node's web tasks in Docker and in Consul's catalog, to tell whether an
    /// instance missing from the tables is missing from the catalog or only not passing.
    struct ShowOnPanic(std::sync::Mutex<String>, Vec<usize>);
    impl Drop for ShowOnPanic {
        fn drop(&mut self) {
            if let (true, Ok(last)) = (std::thread::panicking(), self.0.lock()) {
                eprintln!("last seen: {last}");
                for i in &self.1 {
                    eprintln!("node-{i}: Docker's web tasks {:?}", overlay_ips(*i, "web"));
                }
                eprintln!(
                    "web instances per agent, catalog against Docker: {:?}",
                    consul_matches_docker(&self.1)
                );
            }
        }
    }
    let last = ShowOnPanic(std::sync::Mutex::new("nothing yet".into()), nodes.to_vec());
    let started = Instant::now();
    eventually(what, Duration::from_secs(120), || async {
        let on = nodes.to_vec();
        let want = blocking(move || web_ips(&on)).await;
        let Some(tables) = tables(http, lbs).await else {
            *last.0.lock().unwrap() = format!("Docker's web tasks {want:?}; an lb's table unread");
            return false;
        };
        *last.0.lock().unwrap() = format!("Docker's web tasks {want:?}; lb tables {tables:?}");
        tables.iter().all(|t| {
            let ips: Vec<&str> = t.iter().map(|a| ip_of(a)).collect();
            let unique: BTreeSet<&str> = ips.iter().copied().collect();
            unique.len() == ips.len()
                && unique
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<BTreeSet<_>>()
                    == want
        })
    })
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "starts four Docker nodes and deploys the stack on them; scripts/test runs it"]
async fn nodes_end_to_end() {
    let _nodes = Nodes::up();
    let http = Http::new();
    let report = Report::default();
    let all = [1usize, 2, 3, 4];

    // Every node's agent is a member, and three servers, which agree on a leader.
    let members = consul(&["members"]).expect("consul members");
    for i in all {
        let name = format!("agent-node-{i}");
        assert!(members.contains(&name), "{name} missing:\n{members}");
    }
    assert_eq!(members.matches("server-node-").count(), 3, "{members}");
    // One scenario kills the node that holds the Consul leader, another cuts off a node
    // without it; neither may be an edge (a dead edge is the client's failover, not the
    // stack's). Put the lbs on two nodes other than the leader's by moving the edge label;
    // swarm moves a task whose node no longer meets its constraints by itself.
    let leader = leader_node().expect("a Consul leader");
    let mut edges: Vec<usize> = tasks_on_nodes(1, "lb").iter().map(|(_, n)| *n).collect();
    edges.sort();
    if edges.contains(&leader) {
        let spare = all
            .iter()
            .copied()
            .find(|i| *i != leader && !edges.contains(i))
            .unwrap();
        let label = |i: usize, flag: &str, value: &str| {
            in_node(1, &["node", "update", flag, value, &format!("node-{i}")]).expect("node label");
        };
        label(spare, "--label-add", "switchyard.edge=true");
        label(leader, "--label-rm", "switchyard.edge");
        eventually(
            "the lbs to move off the leader's node",
            Duration::from_secs(120),
            || {
                let now: Vec<usize> = tasks_on_nodes(1, "lb").iter().map(|(_, n)| *n).collect();
                let ok = now.len() == 2 && !now.contains(&leader);
                async move { ok }
            },
        )
        .await;
        edges = tasks_on_nodes(1, "lb").iter().map(|(_, n)| *n).collect();
        edges.sort();
    }
    let cut_off = all
        .iter()
        .copied()
        .find(|i| *i != leader && !edges.contains(i))
        .unwrap();
    let lbs: Vec<SocketAddr> = edges
        .iter()
        .map(|i| format!("{}:8080", node_ip(*i)).parse().unwrap())
        .collect();
    eventually("both lbs serve", Duration::from_secs(60), || async {
        for lb in &lbs {
            let ok = http
                .get(&format!("http://{lb}/"))
                .await
                .is_ok_and(|r| r.status.as_u16() == 200);
            if !ok {
                return false;
            }
        }
        true
    })
    .await;
    report.add(format!(
        "nodes: lbs on node-{} and node-{}; node-{leader} holds the Consul leader; node-{cut_off} is the other",
        edges[0], edges[1]
    ));

    in_node(1, &["service", "scale", "-d", &format!("{STACK}_web=6")]).expect("scale web");
    tables_match_docker(&http, &lbs, &all, "six web tasks routed by both lbs").await;
    let spread: Vec<usize> = tasks_on_nodes(1, "web").iter().map(|(_, n)| *n).collect();
    report.add(format!("web scaled to 6, on nodes {spread:?}"));

    // 8 workers x 5 requests/s: 40 GETs/s through both edges. Only idempotent requests: a
    // POST that was on its way to a host as it died may have been processed, and neither the
    // lb nor a client may send it again (RFC 9110, 9.2.2).
    let load = Load::start_with(8, 5, Some(lbs.clone()), false);
    let stats = load.stats.clone();
    phase(&report, &load, "steady state", async {
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;

    phase(
        &report,
        &load,
        "rolling update of web over 4 nodes",
        async {
            blocking(|| {
                in_node(
                    1,
                    &[
                        "service",
                        "update",
                        "-d",
                        "-q",
                        "--force",
                        &format!("{STACK}_web"),
                    ],
                )
            })
            .await
            .expect("rolling update");
            eventually(
                "the rolling update to complete",
                Duration::from_secs(120),
                || async { blocking(|| update_state("web")).await == "completed" },
            )
            .await;
            let took = tables_match_docker(&http, &lbs, &all, "the updated tasks routed").await;
            report.add(format!(
                "rolling update: every lb routes exactly the new tasks after {}",
                ms(took)
            ));
        },
    )
    .await;

    // Registrars killed with SIGKILL over and over while web scales on every node: each
    // restarted registrar reconciles its node's agent with its node's Docker, so Consul ends
    // up listing exactly what Docker runs.
    phase(&report, &load, "registrars killed (-9) every 2 s while web scales", async {
        let started = Instant::now();
        let mut kills = 0;
        for round in 0..10usize {
            if let Some(n) = match round {
                0 => Some(10),
                3 => Some(7),
                6 => Some(6),
                _ => None,
            } {
                blocking(move || in_node(1, &["service", "scale", "-d", &format!("{STACK}_web={n}")]))
                    .await
                    .expect("scale web");
            }
            let node = all[round % all.len()];
            let killed = blocking(move || {
                let ids = in_node(
                    node,
                    &[
                        "ps",
                        "-q",
                        "-f",
                        &format!("label=com.docker.swarm.service.name={STACK}_registrar"),
                    ],
                )
                .unwrap_or_default();
                ids.lines()
                    .filter(|id| in_node(node, &["kill", "-s", "KILL", id]).is_ok())
                    .count()
            })
            .await;
            kills += killed;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let settled = Instant::now();
        eventually("Consul lists exactly Docker's web tasks on every node", Duration::from_secs(90), || async {
            blocking(move || consul_matches_docker(&all).is_ok()).await
        })
        .await;
        let took = settled.elapsed();
        tables_match_docker(&http, &lbs, &all, "every lb routes exactly Docker's web tasks").await;
        let (_, total) = blocking(consul_web_per_node).await.unwrap_or_default();
        report.add(format!(
            "registrar loop: {kills} registrars killed with -9 in {:.0} s while web scaled 6 -> 10 -> 7 -> 6; Consul matched Docker on every node ({total} web instances, 0 orphans, 0 missing, 0 duplicates) {} after the last kill, and every lb routes exactly them",
            settled.duration_since(started).as_secs_f64(),
            ms(took)
        ));
    })
    .await;

    // A node is cut off the network for 30 s: none of its instances may be routed while it
    // cannot be reached, and afterwards the tables match Docker again.
    let cut = blocking(move || overlay_ips(cut_off, "web")).await;
    assert!(!cut.is_empty(), "node-{cut_off} runs web tasks");
    phase(&report, &load, &format!("node-{cut_off} cut off for 30 s"), async {
        let ip = node_ip(cut_off);
        let name = format!("{NODE}{cut_off}");
        let started = Instant::now();
        let n = name.clone();
        blocking(move || sh("docker", &["network", "disconnect", "switchyard-nodes", &n])).await;
        eventually("the cut node's instances leave every table", Duration::from_secs(30), || async {
            tables(&http, &lbs)
                .await
                .is_some_and(|ts| ts.iter().all(|t| t.iter().all(|a| !cut.contains(ip_of(a)))))
        })
        .await;
        let out = started.elapsed();
        // Until the 30 s are over, none may come back.
        while started.elapsed() < Duration::from_secs(30) {
            let back = tables(&http, &lbs)
                .await
                .is_some_and(|ts| ts.iter().any(|t| t.iter().any(|a| cut.contains(ip_of(a)))));
            assert!(!back, "an instance of the cut node was routed while it was cut off");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        blocking(move || sh("docker", &["network", "connect", "--ip", &ip, "switchyard-nodes", &name])).await;
        let healed = Instant::now();
        let took = tables_match_docker(&http, &lbs, &all, "tables match Docker after the partition heals").await;
        report.add(format!(
            "partition: node-{cut_off}'s {} instances out of every table after {}; after it heals every lb routes exactly Docker's web tasks after {}",
            cut.len(),
            ms(out),
            ms(took.max(healed.elapsed()))
        ));
    })
    .await;
    report.add(format!("after the partition: {}", percentiles(&load)));

    // The node holding the Consul leader dies. Its instances must leave both tables through
    // Consul's own failure detection; registrations made during the election must land.
    // First the cut-off node's server must be a voter again: while it was unreachable,
    // autopilot took it out of the raft configuration, and losing the leader before it is
    // back would leave one voter of two, no quorum (as it would on real hosts).
    let waited = Instant::now();
    eventually(
        "three Consul voters and a leader again",
        Duration::from_secs(120),
        || async { blocking(voters).await == (3, true) },
    )
    .await;
    report.add(format!(
        "after the partition: three Consul voters again {} later",
        ms(waited.elapsed())
    ));
    let worker = leader;
    let leader_now = blocking(leader_node).await;
    let dead = blocking(move || overlay_ips(worker, "web")).await;
    assert!(!dead.is_empty(), "node-{worker} runs web tasks");
    phase(&report, &load, &format!("node-{worker} killed"), async {
        let killed = Instant::now();
        blocking(move || sh("docker", &["kill", &format!("{NODE}{worker}")])).await;
        // Registrations during the election: two more web tasks, on the living nodes. Swarm's
        // managers may be electing too ("node lost leader status"): the command is retried
        // alongside, so that its wait does not count in what is measured here.
        let survivors: Vec<usize> = all.iter().copied().filter(|i| *i != worker).collect();
        let first = survivors[0];
        let scaled = tokio::spawn(async move {
            eventually("swarm to take the scale command", Duration::from_secs(90), || async {
                blocking(move || {
                    in_node(first, &["service", "scale", "-d", &format!("{STACK}_web=8")])
                })
                .await
                .is_ok()
            })
            .await;
            killed.elapsed()
        });
        let elected = tokio::spawn(async move {
            eventually("a new Consul leader", Duration::from_secs(60), || async {
                blocking(leader_node).await.is_some_and(|l| l != worker)
            })
            .await;
            killed.elapsed()
        });
        let mut gone = Vec::new();
        for lb in &lbs {
            eventually(
                "the dead node's instances leave the lb's table",
                Duration::from_secs(60),
                || async {
                    routed(&http, *lb)
                        .await
                        .is_some_and(|r| r.iter().all(|a| !dead.contains(ip_of(a))))
                },
            )
            .await;
            gone.push(killed.elapsed());
        }
        let elected = elected.await.expect("leader watch");
        let scaled = scaled.await.expect("scale command");
        report.add(format!(
            "node-{worker} killed (it held the Consul leader: {}): its {} instances out of both tables after {} and {}; a new Consul leader known after {}; swarm took the scale command after {}",
            leader_now == Some(worker),
            dead.len(),
            ms(gone[0]),
            ms(gone[1]),
            ms(elected),
            ms(scaled)
        ));
        let took = tables_match_docker(&http, &lbs, &survivors, "eight web tasks on the living nodes routed").await;
        report.add(format!(
            "node-{worker} killed: swarm rescheduled its tasks and the two registered during the election; every lb routes exactly Docker's 8 web tasks after {}",
            ms(killed.elapsed().max(took))
        ));
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    report.add(format!("whole run: {}", percentiles(&load)));
    let slow = stats.slower_than(Duration::from_secs(1));

    let total = load.stop().await;
    report.add(format!("total: {total}; slower than 1 s: {slow}"));
    println!(
        "e2e: ==== nodes summary\n{}",
        report.lines.lock().unwrap().join("\n")
    );
    assert!(
        total.failed == 0,
        "{} requests failed; the first ones:\n{}",
        total.failed,
        stats.failures().join("\n")
    );
    assert_eq!(slow, 0, "requests slower than 1 s");
}
