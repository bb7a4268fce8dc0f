//! The legacy order tables (`live_user_orders`, `demo_user_orders`), read
//! by `import-legacy`: one row per order, its ids in one column per type.
//! Table names come from the configuration, checked to be plain
//! identifiers ([`crate::config::LegacyTables::names`]) before they reach a
//! statement; every value is bound.

use sqlx::{MySqlPool, Row};

use super::StoreError;
use crate::domain::IdType;

/// One legacy row, as text (values that are not UTF-8 shown lossily).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyRow {
    pub order_id: String,
    /// The id columns, in the order asked for.
    pub ids: Vec<Option<String>>,
    pub created_at_ms: Option<i64>,
}

/// The columns of `table` (none when it does not exist).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn columns(pool: &MySqlPool, table: &str) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
    )
    .bind(table)
    .fetch_all(pool)
    .await?)
}

/// Rows in `table`.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn count(pool: &MySqlPool, table: &str) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM `{table}`"))
            .fetch_one(pool)
            .await?,
    )
}

/// The next page of `table` after order `after` (keyset pagination), with
/// the `id_columns`. Rows sharing the last `order_id` of a full page are all
/// included, so that a page boundary never splits an order.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn page(
    pool: &MySqlPool,
    table: &str,
    id_columns: &[IdType],
    after: Option<&str>,
    size: usize,
) -> Result<Vec<LegacyRow>, StoreError> {
    let columns = format!(
        "CAST(order_id AS CHAR), {}, CAST(UNIX_TIMESTAMP(created_at) * 1000 AS SIGNED)",
        id_columns
            .iter()
            .map(|c| format!("CAST({} AS CHAR)", c.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let query = match after {
        Some(_) => {
            format!("SELECT {columns} FROM `{table}` WHERE order_id > ? ORDER BY order_id LIMIT ?")
        }
        None => format!("SELECT {columns} FROM `{table}` ORDER BY order_id LIMIT ?"),
    };
    let mut q = sqlx::query(&query);
    if let Some(after) = after {
        q = q.bind(after);
    }
    let read = |row: &sqlx::mysql::MySqlRow| legacy_row(row, id_columns.len());
    let mut rows: Vec<LegacyRow> = q
        .bind(size as u64)
        .fetch_all(pool)
        .await?
        .iter()
        .map(read)
        .collect::<Result<_, _>>()?;
    if rows.len() == size {
        if let Some(last) = rows.last().map(|r| r.order_id.clone()) {
            rows.retain(|r| r.order_id != last);
            let same = format!("SELECT {columns} FROM `{table}` WHERE order_id = ?");
            for row in sqlx::query(&same).bind(&last).fetch_all(pool).await? {
                rows.push(read(&row)?);
            }
        }
    }
    Ok(rows)
}

fn legacy_row(row: &sqlx::mysql::MySqlRow, id_columns: usize) -> Result<LegacyRow, StoreError> {
    let text = |i: usize| -> Result<Option<String>, StoreError> {
        let raw: Option<Vec<u8>> = row.try_get(i)?;
        Ok(raw.map(|b| String::from_utf8_lossy(&b).into_owned()))
    };
    Ok(LegacyRow {
        order_id: text(0)?.unwrap_or_default(),
        ids: (1..=id_columns).map(text).collect::<Result<_, _>>()?,
        created_at_ms: row.try_get(id_columns + 1)?,
    })
}
