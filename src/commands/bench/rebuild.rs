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

use super::{BenchServices, Scratch};
use crate::domain::LifecycleBook;
use crate::projection::rebuild;
use crate::scenario::{self, Payload, PlanOptions};
use crate::store::event_log::{self, NewEntry};
use crate::store::stray_keys::UnexplainedKeys;
use crate::store::Store;

/// Options of `bench-rebuild`.
#[derive(Debug, Clone, Args)]
pub struct RebuildBenchConfig {
    /// Log entries to generate.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    #[command(flatten)]
    pub services: BenchServices,
}

/// Generates the log, times both rebuilds, prints the figures, cleans up.
///
/// # Errors
/// Any database or Redis failure.
pub async fn run(config: RebuildBenchConfig) -> anyhow::Result<()> {
    let scratch = Scratch::new("rebuild", &config.services);
    let store = Store::connect(&scratch.url, 4)
        .await
        .context("scratch database")?;
    store.migrate().await?;
    let result = measure(&config, &store, &scratch).await;
    store.pool().close().await;
    scratch.remove().await?;
    result
}

async fn measure(
    config: &RebuildBenchConfig,
    store: &Store,
    scratch: &Scratch,
) -> anyhow::Result<()> {
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
    let mut lease = rebuild::RebuildLease::acquire(store).await?;
    let mysql = rebuild::rebuild_mysql(store, &mut lease).await?;
    println!(
        "bench-rebuild: mysql  {} events, {} orders, {} rows in {:.1} s = {:.0} events/s",
        mysql.events,
        mysql.orders,
        mysql.rows,
        mysql.seconds,
        mysql.events as f64 / mysql.seconds
    );
    let redis = scratch.projection().await?;
    let summary = rebuild::rebuild_redis(store, &redis, &mut lease, UnexplainedKeys::Keep).await?;
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
