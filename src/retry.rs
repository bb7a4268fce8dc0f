//! How transient failures are retried, in one place: an exponential
//! backoff from 100 ms to 5 s, cut short by shutdown, and a limit on
//! conflicts (another writer's committed keys), which a retry resolves
//! when they come from a race and never when they do not. `run`'s batches,
//! `replay`'s, the Redis follower and `serve`'s wait for its database all
//! use it.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::shutdown::Shutdown;

/// What a retried operation's error says about retrying.
pub trait Retryable: std::fmt::Display {
    /// Worth trying again as it was (unreachable, busy, a conflict).
    fn is_transient(&self) -> bool;
    /// Another writer's committed keys: transient, up to a point.
    fn is_conflict(&self) -> bool;
}

/// Exponential backoff from 100 ms to 5 s, cut short by shutdown.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new()
    }
}

const FIRST: Duration = Duration::from_millis(100);
const LONGEST: Duration = Duration::from_secs(5);

impl Backoff {
    /// Starts at 100 ms.
    pub fn new() -> Backoff {
        Backoff { next: FIRST }
    }

    /// Back to 100 ms, after a success.
    pub fn reset(&mut self) {
        self.next = FIRST;
    }

    /// Sleeps the current delay and doubles it. The news of a shutdown
    /// cuts the sleep short once; retries after it (a batch being finished)
    /// sleep in full.
    pub async fn wait(&mut self, shutdown: &mut Shutdown) {
        if shutdown.is_requested() {
            tokio::time::sleep(self.next).await;
        } else {
            tokio::select! {
                _ = tokio::time::sleep(self.next) => {}
                _ = shutdown.requested() => {}
            }
        }
        self.next = (self.next * 2).min(LONGEST);
    }
}

/// How long to go on retrying.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Conflicts retried before the error is returned.
    pub max_conflicts: usize,
    /// How long to go on after shutdown is asked for (a batch in flight is
    /// worth finishing if the database comes back soon).
    pub after_shutdown: Duration,
    /// How long to go on failing before giving up with the error; `None`:
    /// until shutdown (a service waits for its database, a one-off command
    /// tells its operator).
    pub patience: Option<Duration>,
}

/// Conflicts a batch retries before it is treated as refused.
pub const MAX_CONFLICT_RETRIES: usize = 20;

impl RetryPolicy {
    /// Retry until success, a lasting conflict, or `after_shutdown` past
    /// shutdown.
    pub fn until_shutdown(after_shutdown: Duration) -> RetryPolicy {
        RetryPolicy {
            max_conflicts: MAX_CONFLICT_RETRIES,
            after_shutdown,
            patience: None,
        }
    }

    /// Retry for about `patience`, then return the error (one-off commands:
    /// `replay`).
    pub fn for_about(patience: Duration) -> RetryPolicy {
        RetryPolicy {
            max_conflicts: MAX_CONFLICT_RETRIES,
            after_shutdown: Duration::ZERO,
            patience: Some(patience),
        }
    }

    /// Runs `attempt` until it succeeds (`Ok(Some)`), fails for good
    /// (`Err`: not transient, a conflict past the limit, or past
    /// `patience`) or shutdown has waited `after_shutdown` (`Ok(None)`).
    ///
    /// # Errors
    /// The last error, when retrying cannot help.
    pub async fn run<T, E, F, Fut>(
        self,
        what: &str,
        shutdown: &mut Shutdown,
        mut attempt: F,
    ) -> Result<Option<T>, E>
    where
        E: Retryable,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut backoff = Backoff::new();
        let mut shutdown_since: Option<Instant> = None;
        let mut conflicts = 0;
        let started = Instant::now();
        let mut was_retrying = false;
        let retrying = |on: bool| {
            metrics::gauge!("order_lifecycle_database_retrying", "operation" => what.to_owned())
                .set(if on { 1.0 } else { 0.0 });
        };
        loop {
            let result = attempt().await;
            if std::mem::take(&mut was_retrying) {
                // It no longer is, whatever comes next (a success, an error
                // returned, or the gauge set again below).
                retrying(false);
            }
            match result {
                Ok(v) => return Ok(Some(v)),
                Err(e) if e.is_conflict() && conflicts >= self.max_conflicts => return Err(e),
                Err(e) if self.patience.is_some_and(|p| started.elapsed() >= p) => return Err(e),
                Err(e) if e.is_transient() => {
                    conflicts += usize::from(e.is_conflict());
                    // For alerts: an unavailable database (down, a revoked
                    // grant, a full disk, read-only) is the environment's
                    // fault, retried rather than dead-lettered, and must be
                    // seen by someone.
                    let cause = if e.is_conflict() {
                        "conflict"
                    } else {
                        "unavailable"
                    };
                    metrics::counter!(
                        "order_lifecycle_database_retries_total",
                        "operation" => what.to_owned(),
                        "cause" => cause
                    )
                    .increment(1);
                    retrying(true);
                    was_retrying = true;
                    tracing::warn!(error = %e, "{what}: database unavailable or busy; retrying");
                    if shutdown.is_requested() {
                        let since = *shutdown_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.after_shutdown {
                            return Ok(None);
                        }
                    }
                    backoff.wait(shutdown).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// How long a one-off command (`import-legacy`, `replay`, `redrive`,
/// `verify --repair`) retries a step that failed for a reason a retry may
/// cure (a deadlock or lock wait with a live `run`, a lost connection),
/// counted from the first retry, before it stops and tells its operator.
/// An attempt itself may wait out a lock (10 s).
pub const COMMAND_PATIENCE: Duration = Duration::from_secs(60);

/// Runs `attempt` until it succeeds, retrying transient failures for about
/// [`COMMAND_PATIENCE`]: a one-off command's step, which no shutdown cuts
/// short and whose operator is told the error after that.
///
/// # Errors
/// The last error, when retrying cannot help or the patience is spent.
pub async fn for_a_command<T, E, F, Fut>(what: &str, attempt: F) -> Result<T, E>
where
    E: Retryable,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let done = RetryPolicy::for_about(COMMAND_PATIENCE)
        .run(what, &mut Shutdown::never(), attempt)
        .await?;
    match done {
        Some(value) => Ok(value),
        // `run` stops unfinished only once a shutdown is asked for.
        None => unreachable!("{what}: stopped for a shutdown that is never asked for"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Unavailable;

    impl std::fmt::Display for Unavailable {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("database unavailable")
        }
    }

    impl Retryable for Unavailable {
        fn is_transient(&self) -> bool {
            true
        }
        fn is_conflict(&self) -> bool {
            false
        }
    }

    /// Every retry of an unavailable database is counted by operation and
    /// cause, and the operation shows as retrying until it succeeds.
    #[test]
    fn retries_are_counted_and_shown_while_they_last() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut seen_while_failing = String::new();
        let result = metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let mut failures = 2;
                RetryPolicy::until_shutdown(Duration::from_secs(1))
                    .run("probe", &mut Shutdown::never(), || {
                        if failures == 0 {
                            seen_while_failing = handle.render();
                        }
                        let outcome = if failures > 0 {
                            Err(Unavailable)
                        } else {
                            Ok(7)
                        };
                        failures -= 1;
                        std::future::ready(outcome)
                    })
                    .await
            })
        });
        assert_eq!(result.unwrap(), Some(7));
        let sample = |text: &str, series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        };
        let retries =
            r#"order_lifecycle_database_retries_total{operation="probe",cause="unavailable"}"#;
        let retrying = r#"order_lifecycle_database_retrying{operation="probe"}"#;
        assert_eq!(
            sample(&seen_while_failing, retrying),
            Some(1.0),
            "{seen_while_failing}"
        );
        let after = handle.render();
        assert_eq!(sample(&after, retries), Some(2.0), "{after}");
        assert_eq!(sample(&after, retrying), Some(0.0), "{after}");
    }
}
