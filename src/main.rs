//! The `order-lifecycle` binary: parse the command line, set up logs,
//! dispatch. Everything else lives in the library.

use anyhow::Context;
use order_lifecycle::cli::{self, Command};
use order_lifecycle::{
    bench, http, import_legacy, ingest, rebuild, replay, simulate, store, telemetry, verify,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(cli::CliError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("order-lifecycle: {e}");
            std::process::exit(2);
        }
    };
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Run(config) => {
            http::install_metrics();
            ingest::run(*config, shutdown_signal()).await
        }
        Command::Serve(config) => {
            http::install_metrics();
            http::serve::run(*config, shutdown_signal()).await
        }
        Command::Migrate(db) => {
            let store = store::Store::connect(&db.url, 1)
                .await
                .with_context(|| format!("connecting to {}", db.url))?;
            store.migrate().await.context("applying migrations")?;
            tracing::info!(database = %db.url, "migrations applied");
            Ok(())
        }
        Command::Simulate(config) => simulate::run(*config).await,
        Command::Rebuild(config) => Ok(rebuild::run(*config).await?),
        Command::Replay(config) => Ok(replay::run(*config).await?),
        Command::ImportLegacy(config) => Ok(import_legacy::run(*config).await?),
        Command::Verify(config) => match verify::run(*config).await {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => {
                tracing::error!(error = %e, "verify could not run its checks");
                eprintln!("verify: {e}");
                std::process::exit(2);
            }
        },
        Command::BenchRebuild(config) => bench::rebuild::run(*config).await,
        Command::BenchLatency(config) => bench::latency::run(*config).await,
        Command::BenchIngest(config) => bench::ingest::run(*config).await,
        Command::BenchImport(config) => bench::import::run(*config).await,
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("signal received; stopping (a batch in flight is finished first)");
}
