//! The operator's commands against a real MariaDB and Redis: `import-legacy`
//! (through the binary, as operators run it) and `verify`.

use order_lifecycle_testkit as common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{TestDb, TestRedis};
use order_lifecycle::ingest::{process_batch, PipelineConfig};
use order_lifecycle::projection::rebuild::RebuildLease;
use order_lifecycle::testing::EventScript;
use order_lifecycle::wire::Encoding;

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
    let out = command(db, redis, args)
        .output()
        .expect("run order-lifecycle");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The binary with `args`, the test's database and Redis prefix.
fn command(db: &TestDb, redis: &TestRedis, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("OL_DATABASE_URL", db.url.expose())
        .env("OL_REDIS_URL", &redis.url)
        .env("OL_REDIS_KEY_PREFIX", &redis.prefix)
        .env("RUST_LOG", "warn");
    if let Some(nodes) = &redis.cluster_nodes {
        command.env("OL_REDIS_CLUSTER_NODES", nodes);
    }
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_legacy_and_verify_work_on_a_redis_cluster() {
    let db = TestDb::new().await;
    let redis = TestRedis::cluster();
    create_legacy_tables(&db).await;
    let orders: Vec<String> = (0..60).map(|i| format!("{}", 300_000 + i)).collect();
    let sl: Vec<String> = orders.iter().map(|o| format!("SL-{o}")).collect();
    let tp: Vec<String> = orders.iter().map(|o| format!("TP-{o}")).collect();
    let rows: Vec<(&str, [Option<&str>; 7])> = orders
        .iter()
        .zip(sl.iter().zip(&tp))
        .map(|(o, (sl, tp))| {
            (
                o.as_str(),
                [
                    None,
                    None,
                    None,
                    Some(sl.as_str()),
                    Some(tp.as_str()),
                    None,
                    None,
                ],
            )
        })
        .collect();
    insert_legacy(&db, "live_user_orders", &rows).await;
    let (ok, out, err) = order_lifecycle(&db, &redis, &["import-legacy"]);
    assert!(ok, "{out}{err}");
    for (order, ids) in orders.iter().zip(sl.iter().zip(&tp)) {
        for id in [order, ids.0, ids.1] {
            assert_eq!(
                redis
                    .get(&format!("global_order_lookup:{id}"))
                    .await
                    .as_deref(),
                Some(order.as_str()),
                "{id} resolves through the cluster"
            );
        }
    }
    // The keys are spread over the masters, and verify reaches them all.
    let (ok, out, err) = order_lifecycle(&db, &redis, &["verify"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("healthy"), "{out}");
    redis_cmd_cluster_del(&redis, &format!("global_order_lookup:{}", sl[7])).await;
    let (ok, out, _) = order_lifecycle(&db, &redis, &["verify"]);
    assert!(!ok, "a missing lookup key is found: {out}");
    let (ok, out, err) = order_lifecycle(&db, &redis, &["verify", "--repair"]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        redis
            .get(&format!("global_order_lookup:{}", sl[7]))
            .await
            .as_deref(),
        Some(orders[7].as_str()),
        "repaired"
    );
    redis.cleanup().await;
    db.drop().await;
}

/// Deletes a key of the test's prefix on the cluster.
async fn redis_cmd_cluster_del(redis: &TestRedis, key: &str) {
    let projection = redis.projection().await;
    let key = format!("{}{key}", redis.prefix);
    assert_eq!(projection.delete(&[&key]).await.expect("DEL"), 1);
}

/// A reader that stops early (`verify --json | head -1`) closes the pipe:
/// the command exits 0 without a panic; and a bad option gets a clear
/// refusal (a duration without a unit, a URL of another database, a flag
/// misspelt) with exit code 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_and_bad_options_end_cleanly() {
    let (db, redis) = healthy_store(620).await;
    let mut child = command(&db, &redis, &["verify", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start verify");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("verify ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    for (args, expected) in [
        (
            &["run", "--session-timeout", "10"][..],
            "\"10\" needs a unit: 10ms, 10s, 10m or 10h",
        ),
        (
            &[
                "verify",
                "--database-url",
                "postgres://u:pw-secret@h:5432/db",
            ][..],
            "\"postgres\" is not one of mysql, mariadb",
        ),
        (
            &["verify", "--repiar"][..],
            "tip: a similar argument exists: '--repair'",
        ),
        (&["verfy"][..], "tip: a similar subcommand exists: 'verify'"),
    ] {
        let out = command(&db, &redis, args).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("pw-secret"), "{args:?}: {stderr}");
    }
    redis.cleanup().await;
    db.drop().await;
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
    let messages = common::inbound_messages(
        "order-events",
        0,
        events.iter().map(|e| (e, Encoding::Protobuf)),
    );
    let pipeline = PipelineConfig {
        offsets_group: Some("import-test".into()),
        park_timeout: Duration::from_secs(60),
        max_parked: order_lifecycle::ingest::pipeline::DEFAULT_MAX_PARKED,
        schema_ids: Vec::new(),
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

/// Two operators running `import-legacy` at once: both succeed, one after
/// the other, and every id is imported once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_imports_at_once_both_succeed_and_import_each_id_once() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    create_legacy_tables(&db).await;
    sqlx::query(
        "INSERT INTO live_user_orders (order_id, stoploss_id, takeprofit_id) \
         SELECT CAST(20000000 + seq AS CHAR), CONCAT('SL-', 20000000 + seq), \
         CONCAT('TP-', 20000000 + seq) FROM seq_1_to_20000",
    )
    .execute(db.store.pool())
    .await
    .expect("seed legacy rows (MariaDB's sequence engine)");
    let runs = std::thread::scope(|s| {
        let import = || s.spawn(|| order_lifecycle(&db, &redis, &["import-legacy"]));
        let (a, b) = (import(), import());
        [a.join().unwrap(), b.join().unwrap()]
    });
    for (ok, out, err) in &runs {
        assert!(ok, "import-legacy failed:\n{out}\n{err}");
    }
    let said = |text: &str| runs.iter().filter(|(_, out, _)| out.contains(text)).count();
    assert_eq!(said("ids imported: 60,000"), 1, "{runs:?}");
    assert_eq!(said("already present: 60,000"), 1, "{runs:?}");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM order_lifecycle_ids").await,
        60_000
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM lifecycle_events").await,
        60_000
    );
    redis.cleanup().await;
    db.drop().await;
}

/// `import-legacy` beside another writer that deadlocks with one of its
/// pages, as `run`'s batches can: the page is applied again once the other
/// writer is done, and the pages after it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_page_that_deadlocks_is_applied_again() {
    let (db, redis) = legacy_orders(&["30000001", "30000002", "30000003"]).await;
    let (ok, out, err) = order_lifecycle(&db, &redis, &["import-legacy"]);
    assert!(ok, "first import failed:\n{out}\n{err}");
    // The next import adds a stop-loss id to each order: the page of the
    // second waits for the rows the other writer holds.
    sqlx::query("UPDATE live_user_orders SET stoploss_id = CONCAT('SL-', order_id)")
        .execute(db.store.pool())
        .await
        .expect("add stop-loss ids");
    let hold = "SELECT id FROM order_lifecycle_ids WHERE order_id = '30000002' FOR UPDATE";
    let (ok, out, err) =
        through_a_deadlock(&db, &redis, hold, &["import-legacy", "--batch-size", "1"]).await;
    assert!(ok, "import-legacy failed:\n{out}\n{err}");
    assert!(
        err.contains("applying a page of the import again") && err.contains("Deadlock"),
        "no page was applied again after a deadlock:\n{err}"
    );
    assert!(out.contains("ids imported: 3"), "{out}");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM order_lifecycle_ids WHERE lifecycle_id LIKE 'SL-%'")
            .await,
        3
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM lifecycle_events").await, 6);
    redis.cleanup().await;
    db.drop().await;
}

/// The page that deadlocks has decided, and the page behind it is in
/// flight, waiting for its commit: both are applied again, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_behind_one_that_deadlocks_is_applied_again_after_it() {
    let (db, redis) = legacy_orders(&["30000001", "30000002"]).await;
    // Touching the log's head: migrations ran.
    let (ok, out, err) = order_lifecycle(&db, &redis, &["verify"]);
    assert!(ok, "verify failed:\n{out}\n{err}");
    // The first page waits for the log's head at its append.
    let hold = "SELECT position FROM log_head FOR UPDATE";
    let (ok, out, err) =
        through_a_deadlock(&db, &redis, hold, &["import-legacy", "--batch-size", "1"]).await;
    assert!(ok, "import-legacy failed:\n{out}\n{err}");
    assert!(
        err.contains("Deadlock") && err.contains("the page ahead of it failed"),
        "the page behind was not applied again after the page ahead:\n{err}"
    );
    assert!(out.contains("ids imported: 2"), "{out}");
    // The pages in their order (the log's positions are dense).
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM lifecycle_events WHERE (position, order_id) IN \
             ((1, '30000001'), (2, '30000002'))"
        )
        .await,
        2
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM order_lifecycle_ids").await,
        2
    );
    redis.cleanup().await;
    db.drop().await;
}

/// The last page deadlocks after it decided, with no page behind it: it is
/// applied again too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_page_that_deadlocks_after_deciding_is_applied_again() {
    let (db, redis) = legacy_orders(&["30000001"]).await;
    let (ok, out, err) = order_lifecycle(&db, &redis, &["verify"]);
    assert!(ok, "verify failed:\n{out}\n{err}");
    let hold = "SELECT position FROM log_head FOR UPDATE";
    let (ok, out, err) = through_a_deadlock(&db, &redis, hold, &["import-legacy"]).await;
    assert!(ok, "import-legacy failed:\n{out}\n{err}");
    assert!(
        err.contains("applying a page of the import again") && err.contains("Deadlock"),
        "the page was not applied again after a deadlock:\n{err}"
    );
    assert!(out.contains("ids imported: 1"), "{out}");
    assert_eq!(db.count("SELECT COUNT(*) FROM lifecycle_events").await, 1);
    redis.cleanup().await;
    db.drop().await;
}

/// A provider's confirmation for a legacy stop-loss reaches a live `run`
/// before the import binds the id, and is parked: the page that binds the
/// id releases it. It used to stay parked (`run` looks again only at what
/// was parked in the last minute) and be dead-lettered at its park timeout
/// as `unknown_lifecycle_id`, its id bound: a lost execution. So is a
/// cancel of another legacy stop-loss, and, right after it, the
/// confirmation that waited for the cancel's own id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_parked_for_an_imported_id_is_released_by_the_import() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    create_legacy_tables(&db).await;
    let stop_loss = |id| [None, None, None, Some(id), None, None, None];
    insert_legacy(
        &db,
        "live_user_orders",
        &[
            ("30000201", [None; 7]),
            ("30000202", stop_loss("SL-LEGACY-1")),
            ("30000203", stop_loss("SL-LEGACY-2")),
        ],
    )
    .await;
    let mut cancelled = EventScript::new("30000203");
    let waiting = [
        EventScript::new("30000202").confirm("SL-LEGACY-1", "EXECUTED"),
        cancelled.cancel_sl("SLC-2", Some("SL-LEGACY-2")),
        cancelled.confirm("SLC-2", "CANCELLED"),
    ];
    let pipeline = PipelineConfig {
        offsets_group: None,
        park_timeout: Duration::from_secs(300),
        max_parked: order_lifecycle::ingest::pipeline::DEFAULT_MAX_PARKED,
        schema_ids: Vec::new(),
    };
    let messages = common::inbound_messages(
        "confirmations",
        0,
        waiting.iter().map(|e| (e, Encoding::Json)),
    );
    let parked = process_batch(&db.store, &pipeline, &messages)
        .await
        .expect("the events' batch");
    assert_eq!(parked.parked, 3, "each waits for its id");

    let (ok, out, err) = order_lifecycle(&db, &redis, &["import-legacy", "--batch-size", "1"]);
    assert!(ok, "import-legacy failed:\n{out}\n{err}");
    assert!(
        out.contains("parked events released (they waited for an imported id): 3"),
        "{out}"
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM parked_events").await, 0);
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters").await, 0);
    let rows = db.rows().await;
    let row = |id: &str| {
        let (order, id_type, status, _) = &rows[id];
        (order.clone(), id_type.clone(), status.clone())
    };
    let expected = |order: &str, id_type: &str, status: &str| {
        (order.to_owned(), id_type.to_owned(), status.to_owned())
    };
    assert_eq!(
        row("SL-LEGACY-1"),
        expected("30000202", "stoploss_id", "executed"),
        "the execution is applied"
    );
    assert_eq!(
        row("SLC-2"),
        expected("30000203", "stoploss_cancel_id", "executed"),
        "the cancel, then its confirmation"
    );
    common::assert_projections_match_log(&db, &redis).await;
    let (ok, out, _) = order_lifecycle(&db, &redis, &["verify"]);
    assert!(ok, "{out}");
    redis.cleanup().await;
    db.drop().await;
}

/// A test database whose legacy live orders table holds `orders`, with no
/// ids but their own.
async fn legacy_orders(orders: &[&str]) -> (TestDb, TestRedis) {
    let db = TestDb::new().await;
    create_legacy_tables(&db).await;
    let rows: Vec<_> = orders.iter().map(|o| (*o, [None; 7])).collect();
    insert_legacy(&db, "live_user_orders", &rows).await;
    (db, TestRedis::new())
}

/// Runs the binary with `args` while another writer, heavier than any
/// transaction of the command (InnoDB rolls back the lighter transaction of
/// a deadlock), holds what `hold` locks. Once the command waits for it, the
/// writer asks for the lock that import pages and repair chunks hold shared
/// (the projection lock, as a rebuild's swap does): a deadlock, whose
/// victim is the command's transaction; then the writer ends. Returns
/// (exit success, stdout, stderr).
async fn through_a_deadlock(
    db: &TestDb,
    redis: &TestRedis,
    hold: &str,
    args: &[&str],
) -> (bool, String, String) {
    let pool = db.store.pool();
    sqlx::query("CREATE TABLE ballast (id INT PRIMARY KEY, v INT NOT NULL)")
        .execute(pool)
        .await
        .expect("create ballast");
    sqlx::query("INSERT INTO ballast SELECT seq, 0 FROM seq_1_to_2000")
        .execute(pool)
        .await
        .expect("fill ballast");
    let mut other = pool.begin().await.expect("begin");
    sqlx::query("UPDATE ballast SET v = v + 1")
        .execute(&mut *other)
        .await
        .expect("weigh the other writer");
    sqlx::query(hold)
        .fetch_all(&mut *other)
        .await
        .expect("take the other writer's lock");
    let import = command(db, redis, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    let waiting = "SELECT COUNT(*) FROM information_schema.INNODB_TRX AS t \
                   JOIN information_schema.PROCESSLIST AS p ON p.ID = t.trx_mysql_thread_id \
                   WHERE t.trx_state = 'LOCK WAIT' AND p.DB = DATABASE()";
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while db.count(waiting).await == 0 {
        if std::time::Instant::now() >= deadline {
            other.rollback().await.expect("rollback");
            let out = import.wait_with_output().expect("wait");
            panic!(
                "the command never waited for the other writer:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // What INNODB_TRX shows is refreshed only once it is 0.1 s old.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The page behind, if any, reaches its wait for the page ahead.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("SELECT id FROM projection_lock WHERE id = 1 FOR UPDATE")
        .fetch_all(&mut *other)
        .await
        .expect("the other writer wins the deadlock");
    tokio::time::sleep(Duration::from_millis(300)).await;
    other.rollback().await.expect("rollback");
    let out = tokio::task::spawn_blocking(move || import.wait_with_output())
        .await
        .expect("join")
        .expect("wait for the command");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `verify --repair` beside another writer that deadlocks with one of its
/// chunks, as a live `run`'s batch can: the chunk is repaired again once
/// the other writer is done, and the store ends healthy (it used to stop
/// with exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_chunk_that_deadlocks_is_repaired_again() {
    let (db, redis) = healthy_store(620).await;
    let (deleted, order) = some_row(&db, "id_type = 'takeprofit_id'").await;
    exec(
        &db,
        &format!("DELETE FROM order_lifecycle_ids WHERE lifecycle_id = '{deleted}'"),
    )
    .await;
    // The repair's chunk waits for the order's other rows.
    let hold = format!("SELECT id FROM order_lifecycle_ids WHERE order_id = '{order}' FOR UPDATE");
    let (ok, out, err) = through_a_deadlock(&db, &redis, &hold, &["verify", "--repair"]).await;
    assert!(ok, "verify --repair did not end healthy:\n{out}\n{err}");
    assert!(
        err.contains("verify --repair: orders") && err.contains("Deadlock"),
        "the chunk was not repaired again after a deadlock:\n{err}"
    );
    assert!(out.contains("repaired: 1 orders re-projected"), "{out}");
    assert!(out.contains("ok   mysql_matches_log"), "{out}");
    assert_eq!(
        db.rows().await[&deleted].0,
        order,
        "the deleted row is back"
    );
    common::assert_projections_match_log(&db, &redis).await;
    redis.cleanup().await;
    db.drop().await;
}

/// A healthy store: a realistic stream through the pipeline, Redis caught up.
async fn healthy_store(seed: u64) -> (TestDb, TestRedis) {
    store_of(20, seed).await
}

/// A store holding `orders` realistic lifecycles, Redis projected.
async fn store_of(orders: usize, seed: u64) -> (TestDb, TestRedis) {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let pipeline = PipelineConfig {
        offsets_group: Some("verify-test".into()),
        park_timeout: Duration::from_secs(60),
        max_parked: order_lifecycle::ingest::pipeline::DEFAULT_MAX_PARKED,
        schema_ids: Vec::new(),
    };
    let events = common::stream(orders, seed);
    let messages =
        common::inbound_messages("order-events", 0, events.iter().map(|(e, enc)| (e, *enc)));
    for chunk in messages.chunks(100) {
        process_batch(&db.store, &pipeline, chunk)
            .await
            .expect("healthy batch");
    }
    let projection = redis.projection().await;
    order_lifecycle::projection::rebuild::catch_up_to_head(&db.store, &projection, "test")
        .await
        .expect("redis catch-up");
    (db, redis)
}

fn verify_config(
    db: &TestDb,
    redis: &TestRedis,
    repair: bool,
) -> order_lifecycle::commands::verify::VerifyConfig {
    order_lifecycle::commands::verify::VerifyConfig {
        database: order_lifecycle::config::DatabaseConfig {
            url: db.url.clone(),
            max_connections: 4,
        },
        redis: order_lifecycle::config::RedisConfig {
            url: order_lifecycle::config::SecretUrl::new(redis.url.clone()),
            cluster_nodes: Vec::new(),
            key_prefix: redis.prefix.clone(),
            tls: Default::default(),
        },
        tables: order_lifecycle::config::LegacyTables {
            live: "live_user_orders".into(),
            demo: "demo_user_orders".into(),
        },
        examples: 5,
        json: false,
        repair,
        remove_unexplained_keys: false,
    }
}

async fn run_verify(
    db: &TestDb,
    redis: &TestRedis,
) -> order_lifecycle::commands::verify::HealthReport {
    order_lifecycle::commands::verify::verify(
        &db.store,
        &redis.projection().await,
        &verify_config(db, redis, false),
    )
    .await
    .expect("verify runs")
}

async fn exec(db: &TestDb, sql: &str) -> u64 {
    sqlx::query(sql)
        .execute(db.store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .rows_affected()
}

/// Runs `command` on the key `prefix + key`, with `args` after it.
async fn redis_cmd(redis: &TestRedis, command: &str, key: &str, args: &[&str]) {
    let mut conn = redis
        .client
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut cmd = redis::cmd(command);
    cmd.arg(format!("{}{key}", redis.prefix));
    for a in args {
        cmd.arg(*a);
    }
    let _: redis::Value = cmd.query_async(&mut conn).await.unwrap();
}

/// One row's `(lifecycle_id, order_id)` matching `filter`.
async fn some_row(db: &TestDb, filter: &str) -> (String, String) {
    let row: (String, String) = sqlx::query_as(&format!(
        "SELECT CAST(lifecycle_id AS CHAR), CAST(order_id AS CHAR) FROM order_lifecycle_ids \
         WHERE {filter} ORDER BY lifecycle_id LIMIT 1"
    ))
    .fetch_one(db.store.pool())
    .await
    .unwrap_or_else(|e| panic!("a row where {filter}: {e}"));
    row
}

fn assert_fails(report: &order_lifecycle::commands::verify::HealthReport, name: &str, count: u64) {
    use order_lifecycle::commands::verify::Status;
    let check = report
        .check(name)
        .unwrap_or_else(|| panic!("no check {name}"));
    assert_eq!(
        (check.status, check.count),
        (Status::Fail, count),
        "{name}: {check:?}"
    );
    assert!(!report.healthy);
    assert!(!check.examples.is_empty(), "{name} names examples");
}

/// A healthy store passes every check; the binary exits 0 and prints JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_a_healthy_store() {
    let (db, redis) = healthy_store(600).await;
    let (ok, out, err) = order_lifecycle(&db, &redis, &["verify", "--json"]);
    assert!(ok, "verify failed on a healthy store:\n{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(report["healthy"], true);
    let statuses: Vec<(String, String)> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect = |name: &str, status: &str| (name.to_owned(), status.to_owned());
    assert_eq!(
        statuses,
        vec![
            expect("one_active_per_type", "pass"),
            expect("orphan_ids", "skip"),
            expect("mysql_matches_log", "pass"),
            expect("redis_follows_log", "pass"),
            expect("redis_lookup_keys", "pass"),
            expect("redis_active_ids", "pass"),
            expect("sequences", "pass"),
            expect("parked_overdue", "pass"),
            expect("parking_lot_count", "pass"),
            expect("dead_letters", "pass"),
        ]
    );
    // With the legacy tables holding every order, the orphan check runs and passes.
    create_legacy_tables(&db).await;
    exec(
        &db,
        "INSERT INTO live_user_orders (order_id) SELECT DISTINCT order_id FROM order_lifecycle_ids",
    )
    .await;
    let report = run_verify(&db, &redis).await;
    assert!(report.healthy, "{report:?}");
    assert_eq!(
        report.check("orphan_ids").unwrap().status,
        order_lifecycle::commands::verify::Status::Pass
    );
    redis.cleanup().await;
    db.drop().await;
}

/// Each check, given its fault, fails with the right count; the binary
/// exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_verify_check_fails_on_its_fault_with_the_right_count() {
    // More than one active id per (order, type).
    let (db, redis) = healthy_store(601).await;
    let (id, _) = some_row(&db, "status = 'replaced'").await;
    exec(&db, &format!("UPDATE order_lifecycle_ids SET status = 'active', replaced_by = NULL WHERE lifecycle_id = '{id}'")).await;
    assert_fails(&run_verify(&db, &redis).await, "one_active_per_type", 1);
    let (ok, out, _) = order_lifecycle(&db, &redis, &["verify"]);
    assert!(!ok, "exit code must say unhealthy:\n{out}");
    assert!(out.contains("FAIL one_active_per_type"), "{out}");
    redis.cleanup().await;
    db.drop().await;

    // Ids whose order is in neither legacy table.
    let (db, redis) = healthy_store(602).await;
    create_legacy_tables(&db).await;
    let (_, orphan) = some_row(&db, "1 = 1").await;
    exec(&db, &format!("INSERT INTO demo_user_orders (order_id) SELECT DISTINCT order_id FROM order_lifecycle_ids WHERE order_id <> '{orphan}'")).await;
    let ids_of_orphan = db
        .count(&format!(
            "SELECT COUNT(*) FROM order_lifecycle_ids WHERE order_id = '{orphan}'"
        ))
        .await;
    assert_fails(
        &run_verify(&db, &redis).await,
        "orphan_ids",
        ids_of_orphan as u64,
    );
    redis.cleanup().await;
    db.drop().await;

    // MySQL rows that differ from the log: one deleted, one status changed.
    let (db, redis) = healthy_store(603).await;
    let (deleted, order_a) = some_row(&db, "id_type = 'stoploss_id'").await;
    exec(
        &db,
        &format!("DELETE FROM order_lifecycle_ids WHERE lifecycle_id = '{deleted}'"),
    )
    .await;
    let (changed, _) = some_row(&db, &format!("order_id <> '{order_a}'")).await;
    exec(
        &db,
        &format!(
            "UPDATE order_lifecycle_ids SET status = IF(status = 'executed', 'cancelled', 'executed') \
             WHERE lifecycle_id = '{changed}'"
        ),
    )
    .await;
    assert_fails(&run_verify(&db, &redis).await, "mysql_matches_log", 2);
    redis.cleanup().await;
    db.drop().await;

    // Lookup keys: one missing, one wrong, one for no id.
    let (db, redis) = healthy_store(604).await;
    let (gone, _) = some_row(&db, "id_type = 'takeprofit_id'").await;
    let (altered, _) = some_row(&db, "id_type = 'order_id'").await;
    redis_cmd(&redis, "DEL", &format!("global_order_lookup:{gone}"), &[]).await;
    redis_cmd(
        &redis,
        "SET",
        &format!("global_order_lookup:{altered}"),
        &["999"],
    )
    .await;
    redis_cmd(&redis, "SET", "global_order_lookup:NO-SUCH-ID", &["1"]).await;
    let report = run_verify(&db, &redis).await;
    assert_fails(&report, "redis_lookup_keys", 3);
    assert_eq!(
        report.check("redis_lookup_keys").unwrap().note.as_deref(),
        Some("1 missing, 1 wrong, 1 extra")
    );
    redis.cleanup().await;
    db.drop().await;

    // Active-id hashes: one missing, one wrong, one for an order without active ids.
    let (db, redis) = healthy_store(605).await;
    let (_, order_a) = some_row(&db, "status = 'active'").await;
    let (_, order_b) = some_row(
        &db,
        &format!("status = 'active' AND order_id <> '{order_a}'"),
    )
    .await;
    redis_cmd(
        &redis,
        "DEL",
        &format!("order_lifecycle_active:{order_a}"),
        &[],
    )
    .await;
    redis_cmd(
        &redis,
        "HSET",
        &format!("order_lifecycle_active:{order_b}"),
        &["stoploss_id", "NOT-IT"],
    )
    .await;
    redis_cmd(
        &redis,
        "HSET",
        "order_lifecycle_active:NO-SUCH-ORDER",
        &["order_id", "x"],
    )
    .await;
    let report = run_verify(&db, &redis).await;
    assert_fails(&report, "redis_active_ids", 3);
    assert_eq!(
        report.check("redis_active_ids").unwrap().note.as_deref(),
        Some("1 missing, 1 wrong, 1 extra")
    );
    redis.cleanup().await;
    db.drop().await;

    // A gap in an order's sequence (the log only takes inserts).
    let (db, redis) = healthy_store(606).await;
    let (_, order) = some_row(&db, "1 = 1").await;
    exec(&db, &format!(
        "INSERT INTO lifecycle_events (position, order_id, seq, event_id, kind, outcome, transitions, payload, occurred_at_ms) \
         SELECT (SELECT position + 1 FROM log_head), order_id, MAX(seq) + 2, 'gap-event', 'order_placed', 'duplicate', '[]', '{{}}', 1 \
         FROM lifecycle_events WHERE order_id = '{order}' GROUP BY order_id"
    )).await;
    exec(&db, "UPDATE log_head SET position = position + 1").await;
    assert_fails(&run_verify(&db, &redis).await, "sequences", 1);
    redis.cleanup().await;
    db.drop().await;

    // Redis following another log (its record names another log identity,
    // as after the database was recreated): reported, and --repair
    // re-projects it from the start.
    let (db, redis) = healthy_store(608).await;
    redis_cmd(
        &redis,
        "HSET",
        "order_lifecycle:projection",
        &["log_id", "another-log"],
    )
    .await;
    assert_fails(&run_verify(&db, &redis).await, "redis_follows_log", 1);
    let (ok, out, err) = order_lifecycle(&db, &redis, &["verify", "--repair"]);
    assert!(ok, "verify --repair did not end healthy:\n{out}\n{err}");
    assert!(out.contains("log entries re-projected into Redis"), "{out}");
    redis.cleanup().await;
    db.drop().await;

    // Parked events past their limit, and dead letters stuck in the outbox.
    let (db, redis) = healthy_store(607).await;
    // The consumer is caught up (stream time now); the limits passed two
    // minutes of stream time ago.
    exec(
        &db,
        "UPDATE consumer_offsets SET stream_time_ms = UNIX_TIMESTAMP() * 1000",
    )
    .await;
    for i in 0..2 {
        exec(&db, &format!(
            "INSERT INTO parked_events (awaited_id, event_id, event, source_topic, source_partition, \
             source_offset, expires_at_ms) VALUES ('SL-LATE', 'late-{i}', '{{}}', 'order-events', 0, {i}, \
             UNIX_TIMESTAMP() * 1000 - 120000)"
        )).await;
    }
    exec(&db,
        "INSERT INTO dead_letters (source_topic, source_partition, source_offset, reason, error, created_at) \
         VALUES ('order-events', 0, 1, 'undecodable_json', 'x', NOW(3) - INTERVAL 10 MINUTE), \
                ('order-events', 0, 2, 'undecodable_json', 'x', NOW(3))",
    ).await;
    let report = run_verify(&db, &redis).await;
    assert_fails(&report, "parked_overdue", 2);
    // Rows written by hand, past the kept count.
    assert_fails(&report, "parking_lot_count", 2);
    assert_fails(&report, "dead_letters", 1);
    assert_eq!(
        report.check("dead_letters").unwrap().note.as_deref(),
        Some("by reason: undecodable_json 2")
    );
    redis.cleanup().await;
    db.drop().await;
}

/// `--repair` re-projects the orders found wrong: a corrupted store passes
/// again, and equals the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_repair_makes_a_corrupted_store_pass() {
    let (db, redis) = healthy_store(610).await;
    let (replaced, _) = some_row(&db, "status = 'replaced'").await;
    exec(&db, &format!("UPDATE order_lifecycle_ids SET status = 'active', replaced_by = NULL WHERE lifecycle_id = '{replaced}'")).await;
    let (deleted, _) = some_row(&db, "id_type = 'takeprofit_id'").await;
    exec(
        &db,
        &format!("DELETE FROM order_lifecycle_ids WHERE lifecycle_id = '{deleted}'"),
    )
    .await;
    exec(&db, "INSERT INTO order_lifecycle_ids (order_id, id_type, lifecycle_id, status, created_at, updated_at, issued_seq, updated_seq) \
               VALUES ('NO-LOG-ORDER', 'order_id', 'NO-LOG-ORDER', 'active', NOW(), NOW(), 1, 1)").await;
    let (gone, _) = some_row(
        &db,
        "id_type = 'order_id' AND lifecycle_id <> 'NO-LOG-ORDER'",
    )
    .await;
    redis_cmd(&redis, "DEL", &format!("global_order_lookup:{gone}"), &[]).await;
    redis_cmd(&redis, "SET", "global_order_lookup:NO-SUCH-ID", &["1"]).await;
    redis_cmd(
        &redis,
        "HSET",
        "order_lifecycle_active:NO-SUCH-ORDER",
        &["order_id", "x"],
    )
    .await;
    // The parking lot's count drifted (rows deleted by hand).
    exec(&db, "UPDATE parking_lot SET parked = 5 WHERE id = 1").await;
    let before = run_verify(&db, &redis).await;
    assert!(!before.healthy);
    assert_fails(&before, "parking_lot_count", 5);

    // The lookup key no id accounts for may be the legacy platform's: kept
    // and still reported unless the operator asks for its removal.
    let (ok, out, _) = order_lifecycle(&db, &redis, &["verify", "--repair"]);
    assert!(!ok, "the unexplained key is still there:\n{out}");
    assert!(
        out.contains("1 stray Redis keys removed, 1 unexplained lookup keys kept"),
        "{out}"
    );
    assert!(out.contains("the parking lot recounted"), "{out}");
    assert!(out.contains("ok   parking_lot_count"), "{out}");
    assert!(
        out.contains("global_order_lookup:NO-SUCH-ID belongs to no id"),
        "{out}"
    );
    assert!(out.contains("ok   mysql_matches_log"), "{out}");
    assert!(out.contains("ok   redis_active_ids"), "{out}");
    assert_eq!(
        redis.get("global_order_lookup:NO-SUCH-ID").await.as_deref(),
        Some("1")
    );
    let (ok, out, err) = order_lifecycle(
        &db,
        &redis,
        &["verify", "--repair", "--remove-unexplained-keys"],
    );
    assert!(ok, "verify --repair did not end healthy:\n{out}\n{err}");
    assert!(
        out.contains("1 stray Redis keys removed, 0 unexplained lookup keys kept"),
        "{out}"
    );
    assert_eq!(redis.get("global_order_lookup:NO-SUCH-ID").await, None);
    let (ok, out, _) = order_lifecycle(&db, &redis, &["verify"]);
    assert!(ok, "{out}");
    assert!(!db.rows().await.contains_key("NO-LOG-ORDER"));
    common::assert_projections_match_log(&db, &redis).await;
    redis.cleanup().await;
    db.drop().await;
}

/// Two `rebuild --target mysql` at once never wipe the read model: one holds
/// the rebuild lease and replaces it, the other refuses at once (exit 75)
/// and changes nothing; the leftovers of a crashed rebuild are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rebuilds_at_once_never_wipe_the_read_model() {
    let (db, redis) = store_of(400, 41).await;
    let before = db.rows().await;
    assert!(before.len() > 1_000, "{} rows", before.len());
    // A rebuild killed between its swap and its drop left the retired
    // table; one killed while filling left its shadow table.
    exec(
        &db,
        "CREATE TABLE order_lifecycle_ids_retired LIKE order_lifecycle_ids",
    )
    .await;
    exec(
        &db,
        "CREATE TABLE order_lifecycle_ids_rebuild LIKE order_lifecycle_ids",
    )
    .await;

    // While another holder has the lease: refused at once, nothing touched.
    {
        let _held = RebuildLease::acquire(&db.store).await.expect("the lease");
        let out = command(&db, &redis, &["rebuild", "--target", "mysql"])
            .output()
            .expect("run rebuild");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{stderr}");
        assert!(
            stderr.contains("another rebuild of this database is running"),
            "{stderr}"
        );
        assert_eq!(db.rows().await, before);
        assert!(
            matches!(
                RebuildLease::acquire(&db.store).await,
                Err(order_lifecycle::projection::rebuild::RebuildError::Busy)
            ),
            "a second holder in this process is refused too"
        );
    }

    // Two started together, a few times: each ends done (0) or refused
    // (75), at least one does the work, and the read model stays whole.
    let mut refused = 0;
    for round in 0..3 {
        let children: Vec<_> = (0..2)
            .map(|_| {
                command(&db, &redis, &["rebuild", "--target", "mysql"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("start rebuild")
            })
            .collect();
        let codes: Vec<Option<i32>> = children
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().expect("rebuild ends");
                let code = out.status.code();
                assert!(
                    matches!(code, Some(0) | Some(75)),
                    "round {round}: exit {code:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                code
            })
            .collect();
        assert!(codes.contains(&Some(0)), "round {round}: {codes:?}");
        refused += codes.iter().filter(|c| **c == Some(75)).count();
        assert_eq!(
            db.rows().await,
            before,
            "round {round}: the read model is whole"
        );
    }
    println!("{refused} of 6 rebuilds refused for the lease");
    let leftovers = db
        .count(
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() \
             AND TABLE_NAME IN ('order_lifecycle_ids_retired', 'order_lifecycle_ids_rebuild')",
        )
        .await;
    assert_eq!(leftovers, 0, "a crashed rebuild's tables are gone");
}

/// Orders whose ids differ in case ("a…" and "B…") sort one way by the
/// column's binary collation and another case-insensitively: verify pages
/// through them in the column's own order, so a missing hash of a "B" order
/// is found (paging in another order skipped every "B" order past page one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_pages_mixed_case_orders_without_skipping() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let pipeline = PipelineConfig {
        offsets_group: Some("verify-test".into()),
        park_timeout: Duration::from_secs(60),
        max_parked: order_lifecycle::ingest::pipeline::DEFAULT_MAX_PARKED,
        schema_ids: Vec::new(),
    };
    let events: Vec<order_lifecycle::domain::OrderEvent> = (0..600)
        .flat_map(|i| {
            [
                EventScript::new(&format!("a{i:04}")).place(),
                EventScript::new(&format!("B{i:04}")).place(),
            ]
        })
        .collect();
    let messages = common::inbound_messages(
        "order-events",
        0,
        events.iter().map(|e| (e, Encoding::Protobuf)),
    );
    for chunk in messages.chunks(500) {
        process_batch(&db.store, &pipeline, chunk).await.unwrap();
    }
    let projection = redis.projection().await;
    order_lifecycle::projection::rebuild::catch_up_to_head(&db.store, &projection, "test")
        .await
        .unwrap();
    assert!(run_verify(&db, &redis).await.healthy);
    redis_cmd(&redis, "DEL", "order_lifecycle_active:B0300", &[]).await;
    let report = run_verify(&db, &redis).await;
    assert_fails(&report, "redis_active_ids", 1);
    redis.cleanup().await;
    db.drop().await;
}

/// Legacy values that are not UTF-8 (binary columns) are reported as errors
/// with their bytes, never converted lossily into an id nobody issued; the
/// rest of the row and of the table is imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_legacy_reports_values_that_are_not_utf8() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    create_legacy_tables(&db).await;
    exec(
        &db,
        "ALTER TABLE live_user_orders MODIFY order_id VARBINARY(64) NOT NULL, \
         MODIFY stoploss_id VARBINARY(64) NULL",
    )
    .await;
    exec(
        &db,
        "INSERT INTO live_user_orders (order_id, stoploss_id, takeprofit_id) VALUES \
         ('200001', X'FFFE41', 'TP-200001'), (X'C328', 'SL-X', NULL), ('200002', 'SL-200002', NULL)",
    )
    .await;
    let (ok, out, err) = order_lifecycle(&db, &redis, &["import-legacy"]);
    assert!(ok, "import-legacy failed:\n{out}\n{err}");
    assert!(out.contains("errors: 2"), "{out}");
    assert!(
        out.contains("is not UTF-8 (3 bytes, starting fffe41)"),
        "{out}"
    );
    assert!(
        out.contains("is not UTF-8 (2 bytes, starting c328)"),
        "{out}"
    );
    let rows = db.rows().await;
    for imported in ["200001", "TP-200001", "200002", "SL-200002"] {
        assert!(rows.contains_key(imported), "{imported} imported: {rows:?}");
    }
    assert_eq!(rows.len(), 4, "nothing lossy: {rows:?}");
    redis.cleanup().await;
    db.drop().await;
}

/// The Kubernetes manifests under `deploy/kubernetes` fit the service: the
/// ConfigMap's and the example Secret's keys and values are settings
/// `run` accepts (given to it as a configuration file), the probes are its
/// health routes on the port it listens on, and the Service, the
/// PodDisruptionBudget and `envFrom` point at what the manifests define.
#[test]
fn the_kubernetes_manifests_match_the_service() {
    use yaml_rust2::{Yaml, YamlLoader};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let load = |file: &str| -> Yaml {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let mut docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(docs.len(), 1, "{file}: one document");
        docs.remove(0)
    };
    let (config_map, secret) = (load("configmap.yaml"), load("secret.example.yaml"));
    let (deployment, service, pdb) = (
        load("deployment.yaml"),
        load("service.yaml"),
        load("pdb.yaml"),
    );
    assert_eq!(config_map["kind"].as_str(), Some("ConfigMap"));
    assert_eq!(secret["kind"].as_str(), Some("Secret"));
    assert_eq!(deployment["kind"].as_str(), Some("Deployment"));
    assert_eq!(service["kind"].as_str(), Some("Service"));
    assert_eq!(pdb["kind"].as_str(), Some("PodDisruptionBudget"));

    // Every setting, as `run` reads it: an unknown name or a bad value
    // fails here as it would fail the pod.
    let mut settings = String::new();
    for (map, key) in [(&config_map, "data"), (&secret, "stringData")] {
        for (name, value) in map[key].as_hash().expect(key) {
            let (name, value) = (
                name.as_str().unwrap(),
                value.as_str().expect("a string value"),
            );
            assert!(name.starts_with("OL_"), "{name}");
            settings.push_str(&format!("{name}={value}\n"));
        }
    }
    let file = std::env::temp_dir().join(format!("olt-k8s-{}.env", std::process::id()));
    std::fs::write(&file, &settings).unwrap();
    let parsed = order_lifecycle::commands::parse_from(
        ["order-lifecycle", "run"],
        Some(file.clone().into()),
    );
    let _ = std::fs::remove_file(&file);
    let cli = parsed.unwrap_or_else(|e| panic!("the manifests' settings: {e}"));
    let order_lifecycle::commands::Command::Run(run) = cli.command else {
        panic!("not run")
    };
    let listen = run.http.listen.0.expect("the API listens");

    let pod = &deployment["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["args"][0].as_str(), Some("run"));
    let ports = container["ports"].as_vec().expect("ports");
    let http = ports
        .iter()
        .find(|p| p["name"].as_str() == Some("http"))
        .expect("a port named http");
    assert_eq!(
        http["containerPort"].as_i64(),
        Some(i64::from(listen.port()))
    );
    assert!(
        listen.ip().is_unspecified(),
        "the pod listens on every address: {listen}"
    );
    let routes: Vec<&str> = order_lifecycle::http::ROUTES
        .iter()
        .map(|(_, r)| *r)
        .collect();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert!(routes.contains(&path));
        assert_eq!(get["port"].as_str(), Some("http"), "{probe}");
    }
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(listen.port().to_string().as_str())
    );
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
    assert!(routes.contains(&"/metrics"));
    assert!(container["resources"]["requests"]["memory"]
        .as_str()
        .is_some());
    assert!(container["resources"]["limits"]["memory"]
        .as_str()
        .is_some());
    let sources = container["envFrom"].as_vec().expect("envFrom");
    assert_eq!(
        sources[0]["configMapRef"]["name"],
        config_map["metadata"]["name"]
    );
    assert_eq!(sources[1]["secretRef"]["name"], secret["metadata"]["name"]);

    let labels = &pod["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&service["spec"]["selector"], labels);
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("http")
    );
    // Shutdown finishes within the grace period.
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap();
    assert!(
        run.shutdown_timeout.as_secs() < grace as u64,
        "{:?} vs {grace}s",
        run.shutdown_timeout
    );
}

/// The fields of each message of `proto/order_event.proto`, in order.
fn proto_messages() -> std::collections::BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/order_event.proto"),
    )
    .unwrap();
    let mut messages = std::collections::BTreeMap::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in text.lines() {
        if let Some(name) = line
            .strip_prefix("message ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            current = Some((name.to_owned(), Vec::new()));
        } else if line == "}" {
            let (name, fields) = current.take().expect("a message ends");
            messages.insert(name, fields);
        } else if let Some((_, fields)) = current.as_mut() {
            let line = line.trim();
            if line.starts_with("//") || !line.ends_with(';') || !line.contains(" = ") {
                continue;
            }
            let declaration = line.split(" = ").next().unwrap();
            fields.push(declaration.rsplit(' ').next().unwrap().to_owned());
        }
    }
    messages
}

/// `asyncapi.yaml` describes what the service really reads and writes: the
/// `OrderEvent` schema and each kind's have exactly the proto's fields (the
/// import's own kind excepted: refused on a topic), the dead-letter headers
/// are exactly those the publisher writes, and the channels are the
/// default topics.
#[test]
fn the_asyncapi_description_matches_the_proto_and_the_dead_letter_code() {
    use yaml_rust2::{Yaml, YamlLoader};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("asyncapi.yaml")).unwrap();
    let doc = YamlLoader::load_from_str(&text).unwrap().remove(0);
    assert_eq!(doc["asyncapi"].as_str(), Some("3.0.0"));
    let keys = |y: &Yaml| -> Vec<String> {
        y.as_hash()
            .expect("a mapping")
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    };
    let proto = proto_messages();
    let schemas = &doc["components"]["schemas"];
    let event = &schemas["OrderEvent"]["properties"];
    let mut expected = proto["OrderEvent"].clone();
    expected.retain(|f| f != "legacy_id_imported");
    assert_eq!(keys(event), expected);
    let mut described = 0;
    for field in &expected {
        let Some(reference) = event[field.as_str()]["$ref"].as_str() else {
            continue;
        };
        let kind = reference.rsplit('/').next().unwrap();
        assert_eq!(
            keys(&schemas[kind]["properties"]),
            proto[kind],
            "the fields of {kind}"
        );
        described += 1;
    }
    assert_eq!(described, 9, "every kind a topic may carry");
    assert!(schemas["LegacyIdImported"].is_badvalue());

    let code = std::fs::read_to_string(root.join("src/ingest/dead_letter.rs")).unwrap();
    let mut written: Vec<String> = code
        .split("key: \"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().to_owned())
        .collect();
    written.push(order_lifecycle::wire::CONTENT_TYPE_HEADER.to_owned());
    written.sort();
    let mut documented =
        keys(&doc["components"]["messages"]["DeadLetter"]["headers"]["properties"]);
    documented.sort();
    assert_eq!(documented, written);

    let cli = order_lifecycle::commands::parse_from(["order-lifecycle", "run"], None).unwrap();
    let order_lifecycle::commands::Command::Run(run) = cli.command else {
        panic!("not run")
    };
    let address = |channel: &str| {
        doc["channels"][channel]["address"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        run.input.topics,
        [address("orderEvents"), address("providerConfirmations")]
    );
    assert_eq!(run.dead_letter_topic, address("deadLetters"));
}
