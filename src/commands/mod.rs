//! The command line: one subcommand per job, one file per subcommand, each
//! with its arguments and its `run`. `main` parses ([`parse`]) and
//! dispatches ([`Command::run`]).
//!
//! Settings are layered: built-in defaults, then a configuration file
//! (`--config FILE` or `OL_CONFIG_FILE`: `OL_NAME=value` lines, the same
//! names as the environment variables), then environment variables, then
//! flags. The file's values become the arguments' defaults, so clap applies
//! the rest of the order as usual.

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub mod bench;
pub mod import_legacy;
pub mod migrate;
pub mod rebuild;
pub mod redrive;
pub mod replay;
pub mod run;
pub mod serve;
pub mod simulate;
pub mod verify;

use bench::rebuild::RebuildBenchConfig;
use import_legacy::ImportConfig;
use rebuild::RebuildConfig;
use redrive::RedriveConfig;
use replay::ReplayConfig;
use serve::ServeConfig;
use simulate::SimulateConfig;
use verify::VerifyConfig;

use crate::config::{DatabaseConfig, RunConfig};
use crate::shutdown::Shutdown;
use crate::telemetry::LogFormat;

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
    /// Configuration file of `OL_NAME=value` lines (below environment
    /// variables and flags, above the defaults).
    #[arg(long, env = "OL_CONFIG_FILE", global = true, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Why the command line or the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Clap(#[from] clap::Error),
    #[error("configuration file {path}: {problem}")]
    ConfigFile { path: String, problem: String },
}

/// Parses `args` with the configuration file, if one is named, as the
/// arguments' defaults.
///
/// # Errors
/// [`CliError`]: bad flags (including `--help`, which clap reports as an
/// error to print), an unreadable file, a malformed line, or a name no
/// setting has.
pub fn parse_from<I, T>(args: I, env_config: Option<OsString>) -> Result<Cli, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // A flag given twice takes its last value (wrappers and tests append
    // to a base command line), in every subcommand.
    let mut command = Cli::command().args_override_self(true);
    let names: Vec<String> = command
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in names {
        command = command.mut_subcommand(name, |s| s.args_override_self(true));
    }
    if let Some(path) = config_path(&args).or(env_config) {
        let shown = path.to_string_lossy().into_owned();
        let bad = |problem: String| CliError::ConfigFile {
            path: shown.clone(),
            problem,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let entries = parse_config_file(&text).map_err(bad)?;
        command = with_defaults(command, &entries).map_err(bad)?;
    }
    let matches = command
        .clone()
        .try_get_matches_from(args)
        .map_err(|e| without_secret_value(e, &command))?;
    Ok(Cli::from_arg_matches(&matches)?)
}

/// `e` without the value it quotes when that value was given to a secret
/// argument (one whose environment value is hidden: URLs with passwords,
/// the API token, librdkafka options): clap's own message would print it.
fn without_secret_value(e: clap::Error, command: &clap::Command) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(invalid)) = e.get(ContextKind::InvalidArg) else {
        return e;
    };
    let secret = std::iter::once(command)
        .chain(command.get_subcommands())
        .flat_map(clap::Command::get_arguments)
        .filter(|a| a.is_hide_env_values_set())
        .filter_map(clap::Arg::get_long)
        .any(|long| invalid.starts_with(&format!("--{long}")));
    if !secret {
        return e;
    }
    let reason = std::error::Error::source(&e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    clap::Error::raw(
        e.kind(),
        format!("invalid value for '{invalid}' (not shown: it may hold a secret){reason}\n"),
    )
}

/// Parses the process's command line (see [`parse_from`]).
///
/// # Errors
/// [`CliError`].
pub fn parse() -> Result<Cli, CliError> {
    parse_from(std::env::args_os(), std::env::var_os("OL_CONFIG_FILE"))
}

/// `--config FILE` or `--config=FILE`, found before clap parses.
fn config_path(args: &[OsString]) -> Option<OsString> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.into());
        }
    }
    None
}

/// `OL_NAME=value` lines; blank lines and `#` comments skipped; values
/// may be quoted.
fn parse_config_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected OL_NAME=value", n + 1))?;
        let key = key.trim();
        if !key.starts_with("OL_") || key == "OL_CONFIG_FILE" {
            return Err(format!("line {}: {key:?} is not a setting", n + 1));
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        entries.push((key.to_owned(), value.to_owned()));
    }
    Ok(entries)
}

/// Sets each entry as the default of every argument read from that
/// environment variable, in every subcommand.
fn with_defaults(
    mut command: clap::Command,
    entries: &[(String, String)],
) -> Result<clap::Command, String> {
    for (key, value) in entries {
        let top: Vec<clap::Id> = ids_with_env(&command, key);
        let subs: Vec<(String, Vec<clap::Id>)> = command
            .get_subcommands()
            .map(|s| (s.get_name().to_owned(), ids_with_env(s, key)))
            .filter(|(_, ids)| !ids.is_empty())
            .collect();
        if top.is_empty() && subs.is_empty() {
            return Err(format!("{key} is not a setting of any command"));
        }
        for id in top {
            let v = value.clone();
            command = command.mut_arg(id, move |a| file_default(a, v));
        }
        for (name, ids) in subs {
            let value = value.clone();
            command = command.mut_subcommand(name, move |mut sub| {
                for id in ids {
                    let v = value.clone();
                    sub = sub.mut_arg(id, move |a| file_default(a, v));
                }
                sub
            });
        }
    }
    Ok(command)
}

/// The file's value as the default; kept out of `--help` where the
/// environment's value is (secrets: URLs with passwords, the API token).
fn file_default(arg: clap::Arg, value: String) -> clap::Arg {
    let secret = arg.is_hide_env_values_set();
    arg.default_value(value).hide_default_value(secret)
}

fn ids_with_env(command: &clap::Command, key: &str) -> Vec<clap::Id> {
    command
        .get_arguments()
        .filter(|a| a.get_env().is_some_and(|e| e == key))
        .map(|a| a.get_id().clone())
        .collect()
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
    /// Process dead letters again once their refusal is fixed (selected by
    /// --reason and/or --id); what is refused again stays a dead letter.
    Redrive(Box<RedriveConfig>),
    /// Check the lifecycle data's health (exit 0 healthy, 1 a check failed,
    /// 2 the checks could not run); --repair re-projects what is wrong.
    Verify(Box<VerifyConfig>),
    /// Measure `rebuild` on a synthetic log in a scratch database.
    BenchRebuild(Box<RebuildBenchConfig>),
    /// Measure event-to-Redis latency at a steady rate through the real
    /// broker, in a scratch database, key prefix and topics.
    BenchLatency(Box<bench::latency::LatencyConfig>),
    /// Measure draining a backlog through the real broker beside the plain
    /// multi-row ceiling of the same database, in a scratch database, key
    /// prefix and topics.
    BenchIngest(Box<bench::ingest::IngestBenchConfig>),
    /// Measure `import-legacy` on synthetic legacy tables in a scratch
    /// database.
    BenchImport(Box<bench::import::ImportBenchConfig>),
}

/// The one line to print, and exit code 2, when `error` is a service
/// refusing this one at start-up (TLS or login, for the database or
/// Redis): a configuration mistake that no retry fixes.
pub fn refusal(error: &anyhow::Error) -> Option<String> {
    for cause in error.chain() {
        if let Some(store) = cause.downcast_ref::<crate::store::StoreError>() {
            if store.is_refused() {
                return Some(store.to_string());
            }
        }
        if let Some(sql) = cause.downcast_ref::<sqlx::Error>() {
            if crate::store::is_refused_connection(sql) {
                return Some(format!(
                    "the database refused the connection: {sql}; {}",
                    crate::store::DATABASE_REFUSAL_HINT
                ));
            }
        }
        if let Some(redis) = cause.downcast_ref::<crate::store::redis_projection::RedisError>() {
            if crate::store::redis_projection::RedisProjection::is_refusal(redis) {
                return Some(format!(
                    "Redis refused the connection: {redis}; check --redis-url (OL_REDIS_URL: \
                     password, rediss://) or --redis-cluster-nodes (OL_REDIS_CLUSTER_NODES), \
                     --redis-key-prefix, and --redis-ca-file, --redis-client-cert, \
                     --redis-client-key"
                ));
            }
        }
    }
    None
}

impl Command {
    /// Runs the command until it is done or `shutdown`; returns the
    /// process's exit code for the commands that have their own (`verify`:
    /// 0 healthy, 1 a check failed, 2 the checks could not run).
    ///
    /// # Errors
    /// The command's failure, for `main` to report (exit code 1).
    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<std::process::ExitCode> {
        let ok = std::process::ExitCode::SUCCESS;
        match self {
            Command::Run(config) => {
                crate::http::install_metrics();
                run::run(*config, shutdown).await.map(|()| ok)
            }
            Command::Serve(config) => {
                crate::http::install_metrics();
                serve::run(*config, shutdown).await.map(|()| ok)
            }
            Command::Migrate(db) => migrate::run(db).await.map(|()| ok),
            Command::Simulate(config) => simulate::run(*config).await.map(|()| ok),
            Command::Rebuild(config) => Ok(rebuild::run_command(*config).await?),
            Command::Replay(config) => Ok(replay::run(*config).await.map(|()| ok)?),
            Command::ImportLegacy(config) => Ok(import_legacy::run(*config).await.map(|()| ok)?),
            Command::Redrive(config) => Ok(redrive::run_command(*config).await?),
            Command::Verify(config) => Ok(verify::run_command(*config).await),
            Command::BenchRebuild(config) => bench::rebuild::run(*config).await.map(|()| ok),
            Command::BenchLatency(config) => bench::latency::run(*config).await.map(|()| ok),
            Command::BenchIngest(config) => bench::ingest::run(*config).await.map(|()| ok),
            Command::BenchImport(config) => bench::import::run(*config).await.map(|()| ok),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }

    fn run_config(args: &[&str], file: &str) -> crate::config::RunConfig {
        let path = std::env::temp_dir().join(format!(
            "ol-config-test-{}-{}.env",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(&path, file).unwrap();
        let mut argv = vec!["order-lifecycle".to_owned(), "--config".to_owned()];
        argv.push(path.to_string_lossy().into_owned());
        argv.extend(args.iter().map(|a| a.to_string()));
        let cli = super::parse_from(argv, None).expect("parses");
        let _ = std::fs::remove_file(&path);
        match cli.command {
            super::Command::Run(c) => *c,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn a_config_file_sits_between_defaults_and_flags() {
        let file = "# tuned for the big cluster\nOL_BATCH_SIZE=42\nOL_GROUP_ID = \"from-file\"\n\nOL_PARK_TIMEOUT=2m\n";
        let c = run_config(&["run"], file);
        assert_eq!(c.input.batch_size, 42);
        assert_eq!(c.group_id, "from-file");
        assert_eq!(
            c.input.parking.park_timeout,
            std::time::Duration::from_secs(120)
        );
        assert_eq!(
            c.shutdown_timeout,
            std::time::Duration::from_secs(5),
            "a default"
        );
        let c = run_config(&["run", "--batch-size", "7"], file);
        assert_eq!(c.input.batch_size, 7, "a flag wins over the file");
    }

    #[test]
    fn a_bad_secret_is_refused_without_being_echoed() {
        for (flag, value) in [
            ("--database-url", "no-scheme-user:hunter2secret@db"),
            ("--api-token", "hunter2secret"),
            ("--kafka-option", "hunter2secret"),
        ] {
            let err = super::parse_from(["order-lifecycle", "run", flag, value], None)
                .expect_err("refused");
            let shown = err.to_string();
            assert!(!shown.contains("hunter2secret"), "{shown}");
            assert!(shown.contains(flag), "{shown}");
        }
    }

    #[test]
    fn help_never_shows_a_secret_from_the_environment() {
        // The values clap would show as `[env: NAME=value]`.
        let command = super::Cli::command();
        let run = command.find_subcommand("run").expect("run");
        for name in [
            "OL_KAFKA_OPTIONS",
            "OL_DATABASE_URL",
            "OL_REDIS_URL",
            "OL_API_TOKEN",
        ] {
            let arg = run
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == name))
                .unwrap_or_else(|| panic!("{name} is read by run"));
            assert!(
                arg.is_hide_env_values_set(),
                "{name}'s value would show in --help"
            );
        }
    }

    #[test]
    fn the_api_token_can_come_from_a_file_and_never_shows() {
        let path = std::env::temp_dir().join(format!("ol-token-{}", fastrand::u64(..)));
        std::fs::write(&path, "a-token-of-thirty-characters-1\n").unwrap();
        let shown = path.to_string_lossy().into_owned();
        let c = run_config(&["run", "--api-token-file", &shown], "");
        assert_eq!(
            c.http.token().map(|t| t.expose().to_owned()),
            Some("a-token-of-thirty-characters-1".to_owned())
        );
        std::fs::write(&path, "hunter2short\n").unwrap();
        let err = super::parse_from(["order-lifecycle", "run", "--api-token-file", &shown], None)
            .expect_err("a short token");
        assert!(!err.to_string().contains("hunter2short"), "{err}");
        assert!(err.to_string().contains("16 characters"), "{err}");
        let _ = std::fs::remove_file(&path);
        let err = super::parse_from(["order-lifecycle", "run", "--api-token-file", &shown], None)
            .expect_err("a missing file");
        assert!(
            err.to_string().contains("cannot read the token file"),
            "{err}"
        );
        let both = super::parse_from(
            [
                "order-lifecycle",
                "run",
                "--api-token",
                "a-token-of-thirty-characters-1",
                "--api-token-file",
                &shown,
            ],
            None,
        );
        assert!(both.is_err(), "one source of the token at a time");
    }

    #[test]
    fn a_flag_given_twice_takes_its_last_value() {
        let c = run_config(&["run", "--batch-size", "7", "--batch-size", "9"], "");
        assert_eq!(c.input.batch_size, 9);
    }

    #[test]
    fn a_group_instance_id_is_a_plain_name() {
        let with = |id: &str| run_config(&["run", "--group-instance-id", id], "").validate();
        assert!(with("order-lifecycle-0").is_ok());
        assert_eq!(
            run_config(&["run"], "").group_instance_id,
            None,
            "dynamic membership by default"
        );
        for bad in ["", "pod 1", "pod/1", &"x".repeat(250)] {
            let err = with(bad).expect_err(bad);
            assert!(err.to_string().contains("--group-instance-id"), "{err}");
        }
    }

    #[test]
    fn a_batch_size_out_of_range_is_refused_by_the_parser() {
        let err = super::parse_from(["order-lifecycle", "run", "--batch-size", "0"], None)
            .expect_err("0 is refused");
        assert!(err.to_string().contains("from 1 to 10000"), "{err}");
    }

    #[test]
    fn a_bad_config_file_is_refused_with_its_line() {
        let bad = |text: &str| super::parse_config_file(text).unwrap_err();
        assert!(bad("OL_BATCH_SIZE 42").contains("line 1"));
        assert!(bad("\nPATH=/bin").contains("line 2"));
        let command = super::Cli::command();
        let unknown = super::with_defaults(command, &[("OL_BATCH_SIZ".into(), "1".into())]);
        assert!(unknown.unwrap_err().contains("OL_BATCH_SIZ"));
    }
}
