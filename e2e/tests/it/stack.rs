//! The deployed stack as the test drives it: `scripts/up` and `scripts/down`, the docker CLI
//! for scaling, updating and killing, and reads of Consul and the lb admin endpoints.

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use testkit::{workspace_root, Http};

pub const STACK: &str = "switchyard";
pub const PROMETHEUS: &str = "http://127.0.0.1:9099";

/// Runs a command in the workspace root; its trimmed stdout, or the failure with stderr.
pub fn try_sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn sh(program: &str, args: &[&str]) -> String {
    try_sh(program, args).unwrap_or_else(|e| panic!("{e}"))
}

pub fn docker(args: &[&str]) -> String {
    sh("docker", args)
}

pub fn service(name: &str) -> String {
    format!("{STACK}_{name}")
}

/// The stack, deployed by `scripts/up` (the README's first command) and removed by
/// `scripts/down --volumes` when dropped. `E2E_REUSE=1` runs against a stack that is already
/// up; `E2E_KEEP=1` leaves it up afterwards.
pub struct Stack {
    keep: bool,
}

impl Stack {
    pub fn up() -> Stack {
        let exists = docker(&["info", "-f", "{{.Swarm.LocalNodeState}}"]) == "active"
            && docker(&["stack", "ls", "--format", "{{.Name}}"])
                .lines()
                .any(|l| l == STACK);
        let reuse = std::env::var("E2E_REUSE").is_ok_and(|v| v == "1");
        assert!(
            !exists || reuse,
            "a stack named {STACK} is already deployed: tear it down with scripts/down, or \
             set E2E_REUSE=1 to run against it (the test scales and restarts its services)"
        );
        let keep = std::env::var("E2E_KEEP").is_ok_and(|v| v == "1");
        let stack = Stack { keep };
        // Inherit the output: CI shows the README's first command exactly as users see it.
        let status = Command::new("bash")
            .arg("scripts/up")
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .status()
            .expect("run scripts/up");
        assert!(status.success(), "scripts/up failed");
        stack
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("e2e: E2E_KEEP=1, leaving the stack up");
            return;
        }
        let _ = Command::new("bash")
            .args(["scripts/down", "--volumes"])
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .status();
    }
}

/// The lb replicas a client can reach now: healthy tasks only, as swarm's DNS and VIP would
/// offer them (scripts/lb-addrs).
pub async fn lb_addrs() -> Vec<SocketAddr> {
    let out = tokio::process::Command::new("bash")
        .arg("scripts/lb-addrs")
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await;
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| format!("{}:8080", l.trim()).parse().ok())
        .collect()
}

/// A container's address on the node's docker_gwbridge, the one this host can reach.
pub fn gwbridge_ip(container: &str) -> Option<IpAddr> {
    let full = try_sh("docker", &["inspect", "-f", "{{.Id}}", container]).ok()?;
    let cidr = try_sh(
        "docker",
        &[
            "network",
            "inspect",
            "docker_gwbridge",
            "-f",
            &format!("{{{{with (index .Containers \"{full}\")}}}}{{{{.IPv4Address}}}}{{{{end}}}}"),
        ],
    )
    .ok()?;
    cidr.split('/').next()?.parse().ok()
}

pub fn scale(name: &str, replicas: usize) {
    docker(&[
        "service",
        "scale",
        "--detach",
        &format!("{}={replicas}", service(name)),
    ]);
}

/// When swarm last moved a task to its current state (for a running task: when it started
/// running), read from the task ID at the end of its name (`stack_web.3.<id>`).
pub fn task_since(task_name: &str) -> Option<SystemTime> {
    let id = task_name.rsplit('.').next()?;
    let nanos: u64 = try_sh(
        "docker",
        &["inspect", "-f", "{{.Status.Timestamp.UnixNano}}", id],
    )
    .ok()?
    .parse()
    .ok()?;
    Some(UNIX_EPOCH + Duration::from_nanos(nanos))
}

/// When the task's container started (before its HEALTHCHECK first passed).
pub fn container_started(task_name: &str) -> Option<SystemTime> {
    let id = task_name.rsplit('.').next()?;
    let container = try_sh(
        "docker",
        &[
            "inspect",
            "-f",
            "{{.Status.ContainerStatus.ContainerID}}",
            id,
        ],
    )
    .ok()?;
    let started = try_sh(
        "docker",
        &["inspect", "-f", "{{.State.StartedAt}}", &container],
    )
    .ok()?;
    parse_rfc3339(&started)
}

/// `2026-11-24T18:45:01.123456789Z` (what Docker prints, always UTC) as a `SystemTime`.
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<u64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let nanos: u64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(UNIX_EPOCH + Duration::new(days * 86_400 + hh * 3600 + mm * 60 + ss, nanos as u32))
}

#[test]
fn rfc3339_as_docker_prints_it() {
    let t = parse_rfc3339("2026-11-24T18:45:01.5Z").unwrap();
    assert_eq!(
        t.duration_since(UNIX_EPOCH).unwrap(),
        Duration::new(1_795_545_901, 500_000_000)
    );
}

/// Waits until swarm reports the service's update finished.
pub async fn update_completed(name: &str) -> bool {
    try_sh(
        "docker",
        &[
            "service",
            "inspect",
            "-f",
            "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
            &service(name),
        ],
    )
    .is_ok_and(|s| s == "completed")
}

/// Containers of a service running now.
pub fn containers(name: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-q",
        "-f",
        &format!("label=com.docker.swarm.service.name={}", service(name)),
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

/// Consul's HTTP API as an operator on a node reaches it: a server task's address on the
/// node's docker_gwbridge (the stack publishes no Consul port).
pub fn consul_api() -> Option<String> {
    let server = containers("consul-server").into_iter().next()?;
    Some(format!("http://{}:8500", gwbridge_ip(&server)?))
}

/// The management token `scripts/consul-acl secrets` wrote.
pub fn management_token() -> String {
    let file = workspace_root().join(".run/secrets/consul-management-token");
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .to_string()
}

/// A call to Consul's API (`consul_api`), with `token` when there is one: status and body.
pub async fn consul_call(
    http: &Http,
    method: http::Method,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", consul_api()?));
    if let Some(token) = token {
        req = req.header("x-consul-token", token);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .ok()?;
    let reply = http.send(req).await.ok()?;
    Some((reply.status.as_u16(), reply.body))
}

/// Instances of a Consul service with every check passing.
pub async fn consul_passing(http: &Http, name: &str) -> Option<usize> {
    let token = management_token();
    let path = format!("/v1/health/service/{name}?passing");
    let (status, body) = consul_call(http, http::Method::GET, &path, Some(&token), "").await?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v.as_array().map(Vec::len)
}

/// The backends an lb replica routes to, from its `/routes` admin endpoint, sorted.
pub async fn lb_backends(http: &Http, lb: SocketAddr) -> Option<Vec<String>> {
    let reply = http
        .get(&format!("http://{}:9090/routes", lb.ip()))
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&reply.body).ok()?;
    let mut out: Vec<String> = v
        .get("routes")?
        .as_array()?
        .iter()
        .flat_map(|r| {
            let route = r
                .get("route")
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .to_string();
            r.get("backends")
                .and_then(|b| b.as_array())
                .into_iter()
                .flatten()
                .filter_map(move |b| {
                    let addr = b.get("addr").and_then(|a| a.as_str())?;
                    Some(format!("{route} {addr}"))
                })
        })
        .collect();
    out.sort();
    Some(out)
}

/// One metric's value from an lb replica's `/metrics`.
/// A histogram of an lb's `/metrics`, one label pair selecting the series: its cumulative
/// buckets `(le, count)`, added into `into` (so several lbs' make one), and its sum.
pub async fn lb_histogram(
    http: &Http,
    lb: SocketAddr,
    name: &str,
    label: (&str, &str),
    into: &mut Vec<(f64, f64)>,
) -> Option<f64> {
    let reply = http
        .get(&format!("http://{}:9090/metrics", lb.ip()))
        .await
        .ok()?;
    let selector = format!("{}=\"{}\"", label.0, label.1);
    let mut sum = None;
    for line in reply.body.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if !series.contains(&selector) {
            continue;
        }
        if series.starts_with(&format!("{name}_sum")) {
            sum = Some(value);
        } else if let Some(rest) = series.strip_prefix(&format!("{name}_bucket{{")) {
            let le = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("le=\""))
                .and_then(|v| v.trim_end_matches(['"', '}']).parse::<f64>().ok())?;
            match into.iter_mut().find(|(b, _)| *b == le) {
                Some((_, n)) => *n += value,
                None => into.push((le, value)),
            }
        }
    }
    into.sort_by(|a, b| a.0.total_cmp(&b.0));
    sum
}

/// The upper bound of the bucket that holds quantile `q` of cumulative `buckets`.
pub fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| *le)
}

pub async fn lb_metric(http: &Http, lb: SocketAddr, name: &str) -> Option<f64> {
    let reply = http
        .get(&format!("http://{}:9090/metrics", lb.ip()))
        .await
        .ok()?;
    reply.body.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}
