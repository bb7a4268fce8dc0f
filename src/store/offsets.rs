//! Consumer offsets kept with the data: the next offset to read per
//! partition, written in the batch's transaction.

use sqlx::{MySql, MySqlConnection, QueryBuilder};

use super::{StoreError, MAX_ROWS_PER_STATEMENT};

/// The next offset to read from one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
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
            "INSERT INTO consumer_offsets (group_id, topic, kafka_partition, next_offset) ",
        );
        qb.push_values(chunk, |mut row, o| {
            row.push_bind(group_id)
                .push_bind(o.topic.as_str())
                .push_bind(o.partition)
                .push_bind(o.next_offset);
        });
        qb.push(
            " ON DUPLICATE KEY UPDATE next_offset = GREATEST(next_offset, VALUES(next_offset))",
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
