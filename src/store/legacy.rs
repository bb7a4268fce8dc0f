//! The legacy order tables (`live_user_orders`, `demo_user_orders`), read
//! by `import-legacy`: one row per order, its ids in one column per type.
//! Table names come from the configuration, checked to be plain
//! identifiers ([`crate::config::LegacyTables::names`]) before they reach a
//! statement; every value is bound.

use sqlx::{MySqlPool, Row};

use super::StoreError;
use crate::domain::IdType;

/// One legacy row, its text columns as stored: bytes, which the import
/// reads as UTF-8 and reports when they are not (never converted lossily,
/// which would import an id that was never issued).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyRow {
    pub order_id: Vec<u8>,
    /// The id columns, in the order asked for.
    pub ids: Vec<Option<Vec<u8>>>,
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
    after: Option<&[u8]>,
    size: usize,
) -> Result<Vec<LegacyRow>, StoreError> {
    // The columns as they are: the server converts text to the
    // connection's UTF-8 (a latin1 table reads right) and sends binary
    // columns' bytes untouched, which a CAST would have replaced.
    let columns = format!(
        "order_id, {}, CAST(UNIX_TIMESTAMP(created_at) * 1000 AS SIGNED)",
        id_columns
            .iter()
            .map(|c| c.as_str())
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
        q = bind_text_or_bytes(q, after);
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
            let q = bind_text_or_bytes(sqlx::query(&same), &last);
            for row in q.fetch_all(pool).await? {
                rows.push(read(&row)?);
            }
        }
    }
    Ok(rows)
}

/// Binds an order id as text when it is UTF-8, so that it compares in the
/// column's collation as `ORDER BY order_id` sorts (a binary parameter
/// would compare bytes, and a case-insensitive table would page
/// inconsistently); as bytes only when it is not (a binary column, whose
/// collation is bytes anyway).
fn bind_text_or_bytes<'q>(
    q: sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments>,
    value: &'q [u8],
) -> sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments> {
    match std::str::from_utf8(value) {
        Ok(text) => q.bind(text),
        Err(_) => q.bind(value),
    }
}

fn legacy_row(row: &sqlx::mysql::MySqlRow, id_columns: usize) -> Result<LegacyRow, StoreError> {
    let bytes = |i: usize| -> Result<Option<Vec<u8>>, StoreError> { Ok(row.try_get(i)?) };
    Ok(LegacyRow {
        order_id: bytes(0)?.unwrap_or_default(),
        ids: (1..=id_columns).map(bytes).collect::<Result<_, _>>()?,
        created_at_ms: row.try_get(id_columns + 1)?,
    })
}
