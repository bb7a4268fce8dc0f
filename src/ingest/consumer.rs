//! The consumer loop. It only moves data: receive messages, form batches
//! and hand them to the pipeline ([`process_batch_in_turn`]), publish their
//! dead letters, commit their offsets, wake the Redis follower.
//!
//! Two batches may be in flight (see [`super::overlap`]): the next one,
//! formed from messages already received, reads and decides while the one
//! ahead writes. Kafka is polled only when no batch is in flight, as
//! before: librdkafka runs rebalances inside a poll, so a revoke never
//! completes while a batch of the partition is uncommitted (its next owner
//! would read the same messages), and nothing else the loop awaits keeps a
//! batch holding its locks. To keep the second batch fed, a poll takes up
//! to [`TAKE_PER_POLL`] batches' worth of what the client holds.
//!
//! Shutdown is an input: once `shutdown` completes, the batches in flight
//! are finished and committed (or, if the database is unreachable,
//! abandoned uncommitted after `--shutdown-timeout`, to be read again by
//! the next owner), the group is left, and `run` returns `Ok`.
//!
//! Failures, by what they need:
//! - transient (database, broker or Redis unreachable, deadlock, a concurrent
//!   writer's conflict): retried with backoff, nothing committed meanwhile;
//! - a batch the database refuses for another reason: processed again one
//!   message at a time, and the message it refuses is dead-lettered as
//!   `storage_rejected`, so that one message never blocks a partition;
//! - the database refusing even that: fatal, `run` returns the error;
//! - a newly assigned partition's stored offset unreadable: its first
//!   message waits (retried until shutdown; no batch is in flight while
//!   messages are admitted), or, for a reason retrying cannot cure, `run`
//!   returns the error.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::Instrument;

use futures_util::FutureExt;
use rdkafka::consumer::BaseConsumer;

use super::assignment::{AssignmentContext, Changes, ConsumerStatus, OffsetGate};
use super::dead_letter::{publish_pending, DeadLetterPublisher};
use super::order_cache::OrderCache;
use super::ordering::{copartitioning_problem, Merger};
use super::overlap::{self, BatchAhead, BatchProgress, Flights, Slot};
use super::pipeline::{
    expire_parked, process_batch_in_turn, process_isolating, ran_alone, release_stranded,
    BatchOutcome, PipelineConfig, StrandedWindow, Turn,
};
use super::stall::{StallChange, StallWatch, STALL_AFTER};
use crate::clock;
use crate::config::RunConfig;
use crate::kafka;
use crate::projection::redis_follower::Handoff;
use crate::retry::{Backoff, RetryPolicy};
use crate::shutdown::Shutdown;
use crate::store::dead_letters::DeadLetter;
use crate::store::leadership::Leadership;
use crate::store::{offsets, parked, Store, StoreError};
use crate::wire::InboundMessage;

/// Consumes `config.input.topics` into `store` until `shutdown`: creates the
/// topics when asked, joins the group, runs the loop, leaves the group.
/// `status` follows the assignment (for readiness); committed batches are
/// handed to the Redis follower through `handoff`.
///
/// # Errors
/// Start-up failures (topics, clients) and fatal storage errors. Transient
/// failures are retried with backoff.
pub async fn consume(
    config: &RunConfig,
    store: &Store,
    status: Arc<ConsumerStatus>,
    handoff: &Handoff,
    leadership: &Leadership,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let topics: Vec<&str> = config.input.topics.iter().map(String::as_str).collect();
    if config.create_topics {
        let mut all = topics.clone();
        all.push(&config.dead_letter_topic);
        kafka::ensure_topics(&config.kafka, &all, config.topic_partitions)
            .await
            .context("creating topics")?;
    }
    let dead_letters = DeadLetterPublisher::new(&config.kafka, &config.dead_letter_topic)
        .context("creating the dead-letter producer")?;
    let mut settings =
        kafka::consumer_config(&config.kafka, &config.group_id, config.session_timeout);
    // For the consumer-lag gauge (see AssignmentContext).
    settings.set("statistics.interval.ms", "5000");
    if let Some(instance) = &config.group_instance_id {
        // Static membership: a restart within the session timeout keeps
        // the assignment (no LeaveGroup is sent on the way out).
        settings.set("group.instance.id", instance);
    }
    let consumer: StreamConsumer<AssignmentContext> = settings
        .create_with_context(AssignmentContext::new(status))
        .context("creating the Kafka consumer")?;
    consumer
        .subscribe(&topics)
        .context("subscribing to the topics")?;
    let ingest = Ingest {
        config,
        pipeline: PipelineConfig {
            offsets_group: Some(config.group_id.clone()),
            park_timeout: config.input.parking.park_timeout,
            max_parked: config.input.parking.max_parked,
            schema_ids: config.input.schemas.schema_ids.clone(),
        },
        store,
        consumer: &consumer,
        dead_letters: &dead_letters,
        handoff,
        leadership,
        paused: Default::default(),
        order_cache: OrderCache::new(config.order_cache),
    };
    let result = ingest.consume(shutdown).await;
    // Leave the group now, so that the partitions move at once.
    consumer.unsubscribe();
    result
}

/// What the loop works with.
struct Ingest<'a> {
    config: &'a RunConfig,
    pipeline: PipelineConfig,
    store: &'a Store,
    consumer: &'a StreamConsumer<AssignmentContext>,
    dead_letters: &'a DeadLetterPublisher,
    handoff: &'a Handoff,
    /// Whether this instance does the once-only work: publishing the
    /// outbox, releasing stranded and expiring parked events.
    leadership: &'a Leadership,
    /// Partitions whose fetching [`Ingest::flow_control`] paused.
    paused: std::sync::Mutex<std::collections::HashSet<(String, i32)>>,
    /// Orders as the batches last committed them (`--order-cache`).
    order_cache: OrderCache,
}

/// Messages the merger may hold while it reads through the client's queue
/// for a partition that is behind (a few seconds of input, a few tens of
/// MiB); beyond it, a partition that has not delivered is judged by its idle
/// time alone, as when the queue is empty.
const MERGE_BUFFER: usize = 50_000;

/// Messages one partition may have waiting in the merger before its
/// fetching is paused (resumed at half), as Kafka Streams does with
/// `buffered.records.per.partition`: the fetcher then spends its responses
/// on the partitions that are behind. Measured without it: draining a
/// 2,000,000-event backlog, two order partitions fell 100,000+ messages
/// behind the others (the client fetched them less) and 260,000
/// confirmations for their orders were parked.
const PARTITION_BUFFER: usize = 5_000;

/// Batches' worth of messages one poll takes from the client when it holds
/// them (a backlog): enough for a batch behind the one in flight.
const TAKE_PER_POLL: usize = 3;

/// How a batch ended.
enum Handled {
    Committed,
    /// Shutdown came while the database was unreachable: nothing committed.
    Abandoned,
}

impl Ingest<'_> {
    async fn consume(&self, mut shutdown: Shutdown) -> anyhow::Result<()> {
        let mut backoff = Backoff::new();
        let metadata = Arc::new(
            kafka::consumer_config(
                &self.config.kafka,
                &self.config.group_id,
                self.config.session_timeout,
            )
            .create()
            .context("creating the metadata client")?,
        );
        self.check_copartitioning(&metadata).await;
        let mut gate = OffsetGate::new(&self.config.group_id, metadata.clone(), shutdown.clone());
        let mut merger = Merger::new(self.config.max_partition_idle);
        let mut stranded = StrandedWindow::default();
        let mut stalls = StallWatch::new(STALL_AFTER);
        let mut periodic_round = tokio::time::interval(std::time::Duration::from_secs(1));
        periodic_round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = |topic: &str, partition: i32| self.end_offset(topic, partition);
        let mut batch: Vec<InboundMessage> = Vec::new();
        // When the batch being gathered must go, full or not.
        let mut linger_until: Option<tokio::time::Instant> = None;
        // Batches being processed, the next one's reads overlapping the
        // commit of the one ahead (see `super::overlap`).
        let mut flights: Flights<'_, anyhow::Result<Handled>> = Flights::default();
        // The periodic round runs between batches only (it locks what they
        // may lock): once due, no batch starts until those in flight end.
        let mut housekeeping_due = false;
        loop {
            if shutdown.is_requested() {
                if flights.is_empty() {
                    tracing::info!("shutdown requested; no batch in flight");
                    return Ok(());
                }
                // The batches in flight finish (or are abandoned) first.
                if let Some(end) = flights.next(false).await {
                    let in_flight = !flights.is_empty();
                    let landed = self.landed(
                        end?,
                        in_flight,
                        &mut gate,
                        &mut merger,
                        &mut batch,
                        &metadata,
                    );
                    if landed.await?.is_break() {
                        return Ok(());
                    }
                }
                continue;
            }
            if housekeeping_due && flights.is_empty() {
                housekeeping_due = false;
                self.periodic(&merger, &mut stranded, &mut stalls).await?;
            }
            self.rebalanced(&mut gate, &mut merger, &mut batch, &metadata)
                .await;

            // What the watermark lets go joins the batch; the batch goes
            // when full, when its linger is over, or at once when every
            // partition is caught up (more waiting would gather nothing),
            // as soon as a batch may start.
            let now = tokio::time::Instant::now();
            while batch.len() < self.config.input.batch_size {
                match merger.pop_ready(now.into_std(), end) {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
            if batch.is_empty() {
                // A revoke may have emptied it.
                linger_until = None;
            }
            let mut ready_to_go = false;
            if !batch.is_empty() {
                let linger = *linger_until.get_or_insert(now + self.config.batch_linger);
                ready_to_go = batch.len() >= self.config.input.batch_size
                    || now >= linger
                    || (merger.buffered() == 0 && merger.all_caught_up(end));
            }
            if ready_to_go && !housekeeping_due {
                if let Some(slot) = flights.slot() {
                    let ahead = match slot {
                        Slot::Alone => None,
                        Slot::Behind(ahead) => Some(ahead),
                    };
                    linger_until = None;
                    let ready = std::mem::take(&mut batch);
                    let span = tracing::info_span!("batch", size = ready.len(), partitions = %describe(&ready));
                    let (progress, watch) = overlap::progress();
                    // Kafka is not polled until no batch is in flight, and
                    // meanwhile the client may receive: no partition is
                    // judged idle until it is looked at again (measured
                    // without this: a drain whose confirmations overtook
                    // their orders, 1,284 of 100,000 parked).
                    merger.set_more_waiting(true);
                    let shutdown = shutdown.clone();
                    flights.start(
                        async move { self.handle(&ready, shutdown, progress, ahead).await }
                            .instrument(span),
                        watch,
                    );
                    continue;
                }
            }

            // Wait for more: a message (only with no batch in flight), the
            // end of the batch's linger or of the merger's wait for a
            // partition that is behind, a batch ending or letting the next
            // one start, the periodic round, or shutdown. A batch ready to
            // go waits for a batch only (past deadlines would spin).
            let deadline = [
                linger_until,
                merger.wake_at().map(tokio::time::Instant::from_std),
            ]
            .into_iter()
            .flatten()
            .min()
            .filter(|_| !ready_to_go);
            let received = tokio::select! {
                biased;
                _ = shutdown.requested() => continue,
                end = flights.next(ready_to_go && !housekeeping_due) => {
                    if let Some(end) = end {
                        let in_flight = !flights.is_empty();
                        let landed = self.landed(end?, in_flight, &mut gate, &mut merger, &mut batch, &metadata);
                        if landed.await?.is_break() {
                            return Ok(());
                        }
                    }
                    continue;
                }
                _ = periodic_round.tick(), if !housekeeping_due => {
                    housekeeping_due = true;
                    continue;
                }
                m = recv_until(self.consumer, deadline), if flights.is_empty() => m,
            };
            match received {
                // Nothing came until the deadline: the client holds nothing.
                None => merger.set_more_waiting(false),
                Some(Err(e)) => {
                    // A fatal error (another instance with this
                    // --group-instance-id fenced this one out) ends the
                    // client: retrying would only repeat it.
                    if let Some((code, reason)) = self.consumer.client().fatal_error() {
                        anyhow::bail!(
                            "the Kafka client stopped for good ({code:?}: {reason}); is \
                             --group-instance-id used by another running instance?"
                        );
                    }
                    tracing::warn!(error = %e, "kafka receive failed; retrying");
                    backoff.wait(&mut shutdown).await;
                }
                Some(Ok(m)) => {
                    backoff.reset();
                    self.admit(&mut gate, &mut merger, &mut batch, &metadata, m)
                        .await?;
                    self.take_waiting(&mut gate, &mut merger, &mut batch, &metadata)
                        .await?;
                    self.flow_control(&merger);
                }
            }
        }
    }

    /// After a batch ended: what arrived meanwhile joins the merger before
    /// any partition is judged idle (once no batch is in flight: see the
    /// module's doc); a batch abandoned at shutdown ends the loop.
    async fn landed(
        &self,
        handled: Handled,
        in_flight: bool,
        gate: &mut OffsetGate,
        merger: &mut Merger,
        batch: &mut Vec<InboundMessage>,
        metadata: &Arc<BaseConsumer>,
    ) -> anyhow::Result<ControlFlow<()>> {
        Ok(match handled {
            Handled::Committed => {
                // Admitting may wait for the database: only with no batch
                // in flight (see `OffsetGate::admit`).
                if !in_flight {
                    self.take_waiting(gate, merger, batch, metadata).await?;
                    self.flow_control(merger);
                }
                ControlFlow::Continue(())
            }
            Handled::Abandoned => {
                tracing::warn!(
                    "shutdown while the database is unreachable; batch left uncommitted"
                );
                ControlFlow::Break(())
            }
        })
    }

    /// Takes what the client already holds, without waiting and up to
    /// [`TAKE_PER_POLL`] batches' worth, so that the watermark judges partitions on everything
    /// received; tells the merger whether more is still waiting.
    async fn take_waiting(
        &self,
        gate: &mut OffsetGate,
        merger: &mut Merger,
        batch: &mut Vec<InboundMessage>,
        metadata: &Arc<BaseConsumer>,
    ) -> anyhow::Result<()> {
        for _ in 0..self.config.input.batch_size * TAKE_PER_POLL {
            match self.consumer.recv().now_or_never() {
                Some(Ok(m)) => {
                    let m = kafka::inbound(&m);
                    self.admit(gate, merger, batch, metadata, m).await?;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka receive failed");
                    break;
                }
                None => {
                    merger.set_more_waiting(false);
                    return Ok(());
                }
            }
        }
        // Past MERGE_BUFFER the merger stops waiting on the client: memory
        // stays bounded if one partition's messages never come.
        merger.set_more_waiting(merger.buffered() < MERGE_BUFFER);
        Ok(())
    }

    /// Pauses fetching for partitions with [`PARTITION_BUFFER`] messages
    /// waiting in the merger, resumes those down to half of it.
    fn flow_control(&self, merger: &Merger) {
        let Ok(mut paused) = self.paused.lock() else {
            return;
        };
        let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
        for (topic, partition, queued) in merger.queued() {
            let key = (topic.to_owned(), partition);
            if queued >= PARTITION_BUFFER && !paused.contains(&key) {
                pause.add_partition(topic, partition);
                paused.insert(key);
            } else if queued <= PARTITION_BUFFER / 2 && paused.contains(&key) {
                resume.add_partition(topic, partition);
            }
        }
        if pause.count() > 0 {
            if let Err(e) = self.consumer.pause(&pause) {
                tracing::warn!(error = %e, "could not pause fetching for partitions ahead");
            }
        }
        if resume.count() > 0 {
            match self.consumer.resume(&resume) {
                // Forgotten only once resumed, so a failed resume is retried.
                Ok(()) => {
                    for e in resume.elements() {
                        paused.remove(&(e.topic().to_owned(), e.partition()));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not resume fetching"),
            }
        }
    }

    /// Hands a received message to the merger if the offset gate admits it,
    /// after taking in the rebalances its receipt may have run.
    async fn admit(
        &self,
        gate: &mut OffsetGate,
        merger: &mut Merger,
        batch: &mut Vec<InboundMessage>,
        metadata: &Arc<BaseConsumer>,
        m: InboundMessage,
    ) -> anyhow::Result<()> {
        self.rebalanced(gate, merger, batch, metadata).await;
        let admitted = gate
            .admit(self.store, self.consumer, &m)
            .await
            .with_context(|| {
                format!("checking the stored offset of {}/{}", m.topic, m.partition)
            })?;
        if admitted {
            merger.push(m);
        }
        Ok(())
    }

    /// Takes in the rebalances since the last look: revoked partitions'
    /// messages leave the batch and the merger; assigned partitions are
    /// waited for from their stored offsets, and the topics' partition
    /// counts are checked again (rule R11).
    async fn rebalanced(
        &self,
        gate: &mut OffsetGate,
        merger: &mut Merger,
        batch: &mut Vec<InboundMessage>,
        metadata: &Arc<BaseConsumer>,
    ) {
        let changes = gate.observe(self.consumer.context(), batch);
        apply_to_merger(&changes, merger);
        if let Ok(mut paused) = self.paused.lock() {
            for p in changes.revoked.iter().chain(&changes.assigned) {
                paused.remove(p);
            }
        }
        if !changes.assigned.is_empty() {
            // librdkafka keeps a partition paused across a revoke and a new
            // assignment: start every assigned partition fetching.
            let mut resume = TopicPartitionList::new();
            for (topic, partition) in &changes.assigned {
                resume.add_partition(topic, *partition);
            }
            if let Err(e) = self.consumer.resume(&resume) {
                tracing::warn!(error = %e, "could not resume fetching for assigned partitions");
            }
        }
        if changes.assigned.is_empty() {
            return;
        }
        match offsets::load_many(self.store.pool(), &self.config.group_id, &changes.assigned).await
        {
            Ok(stored) => {
                for ((topic, partition), next) in stored {
                    merger.start_at(&topic, partition, next);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read stored offsets; new partitions are waited for until they deliver or idle")
            }
        }
        self.check_copartitioning(metadata).await;
    }

    /// A partition's end offset as the last fetch response gave it.
    fn end_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        kafka::cached_end_offset(self.consumer, topic, partition)
    }

    /// Logs an ERROR naming the topics when they are not co-partitioned.
    async fn check_copartitioning(&self, metadata: &Arc<BaseConsumer>) {
        let (client, topics) = (metadata.clone(), self.config.input.topics.clone());
        let counts = tokio::task::spawn_blocking(move || {
            kafka::partition_counts(&client, &topics, std::time::Duration::from_secs(5))
        })
        .await
        .unwrap_or_default();
        let problem = copartitioning_problem(&counts);
        metrics::gauge!("order_lifecycle_topics_copartitioned").set(if problem.is_some() {
            0.0
        } else {
            1.0
        });
        if let Some(problem) = problem {
            tracing::error!("{problem}");
        }
    }

    /// Processes, publishes dead letters, commits; behind the batch
    /// `ahead`, when given (see [`super::overlap`]). `progress` tells the
    /// batch behind this one how it goes.
    async fn handle<'m>(
        &self,
        batch: &'m [InboundMessage],
        mut shutdown: Shutdown,
        progress: BatchProgress,
        mut ahead: Option<BatchAhead>,
    ) -> anyhow::Result<Handled> {
        let started = Instant::now();
        let progress = &progress;
        let attempt = |messages: &'m [InboundMessage]| {
            let mut shutdown = shutdown.clone();
            // Only the first attempt runs behind; the others after it.
            let ahead = ahead.take();
            async move { self.process(messages, &mut shutdown, progress, ahead).await }
        };
        let mut report = match process_isolating(self.store, &self.pipeline, batch, attempt).await {
            Ok(Some(report)) => report,
            Ok(None) => return Ok(Handled::Abandoned),
            Err(e) => return Err(e).context("processing a batch"),
        };
        self.handoff.offer(std::mem::take(&mut report.handed));
        commit(self.consumer, &report);
        // Other instances' letters wait in the outbox for the leader's
        // periodic round (within a second).
        if !report.dead_letters.is_empty() && self.leadership.is_leader() {
            self.publish_outbox(&mut shutdown).await;
        }
        // After the outbox: the batch behind publishes only after this one,
        // so no letter is published twice.
        progress.done();
        record(&report, started.elapsed().as_secs_f64());
        Ok(Handled::Committed)
    }

    /// [`process_batch_in_turn`]: once behind `ahead` if given, then (if it
    /// gave way or failed) after it, retrying transient failures until it
    /// succeeds or shutdown has waited `--shutdown-timeout` (then
    /// `Ok(None)`).
    async fn process(
        &self,
        batch: &[InboundMessage],
        shutdown: &mut Shutdown,
        progress: &BatchProgress,
        ahead: Option<BatchAhead>,
    ) -> Result<Option<BatchOutcome>, StoreError> {
        if let Some(mut ahead) = ahead {
            let turn = Turn {
                ahead: Some(&mut ahead),
                progress: Some(progress),
                cache: Some(&self.order_cache),
            };
            let cause = match process_batch_in_turn(self.store, &self.pipeline, batch, turn).await {
                Ok(Some(report)) => return Ok(Some(report)),
                Ok(None) => "gave_way",
                Err(e) => {
                    tracing::info!(error = %e, "a batch behind another failed; running it again after it");
                    "failed"
                }
            };
            metrics::counter!("order_lifecycle_batches_rerun_total", "cause" => cause).increment(1);
            // The batch behind this one, if any, gives way too.
            progress.failed();
            if !ahead.finished().await {
                // The batch ahead was abandoned (shutdown) or failed for
                // good: this one must not commit past its messages.
                return Ok(None);
            }
        }
        RetryPolicy::until_shutdown(self.config.shutdown_timeout)
            .run("batch", shutdown, || async {
                let turn = Turn {
                    ahead: None,
                    progress: Some(progress),
                    cache: Some(&self.order_cache),
                };
                let result = process_batch_in_turn(self.store, &self.pipeline, batch, turn).await;
                if result.is_err() {
                    progress.failed();
                }
                result.map(ran_alone)
            })
            .await
    }

    /// Reports partitions that stopped advancing (see [`super::stall`]):
    /// ERROR log, gauge, readiness.
    fn watch_stalls(&self, merger: &Merger, stalls: &mut StallWatch) {
        let now = Instant::now();
        let paused = self.paused.lock().map(|p| p.clone()).unwrap_or_default();
        let assigned: std::collections::HashSet<(&str, i32)> =
            merger.positions().map(|(t, p, _)| (t, p)).collect();
        for (topic, partition) in stalls.retain(|t, p| assigned.contains(&(t, p))) {
            set_stalled_gauge(&topic, partition, false);
        }
        for (topic, partition, position) in merger.positions() {
            let end = self.end_offset(topic, partition);
            let is_paused = paused.contains(&(topic.to_owned(), partition));
            match stalls.observe(now, topic, partition, position, end, is_paused) {
                Some(StallChange::Stalled {
                    topic,
                    partition,
                    position,
                    end,
                }) => {
                    tracing::error!(
                        %topic,
                        partition,
                        position,
                        end,
                        seconds = STALL_AFTER.as_secs(),
                        "a partition with messages on the broker delivered nothing; its fetch \
                         keeps failing (see the kafka receive warnings: a codec this build \
                         lacks, a corrupt batch, a broker refusing the fetch)"
                    );
                    set_stalled_gauge(&topic, partition, true);
                }
                Some(StallChange::Recovered { topic, partition }) => {
                    tracing::info!(%topic, partition, "a stalled partition advances again");
                    set_stalled_gauge(&topic, partition, false);
                }
                None => {}
            }
        }
        self.consumer
            .context()
            .status()
            .set_stalled(stalls.stalled());
    }

    /// Publishes the outbox of dead letters, retrying a few times; what is
    /// left is published by a later call (after the next batch, or within a
    /// second by the periodic round).
    async fn publish_outbox(&self, shutdown: &mut Shutdown) {
        let mut backoff = Backoff::new();
        for _ in 0..3 {
            match publish_pending(self.store, self.dead_letters).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "dead letters not published yet; they wait in the dead_letters table");
                    if shutdown.is_requested() {
                        return;
                    }
                    backoff.wait(shutdown).await;
                }
            }
        }
    }

    /// The periodic round: move the stream time of caught-up partitions to
    /// now; and on the leader only (see [`crate::store::leadership`]),
    /// release stranded parked events, expire parked events in stream time
    /// (rule R7) and publish the outbox.
    async fn periodic(
        &self,
        merger: &Merger,
        stranded: &mut StrandedWindow,
        stalls: &mut StallWatch,
    ) -> anyhow::Result<()> {
        self.watch_stalls(merger, stalls);
        if !self.leadership.is_leader() {
            if let Err(e) = self.advance_stream_time(merger).await {
                tracing::warn!(error = %e, "database unavailable; stream time moves later");
            }
            // Whoever leads next looks at every parked row again.
            *stranded = StrandedWindow::default();
            return Ok(());
        }
        let after = match parked::last_row_id(self.store.pool()).await {
            Ok(last) => stranded.advance(Instant::now(), last),
            Err(e) => {
                tracing::warn!(error = %e, "database unavailable; housekeeping waits");
                return Ok(());
            }
        };
        let released = release_stranded(self.store, &self.pipeline, after).await;
        if released.is_err() {
            // The rows of the window were not looked at: look at them all
            // next time.
            *stranded = StrandedWindow::default();
        }
        match released {
            Ok(mut report) if report.unparked > 0 => {
                self.handoff.offer(std::mem::take(&mut report.handed));
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
        let letters = match self.expire_parked(merger).await {
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

    /// Stream time moves on for partitions at their end (nothing older can
    /// still arrive there); parked events whose limit the group's stream
    /// time has passed are dead-lettered.
    async fn expire_parked(&self, merger: &Merger) -> Result<Vec<DeadLetter>, StoreError> {
        let pool = self.store.pool();
        let group = &self.config.group_id;
        self.advance_stream_time(merger).await?;
        let Some(stream_time) =
            offsets::stream_time(pool, group, &self.config.input.topics).await?
        else {
            return Ok(Vec::new());
        };
        metrics::gauge!("order_lifecycle_stream_time_lag_seconds")
            .set((clock::now_ms() - stream_time).max(0) as f64 / 1000.0);
        expire_parked(
            self.store,
            self.config.input.parking.park_timeout,
            stream_time,
            500,
        )
        .await
    }

    /// Stream time moves on for this instance's partitions at their end.
    async fn advance_stream_time(&self, merger: &Merger) -> Result<(), StoreError> {
        let at_end = merger.idle_at_end(|t, p| self.end_offset(t, p));
        offsets::advance_stream_time(
            self.store.pool(),
            &self.config.group_id,
            &at_end,
            clock::now_ms(),
        )
        .await
    }
}

/// Applies assignment changes to the merger.
fn apply_to_merger(changes: &Changes, merger: &mut Merger) {
    for (topic, partition) in &changes.revoked {
        let dropped = merger.revoke(topic, *partition);
        if dropped > 0 {
            tracing::info!(
                topic,
                partition,
                dropped,
                "dropped waiting messages of a revoked partition"
            );
        }
    }
    for (topic, partition) in &changes.assigned {
        merger.assign(topic, *partition);
    }
}

/// The next message, or `None` once `deadline` passes first.
async fn recv_until(
    consumer: &StreamConsumer<AssignmentContext>,
    deadline: Option<tokio::time::Instant>,
) -> Option<Result<InboundMessage, rdkafka::error::KafkaError>> {
    let received = async { consumer.recv().await.map(|m| kafka::inbound(&m)) };
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, received).await.ok(),
        None => Some(received.await),
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
fn commit(consumer: &StreamConsumer<AssignmentContext>, report: &BatchOutcome) {
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

fn record(report: &BatchOutcome, seconds: f64) {
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

fn set_stalled_gauge(topic: &str, partition: i32, stalled: bool) {
    metrics::gauge!(
        "order_lifecycle_partition_stalled",
        "topic" => topic.to_owned(),
        "partition" => partition.to_string()
    )
    .set(if stalled { 1.0 } else { 0.0 });
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
