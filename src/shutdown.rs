//! The stop signal. `main` makes one [`Shutdown`] (completed by SIGTERM or
//! SIGINT) and passes a clone to every task it starts; each task finishes
//! its work in flight when the signal comes and returns, and `main` waits
//! for all of them before the process exits. Tests make their own with
//! [`Shutdown::new`] and stop what they started with the trigger.

use tokio::sync::watch;

/// Sends the stop signal; dropping it sends it too (the owner is gone).
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

impl ShutdownTrigger {
    /// Asks every holder of the matching [`Shutdown`] to stop.
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

/// Watches for the stop signal; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown(Option<watch::Receiver<bool>>);

impl Shutdown {
    /// A signal and its trigger.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(Some(rx)))
    }

    /// A signal that never comes (a server run until the process ends).
    pub fn never() -> Shutdown {
        Shutdown(None)
    }

    /// A signal completed when `signal` completes (SIGTERM, SIGINT).
    pub fn on(signal: impl std::future::Future<Output = ()> + Send + 'static) -> Shutdown {
        let (trigger, shutdown) = Shutdown::new();
        tokio::spawn(async move {
            signal.await;
            trigger.trigger();
            // The trigger lives until the signal: dropping it would stop.
        });
        shutdown
    }

    /// Whether the stop was asked for.
    pub fn is_requested(&self) -> bool {
        match &self.0 {
            Some(rx) => *rx.borrow() || rx.has_changed().is_err(),
            None => false,
        }
    }

    /// Completes once the stop is asked for (at once if it was already).
    pub async fn requested(&mut self) {
        match &mut self.0 {
            Some(rx) => {
                let _ = rx.wait_for(|stop| *stop).await;
            }
            None => std::future::pending().await,
        }
    }
}
