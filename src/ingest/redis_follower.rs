//! The Redis projection follows the event log with its own checkpoint
//! (`projection_checkpoints`, name `redis`), so ingestion never waits on
//! Redis: while Redis is down the follower falls behind and retries; when it
//! returns, the follower catches up from its checkpoint.
//!
//! Lookup keys are written from the log's `issued` transitions (bindings
//! never change, rule R1). Active-id hashes are written from the MySQL read
//! model as it stands, which is never older than the log entry being
//! projected, so a key never moves backwards.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::config::RedisConfig;
use crate::domain::{LifecycleId, OrderId, Transition};
use crate::store::redis_projection::{RedisError, RedisProjection};
use crate::store::{checkpoints, event_log, id_projection, Store, StoreError};

/// Checkpoint name of this projection.
pub const CHECKPOINT: &str = "redis";

/// Log entries projected per round.
const ROUND: u32 = 1000;

/// Why a round failed; both are retried.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("reading the log: {0}")]
    Store(#[from] StoreError),
    #[error("writing Redis: {0}")]
    Redis(#[from] RedisError),
}

/// Projects log entries after the checkpoint, one round of at most 1,000.
/// Returns how many entries it projected (0 when caught up).
///
/// # Errors
/// [`FollowError`]; the checkpoint is then unchanged, so the round is
/// repeated in full next time (writes are idempotent).
pub async fn catch_up(store: &Store, redis: &RedisProjection) -> Result<usize, FollowError> {
    let from = checkpoints::get(store.pool(), CHECKPOINT).await?;
    let entries = event_log::read_after(store.pool(), from, ROUND).await?;
    let Some(last) = entries.last().map(|e| e.position) else {
        return Ok(0);
    };
    let mut lookups: Vec<(LifecycleId, OrderId)> = Vec::new();
    let mut orders: Vec<OrderId> = Vec::new();
    for e in &entries {
        if e.transitions.is_empty() {
            continue;
        }
        if !orders.contains(&e.order_id) {
            orders.push(e.order_id.clone());
        }
        for t in &e.transitions {
            if let Transition::Issued { lifecycle_id, .. } = t {
                lookups.push((lifecycle_id.clone(), e.order_id.clone()));
            }
        }
    }
    let mut active = id_projection::active_ids(store.pool(), &orders).await?;
    let hashes: Vec<_> = orders
        .into_iter()
        .map(|o| {
            let ids = active.remove(&o).unwrap_or_default();
            (o, ids)
        })
        .collect();
    redis.write(&lookups, &hashes).await?;
    checkpoints::set(store.pool(), CHECKPOINT, last).await?;
    Ok(entries.len())
}

/// Follows the log until `stop` turns true, woken by `wake` after each
/// committed batch and at least every second.
pub async fn run(
    store: Store,
    config: RedisConfig,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new();
    let mut redis: Option<RedisProjection> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let projection = match &redis {
            Some(r) => r.clone(),
            None => match RedisProjection::connect(config.url.expose(), &config.key_prefix).await {
                Ok(r) => {
                    tracing::info!(redis = %config.url, "redis follower connected");
                    redis = Some(r.clone());
                    r
                }
                Err(e) => {
                    tracing::warn!(redis = %config.url, error = %e, "redis unreachable; the projection will catch up when it returns");
                    backoff.wait(&mut stop).await;
                    continue;
                }
            },
        };
        match catch_up(&store, &projection).await {
            Ok(0) => {
                backoff.reset();
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => {}
                }
            }
            Ok(n) => {
                backoff.reset();
                metrics::counter!("order_lifecycle_redis_projected_entries_total")
                    .increment(n as u64);
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis projection round failed; retrying");
                backoff.wait(&mut stop).await;
            }
        }
    }
}

/// Exponential backoff from 100 ms to 5 s, cut short by `stop`.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff {
            next: Duration::from_millis(100),
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    /// Sleeps the current delay (or until `stop` changes) and doubles it.
    pub(crate) async fn wait(&mut self, stop: &mut watch::Receiver<bool>) {
        tokio::select! {
            _ = tokio::time::sleep(self.next) => {}
            _ = stop.changed() => {}
        }
        self.next = (self.next * 2).min(Duration::from_secs(5));
    }
}
