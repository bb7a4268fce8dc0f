//! The pure domain core: ids, input events and the lifecycle state machine.
//! No I/O, no clock, no async: replay, rebuild, live ingestion and the tests
//! all call the same functions.

pub mod book;
pub mod event;
pub mod ids;
pub mod lifecycle;

pub use book::{LifecycleBook, Recorded};
pub use event::{
    kind_names, CloseRequested, Decimal, EventKind, LegacyIdImported, OrderEvent, OrderPlaced,
    PendingCancelled, PendingModified, ProviderConfirmation, ProviderReport, StopLossAdded,
    StopLossCancelled, TakeProfitAdded, TakeProfitCancelled, UserType,
};
pub use ids::{
    EventId, IdError, IdStatus, IdType, LifecycleId, OrderId, UserId, IMPORT_EVENT_ID_PREFIX,
};
pub use lifecycle::{Decision, IdRecord, OrderLifecycle, Outcome, Rejection, Transition};

#[cfg(test)]
mod tests;
