//! The batch pipeline and the Redis follower against a fresh MariaDB
//! database and Redis key prefix per test, without Kafka: parking (R7),
//! idempotence (R9), the append-only log (R8), hostile input.

use order_lifecycle_testkit as common;

use std::time::Duration;

use common::{TestDb, TestRedis};
use order_lifecycle::commands::redrive::{redrive_all, RedriveConfig, RedriveSummary};
use order_lifecycle::domain::OrderEvent;
use order_lifecycle::ingest::order_cache::OrderCache;
use order_lifecycle::ingest::overlap;
use order_lifecycle::ingest::{
    expire_parked, process_batch, process_batch_in_turn, BatchOutcome, PipelineConfig, Turn,
};
use order_lifecycle::projection::redis_follower;
use order_lifecycle::store::redis_projection::RedisProjection;
use order_lifecycle::store::stray_keys::UnexplainedKeys;
use order_lifecycle::store::Store;
use order_lifecycle::testing::EventScript;
use order_lifecycle::wire::InboundMessage;
use order_lifecycle::wire::{self, Encoding};

fn config(park_timeout: Duration) -> PipelineConfig {
    PipelineConfig {
        offsets_group: Some("store-tests".into()),
        park_timeout,
        max_parked: order_lifecycle::ingest::pipeline::DEFAULT_MAX_PARKED,
        schema_ids: Vec::new(),
    }
}

/// A pipeline whose parking lot holds `max_parked` events in all (events
/// wait an hour).
fn parking_lot_of(max_parked: u64) -> PipelineConfig {
    PipelineConfig {
        max_parked,
        ..config(Duration::from_secs(3600))
    }
}

/// Messages at consecutive offsets of one partition, starting at `first`.
fn messages(topic: &str, first: i64, events: &[OrderEvent]) -> Vec<InboundMessage> {
    common::inbound_messages(topic, first, events.iter().map(|e| (e, Encoding::Protobuf)))
}

#[tokio::test]
async fn early_confirmations_are_parked_durably_and_applied_in_arrival_order() {
    let db = TestDb::new().await;
    let cfg = config(Duration::from_secs(60));
    let mut s = EventScript::new("P1");
    let place = s.place();
    let ack = s.confirm("SL1", "NEW");
    let exec = s.confirm("SL1", "EXECUTED");
    let cancel = s.cancel_sl("SLC1", Some("SL9"));
    let sl = s.sl("SL1");

    let report = process_batch(&db.store, &cfg, &messages("c", 0, &[ack, exec, cancel]))
        .await
        .unwrap();
    assert_eq!((report.parked, report.recorded_total()), (3, 0));
    assert!(report.dead_letters.is_empty());

    // A new connection pool, as after a restart: the parked events are there.
    let store = Store::connect(&db.url, 2).await.unwrap();
    let report = process_batch(&store, &cfg, &messages("o", 0, &[place, sl]))
        .await
        .unwrap();
    assert_eq!(report.unparked, 2, "the two confirmations of SL1");
    assert_eq!(db.count("SELECT COUNT(*) FROM parked_events").await, 1);
    let rows = db.rows().await;
    assert_eq!(rows["SL1"].2, "executed");
    // In arrival order: the acknowledgement first, then the execution.
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(outcome AS CHAR) FROM lifecycle_events WHERE order_id = 'P1' ORDER BY seq",
    )
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    assert_eq!(kinds, ["applied", "applied", "acknowledged", "applied"]);
    db.assert_sequences_gap_free().await;
    db.drop().await;
}

#[tokio::test]
async fn a_parked_event_whose_id_never_comes_is_dead_lettered_after_its_time() {
    let db = TestDb::new().await;
    let cfg = config(Duration::from_millis(300));
    let mut s = EventScript::new("P2");
    let orphan = s.confirm("NEVER", "EXECUTED");
    // Stamped by Kafka at T: it expires once stream time reaches T + 300 ms
    // (rule R7, in stream time), however late that is by the wall clock.
    let stamped = 1_764_300_000_000;
    let mut batch = messages("c", 7, &[orphan]);
    batch[0].timestamp_ms = Some(stamped);
    process_batch(&db.store, &cfg, &batch).await.unwrap();
    assert!(
        expire_parked(&db.store, cfg.park_timeout, stamped + 299, 100)
            .await
            .unwrap()
            .is_empty(),
        "not yet expired 299 ms of stream time after it"
    );
    let letters = expire_parked(&db.store, cfg.park_timeout, stamped + 300, 100)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "unknown_lifecycle_id");
    assert_eq!((letters[0].topic.as_str(), letters[0].offset), ("c", 7));
    assert!(letters[0].error.contains("NEVER"));
    assert_eq!(db.count("SELECT COUNT(*) FROM parked_events").await, 0);
    let stored = db.dead_letters().await;
    assert_eq!(stored[0].0, "unknown_lifecycle_id");
    db.drop().await;
}

#[tokio::test]
async fn a_batch_processed_twice_changes_nothing_the_second_time() {
    let db = TestDb::new().await;
    let cfg = config(Duration::from_secs(60));
    let mut s = EventScript::new("D1");
    let batch = messages(
        "o",
        0,
        &[s.place(), s.sl("A"), s.sl("B"), s.confirm("A", "FILLED")],
    );
    let first = process_batch(&db.store, &cfg, &batch).await.unwrap();
    assert_eq!(first.recorded_total(), 4);
    let rows = db.full_rows().await;
    let second = process_batch(&db.store, &cfg, &batch).await.unwrap();
    assert_eq!((second.recorded_total(), second.duplicates), (0, 4));
    assert_eq!(db.full_rows().await, rows);
    assert_eq!(db.count("SELECT COUNT(*) FROM lifecycle_events").await, 4);
    db.drop().await;
}

/// Two batches over the same orders: P1's stop loss and its confirmation,
/// P2 placed in the first and changed in the second, P3 only in the
/// second.
fn two_batches() -> (Vec<InboundMessage>, Vec<InboundMessage>) {
    let (mut p1, mut p2, mut p3) = (
        EventScript::new("P1"),
        EventScript::new("P2"),
        EventScript::new("P3"),
    );
    let ahead = messages("o", 0, &[p1.place(), p1.sl("P1-SL"), p2.place()]);
    let behind = messages(
        "o",
        3,
        &[
            p1.confirm("P1-SL", "NEW"),
            p2.tp("P2-TP"),
            p3.place(),
            p1.close("P1-C", Some("P1-SLC"), None),
            p2.confirm("P2-TP", "NEW"),
        ],
    );
    (ahead, behind)
}

/// Runs `first`, then `second` behind it as `run`'s loop does: `second`
/// starts once `first` has decided and may write once it is done. Returns
/// both reports (`None`: gave way).
async fn behind_one_another(
    db: &TestDb,
    cfg: &PipelineConfig,
    first: &[InboundMessage],
    second: &[InboundMessage],
    cache: Option<&OrderCache>,
) -> (Option<BatchOutcome>, Option<BatchOutcome>) {
    let (progress, ahead) = overlap::progress();
    let run_ahead = async {
        let turn = Turn {
            ahead: None,
            progress: Some(&progress),
            cache,
        };
        let report = process_batch_in_turn(&db.store, cfg, first, turn).await;
        progress.done();
        report.unwrap()
    };
    let run_behind = async {
        let mut ahead = ahead.clone();
        ahead.startable().await;
        let turn = Turn {
            ahead: Some(&mut ahead),
            progress: None,
            cache,
        };
        process_batch_in_turn(&db.store, cfg, second, turn)
            .await
            .unwrap()
    };
    tokio::join!(run_ahead, run_behind)
}

#[tokio::test]
async fn a_batch_behind_another_takes_its_orders_as_they_will_be_and_writes_after_it() {
    let (overlapped, serial) = (TestDb::new().await, TestDb::new().await);
    let cfg = config(Duration::from_secs(60));
    let (first, second) = two_batches();
    let (ahead, behind) = behind_one_another(&overlapped, &cfg, &first, &second, None).await;
    assert_eq!(ahead.unwrap().recorded_total(), 3);
    let behind = behind.expect("disjoint writes: the batch behind did not give way");
    assert_eq!(behind.recorded_total(), 5);

    process_batch(&serial.store, &cfg, &first).await.unwrap();
    process_batch(&serial.store, &cfg, &second).await.unwrap();
    assert_eq!(overlapped.log().await, serial.log().await);
    assert_eq!(overlapped.full_rows().await, serial.full_rows().await);
    // Batch order in the log: the first batch's entries come first.
    let offsets: Vec<i64> =
        sqlx::query_scalar("SELECT source_offset FROM lifecycle_events ORDER BY position")
            .fetch_all(overlapped.store.pool())
            .await
            .unwrap();
    assert_eq!(offsets, (0..8).collect::<Vec<i64>>());
    overlapped.assert_sequences_gap_free().await;
    overlapped.drop().await;
    serial.drop().await;
}

/// Runs `batches` one after the other, alone and without kept orders, on
/// `serial`, and asserts that `db` holds the same log and rows, its
/// sequences without a gap; drops both databases.
async fn assert_as_one_after_the_other(
    db: TestDb,
    serial: TestDb,
    cfg: &PipelineConfig,
    batches: &[&Vec<InboundMessage>],
) {
    for batch in batches {
        process_batch(&serial.store, cfg, batch).await.unwrap();
    }
    assert_eq!(db.log().await, serial.log().await);
    assert_eq!(db.full_rows().await, serial.full_rows().await);
    db.assert_sequences_gap_free().await;
    db.drop().await;
    serial.drop().await;
}

/// Runs `batch` alone, reading and keeping orders in `cache`.
async fn through_cache(
    db: &TestDb,
    cfg: &PipelineConfig,
    cache: &OrderCache,
    batch: &[InboundMessage],
) -> BatchOutcome {
    let turn = Turn {
        cache: Some(cache),
        ..Turn::default()
    };
    process_batch_in_turn(&db.store, cfg, batch, turn)
        .await
        .unwrap()
        .expect("alone: never gives way")
}

#[tokio::test]
async fn orders_kept_between_batches_give_the_log_and_rows_of_orders_read_each_time() {
    let (cached, serial) = (TestDb::new().await, TestDb::new().await);
    let cfg = config(Duration::from_secs(60));
    let cache = OrderCache::new(1_000);
    let (mut k1, mut k2) = (EventScript::new("K1"), EventScript::new("K2"));
    let first = messages("o", 0, &[k1.place(), k1.sl("K1-SL"), k2.place()]);
    // Another writer (an instance reading the confirmations) changes K1
    // behind this one's back: its kept state is then stale.
    let elsewhere = messages("c", 0, &[k1.confirm("K1-SL", "NEW"), k1.tp("K1-TP")]);
    let then = messages(
        "o",
        3,
        &[
            k1.sl("K1-SL2"),
            k2.sl("K2-SL"),
            k1.close("K1-C", Some("K1-SLC"), Some("K1-TPC")),
        ],
    );

    through_cache(&cached, &cfg, &cache, &first).await;
    assert_eq!(cache.len(), 2, "both orders kept once committed");
    process_batch(&cached.store, &cfg, &elsewhere)
        .await
        .unwrap();
    let report = through_cache(&cached, &cfg, &cache, &then).await;
    assert_eq!(report.recorded_total(), 3);
    // A stale K1 would have numbered its entries from seq 3 (refused by
    // the log's unique key) and replaced K1-SL without knowing K1-TP.
    let again = through_cache(&cached, &cfg, &cache, &then).await;
    assert_eq!((again.recorded_total(), again.duplicates), (0, 3));

    assert_as_one_after_the_other(cached, serial, &cfg, &[&first, &elsewhere, &then]).await;
}

#[tokio::test]
async fn kept_orders_behind_a_batch_in_flight_give_the_log_of_one_batch_after_the_other() {
    let (cached, serial) = (TestDb::new().await, TestDb::new().await);
    let cfg = config(Duration::from_secs(60));
    let cache = OrderCache::new(1_000);
    let (mut h1, mut h2) = (EventScript::new("H1"), EventScript::new("H2"));
    let zero = messages("o", 0, &[h1.place(), h2.place()]);
    // H1: the batch ahead takes it from the cache, the batch behind from
    // the batch ahead; H2: the batch behind takes it from the cache.
    let first = messages("o", 2, &[h1.sl("H1-SL")]);
    let second = messages("o", 3, &[h1.confirm("H1-SL", "NEW"), h2.sl("H2-SL")]);

    through_cache(&cached, &cfg, &cache, &zero).await;
    let (ahead, behind) = behind_one_another(&cached, &cfg, &first, &second, Some(&cache)).await;
    assert_eq!(ahead.unwrap().recorded_total(), 1);
    let behind = behind.expect("disjoint writes: the batch behind did not give way");
    assert_eq!(behind.recorded_total(), 2);
    assert_eq!(cache.len(), 2, "both orders kept again once committed");

    assert_as_one_after_the_other(cached, serial, &cfg, &[&zero, &first, &second]).await;
}

#[tokio::test]
async fn a_batch_behind_one_whose_attempt_failed_gives_way_and_writes_nothing() {
    let db = TestDb::new().await;
    let cfg = config(Duration::from_secs(60));
    let (first, second) = two_batches();
    // Holds the log head, so that the batch ahead decides, then waits
    // before its append while the batch behind starts.
    let mut blocker = db.store.pool().begin().await.unwrap();
    sqlx::query("SELECT position FROM log_head WHERE id = 1 FOR UPDATE")
        .fetch_one(&mut *blocker)
        .await
        .unwrap();

    let (progress, ahead) = overlap::progress();
    // The batch ahead is done only after the batch behind has ended: found
    // done, the batch ahead would let the batch behind run alone instead.
    let (behind_ended, behind_over) = tokio::sync::oneshot::channel::<()>();
    let run_ahead = async {
        let turn = Turn {
            ahead: None,
            progress: Some(&progress),
            cache: None,
        };
        let report = process_batch_in_turn(&db.store, &cfg, &first, turn).await;
        let _ = behind_over.await;
        progress.done();
        report
    };
    let run_behind = async {
        let mut ahead = ahead.clone();
        ahead.startable().await;
        // As when an attempt of the batch ahead fails (it is then retried).
        progress.failed();
        blocker.commit().await.unwrap();
        let turn = Turn {
            ahead: Some(&mut ahead),
            progress: None,
            cache: None,
        };
        let report = process_batch_in_turn(&db.store, &cfg, &second, turn).await;
        let _ = behind_ended.send(());
        report
    };
    let (report_ahead, report_behind) = tokio::join!(run_ahead, run_behind);
    assert_eq!(report_ahead.unwrap().unwrap().recorded_total(), 3);
    assert!(report_behind.unwrap().is_none(), "gave way");
    assert_eq!(db.count("SELECT COUNT(*) FROM lifecycle_events").await, 3);
    let next: i64 = sqlx::query_scalar("SELECT next_offset FROM consumer_offsets")
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(next, 3, "the offsets of the batch ahead only");
    db.drop().await;
}

/// The batch ahead on one instance can wait for a row the batch behind
/// on another read and locked, while each batch behind waits for its own
/// batch ahead where the database cannot see it: a cycle no deadlock
/// detector breaks. A batch behind therefore waits a bounded time, then
/// gives way and releases its locks.
#[tokio::test]
async fn a_batch_behind_one_not_done_in_time_gives_way_and_releases_its_locks() {
    let db = TestDb::new().await;
    let cfg = config(Duration::from_secs(60));
    let mut w1 = EventScript::new("W1");
    process_batch(&db.store, &cfg, &messages("o", 0, &[w1.place()]))
        .await
        .unwrap();
    // A batch ahead that has decided and then never ends, as one waiting
    // for a lock held on another instance.
    let (progress, mut ahead) = overlap::progress();
    progress.has_decided(overlap::Decided::default());
    let turn = Turn {
        ahead: Some(&mut ahead),
        progress: None,
        cache: None,
    };
    let behind = messages("o", 1, &[w1.sl("W1-SL")]);
    let started = std::time::Instant::now();
    let report = tokio::time::timeout(
        Duration::from_secs(10),
        process_batch_in_turn(&db.store, &cfg, &behind, turn),
    )
    .await
    .expect("the batch behind waited for good instead of giving way")
    .unwrap();
    assert!(report.is_none(), "gave way");
    assert!(started.elapsed() >= overlap::GIVE_WAY_AFTER);
    // The rows of W1 it read locked are free again, and it wrote nothing.
    let mut other = db.store.pool().begin().await.unwrap();
    sqlx::query("SET SESSION innodb_lock_wait_timeout = 2")
        .execute(&mut *other)
        .await
        .unwrap();
    let locked: Vec<(i64,)> =
        sqlx::query_as("SELECT id FROM order_lifecycle_ids WHERE order_id = 'W1' FOR UPDATE")
            .fetch_all(&mut *other)
            .await
            .expect("W1's rows are not locked any more");
    assert_eq!(locked.len(), 1, "only the order id, no stop loss");
    other.rollback().await.unwrap();
    assert_eq!(db.count("SELECT COUNT(*) FROM lifecycle_events").await, 1);
    drop(progress);
    db.drop().await;
}

#[tokio::test]
async fn a_batch_issuing_an_id_the_batch_ahead_parks_for_gives_way() {
    let db = TestDb::new().await;
    let cfg = config(Duration::from_secs(60));
    let mut p1 = EventScript::new("P1");
    let first = messages("o", 0, &[p1.place(), p1.confirm("P1-SL", "NEW")]);
    let second = messages("o", 2, &[p1.sl("P1-SL")]);
    let (ahead, behind) = behind_one_another(&db, &cfg, &first, &second, None).await;
    assert_eq!(ahead.unwrap().parked, 1);
    assert!(behind.is_none(), "gave way");
    // Run again after it, it releases the parked confirmation.
    let report = process_batch(&db.store, &cfg, &second).await.unwrap();
    // The stop loss and the confirmation released for it.
    assert_eq!((report.recorded_total(), report.unparked), (2, 1));
    assert_eq!(db.rows().await["P1-SL"].2, "active");
    db.drop().await;
}

/// Instances (or operators) starting at once on a new database take turns
/// migrating it: none stops with a duplicate key on `_sqlx_migrations`
/// (sqlx's own lock is a no-op on MariaDB).
#[tokio::test]
async fn processes_starting_at_once_on_a_new_database_all_migrate_it() {
    let (name, url) = TestDb::new_name();
    let mut stores = Vec::new();
    for _ in 0..6 {
        stores.push(Store::connect(&url, 2).await.expect("MariaDB"));
    }
    let migrated = futures_util::future::join_all(stores.iter().map(Store::migrate)).await;
    for (i, result) in migrated.iter().enumerate() {
        assert!(result.is_ok(), "process {i}: {result:?}");
    }
    let (applied, succeeded): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), CAST(SUM(success) AS SIGNED) FROM _sqlx_migrations")
            .fetch_one(stores[0].pool())
            .await
            .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|f| {
            f.as_ref()
                .is_ok_and(|f| f.path().extension().is_some_and(|e| e == "sql"))
        })
        .count() as i64;
    assert_eq!((applied, succeeded), (files, files));
    for store in &stores {
        store.pool().close().await;
    }
    TestDb::drop_by_name(&name).await;
}

/// A migration a process was killed in the middle of (sqlx records it
/// before its statements, as MySQL commits each DDL statement on its own):
/// every command refuses the database with an error that names the file
/// and the fix; once the operator marks it done, migrations go on.
#[tokio::test]
async fn a_migration_interrupted_part_way_is_named_with_its_fix() {
    let db = TestDb::new().await;
    let interrupted = "UPDATE _sqlx_migrations SET success = 0 WHERE version = 20261128000009";
    sqlx::query(interrupted)
        .execute(db.store.pool())
        .await
        .unwrap();
    let refused = db
        .store
        .migrate()
        .await
        .expect_err("an interrupted migration");
    let message = refused.to_string();
    assert!(
        message.contains("migrations/20261128000009_dense_log_positions.sql")
            && message.contains("interrupted part-way")
            && message
                .contains("UPDATE _sqlx_migrations SET success = 1 WHERE version = 20261128000009"),
        "{message}"
    );
    sqlx::query("UPDATE _sqlx_migrations SET success = 1 WHERE version = 20261128000009")
        .execute(db.store.pool())
        .await
        .unwrap();
    db.store
        .migrate()
        .await
        .expect("migrations go on once it is marked done");
    db.drop().await;
}

#[tokio::test]
async fn the_event_log_refuses_updates_and_deletes() {
    let db = TestDb::new().await;
    let mut s = EventScript::new("L1");
    process_batch(
        &db.store,
        &config(Duration::from_secs(60)),
        &messages("o", 0, &[s.place()]),
    )
    .await
    .unwrap();
    for sql in [
        "UPDATE lifecycle_events SET kind = 'x'",
        "DELETE FROM lifecycle_events",
    ] {
        let err = sqlx::query(sql).execute(db.store.pool()).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    db.drop().await;
}

#[tokio::test]
async fn hostile_but_valid_ids_are_stored_verbatim_and_case_sensitively() {
    let db = TestDb::new().await;
    let cfg = config(Duration::from_secs(60));
    let hostile = "x');DROP-TABLE-order_lifecycle_ids;--";
    let mut s = EventScript::new("ордер-1");
    let batch = messages(
        "o",
        0,
        &[s.place(), s.sl(hostile), s.sl("sl1"), s.sl("SL1")],
    );
    let report = process_batch(&db.store, &cfg, &batch).await.unwrap();
    assert!(report.dead_letters.is_empty(), "{:?}", report.dead_letters);
    let rows = db.rows().await;
    assert_eq!(rows[hostile].0, "ордер-1");
    assert_eq!(rows["sl1"].2, "replaced");
    assert_eq!(rows["SL1"].2, "active");
    db.drop().await;
}

#[tokio::test]
async fn an_id_another_writer_bound_meanwhile_is_a_conflict_not_an_overwrite() {
    use order_lifecycle::domain::{IdRecord, IdStatus, IdType, LifecycleId, OrderId};
    use order_lifecycle::store::id_projection;

    let db = TestDb::new().await;
    let mut a = EventScript::new("W1");
    let batch = messages("o", 0, &[a.place(), a.sl("SL-X")]);
    process_batch(&db.store, &config(Duration::from_secs(60)), &batch)
        .await
        .unwrap();
    let before = db.full_rows().await;

    // A second writer read the table before W1's batch committed, so it
    // believes SL-X is new and binds it to W2 (rule R1 forbids it).
    let w2 = OrderId::parse("W2").unwrap();
    let record = IdRecord {
        lifecycle_id: LifecycleId::parse("SL-X").unwrap(),
        id_type: IdType::StoplossId,
        status: IdStatus::Active,
        replaced_by: None,
        target: None,
        issued_at_ms: 1_764_300_000_000,
        updated_at_ms: 1_764_300_000_000,
        issued_seq: 2,
        updated_seq: 2,
    };
    let mut tx = db.store.pool().begin().await.unwrap();
    let err = id_projection::write_changes(&mut tx, &[(&w2, &record)], &[])
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    tx.rollback().await.unwrap();
    assert_eq!(db.full_rows().await, before, "W1's row is untouched");
}

#[tokio::test]
async fn handed_batches_write_what_the_log_would_and_only_when_they_continue_redis() {
    let db = TestDb::new().await;
    let handed_redis = TestRedis::new();
    let read_redis = TestRedis::new();
    let cfg = config(Duration::from_secs(60));
    let mut s = EventScript::new("H1");
    let first = messages("o", 0, &[s.place(), s.sl("SL1"), s.tp("TP1"), s.sl("SL2")]);
    let second = messages(
        "o",
        4,
        &[s.confirm("TP1", "EXECUTED"), s.close("C1", None, None)],
    );
    let handed = handed_redis.projection().await;
    // Redis follows the (empty) log before anything is handed.
    assert_eq!(
        redis_follower::catch_up(&db.store, &handed).await.unwrap(),
        0
    );
    let log_id = order_lifecycle::store::event_log::log_head(db.store.pool())
        .await
        .unwrap()
        .log_id;
    let a = process_batch(&db.store, &cfg, &first).await.unwrap().handed;
    let b = process_batch(&db.store, &cfg, &second)
        .await
        .unwrap()
        .handed;
    assert_eq!((a.len(), b.len()), (1, 1));
    assert_eq!((a[0].positions.first, a[0].positions.last), (1, 4));
    assert_eq!((b[0].positions.first, b[0].positions.last), (5, 6));

    // A batch that does not continue Redis (a gap: entries 1..4 are not in
    // Redis) is refused and nothing is written.
    let handoff = redis_follower::Handoff::new();
    handoff.offer(b.clone());
    assert_eq!(
        redis_follower::project_handed(&handed, &handoff, &log_id)
            .await
            .unwrap(),
        None
    );
    assert_eq!(handed.position().await.unwrap(), 0);
    // Nor under another log's identity.
    handoff.offer(a.clone());
    assert_eq!(
        redis_follower::project_handed(&handed, &handoff, "another-log")
            .await
            .unwrap(),
        None
    );
    // Contiguous batches are written at once, in one write.
    handoff.offer(a.iter().chain(&b).cloned().collect());
    assert_eq!(
        redis_follower::project_handed(&handed, &handoff, &log_id)
            .await
            .unwrap(),
        Some(6)
    );
    // What Redis has already changes nothing.
    handoff.offer(a.clone());
    assert_eq!(
        redis_follower::project_handed(&handed, &handoff, &log_id)
            .await
            .unwrap(),
        Some(0)
    );
    // A batch ending where Redis stands but with another event there (a
    // database restored under this Redis wrote other entries at the same
    // positions) is another history: neither it nor the batch continuing
    // it is trusted, and the log is read instead.
    let mut other_history = b[0].clone();
    other_history.last_event_id = "restored-e6".into();
    let continuing = redis_follower::HandedBatch {
        positions: order_lifecycle::store::event_log::Positions { first: 7, last: 7 },
        last_event_id: "restored-e7".into(),
        lookups: Vec::new(),
        orders: Vec::new(),
    };
    handoff.offer(vec![other_history, continuing]);
    assert_eq!(
        redis_follower::project_handed(&handed, &handoff, &log_id)
            .await
            .unwrap(),
        None
    );
    assert_eq!(handed.position().await.unwrap(), 6);
    // The keys and the record are exactly what reading the log gives.
    let read = read_redis.projection().await;
    assert_eq!(redis_follower::catch_up(&db.store, &read).await.unwrap(), 6);
    let keys = handed_redis.snapshot().await;
    assert_eq!(keys, read_redis.snapshot().await);
    assert_eq!(keys["global_order_lookup:C1"], "H1");
    assert!(
        keys["order_lifecycle_active:H1"].contains("close_id=C1"),
        "{keys:?}"
    );
    handed_redis.cleanup().await;
    read_redis.cleanup().await;
}

#[tokio::test]
async fn the_redis_follower_projects_lookups_and_active_ids_from_the_log() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let cfg = config(Duration::from_secs(60));
    let mut s = EventScript::new("F1");
    let batch = messages(
        "o",
        0,
        &[
            s.place(),
            s.sl("SL1"),
            s.tp("TP1"),
            s.sl("SL2"),
            s.confirm("TP1", "EXECUTED"),
        ],
    );
    process_batch(&db.store, &cfg, &batch).await.unwrap();
    let projection = redis.projection().await;
    assert_eq!(
        redis_follower::catch_up(&db.store, &projection)
            .await
            .unwrap(),
        5
    );
    assert_eq!(
        redis_follower::catch_up(&db.store, &projection)
            .await
            .unwrap(),
        0
    );
    let keys = redis.snapshot().await;
    let expected: Vec<(String, String)> = vec![
        ("global_order_lookup:F1".into(), "F1".into()),
        ("global_order_lookup:SL1".into(), "F1".into()),
        ("global_order_lookup:SL2".into(), "F1".into()),
        ("global_order_lookup:TP1".into(), "F1".into()),
        (
            "order_lifecycle_active:F1".into(),
            "order_id=F1,stoploss_id=SL2".into(),
        ),
    ];
    assert_eq!(
        keys.iter()
            .filter(|(k, _)| !k.starts_with("order_lifecycle:"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>(),
        expected
    );
    let log = order_lifecycle::store::event_log::log_head(db.store.pool())
        .await
        .unwrap();
    let fifth: String = sqlx::query_scalar(
        "SELECT CAST(event_id AS CHAR) FROM lifecycle_events WHERE position = 5",
    )
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    assert_eq!(
        keys["order_lifecycle:projection"],
        format!("event_id={fifth},log_id={},position=5", log.log_id),
        "the record names the log, the position and the entry there"
    );

    // A flushed Redis (its keys and its position gone) is repaired from the
    // log on the next round.
    redis.cleanup().await;
    assert_eq!(
        redis_follower::catch_up(&db.store, &projection)
            .await
            .unwrap(),
        5
    );
    assert_eq!(redis.snapshot().await, keys);

    // A flush between reading the position and writing: the write is
    // abandoned, so the position never claims keys that are not there.
    let at = projection.watch_projected().await.unwrap().unwrap();
    assert_eq!(at.position, 5);
    redis.cleanup().await;
    let written = projection.write(&[], &[], &at).await.unwrap();
    assert!(!written, "the write after a flush is abandoned");
    assert!(redis.snapshot().await.is_empty());
    assert_eq!(
        redis_follower::catch_up(&db.store, &projection)
            .await
            .unwrap(),
        5
    );
    assert_eq!(redis.snapshot().await, keys);
    redis.cleanup().await;
    db.drop().await;
}

/// Parks `event`, read at `offset` of topic `c`, to wait for `awaited`, as
/// another instance's batch would.
async fn park(db: &TestDb, event: &OrderEvent, awaited: &str, offset: i64) {
    let message = &messages("c", offset, std::slice::from_ref(event))[0];
    let mut conn = db.store.pool().acquire().await.unwrap();
    order_lifecycle::store::parked::insert(
        &mut conn,
        &[order_lifecycle::store::parked::NewParked {
            awaited: order_lifecycle::domain::LifecycleId::parse(awaited).unwrap(),
            event_id: event.event_id.clone(),
            event_json: wire::json::encode(event),
            message,
        }],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn an_event_parked_after_its_id_was_issued_is_released_by_the_stranded_round() {
    let db = TestDb::new().await;
    let cfg = config(Duration::from_secs(60));
    let mut s = EventScript::new("S1");
    process_batch(
        &db.store,
        &cfg,
        &messages("o", 0, &[s.place(), s.sl("SL1")]),
    )
    .await
    .unwrap();
    // Another instance, not yet seeing SL1, parked its confirmation just
    // after the batch above had looked for parked events.
    park(&db, &s.confirm("SL1", "EXECUTED"), "SL1", 0).await;
    // The round looks only after the row it is told (rows parked within its
    // window): at the row itself, nothing.
    let row = db.count("SELECT MAX(id) FROM parked_events").await;
    let outside = order_lifecycle::ingest::release_stranded(&db.store, &cfg, row)
        .await
        .unwrap();
    assert_eq!(outside.unparked, 0);
    let report = order_lifecycle::ingest::release_stranded(&db.store, &cfg, row - 1)
        .await
        .unwrap();
    assert_eq!(report.unparked, 1);
    assert_eq!(db.rows().await["SL1"].2, "executed");
    assert_eq!(db.count("SELECT COUNT(*) FROM parked_events").await, 0);
    let again = order_lifecycle::ingest::release_stranded(&db.store, &cfg, 0)
        .await
        .unwrap();
    assert_eq!(again.recorded_total(), 0);
    db.assert_sequences_gap_free().await;
    db.drop().await;
}

/// Feeds a realistic stream through the pipeline in batches and projects it
/// to Redis, as `run` would.
async fn incremental(db: &TestDb, projection: &RedisProjection, orders: usize) {
    let cfg = config(Duration::from_secs(60));
    let events: Vec<OrderEvent> = common::stream(orders, 3)
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    for (i, chunk) in events.chunks(97).enumerate() {
        process_batch(&db.store, &cfg, &messages("o", (i * 97) as i64, chunk))
            .await
            .unwrap();
    }
    while redis_follower::catch_up(&db.store, projection)
        .await
        .unwrap()
        > 0
    {}
}

#[tokio::test]
async fn rebuild_reproduces_the_incremental_projection_exactly() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let projection = redis.projection().await;
    incremental(&db, &projection, 150).await;
    let rows = db.full_rows().await;
    let keys = redis.snapshot().await;
    assert!(rows.len() > 500, "{} rows", rows.len());

    let mut lease = order_lifecycle::projection::rebuild::RebuildLease::acquire(&db.store)
        .await
        .expect("the rebuild lease");
    let mysql = order_lifecycle::projection::rebuild::rebuild_mysql(&db.store, &mut lease)
        .await
        .unwrap();
    assert_eq!(mysql.rows as usize, rows.len());
    assert_eq!(db.full_rows().await, rows, "MySQL rebuilt row for row");
    let redis_summary = order_lifecycle::projection::rebuild::rebuild_redis(
        &db.store,
        &projection,
        &mut lease,
        UnexplainedKeys::Keep,
    )
    .await
    .unwrap();
    assert_eq!(
        (redis_summary.keys_removed, redis_summary.keys_kept),
        (0, 0)
    );
    assert_eq!(redis.snapshot().await, keys, "Redis rebuilt key for key");
    redis.cleanup().await;
    db.drop().await;
}

#[tokio::test]
async fn rebuild_repairs_a_corrupted_projection() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let projection = redis.projection().await;
    incremental(&db, &projection, 60).await;
    let rows = db.full_rows().await;
    let keys = redis.snapshot().await;

    // Corrupt MySQL: rows deleted, a status changed.
    sqlx::query("DELETE FROM order_lifecycle_ids WHERE id_type = 'takeprofit_id'")
        .execute(db.store.pool())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE order_lifecycle_ids SET status = 'rejected' WHERE id_type = 'close_id' LIMIT 3",
    )
    .execute(db.store.pool())
    .await
    .unwrap();
    // Corrupt Redis: keys deleted, a value altered, a stray key added.
    let mut conn = redis
        .client
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let victims: Vec<String> = keys
        .keys()
        .filter(|k| k.starts_with("global_order_lookup:SL"))
        .take(10)
        .map(|k| format!("{}{k}", redis.prefix))
        .collect();
    let _: () = redis::cmd("DEL")
        .arg(&victims)
        .query_async(&mut conn)
        .await
        .unwrap();
    let altered = keys
        .keys()
        .find(|k| k.starts_with("global_order_lookup:TP"))
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{}{altered}", redis.prefix))
        .arg("wrong-order")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{}global_order_lookup:STRAY", redis.prefix))
        .arg("nobody")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_ne!(db.full_rows().await, rows);
    assert_ne!(redis.snapshot().await, keys);

    let mut lease = order_lifecycle::projection::rebuild::RebuildLease::acquire(&db.store)
        .await
        .expect("the rebuild lease");
    order_lifecycle::projection::rebuild::rebuild_mysql(&db.store, &mut lease)
        .await
        .unwrap();
    // By default the lookup key no id accounts for is kept (it may be the
    // legacy platform's), and counted.
    let summary = order_lifecycle::projection::rebuild::rebuild_redis(
        &db.store,
        &projection,
        &mut lease,
        UnexplainedKeys::Keep,
    )
    .await
    .unwrap();
    assert_eq!(db.full_rows().await, rows);
    assert_eq!((summary.keys_removed, summary.keys_kept), (0, 1));
    assert_eq!(
        redis.get("global_order_lookup:STRAY").await.as_deref(),
        Some("nobody")
    );
    let mut expected = keys.clone();
    expected.insert("global_order_lookup:STRAY".into(), "nobody".into());
    assert_eq!(redis.snapshot().await, expected);
    // Asked to, it removes it.
    let summary = order_lifecycle::projection::rebuild::rebuild_redis(
        &db.store,
        &projection,
        &mut lease,
        UnexplainedKeys::Remove,
    )
    .await
    .unwrap();
    assert_eq!(
        (summary.keys_removed, summary.keys_kept),
        (1, 0),
        "the stray key"
    );
    assert_eq!(redis.snapshot().await, keys);
    redis.cleanup().await;
    db.drop().await;
}

/// Event times past 2038 (MariaDB's `FROM_UNIXTIME` ends at 2038-01-19)
/// up to the contract's 2100 are stored and read back exactly, in a batch
/// that commits whole (no `storage_rejected`, no one-by-one retry).
#[tokio::test]
async fn events_dated_2039_and_2099_are_stored_and_read_back_exactly() {
    let db = TestDb::new().await;
    let cfg = config(Duration::from_secs(60));
    let dated = |mut e: OrderEvent, ms: i64| {
        e.occurred_at_ms = ms;
        e
    };
    let (y2039, y2099) = (2_177_452_800_123, 4_102_444_799_999);
    let mut s = EventScript::new("Y2039");
    let mut t = EventScript::new("Y2099");
    let events = [
        dated(s.place(), y2039),
        dated(s.sl("Y2039-SL"), y2039 + 1),
        dated(t.place(), y2099 - 1),
        dated(t.sl("Y2099-SL"), y2099),
        // Before 2038 in the same batch: unchanged.
        dated(s.tp("Y2039-TP"), 1_764_300_000_500),
    ];
    let report = process_batch(&db.store, &cfg, &messages("o", 0, &events))
        .await
        .expect("the batch commits");
    assert_eq!(report.recorded_total(), 5);
    assert!(report.dead_letters.is_empty(), "{:?}", report.dead_letters);

    let stored: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT CAST(lifecycle_id AS CHAR), CAST(created_at AS CHAR), CAST(updated_at AS CHAR) \
         FROM order_lifecycle_ids ORDER BY lifecycle_id",
    )
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    let at = |id: &str| stored.iter().find(|r| r.0 == id).expect(id).1.clone();
    assert_eq!(at("Y2039"), "2039-01-01 00:00:00.123");
    assert_eq!(at("Y2039-SL"), "2039-01-01 00:00:00.124");
    assert_eq!(at("Y2099-SL"), "2099-12-31 23:59:59.999");
    assert_eq!(at("Y2039-TP"), "2025-11-28 03:20:00.500");

    // Read back through the store as the pipeline and the API do.
    let mut conn = db.store.pool().acquire().await.unwrap();
    let orders = [
        order_lifecycle::domain::OrderId::parse("Y2039").unwrap(),
        order_lifecycle::domain::OrderId::parse("Y2099").unwrap(),
    ];
    let records = order_lifecycle::store::id_projection::load_records(&mut conn, &orders, false)
        .await
        .unwrap();
    let issued = |order: usize, id: &str| {
        records[&orders[order]]
            .iter()
            .find(|r| r.lifecycle_id.as_str() == id)
            .expect(id)
            .issued_at_ms
    };
    assert_eq!(issued(0, "Y2039-SL"), y2039 + 1);
    assert_eq!(issued(1, "Y2099-SL"), y2099);
    drop(conn);
    db.drop().await;
}

/// 400 rejected messages of 60 KiB each in one batch: 24 MB of dead
/// letters, over MariaDB's default 16 MiB packet limit for one statement,
/// are written in statements bounded by bytes, and the batch commits.
#[tokio::test]
async fn a_batch_of_400_rejected_60_kib_messages_commits_whole() {
    let db = TestDb::new().await;
    let garbage: Vec<u8> = (0..60 * 1024).map(|i| (i % 251) as u8 | 0x80).collect();
    let mut batch: Vec<InboundMessage> = (0..400)
        .map(|i| InboundMessage {
            topic: "o".into(),
            partition: 0,
            offset: i,
            key: Some(format!("big-{i}").into_bytes()),
            payload: Some(garbage.clone()),
            content_type: Some(b"application/x-protobuf".to_vec()),
            timestamp_ms: None,
        })
        .collect();
    let mut s = EventScript::new("AFTER-BIG");
    batch.extend(messages("o", 400, &[s.place()]));
    let report = process_batch(&db.store, &config(Duration::from_secs(60)), &batch)
        .await
        .expect("the batch commits");
    assert_eq!(report.dead_letters.len(), 400);
    assert_eq!(report.recorded_total(), 1);
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters").await, 400);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM dead_letters WHERE LENGTH(payload) = 61440")
            .await,
        400,
        "payloads kept whole"
    );
    db.drop().await;
}

/// A stranded parked event that cannot be applied (its stored event no
/// longer decodes) does not stop the stranded round, nor, through a
/// restart, the next `run`: it is dead-lettered as `storage_rejected` and
/// leaves the parking lot; the good ones beside it are applied.
#[tokio::test]
async fn a_parked_event_that_cannot_be_applied_is_dead_lettered_not_fatal() {
    let db = TestDb::new().await;
    let cfg = config(Duration::from_secs(60));
    let mut s = EventScript::new("Q1");
    process_batch(
        &db.store,
        &cfg,
        &messages("o", 0, &[s.place(), s.sl("SL1")]),
    )
    .await
    .unwrap();
    // A row this version cannot read back (valid JSON, not an event),
    // waiting for the bound SL1, parked before a good one.
    sqlx::query(
        "INSERT INTO parked_events (awaited_id, event_id, event, source_topic, source_partition, \
         source_offset, payload, expires_at_ms) \
         VALUES ('SL1', 'BAD-1', '{\"event_id\":\"BAD-1\"}', 'c', 0, 7, 'raw', 9999999999999)",
    )
    .execute(db.store.pool())
    .await
    .unwrap();
    park(&db, &s.confirm("SL1", "EXECUTED"), "SL1", 8).await;

    let outcome = order_lifecycle::ingest::release_stranded(&db.store, &cfg, 0)
        .await
        .expect("the round goes on");
    assert_eq!(outcome.unparked, 2);
    assert_eq!(outcome.recorded_total(), 1, "the good confirmation");
    assert_eq!(outcome.dead_letters.len(), 1);
    assert_eq!(outcome.dead_letters[0].reason, "storage_rejected");
    assert_eq!(outcome.dead_letters[0].offset, 7);
    assert_eq!(db.rows().await["SL1"].2, "executed");
    assert_eq!(db.count("SELECT COUNT(*) FROM parked_events").await, 0);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM dead_letters WHERE reason = 'storage_rejected'")
            .await,
        1
    );
    db.drop().await;
}

/// Event ids with `import-legacy`'s prefix are the import's own: on a
/// topic they are refused (`reserved_event_id`), so that a re-import never
/// mistakes a producer's event for its own.
#[tokio::test]
async fn topic_events_with_the_import_event_id_prefix_are_refused() {
    let db = TestDb::new().await;
    let mut s = EventScript::new("PFX1");
    let place = s.place();
    let mut imitation = s.sl("PFX1-SL");
    imitation.event_id =
        order_lifecycle::domain::EventId::parse("legacy:live:PFX1:stoploss_id:0000000000000001")
            .unwrap();
    let outcome = process_batch(
        &db.store,
        &config(Duration::from_secs(60)),
        &messages("o", 0, &[place, imitation]),
    )
    .await
    .unwrap();
    assert_eq!(outcome.recorded_total(), 1, "the placement");
    assert_eq!(outcome.dead_letters.len(), 1);
    assert_eq!(outcome.dead_letters[0].reason, "reserved_event_id");
    assert!(!db.rows().await.contains_key("PFX1-SL"));
    db.drop().await;
}

/// A rebuild whose lease's database session closed (a server restart, a
/// network cut, an idle limit: another rebuild may hold the lease now and
/// be filling the same shadow table from the start) replaces nothing; the
/// next rebuild does.
#[tokio::test]
async fn a_rebuild_that_lost_its_lease_replaces_nothing() {
    use order_lifecycle::projection::rebuild::{rebuild_mysql, RebuildError, RebuildLease};

    let db = TestDb::new().await;
    let cfg = config(Duration::from_secs(60));
    let mut s = EventScript::new("LL1");
    process_batch(
        &db.store,
        &cfg,
        &messages("o", 0, &[s.place(), s.sl("LL1-SL")]),
    )
    .await
    .unwrap();
    // A mark the rebuild does not write: gone once the table is replaced.
    let marked = "SELECT COUNT(*) FROM order_lifecycle_ids WHERE notes = 'live table'";
    sqlx::query("UPDATE order_lifecycle_ids SET notes = 'live table'")
        .execute(db.store.pool())
        .await
        .unwrap();

    let mut lease = RebuildLease::acquire(&db.store).await.unwrap();
    let holder: i64 = sqlx::query_scalar(
        "SELECT IS_USED_LOCK(CONCAT('order_lifecycle_rebuild', ':', MD5(DATABASE())))",
    )
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    sqlx::query(&format!("KILL {holder}"))
        .execute(db.store.pool())
        .await
        .unwrap();
    let lost = rebuild_mysql(&db.store, &mut lease).await;
    assert!(matches!(lost, Err(RebuildError::LeaseLost)), "{lost:?}");
    assert_eq!(db.count(marked).await, 2, "the live table is untouched");

    let mut next = RebuildLease::acquire(&db.store)
        .await
        .expect("the lease is free again");
    rebuild_mysql(&db.store, &mut next)
        .await
        .expect("the next rebuild");
    assert_eq!(db.count(marked).await, 0, "the table is replaced");
    db.drop().await;
}

/// A long transaction reading `order_lifecycle_ids` during a rebuild's swap
/// holds the table's metadata lock: the swap gives up after a bounded wait
/// (the live table untouched), so ingestion, which waits for the swap,
/// stops for seconds, not for the server's default of a year; once the
/// reader ends, the rebuild goes through.
#[tokio::test]
async fn a_long_reader_during_the_swap_delays_ingestion_by_seconds_only() {
    use order_lifecycle::projection::rebuild::{
        rebuild_mysql, RebuildError, RebuildLease, SWAP_LOCK_WAIT,
    };
    use sqlx::Connection;

    let db = TestDb::new().await;
    let cfg = config(Duration::from_secs(60));
    let mut s = EventScript::new("LR1");
    process_batch(
        &db.store,
        &cfg,
        &messages("o", 0, &[s.place(), s.sl("LR1-SL")]),
    )
    .await
    .unwrap();
    let before = db.rows().await;

    let mut reader = sqlx::MySqlConnection::connect(db.url.expose())
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM order_lifecycle_ids")
        .fetch_one(&mut reader)
        .await
        .unwrap();

    let mut lease = RebuildLease::acquire(&db.store).await.unwrap();
    let started = std::time::Instant::now();
    let blocked = rebuild_mysql(&db.store, &mut lease).await;
    let waited = started.elapsed();
    assert!(
        matches!(blocked, Err(RebuildError::SwapBlocked { .. })),
        "{blocked:?}"
    );
    assert!(
        waited >= SWAP_LOCK_WAIT && waited < SWAP_LOCK_WAIT * 4,
        "{waited:?}"
    );
    assert_eq!(db.rows().await, before, "the live table is untouched");
    // Ingestion goes on at once.
    process_batch(&db.store, &cfg, &messages("o", 2, &[s.tp("LR1-TP")]))
        .await
        .expect("a batch after the swap gave up");

    sqlx::query("COMMIT").execute(&mut reader).await.unwrap();
    rebuild_mysql(&db.store, &mut lease)
        .await
        .expect("the rebuild, reader gone");
    assert_eq!(db.rows().await.len(), before.len() + 1);
    db.drop().await;
}

/// 20,000 confirmations for one id that is not issued: 1,000 are parked,
/// the rest dead-lettered as `parking_full` (nothing dropped, the partition
/// moves on); when the id comes, the parked ones are applied.
#[tokio::test]
async fn confirmations_parked_on_one_id_are_capped() {
    use order_lifecycle::ingest::pipeline::MAX_PARKED_PER_ID;
    let db = TestDb::new().await;
    let cfg = config(Duration::from_secs(3600));
    let mut s = EventScript::new("CAP1");
    let confirmations: Vec<OrderEvent> = (0..20_000).map(|_| s.confirm("CAP1-SL", "NEW")).collect();
    let mut dead = 0;
    for (i, chunk) in confirmations.chunks(500).enumerate() {
        let outcome = process_batch(&db.store, &cfg, &messages("c", i as i64 * 500, chunk))
            .await
            .expect("a batch of confirmations commits");
        assert_eq!(outcome.parked + outcome.dead_letters.len(), chunk.len());
        assert!(outcome
            .dead_letters
            .iter()
            .all(|d| d.reason == "parking_full" && d.event_id.is_some()));
        dead += outcome.dead_letters.len();
    }
    let parked = db.count("SELECT COUNT(*) FROM parked_events").await;
    assert_eq!(parked as u64, MAX_PARKED_PER_ID);
    assert_eq!(dead as u64, 20_000 - MAX_PARKED_PER_ID);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM dead_letters WHERE reason = 'parking_full'")
            .await,
        dead as i64
    );
    // The id comes: the parked ones are applied, in arrival order.
    let outcome = process_batch(
        &db.store,
        &cfg,
        &messages("o", 0, &[s.place(), s.sl("CAP1-SL")]),
    )
    .await
    .unwrap();
    assert_eq!(outcome.unparked as u64, MAX_PARKED_PER_ID);
    assert_eq!(db.count("SELECT COUNT(*) FROM parked_events").await, 0);
    db.assert_sequences_gap_free().await;
    db.drop().await;
}

/// The parking lot as a whole is capped too (`--max-parked`): confirmations
/// for many different ids that never come fill it up to the cap, the rest
/// are dead-lettered as `parking_full`, consumption goes on, and room made
/// by an id arriving is used again. The kept count matches the table.
#[tokio::test]
async fn the_parking_lot_as_a_whole_is_capped() {
    let db = TestDb::new().await;
    let cfg = parking_lot_of(50);
    let mut s = EventScript::new("CAPT");
    let confirmations: Vec<OrderEvent> = (0..60)
        .map(|i| s.confirm(&format!("CAPT-SL{i}"), "NEW"))
        .collect();
    let mut letters = Vec::new();
    for (i, chunk) in confirmations.chunks(25).enumerate() {
        let outcome = process_batch(&db.store, &cfg, &messages("c", i as i64 * 25, chunk))
            .await
            .expect("a batch of confirmations commits");
        assert_eq!(outcome.parked + outcome.dead_letters.len(), chunk.len());
        letters.extend(outcome.dead_letters);
    }
    let kept = || db.count("SELECT parked FROM parking_lot WHERE id = 1");
    assert_eq!(db.count("SELECT COUNT(*) FROM parked_events").await, 50);
    assert_eq!(kept().await, 50);
    assert_eq!(letters.len(), 10);
    assert!(letters.iter().all(|d| d.reason == "parking_full"
        && d.error.contains("parking lot is full")
        && d.event_id.is_some()));
    // The last ten arrived last: they are the ones refused.
    let refused: Vec<_> = letters
        .iter()
        .map(|d| d.event_id.clone().unwrap())
        .collect();
    let last: Vec<_> = confirmations[50..]
        .iter()
        .map(|e| e.event_id.clone())
        .collect();
    assert_eq!(refused, last);

    // The order and its stop-loss SL0 come: one parked event is applied,
    // which makes room for one more.
    let outcome = process_batch(
        &db.store,
        &cfg,
        &messages("o", 0, &[s.place(), s.sl("CAPT-SL0")]),
    )
    .await
    .unwrap();
    assert_eq!((outcome.recorded_total(), outcome.unparked), (3, 1));
    assert_eq!(kept().await, 49);
    let more = [s.confirm("CAPT-X1", "NEW"), s.confirm("CAPT-X2", "NEW")];
    let outcome = process_batch(&db.store, &cfg, &messages("c", 60, &more))
        .await
        .unwrap();
    assert_eq!((outcome.parked, outcome.dead_letters.len()), (1, 1));
    assert_eq!(db.count("SELECT COUNT(*) FROM parked_events").await, 50);
    assert_eq!(kept().await, 50);
    db.drop().await;
}

fn redrive_config(db: &TestDb, max_parked: u64, reasons: &[&str]) -> RedriveConfig {
    RedriveConfig {
        database: order_lifecycle::config::DatabaseConfig {
            url: db.url.clone(),
            max_connections: 4,
        },
        parking: order_lifecycle::config::ParkingConfig {
            park_timeout: Duration::from_secs(3600),
            max_parked,
        },
        schemas: Default::default(),
        reasons: reasons.iter().map(|r| r.to_string()).collect(),
        ids: Vec::new(),
    }
}

/// Dead letters whose refusal was fixed later are redriven exactly once:
/// 30 confirmations refused as `parking_full` (a parking lot of size 0),
/// their ids issued since, two `redrive`s at the same time: each event is
/// applied once, every letter is marked, the event ids are duplicates
/// again, and nothing is left to redrive.
#[tokio::test]
async fn dead_letters_are_redriven_exactly_once_by_two_operators_at_once() {
    let db = TestDb::new().await;
    let cfg = parking_lot_of(0);
    let mut scripts: Vec<EventScript> = (0..30)
        .map(|i| EventScript::new(&format!("RD{i}")))
        .collect();
    let confirmations: Vec<OrderEvent> = scripts
        .iter_mut()
        .enumerate()
        .map(|(i, s)| s.confirm(&format!("RD{i}-SL"), "EXECUTED"))
        .collect();
    let refused = process_batch(&db.store, &cfg, &messages("c", 0, &confirmations))
        .await
        .unwrap();
    assert_eq!(refused.dead_letters.len(), 30);
    assert!(refused
        .dead_letters
        .iter()
        .all(|d| d.reason == "parking_full"));
    let orders: Vec<OrderEvent> = scripts
        .iter_mut()
        .enumerate()
        .flat_map(|(i, s)| [s.place(), s.sl(&format!("RD{i}-SL"))])
        .collect();
    process_batch(&db.store, &cfg, &messages("o", 0, &orders))
        .await
        .unwrap();

    let redrive = redrive_config(&db, 1_000, &["parking_full"]);
    let (a, b) = tokio::join!(
        redrive_all(&db.store, &redrive),
        redrive_all(&db.store, &redrive)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.letters + b.letters, 30, "{a:?} {b:?}");
    let recorded = |s: &RedriveSummary| s.recorded.values().sum::<usize>();
    assert_eq!(recorded(&a) + recorded(&b), 30);
    assert!(a.refused_again.is_empty() && b.refused_again.is_empty());
    assert_eq!(
        db.count("SELECT COUNT(*) FROM lifecycle_events WHERE kind = 'provider_confirmation'")
            .await,
        30
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM dead_letters WHERE redriven_at IS NOT NULL")
            .await,
        30
    );
    let executed = db
        .rows()
        .await
        .into_iter()
        .filter(|(id, (_, _, status, _))| id.ends_with("-SL") && status == "executed")
        .count();
    assert_eq!(executed, 30);
    db.assert_sequences_gap_free().await;
    // Applied now: the same messages again are duplicates (R9), and there is
    // nothing left to redrive.
    let again = process_batch(&db.store, &cfg, &messages("c", 0, &confirmations))
        .await
        .unwrap();
    assert_eq!((again.duplicates, again.dead_letters.len()), (30, 0));
    let none = redrive_all(&db.store, &redrive).await.unwrap();
    assert_eq!(none.letters, 0);
    db.drop().await;
}

/// A redriven letter refused again is a dead letter again, with the new
/// reason and error, and goes back into the outbox; one that can wait now
/// is parked. Letters are picked by id as well as by reason.
#[tokio::test]
async fn a_redriven_letter_refused_again_is_a_dead_letter_again() {
    let db = TestDb::new().await;
    let cfg = parking_lot_of(0);
    let mut s = EventScript::new("RA1");
    let waits = [s.confirm("RA1-LATER", "NEW"), s.confirm("RA1-NEVER", "NEW")];
    process_batch(&db.store, &cfg, &messages("c", 0, &waits))
        .await
        .unwrap();
    let letter_id = |offset: i64| {
        let pool = db.store.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT id FROM dead_letters WHERE source_offset = ?")
                .bind(offset)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let (later, never) = (letter_id(0).await, letter_id(1).await);
    // Both published to the dead-letter topic meanwhile.
    sqlx::query("UPDATE dead_letters SET published_at = NOW(3)")
        .execute(db.store.pool())
        .await
        .unwrap();

    // Room for one: the first (picked by id) is parked.
    let mut one = redrive_config(&db, 1, &[]);
    one.ids = vec![later];
    let summary = redrive_all(&db.store, &one).await.unwrap();
    assert_eq!((summary.letters, summary.parked), (1, 1), "{summary:?}");
    assert_eq!(db.count("SELECT COUNT(*) FROM parked_events").await, 1);

    // No more room: the second is refused again and re-enters the outbox.
    let mut other = redrive_config(&db, 1, &["parking_full"]);
    other.ids = vec![never];
    let summary = redrive_all(&db.store, &other).await.unwrap();
    assert_eq!(summary.letters, 1);
    assert_eq!(summary.refused_again.get("parking_full"), Some(&1));
    let (reason, error, redriven, published): (String, String, Option<String>, Option<String>) =
        sqlx::query_as(
            "SELECT CAST(reason AS CHAR), CAST(error AS CHAR), CAST(redriven_at AS CHAR), \
             CAST(published_at AS CHAR) FROM dead_letters WHERE id = ?",
        )
        .bind(never)
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(reason, "parking_full");
    assert!(
        error.contains("parking lot is full: 1 events wait"),
        "{error}"
    );
    assert_eq!((redriven, published), (None, None));
    // Its event id is a duplicate again (it is a dead letter again).
    let again = process_batch(&db.store, &cfg, &messages("c", 0, &waits[1..]))
        .await
        .unwrap();
    assert_eq!(again.duplicates, 1);
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters").await, 2);
    db.drop().await;
}

/// A letter redriven and refused again while the outbox was publishing it
/// stays in the outbox: marking the version read as published does not
/// mark the new one.
#[tokio::test]
async fn a_letter_refused_again_during_its_publication_is_published_again() {
    use order_lifecycle::store::dead_letters;
    let db = TestDb::new().await;
    let cfg = parking_lot_of(0);
    let mut s = EventScript::new("OB1");
    process_batch(
        &db.store,
        &cfg,
        &messages("c", 0, &[s.confirm("OB1-X", "NEW")]),
    )
    .await
    .unwrap();
    let mut conn = db.store.pool().acquire().await.unwrap();
    let read = dead_letters::unpublished(&mut conn, 10).await.unwrap();
    assert_eq!(read.len(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = redrive_all(&db.store, &redrive_config(&db, 0, &["parking_full"]))
        .await
        .unwrap();
    assert_eq!(again.refused_again.get("parking_full"), Some(&1));
    let keys: Vec<_> = read.into_iter().map(|(key, _)| key).collect();
    dead_letters::mark_published(&mut conn, &keys)
        .await
        .unwrap();
    assert_eq!(
        db.count("SELECT COUNT(*) FROM dead_letters WHERE published_at IS NULL")
            .await,
        1,
        "the new version is still to publish"
    );
    let read = dead_letters::unpublished(&mut conn, 10).await.unwrap();
    let keys: Vec<_> = read.into_iter().map(|(key, _)| key).collect();
    dead_letters::mark_published(&mut conn, &keys)
        .await
        .unwrap();
    assert_eq!(
        db.count("SELECT COUNT(*) FROM dead_letters WHERE published_at IS NULL")
            .await,
        0
    );
    db.drop().await;
}

/// A revoked grant is the database's state, not the event's fault: the
/// batch fails as transient (retried until the grant is back), it is never
/// dead-lettered as `storage_rejected`; with the grant back it commits.
#[tokio::test]
async fn a_revoked_grant_is_retried_not_dead_lettered() {
    let db = TestDb::new().await;
    let (user, url) = db.create_user().await;
    let grant = |sql: String| {
        let pool = db.store.pool().clone();
        async move { sqlx::query(&sql).execute(&pool).await.unwrap() }
    };
    // Everything but INSERT into the log, granted per table: table grants
    // take effect on open sessions at their next statement.
    grant(format!(
        "GRANT SELECT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP ON `{}`.* TO '{user}'@'%'",
        db.name
    ))
    .await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME <> 'lifecycle_events'",
    )
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    for table in tables {
        grant(format!(
            "GRANT INSERT ON `{}`.`{table}` TO '{user}'@'%'",
            db.name
        ))
        .await;
    }
    let limited = Store::connect(&url, 2).await.unwrap();
    let cfg = config(Duration::from_secs(60));
    let mut s = EventScript::new("GR1");
    let batch = messages("o", 0, &[s.place()]);
    let err = process_batch(&limited, &cfg, &batch)
        .await
        .expect_err("INSERT is not granted");
    assert!(err.is_transient(), "{err}");
    assert!(!err.is_refusal(), "never dead-lettered: {err}");
    grant(format!(
        "GRANT INSERT ON `{}`.`lifecycle_events` TO '{user}'@'%'",
        db.name
    ))
    .await;
    let outcome = process_batch(&limited, &cfg, &batch)
        .await
        .expect("granted again");
    assert_eq!(outcome.recorded_total(), 1);
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters").await, 0);
    limited.pool().close().await;
    db.drop().await;
}

/// A page of an order's log entries ends at its byte budget (with at least
/// one entry, however large) and says that more may follow; pages chained
/// by their last sequence number cover the order exactly once.
#[tokio::test]
async fn an_order_events_page_is_bounded_by_bytes_as_well_as_count() {
    use order_lifecycle::domain::OrderId;
    use order_lifecycle::store::event_log;
    let db = TestDb::new().await;
    let mut s = EventScript::new("PG1");
    let events = [s.place(), s.sl("A"), s.sl("B"), s.tp("C"), s.modify("M")];
    process_batch(
        &db.store,
        &config(Duration::from_secs(60)),
        &messages("o", 0, &events),
    )
    .await
    .unwrap();
    let order = OrderId::parse("PG1").unwrap();
    let all = event_log::order_entries(db.store.pool(), &order, 0, 100, usize::MAX)
        .await
        .unwrap();
    assert_eq!((all.entries.len(), all.full), (5, false));
    let size = |e: &event_log::StoredEntry| e.payload.len() + e.transitions.len();

    // One byte: one entry a page; every page but the last says more may
    // follow (the last ran out of rows, not of bytes).
    let mut pages = Vec::new();
    let mut after = 0;
    loop {
        let page = event_log::order_entries(db.store.pool(), &order, after, 100, 1)
            .await
            .unwrap();
        assert_eq!(page.entries.len(), 1);
        after = page.entries[0].seq;
        pages.push((after, page.full));
        if !page.full {
            break;
        }
    }
    assert_eq!(
        pages,
        vec![(1, true), (2, true), (3, true), (4, true), (5, false)]
    );

    // Exactly the first two entries' bytes: two entries, and more to come.
    let two = size(&all.entries[0]) + size(&all.entries[1]);
    let page = event_log::order_entries(db.store.pool(), &order, 0, 100, two)
        .await
        .unwrap();
    assert_eq!((page.entries.len(), page.full), (2, true));
    // By count as before: a page of exactly the limit is full.
    let page = event_log::order_entries(db.store.pool(), &order, 0, 5, usize::MAX)
        .await
        .unwrap();
    assert_eq!((page.entries.len(), page.full), (5, true));
    db.drop().await;
}

/// Stray-key removal asks the read model again right before deleting: a
/// key found stray by a scan whose id was bound meanwhile (a batch, then
/// the follower) is kept; a key still unexplained goes; a key written
/// between the watch and the deletion stops the deletion.
#[tokio::test]
async fn a_stray_key_bound_after_the_scan_is_kept() {
    use order_lifecycle::domain::{LifecycleId, OrderId};
    use order_lifecycle::store::stray_keys::{remove_stray, KeyKind, StrayKeys, StrayRemoval};
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let projection = redis.projection().await;
    let id = |s: &str| LifecycleId::parse(s).unwrap();
    let order = |s: &str| OrderId::parse(s).unwrap();
    // Left from a restored database or the legacy platform.
    projection
        .put(
            &[
                (id("GHOST-SL"), order("OLD1")),
                (id("GHOST-X"), order("OLD2")),
            ],
            &[],
        )
        .await
        .unwrap();
    let mut found = Vec::new();
    let mut scan = StrayKeys::new(&db.store, &projection, KeyKind::Lookup);
    while let Some(batch) = scan.next_batch().await.unwrap() {
        found.extend(batch);
    }
    found.sort();
    let keys = projection.keys();
    assert_eq!(
        found,
        vec![keys.lookup(&id("GHOST-SL")), keys.lookup(&id("GHOST-X"))]
    );

    // Meanwhile a batch binds GHOST-SL and the follower projects it.
    let mut s = EventScript::new("NEW1");
    process_batch(
        &db.store,
        &config(Duration::from_secs(60)),
        &messages("o", 0, &[s.place(), s.sl("GHOST-SL")]),
    )
    .await
    .unwrap();
    while redis_follower::catch_up(&db.store, &projection)
        .await
        .unwrap()
        > 0
    {}
    assert_eq!(
        redis.get("global_order_lookup:GHOST-SL").await.as_deref(),
        Some("NEW1"),
        "projected"
    );

    // Without the operator's say-so the unexplained key stays.
    assert_eq!(
        remove_stray(&db.store, &projection, &found, UnexplainedKeys::Keep)
            .await
            .unwrap(),
        StrayRemoval {
            removed: 0,
            kept: 1
        }
    );
    assert_eq!(
        redis.get("global_order_lookup:GHOST-X").await.as_deref(),
        Some("OLD2")
    );
    assert_eq!(
        remove_stray(&db.store, &projection, &found, UnexplainedKeys::Remove)
            .await
            .unwrap(),
        StrayRemoval {
            removed: 1,
            kept: 0
        }
    );
    assert_eq!(
        redis.get("global_order_lookup:GHOST-SL").await.as_deref(),
        Some("NEW1")
    );
    assert_eq!(redis.get("global_order_lookup:GHOST-X").await, None);

    // A key written between the watch and the deletion: nothing deleted.
    projection
        .put(&[(id("GHOST-Y"), order("OLD3"))], &[])
        .await
        .unwrap();
    let ghost_y = [keys.lookup(&id("GHOST-Y"))];
    projection
        .watch_keys(&ghost_y.iter().collect::<Vec<_>>())
        .await
        .unwrap();
    let other = redis.projection().await;
    other
        .put(&[(id("GHOST-Y"), order("OLD4"))], &[])
        .await
        .unwrap();
    assert_eq!(
        projection
            .delete_watched(&ghost_y.iter().collect::<Vec<_>>())
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        redis.get("global_order_lookup:GHOST-Y").await.as_deref(),
        Some("OLD4")
    );
    redis.cleanup().await;
    db.drop().await;
}

/// On a cluster a stray key is deleted only while its value and its slot's
/// fence are as they were when looked at: the follower writing the very
/// value the key held (the same binding projected again, as after a
/// database restore) moves the fence, and the key is kept.
#[tokio::test]
async fn on_a_cluster_a_stray_key_written_again_with_its_value_is_kept() {
    use order_lifecycle::domain::{LifecycleId, OrderId};
    use order_lifecycle::store::redis_projection::Projected;
    let redis = TestRedis::cluster();
    let projection = redis.projection().await;
    let id = LifecycleId::parse("SL-ABA").unwrap();
    let order = OrderId::parse("O-ABA").unwrap();
    projection
        .put(&[(id.clone(), order.clone())], &[])
        .await
        .unwrap();
    let key = [projection.keys().lookup(&id)];
    let key: Vec<&String> = key.iter().collect();

    projection.watch_keys(&key).await.unwrap();
    let at = Projected {
        log_id: "log-aba".to_owned(),
        position: 7,
        event_id: "e-7".to_owned(),
    };
    assert!(projection
        .write(&[(id.clone(), order.clone())], &[], &at)
        .await
        .unwrap());
    assert_eq!(projection.delete_watched(&key).await.unwrap(), Some(0));
    assert_eq!(
        redis.get("global_order_lookup:SL-ABA").await.as_deref(),
        Some("O-ABA")
    );

    // Unchanged since it was looked at: deleted.
    projection.watch_keys(&key).await.unwrap();
    assert_eq!(projection.delete_watched(&key).await.unwrap(), Some(1));
    assert_eq!(redis.get("global_order_lookup:SL-ABA").await, None);
    redis.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_rebuild_rewrites_the_slots_a_round_in_flight_wrote() {
    use order_lifecycle::domain::{LifecycleId, OrderId};
    use order_lifecycle::projection::rebuild;
    let db = TestDb::new().await;
    let redis = TestRedis::cluster();
    let cfg = config(Duration::from_secs(60));
    let mut s = EventScript::new("GEN1");
    let batch = messages("o", 0, &[s.place(), s.sl("GEN-SL1"), s.tp("GEN-TP1")]);
    process_batch(&db.store, &cfg, &batch).await.unwrap();
    let follower = redis.projection().await;
    redis_follower::catch_up(&db.store, &follower)
        .await
        .unwrap();
    let at = follower
        .projected()
        .await
        .unwrap()
        .expect("the record on every master");
    // Redis goes wrong: a lookup names another order.
    let wrong = vec![(
        LifecycleId::parse("GEN-SL1").unwrap(),
        OrderId::parse("OTHER").unwrap(),
    )];
    follower.put(&wrong, &[]).await.unwrap();
    // A rebuild resets Redis; a round of the follower in flight since
    // before the reset then completes, with what it had read.
    let rebuilding = redis.projection().await;
    redis_follower::reset(&db.store, &rebuilding).await.unwrap();
    follower.write(&wrong, &[], &at).await.unwrap();
    rebuild::catch_up_to_head(&db.store, &rebuilding, "test")
        .await
        .unwrap();
    assert_eq!(
        redis.get("global_order_lookup:GEN-SL1").await.as_deref(),
        Some("GEN1"),
        "the rebuild rewrote the slot the round in flight had written"
    );
    redis.cleanup().await;
    db.drop().await;
}
