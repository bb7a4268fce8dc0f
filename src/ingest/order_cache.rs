//! Orders as this instance last committed them, kept between batches, so
//! that a batch reads from `order_lifecycle_ids` only the orders it has not
//! seen lately.
//!
//! Reading an order's rows (locked) was the largest read of a batch: about
//! a sixth of what a batch cost MariaDB, and the parsing of those rows the
//! largest part of the service's own work in a batch. An order's events
//! come close together in time (placed, confirmed, protected, closed), so
//! the orders of the next batch are mostly orders of the last few batches.
//!
//! A cached order is used only when it is still what the log says: the
//! batch reads every order's last sequence number anyway (it numbers the
//! order's next entries from it), and an order whose last entry in the log
//! is the last entry the cached state has seen is in that state. The rows
//! are a function of the log (rule R8), so an order another instance wrote
//! since, a table rebuilt under the service, or a log recreated from
//! scratch, shows another sequence number and is read again. What the
//! cache cannot see, a write between that read and this batch's commit, is
//! caught as between any two writers: the log's unique `(order_id, seq)`
//! refuses the second append and that batch runs again. The orders the
//! cache answers for are not read `FOR UPDATE`; their rows are locked by
//! the batch's own writes instead, and the unique key decides a race.
//!
//! A database restored from a backup under a running service holds an
//! earlier log: the next append then takes a position at or below one this
//! instance already committed, and the cache forgets everything.
//!
//! Bounded: two generations; when the newer one holds half the capacity it
//! becomes the older and the older is dropped (and the older is dropped
//! too when both together hold all of it).
//! An order a batch uses comes back into the newer one when that batch
//! commits, so the orders in use stay (an approximate least recently used
//! set, with no list to maintain).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::domain::{OrderId, OrderLifecycle};
use crate::store::event_log::Positions;

/// Orders kept between batches; shared by the batches in flight.
#[derive(Debug)]
pub struct OrderCache {
    /// Most orders kept (orders, not bytes: about a kilobyte each for
    /// realistic lifecycles, measured as `run`'s resident memory); 0 keeps
    /// none.
    capacity: usize,
    /// A `std` mutex, not tokio's: it is held for map operations only,
    /// never across an `.await`. Poisoned (a panic while held), the cache
    /// answers nothing and keeps nothing: every order is read.
    inner: Mutex<Generations>,
}

#[derive(Debug, Default)]
struct Generations {
    newer: HashMap<OrderId, OrderLifecycle>,
    older: HashMap<OrderId, OrderLifecycle>,
    /// The highest log position this instance committed.
    high_water: i64,
}

/// What a look-up found, for the hit-rate metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Kept, and still what the log says.
    Hit,
    /// Kept, but the log has moved on since (another writer).
    Stale,
    /// Not kept.
    Miss,
}

impl Lookup {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Stale => "stale",
            Lookup::Miss => "miss",
        }
    }
}

impl OrderCache {
    /// A cache of at most `capacity` orders (0: none).
    pub fn new(capacity: usize) -> OrderCache {
        OrderCache {
            capacity,
            inner: Mutex::new(Generations::default()),
        }
    }

    /// Takes the kept state of `order` out, if its last log entry is
    /// `last_seq`. Taken, not copied: the batch that takes it keeps it
    /// again once committed, and a batch that fails leaves only a miss
    /// behind (the two batches in flight never take the same order: the
    /// batch behind takes the orders of the batch ahead from that batch).
    pub fn take(&self, order: &OrderId, last_seq: u64) -> (Lookup, Option<OrderLifecycle>) {
        let Ok(mut g) = self.inner.lock() else {
            return (Lookup::Miss, None);
        };
        let kept = match g.newer.remove(order) {
            Some(kept) => Some(kept),
            None => g.older.remove(order),
        };
        match kept {
            Some(kept) if kept.last_seq() == last_seq => (Lookup::Hit, Some(kept)),
            Some(_) => (Lookup::Stale, None),
            None => (Lookup::Miss, None),
        }
    }

    /// Keeps `orders` as a batch that took log `positions` committed them.
    /// An append at or below a position committed before means the
    /// database went back (a restore): everything kept is forgotten.
    pub fn remember<'o>(
        &self,
        orders: impl Iterator<Item = &'o OrderLifecycle>,
        positions: Option<Positions>,
    ) {
        if self.capacity == 0 {
            return;
        }
        // Copied before the lock is taken: the batch behind may be taking.
        let orders: Vec<OrderLifecycle> = orders.cloned().collect();
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        if let Some(p) = positions {
            if p.first <= g.high_water {
                tracing::warn!(
                    position = p.first,
                    committed_before = g.high_water,
                    "the log took a position this instance had committed already: \
                     the database went back (restored?); forgetting the cached orders"
                );
                g.newer.clear();
                g.older.clear();
                g.high_water = p.last;
                return;
            }
            g.high_water = p.last;
        }
        let half = self.capacity.div_ceil(2);
        for order in orders {
            g.older.remove(order.order_id());
            if g.newer.len() >= half {
                g.older = std::mem::take(&mut g.newer);
            }
            if g.newer.len() + g.older.len() >= self.capacity {
                g.older.clear();
            }
            g.newer.insert(order.order_id().clone(), order);
        }
    }

    /// Orders kept now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .map(|g| g.newer.len() + g.older.len())
            .unwrap_or(0)
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, last_seq: u64) -> OrderLifecycle {
        OrderLifecycle::restore(OrderId::parse(id).unwrap(), Vec::new(), last_seq)
    }

    fn at(first: i64, last: i64) -> Option<Positions> {
        Some(Positions { first, last })
    }

    #[test]
    fn a_kept_order_is_used_only_at_the_sequence_number_it_was_kept_at() {
        let cache = OrderCache::new(10);
        cache.remember([order("A1", 3)].iter(), at(1, 3));
        let a1 = OrderId::parse("A1").unwrap();
        assert_eq!(cache.take(&a1, 4), (Lookup::Stale, None));
        // Stale is dropped: the batch reads it and keeps what it commits.
        assert_eq!(cache.take(&a1, 3), (Lookup::Miss, None));
        cache.remember([order("A1", 3)].iter(), at(4, 4));
        assert_eq!(cache.take(&a1, 3).0, Lookup::Hit);
        // Taken: a second batch does not find it.
        assert_eq!(cache.take(&a1, 3).0, Lookup::Miss);
        assert_eq!(
            cache.take(&OrderId::parse("B1").unwrap(), 1).0,
            Lookup::Miss
        );
    }

    #[test]
    fn it_keeps_at_most_its_capacity_and_the_orders_used_last() {
        let cache = OrderCache::new(4);
        let ids: Vec<String> = (0..10).map(|i| format!("O{i}")).collect();
        let a = OrderId::parse("O0").unwrap();
        let mut a_kept = order("O0", 1);
        for (i, id) in ids.iter().enumerate() {
            let p = i as i64 * 2 + 1;
            cache.remember([order(id, 1)].iter(), at(p, p));
            assert!(cache.len() <= 4, "{} kept", cache.len());
            // O0 is used by every batch: it stays.
            cache.remember([a_kept].iter(), at(p + 1, p + 1));
            let (lookup, taken) = cache.take(&a, 1);
            assert_eq!(lookup, Lookup::Hit, "after {id}");
            a_kept = taken.unwrap();
        }
        assert_eq!(
            cache.take(&OrderId::parse("O1").unwrap(), 1).0,
            Lookup::Miss
        );
        assert_eq!(cache.take(&OrderId::parse("O9").unwrap(), 1).0, Lookup::Hit);
    }

    #[test]
    fn a_database_that_went_back_empties_the_cache() {
        let cache = OrderCache::new(10);
        cache.remember([order("A1", 2)].iter(), at(10, 20));
        cache.remember([order("B1", 1)].iter(), at(15, 15));
        assert!(cache.is_empty());
        cache.remember([order("C1", 1)].iter(), at(16, 16));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_cache_of_one_keeps_one() {
        let cache = OrderCache::new(1);
        for (i, id) in ["A1", "B1", "C1"].iter().enumerate() {
            let p = i as i64 + 1;
            cache.remember([order(id, 1)].iter(), at(p, p));
            assert_eq!(cache.len(), 1, "after {id}");
        }
        assert_eq!(cache.take(&OrderId::parse("C1").unwrap(), 1).0, Lookup::Hit);
    }

    #[test]
    fn a_cache_of_no_capacity_keeps_nothing() {
        let cache = OrderCache::new(0);
        cache.remember([order("A1", 2)].iter(), at(1, 2));
        assert!(cache.is_empty());
    }
}
