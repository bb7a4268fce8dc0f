//! Named leases: one holder at a time per database, for work that must not
//! run twice at once (a rebuild replacing the read model). A lease is a
//! MariaDB/MySQL named lock (`GET_LOCK`) on a connection of its own, so it
//! ends with its holder, even a killed one: the server releases a session's
//! locks when the session closes. Lock names are server-wide, so the name
//! carries a digest of the database's name: two databases on one server
//! (tests, tenants) never contend.

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
