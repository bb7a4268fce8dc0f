//! The command line: one subcommand per job.

use clap::{Parser, Subcommand};

use crate::bench::BenchConfig;
use crate::config::{DatabaseConfig, RunConfig};
use crate::http::serve::ServeConfig;
use crate::import_legacy::ImportConfig;
use crate::rebuild::RebuildConfig;
use crate::replay::ReplayConfig;
use crate::simulate::SimulateConfig;
use crate::telemetry::LogFormat;
use crate::verify::VerifyConfig;

/// Keeps every id an order was ever given resolvable to its order.
#[derive(Debug, Parser)]
#[command(name = "order-lifecycle", version, about)]
pub struct Cli {
    /// Log format: text for terminals, json for log shippers.
    #[arg(
        long,
        env = "OL_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The jobs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume order events into the event log, MySQL and Redis.
    Run(Box<RunConfig>),
    /// Serve the read API, health and metrics without consuming (read replicas).
    Serve(Box<ServeConfig>),
    /// Apply database migrations and exit.
    Migrate(DatabaseConfig),
    /// Send a realistic stream of order lifecycles to the topics.
    Simulate(Box<SimulateConfig>),
    /// Recompute the MySQL and/or Redis read models from the event log.
    Rebuild(Box<RebuildConfig>),
    /// Re-read the topics from the earliest retained offset (or --since) into
    /// the event log; what the log has already changes nothing.
    Replay(Box<ReplayConfig>),
    /// Import the ids of the legacy order tables (live_user_orders,
    /// demo_user_orders) into the log and the read models.
    ImportLegacy(Box<ImportConfig>),
    /// Check the lifecycle data's health (exit 0 healthy, 1 a check failed,
    /// 2 the checks could not run); --repair re-projects what is wrong.
    Verify(Box<VerifyConfig>),
    /// Measure `rebuild` on a synthetic log in a scratch database.
    BenchRebuild(Box<BenchConfig>),
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
