//! The read model computed from the log alone (rule R8): every order's
//! entries folded, in sequence, through the same state machine that live
//! ingestion uses. Checks and rebuilds compare against this.

use std::collections::BTreeMap;

use futures_util::TryStreamExt;
use sqlx::{MySqlPool, Row};

use super::{text, StoreError};
use crate::domain::{OrderId, OrderLifecycle, Transition};

const TABLE: &str = "lifecycle_events";

/// Every order as its log entries make it.
///
/// # Errors
/// [`StoreError`] from the database, or an entry this version cannot read.
pub async fn orders_from_log(
    pool: &MySqlPool,
) -> Result<BTreeMap<OrderId, OrderLifecycle>, StoreError> {
    let mut orders: BTreeMap<OrderId, OrderLifecycle> = BTreeMap::new();
    let mut rows = sqlx::query(
        "SELECT order_id, seq, occurred_at_ms, transitions FROM lifecycle_events \
         ORDER BY order_id, seq",
    )
    .fetch(pool);
    while let Some(row) = rows.try_next().await? {
        let corrupt = |detail: String| StoreError::Corrupt {
            table: TABLE,
            detail,
        };
        let order = OrderId::parse(text(&row, 0, TABLE)?).map_err(|e| corrupt(e.to_string()))?;
        let seq: i64 = row.try_get(1)?;
        let at: i64 = row.try_get(2)?;
        let transitions: Vec<Transition> = serde_json::from_str(text(&row, 3, TABLE)?)
            .map_err(|e| corrupt(format!("transitions: {e}")))?;
        orders
            .entry(order.clone())
            .or_insert_with(|| OrderLifecycle::new(order))
            .apply(u64::try_from(seq).unwrap_or(0), at, &transitions);
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
