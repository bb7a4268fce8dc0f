//! `redrive`: processes dead letters again once their refusal is fixed (a
//! fixed decoder or rule, room in the parking lot, a grant given back).
//! The letters' messages, kept whole in `dead_letters`, go through the same
//! pipeline as `run`'s batches; see [`crate::ingest::pipeline::redrive`]
//! for how it stays exactly-once beside a running `run` and a second
//! `redrive`. Redis follows through `run`'s follower, as for any batch.

use std::collections::BTreeMap;

use clap::Args;

use crate::config::{DatabaseConfig, ParkingConfig, SchemaConfig};
use crate::ingest::pipeline::{redrive, BatchOutcome, PipelineConfig, REDRIVE_BATCH};
use crate::retry::for_a_command;
use crate::store::dead_letters::{self, RedriveSelection};
use crate::store::{Store, StoreError};

/// Options of `redrive`.
#[derive(Debug, Clone, Args)]
#[command(group = clap::ArgGroup::new("which").required(true).multiple(true).args(["reasons", "ids"]))]
pub struct RedriveConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub parking: ParkingConfig,
    #[command(flatten)]
    pub schemas: SchemaConfig,
    /// Redrive the letters with these reasons, comma-separated (e.g.
    /// `parking_full,storage_rejected`).
    #[arg(long = "reason", value_delimiter = ',')]
    pub reasons: Vec<String>,
    /// Redrive the letters with these row ids (`dead_letters.id`),
    /// comma-separated; with `--reason`, those of them with the reason.
    #[arg(long = "id", value_delimiter = ',')]
    pub ids: Vec<i64>,
}

/// Most ids `--id` takes: a list beyond it is a job for `--reason`.
const MAX_IDS: usize = 10_000;

/// What a redrive did, summed over its batches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveSummary {
    /// Letters taken.
    pub letters: usize,
    /// Log entries appended, by outcome.
    pub recorded: BTreeMap<&'static str, usize>,
    /// Events parked to wait for their id.
    pub parked: usize,
    /// Events the log or the parking lot already had.
    pub duplicates: usize,
    /// Letters refused again, by reason.
    pub refused_again: BTreeMap<String, usize>,
    /// Letters the database refused to process (left as they were), with
    /// the error.
    pub not_processed: Vec<(i64, String)>,
}

impl RedriveSummary {
    fn add(&mut self, outcome: &BatchOutcome) {
        self.letters += outcome.consumed;
        for (outcome, n) in &outcome.recorded {
            *self.recorded.entry(outcome).or_default() += n;
        }
        self.parked += outcome.parked;
        self.duplicates += outcome.duplicates;
        for letter in &outcome.dead_letters {
            *self
                .refused_again
                .entry(letter.reason.to_string())
                .or_default() += 1;
        }
    }

    /// One line for people.
    pub fn line(&self) -> String {
        let recorded: usize = self.recorded.values().sum();
        let again: usize = self.refused_again.values().sum();
        let mut line = format!(
            "redrive: {} letters: {recorded} recorded, {} parked, {} duplicates, {again} \
             dead-lettered again",
            self.letters, self.parked, self.duplicates
        );
        if again > 0 {
            let reasons: Vec<String> = self
                .refused_again
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            line.push_str(&format!(" ({})", reasons.join(", ")));
        }
        if !self.not_processed.is_empty() {
            line.push_str(&format!(
                ", {} refused by the database and left as they were",
                self.not_processed.len()
            ));
        }
        line
    }
}

/// Why `redrive` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs `redrive` as the command line asks: exit 0 when every letter taken
/// was processed (applied, parked, a duplicate or dead-lettered again), 1
/// when the database refused some (listed).
///
/// # Errors
/// [`RedriveError`]: bad options, or the database unavailable for a minute.
pub async fn run_command(config: RedriveConfig) -> Result<std::process::ExitCode, RedriveError> {
    if config.ids.len() > MAX_IDS {
        return Err(RedriveError::Invalid(format!(
            "{} ids given; at most {MAX_IDS} (select by --reason instead)",
            config.ids.len()
        )));
    }
    let store = Store::connect(&config.database.url, 2).await?;
    store.migrate().await?;
    let summary = redrive_all(&store, &config).await?;
    println!("{}", summary.line());
    for (id, error) in &summary.not_processed {
        println!("  dead letter {id}: {error}");
    }
    Ok(if summary.not_processed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Redrives every letter `config` selects, [`REDRIVE_BATCH`] at a time; a
/// batch the database refuses is tried again one letter at a time, and a
/// letter it still refuses is left as it was and listed.
///
/// # Errors
/// [`StoreError`] when the database stays unavailable for a minute.
pub async fn redrive_all(
    store: &Store,
    config: &RedriveConfig,
) -> Result<RedriveSummary, StoreError> {
    let pipeline = PipelineConfig {
        offsets_group: None,
        park_timeout: config.parking.park_timeout,
        max_parked: config.parking.max_parked,
        schema_ids: config.schemas.schema_ids.clone(),
    };
    let selection = RedriveSelection {
        reasons: config.reasons.clone(),
        ids: config.ids.clone(),
    };
    let mut summary = RedriveSummary::default();
    let mut after = 0;
    let mut limit = REDRIVE_BATCH;
    loop {
        let attempt = for_a_command("redrive", || {
            redrive(store, &pipeline, &selection, after, limit)
        })
        .await;
        match attempt {
            Ok(Some((last, outcome))) => {
                summary.add(&outcome);
                after = last;
            }
            Ok(None) => return Ok(summary),
            Err(e) if e.is_refusal() && limit > 1 => limit = 1,
            Err(e) if e.is_refusal() => {
                // This one letter is refused: note it and go past it.
                let mut conn = store.pool().acquire().await?;
                let next = dead_letters::for_redrive(&mut conn, &selection, after, 1).await?;
                let Some((id, _)) = next.first() else {
                    return Ok(summary);
                };
                tracing::error!(letter = id, error = %e, "the database refused a redriven letter; left as it was");
                summary.not_processed.push((*id, e.to_string()));
                after = *id;
                limit = REDRIVE_BATCH;
            }
            Err(e) => return Err(e),
        }
    }
}
