//! A copy, for monitoring, of how far each follower projection has applied
//! the log (the Redis projection's own checkpoint lives in Redis).

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
