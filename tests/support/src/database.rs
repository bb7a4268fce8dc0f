//! A MariaDB database of each test's own, migrated, dropped at the end.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use order_lifecycle::config::SecretUrl;
use order_lifecycle::store::Store;
use sqlx::Row;

use crate::basics::{unique_suffix, MYSQL_ROOT};

/// A database of its own, migrated.
pub struct TestDb {
    pub name: String,
    pub url: SecretUrl,
    pub store: Store,
}

impl TestDb {
    pub async fn new() -> TestDb {
        drop_stale_databases().await;
        let (name, url) = TestDb::new_name();
        let store = Store::connect(&url, 4)
            .await
            .unwrap_or_else(|e| panic!("MariaDB at {MYSQL_ROOT} is required: {e}"));
        store.migrate().await.expect("migrations apply");
        TestDb { name, url, store }
    }

    /// The name and URL of a database of the test's own, not made yet;
    /// [`TestDb::drop_by_name`] drops it.
    pub fn new_name() -> (String, SecretUrl) {
        let name = format!("olt_{}", unique_suffix());
        let url = SecretUrl::new(format!("{MYSQL_ROOT}/{name}"));
        (name, url)
    }

    /// Drops the database and creates it again, empty and migrated, under
    /// the same name (a lost database, for `replay`).
    pub async fn recreate(&mut self) {
        self.store.pool().close().await;
        let root = sqlx::MySqlPool::connect(MYSQL_ROOT).await.expect("MariaDB");
        sqlx::query(&format!("DROP DATABASE `{}`", self.name))
            .execute(&root)
            .await
            .expect("drop test database");
        self.store = Store::connect(&self.url, 4).await.expect("recreate");
        self.store.migrate().await.expect("migrations apply");
    }

    /// The log, order by order: `(order_id, seq, event_id, kind, outcome,
    /// transitions, payload, occurred_at_ms, source)` as text.
    pub async fn log(&self) -> Vec<Vec<Option<String>>> {
        sqlx::query(
            "SELECT CAST(order_id AS CHAR), CAST(seq AS CHAR), CAST(event_id AS CHAR), \
             CAST(kind AS CHAR), CAST(outcome AS CHAR), CAST(transitions AS CHAR), \
             CAST(payload AS CHAR), CAST(occurred_at_ms AS CHAR), \
             CAST(CONCAT(source_topic, '/', source_partition, '@', source_offset) AS CHAR) \
             FROM lifecycle_events ORDER BY order_id, seq",
        )
        .fetch_all(self.store.pool())
        .await
        .expect("read lifecycle_events")
        .iter()
        .map(|r| (0..9).map(|i| r.get::<Option<String>, _>(i)).collect())
        .collect()
    }

    pub async fn drop(self) {
        let pool = self.store.pool().clone();
        // Closing waits for every connection to come back: one the test
        // still holds would make it wait forever.
        tokio::time::timeout(std::time::Duration::from_secs(30), pool.close())
            .await
            .expect("the test still holds a connection of its database's pool");
        TestDb::drop_by_name(&self.name).await;
    }

    /// Drops the database `name` (one of [`TestDb::new_name`]'s), if it
    /// exists.
    pub async fn drop_by_name(name: &str) {
        let root = sqlx::MySqlPool::connect(MYSQL_ROOT).await.expect("MariaDB");
        sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
            .execute(&root)
            .await
            .expect("drop test database");
        sqlx::query(&format!("DROP USER IF EXISTS '{name}_u'@'%'"))
            .execute(&root)
            .await
            .expect("drop the test database's user");
    }

    /// A server user of this database's own, with no rights yet (the test
    /// grants what it needs as root); returns its name and the database's
    /// URL as that user. It is dropped with the database, or, if the test
    /// dies first, with the stale databases (which is why a test that
    /// also calls [`TestDb::recreate`], leaving a moment with no database,
    /// must create the user after it).
    pub async fn create_user(&self) -> (String, SecretUrl) {
        let user = format!("{}_u", self.name);
        sqlx::query(&format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY 'pw-{user}'"
        ))
        .execute(self.store.pool())
        .await
        .expect("create the test database's user");
        let url = self
            .url
            .expose()
            .replacen("root@", &format!("{user}:pw-{user}@"), 1);
        (user, SecretUrl::new(url))
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(self.store.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// `lifecycle_id -> (order_id, id_type, status, replaced_by)`.
    pub async fn rows(&self) -> BTreeMap<String, (String, String, String, Option<String>)> {
        sqlx::query(
            "SELECT lifecycle_id, order_id, CAST(id_type AS CHAR), CAST(status AS CHAR), replaced_by \
             FROM order_lifecycle_ids",
        )
        .fetch_all(self.store.pool())
        .await
        .expect("read order_lifecycle_ids")
        .iter()
        .map(|r| {
            let s = |i: usize| String::from_utf8(r.get::<Vec<u8>, _>(i)).unwrap();
            let by: Option<Vec<u8>> = r.get(4);
            (s(0), (s(1), s(2), s(3), by.map(|b| String::from_utf8(b).unwrap())))
        })
        .collect()
    }

    /// Every column of `order_lifecycle_ids` but the auto-increment id, as text.
    pub async fn full_rows(&self) -> Vec<Vec<Option<String>>> {
        sqlx::query(
            "SELECT CAST(order_id AS CHAR), CAST(id_type AS CHAR), CAST(lifecycle_id AS CHAR), \
             CAST(status AS CHAR), CAST(replaced_by AS CHAR), CAST(notes AS CHAR), \
             CAST(created_at AS CHAR), CAST(updated_at AS CHAR), CAST(target_id AS CHAR), \
             CAST(issued_seq AS CHAR), CAST(updated_seq AS CHAR) \
             FROM order_lifecycle_ids ORDER BY lifecycle_id",
        )
        .fetch_all(self.store.pool())
        .await
        .expect("read order_lifecycle_ids")
        .iter()
        .map(|r| (0..11).map(|i| r.get::<Option<String>, _>(i)).collect())
        .collect()
    }

    /// `(reason, event_id)` of every dead letter, in offset order.
    pub async fn dead_letters(&self) -> Vec<(String, Option<String>, String)> {
        sqlx::query(
            "SELECT reason, CAST(event_id AS CHAR), CAST(error AS CHAR) FROM dead_letters \
             ORDER BY source_topic, source_partition, source_offset",
        )
        .fetch_all(self.store.pool())
        .await
        .expect("read dead_letters")
        .iter()
        .map(|r| {
            (
                String::from_utf8(r.get::<Vec<u8>, _>(0)).unwrap(),
                r.get(1),
                r.get(2),
            )
        })
        .collect()
    }

    /// Per-order sequence numbers must be 1..n with no gap.
    pub async fn assert_sequences_gap_free(&self) {
        let bad = self
            .count(
                "SELECT COUNT(*) FROM (SELECT order_id FROM lifecycle_events GROUP BY order_id \
                 HAVING MIN(seq) <> 1 OR MAX(seq) <> COUNT(*) OR COUNT(DISTINCT seq) <> COUNT(*)) g",
            )
            .await;
        assert_eq!(bad, 0, "orders with gaps or duplicates in their sequence");
    }

    /// The seed's health check: no (order, type) with two active ids.
    pub async fn assert_one_active_per_type(&self) {
        let bad = self
            .count(
                "SELECT COUNT(*) FROM (SELECT order_id, id_type FROM order_lifecycle_ids \
                 WHERE status = 'active' GROUP BY order_id, id_type HAVING COUNT(*) > 1) g",
            )
            .await;
        assert_eq!(bad, 0, "orders with two active ids of one type");
    }
}

/// Removes databases of earlier runs that died before cleaning up (names
/// carry their creation time).
async fn drop_stale_databases() {
    let Ok(root) = sqlx::MySqlPool::connect(MYSQL_ROOT).await else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let names: Vec<String> = sqlx::query_scalar("SELECT CAST(schema_name AS CHAR) FROM information_schema.schemata WHERE schema_name LIKE 'olt\\_%'")
        .fetch_all(&root)
        .await
        .unwrap_or_default();
    for name in names {
        let created: u64 = name
            .split('_')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(now);
        if now.saturating_sub(created) > 3 * 3600 {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
                .execute(&root)
                .await;
        }
    }
    // Users of databases that are gone (their tests died before the end).
    let users: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(User AS CHAR) FROM mysql.global_priv WHERE User LIKE 'olt\\_%\\_u' \
         AND LEFT(User, LENGTH(User) - 2) NOT IN \
         (SELECT schema_name FROM information_schema.schemata)",
    )
    .fetch_all(&root)
    .await
    .unwrap_or_default();
    for user in users {
        let _ = sqlx::query(&format!("DROP USER IF EXISTS '{user}'@'%'"))
            .execute(&root)
            .await;
    }
}

impl TestDb {
    /// A migrated database of its own on the server at `root` (a URL
    /// without a database).
    pub async fn on(root: &str) -> TestDb {
        let name = format!("olt_{}", unique_suffix());
        let url = SecretUrl::new(format!("{root}/{name}"));
        let store = Store::connect(&url, 4)
            .await
            .unwrap_or_else(|e| panic!("MariaDB at {root} is required: {e}"));
        store.migrate().await.expect("migrations apply");
        TestDb { name, url, store }
    }
}
