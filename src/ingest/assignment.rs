//! Partition assignment, and starting each assigned partition where the
//! database says, not where Kafka says.
//!
//! The offsets that count are the ones stored in MySQL with the data
//! (`consumer_offsets`); Kafka's committed offsets trail them (they are
//! committed after the database) and serve lag monitoring. When a partition
//! is assigned, the first message read from it is compared with the stored
//! offset:
//!
//! - equal, or nothing stored (a partition never seen: Kafka's committed
//!   offset, then `auto.offset.reset`, decide): go on;
//! - the database is ahead (a crash between the database commit and the
//!   Kafka commit): skip up to the stored offset and seek there;
//! - the database is behind (it was restored from a backup): seek back to
//!   the stored offset and drop what was prefetched from later on.
//!
//! Messages of a partition revoked while a batch was being collected are
//! dropped from that batch: the next owner reads them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Offset, Statistics};

use super::ordering::Partition;
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::store::{offsets, Store, StoreError};
use crate::wire::InboundMessage;

/// What readiness needs to know about the consumer.
#[derive(Debug)]
pub struct ConsumerStatus {
    /// Partitions assigned now; -1 until the first assignment.
    assigned: AtomicI64,
    /// Partitions that stopped advancing, as `topic/partition`.
    stalled: Mutex<Vec<String>>,
    /// The bootstrap brokers, to name them when none answers.
    brokers: String,
    /// What librdkafka last reported wrong with the brokers, until one is
    /// up again.
    kafka_trouble: Mutex<Option<(RDKafkaErrorCode, String)>>,
}

impl Default for ConsumerStatus {
    fn default() -> ConsumerStatus {
        ConsumerStatus::for_brokers("")
    }
}

impl ConsumerStatus {
    /// The status of a consumer of `brokers`.
    pub fn for_brokers(brokers: &str) -> ConsumerStatus {
        ConsumerStatus {
            assigned: AtomicI64::new(-1),
            stalled: Mutex::new(Vec::new()),
            brokers: brokers.to_owned(),
            kafka_trouble: Mutex::new(None),
        }
    }

    /// What is wrong with the brokers now (none reachable, authentication
    /// refused), in words that name them; `None` while one is up.
    pub fn kafka_trouble(&self) -> Option<String> {
        self.kafka_trouble
            .lock()
            .ok()
            .and_then(|t| t.as_ref().map(|(_, words)| words.clone()))
    }

    /// Records librdkafka's report of a client-wide error; returns the
    /// words for it when it is news (for one ERROR line per trouble).
    fn report_kafka_error(&self, code: RDKafkaErrorCode, reason: &str) -> Option<String> {
        let words = match code {
            RDKafkaErrorCode::AllBrokersDown => format!(
                "no broker reachable at {} ({reason}); is the broker running, and are \
                 --brokers (OL_KAFKA_BROKERS) and --kafka-option right?",
                self.brokers
            ),
            RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => {
                format!(
                    "the brokers at {} refused the credentials ({reason}); check the \
                     sasl.* settings of --kafka-option (OL_KAFKA_OPTIONS)",
                    self.brokers
                )
            }
            RDKafkaErrorCode::SSL => format!(
                "TLS with the brokers at {} failed ({reason}); check the ssl.* settings of \
                 --kafka-option (OL_KAFKA_OPTIONS)",
                self.brokers
            ),
            _ => return None,
        };
        let mut trouble = self.kafka_trouble.lock().ok()?;
        // News when the kind of trouble changes, not its wording: librdkafka
        // repeats "all brokers down" with changing counts ("1/1", then "0/1"
        // while the client closes).
        let news = trouble.as_ref().map(|(c, _)| *c) != Some(code);
        *trouble = Some((code, words.clone()));
        news.then_some(words)
    }

    /// Whether `code` is one of the troubles already reported, or a
    /// connection failure that only repeats it.
    fn is_known_trouble(&self, code: RDKafkaErrorCode) -> bool {
        matches!(
            code,
            RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::SSL
        ) && self.kafka_trouble.lock().is_ok_and(|t| t.is_some())
    }

    /// A broker is up again.
    fn brokers_up(&self) {
        if let Ok(mut trouble) = self.kafka_trouble.lock() {
            if trouble.take().is_some() {
                tracing::info!(brokers = %self.brokers, "a Kafka broker answers again");
            }
        }
    }

    /// The partitions reported stalled (see [`super::stall`]), as
    /// `topic/partition`.
    pub fn stalled(&self) -> Vec<String> {
        self.stalled.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Records the partitions stalled now.
    pub fn set_stalled(&self, partitions: Vec<String>) {
        if let Ok(mut stalled) = self.stalled.lock() {
            *stalled = partitions;
        }
    }

    /// Partitions assigned now, or `None` before the group's first
    /// assignment reached this member (it is not consuming yet).
    pub fn assigned(&self) -> Option<u64> {
        u64::try_from(self.assigned.load(Ordering::Relaxed)).ok()
    }

    fn change(&self, delta: i64) {
        let _ = self
            .assigned
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.max(0) + delta)
            });
    }
}

/// Records rebalances for the consumer loop. The rebalance callback runs
/// inside `recv`, so it only records; the loop acts on the records. It also
/// keeps the [`ConsumerStatus`] and turns librdkafka's statistics into the
/// per-partition lag gauge.
#[derive(Default)]
pub struct AssignmentContext {
    /// A `std` mutex: held only to push or take, never across an `.await`.
    events: Mutex<Changes>,
    status: Arc<ConsumerStatus>,
}

/// Partitions assigned and revoked since the last look: taken in as all
/// the revokes, then all the assignments, which [`Changes::assign`] and
/// [`Changes::revoke`] keep equivalent to the rebalances in their order.
#[derive(Debug, Default)]
pub struct Changes {
    /// Assigned and not revoked since.
    pub assigned: Vec<Partition>,
    /// Revoked, whether assigned again since or not (their messages
    /// received before are dropped either way).
    pub revoked: Vec<Partition>,
}

impl Changes {
    /// A rebalance assigned `parts`.
    fn assign(&mut self, parts: Vec<Partition>) {
        self.assigned.extend(parts);
    }

    /// A rebalance revoked `parts`: an assignment of them not looked at
    /// yet is void. Several rebalances can come between two looks (a
    /// receive goes on waiting through them): assigned, revoked, and some
    /// assigned again, taken in as revokes then assignments, used to leave
    /// the loop waiting on partitions another instance then owned.
    fn revoke(&mut self, parts: Vec<Partition>) {
        self.assigned.retain(|p| !parts.contains(p));
        self.revoked.extend(parts);
    }
}

impl ClientContext for AssignmentContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.on_error(&error, reason);
    }

    /// `statistics.interval.ms` apart: lag per assigned partition, as the
    /// fetcher sees it (the broker's high watermark from fetch responses,
    /// minus the consumer's position).
    fn stats(&self, statistics: Statistics) {
        if statistics
            .brokers
            .values()
            .any(|b| b.state == "UP" && b.nodeid >= 0)
        {
            self.status.brokers_up();
        }
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(
                    "order_lifecycle_consumer_lag_messages",
                    "topic" => topic.clone(),
                    "partition" => partition.to_string()
                )
                .set(p.consumer_lag as f64);
            }
        }
    }
}

impl AssignmentContext {
    /// librdkafka's client-wide errors: the ones an operator must act on
    /// (no broker reachable, credentials or TLS refused) are named with the
    /// brokers and a likely fix, logged once as an ERROR and shown by
    /// `/readyz` until a broker is up; the rest are logged as warnings.
    fn on_error(&self, error: &KafkaError, reason: &str) {
        let code = match error {
            KafkaError::Global(code) => Some(*code),
            _ => error.rdkafka_error_code(),
        };
        match code.and_then(|c| self.status.report_kafka_error(c, reason)) {
            Some(words) => tracing::error!("kafka: {words}"),
            None if code.is_some_and(|c| self.status.is_known_trouble(c)) => {}
            None => tracing::warn!(error = %error, reason, "kafka client error"),
        }
    }
}

impl ConsumerContext for AssignmentContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let list = |tpl: &rdkafka::TopicPartitionList| -> Vec<Partition> {
            tpl.elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect()
        };
        let mut changes = self.events.lock().unwrap_or_else(|p| p.into_inner());
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = list(tpl);
                tracing::info!(partitions = ?parts, "partitions assigned");
                metrics::gauge!("order_lifecycle_assigned_partitions")
                    .increment(parts.len() as f64);
                self.status.change(parts.len() as i64);
                changes.assign(parts);
            }
            Rebalance::Revoke(tpl) => {
                let parts = list(tpl);
                tracing::info!(partitions = ?parts, "partitions revoked");
                metrics::gauge!("order_lifecycle_assigned_partitions")
                    .decrement(parts.len() as f64);
                self.status.change(-(parts.len() as i64));
                changes.revoke(parts);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

impl AssignmentContext {
    /// The status this context reports to.
    pub fn status(&self) -> &ConsumerStatus {
        &self.status
    }

    /// A context reporting to `status`.
    pub fn new(status: Arc<ConsumerStatus>) -> AssignmentContext {
        AssignmentContext {
            events: Mutex::default(),
            status,
        }
    }

    fn take(&self) -> Changes {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// How long to wait, after seeking back, for the first message of the
/// re-read range before assuming retention removed it.
const SEEK_BACK_PATIENCE: Duration = Duration::from_secs(10);

/// Decides, message by message, what the batch keeps.
pub struct OffsetGate {
    group_id: String,
    /// A client for watermark queries (it never joins the group).
    metadata: Arc<BaseConsumer>,
    /// Assigned partitions whose first message has not been checked yet.
    fresh: HashSet<Partition>,
    /// Skip messages below this offset (the database is ahead).
    floor: HashMap<Partition, i64>,
    /// After a seek back: drop messages at or after this offset, prefetched
    /// from the old position, until the re-read begins.
    barrier: HashMap<Partition, (i64, Instant)>,
    /// Ends the wait for an unreadable stored offset.
    shutdown: Shutdown,
}

impl OffsetGate {
    /// A gate for the consumer group whose offsets are stored.
    pub fn new(group_id: &str, metadata: Arc<BaseConsumer>, shutdown: Shutdown) -> OffsetGate {
        OffsetGate {
            group_id: group_id.to_owned(),
            metadata,
            shutdown,
            fresh: HashSet::new(),
            floor: HashMap::new(),
            barrier: HashMap::new(),
        }
    }

    /// Applies the rebalances recorded since the last call; drops messages
    /// of revoked partitions from `batch`. Returns the changes, for the
    /// caller's other state.
    pub fn observe(
        &mut self,
        context: &AssignmentContext,
        batch: &mut Vec<InboundMessage>,
    ) -> Changes {
        let changes = context.take();
        for p in &changes.revoked {
            self.fresh.remove(p);
            self.floor.remove(p);
            self.barrier.remove(p);
        }
        if !changes.revoked.is_empty() {
            let before = batch.len();
            batch.retain(|m| !changes.revoked.contains(&(m.topic.clone(), m.partition)));
            if batch.len() < before {
                tracing::info!(
                    dropped = before - batch.len(),
                    "dropped messages of revoked partitions from the batch"
                );
            }
        }
        for p in &changes.assigned {
            self.floor.remove(p);
            self.barrier.remove(p);
            self.fresh.insert(p.clone());
        }
        changes
    }

    /// Whether `m` belongs in the batch.
    ///
    /// A fresh partition's first message waits until its stored offset can
    /// be read (the database down, a grant revoked: retried until
    /// shutdown, and then not taken). Taking it unchecked is not safe: in a
    /// database restored from a backup, it would be applied before the
    /// messages the database lacks, and the offset its batch stores would
    /// then skip them. Callers must hold no batch in flight meanwhile (it
    /// would wait with its locks held).
    ///
    /// # Errors
    /// [`StoreError`] when reading (or resetting) the stored offset fails
    /// for a reason retrying cannot cure.
    pub async fn admit(
        &mut self,
        store: &Store,
        consumer: &StreamConsumer<AssignmentContext>,
        m: &InboundMessage,
    ) -> Result<bool, StoreError> {
        let p: Partition = (m.topic.clone(), m.partition);
        if self.fresh.contains(&p) {
            let group_id = &self.group_id;
            let read = self
                .patiently(|| offsets::load(store.pool(), group_id, &m.topic, m.partition))
                .await?;
            let Some(stored) = read else {
                return Ok(false);
            };
            self.fresh.remove(&p);
            match stored {
                Some(stored)
                    if stored > m.offset
                        && stored > high_watermark(&self.metadata, &p, m.offset).await =>
                {
                    // Beyond the partition's end: the topic was deleted and
                    // created again (or truncated). Skipping to the stored
                    // offset would skip every new message; read on instead.
                    tracing::error!(topic = %m.topic, partition = m.partition, stored, kafka = m.offset, "the stored offset is beyond the end of the partition (topic recreated?); ignoring it and reading from Kafka's position");
                    // And forgetting it: stored offsets only grow, so the
                    // old one would stay, and once the new partition grew
                    // past it a restart would skip to it.
                    let group_id = &self.group_id;
                    let reset = self
                        .patiently(|| {
                            offsets::reset(store.pool(), group_id, &m.topic, m.partition, m.offset)
                        })
                        .await?;
                    if reset.is_none() {
                        return Ok(false);
                    }
                }
                Some(stored) if stored > m.offset => {
                    tracing::info!(topic = %m.topic, partition = m.partition, from = m.offset, to = stored, "skipping what the database already has");
                    self.floor.insert(p.clone(), stored);
                    seek(consumer, &p, stored);
                }
                Some(stored) if stored < m.offset => {
                    tracing::warn!(topic = %m.topic, partition = m.partition, kafka = m.offset, database = stored, "the database is behind Kafka's committed offset; re-reading from the database's offset");
                    self.barrier.insert(p.clone(), (m.offset, Instant::now()));
                    seek(consumer, &p, stored);
                    return Ok(false);
                }
                _ => {}
            }
        }
        if let Some(&floor) = self.floor.get(&p) {
            if m.offset < floor {
                return Ok(false);
            }
            self.floor.remove(&p);
        }
        if let Some(&(stale_from, since)) = self.barrier.get(&p) {
            if m.offset >= stale_from && since.elapsed() < SEEK_BACK_PATIENCE {
                return Ok(false);
            }
            self.barrier.remove(&p);
        }
        Ok(true)
    }

    /// Runs a step on the stored offsets until it succeeds, retrying what a
    /// retry may cure; `None` once shutdown is asked for, even in the middle
    /// of an attempt (one waiting for a connection of a pool whose database
    /// is down can outlast `--shutdown-timeout`).
    async fn patiently<T, F, Fut>(&self, step: F) -> Result<Option<T>, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let (mut stop, mut shutdown) = (self.shutdown.clone(), self.shutdown.clone());
        tokio::select! {
            biased;
            () = stop.requested() => Ok(None),
            done = RetryPolicy::until_shutdown(Duration::ZERO).run("stored offset", &mut shutdown, step) => done,
        }
    }
}

/// The partition's end offset, asked of the broker on a blocking thread;
/// `i64::MAX` when it cannot be had, so that nothing is taken for a reset
/// topic by mistake. An answer at or below `received`, an offset just read
/// from the partition, is evidently wrong (some Kafka-protocol brokers
/// report the end per record batch) and counts as no answer.
async fn high_watermark(metadata: &Arc<BaseConsumer>, p: &Partition, received: i64) -> i64 {
    let (metadata, topic, partition) = (metadata.clone(), p.0.clone(), p.1);
    let asked = tokio::task::spawn_blocking(move || {
        metadata.fetch_watermarks(&topic, partition, Duration::from_secs(5))
    })
    .await;
    match asked {
        Ok(Ok((_, high))) if high > received => high,
        _ => i64::MAX,
    }
}

/// Seeks without waiting; a failed seek is harmless where the floor filters
/// anyway, and logged.
fn seek(consumer: &StreamConsumer<AssignmentContext>, p: &Partition, offset: i64) {
    if let Err(e) = consumer.seek(&p.0, p.1, Offset::Offset(offset), Duration::ZERO) {
        tracing::warn!(topic = %p.0, partition = p.1, offset, error = %e, "seek failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partitions(ps: &[i32]) -> Vec<Partition> {
        ps.iter().map(|p| ("orders".to_owned(), *p)).collect()
    }

    /// Rebalances between two looks, taken in as revokes then assignments,
    /// leave what the rebalances in their order left: partitions 0 to 5
    /// assigned, all revoked, 0 to 2 assigned again leave 0 to 2 (and drop
    /// what was received from all six); revoked, assigned, revoked again
    /// leaves none.
    #[test]
    fn rebalances_between_two_looks_leave_what_they_left_in_order() {
        let mut changes = Changes::default();
        changes.assign(partitions(&[0, 1, 2, 3, 4, 5]));
        changes.revoke(partitions(&[0, 1, 2, 3, 4, 5]));
        changes.assign(partitions(&[0, 1, 2]));
        assert_eq!(changes.assigned, partitions(&[0, 1, 2]));
        assert_eq!(changes.revoked, partitions(&[0, 1, 2, 3, 4, 5]));

        let mut changes = Changes::default();
        changes.revoke(partitions(&[7]));
        changes.assign(partitions(&[7]));
        changes.revoke(partitions(&[7]));
        assert!(changes.assigned.is_empty(), "{changes:?}");
        assert_eq!(changes.revoked, partitions(&[7, 7]));
    }

    /// One ERROR per trouble: librdkafka repeats "all brokers down" with
    /// changing counts; a broker up again ends it, and the next outage is
    /// news again. Readiness shows the words meanwhile.
    #[test]
    fn a_kafka_trouble_is_news_once_until_a_broker_is_up() {
        let status = ConsumerStatus::for_brokers("kafka-1:9092");
        let first =
            status.report_kafka_error(RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down");
        assert!(first
            .unwrap()
            .starts_with("no broker reachable at kafka-1:9092 (1/1"));
        assert_eq!(
            status.report_kafka_error(RDKafkaErrorCode::AllBrokersDown, "0/1 brokers are down"),
            None
        );
        assert!(status
            .kafka_trouble()
            .unwrap()
            .contains("0/1 brokers are down"));
        assert_eq!(
            status.report_kafka_error(RDKafkaErrorCode::MessageTimedOut, "x"),
            None,
            "not an operator's trouble"
        );
        let refused =
            status.report_kafka_error(RDKafkaErrorCode::SaslAuthenticationFailed, "bad password");
        assert!(refused.unwrap().contains("refused the credentials"));
        status.brokers_up();
        assert_eq!(status.kafka_trouble(), None);
        assert!(status
            .report_kafka_error(RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down")
            .is_some());
    }
}
