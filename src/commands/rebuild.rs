//! `rebuild`: recomputes the MySQL and/or Redis read models from the event
//! log alone, live (see [`crate::projection::rebuild`] for how readers and
//! a running `run` are kept whole meanwhile).

use clap::{Args, ValueEnum};

use crate::config::{DatabaseConfig, RedisConfig};
use crate::projection::rebuild::{rebuild_mysql, rebuild_redis, RebuildError, RebuildLease};
use crate::store::redis_projection::RedisProjection;
use crate::store::stray_keys::UnexplainedKeys;
use crate::store::Store;

/// Which read model to rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Mysql,
    Redis,
    All,
}

/// Options of `rebuild`.
#[derive(Debug, Clone, Args)]
pub struct RebuildConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    /// The read model to rebuild.
    #[arg(long, value_enum, default_value = "all")]
    pub target: Target,
    /// Also remove `global_order_lookup` keys that no id accounts for. The
    /// legacy platform writes that namespace too, and `import-legacy` skips
    /// ids it refuses, so by default such keys are kept and reported.
    #[arg(long = "remove-unexplained-keys")]
    pub remove_unexplained_keys: bool,
}

/// Exit code of a rebuild refused because another one is running
/// (`EX_TEMPFAIL`: try again later).
pub const EXIT_BUSY: u8 = 75;

/// `rebuild`'s exit code: 0 done, [`EXIT_BUSY`] when another rebuild of
/// the same database holds the lease (nothing changed).
///
/// # Errors
/// Any other [`RebuildError`] (exit code 1).
pub async fn run_command(config: RebuildConfig) -> Result<std::process::ExitCode, RebuildError> {
    match run(config).await {
        Ok(()) => Ok(std::process::ExitCode::SUCCESS),
        Err(e @ RebuildError::Busy) => {
            tracing::error!("{e}");
            eprintln!("rebuild: {e}");
            Ok(std::process::ExitCode::from(EXIT_BUSY))
        }
        Err(e) => Err(e),
    }
}

/// Runs `rebuild` as the command line asks, holding the rebuild lease for
/// the whole run.
///
/// # Errors
/// [`RebuildError`]; the live read models are then unchanged (MySQL) or
/// still valid and re-projected by the next run (Redis).
pub async fn run(config: RebuildConfig) -> Result<(), RebuildError> {
    let store = Store::connect(&config.database.url, 4).await?;
    store.migrate().await?;
    let mut lease = RebuildLease::acquire(&store).await?;
    if matches!(config.target, Target::Mysql | Target::All) {
        let s = rebuild_mysql(&store, &mut lease).await?;
        println!(
            "rebuild mysql: {} events, {} orders, {} rows in {:.1} s ({:.0} events/s)",
            s.events,
            s.orders,
            s.rows,
            s.seconds,
            s.events as f64 / s.seconds.max(1e-9)
        );
    }
    if matches!(config.target, Target::Redis | Target::All) {
        let redis = RedisProjection::connect_to(&config.redis).await?;
        let unexplained = UnexplainedKeys::removed_if(config.remove_unexplained_keys);
        let s = rebuild_redis(&store, &redis, &mut lease, unexplained).await?;
        println!(
            "rebuild redis: {} log entries re-projected, {} stale keys removed, {} unexplained \
             lookup keys kept, in {:.1} s ({:.0} events/s)",
            s.events,
            s.keys_removed,
            s.keys_kept,
            s.seconds,
            s.events as f64 / s.seconds.max(1e-9)
        );
    }
    lease.release().await?;
    Ok(())
}
