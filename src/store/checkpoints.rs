//! Checkpoints of follower projections: how far each has applied the log.

use sqlx::MySqlPool;

use super::StoreError;

/// The log position a projection has applied up to (0 before the first).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn get(pool: &MySqlPool, name: &str) -> Result<i64, StoreError> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = ?")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(position.unwrap_or(0))
}

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
