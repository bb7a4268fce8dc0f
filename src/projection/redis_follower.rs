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
//!
//! # The handoff
//!
//! Reading back what a batch has just written costs the database as much as
//! a third of the batch itself, and adds round trips to every event's way
//! to Redis. So `run` hands each committed batch's keys straight to the
//! follower ([`Handoff`]): its positions, the lookups it issued and the
//! active ids of the orders it changed, as the batch's own state machine
//! left them (the batch held those orders' rows locked until its commit, so
//! they are what the read model says at that position). The follower writes
//! a handed batch only when it continues Redis exactly: Redis follows this
//! log and stands at the position right before the batch. Anything else (a
//! batch of another instance in between, a restart, a flushed Redis, a
//! full queue) falls back to reading the log, and once a second the
//! follower reads the log anyway, so the handoff can only make Redis
//! earlier, never different.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::retry::Backoff;
use crate::shutdown::Shutdown;

use crate::config::RedisConfig;
use crate::domain::{LifecycleId, OrderId, Transition};
use crate::store::event_log::LogHead;
use crate::store::leadership::Leadership;
use crate::store::redis_projection::{ActiveIds, Projected, RedisError, RedisProjection};
use crate::store::{checkpoints, event_log, id_projection, Store, StoreError};

/// Checkpoint name of this projection.
pub const CHECKPOINT: &str = "redis";

/// Counter of the Redis Cluster projection's generation (see
/// [`crate::store::redis_cluster`]), beside the checkpoints.
pub const GENERATION: &str = "redis_generation";

/// Forgets where the projection stands, so that the next round re-projects
/// the whole log and rewrites every key (`rebuild`, `verify --repair`). On
/// a cluster it first raises the generation, so that a round of a follower
/// in flight cannot keep slots from being rewritten.
///
/// # Errors
/// [`FollowError`] from MySQL or Redis.
pub async fn reset(store: &Store, redis: &RedisProjection) -> Result<(), FollowError> {
    if redis.is_cluster() {
        let generation = checkpoints::raise(store.pool(), GENERATION).await?;
        redis.set_generation(generation);
    }
    redis.reset().await?;
    Ok(())
}

/// Log entries projected per round.
const ROUND: u32 = 1000;

/// Handed batches kept while the follower is busy; beyond it the oldest is
/// dropped and the log is read instead.
const HANDOFF_CAPACITY: usize = 256;

/// What a committed batch changed in Redis's terms (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandedBatch {
    /// The positions the batch's entries took.
    pub positions: event_log::Positions,
    /// The `event_id` of the entry at `positions.last`.
    pub last_event_id: String,
    /// Ids the batch issued, with their orders.
    pub lookups: Vec<(LifecycleId, OrderId)>,
    /// The active ids of every order the batch changed, after it.
    pub orders: Vec<(OrderId, ActiveIds)>,
}

/// The queue from `run`'s batches to the follower.
#[derive(Debug, Default)]
pub struct Handoff {
    queue: Mutex<VecDeque<HandedBatch>>,
    wake: Notify,
}

impl Handoff {
    /// An empty handoff.
    pub fn new() -> Handoff {
        Handoff::default()
    }

    /// Hands over committed batches and wakes the follower.
    pub fn offer(&self, batches: Vec<HandedBatch>) {
        if let Ok(mut queue) = self.queue.lock() {
            queue.extend(batches);
            while queue.len() > HANDOFF_CAPACITY {
                queue.pop_front();
            }
        }
        self.wake.notify_one();
    }

    /// Wakes the follower without handing anything (e.g. at shutdown).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<HandedBatch> {
        self.queue
            .lock()
            .map(|mut q| q.drain(..).collect())
            .unwrap_or_default()
    }
}

/// Writes the handed batches that continue Redis exactly, in one MULTI.
/// `Some(n)`: `n` entries projected (0: nothing was handed, or only
/// batches Redis already has). `None`: what was handed does not continue
/// Redis; read the log instead.
///
/// # Errors
/// [`RedisError`]; the batches are dropped and the log is read next.
pub async fn project_handed(
    redis: &RedisProjection,
    handoff: &Handoff,
    log_id: &str,
) -> Result<Option<usize>, RedisError> {
    let batches = handoff.take();
    if batches.is_empty() {
        return Ok(Some(0));
    }
    let Some(at) = redis.watch_projected().await? else {
        return Ok(None);
    };
    if at.log_id != log_id {
        return Ok(None);
    }
    let mut position = at.position;
    let mut last_event_id = at.event_id.clone();
    let mut lookups: Vec<(LifecycleId, OrderId)> = Vec::new();
    let mut orders: Vec<(OrderId, ActiveIds)> = Vec::new();
    let mut slots: HashMap<OrderId, usize> = HashMap::new();
    for batch in batches {
        if batch.positions.last < position {
            continue; // already projected, from the log
        }
        if batch.positions.last == position {
            // Already projected too, unless Redis holds another history at
            // that position: a database restored from a backup under a live
            // Redis numbers its new entries as the lost ones were. Trusting
            // the batch after it would leave the lost entries' keys; the
            // log's own check (`resume_point`) re-projects instead.
            if batch.last_event_id != last_event_id {
                return Ok(None);
            }
            continue;
        }
        if batch.positions.first != position + 1 {
            return Ok(None); // a gap: entries of another writer
        }
        position = batch.positions.last;
        last_event_id = batch.last_event_id;
        lookups.extend(batch.lookups);
        // A later batch's view of an order replaces an earlier one's.
        for (order, active) in batch.orders {
            match slots.get(&order) {
                Some(&slot) => orders[slot].1 = active,
                None => {
                    slots.insert(order.clone(), orders.len());
                    orders.push((order, active));
                }
            }
        }
    }
    let projected = (position - at.position) as usize;
    if projected == 0 {
        return Ok(Some(0));
    }
    let record = Projected {
        log_id: at.log_id,
        position,
        event_id: last_event_id,
    };
    if !redis.write(&lookups, &orders, &record).await? {
        return Ok(None);
    }
    Ok(Some(projected))
}

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
    Ok(catch_up_round(store, redis).await?.0)
}

/// [`catch_up`], also returning the identity of the log it read and the
/// position Redis stands at after the round.
async fn catch_up_round(
    store: &Store,
    redis: &RedisProjection,
) -> Result<(usize, String, i64), FollowError> {
    if redis.is_cluster() {
        redis.set_generation(checkpoints::get(store.pool(), GENERATION).await?);
    }
    let at = redis.watch_projected().await?;
    let log = event_log::log_head(store.pool()).await?;
    let log_id = log.log_id.clone();
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
            if redis.is_cluster() {
                forget_stale_fences(store, &log, redis, at.as_ref()).await?;
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
        return Ok((0, log_id, from));
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
        return Ok((0, log_id, from));
    }
    if let Err(e) = checkpoints::set(store.pool(), CHECKPOINT, projected.position).await {
        tracing::warn!(error = %e, "could not mirror the redis checkpoint to MySQL");
    }
    Ok((entries.len(), log_id, projected.position))
}

/// How often a caught-up follower looks at the log's head for entries of
/// other instances (one primary-key read).
const HEAD_POLL: Duration = Duration::from_millis(50);

/// Completes once the log's head is past `at` (entries no batch of this
/// instance handed over: another instance's).
async fn log_moves_past(store: &Store, at: i64) {
    loop {
        tokio::time::sleep(HEAD_POLL).await;
        if event_log::head(store.pool())
            .await
            .is_ok_and(|head| head > at)
        {
            return;
        }
    }
}

/// On a Redis Cluster, before a re-projection: keeps the slots' fences when
/// every copy of the record left follows this log's history (the copies
/// merely disagree: a master lost its last writes or was flushed, and its
/// slots' fences went with them), and removes them when Redis followed
/// another log or history (see [`crate::store::redis_cluster`]).
async fn forget_stale_fences(
    store: &Store,
    log: &LogHead,
    redis: &RedisProjection,
    agreed: Option<&Projected>,
) -> Result<(), FollowError> {
    let mut stale = agreed.is_some();
    if !stale {
        let copies = redis.record_copies().await?;
        for copy in copies.iter().flatten() {
            if let Resume::Restart(_) = resume_point(store, log, Some(copy)).await? {
                stale = true;
            }
        }
        if copies.iter().any(Option::is_some) {
            tracing::warn!(
            copies = ?copies,
            "the masters of the Redis Cluster hold different projection records (a \
             failover that lost writes, a flushed or restarted master, resharding); \
             re-projecting the log: each slot skips what it already holds"
            );
        }
    }
    if stale {
        redis.forget_fences().await?;
    }
    Ok(())
}

/// Sets `order_lifecycle_redis_projection_lag_entries`: log entries not
/// yet in Redis.
async fn record_lag(store: &Store, redis: &RedisProjection) {
    if let (Ok(head), Ok(at)) = (event_log::head(store.pool()).await, redis.position().await) {
        metrics::gauge!("order_lifecycle_redis_projection_lag_entries")
            .set((head - at).max(0) as f64);
    }
}

/// Follows the log until `stop` turns true, while `leadership` says this
/// instance leads (one writer of Redis among many instances; see
/// [`crate::store::leadership`]): woken by `handoff` after each committed
/// batch, whose keys it writes straight away when they continue Redis, and
/// reading the log itself otherwise and at least every second.
pub async fn run(
    store: Store,
    config: RedisConfig,
    handoff: Arc<Handoff>,
    mut leadership: Leadership,
    mut stop: Shutdown,
) {
    let mut backoff = Backoff::new();
    let mut redis: Option<RedisProjection> = None;
    // The log's identity as last read; `None` makes the next round read the
    // log (a handed batch is only trusted right after such a round).
    let mut log_id: Option<String> = None;
    let mut mirrored = 0;
    // When the log was last read: at least once a second, however busy.
    let mut log_read = tokio::time::Instant::now();
    loop {
        if stop.is_requested() {
            // Project what the last batches committed before leaving; the
            // caller bounds how long this may take.
            if let (Some(projection), true) = (&redis, leadership.is_leader()) {
                while let Ok(n) = catch_up(&store, projection).await {
                    if n == 0 {
                        break;
                    }
                }
                mirror_checkpoint(&store, projection, &mut mirrored).await;
            }
            break;
        }
        if !leadership.is_leader() {
            // The leader projects every instance's batches from the log.
            drop(handoff.take());
            log_id = None;
            tokio::select! {
                _ = leadership.changed() => {}
                _ = handoff.wake.notified() => {}
                _ = stop.requested() => {}
            }
            continue;
        }
        let projection = match &redis {
            Some(r) => r.clone(),
            None => match RedisProjection::connect_to(&config).await {
                Ok(r) => {
                    tracing::info!(redis = %config.describe(), "redis follower connected");
                    redis = Some(r.clone());
                    r
                }
                Err(e) => {
                    tracing::warn!(redis = %config.describe(), error = %e, "redis unreachable; the projection will catch up when it returns");
                    backoff.wait(&mut stop).await;
                    continue;
                }
            },
        };
        if let Some(id) = &log_id {
            match project_handed(&projection, &handoff, id).await {
                Ok(Some(n)) => {
                    backoff.reset();
                    metrics::counter!("order_lifecycle_redis_projected_entries_total")
                        .increment(n as u64);
                    if log_read.elapsed() >= Duration::from_secs(1) {
                        log_id = None;
                        continue;
                    }
                    tokio::select! {
                        _ = handoff.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => log_id = None,
                        _ = stop.requested() => {}
                    }
                    continue;
                }
                Ok(None) => log_id = None,
                Err(e) => {
                    tracing::warn!(error = %e, "redis projection round failed; retrying");
                    log_id = None;
                    forget_cluster_connection(&mut redis);
                    backoff.wait(&mut stop).await;
                    continue;
                }
            }
        }
        log_read = tokio::time::Instant::now();
        match catch_up_round(&store, &projection).await {
            Ok((0, id, at)) => {
                backoff.reset();
                log_id = Some(id);
                record_lag(&store, &projection).await;
                mirror_checkpoint(&store, &projection, &mut mirrored).await;
                // What was handed before this round is in Redis now or
                // newer than the log this round read: keep only the latter.
                // Other instances' batches are not handed: the log's head
                // moving past Redis says they came.
                tokio::select! {
                    _ = handoff.wake.notified() => {}
                    _ = log_moves_past(&store, at) => log_id = None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => log_id = None,
                    _ = stop.requested() => {}
                }
            }
            Ok((n, _, _)) => {
                backoff.reset();
                record_lag(&store, &projection).await;
                metrics::counter!("order_lifecycle_redis_projected_entries_total")
                    .increment(n as u64);
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis projection round failed; retrying");
                forget_cluster_connection(&mut redis);
                backoff.wait(&mut stop).await;
            }
        }
    }
}

/// After a failed round on a Redis Cluster, drops the connection so that
/// the next round connects anew and reads the slot map from the seed
/// nodes: the cluster client learns of a failover from a MOVED reply, and
/// a master that died sends none (its requests would go on waiting for
/// it). One server's connection reconnects by itself.
fn forget_cluster_connection(redis: &mut Option<RedisProjection>) {
    if redis.as_ref().is_some_and(RedisProjection::is_cluster) {
        *redis = None;
    }
}

/// Copies Redis's position to `projection_checkpoints` (for monitoring)
/// when it moved since the last copy.
async fn mirror_checkpoint(store: &Store, redis: &RedisProjection, mirrored: &mut i64) {
    let Ok(position) = redis.position().await else {
        return;
    };
    if position == *mirrored {
        return;
    }
    match checkpoints::set(store.pool(), CHECKPOINT, position).await {
        Ok(()) => *mirrored = position,
        Err(e) => tracing::warn!(error = %e, "could not mirror the redis checkpoint to MySQL"),
    }
}
