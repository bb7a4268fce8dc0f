//! The `dead_letters` table: rejected input, kept whole with its reason, and
//! the outbox of the dead-letter topic (`published_at` is set once the broker
//! has the letter).

use std::borrow::Cow;

use sqlx::{MySql, MySqlConnection, QueryBuilder, Row};

use super::{opt_text, text, StoreError, MAX_ROWS_PER_STATEMENT};
use crate::domain::{EventId, OrderEvent, OrderId};
use crate::wire::InboundMessage;

/// Longest error text stored; reasons are short, but a message quoting
/// hostile input must not be.
const MAX_ERROR_CHARS: usize = 2000;

/// One rejected message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub content_type: Option<String>,
    /// Stable machine-readable reason (`undecodable_json`, `id_bound_to_other_order`, ...).
    pub reason: Cow<'static, str>,
    /// Human-readable explanation.
    pub error: String,
    pub event_id: Option<EventId>,
    pub order_id: Option<OrderId>,
}

impl DeadLetter {
    /// A dead-letter record for `message`, rejected for `reason`; `event`
    /// when it could be decoded.
    pub fn for_message(
        message: &InboundMessage,
        reason: &'static str,
        error: String,
        event: Option<&OrderEvent>,
    ) -> DeadLetter {
        DeadLetter {
            topic: message.topic.clone(),
            partition: message.partition,
            offset: message.offset,
            key: message.key.clone(),
            payload: message.payload.clone(),
            content_type: message
                .content_type
                .as_ref()
                .map(|c| String::from_utf8_lossy(c).chars().take(255).collect()),
            reason: reason.into(),
            error,
            event_id: event.map(|e| e.event_id.clone()),
            order_id: event.and_then(|e| e.order_id.clone()),
        }
    }
}

/// Records dead letters; a message already recorded (redelivery) is
/// skipped, unless its letter was redriven: refused again, the letter takes
/// the new reason and error and goes back into the outbox.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn insert(conn: &mut MySqlConnection, letters: &[DeadLetter]) -> Result<(), StoreError> {
    let bytes = |d: &DeadLetter| {
        d.payload.as_ref().map_or(0, Vec::len)
            + d.key.as_ref().map_or(0, Vec::len)
            + d.error.len().min(MAX_ERROR_CHARS * 4)
            + 512
    };
    for chunk in super::byte_bounded(letters, bytes) {
        let mut qb = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO dead_letters (source_topic, source_partition, source_offset, \
             message_key, payload, content_type, reason, error, event_id, order_id) ",
        );
        qb.push_values(chunk, |mut row, d| {
            let error: String = d.error.chars().take(MAX_ERROR_CHARS).collect();
            row.push_bind(d.topic.as_str())
                .push_bind(d.partition)
                .push_bind(d.offset)
                .push_bind(d.key.as_deref())
                .push_bind(d.payload.as_deref())
                .push_bind(d.content_type.as_deref())
                .push_bind(d.reason.as_ref())
                .push_bind(error)
                .push_bind(d.event_id.as_ref().map(|e| e.as_str()))
                .push_bind(d.order_id.as_ref().map(|o| o.as_str()));
        });
        // Assignments apply left to right: `redriven_at` is cleared last.
        qb.push(
            " ON DUPLICATE KEY UPDATE \
             reason = IF(redriven_at IS NULL, reason, VALUES(reason)), \
             error = IF(redriven_at IS NULL, error, VALUES(error)), \
             event_id = IF(redriven_at IS NULL, event_id, VALUES(event_id)), \
             order_id = IF(redriven_at IS NULL, order_id, VALUES(order_id)), \
             published_at = IF(redriven_at IS NULL, published_at, NULL), \
             created_at = IF(redriven_at IS NULL, created_at, CURRENT_TIMESTAMP(3)), \
             redriven_at = NULL",
        );
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

const TABLE: &str = "dead_letters";

/// A letter of the outbox as it was read: its row and when the row was
/// (re)written. A letter redriven and refused again while it was being
/// published is rewritten (new reason, new time): marking it published by
/// row alone would lose the new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxKey {
    pub id: i64,
    written_at: String,
}

/// Up to `limit` letters not yet on the dead-letter topic, oldest first,
/// with their outbox keys, locked until `conn`'s transaction ends. Rows
/// locked by someone else are skipped (`SKIP LOCKED`): letters another
/// publisher (a leader handing over) is publishing, and letters a batch has
/// written but not committed yet; each is published once, and nothing here
/// waits for another transaction.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn unpublished(
    conn: &mut MySqlConnection,
    limit: u32,
) -> Result<Vec<(OutboxKey, DeadLetter)>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, source_topic, source_partition, source_offset, message_key, payload, \
         content_type, reason, error, event_id, order_id, CAST(created_at AS CHAR) \
         FROM dead_letters WHERE published_at IS NULL ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            let id = |i| -> Result<Option<String>, StoreError> {
                Ok(opt_text(row, i, TABLE)?.map(str::to_owned))
            };
            Ok((
                OutboxKey {
                    id: row.try_get(0)?,
                    written_at: text(row, 11, TABLE)?.to_owned(),
                },
                DeadLetter {
                    topic: text(row, 1, TABLE)?.to_owned(),
                    partition: row.try_get(2)?,
                    offset: row.try_get(3)?,
                    key: row.try_get(4)?,
                    payload: row.try_get(5)?,
                    content_type: id(6)?,
                    reason: Cow::Owned(text(row, 7, TABLE)?.to_owned()),
                    error: text(row, 8, TABLE)?.to_owned(),
                    event_id: id(9)?.and_then(|e| EventId::parse(&e).ok()),
                    order_id: id(10)?.and_then(|o| OrderId::parse(&o).ok()),
                },
            ))
        })
        .collect()
}

/// Records that the letters, as read, are on the topic.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn mark_published(
    conn: &mut MySqlConnection,
    keys: &[OutboxKey],
) -> Result<(), StoreError> {
    for chunk in keys.chunks(MAX_ROWS_PER_STATEMENT) {
        let ids: Vec<i64> = chunk.iter().map(|k| k.id).collect();
        let mut qb =
            QueryBuilder::<MySql>::new("UPDATE dead_letters SET published_at = NOW(3) WHERE TRUE");
        push_ids(&mut qb, &ids);
        // The version read, not a newer one (see [`OutboxKey`]).
        qb.push(" AND (id, created_at) IN (");
        let mut list = qb.separated(", ");
        for key in chunk {
            list.push("(")
                .push_bind_unseparated(key.id)
                .push_unseparated(", ")
                .push_bind_unseparated(key.written_at.as_str())
                .push_unseparated(")");
        }
        list.push_unseparated(")");
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Which dead letters `redrive` takes.
#[derive(Debug, Clone, Default)]
pub struct RedriveSelection {
    /// Letters with one of these reasons (any, when empty).
    pub reasons: Vec<String>,
    /// Letters with one of these row ids (any, when empty).
    pub ids: Vec<i64>,
}

/// Up to `limit` letters after row `after` that `selection` names and that
/// are not redriven yet, oldest first, with their row ids and their
/// messages as they were consumed; locked until the transaction ends, so
/// that a second `redrive` at the same time waits and then skips them.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn for_redrive(
    conn: &mut MySqlConnection,
    selection: &RedriveSelection,
    after: i64,
    limit: u32,
) -> Result<Vec<(i64, InboundMessage)>, StoreError> {
    let mut qb = QueryBuilder::<MySql>::new(
        "SELECT id, source_topic, source_partition, source_offset, message_key, payload, \
         content_type FROM dead_letters WHERE redriven_at IS NULL AND id > ",
    );
    qb.push_bind(after);
    if !selection.reasons.is_empty() {
        qb.push(" AND ");
        super::push_in(&mut qb, "reason", &selection.reasons);
    }
    if !selection.ids.is_empty() {
        push_ids(&mut qb, &selection.ids);
    }
    qb.push(" ORDER BY id LIMIT ");
    qb.push_bind(limit);
    qb.push(" FOR UPDATE");
    let mut letters = Vec::new();
    for row in qb.build().fetch_all(&mut *conn).await? {
        letters.push((
            row.try_get(0)?,
            InboundMessage {
                topic: text(&row, 1, TABLE)?.to_owned(),
                partition: row.try_get(2)?,
                offset: row.try_get(3)?,
                key: row.try_get(4)?,
                payload: row.try_get(5)?,
                content_type: opt_text(&row, 6, TABLE)?.map(|c| c.as_bytes().to_vec()),
                timestamp_ms: None,
            },
        ));
    }
    Ok(letters)
}

/// Marks letters as redriven, in the transaction that processes their
/// messages again.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn mark_redriven(conn: &mut MySqlConnection, ids: &[i64]) -> Result<(), StoreError> {
    for chunk in ids.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb =
            QueryBuilder::<MySql>::new("UPDATE dead_letters SET redriven_at = NOW(3) WHERE TRUE");
        push_ids(&mut qb, chunk);
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// ` AND id IN (...)`, bound.
fn push_ids<'a>(qb: &mut QueryBuilder<'a, MySql>, ids: &'a [i64]) {
    qb.push(" AND id IN (");
    let mut list = qb.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
    list.push_unseparated(")");
}
