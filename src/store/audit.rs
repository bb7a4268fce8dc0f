//! The read-only queries of `verify`'s checks: each names what it looks
//! for and returns typed rows. Table names of the legacy tables come from
//! the configuration, checked to be plain identifiers
//! ([`crate::config::LegacyTables::names`]); every value is bound.

use sqlx::MySqlPool;

use super::StoreError;

/// An (order, id type) with more than one active id.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DuplicateActive {
    pub order_id: String,
    pub id_type: String,
    pub count: i64,
}

/// Every (order, id type) with more than one active id.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn duplicate_actives(pool: &MySqlPool) -> Result<Vec<DuplicateActive>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT CAST(order_id AS CHAR) AS order_id, CAST(id_type AS CHAR) AS id_type, \
         COUNT(*) AS count FROM order_lifecycle_ids \
         WHERE status = 'active' GROUP BY order_id, id_type HAVING COUNT(*) > 1",
    )
    .fetch_all(pool)
    .await?)
}

/// The collation of `table`'s `order_id` column: `None` when the table or
/// the column does not exist, `Some(None)` when it has none.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn order_id_collation(
    pool: &MySqlPool,
    table: &str,
) -> Result<Option<Option<String>>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT CAST(COLLATION_NAME AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = 'order_id'",
    )
    .bind(table)
    .fetch_optional(pool)
    .await?)
}

/// An id and its order.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Binding {
    pub lifecycle_id: String,
    pub order_id: String,
}

/// A legacy table and the collation of its `order_id` column.
#[derive(Debug, Clone, Copy)]
pub struct LegacyTable<'a> {
    pub name: &'a str,
    pub collation: Option<&'a str>,
}

/// Ids whose order is in neither legacy table: how many, and the first
/// `limit` by order. Compared in each legacy column's collation, so that
/// its index serves.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn orphan_ids(
    pool: &MySqlPool,
    live: LegacyTable<'_>,
    demo: LegacyTable<'_>,
    limit: usize,
) -> Result<(u64, Vec<Binding>), StoreError> {
    let side = |collation: Option<&str>| match collation {
        Some(c) if c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
            format!("l.order_id COLLATE {c}")
        }
        _ => "l.order_id".to_owned(),
    };
    let filter = format!(
        "FROM order_lifecycle_ids l WHERE NOT EXISTS (SELECT 1 FROM `{live}` lo WHERE lo.order_id = {a}) \
         AND NOT EXISTS (SELECT 1 FROM `{demo}` d WHERE d.order_id = {b})",
        live = live.name,
        demo = demo.name,
        a = side(live.collation),
        b = side(demo.collation),
    );
    let count: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {filter}"))
        .fetch_one(pool)
        .await?;
    let examples = sqlx::query_as(&format!(
        "SELECT CAST(l.lifecycle_id AS CHAR) AS lifecycle_id, CAST(l.order_id AS CHAR) AS order_id \
         {filter} ORDER BY l.order_id LIMIT ?"
    ))
    .bind(limit as u64)
    .fetch_all(pool)
    .await?;
    Ok((u64::try_from(count).unwrap_or(0), examples))
}

/// Orders with rows in `order_lifecycle_ids` but no log entry.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn orders_missing_from_log(pool: &MySqlPool) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT CAST(p.order_id AS CHAR) FROM order_lifecycle_ids p \
         WHERE NOT EXISTS (SELECT 1 FROM lifecycle_events e WHERE e.order_id = p.order_id)",
    )
    .fetch_all(pool)
    .await?)
}

/// The next `limit` bindings after id `after`, by id (keyset pagination).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn bindings_after(
    pool: &MySqlPool,
    after: &str,
    limit: u32,
) -> Result<Vec<Binding>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT CAST(lifecycle_id AS CHAR) AS lifecycle_id, CAST(order_id AS CHAR) AS order_id \
         FROM order_lifecycle_ids WHERE lifecycle_id > ? ORDER BY lifecycle_id LIMIT ?",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// The next `limit` orders with an active id after order `after`, in the
/// column's (binary) order.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn active_orders_after(
    pool: &MySqlPool,
    after: &str,
    limit: u32,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        // Ordered by the column itself, in its binary collation, as the
        // `>` compares: ordering by the CAST (the connection's
        // case-insensitive collation) skipped mixed-case orders.
        "SELECT CAST(order_id AS CHAR) FROM order_lifecycle_ids \
         WHERE status = 'active' AND order_id > ? GROUP BY order_id ORDER BY order_id LIMIT ?",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// An order whose log sequence is not 1..n.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BrokenSequence {
    pub order_id: String,
    pub entries: i64,
    pub distinct_seqs: i64,
    pub min_seq: i64,
    pub max_seq: i64,
}

/// Every order whose log sequence has a gap or a repeat.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn broken_sequences(pool: &MySqlPool) -> Result<Vec<BrokenSequence>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT CAST(order_id AS CHAR) AS order_id, COUNT(*) AS entries, \
         COUNT(DISTINCT seq) AS distinct_seqs, MIN(seq) AS min_seq, MAX(seq) AS max_seq \
         FROM lifecycle_events GROUP BY order_id \
         HAVING COUNT(*) <> MAX(seq) OR MIN(seq) <> 1 OR COUNT(DISTINCT seq) <> COUNT(*)",
    )
    .fetch_all(pool)
    .await?)
}

/// A parked event past its limit.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OverdueParked {
    pub event_id: String,
    pub awaited_id: String,
    pub expires_at_ms: i64,
}

/// Parked events more than a minute of stream time (the lowest of every
/// consumer group's partitions) past their limit: how many, and the first
/// `limit` by limit.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn overdue_parked(
    pool: &MySqlPool,
    limit: usize,
) -> Result<(u64, Vec<OverdueParked>), StoreError> {
    const FILTER: &str = "FROM parked_events WHERE expires_at_ms < \
         (SELECT MIN(COALESCE(stream_time_ms, 0)) FROM consumer_offsets) - 60000";
    let count: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {FILTER}"))
        .fetch_one(pool)
        .await?;
    let examples = sqlx::query_as(&format!(
        "SELECT CAST(event_id AS CHAR) AS event_id, CAST(awaited_id AS CHAR) AS awaited_id, \
         expires_at_ms {FILTER} ORDER BY expires_at_ms LIMIT ?"
    ))
    .bind(limit as u64)
    .fetch_all(pool)
    .await?;
    Ok((u64::try_from(count).unwrap_or(0), examples))
}

/// Dead letters by reason, most frequent first.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn dead_letters_by_reason(pool: &MySqlPool) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT CAST(reason AS CHAR), COUNT(*) FROM dead_letters GROUP BY reason \
         ORDER BY COUNT(*) DESC",
    )
    .fetch_all(pool)
    .await?)
}

/// A dead letter not published yet.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UnpublishedLetter {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub reason: String,
}

/// Dead letters waiting unpublished for over five minutes (the outbox is
/// stuck): how many, and the oldest `limit`.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn stuck_dead_letters(
    pool: &MySqlPool,
    limit: usize,
) -> Result<(u64, Vec<UnpublishedLetter>), StoreError> {
    const FILTER: &str = "FROM dead_letters WHERE published_at IS NULL \
         AND created_at < NOW(3) - INTERVAL 5 MINUTE";
    let count: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {FILTER}"))
        .fetch_one(pool)
        .await?;
    let examples = sqlx::query_as(&format!(
        "SELECT CAST(source_topic AS CHAR) AS source_topic, source_partition, source_offset, \
         CAST(reason AS CHAR) AS reason {FILTER} ORDER BY id LIMIT ?"
    ))
    .bind(limit as u64)
    .fetch_all(pool)
    .await?;
    Ok((u64::try_from(count).unwrap_or(0), examples))
}
