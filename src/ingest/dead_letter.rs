//! Publishing rejected messages to the dead-letter topic (rule R10): the
//! original key and bytes, with the reason and origin in headers. Letters
//! are published from the `dead_letters` table (the outbox), so a crash
//! between the batch's commit and the publication only delays it; after such
//! a crash a letter may be published twice (its `source-*` headers identify
//! the message).
//!
//! Headers: `dead-letter-reason` (stable code), `dead-letter-error` (text),
//! `source-topic`, `source-partition`, `source-offset`, and the original
//! `content-type` when there was one.

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;
use crate::kafka;
use crate::store::dead_letters::DeadLetter;

/// Sends dead letters and waits until the broker has them.
#[derive(Clone)]
pub struct DeadLetterPublisher {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetterPublisher {
    /// A publisher to `topic`.
    ///
    /// # Errors
    /// [`KafkaError`] when the client cannot be created (bad settings).
    pub fn new(kafka: &KafkaConfig, topic: &str) -> Result<DeadLetterPublisher, KafkaError> {
        Ok(DeadLetterPublisher {
            producer: kafka::producer_config(kafka).create()?,
            topic: topic.to_owned(),
        })
    }

    /// Publishes every letter and waits for all deliveries.
    ///
    /// # Errors
    /// The first [`KafkaError`]; the caller retries the whole set (the
    /// topic may then hold a letter twice, which its readers tolerate by
    /// `source-*` headers).
    pub async fn publish(&self, letters: &[DeadLetter]) -> Result<(), KafkaError> {
        let mut deliveries = Vec::with_capacity(letters.len());
        for d in letters {
            let partition = d.partition.to_string();
            let offset = d.offset.to_string();
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: "dead-letter-reason",
                    value: Some(d.reason.as_ref()),
                })
                .insert(Header {
                    key: "dead-letter-error",
                    value: Some(d.error.as_str()),
                })
                .insert(Header {
                    key: "source-topic",
                    value: Some(d.topic.as_str()),
                })
                .insert(Header {
                    key: "source-partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "source-offset",
                    value: Some(offset.as_str()),
                });
            if let Some(ct) = &d.content_type {
                headers = headers.insert(Header {
                    key: crate::wire::CONTENT_TYPE_HEADER,
                    value: Some(ct.as_str()),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers);
            if let Some(k) = &d.key {
                record = record.key(k.as_slice());
            }
            if let Some(p) = &d.payload {
                record = record.payload(p.as_slice());
            }
            deliveries.push(kafka::enqueue(&self.producer, record).await?);
        }
        kafka::await_deliveries(deliveries).await
    }
}

/// Publishes every letter of the outbox not yet on the topic, oldest first,
/// and marks them published. Returns how many it published.
///
/// # Errors
/// The first Kafka or database error; what was not marked is published
/// again next time.
pub async fn publish_pending(
    store: &crate::store::Store,
    publisher: &DeadLetterPublisher,
) -> Result<usize, PublishError> {
    let mut total = 0;
    loop {
        let pending = crate::store::dead_letters::unpublished(store.pool(), 500).await?;
        if pending.is_empty() {
            return Ok(total);
        }
        let (ids, letters): (Vec<i64>, Vec<DeadLetter>) = pending.into_iter().unzip();
        publisher.publish(&letters).await?;
        crate::store::dead_letters::mark_published(store.pool(), &ids).await?;
        total += ids.len();
    }
}

/// Why the outbox could not be emptied; both are retried later.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("reading or marking the outbox: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("publishing to the dead-letter topic: {0}")]
    Kafka(#[from] KafkaError),
}
