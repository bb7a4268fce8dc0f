//! The operator's commands against a real MariaDB and Redis: `import-legacy`
//! (through the binary, as operators run it) and `verify`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{TestDb, TestRedis};
use order_lifecycle::ingest::{process_batch, InboundMessage, PipelineConfig};
use order_lifecycle::testing::EventScript;
use order_lifecycle::wire::{self, Encoding};

const BIN: &str = env!("CARGO_BIN_EXE_order-lifecycle");

const LEGACY_TABLE: &str = "(
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    order_id VARCHAR(64) NOT NULL,
    user_id BIGINT NULL,
    close_id VARCHAR(64) NULL,
    cancel_id VARCHAR(64) NULL,
    modify_id VARCHAR(64) NULL,
    stoploss_id VARCHAR(64) NULL,
    takeprofit_id VARCHAR(64) NULL,
    stoploss_cancel_id VARCHAR(64) NULL,
    takeprofit_cancel_id VARCHAR(64) NULL,
    created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE KEY (order_id)
)";

async fn create_legacy_tables(db: &TestDb) {
    for table in ["live_user_orders", "demo_user_orders"] {
        sqlx::query(&format!("CREATE TABLE {table} {LEGACY_TABLE}"))
            .execute(db.store.pool())
            .await
            .expect("create legacy table");
    }
}

/// Inserts `(order_id, [close, cancel, modify, stoploss, takeprofit,
/// stoploss_cancel, takeprofit_cancel])` rows.
async fn insert_legacy(db: &TestDb, table: &str, rows: &[(&str, [Option<&str>; 7])]) {
    for (order, ids) in rows {
        let sql = format!(
            "INSERT INTO {table} (order_id, user_id, close_id, cancel_id, modify_id, stoploss_id, \
             takeprofit_id, stoploss_cancel_id, takeprofit_cancel_id, created_at) \
             VALUES (?, 7, ?, ?, ?, ?, ?, ?, ?, '2025-03-01 10:00:00')"
        );
        let mut q = sqlx::query(&sql).bind(*order);
        for id in ids {
            q = q.bind(*id);
        }
        q.execute(db.store.pool()).await.expect("insert legacy row");
    }
}

/// Runs the binary with the test's database and Redis prefix; returns
/// (exit success, stdout, stderr).
fn order_lifecycle(db: &TestDb, redis: &TestRedis, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("OL_DATABASE_URL", db.url.expose())
        .env("OL_REDIS_URL", &redis.url)
        .env("OL_REDIS_KEY_PREFIX", &redis.prefix)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run order-lifecycle");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The realistic legacy rows: live and demo, NULLs, blanks, surrounding
/// spaces, an id shared by two orders, an order with every column set, a
/// malformed value, and an order the service already knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_legacy_makes_every_id_resolve_and_a_second_run_changes_nothing() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    create_legacy_tables(&db).await;
    insert_legacy(
        &db,
        "live_user_orders",
        &[
            (
                "100001",
                [
                    None,
                    Some(""),
                    None,
                    Some("SL-1001"),
                    Some("  TP-1001 "),
                    None,
                    None,
                ],
            ),
            (
                "100002",
                [
                    Some("CL-2"),
                    Some("CN-2"),
                    Some("MD-2"),
                    Some("SL-2"),
                    Some("TP-2"),
                    Some("SLC-2"),
                    Some("TPC-2"),
                ],
            ),
            (
                "100003",
                [None, None, None, Some("SL-SHARED"), None, None, None],
            ),
            (
                "100004",
                [
                    None,
                    None,
                    None,
                    Some("SL-SHARED"),
                    Some("TP-4"),
                    None,
                    None,
                ],
            ),
            ("100005", [None; 7]),
            (
                " 100006 ",
                [Some("   "), Some(""), Some(" "), None, None, None, None],
            ),
        ],
    )
    .await;
    insert_legacy(
        &db,
        "demo_user_orders",
        &[
            (
                "900001",
                [None, None, Some("DMD-1"), Some("DSL-1"), None, None, None],
            ),
            (
                "900002",
                [Some("DCL-2"), None, None, None, None, None, None],
            ),
            (
                "900003",
                [None, None, None, Some("SL WITH SPACE"), None, None, None],
            ),
        ],
    )
    .await;
    // The service already consumed order 100001 and gave it a newer stop-loss.
    let mut known = EventScript::new("100001");
    let events = [known.place(), known.sl("SL-NEW")];
    let messages: Vec<InboundMessage> = events
        .iter()
        .enumerate()
        .map(|(i, e)| InboundMessage {
            topic: "order-events".into(),
            partition: 0,
            offset: i as i64,
            key: None,
            payload: Some(wire::encode(e, Encoding::Protobuf)),
            content_type: None,
            timestamp_ms: None,
        })
        .collect();
    let pipeline = PipelineConfig {
        offsets_group: Some("import-test".into()),
        park_timeout: Duration::from_secs(60),
    };
    process_batch(&db.store, &pipeline, &messages)
        .await
        .expect("known order");

    let (ok, out, err) = order_lifecycle(&db, &redis, &["import-legacy", "--batch-size", "2"]);
    assert!(ok, "import-legacy failed:\n{out}\n{err}");
    assert!(
        out.contains("9 orders processed (demo_user_orders 3, live_user_orders 6)"),
        "{out}"
    );
    assert!(
        out.contains(
            "ids imported: 22 (cancel_id 1, close_id 2, modify_id 2, order_id 8, \
             stoploss_cancel_id 1, stoploss_id 4, takeprofit_cancel_id 1, takeprofit_id 3)"
        ),
        "{out}"
    );
    assert!(
        out.contains("already present: 1; blank or NULL skipped: 47; conflicts: 1; errors: 1"),
        "{out}"
    );
    assert!(
        out.contains(
            "conflict (id_bound_to_other_order): live_user_orders order 100004 column stoploss_id \
             id SL-SHARED belongs to order 100003"
        ),
        "{out}"
    );
    assert!(
        out.contains("error: demo_user_orders order \"900003\" column stoploss_id"),
        "{out}"
    );

    let rows = db.rows().await;
    let expected: &[(&str, &str, &str, &str)] = &[
        ("100001", "100001", "order_id", "active"),
        ("SL-1001", "100001", "stoploss_id", "replaced"),
        ("SL-NEW", "100001", "stoploss_id", "active"),
        ("TP-1001", "100001", "takeprofit_id", "active"),
        ("100002", "100002", "order_id", "active"),
        ("CL-2", "100002", "close_id", "active"),
        ("CN-2", "100002", "cancel_id", "active"),
        ("MD-2", "100002", "modify_id", "active"),
        ("SL-2", "100002", "stoploss_id", "active"),
        ("TP-2", "100002", "takeprofit_id", "active"),
        ("SLC-2", "100002", "stoploss_cancel_id", "active"),
        ("TPC-2", "100002", "takeprofit_cancel_id", "active"),
        ("100003", "100003", "order_id", "active"),
        ("SL-SHARED", "100003", "stoploss_id", "active"),
        ("100004", "100004", "order_id", "active"),
        ("TP-4", "100004", "takeprofit_id", "active"),
        ("100005", "100005", "order_id", "active"),
        ("100006", "100006", "order_id", "active"),
        ("900001", "900001", "order_id", "active"),
        ("DMD-1", "900001", "modify_id", "active"),
        ("DSL-1", "900001", "stoploss_id", "active"),
        ("900002", "900002", "order_id", "active"),
        ("DCL-2", "900002", "close_id", "active"),
        ("900003", "900003", "order_id", "active"),
    ];
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    for (id, order, id_type, status) in expected {
        let row = rows
            .get(*id)
            .unwrap_or_else(|| panic!("{id} missing: {rows:?}"));
        assert_eq!(
            (row.0.as_str(), row.1.as_str(), row.2.as_str()),
            (*order, *id_type, *status),
            "{id}"
        );
        assert_eq!(
            redis
                .get(&format!("global_order_lookup:{id}"))
                .await
                .as_deref(),
            Some(*order),
            "{id} in Redis"
        );
    }
    assert_eq!(rows["SL-1001"].3.as_deref(), Some("SL-NEW"));
    let imported = db
        .count("SELECT COUNT(*) FROM lifecycle_events WHERE kind = 'legacy_id_imported' AND source_topic IS NULL")
        .await;
    assert_eq!(
        imported, 23,
        "one synthetic entry per id (the known order_id as a no-op)"
    );
    common::assert_projections_match_log(&db, &redis).await;
    db.assert_sequences_gap_free().await;

    // A second run changes nothing.
    let log_before = db.log().await;
    let rows_before = db.full_rows().await;
    let (ok, out, err) = order_lifecycle(&db, &redis, &["import-legacy"]);
    assert!(ok, "second import failed:\n{out}\n{err}");
    assert!(out.contains("ids imported: 0 (none)"), "{out}");
    assert!(
        out.contains("already present: 23; blank or NULL skipped: 47; conflicts: 1; errors: 1"),
        "{out}"
    );
    assert_eq!(db.log().await, log_before);
    assert_eq!(db.full_rows().await, rows_before);

    // A dry run reports without writing.
    sqlx::query("INSERT INTO demo_user_orders (order_id, stoploss_id) VALUES ('900004', 'DSL-4')")
        .execute(db.store.pool())
        .await
        .unwrap();
    let (ok, out, _) = order_lifecycle(&db, &redis, &["import-legacy", "--dry-run"]);
    assert!(ok);
    assert!(out.contains("(dry run, nothing written)"), "{out}");
    assert!(
        out.contains("ids imported: 2 (order_id 1, stoploss_id 1)"),
        "{out}"
    );
    assert_eq!(db.log().await, log_before);
    assert!(!db.rows().await.contains_key("DSL-4"));

    redis.cleanup().await;
    db.drop().await;
}

/// 100,000 legacy orders (300,000 ids) through the binary: the peak memory
/// it reports stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_legacy_of_100000_orders_runs_in_bounded_memory() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    create_legacy_tables(&db).await;
    for (table, base, n) in [
        ("live_user_orders", 10_000_000, 60_000),
        ("demo_user_orders", 90_000_000, 40_000),
    ] {
        sqlx::query(&format!(
            "INSERT INTO {table} (order_id, stoploss_id, takeprofit_id) \
             SELECT CAST({base} + seq AS CHAR), CONCAT('SL-', {base} + seq), CONCAT('TP-', {base} + seq) \
             FROM seq_1_to_{n}"
        ))
        .execute(db.store.pool())
        .await
        .expect("seed legacy rows (MariaDB's sequence engine)");
    }
    let (ok, out, err) = order_lifecycle(&db, &redis, &["import-legacy"]);
    assert!(ok, "import-legacy failed:\n{out}\n{err}");
    assert!(out.contains("100,000 orders processed"), "{out}");
    assert!(out.contains("ids imported: 300,000"), "{out}");
    let peak: u64 = out
        .split("peak memory ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no peak memory in {out}"));
    println!("{out}");
    assert!(peak < 200, "peak memory {peak} MiB");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM order_lifecycle_ids").await,
        300_000
    );
    redis.cleanup().await;
    db.drop().await;
}
