//! `verify`: is the lifecycle data healthy? Named checks, each with a count
//! and a few examples; exit code 0 when every check passes, 1 when one
//! fails, 2 when the checks could not run. `--repair` re-projects exactly
//! the orders the checks found wrong (MySQL rows from the log, then their
//! Redis keys) and removes Redis keys that belong to no id.
//!
//! | check | fails when | repaired |
//! |---|---|---|
//! | `one_active_per_type` | an (order, type) has more than one active id | yes |
//! | `orphan_ids` | an id's order is in neither legacy table (skipped when the tables are absent) | no: an operator question |
//! | `mysql_matches_log` | an order's rows differ from the log folded alone | yes |
//! | `redis_follows_log` | Redis's projection record names another log, or another history of this one (rule R12) | yes: re-projected from the start |
//! | `redis_lookup_keys` | `global_order_lookup:{id}` missing, wrong, or for no id | yes |
//! | `redis_active_ids` | `order_lifecycle_active:{order}` missing, wrong or extra | yes |
//! | `sequences` | an order's log sequence is not 1..n | no: the log is append-only |
//! | `parked_overdue` | a parked event is a minute of stream time past its limit (no consumer expires them) | no: start `run` |
//! | `dead_letters` | a dead letter waits unpublished for over five minutes (counts by reason shown) | no: start `run` |
//!
//! Checks read while `run` may be writing: orders that look wrong are
//! looked at again before they count, and the Redis checks wait (up to ten
//! seconds) for the follower to reach the log's head.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use sqlx::{MySqlPool, Row};

use crate::config::{DatabaseConfig, LegacyTables, RedisConfig};
use crate::domain::{IdRecord, LifecycleId, OrderId, OrderLifecycle};
use crate::projection::rebuild::{self, KeyKind, RebuildError, StrayKeys};
use crate::projection::redis_follower::{self, Resume};
use crate::store::fold::{self, FoldedChunks};
use crate::store::redis_projection::{RedisError, RedisProjection};
use crate::store::{event_log, id_projection, Store, StoreError, MAX_ROWS_PER_STATEMENT};

/// Orders the repair may hold in memory; beyond it, `rebuild` is the tool.
const MAX_REPAIR_ORDERS: usize = 100_000;

/// Options of `verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    /// The legacy tables, for the orphan check (in the same database).
    #[command(flatten)]
    pub tables: LegacyTables,
    /// Examples listed per check.
    #[arg(long, default_value_t = 5)]
    pub examples: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Re-project the orders found wrong, then check again.
    #[arg(long)]
    pub repair: bool,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// One named check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// Faults found (0 when passing).
    pub count: u64,
    pub examples: Vec<String>,
    /// Why skipped, or context (counts by reason, Redis lag).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Every check, and what `--repair` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub healthy: bool,
    pub checks: Vec<Check>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<Repaired>,
}

impl Report {
    /// The check of that name.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// What a repair rewrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Repaired {
    pub orders: u64,
    pub rows: u64,
    pub redis_keys_removed: u64,
    /// Log entries re-projected into a Redis that followed another log.
    pub redis_entries: u64,
}

/// Why the checks could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Scan(#[from] RebuildError),
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// `verify`'s exit code: 0 healthy, 1 a check failed, 2 the checks could
/// not run (said on stderr).
pub async fn run_command(config: VerifyConfig) -> std::process::ExitCode {
    match run(config).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            tracing::error!(error = %e, "verify could not run its checks");
            eprintln!("verify: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Runs `verify` as the command line asks, prints the report, and returns
/// whether the store is healthy.
///
/// # Errors
/// [`VerifyError`] when the checks could not run.
pub async fn run(config: VerifyConfig) -> Result<bool, VerifyError> {
    let store = Store::connect(&config.database.url, config.database.max_connections).await?;
    store.migrate().await?;
    let redis =
        RedisProjection::connect(config.redis.url.expose(), &config.redis.key_prefix).await?;
    let report = verify(&store, &redis, &config).await?;
    if config.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", human(&report));
    }
    Ok(report.healthy)
}

/// The report for people.
pub fn human(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(r) = &report.repaired {
        let _ = writeln!(
            out,
            "repaired: {} orders re-projected ({} rows), {} stray Redis keys removed, \
             {} log entries re-projected into Redis; checked again:",
            r.orders, r.rows, r.redis_keys_removed, r.redis_entries
        );
    }
    let failed = report
        .checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .count();
    let _ = writeln!(
        out,
        "verify: {} checks, {} failed: {}",
        report.checks.len(),
        failed,
        if report.healthy {
            "healthy"
        } else {
            "NOT HEALTHY"
        }
    );
    for c in &report.checks {
        let status = match c.status {
            Status::Pass => "ok  ",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        let _ = writeln!(out, "  {status} {:<22} {:>8}", c.name, c.count);
        if let Some(note) = &c.note {
            let _ = writeln!(out, "         {note}");
        }
        for e in &c.examples {
            let _ = writeln!(out, "         - {e}");
        }
    }
    out
}

/// Everything the checks found, for a repair.
#[derive(Default)]
struct Findings {
    orders: BTreeSet<OrderId>,
    stray_keys: Vec<String>,
    /// Redis follows another log or history: re-project it whole.
    redis_diverged: bool,
}

impl Findings {
    fn order(&mut self, order: &OrderId) {
        if self.orders.len() < MAX_REPAIR_ORDERS {
            self.orders.insert(order.clone());
        }
    }
}

/// Runs every check (and, with `repair`, repairs and checks again).
///
/// # Errors
/// [`VerifyError`] when the checks could not run.
pub async fn verify(
    store: &Store,
    redis: &RedisProjection,
    config: &VerifyConfig,
) -> Result<Report, VerifyError> {
    config
        .tables
        .names()
        .map_err(|e| VerifyError::Invalid(e.to_string()))?;
    let mut findings = Findings::default();
    let mut report = check_all(store, redis, config, &mut findings).await?;
    if config.repair && !report.healthy {
        let repaired = repair(store, redis, &findings).await?;
        let mut again = Findings::default();
        report = check_all(store, redis, config, &mut again).await?;
        report.repaired = Some(repaired);
    }
    Ok(report)
}

async fn check_all(
    store: &Store,
    redis: &RedisProjection,
    config: &VerifyConfig,
    findings: &mut Findings,
) -> Result<Report, VerifyError> {
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
    checks.push(dead_letters(pool, n).await?);
    Ok(Report {
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

/// A text column for a report. Unlike the store's strict reader, a value
/// that is not UTF-8 is shown lossily instead of failing the whole check.
fn text_at(row: &sqlx::mysql::MySqlRow, i: usize) -> Result<String, StoreError> {
    let raw: Vec<u8> = row.try_get(i)?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// The seed's health check: more than one active id per (order, type).
async fn one_active_per_type(
    pool: &MySqlPool,
    n: usize,
    findings: &mut Findings,
) -> Result<Check, VerifyError> {
    let rows = sqlx::query(
        "SELECT order_id, CAST(id_type AS CHAR), COUNT(*) FROM order_lifecycle_ids \
         WHERE status = 'active' GROUP BY order_id, id_type HAVING COUNT(*) > 1",
    )
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)?;
    let mut examples = Vec::new();
    for row in &rows {
        let order = text_at(row, 0)?;
        let id_type = text_at(row, 1)?;
        let count: i64 = row.try_get(2).map_err(StoreError::from)?;
        if let Ok(o) = OrderId::parse(&order) {
            findings.order(&o);
        }
        if examples.len() < n {
            examples.push(format!("order {order}: {count} active {id_type}"));
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
        let found: Option<Option<String>> = sqlx::query_scalar(
            "SELECT CAST(COLLATION_NAME AS CHAR) FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = 'order_id'",
        )
        .bind(table)
        .fetch_optional(pool)
        .await
        .map_err(StoreError::from)?;
        match found {
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
    // Compare in the legacy column's collation, so that its index serves.
    let side = |collation: &Option<String>| match collation {
        Some(c) if c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
            format!("l.order_id COLLATE {c}")
        }
        _ => "l.order_id".to_owned(),
    };
    let filter = format!(
        "FROM order_lifecycle_ids l WHERE NOT EXISTS (SELECT 1 FROM `{live}` lo WHERE lo.order_id = {a}) \
         AND NOT EXISTS (SELECT 1 FROM `{demo}` d WHERE d.order_id = {b})",
        live = tables[0],
        demo = tables[1],
        a = side(&collations[0]),
        b = side(&collations[1]),
    );
    counted_check(
        pool,
        "orphan_ids",
        &filter,
        "l.lifecycle_id, l.order_id",
        "l.order_id",
        n,
        |r| Ok(format!("id {} of order {}", text_at(r, 0)?, text_at(r, 1)?)),
    )
    .await
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
    let extra: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT CAST(p.order_id AS CHAR) FROM order_lifecycle_ids p \
         WHERE NOT EXISTS (SELECT 1 FROM lifecycle_events e WHERE e.order_id = p.order_id)",
    )
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)?;
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
    let mut after = String::new();
    loop {
        let rows = sqlx::query(
            "SELECT lifecycle_id, order_id FROM order_lifecycle_ids \
             WHERE lifecycle_id > ? ORDER BY lifecycle_id LIMIT 1000",
        )
        .bind(&after)
        .fetch_all(pool)
        .await
        .map_err(StoreError::from)?;
        let Some(last) = rows.last() else { break };
        after = text_at(last, 0)?;
        let pairs: Vec<(LifecycleId, OrderId)> = rows
            .iter()
            .filter_map(|r| {
                let id = LifecycleId::parse(&text_at(r, 0).ok()?).ok()?;
                let order = OrderId::parse(&text_at(r, 1).ok()?).ok()?;
                Some((id, order))
            })
            .collect();
        let ids: Vec<&LifecycleId> = pairs.iter().map(|(id, _)| id).collect();
        let found = redis.lookups(&ids).await?;
        for ((id, order), value) in pairs.iter().zip(found) {
            let problem = match value {
                None => {
                    missing += 1;
                    format!("global_order_lookup:{id} missing (order {order})")
                }
                Some(v) if v != order.as_str() => {
                    wrong += 1;
                    format!("global_order_lookup:{id} names {v:?}, not {order}")
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
    examples.extend(keys.iter().map(|key| format!("{key} belongs to no id")));
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
    let mut after = String::new();
    loop {
        let page: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT CAST(order_id AS CHAR) FROM order_lifecycle_ids \
             WHERE status = 'active' AND order_id > ? ORDER BY 1 LIMIT 500",
        )
        .bind(&after)
        .fetch_all(pool)
        .await
        .map_err(StoreError::from)?;
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
                format!("order_lifecycle_active:{order} missing")
            } else if hash != expected {
                wrong += 1;
                format!("order_lifecycle_active:{order} is {hash:?}, not {expected:?}")
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
    let rows = sqlx::query(
        "SELECT order_id, COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) FROM lifecycle_events \
         GROUP BY order_id \
         HAVING COUNT(*) <> MAX(seq) OR MIN(seq) <> 1 OR COUNT(DISTINCT seq) <> COUNT(*)",
    )
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)?;
    let mut examples = Vec::new();
    for row in rows.iter().take(n) {
        let entries: i64 = row.try_get(1).map_err(StoreError::from)?;
        let distinct: i64 = row.try_get(2).map_err(StoreError::from)?;
        let min: i64 = row.try_get(3).map_err(StoreError::from)?;
        let max: i64 = row.try_get(4).map_err(StoreError::from)?;
        examples.push(format!(
            "order {}: {entries} entries, {distinct} distinct seqs from {min} to {max}",
            text_at(row, 0)?
        ));
    }
    Ok(check("sequences", rows.len() as u64, examples))
}

/// Parked events more than a minute of stream time past their limit:
/// nothing is expiring them (no `run` is up). Stream time is the lowest
/// of every consumer group's partitions (rule R7).
async fn parked_overdue(pool: &MySqlPool, n: usize) -> Result<Check, VerifyError> {
    counted_check(
        pool,
        "parked_overdue",
        "FROM parked_events WHERE expires_at_ms < \
         (SELECT MIN(COALESCE(stream_time_ms, 0)) FROM consumer_offsets) - 60000",
        "event_id, awaited_id, CAST(expires_at_ms AS CHAR)",
        "expires_at_ms",
        n,
        |r| {
            Ok(format!(
                "event {} waits for {} since its limit {} (Unix ms, stream time)",
                text_at(r, 0)?,
                text_at(r, 1)?,
                text_at(r, 2)?
            ))
        },
    )
    .await
}

/// A check counting the rows `from_where` selects, the first `n` (by
/// `order_by`) described from `columns`.
async fn counted_check(
    pool: &MySqlPool,
    name: &'static str,
    from_where: &str,
    columns: &str,
    order_by: &str,
    n: usize,
    describe: impl Fn(&sqlx::mysql::MySqlRow) -> Result<String, StoreError>,
) -> Result<Check, VerifyError> {
    let count: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {from_where}"))
        .fetch_one(pool)
        .await
        .map_err(StoreError::from)?;
    let examples = sqlx::query(&format!(
        "SELECT {columns} {from_where} ORDER BY {order_by} LIMIT ?"
    ))
    .bind(n as u32)
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)?
    .iter()
    .map(describe)
    .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(check(name, count as u64, examples))
}

/// Dead letters by reason (context), failing when some wait unpublished
/// for over five minutes (the outbox is stuck).
async fn dead_letters(pool: &MySqlPool, n: usize) -> Result<Check, VerifyError> {
    let by_reason = sqlx::query(
        "SELECT reason, COUNT(*) FROM dead_letters GROUP BY reason ORDER BY COUNT(*) DESC",
    )
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)?
    .iter()
    .map(|r| Ok(format!("{} {}", text_at(r, 0)?, r.try_get::<i64, _>(1)?)))
    .collect::<Result<Vec<_>, StoreError>>()?;
    let mut c = counted_check(
        pool,
        "dead_letters",
        "FROM dead_letters WHERE published_at IS NULL AND created_at < NOW(3) - INTERVAL 5 MINUTE",
        "source_topic, source_partition, source_offset, reason",
        "id",
        n,
        |r| {
            Ok(format!(
                "{}/{}@{} ({}) not published to the dead-letter topic",
                text_at(r, 0)?,
                r.try_get::<i32, _>(1)?,
                r.try_get::<i64, _>(2)?,
                text_at(r, 3)?
            ))
        },
    )
    .await?;
    c.note = Some(if by_reason.is_empty() {
        "no dead letters".to_owned()
    } else {
        format!("by reason: {}", by_reason.join(", "))
    });
    Ok(c)
}

/// Re-projects the orders found wrong from the log (rows replaced in one
/// transaction per chunk, holding the orders' rows so that no batch moves
/// them meanwhile), rewrites their Redis keys, and removes stray keys.
async fn repair(
    store: &Store,
    redis: &RedisProjection,
    findings: &Findings,
) -> Result<Repaired, VerifyError> {
    let pool = store.pool();
    let mut repaired = Repaired::default();
    if findings.redis_diverged {
        redis.reset().await?;
        repaired.redis_entries =
            rebuild::catch_up_to_head(store, redis, "re-project redis").await?;
    }
    let orders: Vec<OrderId> = findings.orders.iter().cloned().collect();
    // Keys the repair writes: a "stray" key of an id whose row was missing
    // is right again once its order is re-projected.
    let mut written = std::collections::HashSet::new();
    let keys = redis.keys();
    for chunk in orders.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut tx = pool.begin().await.map_err(StoreError::from)?;
        id_projection::share_projection_lock(&mut tx).await?;
        id_projection::load_records(&mut tx, chunk, true).await?;
        let folded = fold::orders_of(pool, chunk).await?;
        let mut qb =
            sqlx::QueryBuilder::<sqlx::MySql>::new("DELETE FROM order_lifecycle_ids WHERE ");
        crate::store::push_in(&mut qb, "order_id", chunk);
        qb.build()
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        let rows: Vec<(&OrderId, &IdRecord)> =
            folded.iter().flat_map(OrderLifecycle::rows).collect();
        id_projection::upsert(&mut tx, &rows).await?;
        tx.commit().await.map_err(StoreError::from)?;
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
        written.extend(lookups.iter().map(|(id, _)| keys.lookup(id)));
        written.extend(
            hashes
                .iter()
                .filter(|(_, active)| !active.is_empty())
                .map(|(o, _)| keys.active(o)),
        );
    }
    let stray: Vec<&String> = findings
        .stray_keys
        .iter()
        .filter(|k| !written.contains(*k))
        .collect();
    for keys in stray.chunks(1000) {
        repaired.redis_keys_removed += redis.delete(keys).await?;
    }
    Ok(repaired)
}
