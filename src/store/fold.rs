//! The read model computed from the log alone (rule R8): every order's
//! entries folded, in sequence, through the same state machine that live
//! ingestion uses. Rebuilds and checks use this.

use std::collections::BTreeMap;

use futures_util::stream::BoxStream;
use futures_util::TryStreamExt;
use sqlx::mysql::MySqlRow;
use sqlx::{MySqlPool, Row};

use super::{text, StoreError};
use crate::domain::{OrderId, OrderLifecycle, Transition};

const TABLE: &str = "lifecycle_events";

/// Log entries in `(order_id, seq)` order, up to log position `up_to`.
fn entries(pool: &MySqlPool, up_to: i64) -> BoxStream<'_, Result<MySqlRow, sqlx::Error>> {
    sqlx::query(
        "SELECT order_id, seq, occurred_at_ms, transitions FROM lifecycle_events \
         WHERE position <= ? ORDER BY order_id, seq",
    )
    .bind(up_to)
    .fetch(pool)
}

/// The whole log (up to a position) streamed in key order and folded, handed
/// out in chunks of whole orders holding about `rows` read-model rows:
/// memory holds one chunk, whatever the log's size. `rebuild`, `verify` and
/// the tests' checks read the log this way.
pub struct FoldedChunks<'p> {
    entries: BoxStream<'p, Result<MySqlRow, sqlx::Error>>,
    folder: OrderFolder,
    rows: usize,
    /// Log entries read so far.
    pub entries_read: u64,
    finished: bool,
}

impl<'p> FoldedChunks<'p> {
    /// Entries up to log position `up_to`, in chunks of about `rows` rows.
    pub fn new(pool: &'p MySqlPool, up_to: i64, rows: usize) -> FoldedChunks<'p> {
        FoldedChunks {
            entries: entries(pool, up_to),
            folder: OrderFolder::default(),
            rows: rows.max(1),
            entries_read: 0,
            finished: false,
        }
    }

    /// The next chunk; `None` after the last.
    ///
    /// # Errors
    /// [`StoreError`] from the database, or an entry this version cannot read.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<OrderLifecycle>>, StoreError> {
        if self.finished {
            return Ok(None);
        }
        let mut chunk = Vec::new();
        let mut rows = 0;
        while let Some(row) = self.entries.try_next().await? {
            self.entries_read += 1;
            if let Some(done) = self.folder.push(&row)? {
                rows += done.ids().len();
                chunk.push(done);
                if rows >= self.rows {
                    return Ok(Some(chunk));
                }
            }
        }
        self.finished = true;
        chunk.extend(std::mem::take(&mut self.folder).finish());
        Ok(Some(chunk))
    }
}

/// Folds a stream of entries sorted by order, handing out each order as
/// soon as its last entry has been read: memory holds one order at a time.
#[derive(Default)]
pub struct OrderFolder {
    current: Option<OrderLifecycle>,
}

impl OrderFolder {
    /// Adds one entry; returns the previous order if this entry starts a new
    /// one.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] for an entry this version cannot read.
    pub fn push(&mut self, row: &MySqlRow) -> Result<Option<OrderLifecycle>, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            table: TABLE,
            detail,
        };
        let order = OrderId::parse(text(row, 0, TABLE)?).map_err(|e| corrupt(e.to_string()))?;
        let seq: i64 = row.try_get(1)?;
        let at: i64 = row.try_get(2)?;
        let transitions: Vec<Transition> = serde_json::from_str(text(row, 3, TABLE)?)
            .map_err(|e| corrupt(format!("transitions: {e}")))?;
        let finished = match &self.current {
            Some(o) if o.order_id() != &order => self.current.take(),
            _ => None,
        };
        self.current
            .get_or_insert_with(|| OrderLifecycle::new(order))
            .apply(u64::try_from(seq).unwrap_or(0), at, &transitions);
        Ok(finished)
    }

    /// The last order.
    pub fn finish(self) -> Option<OrderLifecycle> {
        self.current
    }
}

/// The given orders as their log entries make them (a small set: read at
/// once).
///
/// # Errors
/// [`StoreError`] from the database, or an entry this version cannot read.
pub async fn orders_of(
    pool: &MySqlPool,
    orders: &[OrderId],
) -> Result<Vec<OrderLifecycle>, StoreError> {
    let mut folded = Vec::new();
    for chunk in orders.chunks(super::MAX_ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<sqlx::MySql>::new(
            "SELECT order_id, seq, occurred_at_ms, transitions FROM lifecycle_events WHERE ",
        );
        super::push_in(&mut qb, "order_id", chunk);
        qb.push(" ORDER BY order_id, seq");
        let mut folder = OrderFolder::default();
        for row in qb.build().fetch_all(pool).await? {
            folded.extend(folder.push(&row)?);
        }
        folded.extend(folder.finish());
    }
    Ok(folded)
}

/// Every order as its log entries make it.
///
/// # Errors
/// [`StoreError`] from the database, or an entry this version cannot read.
pub async fn orders_from_log(
    pool: &MySqlPool,
) -> Result<BTreeMap<OrderId, OrderLifecycle>, StoreError> {
    let mut orders = BTreeMap::new();
    let mut chunks = FoldedChunks::new(pool, i64::MAX, super::MAX_ROWS_PER_STATEMENT);
    while let Some(chunk) = chunks.next_chunk().await? {
        orders.extend(chunk.into_iter().map(|o| (o.order_id().clone(), o)));
    }
    Ok(orders)
}

/// Every order as the `order_lifecycle_ids` read model has it, with the
/// sequence number of its last log entry.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn orders_from_projection(
    pool: &MySqlPool,
) -> Result<BTreeMap<OrderId, OrderLifecycle>, StoreError> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT CAST(order_id AS CHAR) FROM order_lifecycle_ids \
         UNION SELECT DISTINCT CAST(order_id AS CHAR) FROM lifecycle_events",
    )
    .fetch_all(pool)
    .await?;
    let orders: Vec<OrderId> = ids.iter().filter_map(|o| OrderId::parse(o).ok()).collect();
    let mut conn = pool.acquire().await?;
    let loaded = super::id_projection::load_orders(&mut conn, &orders, false).await?;
    Ok(loaded
        .into_iter()
        .map(|o| (o.order_id().clone(), o))
        .collect())
}
