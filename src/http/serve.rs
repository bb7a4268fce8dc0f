//! `serve`: the read API, health and metrics without the consumer, for
//! read replicas. It never migrates (a replica may be read-only) and waits
//! for its database instead of failing.

use std::future::Future;

use anyhow::Context;
use clap::Args;
use tokio::sync::watch;

use super::ApiState;
use crate::config::{DatabaseConfig, HttpConfig, RedisConfig};
use crate::ingest::backoff::Backoff;
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

/// Serves until `shutdown` completes.
///
/// # Errors
/// No listen address, or the address cannot be bound.
pub async fn run(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listen = config
        .http
        .listen
        .0
        .context("serve needs --http-listen (it is off)")?;
    tracing::info!(database = %config.database.url, redis = %config.redis.url, "starting order-lifecycle read API");
    let (stop_tx, mut stop) = watch::channel(false);
    let state = ApiState::new(&config.http, config.redis.clone(), None);
    let server = super::start(listen, state.clone(), {
        let mut stop = stop.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    })
    .await
    .with_context(|| format!("binding the HTTP server to {listen}"))?;
    let signal = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut backoff = Backoff::new();
    while !*stop.borrow() {
        match Store::connect(&config.database.url, config.database.max_connections).await {
            Ok(store) => {
                let _ = state.store.set(store);
                break;
            }
            Err(e) => {
                tracing::warn!(database = %config.database.url, error = %e, "database unreachable; retrying");
                backoff.wait(&mut stop).await;
            }
        }
    }
    let _ = server.await;
    signal.abort();
    tracing::info!("order-lifecycle read API stopped");
    Ok(())
}
