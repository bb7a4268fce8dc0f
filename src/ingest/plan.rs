//! The batch's decisions, pure: given the decoded events, the parked events
//! the batch may release and the orders they touch (a [`LifecycleBook`]
//! loaded by the pipeline), run the state machine in arrival order and say
//! what to write: log entries, the rows they change, events to park or
//! re-point, parked rows done with, dead letters. No I/O: the pipeline
//! loads before and writes after, and the tests below call it with no
//! database.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::domain::{
    LifecycleBook, LifecycleId, OrderEvent, OrderId, Recorded, Rejection, Transition,
};
use crate::store::dead_letters::DeadLetter;
use crate::store::event_log::{NewEntry, Source};
use crate::store::parked::{NewParked, ParkedRow};
use crate::wire::{self, InboundMessage};

/// An event to apply: from this batch, or released from the parking lot.
#[derive(Debug, Clone)]
pub struct Work<'m> {
    pub message: &'m InboundMessage,
    pub event: OrderEvent,
    /// The `parked_events` row it came from.
    pub parked_row: Option<i64>,
    /// The id its row waits for, when parked.
    pub awaited: Option<LifecycleId>,
}

impl<'m> Work<'m> {
    /// An event of this batch.
    pub fn arrived(message: &'m InboundMessage, event: OrderEvent) -> Work<'m> {
        Work {
            message,
            event,
            parked_row: None,
            awaited: None,
        }
    }

    /// An event from the parking lot.
    pub fn released(row: &'m ParkedRow, event: OrderEvent) -> Work<'m> {
        Work {
            message: &row.message,
            event,
            parked_row: Some(row.row_id),
            awaited: Some(row.awaited.clone()),
        }
    }
}

/// Which parked events a batch looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release<'a> {
    /// Those waiting for ids the batch's own events issue: each is applied
    /// right after the event that issues its id.
    IssuedByBatch,
    /// Up to `limit` of those after row `after` whose awaited id is already
    /// bound: applied first (see `pipeline::release_stranded`).
    Stranded { after: i64, limit: u32 },
    /// Those waiting for these ids, which another writer bound (an import's
    /// page): applied first; then those waiting for ids they issue, each
    /// right after its issuer (see `pipeline::release_bound`).
    Bound(&'a [LifecycleId]),
}

/// Applied events as the log and the read model take them: the core that
/// `run`, `replay` and `import-legacy` share.
#[derive(Debug, Default)]
pub struct Applied {
    /// Log entries, in the order they were applied.
    pub entries: Vec<NewEntry>,
    /// Ids whose rows the entries changed, with their orders (repeats
    /// allowed; each row is written once).
    pub touched: Vec<(OrderId, LifecycleId)>,
}

impl Applied {
    /// Records one applied event.
    pub fn push(&mut self, rec: Recorded, event: &OrderEvent, source: Option<Source>) {
        for t in &rec.transitions {
            self.touched
                .push((rec.order_id.clone(), t.lifecycle_id().clone()));
        }
        self.entries.push(NewEntry::new(rec, event, source));
    }
}

/// What a batch decided to write.
#[derive(Debug, Default)]
pub struct BatchPlan<'m> {
    pub applied: Applied,
    /// Log entries by outcome.
    pub recorded: BTreeMap<&'static str, usize>,
    /// Events that broke a rule.
    pub dead_letters: Vec<DeadLetter>,
    /// Parked rows applied or dead-lettered: to delete.
    pub done_rows: Vec<i64>,
    /// Parked rows that now wait for another id.
    pub repoint: Vec<(i64, LifecycleId)>,
    /// New events to park, in source order.
    pub to_park: Vec<NewParked<'m>>,
}

/// Runs the state machine over `works` (in arrival order) and the released
/// parked events, on `book`, and says what to write.
///
/// With [`Release::IssuedByBatch`], a released event waits inside the batch
/// for the event that issues its id and is applied right after it; with
/// [`Release::Stranded`] its id is bound already and it goes first; with
/// [`Release::Bound`], so do those waiting for the ids named, and the
/// others wait for their issuer. An event
/// naming an id nobody issued yet waits too: parked if new, left (or
/// re-pointed) if it came from the parking lot.
pub fn decide<'m>(
    book: &mut LifecycleBook,
    works: Vec<Work<'m>>,
    released: Vec<Work<'m>>,
    release: Release<'_>,
) -> BatchPlan<'m> {
    let mut plan = BatchPlan::default();
    let mut waiting: HashMap<LifecycleId, VecDeque<Work<'m>>> = HashMap::new();
    let mut first: Vec<Work<'m>> = Vec::new();
    let bound: HashSet<&LifecycleId> = match release {
        Release::Bound(ids) => ids.iter().collect(),
        Release::IssuedByBatch | Release::Stranded { .. } => HashSet::new(),
    };
    for work in released {
        let awaited = work.awaited.clone().unwrap_or_else(|| {
            unreachable!("released work comes from a parked row, which names its id")
        });
        match release {
            Release::Stranded { .. } => first.push(work),
            Release::Bound(_) if bound.contains(&awaited) => first.push(work),
            Release::IssuedByBatch | Release::Bound(_) => {
                waiting.entry(awaited).or_default().push_back(work);
            }
        }
    }
    for work in first.into_iter().chain(works) {
        let mut queue = VecDeque::from([work]);
        while let Some(w) = queue.pop_front() {
            match book.process(&w.event) {
                Ok(rec) => {
                    plan.done_rows.extend(w.parked_row);
                    *plan.recorded.entry(rec.outcome.as_str()).or_default() += 1;
                    for t in &rec.transitions {
                        if let Transition::Issued { lifecycle_id, .. } = t {
                            queue.extend(waiting.remove(lifecycle_id).into_iter().flatten());
                        }
                    }
                    plan.applied
                        .push(rec, &w.event, Some(Source::of(w.message)));
                }
                Err(Rejection::UnknownLifecycleId { lifecycle_id, .. }) => {
                    waiting.entry(lifecycle_id).or_default().push_back(w);
                }
                Err(rejection) => {
                    plan.done_rows.extend(w.parked_row);
                    plan.dead_letters.push(DeadLetter::for_message(
                        w.message,
                        rejection.reason(),
                        rejection.to_string(),
                        Some(&w.event),
                    ));
                }
            }
        }
    }

    // What still waits: new events are parked; parked rows stay, re-pointed
    // if they now wait for another id.
    for (id, ws) in waiting {
        for w in ws {
            match (w.parked_row, &w.awaited) {
                (Some(_), Some(before)) if *before == id => {}
                (Some(row), _) => plan.repoint.push((row, id.clone())),
                (None, _) => plan.to_park.push(NewParked {
                    awaited: id.clone(),
                    event_id: w.event.event_id.clone(),
                    event_json: wire::json::encode(&w.event),
                    message: w.message,
                }),
            }
        }
    }
    plan.to_park.sort_by(|a, b| {
        (&a.message.topic, a.message.partition, a.message.offset).cmp(&(
            &b.message.topic,
            b.message.partition,
            b.message.offset,
        ))
    });
    plan.repoint.sort();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::IdStatus;
    use crate::testing::EventScript;

    fn message(offset: i64) -> InboundMessage {
        InboundMessage {
            topic: "orders".into(),
            partition: 0,
            offset,
            key: None,
            payload: None,
            content_type: None,
            timestamp_ms: None,
        }
    }

    fn lid(s: &str) -> LifecycleId {
        LifecycleId::parse(s).unwrap()
    }

    fn parked(
        row_id: i64,
        awaited: &str,
        event: &OrderEvent,
        message: &InboundMessage,
    ) -> ParkedRow {
        ParkedRow {
            row_id,
            awaited: lid(awaited),
            event_json: wire::json::encode(event),
            message: message.clone(),
        }
    }

    #[test]
    fn a_confirmation_before_its_request_is_parked_then_applied_right_after_it() {
        let mut s = EventScript::new("o-1");
        let (placed, early, stop_loss) = (s.place(), s.confirm("SL-1", "EXECUTED"), s.sl("SL-1"));
        let m: Vec<InboundMessage> = (0..3).map(message).collect();
        let mut book = LifecycleBook::new();
        let plan = decide(
            &mut book,
            vec![
                Work::arrived(&m[0], placed),
                Work::arrived(&m[1], early.clone()),
            ],
            Vec::new(),
            Release::IssuedByBatch,
        );
        assert_eq!(plan.applied.entries.len(), 1, "the placement");
        assert_eq!(plan.to_park.len(), 1);
        assert_eq!(plan.to_park[0].awaited, lid("SL-1"));
        assert_eq!(plan.to_park[0].event_id, early.event_id);
        assert_eq!(plan.to_park[0].message.offset, 1);
        assert!(plan.dead_letters.is_empty());

        // The next batch issues SL-1 and releases the parked confirmation
        // right after the event that issues it.
        let row = parked(7, "SL-1", &early, &m[1]);
        let plan = decide(
            &mut book,
            vec![Work::arrived(&m[2], stop_loss)],
            vec![Work::released(&row, early)],
            Release::IssuedByBatch,
        );
        let offsets: Vec<i64> = plan
            .applied
            .entries
            .iter()
            .map(|e| e.source.as_ref().unwrap().offset)
            .collect();
        assert_eq!(offsets, vec![2, 1]);
        assert_eq!(plan.done_rows, vec![7]);
        assert!(plan.to_park.is_empty());
        assert!(plan
            .applied
            .touched
            .iter()
            .any(|(_, id)| *id == lid("SL-1")));
        let order = book.order(&OrderId::parse("o-1").unwrap()).unwrap();
        let sl = order
            .ids()
            .iter()
            .find(|r| r.lifecycle_id == lid("SL-1"))
            .unwrap();
        assert_eq!(sl.status, IdStatus::Executed);
    }

    #[test]
    fn a_rule_violation_is_a_dead_letter() {
        let placed = EventScript::new("o-1").place();
        let mut other = EventScript::new("o-2");
        let (other_placed, taken) = (other.place(), other.sl("o-1"));
        let m: Vec<InboundMessage> = (0..3).map(message).collect();
        let mut book = LifecycleBook::new();
        let plan = decide(
            &mut book,
            vec![
                Work::arrived(&m[0], placed),
                Work::arrived(&m[1], other_placed),
                Work::arrived(&m[2], taken),
            ],
            Vec::new(),
            Release::IssuedByBatch,
        );
        assert_eq!(plan.applied.entries.len(), 2);
        assert_eq!(plan.dead_letters.len(), 1);
        assert_eq!(plan.dead_letters[0].reason, "id_bound_to_other_order");
        assert_eq!(plan.dead_letters[0].offset, 2);
    }

    #[test]
    fn a_stranded_event_goes_first_and_one_still_waiting_is_re_pointed() {
        let mut s = EventScript::new("o-1");
        let (placed, confirm) = (s.place(), s.confirm("o-1", "EXECUTED"));
        let unknown = s.confirm("TP-9", "EXECUTED");
        let m: Vec<InboundMessage> = (0..3).map(message).collect();
        let mut book = LifecycleBook::new();
        decide(
            &mut book,
            vec![Work::arrived(&m[0], placed)],
            Vec::new(),
            Release::IssuedByBatch,
        );
        let stranded = parked(3, "o-1", &confirm, &m[1]);
        let misfiled = parked(4, "SL-9", &unknown, &m[2]);
        let plan = decide(
            &mut book,
            Vec::new(),
            vec![
                Work::released(&stranded, confirm),
                Work::released(&misfiled, unknown),
            ],
            Release::Stranded {
                after: 0,
                limit: 500,
            },
        );
        assert_eq!(plan.applied.entries.len(), 1);
        assert_eq!(plan.done_rows, vec![3]);
        assert_eq!(plan.repoint, vec![(4, lid("TP-9"))]);
        assert!(
            plan.to_park.is_empty(),
            "parked rows are never parked again"
        );
    }
}
