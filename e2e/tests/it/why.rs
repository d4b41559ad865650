//! `scripts/why` on the stack, from the host: for each broken link it must name that link.
//! Containers of its own, started with `docker run` beside the stack (its network is
//! attachable), each broken in one way; then a working one, and a request whose route is
//! shadowed.

use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::{eventually, workspace_root};

use crate::stack::{containers, docker, service, STACK};
use crate::Report;

/// `scripts/why ARGS`: whether it found a broken link, and what it printed.
pub fn why(args: &[&str]) -> (bool, String) {
    let out = Command::new("python3")
        .arg("scripts/why")
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "scripts/why {args:?} could not run:\n{text}"
    );
    (out.status.code() == Some(1), text)
}

/// The first broken link `scripts/why` names.
fn first_broken(text: &str) -> &str {
    text.lines()
        .find_map(|l| l.strip_prefix("first broken link: "))
        .unwrap_or("")
}

/// A web-sample container started beside the stack, removed when dropped.
struct Extra(String);

impl Extra {
    fn run(name: &str, args: &[&str]) -> Extra {
        let name = format!("{STACK}-why-{name}");
        let _ = Command::new("docker").args(["rm", "-f", &name]).output();
        let mut argv = vec!["run", "-d", "--name", &name, "--no-healthcheck"];
        argv.extend_from_slice(args);
        argv.push("switchyard/web-sample:local");
        Extra(docker(&argv))
    }
}

impl Drop for Extra {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

async fn until_broken_at(what: &str, args: &[&str], expect: &str) -> String {
    let mut last = String::new();
    let found = {
        let last = &mut last;
        let mut tries = 0;
        loop {
            let (broken, text) = why(args);
            if broken && first_broken(&text).contains(expect) {
                break true;
            }
            *last = text;
            tries += 1;
            if tries == 60 {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    assert!(
        found,
        "{what}: scripts/why {args:?} never named {expect:?}; last:\n{last}"
    );
    let (_, text) = why(args);
    first_broken(&text).to_string()
}

/// Every broken link `scripts/why` can see on a running stack, and a working chain.
pub async fn scenarios(report: &Report) {
    // Outside the stack, a container names its network whole (the stack's short name is
    // for the stack's own tasks).
    let net = service("switchyard");
    let on_net = format!("switchyard.network={net}");
    let bad = Extra::run(
        "bad-label",
        &[
            "--network",
            &net,
            "-l",
            &on_net,
            "-l",
            "switchyard.route=/why-bad",
            "-l",
            "switchyard.port=http",
        ],
    );
    let said = until_broken_at(
        "a bad label",
        &["container", &bad.0],
        "label switchyard.port: \"http\" is not a port number",
    )
    .await;
    report.add(format!("why: a bad label -> {said}"));

    let off_network = Extra::run("off-network", &["-l", "switchyard.route=/why-off"]);
    let said = until_broken_at(
        "a container not on the stack network",
        &["container", &off_network.0],
        "not attached to network",
    )
    .await;
    report.add(format!("why: not on the stack network -> {said}"));

    let failing = Extra::run(
        "failing-check",
        &[
            "--network",
            &net,
            "-l",
            &on_net,
            "-l",
            "switchyard.route=/why-failing",
            "-l",
            "switchyard.check.path=/fault",
            "-l",
            "switchyard.check.interval=1s",
        ],
    );
    let said = until_broken_at(
        "a failing check",
        &["container", &failing.0],
        "is critical: HTTP GET",
    )
    .await;
    // web-sample refuses its fault knobs unless they are switched on: a 403.
    assert!(said.contains("403"), "{said}");
    report.add(format!("why: a failing check -> {said}"));

    // A longer prefix takes the requests a web task's route `/` would get.
    let deeper = Extra::run(
        "deeper",
        &[
            "--network",
            &net,
            "-l",
            &on_net,
            "-l",
            "switchyard.route=/why-deeper/shop",
            "-l",
            "switchyard.check.path=/health",
            "-l",
            "switchyard.check.interval=1s",
        ],
    );
    let web = containers("web").into_iter().next().expect("a web task");
    let said = until_broken_at(
        "a route shadowed by a longer prefix",
        &["container", &web, "--path", "/why-deeper/shop/cart"],
        "shadowed: */why-deeper/shop matches a longer prefix",
    )
    .await;
    report.add(format!("why: a shadowed route -> {said}"));
    // The working chain: nothing broken, for the web task and for the deeper one.
    for c in [web.as_str(), deeper.0.as_str()] {
        let mut ok = false;
        eventually("a working chain", Duration::from_secs(30), || {
            let (broken, text) = why(&["container", c]);
            ok = !broken && text.contains("nothing broken");
            async move { ok }
        })
        .await;
    }
    let mut last = String::new();
    eventually(
        "service web: nothing broken",
        Duration::from_secs(30),
        || {
            let (broken, text) = why(&["service", "web"]);
            let ok = !broken;
            last = text;
            async move { ok }
        },
    )
    .await;
    assert!(last.contains("nothing broken"), "{last}");
    report.add("why: a web task, the deeper container and service web -> nothing broken".into());
}

/// While the lbs are cut from Consul: `scripts/why request /` must say so ("has not seen
/// Consul for N s", or, for a replica started during the outage, "has not reached Consul").
pub async fn cut_off(report: &Report) {
    let said = until_broken_at("an lb cut from Consul", &["request", "/"], "Consul").await;
    assert!(said.contains("has not"), "{said}");
    report.add(format!("why: during the Consul outage -> {said}"));
}
