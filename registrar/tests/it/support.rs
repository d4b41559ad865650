//! The registrar's test parts: a web-sample image built locally (`FROM scratch`, no pulls),
//! containers run with the real `docker` CLI and removed when dropped, and the registrar binary
//! as a child process scoped to one test's containers.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

pub use testkit::{eventually, free_port, Consul, Http};
use testkit::{log_file, print_tail_if_panicking, workspace_root};

/// Runs a command, returning its trimmed stdout; panics with stderr when it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn docker(args: &[&str]) -> String {
    sh(Command::new("docker").args(args))
}

/// The web-sample image, built once per test process by `scripts/scratch-image` from the
/// host-built binary (no pulls). Its HEALTHCHECK runs `web-sample probe` every second.
pub fn test_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let root = workspace_root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        sh(Command::new(cargo)
            .current_dir(&root)
            .args(["build", "-q", "-p", "web-sample"]));
        let tag = "switchyard-it/web-sample:test";
        sh(Command::new("bash").current_dir(&root).args([
            "scripts/scratch-image",
            tag,
            "target/debug/web-sample",
            "EXPOSE 8000",
            "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD [\"/web-sample\", \"probe\"]",
            "ENTRYPOINT [\"/web-sample\"]",
        ]));
        tag.to_string()
    })
}

/// A unique scope for one test: its containers carry `switchyard.test=<scope>` and its
/// registrar only looks at those.
pub fn scope(name: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A container removed (forcefully) when dropped.
pub struct Container {
    pub id: String,
    pub name: String,
}

impl Container {
    /// `docker run -d` of the test image with `switchyard.test=<scope>` and the given labels,
    /// env and extra arguments.
    pub fn run(
        scope: &str,
        name: &str,
        labels: &[(&str, &str)],
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Container {
        let full = format!("sy-{scope}-{name}");
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), full.clone()];
        args.push("-l".into());
        args.push(format!("switchyard.test={scope}"));
        for (k, v) in labels {
            args.push("-l".into());
            args.push(format!("{k}={v}"));
        }
        args.extend(["-e".into(), format!("WEB_NAME={name}")]);
        for (k, v) in env {
            args.extend(["-e".into(), format!("{k}={v}")]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(test_image().to_string());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = docker(&refs);
        Container { id, name: full }
    }

    pub fn ip(&self) -> String {
        docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &self.id])
    }

    pub fn running(&self) -> bool {
        docker(&["inspect", "-f", "{{.State.Running}}", &self.id]) == "true"
    }

    pub fn stop_async(&self) -> std::thread::JoinHandle<()> {
        let id = self.id.clone();
        std::thread::spawn(move || {
            docker(&["stop", &id]);
        })
    }

    pub fn kill(&self) {
        docker(&["kill", "-s", "KILL", &self.id]);
    }

    pub fn remove(&self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.id]).output();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The registrar binary against a Consul agent, scoped to one test's containers.
pub struct Registrar {
    child: Option<Child>,
    pub admin: String,
    pub node: String,
    log: PathBuf,
    scope: String,
    consul: String,
    extra: Vec<(String, String)>,
}

impl Registrar {
    pub async fn start(consul: &Consul, scope: &str, extra: &[(&str, &str)]) -> Registrar {
        let mut r = Registrar {
            child: None,
            admin: format!("127.0.0.1:{}", free_port()),
            node: format!("it-{scope}"),
            log: log_file("registrar").0,
            scope: scope.to_string(),
            consul: consul.addr(),
            extra: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        r.spawn().await;
        r
    }

    async fn spawn(&mut self) {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_registrar"));
        cmd.env_clear()
            .env(
                "RUST_LOG",
                std::env::var("IT_REGISTRAR_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("REGISTRAR_CONSUL_ADDR", &self.consul)
            .env("REGISTRAR_ADMIN_LISTEN", &self.admin)
            .env("REGISTRAR_NODE", &self.node)
            .env(
                "REGISTRAR_ONLY_LABEL",
                format!("switchyard.test={}", self.scope),
            )
            .env("REGISTRAR_RESYNC", "2s")
            .env("REGISTRAR_TTL", "30s")
            .env("REGISTRAR_CHECK_INTERVAL", "1s")
            .env("REGISTRAR_DEREGISTER_CRITICAL_AFTER", "1m");
        if let Ok(host) = std::env::var("DOCKER_HOST") {
            cmd.env("DOCKER_HOST", host);
        }
        for (k, v) in &self.extra {
            cmd.env(k, v);
        }
        self.child = Some(
            cmd.stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .spawn()
                .expect("start the registrar"),
        );
        let (http, url) = (Http::new(), format!("http://{}/readyz", self.admin));
        eventually(
            "the registrar to reconcile once",
            Duration::from_secs(20),
            || {
                let (http, url) = (http.clone(), url.clone());
                async move { http.get(&url).await.is_ok_and(|r| r.status == 200) }
            },
        )
        .await;
    }

    /// Kills it hard, as a crash would.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.crash();
        self.spawn().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metric(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        let text = Http::new()
            .get(&format!("http://{}/metrics", self.admin))
            .await
            .expect("metrics")
            .body;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter(|l| label.is_none_or(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        print_tail_if_panicking("registrar", &self.log);
        self.crash();
    }
}

/// Instances of `service` in Consul's health API: (address, port, aggregated status).
pub async fn instances(consul: &Consul, service: &str) -> Vec<(String, u16, String)> {
    let entries = consul
        .client
        .health_service(service, false, &Default::default())
        .await
        .expect("health read");
    entries
        .value
        .iter()
        .map(|e| {
            let status = if e.checks.iter().all(|c| c.status == "passing") {
                "passing"
            } else {
                "critical"
            };
            (e.address().to_string(), e.service.port, status.to_string())
        })
        .collect()
}

/// A swarm service (and its overlay network) removed when dropped. Initialises a single-node
/// swarm when the engine is not in one, and leaves it again on drop in that case.
pub struct SwarmService {
    pub name: String,
    network: String,
    initialised_swarm: bool,
}

impl SwarmService {
    /// Creates `<namespace>_<short>` as `docker stack deploy` would name it, with the
    /// stack-namespace label on its tasks.
    pub fn create(
        scope: &str,
        namespace: &str,
        short: &str,
        labels: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> SwarmService {
        let state = docker(&["info", "-f", "{{.Swarm.LocalNodeState}}"]);
        let initialised_swarm = state != "active";
        if initialised_swarm {
            docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        }
        let network = format!("{namespace}_default");
        docker(&[
            "network",
            "create",
            "-d",
            "overlay",
            "--attachable",
            &network,
        ]);
        let name = format!("{namespace}_{short}");
        let mut args: Vec<String> = [
            "service",
            "create",
            "-d",
            "--name",
            &name,
            "--network",
            &network,
            "--stop-grace-period",
            "10s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for l in [
            format!("com.docker.stack.namespace={namespace}"),
            format!("switchyard.test={scope}"),
        ] {
            args.extend(["--container-label".into(), l]);
        }
        for (k, v) in labels {
            args.extend(["--container-label".into(), format!("{k}={v}")]);
        }
        for (k, v) in env {
            args.extend(["--env".into(), format!("{k}={v}")]);
        }
        args.push(test_image().to_string());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&refs);
        SwarmService {
            name,
            network,
            initialised_swarm,
        }
    }

    pub fn scale(&self, n: usize) {
        docker(&["service", "scale", "-d", &format!("{}={n}", self.name)]);
    }

    /// Running task containers: (container id, address on the service's network).
    pub fn tasks(&self) -> Vec<(String, String)> {
        let ids = docker(&[
            "ps",
            "-q",
            "-f",
            &format!("label=com.docker.swarm.service.name={}", self.name),
        ]);
        ids.lines()
            .map(|id| {
                let fmt = format!(
                    "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                    self.network
                );
                (id.to_string(), docker(&["inspect", "-f", &fmt, id]))
            })
            .collect()
    }

    pub fn container_running(id: &str) -> bool {
        Command::new("docker")
            .args(["inspect", "-f", "{{.State.Running}}", id])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
    }
}

impl Drop for SwarmService {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["service", "rm", &self.name])
            .output();
        // Task containers go away asynchronously; the network can only be removed after them.
        for _ in 0..100 {
            let left = Command::new("docker")
                .args([
                    "ps",
                    "-aq",
                    "-f",
                    &format!("label=com.docker.swarm.service.name={}", self.name),
                ])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false);
            if !left {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
        if self.initialised_swarm {
            let _ = Command::new("docker")
                .args(["swarm", "leave", "--force"])
                .output();
        }
    }
}
