//! The checks of `verify`, each with a count and a few examples; what
//! they find wrong is collected in [`Findings`] for the repair.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sqlx::MySqlPool;

use super::{Check, HealthReport, Status, VerifyConfig, VerifyError, MAX_REPAIR_ORDERS};
use crate::domain::{IdRecord, LifecycleId, OrderId, OrderLifecycle};
use crate::projection::redis_follower::{self, Resume};
use crate::store::fold::{self, FoldedChunks};
use crate::store::redis_projection::RedisProjection;
use crate::store::stray_keys::{KeyKind, StrayKeys};
use crate::store::{
    audit, event_log, id_projection, parked, Store, StoreError, MAX_ROWS_PER_STATEMENT,
};

/// Everything the checks found, for a repair.
#[derive(Default)]
pub(super) struct Findings {
    pub(super) orders: BTreeSet<OrderId>,
    pub(super) stray_keys: Vec<String>,
    /// Redis follows another log or history: re-project it whole.
    pub(super) redis_diverged: bool,
    /// The parking lot's kept count differs from its rows: recount.
    pub(super) parking_lot_drifted: bool,
}

impl Findings {
    fn order(&mut self, order: &OrderId) {
        if self.orders.len() < MAX_REPAIR_ORDERS {
            self.orders.insert(order.clone());
        }
    }
}

/// Runs every check.
pub(super) async fn check_all(
    store: &Store,
    redis: &RedisProjection,
    config: &VerifyConfig,
    findings: &mut Findings,
) -> Result<HealthReport, VerifyError> {
    let n = config.examples;
    let pool = store.pool();
    let follows = redis_follows_log(store, redis, findings).await?;
    let lag_note = if findings.redis_diverged {
        None
    } else {
        wait_for_redis(store, redis).await?
    };
    let mut checks = vec![
        one_active_per_type(pool, n, findings).await?,
        orphan_ids(pool, config, n).await?,
        mysql_matches_log(store, n, findings).await?,
        follows,
    ];
    let mut lookups = redis_lookup_keys(store, redis, n, findings).await?;
    let mut active = redis_active_ids(store, redis, n, findings).await?;
    if let Some(note) = lag_note {
        lookups.note = Some(note.clone());
        active.note = Some(note);
    }
    checks.push(lookups);
    checks.push(active);
    checks.push(sequences(pool, n).await?);
    checks.push(parked_overdue(pool, n).await?);
    checks.push(parking_lot_count(pool, findings).await?);
    checks.push(dead_letters(pool, n).await?);
    Ok(HealthReport {
        healthy: checks.iter().all(|c| c.status != Status::Fail),
        checks,
        repaired: None,
    })
}

fn check(name: &'static str, count: u64, examples: Vec<String>) -> Check {
    Check {
        name,
        status: if count == 0 {
            Status::Pass
        } else {
            Status::Fail
        },
        count,
        examples,
        note: None,
    }
}

/// Rule R12: Redis's projection record names this log, and at its
/// position the entry it recorded.
async fn redis_follows_log(
    store: &Store,
    redis: &RedisProjection,
    findings: &mut Findings,
) -> Result<Check, VerifyError> {
    let log = event_log::log_head(store.pool()).await?;
    let at = redis.projected().await?;
    let examples = match redis_follower::resume_point(store, &log, at.as_ref()).await? {
        Resume::After(_) => Vec::new(),
        // No record yet: nothing projected, which the key checks report.
        Resume::Restart(_) if at.is_none() => Vec::new(),
        Resume::Restart(why) => {
            findings.redis_diverged = true;
            vec![format!(
                "{why}: redis records {at:?}; this log is {} at position {}",
                log.log_id, log.position
            )]
        }
    };
    Ok(check("redis_follows_log", examples.len() as u64, examples))
}

/// Waits up to ten seconds for the Redis follower to reach the log's head;
/// a note when it did not.
async fn wait_for_redis(
    store: &Store,
    redis: &RedisProjection,
) -> Result<Option<String>, VerifyError> {
    let head = event_log::head(store.pool()).await?;
    for _ in 0..50 {
        if redis.position().await? >= head {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let at = redis.position().await?;
    Ok(Some(format!(
        "Redis is {} log entries behind (position {at}, log head {head}); is `run` running?",
        head - at
    )))
}

/// The seed's health check: more than one active id per (order, type).
async fn one_active_per_type(
    pool: &MySqlPool,
    n: usize,
    findings: &mut Findings,
) -> Result<Check, VerifyError> {
    let rows = audit::duplicate_actives(pool).await?;
    let mut examples = Vec::new();
    for row in &rows {
        if let Ok(o) = OrderId::parse(&row.order_id) {
            findings.order(&o);
        }
        if examples.len() < n {
            examples.push(format!(
                "order {}: {} active {}",
                row.order_id, row.count, row.id_type
            ));
        }
    }
    Ok(check("one_active_per_type", rows.len() as u64, examples))
}

/// The seed's orphan check: ids whose order is in neither legacy table.
async fn orphan_ids(
    pool: &MySqlPool,
    config: &VerifyConfig,
    n: usize,
) -> Result<Check, VerifyError> {
    let mut collations = Vec::new();
    let tables = config
        .tables
        .names()
        .map_err(|e| VerifyError::Invalid(e.to_string()))?;
    for table in tables {
        match audit::order_id_collation(pool, table).await? {
            Some(collation) => collations.push(collation),
            None => {
                return Ok(Check {
                    name: "orphan_ids",
                    status: Status::Skip,
                    count: 0,
                    examples: Vec::new(),
                    note: Some(format!(
                        "legacy table {table} (with order_id) not found in this database"
                    )),
                })
            }
        }
    }
    let table = |i: usize| audit::LegacyTable {
        name: tables[i],
        collation: collations[i].as_deref(),
    };
    let (count, orphans) = audit::orphan_ids(pool, table(0), table(1), n).await?;
    let examples = orphans
        .iter()
        .map(|b| format!("id {} of order {}", b.lifecycle_id, b.order_id))
        .collect();
    Ok(check("orphan_ids", count, examples))
}

/// Ids sorted, for comparing an order two ways.
fn sorted_ids(order: &OrderLifecycle) -> Vec<IdRecord> {
    let mut ids = order.ids().to_vec();
    ids.sort_by(|a, b| a.lifecycle_id.cmp(&b.lifecycle_id));
    ids
}

/// Orders of `folded` whose rows differ from the fold.
async fn differing(
    pool: &MySqlPool,
    folded: &[OrderLifecycle],
) -> Result<Vec<OrderId>, StoreError> {
    let orders: Vec<OrderId> = folded.iter().map(|o| o.order_id().clone()).collect();
    let mut conn = pool.acquire().await?;
    let stored: BTreeMap<OrderId, OrderLifecycle> =
        id_projection::load_orders(&mut conn, &orders, false)
            .await?
            .into_iter()
            .map(|o| (o.order_id().clone(), o))
            .collect();
    Ok(folded
        .iter()
        .filter(|f| {
            stored
                .get(f.order_id())
                .is_none_or(|s| sorted_ids(s) != sorted_ids(f))
        })
        .map(|f| f.order_id().clone())
        .collect())
}

/// The MySQL projection against the log folded alone, order by order
/// (streamed; orders that differ are folded again before they count, in
/// case `run` moved them meanwhile).
async fn mysql_matches_log(
    store: &Store,
    n: usize,
    findings: &mut Findings,
) -> Result<Check, VerifyError> {
    let pool = store.pool();
    let head = event_log::head(pool).await?;
    let mut suspects: Vec<OrderId> = Vec::new();
    let mut chunks = FoldedChunks::new(pool, head, MAX_ROWS_PER_STATEMENT);
    while let Some(chunk) = chunks.next_chunk().await? {
        suspects.extend(differing(pool, &chunk).await?);
    }
    drop(chunks);
    suspects.truncate(MAX_REPAIR_ORDERS);
    let again = fold::orders_of(pool, &suspects).await?;
    let mut wrong = differing(pool, &again).await?;
    // Rows of orders the log does not have at all.
    let extra = audit::orders_missing_from_log(pool).await?;
    wrong.extend(extra.iter().filter_map(|o| OrderId::parse(o).ok()));
    let examples = wrong
        .iter()
        .take(n)
        .map(|o| format!("order {o}: rows differ from its log"))
        .collect();
    for o in &wrong {
        findings.order(o);
    }
    Ok(check("mysql_matches_log", wrong.len() as u64, examples))
}

/// Every MySQL id has its lookup key naming its order; no lookup key
/// without an id.
async fn redis_lookup_keys(
    store: &Store,
    redis: &RedisProjection,
    n: usize,
    findings: &mut Findings,
) -> Result<Check, VerifyError> {
    let pool = store.pool();
    let (mut missing, mut wrong, mut examples) = (0u64, 0u64, Vec::new());
    let keys = redis.keys();
    let mut after = String::new();
    loop {
        let rows = audit::bindings_after(pool, &after, 1000).await?;
        let Some(last) = rows.last() else { break };
        after = last.lifecycle_id.clone();
        let pairs: Vec<(LifecycleId, OrderId)> = rows
            .iter()
            .filter_map(|r| {
                let id = LifecycleId::parse(&r.lifecycle_id).ok()?;
                let order = OrderId::parse(&r.order_id).ok()?;
                Some((id, order))
            })
            .collect();
        let ids: Vec<&LifecycleId> = pairs.iter().map(|(id, _)| id).collect();
        let found = redis.lookups(&ids).await?;
        for ((id, order), value) in pairs.iter().zip(found) {
            let problem = match value {
                None => {
                    missing += 1;
                    format!("{} missing (order {order})", keys.lookup(id))
                }
                Some(v) if v != order.as_str() => {
                    wrong += 1;
                    format!("{} names {v:?}, not {order}", keys.lookup(id))
                }
                Some(_) => continue,
            };
            findings.order(order);
            if examples.len() < n {
                examples.push(problem);
            }
        }
    }
    let room = n.saturating_sub(examples.len());
    let (extra, keys) = stray_keys(store, redis, KeyKind::Lookup, room, findings).await?;
    examples.extend(keys.iter().map(|key| {
        format!("{key} belongs to no id (the legacy platform's? `--repair` keeps it unless given --remove-unexplained-keys)")
    }));
    Ok(key_check(
        "redis_lookup_keys",
        missing,
        wrong,
        extra,
        examples,
    ))
}

/// A Redis check's result, with its breakdown as the note.
fn key_check(
    name: &'static str,
    missing: u64,
    wrong: u64,
    extra: u64,
    examples: Vec<String>,
) -> Check {
    let mut c = check(name, missing + wrong + extra, examples);
    c.note = (c.count > 0).then(|| format!("{missing} missing, {wrong} wrong, {extra} extra"));
    c
}

/// Counts the keys of `kind` that belong to nothing; the first `n` are
/// returned as examples, and (up to the repair's limit) kept for a repair.
async fn stray_keys(
    store: &Store,
    redis: &RedisProjection,
    kind: KeyKind,
    n: usize,
    findings: &mut Findings,
) -> Result<(u64, Vec<String>), VerifyError> {
    let (mut count, mut examples) = (0, Vec::new());
    let mut scan = StrayKeys::new(store, redis, kind);
    while let Some(stray) = scan.next_batch().await? {
        count += stray.len() as u64;
        for key in stray {
            if examples.len() < n {
                examples.push(key.clone());
            }
            if findings.stray_keys.len() < MAX_REPAIR_ORDERS {
                findings.stray_keys.push(key);
            }
        }
    }
    Ok((count, examples))
}

/// Every order with active ids has its hash, equal to MySQL's active ids;
/// no hash for an order without any.
async fn redis_active_ids(
    store: &Store,
    redis: &RedisProjection,
    n: usize,
    findings: &mut Findings,
) -> Result<Check, VerifyError> {
    let pool = store.pool();
    let (mut missing, mut wrong, mut examples) = (0u64, 0u64, Vec::new());
    let keys = redis.keys();
    let mut after = String::new();
    loop {
        let page = audit::active_orders_after(pool, &after, 500).await?;
        let Some(last) = page.last() else { break };
        after = last.clone();
        let orders: Vec<OrderId> = page.iter().filter_map(|o| OrderId::parse(o).ok()).collect();
        let mut active = id_projection::active_ids(pool, &orders).await?;
        let refs: Vec<&OrderId> = orders.iter().collect();
        let hashes = redis.active_hashes(&refs).await?;
        for (order, hash) in orders.iter().zip(hashes) {
            let expected: BTreeMap<String, String> = active
                .remove(order)
                .unwrap_or_default()
                .into_iter()
                .map(|(t, id)| (t.as_str().to_owned(), id.to_string()))
                .collect();
            let problem = if hash.is_empty() {
                missing += 1;
                format!("{} missing", keys.active(order))
            } else if hash != expected {
                wrong += 1;
                format!("{} is {hash:?}, not {expected:?}", keys.active(order))
            } else {
                continue;
            };
            findings.order(order);
            if examples.len() < n {
                examples.push(problem);
            }
        }
    }
    let room = n.saturating_sub(examples.len());
    let (extra, keys) = stray_keys(store, redis, KeyKind::Active, room, findings).await?;
    examples.extend(
        keys.iter()
            .map(|key| format!("{key} exists, but the order has no active id")),
    );
    Ok(key_check(
        "redis_active_ids",
        missing,
        wrong,
        extra,
        examples,
    ))
}

/// Per-order log sequences are 1..n: no gap, no duplicate.
async fn sequences(pool: &MySqlPool, n: usize) -> Result<Check, VerifyError> {
    let rows = audit::broken_sequences(pool).await?;
    let examples = rows
        .iter()
        .take(n)
        .map(|r| {
            format!(
                "order {}: {} entries, {} distinct seqs from {} to {}",
                r.order_id, r.entries, r.distinct_seqs, r.min_seq, r.max_seq
            )
        })
        .collect();
    Ok(check("sequences", rows.len() as u64, examples))
}

/// Parked events more than a minute of stream time past their limit:
/// nothing is expiring them (no `run` is up). Stream time is the lowest
/// of every consumer group's partitions (rule R7).
async fn parked_overdue(pool: &MySqlPool, n: usize) -> Result<Check, VerifyError> {
    let (count, rows) = audit::overdue_parked(pool, n).await?;
    let examples = rows
        .iter()
        .map(|r| {
            format!(
                "event {} waits for {} since its limit {} (Unix ms, stream time)",
                r.event_id, r.awaited_id, r.expires_at_ms
            )
        })
        .collect();
    Ok(check("parked_overdue", count, examples))
}

/// The parking lot's kept count (what `--max-parked` is checked against)
/// equals its rows.
async fn parking_lot_count(
    pool: &MySqlPool,
    findings: &mut Findings,
) -> Result<Check, VerifyError> {
    let (kept, rows) = parked::size_and_rows(pool).await?;
    let drift = kept.abs_diff(rows);
    findings.parking_lot_drifted = drift > 0;
    let examples = if drift > 0 {
        vec![format!(
            "parking_lot counts {kept} waiting events; parked_events holds {rows}"
        )]
    } else {
        Vec::new()
    };
    Ok(check("parking_lot_count", drift, examples))
}

/// Dead letters by reason (context), failing when some wait unpublished
/// for over five minutes (the outbox is stuck).
async fn dead_letters(pool: &MySqlPool, n: usize) -> Result<Check, VerifyError> {
    let by_reason: Vec<String> = audit::dead_letters_by_reason(pool)
        .await?
        .iter()
        .map(|(reason, count)| format!("{reason} {count}"))
        .collect();
    let (count, rows) = audit::stuck_dead_letters(pool, n).await?;
    let examples = rows
        .iter()
        .map(|r| {
            format!(
                "{}/{}@{} ({}) not published to the dead-letter topic",
                r.source_topic, r.source_partition, r.source_offset, r.reason
            )
        })
        .collect();
    let mut c = check("dead_letters", count, examples);
    c.note = Some(if by_reason.is_empty() {
        "no dead letters".to_owned()
    } else {
        format!("by reason: {}", by_reason.join(", "))
    });
    Ok(c)
}
