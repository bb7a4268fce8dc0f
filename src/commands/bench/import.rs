//! `bench-import`: `import-legacy` on synthetic legacy tables in a scratch
//! database (live and demo orders, each with an order id and a realistic
//! spread of close, cancel, modify, stop-loss and take-profit ids), then
//! Redis brought up to the log, as the command does. Run it on a release
//! build:
//!
//! ```text
//! cargo run --release -- bench-import --orders 120000
//! ```

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use sqlx::{MySql, QueryBuilder};

use super::{BenchServices, CpuReading, Scratch};
use crate::commands::import_legacy::{self, ImportConfig};
use crate::config::LegacyTables;
use crate::store::Store;

/// Options of `bench-import`.
#[derive(Debug, Clone, Args)]
pub struct ImportBenchConfig {
    /// Legacy orders, split between the live and the demo table.
    #[arg(long, default_value_t = 120_000)]
    pub orders: usize,
    /// `import-legacy --batch-size`.
    #[arg(long, default_value_t = 1_000, value_parser = crate::config::parse_batch_size)]
    pub batch_size: usize,
    #[command(flatten)]
    pub services: BenchServices,
}

/// Fills the legacy tables, imports them, prints the figures, cleans up.
///
/// # Errors
/// Any database or Redis failure.
pub async fn run(config: ImportBenchConfig) -> anyhow::Result<()> {
    let scratch = Scratch::new("import", &config.services);
    let result = measure(&config, &scratch).await;
    scratch.remove().await?;
    result
}

async fn measure(config: &ImportBenchConfig, scratch: &Scratch) -> anyhow::Result<()> {
    let store = Store::connect(&scratch.url, 8)
        .await
        .context("scratch database")?;
    store.migrate().await?;
    let started = Instant::now();
    let ids = fill_legacy(&store, config.orders).await?;
    println!(
        "bench-import: {} legacy orders with {ids} ids written in {:.1} s",
        config.orders,
        started.elapsed().as_secs_f64()
    );
    let import = ImportConfig {
        database: scratch.database(),
        redis: scratch.redis(),
        legacy_database_url: None,
        tables: LegacyTables {
            live: "live_user_orders".into(),
            demo: "demo_user_orders".into(),
        },
        batch_size: config.batch_size,
        dry_run: false,
        show: 0,
        parking: Default::default(),
    };
    let redis = scratch.projection().await?;
    super::reset_peak_memory();
    let cpu0 = CpuReading::now();
    let summary = import_legacy::import(&store, store.pool(), &redis, &import).await?;
    let cpu = CpuReading::now().since(&cpu0);
    anyhow::ensure!(
        summary.imported_total() == ids as u64,
        "imported {} ids of {ids}",
        summary.imported_total()
    );
    println!(
        "bench-import: {} ids of {} orders imported and projected into Redis in {:.1} s = \
         {:.0} ids/s; CPU {cpu}; peak RSS {} MiB",
        summary.imported_total(),
        summary.orders_total(),
        summary.seconds,
        summary.imported_total() as f64 / summary.seconds,
        crate::telemetry::peak_memory_mib().map_or_else(|| "n/a".to_owned(), |m| m.to_string()),
    );
    Ok(())
}

/// Creates and fills `live_user_orders` and `demo_user_orders` (two thirds
/// live); returns the number of ids they hold. About three ids an order:
/// every order has its id, most a stop-loss and a take-profit, some a close,
/// cancel or modify id, a few the cancels of their protective orders.
async fn fill_legacy(store: &Store, orders: usize) -> anyhow::Result<usize> {
    let columns = [
        "close_id",
        "cancel_id",
        "modify_id",
        "stoploss_id",
        "takeprofit_id",
        "stoploss_cancel_id",
        "takeprofit_cancel_id",
    ];
    for table in ["live_user_orders", "demo_user_orders"] {
        let ids: Vec<String> = columns
            .iter()
            .map(|c| format!("{c} VARCHAR(64) NULL"))
            .collect();
        sqlx::query(&format!(
            "CREATE TABLE {table} (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, \
             order_id VARCHAR(64) NOT NULL, {}, created_at DATETIME NOT NULL, \
             KEY (order_id)) ENGINE = InnoDB",
            ids.join(", ")
        ))
        .execute(store.pool())
        .await?;
    }
    // Which columns an order has, by its number: a fixed, realistic mix.
    let has = |n: usize, column: usize| -> bool {
        match column {
            0 => n % 3 == 0,  // close_id
            1 => n % 7 == 1,  // cancel_id
            2 => n % 11 == 2, // modify_id
            3 => n % 10 < 7,  // stoploss_id
            4 => n % 10 < 6,  // takeprofit_id
            5 => n % 13 == 3, // stoploss_cancel_id
            _ => n % 17 == 4, // takeprofit_cancel_id
        }
    };
    let mut ids = 0;
    for chunk in (0..orders).collect::<Vec<_>>().chunks(1_000) {
        for (table, live) in [("live_user_orders", true), ("demo_user_orders", false)] {
            let rows: Vec<usize> = chunk
                .iter()
                .copied()
                .filter(|n| (n % 3 != 0) == live)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let mut qb = QueryBuilder::<MySql>::new(format!(
                "INSERT INTO {table} (order_id, {}, created_at) ",
                columns.join(", ")
            ));
            qb.push_values(&rows, |mut row, &n| {
                row.push_bind(format!("LEG{n:09}"));
                for (c, column) in columns.iter().enumerate() {
                    let value = has(n, c).then(|| format!("{}-{n:09}", column.replace('_', "")));
                    row.push_bind(value);
                }
                row.push_bind("2025-06-01 12:00:00");
            });
            qb.build().execute(store.pool()).await?;
            ids += rows
                .iter()
                .map(|&n| 1 + (0..columns.len()).filter(|&c| has(n, c)).count())
                .sum::<usize>();
        }
    }
    Ok(ids)
}
