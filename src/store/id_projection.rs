//! The `order_lifecycle_ids` read model: one row per lifecycle id, written in
//! the same transaction as the log entries that changed it.

use std::collections::HashMap;

use sqlx::{MySql, MySqlConnection, QueryBuilder, Row};

use super::{opt_text, push_in, text, StoreError, MAX_ROWS_PER_STATEMENT};

const TABLE: &str = "order_lifecycle_ids";
use crate::domain::{IdRecord, IdStatus, IdType, LifecycleId, OrderId, OrderLifecycle};

fn corrupt(detail: impl ToString) -> StoreError {
    StoreError::Corrupt {
        table: TABLE,
        detail: detail.to_string(),
    }
}

/// The order each of `ids` is bound to, for those that are bound.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn owners_of(
    conn: &mut MySqlConnection,
    ids: &[LifecycleId],
) -> Result<HashMap<LifecycleId, OrderId>, StoreError> {
    let mut owners = HashMap::new();
    for chunk in ids.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new(
            "SELECT lifecycle_id, order_id FROM order_lifecycle_ids \
             FORCE INDEX (uq_order_lifecycle_ids_lifecycle_id) WHERE ",
        );
        push_in(&mut qb, "lifecycle_id", chunk);
        for row in qb.build().fetch_all(&mut *conn).await? {
            owners.insert(
                LifecycleId::parse(text(&row, 0, TABLE)?).map_err(corrupt)?,
                OrderId::parse(text(&row, 1, TABLE)?).map_err(corrupt)?,
            );
        }
    }
    Ok(owners)
}

/// Every id of each order, as [`IdRecord`]s grouped by order.
///
/// With `lock`, the rows are read `FOR UPDATE`, so that a concurrent writer
/// touching the same orders waits for this transaction.
///
/// # Errors
/// [`StoreError`] from the database, or a row this version cannot read.
pub async fn load_records(
    conn: &mut MySqlConnection,
    orders: &[OrderId],
    lock: bool,
) -> Result<HashMap<OrderId, Vec<IdRecord>>, StoreError> {
    let mut by_order: HashMap<OrderId, Vec<IdRecord>> = HashMap::new();
    for chunk in orders.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new(
            "SELECT order_id, CAST(id_type AS CHAR), lifecycle_id, CAST(status AS CHAR), \
             replaced_by, target_id, \
             CAST(ROUND(UNIX_TIMESTAMP(created_at) * 1000) AS SIGNED), \
             CAST(ROUND(UNIX_TIMESTAMP(updated_at) * 1000) AS SIGNED), \
             issued_seq, updated_seq FROM order_lifecycle_ids FORCE INDEX (idx_order_lifecycle_ids_order_type_status) WHERE ",
        );
        push_in(&mut qb, "order_id", chunk);
        if lock {
            qb.push(" FOR UPDATE");
        }
        for row in qb.build().fetch_all(&mut *conn).await? {
            let order = OrderId::parse(text(&row, 0, TABLE)?).map_err(corrupt)?;
            let id_type = text(&row, 1, TABLE)?;
            let status = text(&row, 3, TABLE)?;
            let opt_id = |raw: Option<&str>| raw.map(LifecycleId::parse).transpose();
            let record = IdRecord {
                lifecycle_id: LifecycleId::parse(text(&row, 2, TABLE)?).map_err(corrupt)?,
                id_type: IdType::parse(id_type).ok_or_else(|| corrupt(id_type))?,
                status: IdStatus::parse(status).ok_or_else(|| corrupt(status))?,
                replaced_by: opt_id(opt_text(&row, 4, TABLE)?).map_err(corrupt)?,
                target: opt_id(opt_text(&row, 5, TABLE)?).map_err(corrupt)?,
                issued_at_ms: row.try_get(6)?,
                updated_at_ms: row.try_get(7)?,
                issued_seq: u64::try_from(row.try_get::<i64, _>(8)?).map_err(corrupt)?,
                updated_seq: u64::try_from(row.try_get::<i64, _>(9)?).map_err(corrupt)?,
            };
            by_order.entry(order).or_default().push(record);
        }
    }
    Ok(by_order)
}

/// Loads whole orders: their ids and their last log sequence number.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn load_orders(
    conn: &mut MySqlConnection,
    orders: &[OrderId],
    lock: bool,
) -> Result<Vec<OrderLifecycle>, StoreError> {
    let mut records = load_records(conn, orders, lock).await?;
    let seqs = super::event_log::last_seqs(conn, orders).await?;
    let mut loaded = Vec::new();
    for o in orders {
        let ids = records.remove(o);
        let last_seq = seqs.get(o).copied();
        if ids.is_some() || last_seq.is_some() {
            loaded.push(OrderLifecycle::restore(
                o.clone(),
                ids.unwrap_or_default(),
                last_seq.unwrap_or(0),
            ));
        }
    }
    Ok(loaded)
}

/// Writes rows as the state machine has them now (insert or update).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn upsert(
    conn: &mut MySqlConnection,
    rows: &[(&OrderId, &IdRecord)],
) -> Result<(), StoreError> {
    upsert_into(conn, TABLE, rows).await
}

/// [`upsert`] into another table of the same shape (a rebuild's shadow).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn upsert_into(
    conn: &mut MySqlConnection,
    table: &'static str,
    rows: &[(&OrderId, &IdRecord)],
) -> Result<(), StoreError> {
    for chunk in rows.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new(format!(
            "INSERT INTO {table} (order_id, id_type, lifecycle_id, status, \
             replaced_by, target_id, created_at, updated_at, issued_seq, updated_seq) "
        ));
        // An upsert of the same row twice is the upsert once: padded.
        qb.push_values(super::padded(chunk), |mut row, (order, r)| {
            row.push_bind(order.as_str())
                .push_bind(r.id_type.as_str())
                .push_bind(r.lifecycle_id.as_str())
                .push_bind(r.status.as_str())
                .push_bind(r.replaced_by.as_ref().map(|x| x.as_str()))
                .push_bind(r.target.as_ref().map(|x| x.as_str()))
                .push_unseparated(", FROM_UNIXTIME(")
                .push_bind_unseparated(r.issued_at_ms)
                .push_unseparated(" / 1000), FROM_UNIXTIME(")
                .push_bind_unseparated(r.updated_at_ms)
                .push_unseparated(" / 1000)")
                .push_bind(r.issued_seq as i64)
                .push_bind(r.updated_seq as i64);
        });
        qb.push(
            " ON DUPLICATE KEY UPDATE status = VALUES(status), replaced_by = VALUES(replaced_by), \
             updated_at = VALUES(updated_at), updated_seq = VALUES(updated_seq)",
        );
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// The active ids of each of `orders`, by order (orders with none absent).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn active_ids(
    pool: &sqlx::MySqlPool,
    orders: &[OrderId],
) -> Result<HashMap<OrderId, Vec<(IdType, LifecycleId)>>, StoreError> {
    let mut active: HashMap<OrderId, Vec<(IdType, LifecycleId)>> = HashMap::new();
    for chunk in orders.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new(
            "SELECT order_id, CAST(id_type AS CHAR), lifecycle_id FROM order_lifecycle_ids \
             FORCE INDEX (idx_order_lifecycle_ids_order_type_status) WHERE status = 'active' AND ",
        );
        push_in(&mut qb, "order_id", chunk);
        qb.push(" ORDER BY order_id, id_type");
        for row in qb.build().fetch_all(pool).await? {
            let order = OrderId::parse(text(&row, 0, TABLE)?).map_err(corrupt)?;
            let id_type = text(&row, 1, TABLE)?;
            let id = LifecycleId::parse(text(&row, 2, TABLE)?).map_err(corrupt)?;
            active
                .entry(order)
                .or_default()
                .push((IdType::parse(id_type).ok_or_else(|| corrupt(id_type))?, id));
        }
    }
    Ok(active)
}

/// Takes the projection lock in share mode for the caller's transaction:
/// batches share it; a rebuild swapping the table takes it exclusively.
///
/// # Errors
/// [`StoreError`] from the database (a lock wait timeout is transient).
pub async fn share_projection_lock(conn: &mut MySqlConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT id FROM projection_lock WHERE id = 1 LOCK IN SHARE MODE")
        .fetch_optional(&mut *conn)
        .await?;
    Ok(())
}

/// Takes the projection lock exclusively for the caller's transaction:
/// batches wait until it ends.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn exclusive_projection_lock(conn: &mut MySqlConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT id FROM projection_lock WHERE id = 1 FOR UPDATE")
        .fetch_optional(&mut *conn)
        .await?;
    Ok(())
}
