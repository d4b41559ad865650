//! Real parts for the integration tests: a Consul dev agent on ports of its own, HTTP backends
//! on 127.0.0.1:0 with health and latency knobs, and the lb binary as a child process.
//! Everything started here is stopped when its handle drops.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchyard_consul::{CheckRegistration, Client as ConsulClient, ServiceRegistration};

/// Multiplies every wait; raise it on a slow machine (`IT_PATIENCE=3`).
pub fn patience() -> f64 {
    std::env::var("IT_PATIENCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0)
}

/// Polls `check` until it returns true, failing the test after `timeout` (times patience).
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout.mul_f64(patience());
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lb sits in the workspace")
        .to_path_buf()
}

fn log_dir() -> PathBuf {
    let dir = workspace_root().join("target").join("it-logs");
    std::fs::create_dir_all(&dir).expect("log dir");
    dir
}

fn log_file(name: &str) -> (PathBuf, std::fs::File) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = log_dir().join(format!(
        "{name}-{}-{}.log",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::File::create(&path).expect("log file");
    (path, file)
}

fn print_tail_if_panicking(what: &str, path: &PathBuf) {
    if std::thread::panicking() {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        eprintln!(
            "---- last lines of {what} ({}) ----\n{}",
            path.display(),
            tail.join("\n")
        );
    }
}

/// A real `consul agent -dev` on loopback ports of its own.
pub struct Consul {
    child: Option<Child>,
    pub http_port: u16,
    ports: [u16; 3],
    log: PathBuf,
    pub client: ConsulClient,
}

impl Consul {
    pub fn binary() -> PathBuf {
        if let Ok(p) = std::env::var("SWITCHYARD_CONSUL") {
            return p.into();
        }
        let local = workspace_root().join(".tools/bin/consul");
        if local.exists() {
            return local;
        }
        "consul".into()
    }

    pub async fn start() -> Consul {
        let http_port = free_port();
        let ports = [free_port(), free_port(), free_port()];
        let (log, _) = log_file("consul");
        let mut c = Consul {
            child: None,
            http_port,
            ports,
            log,
            client: ConsulClient::new(&format!("http://127.0.0.1:{http_port}"), None).unwrap(),
        };
        c.spawn().await;
        c
    }

    async fn spawn(&mut self) {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(Self::binary())
            .args([
                "agent",
                "-dev",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
            ])
            .args(["-http-port", &self.http_port.to_string()])
            .args(["-server-port", &self.ports[0].to_string()])
            .args(["-serf-lan-port", &self.ports[1].to_string()])
            .args(["-serf-wan-port", &self.ports[2].to_string()])
            .args(["-dns-port", "-1", "-grpc-port", "-1", "-log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {:?} ({e}); run scripts/install-deps first",
                    Self::binary()
                )
            });
        self.child = Some(child);
        let client = self.client.clone();
        eventually(
            "Consul to elect itself leader",
            Duration::from_secs(20),
            || {
                let client = client.clone();
                async move { client.leader().await.is_ok_and(|l| !l.is_empty()) }
            },
        )
        .await;
    }

    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Stops the agent; dev mode keeps no state, so a later `start_again` is a fresh Consul.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "stop Consul before starting it again");
        self.spawn().await;
    }

    /// Registers an instance with an HTTP check on `/health` every `interval`.
    pub async fn register(&self, id: &str, name: &str, port: u16, tags: &[&str]) {
        self.register_with(id, name, port, tags, Some("/health"))
            .await;
    }

    pub async fn register_with(
        &self,
        id: &str,
        name: &str,
        port: u16,
        tags: &[&str],
        health: Option<&str>,
    ) {
        let checks = match health {
            Some(path) => vec![CheckRegistration {
                check_id: Some(format!("{id}-http")),
                http: Some(format!("http://127.0.0.1:{port}{path}")),
                interval: Some("1s".into()),
                timeout: Some("1s".into()),
                ..Default::default()
            }],
            None => vec![],
        };
        let reg = ServiceRegistration {
            id: id.into(),
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            address: "127.0.0.1".into(),
            port,
            meta: HashMap::new(),
            checks,
        };
        self.client.register_service(&reg).await.expect("register");
    }

    /// Registers an instance with a TTL check whose status the test sets.
    pub async fn register_ttl(&self, id: &str, name: &str, port: u16, tags: &[&str]) {
        let reg = ServiceRegistration {
            id: id.into(),
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            address: "127.0.0.1".into(),
            port,
            meta: HashMap::new(),
            checks: vec![CheckRegistration {
                check_id: Some(format!("{id}-ttl")),
                ttl: Some("10m".into()),
                ..Default::default()
            }],
        };
        self.client.register_service(&reg).await.expect("register");
    }

    pub async fn set_ttl(&self, id: &str, passing: bool) {
        let status = if passing {
            switchyard_consul::CheckStatus::Passing
        } else {
            switchyard_consul::CheckStatus::Critical
        };
        self.client
            .update_ttl(&format!("{id}-ttl"), status, "set by test")
            .await
            .expect("ttl update");
    }

    pub async fn deregister(&self, id: &str) {
        self.client
            .deregister_service(id)
            .await
            .expect("deregister");
    }
}

impl Drop for Consul {
    fn drop(&mut self) {
        print_tail_if_panicking("consul", &self.log);
        self.stop();
    }
}

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

    /// Closes the listener and every open connection, as a crashed process would.
    pub fn kill(&self) {
        self.task.abort();
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
    let body = if path == "/headers" {
        let mut s = String::new();
        for (k, v) in req.headers() {
            s.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        s
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
    r
}

/// The lb binary, started against a Consul agent with test-friendly settings.
pub struct Lb {
    child: Option<Child>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    log: PathBuf,
}

impl Lb {
    pub async fn start(consul: &Consul, extra: &[(&str, &str)]) -> Lb {
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let (log, file) = log_file("lb");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lb"));
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
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start the lb binary");
        let lb = Lb {
            child: Some(child),
            proxy,
            admin,
            log,
        };
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

/// A keep-alive HTTP/1.1 client.
#[derive(Clone)]
pub struct Http {
    client: HyperClient<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Http {
        Http {
            client: HyperClient::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .build(HttpConnector::new()),
        }
    }

    pub async fn get(&self, url: &str) -> Result<Reply, String> {
        self.send(Request::get(url).body(Full::default()).unwrap())
            .await
    }

    pub async fn get_host(&self, url: &str, host: &str) -> Result<Reply, String> {
        self.send(
            Request::get(url)
                .header("host", host)
                .body(Full::default())
                .unwrap(),
        )
        .await
    }

    pub async fn post(&self, url: &str, body: &'static [u8]) -> Result<Reply, String> {
        self.send(
            Request::post(url)
                .body(Full::new(Bytes::from_static(body)))
                .unwrap(),
        )
        .await
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Reply, String> {
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .map_err(|_| "client timeout".to_string())?
    }
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
