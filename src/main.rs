//! The `order-lifecycle` binary: parse the command line, set up logs,
//! dispatch. Everything else lives in the library.

use order_lifecycle::commands::{self, CliError};
use order_lifecycle::shutdown::Shutdown;
use order_lifecycle::telemetry;

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = match commands::parse() {
        Ok(cli) => cli,
        Err(CliError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("order-lifecycle: {e}");
            std::process::exit(2);
        }
    };
    telemetry::init(cli.log_format);
    cli.command.run(Shutdown::on(shutdown_signal())).await
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
