//! Named leases: one holder at a time per database, for work that must not
//! run twice at once (a rebuild replacing the read model, migrations, an
//! import). A lease is a MariaDB/MySQL named lock (`GET_LOCK`) on a
//! connection of its own, so it ends with its holder, even a killed one:
//! the server releases a session's locks when the session closes. Lock
//! names are server-wide, so the name carries a digest of the database's
//! name: two databases on one server (tests, tenants) never contend.

use std::time::{Duration, Instant};

use sqlx::MySqlConnection;

use super::{Store, StoreError};

/// A held lease; [`Lease::release`] gives it back at once; dropped, it
/// ends when the server sees its connection close (a moment later).
#[derive(Debug)]
pub struct Lease {
    /// Kept open for the lease's life; never returned to the pool, which
    /// would keep the lock with a connection someone else then uses.
    session: MySqlConnection,
    name: String,
}

impl Lease {
    /// Takes the lease `name` on `store`'s database if no one holds it;
    /// `None` when someone does (no waiting).
    ///
    /// # Errors
    /// [`StoreError`] from the database.
    pub async fn try_acquire(store: &Store, name: &str) -> Result<Option<Lease>, StoreError> {
        let session = store.pool().acquire().await?.detach();
        Ok(Lease::try_acquire_on(session, name).await?.ok())
    }

    /// Takes the lease `name` on `store`'s database, waiting for whoever
    /// holds it to give it back, however long that takes; logs `waiting`
    /// when it has to wait, and every ten seconds of it. It asks again
    /// every quarter of a second rather than waiting in the server: a
    /// statement that waits is logged as slow, and MariaDB has no
    /// `GET_LOCK` that waits forever.
    ///
    /// # Errors
    /// [`StoreError`] from the database.
    pub async fn acquire(store: &Store, name: &str, waiting: &str) -> Result<Lease, StoreError> {
        let mut session = store.pool().acquire().await?.detach();
        let mut logged: Option<Instant> = None;
        loop {
            session = match Lease::try_acquire_on(session, name).await? {
                Ok(lease) => return Ok(lease),
                Err(session) => session,
            };
            if logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                tracing::info!(lease = name, "{waiting}");
                logged = Some(Instant::now());
            }
            tokio::time::sleep(ASK_EVERY).await;
        }
    }

    /// [`Lease::try_acquire`] on a session of the caller's (one kept for
    /// repeated attempts); the session comes back when someone else holds
    /// the lease.
    ///
    /// # Errors
    /// [`StoreError`] from the database (the session is then dropped).
    pub async fn try_acquire_on(
        mut session: MySqlConnection,
        name: &str,
    ) -> Result<Result<Lease, MySqlConnection>, StoreError> {
        // Names are at most 64 characters: a fixed prefix and an MD5.
        let got: Option<i64> =
            sqlx::query_scalar("SELECT GET_LOCK(CONCAT(?, ':', MD5(DATABASE())), 0)")
                .bind(name)
                .fetch_one(&mut session)
                .await?;
        Ok(if got == Some(1) {
            Ok(Lease {
                session,
                name: name.to_owned(),
            })
        } else {
            Err(session)
        })
    }

    /// Whether this lease is still held: its session answers and the server
    /// still gives the lock to it. `false` once the server closed the
    /// session (a restart, a network cut, an idle limit passed), after which
    /// someone else may hold the lease.
    pub async fn is_held(&mut self) -> bool {
        let holder: Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(
            "SELECT IS_USED_LOCK(CONCAT(?, ':', MD5(DATABASE()))) = CONNECTION_ID()",
        )
        .bind(&self.name)
        .fetch_one(&mut self.session)
        .await;
        matches!(holder, Ok(Some(1)))
    }

    /// Gives the lease back once the work it guarded is done: a failure is
    /// logged, not returned (the lease ends with its connection anyway,
    /// and that work must not be reported as failed for it).
    pub async fn end(self) {
        let name = self.name.clone();
        if let Err(e) = self.release().await {
            tracing::warn!(lease = %name, error = %e, "could not give the lease back; it ends with its connection");
        }
    }

    /// Gives the lease back and closes its connection.
    ///
    /// # Errors
    /// [`StoreError`] from the database (the lease ends with the
    /// connection anyway).
    pub async fn release(mut self) -> Result<(), StoreError> {
        sqlx::query("DO RELEASE_LOCK(CONCAT(?, ':', MD5(DATABASE())))")
            .bind(&self.name)
            .execute(&mut self.session)
            .await?;
        sqlx::Connection::close(self.session).await?;
        Ok(())
    }
}

/// How often [`Lease::acquire`] asks for a lease someone holds.
const ASK_EVERY: Duration = Duration::from_millis(250);
/// How often it says it is still waiting.
const LOG_EVERY: Duration = Duration::from_secs(10);
