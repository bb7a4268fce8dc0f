//! A copy, for monitoring, of how far each follower projection has applied
//! the log (the Redis projection's own checkpoint lives in Redis); and
//! counters kept beside them (the Redis Cluster projection's generation,
//! see [`super::redis_cluster`]).

use sqlx::MySqlPool;

use super::StoreError;

/// Records that a projection has applied the log up to `position`.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn set(pool: &MySqlPool, name: &str, position: i64) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (name, position) VALUES (?, ?) \
         ON DUPLICATE KEY UPDATE position = VALUES(position)",
    )
    .bind(name)
    .bind(position)
    .execute(pool)
    .await?;
    Ok(())
}

/// The value of counter `name` (0 before it was first raised).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn get(pool: &MySqlPool, name: &str) -> Result<i64, StoreError> {
    let value: Option<i64> =
        sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = ?")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(value.unwrap_or(0))
}

/// Raises counter `name` by one and returns its new value.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn raise(pool: &MySqlPool, name: &str) -> Result<i64, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO projection_checkpoints (name, position) VALUES (?, 1) \
         ON DUPLICATE KEY UPDATE position = position + 1",
    )
    .bind(name)
    .execute(&mut *tx)
    .await?;
    let value: i64 =
        sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = ?")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(value)
}
