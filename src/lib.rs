//! # order-lifecycle
//!
//! An event-sourced consumer of order events that keeps every id an order was
//! ever given resolvable to its order, forever.
//!
//! # Layout
//!
//! - [`domain`]: ids, input events and the lifecycle state machine; pure.
//! - [`wire`]: protobuf and JSON decoding into domain events, and encoding.

pub mod domain;
pub mod wire;
