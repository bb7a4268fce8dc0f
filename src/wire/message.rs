//! A message as it arrived, before decoding: the bytes and where they came
//! from. Plain data, so that every layer (the pipeline, the parking lot, the
//! dead letters) can hold one without knowing the Kafka client.

/// A message as read from Kafka, owned so that the consumer can go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The `content-type` header, if any.
    pub content_type: Option<Vec<u8>>,
    /// The record's Kafka timestamp (producer's create time, or the
    /// broker's append time), which orders messages across partitions
    /// (rule R11, see `ingest::ordering`).
    pub timestamp_ms: Option<i64>,
}
