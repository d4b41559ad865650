//! The lb's own test parts: HTTP backends on 127.0.0.1:0 with health and latency knobs, and
//! the lb binary as a child process. Consul and the HTTP client come from `testkit`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
pub use testkit::{eventually, free_port, patience, Consul, Http};
use testkit::{log_file, print_tail_if_panicking};

/// A real HTTP backend on 127.0.0.1:0 that answers with its name.
///
/// - `GET /health`: 200 while healthy, 503 otherwise.
/// - `GET /slow?ms=N`: answers after N ms.
/// - `GET /headers`: the request headers, one `name: value` a line.
/// - anything else: its name; a request body is read and its length reported.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub healthy: Arc<AtomicBool>,
    pub served: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address, e.g. where a killed backend used to be.
    pub async fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let served = Arc::new(AtomicU64::new(0));
        let (h, s, n) = (healthy.clone(), served.clone(), name.to_string());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, s, n) = (h.clone(), s.clone(), n.clone());
                let svc = hyper::service::service_fn(move |req| {
                    let (h, s, n) = (h.clone(), s.clone(), n.clone());
                    async move { Ok::<_, Infallible>(backend_answer(req, &h, &s, &n).await) }
                });
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Backend {
            name: name.into(),
            addr,
            healthy,
            served,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// Closes the listener and every open connection, as a crashed process would. Returns
    /// once the accept task is gone, and with it every connection's (an abort takes effect
    /// at the task's next poll: until then a pooled connection could still be answered).
    pub fn kill(&self) {
        self.task.abort();
        for _ in 0..1000 {
            if self.task.is_finished() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend_answer(
    req: Request<Incoming>,
    healthy: &AtomicBool,
    served: &AtomicU64,
    name: &str,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if path == "/health" {
        let ok = healthy.load(Ordering::SeqCst);
        let mut r = Response::new(Full::new(Bytes::from_static(if ok {
            b"ok"
        } else {
            b"unhealthy"
        })));
        if !ok {
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        return r;
    }
    served.fetch_add(1, Ordering::SeqCst);
    // What the backend saw, for tests of rewriting.
    let seen = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    if path.ends_with("/redirect") {
        // `?to=LOCATION&cookie=PATH`: a redirect that sets a cookie.
        let arg = |k: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .unwrap_or("/")
                .to_string()
        };
        return Response::builder()
            .status(StatusCode::FOUND)
            .header("location", arg("to"))
            .header(
                "set-cookie",
                format!("sid=1; Path={}; HttpOnly", arg("cookie")),
            )
            .header("x-seen", seen)
            .header("x-backend", name)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    let body = if path.ends_with("/headers") {
        let mut s = String::new();
        for (k, v) in req.headers() {
            s.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        s
    } else if path == "/big" {
        // `kb` KiB of one letter: large enough to fill socket buffers.
        let kb: usize = query
            .strip_prefix("kb=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024);
        "x".repeat(kb * 1024)
    } else if path == "/slow" {
        let ms = query
            .strip_prefix("ms=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        name.to_string()
    } else {
        let len = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0);
        if len > 0 {
            format!("{name} len={len}")
        } else {
            name.to_string()
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert("x-backend", name.parse().unwrap());
    if let Ok(v) = seen.parse() {
        r.headers_mut().insert("x-seen", v);
    }
    r
}

/// The lb binary, started against a Consul agent with test-friendly settings.
pub struct Lb {
    child: Option<Child>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    log: PathBuf,
    /// Standard output apart: the access log's.
    out: PathBuf,
}

impl Lb {
    pub async fn start(consul: &Consul, extra: &[(&str, &str)]) -> Lb {
        Lb::start_tuned(consul, extra, |_| {}).await
    }

    /// [`Lb::start`], with `tune` given the command before it runs (a resource limit for the
    /// child alone, say).
    pub async fn start_tuned(
        consul: &Consul,
        extra: &[(&str, &str)],
        tune: impl FnOnce(&mut Command),
    ) -> Lb {
        let lb = Lb::spawn_tuned(consul, extra, tune);
        let http = Http::new();
        let url = lb.admin_url("/readyz");
        eventually("lb to become ready", Duration::from_secs(20), || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                http.get(&url)
                    .await
                    .is_ok_and(|r| r.status == StatusCode::OK)
            }
        })
        .await;
        lb
    }

    /// Starts the lb without waiting for it to be ready.
    pub fn spawn(consul: &Consul, extra: &[(&str, &str)]) -> Lb {
        Lb::spawn_tuned(consul, extra, |_| {})
    }

    fn spawn_tuned(consul: &Consul, extra: &[(&str, &str)], tune: impl FnOnce(&mut Command)) -> Lb {
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let (log, file) = log_file("lb");
        let (out, out_file) = log_file("lb-stdout");
        // A benchmark may run another build (the previous release) in its place.
        let bin = std::env::var("IT_LB_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lb").into());
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env(
                "RUST_LOG",
                std::env::var("IT_LB_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("LB_LISTEN", proxy.to_string())
            .env("LB_ADMIN_LISTEN", admin.to_string())
            .env("LB_CONSUL_ADDR", consul.addr())
            .env("LB_CONSUL_BACKOFF_MAX", "1s")
            .env("LB_DRAIN_DELAY", "0s")
            .env("LB_SHUTDOWN_TIMEOUT", "10s");
        // The test script runs the discovery suite again with another value.
        if let Ok(n) = std::env::var("IT_LB_CONSUL_SERVICE_WATCHES") {
            cmd.env("LB_CONSUL_SERVICE_WATCHES", n);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        tune(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out_file)
            .stderr(file)
            .spawn()
            .expect("start the lb binary");
        Lb {
            child: Some(child),
            proxy,
            admin,
            log,
            out,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout.mul_f64(patience());
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the lb wrote: its log, then its standard output.
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log + &self.stdout()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Sum of every sample of metric `name` whose labels include all of `labels`
    /// (`[("reason", "no_route")]`); `None` when no such sample exists.
    pub async fn metric(&self, http: &Http, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = http.get(&self.admin_url("/metrics")).await.ok()?.body;
        let mut found = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                continue;
            }
            if labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
            {
                *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
            }
        }
        found
    }

    pub async fn routes(&self, http: &Http) -> serde_json::Value {
        let body = http
            .get(&self.admin_url("/routes"))
            .await
            .expect("routes")
            .body;
        serde_json::from_str(&body).expect("routes is JSON")
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        print_tail_if_panicking("lb", &self.log);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads a request head from a raw backend's socket, up to and including its blank line
/// (and whatever came with it); `None` if the peer leaves first.
pub async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// Counts answers by backend name (the `x-backend` header) over `n` GETs; failures count
/// under `!<status>` or `!error`.
pub async fn spread(http: &Http, url: &str, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let key = match http.get(url).await {
            Ok(r) if r.status == StatusCode::OK => r
                .headers
                .get("x-backend")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_string(),
            Ok(r) => format!("!{}", r.status.as_u16()),
            Err(_) => "!error".to_string(),
        };
        *seen.entry(key).or_default() += 1;
    }
    seen
}

/// Like `spread`, but every request must succeed.
pub async fn spread_ok(http: &Http, url: &str, n: usize) -> HashMap<String, usize> {
    let seen = spread(http, url, n).await;
    assert!(
        !seen.keys().any(|k| k.starts_with('!')),
        "failed requests: {seen:?}"
    );
    seen
}

/// One instance registered straight into Consul's catalog, on an external node of its own
/// (no agent runs its checks: the check's status is whatever was written).
pub struct CatalogInstance {
    pub node: String,
    pub id: String,
    pub service: String,
    pub tags: Vec<String>,
    pub port: u16,
    /// A check with this status, or none at all.
    pub check: Option<&'static str>,
}

/// Writes `instances` to the catalog through `/v1/txn`, 64 operations at a time (Consul's
/// limit per transaction): 20,000 instances in a few hundred writes instead of 20,000.
pub async fn catalog_write(consul: &Consul, instances: &[CatalogInstance]) {
    let http = Http::new();
    let mut ops = Vec::new();
    let mut nodes = std::collections::HashSet::new();
    for i in instances {
        if nodes.insert(i.node.clone()) {
            ops.push(serde_json::json!({"Node": {"Verb": "set", "Node": {"Node": i.node, "Address": "127.0.0.1"}}}));
        }
        ops.push(serde_json::json!({"Service": {"Verb": "set", "Node": i.node, "Service": {
            "ID": i.id, "Service": i.service, "Tags": i.tags, "Address": "127.0.0.1", "Port": i.port}}}));
        if let Some(status) = i.check {
            ops.push(serde_json::json!({"Check": {"Verb": "set", "Check": {
                "Node": i.node, "CheckID": format!("c-{}", i.id), "Name": "check",
                "Status": status, "ServiceID": i.id}}}));
        }
    }
    txn(&http, consul, ops).await;
}

/// Deletes instances (and their checks) from the catalog.
pub async fn catalog_delete(consul: &Consul, instances: &[CatalogInstance]) {
    let http = Http::new();
    let ops = instances
        .iter()
        .map(|i| {
            serde_json::json!({"Service": {"Verb": "delete", "Node": i.node,
            "Service": {"ID": i.id, "Service": i.service}}})
        })
        .collect();
    txn(&http, consul, ops).await;
}

async fn txn(http: &Http, consul: &Consul, ops: Vec<serde_json::Value>) {
    for chunk in ops.chunks(64) {
        let body = serde_json::to_vec(chunk).unwrap();
        let req = Request::put(format!("{}/v1/txn", consul.addr()))
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let r = http.send(req).await.expect("txn");
        assert_eq!(r.status, StatusCode::OK, "txn: {}", r.body);
    }
}

/// TCP connections process `pid` has open to `port` on loopback (from /proc).
pub fn connections_to(pid: i32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(
                        l.strip_prefix("socket:[")?
                            .trim_end_matches(']')
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let want = format!(":{port:04X}");
    tcp_table()
        .iter()
        // remote address, state 01 = ESTABLISHED, inode
        .filter(|f| f.len() > 9 && f[2].ends_with(&want) && f[3] == "01" && inodes.contains(&f[9]))
        .count()
}

/// Listening sockets bound to `port` on loopback's IPv4 table, whichever process holds them.
pub fn listening_sockets(port: u16) -> usize {
    let want = format!(":{port:04X}");
    tcp_table()
        .iter()
        // local address, state 0A = LISTEN
        .filter(|f| f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A")
        .count()
}

/// The rows of `/proc/net/tcp`, each split into its fields.
fn tcp_table() -> Vec<Vec<String>> {
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// The fields of `/proc/<pid>/stat` after the command name: `[0]` is the state, `[7]` the
/// minor faults, `[11]` and `[12]` user and system time in clock ticks.
pub fn proc_stat(pid: i32) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces and parentheses; what follows its last ')' does not.
    let after_name = stat.rsplit_once(')').unwrap().1;
    // The state is a letter: 0 stands for it, so that the indices stay the kernel's.
    after_name
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect()
}
