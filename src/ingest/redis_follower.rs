//! The Redis projection follows the event log with its own checkpoint, so
//! ingestion never waits on Redis: while Redis is down the follower falls
//! behind and retries; when it returns, the follower catches up.
//!
//! The checkpoint is kept in Redis itself, written atomically with the keys
//! (`order_lifecycle:projection`: log identity, position, event id), so a
//! flushed Redis, or one restored from an old snapshot, is repaired from the
//! log without anyone noticing. A copy of the position goes to
//! `projection_checkpoints` (name `redis`) for monitoring.
//!
//! Rule R12: log positions are dense and become visible in commit order
//! (see [`event_log::append`]), so the follower reads whatever follows its
//! position and never waits on a gap or skips an entry: there is no timer.
//! Before each round it checks that Redis follows this log: the same log
//! identity, and at its position an entry with the event id it recorded. A
//! Redis that followed another log (a recreated database) or another history
//! of this one (a database restored from a backup and refilled) is
//! re-projected from the start.
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
use crate::store::event_log::LogHead;
use crate::store::redis_projection::{Projected, RedisError, RedisProjection};
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

/// Where a projection resumes, judged against the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Redis follows this log: go on after this position.
    After(i64),
    /// Redis does not follow this log (the reason given): start over.
    Restart(&'static str),
}

/// Where Redis's record says the projection stands, judged against the log.
///
/// # Errors
/// [`StoreError`] from the log.
pub async fn resume_point(
    store: &Store,
    log: &LogHead,
    at: Option<&Projected>,
) -> Result<Resume, StoreError> {
    let Some(at) = at else {
        return Ok(Resume::Restart("redis has no projection record"));
    };
    if at.log_id != log.log_id {
        return Ok(Resume::Restart("redis follows another log"));
    }
    if at.position == 0 {
        return Ok(Resume::After(0));
    }
    if at.position > log.position {
        return Ok(Resume::Restart("redis is ahead of the log"));
    }
    Ok(
        match event_log::event_id_at(store.pool(), at.position).await? {
            Some(id) if id == at.event_id => Resume::After(at.position),
            _ => Resume::Restart("redis followed another history of this log"),
        },
    )
}

/// Projects log entries after the checkpoint, one round of at most 1,000.
/// Returns how many entries it projected (0 when caught up).
///
/// # Errors
/// [`FollowError`]; the checkpoint is then unchanged, so the round is
/// repeated in full next time (writes are idempotent).
pub async fn catch_up(store: &Store, redis: &RedisProjection) -> Result<usize, FollowError> {
    let at = redis.watch_projected().await?;
    let log = event_log::log_head(store.pool()).await?;
    let resume = resume_point(store, &log, at.as_ref()).await?;
    let from = match resume {
        Resume::After(from) => from,
        Resume::Restart(why) => {
            if at.is_some() {
                tracing::warn!(
                    redis = ?at,
                    log_id = %log.log_id,
                    log_head = log.position,
                    "{why}; re-projecting the whole log"
                );
            }
            0
        }
    };
    let entries = event_log::read_after(store.pool(), from, ROUND).await?;
    let Some(last) = entries.last() else {
        if matches!(resume, Resume::Restart(_)) {
            // An empty log: record that Redis follows it now.
            let start = Projected {
                log_id: log.log_id,
                position: 0,
                event_id: String::new(),
            };
            redis.write(&[], &[], &start).await?;
        }
        return Ok(0);
    };
    let projected = Projected {
        log_id: log.log_id,
        position: last.position,
        event_id: last.event_id.clone(),
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
    if !redis.write(&lookups, &hashes, &projected).await? {
        // Redis changed under us (flushed, say): the next round starts over
        // from whatever position it now has.
        return Ok(0);
    }
    if let Err(e) = checkpoints::set(store.pool(), CHECKPOINT, projected.position).await {
        tracing::warn!(error = %e, "could not mirror the redis checkpoint to MySQL");
    }
    Ok(entries.len())
}

/// Sets `order_lifecycle_redis_projection_lag_entries`: log entries not
/// yet in Redis.
async fn record_lag(store: &Store, redis: &RedisProjection) {
    if let (Ok(head), Ok(at)) = (event_log::head(store.pool()).await, redis.position().await) {
        metrics::gauge!("order_lifecycle_redis_projection_lag_entries")
            .set((head - at).max(0) as f64);
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
