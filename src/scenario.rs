//! Realistic order lifecycles, planned in time: pure, seeded, no I/O.
//!
//! Each order follows one of a few scripts a trading platform really sees:
//! a market order with stop-loss and take-profit that are moved, cancelled
//! and finally closed with them; the ID-loss case (a stop-loss that triggers
//! just as it is replaced, confirmed late as `EXECUTED`); a pending order
//! modified and cancelled; a pending order filled; a rejected request. Steps
//! of one order are 200 ms to 1.2 s apart, so a confirmation is sent well
//! after the request it confirms; orders overlap.

use std::collections::BTreeMap;

use crate::domain::{
    CloseRequested, Decimal, EventId, EventKind, LifecycleId, OrderEvent, OrderId, OrderPlaced,
    PendingCancelled, PendingModified, ProviderConfirmation, StopLossAdded, StopLossCancelled,
    TakeProfitAdded, TakeProfitCancelled, UserId, UserType,
};
use crate::wire::Encoding;

/// Which topic an event goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Requests from the order service, keyed by `order_id`.
    Orders,
    /// Provider confirmations, keyed by `lifecycle_id`.
    Confirmations,
}

/// What the simulator sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Event(Box<OrderEvent>, Encoding),
    /// Deliberately broken bytes, to show dead-lettering.
    Garbage(Vec<u8>),
}

/// One message to send at `at_ms` after the start.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub at_ms: u64,
    pub stream: Stream,
    pub key: String,
    pub payload: Payload,
}

/// Knobs of a plan.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub orders: usize,
    /// New orders per second.
    pub orders_per_second: f64,
    pub seed: u64,
    /// Share of events sent as JSON instead of protobuf.
    pub json_ratio: f64,
    /// Share of orders that also get one broken message.
    pub bad_ratio: f64,
    /// Prefix making this run's ids unique, so that runs never collide.
    pub run_id: String,
    /// `occurred_at_ms` of the start.
    pub start_ms: i64,
}

struct OrderScript<'a> {
    rng: &'a mut fastrand::Rng,
    opts: &'a PlanOptions,
    order: OrderId,
    user: UserId,
    user_type: UserType,
    t: u64,
    n: u32,
    out: Vec<Planned>,
}

fn id(raw: String) -> LifecycleId {
    LifecycleId::parse(&raw).unwrap_or_else(|e| unreachable!("generated id {raw}: {e}"))
}

fn price(rng: &mut fastrand::Rng) -> Option<Decimal> {
    Decimal::parse(&format!("1.{:05}", rng.u32(10000..30000))).ok()
}

impl OrderScript<'_> {
    fn next_id(&mut self, prefix: &str) -> LifecycleId {
        self.n += 1;
        id(format!("{prefix}{}{}", self.order, self.n))
    }

    fn push(&mut self, stream: Stream, kind: EventKind) {
        self.t += self.rng.u64(200..1200);
        self.n += 1;
        let order_id = match stream {
            Stream::Orders => Some(self.order.clone()),
            Stream::Confirmations => None,
        };
        let key = match &kind {
            EventKind::ProviderConfirmation(c) => c.lifecycle_id.to_string(),
            _ => self.order.to_string(),
        };
        let event = OrderEvent {
            event_id: EventId::parse(&format!("sim-{}-{}", self.order, self.n))
                .unwrap_or_else(|e| unreachable!("generated event id: {e}")),
            order_id,
            occurred_at_ms: self.opts.start_ms + self.t as i64,
            user_id: Some(self.user.clone()),
            user_type: Some(self.user_type),
            kind,
        };
        let encoding = if self.rng.f64() < self.opts.json_ratio {
            Encoding::Json
        } else {
            Encoding::Protobuf
        };
        self.out.push(Planned {
            at_ms: self.t,
            stream,
            key,
            payload: Payload::Event(Box::new(event), encoding),
        });
    }

    fn request(&mut self, kind: EventKind) {
        self.push(Stream::Orders, kind);
    }

    fn confirm(&mut self, lifecycle_id: &LifecycleId, status: &str) {
        let exec_id = format!("X{}", self.rng.u64(1_000_000..9_999_999));
        let mut raw = BTreeMap::new();
        raw.insert("OrdStatus".to_owned(), status.to_owned());
        raw.insert("ClOrdID".to_owned(), lifecycle_id.to_string());
        let kind = EventKind::ProviderConfirmation(ProviderConfirmation {
            lifecycle_id: lifecycle_id.clone(),
            ord_status: status.to_owned(),
            exec_id: Some(exec_id),
            price: price(self.rng),
            quantity: Decimal::parse("1000").ok(),
            raw,
        });
        self.push(Stream::Confirmations, kind);
    }

    fn place(&mut self, order_type: &str) {
        let kind = EventKind::OrderPlaced(OrderPlaced {
            symbol: ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"][self.rng.usize(0..4)].to_owned(),
            order_type: order_type.to_owned(),
            price: price(self.rng),
            quantity: Decimal::parse("1000").ok(),
        });
        self.request(kind);
    }

    fn add_sl(&mut self) -> LifecycleId {
        let sl = self.next_id("SL");
        let p = price(self.rng);
        self.request(EventKind::StopLossAdded(StopLossAdded {
            stoploss_id: sl.clone(),
            price: p,
        }));
        sl
    }

    fn add_tp(&mut self) -> LifecycleId {
        let tp = self.next_id("TP");
        let p = price(self.rng);
        self.request(EventKind::TakeProfitAdded(TakeProfitAdded {
            takeprofit_id: tp.clone(),
            price: p,
        }));
        tp
    }

    /// Market order: SL and TP added, SL moved (sometimes executing late,
    /// the ID-loss case), SL cancelled and re-added, then closed with both
    /// protective orders cancelled.
    fn market(&mut self) {
        let side = ["BUY", "SELL"][self.rng.usize(0..2)];
        self.place(side);
        let own = self.order.as_lifecycle_id();
        self.confirm(&own, "EXECUTED");
        let sl1 = self.add_sl();
        self.confirm(&sl1, "NEW");
        let tp = self.add_tp();
        let sl2 = self.add_sl();
        if self.rng.f64() < 0.3 {
            // Triggered before the replacement reached the provider.
            self.confirm(&sl1, "EXECUTED");
            return;
        }
        if self.rng.bool() {
            let slc = self.next_id("SLC");
            let named = self.rng.bool().then(|| sl2.clone());
            self.request(EventKind::StopLossCancelled(StopLossCancelled {
                stoploss_cancel_id: slc.clone(),
                stoploss_id: named,
            }));
            self.confirm(&slc, "CANCELLED");
            self.add_sl();
        }
        if self.rng.f64() < 0.2 {
            let tpc = self.next_id("TPC");
            self.request(EventKind::TakeProfitCancelled(TakeProfitCancelled {
                takeprofit_cancel_id: tpc.clone(),
                takeprofit_id: Some(tp.clone()),
            }));
            self.confirm(&tpc, "CANCELED");
        }
        let close = self.next_id("CL");
        let slc = self.next_id("SLC");
        let tpc = self.next_id("TPC");
        let p = price(self.rng);
        self.request(EventKind::CloseRequested(CloseRequested {
            close_id: close.clone(),
            stoploss_cancel_id: Some(slc.clone()),
            takeprofit_cancel_id: Some(tpc.clone()),
            price: p,
        }));
        self.confirm(&close, "EXECUTED");
        self.confirm(&slc, "CANCELLED");
        self.confirm(&tpc, "CANCELLED");
    }

    /// Pending order: acknowledged, modified (maybe twice), then either
    /// cancelled or filled.
    fn pending(&mut self) {
        let order_type = ["BUY_LIMIT", "SELL_LIMIT", "BUY_STOP"][self.rng.usize(0..3)];
        self.place(order_type);
        let own = self.order.as_lifecycle_id();
        self.confirm(&own, "PENDING");
        for _ in 0..self.rng.usize(1..3) {
            let m = self.next_id("MOD");
            let p = price(self.rng);
            self.request(EventKind::PendingModified(PendingModified {
                modify_id: m.clone(),
                price: p,
            }));
            self.confirm(&m, "MODIFY");
        }
        if self.rng.bool() {
            let c = self.next_id("CXL");
            self.request(EventKind::PendingCancelled(PendingCancelled {
                cancel_id: c.clone(),
            }));
            self.confirm(&c, "CANCELLED");
        } else {
            self.confirm(&own, "FILLED");
        }
    }

    /// A stop-loss the provider refuses, then a valid one.
    fn rejected(&mut self) {
        self.place("SELL");
        let own = self.order.as_lifecycle_id();
        self.confirm(&own, "EXECUTED");
        let sl = self.add_sl();
        self.confirm(&sl, "REJECTED");
        self.add_sl();
    }

    fn garbage(&mut self) {
        self.t += self.rng.u64(200..1200);
        let bytes = if self.rng.bool() {
            (0..self.rng.usize(5..40))
                .map(|_| self.rng.u8(..))
                .collect()
        } else {
            br#"{"event_id":"broken","order_id":"x","occurred_at_ms":1}"#.to_vec()
        };
        self.out.push(Planned {
            at_ms: self.t,
            stream: Stream::Orders,
            key: self.order.to_string(),
            payload: Payload::Garbage(bytes),
        });
    }
}

/// Plans `opts.orders` lifecycles, sorted by send time.
pub fn plan(opts: &PlanOptions) -> Vec<Planned> {
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let spacing_ms = 1000.0 / opts.orders_per_second.max(0.001);
    let mut all = Vec::new();
    for i in 0..opts.orders {
        let order = OrderId::parse(&format!("{}{:06}", opts.run_id, i))
            .unwrap_or_else(|e| unreachable!("generated order id: {e}"));
        let user = UserId::parse(&rng.u32(1..5000).to_string())
            .unwrap_or_else(|e| unreachable!("generated user id: {e}"));
        let mut script = OrderScript {
            user_type: if rng.f64() < 0.7 {
                UserType::Live
            } else {
                UserType::Demo
            },
            rng: &mut rng,
            opts,
            order,
            user,
            t: (i as f64 * spacing_ms) as u64,
            n: 0,
            out: Vec::new(),
        };
        match script.rng.u32(0..10) {
            0..=5 => script.market(),
            6..=8 => script.pending(),
            _ => script.rejected(),
        }
        if script.rng.f64() < opts.bad_ratio {
            script.garbage();
        }
        all.extend(script.out);
    }
    all.sort_by_key(|p| p.at_ms);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::LifecycleBook;

    #[test]
    fn planned_stream_applies_cleanly_in_order() {
        let opts = PlanOptions {
            orders: 200,
            orders_per_second: 20.0,
            seed: 42,
            json_ratio: 0.2,
            bad_ratio: 0.0,
            run_id: "9".into(),
            start_ms: 1_764_300_000_000,
        };
        let plan = plan(&opts);
        assert!(plan.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        let mut book = LifecycleBook::new();
        let mut late_executed_replaced = 0;
        for p in &plan {
            let Payload::Event(e, _) = &p.payload else {
                panic!("no garbage asked for")
            };
            let rec = book.process(e).unwrap_or_else(|r| panic!("{r}"));
            if rec.transitions.iter().any(|t| {
                matches!(
                    t,
                    crate::domain::Transition::StatusChanged {
                        from: crate::domain::IdStatus::Replaced,
                        to: crate::domain::IdStatus::Executed,
                        ..
                    }
                )
            }) {
                late_executed_replaced += 1;
            }
        }
        assert_eq!(book.orders().count(), 200);
        assert!(late_executed_replaced > 0, "the ID-loss case appears");
        assert!(plan
            .iter()
            .any(|p| matches!(p.payload, Payload::Event(_, Encoding::Json))));
    }
}
