//! Topics of each test's own, and messages as the consumer receives them.

use order_lifecycle::config::{KafkaConfig, KafkaOption};
use order_lifecycle::domain::OrderEvent;
use order_lifecycle::kafka;
use order_lifecycle::wire::{self, Encoding};

use crate::basics::{brokers, unique_suffix};

/// Topics of its own: requests, confirmations, dead letters.
pub struct TestTopics {
    pub orders: String,
    pub confirmations: String,
    pub dead_letters: String,
}

pub fn kafka_config() -> KafkaConfig {
    KafkaConfig {
        brokers: brokers(),
        options: vec![KafkaOption {
            key: "topic.metadata.refresh.interval.ms".into(),
            value: "1000".into(),
        }],
    }
}

impl TestTopics {
    pub async fn new(partitions: i32) -> TestTopics {
        let base = format!("olt-{}", unique_suffix().replace('_', "-"));
        let topics = TestTopics {
            orders: format!("{base}-orders"),
            confirmations: format!("{base}-confirmations"),
            dead_letters: format!("{base}-dlq"),
        };
        kafka::ensure_topics(
            &kafka_config(),
            &[&topics.orders, &topics.confirmations, &topics.dead_letters],
            partitions,
        )
        .await
        .unwrap_or_else(|e| panic!("a Kafka-protocol broker at {} is required: {e}", brokers()));
        topics
    }
}

/// Messages at consecutive offsets of partition 0 of `topic`, from `first`,
/// each event in its encoding (content-type header set), as the consumer
/// hands them to the pipeline.
pub fn inbound_messages<'a>(
    topic: &str,
    first: i64,
    events: impl IntoIterator<Item = (&'a OrderEvent, Encoding)>,
) -> Vec<order_lifecycle::wire::InboundMessage> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, (e, encoding))| order_lifecycle::wire::InboundMessage {
            topic: topic.into(),
            partition: 0,
            offset: first + i as i64,
            key: None,
            payload: Some(wire::encode(e, encoding)),
            content_type: Some(encoding.content_type().as_bytes().to_vec()),
            timestamp_ms: None,
        })
        .collect()
}
