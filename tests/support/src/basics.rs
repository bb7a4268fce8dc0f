//! The services' addresses, and waiting for a condition.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const MYSQL_ROOT: &str = "mysql://root@127.0.0.1:3306";

pub fn brokers() -> String {
    std::env::var("OL_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("OL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

/// The local Redis Cluster's seed nodes (`scripts/services.sh` starts it).
pub fn redis_cluster_nodes() -> String {
    std::env::var("OL_TEST_REDIS_CLUSTER_NODES").unwrap_or_else(|_| {
        "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002".to_owned()
    })
}

/// A suffix no other test (or run) has: seconds and randomness.
pub(crate) fn unique_suffix() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!("{secs}_{:08x}", fastrand::u32(..))
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
