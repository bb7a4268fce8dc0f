//! The append-only event log (`lifecycle_events`).

use std::collections::{HashMap, HashSet};

use sqlx::{MySql, MySqlConnection, MySqlPool, QueryBuilder, Row};

use super::{push_in, text, StoreError, MAX_ROWS_PER_STATEMENT};
use crate::domain::{EventId, OrderEvent, OrderId, Outcome, Recorded, Transition};
use crate::wire::InboundMessage;

const TABLE: &str = "lifecycle_events";

/// Where an input event was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The schema registry id, when the message came in the registry's
    /// frame.
    pub schema_id: Option<u32>,
}

impl Source {
    /// Where `message` was read from.
    pub fn of(message: &InboundMessage) -> Source {
        Source {
            topic: message.topic.clone(),
            partition: message.partition,
            offset: message.offset,
            schema_id: message
                .payload
                .as_deref()
                .and_then(crate::wire::registry::schema_id),
        }
    }
}

/// One row to append.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub order_id: OrderId,
    pub seq: u64,
    pub event_id: EventId,
    pub kind: &'static str,
    pub outcome: Outcome,
    pub transitions: Vec<Transition>,
    /// The input event in contract JSON.
    pub payload: String,
    pub occurred_at_ms: i64,
    pub source: Option<Source>,
}

impl NewEntry {
    /// The entry for `event` as the state machine recorded it.
    pub fn new(rec: Recorded, event: &OrderEvent, source: Option<Source>) -> NewEntry {
        NewEntry {
            order_id: rec.order_id,
            seq: rec.seq,
            event_id: event.event_id.clone(),
            kind: event.kind.name(),
            outcome: rec.outcome,
            transitions: rec.transitions,
            payload: crate::wire::json::encode(event),
            occurred_at_ms: event.occurred_at_ms,
            source,
        }
    }
}

/// The event ids among `ids` that the log already holds (rule R9).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn existing_event_ids(
    conn: &mut MySqlConnection,
    ids: &[EventId],
) -> Result<HashSet<EventId>, StoreError> {
    super::existing_event_ids(conn, TABLE, "uq_lifecycle_events_event_id", ids).await
}

/// The last sequence number of each order that has log entries.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn last_seqs(
    conn: &mut MySqlConnection,
    orders: &[OrderId],
) -> Result<HashMap<OrderId, u64>, StoreError> {
    let mut seqs = HashMap::new();
    for chunk in orders.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new(
            "SELECT order_id, MAX(seq) FROM lifecycle_events \
             FORCE INDEX (uq_lifecycle_events_order_seq) WHERE ",
        );
        push_in(&mut qb, "order_id", chunk);
        qb.push(" GROUP BY order_id");
        for row in qb.build().fetch_all(&mut *conn).await? {
            let order = text(&row, 0, TABLE)?;
            let seq: i64 = row.try_get(1)?;
            let order = OrderId::parse(order).map_err(|e| StoreError::Corrupt {
                table: "lifecycle_events",
                detail: format!("order_id: {e}"),
            })?;
            seqs.insert(order, u64::try_from(seq).unwrap_or(0));
        }
    }
    Ok(seqs)
}

/// Appends entries at the next log positions (rule R12).
///
/// Positions come from the one-row counter `log_head`, taken with an
/// `UPDATE` whose row lock is held until the transaction ends. So this must
/// be the **last write of its transaction**: every other appender waits
/// from here until this transaction commits or rolls back, which makes
/// positions
///
/// - dense: a rolled-back append returns its positions to the next writer,
///   so the log has no hole;
/// - visible in order: an entry with a higher position is committed after
///   every entry with a lower one, so a reader that sees position `p` sees
///   everything below `p`.
///
/// The lock is held only for the inserts and the commit, never while a
/// batch loads state or decides.
///
/// Returns the positions taken (`None` for no entries): `entries[i]` is at
/// `first + i`.
///
/// # Errors
/// [`StoreError`] from the database; a duplicate `event_id` or
/// `(order_id, seq)` means another writer got there first, and the caller's
/// transaction must be rolled back.
pub async fn append(
    conn: &mut MySqlConnection,
    entries: &[NewEntry],
) -> Result<Option<Positions>, StoreError> {
    if entries.is_empty() {
        return Ok(None);
    }
    let count = entries.len() as i64;
    // LAST_INSERT_ID(expr) hands the new head back in the OK packet: one
    // round trip takes the lock and reserves the positions.
    let head =
        sqlx::query("UPDATE log_head SET position = LAST_INSERT_ID(position + ?) WHERE id = 1")
            .bind(count)
            .execute(&mut *conn)
            .await?
            .last_insert_id();
    let head = i64::try_from(head).map_err(|_| StoreError::Corrupt {
        table: "log_head",
        detail: format!("position {head} out of range"),
    })?;
    let mut position = head - count;
    let bytes = |e: &NewEntry| e.payload.len() + 128 * e.transitions.len() + 512;
    let chunks = super::byte_bounded(entries, bytes).flat_map(super::shaped_chunks);
    for chunk in chunks {
        let mut qb = QueryBuilder::<MySql>::new(
            "INSERT INTO lifecycle_events (position, order_id, seq, event_id, kind, outcome, \
             transitions, payload, occurred_at_ms, source_topic, source_partition, source_offset, \
             schema_id) ",
        );
        qb.push_values(chunk, |mut row, e| {
            position += 1;
            let transitions =
                serde_json::to_string(&e.transitions).unwrap_or_else(|_| "[]".to_owned());
            row.push_bind(position)
                .push_bind(e.order_id.as_str())
                .push_bind(e.seq as i64)
                .push_bind(e.event_id.as_str())
                .push_bind(e.kind)
                .push_bind(e.outcome.as_str())
                .push_bind(transitions)
                .push_bind(e.payload.as_str())
                .push_bind(e.occurred_at_ms)
                .push_bind(e.source.as_ref().map(|s| s.topic.as_str()))
                .push_bind(e.source.as_ref().map(|s| s.partition))
                .push_bind(e.source.as_ref().map(|s| s.offset))
                .push_bind(e.source.as_ref().and_then(|s| s.schema_id));
        });
        qb.build().execute(&mut *conn).await?;
    }
    Ok(Some(Positions {
        first: head - count + 1,
        last: head,
    }))
}

/// The positions an append took: `first..=last`, dense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Positions {
    /// The position of the append's first entry.
    pub first: i64,
    /// The position of its last entry: the log head once it commits.
    pub last: i64,
}

/// Which log a database holds, and how far it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogHead {
    /// The log's identity, created with the database and never changed: a
    /// read model that recorded another identity followed another log.
    pub log_id: String,
    /// The highest committed position (0 for an empty log).
    pub position: i64,
}

/// The log's identity and committed head.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn log_head(pool: &sqlx::MySqlPool) -> Result<LogHead, StoreError> {
    let (log_id, position): (String, i64) =
        sqlx::query_as("SELECT CAST(log_id AS CHAR), position FROM log_head WHERE id = 1")
            .fetch_one(pool)
            .await?;
    Ok(LogHead { log_id, position })
}

/// The `event_id` of the entry at `position`, if there is one: a read model
/// that recorded another event id there followed a different history (a
/// database restored from a backup and refilled).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn event_id_at(
    pool: &sqlx::MySqlPool,
    position: i64,
) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar(
            "SELECT CAST(event_id AS CHAR) FROM lifecycle_events WHERE position = ?",
        )
        .bind(position)
        .fetch_optional(pool)
        .await?,
    )
}

/// A log entry as a follower projection reads it.
#[derive(Debug, Clone)]
pub struct EntryTransitions {
    pub position: i64,
    pub order_id: OrderId,
    pub seq: u64,
    pub event_id: String,
    pub transitions: Vec<Transition>,
}

/// Up to `limit` entries after `position`, in log order.
///
/// # Errors
/// [`StoreError`] from the database, or a row this version cannot read.
pub async fn read_after(
    pool: &sqlx::MySqlPool,
    position: i64,
    limit: u32,
) -> Result<Vec<EntryTransitions>, StoreError> {
    let rows = sqlx::query(
        "SELECT position, order_id, seq, transitions, event_id \
         FROM lifecycle_events WHERE position > ? ORDER BY position LIMIT ?",
    )
    .bind(position)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let corrupt = |detail: String| StoreError::Corrupt {
        table: "lifecycle_events",
        detail,
    };
    rows.iter()
        .map(|row| {
            let order = text(row, 1, TABLE)?;
            let transitions = text(row, 3, TABLE)?;
            Ok(EntryTransitions {
                position: row.try_get(0)?,
                order_id: OrderId::parse(order).map_err(|e| corrupt(format!("order_id: {e}")))?,
                seq: u64::try_from(row.try_get::<i64, _>(2)?).unwrap_or(0),
                transitions: serde_json::from_str(transitions)
                    .map_err(|e| corrupt(format!("transitions: {e}")))?,
                event_id: text(row, 4, TABLE)?.to_owned(),
            })
        })
        .collect()
}

/// The highest committed log position (0 for an empty log).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn head(pool: &sqlx::MySqlPool) -> Result<i64, StoreError> {
    Ok(log_head(pool).await?.position)
}

/// One log entry as the read API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEntry {
    pub seq: u64,
    pub event_id: String,
    pub kind: String,
    pub outcome: String,
    /// JSON array of transitions.
    pub transitions: String,
    /// The input event in contract JSON.
    pub payload: String,
    pub occurred_at_ms: i64,
    pub source: Option<Source>,
}

/// A page of one order's entries.
#[derive(Debug, Clone)]
pub struct EntryPage {
    pub entries: Vec<StoredEntry>,
    /// The page is full (by count or by bytes): entries may follow it.
    pub full: bool,
}

/// Up to `limit` entries of one order with `seq > after_seq`, in sequence,
/// and no more than `max_bytes` of event and transition text (at least one
/// entry, however large): entries reach 64 KiB each, and a page of a
/// thousand must not make a response of 64 MiB. Rows past the budget are
/// left unread.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn order_entries(
    pool: &sqlx::MySqlPool,
    order: &OrderId,
    after_seq: u64,
    limit: u32,
    max_bytes: usize,
) -> Result<EntryPage, StoreError> {
    use futures_util::TryStreamExt;
    let mut rows = sqlx::query(
        "SELECT seq, event_id, kind, CAST(outcome AS CHAR), transitions, payload, occurred_at_ms, \
         source_topic, source_partition, source_offset, schema_id FROM lifecycle_events \
         WHERE order_id = ? AND seq > ? ORDER BY seq LIMIT ?",
    )
    .bind(order.as_str())
    // Past i64::MAX no sequence exists: an empty page, never a wrap.
    .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
    .bind(limit)
    .fetch(pool);
    let mut page = EntryPage {
        entries: Vec::new(),
        full: false,
    };
    let mut bytes = 0;
    while let Some(r) = rows.try_next().await? {
        let entry = stored_entry(&r)?;
        bytes += entry.payload.len() + entry.transitions.len();
        if bytes > max_bytes && !page.entries.is_empty() {
            page.full = true;
            return Ok(page);
        }
        page.entries.push(entry);
    }
    page.full = page.entries.len() == limit as usize;
    Ok(page)
}

fn stored_entry(r: &sqlx::mysql::MySqlRow) -> Result<StoredEntry, StoreError> {
    let seq: i64 = r.try_get(0)?;
    let topic = super::opt_text(r, 7, TABLE)?;
    let source = match (
        topic,
        r.try_get::<Option<i32>, _>(8)?,
        r.try_get::<Option<i64>, _>(9)?,
    ) {
        (Some(topic), Some(partition), Some(offset)) => Some(Source {
            topic: topic.to_owned(),
            partition,
            offset,
            schema_id: r.try_get(10)?,
        }),
        _ => None,
    };
    Ok(StoredEntry {
        seq: seq as u64,
        event_id: text(r, 1, TABLE)?.to_owned(),
        kind: text(r, 2, TABLE)?.to_owned(),
        outcome: text(r, 3, TABLE)?.to_owned(),
        transitions: text(r, 4, TABLE)?.to_owned(),
        payload: text(r, 5, TABLE)?.to_owned(),
        occurred_at_ms: r.try_get(6)?,
        source,
    })
}

/// The orders with entries after log position `since`.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn orders_after(pool: &MySqlPool, since: i64) -> Result<Vec<OrderId>, StoreError> {
    let recent: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT CAST(order_id AS CHAR) FROM lifecycle_events WHERE position > ?",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    Ok(recent
        .iter()
        .filter_map(|o| OrderId::parse(o).ok())
        .collect())
}

/// Where an entry landed and when its row was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landing {
    pub position: i64,
    /// `recorded_at` in microseconds since the epoch: when the batch's
    /// insert ran, just before its commit.
    pub recorded_us: i64,
}

/// Every entry's position and write time by its event id (`bench-latency`
/// matches what it sent to where and when it landed; a scratch log of a
/// few hundred thousand entries).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn landings_by_event_id(
    pool: &MySqlPool,
) -> Result<HashMap<String, Landing>, StoreError> {
    // Sessions run at UTC (see `store::connect`), so the DATETIME converts
    // as it was written.
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT CAST(event_id AS CHAR), position, \
         CAST(UNIX_TIMESTAMP(recorded_at) * 1000000 AS SIGNED) FROM lifecycle_events",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, position, recorded_us)| {
            (
                id,
                Landing {
                    position,
                    recorded_us,
                },
            )
        })
        .collect())
}
