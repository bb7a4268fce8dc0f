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
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::kafka;
use crate::store::dead_letters::{self, DeadLetter};
use crate::store::StoreError;

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

    /// Publishes every letter and waits for all deliveries. A letter the
    /// client or the broker refuses as too large is published shortened
    /// (see [`Form::Shortened`]), so that one oversized message never
    /// blocks the letters after it.
    ///
    /// # Errors
    /// The first other [`KafkaError`]; the caller retries the whole set
    /// (the topic may then hold a letter twice, which its readers tolerate
    /// by `source-*` headers).
    pub async fn publish(&self, letters: &[DeadLetter]) -> Result<(), KafkaError> {
        let mut deliveries = Vec::with_capacity(letters.len());
        for d in letters {
            let delivery = match kafka::enqueue(&self.producer, self.record(d, Form::Whole)).await {
                Err(e) if too_large(&e) => self.enqueue_shortened(d, "the client").await?,
                other => other?,
            };
            deliveries.push(delivery);
        }
        let results = futures_util::future::join_all(deliveries).await;
        for (d, result) in letters.iter().zip(results) {
            match result {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) if too_large(&e) => {
                    let retry = self.enqueue_shortened(d, "the broker").await?;
                    kafka::await_deliveries(vec![retry]).await?;
                }
                Ok(Err((e, _))) => return Err(e),
                Err(_canceled) => return Err(KafkaError::Canceled),
            }
        }
        Ok(())
    }

    /// Queues the shortened form of a letter that `refused_by` (the client
    /// or the broker) refused as too large.
    async fn enqueue_shortened(
        &self,
        d: &DeadLetter,
        refused_by: &str,
    ) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
        tracing::warn!(topic = %d.topic, partition = d.partition, offset = d.offset, refused_by, "dead letter too large for the dead-letter topic; publishing it shortened");
        kafka::enqueue(&self.producer, self.record(d, Form::Shortened)).await
    }

    /// The record of a letter, whole or shortened.
    fn record<'a>(&'a self, d: &'a DeadLetter, form: Form) -> FutureRecord<'a, [u8], [u8]> {
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
        let payload = d.payload.as_deref();
        let payload = match form {
            Form::Whole => payload,
            Form::Shortened => {
                let whole = payload.unwrap_or_default();
                let length = whole.len().to_string();
                let digest = format!("{:016x}", crate::fnv::fnv1a64(whole));
                headers = headers
                    .insert(Header {
                        key: "dead-letter-shortened",
                        value: Some("true"),
                    })
                    .insert(Header {
                        key: "original-payload-length",
                        value: Some(length.as_str()),
                    })
                    .insert(Header {
                        key: "original-payload-fnv1a64",
                        value: Some(digest.as_str()),
                    });
                payload.map(|p| &p[..p.len().min(SHORTENED_PAYLOAD_BYTES)])
            }
        };
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = &d.key {
            let kept = match form {
                Form::Whole => k.len(),
                Form::Shortened => k.len().min(SHORTENED_PAYLOAD_BYTES),
            };
            record = record.key(&k[..kept]);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        record
    }
}

/// How much of a letter's payload a shortened letter keeps. The whole
/// letter stays in the `dead_letters` table.
pub const SHORTENED_PAYLOAD_BYTES: usize = 8 * 1024;

/// A dead letter as published.
#[derive(Debug, Clone, Copy)]
enum Form {
    /// The original key and payload.
    Whole,
    /// Too large for the topic: the first [`SHORTENED_PAYLOAD_BYTES`] of
    /// the payload, with headers `dead-letter-shortened: true`,
    /// `original-payload-length` and `original-payload-fnv1a64` (FNV-1a,
    /// 64 bits, hex) to tell it by.
    Shortened,
}

/// Whether the client or the broker refused a record for its size.
fn too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
    )
}

/// Publishes every letter of the outbox not yet on the topic, oldest first,
/// and marks them published, each page of letters locked from its read to
/// its mark (see [`crate::store::dead_letters::unpublished`]): with
/// publishers on several instances, each letter is still published once.
/// Returns how many it published.
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
        let mut tx = store.pool().begin().await.map_err(StoreError::from)?;
        let pending = dead_letters::unpublished(&mut tx, 500).await?;
        if pending.is_empty() {
            return Ok(total);
        }
        let (keys, letters): (Vec<_>, Vec<DeadLetter>) = pending.into_iter().unzip();
        publisher.publish(&letters).await?;
        dead_letters::mark_published(&mut tx, &keys).await?;
        tx.commit().await.map_err(StoreError::from)?;
        total += keys.len();
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
