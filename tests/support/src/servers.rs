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
