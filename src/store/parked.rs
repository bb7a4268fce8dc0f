//! The `parked_events` table: events waiting for an id not issued yet
//! (rule R7). Durable, so that parked events survive restarts.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::mysql::MySqlRow;
use sqlx::{MySql, MySqlConnection, QueryBuilder, Row};

use super::{opt_text, push_in, text, StoreError, MAX_ROWS_PER_STATEMENT};
use crate::domain::{EventId, LifecycleId};
use crate::wire::InboundMessage;

const TABLE: &str = "parked_events";

/// A parked event as stored.
#[derive(Debug, Clone)]
pub struct ParkedRow {
    pub row_id: i64,
    pub awaited: LifecycleId,
    /// The decoded event, contract JSON.
    pub event_json: String,
    /// The original message.
    pub message: InboundMessage,
}

/// An event to park.
#[derive(Debug, Clone)]
pub struct NewParked<'a> {
    pub awaited: LifecycleId,
    pub event_id: EventId,
    pub event_json: String,
    pub message: &'a InboundMessage,
}

fn corrupt(detail: impl ToString) -> StoreError {
    StoreError::Corrupt {
        table: TABLE,
        detail: detail.to_string(),
    }
}

const COLUMNS: &str = "id, awaited_id, event, source_topic, source_partition, source_offset, \
                       message_key, payload, content_type";

fn from_row(row: &MySqlRow) -> Result<ParkedRow, StoreError> {
    Ok(ParkedRow {
        row_id: row.try_get(0)?,
        awaited: LifecycleId::parse(text(row, 1, TABLE)?).map_err(corrupt)?,
        event_json: text(row, 2, TABLE)?.to_owned(),
        message: InboundMessage {
            topic: text(row, 3, TABLE)?.to_owned(),
            partition: row.try_get(4)?,
            offset: row.try_get(5)?,
            key: row.try_get(6)?,
            payload: row.try_get(7)?,
            content_type: opt_text(row, 8, TABLE)?.map(|c| c.as_bytes().to_vec()),
            timestamp_ms: None,
        },
    })
}

/// Parked events waiting for any of `ids`, oldest first, locked until the
/// transaction ends.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn awaiting(
    conn: &mut MySqlConnection,
    ids: &[LifecycleId],
) -> Result<Vec<ParkedRow>, StoreError> {
    let mut rows = Vec::new();
    for chunk in ids.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new(format!(
            "SELECT {COLUMNS} FROM parked_events FORCE INDEX (idx_parked_events_awaited) WHERE "
        ));
        push_in(&mut qb, "awaited_id", chunk);
        qb.push(" ORDER BY id FOR UPDATE");
        for row in qb.build().fetch_all(&mut *conn).await? {
            rows.push(from_row(&row)?);
        }
    }
    rows.sort_by_key(|r| r.row_id);
    Ok(rows)
}

/// How many events wait for each of `ids` (ids with none absent).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn count_awaiting(
    conn: &mut MySqlConnection,
    ids: &[&LifecycleId],
) -> Result<HashMap<LifecycleId, u64>, StoreError> {
    let mut counts = HashMap::new();
    for chunk in ids.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new(
            "SELECT awaited_id, COUNT(*) FROM parked_events \
             FORCE INDEX (idx_parked_events_awaited) WHERE ",
        );
        push_in(&mut qb, "awaited_id", chunk);
        qb.push(" GROUP BY awaited_id");
        for row in qb.build().fetch_all(&mut *conn).await? {
            let id = LifecycleId::parse(text(&row, 0, TABLE)?).map_err(corrupt)?;
            let n: i64 = row.try_get(1)?;
            counts.insert(id, u64::try_from(n).unwrap_or(0));
        }
    }
    Ok(counts)
}

/// Parks events until `timeout` after their message's Kafka timestamp, in
/// stream time (rule R7; see [`expired`]). A message without a timestamp
/// counts from now. Returns the rows inserted (for [`change_size`]).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn insert(
    conn: &mut MySqlConnection,
    rows: &[NewParked<'_>],
    timeout: Duration,
) -> Result<u64, StoreError> {
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let now_ms = crate::clock::now_ms();
    let mut inserted = 0;
    let bytes = |p: &NewParked<'_>| {
        p.event_json.len() + p.message.payload.as_ref().map_or(0, Vec::len) + 512
    };
    for chunk in super::byte_bounded(rows, bytes) {
        let mut qb = QueryBuilder::<MySql>::new(
            "INSERT INTO parked_events (awaited_id, event_id, event, source_topic, \
             source_partition, source_offset, message_key, payload, content_type, expires_at_ms) ",
        );
        qb.push_values(chunk, |mut row, p| {
            let m = p.message;
            let expires_at_ms = m.timestamp_ms.unwrap_or(now_ms).saturating_add(timeout_ms);
            row.push_bind(p.awaited.as_str())
                .push_bind(p.event_id.as_str())
                .push_bind(p.event_json.as_str())
                .push_bind(m.topic.as_str())
                .push_bind(m.partition)
                .push_bind(m.offset)
                .push_bind(m.key.as_deref())
                .push_bind(m.payload.as_deref())
                .push_bind(m.content_type.as_ref().map(|c| {
                    String::from_utf8_lossy(c)
                        .chars()
                        .take(255)
                        .collect::<String>()
                }))
                .push_bind(expires_at_ms);
        });
        inserted += qb.build().execute(&mut *conn).await?.rows_affected();
    }
    Ok(inserted)
}

/// Removes parked rows (applied, or dead-lettered); returns how many (for
/// [`change_size`]).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn delete(conn: &mut MySqlConnection, row_ids: &[i64]) -> Result<u64, StoreError> {
    let mut deleted = 0;
    for chunk in row_ids.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new("DELETE FROM parked_events WHERE id IN (");
        let mut list = qb.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        list.push_unseparated(")");
        deleted += qb.build().execute(&mut *conn).await?.rows_affected();
    }
    Ok(deleted)
}

/// How many events wait in the parking lot, as of the last committed
/// change (a plain read: two writers at once may each park a batch more).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn size(conn: &mut MySqlConnection) -> Result<u64, StoreError> {
    let n: Option<i64> = sqlx::query_scalar("SELECT parked FROM parking_lot WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await?;
    Ok(n.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
}

/// The parking lot's kept count and the rows it stands for, as one
/// snapshot: equal unless rows were deleted by hand, or written by a
/// version before the count existed (a rolling upgrade).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn size_and_rows(pool: &sqlx::MySqlPool) -> Result<(u64, u64), StoreError> {
    let (kept, rows): (Option<i64>, i64) = sqlx::query_as(
        "SELECT (SELECT parked FROM parking_lot WHERE id = 1), \
         (SELECT COUNT(*) FROM parked_events)",
    )
    .fetch_one(pool)
    .await?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok((kept.map_or(0, count), count(rows)))
}

/// Sets the kept count to the rows there are (`verify --repair`).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn recount(pool: &sqlx::MySqlPool) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE parking_lot SET parked = (SELECT COUNT(*) FROM parked_events) WHERE id = 1",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Keeps `parking_lot` in step with the rows of `parked_events`: every
/// transaction that inserts or deletes parked rows calls it once with the
/// net change ([`insert`] and [`delete`] return their counts), as late as
/// it can, right before it commits: the row is one lock for every writer,
/// held from this statement to the commit.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn change_size(conn: &mut MySqlConnection, by: i64) -> Result<(), StoreError> {
    if by != 0 {
        sqlx::query("UPDATE parking_lot SET parked = GREATEST(parked + ?, 0) WHERE id = 1")
            .bind(by)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Points a parked row at another awaited id (it was applied far enough to
/// find that it needs a second id).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn set_awaited(
    conn: &mut MySqlConnection,
    row_id: i64,
    awaited: &LifecycleId,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE parked_events SET awaited_id = ? WHERE id = ?")
        .bind(awaited.as_str())
        .bind(row_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Up to `limit` rows whose time is up in stream time, oldest first,
/// locked: their limit is at or before `stream_time_ms`, the point up to
/// which every partition that could still issue their id has been consumed
/// ([`super::offsets::stream_time`]).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn expired(
    conn: &mut MySqlConnection,
    stream_time_ms: i64,
    limit: u32,
) -> Result<Vec<ParkedRow>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM parked_events WHERE expires_at_ms <= ? ORDER BY id LIMIT ? FOR UPDATE"
    ))
    .bind(stream_time_ms)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Up to `limit` parked rows after row `after` whose awaited id is bound
/// already, oldest first, locked (see `release_stranded` in the pipeline).
/// Only the rows after `after` are read: the cost follows the rows parked
/// recently, not the size of the parking lot.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn stranded(
    conn: &mut MySqlConnection,
    after: i64,
    limit: u32,
) -> Result<Vec<ParkedRow>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM parked_events p WHERE p.id > ? AND EXISTS \
         (SELECT 1 FROM order_lifecycle_ids l \
          FORCE INDEX (uq_order_lifecycle_ids_lifecycle_id) \
          WHERE l.lifecycle_id = p.awaited_id) \
         ORDER BY id LIMIT ? FOR UPDATE"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(from_row).collect()
}

/// The highest parked row id committed so far (0 for none).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn last_row_id(pool: &sqlx::MySqlPool) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT CAST(COALESCE(MAX(id), 0) AS SIGNED) FROM parked_events")
            .fetch_one(pool)
            .await?,
    )
}
