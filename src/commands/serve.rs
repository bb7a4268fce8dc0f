//! `serve`: the read API, health and metrics without the consumer, for
//! read replicas. It never migrates (a replica may be read-only) and waits
//! for its database instead of failing.

use anyhow::Context;
use clap::Args;

use crate::config::{DatabaseConfig, HttpConfig, RedisConfig};
use crate::http::{self, ApiState};
use crate::retry::Backoff;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Options of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub http: HttpConfig,
}

/// Serves until `shutdown`.
///
/// # Errors
/// No listen address, or the address cannot be bound.
pub async fn run(config: ServeConfig, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let listen = config
        .http
        .listen
        .0
        .context("serve needs --http-listen (it is off)")?;
    tracing::info!(database = %config.database.url, redis = %config.redis.describe(), "starting order-lifecycle read API");
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the HTTP server to {listen}"))?;
    let state = ApiState::new(&config.http, config.redis.clone(), None);
    let server = http::serve(listener, state.clone(), shutdown.clone());
    let mut backoff = Backoff::new();
    while !shutdown.is_requested() {
        match Store::connect(&config.database.url, config.database.max_connections).await {
            Ok(store) => {
                let _ = state.store.set(store);
                break;
            }
            Err(e) => {
                tracing::warn!(database = %config.database.url, error = %e, "database unreachable; retrying");
                backoff.wait(&mut shutdown).await;
            }
        }
    }
    let _ = server.await;
    tracing::info!("order-lifecycle read API stopped");
    Ok(())
}
