//! The order in which messages from several partitions are applied.
//!
//! Kafka orders messages only within a partition. A request and the
//! provider's confirmation of it usually sit on different partitions (or
//! topics), and the order in which they are applied decides the per-order
//! sequence (a late `EXECUTED` before or after a replacement, a parked
//! confirmation released at one point or another). The live consumer and
//! `replay` therefore apply messages in the same order: partitions merged by
//! Kafka timestamp, each partition's own order kept, ties broken by topic and
//! partition. Replaying a topic then gives the log the live consumer
//! produced, as long as the live consumer received each partition no later
//! than the timestamps say (within a batch it always does: it merges the
//! batch the same way).

use std::cmp::Ordering;
use std::collections::VecDeque;

use super::pipeline::InboundMessage;

/// Compares the heads of two partitions: earlier timestamp first, then
/// topic and partition. A message without a timestamp goes first, as if
/// stamped at the epoch.
pub fn merge_order(a: &InboundMessage, b: &InboundMessage) -> Ordering {
    (a.timestamp_ms.unwrap_or(0), &a.topic, a.partition).cmp(&(
        b.timestamp_ms.unwrap_or(0),
        &b.topic,
        b.partition,
    ))
}

/// Reorders a batch: its partitions merged by timestamp, each partition's
/// messages kept in their order.
pub fn merge_by_time(batch: Vec<InboundMessage>) -> Vec<InboundMessage> {
    // One lane per partition; a batch spans few partitions, so a linear
    // search beats hashing (and cloning) every message's topic.
    let total = batch.len();
    let mut lanes: Vec<VecDeque<InboundMessage>> = Vec::new();
    for m in batch {
        let lane = lanes.iter_mut().find(|lane| {
            lane.front()
                .is_some_and(|f| f.partition == m.partition && f.topic == m.topic)
        });
        match lane {
            Some(lane) => lane.push_back(m),
            None => lanes.push(VecDeque::from([m])),
        }
    }
    let mut merged = Vec::with_capacity(total);
    while let Some(i) = earliest(lanes.iter().map(VecDeque::front)) {
        merged.extend(lanes[i].pop_front());
    }
    merged
}

/// The index of the head to apply next among partitions' heads (`None`
/// for a partition with nothing waiting); `None` when all are empty.
pub fn earliest<'a>(heads: impl Iterator<Item = Option<&'a InboundMessage>>) -> Option<usize> {
    heads
        .enumerate()
        .filter_map(|(i, head)| head.map(|m| (i, m)))
        .min_by(|(_, a), (_, b)| merge_order(a, b))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn order(batch: &[InboundMessage]) -> Vec<(&str, i32, i64)> {
        batch
            .iter()
            .map(|m| (m.topic.as_str(), m.partition, m.offset))
            .collect()
    }

    #[test]
    fn partitions_are_merged_by_timestamp() {
        let batch = vec![
            message("orders", 0, 10, 100),
            message("orders", 0, 11, 300),
            message("confirmations", 1, 5, 200),
            message("confirmations", 1, 6, 400),
        ];
        assert_eq!(
            order(&merge_by_time(batch)),
            vec![
                ("orders", 0, 10),
                ("confirmations", 1, 5),
                ("orders", 0, 11),
                ("confirmations", 1, 6)
            ]
        );
    }

    #[test]
    fn a_partitions_own_order_is_kept_even_when_its_timestamps_go_back() {
        let batch = vec![
            message("orders", 0, 1, 500),
            message("orders", 0, 2, 100),
            message("orders", 1, 1, 300),
        ];
        assert_eq!(
            order(&merge_by_time(batch)),
            vec![("orders", 1, 1), ("orders", 0, 1), ("orders", 0, 2)]
        );
    }

    #[test]
    fn ties_go_by_topic_then_partition() {
        let batch = vec![
            message("orders", 1, 1, 100),
            message("orders", 0, 1, 100),
            message("confirmations", 3, 1, 100),
        ];
        assert_eq!(
            order(&merge_by_time(batch)),
            vec![("confirmations", 3, 1), ("orders", 0, 1), ("orders", 1, 1)]
        );
    }
}
