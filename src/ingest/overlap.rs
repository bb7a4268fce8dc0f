//! Two batches in flight: the consumer starts the next batch while the
//! batch ahead of it writes and commits, so that the database works on
//! both (it has more than one core) and the service decodes and decides
//! while the database writes. `import-legacy` applies its pages the same
//! way. Measured on the 2-core machine: see the README's "Performance".
//!
//! What keeps it exactly as correct as one batch at a time:
//!
//! - the batch behind starts once the batch ahead has decided; it takes the
//!   orders the batch ahead holds from what that batch [`Decided`] (their
//!   state once it commits), not from the database, and reads and locks
//!   only the others. It therefore never reads what the batch ahead is
//!   about to write, and never holds a lock the batch ahead needs (it may
//!   wait for one: a parked row the batch ahead releases, until that batch
//!   commits);
//! - it gives way (rolls back at once and runs again after the batch ahead)
//!   when it issues an id the batch ahead parks an event for (that row is
//!   not committed yet, so it could not release it), or shares an event id
//!   with it (rule R9 could not see it);
//! - it writes nothing until the batch ahead is done, so the log's order
//!   (rule R11), its positions (R12), the stored offsets, the parking lot's
//!   count and the hand-off to the Redis follower keep batch order;
//! - if an attempt of the batch ahead fails, the batch behind gives way too:
//!   what it took from it may not be committed;
//! - if the batch ahead is not done within [`GIVE_WAY_AFTER`], the batch
//!   behind gives way too, releasing the locks it read with: the batch
//!   ahead may be waiting for one of them through another instance (see
//!   [`GIVE_WAY_AFTER`]);
//! - another instance writing one of the orders meanwhile (a confirmation
//!   read by another member during a rebalance) is caught as between any
//!   two writers: the log's unique `(order_id, seq)` refuses the second
//!   append, and that batch is retried.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::{EventId, LifecycleBook, LifecycleId, OrderEvent};

/// How long a batch behind waits for the batch ahead before it gives way
/// (rolls back, releasing its locks, and runs again after it).
///
/// A batch behind holds the row locks it read with while it waits for the
/// batch ahead in this process, where the database cannot see the wait.
/// With several instances that closes cycles no deadlock detector breaks:
/// the batch ahead on instance A waits for a row that the batch behind on
/// B read and locked, B's batch behind waits for B's batch ahead, which
/// waits for a row A's batch behind locked, and A's batch behind waits for
/// A's batch ahead. Only the lock wait timeout (10 s) ended them: measured
/// with four instances draining 200,000 events, three runs of nine stood
/// still for 10 or 20 s that way. A batch ahead is done within tens of
/// milliseconds when nothing blocks it (a leader's batch with dead letters
/// is done only once they are published: a slow broker makes the batch
/// behind give way then), so waiting longer than this means it probably
/// waits for a lock; giving way then costs one batch's reads.
///
/// `import-legacy`'s pages wait for the page ahead without this bound: a
/// cycle through one of them and a batch of `run` ends at the lock wait
/// timeout, and the page that failed is applied again (as is one InnoDB
/// picks as a deadlock's victim).
pub const GIVE_WAY_AFTER: Duration = Duration::from_millis(500);

/// What a batch decided, as the batch behind it needs it.
#[derive(Debug, Default)]
pub struct Decided {
    /// Its orders as they will be once it commits.
    pub book: Arc<LifecycleBook>,
    /// Ids its parked events wait for.
    pub awaited: HashSet<LifecycleId>,
    /// The event ids it took in: logged, parked, or dead-lettered with
    /// their event (rule R9 counts all three).
    pub event_ids: HashSet<EventId>,
}

impl Decided {
    /// Whether a batch with these events must wait for this one: one issues
    /// an id this one parks an event for, or shares an event id.
    pub fn blocks<'e>(&self, mut events: impl Iterator<Item = &'e OrderEvent>) -> bool {
        events.any(|e| {
            self.event_ids.contains(&e.event_id)
                || e.issued_ids()
                    .iter()
                    .any(|(id, _)| self.awaited.contains(id))
        })
    }
}

/// Where a batch is, as the batch behind it sees it.
#[derive(Debug, Default)]
struct State {
    /// Set once the batch has decided.
    decided: Option<Arc<Decided>>,
    /// An attempt failed (it is retried, or the run stops): sticky.
    failed: bool,
    /// Committed and handed on.
    done: bool,
}

/// Kept by a batch, to tell the batch behind it how it goes.
#[derive(Debug)]
pub struct BatchProgress(watch::Sender<State>);

/// Kept by the batch behind, to watch the batch ahead.
#[derive(Debug, Clone)]
pub struct BatchAhead(watch::Receiver<State>);

/// A new batch's progress and the watch on it for the batch behind.
pub fn progress() -> (BatchProgress, BatchAhead) {
    let (tx, rx) = watch::channel(State::default());
    (BatchProgress(tx), BatchAhead(rx))
}

impl BatchProgress {
    /// The batch has decided. Ignored after a failed attempt: the batch
    /// behind then waits for the end.
    pub fn has_decided(&self, decided: Decided) {
        self.0.send_if_modified(|s| {
            let first = !s.failed && s.decided.is_none();
            if first {
                s.decided = Some(Arc::new(decided));
            }
            first
        });
    }

    /// An attempt failed.
    pub fn failed(&self) {
        self.0
            .send_if_modified(|s| !std::mem::replace(&mut s.failed, true));
    }

    /// The batch is committed and handed on.
    pub fn done(&self) {
        self.0
            .send_if_modified(|s| !std::mem::replace(&mut s.done, true));
    }
}

/// Where the batch ahead stands, for a batch about to read behind it.
#[derive(Debug)]
pub enum Standing {
    /// Decided on its first attempt, not done yet: read behind it.
    Decided(Arc<Decided>),
    /// An attempt failed and it is not done: give way.
    Failed,
    /// Done (committed, handed on): nothing of it is pending, run alone.
    Done,
}

impl BatchAhead {
    /// What the batch ahead decided, on its first attempt: a batch may
    /// then start behind it.
    pub fn decision(&self) -> Option<Arc<Decided>> {
        match self.standing() {
            Standing::Decided(decided) => Some(decided),
            Standing::Failed | Standing::Done => None,
        }
    }

    /// Where the batch ahead stands now. A batch started behind it may
    /// find it done already (it had begun its transaction meanwhile).
    pub fn standing(&self) -> Standing {
        let s = self.0.borrow();
        match (&s.decided, s.failed, s.done) {
            (_, _, true) => Standing::Done,
            (Some(decided), false, false) => Standing::Decided(decided.clone()),
            // Failed, or not decided yet (no batch starts behind it then):
            // giving way is the safe answer.
            (_, _, false) => Standing::Failed,
        }
    }

    /// Waits until a batch may start behind this one ([`Self::decision`]);
    /// pending forever once it cannot (failed or done), until it is dropped.
    pub async fn startable(&mut self) {
        let _ = self
            .0
            .wait_for(|s| s.decided.is_some() && !s.failed && !s.done)
            .await;
    }

    /// Waits until the batch ahead is done, or failed an attempt, or was
    /// dropped, or [`GIVE_WAY_AFTER`] passed; `true` only if it is done
    /// without a failed attempt within that time, i.e. the batch behind
    /// may write.
    pub async fn cleared(&mut self) -> bool {
        let over = self.0.wait_for(|s| s.failed || s.done);
        match tokio::time::timeout(GIVE_WAY_AFTER, over).await {
            Ok(Ok(s)) => !s.failed,
            Ok(Err(_)) | Err(_) => false,
        }
    }

    /// Waits until the batch ahead is over; `true` if it is done, `false`
    /// if it was dropped unfinished (abandoned at shutdown, or failed for
    /// good: its messages are not committed).
    pub async fn finished(&mut self) -> bool {
        self.0.wait_for(|s| s.done).await.is_ok()
    }
}

/// How a new batch may start.
#[derive(Debug)]
pub enum Slot {
    /// No batch is in flight.
    Alone,
    /// Behind the batch in flight, which has decided on its first attempt.
    Behind(BatchAhead),
}

/// The batches being processed: at most two, the second behind the first.
/// `T` is what processing a batch ends with.
pub struct Flights<'f, T> {
    queue: VecDeque<Flight<'f, T>>,
}

struct Flight<'f, T> {
    /// Until it ends.
    run: Option<Pin<Box<dyn Future<Output = T> + Send + 'f>>>,
    /// Once it ended, until taken in batch order.
    ended: Option<T>,
    watch: BatchAhead,
}

impl<T> Default for Flights<'_, T> {
    fn default() -> Self {
        Flights {
            queue: VecDeque::new(),
        }
    }
}

impl<'f, T> Flights<'f, T> {
    /// Whether no batch is being processed.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether a new batch may start now, and how; `None`: not yet.
    pub fn slot(&self) -> Option<Slot> {
        match self.queue.len() {
            0 => Some(Slot::Alone),
            1 => self.queue[0]
                .watch
                .decision()
                .map(|_| Slot::Behind(self.queue[0].watch.clone())),
            _ => None,
        }
    }

    /// Starts processing a batch; `watch` follows its [`BatchProgress`].
    pub fn start(&mut self, run: impl Future<Output = T> + Send + 'f, watch: BatchAhead) {
        self.queue.push_back(Flight {
            run: Some(Box::pin(run)),
            ended: None,
            watch,
        });
    }

    /// Drives the batches; returns the first batch's end once it ends
    /// (batches end in the order they started), or `None` when `waiting`
    /// (a batch is ready to start) and [`Flights::slot`] opens. Pending
    /// forever when empty.
    pub async fn next(&mut self, waiting: bool) -> Option<T> {
        let mut decided = (waiting && self.queue.len() == 1).then(|| self.queue[0].watch.clone());
        let queue = &mut self.queue;
        let landing = std::future::poll_fn(|cx| {
            for flight in queue.iter_mut() {
                if let Some(run) = &mut flight.run {
                    if let Poll::Ready(end) = run.as_mut().poll(cx) {
                        flight.run = None;
                        flight.ended = Some(end);
                    }
                }
            }
            match queue.front_mut().and_then(|f| f.ended.take()) {
                Some(end) => {
                    queue.pop_front();
                    Poll::Ready(end)
                }
                None => Poll::Pending,
            }
        });
        tokio::select! {
            biased;
            end = landing => Some(end),
            () = async {
                match &mut decided {
                    Some(watch) => watch.startable().await,
                    None => std::future::pending().await,
                }
            } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::EventScript;

    #[test]
    fn a_batch_waits_for_the_one_whose_parked_events_it_releases_or_whose_event_id_it_shares() {
        let mut order = EventScript::new("o-1");
        let placed = order.place();
        let decided = Decided {
            awaited: HashSet::from([LifecycleId::parse("sl-1").unwrap()]),
            event_ids: HashSet::from([placed.event_id.clone()]),
            ..Decided::default()
        };
        let mut other = EventScript::new("o-2");
        let other_placed = other.place();
        assert!(!decided.blocks([&other_placed].into_iter()));
        assert!(decided.blocks([&placed].into_iter()), "same event id");
        assert!(
            decided.blocks([&other.sl("sl-1")].into_iter()),
            "issues an id the batch ahead parks for"
        );
        assert!(!decided.blocks([&other.confirm("sl-1", "accepted")].into_iter()));
    }

    #[tokio::test]
    async fn the_batch_behind_writes_only_after_the_batch_ahead_is_done() {
        let (progress, mut ahead) = progress();
        assert!(ahead.decision().is_none());
        progress.has_decided(Decided::default());
        assert!(ahead.decision().is_some());
        let waiting = tokio::spawn({
            let mut ahead = ahead.clone();
            async move { ahead.cleared().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        progress.done();
        assert!(waiting.await.unwrap());
        assert!(ahead.cleared().await);
        assert!(
            matches!(ahead.standing(), Standing::Done),
            "a batch finding it done runs alone"
        );
    }

    #[tokio::test]
    async fn a_failed_attempt_ahead_makes_the_batch_behind_give_way_for_good() {
        let (progress, mut ahead) = progress();
        progress.has_decided(Decided::default());
        progress.failed();
        assert!(ahead.decision().is_none(), "nothing starts behind a retry");
        assert!(matches!(ahead.standing(), Standing::Failed));
        progress.has_decided(Decided::default());
        progress.done();
        assert!(!ahead.cleared().await, "sticky, even once done");
        assert!(ahead.finished().await);
    }

    #[tokio::test]
    async fn a_dropped_batch_ahead_clears_nothing() {
        let (progress, mut ahead) = progress();
        drop(progress);
        assert!(!ahead.cleared().await);
        assert!(!ahead.finished().await, "dropped unfinished");
    }
}
