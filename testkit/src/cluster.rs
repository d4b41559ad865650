//! A Consul cluster on loopback: three `consul agent -server` processes with data directories
//! and ports of their own, and a client agent joined to them that the lb and registrar talk
//! to, as on a real node. Its leader can be killed to make the others elect a new one.

use std::path::PathBuf;
use std::time::Duration;

use crate::{eventually, log_file, Consul};

pub struct ConsulCluster {
    pub servers: Vec<Consul>,
    /// The client agent: what a node's lb and registrar use.
    pub agent: Consul,
    dirs: Vec<PathBuf>,
}

/// Elections in about a second instead of five: the production multiplier suits servers on
/// separate machines, and a test waits through every election it causes.
const FAST_RAFT: &str = "performance {\n  raft_multiplier = 1\n}\n";

impl ConsulCluster {
    pub async fn start() -> ConsulCluster {
        let (config, _) = log_file("consul-cluster");
        let config = config.with_extension("hcl");
        std::fs::write(&config, FAST_RAFT).expect("Consul config file");
        let mut dirs = Vec::new();
        let mut data_dir = |name: &str| {
            let (dir, _) = log_file(&format!("consul-data-{name}"));
            let _ = std::fs::remove_file(&dir);
            std::fs::create_dir_all(&dir).expect("Consul data dir");
            dirs.push(dir.clone());
            dir.display().to_string()
        };
        let role = |name: &str, dir: String, join: Option<u16>, server: bool| {
            let mut args: Vec<String> = vec![
                "-node".into(),
                name.into(),
                "-data-dir".into(),
                dir,
                // Every agent of this cluster runs on one host: its ID must not come from it.
                "-disable-host-node-id".into(),
            ];
            if server {
                args.extend(["-server".into(), "-bootstrap-expect".into(), "3".into()]);
            }
            if let Some(port) = join {
                args.extend([
                    "-retry-join".into(),
                    format!("127.0.0.1:{port}"),
                    "-retry-interval".into(),
                    "1s".into(),
                ]);
            }
            args
        };
        let first = Consul::unstarted(
            role("server-0", data_dir("server-0"), None, true),
            Some(config.clone()),
            None,
        );
        let join = Some(first.serf_lan_port());
        let mut servers = vec![first];
        for i in 1..3 {
            let name = format!("server-{i}");
            servers.push(Consul::unstarted(
                role(&name, data_dir(&name), join, true),
                Some(config.clone()),
                None,
            ));
        }
        let agent = Consul::unstarted(
            role("client", data_dir("client"), join, false),
            Some(config),
            None,
        );
        let mut cluster = ConsulCluster {
            servers,
            agent,
            dirs,
        };
        for s in &mut cluster.servers {
            s.launch();
        }
        cluster.agent.launch();
        cluster.wait_for_leader(None).await;
        // A leader named is not yet a cluster that takes writes: a write through the agent
        // in the election's wake can fail its sync, which the agent retries only 15 s later.
        // The tests start once one has reached the catalog.
        let probe = "cluster-probe";
        cluster
            .agent
            .register_with(probe, probe, 1, &[], None)
            .await;
        eventually(
            "a write through the client agent to reach the catalog",
            Duration::from_secs(60),
            || async {
                let q = switchyard_consul::QueryOptions::default();
                let r = cluster.agent.client.health_service(probe, false, &q).await;
                r.is_ok_and(|r| !r.value.is_empty())
            },
        )
        .await;
        cluster.agent.deregister(probe).await;
        cluster
    }

    /// The index in `servers` of the one that leads, as the client agent knows it.
    pub async fn leader(&self) -> Option<usize> {
        let leader = self.agent.client.leader().await.ok()?;
        self.servers
            .iter()
            .position(|s| leader == format!("127.0.0.1:{}", s.server_port()))
    }

    /// Waits until a server other than `not` leads, and the client agent knows it.
    pub async fn wait_for_leader(&self, not: Option<usize>) -> usize {
        eventually(
            "the Consul cluster to elect a leader",
            Duration::from_secs(60),
            || async { self.leader().await.is_some_and(|l| Some(l) != not) },
        )
        .await;
        self.leader().await.expect("a leader")
    }

    /// SIGKILLs the leader, as a crashed machine would: it leaves nothing behind, so the
    /// others notice only by timeouts. Returns its index.
    pub async fn kill_leader(&mut self) -> usize {
        let leader = self.leader().await.expect("a leader to kill");
        self.servers[leader].stop();
        leader
    }
}

impl Drop for ConsulCluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            s.stop();
        }
        self.agent.stop();
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
