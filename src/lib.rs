//! # order-lifecycle
//!
//! An event-sourced consumer of order events that keeps every id an order was
//! ever given resolvable to its order, forever.
//!
//! # Layout
//!
//! - [`domain`]: ids, input events and the lifecycle state machine; pure.
//! - [`wire`]: protobuf and JSON decoding into domain events, and encoding.
//! - [`store`]: MySQL event log, read model, dead letters, offsets; Redis keys.
//! - [`ingest`]: the Kafka consumer loop, the batch pipeline, dead-letter
//!   publishing, the Redis follower.
//! - [`http`]: the read API, health and metrics endpoints.
//! - [`kafka`]: client settings and topic administration.
//! - [`rebuild`]: the read models recomputed from the log, swapped in live;
//!   [`replay`]: the log re-read from Kafka; [`progress`]: their progress bar.
//! - [`import_legacy`]: the legacy tables' ids imported into the log.
//! - [`verify`]: named health checks, and their repair.
//! - [`simulate`]: a realistic stream of order lifecycles for demos and tests.
//! - [`bench`]: the benchmarks (`bench-ingest`, `bench-latency`,
//!   `bench-rebuild`, `bench-import`), commands that print figures.
//! - [`config`]: typed settings; [`telemetry`]: logs; [`cli`]: the commands;
//!   [`clock`]: the wall clock, read in one place.
//! - [`testing`]: builders of valid events for tests and examples.

pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod http;
pub mod import_legacy;
pub mod ingest;
pub mod kafka;
pub mod progress;
pub mod rebuild;
pub mod replay;
pub mod simulate;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod verify;
pub mod wire;
