//! Builders of valid events, for tests and examples: one order's script of
//! requests and provider confirmations with increasing event ids and times.

use std::collections::BTreeMap;

pub mod sequences;

use crate::domain::{
    CloseRequested, EventId, EventKind, LifecycleId, OrderEvent, OrderId, OrderPlaced,
    PendingCancelled, PendingModified, ProviderConfirmation, StopLossAdded, StopLossCancelled,
    TakeProfitAdded, TakeProfitCancelled, UserId, UserType,
};

fn lid(s: &str) -> LifecycleId {
    LifecycleId::parse(s).unwrap_or_else(|e| panic!("test id {s:?}: {e}"))
}

fn oid(s: &str) -> OrderId {
    OrderId::parse(s).unwrap_or_else(|e| panic!("test order id {s:?}: {e}"))
}

/// Builds events for one order with increasing event ids and times.
pub struct EventScript {
    /// The order every event is about.
    pub order: OrderId,
    /// Events built so far (numbers event ids and times).
    pub n: u32,
}

impl EventScript {
    /// A script for `order`.
    ///
    /// # Panics
    /// When `order` is not a valid id (test input is written by hand).
    pub fn new(order: &str) -> EventScript {
        EventScript {
            order: oid(order),
            n: 0,
        }
    }

    /// The next event, with any `order_id` (None for confirmations).
    pub fn event(&mut self, order: Option<OrderId>, kind: EventKind) -> OrderEvent {
        self.n += 1;
        OrderEvent {
            event_id: EventId::parse(&format!("{}-e{}", self.order, self.n))
                .unwrap_or_else(|e| panic!("test event id: {e}")),
            order_id: order,
            occurred_at_ms: 1_764_300_000_000 + i64::from(self.n),
            user_id: UserId::parse("7").ok(),
            user_type: Some(UserType::Live),
            kind,
        }
    }

    /// The next event about this order.
    pub fn on_order(&mut self, kind: EventKind) -> OrderEvent {
        let order = Some(self.order.clone());
        self.event(order, kind)
    }

    /// `order_placed`.
    pub fn place(&mut self) -> OrderEvent {
        self.on_order(EventKind::OrderPlaced(OrderPlaced {
            symbol: "EURUSD".into(),
            order_type: "BUY".into(),
            price: None,
            quantity: None,
        }))
    }
    /// `stop_loss_added` issuing `id`.
    pub fn sl(&mut self, id: &str) -> OrderEvent {
        self.on_order(EventKind::StopLossAdded(StopLossAdded {
            stoploss_id: lid(id),
            price: None,
        }))
    }
    /// `take_profit_added` issuing `id`.
    pub fn tp(&mut self, id: &str) -> OrderEvent {
        self.on_order(EventKind::TakeProfitAdded(TakeProfitAdded {
            takeprofit_id: lid(id),
            price: None,
        }))
    }
    /// `stop_loss_cancelled` issuing `cancel`, naming `named` or the active one.
    pub fn cancel_sl(&mut self, cancel: &str, named: Option<&str>) -> OrderEvent {
        self.on_order(EventKind::StopLossCancelled(StopLossCancelled {
            stoploss_cancel_id: lid(cancel),
            stoploss_id: named.map(lid),
        }))
    }
    /// `take_profit_cancelled` issuing `cancel`, naming `named` or the active one.
    pub fn cancel_tp(&mut self, cancel: &str, named: Option<&str>) -> OrderEvent {
        self.on_order(EventKind::TakeProfitCancelled(TakeProfitCancelled {
            takeprofit_cancel_id: lid(cancel),
            takeprofit_id: named.map(lid),
        }))
    }
    /// `close_requested` with optional stop-loss and take-profit cancel ids.
    pub fn close(&mut self, close: &str, slc: Option<&str>, tpc: Option<&str>) -> OrderEvent {
        self.on_order(EventKind::CloseRequested(CloseRequested {
            close_id: lid(close),
            stoploss_cancel_id: slc.map(lid),
            takeprofit_cancel_id: tpc.map(lid),
            price: None,
        }))
    }
    /// `pending_cancelled` issuing `id`.
    pub fn pending_cancel(&mut self, id: &str) -> OrderEvent {
        self.on_order(EventKind::PendingCancelled(PendingCancelled {
            cancel_id: lid(id),
        }))
    }
    /// `pending_modified` issuing `id`.
    pub fn modify(&mut self, id: &str) -> OrderEvent {
        self.on_order(EventKind::PendingModified(PendingModified {
            modify_id: lid(id),
            price: None,
        }))
    }
    /// A provider confirmation of `id` with `status`.
    pub fn confirm(&mut self, id: &str, status: &str) -> OrderEvent {
        self.event(
            None,
            EventKind::ProviderConfirmation(ProviderConfirmation {
                lifecycle_id: lid(id),
                ord_status: status.into(),
                exec_id: None,
                price: None,
                quantity: None,
                raw: BTreeMap::new(),
            }),
        )
    }
}
