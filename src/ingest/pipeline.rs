//! One batch of messages, start to finish, in one database transaction:
//! decode, drop events the log already has (rule R9), load the orders the
//! batch touches and the parked events it can release, run the state
//! machine, append the log, update the `order_lifecycle_ids` rows, park what
//! waits for an id not issued yet (rule R7), record dead letters and the
//! partitions' next offsets, commit. Either all of it is durable or none of
//! it is.
//!
//! The consumer loop and the tests call [`process_batch`]; nothing here
//! knows about Kafka clients.
//!
//! # Several writers
//!
//! Requests are keyed by order and confirmations by lifecycle id, so two
//! instances (or two partitions) can touch the same order at once. Batches
//! run at READ COMMITTED and serialize per order like this:
//!
//! - the order's `order_lifecycle_ids` rows are read `FOR UPDATE`, so a second
//!   batch on the same order waits for the first and then sees its result;
//!   an order `run` kept from its last batch (see `super::order_cache`) is
//!   not read, so not locked: a writer racing it is caught by the unique
//!   keys below, and the losing batch runs again instead of waiting;
//! - what locks cannot cover (an order's first entry, an id bound for the
//!   first time, the same event read by two owners during a rebalance) is
//!   caught by unique keys: `(order_id, seq)`, `event_id`, `lifecycle_id`.
//!   The losing batch rolls back with a duplicate-key error, classified as
//!   [`StoreError::Conflict`], and is retried whole; on the retry it sees the
//!   winner's rows. Sequences therefore stay 1, 2, 3, ... and nothing is
//!   applied twice or lost;
//! - a batch that parks an event for an id another batch is issuing at the
//!   same moment may miss it; [`release_stranded`] finds such events within
//!   a second.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{MySql, MySqlConnection};

use super::order_cache::OrderCache;
use super::overlap::{BatchAhead, BatchProgress, Decided, Standing};
use super::plan::{decide, Applied, Release, Work};
use crate::domain::{
    EventId, EventKind, LifecycleBook, LifecycleId, OrderEvent, OrderId, OrderLifecycle,
    Transition, IMPORT_EVENT_ID_PREFIX,
};
use crate::projection::redis_follower::HandedBatch;
use crate::store::dead_letters::{self, DeadLetter, RedriveSelection};
use crate::store::event_log::{self, NewEntry, Positions};
use crate::store::offsets::{self, PartitionOffset};
use crate::store::parked::{self, NewParked, ParkedRow};
use crate::store::redis_projection::ActiveIds;
use crate::store::{self, id_projection, Store, StoreError};
use crate::wire::{self, InboundMessage};

/// Settings of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Consumer group whose offsets are stored with the data; `None` for
    /// `replay`, whose reading positions matter to no one.
    pub offsets_group: Option<String>,
    /// How long an event may wait for an id before it is dead-lettered.
    pub park_timeout: Duration,
    /// Most events waiting in the parking lot, all ids together (see
    /// [`MAX_PARKED_PER_ID`] for one id); more are dead-lettered as
    /// `parking_full`.
    pub max_parked: u64,
    /// Schema registry ids accepted in framed messages; empty: any.
    pub schema_ids: Vec<u32>,
}

pub use crate::config::DEFAULT_MAX_PARKED;

/// What a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Messages in the batch.
    pub consumed: usize,
    /// Log entries appended, by outcome.
    pub recorded: BTreeMap<&'static str, usize>,
    /// Events skipped because the log (or the parking lot) already had their
    /// `event_id`.
    pub duplicates: usize,
    /// Events newly parked to wait for an id.
    pub parked: usize,
    /// Parked events (from earlier batches) applied or rejected now.
    pub unparked: usize,
    /// Rows of `order_lifecycle_ids` written.
    pub rows_written: usize,
    /// Rejected messages; already in the `dead_letters` table, still to be
    /// published to the dead-letter topic.
    pub dead_letters: Vec<DeadLetter>,
    /// Next offset per partition, as committed with the batch.
    pub offsets: Vec<PartitionOffset>,
    /// What the batch changed in Redis's terms, for the follower (see
    /// [`crate::projection::redis_follower::Handoff`]).
    pub handed: Vec<HandedBatch>,
}

impl BatchOutcome {
    /// Log entries appended, whatever their outcome.
    pub fn recorded_total(&self) -> usize {
        self.recorded.values().sum()
    }

    /// Adds another report of the same messages' processing (a batch split
    /// into single messages).
    pub fn merge(&mut self, other: BatchOutcome) {
        self.consumed += other.consumed;
        for (k, v) in other.recorded {
            *self.recorded.entry(k).or_default() += v;
        }
        self.duplicates += other.duplicates;
        self.parked += other.parked;
        self.unparked += other.unparked;
        self.rows_written += other.rows_written;
        self.dead_letters.extend(other.dead_letters);
        self.handed.extend(other.handed);
        for o in other.offsets {
            match self
                .offsets
                .iter_mut()
                .find(|x| x.topic == o.topic && x.partition == o.partition)
            {
                Some(x) => {
                    x.next_offset = x.next_offset.max(o.next_offset);
                    x.stream_time_ms = x.stream_time_ms.max(o.stream_time_ms);
                }
                None => self.offsets.push(o),
            }
        }
    }
}

/// Processes one batch in one transaction.
///
/// # Errors
/// [`StoreError`]; nothing of the batch is committed then. Transient errors
/// ([`StoreError::is_transient`]) are worth retrying with the same batch.
pub async fn process_batch(
    store: &Store,
    config: &PipelineConfig,
    messages: &[InboundMessage],
) -> Result<BatchOutcome, StoreError> {
    run_batch(store, config, messages, Release::IssuedByBatch).await
}

/// How a batch runs beside the batches around it (see [`super::overlap`]).
#[derive(Debug, Default)]
pub struct Turn<'t> {
    /// The batch ahead, when this one runs behind it before it is done.
    pub ahead: Option<&'t mut BatchAhead>,
    /// Where this batch tells the batch behind it what it touches.
    pub progress: Option<&'t BatchProgress>,
    /// Orders as this instance last committed them (see
    /// [`super::order_cache`]): read from it, kept in it once committed.
    pub cache: Option<&'t OrderCache>,
}

/// [`process_batch`] taking its [`Turn`]: behind a batch that is not done
/// yet, it reads and decides at once but writes only once that batch is
/// done; `Ok(None)` when it gave way instead (see
/// [`Decided::blocks`], an attempt of that batch failed, or that batch was
/// not done within [`super::overlap::GIVE_WAY_AFTER`]): nothing was written, its locks
/// are released, run it again once the batch ahead is over.
///
/// # Errors
/// As [`process_batch`].
pub async fn process_batch_in_turn(
    store: &Store,
    config: &PipelineConfig,
    messages: &[InboundMessage],
    turn: Turn<'_>,
) -> Result<Option<BatchOutcome>, StoreError> {
    let tx = store.pool().begin().await?;
    run_batch_in(tx, config, messages, Release::IssuedByBatch, turn).await
}

/// Applies parked events after row `after` whose awaited id is issued
/// already, up to 500.
///
/// A batch releases the events waiting for the ids it issues. When two
/// instances race (one parks a confirmation while the other, not seeing it
/// yet, issues the id), the event is stranded; this round, run every second
/// over the rows parked in the last minute ([`StrandedWindow`]), picks it
/// up.
///
/// A parked row the database or this version refuses (its event no
/// longer decodes, a write of it is refused) must not stop the round, nor,
/// through a restart, the next `run`: the rows are then released one at a
/// time, and the one refused is dead-lettered as `storage_rejected` and
/// leaves the parking lot.
///
/// # Errors
/// [`StoreError`]: transient, or the database refusing even the dead
/// letter.
pub async fn release_stranded(
    store: &Store,
    config: &PipelineConfig,
    after: i64,
) -> Result<BatchOutcome, StoreError> {
    match release_stranded_rows(store, config, after, STRANDED_ROUND).await {
        Err(e) if e.is_refusal() => {
            tracing::error!(error = %e, "a stranded parked event was refused; releasing them one at a time");
            let rows = {
                let mut conn = store.pool().acquire().await?;
                parked::stranded(&mut conn, after, STRANDED_ROUND).await?
            };
            release_one_at_a_time(store, config, rows).await
        }
        other => other,
    }
}

/// Applies the parked events waiting for `ids`, which another writer bound
/// (an import's page), then those waiting for the ids they issue, as a
/// batch releases what its own events issue ([`Release::Bound`]). Nothing
/// else would release them: `run` releases what its own batches issue,
/// and looks again only at the rows parked in the last minute
/// ([`StrandedWindow`]).
///
/// A row the database or this version refuses is handled as in
/// [`release_stranded`]: the rows are released one at a time, and the one
/// refused is dead-lettered.
///
/// # Errors
/// [`StoreError`]: transient, or the database refusing even the dead
/// letter.
pub async fn release_bound(
    store: &Store,
    config: &PipelineConfig,
    ids: &[LifecycleId],
) -> Result<BatchOutcome, StoreError> {
    match run_batch(store, config, &[], Release::Bound(ids)).await {
        Err(e) if e.is_refusal() => {
            tracing::error!(error = %e, "a parked event was refused; releasing them one at a time");
            let rows = {
                let mut conn = store.pool().acquire().await?;
                parked::awaiting(&mut conn, ids).await?
            };
            release_one_at_a_time(store, config, rows).await
        }
        other => other,
    }
}

/// Releases `rows` (their awaited ids bound) one transaction each; a row
/// refused is dead-lettered as `storage_rejected` and leaves the parking
/// lot. A row another writer released meanwhile releases the next
/// stranded one instead, which is as good.
async fn release_one_at_a_time(
    store: &Store,
    config: &PipelineConfig,
    rows: Vec<ParkedRow>,
) -> Result<BatchOutcome, StoreError> {
    let mut merged = BatchOutcome::default();
    for row in rows {
        match release_stranded_rows(store, config, row.row_id - 1, 1).await {
            Ok(outcome) => merged.merge(outcome),
            Err(e) if e.is_refusal() => {
                tracing::error!(error = %e, row = row.row_id, "dead-lettering a parked event that cannot be applied");
                merged.merge(quarantine_parked(store, &row, &e).await?);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(merged)
}

/// Stranded rows looked at in one round.
const STRANDED_ROUND: u32 = 500;

async fn release_stranded_rows(
    store: &Store,
    config: &PipelineConfig,
    after: i64,
    limit: u32,
) -> Result<BatchOutcome, StoreError> {
    run_batch(store, config, &[], Release::Stranded { after, limit }).await
}

/// Moves a parked row that cannot be applied to the dead letters
/// (`storage_rejected`), in one transaction.
async fn quarantine_parked(
    store: &Store,
    row: &ParkedRow,
    error: &StoreError,
) -> Result<BatchOutcome, StoreError> {
    let event = wire::json::decode(row.event_json.as_bytes()).ok();
    let letter = DeadLetter::for_message(
        &row.message,
        "storage_rejected",
        format!("a parked event that cannot be applied: {error}"),
        event.as_ref(),
    );
    let mut tx = store.pool().begin().await?;
    dead_letters::insert(&mut tx, std::slice::from_ref(&letter)).await?;
    let removed = parked::delete(&mut tx, &[row.row_id]).await?;
    parked::change_size(&mut tx, -(removed as i64)).await?;
    tx.commit().await?;
    Ok(BatchOutcome {
        unparked: 1,
        dead_letters: vec![letter],
        ..BatchOutcome::default()
    })
}

/// Which parked rows [`release_stranded`] looks at: those parked in the
/// last minute. A stranded event is one parked while another batch, not
/// seeing it, issued its id: both transactions end within seconds of each
/// other (a lock wait gives up after 10 s), so a row parked more than a
/// minute ago had its chance. Looking at every parked row each second made
/// that round's cost grow with the parking lot (250,000 rows parked in bulk
/// took MariaDB 80% of a core every second). A new instance starts from
/// the first row.
#[derive(Debug, Default)]
pub struct StrandedWindow {
    /// Highest parked row id seen at each round, oldest first.
    seen: VecDeque<(std::time::Instant, i64)>,
    from: i64,
}

/// How long a parked row is looked at by the stranded round.
const STRANDED_WINDOW: Duration = Duration::from_secs(60);

impl StrandedWindow {
    /// Records the highest parked row id now committed; returns the row
    /// after which the round looks.
    pub fn advance(&mut self, now: std::time::Instant, last_row_id: i64) -> i64 {
        self.seen.push_back((now, last_row_id));
        while let Some(&(at, id)) = self.seen.front() {
            if now.duration_since(at) < STRANDED_WINDOW {
                break;
            }
            self.from = self.from.max(id);
            self.seen.pop_front();
        }
        self.from
    }
}

async fn run_batch(
    store: &Store,
    config: &PipelineConfig,
    messages: &[InboundMessage],
    release: Release<'_>,
) -> Result<BatchOutcome, StoreError> {
    let tx = store.pool().begin().await?;
    run_batch_in(tx, config, messages, release, Turn::default())
        .await
        .map(ran_alone)
}

/// The outcome of a batch run with no batch ahead, which never gives way.
pub fn ran_alone(ran: Option<BatchOutcome>) -> BatchOutcome {
    ran.unwrap_or_else(|| unreachable!("a batch with none ahead never gives way"))
}

/// Dead letters redriven in one transaction, at most.
pub const REDRIVE_BATCH: u32 = 100;

/// Processes again, as one batch, up to [`REDRIVE_BATCH`] dead letters
/// after row `after` that `selection` names and that are not redriven yet
/// (their refusal fixed since: a code change, room in the parking lot, a
/// grant). In one transaction: the letters are locked and marked redriven,
/// so that their event ids are no longer duplicates (R9), and their
/// messages, as they were consumed, go through the pipeline. A message
/// refused again becomes its letter again, with the new reason (and goes
/// back into the outbox). A second `redrive` at the same time waits for
/// the locks and skips what the first took. Returns the highest row id
/// taken and what the batch did, or `None` when nothing is left.
///
/// # Errors
/// [`StoreError`]: nothing was marked then.
pub async fn redrive(
    store: &Store,
    config: &PipelineConfig,
    selection: &RedriveSelection,
    after: i64,
    limit: u32,
) -> Result<Option<(i64, BatchOutcome)>, StoreError> {
    let mut tx = store.pool().begin().await?;
    let letters = dead_letters::for_redrive(&mut tx, selection, after, limit).await?;
    let Some(last) = letters.last().map(|(id, _)| *id) else {
        return Ok(None);
    };
    let ids: Vec<i64> = letters.iter().map(|(id, _)| *id).collect();
    dead_letters::mark_redriven(&mut tx, &ids).await?;
    let messages: Vec<InboundMessage> = letters.into_iter().map(|(_, m)| m).collect();
    let outcome = run_batch_in(
        tx,
        config,
        &messages,
        Release::IssuedByBatch,
        Turn::default(),
    )
    .await
    .map(ran_alone)?;
    Ok(Some((last, outcome)))
}

async fn run_batch_in(
    mut tx: sqlx::Transaction<'static, MySql>,
    config: &PipelineConfig,
    messages: &[InboundMessage],
    release: Release<'_>,
    turn: Turn<'_>,
) -> Result<Option<BatchOutcome>, StoreError> {
    let mut report = BatchOutcome {
        consumed: messages.len(),
        offsets: next_offsets(messages),
        ..BatchOutcome::default()
    };
    let works = decode(messages, &config.schema_ids, &mut report.dead_letters);
    // Behind a batch that is not done (see `super::overlap`); if that
    // batch failed an attempt, give way before reading anything its retry
    // will lock; if it is done, everything of it is committed: alone.
    let ahead = match turn.ahead.as_deref().map(BatchAhead::standing) {
        Some(Standing::Failed) => return Ok(None),
        Some(Standing::Decided(ahead)) => Some(ahead),
        Some(Standing::Done) | None => None,
    };
    if ahead
        .as_deref()
        .is_some_and(|a| a.blocks(works.iter().map(|w| &w.event)))
    {
        return Ok(None);
    }

    // Batches read order state from order_lifecycle_ids: hold off while a
    // rebuild swaps that table (see `crate::projection::rebuild`).
    id_projection::share_projection_lock(&mut tx).await?;
    let works = drop_seen(&mut tx, works, &mut report.duplicates).await?;
    let released_rows: Vec<(ParkedRow, OrderEvent)> = match release {
        Release::IssuedByBatch => load_releasable(&mut tx, issued_by(&works)).await?,
        Release::Bound(ids) => load_releasable(&mut tx, ids.to_vec()).await?,
        Release::Stranded { after, limit } => parked::stranded(&mut tx, after, limit)
            .await?
            .into_iter()
            .map(decode_parked)
            .collect::<Result<_, _>>()?,
    };
    if messages.is_empty() && released_rows.is_empty() {
        return Ok(Some(report));
    }
    if ahead
        .as_deref()
        .is_some_and(|a| a.blocks(released_rows.iter().map(|(_, e)| e)))
    {
        // Now, not when the dropped connection is next used: the parked
        // rows read are locked.
        tx.rollback().await?;
        return Ok(None);
    }
    let released: Vec<Work<'_>> = released_rows
        .iter()
        .map(|(row, event)| Work::released(row, event.clone()))
        .collect();
    let event_ids: HashSet<EventId> = match turn.progress {
        Some(_) => works
            .iter()
            .chain(&released)
            .map(|w| w.event.event_id.clone())
            .chain(
                report
                    .dead_letters
                    .iter()
                    .filter_map(|d| d.event_id.clone()),
            )
            .collect(),
        None => HashSet::new(),
    };
    let mut book = load_book(
        &mut tx,
        works.iter().chain(&released).map(|w| &w.event),
        ahead.as_deref().map(|a| a.book.as_ref()),
        turn.cache,
    )
    .await?;
    let stored = book.bound_ids();

    let mut plan = decide(&mut book, works, released, release);
    // Shared with the batch behind, which takes the orders it needs.
    let book = Arc::new(book);
    if let Some(progress) = turn.progress {
        let awaited = plan.to_park.iter().map(|p| p.awaited.clone());
        progress.has_decided(Decided {
            book: book.clone(),
            awaited: awaited
                .chain(plan.repoint.iter().map(|(_, id)| id.clone()))
                .collect(),
            event_ids,
        });
    }
    // Writes keep batch order: they wait for the batch ahead, not longer
    // than GIVE_WAY_AFTER while holding the locks read so far.
    if let (Some(_), Some(gate)) = (&ahead, turn.ahead) {
        if !gate.cleared().await {
            // Releases the locks read with now: the batch ahead may be
            // waiting for one of them (see GIVE_WAY_AFTER).
            tx.rollback().await?;
            return Ok(None);
        }
    }
    let overflow = cap_parking(&mut tx, &mut plan.to_park, config.max_parked).await?;

    report.recorded = plan.recorded;
    report.unparked = plan.done_rows.len();
    report.parked = plan.to_park.len();
    report.dead_letters.extend(plan.dead_letters);
    report.dead_letters.extend(overflow);
    let removed = parked::delete(&mut tx, &plan.done_rows).await?;
    for (row, id) in &plan.repoint {
        parked::set_awaited(&mut tx, *row, id).await?;
    }
    let added = parked::insert(&mut tx, &plan.to_park, config.park_timeout).await?;
    dead_letters::insert(&mut tx, &report.dead_letters).await?;
    if let Some(group) = &config.offsets_group {
        offsets::save(&mut tx, group, &report.offsets).await?;
    }
    let (rows, positions) =
        append_events(&mut tx, &book, &stored, &plan.applied, RowsOf::All).await?;
    report.rows_written = rows;
    parked::change_size(&mut tx, added as i64 - removed as i64).await?;
    tx.commit().await?;
    if let Some(cache) = turn.cache {
        cache.remember(book.orders(), positions);
    }
    report
        .handed
        .extend(positions.map(|p| handed(p, &plan.applied.entries, &book)));
    Ok(Some(report))
}

/// Most events parked for one id. A producer (or an attacker) sending
/// confirmations for an id that never comes must not fill the parking lot,
/// nor make the batch that finally issues the id load them all at once.
pub const MAX_PARKED_PER_ID: u64 = 1_000;

/// Keeps in `to_park` what fits under [`MAX_PARKED_PER_ID`] beside what
/// already waits for the same id, and under `max_total` for the whole
/// parking lot (in arrival order); returns the rest as dead letters
/// (`parking_full`).
async fn cap_parking(
    conn: &mut MySqlConnection,
    to_park: &mut Vec<NewParked<'_>>,
    max_total: u64,
) -> Result<Vec<DeadLetter>, StoreError> {
    if to_park.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&LifecycleId> = unique(to_park.iter().map(|p| &p.awaited).collect());
    let mut waiting = parked::count_awaiting(conn, &ids).await?;
    let mut total = parked::size(conn).await?;
    let mut overflow = Vec::new();
    to_park.retain(|p| {
        let n = waiting.entry(p.awaited.clone()).or_default();
        let full = if *n >= MAX_PARKED_PER_ID {
            format!(
                "{MAX_PARKED_PER_ID} events already wait for {}; this one is not parked",
                p.awaited
            )
        } else if total >= max_total {
            format!(
                "the parking lot is full: {total} events wait (--max-parked {max_total}); \
                 this one, waiting for {}, is not parked",
                p.awaited
            )
        } else {
            *n += 1;
            total += 1;
            return true;
        };
        let mut letter = DeadLetter::for_message(p.message, "parking_full", full, None);
        letter.event_id = Some(p.event_id.clone());
        overflow.push(letter);
        false
    });
    Ok(overflow)
}

/// Decodes the batch's messages; undecodable input, framed messages of a
/// schema id not allowed, and what only `import-legacy` writes (its
/// synthetic kind, its event-id prefix), become dead letters.
fn decode<'m>(
    messages: &'m [InboundMessage],
    schema_ids: &[u32],
    dead_letters: &mut Vec<DeadLetter>,
) -> Vec<Work<'m>> {
    let mut works = Vec::with_capacity(messages.len());
    for m in messages {
        let payload = m.payload.as_deref().unwrap_or_default();
        let decoded = wire::decode(payload, m.content_type.as_deref());
        if let Some(id) = wire::registry::schema_id(payload) {
            if !schema_ids.is_empty() && !schema_ids.contains(&id) {
                // With the event when it decodes: its event_id then counts
                // for rule R9 like any dead letter's.
                dead_letters.push(DeadLetter::for_message(
                    m,
                    "unknown_schema_id",
                    format!("schema registry id {id} is not one of --schema-ids {schema_ids:?}"),
                    decoded.as_ref().ok(),
                ));
                continue;
            }
        }
        match decoded {
            Ok(event) if matches!(event.kind, EventKind::LegacyIdImported(_)) => {
                dead_letters.push(DeadLetter::for_message(
                    m,
                    "reserved_kind",
                    "legacy_id_imported is written by import-legacy only and is refused on a topic"
                        .into(),
                    Some(&event),
                ))
            }
            Ok(event) if event.event_id.as_str().starts_with(IMPORT_EVENT_ID_PREFIX) => {
                dead_letters.push(DeadLetter::for_message(
                    m,
                    "reserved_event_id",
                    format!(
                        "event ids starting with {IMPORT_EVENT_ID_PREFIX:?} are written by \
                         import-legacy only and are refused on a topic"
                    ),
                    Some(&event),
                ))
            }
            Ok(event) => works.push(Work::arrived(m, event)),
            Err(e) => {
                dead_letters.push(DeadLetter::for_message(m, e.reason(), e.to_string(), None))
            }
        }
    }
    works
}

/// Rule R9: an event_id already logged, parked or dead-lettered, or seen
/// earlier in this batch, changes nothing; counted in `duplicates`.
async fn drop_seen<'m>(
    conn: &mut MySqlConnection,
    mut works: Vec<Work<'m>>,
    duplicates: &mut usize,
) -> Result<Vec<Work<'m>>, StoreError> {
    let event_ids: Vec<EventId> = works.iter().map(|w| w.event.event_id.clone()).collect();
    let mut seen = store::seen_event_ids(conn, &event_ids).await?;
    works.retain(|w| {
        let fresh = seen.insert(w.event.event_id.clone());
        *duplicates += usize::from(!fresh);
        fresh
    });
    Ok(works)
}

/// Which of a batch's id rows a write takes. `import-legacy` writes the
/// rows of the orders the page ahead does not hold before that page
/// commits (no row of theirs is one it writes or locks), the others after.
#[derive(Debug, Clone, Copy)]
pub enum RowsOf<'b> {
    /// Every order's.
    All,
    /// The orders the batch ahead does not hold.
    NotHeldBy(&'b LifecycleBook),
    /// The orders it holds.
    HeldBy(&'b LifecycleBook),
}

impl RowsOf<'_> {
    /// Whether the rows of `order` are this write's.
    fn takes(self, order: &OrderId) -> bool {
        match self {
            RowsOf::All => true,
            RowsOf::NotHeldBy(ahead) => ahead.order(order).is_none(),
            RowsOf::HeldBy(ahead) => ahead.order(order).is_some(),
        }
    }
}

/// The rows of the ids `applied` touched in the orders `which` takes, as
/// `book` has them now: those bound before the batch (in `stored`)
/// updated, the others inserted (see [`id_projection::write_changes`]).
/// Returns the rows written.
///
/// # Errors
/// [`StoreError`]; a row another writer bound meanwhile is a
/// [`StoreError::Conflict`].
pub async fn write_rows(
    conn: &mut MySqlConnection,
    book: &LifecycleBook,
    stored: &HashSet<LifecycleId>,
    applied: &Applied,
    which: RowsOf<'_>,
) -> Result<usize, StoreError> {
    let touched: Vec<_> = unique(applied.touched.clone())
        .into_iter()
        .filter(|(order, _)| which.takes(order))
        .collect();
    let (changed, issued): (Vec<_>, Vec<_>) = book
        .records(&touched)
        .into_iter()
        .partition(|(_, r)| stored.contains(&r.lifecycle_id));
    id_projection::write_changes(conn, &issued, &changed).await?;
    Ok(issued.len() + changed.len())
}

/// The core every writer of the log shares (`run`, `replay`,
/// `import-legacy`): the rows ([`write_rows`]) that `rows` takes, then the
/// log entries, last, because the append holds the log head's lock until
/// the commit (rule R12). Returns the rows written and the positions taken.
///
/// # Errors
/// As [`write_rows`].
pub async fn append_events(
    conn: &mut MySqlConnection,
    book: &LifecycleBook,
    stored: &HashSet<LifecycleId>,
    applied: &Applied,
    rows: RowsOf<'_>,
) -> Result<(usize, Option<Positions>), StoreError> {
    let written = write_rows(conn, book, stored, applied, rows).await?;
    let positions = event_log::append(conn, &applied.entries).await?;
    Ok((written, positions))
}

/// The batch's keys for the Redis follower: the ids its entries issued, and
/// the active ids of the orders they changed, as `book` has them after the
/// batch.
fn handed(positions: Positions, entries: &[NewEntry], book: &LifecycleBook) -> HandedBatch {
    let mut lookups = Vec::new();
    let mut orders: Vec<(OrderId, ActiveIds)> = Vec::new();
    let mut seen: HashSet<&OrderId> = HashSet::new();
    for e in entries.iter().filter(|e| !e.transitions.is_empty()) {
        for t in &e.transitions {
            if let Transition::Issued { lifecycle_id, .. } = t {
                lookups.push((lifecycle_id.clone(), e.order_id.clone()));
            }
        }
        if !seen.insert(&e.order_id) {
            continue;
        }
        let active: ActiveIds = book
            .order(&e.order_id)
            .map(|o| o.active_ids())
            .unwrap_or_default();
        orders.push((e.order_id.clone(), active));
    }
    HandedBatch {
        positions,
        last_event_id: entries
            .last()
            .map(|e| e.event_id.to_string())
            .unwrap_or_default(),
        lookups,
        orders,
    }
}

/// Processes a batch through `attempt` (which retries transient failures as
/// its caller sees fit, and answers `Ok(None)` when it gives up, e.g. on
/// shutdown). If the database refuses the batch, each message is processed
/// alone, and a message it still refuses is dead-lettered as
/// `storage_rejected` ([`record_poison`]): one message never blocks a
/// partition. `run` and `replay` both go through here.
///
/// # Errors
/// [`StoreError`] when the database is unavailable beyond what `attempt`
/// waits for, or refuses even the dead letter.
pub async fn process_isolating<'m, F, Fut>(
    store: &Store,
    config: &PipelineConfig,
    batch: &'m [InboundMessage],
    mut attempt: F,
) -> Result<Option<BatchOutcome>, StoreError>
where
    F: FnMut(&'m [InboundMessage]) -> Fut,
    Fut: std::future::Future<Output = Result<Option<BatchOutcome>, StoreError>>,
{
    match attempt(batch).await {
        Err(e) if e.is_refusal() => {
            tracing::error!(error = %e, "the database refused the batch; processing its messages one at a time");
            let mut merged = BatchOutcome::default();
            for m in batch {
                match attempt(std::slice::from_ref(m)).await {
                    Ok(Some(r)) => merged.merge(r),
                    Ok(None) => return Ok(None),
                    Err(e) if e.is_refusal() => {
                        tracing::error!(error = %e, topic = %m.topic, partition = m.partition, offset = m.offset, "the database refused a message; dead-lettering it");
                        merged.merge(record_poison(store, config, m, &e).await?);
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Some(merged))
        }
        other => other,
    }
}

/// Dead-letters one message the database refused to store (reason
/// `storage_rejected`) and moves its partition past it, in one transaction.
///
/// # Errors
/// [`StoreError`] when even that is refused: the database itself is broken.
pub async fn record_poison(
    store: &Store,
    config: &PipelineConfig,
    message: &InboundMessage,
    error: &StoreError,
) -> Result<BatchOutcome, StoreError> {
    let event = message
        .payload
        .as_deref()
        .and_then(|p| wire::decode(p, message.content_type.as_deref()).ok());
    let letter = DeadLetter::for_message(
        message,
        "storage_rejected",
        format!("the database refused this event: {error}"),
        event.as_ref(),
    );
    let report = BatchOutcome {
        consumed: 1,
        offsets: next_offsets(std::slice::from_ref(message)),
        dead_letters: vec![letter],
        ..BatchOutcome::default()
    };
    let mut tx = store.pool().begin().await?;
    dead_letters::insert(&mut tx, &report.dead_letters).await?;
    if let Some(group) = &config.offsets_group {
        offsets::save(&mut tx, group, &report.offsets).await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// Parked rows waiting for one of `ids` (those the batch issues, or those
/// another writer bound), and, transitively, for ids those parked events
/// issue (a parked cancel issues its cancel id, for which a confirmation
/// may be parked too).
async fn load_releasable(
    conn: &mut MySqlConnection,
    ids: Vec<LifecycleId>,
) -> Result<Vec<(ParkedRow, OrderEvent)>, StoreError> {
    let mut asked: HashSet<LifecycleId> = HashSet::new();
    let mut next = ids;
    let mut released = Vec::new();
    while !next.is_empty() {
        next.retain(|id| asked.insert(id.clone()));
        let found = parked::awaiting(conn, &next).await?;
        next = Vec::new();
        for row in found {
            let (row, event) = decode_parked(row)?;
            next.extend(event.issued_ids().into_iter().map(|(id, _)| id));
            released.push((row, event));
        }
    }
    released.sort_by_key(|(r, _)| r.row_id);
    Ok(released)
}

/// The ids `works` issue.
fn issued_by(works: &[Work<'_>]) -> Vec<LifecycleId> {
    works
        .iter()
        .flat_map(|w| w.event.issued_ids().into_iter().map(|(id, _)| id))
        .collect()
}

/// A parked row with its event decoded (it was encoded by this service, so
/// failing to decode it means the row is corrupt).
fn decode_parked(row: ParkedRow) -> Result<(ParkedRow, OrderEvent), StoreError> {
    let event = wire::json::decode(row.event_json.as_bytes()).map_err(|e| StoreError::Corrupt {
        table: "parked_events",
        detail: format!("row {}: {e}", row.row_id),
    })?;
    Ok((row, event))
}

/// Loads, locked, every order the events can touch: their own orders and
/// the owners of every id they issue or name. Behind a batch not committed
/// yet, the orders `ahead` holds are taken from it as they will be once it
/// commits, and only the others loaded and locked (see `super::overlap`);
/// of those, the orders `cache` holds at their last log entry are taken
/// from it, not read nor locked (see `super::order_cache`).
pub(crate) async fn load_book<'e>(
    conn: &mut MySqlConnection,
    events: impl Iterator<Item = &'e OrderEvent> + Clone,
    ahead: Option<&LifecycleBook>,
    cache: Option<&OrderCache>,
) -> Result<LifecycleBook, StoreError> {
    let ids: Vec<LifecycleId> = unique(
        events
            .clone()
            .flat_map(|e| {
                e.issued_ids()
                    .into_iter()
                    .map(|(id, _)| id)
                    .chain(e.referenced_ids())
            })
            .collect(),
    );
    let mut orders: Vec<OrderId> = events.filter_map(|e| e.order_id.clone()).collect();
    let mut unknown = Vec::new();
    for id in ids {
        match ahead.and_then(|a| a.owner_of(&id)) {
            Some(owner) => orders.push(owner.clone()),
            None => unknown.push(id),
        }
    }
    orders.extend(
        id_projection::owners_of(conn, &unknown)
            .await?
            .into_values(),
    );
    let mut book = LifecycleBook::new();
    let mut loaded = Vec::new();
    for order in unique(orders) {
        match ahead.and_then(|a| a.order(&order)) {
            Some(taken) => book.insert(taken.clone()),
            None => loaded.push(order),
        }
    }
    let orders = match cache {
        Some(cache) => load_through(conn, &loaded, cache).await?,
        None => id_projection::load_orders(conn, &loaded, true).await?,
    };
    for order in orders {
        book.insert(order);
    }
    Ok(book)
}

/// The orders `cache` holds at their last log entry, taken from it; the
/// others through [`id_projection::load_orders`] (rows locked first, then
/// their last sequence number, so that a batch which waited for another
/// writer's lock numbers its entries after that writer's).
async fn load_through(
    conn: &mut MySqlConnection,
    orders: &[OrderId],
    cache: &OrderCache,
) -> Result<Vec<OrderLifecycle>, StoreError> {
    let seqs = event_log::last_seqs(conn, orders).await?;
    let mut found = Vec::with_capacity(orders.len());
    let mut missed = Vec::new();
    for order in orders {
        // An order with no log entry is new: nothing to look up.
        let Some(&seq) = seqs.get(order) else {
            missed.push(order.clone());
            continue;
        };
        let (lookup, kept) = cache.take(order, seq);
        metrics::counter!("order_lifecycle_order_cache_lookups_total", "result" => lookup.as_str())
            .increment(1);
        match kept {
            Some(kept) => found.push(kept),
            None => missed.push(order.clone()),
        }
    }
    found.extend(id_projection::load_orders(conn, &missed, true).await?);
    Ok(found)
}

/// Dead-letters parked events whose time is up in stream time (rule R7):
/// those whose limit is at or before `stream_time_ms`
/// ([`crate::store::offsets::stream_time`]), up to `limit`, in one
/// transaction. Returns the letters, for the dead-letter topic.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn expire_parked(
    store: &Store,
    park_timeout: Duration,
    stream_time_ms: i64,
    limit: u32,
) -> Result<Vec<DeadLetter>, StoreError> {
    let mut tx = store.pool().begin().await?;
    let rows = parked::expired(&mut tx, stream_time_ms, limit).await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let letters: Vec<DeadLetter> = rows
        .iter()
        .map(|row| {
            let event = wire::json::decode(row.event_json.as_bytes()).ok();
            let what = event
                .as_ref()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "a parked event".to_owned());
            DeadLetter::for_message(
                &row.message,
                "unknown_lifecycle_id",
                format!(
                    "{what} waited for {}, which no event issued within {} s of stream time \
                     after it (rule R7)",
                    row.awaited,
                    park_timeout.as_secs_f64()
                ),
                event.as_ref(),
            )
        })
        .collect();
    let ids: Vec<i64> = rows.iter().map(|r| r.row_id).collect();
    let removed = parked::delete(&mut tx, &ids).await?;
    dead_letters::insert(&mut tx, &letters).await?;
    parked::change_size(&mut tx, -(removed as i64)).await?;
    tx.commit().await?;
    Ok(letters)
}

/// The next offset to read for each partition in the batch, with the
/// newest Kafka timestamp the batch applies from it.
fn next_offsets(messages: &[InboundMessage]) -> Vec<PartitionOffset> {
    let mut offsets: Vec<PartitionOffset> = Vec::new();
    for m in messages {
        let slot = match offsets
            .iter_mut()
            .find(|o| o.partition == m.partition && o.topic == m.topic)
        {
            Some(slot) => slot,
            None => {
                offsets.push(PartitionOffset {
                    topic: m.topic.clone(),
                    partition: m.partition,
                    next_offset: 0,
                    stream_time_ms: None,
                });
                offsets.last_mut().expect("just pushed")
            }
        };
        slot.next_offset = slot.next_offset.max(m.offset + 1);
        slot.stream_time_ms = slot.stream_time_ms.max(m.timestamp_ms);
    }
    offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    offsets
}

/// Removes repeats, keeping first occurrences in order.
pub(crate) fn unique<T: Clone + Eq + std::hash::Hash>(items: Vec<T>) -> Vec<T> {
    let mut seen = HashSet::new();
    items
        .into_iter()
        .filter(|x| seen.insert(x.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::StrandedWindow;

    #[test]
    fn the_stranded_round_looks_at_rows_parked_in_the_last_minute() {
        let mut window = StrandedWindow::default();
        let start = Instant::now();
        assert_eq!(window.advance(start, 100), 0, "a new instance looks at all");
        let s = |secs| start + Duration::from_secs(secs);
        assert_eq!(window.advance(s(30), 250), 0);
        // A minute after 100 was the highest row, rows up to 100 are done.
        assert_eq!(window.advance(s(60), 300), 100);
        assert_eq!(window.advance(s(89), 300), 100);
        assert_eq!(window.advance(s(95), 310), 250);
        // Rows deleted since (released) never move the window back.
        assert_eq!(window.advance(s(200), 0), 310);
        assert_eq!(window.advance(s(201), 0), 310);
    }
}
