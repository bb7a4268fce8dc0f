//! Ingestion: the Kafka consumer loop, the batch pipeline it hands messages
//! to, the order in which messages of several partitions are applied (rule
//! R11), partitions that stop advancing, and dead-letter publishing.

pub mod assignment;
pub mod consumer;
pub mod dead_letter;
pub mod order_cache;
pub mod ordering;
pub mod overlap;
pub mod pipeline;
pub mod plan;
pub mod stall;

pub use consumer::consume;
pub use pipeline::{
    expire_parked, process_batch, process_batch_in_turn, record_poison, release_stranded,
    BatchOutcome, PipelineConfig, StrandedWindow, Turn,
};
