//! `replay`: re-reads the consumed topics from the earliest retained offset
//! (or from a point in time) into the event log, through the same pipeline as
//! `run`.
//!
//! - Events the log already has are duplicates (rule R9, which covers
//!   dead-lettered events too), so a replay over a healthy store changes
//!   nothing; a replay into an empty database reconstructs it.
//! - It reads under its own consumer group with partitions assigned
//!   directly: it never joins, rebalances or commits for the live group.
//! - Partitions are merged in the order the live consumer applies them
//!   (rule R11, [`crate::ingest::ordering`]): every partition's next message
//!   is at hand, so the merge is exact, and for a stream produced in order
//!   the per-order sequences come out as the live consumer made them.
//! - Each partition is read up to its end as of when the replay reaches it
//!   (librdkafka's partition-EOF event, taken from the fetch responses; the
//!   broker's offset listing is not trusted, as some Kafka-protocol brokers
//!   report it per record batch).
//! - When the log changed, Redis is re-projected at the end (as `rebuild
//!   --target redis` does); the MySQL projection is written batch by batch.
//! - Dead letters found go to the `dead_letters` table, the outbox that the
//!   next `run` publishes to the dead-letter topic.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{parse_timestamp_ms, DatabaseConfig, InputConfig, KafkaConfig, RedisConfig};
use crate::ingest::ordering::{earliest, Keyed};
use crate::ingest::pipeline::{process_batch, process_isolating, PipelineConfig};
use crate::kafka;
use crate::progress::{grouped, Progress};
use crate::projection::rebuild::{self, RebuildError};
use crate::projection::redis_follower::{self, Resume};
use crate::retry::for_a_command;
use crate::store::redis_projection::{RedisError, RedisProjection};
use crate::store::stray_keys::UnexplainedKeys;
use crate::store::{event_log, Store, StoreError};
use crate::wire::InboundMessage;

/// Options of `replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayConfig {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    /// The topics, batch size and park timeout, as `run` has them.
    #[command(flatten)]
    pub input: InputConfig,
    /// Consumer group the replay reads under; never the live one's.
    #[arg(
        long = "group-id",
        env = "OL_REPLAY_GROUP_ID",
        default_value = "order-lifecycle-replay"
    )]
    pub group_id: String,
    /// Start at the first message at or after this time (RFC 3339 UTC, e.g.
    /// 2026-11-28T09:30:00Z, or epoch milliseconds) instead of the earliest
    /// retained offset.
    #[arg(long, value_parser = parse_timestamp_ms)]
    pub since: Option<i64>,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplaySummary {
    /// Messages read from Kafka.
    pub messages: u64,
    /// Log entries appended.
    pub recorded: u64,
    /// Events the store already had (logged, parked or dead-lettered).
    pub duplicates: u64,
    /// Events parked to wait for an id.
    pub parked: u64,
    /// Messages rejected (undecodable, or breaking a rule); a message
    /// dead-lettered before is not recorded again.
    pub dead_letters: u64,
    /// Rows of `order_lifecycle_ids` written.
    pub rows: u64,
    /// Messages read but older than `--since`, skipped.
    pub before_since: u64,
    /// Log entries re-projected into Redis (0 when the log did not change).
    pub redis_entries: u64,
    pub seconds: f64,
}

/// Why a replay stopped. What it committed stays: replaying again goes on
/// where it matters (everything already logged is a duplicate).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Unreachable(#[from] crate::kafka::TopicSetupError),
    #[error("topic {0:?} does not exist or has no partitions")]
    NoSuchTopic(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("re-projecting Redis: {0}")]
    Rebuild(#[from] RebuildError),
    #[error("{0} messages were delivered outside their partition's queue and not replayed; run replay again")]
    Stray(u64),
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// Runs `replay` as the command line asks and prints the summary.
///
/// # Errors
/// [`ReplayError`].
pub async fn run(config: ReplayConfig) -> Result<(), ReplayError> {
    crate::kafka::check_reachable(&config.kafka).await?;
    let store = Store::connect(&config.database.url, config.database.max_connections).await?;
    store.migrate().await?;
    let redis = RedisProjection::connect_to(&config.redis).await?;
    let s = replay(&store, &redis, &config).await?;
    if s.before_since > 0 {
        println!(
            "replay: {} messages older than --since skipped",
            grouped(s.before_since)
        );
    }
    println!(
        "replay: {} messages in {:.1} s ({}/s): {} log entries appended, {} already logged, \
         {} parked, {} rejected (each recorded once in dead_letters), {} rows written, \
         {} log entries re-projected into Redis",
        grouped(s.messages),
        s.seconds,
        grouped((s.messages as f64 / s.seconds.max(1e-9)) as u64),
        grouped(s.recorded),
        grouped(s.duplicates),
        grouped(s.parked),
        grouped(s.dead_letters),
        grouped(s.rows),
        grouped(s.redis_entries),
    );
    Ok(())
}

/// One partition being replayed.
struct Lane {
    topic: String,
    partition: i32,
    queue: rdkafka::consumer::stream_consumer::StreamPartitionQueue<
        rdkafka::consumer::DefaultConsumerContext,
    >,
    /// The next message, read but not yet merged.
    head: Option<Keyed>,
    /// The end of the partition was reached.
    finished: bool,
}

/// Replays the configured topics into `store`, then re-projects `redis`
/// when the log changed.
///
/// # Errors
/// [`ReplayError`].
pub async fn replay(
    store: &Store,
    redis: &RedisProjection,
    config: &ReplayConfig,
) -> Result<ReplaySummary, ReplayError> {
    let started = Instant::now();
    let consumer: Arc<StreamConsumer> = Arc::new(
        kafka::consumer_config(&config.kafka, &config.group_id, Duration::from_secs(10))
            .set("enable.partition.eof", "true")
            .create()?,
    );
    let (starts, estimate) = start_offsets(&consumer, config).await?;

    // Each partition gets its own queue before anything is assigned (a queue
    // split after assignment may miss the first messages).
    let mut lanes = Vec::new();
    let mut assignment = TopicPartitionList::new();
    for (topic, partition, start) in &starts {
        if *start == Offset::End {
            continue;
        }
        let queue = consumer
            .split_partition_queue(topic, *partition)
            .ok_or_else(|| ReplayError::NoSuchTopic(topic.clone()))?;
        assignment.add_partition_offset(topic, *partition, *start)?;
        lanes.push(Lane {
            topic: topic.clone(),
            partition: *partition,
            queue,
            head: None,
            finished: false,
        });
    }
    consumer.assign(&assignment)?;
    tracing::info!(
        partitions = lanes.len(),
        group = %config.group_id,
        since = config.since,
        "replaying"
    );

    // The main queue must be served (it carries errors and statistics); it
    // receives no message unless a partition queue was not in place.
    let stray = Arc::new(AtomicU64::new(0));
    let main_queue = tokio::spawn({
        let (consumer, stray) = (consumer.clone(), stray.clone());
        async move {
            loop {
                match consumer.recv().await {
                    Ok(_) => {
                        stray.fetch_add(1, AtomicOrdering::Relaxed);
                    }
                    Err(KafkaError::PartitionEOF(_)) => {}
                    Err(e) => tracing::warn!(error = %e, "kafka reports an error during replay"),
                }
            }
        }
    });

    let pipeline = PipelineConfig {
        offsets_group: None,
        park_timeout: config.input.parking.park_timeout,
        max_parked: config.input.parking.max_parked,
        schema_ids: config.input.schemas.schema_ids.clone(),
    };
    let mut progress = Progress::new("replay", "messages", Some(estimate));
    let mut summary = ReplaySummary::default();
    let mut batch = Vec::with_capacity(config.input.batch_size);
    let result = async {
        loop {
            for lane in lanes.iter_mut().filter(|l| l.head.is_none() && !l.finished) {
                fill(lane).await?;
                if lane.finished {
                    pause(&consumer, lane);
                }
            }
            let Some(i) = earliest(lanes.iter().map(|l| l.head.as_ref())) else {
                break;
            };
            let message = lanes[i].head.take().map(|k| k.message);
            // The broker's time index only gives a starting point (some
            // brokers answer offset 0 for any time): the time decides.
            if let (Some(since), Some(m)) = (config.since, &message) {
                if m.timestamp_ms.is_some_and(|ts| ts < since) {
                    summary.before_since += 1;
                    continue;
                }
            }
            batch.extend(message);
            if batch.len() >= config.input.batch_size {
                apply(store, &pipeline, &batch, &mut summary).await?;
                progress.add(batch.len() as u64);
                batch.clear();
            }
        }
        apply(store, &pipeline, &batch, &mut summary).await?;
        progress.add(batch.len() as u64);
        Ok::<_, ReplayError>(())
    }
    .await;
    progress.finish();
    main_queue.abort();
    drop(lanes);
    consumer.unassign()?;
    result?;
    let stray = stray.load(AtomicOrdering::Relaxed);
    if stray > 0 {
        return Err(ReplayError::Stray(stray));
    }

    // Redis is re-projected whole when the replay changed the log, or when
    // it does not follow this log: a replay killed before this point (or a
    // flushed Redis with no `run` beside) and run again records nothing, and
    // would leave Redis as it was. Following it, Redis is brought to the
    // head (nothing to do when a `run` keeps it there).
    if summary.recorded == 0 && follows_this_log(store, redis).await? {
        summary.redis_entries =
            rebuild::catch_up_to_head(store, redis, "project the log's last entries").await?;
    } else {
        match rebuild::RebuildLease::acquire(store).await {
            Ok(mut lease) => {
                summary.redis_entries =
                    rebuild::rebuild_redis(store, redis, &mut lease, UnexplainedKeys::Keep)
                        .await?
                        .events;
            }
            // Another rebuild is running, maybe of MySQL only, maybe past
            // the log's end when it started: the entries replayed are
            // projected as a live `run`'s follower projects them, beside it.
            Err(RebuildError::Busy) => {
                tracing::warn!(
                    "a rebuild is running; the replayed entries are projected into Redis beside it"
                );
                summary.redis_entries =
                    rebuild::catch_up_to_head(store, redis, "project the replayed entries").await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Whether Redis's projection record names this log and, at its position,
/// the entry it recorded (see `redis_follower::resume_point`).
async fn follows_this_log(store: &Store, redis: &RedisProjection) -> Result<bool, ReplayError> {
    let log = event_log::log_head(store.pool()).await?;
    let at = redis.projected().await?;
    let resume = redis_follower::resume_point(store, &log, at.as_ref()).await?;
    Ok(matches!(resume, Resume::After(_)))
}

/// Every partition of the topics with the offset to start from:
/// the beginning, or the first offset at or after `--since`
/// ([`Offset::End`] when the partition has nothing that recent), and an
/// estimate of the messages to read, from the brokers' offset listing (for
/// the progress bar only).
async fn start_offsets(
    consumer: &Arc<StreamConsumer>,
    config: &ReplayConfig,
) -> Result<(Vec<(String, i32, Offset)>, u64), ReplayError> {
    let consumer = consumer.clone();
    let topics = config.input.topics.clone();
    let since = config.since;
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(10);
        let mut list = TopicPartitionList::new();
        for topic in topics.iter().filter(|t| !t.trim().is_empty()) {
            let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
            let partitions = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len())
                .unwrap_or(0);
            if partitions == 0 {
                return Err(ReplayError::NoSuchTopic(topic.clone()));
            }
            for p in 0..partitions as i32 {
                let offset = match since {
                    Some(ms) => Offset::Offset(ms),
                    None => Offset::Beginning,
                };
                list.add_partition_offset(topic, p, offset)?;
            }
        }
        if since.is_some() {
            list = consumer.offsets_for_times(list, timeout)?;
            // A partition without a message at or after the time comes back
            // as the end, or (from some brokers) as no offset at all.
            for e in list.elements() {
                if !matches!(e.offset(), Offset::Offset(_)) {
                    tracing::info!(
                        topic = e.topic(),
                        partition = e.partition(),
                        "nothing at or after --since"
                    );
                }
            }
            let mut only_offsets = TopicPartitionList::new();
            for e in list.elements() {
                let offset = match e.offset() {
                    Offset::Offset(o) => Offset::Offset(o),
                    _ => Offset::End,
                };
                only_offsets.add_partition_offset(e.topic(), e.partition(), offset)?;
            }
            list = only_offsets;
        }
        let mut estimate = 0;
        let starts: Vec<(String, i32, Offset)> = list
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition(), e.offset()))
            .collect();
        for (topic, partition, start) in &starts {
            if let Ok((low, high)) = consumer.fetch_watermarks(topic, *partition, timeout) {
                let from = match start {
                    Offset::Offset(o) => *o,
                    Offset::End => high,
                    _ => low,
                };
                estimate += (high - from).max(0) as u64;
            }
        }
        Ok((starts, estimate))
    })
    .await
    .map_err(|e| ReplayError::Invalid(format!("offset lookup task failed: {e}")))?
}

/// Reads a lane's next message, or notes that its end was reached.
async fn fill(lane: &mut Lane) -> Result<(), ReplayError> {
    let mut failures = 0;
    loop {
        match lane.queue.recv().await {
            Ok(m) => {
                lane.head = Some(Keyed::new(kafka::inbound(&m)));
                return Ok(());
            }
            Err(KafkaError::PartitionEOF(_)) => {
                lane.finished = true;
                return Ok(());
            }
            Err(e) if failures < 30 => {
                failures += 1;
                tracing::warn!(topic = %lane.topic, partition = lane.partition, error = %e, "kafka read failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Stops fetching a finished partition (live traffic goes on arriving).
fn pause(consumer: &StreamConsumer, lane: &Lane) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&lane.topic, lane.partition);
    if let Err(e) = consumer.pause(&tpl) {
        tracing::debug!(error = %e, "could not pause a finished partition");
    }
}

/// Processes a batch, retrying transient failures; a batch the database
/// refuses is isolated message by message as `run` does
/// ([`process_isolating`]).
async fn apply(
    store: &Store,
    pipeline: &PipelineConfig,
    batch: &[InboundMessage],
    summary: &mut ReplaySummary,
) -> Result<(), ReplayError> {
    if batch.is_empty() {
        return Ok(());
    }
    // A one-off command: retried for about a minute, then the operator is
    // told (`run` waits for its database instead).
    let attempt = |messages| async move {
        for_a_command("replay batch", || process_batch(store, pipeline, messages))
            .await
            .map(Some)
    };
    let Some(report) = process_isolating(store, pipeline, batch, attempt).await? else {
        return Ok(());
    };
    summary.messages += report.consumed as u64;
    summary.recorded += report.recorded_total() as u64;
    summary.duplicates += report.duplicates as u64;
    summary.parked += report.parked as u64;
    summary.dead_letters += report.dead_letters.len() as u64;
    summary.rows += report.rows_written as u64;
    Ok(())
}
