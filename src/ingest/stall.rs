//! Partitions whose fetching makes no progress. A partition the broker
//! has messages for (its end offset, from the last fetch response, is past
//! what was received) that delivers nothing for [`STALL_AFTER`] is stalled:
//! a batch the client cannot decode (a codec it lacks, a corrupt record),
//! a fetch the broker keeps refusing. librdkafka reports such failures
//! without naming the partition, so the consumer loop watches positions
//! instead: each stalled partition is logged at ERROR, set in the
//! `order_lifecycle_partition_stalled{topic,partition}` gauge and named by
//! `/readyz` until it moves again. A partition paused by flow control (its
//! messages wait in the merge) is not judged.
//!
//! Pure: the loop feeds it positions and the time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a partition with messages on the broker may deliver nothing
/// before it is reported. Long against a slow fetch or a rebalance (a few
/// seconds), short against an operator's attention.
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// Longest pause between two looks that still counts as watching: the
/// loop looks about every second, but not while a batch waits for the
/// database; time it spent away is no partition's fault.
const LOOK_GAP: Duration = Duration::from_secs(5);

/// One partition as the watch last saw it.
#[derive(Debug)]
struct Watched {
    position: Option<i64>,
    /// Since when it has been behind without progress (while watched).
    since: Instant,
    /// The last look.
    seen: Instant,
    stalled: bool,
}

/// A partition starting or ending a stall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StallChange {
    Stalled {
        topic: String,
        partition: i32,
        /// The next offset expected.
        position: Option<i64>,
        /// The end offset the broker reports.
        end: i64,
    },
    Recovered {
        topic: String,
        partition: i32,
    },
}

/// Progress of every assigned partition (see the module docs).
#[derive(Debug)]
pub struct StallWatch {
    after: Duration,
    partitions: HashMap<(String, i32), Watched>,
}

impl StallWatch {
    /// A watch reporting partitions without progress for `after`.
    pub fn new(after: Duration) -> StallWatch {
        StallWatch {
            after,
            partitions: HashMap::new(),
        }
    }

    /// Looks at one partition: `position` is the next offset expected from
    /// it, `end` the broker's end offset as last reported, `paused` whether
    /// flow control paused its fetching.
    pub fn observe(
        &mut self,
        now: Instant,
        topic: &str,
        partition: i32,
        position: Option<i64>,
        end: Option<i64>,
        paused: bool,
    ) -> Option<StallChange> {
        let watched = self
            .partitions
            .entry((topic.to_owned(), partition))
            .or_insert(Watched {
                position,
                since: now,
                seen: now,
                stalled: false,
            });
        if now.duration_since(watched.seen) > LOOK_GAP {
            // Not watched meanwhile: start the count again.
            watched.since += now.duration_since(watched.seen);
        }
        watched.seen = now;
        let behind = match (position, end) {
            (Some(p), Some(e)) => e > p,
            _ => false,
        };
        if !behind || paused || watched.position != position {
            watched.position = position;
            watched.since = now;
            if watched.stalled {
                watched.stalled = false;
                return Some(StallChange::Recovered {
                    topic: topic.to_owned(),
                    partition,
                });
            }
            return None;
        }
        if !watched.stalled && now.duration_since(watched.since) >= self.after {
            watched.stalled = true;
            return Some(StallChange::Stalled {
                topic: topic.to_owned(),
                partition,
                position,
                end: end.unwrap_or_default(),
            });
        }
        None
    }

    /// Forgets the partitions `keep` rejects (revoked ones); returns those
    /// of them that were stalled.
    pub fn retain(&mut self, keep: impl Fn(&str, i32) -> bool) -> Vec<(String, i32)> {
        let mut dropped = Vec::new();
        self.partitions.retain(|(topic, partition), watched| {
            let kept = keep(topic, *partition);
            if !kept && watched.stalled {
                dropped.push((topic.clone(), *partition));
            }
            kept
        });
        dropped
    }

    /// The stalled partitions, as `topic/partition`, sorted.
    pub fn stalled(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .partitions
            .iter()
            .filter(|(_, w)| w.stalled)
            .map(|((t, p), _)| format!("{t}/{p}"))
            .collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(30);

    fn stalled(topic: &str, partition: i32, position: i64, end: i64) -> Option<StallChange> {
        Some(StallChange::Stalled {
            topic: topic.into(),
            partition,
            position: Some(position),
            end,
        })
    }

    #[test]
    fn a_partition_behind_without_progress_is_stalled_once_and_recovers() {
        let mut watch = StallWatch::new(AFTER);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        for s in 0..30 {
            assert_eq!(watch.observe(at(s), "t", 0, Some(5), Some(9), false), None);
        }
        assert_eq!(
            watch.observe(at(30), "t", 0, Some(5), Some(12), false),
            stalled("t", 0, 5, 12)
        );
        // Reported once, named until it moves.
        for s in 31..61 {
            assert_eq!(watch.observe(at(s), "t", 0, Some(5), Some(12), false), None);
        }
        assert_eq!(watch.stalled(), vec!["t/0".to_owned()]);
        assert_eq!(
            watch.observe(at(61), "t", 0, Some(6), Some(12), false),
            Some(StallChange::Recovered {
                topic: "t".into(),
                partition: 0
            })
        );
        assert!(watch.stalled().is_empty());
    }

    #[test]
    fn progress_caught_up_paused_or_unknown_partitions_are_never_stalled() {
        let mut watch = StallWatch::new(AFTER);
        let t0 = Instant::now();
        for s in 0..120u64 {
            let now = t0 + Duration::from_secs(s);
            let s = s as i64;
            // Moving every second, far behind.
            assert_eq!(
                watch.observe(now, "t", 0, Some(s), Some(1_000), false),
                None
            );
            // Caught up and quiet.
            assert_eq!(watch.observe(now, "t", 1, Some(7), Some(7), false), None);
            // Paused by flow control while its messages wait in the merge.
            assert_eq!(watch.observe(now, "t", 2, Some(7), Some(900), true), None);
            // No start offset or end offset known yet.
            assert_eq!(watch.observe(now, "t", 3, None, Some(900), false), None);
            assert_eq!(watch.observe(now, "t", 4, Some(3), None, false), None);
        }
        assert!(watch.stalled().is_empty());
    }

    #[test]
    fn time_the_loop_spent_away_is_not_counted() {
        let mut watch = StallWatch::new(AFTER);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(watch.observe(at(0), "t", 0, Some(5), Some(9), false), None);
        // A batch waited 10 minutes for the database.
        for s in 600..630 {
            assert_eq!(watch.observe(at(s), "t", 0, Some(5), Some(9), false), None);
        }
        assert_eq!(
            watch.observe(at(630), "t", 0, Some(5), Some(9), false),
            stalled("t", 0, 5, 9)
        );
    }

    #[test]
    fn a_revoked_partition_is_forgotten() {
        let mut watch = StallWatch::new(AFTER);
        let t0 = Instant::now();
        let mut change = None;
        for s in 0..=30 {
            let now = t0 + Duration::from_secs(s);
            change = watch.observe(now, "t", 0, Some(1), Some(2), false);
            watch.observe(now, "t", 1, Some(1), Some(1), false);
        }
        assert!(change.is_some());
        assert_eq!(watch.retain(|_, p| p == 1), vec![("t".to_owned(), 0)]);
        assert!(watch.stalled().is_empty());
    }
}
