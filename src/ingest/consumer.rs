//! The consumer loop. It only moves data: receive a batch, hand it to
//! [`process_batch`], publish its dead letters, commit its offsets, wake the
//! Redis follower. Shutdown is an input: when `shutdown` completes, the batch
//! in flight is finished and committed, the group is left, and `run` returns.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use super::dead_letter::DeadLetterPublisher;
use super::pipeline::{expire_parked, process_batch, BatchReport, InboundMessage, PipelineConfig};
use super::redis_follower::{self, Backoff};
use crate::config::RunConfig;
use crate::kafka;
use crate::store::Store;
use crate::wire::CONTENT_TYPE_HEADER;

/// Runs the ingesting consumer until `shutdown` completes.
///
/// # Errors
/// Start-up failures (bad configuration, unreachable database, migrations)
/// and fatal storage errors. Transient failures are retried with backoff.
pub async fn run(config: RunConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    config.validate()?;
    tracing::info!(
        brokers = %config.kafka.brokers,
        topics = ?config.topics,
        group = %config.group_id,
        database = %config.database.url,
        redis = %config.redis.url,
        "starting order-lifecycle consumer"
    );
    let store = Store::connect(&config.database.url, config.database.max_connections)
        .await
        .context("connecting to the database")?;
    store.migrate().await.context("applying migrations")?;

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
    let consumer: StreamConsumer =
        kafka::consumer_config(&config.kafka, &config.group_id, config.session_timeout)
            .create()
            .context("creating the Kafka consumer")?;
    consumer
        .subscribe(&topics)
        .context("subscribing to the topics")?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let wake = Arc::new(Notify::new());
    let follower = tokio::spawn(redis_follower::run(
        store.clone(),
        config.redis.clone(),
        wake.clone(),
        stop_rx.clone(),
    ));

    let result = consume(
        &config,
        &store,
        &consumer,
        &dead_letters,
        &wake,
        stop_rx,
        shutdown,
    )
    .await;

    // Leave the group now, so that the partitions move at once.
    consumer.unsubscribe();
    let _ = stop_tx.send(true);
    if tokio::time::timeout(config.shutdown_timeout, follower)
        .await
        .is_err()
    {
        tracing::warn!("redis follower did not stop in time; it resumes from its checkpoint");
    }
    tracing::info!("order-lifecycle consumer stopped");
    result
}

async fn consume(
    config: &RunConfig,
    store: &Store,
    consumer: &StreamConsumer,
    dead_letters: &DeadLetterPublisher,
    wake: &Notify,
    mut stop: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let mut backoff = Backoff::new();
    let pipeline = PipelineConfig {
        group_id: config.group_id.clone(),
        park_timeout: config.park_timeout,
    };
    let mut expiry = tokio::time::interval(std::time::Duration::from_secs(1));
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            biased;
            _ = &mut shutdown => {
                tracing::info!("shutdown requested; no batch in flight");
                return Ok(());
            }
            _ = expiry.tick() => {
                expire(config, store, dead_letters, &mut stop).await?;
                continue;
            }
            m = consumer.recv() => m,
        };
        let mut batch = match first {
            Ok(m) => vec![inbound(&m)],
            Err(e) => {
                tracing::warn!(error = %e, "kafka receive failed; retrying");
                backoff.wait(&mut stop).await;
                continue;
            }
        };
        backoff.reset();
        let deadline = tokio::time::Instant::now() + config.batch_linger;
        while batch.len() < config.batch_size {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(inbound(&m)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "kafka receive failed mid-batch");
                    break;
                }
                Err(_) => break,
            }
        }
        handle_batch(&pipeline, store, consumer, dead_letters, &batch, &mut stop).await?;
        wake.notify_one();
    }
}

/// Processes, publishes dead letters, commits; retries transient failures.
/// A shutdown during retries abandons the batch uncommitted: the next owner
/// of its partitions reads it again and the log ignores what it already has.
async fn handle_batch(
    config: &PipelineConfig,
    store: &Store,
    consumer: &StreamConsumer,
    dead_letters: &DeadLetterPublisher,
    batch: &[InboundMessage],
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let span = tracing::info_span!("batch", size = batch.len(), partitions = %describe(batch));
    handle_batch_in_span(config, store, consumer, dead_letters, batch, stop)
        .instrument(span)
        .await
}

async fn handle_batch_in_span(
    config: &PipelineConfig,
    store: &Store,
    consumer: &StreamConsumer,
    dead_letters: &DeadLetterPublisher,
    batch: &[InboundMessage],
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut backoff = Backoff::new();
    let report = loop {
        match process_batch(store, config, batch).await {
            Ok(report) => break report,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "database unavailable; retrying the batch");
                backoff.wait(stop).await;
            }
            Err(e) => return Err(e).context("processing a batch"),
        }
    };
    while let Err(e) = dead_letters.publish(&report.dead_letters).await {
        tracing::warn!(error = %e, "dead-letter topic unavailable; retrying");
        backoff.wait(stop).await;
    }
    commit(consumer, &report);
    record(&report, started.elapsed().as_secs_f64());
    Ok(())
}

/// Dead-letters parked events whose time is up.
async fn expire(
    config: &RunConfig,
    store: &Store,
    dead_letters: &DeadLetterPublisher,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let letters = match expire_parked(store, config.park_timeout, 500).await {
        Ok(letters) => letters,
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "database unavailable; parked events expire later");
            return Ok(());
        }
        Err(e) => return Err(e).context("expiring parked events"),
    };
    if letters.is_empty() {
        return Ok(());
    }
    let mut backoff = Backoff::new();
    while let Err(e) = dead_letters.publish(&letters).await {
        tracing::warn!(error = %e, "dead-letter topic unavailable; retrying");
        backoff.wait(stop).await;
    }
    metrics::counter!("order_lifecycle_parked_expired_total").increment(letters.len() as u64);
    log_dead_letters(&letters);
    Ok(())
}

fn log_dead_letters(letters: &[crate::store::dead_letters::DeadLetter]) {
    for d in letters {
        metrics::counter!("order_lifecycle_dead_letters_total", "reason" => d.reason).increment(1);
        tracing::warn!(
            reason = d.reason,
            topic = %d.topic,
            partition = d.partition,
            offset = d.offset,
            error = %d.error,
            "dead-lettered a message"
        );
    }
}

fn inbound(m: &BorrowedMessage<'_>) -> InboundMessage {
    InboundMessage {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        content_type: kafka::header(m, CONTENT_TYPE_HEADER).map(<[u8]>::to_vec),
    }
}

/// Commits the batch's offsets to Kafka, asynchronously: the offsets that
/// count are already in MySQL with the data; Kafka's copy serves lag
/// monitoring and the start position of a new consumer.
fn commit(consumer: &StreamConsumer, report: &BatchReport) {
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
    metrics::histogram!("order_lifecycle_batch_size").record(report.consumed as f64);
    metrics::histogram!("order_lifecycle_batch_seconds").record(seconds);
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
