//! Consumer offsets kept with the data: the next offset to read per
//! partition, written in the batch's transaction; and each partition's
//! stream time, which decides when a parked event expires (rule R7).

use sqlx::{MySql, MySqlConnection, QueryBuilder};

use super::{StoreError, MAX_ROWS_PER_STATEMENT};

/// The next offset to read from one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
    /// The newest Kafka timestamp applied from the partition, if any.
    pub stream_time_ms: Option<i64>,
}

/// Saves next offsets for a consumer group; never moves an offset backwards.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn save(
    conn: &mut MySqlConnection,
    group_id: &str,
    offsets: &[PartitionOffset],
) -> Result<(), StoreError> {
    for chunk in offsets.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new(
            "INSERT INTO consumer_offsets (group_id, topic, kafka_partition, next_offset, \
             stream_time_ms) ",
        );
        qb.push_values(chunk, |mut row, o| {
            row.push_bind(group_id)
                .push_bind(o.topic.as_str())
                .push_bind(o.partition)
                .push_bind(o.next_offset)
                .push_bind(o.stream_time_ms);
        });
        // GREATEST is NULL when either side is: COALESCE keeps the other.
        qb.push(
            " ON DUPLICATE KEY UPDATE next_offset = GREATEST(next_offset, VALUES(next_offset)), \
             stream_time_ms = COALESCE(GREATEST(stream_time_ms, VALUES(stream_time_ms)), \
             stream_time_ms, VALUES(stream_time_ms))",
        );
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// The stored next offset of one partition for a consumer group.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn load(
    pool: &sqlx::MySqlPool,
    group_id: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT next_offset FROM consumer_offsets \
         WHERE group_id = ? AND topic = ? AND kafka_partition = ?",
    )
    .bind(group_id)
    .bind(topic)
    .bind(partition)
    .fetch_optional(pool)
    .await?)
}

/// The stored next offsets of a group's partitions among `partitions`.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn load_many(
    pool: &sqlx::MySqlPool,
    group_id: &str,
    partitions: &[(String, i32)],
) -> Result<Vec<((String, i32), i64)>, StoreError> {
    let mut found = Vec::new();
    for chunk in partitions.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new(
            "SELECT CAST(topic AS CHAR), kafka_partition, next_offset FROM consumer_offsets \
             WHERE group_id = ",
        );
        qb.push_bind(group_id);
        push_partitions(&mut qb, chunk);
        let rows: Vec<(String, i32, i64)> = qb.build_query_as().fetch_all(pool).await?;
        found.extend(rows.into_iter().map(|(t, p, o)| ((t, p), o)));
    }
    Ok(found)
}

/// Moves the stream time of partitions that are caught up to their end
/// forward to `now_ms`: nothing older can still arrive on them. Only rows
/// that exist are touched (a partition never consumed holds nothing back).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn advance_stream_time(
    pool: &sqlx::MySqlPool,
    group_id: &str,
    partitions: &[(String, i32)],
    now_ms: i64,
) -> Result<(), StoreError> {
    for chunk in partitions.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new("UPDATE consumer_offsets SET stream_time_ms = ");
        qb.push("COALESCE(GREATEST(stream_time_ms, ");
        qb.push_bind(now_ms);
        qb.push("), ");
        qb.push_bind(now_ms);
        qb.push(") WHERE group_id = ");
        qb.push_bind(group_id);
        push_partitions(&mut qb, chunk);
        qb.build().execute(pool).await?;
    }
    Ok(())
}

/// The group's stream time over `topics`: the lowest stream time of their
/// partitions, the point up to which everything has been consumed. A
/// partition with no stream time yet holds it at 0. `None` when the group
/// has consumed nothing from these topics.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn stream_time(
    pool: &sqlx::MySqlPool,
    group_id: &str,
    topics: &[String],
) -> Result<Option<i64>, StoreError> {
    if topics.is_empty() {
        return Ok(None);
    }
    let mut qb = QueryBuilder::<MySql>::new(
        "SELECT MIN(COALESCE(stream_time_ms, 0)) FROM consumer_offsets WHERE group_id = ",
    );
    qb.push_bind(group_id);
    qb.push(" AND ");
    super::push_in(&mut qb, "topic", topics);
    Ok(qb.build_query_scalar().fetch_one(pool).await?)
}

/// Appends ` AND (topic, kafka_partition) IN ((?, ?), ...)`.
fn push_partitions<'a>(qb: &mut QueryBuilder<'a, MySql>, partitions: &'a [(String, i32)]) {
    qb.push(" AND (topic, kafka_partition) IN (");
    let mut list = qb.separated(", ");
    for (topic, partition) in partitions {
        list.push("(");
        list.push_bind_unseparated(topic.as_str());
        list.push_unseparated(", ");
        list.push_bind_unseparated(*partition);
        list.push_unseparated(")");
    }
    list.push_unseparated(")");
}

/// Messages the group has committed over all partitions: the sum of its
/// stored next offsets (for a fresh topic, where every partition starts at
/// 0; the benches' progress).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn committed_total(pool: &sqlx::MySqlPool, group: &str) -> Result<u64, StoreError> {
    let total: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(next_offset), 0) AS SIGNED) FROM consumer_offsets \
         WHERE group_id = ?",
    )
    .bind(group)
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(total).unwrap_or(0))
}

/// Sets a partition's stored offset to `next_offset`, down as well as up
/// ([`save`] only raises it): for a topic deleted and created again, whose
/// offsets start over.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn reset(
    pool: &sqlx::MySqlPool,
    group_id: &str,
    topic: &str,
    partition: i32,
    next_offset: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE consumer_offsets SET next_offset = ? \
         WHERE group_id = ? AND topic = ? AND kafka_partition = ?",
    )
    .bind(next_offset)
    .bind(group_id)
    .bind(topic)
    .bind(partition)
    .execute(pool)
    .await?;
    Ok(())
}
