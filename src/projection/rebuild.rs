//! The rebuild: recomputes the read models from the event log alone (rule R8),
//! while readers keep reading and `run` keeps consuming.
//!
//! - **MySQL**: the log is folded, one order at a time, into a shadow table
//!   `order_lifecycle_ids_rebuild`, which then replaces the live table in one
//!   `RENAME TABLE` (atomic: a reader sees the old table or the new one,
//!   never an empty one). Orders that received events while the rebuild ran
//!   (entries past the log head it started from: positions become visible
//!   in commit order, rule R12, so nothing committed earlier can appear
//!   below that head later) are folded again from the log. Batches read
//!   order state from this table,
//!   so for the last fold and the swap they are held off by the projection
//!   lock (a row they take in share mode, the rebuild exclusively): no batch
//!   ever reads a table missing its latest rows. The hold lasts as long as
//!   folding the orders touched during the rebuild takes.
//! - **Redis**: keys are overwritten in place, never deleted first, so a
//!   reader never gets a miss: the projection's record is dropped and the
//!   follower logic re-projects the whole log (a running `run`
//!   notices and joins in; the writes are the same); then keys that no longer
//!   belong to any order are removed.

use std::time::{Duration, Instant};

use super::redis_follower::{self, FollowError};
use crate::domain::{IdRecord, OrderId, OrderLifecycle};
use crate::progress::Progress;
use crate::store::fold::{self, FoldedChunks};
use crate::store::id_projection::SHADOW;
use crate::store::lease::Lease;
use crate::store::redis_projection::{RedisError, RedisProjection};
use crate::store::stray_keys::{
    remove_stray, KeyKind, StrayKeys, StrayRemoval, StrayScanError, UnexplainedKeys,
};
use crate::store::{event_log, id_projection, Store, StoreError, MAX_ROWS_PER_STATEMENT};

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RebuildSummary {
    pub events: u64,
    pub orders: u64,
    pub rows: u64,
    pub keys_removed: u64,
    /// Stray lookup keys kept ([`UnexplainedKeys::Keep`]).
    pub keys_kept: u64,
    pub seconds: f64,
}

/// Why a rebuild failed; nothing live was replaced then.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Follow(#[from] FollowError),
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error(transparent)]
    StrayScan(#[from] StrayScanError),
    /// The swap waited [`SWAP_LOCK_WAIT`] for a reader of the live table.
    #[error(
        "the swap waited {seconds} s for a long transaction or query reading \
         order_lifecycle_ids; nothing was replaced and ingestion went on: run the \
         rebuild again when that reader has finished"
    )]
    SwapBlocked { seconds: u64 },
    /// Another rebuild of this database holds the lease.
    #[error(
        "another rebuild of this database is running (it holds the rebuild lease); \
         nothing was changed: run this one again once it has finished"
    )]
    Busy,
    /// The lease's database session closed while the rebuild ran.
    #[error(
        "the rebuild lease was lost while the rebuild ran (its database session closed: a \
         server restart, a network cut, or an idle limit); nothing was replaced, as another \
         rebuild may hold it now: run the rebuild again"
    )]
    LeaseLost,
}

/// The rebuild lease: one rebuild at a time per database. Two at once would
/// fill and swap one shadow table from both sides (measured before the
/// lease: a 30,005-row read model left with 1,501 rows, a 210,000-row one
/// with none). Every rebuild function takes it as proof; it is released
/// when dropped, or when its holder dies.
#[derive(Debug)]
pub struct RebuildLease {
    held: Lease,
    /// When the lease's session was last asked (see `check_if_due`).
    checked: Instant,
}

/// How often a rebuild asks the lease's session whether it still holds it.
const LEASE_CHECK_EVERY: Duration = Duration::from_secs(15);

/// Longest wait of the swap for the live table's metadata lock: ingestion
/// waits for the swap (it holds the projection lock), so a long reader of
/// the table must not stop ingestion for longer than this.
pub const SWAP_LOCK_WAIT: Duration = Duration::from_secs(5);

/// Name of the rebuild lease.
const REBUILD_LEASE: &str = "order_lifecycle_rebuild";

impl From<sqlx::Error> for RebuildError {
    fn from(e: sqlx::Error) -> RebuildError {
        RebuildError::Store(e.into())
    }
}

impl RebuildLease {
    /// Takes the lease, or says [`RebuildError::Busy`] at once.
    ///
    /// # Errors
    /// [`RebuildError::Busy`], or [`StoreError`] from the database.
    pub async fn acquire(store: &Store) -> Result<RebuildLease, RebuildError> {
        match Lease::try_acquire(store, REBUILD_LEASE).await? {
            Some(lease) => Ok(RebuildLease {
                held: lease,
                checked: Instant::now(),
            }),
            None => Err(RebuildError::Busy),
        }
    }

    /// [`RebuildLease::check_now`] once [`LEASE_CHECK_EVERY`] has passed
    /// since the last check: asked that often, the lease's session also
    /// never idles past the server's `wait_timeout`, which would end the
    /// lease in the middle of a long rebuild and let another one fill the
    /// same shadow table.
    ///
    /// # Errors
    /// [`RebuildError::LeaseLost`].
    async fn check_if_due(&mut self) -> Result<(), RebuildError> {
        if self.checked.elapsed() < LEASE_CHECK_EVERY {
            return Ok(());
        }
        self.check_now().await
    }

    /// Asks the lease's session whether it still holds the lease.
    ///
    /// # Errors
    /// [`RebuildError::LeaseLost`] when it does not.
    async fn check_now(&mut self) -> Result<(), RebuildError> {
        self.checked = Instant::now();
        if self.held.is_held().await {
            Ok(())
        } else {
            Err(RebuildError::LeaseLost)
        }
    }

    /// Gives the lease back at once (dropped, it ends a moment later, when
    /// the server sees its connection close).
    ///
    /// # Errors
    /// [`StoreError`] from the database.
    pub async fn release(self) -> Result<(), StoreError> {
        self.held.release().await
    }
}

/// Rebuilds `order_lifecycle_ids` beside the live table and swaps it in.
///
/// # Errors
/// [`StoreError`]; the live table is untouched unless the swap happened.
pub async fn rebuild_mysql(
    store: &Store,
    lease: &mut RebuildLease,
) -> Result<RebuildSummary, RebuildError> {
    let started = Instant::now();
    let pool = store.pool();
    let head = event_log::head(pool).await?;

    let mut conn = pool.acquire().await?;
    id_projection::create_shadow(&mut conn).await?;

    let mut summary = RebuildSummary::default();
    let mut progress = Progress::new("rebuild mysql", "events", Some(head.max(0) as u64));
    let mut chunks = FoldedChunks::new(pool, head, MAX_ROWS_PER_STATEMENT);
    while let Some(chunk) = chunks.next_chunk().await? {
        lease.check_if_due().await?;
        summary.rows += write(&mut conn, SHADOW, &chunk).await?;
        summary.orders += chunk.len() as u64;
        progress.add(chunks.entries_read - summary.events);
        summary.events = chunks.entries_read;
    }
    progress.finish();
    drop(chunks);

    // Orders that moved while we read: fold them again; then, with batches
    // held off (the exclusive projection lock, taken on its own connection
    // because RENAME commits), once more for the last few, and swap.
    let first_pass = refold_recent(store, &mut conn, SHADOW, head).await?;
    id_projection::analyze_shadow(&mut conn).await?;
    let mut lock = pool.begin().await?;
    id_projection::exclusive_projection_lock(&mut lock).await?;
    refold_recent(store, &mut conn, SHADOW, first_pass).await?;
    // The shadow is this rebuild's alone only while the lease is held.
    if let Err(lost) = lease.check_now().await {
        lock.rollback().await?;
        return Err(lost);
    }
    match id_projection::swap_in_shadow(&mut conn, SWAP_LOCK_WAIT).await {
        Ok(()) => {}
        Err(e) if e.is_lock_wait_timeout() => {
            lock.rollback().await?;
            return Err(RebuildError::SwapBlocked {
                seconds: SWAP_LOCK_WAIT.as_secs(),
            });
        }
        Err(e) => return Err(e.into()),
    }
    lock.commit().await?;
    id_projection::drop_retired(&mut conn).await?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

async fn write(
    conn: &mut sqlx::MySqlConnection,
    table: &'static str,
    orders: &[OrderLifecycle],
) -> Result<u64, StoreError> {
    let rows: Vec<(&OrderId, &IdRecord)> = orders.iter().flat_map(OrderLifecycle::rows).collect();
    id_projection::upsert_into(conn, table, &rows).await?;
    Ok(rows.len() as u64)
}

/// Folds again, from the log, every order with entries after log position
/// `since`, and writes them to `table`. Returns the head this pass saw
/// before it looked, from which a later pass must look again.
async fn refold_recent(
    store: &Store,
    conn: &mut sqlx::MySqlConnection,
    table: &'static str,
    since: i64,
) -> Result<i64, StoreError> {
    let next = event_log::head(store.pool()).await?;
    let orders = event_log::orders_after(store.pool(), since).await?;
    let folded = fold::orders_of(store.pool(), &orders).await?;
    write(conn, table, &folded).await?;
    Ok(next)
}

/// Re-projects the whole log into Redis in place, then removes keys that
/// belong to no order (lookup keys only if `unexplained` says so, see
/// [`UnexplainedKeys`]).
///
/// # Errors
/// [`RebuildError`]; Redis keeps valid keys either way.
pub async fn rebuild_redis(
    store: &Store,
    redis: &RedisProjection,
    lease: &mut RebuildLease,
    unexplained: UnexplainedKeys,
) -> Result<RebuildSummary, RebuildError> {
    let started = Instant::now();
    let mut summary = RebuildSummary::default();
    lease.check_now().await?;
    redis_follower::reset(store, redis).await?;
    summary.events = catch_up_to_head(store, redis, "rebuild redis").await?;
    let stale = remove_stale_keys(store, redis, unexplained).await?;
    (summary.keys_removed, summary.keys_kept) = (stale.removed, stale.kept);
    if stale.kept > 0 {
        tracing::warn!(
            keys = stale.kept,
            "global_order_lookup keys that no id accounts for were kept (legacy keys of ids the \
             import skipped, or keys from a newer database); `verify` lists them, \
             --remove-unexplained-keys removes them"
        );
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Projects the log into Redis up to the head it has now, with progress;
/// returns the entries projected.
///
/// # Errors
/// [`RebuildError`] from the log or Redis.
pub async fn catch_up_to_head(
    store: &Store,
    redis: &RedisProjection,
    what: &'static str,
) -> Result<u64, RebuildError> {
    let head = event_log::head(store.pool()).await?;
    let from = redis.position().await?;
    let mut progress = Progress::new(what, "events", Some((head - from).max(0) as u64));
    loop {
        let n = redis_follower::catch_up(store, redis).await?;
        progress.add(n as u64);
        if n == 0 {
            if redis.position().await? >= head {
                break;
            }
            // Another writer (a running `run`) changed the record between
            // our read and our write: read it again.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    progress.finish();
    Ok(progress.done())
}

/// Deletes lookup keys of ids no order holds (under `unexplained`) and
/// active-id hashes of orders without active ids.
async fn remove_stale_keys(
    store: &Store,
    redis: &RedisProjection,
    unexplained: UnexplainedKeys,
) -> Result<StrayRemoval, RebuildError> {
    let mut total = StrayRemoval::default();
    for kind in [KeyKind::Lookup, KeyKind::Active] {
        let mut scan = StrayKeys::new(store, redis, kind);
        while let Some(stale) = scan.next_batch().await? {
            let done = remove_stray(store, redis, &stale, unexplained).await?;
            total.removed += done.removed;
            total.kept += done.kept;
        }
    }
    Ok(total)
}
