//! The product's binary as a process of the test's own.

use std::time::{Duration, Instant};

/// The product's binary, running.
pub struct BinaryConsumer {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

/// A test that fails half-way must not leave consumers running; a test
/// leaves no files behind, but the log of a failing one is kept to read
/// (every log, with `OL_TEST_KEEP_LOGS` set).
impl Drop for BinaryConsumer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() || std::env::var_os("OL_TEST_KEEP_LOGS").is_some() {
            eprintln!("order-lifecycle's log: {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

impl BinaryConsumer {
    /// SIGKILL: no chance to finish anything.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// Whether the log has a line containing `text`.
    pub fn logged(&self, text: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains(text))
    }

    /// The lines of the log containing `text`, in order.
    pub fn logged_lines(&self, text: &str) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(text))
            .map(str::to_owned)
            .collect()
    }

    /// SIGTERM, then waits; returns the exit code and the log.
    pub async fn terminate(mut self, within: Duration) -> (Option<i32>, String) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > within {
                let _ = self.child.kill();
                panic!("order-lifecycle did not stop within {within:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        (status.code(), log)
    }
}

/// The `order-lifecycle` binary of this build: cargo builds it before the
/// integration tests and puts it beside their `deps` folder.
pub fn binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let binary = dir.join(format!("order-lifecycle{}", std::env::consts::EXE_SUFFIX));
    assert!(binary.exists(), "{} not built", binary.display());
    binary
}
