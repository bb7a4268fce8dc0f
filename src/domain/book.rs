//! Many orders at once: the part of rule R1 that needs to see every order
//! ("an id is bound to exactly one order"), and the resolution of provider
//! confirmations, which name a lifecycle id but no order.
//!
//! The book holds whichever orders the caller loaded: a batch's orders for
//! live ingestion, every order for a rebuild. It is as pure as the state
//! machine it wraps.

use std::collections::HashMap;

use super::event::{EventKind, OrderEvent};
use super::ids::{LifecycleId, OrderId};
use super::lifecycle::{IdRecord, OrderLifecycle, Outcome, Rejection, Transition};

/// A log entry produced by [`LifecycleBook::process`]: what to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The order the event was applied to (resolved for confirmations).
    pub order_id: OrderId,
    /// The order's next sequence number: 1, 2, 3, ... with no gap (rule R8).
    pub seq: u64,
    pub outcome: Outcome,
    pub transitions: Vec<Transition>,
}

/// A set of orders and the index of which order owns which id.
#[derive(Debug, Default, Clone)]
pub struct LifecycleBook {
    orders: HashMap<OrderId, OrderLifecycle>,
    owners: HashMap<LifecycleId, OrderId>,
}

impl LifecycleBook {
    /// An empty book.
    pub fn new() -> LifecycleBook {
        LifecycleBook::default()
    }

    /// Adds a loaded order and indexes its ids.
    pub fn insert(&mut self, order: OrderLifecycle) {
        for r in order.ids() {
            self.owners
                .insert(r.lifecycle_id.clone(), order.order_id().clone());
        }
        self.orders.insert(order.order_id().clone(), order);
    }

    /// One order, if loaded or created.
    pub fn order(&self, order_id: &OrderId) -> Option<&OrderLifecycle> {
        self.orders.get(order_id)
    }

    /// The records of the given ids as they stand now (rows to write),
    /// skipping ids the book does not hold.
    pub fn records<'a>(
        &'a self,
        ids: &'a [(OrderId, LifecycleId)],
    ) -> Vec<(&'a OrderId, &'a IdRecord)> {
        ids.iter()
            .filter_map(|(order, id)| {
                self.order(order)
                    .and_then(|o| o.get(id))
                    .map(|r| (order, r))
            })
            .collect()
    }

    /// Every id bound to an order of the book: taken right after loading,
    /// it tells the ids a batch binds for the first time from those it
    /// changes.
    pub fn bound_ids(&self) -> std::collections::HashSet<LifecycleId> {
        self.orders()
            .flat_map(|o| o.ids().iter().map(|r| r.lifecycle_id.clone()))
            .collect()
    }

    /// Every order in the book.
    pub fn orders(&self) -> impl Iterator<Item = &OrderLifecycle> {
        self.orders.values()
    }

    /// The order an id is bound to.
    pub fn owner_of(&self, id: &LifecycleId) -> Option<&OrderId> {
        self.owners.get(id)
    }

    /// Decides and applies one event; returns the entry to append.
    ///
    /// # Errors
    /// A [`Rejection`] when the event breaks a rule; the book is unchanged.
    pub fn process(&mut self, event: &OrderEvent) -> Result<Recorded, Rejection> {
        let order_id = self.resolve_order(event)?;
        for (id, _) in event.issued_ids() {
            self.check_owner(event, &id, &order_id)?;
        }
        for id in event.referenced_ids() {
            if !self.owners.contains_key(&id) {
                return Err(Rejection::UnknownLifecycleId {
                    event: event.to_string(),
                    lifecycle_id: id,
                });
            }
            self.check_owner(event, &id, &order_id)?;
        }
        let decision = match self.orders.get(&order_id) {
            Some(order) => order.decide(event)?,
            None => OrderLifecycle::new(order_id.clone()).decide(event)?,
        };
        let order = self
            .orders
            .entry(order_id.clone())
            .or_insert_with(|| OrderLifecycle::new(order_id.clone()));
        let seq = order.last_seq() + 1;
        order.apply(seq, event.occurred_at_ms, &decision.transitions);
        for t in &decision.transitions {
            if let Transition::Issued { lifecycle_id, .. } = t {
                self.owners.insert(lifecycle_id.clone(), order_id.clone());
            }
        }
        Ok(Recorded {
            order_id,
            seq,
            outcome: decision.outcome,
            transitions: decision.transitions,
        })
    }

    /// The event's own `order_id`, or for a confirmation without one, the
    /// owner of the id it quotes.
    fn resolve_order(&self, event: &OrderEvent) -> Result<OrderId, Rejection> {
        if let Some(order_id) = &event.order_id {
            return Ok(order_id.clone());
        }
        match &event.kind {
            EventKind::ProviderConfirmation(c) => {
                self.owners.get(&c.lifecycle_id).cloned().ok_or_else(|| {
                    Rejection::UnknownLifecycleId {
                        event: event.to_string(),
                        lifecycle_id: c.lifecycle_id.clone(),
                    }
                })
            }
            // The decoders already require order_id on every other kind.
            _ => Err(Rejection::MissingOrderId {
                event: event.to_string(),
            }),
        }
    }

    fn check_owner(
        &self,
        event: &OrderEvent,
        id: &LifecycleId,
        order_id: &OrderId,
    ) -> Result<(), Rejection> {
        match self.owners.get(id) {
            Some(owner) if owner != order_id => Err(Rejection::BoundToOtherOrder {
                event: event.to_string(),
                lifecycle_id: id.clone(),
                owner: owner.clone(),
                order: order_id.clone(),
            }),
            _ => Ok(()),
        }
    }
}
