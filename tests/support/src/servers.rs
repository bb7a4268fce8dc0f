//! Redis and MariaDB servers of a test's own, on free ports, for the fault
//! tests that stop them (the shared ones are never touched).

use std::time::Duration;

use crate::basics::{unique_suffix, wait_until};

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn port_answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A Redis server of the test's own, on its own port (fault tests stop it;
/// the shared one is never touched).
pub struct OwnRedis {
    pub port: u16,
    child: Option<std::process::Child>,
    /// Further `redis-server` arguments (TLS settings).
    extra: Vec<String>,
    /// Whether `port` is the TLS port (no plain port).
    tls_only: bool,
}

impl OwnRedis {
    pub async fn start() -> OwnRedis {
        OwnRedis::start_with(&[]).await
    }

    /// Started with further `redis-server` arguments.
    pub async fn start_with(extra: &[&str]) -> OwnRedis {
        let mut redis = OwnRedis {
            port: free_port(),
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            tls_only: false,
        };
        redis.restart().await;
        redis
    }

    /// A Redis answering TLS only, with the certificates of `certs`;
    /// `client_certs` makes it ask clients for theirs.
    pub async fn start_tls(certs: &crate::tls::TestCerts, client_certs: bool) -> OwnRedis {
        let mut redis = OwnRedis {
            port: free_port(),
            child: None,
            extra: Vec::new(),
            tls_only: true,
        };
        let port = redis.port.to_string();
        redis.extra = [
            "--tls-port",
            &port,
            "--tls-cert-file",
            &certs.file("server.pem"),
            "--tls-key-file",
            &certs.file("server.key"),
            "--tls-ca-cert-file",
            &certs.file("ca.pem"),
            "--tls-auth-clients",
            if client_certs { "yes" } else { "no" },
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it (empty: it keeps nothing on disk).
    pub async fn restart(&mut self) {
        let mut child = std::process::Command::new("redis-server");
        let plain_port = if self.tls_only { 0 } else { self.port };
        child
            .args([
                "--port",
                &plain_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.extra)
            .stderr(std::process::Stdio::null());
        self.child = Some(start_server(child, "the test's own Redis", self.port, 10).await);
    }

    pub fn stop(&mut self) {
        kill(&mut self.child);
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of the test's own: 3 masters and 3 replicas on free
/// ports, in memory, with a 2 s node timeout (a dead master's replica
/// takes over within seconds). Fault tests kill its masters.
pub struct OwnRedisCluster {
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
    children: Vec<Option<std::process::Child>>,
}

impl OwnRedisCluster {
    pub async fn start() -> OwnRedisCluster {
        let dir = std::env::temp_dir().join(format!("olt-redis-cluster-{}", unique_suffix()));
        let mut cluster = OwnRedisCluster {
            ports: (0..6).map(|_| free_port()).collect(),
            dir,
            children: Vec::new(),
        };
        for port in cluster.ports.clone() {
            let node_dir = cluster.dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node folder");
            let mut child = std::process::Command::new("redis-server");
            child
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--repl-diskless-sync-delay", "0"])
                .arg("--dir")
                .arg(&node_dir)
                .stderr(std::process::Stdio::null());
            let started = start_server(child, "a node of the test's Redis Cluster", port, 10).await;
            cluster.children.push(Some(started));
        }
        let addresses: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let first = cluster.ports[0];
        wait_until(
            "the test's Redis Cluster",
            Duration::from_secs(60),
            || async move { cluster_state_ok(first) },
        )
        .await;
        // A replica that never synced cannot take over from its master.
        let ports = cluster.ports.clone();
        wait_until("every replica in sync", Duration::from_secs(60), || {
            let ports = ports.clone();
            async move {
                let synced = ports.iter().filter(|&&p| replica_in_sync(p)).count();
                synced == 3
            }
        })
        .await;
        cluster
    }

    /// The seed nodes, comma-separated, as `--redis-cluster-nodes` takes
    /// them.
    pub fn nodes(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The ports of the nodes serving as masters now.
    pub fn masters(&self) -> Vec<u16> {
        self.ports
            .iter()
            .copied()
            .filter(|&p| {
                std::process::Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "role"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with("master"))
            })
            .collect()
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).expect("a node");
        kill(&mut self.children[i]);
    }

    /// Waits until the cluster serves every slot again (after a failover),
    /// asking a node still running.
    pub async fn wait_until_ok(&self) {
        let alive: Vec<u16> = self
            .ports
            .iter()
            .zip(&self.children)
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .collect();
        wait_until(
            "the cluster to serve every slot",
            Duration::from_secs(60),
            || {
                let alive = alive.clone();
                async move { alive.iter().all(|&p| cluster_state_ok(p)) }
            },
        )
        .await;
    }
}

fn replica_in_sync(port: u16) -> bool {
    std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "replication"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("master_link_status:up"))
}

fn cluster_state_ok(port: u16) -> bool {
    std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster", "info"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
}

impl Drop for OwnRedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            kill(child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a test-owned server and waits until its port answers.
async fn start_server(
    mut command: std::process::Command,
    what: &str,
    port: u16,
    seconds: u64,
) -> std::process::Child {
    let child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} could not start: {e}"));
    wait_until(what, Duration::from_secs(seconds), || async move {
        port_answers(port)
    })
    .await;
    child
}

/// Kills and reaps a test-owned server, if running.
fn kill(child: &mut Option<std::process::Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A MariaDB server of the test's own, with its own data directory and port.
pub struct OwnMariaDb {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
    /// Further `mariadbd` arguments (TLS settings).
    extra: Vec<String>,
}

impl OwnMariaDb {
    pub async fn start() -> OwnMariaDb {
        OwnMariaDb::start_with(&[]).await
    }

    /// A MariaDB offering TLS with the certificates of `certs`.
    pub async fn start_tls(certs: &crate::tls::TestCerts) -> OwnMariaDb {
        OwnMariaDb::start_with(&[
            &format!("--ssl-ca={}", certs.file("ca.pem")),
            &format!("--ssl-cert={}", certs.file("server.pem")),
            &format!("--ssl-key={}", certs.file("server.key")),
        ])
        .await
    }

    /// Started with further `mariadbd` arguments.
    pub async fn start_with(extra: &[&str]) -> OwnMariaDb {
        let dir = std::env::temp_dir().join(format!("olt-mariadb-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("mariadb-install-db is required");
        assert!(status.success(), "mariadb-install-db failed");
        let mut db = OwnMariaDb {
            port: free_port(),
            dir,
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        db.restart().await;
        db
    }

    pub fn root_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        let mut child = std::process::Command::new("/usr/sbin/mariadbd");
        child
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=64M",
            ])
            .args(&self.extra)
            .stderr(std::fs::File::create(self.dir.join("err.log")).unwrap());
        self.child = Some(start_server(child, "the test's own MariaDB", self.port, 30).await);
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn crash(&mut self) {
        kill(&mut self.child);
    }
}

impl Drop for OwnMariaDb {
    fn drop(&mut self) {
        self.crash();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
