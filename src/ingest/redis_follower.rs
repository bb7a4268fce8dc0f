//! The Redis projection follows the event log with its own checkpoint, so
//! ingestion never waits on Redis: while Redis is down the follower falls
//! behind and retries; when it returns, the follower catches up.
//!
//! The checkpoint is kept in Redis itself, written atomically with the keys
//! (`order_lifecycle:projected_position`), so a flushed Redis, or one restored
//! from an old snapshot, is repaired from the log without anyone noticing. A
//! copy goes to `projection_checkpoints` (name `redis`) for monitoring.
//!
//! Log positions come from an auto-increment column, and concurrent writers
//! (several instances) may commit them out of order. The follower therefore
//! only moves over a gap in positions once the entry after the gap is older
//! than [`GAP_GRACE_SECONDS`]: by then the writer that took the missing
//! position has committed (and the entry is visible) or rolled back (and the
//! gap is permanent). Batch transactions last milliseconds and lock waits are
//! capped at 10 s per session.
//!
//! Lookup keys are written from the log's `issued` transitions (bindings
//! never change, rule R1). Active-id hashes are written from the MySQL read
//! model as it stands, which is never older than the log entry being
//! projected, so a key never moves backwards.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::backoff::Backoff;

use crate::config::RedisConfig;
use crate::domain::{LifecycleId, OrderId, Transition};
use crate::store::redis_projection::{RedisError, RedisProjection};
use crate::store::{checkpoints, event_log, id_projection, Store, StoreError};

/// Checkpoint name of this projection.
pub const CHECKPOINT: &str = "redis";

/// Log entries projected per round.
const ROUND: u32 = 1000;

/// How long a gap in log positions is waited for before it is taken as a
/// rolled-back transaction.
pub const GAP_GRACE_SECONDS: f64 = 15.0;

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
    let mut from = redis.watch_position().await?.unwrap_or(0);
    let mut entries = event_log::read_after(store.pool(), from, ROUND).await?;
    if entries.is_empty() && from > 0 && event_log::head(store.pool()).await? < from {
        // Redis reflects a log this database no longer has (it was
        // recreated or replayed): project everything again.
        tracing::warn!(
            redis_position = from,
            "redis is ahead of the log; re-projecting from the start"
        );
        from = 0;
        entries = event_log::read_after(store.pool(), from, ROUND).await?;
    }
    let mut next = from + 1;
    let contiguous = entries
        .iter()
        .take_while(|e| {
            let ok = e.position == next || e.age_seconds >= GAP_GRACE_SECONDS;
            next = e.position + 1;
            ok
        })
        .count();
    entries.truncate(contiguous);
    let Some(last) = entries.last().map(|e| e.position) else {
        return Ok(0);
    };
    let mut lookups: Vec<(LifecycleId, OrderId)> = Vec::new();
    let mut orders: Vec<OrderId> = Vec::new();
    let mut seen: HashSet<&OrderId> = HashSet::new();
    for e in &entries {
        if e.transitions.is_empty() {
            continue;
        }
        if seen.insert(&e.order_id) {
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
    if !redis.write(&lookups, &hashes, last).await? {
        // Redis changed under us (flushed, say): the next round starts over
        // from whatever position it now has.
        return Ok(0);
    }
    if let Err(e) = checkpoints::set(store.pool(), CHECKPOINT, last).await {
        tracing::warn!(error = %e, "could not mirror the redis checkpoint to MySQL");
    }
    Ok(entries.len())
}

/// Sets `order_lifecycle_redis_projection_lag_entries`: log entries not
/// yet in Redis (by position; a rolled-back gap counts until passed).
async fn record_lag(store: &Store, redis: &RedisProjection) {
    if let (Ok(head), Ok(at)) = (event_log::head(store.pool()).await, redis.position().await) {
        metrics::gauge!("order_lifecycle_redis_projection_lag_entries")
            .set((head - at.unwrap_or(0)).max(0) as f64);
    }
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
            // Project what the last batches committed before leaving; the
            // caller bounds how long this may take.
            if let Some(projection) = &redis {
                while let Ok(n) = catch_up(&store, projection).await {
                    if n == 0 {
                        break;
                    }
                }
            }
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
                record_lag(&store, &projection).await;
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => {}
                }
            }
            Ok(n) => {
                backoff.reset();
                record_lag(&store, &projection).await;
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
