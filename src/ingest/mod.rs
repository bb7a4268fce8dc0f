//! Ingestion: the Kafka consumer loop, the batch pipeline it hands messages
//! to, dead-letter publishing, and the Redis follower that projects the log.

pub mod assignment;
pub mod backoff;
pub mod consumer;
pub mod dead_letter;
pub mod ordering;
pub mod pipeline;
pub mod redis_follower;

pub use consumer::run;
pub use pipeline::{
    expire_parked, process_batch, record_poison, release_stranded, BatchReport, InboundMessage,
    PipelineConfig, StrandedWindow,
};
