//! Random event sequences over a small space of orders and ids, and the
//! invariants every sequence must keep: shared by the domain's property
//! test and the state-machine fuzz target (`fuzz/`), so that both check
//! the same rules in the same words.

use std::collections::{HashMap, HashSet};

use super::EventScript;
use crate::domain::{
    IdStatus, LifecycleBook, LifecycleId, OrderEvent, OrderId, OrderLifecycle, Recorded,
};

/// One step: which order (of 3), which kind of event (of 10), two ids (of
/// 12) it may name and a confirmation status (of 6). Any bytes make a step
/// (each is taken modulo its range), so a fuzzer's input is a sequence of
/// steps five bytes at a time. The spaces are small on purpose: so that
/// replacements, repeats, conflicts and cross-order clashes all happen.
pub type Step = (u8, u8, u8, u8, u8);

/// Steps read five bytes at a time (a shorter tail is ignored).
pub fn steps_from_bytes(bytes: &[u8]) -> impl Iterator<Item = Step> + '_ {
    bytes
        .chunks_exact(5)
        .map(|c| (c[0], c[1], c[2], c[3], c[4]))
}

/// The `n`-th event of a sequence, built from `step`.
pub fn event(step: Step, n: usize) -> OrderEvent {
    let (order, kind, a, b, st) = step;
    let (a, b) = (a % 12, b % 12);
    let mut s = EventScript::new(&format!("O{}", order % 3));
    s.n = u32::try_from(n).unwrap_or(u32::MAX - 1);
    let id = |x: u8| format!("I{x}");
    const STATUSES: [&str; 6] = [
        "EXECUTED",
        "CANCELLED",
        "REJECTED",
        "NEW",
        "FILLED",
        "CANCELED",
    ];
    match kind % 10 {
        0 => s.place(),
        1 => s.sl(&id(a)),
        2 => s.tp(&id(a)),
        3 => s.cancel_sl(&id(a), (b % 2 == 0).then(|| id(b)).as_deref()),
        4 => s.cancel_tp(&id(a), (b % 2 == 0).then(|| id(b)).as_deref()),
        5 => s.close(&id(a), (b % 3 == 0).then(|| id(b)).as_deref(), None),
        6 => s.pending_cancel(&id(a)),
        7 => s.modify(&id(a)),
        _ => s.confirm(&id(a), STATUSES[usize::from(st % 6)]),
    }
}

/// Feeds events to a [`LifecycleBook`] and checks, after each and at the
/// end, the invariants of `domain.md`: an issued id stays bound to the
/// order that first got it (R2), at most one active id per order and type
/// (R3), per-order sequences 1..n with no gap (R10), and folding the
/// recorded transitions again gives the same state (replay, R8).
#[derive(Default)]
pub struct InvariantCheck {
    book: LifecycleBook,
    first_owner: HashMap<LifecycleId, OrderId>,
    log: Vec<(Recorded, i64)>,
}

impl InvariantCheck {
    /// An empty book.
    pub fn new() -> InvariantCheck {
        InvariantCheck::default()
    }

    /// Processes `event` (a rejection is a valid answer) and checks the
    /// bindings.
    ///
    /// # Errors
    /// The invariant broken, in words.
    pub fn step(&mut self, event: &OrderEvent) -> Result<(), String> {
        if let Ok(recorded) = self.book.process(event) {
            self.log.push((recorded, event.occurred_at_ms));
        }
        for order in self.book.orders() {
            for r in order.ids() {
                let owner = self
                    .first_owner
                    .entry(r.lifecycle_id.clone())
                    .or_insert_with(|| order.order_id().clone());
                if owner != order.order_id() {
                    return Err(format!(
                        "{} moved from {owner} to {}",
                        r.lifecycle_id,
                        order.order_id()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks sequences, active ids and the replay of the log.
    ///
    /// # Errors
    /// The invariant broken, in words.
    pub fn finish(self) -> Result<(), String> {
        let mut replayed: HashMap<OrderId, OrderLifecycle> = HashMap::new();
        let mut seqs: HashMap<OrderId, u64> = HashMap::new();
        for (rec, at) in &self.log {
            let last = seqs.entry(rec.order_id.clone()).or_insert(0);
            if rec.seq != *last + 1 {
                return Err(format!("{}: seq {} after {}", rec.order_id, rec.seq, last));
            }
            *last = rec.seq;
            replayed
                .entry(rec.order_id.clone())
                .or_insert_with(|| OrderLifecycle::new(rec.order_id.clone()))
                .apply(rec.seq, *at, &rec.transitions);
        }
        for order in self.book.orders() {
            let mut active = HashSet::new();
            for r in order.ids().iter().filter(|r| r.status == IdStatus::Active) {
                if !active.insert(r.id_type) {
                    return Err(format!("two active {} in {}", r.id_type, order.order_id()));
                }
            }
            if order.last_seq() > 0 && Some(order) != replayed.get(order.order_id()) {
                return Err(format!("{}: the replayed state differs", order.order_id()));
            }
        }
        Ok(())
    }
}
