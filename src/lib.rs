//! # order-lifecycle
//!
//! An event-sourced consumer of order events that keeps every id an order was
//! ever given resolvable to its order, forever.
//!
//! # Layout
//!
//! Data flows one way, from the Kafka message to the Redis key, and each
//! layer imports only those below it:
//! `domain` < `wire` < `kafka`, `store` < `projection` < `ingest`, `http` <
//! `commands` < `main`. The leaves (`clock`, `config`, `retry`,
//! `shutdown`, `telemetry`, `progress`, `calendar`, `fnv`) import nothing
//! above them.
//!
//! - [`domain`]: ids, input events and the lifecycle state machine; pure.
//! - [`wire`]: the message as it arrived; protobuf and JSON decoding into
//!   domain events, and encoding.
//! - [`kafka`]: client settings and topic administration.
//! - [`store`]: MySQL event log, read model, dead letters, offsets; Redis keys.
//! - [`projection`]: the read models kept from the log: the Redis follower,
//!   and the rebuild of both read models.
//! - [`ingest`]: the Kafka consumer loop, the batch pipeline, the order of
//!   the log (rule R11), dead-letter publishing.
//! - [`http`]: the read API, health and metrics endpoints.
//! - [`commands`]: one file per subcommand (`run`, `serve`, `migrate`,
//!   `simulate`, `rebuild`, `replay`, `import-legacy`, `verify`, the
//!   benches), each with its arguments and its `run`.
//! - [`scenario`]: realistic order lifecycles, planned (for `simulate`, the
//!   benches and the tests).
//! - [`config`]: typed settings shared by the commands; [`retry`]: waiting
//!   between retries; [`shutdown`]: the stop signal every task watches;
//!   [`telemetry`]: logs; [`progress`]: the long jobs' progress bar;
//!   [`clock`]: the wall clock, read in one place; [`calendar`]: UTC
//!   dates in Rust (past 2038); [`fnv`]: a stable hash.
//! - `testing`: builders of valid events, compiled for tests only (the
//!   `testing` feature).

pub mod calendar;
pub mod clock;
pub mod commands;
pub mod config;
pub mod domain;
pub mod fnv;
pub mod http;
pub mod ingest;
pub mod kafka;
#[cfg(test)]
mod layering;
pub mod progress;
pub mod projection;
pub mod retry;
pub mod scenario;
pub mod shutdown;
pub mod store;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod wire;
