//! MySQL/MariaDB storage: the event log, the `order_lifecycle_ids` read model,
//! dead letters, consumer offsets and projection checkpoints; and the Redis
//! read model. Thin adapters: SQL with bound parameters only, no rules.

pub mod audit;
pub mod checkpoints;
pub mod dead_letters;
pub mod event_log;
pub mod fold;
pub mod id_projection;
pub mod leadership;
pub mod lease;
pub mod legacy;
pub mod offsets;
pub mod parked;
pub mod redis_cluster;
pub mod redis_projection;
pub mod stray_keys;

use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::mysql::MySqlRow;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{MySql, MySqlPool, QueryBuilder, Row};

use crate::config::SecretUrl;

/// Most rows in one multi-row statement; keeps every statement far below
/// MySQL's 65,535 placeholders and `max_allowed_packet`. A power of two,
/// as every statement size on the hot path is (see [`shaped_chunks`]).
pub const MAX_ROWS_PER_STATEMENT: usize = 512;

/// Most bytes of row data in one statement. MariaDB refuses a packet over
/// `max_allowed_packet` (16 MiB by default) by dropping the connection,
/// which looks like an outage and would be retried forever: 512 dead
/// letters of 64 KiB are 32 MiB. Rows are cut into statements of at most
/// this much (a row larger than it goes alone).
pub const MAX_STATEMENT_BYTES: usize = 4 * 1024 * 1024;

/// `items` in consecutive runs of at most [`MAX_ROWS_PER_STATEMENT`] rows
/// and [`MAX_STATEMENT_BYTES`] bytes, by `bytes` of each row.
pub(crate) fn byte_bounded<'a, T>(
    items: &'a [T],
    bytes: impl Fn(&T) -> usize + 'a,
) -> impl Iterator<Item = &'a [T]> + 'a {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut total = 0;
        let mut n = 0;
        for item in rest.iter().take(MAX_ROWS_PER_STATEMENT) {
            total += bytes(item);
            if n > 0 && total > MAX_STATEMENT_BYTES {
                break;
            }
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        Some(run)
    })
}

/// Prepared statements kept per connection: every shape the hot path uses
/// (each statement at each power-of-two size) fits, so a batch prepares
/// nothing once the connection has seen every size.
const STATEMENT_CACHE: usize = 512;

/// Splits `items` into chunks whose sizes are powers of two (512 at most),
/// largest first.
///
/// A statement with `n` placeholders is a statement of its own to the
/// server's prepared-statement cache: batches of every size from 1 to 512
/// made a fresh `PREPARE` (a round trip and a parse of hundreds of
/// placeholders) for half of all statements, and that was most of a small
/// batch's cost. Cut into powers of two, a multi-row `INSERT` has ten
/// shapes, each prepared once per connection.
pub(crate) fn shaped_chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = rest.len().min(MAX_ROWS_PER_STATEMENT);
        // The largest power of two not above n.
        let size = 1 << (usize::BITS - 1 - n.leading_zeros());
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        Some(chunk)
    })
}

/// `items` followed by copies of its last item up to the next power of two:
/// the rows of an idempotent multi-row statement (an upsert) in one of ten
/// shapes, in one round trip (see [`shaped_chunks`]).
pub(crate) fn padded<T>(items: &[T]) -> impl Iterator<Item = &T> {
    let extra = items.len().next_power_of_two() - items.len();
    items
        .iter()
        .chain(items.last().into_iter().cycle().take(extra))
}

/// A storage failure, split by what the caller does about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable, restarting, or aborted the transaction
    /// (deadlock, lock wait): retry the whole batch; nothing was committed.
    #[error("database temporarily unavailable: {0}")]
    Transient(#[source] sqlx::Error),
    /// Another writer committed the same key first (duplicate key): retry
    /// the batch, which will then see that writer's rows.
    #[error("concurrent write conflict: {0}")]
    Conflict(#[source] sqlx::Error),
    /// Anything else: a bug, a schema mismatch, a permission problem.
    #[error("database error: {0}")]
    Fatal(#[source] sqlx::Error),
    /// A stored row that this version cannot read.
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A migration started and never finished: a process applying it
    /// stopped part-way (killed, or the server restarted). MySQL commits
    /// each DDL statement on its own, so sqlx records a migration before its
    /// statements and marks it done after them; some of them may have run.
    /// Every command refuses the database until an operator finishes it.
    #[error(
        "migration {version} ({file}) was interrupted part-way: some of its statements may have \
         run. Compare the file with the schema (SHOW CREATE TABLE), run the statements that did \
         not, then mark it done: UPDATE _sqlx_migrations SET success = 1 WHERE version = \
         {version} (README: \"A migration interrupted part-way\")"
    )]
    MigrationInterrupted {
        version: i64,
        /// Its file, or what to look for when this version has none.
        file: String,
    },
    /// The server refused this service's connection: TLS (a CA that does
    /// not match, a server without TLS under `ssl-mode=required`) or the
    /// login (1045, 1044, 1698). A configuration mistake: no retry helps.
    #[error("the database at {address} refused the connection: {error}; {DATABASE_REFUSAL_HINT}")]
    Refused {
        address: String,
        #[source]
        error: sqlx::Error,
    },
}

impl StoreError {
    /// Whether the server refused this service (TLS, login): a
    /// configuration error, exit code 2 at start-up.
    pub fn is_refused(&self) -> bool {
        matches!(self, StoreError::Refused { .. })
    }

    /// Whether retrying the same work may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_) | StoreError::Conflict(_))
    }

    /// Whether this is a write conflict with another writer.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }

    /// Whether a lock or metadata-lock wait ran out (MySQL error 1205).
    pub fn is_lock_wait_timeout(&self) -> bool {
        match self {
            StoreError::Transient(e) | StoreError::Fatal(e) => mysql_error_number(e) == Some(1205),
            _ => false,
        }
    }

    /// Whether the database refused the data itself (anything not
    /// transient, or a conflict that retries did not resolve), rather than
    /// being unavailable.
    pub fn is_refusal(&self) -> bool {
        !self.is_transient() || self.is_conflict()
    }
}

impl crate::retry::Retryable for StoreError {
    fn is_transient(&self) -> bool {
        StoreError::is_transient(self)
    }

    fn is_conflict(&self) -> bool {
        StoreError::is_conflict(self)
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        if mysql_error_number(&e) == Some(1062) {
            return StoreError::Conflict(e);
        }
        let transient = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // A handshake cut by a restarting server is retried; a
            // certificate that does not verify, or TLS required of a
            // server without it, is configuration (never retried).
            sqlx::Error::Tls(_) => !is_tls_misconfiguration(&e),
            sqlx::Error::Database(db) => is_transient_mysql_code(db.as_ref()),
            _ => false,
        };
        if transient {
            StoreError::Transient(e)
        } else {
            StoreError::Fatal(e)
        }
    }
}

/// Whether `e` is the server refusing the connection itself: TLS, or the
/// login (access denied for the user, 1045; to the database, 1044;
/// plugin refusal, 1698).
pub fn is_refused_connection(e: &sqlx::Error) -> bool {
    is_tls_misconfiguration(e) || matches!(mysql_error_number(e), Some(1045 | 1044 | 1698))
}

/// A TLS failure that only a configuration change fixes: the server's
/// certificate does not verify (or has the wrong name), or the server does
/// not offer TLS although `ssl-mode` requires it. A handshake cut short by
/// a restarting server is not one of them.
fn is_tls_misconfiguration(e: &sqlx::Error) -> bool {
    let sqlx::Error::Tls(tls) = e else {
        return false;
    };
    let text = tls.to_string().to_ascii_lowercase();
    [
        "certificate",
        "verify",
        "does not support",
        "unknown ca",
        "hostname mismatch",
    ]
    .iter()
    .any(|sign| text.contains(sign))
}

/// What to check when the database refuses this service.
pub const DATABASE_REFUSAL_HINT: &str =
    "check --database-url (OL_DATABASE_URL): its user, password, and ssl-mode / ssl-ca";

fn mysql_error_number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(|e| e.number()),
        _ => None,
    }
}

/// Errors of the database's state, not of the data: retried (and logged
/// at each retry) until an operator or the server fixes them, never turned
/// into `storage_rejected` dead letters, which would drop good events for
/// an environmental fault.
///
/// Deadlock (1213), lock wait timeout (1205), server shutting down (1053),
/// connection lost or killed (2006, 2013, 1927, 4031), read-only during a
/// fail-over (1290, 1836); a grant revoked while running (1142 table, 1143
/// column; a refused login, 1045, stays a configuration error that stops
/// the start), a full table or disk (1114, 1021), too
/// many connections (1040, 1203), a user's resource limit (1226), a
/// statement killed by a time limit (1969, 3024).
fn is_transient_mysql_code(db: &dyn sqlx::error::DatabaseError) -> bool {
    let number = db
        .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map(|e| e.number());
    matches!(
        number,
        Some(
            1205 | 1213
                | 1053
                | 2006
                | 2013
                | 1290
                | 1927
                | 1836
                | 4031
                | 1142
                | 1143
                | 1114
                | 1021
                | 1040
                | 1203
                | 1226
                | 1969
                | 3024
        )
    )
}

/// The connection pool and the embedded migrations.
#[derive(Clone)]
pub struct Store {
    pool: MySqlPool,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// The lease migrations are applied under (see [`Store::migrate`]).
const MIGRATION_LEASE: &str = "order_lifecycle_migrations";

impl Store {
    /// Connects, creating the database when it does not exist yet.
    ///
    /// # Errors
    /// [`StoreError`] when the server cannot be reached or refuses.
    pub async fn connect(url: &SecretUrl, max_connections: u32) -> Result<Store, StoreError> {
        Store::open(url, max_connections)
            .await
            .map_err(|e| match e {
                StoreError::Transient(error) | StoreError::Fatal(error)
                    if is_refused_connection(&error) =>
                {
                    StoreError::Refused {
                        address: url.redacted(),
                        error,
                    }
                }
                other => other,
            })
    }

    async fn open(url: &SecretUrl, max_connections: u32) -> Result<Store, StoreError> {
        if !MySql::database_exists(url.expose()).await? {
            match MySql::create_database(url.expose()).await {
                // 1007: another instance created it since we looked.
                Err(e) if mysql_error_number(&e) == Some(1007) => {}
                other => other?,
            }
        }
        let options: MySqlConnectOptions = url.expose().parse()?;
        // Session time zone UTC: event times are stored as UTC DATETIMEs.
        let options = options
            .timezone(Some("+00:00".to_owned()))
            .statement_cache_capacity(STATEMENT_CACHE);
        let pool = MySqlPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            // READ COMMITTED: every statement of a batch sees what other
            // instances committed before it, so a batch that waited for an
            // order's row locks also sees that order's newer log entries.
            // A batch that waits 10 s for locks gives up and is retried,
            // instead of holding its own locks for the server default of 50 s.
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::Executor::execute(
                        &mut *conn,
                        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
                    )
                    .await?;
                    sqlx::Executor::execute(
                        &mut *conn,
                        "SET SESSION innodb_lock_wait_timeout = 10",
                    )
                    .await?;
                    // DATETIME columns hold UTC (see `crate::calendar`).
                    sqlx::Executor::execute(&mut *conn, "SET SESSION time_zone = '+00:00'")
                        .await
                        .map(|_| ())
                })
            })
            .connect_with(options)
            .await?;
        Ok(Store { pool })
    }

    /// Applies pending migrations; a no-op when the schema is current.
    ///
    /// Instances (and operators) starting at once take turns: sqlx's own
    /// migration lock asks for `GET_LOCK(name, -1)`, which MariaDB answers
    /// at once with NULL (it has no infinite wait), so processes starting
    /// together on a new database all applied the first migrations, and
    /// all but one stopped (a duplicate key on `_sqlx_migrations`, or a
    /// migration found "dirty" while another applied it). This lock, one
    /// per database (a [`lease::Lease`]), is waited for.
    ///
    /// # Errors
    /// [`StoreError::MigrationInterrupted`] when a migration was left
    /// unfinished; [`StoreError::Migrate`] when a migration fails or was
    /// changed after being applied; [`StoreError`] when the lease cannot be
    /// asked for.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let lease = lease::Lease::acquire(
            self,
            MIGRATION_LEASE,
            "waiting for another process to finish migrating the database",
        )
        .await?;
        let migrated = MIGRATOR.run(&self.pool).await;
        lease.end().await;
        match migrated {
            Err(sqlx::migrate::MigrateError::Dirty(version)) => {
                let file = match MIGRATOR.iter().find(|m| m.version == version) {
                    Some(m) => format!(
                        "migrations/{version}_{}.sql",
                        m.description.replace(' ', "_")
                    ),
                    None => "a migration this version does not have: see the release that \
                             applied it"
                        .to_owned(),
                };
                Err(StoreError::MigrationInterrupted { version, file })
            }
            migrated => Ok(migrated?),
        }
    }

    /// Whether the database answers a trivial query (readiness).
    ///
    /// # Errors
    /// [`StoreError`] when it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The pool, for adapters and tests.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }
}

/// Appends `col IN (?, ?, ...)` to a query; `values` must not be empty.
/// The list is padded to a power of two by repeating its last value, which
/// changes no result and keeps the statement in one of ten shapes (see
/// [`shaped_chunks`]).
pub(crate) fn push_in<'a, T>(qb: &mut QueryBuilder<'a, MySql>, column: &str, values: &'a [T])
where
    T: AsRef<str> + 'a,
{
    qb.push(column);
    qb.push(" IN (");
    let mut list = qb.separated(", ");
    for v in padded(values) {
        list.push_bind(v.as_ref());
    }
    list.push_unseparated(")");
}

/// Reads a text column. Columns with a binary collation (`utf8mb4_bin`, used
/// for ids so that `SL1` and `sl1` stay distinct) carry MySQL's BINARY flag,
/// so they are read as bytes and checked to be UTF-8.
pub(crate) fn text<'r>(
    row: &'r MySqlRow,
    index: usize,
    table: &'static str,
) -> Result<&'r str, StoreError> {
    let bytes: &[u8] = row.try_get(index)?;
    std::str::from_utf8(bytes).map_err(|e| StoreError::Corrupt {
        table,
        detail: format!("column {index} is not UTF-8: {e}"),
    })
}

/// [`text`] for a nullable column.
pub(crate) fn opt_text<'r>(
    row: &'r MySqlRow,
    index: usize,
    table: &'static str,
) -> Result<Option<&'r str>, StoreError> {
    let bytes: Option<&[u8]> = row.try_get(index)?;
    bytes
        .map(|b| {
            std::str::from_utf8(b).map_err(|e| StoreError::Corrupt {
                table,
                detail: format!("column {index} is not UTF-8: {e}"),
            })
        })
        .transpose()
}

/// The event ids among `ids` that `table` holds, read through `index` (its
/// unique or plain index on `event_id`).
///
/// Every query with an `IN` list on the hot path names its index (`FORCE
/// INDEX`): MariaDB plans lists longer than `eq_range_index_dive_limit`
/// (200) from index statistics, which lag a fast-growing table, and then
/// picks a full scan at one moment and a range at the next. With the index
/// named, a batch costs the same at any table size.
pub(crate) async fn existing_event_ids(
    conn: &mut sqlx::MySqlConnection,
    table: &'static str,
    index: &'static str,
    ids: &[crate::domain::EventId],
) -> Result<std::collections::HashSet<crate::domain::EventId>, StoreError> {
    let mut found = std::collections::HashSet::new();
    for chunk in ids.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new(format!(
            "SELECT event_id FROM {table} FORCE INDEX ({index}) WHERE "
        ));
        push_in(&mut qb, "event_id", chunk);
        for row in qb.build().fetch_all(&mut *conn).await? {
            found.insert(event_id(&row, table)?);
        }
    }
    Ok(found)
}

/// The event ids among `ids` that the log, the parking lot or the dead
/// letters hold (rule R9), in one round trip.
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn seen_event_ids(
    conn: &mut sqlx::MySqlConnection,
    ids: &[crate::domain::EventId],
) -> Result<std::collections::HashSet<crate::domain::EventId>, StoreError> {
    let mut found = std::collections::HashSet::new();
    // Three lists of bound values per chunk: well under the protocol's
    // 65,535 parameters.
    for chunk in ids.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<MySql>::new("");
        for (i, (table, index)) in [
            ("lifecycle_events", "uq_lifecycle_events_event_id"),
            ("parked_events", "uq_parked_events_event_id"),
            ("dead_letters", "idx_dead_letters_event_id"),
        ]
        .into_iter()
        .enumerate()
        {
            if i > 0 {
                qb.push(" UNION ALL ");
            }
            qb.push(format!(
                "SELECT event_id FROM {table} FORCE INDEX ({index}) WHERE "
            ));
            push_in(&mut qb, "event_id", chunk);
            if table == "dead_letters" {
                // A redriven letter is waiting to be tried again, not seen.
                qb.push(" AND redriven_at IS NULL");
            }
        }
        for row in qb.build().fetch_all(&mut *conn).await? {
            found.insert(event_id(&row, "lifecycle_events")?);
        }
    }
    Ok(found)
}

fn event_id(row: &MySqlRow, table: &'static str) -> Result<crate::domain::EventId, StoreError> {
    crate::domain::EventId::parse(text(row, 0, table)?).map_err(|e| StoreError::Corrupt {
        table,
        detail: format!("event_id: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::{
        byte_bounded, is_refused_connection, padded, shaped_chunks, StoreError,
        MAX_ROWS_PER_STATEMENT,
    };

    /// A certificate that does not verify, or TLS required of a server
    /// without it, is configuration; a handshake cut short by a restarting
    /// server is retried like any lost connection.
    #[test]
    fn tls_failures_are_configuration_unless_the_connection_was_cut() {
        let tls = |text: &str| sqlx::Error::Tls(text.to_owned().into());
        for text in [
            "error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed",
            "server does not support TLS",
        ] {
            assert!(is_refused_connection(&tls(text)), "{text}");
            assert!(!StoreError::from(tls(text)).is_transient(), "{text}");
        }
        for text in ["Connection reset by peer (os error 104)", "unexpected EOF"] {
            assert!(!is_refused_connection(&tls(text)), "{text}");
            assert!(StoreError::from(tls(text)).is_transient(), "{text}");
        }
    }

    #[test]
    fn chunks_are_powers_of_two_largest_first_and_cover_every_item_once() {
        for n in [0usize, 1, 2, 3, 37, 500, 512, 513, 1500] {
            let items: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = shaped_chunks(&items).collect();
            assert_eq!(chunks.concat(), items, "n = {n}");
            for pair in chunks.windows(2) {
                assert!(pair[0].len() >= pair[1].len(), "n = {n}");
            }
            for c in &chunks {
                assert!(c.len().is_power_of_two() && c.len() <= MAX_ROWS_PER_STATEMENT);
            }
        }
        let sizes: Vec<usize> = shaped_chunks(&[0; 37]).map(<[i32]>::len).collect();
        let mb = 1024 * 1024;
        let rows = [3 * mb, 2 * mb, mb, 5 * mb, 1, 1];
        let runs: Vec<usize> = byte_bounded(&rows, |r| *r).map(<[usize]>::len).collect();
        assert_eq!(runs, vec![1, 2, 1, 2], "4 MiB at most, a larger row alone");
        let small = [1usize; 1000];
        let runs: Vec<usize> = byte_bounded(&small, |r| *r).map(<[usize]>::len).collect();
        assert_eq!(runs, vec![512, 488]);
        assert_eq!(sizes, [32, 4, 1]);
    }

    #[test]
    fn padding_repeats_the_last_item_up_to_a_power_of_two() {
        let rows: Vec<&u8> = padded(&[1, 2, 3, 4, 5]).collect();
        assert_eq!(rows, [&1, &2, &3, &4, &5, &5, &5, &5]);
        assert_eq!(padded(&[7u8; 4]).count(), 4);
        assert_eq!(padded::<u8>(&[]).count(), 0);
    }
}
