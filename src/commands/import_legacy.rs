//! `import-legacy`: the ids that the legacy platform kept in one column per
//! type on `live_user_orders` and `demo_user_orders`, imported into the event
//! log and projected, so that every one of them resolves on the day this
//! service goes live.
//!
//! - Each non-blank id column of a row becomes one synthetic
//!   `legacy_id_imported` log entry (no Kafka source), the order's own
//!   `order_id` first, then `close_id`, `cancel_id`, `modify_id`,
//!   `stoploss_id`, `takeprofit_id`, `stoploss_cancel_id`,
//!   `takeprofit_cancel_id`. Values are trimmed; blank and NULL are skipped.
//! - `event_id`s are derived from table, order, column and value, so a
//!   second run is all duplicates (rule R9) and changes nothing; a value
//!   that changed in the legacy table since is imported as a new id (the
//!   old one stays resolvable: ids are never lost).
//! - An imported id becomes `active` unless the order already has an active
//!   id of its type (recorded by this service, hence newer): then it is
//!   `replaced` by that one.
//! - An id already bound to another order (rule R1), or to the same order
//!   with another type, is a conflict: reported with order, column, id and
//!   owner, and skipped. Malformed values are reported as errors. Neither
//!   stops the import.
//! - Tables are read by keyset pagination on `order_id` (never OFFSET), one
//!   page per transaction, so memory stays bounded whatever the table size.
//! - `--dry-run` runs every page in a transaction that is rolled back: the
//!   counts are what a real run would report (conflicts between two pages
//!   of the same run are the exception: the first page's ids are not kept).
//! - Redis follows the log during the import (`run`'s follower) and is at the
//!   log's head when the import ends.
//! - Events parked for an id the import binds are released by the page that
//!   binds it (see [`release_parked_for`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use sqlx::MySqlPool;

use crate::config::{
    parse_batch_size, DatabaseConfig, LegacyTables, ParkingConfig, RedisConfig, SecretUrl,
};
use crate::domain::{
    EventId, EventKind, IdType, LegacyIdImported, LifecycleBook, LifecycleId, OrderEvent, OrderId,
    Rejection, UserType, IMPORT_EVENT_ID_PREFIX,
};
use crate::ingest::pipeline::{
    append_events, load_book, release_bound, write_rows, PipelineConfig, RowsOf,
};
use crate::ingest::plan::Applied;
use crate::progress::{grouped, Progress};
use crate::projection::rebuild::{self, RebuildError};
use crate::projection::redis_follower::{self, Handoff};
use crate::retry::{for_a_command, Retryable};
use crate::shutdown::Shutdown;
use crate::store::event_log;
use crate::store::leadership::Leadership;
use crate::store::lease::Lease;
use crate::store::legacy::{self, LegacyRow};
use crate::store::redis_projection::{RedisError, RedisProjection};
use crate::store::{id_projection, Store, StoreError};
use crate::telemetry;
use crate::wire;

/// The id columns of a legacy table, in the order they are imported (after
/// `order_id`). Each column's name is its id type.
pub const ID_COLUMNS: [IdType; 7] = [
    IdType::CloseId,
    IdType::CancelId,
    IdType::ModifyId,
    IdType::StoplossId,
    IdType::TakeprofitId,
    IdType::StoplossCancelId,
    IdType::TakeprofitCancelId,
];

/// Options of `import-legacy`.
#[derive(Debug, Clone, Args)]
pub struct ImportConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    /// Database holding the legacy tables (default: the service's own).
    #[arg(
        long = "legacy-database-url",
        env = "OL_LEGACY_DATABASE_URL",
        hide_env_values = true,
        value_parser = crate::config::parse_database_url
    )]
    pub legacy_database_url: Option<SecretUrl>,
    #[command(flatten)]
    pub tables: LegacyTables,
    /// Legacy rows per page (one transaction), 1 to 10,000.
    #[arg(
        long = "batch-size",
        env = "OL_IMPORT_BATCH_SIZE",
        default_value_t = 1000,
        value_parser = parse_batch_size
    )]
    pub batch_size: usize,
    /// Report what would be imported without writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Conflicts and errors listed one by one (all are counted).
    #[arg(long, default_value_t = 20)]
    pub show: usize,
    /// For the events parked for an imported id, which the import
    /// releases (see [`release_parked_for`]): as `run` is set.
    #[command(flatten)]
    pub parking: ParkingConfig,
}

/// An id that could not be imported because it is bound elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub table: String,
    pub order_id: String,
    pub column: IdType,
    pub lifecycle_id: String,
    /// The order it belongs to (the same order when the type differs).
    pub owner: String,
    pub reason: &'static str,
}

/// A value that is not a valid id (or an order id that is not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedValue {
    pub table: String,
    pub order_id: String,
    pub column: &'static str,
    pub error: String,
}

/// What an import did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportSummary {
    /// Legacy rows read, per table.
    pub orders: BTreeMap<String, u64>,
    /// Ids newly imported, per type.
    pub imported: BTreeMap<&'static str, u64>,
    /// Ids the order already had (from a previous import or from events).
    pub already_present: u64,
    /// Blank or NULL columns skipped.
    pub blank: u64,
    pub conflicts: u64,
    pub errors: u64,
    /// The first `--show` conflicts and errors.
    pub conflict_examples: Vec<Conflict>,
    pub error_examples: Vec<RejectedValue>,
    /// Events that waited in the parking lot for an id the import bound,
    /// released (applied, or dead-lettered if refused).
    pub parked_released: u64,
    /// Log entries projected into Redis at the end.
    pub redis_entries: u64,
    pub seconds: f64,
}

impl ImportSummary {
    /// Ids imported, all types.
    pub fn imported_total(&self) -> u64 {
        self.imported.values().sum()
    }

    /// Rows read, both tables.
    pub fn orders_total(&self) -> u64 {
        self.orders.values().sum()
    }

    /// Adds what one page's application counted (imported, already
    /// present, conflicts), keeping the first `show` conflicts.
    fn absorb(&mut self, page: ImportSummary, show: usize) {
        for (id_type, n) in page.imported {
            *self.imported.entry(id_type).or_default() += n;
        }
        self.already_present += page.already_present;
        self.conflicts += page.conflicts;
        let room = show.saturating_sub(self.conflict_examples.len());
        self.conflict_examples
            .extend(page.conflict_examples.into_iter().take(room));
    }
}

/// Why the import stopped; pages already committed stay (a rerun skips
/// them as duplicates).
#[derive(Debug, thiserror::Error)]
pub enum ImportFailure {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("projecting into Redis: {0}")]
    Rebuild(#[from] RebuildError),
    /// Releasing the events parked for a committed page's ids failed (the
    /// page stays committed; a rerun releases them, as it goes over the
    /// same ids).
    #[error("releasing the events parked for imported ids: {0}")]
    ReleasingParked(#[source] StoreError),
    #[error("legacy table {table}: {problem}")]
    Table { table: String, problem: String },
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// Runs `import-legacy` as the command line asks and prints the summary.
///
/// # Errors
/// [`ImportFailure`].
pub async fn run(config: ImportConfig) -> Result<(), ImportFailure> {
    let store = Store::connect(&config.database.url, config.database.max_connections).await?;
    store.migrate().await?;
    let legacy = match &config.legacy_database_url {
        Some(url) => Store::connect(url, 2).await?.pool().clone(),
        None => store.pool().clone(),
    };
    let redis = RedisProjection::connect_to(&config.redis).await?;
    let summary = import(&store, &legacy, &redis, &config).await?;
    print!("{}", report(&summary, config.dry_run));
    Ok(())
}

/// The summary as printed.
pub fn report(s: &ImportSummary, dry_run: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let tables: Vec<String> = s
        .orders
        .iter()
        .map(|(t, n)| format!("{t} {}", grouped(*n)))
        .collect();
    let _ = writeln!(
        out,
        "import-legacy{}: {} orders processed ({})",
        if dry_run {
            " (dry run, nothing written)"
        } else {
            ""
        },
        grouped(s.orders_total()),
        tables.join(", ")
    );
    let per_type: Vec<String> = s
        .imported
        .iter()
        .map(|(t, n)| format!("{t} {}", grouped(*n)))
        .collect();
    let _ = writeln!(
        out,
        "  ids imported: {} ({})",
        grouped(s.imported_total()),
        if per_type.is_empty() {
            "none".to_owned()
        } else {
            per_type.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "  already present: {}; blank or NULL skipped: {}; conflicts: {}; errors: {}",
        grouped(s.already_present),
        grouped(s.blank),
        grouped(s.conflicts),
        grouped(s.errors)
    );
    if s.parked_released > 0 {
        let _ = writeln!(
            out,
            "  parked events released (they waited for an imported id): {}",
            grouped(s.parked_released)
        );
    }
    for c in &s.conflict_examples {
        let _ = writeln!(
            out,
            "  conflict ({}): {} order {} column {} id {} belongs to order {}",
            c.reason,
            c.table,
            c.order_id,
            c.column.as_str(),
            c.lifecycle_id,
            c.owner
        );
    }
    for e in &s.error_examples {
        let _ = writeln!(
            out,
            "  error: {} order {:?} column {}: {}",
            e.table, e.order_id, e.column, e.error
        );
    }
    let _ = writeln!(
        out,
        "  {:.1} s, {} ids/s; {} log entries projected into Redis; peak memory {}",
        s.seconds,
        grouped((s.imported_total() as f64 / s.seconds.max(1e-9)) as u64),
        grouped(s.redis_entries),
        telemetry::peak_memory_mib()
            .map(|mib| format!("{mib} MiB"))
            .unwrap_or_else(|| "unknown".to_owned())
    );
    out
}

/// Imports both tables, once no other import of this database runs (it
/// waits for one that does, see [`IMPORT_LEASE`]).
///
/// # Errors
/// [`ImportFailure`].
pub async fn import(
    store: &Store,
    legacy: &MySqlPool,
    redis: &RedisProjection,
    config: &ImportConfig,
) -> Result<ImportSummary, ImportFailure> {
    let [live, demo] = config
        .tables
        .names()
        .map_err(|e| ImportFailure::Invalid(e.to_string()))?;
    let tables = [(live, UserType::Live), (demo, UserType::Demo)];
    for (table, _) in tables {
        check_table(legacy, table).await?;
    }
    // One import at a time: two (operators, or a retried job beside a slow
    // one) would each bind the same ids, deadlock and conflict, and all
    // but one stop with an error; after one another, the second finds
    // every id already present.
    let lease = Lease::acquire(
        store,
        IMPORT_LEASE,
        "waiting for another import-legacy on this database to finish",
    )
    .await?;
    let started = Instant::now();
    let mut total = 0;
    for (table, _) in tables {
        total += legacy::count(legacy, table).await?;
    }
    let mut progress = Progress::new("import-legacy", "orders", Some(total.max(0) as u64));
    let mut summary = ImportSummary::default();
    // Redis follows the log while pages are applied (`run`'s follower: it
    // reads what is committed, positions being dense, rule R12), instead
    // of after them.
    let projected_from = redis.position().await?;
    let follower = (!config.dry_run).then(|| {
        let (stop, stopped) = Shutdown::new();
        let task = tokio::spawn(redis_follower::run(
            store.clone(),
            config.redis.clone(),
            Arc::new(Handoff::new()),
            Leadership::sole(),
            stopped,
        ));
        (stop, task)
    });
    let pages = import_pages(legacy, store, config, tables, &mut summary, &mut progress).await;
    if let Some((stop, task)) = follower {
        stop.trigger();
        joined(task.await);
    }
    pages?;
    progress.finish();
    if !config.dry_run {
        // What the follower has not projected (Redis unreachable meanwhile):
        // now, or the import fails saying so.
        rebuild::catch_up_to_head(store, redis, "import-legacy redis").await?;
        summary.redis_entries =
            u64::try_from(redis.position().await? - projected_from).unwrap_or(0);
    }
    summary.seconds = started.elapsed().as_secs_f64();
    lease.end().await;
    Ok(summary)
}

/// The lease an import runs under (see [`import`]).
const IMPORT_LEASE: &str = "order_lifecycle_import";

/// A page's events: shared with the task applying them, and kept until the
/// page is committed, so that a page can be applied again.
type PageEvents = Arc<Vec<(OrderEvent, IdType)>>;

/// Reads both tables page by page and applies each page; the next page is
/// read while the current one is applied (legacy reads and log writes are
/// separate connections), and applied behind it: it reads and decides
/// while the page ahead writes, taking the orders that page holds as they
/// will be once it commits (the same protocol as `run`'s batches, see
/// `crate::ingest::overlap`), writes the rows of the other orders at once
/// and the rest once that page is committed. An id two pages claim
/// therefore still goes to the earlier page.
///
/// A page that fails with a transient error wrote nothing (or, when the
/// connection was lost at its commit, perhaps all: applied again, its ids
/// are then found present), nor did the page behind it, which stops at its
/// wait: both are applied again, alone and in order ([`apply_again`]), and
/// the pages after them go on as before. Importing beside a live `run` can
/// deadlock with its batches; the import then goes on instead of stopping.
async fn import_pages(
    legacy: &MySqlPool,
    store: &Store,
    config: &ImportConfig,
    tables: [(&str, UserType); 2],
    summary: &mut ImportSummary,
    progress: &mut Progress,
) -> Result<(), ImportFailure> {
    let mut ahead: Option<DecidedPage> = None;
    for (table, user_type) in tables {
        summary.orders.insert(table.to_owned(), 0);
        let read_page = |after: Option<Vec<u8>>| {
            let legacy = legacy.clone();
            let table = table.to_owned();
            let size = config.batch_size;
            tokio::spawn(async move {
                legacy::page(&legacy, &table, &ID_COLUMNS, after.as_deref(), size).await
            })
        };
        let mut next = read_page(None);
        loop {
            let rows = joined(next.await)?;
            let Some(last) = rows.last().map(|r| r.order_id.clone()) else {
                break;
            };
            next = read_page(Some(last));
            *summary.orders.entry(table.to_owned()).or_default() += rows.len() as u64;
            let events = Arc::new(events_of(table, user_type, &rows, summary, config.show));
            let (page, before) = PageInFlight::start(store, events, config, ahead.take());
            if let Some((task, events)) = before {
                match ended(task).await {
                    Ok(done) => landed(store, config, summary, done, &events).await?,
                    Err(failure) => {
                        // This page, behind it, stops at its wait without
                        // writing: both again, in order.
                        let why = retried(failure, config)?;
                        let why_behind = match ended(page.task).await {
                            Err(own) => retried(own, config)?,
                            Ok(_) => "the page ahead of it failed".to_owned(),
                        };
                        let done = apply_again(store, &events, config, why).await?;
                        landed(store, config, summary, done, &events).await?;
                        let done = apply_again(store, &page.events, config, why_behind).await?;
                        landed(store, config, summary, done, &page.events).await?;
                        progress.add(rows.len() as u64);
                        continue;
                    }
                }
            }
            match page.decided().await {
                Ok(decided) => ahead = Some(decided),
                Err((failure, events)) => {
                    let why = retried(failure, config)?;
                    let done = apply_again(store, &events, config, why).await?;
                    landed(store, config, summary, done, &events).await?;
                }
            }
            progress.add(rows.len() as u64);
        }
    }
    if let Some(last) = ahead {
        let done = match ended(last.task).await {
            Ok(done) => done,
            Err(failure) => {
                let why = retried(failure, config)?;
                apply_again(store, &last.events, config, why).await?
            }
        };
        landed(store, config, summary, done, &last.events).await?;
    }
    Ok(())
}

/// A page is committed (or, in a dry run, rolled back): its counts join the
/// summary, and the events parked for the ids it bound are released.
async fn landed(
    store: &Store,
    config: &ImportConfig,
    summary: &mut ImportSummary,
    done: ImportSummary,
    events: &PageEvents,
) -> Result<(), ImportFailure> {
    summary.absorb(done, config.show);
    if !config.dry_run {
        summary.parked_released += release_parked_for(store, config, events).await?;
    }
    Ok(())
}

/// Releases the events parked for ids a committed page bound: say a
/// provider's confirmation for a legacy stop-loss, which a live `run`
/// parked because the import had not reached its order yet. Nothing else
/// would (see [`release_bound`]): it would be dead-lettered at its park
/// timeout as `unknown_lifecycle_id`, its id bound, the very loss this
/// service exists to prevent. A page with nothing waiting costs one look
/// by the parking lot's index. Returns how many were released.
async fn release_parked_for(
    store: &Store,
    config: &ImportConfig,
    events: &PageEvents,
) -> Result<u64, ImportFailure> {
    let ids: Vec<LifecycleId> = events
        .iter()
        .flat_map(|(e, _)| e.issued_ids())
        .map(|(id, _)| id)
        .collect();
    let pipeline = PipelineConfig {
        offsets_group: None,
        park_timeout: config.parking.park_timeout,
        max_parked: config.parking.max_parked,
        // Parked events are kept decoded: no message is decoded here.
        schema_ids: Vec::new(),
    };
    let released = for_a_command("import-legacy: releasing parked events", || {
        release_bound(store, &pipeline, &ids)
    })
    .await
    .map_err(ImportFailure::ReleasingParked)?;
    Ok(released.unparked as u64)
}

/// Why a failed page is applied again (its error, for the log), or the
/// failure itself when no retry can cure it. A dry run stops at the
/// failure, as its pages commit nothing: a page applied again alone would
/// not see what the pages before it decided.
fn retried(failure: ImportFailure, config: &ImportConfig) -> Result<String, ImportFailure> {
    if failure.is_transient() && !config.dry_run {
        Ok(failure.to_string())
    } else {
        Err(failure)
    }
}

/// Applies a page's `events` again, alone (every page before it is
/// committed), retrying transient failures for about [`COMMAND_PATIENCE`]
/// (a deadlock or a lock wait with another writer, a lost connection,
/// another writer's id bound meanwhile).
async fn apply_again(
    store: &Store,
    events: &PageEvents,
    config: &ImportConfig,
    why: String,
) -> Result<ImportSummary, ImportFailure> {
    tracing::warn!(error = %why, "applying a page of the import again");
    let applied = for_a_command("import page", || {
        let (decided, _) = tokio::sync::oneshot::channel();
        let (committed, _) = tokio::sync::oneshot::channel();
        let events = events.clone();
        async move {
            let store = store.clone();
            apply(
                store,
                events,
                config.dry_run,
                config.show,
                None,
                decided,
                committed,
            )
            .await
        }
    })
    .await?;
    // Alone, a page never stops for a page ahead.
    Ok(applied.unwrap_or_default())
}

/// A store error as the store judges it; anything else (Redis, the legacy
/// tables, a setting) for good.
impl Retryable for ImportFailure {
    fn is_transient(&self) -> bool {
        matches!(self, ImportFailure::Store(e) if e.is_transient())
    }

    fn is_conflict(&self) -> bool {
        matches!(self, ImportFailure::Store(e) if e.is_conflict())
    }
}

/// The result of a page's task: `None` when it stopped because the page
/// ahead failed (that page reports the failure).
type PageTask = tokio::task::JoinHandle<Result<Option<ImportSummary>, ImportFailure>>;

/// A page being applied ([`apply`] in a task of its own).
struct PageInFlight {
    task: PageTask,
    events: PageEvents,
    /// Its book once decided: the orders it holds, as they will be.
    decided: tokio::sync::oneshot::Receiver<Arc<LifecycleBook>>,
    /// Fires once it is committed (or rolled back, for a dry run).
    committed: tokio::sync::oneshot::Receiver<()>,
}

/// A page that has decided: the next page may start behind it.
struct DecidedPage {
    task: PageTask,
    events: PageEvents,
    ahead: PageAhead,
}

/// What a page behind another takes from it.
struct PageAhead {
    book: Arc<LifecycleBook>,
    committed: tokio::sync::oneshot::Receiver<()>,
}

impl PageInFlight {
    /// Starts applying `events` behind `ahead`; returns the page and the
    /// end of the page ahead (what it did) with its events, to be awaited
    /// before this page's decision.
    fn start(
        store: &Store,
        events: PageEvents,
        config: &ImportConfig,
        ahead: Option<DecidedPage>,
    ) -> (PageInFlight, Option<(PageTask, PageEvents)>) {
        let (decided_tx, decided) = tokio::sync::oneshot::channel();
        let (committed_tx, committed) = tokio::sync::oneshot::channel();
        let (page_ahead, before) = match ahead {
            Some(a) => (Some(a.ahead), Some((a.task, a.events))),
            None => (None, None),
        };
        let task = tokio::spawn(apply(
            store.clone(),
            events.clone(),
            config.dry_run,
            config.show,
            page_ahead,
            decided_tx,
            committed_tx,
        ));
        let page = PageInFlight {
            task,
            events,
            decided,
            committed,
        };
        (page, before)
    }

    /// Waits until the page has decided; its failure otherwise, with its
    /// events.
    async fn decided(self) -> Result<DecidedPage, (ImportFailure, PageEvents)> {
        match self.decided.await {
            Ok(book) => Ok(DecidedPage {
                task: self.task,
                events: self.events,
                ahead: PageAhead {
                    book,
                    committed: self.committed,
                },
            }),
            // It ended before deciding: only an error does.
            Err(_) => match ended(self.task).await {
                Err(e) => Err((e, self.events)),
                Ok(_) => unreachable!("a page decides before it ends well"),
            },
        }
    }
}

/// What a page's task did (nothing when it stopped because the page ahead
/// failed).
async fn ended(task: PageTask) -> Result<ImportSummary, ImportFailure> {
    Ok(joined(task.await)?.unwrap_or_default())
}

/// The output of a task this command spawned (never aborted): a panic in
/// it goes on here.
fn joined<T>(result: Result<T, tokio::task::JoinError>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The table must have the legacy columns.
async fn check_table(legacy: &MySqlPool, table: &str) -> Result<(), ImportFailure> {
    let bad = |problem: &str| ImportFailure::Table {
        table: table.to_owned(),
        problem: problem.to_owned(),
    };
    let columns = legacy::columns(legacy, table).await?;
    if columns.is_empty() {
        return Err(bad("does not exist in the legacy database"));
    }
    let missing: Vec<&str> = std::iter::once("order_id")
        .chain(ID_COLUMNS.iter().map(|t| t.as_str()))
        .chain(std::iter::once("created_at"))
        .filter(|c| !columns.iter().any(|have| have.eq_ignore_ascii_case(c)))
        .collect();
    if !missing.is_empty() {
        return Err(bad(&format!("lacks the columns {}", missing.join(", "))));
    }
    Ok(())
}

/// The import events of a page's rows, order by order; malformed values and
/// blanks are counted (and the first few errors kept).
fn events_of(
    table: &str,
    user_type: UserType,
    rows: &[LegacyRow],
    summary: &mut ImportSummary,
    show: usize,
) -> Vec<(OrderEvent, IdType)> {
    let now_ms = crate::clock::now_ms();
    let error = |summary: &mut ImportSummary, order: &str, column: &'static str, e: String| {
        summary.errors += 1;
        if summary.error_examples.len() < show {
            summary.error_examples.push(RejectedValue {
                table: table.to_owned(),
                order_id: order.chars().take(80).collect(),
                column,
                error: e,
            });
        }
    };
    let mut events = Vec::new();
    for row in rows {
        let raw_order = match std::str::from_utf8(&row.order_id) {
            Ok(text) => text.trim(),
            Err(_) => {
                let shown = String::from_utf8_lossy(&row.order_id).into_owned();
                error(summary, &shown, "order_id", not_utf8(&row.order_id));
                continue;
            }
        };
        let order_id = match OrderId::parse(raw_order) {
            Ok(o) => o,
            Err(e) => {
                error(summary, raw_order, "order_id", e.to_string());
                continue;
            }
        };
        let at = row
            .created_at_ms
            .filter(|ms| *ms >= 1 && *ms <= wire::protobuf::MAX_OCCURRED_AT_MS)
            .unwrap_or(now_ms);
        let values = std::iter::once((IdType::OrderId, Some(raw_order.as_bytes()))).chain(
            ID_COLUMNS
                .iter()
                .copied()
                .zip(row.ids.iter().map(Option::as_deref)),
        );
        for (id_type, value) in values {
            let value = match value.map(std::str::from_utf8).transpose() {
                Ok(text) => text.map(str::trim).unwrap_or_default(),
                Err(_) => {
                    let bytes = value.unwrap_or_default();
                    error(summary, raw_order, id_type.as_str(), not_utf8(bytes));
                    continue;
                }
            };
            if value.is_empty() {
                summary.blank += 1;
                continue;
            }
            let lifecycle_id = match LifecycleId::parse(value) {
                Ok(id) => id,
                Err(e) => {
                    error(summary, raw_order, id_type.as_str(), e.to_string());
                    continue;
                }
            };
            let event_id = import_event_id(user_type, &order_id, id_type, value);
            events.push((
                OrderEvent {
                    event_id,
                    order_id: Some(order_id.clone()),
                    occurred_at_ms: at,
                    user_id: None,
                    user_type: Some(user_type),
                    kind: EventKind::LegacyIdImported(LegacyIdImported {
                        id_type,
                        lifecycle_id,
                        source_table: table.to_owned(),
                    }),
                },
                id_type,
            ));
        }
    }
    events
}

/// The error for a value that is not UTF-8: its length and first bytes in
/// hex (never a lossy conversion, which could read as another id).
fn not_utf8(bytes: &[u8]) -> String {
    let head: String = bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!(
        "is not UTF-8 ({} bytes, starting {head}); not imported",
        bytes.len()
    )
}

/// `legacy:{live|demo}:{order}:{column}:{hash of the value}`: the same
/// legacy value always gets the same event id (at most 112 characters).
pub fn import_event_id(
    user_type: UserType,
    order: &OrderId,
    id_type: IdType,
    value: &str,
) -> EventId {
    let raw = format!(
        "{IMPORT_EVENT_ID_PREFIX}{}:{order}:{}:{:016x}",
        user_type.as_str(),
        id_type.as_str(),
        crate::fnv::fnv1a64(value.as_bytes())
    );
    // Order ids and column names are valid id characters, so this parses.
    EventId::parse(&raw).unwrap_or_else(|_| unreachable!("import event id {raw:?} is valid"))
}

/// Applies one page's events in one transaction (rolled back for a dry
/// run), behind the page `ahead` if any: its orders are taken from it, and
/// the log rows and those orders' rows wait until it is committed (the
/// rows of the other orders do not). Tells `decided` its book once
/// decided and `committed` once committed; `Ok(None)` when the page ahead
/// failed (nothing written).
async fn apply(
    store: Store,
    events: PageEvents,
    dry_run: bool,
    show: usize,
    ahead: Option<PageAhead>,
    decided: tokio::sync::oneshot::Sender<Arc<LifecycleBook>>,
    committed: tokio::sync::oneshot::Sender<()>,
) -> Result<Option<ImportSummary>, ImportFailure> {
    let mut summary = ImportSummary::default();
    let mut tx = store.pool().begin().await.map_err(StoreError::from)?;
    id_projection::share_projection_lock(&mut tx).await?;
    let ids: Vec<EventId> = events.iter().map(|(e, _)| e.event_id.clone()).collect();
    let logged = event_log::existing_event_ids(&mut tx, &ids).await?;
    let fresh: Vec<&(OrderEvent, IdType)> = events
        .iter()
        .filter(|(e, _)| {
            let old = logged.contains(&e.event_id);
            summary.already_present += u64::from(old);
            !old
        })
        .collect();
    let ahead_book = ahead.as_ref().map(|a| a.book.as_ref());
    let mut book = load_book(&mut tx, fresh.iter().map(|(e, _)| e), ahead_book, None).await?;
    let stored = book.bound_ids();
    let mut applied = Applied::default();
    for (event, id_type) in fresh {
        match book.process(event) {
            Ok(rec) => {
                if rec.transitions.is_empty() {
                    summary.already_present += 1;
                } else {
                    *summary.imported.entry(id_type.as_str()).or_default() += 1;
                }
                applied.push(rec, event, None);
            }
            Err(rejection) => record_conflict(event, *id_type, &rejection, show, &mut summary),
        }
    }
    // The page behind, if any, is read and decided from here on.
    let book = Arc::new(book);
    let _ = decided.send(book.clone());
    // The rows of the orders the page ahead does not hold (nearly all: a
    // page's orders are new) now; the rest once it is committed.
    let held = ahead.as_ref().map(|a| a.book.clone());
    let rest = match held.as_deref() {
        Some(held) => {
            write_rows(&mut tx, &book, &stored, &applied, RowsOf::NotHeldBy(held)).await?;
            RowsOf::HeldBy(held)
        }
        None => RowsOf::All,
    };
    if let Some(ahead) = ahead {
        if ahead.committed.await.is_err() {
            // At once, before the page ahead is applied again: this page's
            // locks (the read model's shared lock, the rows written early)
            // go with it.
            tx.rollback().await.map_err(StoreError::from)?;
            return Ok(None);
        }
    }
    append_events(&mut tx, &book, &stored, &applied, rest).await?;
    if dry_run {
        tx.rollback().await.map_err(StoreError::from)?;
    } else {
        tx.commit().await.map_err(StoreError::from)?;
    }
    let _ = committed.send(());
    Ok(Some(summary))
}

fn record_conflict(
    event: &OrderEvent,
    id_type: IdType,
    rejection: &Rejection,
    show: usize,
    summary: &mut ImportSummary,
) {
    let EventKind::LegacyIdImported(import) = &event.kind else {
        return;
    };
    let order = event
        .order_id
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let owner = match rejection {
        Rejection::BoundToOtherOrder { owner, .. } => owner.to_string(),
        _ => order.clone(),
    };
    summary.conflicts += 1;
    tracing::warn!(
        table = %import.source_table,
        order = %order,
        column = id_type.as_str(),
        id = %import.lifecycle_id,
        owner = %owner,
        reason = rejection.reason(),
        "legacy id not imported"
    );
    if summary.conflict_examples.len() < show {
        summary.conflict_examples.push(Conflict {
            table: import.source_table.clone(),
            order_id: order,
            column: id_type,
            lifecycle_id: import.lifecycle_id.to_string(),
            owner,
            reason: rejection.reason(),
        });
    }
}
