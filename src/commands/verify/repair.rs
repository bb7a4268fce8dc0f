//! `verify --repair`: re-projects what the checks found wrong.

use super::checks::Findings;
use super::{Repaired, VerifyError};
use crate::domain::{IdRecord, LifecycleId, OrderId, OrderLifecycle};
use crate::projection::{rebuild, redis_follower};
use crate::retry::for_a_command;
use crate::store::fold;
use crate::store::redis_projection::{ActiveIds, RedisProjection};
use crate::store::stray_keys::{remove_stray, UnexplainedKeys};
use crate::store::{id_projection, Store, StoreError, MAX_ROWS_PER_STATEMENT};

/// Most times [`until_it_holds_still`] writes a chunk's hashes again.
const REWRITES: usize = 10;

/// Writes the active-id hashes of `orders` again from what MySQL holds now
/// until that is what was last written, and returns it. A batch may change
/// one of the orders after the chunk's fold (an order `run` keeps in memory
/// is not read locked), and the follower may project it before the
/// repair's write, which then undid it: the follower, past that entry,
/// would not write it again. What MySQL holds once it stops changing is
/// what the follower writes for anything committed later.
async fn until_it_holds_still(
    store: &Store,
    redis: &RedisProjection,
    orders: &[OrderId],
    mut written: Vec<(OrderId, ActiveIds)>,
) -> Result<Vec<(OrderId, ActiveIds)>, VerifyError> {
    for _ in 0..REWRITES {
        let mut now = id_projection::active_ids(store.pool(), orders).await?;
        let now: Vec<(OrderId, ActiveIds)> = orders
            .iter()
            .map(|o| {
                let mut ids = now.remove(o).unwrap_or_default();
                ids.sort();
                (o.clone(), ids)
            })
            .collect();
        if now == written {
            return Ok(written);
        }
        redis.put(&[], &now).await?;
        written = now;
    }
    tracing::warn!(
        orders = orders.len(),
        "the repaired orders kept changing while their Redis hashes were written; the follower \
         writes them with the entries that changed them"
    );
    Ok(written)
}

/// Replaces the id rows of `orders` with the fold of their log, in one
/// transaction that holds their rows (see [`repair`] for the order of its
/// steps); returns the folded orders.
async fn reproject(store: &Store, orders: &[OrderId]) -> Result<Vec<OrderLifecycle>, StoreError> {
    let pool = store.pool();
    let mut tx = pool.begin().await?;
    id_projection::share_projection_lock(&mut tx).await?;
    id_projection::load_records(&mut tx, orders, true).await?;
    id_projection::delete_orders(&mut tx, orders).await?;
    let folded = fold::orders_of(pool, orders).await?;
    let rows: Vec<(&OrderId, &IdRecord)> = folded.iter().flat_map(OrderLifecycle::rows).collect();
    id_projection::upsert(&mut tx, &rows).await?;
    tx.commit().await?;
    Ok(folded)
}

/// Re-projects the orders found wrong from the log (rows replaced in one
/// transaction per chunk, holding the orders' rows so that no batch moves
/// them meanwhile), rewrites their Redis keys, and removes stray keys
/// (lookup keys only under [`UnexplainedKeys::Remove`]).
///
/// A chunk deletes the orders' rows before it folds their log: a batch
/// that only adds ids to one of them (an order a batch keeps in memory is
/// not read locked) takes none of the locks held here. Committed before
/// the delete, its row is deleted and its entry is in the fold; inserted
/// but not committed, the delete waits for it (then as above) or passes it
/// by (READ COMMITTED reads what is committed) and it stays; inserted after
/// the delete, its row stays. Folding first, a batch committing between
/// the fold and the delete lost its row.
pub(super) async fn repair(
    store: &Store,
    redis: &RedisProjection,
    findings: &Findings,
    unexplained: UnexplainedKeys,
) -> Result<Repaired, VerifyError> {
    let pool = store.pool();
    let mut repaired = Repaired::default();
    if findings.parking_lot_drifted {
        for_a_command("verify --repair: parking lot recount", || {
            crate::store::parked::recount(pool)
        })
        .await?;
        repaired.parking_lot_recounted = true;
    }
    if findings.redis_diverged {
        redis_follower::reset(store, redis)
            .await
            .map_err(rebuild::RebuildError::from)?;
        repaired.redis_entries =
            rebuild::catch_up_to_head(store, redis, "re-project redis").await?;
    }
    let orders: Vec<OrderId> = findings.orders.iter().cloned().collect();
    // Keys the repair writes: a "stray" key of an id whose row was missing
    // is right again once its order is re-projected.
    let mut written = std::collections::HashSet::new();
    let keys = redis.keys();
    for chunk in orders.chunks(MAX_ROWS_PER_STATEMENT) {
        let folded = for_a_command("verify --repair: orders", || reproject(store, chunk)).await?;
        let rows: Vec<(&OrderId, &IdRecord)> =
            folded.iter().flat_map(OrderLifecycle::rows).collect();
        repaired.orders += chunk.len() as u64;
        repaired.rows += rows.len() as u64;

        let lookups: Vec<(LifecycleId, OrderId)> = rows
            .iter()
            .map(|(o, r)| (r.lifecycle_id.clone(), (*o).clone()))
            .collect();
        let hashes: Vec<_> = chunk
            .iter()
            .map(|o| {
                let active = folded
                    .iter()
                    .find(|f| f.order_id() == o)
                    .map(|f| f.active_ids())
                    .unwrap_or_default();
                (o.clone(), active)
            })
            .collect();
        redis.put(&lookups, &hashes).await?;
        let hashes = until_it_holds_still(store, redis, chunk, hashes).await?;
        written.extend(lookups.iter().map(|(id, _)| keys.lookup(id)));
        written.extend(
            hashes
                .iter()
                .filter(|(_, active)| !active.is_empty())
                .map(|(o, _)| keys.active(o)),
        );
    }
    let stray: Vec<String> = findings
        .stray_keys
        .iter()
        .filter(|k| !written.contains(*k))
        .cloned()
        .collect();
    // Found stray by the checks a while ago: removed only if still stray.
    for keys in stray.chunks(1000) {
        let done = remove_stray(store, redis, keys, unexplained).await?;
        repaired.redis_keys_removed += done.removed;
        repaired.redis_keys_kept += done.kept;
    }
    Ok(repaired)
}
