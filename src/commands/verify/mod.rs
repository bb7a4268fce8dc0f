//! `verify`: is the lifecycle data healthy? Named checks, each with a count
//! and a few examples; exit code 0 when every check passes, 1 when one
//! fails, 2 when the checks could not run. `--repair` re-projects exactly
//! the orders the checks found wrong (MySQL rows from the log, then their
//! Redis keys) and removes Redis keys that belong to no id.
//!
//! | check | fails when | repaired |
//! |---|---|---|
//! | `one_active_per_type` | an (order, type) has more than one active id | yes |
//! | `orphan_ids` | an id's order is in neither legacy table (skipped when the tables are absent) | no: an operator question |
//! | `mysql_matches_log` | an order's rows differ from the log folded alone | yes |
//! | `redis_follows_log` | Redis's projection record names another log, or another history of this one (rule R12) | yes: re-projected from the start |
//! | `redis_lookup_keys` | `global_order_lookup:{id}` missing, wrong, or for no id | yes |
//! | `redis_active_ids` | `order_lifecycle_active:{order}` missing, wrong or extra | yes |
//! | `sequences` | an order's log sequence is not 1..n | no: the log is append-only |
//! | `parked_overdue` | a parked event is a minute of stream time past its limit (no consumer expires them) | no: start `run` |
//! | `dead_letters` | a dead letter waits unpublished for over five minutes (counts by reason shown) | no: start `run` |
//!
//! Checks read while `run` may be writing: orders that look wrong are
//! looked at again before they count, and the Redis checks wait (up to ten
//! seconds) for the follower to reach the log's head.

mod checks;
mod repair;

use clap::Args;
use serde::Serialize;

use crate::config::{DatabaseConfig, LegacyTables, RedisConfig};
use crate::projection::rebuild::RebuildError;
use crate::store::redis_projection::{RedisError, RedisProjection};
use crate::store::stray_keys::{StrayScanError, UnexplainedKeys};
use crate::store::{Store, StoreError};
use checks::{check_all, Findings};
use repair::repair;

/// Orders the repair may hold in memory; beyond it, `rebuild` is the tool.
pub(crate) const MAX_REPAIR_ORDERS: usize = 100_000;

/// Options of `verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    /// The legacy tables, for the orphan check (in the same database).
    #[command(flatten)]
    pub tables: LegacyTables,
    /// Examples listed per check.
    #[arg(long, default_value_t = 5)]
    pub examples: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Re-project the orders found wrong, then check again.
    #[arg(long)]
    pub repair: bool,
    /// With `--repair`: also remove `global_order_lookup` keys that no id
    /// accounts for. The legacy platform writes that namespace too, and
    /// `import-legacy` skips ids it refuses, so by default such keys are
    /// kept and reported.
    #[arg(long = "remove-unexplained-keys", requires = "repair")]
    pub remove_unexplained_keys: bool,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// One named check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// Faults found (0 when passing).
    pub count: u64,
    pub examples: Vec<String>,
    /// Why skipped, or context (counts by reason, Redis lag).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Every check, and what `--repair` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    pub healthy: bool,
    pub checks: Vec<Check>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<Repaired>,
}

impl HealthReport {
    /// The check of that name.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// What a repair rewrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Repaired {
    pub orders: u64,
    pub rows: u64,
    pub redis_keys_removed: u64,
    /// Stray lookup keys kept (no `--remove-unexplained-keys`).
    pub redis_keys_kept: u64,
    /// Log entries re-projected into a Redis that followed another log.
    pub redis_entries: u64,
    /// The parking lot's kept count was set to its rows.
    pub parking_lot_recounted: bool,
}

/// Why the checks could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Scan(#[from] StrayScanError),
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// `verify`'s exit code: 0 healthy, 1 a check failed, 2 the checks could
/// not run (said on stderr).
pub async fn run_command(config: VerifyConfig) -> std::process::ExitCode {
    match run(config).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            tracing::error!(error = %e, "verify could not run its checks");
            eprintln!("verify: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Runs `verify` as the command line asks, prints the report, and returns
/// whether the store is healthy.
///
/// # Errors
/// [`VerifyError`] when the checks could not run.
pub async fn run(config: VerifyConfig) -> Result<bool, VerifyError> {
    let store = Store::connect(&config.database.url, config.database.max_connections).await?;
    store.migrate().await?;
    let redis = RedisProjection::connect_to(&config.redis).await?;
    let report = verify(&store, &redis, &config).await?;
    if config.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", human(&report));
    }
    Ok(report.healthy)
}

/// The report for people.
pub fn human(report: &HealthReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(r) = &report.repaired {
        let _ = writeln!(
            out,
            "repaired: {} orders re-projected ({} rows), {} stray Redis keys removed, \
             {} unexplained lookup keys kept, {} log entries re-projected into Redis{}; \
             checked again:",
            r.orders,
            r.rows,
            r.redis_keys_removed,
            r.redis_keys_kept,
            r.redis_entries,
            if r.parking_lot_recounted {
                ", the parking lot recounted"
            } else {
                ""
            }
        );
    }
    let failed = report
        .checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .count();
    let _ = writeln!(
        out,
        "verify: {} checks, {} failed: {}",
        report.checks.len(),
        failed,
        if report.healthy {
            "healthy"
        } else {
            "NOT HEALTHY"
        }
    );
    for c in &report.checks {
        let status = match c.status {
            Status::Pass => "ok  ",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        let _ = writeln!(out, "  {status} {:<22} {:>8}", c.name, c.count);
        if let Some(note) = &c.note {
            let _ = writeln!(out, "         {note}");
        }
        for e in &c.examples {
            let _ = writeln!(out, "         - {e}");
        }
    }
    out
}

/// Runs every check (and, with `repair`, repairs and checks again).
///
/// # Errors
/// [`VerifyError`] when the checks could not run.
pub async fn verify(
    store: &Store,
    redis: &RedisProjection,
    config: &VerifyConfig,
) -> Result<HealthReport, VerifyError> {
    config
        .tables
        .names()
        .map_err(|e| VerifyError::Invalid(e.to_string()))?;
    let mut findings = Findings::default();
    let mut report = check_all(store, redis, config, &mut findings).await?;
    if config.repair && !report.healthy {
        let unexplained = UnexplainedKeys::removed_if(config.remove_unexplained_keys);
        let repaired = repair(store, redis, &findings, unexplained).await?;
        let mut again = Findings::default();
        report = check_all(store, redis, config, &mut again).await?;
        report.repaired = Some(repaired);
    }
    Ok(report)
}
