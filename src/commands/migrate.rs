//! `migrate`: applies the database migrations and exits (for deployments
//! that migrate before starting consumers; `run` migrates too).

use anyhow::Context;

use crate::config::DatabaseConfig;
use crate::store::Store;

/// Applies every pending migration.
///
/// # Errors
/// The database is unreachable or a migration fails.
pub async fn run(db: DatabaseConfig) -> anyhow::Result<()> {
    let store = Store::connect(&db.url, 1)
        .await
        .with_context(|| format!("connecting to {}", db.url))?;
    store.migrate().await.context("applying migrations")?;
    tracing::info!(database = %db.url, "migrations applied");
    Ok(())
}
