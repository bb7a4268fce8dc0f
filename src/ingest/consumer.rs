//! The consumer loop. It only moves data: receive a batch, hand it to
//! [`process_batch`], publish its dead letters, commit its offsets, wake the
//! Redis follower.
//!
//! Shutdown is an input: once `shutdown` completes, the batch in flight is
//! finished and committed (or, if the database is unreachable, abandoned
//! uncommitted after `--shutdown-timeout`, to be read again by the next
//! owner), the group is left, and `run` returns `Ok`.
//!
//! Failures, by what they need:
//! - transient (database, broker or Redis unreachable, deadlock, a concurrent
//!   writer's conflict): retried with backoff, nothing committed meanwhile;
//! - a batch the database refuses for another reason: processed again one
//!   message at a time, and the message it refuses is dead-lettered as
//!   `storage_rejected`, so that one message never blocks a partition;
//! - the database refusing even that: fatal, `run` returns the error.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use super::assignment::{AssignmentContext, ConsumerStatus, OffsetGate};
use super::backoff::Backoff;
use super::dead_letter::{publish_pending, DeadLetterPublisher};
use super::ordering::merge_by_time;
use super::pipeline::{
    expire_parked, process_batch, process_isolating, release_stranded, BatchReport, InboundMessage,
    PipelineConfig,
};
use super::redis_follower;
use crate::config::RunConfig;
use crate::http::{self, ApiState};
use crate::kafka;
use crate::store::dead_letters::DeadLetter;
use crate::store::{Store, StoreError};

/// Retries of a batch that hits another writer's committed keys before it
/// is treated as refused.
const MAX_CONFLICT_RETRIES: usize = 20;

/// Runs the ingesting consumer until `shutdown` completes.
///
/// # Errors
/// Start-up failures (bad configuration, unreachable database, migrations)
/// and fatal storage errors. Transient failures are retried with backoff.
pub async fn run(
    config: RunConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    // The shutdown input, as a flag every wait can watch.
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    let signal = tokio::spawn(async move {
        shutdown.await;
        let _ = shutdown_tx.send(true);
        // Keep the sender alive until `run` ends (it aborts this task).
        std::future::pending::<()>().await;
    });
    let result = run_until(config, &mut shutdown_rx).await;
    signal.abort();
    result
}

async fn run_until(
    config: RunConfig,
    shutdown_rx: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    tracing::info!(
        brokers = %config.kafka.brokers,
        topics = ?config.topics,
        group = %config.group_id,
        database = %config.database.url,
        redis = %config.redis.url,
        "starting order-lifecycle consumer"
    );
    let status = Arc::new(ConsumerStatus::default());
    let api = ApiState::new(&config.http, config.redis.clone(), Some(status.clone()));
    let http = match config.http.listen.0 {
        Some(listen) => {
            let mut stop = shutdown_rx.clone();
            let server = http::start(listen, api.clone(), async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
            .with_context(|| format!("binding the HTTP server to {listen}"))?;
            Some(server)
        }
        None => None,
    };
    let Some(store) = connect(&config, shutdown_rx).await? else {
        return Ok(());
    };
    let _ = api.store.set(store.clone());

    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    if config.create_topics {
        let mut all = topics.clone();
        all.push(&config.dead_letter_topic);
        kafka::ensure_topics(&config.kafka, &all, config.topic_partitions)
            .await
            .context("creating topics")?;
    }
    let dead_letters = DeadLetterPublisher::new(&config.kafka, &config.dead_letter_topic)
        .context("creating the dead-letter producer")?;
    let consumer: StreamConsumer<AssignmentContext> =
        kafka::consumer_config(&config.kafka, &config.group_id, config.session_timeout)
            // For the consumer-lag gauge (see AssignmentContext).
            .set("statistics.interval.ms", "5000")
            .create_with_context(AssignmentContext::new(status))
            .context("creating the Kafka consumer")?;
    consumer
        .subscribe(&topics)
        .context("subscribing to the topics")?;

    let (follower_stop, follower_stop_rx) = watch::channel(false);
    let wake = Arc::new(Notify::new());
    let follower = tokio::spawn(redis_follower::run(
        store.clone(),
        config.redis.clone(),
        wake.clone(),
        follower_stop_rx,
    ));

    let ingest = Ingest {
        config: &config,
        pipeline: PipelineConfig {
            offsets_group: Some(config.group_id.clone()),
            park_timeout: config.park_timeout,
        },
        store: &store,
        consumer: &consumer,
        dead_letters: &dead_letters,
        wake: &wake,
    };
    let result = ingest.consume(shutdown_rx.clone()).await;

    // Leave the group now, so that the partitions move at once; the follower
    // projects what was committed, then stops.
    consumer.unsubscribe();
    wake.notify_one();
    let _ = follower_stop.send(true);
    if tokio::time::timeout(config.shutdown_timeout, follower)
        .await
        .is_err()
    {
        tracing::warn!("redis follower did not stop in time; it resumes from its checkpoint");
    }
    if let Some(server) = http {
        server.abort();
    }
    match &result {
        Ok(()) => tracing::info!("order-lifecycle consumer stopped"),
        Err(e) => tracing::error!(error = format!("{e:#}"), "order-lifecycle consumer failed"),
    }
    result
}

/// Connects to the database and applies migrations, retrying while it is
/// unreachable (a consumer started before its database must not
/// crash-loop). `None` when shutdown came first.
async fn connect(
    config: &RunConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<Store>> {
    let mut backoff = Backoff::new();
    loop {
        if *shutdown.borrow() {
            return Ok(None);
        }
        let attempt = async {
            let store =
                Store::connect(&config.database.url, config.database.max_connections).await?;
            store.migrate().await?;
            Ok::<_, StoreError>(store)
        };
        match attempt.await {
            Ok(store) => return Ok(Some(store)),
            Err(e) if e.is_transient() => {
                tracing::warn!(database = %config.database.url, error = %e, "database unreachable; retrying");
                backoff.wait(shutdown).await;
            }
            Err(e) => return Err(e).context("connecting to the database and applying migrations"),
        }
    }
}

/// What the loop works with.
struct Ingest<'a> {
    config: &'a RunConfig,
    pipeline: PipelineConfig,
    store: &'a Store,
    consumer: &'a StreamConsumer<AssignmentContext>,
    dead_letters: &'a DeadLetterPublisher,
    wake: &'a Notify,
}

/// How a batch ended.
enum Handled {
    Committed,
    /// Shutdown came while the database was unreachable: nothing committed.
    Abandoned,
}

impl Ingest<'_> {
    async fn consume(&self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut backoff = Backoff::new();
        let metadata = kafka::consumer_config(
            &self.config.kafka,
            &self.config.group_id,
            self.config.session_timeout,
        )
        .create()
        .context("creating the metadata client")?;
        let mut gate = OffsetGate::new(&self.config.group_id, metadata);
        let mut periodic_round = tokio::time::interval(std::time::Duration::from_secs(1));
        periodic_round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow() {
                tracing::info!("shutdown requested; no batch in flight");
                return Ok(());
            }
            let first = tokio::select! {
                biased;
                _ = shutdown.changed() => continue,
                _ = periodic_round.tick() => {
                    self.periodic().await?;
                    continue;
                }
                m = self.consumer.recv() => m,
            };
            let mut batch = Vec::new();
            match first {
                Ok(m) => {
                    self.gather(&mut gate, &mut batch, InboundMessage::from_kafka(&m))
                        .await
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka receive failed; retrying");
                    backoff.wait(&mut shutdown).await;
                    continue;
                }
            };
            backoff.reset();
            let deadline = tokio::time::Instant::now() + self.config.batch_linger;
            while batch.len() < self.config.batch_size {
                match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                    Ok(Ok(m)) => {
                        self.gather(&mut gate, &mut batch, InboundMessage::from_kafka(&m))
                            .await
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "kafka receive failed mid-batch");
                        break;
                    }
                    Err(_) => break,
                }
            }
            gate.observe(self.consumer.context(), &mut batch);
            if batch.is_empty() {
                continue;
            }
            let batch = merge_by_time(batch);
            let span =
                tracing::info_span!("batch", size = batch.len(), partitions = %describe(&batch));
            match self.handle(&batch, &mut shutdown).instrument(span).await? {
                Handled::Committed => self.wake.notify_one(),
                Handled::Abandoned => {
                    tracing::warn!(
                        "shutdown while the database is unreachable; batch left uncommitted"
                    );
                    return Ok(());
                }
            }
        }
    }

    /// Adds a received message to the batch if the offset gate admits it.
    async fn gather(
        &self,
        gate: &mut OffsetGate,
        batch: &mut Vec<InboundMessage>,
        m: InboundMessage,
    ) {
        gate.observe(self.consumer.context(), batch);
        if gate.admit(self.store, self.consumer, &m).await {
            batch.push(m);
        }
    }

    /// Processes, publishes dead letters, commits.
    async fn handle<'m>(
        &self,
        batch: &'m [InboundMessage],
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Handled> {
        let started = Instant::now();
        let attempt = |messages: &'m [InboundMessage]| {
            let mut shutdown = shutdown.clone();
            async move { self.process(messages, &mut shutdown).await }
        };
        let report = match process_isolating(self.store, &self.pipeline, batch, attempt).await {
            Ok(Some(report)) => report,
            Ok(None) => return Ok(Handled::Abandoned),
            Err(e) => return Err(e).context("processing a batch"),
        };
        commit(self.consumer, &report);
        if !report.dead_letters.is_empty() {
            self.publish_outbox(shutdown).await;
        }
        record(&report, started.elapsed().as_secs_f64());
        Ok(Handled::Committed)
    }

    /// [`process_batch`], retrying transient failures until it succeeds or
    /// shutdown has waited `--shutdown-timeout` (then `Ok(None)`).
    async fn process(
        &self,
        batch: &[InboundMessage],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<BatchReport>, StoreError> {
        let mut backoff = Backoff::new();
        let mut shutdown_since: Option<Instant> = None;
        let mut conflicts = 0;
        loop {
            match process_batch(self.store, &self.pipeline, batch).await {
                Ok(report) => return Ok(Some(report)),
                // A conflict that keeps coming back is not a race: give up.
                Err(e) if e.is_conflict() && conflicts >= MAX_CONFLICT_RETRIES => return Err(e),
                Err(e) if e.is_transient() => {
                    conflicts += usize::from(e.is_conflict());
                    tracing::warn!(error = %e, "database unavailable or busy; retrying the batch");
                    if *shutdown.borrow() {
                        let since = *shutdown_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.config.shutdown_timeout {
                            return Ok(None);
                        }
                    }
                    backoff.wait(shutdown).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Publishes the outbox of dead letters, retrying a few times; what is
    /// left is published by a later call (after the next batch, or within a
    /// second by the periodic round).
    async fn publish_outbox(&self, shutdown: &mut watch::Receiver<bool>) {
        let mut backoff = Backoff::new();
        for _ in 0..3 {
            match publish_pending(self.store, self.dead_letters).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "dead letters not published yet; they wait in the dead_letters table");
                    if *shutdown.borrow() {
                        return;
                    }
                    backoff.wait(shutdown).await;
                }
            }
        }
    }

    /// The periodic round: release stranded parked events, expire parked
    /// events, publish the outbox.
    async fn periodic(&self) -> anyhow::Result<()> {
        match release_stranded(self.store, &self.pipeline).await {
            Ok(report) if report.unparked > 0 => {
                tracing::info!(
                    released = report.unparked,
                    "released stranded parked events"
                );
                record(&report, 0.0);
            }
            Ok(_) => {}
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "could not release stranded parked events; retrying later");
            }
            Err(e) => return Err(e).context("releasing stranded parked events"),
        }
        let letters = match expire_parked(self.store, self.config.park_timeout, 500).await {
            Ok(letters) => letters,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "database unavailable; parked events expire later");
                return Ok(());
            }
            Err(e) => return Err(e).context("expiring parked events"),
        };
        if !letters.is_empty() {
            metrics::counter!("order_lifecycle_parked_expired_total")
                .increment(letters.len() as u64);
            log_dead_letters(&letters);
        }
        if let Err(e) = publish_pending(self.store, self.dead_letters).await {
            tracing::warn!(error = %e, "dead letters not published yet; they wait in the dead_letters table");
        }
        Ok(())
    }
}

fn log_dead_letters(letters: &[DeadLetter]) {
    for d in letters {
        metrics::counter!("order_lifecycle_dead_letters_total", "reason" => d.reason.clone())
            .increment(1);
        tracing::warn!(
            reason = %d.reason,
            topic = %d.topic,
            partition = d.partition,
            offset = d.offset,
            error = %d.error,
            "dead-lettered a message"
        );
    }
}

/// Commits the batch's offsets to Kafka, asynchronously: the offsets that
/// count are already in MySQL with the data; Kafka's copy serves lag
/// monitoring and the start position of the next owner of a partition.
fn commit(consumer: &StreamConsumer<AssignmentContext>, report: &BatchReport) {
    let mut tpl = TopicPartitionList::new();
    for o in &report.offsets {
        if let Err(e) =
            tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next_offset))
        {
            tracing::warn!(error = %e, "bad offset in commit list");
        }
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::warn!(error = %e, "kafka offset commit failed; the next commit carries it");
    }
}

fn record(report: &BatchReport, seconds: f64) {
    metrics::counter!("order_lifecycle_events_consumed_total").increment(report.consumed as u64);
    for (outcome, n) in &report.recorded {
        metrics::counter!("order_lifecycle_events_recorded_total", "outcome" => *outcome)
            .increment(*n as u64);
    }
    metrics::counter!("order_lifecycle_events_duplicate_total").increment(report.duplicates as u64);
    metrics::counter!("order_lifecycle_parked_total").increment(report.parked as u64);
    metrics::counter!("order_lifecycle_unparked_total").increment(report.unparked as u64);
    log_dead_letters(&report.dead_letters);
    metrics::histogram!("order_lifecycle_batch_messages").record(report.consumed as f64);
    metrics::histogram!("order_lifecycle_batch_duration_seconds").record(seconds);
    tracing::info!(
        consumed = report.consumed,
        recorded = report.recorded_total(),
        duplicates = report.duplicates,
        parked = report.parked,
        unparked = report.unparked,
        dead_letters = report.dead_letters.len(),
        rows = report.rows_written,
        ms = (seconds * 1000.0) as u64,
        "batch committed"
    );
}

/// `topic/partition@first..last` for each partition of the batch.
fn describe(batch: &[InboundMessage]) -> String {
    let mut ranges: HashMap<(&str, i32), (i64, i64)> = HashMap::new();
    for m in batch {
        let r = ranges
            .entry((&m.topic, m.partition))
            .or_insert((m.offset, m.offset));
        r.0 = r.0.min(m.offset);
        r.1 = r.1.max(m.offset);
    }
    let mut parts: Vec<String> = ranges
        .into_iter()
        .map(|((t, p), (a, b))| format!("{t}/{p}@{a}..{b}"))
        .collect();
    parts.sort();
    parts.join(",")
}
