//! The `dead_letters` table: rejected input, kept whole with its reason.

use sqlx::{MySql, MySqlConnection, QueryBuilder};

use super::{StoreError, MAX_ROWS_PER_STATEMENT};
use crate::domain::{EventId, OrderId};

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
    pub reason: &'static str,
    /// Human-readable explanation.
    pub error: String,
    pub event_id: Option<EventId>,
    pub order_id: Option<OrderId>,
}

/// Records dead letters; a message already recorded (redelivery) is skipped.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn insert(conn: &mut MySqlConnection, letters: &[DeadLetter]) -> Result<(), StoreError> {
    for chunk in letters.chunks(MAX_ROWS_PER_STATEMENT) {
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
                .push_bind(d.reason)
                .push_bind(error)
                .push_bind(d.event_id.as_ref().map(|e| e.as_str()))
                .push_bind(d.order_id.as_ref().map(|o| o.as_str()));
        });
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}
