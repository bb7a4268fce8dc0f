//! The `order-lifecycle` binary: parse the command line, set up logs,
//! dispatch. Everything else lives in the library.

use order_lifecycle::commands::{self, CliError};
use order_lifecycle::shutdown::Shutdown;
use order_lifecycle::telemetry;

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    quiet_on_closed_pipe();
    let cli = match commands::parse() {
        Ok(cli) => cli,
        Err(CliError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("order-lifecycle: {e}");
            std::process::exit(2);
        }
    };
    telemetry::init(cli.log_format);
    match cli.command.run(Shutdown::on(shutdown_signal())).await {
        Err(e) => match commands::refusal(&e) {
            Some(line) => {
                eprintln!("order-lifecycle: {line}");
                Ok(std::process::ExitCode::from(2))
            }
            None => Err(e),
        },
        ok => ok,
    }
}

/// `verify --json | head` closes the output early, and Rust's `println!`
/// then panics ("failed printing to stdout: Broken pipe"; Rust ignores
/// SIGPIPE). The reader chose to stop reading: that is no failure, so the
/// process exits 0 without a panic message. Any other panic is reported as
/// usual.
fn quiet_on_closed_pipe() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        report(info);
    }));
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
    tracing::info!("signal received; stopping (batches in flight are finished first)");
}
