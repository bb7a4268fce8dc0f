//! The order in which messages from several partitions are applied (rule
//! R11).
//!
//! Kafka orders messages only within a partition. Producers publish an
//! order's events on one topic or on several (one per family: placements,
//! stop-loss/take-profit changes, cancels/closes/modifications), and the
//! provider's confirmations on another; which of two events of one order is
//! applied first decides the log (a cancel before or after the stop-loss it
//! cancels, a late `EXECUTED` before or after the replacement). So the
//! consumer applies the messages of all its partitions in production order:
//!
//! - **Order**: Kafka timestamp, then `occurred_at_ms`, then causal rank
//!   (placement, additions, cancels/closes/modifications, confirmations:
//!   [`crate::domain::EventKind::causal_rank`]), then partition, offset and
//!   topic, so that the order is total and deterministic. Each partition's
//!   own order is kept: only the partitions' heads are compared.
//! - **Watermark** (as Kafka Streams does for a task with several input
//!   partitions, its `max.task.idle.ms`): the earliest head is applied only
//!   when every other partition either has a message waiting (its head is
//!   no earlier), has delivered a message newer than it, is caught up to its
//!   end offset, or has been empty for longer than `--max-partition-idle`.
//!   A partition that is behind is waited for, briefly; a caught-up one
//!   never is, so a consumer that keeps up adds no latency.
//!
//! `run` merges this way through [`Merger`]; `replay`, which reads each
//! partition to its end, compares heads with the same order ([`Keyed`]'s `Ord`), so a
//! replay of the topics reproduces the live log's per-order sequences for a
//! stream produced in order.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::wire;
use crate::wire::InboundMessage;

/// A partition: topic and number.
pub type Partition = (String, i32);

/// Rank given to a message that does not decode: after every event stamped
/// at the same moment (it is dead-lettered anyway).
const UNDECODABLE_RANK: u8 = u8::MAX;

/// A message with what orders it among other partitions' messages.
#[derive(Debug, Clone)]
pub struct Keyed {
    timestamp_ms: i64,
    occurred_at_ms: i64,
    rank: u8,
    pub message: InboundMessage,
}

impl Keyed {
    /// Reads the message's ordering key (decoding its payload for the event
    /// time and kind). A message without a Kafka timestamp counts as
    /// stamped at the epoch.
    pub fn new(message: InboundMessage) -> Keyed {
        let payload = message.payload.as_deref().unwrap_or_default();
        let (occurred_at_ms, rank) = match wire::decode(payload, message.content_type.as_deref()) {
            Ok(event) => (event.occurred_at_ms, event.kind.causal_rank()),
            Err(_) => (i64::MAX, UNDECODABLE_RANK),
        };
        Keyed {
            timestamp_ms: message.timestamp_ms.unwrap_or(0),
            occurred_at_ms,
            rank,
            message,
        }
    }

    /// What orders it, before the topic (compared last, by reference).
    fn key(&self) -> (i64, i64, u8, i32, i64) {
        (
            self.timestamp_ms,
            self.occurred_at_ms,
            self.rank,
            self.message.partition,
            self.message.offset,
        )
    }
}

/// The order of rule R11 between two partitions' heads. Two messages are
/// equal only when they are the same message (topic, partition, offset).
impl Ord for Keyed {
    fn cmp(&self, other: &Keyed) -> Ordering {
        self.key()
            .cmp(&other.key())
            .then_with(|| self.message.topic.cmp(&other.message.topic))
    }
}

impl PartialOrd for Keyed {
    fn partial_cmp(&self, other: &Keyed) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Keyed {
    fn eq(&self, other: &Keyed) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Keyed {}

/// The index of the head to apply next among partitions' heads (`None`
/// for a partition with nothing waiting); `None` when all are empty.
pub fn earliest<'a>(heads: impl Iterator<Item = Option<&'a Keyed>>) -> Option<usize> {
    heads
        .enumerate()
        .filter_map(|(i, head)| head.map(|m| (i, m)))
        .min_by(|(_, a), (_, b)| a.cmp(b))
        .map(|(i, _)| i)
}

/// One assigned partition's waiting messages and what is known of it.
#[derive(Debug)]
struct Lane {
    topic: String,
    partition: i32,
    queue: VecDeque<Keyed>,
    /// The newest Kafka timestamp received from it.
    newest_ms: Option<i64>,
    /// The offset after the last message received (or the stored start).
    next_offset: Option<i64>,
    /// Since when it has been empty while holding back another's message.
    waited_since: Option<Instant>,
}

impl Lane {
    fn is(&self, topic: &str, partition: i32) -> bool {
        self.partition == partition && self.topic == topic
    }

    /// Everything the broker had (as of its last fetch response) was
    /// received. A partition that never held a message is caught up even
    /// before its start offset is known.
    fn caught_up(&self, end: Option<i64>) -> bool {
        match (self.next_offset, end) {
            (Some(next), Some(end)) => next >= end,
            (None, Some(end)) => end == 0,
            _ => false,
        }
    }
}

/// The partitions' messages merged in the order of rule R11, with the
/// watermark described in the module docs. Pure: the caller feeds it
/// messages, assignment changes and each partition's end offset.
#[derive(Debug)]
pub struct Merger {
    lanes: Vec<Lane>,
    max_idle: Duration,
    buffered: usize,
    /// When the partition holding back the head stops being waited for.
    wake_at: Option<Instant>,
    /// The client holds received messages not yet pushed here.
    more_waiting: bool,
}

impl Merger {
    /// A merger that waits at most `max_idle` for a partition that is
    /// behind (zero: never waits).
    pub fn new(max_idle: Duration) -> Merger {
        Merger {
            lanes: Vec::new(),
            max_idle,
            buffered: 0,
            wake_at: None,
            more_waiting: false,
        }
    }

    /// Tells whether the Kafka client still holds received messages that
    /// were not pushed yet. While it does, no partition counts as idle: its
    /// next messages may be among them, queued behind other partitions'
    /// (the client has one queue for all partitions, filled a fetch
    /// response at a time). Measured: with a 600,000-event backlog, one
    /// partition's messages sat more than `max_idle` deep in that queue,
    /// so it was given up on again and again, and 45,000 confirmations for
    /// its orders were parked. The idle clock starts once the client's
    /// queue is empty.
    pub fn set_more_waiting(&mut self, more_waiting: bool) {
        self.more_waiting = more_waiting;
    }

    fn lane(&mut self, topic: &str, partition: i32) -> &mut Lane {
        let i = match self.lanes.iter().position(|l| l.is(topic, partition)) {
            Some(i) => i,
            None => {
                self.lanes.push(Lane {
                    topic: topic.to_owned(),
                    partition,
                    queue: VecDeque::new(),
                    newest_ms: None,
                    next_offset: None,
                    waited_since: None,
                });
                self.lanes.len() - 1
            }
        };
        &mut self.lanes[i]
    }

    /// A partition was assigned: it is waited for from now on.
    pub fn assign(&mut self, topic: &str, partition: i32) {
        self.lane(topic, partition);
    }

    /// A partition was revoked: its waiting messages are dropped (the next
    /// owner reads them); returns how many.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> usize {
        let Some(i) = self.lanes.iter().position(|l| l.is(topic, partition)) else {
            return 0;
        };
        let dropped = self.lanes.swap_remove(i).queue.len();
        self.buffered -= dropped;
        dropped
    }

    /// Where reading a partition starts (its stored offset), so that an
    /// idle partition can be known caught up before it delivers anything.
    pub fn start_at(&mut self, topic: &str, partition: i32, next_offset: i64) {
        let lane = self.lane(topic, partition);
        if lane.next_offset.is_none() {
            lane.next_offset = Some(next_offset);
        }
    }

    /// Adds a received message to its partition's queue.
    pub fn push(&mut self, message: InboundMessage) {
        let keyed = Keyed::new(message);
        let m = &keyed.message;
        let (topic, partition, offset, ts) =
            (m.topic.clone(), m.partition, m.offset, m.timestamp_ms);
        let lane = self.lane(&topic, partition);
        lane.next_offset = Some(offset + 1);
        lane.newest_ms = lane.newest_ms.max(ts);
        lane.waited_since = None;
        lane.queue.push_back(keyed);
        self.buffered += 1;
    }

    /// Messages waiting.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Messages waiting in each partition.
    pub fn queued(&self) -> impl Iterator<Item = (&str, i32, usize)> {
        self.lanes
            .iter()
            .map(|l| (l.topic.as_str(), l.partition, l.queue.len()))
    }

    /// The next offset expected from each partition (after the last
    /// message received, or its stored start; `None` before either).
    pub fn positions(&self) -> impl Iterator<Item = (&str, i32, Option<i64>)> {
        self.lanes
            .iter()
            .map(|l| (l.topic.as_str(), l.partition, l.next_offset))
    }

    /// The next message to apply, if the watermark lets it go now. `end`
    /// gives a partition's end offset as last heard from the broker.
    pub fn pop_ready(
        &mut self,
        now: Instant,
        end: impl Fn(&str, i32) -> Option<i64>,
    ) -> Option<InboundMessage> {
        self.wake_at = None;
        let i = earliest(self.lanes.iter().map(|l| l.queue.front()))?;
        let head_ms = self.lanes[i].queue.front()?.timestamp_ms;
        let mut wake_at: Option<Instant> = None;
        let mut held = false;
        for (j, lane) in self.lanes.iter_mut().enumerate() {
            if j == i || !lane.queue.is_empty() {
                continue;
            }
            if lane.newest_ms.is_some_and(|t| t > head_ms)
                || lane.caught_up(end(&lane.topic, lane.partition))
            {
                continue;
            }
            if self.more_waiting {
                // Not idle: the client has not handed everything over. The
                // deadline only makes the caller look again (a receive that
                // finds nothing clears `more_waiting`).
                lane.waited_since = None;
                held = true;
                let until = now + self.max_idle;
                wake_at = Some(wake_at.map_or(until, |w| w.min(until)));
                continue;
            }
            let until = *lane.waited_since.get_or_insert(now) + self.max_idle;
            if now < until {
                held = true;
                wake_at = Some(wake_at.map_or(until, |w| w.min(until)));
            }
        }
        if held {
            self.wake_at = wake_at;
            return None;
        }
        let keyed = self.lanes[i].queue.pop_front()?;
        self.buffered -= 1;
        Some(keyed.message)
    }

    /// When the partition that held back the last [`Merger::pop_ready`]
    /// stops being waited for; `None` when nothing was held back.
    pub fn wake_at(&self) -> Option<Instant> {
        self.wake_at
    }

    /// Whether every partition has received all the broker had: more
    /// waiting would gather nothing.
    pub fn all_caught_up(&self, end: impl Fn(&str, i32) -> Option<i64>) -> bool {
        self.lanes
            .iter()
            .all(|l| l.caught_up(end(&l.topic, l.partition)))
    }

    /// Partitions with nothing waiting that are caught up to their end:
    /// nothing older than now can still arrive on them.
    pub fn idle_at_end(&self, end: impl Fn(&str, i32) -> Option<i64>) -> Vec<Partition> {
        self.lanes
            .iter()
            .filter(|l| l.queue.is_empty() && l.caught_up(end(&l.topic, l.partition)))
            .map(|l| (l.topic.clone(), l.partition))
            .collect()
    }
}

/// Rule R11 needs one instance to own every partition an order's events
/// are on, which the range assignor gives only when the topics consumed
/// together have the same partition count. Returns the complaint, naming
/// the topics and their counts, when they differ (a missing topic is left
/// to the consumer's own error).
pub fn copartitioning_problem(counts: &[(String, Option<usize>)]) -> Option<String> {
    let known: Vec<(&str, usize)> = counts
        .iter()
        .filter_map(|(t, n)| n.map(|n| (t.as_str(), n)))
        .collect();
    let first = known.first()?.1;
    if known.iter().all(|(_, n)| *n == first) {
        return None;
    }
    let list: Vec<String> = known.iter().map(|(t, n)| format!("{t} ({n})")).collect();
    Some(format!(
        "the consumed topics are not co-partitioned: {}. With more than one instance, an \
         order's events on different topics can be owned by different instances and applied \
         out of order (rule R11); give the order-event topics the same partition count. A \
         confirmations topic keyed by lifecycle id may differ (parking covers it, rule R7).",
        list.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::EventScript;
    use crate::wire::Encoding;

    fn message(topic: &str, partition: i32, offset: i64, ts: i64) -> InboundMessage {
        InboundMessage {
            topic: topic.into(),
            partition,
            offset,
            key: None,
            payload: None,
            content_type: None,
            timestamp_ms: Some(ts),
        }
    }

    fn event_message(
        topic: &str,
        partition: i32,
        offset: i64,
        ts: i64,
        event: &crate::domain::OrderEvent,
    ) -> InboundMessage {
        InboundMessage {
            payload: Some(wire::encode(event, Encoding::Protobuf)),
            content_type: Some(Encoding::Protobuf.content_type().as_bytes().to_vec()),
            ..message(topic, partition, offset, ts)
        }
    }

    fn drain(merger: &mut Merger, now: Instant, end: i64) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        while let Some(m) = merger.pop_ready(now, |_, _| Some(end)) {
            out.push((m.topic, m.partition, m.offset));
        }
        out
    }

    fn names(v: &[(String, i32, i64)]) -> Vec<(&str, i32, i64)> {
        v.iter().map(|(t, p, o)| (t.as_str(), *p, *o)).collect()
    }

    #[test]
    fn partitions_are_merged_by_timestamp_keeping_each_partitions_order() {
        let mut merger = Merger::new(Duration::from_millis(100));
        for m in [
            message("orders", 0, 10, 100),
            message("orders", 0, 11, 300),
            message("orders", 0, 12, 250),
            message("confirmations", 1, 5, 200),
            message("confirmations", 1, 6, 400),
        ] {
            merger.push(m);
        }
        let order = drain(&mut merger, Instant::now(), i64::MAX);
        // Everything before the last confirmation goes; the last waits for
        // orders/0, which is empty, behind, and not yet idle long enough.
        assert_eq!(
            names(&order),
            vec![
                ("orders", 0, 10),
                ("confirmations", 1, 5),
                ("orders", 0, 11),
                ("orders", 0, 12),
            ]
        );
        assert_eq!(merger.buffered(), 1);
        assert!(merger.wake_at().is_some());
    }

    #[test]
    fn a_partition_that_is_behind_is_waited_for_until_it_idles_too_long() {
        let mut merger = Merger::new(Duration::from_millis(100));
        merger.assign("orders", 0);
        merger.push(message("confirmations", 0, 0, 500));
        let start = Instant::now();
        // orders/0 may still deliver something older: wait.
        assert!(merger.pop_ready(start, |_, _| None).is_none());
        assert_eq!(merger.wake_at(), Some(start + Duration::from_millis(100)));
        assert!(merger
            .pop_ready(start + Duration::from_millis(99), |_, _| None)
            .is_none());
        // It delivers an older message in time: that goes first.
        merger.push(message("orders", 0, 7, 400));
        let t = start + Duration::from_millis(120);
        assert_eq!(merger.pop_ready(t, |_, _| None).unwrap().topic, "orders");
        // Now orders/0 is empty again but has delivered something older than
        // the head: wait again, from now, then give up on it.
        assert!(merger.pop_ready(t, |_, _| None).is_none());
        let late = t + Duration::from_millis(100);
        assert_eq!(
            merger.pop_ready(late, |_, _| None).unwrap().topic,
            "confirmations"
        );
    }

    #[test]
    fn a_partition_is_not_idle_while_the_client_still_holds_messages() {
        let mut merger = Merger::new(Duration::from_millis(100));
        merger.assign("orders", 0);
        merger.push(message("confirmations", 0, 0, 500));
        let start = Instant::now();
        merger.set_more_waiting(true);
        // However long it takes to read through the client's queue, orders/0
        // is waited for: its messages may be further down that queue.
        let later = start + Duration::from_secs(5);
        assert!(merger.pop_ready(later, |_, _| None).is_none());
        assert!(merger.pop_ready(later, |_, _| None).is_none());
        // The queue is read to its end: from then on the idle clock runs.
        merger.set_more_waiting(false);
        assert!(merger.pop_ready(later, |_, _| None).is_none());
        assert_eq!(merger.wake_at(), Some(later + Duration::from_millis(100)));
        let idle = later + Duration::from_millis(100);
        assert_eq!(
            merger.pop_ready(idle, |_, _| None).unwrap().topic,
            "confirmations"
        );
    }

    #[test]
    fn a_caught_up_partition_is_never_waited_for() {
        let mut merger = Merger::new(Duration::from_secs(3600));
        merger.push(message("orders", 0, 0, 100));
        let m = merger.pop_ready(Instant::now(), |_, _| Some(1)).unwrap();
        assert_eq!(m.offset, 0);
        merger.push(message("confirmations", 0, 41, 200));
        // orders/0 received offset 0 and its end is 1: caught up.
        let m = merger.pop_ready(Instant::now(), |_, _| Some(1)).unwrap();
        assert_eq!(m.topic, "confirmations");
        // ... but when its end moves on, it is behind again: wait.
        merger.push(message("confirmations", 0, 42, 300));
        assert!(merger
            .pop_ready(Instant::now(), |t, _| Some(if t == "orders" {
                2
            } else {
                43
            }))
            .is_none());
        assert!(!merger.all_caught_up(|t, _| Some(if t == "orders" { 2 } else { 43 })));
        assert!(merger.all_caught_up(|t, _| Some(if t == "orders" { 1 } else { 43 })));
    }

    #[test]
    fn a_stored_start_offset_makes_an_idle_partition_caught_up() {
        let mut merger = Merger::new(Duration::from_secs(3600));
        merger.assign("orders", 3);
        merger.start_at("orders", 3, 17);
        merger.push(message("confirmations", 3, 0, 100));
        assert!(merger.pop_ready(Instant::now(), |_, _| Some(17)).is_some());
        assert_eq!(
            merger.idle_at_end(|_, _| Some(17)),
            vec![("orders".to_owned(), 3)]
        );
    }

    #[test]
    fn an_empty_partition_never_holds_back() {
        let mut merger = Merger::new(Duration::from_secs(3600));
        merger.assign("orders", 1);
        merger.push(message("orders", 0, 5, 100));
        let ends = |_: &str, p: i32| Some(if p == 1 { 0 } else { 6 });
        assert!(merger.pop_ready(Instant::now(), ends).is_some());
        assert!(merger.all_caught_up(ends));
    }

    #[test]
    fn a_partition_that_delivered_something_newer_does_not_hold_back() {
        let mut merger = Merger::new(Duration::from_secs(3600));
        merger.push(message("orders", 0, 0, 500));
        merger.push(message("confirmations", 0, 0, 100));
        assert_eq!(
            merger.pop_ready(Instant::now(), |_, _| None).unwrap().topic,
            "confirmations"
        );
        merger.push(message("confirmations", 0, 1, 200));
        assert_eq!(
            merger.pop_ready(Instant::now(), |_, _| None).unwrap().topic,
            "confirmations"
        );
        // orders' head (500) is the earliest; confirmations, now empty, last
        // delivered 200 and could deliver something in between: wait.
        assert!(merger.pop_ready(Instant::now(), |_, _| None).is_none());
        merger.push(message("confirmations", 0, 2, 600));
        assert_eq!(
            merger.pop_ready(Instant::now(), |_, _| None).unwrap().topic,
            "orders"
        );
    }

    #[test]
    fn topics_with_different_partition_counts_are_named() {
        let counts = |v: &[(&str, Option<usize>)]| -> Vec<(String, Option<usize>)> {
            v.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect()
        };
        assert_eq!(
            copartitioning_problem(&counts(&[("a", Some(4)), ("b", Some(4)), ("c", None)])),
            None
        );
        let problem =
            copartitioning_problem(&counts(&[("orders", Some(4)), ("closes", Some(8))])).unwrap();
        assert!(problem.contains("orders (4), closes (8)"), "{problem}");
    }

    #[test]
    fn revoking_drops_a_partitions_waiting_messages() {
        let mut merger = Merger::new(Duration::ZERO);
        merger.push(message("orders", 0, 0, 100));
        merger.push(message("orders", 0, 1, 200));
        merger.push(message("orders", 1, 0, 150));
        assert_eq!(merger.revoke("orders", 0), 2);
        assert_eq!(merger.buffered(), 1);
        assert_eq!(
            merger
                .pop_ready(Instant::now(), |_, _| None)
                .unwrap()
                .partition,
            1
        );
        assert_eq!(merger.revoke("orders", 9), 0);
    }

    #[test]
    fn same_millisecond_ties_go_by_event_time_then_causal_rank() {
        let mut script = EventScript::new("ORD-1");
        let mut placed = script.place();
        let mut added = script.sl("SL-1");
        let mut cancelled = script.cancel_sl("SLC-1", None);
        let mut confirmed = script.confirm("SL-1", "EXECUTED");
        for e in [&mut placed, &mut added, &mut cancelled, &mut confirmed] {
            e.occurred_at_ms = 1_764_300_000_000;
        }
        // All four stamped in the same millisecond, with the same event
        // time, each on its own topic, arriving in the worst order.
        let mut merger = Merger::new(Duration::ZERO);
        merger.push(event_message("confirmations", 0, 0, 1000, &confirmed));
        merger.push(event_message("cancels", 0, 0, 1000, &cancelled));
        merger.push(event_message("protective", 0, 0, 1000, &added));
        merger.push(event_message("placements", 0, 0, 1000, &placed));
        let order = drain(&mut merger, Instant::now(), 1);
        assert_eq!(
            order.iter().map(|(t, _, _)| t.as_str()).collect::<Vec<_>>(),
            vec!["placements", "protective", "cancels", "confirmations"]
        );
        // Event time goes before rank.
        let mut early_cancel = cancelled.clone();
        early_cancel.occurred_at_ms -= 1;
        let mut merger = Merger::new(Duration::ZERO);
        merger.push(event_message("protective", 0, 0, 1000, &added));
        merger.push(event_message("cancels", 0, 0, 1000, &early_cancel));
        let order = drain(&mut merger, Instant::now(), 1);
        assert_eq!(order[0].0, "cancels");
    }

    #[test]
    fn ties_in_everything_else_go_by_partition_offset_then_topic() {
        let mut merger = Merger::new(Duration::ZERO);
        for m in [
            message("orders", 1, 1, 100),
            message("orders", 0, 2, 100),
            message("confirmations", 0, 2, 100),
            message("confirmations", 0, 1, 100),
        ] {
            merger.push(m);
        }
        // confirmations/0 holds 2 then 1: its own order is kept.
        assert_eq!(
            names(&drain(&mut merger, Instant::now(), 3)),
            vec![
                ("confirmations", 0, 2),
                ("confirmations", 0, 1),
                ("orders", 0, 2),
                ("orders", 1, 1),
            ]
        );
    }
}
