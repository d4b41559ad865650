//! Real parts shared by the integration tests of every crate: a Consul dev agent on loopback
//! ports of its own, an "eventually" assertion with tunable patience, a keep-alive HTTP client,
//! and log files whose tail is printed when a test fails. No mocks: everything here is real.
//! Everything started here is stopped when its handle drops.

use std::collections::HashMap;
use std::future::Future;
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use switchyard_consul::{CheckRegistration, Client as ConsulClient, ServiceRegistration};

pub mod cluster;
pub mod pki;

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

/// A loopback port free now and never handed out before in this process. The kernel picks a
/// port for each bind at random, so two picks can be one port (about one pair in 30,000;
/// a full run picks hundreds): a Consul agent given one for two of its listeners refuses to
/// start, and two agents or lbs given one fight over it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn workspace_root() -> PathBuf {
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

pub fn log_file(name: &str) -> (PathBuf, std::fs::File) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = log_dir().join(format!(
        "{name}-{}-{}.log",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::File::create(&path).expect("log file");
    (path, file)
}

pub fn print_tail_if_panicking(what: &str, path: &PathBuf) {
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

/// The management token of agents started with [`Consul::start_secured`].
pub const MANAGEMENT_TOKEN: &str = "3f0c2a1e-5b7d-4c9e-8a6f-0d1b2c3e4f50";

/// A real `consul agent -dev` on loopback ports of its own.
pub struct Consul {
    child: Option<Child>,
    pub http_port: u16,
    ports: [u16; 3],
    log: PathBuf,
    /// An HCL file the agent reads besides dev mode's settings (ACLs, TLS).
    config: Option<PathBuf>,
    /// The management token, when the test's HCL turns ACLs on.
    token: Option<String>,
    /// What the agent is: `-dev`, or a server or client of a cluster (see [`cluster`]).
    role: Vec<String>,
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
        Self::start_with("", None).await
    }

    /// An agent with ACLs in default-deny ([`MANAGEMENT_TOKEN`] manages them) and HTTPS on a
    /// port of its own that asks every client for a certificate `ca` signed; its plain HTTP
    /// port stays for the test's own calls. Returns the agent and its HTTPS address.
    pub async fn start_secured(ca: &pki::Ca) -> (Consul, String) {
        let server = ca.leaf("consul-server", &["localhost", "127.0.0.1"]);
        let https = free_port();
        let hcl = format!(
            r#"
acl {{
  enabled = true
  default_policy = "deny"
  tokens {{
    master = "{MANAGEMENT_TOKEN}"
    agent = "{MANAGEMENT_TOKEN}"
  }}
}}
ports {{
  https = {https}
}}
ca_file = "{ca}"
cert_file = "{crt}"
key_file = "{key}"
verify_incoming_https = true
"#,
            ca = ca.ca_pem().display(),
            crt = server.crt.display(),
            key = server.key.display(),
        );
        let consul = Self::start_with(&hcl, Some(MANAGEMENT_TOKEN)).await;
        (consul, format!("https://127.0.0.1:{https}"))
    }

    /// An agent that also reads `hcl` (ACLs, TLS on a port of the test's); `token` is the
    /// management token it sets, which the test's own calls then send.
    pub async fn start_with(hcl: &str, token: Option<&str>) -> Consul {
        let config = (!hcl.is_empty()).then(|| {
            let (path, _) = log_file("consul-config");
            let path = path.with_extension("hcl");
            std::fs::write(&path, hcl).expect("Consul config file");
            path
        });
        let token = token.map(str::to_string);
        // A port picked free can be taken by another test before the agent binds it: an agent
        // that does not come up in time is replaced once, on new ports.
        for attempt in 0..2 {
            let mut c = Consul::unstarted(vec!["-dev".into()], config.clone(), token.clone());
            if attempt == 1 || c.try_spawn(Duration::from_secs(20)).await {
                if attempt == 1 {
                    c.spawn().await;
                }
                return c;
            }
            c.stop();
        }
        unreachable!("the second attempt returns or panics")
    }

    /// An agent on free ports of its own, not started yet.
    pub(crate) fn unstarted(
        role: Vec<String>,
        config: Option<PathBuf>,
        token: Option<String>,
    ) -> Consul {
        let http_port = free_port();
        let ports = [free_port(), free_port(), free_port()];
        let (log, _) = log_file("consul");
        Consul {
            child: None,
            http_port,
            ports,
            log,
            config,
            client: ConsulClient::new(&format!("http://127.0.0.1:{http_port}"), token.clone())
                .unwrap(),
            token,
            role,
        }
    }

    /// The port its servers' RPC (raft) listens on, which `/v1/status/leader` names.
    pub fn server_port(&self) -> u16 {
        self.ports[0]
    }

    /// The port other agents join it on.
    pub fn serf_lan_port(&self) -> u16 {
        self.ports[1]
    }

    /// Starts the agent and waits up to `patience` for it to lead; false when it does not.
    async fn try_spawn(&mut self, patience: Duration) -> bool {
        self.launch();
        let deadline = tokio::time::Instant::now() + patience;
        while tokio::time::Instant::now() < deadline {
            if self.client.leader().await.is_ok_and(|l| !l.is_empty()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    async fn spawn(&mut self) {
        self.launch();
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

    pub(crate) fn launch(&mut self) {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(Self::binary());
        cmd.arg("agent")
            .args(&self.role)
            .args(["-bind", "127.0.0.1", "-client", "127.0.0.1"])
            .args(["-http-port", &self.http_port.to_string()])
            .args(["-server-port", &self.ports[0].to_string()])
            .args(["-serf-lan-port", &self.ports[1].to_string()])
            .args(["-serf-wan-port", &self.ports[2].to_string()])
            .args(["-dns-port", "-1", "-grpc-port", "-1"]);
        // `IT_CONSUL_LOG=debug` shows every sync and election in the agents' logs.
        let level = std::env::var("IT_CONSUL_LOG").unwrap_or_else(|_| "warn".into());
        cmd.args(["-log-level", &level]);
        if let Some(config) = &self.config {
            cmd.arg("-config-file").arg(config);
        }
        let child = cmd
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
    }

    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// A new ACL policy of `rules` and a token holding only it: (accessor ID, secret).
    pub async fn acl_token(&self, name: &str, rules: &str) -> (String, String) {
        let policy = serde_json::json!({"Name": name, "Rules": rules});
        self.acl_put("/v1/acl/policy", policy).await;
        let token = serde_json::json!({"Description": name, "Policies": [{"Name": name}]});
        let made = self.acl_put("/v1/acl/token", token).await;
        let field = |k: &str| made[k].as_str().expect("token fields").to_string();
        (field("AccessorID"), field("SecretID"))
    }

    /// Deletes the token with `accessor` ID: whoever holds its secret is refused from now on.
    pub async fn acl_token_delete(&self, accessor: &str) {
        let req = self.acl_request(http::Method::DELETE, &format!("/v1/acl/token/{accessor}"));
        let reply = Http::new().send(req.body(Full::default()).unwrap()).await;
        assert!(
            reply.as_ref().is_ok_and(|r| r.status == StatusCode::OK),
            "delete token: {:?}",
            reply.map(|r| r.body)
        );
    }

    async fn acl_put(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let req = self
            .acl_request(http::Method::PUT, path)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let reply = Http::new().send(req).await.expect("Consul ACL call");
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
        serde_json::from_str(&reply.body).expect("Consul ACL answer")
    }

    fn acl_request(&self, method: http::Method, path: &str) -> http::request::Builder {
        let token = self
            .token
            .as_deref()
            .expect("ACL calls need the management token");
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.addr()))
            .header("x-consul-token", token)
    }

    /// The agent's process id, while it runs (to pause it with SIGSTOP, say).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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
        self.put(id, name, port, tags, checks).await;
    }

    /// Registers an instance with a TTL check whose status the test sets.
    pub async fn register_ttl(&self, id: &str, name: &str, port: u16, tags: &[&str]) {
        let check = CheckRegistration {
            check_id: Some(format!("{id}-ttl")),
            ttl: Some("10m".into()),
            ..Default::default()
        };
        self.put(id, name, port, tags, vec![check]).await;
    }

    /// Registers a loopback instance through the agent API.
    async fn put(
        &self,
        id: &str,
        name: &str,
        port: u16,
        tags: &[&str],
        checks: Vec<CheckRegistration>,
    ) {
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

    /// `PUT /v1/catalog/deregister`: takes an instance out of the catalog behind its agent's
    /// back, as a snapshot restore would.
    pub async fn catalog_deregister(&self, node: &str, service_id: &str) {
        let body = serde_json::json!({ "Node": node, "ServiceID": service_id }).to_string();
        let req = Request::put(format!("{}/v1/catalog/deregister", self.addr()))
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let r = Http::new().send(req).await.expect("catalog deregister");
        assert!(r.status.is_success(), "catalog deregister: {}", r.body);
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

#[cfg(test)]
mod tests {
    /// Ports handed out one after another are never the same one: an agent given one port
    /// twice (its serf LAN and WAN ports, say) does not start.
    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let port = super::free_port();
            assert!(seen.insert(port), "port {port} handed out twice");
        }
    }
}
