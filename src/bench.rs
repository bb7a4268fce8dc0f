//! `bench-rebuild`: measures `rebuild` on a synthetic log of a chosen size
//! (one million events by default) in a scratch database and Redis key
//! prefix of its own, then removes both. Run it on a release build:
//!
//! ```text
//! cargo run --release -- bench-rebuild --events 1000000
//! ```

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use sqlx::migrate::MigrateDatabase;

use crate::config::SecretUrl;
use crate::domain::LifecycleBook;
use crate::rebuild;
use crate::simulate::scenario::{self, Payload, PlanOptions};
use crate::store::event_log::{self, NewEntry};
use crate::store::redis_projection::RedisProjection;
use crate::store::Store;

/// Options of `bench-rebuild`.
#[derive(Debug, Clone, Args)]
pub struct BenchConfig {
    /// Log entries to generate.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// MySQL/MariaDB server (no database: a scratch one is created and dropped).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
    pub server_url: SecretUrl,
    /// Redis for the scratch key prefix.
    #[arg(long, default_value = "redis://127.0.0.1:6379/0")]
    pub redis_url: SecretUrl,
}

/// Generates the log, times both rebuilds, prints the figures, cleans up.
///
/// # Errors
/// Any database or Redis failure.
pub async fn run(config: BenchConfig) -> anyhow::Result<()> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let url = SecretUrl::new(format!("{}/olbench_{stamp}", config.server_url.expose()));
    let prefix = format!("olbench:{stamp}:");
    let store = Store::connect(&url, 4).await.context("scratch database")?;
    store.migrate().await?;
    let result = measure(&config, &store, &prefix).await;
    let redis = RedisProjection::connect(config.redis_url.expose(), &prefix).await?;
    remove_keys(&redis).await?;
    store.pool().close().await;
    sqlx::MySql::drop_database(url.expose()).await?;
    result
}

async fn measure(config: &BenchConfig, store: &Store, prefix: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut written = 0usize;
    let mut chunk = 0u64;
    while written < config.events {
        chunk += 1;
        let plan = scenario::plan(&PlanOptions {
            orders: 2_000,
            orders_per_second: 1e6,
            seed: chunk,
            json_ratio: 0.0,
            bad_ratio: 0.0,
            run_id: format!("{chunk}x"),
            start_ms: 1_764_300_000_000,
        });
        let mut book = LifecycleBook::new();
        let mut entries = Vec::with_capacity(plan.len());
        for p in plan {
            let Payload::Event(event, _) = p.payload else {
                continue;
            };
            let rec = book.process(&event).map_err(|r| anyhow::anyhow!("{r}"))?;
            entries.push(NewEntry::new(rec, &event, None));
        }
        entries.truncate(config.events - written);
        let mut tx = store.pool().begin().await?;
        event_log::append(&mut tx, &entries).await?;
        tx.commit().await?;
        written += entries.len();
    }
    println!(
        "bench-rebuild: generated {written} log entries in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mysql = rebuild::rebuild_mysql(store).await?;
    println!(
        "bench-rebuild: mysql  {} events, {} orders, {} rows in {:.1} s = {:.0} events/s",
        mysql.events,
        mysql.orders,
        mysql.rows,
        mysql.seconds,
        mysql.events as f64 / mysql.seconds
    );
    let redis = RedisProjection::connect(config.redis_url.expose(), prefix).await?;
    let summary = rebuild::rebuild_redis(store, &redis).await?;
    println!(
        "bench-rebuild: redis  {} events in {:.1} s = {:.0} events/s",
        summary.events,
        summary.seconds,
        summary.events as f64 / summary.seconds
    );
    if let Some(peak) = crate::telemetry::peak_memory_mib() {
        println!("bench-rebuild: peak resident memory {peak} MiB");
    }
    Ok(())
}

/// Removes every key of the projection's prefix (a scratch prefix).
pub(crate) async fn remove_keys(redis: &RedisProjection) -> anyhow::Result<()> {
    let keys = redis.keys();
    for pattern in [
        keys.lookup_pattern(),
        keys.active_pattern(),
        keys.projection(),
    ] {
        let mut cursor = 0;
        loop {
            let (next, batch) = redis.scan(cursor, &pattern).await?;
            redis.delete(&batch.iter().collect::<Vec<_>>()).await?;
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    Ok(())
}
