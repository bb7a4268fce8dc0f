//! Leadership: of the `run` instances sharing a database, one at a time
//! holds the `leader` lease (a named lock, see [`super::lease`]) and does
//! the work that must happen once, not once per instance: the Redis
//! projection (one reader of the log, one writer of Redis) and the
//! housekeeping (releasing stranded parked events, expiring parked events,
//! publishing the dead-letter outbox). Every instance consumes its
//! partitions either way.
//!
//! # The bound on a handover
//!
//! Every instance that does not lead tries to take the lease every
//! [`CAMPAIGN_INTERVAL`]; the leader checks every interval that it still
//! holds it. The lease ends with the leader's database session:
//!
//! - the leader stops, crashes or is SIGKILLed: its kernel closes the
//!   socket, the server ends the session at once, and another instance
//!   leads within one interval (1 s);
//! - the leader's host dies or its network is cut (no socket closed): the
//!   session has an idle limit of [`IDLE_LIMIT`] (`wait_timeout`), which the
//!   leader's checks keep from passing while it lives, so the server ends it
//!   within that limit and another instance leads within limit + interval
//!   (11 s).
//!
//! Two instances may both believe they lead for up to one interval (the old
//! leader has not yet noticed its session ended). Nothing they do then is
//! unsafe: Redis writes are conditional on the projection record (WATCH),
//! parked events are taken with row locks, and the outbox is published
//! under row locks; the overlap costs at most repeated reads.

use std::time::Duration;

use sqlx::MySqlConnection;
use tokio::sync::watch;

use super::lease::Lease;
use super::{Store, StoreError};
use crate::shutdown::Shutdown;

/// Name of the lease.
pub const LEADER_LEASE: &str = "leader";

/// How often a follower tries to lead, and the leader checks it still does.
pub const CAMPAIGN_INTERVAL: Duration = Duration::from_secs(1);

/// Idle limit of the lease's session: how long the server keeps the lease
/// of a leader it no longer hears from (see the module docs).
pub const IDLE_LIMIT: Duration = Duration::from_secs(10);

/// Longest a check or an attempt may take. A leader whose check does not
/// answer (a network cut leaves the query waiting for TCP to give up,
/// minutes) stops leading well before the server gives its lease away.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// Whether this instance leads, as the campaign last found; cheap to clone.
#[derive(Debug, Clone)]
pub struct Leadership(watch::Receiver<bool>);

impl Leadership {
    /// Campaigns for the lease on `store` until `stop`, giving it back then.
    /// Returns the view of the outcome and the campaign's task.
    pub fn campaign(store: Store, stop: Shutdown) -> (Leadership, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(campaign(store, tx, stop));
        (Leadership(rx), task)
    }

    /// Leadership of a process that is alone by design (`import-legacy`'s
    /// own follower): always leading.
    pub fn sole() -> Leadership {
        let (tx, rx) = watch::channel(true);
        // The value stays readable once the sender is gone; `changed` then
        // never completes (see [`Leadership::changed`]).
        drop(tx);
        Leadership(rx)
    }

    /// Whether this instance leads now.
    pub fn is_leader(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes when leadership is won or lost (never, once the campaign
    /// has ended).
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The campaign loop (see the module docs).
async fn campaign(store: Store, leading: watch::Sender<bool>, mut stop: Shutdown) {
    let mut candidate: Option<MySqlConnection> = None;
    let mut held: Option<Lease> = None;
    while !stop.is_requested() {
        match held.as_mut() {
            Some(lease) => {
                let held_still = tokio::time::timeout(ANSWER_WITHIN, lease.is_held()).await;
                if !matches!(held_still, Ok(true)) {
                    held = None;
                    leading.send_replace(false);
                    metrics::gauge!("order_lifecycle_leader").set(0.0);
                    tracing::warn!(
                        "this instance lost the leader lease (its database session ended); \
                         another instance takes the Redis projection and housekeeping"
                    );
                }
            }
            None => match tokio::time::timeout(ANSWER_WITHIN, try_lead(&store, candidate.take()))
                .await
                .unwrap_or_else(|_| Err(unanswered()))
            {
                Ok(Ok(lease)) => {
                    held = Some(lease);
                    leading.send_replace(true);
                    metrics::gauge!("order_lifecycle_leader").set(1.0);
                    tracing::info!(
                        "this instance leads: it writes the Redis projection and does the \
                         housekeeping"
                    );
                }
                Ok(Err(session)) => candidate = Some(session),
                Err(e) => {
                    tracing::debug!(error = %e, "could not campaign for the leader lease; retrying")
                }
            },
        }
        tokio::select! {
            _ = tokio::time::sleep(CAMPAIGN_INTERVAL) => {}
            _ = stop.requested() => {}
        }
    }
    leading.send_replace(false);
    if let Some(lease) = held {
        if let Err(e) = lease.release().await {
            tracing::warn!(error = %e, "could not give the leader lease back; it ends with its session");
        }
    }
}

/// An attempt the database did not answer within [`ANSWER_WITHIN`].
fn unanswered() -> StoreError {
    StoreError::Transient(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the database did not answer the attempt to take the leader lease",
    )))
}

/// One attempt: the lease, or the session back for the next attempt.
async fn try_lead(
    store: &Store,
    candidate: Option<MySqlConnection>,
) -> Result<Result<Lease, MySqlConnection>, StoreError> {
    let session = match candidate {
        Some(session) => session,
        None => {
            let mut session = store.pool().acquire().await?.detach();
            sqlx::query("SET SESSION wait_timeout = ?")
                .bind(IDLE_LIMIT.as_secs())
                .execute(&mut session)
                .await?;
            session
        }
    };
    Lease::try_acquire_on(session, LEADER_LEASE).await
}
