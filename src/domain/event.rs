//! Input events: what producers tell us happened to an order.
//!
//! One variant per member of the contract's `oneof kind`. Every field is
//! already validated (typed ids, decimal strings), so the state machine never
//! re-checks input. Decoding from protobuf and JSON lives in `crate::wire`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::ids::{EventId, IdType, LifecycleId, OrderId, UserId};

/// One event about one order (the contract's `OrderEvent` envelope).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderEvent {
    /// Idempotency key chosen by the producer (rule R9).
    pub event_id: EventId,
    /// The canonical order; `None` only on provider confirmations, which are
    /// resolved through the lifecycle id they quote.
    pub order_id: Option<OrderId>,
    /// When it happened at the producer, Unix milliseconds. All timestamps
    /// the service writes come from here, never from a clock, so that a
    /// rebuild reproduces them exactly.
    pub occurred_at_ms: i64,
    /// Owner of the order, when the producer knows it.
    pub user_id: Option<UserId>,
    /// `live` or `demo`, when the producer knows it.
    pub user_type: Option<UserType>,
    /// What happened.
    pub kind: EventKind,
}

/// Which book an order lives in (the legacy `live_user_orders` or
/// `demo_user_orders`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserType {
    Live,
    Demo,
}

impl UserType {
    /// The contract spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            UserType::Live => "live",
            UserType::Demo => "demo",
        }
    }

    /// The type spelled `raw` in the contract, if any.
    pub fn parse(raw: &str) -> Option<UserType> {
        [UserType::Live, UserType::Demo]
            .into_iter()
            .find(|t| t.as_str() == raw)
    }
}

/// A decimal amount as the producer wrote it (`"1.19500"`), checked to be a
/// plain non-negative decimal. Kept as text: the service never computes with
/// prices, it records them, and text keeps every digit the producer sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Decimal(String);

/// Longest decimal string accepted.
pub const MAX_DECIMAL_CHARS: usize = 40;

impl Decimal {
    /// Parses `digits[.digits]`.
    ///
    /// # Errors
    /// A human-readable reason when the text is not a plain decimal.
    pub fn parse(raw: &str) -> Result<Decimal, String> {
        if raw.len() > MAX_DECIMAL_CHARS {
            return Err(format!(
                "is {} characters long; at most {MAX_DECIMAL_CHARS} are allowed",
                raw.len()
            ));
        }
        let (int, frac) = match raw.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (raw, None),
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if digits(int) && frac.is_none_or(digits) {
            Ok(Decimal(raw.to_owned()))
        } else {
            Err("is not a decimal string like \"1.19500\"".to_owned())
        }
    }

    /// The decimal as the producer wrote it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What happened, one variant per contract message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    OrderPlaced(OrderPlaced),
    StopLossAdded(StopLossAdded),
    TakeProfitAdded(TakeProfitAdded),
    StopLossCancelled(StopLossCancelled),
    TakeProfitCancelled(TakeProfitCancelled),
    CloseRequested(CloseRequested),
    PendingCancelled(PendingCancelled),
    PendingModified(PendingModified),
    ProviderConfirmation(ProviderConfirmation),
    /// Synthetic: an id imported from a legacy order table. Never accepted
    /// from a topic.
    LegacyIdImported(LegacyIdImported),
}

/// An id found in a legacy order table's column (the column names the type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyIdImported {
    pub id_type: IdType,
    pub lifecycle_id: LifecycleId,
    /// The legacy table it was read from.
    pub source_table: String,
}

/// The order was placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderPlaced {
    pub symbol: String,
    pub order_type: String,
    pub price: Option<Decimal>,
    pub quantity: Option<Decimal>,
}

/// A stop-loss was added or re-added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopLossAdded {
    pub stoploss_id: LifecycleId,
    pub price: Option<Decimal>,
}

/// A take-profit was added or re-added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeProfitAdded {
    pub takeprofit_id: LifecycleId,
    pub price: Option<Decimal>,
}

/// A stop-loss cancel was requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopLossCancelled {
    pub stoploss_cancel_id: LifecycleId,
    /// The stop-loss cancelled; `None` means the order's active one.
    pub stoploss_id: Option<LifecycleId>,
}

/// A take-profit cancel was requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeProfitCancelled {
    pub takeprofit_cancel_id: LifecycleId,
    /// The take-profit cancelled; `None` means the order's active one.
    pub takeprofit_id: Option<LifecycleId>,
}

/// Closing was requested, possibly cancelling the protective orders too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequested {
    pub close_id: LifecycleId,
    pub stoploss_cancel_id: Option<LifecycleId>,
    pub takeprofit_cancel_id: Option<LifecycleId>,
    pub price: Option<Decimal>,
}

/// A pending order was cancelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCancelled {
    pub cancel_id: LifecycleId,
}

/// A pending order was modified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingModified {
    pub modify_id: LifecycleId,
    pub price: Option<Decimal>,
}

/// The provider's execution report for the request that carried
/// `lifecycle_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfirmation {
    pub lifecycle_id: LifecycleId,
    /// The provider's status word as sent; see [`ProviderConfirmation::report`].
    pub ord_status: String,
    pub exec_id: Option<String>,
    pub price: Option<Decimal>,
    pub quantity: Option<Decimal>,
    pub raw: BTreeMap<String, String>,
}

/// What a provider confirmation means for the id it quotes (rule R6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderReport {
    /// `EXECUTED` or `FILLED`.
    Executed,
    /// `CANCELLED` or `CANCELED`.
    Cancelled,
    /// `REJECTED`.
    Rejected,
    /// Anything else (`PENDING`, `NEW`, `MODIFY`, ...): logged, no status change.
    Acknowledgement,
}

impl ProviderConfirmation {
    /// Classifies `ord_status`, ignoring case and surrounding blanks.
    pub fn report(&self) -> ProviderReport {
        match self.ord_status.trim().to_ascii_uppercase().as_str() {
            "EXECUTED" | "FILLED" => ProviderReport::Executed,
            "CANCELLED" | "CANCELED" => ProviderReport::Cancelled,
            "REJECTED" => ProviderReport::Rejected,
            _ => ProviderReport::Acknowledgement,
        }
    }
}

/// The contract's name of each event kind (the `oneof` members of
/// `OrderEvent`, the top-level key of its JSON form), spelled once: the
/// domain, the JSON codec, logs, metrics and the event table use these.
pub mod kind_names {
    pub const ORDER_PLACED: &str = "order_placed";
    pub const STOP_LOSS_ADDED: &str = "stop_loss_added";
    pub const TAKE_PROFIT_ADDED: &str = "take_profit_added";
    pub const STOP_LOSS_CANCELLED: &str = "stop_loss_cancelled";
    pub const TAKE_PROFIT_CANCELLED: &str = "take_profit_cancelled";
    pub const CLOSE_REQUESTED: &str = "close_requested";
    pub const PENDING_CANCELLED: &str = "pending_cancelled";
    pub const PENDING_MODIFIED: &str = "pending_modified";
    pub const PROVIDER_CONFIRMATION: &str = "provider_confirmation";
    pub const LEGACY_ID_IMPORTED: &str = "legacy_id_imported";

    /// Every kind's name, in the contract's order.
    pub const ALL: [&str; 10] = [
        ORDER_PLACED,
        STOP_LOSS_ADDED,
        TAKE_PROFIT_ADDED,
        STOP_LOSS_CANCELLED,
        TAKE_PROFIT_CANCELLED,
        CLOSE_REQUESTED,
        PENDING_CANCELLED,
        PENDING_MODIFIED,
        PROVIDER_CONFIRMATION,
        LEGACY_ID_IMPORTED,
    ];
}

impl EventKind {
    /// The contract name of this kind (the `oneof` member), used in logs,
    /// metrics and the event table.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::OrderPlaced(_) => kind_names::ORDER_PLACED,
            EventKind::StopLossAdded(_) => kind_names::STOP_LOSS_ADDED,
            EventKind::TakeProfitAdded(_) => kind_names::TAKE_PROFIT_ADDED,
            EventKind::StopLossCancelled(_) => kind_names::STOP_LOSS_CANCELLED,
            EventKind::TakeProfitCancelled(_) => kind_names::TAKE_PROFIT_CANCELLED,
            EventKind::CloseRequested(_) => kind_names::CLOSE_REQUESTED,
            EventKind::PendingCancelled(_) => kind_names::PENDING_CANCELLED,
            EventKind::PendingModified(_) => kind_names::PENDING_MODIFIED,
            EventKind::ProviderConfirmation(_) => kind_names::PROVIDER_CONFIRMATION,
            EventKind::LegacyIdImported(_) => kind_names::LEGACY_ID_IMPORTED,
        }
    }
}

impl EventKind {
    /// Where this kind stands in the causal order of rule R11, which breaks
    /// ties between events stamped at the same moment on different
    /// partitions: a placement (0) comes before the protective orders added
    /// to it (1), which come before cancels, closes and modifications (2),
    /// which come before the provider's confirmations of any of them (3).
    pub fn causal_rank(&self) -> u8 {
        match self {
            EventKind::OrderPlaced(_) | EventKind::LegacyIdImported(_) => 0,
            EventKind::StopLossAdded(_) | EventKind::TakeProfitAdded(_) => 1,
            EventKind::StopLossCancelled(_)
            | EventKind::TakeProfitCancelled(_)
            | EventKind::CloseRequested(_)
            | EventKind::PendingCancelled(_)
            | EventKind::PendingModified(_) => 2,
            EventKind::ProviderConfirmation(_) => 3,
        }
    }
}

impl OrderEvent {
    /// The ids this event issues, with their types, in the order they are
    /// recorded. The order's own id counts for `order_placed`.
    pub fn issued_ids(&self) -> Vec<(LifecycleId, IdType)> {
        match &self.kind {
            EventKind::OrderPlaced(_) => self
                .order_id
                .iter()
                .map(|o| (o.as_lifecycle_id(), IdType::OrderId))
                .collect(),
            EventKind::StopLossAdded(e) => vec![(e.stoploss_id.clone(), IdType::StoplossId)],
            EventKind::TakeProfitAdded(e) => vec![(e.takeprofit_id.clone(), IdType::TakeprofitId)],
            EventKind::StopLossCancelled(e) => {
                vec![(e.stoploss_cancel_id.clone(), IdType::StoplossCancelId)]
            }
            EventKind::TakeProfitCancelled(e) => {
                vec![(e.takeprofit_cancel_id.clone(), IdType::TakeprofitCancelId)]
            }
            EventKind::CloseRequested(e) => {
                let mut ids = vec![(e.close_id.clone(), IdType::CloseId)];
                ids.extend(
                    e.stoploss_cancel_id
                        .iter()
                        .map(|id| (id.clone(), IdType::StoplossCancelId)),
                );
                ids.extend(
                    e.takeprofit_cancel_id
                        .iter()
                        .map(|id| (id.clone(), IdType::TakeprofitCancelId)),
                );
                ids
            }
            EventKind::PendingCancelled(e) => vec![(e.cancel_id.clone(), IdType::CancelId)],
            EventKind::PendingModified(e) => vec![(e.modify_id.clone(), IdType::ModifyId)],
            EventKind::ProviderConfirmation(_) => Vec::new(),
            EventKind::LegacyIdImported(e) => vec![(e.lifecycle_id.clone(), e.id_type)],
        }
    }

    /// Existing ids this event needs to find: the id a confirmation quotes,
    /// or the stop-loss / take-profit a cancel names. The event cannot be
    /// applied until these are issued (rule R7).
    pub fn referenced_ids(&self) -> Vec<LifecycleId> {
        match &self.kind {
            EventKind::ProviderConfirmation(c) => vec![c.lifecycle_id.clone()],
            EventKind::StopLossCancelled(c) => c.stoploss_id.iter().cloned().collect(),
            EventKind::TakeProfitCancelled(c) => c.takeprofit_id.iter().cloned().collect(),
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for OrderEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.name(), self.event_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_plain_digits() {
        for ok in ["1", "1.19500", "0.0", "123456"] {
            assert_eq!(Decimal::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "1.", ".5", "-1", "1e5", "NaN", "1,5", " 1"] {
            assert!(Decimal::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
