//! Kafka client settings and topic administration, shared by the consumer,
//! the dead-letter publisher and the simulator. Everything broker-specific is
//! configuration, so Apache Kafka and other Kafka-protocol brokers work
//! unchanged.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::wire::{InboundMessage, CONTENT_TYPE_HEADER};

/// Base settings: brokers, then the pass-through options.
fn base(kafka: &KafkaConfig, defaults: &[(&str, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in defaults {
        config.set(*k, v);
    }
    // Operators' settings win over this service's defaults.
    for o in &kafka.options {
        config.set(&o.key, &o.value);
    }
    config
}

/// Settings for the ingesting consumer. Offsets are never committed
/// automatically: the consumer commits after the data is durable.
pub fn consumer_config(
    kafka: &KafkaConfig,
    group_id: &str,
    session_timeout: Duration,
) -> ClientConfig {
    let session_ms = session_timeout.as_millis().max(1000);
    base(
        kafka,
        &[
            ("group.id", group_id.to_owned()),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("auto.offset.reset", "earliest".into()),
            ("enable.partition.eof", "false".into()),
            ("session.timeout.ms", session_ms.to_string()),
            (
                "heartbeat.interval.ms",
                (session_ms / 6).max(500).to_string(),
            ),
            // Range gives the same-numbered partitions of co-partitioned
            // topics to the same member, so that one instance applies all
            // of an order's events in order (rule R11).
            ("partition.assignment.strategy", "range".into()),
            // A shallow prefetch (librdkafka's default is 64 MiB and 100,000
            // messages a partition): the merge of rule R11 reads through
            // this queue to find a partition that is behind, and holds what
            // it reads (see `ingest::ordering::Merger::set_more_waiting`);
            // 8 MiB is seconds of input at full speed.
            ("queued.max.messages.kbytes", "8192".into()),
            ("queued.min.messages", "10000".into()),
            // With so shallow a queue, a full queue postpones the next fetch
            // of its partitions by librdkafka's default 1 s; the queue
            // empties long before that and the merge waits on a partition
            // that is behind (measured: 30 of 38 s of a backlog drain spent
            // between batches, gaps of 50-800 ms). Check again soon.
            ("fetch.queue.backoff.ms", "10".into()),
        ],
    )
}

/// Settings for producers (dead letters, simulator): idempotent, acks from
/// all replicas, lz4.
pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    base(
        kafka,
        &[
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            ("compression.type", "lz4".into()),
            ("linger.ms", "5".into()),
            ("message.timeout.ms", "30000".into()),
        ],
    )
}

/// Why topics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TopicSetupError {
    /// No broker answered: the one mistake of a first hour that deserves
    /// its own words.
    #[error(
        "no broker reachable at {brokers} within {seconds} s ({source}); is the broker \
         running, and are --brokers (OL_KAFKA_BROKERS) and --kafka-option right?"
    )]
    Unreachable {
        brokers: String,
        seconds: u64,
        source: KafkaError,
    },
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

/// How long a one-shot command waits for a first broker to answer.
const REACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Fails fast, naming the brokers, when none answers within 10 s.
///
/// # Errors
/// [`TopicSetupError::Unreachable`], or the client could not be created.
pub async fn check_reachable(kafka: &KafkaConfig) -> Result<(), TopicSetupError> {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::BaseConsumer = base(kafka, &[]).create()?;
    let fetched =
        tokio::task::spawn_blocking(move || consumer.fetch_metadata(None, REACH_TIMEOUT).map(drop))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    fetched.map_err(|source| TopicSetupError::Unreachable {
        brokers: kafka.brokers.clone(),
        seconds: REACH_TIMEOUT.as_secs(),
        source,
    })
}

/// Creates the topics that do not exist yet; existing ones are left alone.
///
/// # Errors
/// [`TopicSetupError`] when no broker can be reached (within 10 s) or one
/// refuses a topic.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    topics: &[&str],
    partitions: i32,
) -> Result<(), TopicSetupError> {
    check_reachable(kafka).await?;
    let admin: AdminClient<DefaultClientContext> = base(kafka, &[]).create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                tracing::error!(topic, ?code, "could not create topic");
                return Err(KafkaError::AdminOp(code).into());
            }
        }
    }
    Ok(())
}

/// The value of a header, if the message has it.
pub fn header<'a, M: Message>(message: &'a M, name: &str) -> Option<&'a [u8]> {
    message
        .headers()?
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .and_then(|h| h.value)
}

/// Copies a received message into plain data, so that the consumer can go
/// on receiving.
pub fn inbound<M: Message>(m: &M) -> InboundMessage {
    InboundMessage {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        content_type: header(m, CONTENT_TYPE_HEADER).map(<[u8]>::to_vec),
        timestamp_ms: m.timestamp().to_millis(),
    }
}

/// Hands a record to the producer's queue, waiting while the queue is full,
/// and returns the future of its delivery (which borrows nothing).
///
/// # Errors
/// [`KafkaError`] when the record cannot be queued (too large, bad topic).
pub async fn enqueue(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits for every delivery.
///
/// # Errors
/// The first failed delivery's [`KafkaError`].
pub async fn await_deliveries(deliveries: Vec<DeliveryFuture>) -> Result<(), KafkaError> {
    for result in futures_util::future::join_all(deliveries).await {
        match result {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e),
            Err(_canceled) => return Err(KafkaError::Canceled),
        }
    }
    Ok(())
}

/// Headers carrying `content-type` when there is one.
pub fn content_type_headers(content_type: Option<&str>) -> OwnedHeaders {
    let headers = OwnedHeaders::new();
    match content_type {
        Some(ct) => headers.insert(Header {
            key: crate::wire::CONTENT_TYPE_HEADER,
            value: Some(ct),
        }),
        None => headers,
    }
}

/// A partition's end offset (high watermark) as the consumer last heard it
/// in a fetch response: a local read of librdkafka's cache, no broker round
/// trip. `None` until the partition was fetched once.
pub fn cached_end_offset<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    use rdkafka::consumer::Consumer;
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client pointer is valid while `consumer` lives; the topic
    // is a NUL-terminated string that outlives the call; low and high are
    // valid out-pointers. The call only reads librdkafka's cached offsets
    // under its own lock (rd_kafka_get_watermark_offsets, which rust-rdkafka
    // does not wrap).
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// Each topic's partition count as the broker reports it (`None`: the topic
/// does not exist). Blocking: call it from a blocking thread.
pub fn partition_counts(
    client: &rdkafka::consumer::BaseConsumer,
    topics: &[String],
    timeout: Duration,
) -> Vec<(String, Option<usize>)> {
    use rdkafka::consumer::Consumer;
    topics
        .iter()
        .map(|topic| {
            let count = client
                .fetch_metadata(Some(topic), timeout)
                .ok()
                .and_then(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map(|t| t.partitions().len())
                        .filter(|n| *n > 0)
                });
            (topic.clone(), count)
        })
        .collect()
}
