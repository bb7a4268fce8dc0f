//! Waiting between retries of transient failures.

use std::time::Duration;

use tokio::sync::watch;

/// Exponential backoff from 100 ms to 5 s, cut short by `stop`.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new()
    }
}

impl Backoff {
    /// Starts at 100 ms.
    pub fn new() -> Backoff {
        Backoff {
            next: Duration::from_millis(100),
        }
    }

    /// Back to 100 ms, after a success.
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    /// Sleeps the current delay (or until `stop` changes) and doubles it.
    pub async fn wait(&mut self, stop: &mut watch::Receiver<bool>) {
        tokio::select! {
            _ = tokio::time::sleep(self.next) => {}
            changed = stop.changed() => {
                if changed.is_err() {
                    // No sender any more: nothing can cut the wait short.
                    tokio::time::sleep(self.next).await;
                }
            }
        }
        self.next = (self.next * 2).min(Duration::from_secs(5));
    }
}
