//! The lifecycle state machine of one order: every id it was ever given, with
//! type, status, replacement chain and cancel target.
//!
//! Two pure functions, no I/O and no clock:
//!
//! * [`OrderLifecycle::decide`] turns an input event into a [`Decision`]: the
//!   [`Transition`]s to record (or a [`Rejection`] that names the id, its state
//!   and the event);
//! * [`OrderLifecycle::apply`] folds one recorded entry into the state.
//!
//! Live ingestion, replay, rebuild and the tests all call these two, so the
//! projection is by construction a function of the log (rule R8).
//!
//! # The rules, as implemented
//!
//! | event | effect |
//! |---|---|
//! | `order_placed` | issue the order's own id as `order_id` |
//! | `stop_loss_added` / `take_profit_added` | issue the id; the type's active id becomes `replaced` by it (R2) |
//! | `stop_loss_cancelled` / `take_profit_cancelled` | issue the cancel id (R2 applies to it too); the named id, or the active one of the type, becomes `cancelled` unless already final (R3) |
//! | `close_requested` | issue `close_id`, then each cancel id it carries as above (R4) |
//! | `pending_cancelled` | issue `cancel_id`, whose target is the order's own id (R5) |
//! | `pending_modified` | issue `modify_id` (R5, R2) |
//! | `provider_confirmation` | see the table on [`OrderLifecycle::confirm`] (R6) |
//!
//! # The order of the log (rule R11)
//!
//! This machine is applied to events in the order they happened, so that
//! the same stream gives the same log whatever the topic layout: Kafka
//! timestamp, then `occurred_at_ms`, then causal rank
//! ([`super::EventKind::causal_rank`]: placement, additions,
//! cancels/closes/modifications, confirmations), then partition and
//! offset. The consumer merges its partitions that way, waiting briefly for
//! a partition that is behind (`src/ingest/ordering.rs`). A producer gets
//! that order by stamping each event when it happens, keying order events
//! by order id on co-partitioned topics, and sending an order's events in
//! order; an event that still arrives before the one issuing its id waits
//! for it (rule R7).
//!
//! An id this order already holds with the same type is a repeated binding
//! and changes nothing (R1); with another type it is rejected. Binding an id
//! held by another order is rejected one level up, in [`super::book`], which
//! sees every order.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::event::{EventKind, OrderEvent, ProviderConfirmation, ProviderReport};
use super::ids::{IdStatus, IdType, LifecycleId, OrderId};

/// One id as the order knows it: a row of the `order_lifecycle_ids` read model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdRecord {
    pub lifecycle_id: LifecycleId,
    pub id_type: IdType,
    pub status: IdStatus,
    /// The id that replaced this one (rule R2); kept when a replaced id is
    /// later executed.
    pub replaced_by: Option<LifecycleId>,
    /// For cancel-type ids: the id whose cancellation was requested.
    pub target: Option<LifecycleId>,
    /// `occurred_at_ms` of the event that issued the id.
    pub issued_at_ms: i64,
    /// `occurred_at_ms` of the last event that changed the id.
    pub updated_at_ms: i64,
    /// Log sequence number of the entry that issued the id.
    pub issued_seq: u64,
    /// Log sequence number of the last entry that changed the id.
    pub updated_seq: u64,
}

/// One recorded change to one id. A log entry holds the transitions its
/// event caused, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Transition {
    /// A new id, `active`, bound to the order for good.
    Issued {
        lifecycle_id: LifecycleId,
        id_type: IdType,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<LifecycleId>,
    },
    /// An `active` id became `replaced` by a newer id of its type (rule R2).
    Replaced {
        lifecycle_id: LifecycleId,
        by: LifecycleId,
    },
    /// Any other status change.
    StatusChanged {
        lifecycle_id: LifecycleId,
        from: IdStatus,
        to: IdStatus,
    },
}

impl Transition {
    /// The id this transition changes.
    pub fn lifecycle_id(&self) -> &LifecycleId {
        match self {
            Transition::Issued { lifecycle_id, .. }
            | Transition::Replaced { lifecycle_id, .. }
            | Transition::StatusChanged { lifecycle_id, .. } => lifecycle_id,
        }
    }
}

/// How an input event was taken, as recorded in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It changed at least one id.
    Applied,
    /// A provider acknowledgement (`NEW`, `PENDING`, ...): recorded, no change.
    Acknowledged,
    /// It repeated what is already recorded (the same binding again, or a
    /// confirmation of the status an id already has).
    Duplicate,
    /// A confirmation that contradicts a final status (e.g. `REJECTED` for an
    /// executed id): recorded for audit, no change.
    Conflict,
}

impl Outcome {
    /// The spelling used in the event table and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Acknowledged => "acknowledged",
            Outcome::Duplicate => "duplicate",
            Outcome::Conflict => "conflict",
        }
    }

    /// Parses the event-table spelling.
    pub fn parse(raw: &str) -> Option<Outcome> {
        [
            Outcome::Applied,
            Outcome::Acknowledged,
            Outcome::Duplicate,
            Outcome::Conflict,
        ]
        .into_iter()
        .find(|o| o.as_str() == raw)
    }
}

/// What an event does to an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub transitions: Vec<Transition>,
}

impl Decision {
    fn no_change(outcome: Outcome) -> Decision {
        Decision {
            outcome,
            transitions: Vec::new(),
        }
    }
}

/// Why an event is not applied. Each is dead-lettered with
/// [`Rejection::reason`] (rule R10); none stops consumption.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{event} would bind {lifecycle_id} to order {order}, but it is bound to order {owner} (rule R1)")]
    BoundToOtherOrder {
        event: String,
        lifecycle_id: LifecycleId,
        owner: OrderId,
        order: OrderId,
    },
    #[error("{event} would issue {lifecycle_id} as {requested}, but order {order} already holds it as {existing} ({status}) (rule R1)")]
    TypeConflict {
        event: String,
        lifecycle_id: LifecycleId,
        order: OrderId,
        existing: IdType,
        status: IdStatus,
        requested: IdType,
    },
    #[error("{event} refers to {lifecycle_id}, which no event has issued yet (rule R7)")]
    UnknownLifecycleId {
        event: String,
        lifecycle_id: LifecycleId,
    },
    #[error("{event} cancels {lifecycle_id}, which is a {actual} ({status}), not a {expected}")]
    WrongCancelTarget {
        event: String,
        lifecycle_id: LifecycleId,
        expected: IdType,
        actual: IdType,
        status: IdStatus,
    },
    #[error("{event} has no order_id; only provider confirmations may omit it")]
    MissingOrderId { event: String },
    #[error("{event} carries {lifecycle_id} more than once")]
    RepeatedId {
        event: String,
        lifecycle_id: LifecycleId,
    },
}

impl Rejection {
    /// Stable machine-readable reason, used in dead-letter headers, the
    /// dead-letter table and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::BoundToOtherOrder { .. } => "id_bound_to_other_order",
            Rejection::TypeConflict { .. } => "id_type_conflict",
            Rejection::UnknownLifecycleId { .. } => "unknown_lifecycle_id",
            Rejection::WrongCancelTarget { .. } => "invalid_cancel_target",
            Rejection::MissingOrderId { .. } => "missing_order_id",
            Rejection::RepeatedId { .. } => "repeated_id_in_event",
        }
    }
}

/// Every id of one order, and the sequence number of its last log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLifecycle {
    order_id: OrderId,
    /// In the order they were issued.
    ids: Vec<IdRecord>,
    /// Position of each id in `ids`.
    index: HashMap<LifecycleId, usize>,
    last_seq: u64,
}

impl OrderLifecycle {
    /// An order with no ids and no log entries.
    pub fn new(order_id: OrderId) -> OrderLifecycle {
        OrderLifecycle {
            order_id,
            ids: Vec::new(),
            index: HashMap::new(),
            last_seq: 0,
        }
    }

    /// Restores an order from its projection rows (the store's loader).
    /// `last_seq` is the sequence number of its last log entry.
    pub fn restore(order_id: OrderId, mut ids: Vec<IdRecord>, last_seq: u64) -> OrderLifecycle {
        ids.sort_by_key(|r| r.issued_seq);
        let index = ids
            .iter()
            .enumerate()
            .map(|(i, r)| (r.lifecycle_id.clone(), i))
            .collect();
        OrderLifecycle {
            order_id,
            ids,
            index,
            last_seq,
        }
    }

    /// The order.
    pub fn order_id(&self) -> &OrderId {
        &self.order_id
    }

    /// Sequence number of the last log entry (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Every id, in the order issued.
    pub fn ids(&self) -> &[IdRecord] {
        &self.ids
    }

    /// Every id with this order: the order's rows in the read model.
    pub fn rows(&self) -> impl Iterator<Item = (&OrderId, &IdRecord)> {
        self.ids.iter().map(move |r| (&self.order_id, r))
    }

    /// One id of this order.
    pub fn get(&self, id: &LifecycleId) -> Option<&IdRecord> {
        self.index.get(id).map(|&i| &self.ids[i])
    }

    /// Every `active` id, by type (in the legacy `ENUM`'s order): what
    /// Redis's `order_lifecycle_active:{order}` hash holds.
    pub fn active_ids(&self) -> Vec<(IdType, LifecycleId)> {
        let mut active: Vec<(IdType, LifecycleId)> = self
            .ids
            .iter()
            .filter(|r| r.status == IdStatus::Active)
            .map(|r| (r.id_type, r.lifecycle_id.clone()))
            .collect();
        active.sort();
        active
    }

    /// The `active` id of a type, if any. Rule R2 keeps it unique.
    pub fn active(&self, id_type: IdType) -> Option<&IdRecord> {
        self.ids
            .iter()
            .rev()
            .find(|r| r.id_type == id_type && r.status == IdStatus::Active)
    }

    /// Decides what `event` does to this order.
    ///
    /// The caller ([`super::book::LifecycleBook`]) has already checked that
    /// the event belongs to this order and that the ids it issues or names
    /// are not bound to another order.
    ///
    /// # Errors
    /// A [`Rejection`] naming the id, its state and the event.
    pub fn decide(&self, event: &OrderEvent) -> Result<Decision, Rejection> {
        let mut draft = Draft {
            order: self.clone(),
            event: event.to_string(),
            transitions: Vec::new(),
        };
        let order_self = self.order_id.as_lifecycle_id();
        match &event.kind {
            EventKind::OrderPlaced(_) => {
                draft.issue(&order_self, IdType::OrderId, None)?;
            }
            EventKind::StopLossAdded(e) => {
                draft.issue(&e.stoploss_id, IdType::StoplossId, None)?;
            }
            EventKind::TakeProfitAdded(e) => {
                draft.issue(&e.takeprofit_id, IdType::TakeprofitId, None)?;
            }
            EventKind::StopLossCancelled(e) => draft.cancel(
                &e.stoploss_cancel_id,
                IdType::StoplossCancelId,
                e.stoploss_id.as_ref(),
                IdType::StoplossId,
            )?,
            EventKind::TakeProfitCancelled(e) => draft.cancel(
                &e.takeprofit_cancel_id,
                IdType::TakeprofitCancelId,
                e.takeprofit_id.as_ref(),
                IdType::TakeprofitId,
            )?,
            EventKind::CloseRequested(e) => {
                check_distinct(event, &event.issued_ids())?;
                draft.issue(&e.close_id, IdType::CloseId, None)?;
                if let Some(id) = &e.stoploss_cancel_id {
                    draft.cancel(id, IdType::StoplossCancelId, None, IdType::StoplossId)?;
                }
                if let Some(id) = &e.takeprofit_cancel_id {
                    draft.cancel(id, IdType::TakeprofitCancelId, None, IdType::TakeprofitId)?;
                }
            }
            EventKind::PendingCancelled(e) => {
                draft.issue(&e.cancel_id, IdType::CancelId, Some(order_self))?;
            }
            EventKind::PendingModified(e) => {
                draft.issue(&e.modify_id, IdType::ModifyId, None)?;
            }
            EventKind::ProviderConfirmation(c) => return self.confirm(event, c),
            EventKind::LegacyIdImported(e) => draft.import(&e.lifecycle_id, e.id_type)?,
        }
        let outcome = if draft.transitions.is_empty() {
            Outcome::Duplicate
        } else {
            Outcome::Applied
        };
        Ok(Decision {
            outcome,
            transitions: draft.transitions,
        })
    }

    /// Rule R6, for the id a provider confirmation quotes:
    ///
    /// | id status | report | result |
    /// |---|---|---|
    /// | any | acknowledgement | `acknowledged`, no change |
    /// | `active`/`replaced` | `EXECUTED` | `executed` (`replaced_by` kept) |
    /// | `active`/`replaced` | `CANCELLED`, cancel-type id | `executed`; its target `cancelled` unless final |
    /// | `active`/`replaced` | `CANCELLED`, other id | `cancelled` |
    /// | `active`/`replaced` | `REJECTED` | `rejected` |
    /// | final, same as the report asks | any | `duplicate`, no change |
    /// | final, different | any | `conflict`, no change |
    fn confirm(&self, event: &OrderEvent, c: &ProviderConfirmation) -> Result<Decision, Rejection> {
        let Some(record) = self.get(&c.lifecycle_id) else {
            return Err(Rejection::UnknownLifecycleId {
                event: event.to_string(),
                lifecycle_id: c.lifecycle_id.clone(),
            });
        };
        let report = c.report();
        let requested = match report {
            ProviderReport::Executed => IdStatus::Executed,
            ProviderReport::Cancelled if record.id_type.is_cancel() => IdStatus::Executed,
            ProviderReport::Cancelled => IdStatus::Cancelled,
            ProviderReport::Rejected => IdStatus::Rejected,
            ProviderReport::Acknowledgement => {
                return Ok(Decision::no_change(Outcome::Acknowledged))
            }
        };
        match record.status {
            IdStatus::Active | IdStatus::Replaced => {
                let mut transitions = vec![Transition::StatusChanged {
                    lifecycle_id: record.lifecycle_id.clone(),
                    from: record.status,
                    to: requested,
                }];
                let cancel_went_through =
                    report == ProviderReport::Cancelled && record.id_type.is_cancel();
                if let Some(target) = record.target.as_ref().filter(|_| cancel_went_through) {
                    if let Some(t) = self.get(target).filter(|t| !t.status.is_final()) {
                        transitions.push(Transition::StatusChanged {
                            lifecycle_id: t.lifecycle_id.clone(),
                            from: t.status,
                            to: IdStatus::Cancelled,
                        });
                    }
                }
                Ok(Decision {
                    outcome: Outcome::Applied,
                    transitions,
                })
            }
            current if current == requested => Ok(Decision::no_change(Outcome::Duplicate)),
            _ => Ok(Decision::no_change(Outcome::Conflict)),
        }
    }

    /// Folds one log entry into the state: its sequence number, when its
    /// event occurred, and its transitions.
    pub fn apply(&mut self, seq: u64, occurred_at_ms: i64, transitions: &[Transition]) {
        self.last_seq = self.last_seq.max(seq);
        for t in transitions {
            self.apply_one(seq, occurred_at_ms, t);
        }
    }

    fn apply_one(&mut self, seq: u64, at_ms: i64, transition: &Transition) {
        match transition {
            Transition::Issued {
                lifecycle_id,
                id_type,
                target,
            } => {
                if self.index.contains_key(lifecycle_id) {
                    // Issued twice in a log would be a bug upstream; keeping
                    // the first binding is what rule R1 asks for.
                    return;
                }
                self.index.insert(lifecycle_id.clone(), self.ids.len());
                self.ids.push(IdRecord {
                    lifecycle_id: lifecycle_id.clone(),
                    id_type: *id_type,
                    status: IdStatus::Active,
                    replaced_by: None,
                    target: target.clone(),
                    issued_at_ms: at_ms,
                    updated_at_ms: at_ms,
                    issued_seq: seq,
                    updated_seq: seq,
                });
            }
            Transition::Replaced { lifecycle_id, by } => {
                if let Some(r) = self.record_mut(lifecycle_id) {
                    r.status = IdStatus::Replaced;
                    r.replaced_by = Some(by.clone());
                    r.updated_at_ms = at_ms;
                    r.updated_seq = seq;
                }
            }
            Transition::StatusChanged {
                lifecycle_id, to, ..
            } => {
                if let Some(r) = self.record_mut(lifecycle_id) {
                    r.status = *to;
                    r.updated_at_ms = at_ms;
                    r.updated_seq = seq;
                }
            }
        }
    }

    fn record_mut(&mut self, id: &LifecycleId) -> Option<&mut IdRecord> {
        self.index.get(id).map(|&i| &mut self.ids[i])
    }
}

/// A scratch copy of the order that steps of one event are applied to, so
/// that a later step sees the earlier ones (a close's stop-loss cancel sees
/// the state after its `close_id`).
struct Draft {
    order: OrderLifecycle,
    event: String,
    transitions: Vec<Transition>,
}

impl Draft {
    fn push(&mut self, t: Transition) {
        // Sequence and time do not matter inside the draft.
        self.order.apply_one(0, 0, &t);
        self.transitions.push(t);
    }

    /// Issues `id` as `id_type` (rule R2 on the type's active id). An id the
    /// order already holds with that type is a repeated binding: no change.
    /// Returns whether the id was newly issued.
    fn issue(
        &mut self,
        id: &LifecycleId,
        id_type: IdType,
        target: Option<LifecycleId>,
    ) -> Result<bool, Rejection> {
        if !self.check_new(id, id_type)? {
            return Ok(false);
        }
        if let Some(active) = self.order.active(id_type) {
            let old = active.lifecycle_id.clone();
            self.push(Transition::Replaced {
                lifecycle_id: old,
                by: id.clone(),
            });
        }
        self.push(Transition::Issued {
            lifecycle_id: id.clone(),
            id_type,
            target,
        });
        Ok(true)
    }

    /// Issues `id` without touching the active id of its type; `false` when
    /// the order has it already.
    fn issue_unless_active(
        &mut self,
        id: &LifecycleId,
        id_type: IdType,
    ) -> Result<bool, Rejection> {
        if !self.check_new(id, id_type)? {
            return Ok(false);
        }
        self.push(Transition::Issued {
            lifecycle_id: id.clone(),
            id_type,
            target: None,
        });
        Ok(true)
    }

    /// `true` when the order does not have `id` yet; `false` when it has it
    /// with this type; a type conflict otherwise (rule R1).
    fn check_new(&self, id: &LifecycleId, id_type: IdType) -> Result<bool, Rejection> {
        if let Some(existing) = self.order.get(id) {
            if existing.id_type == id_type {
                return Ok(false);
            }
            return Err(Rejection::TypeConflict {
                event: self.event.clone(),
                lifecycle_id: id.clone(),
                order: self.order.order_id.clone(),
                existing: existing.id_type,
                status: existing.status,
                requested: id_type,
            });
        }
        Ok(true)
    }

    /// An id from a legacy table: issued like any other, except that it
    /// never displaces the order's active id of its type. The legacy row
    /// only ever held the latest id of each column, and anything this
    /// service recorded is newer, so the imported id is then `replaced` by
    /// that active one. An id the order already has changes nothing.
    fn import(&mut self, id: &LifecycleId, id_type: IdType) -> Result<(), Rejection> {
        let newer = self.order.active(id_type).map(|r| r.lifecycle_id.clone());
        if !self.issue_unless_active(id, id_type)? {
            return Ok(());
        }
        if let Some(by) = newer {
            self.push(Transition::Replaced {
                lifecycle_id: id.clone(),
                by,
            });
        }
        Ok(())
    }

    /// Rule R3: issues a cancel id and cancels its target, the named id or
    /// the active one of `target_type`. A target already final stays as it is
    /// (its fate is known); an order with nothing to cancel still records the
    /// cancel id, because the provider will confirm it by that id.
    fn cancel(
        &mut self,
        cancel_id: &LifecycleId,
        cancel_type: IdType,
        named: Option<&LifecycleId>,
        target_type: IdType,
    ) -> Result<(), Rejection> {
        let target = match named {
            Some(id) => {
                let Some(t) = self.order.get(id) else {
                    return Err(Rejection::UnknownLifecycleId {
                        event: self.event.clone(),
                        lifecycle_id: id.clone(),
                    });
                };
                if t.id_type != target_type {
                    return Err(Rejection::WrongCancelTarget {
                        event: self.event.clone(),
                        lifecycle_id: id.clone(),
                        expected: target_type,
                        actual: t.id_type,
                        status: t.status,
                    });
                }
                Some(t.clone())
            }
            None => self.order.active(target_type).cloned(),
        };
        let target_id = target.as_ref().map(|t| t.lifecycle_id.clone());
        if !self.issue(cancel_id, cancel_type, target_id)? {
            return Ok(());
        }
        if let Some(t) = target.filter(|t| !t.status.is_final()) {
            self.push(Transition::StatusChanged {
                lifecycle_id: t.lifecycle_id,
                from: t.status,
                to: IdStatus::Cancelled,
            });
        }
        Ok(())
    }
}

/// One event must not carry the same id twice (a close whose `close_id`
/// equals its `stoploss_cancel_id`, say): it could not be bound to both types.
fn check_distinct(event: &OrderEvent, ids: &[(LifecycleId, IdType)]) -> Result<(), Rejection> {
    for (i, (id, _)) in ids.iter().enumerate() {
        if ids[..i].iter().any(|(other, _)| other == id) {
            return Err(Rejection::RepeatedId {
                event: event.to_string(),
                lifecycle_id: id.clone(),
            });
        }
    }
    Ok(())
}
