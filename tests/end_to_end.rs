//! End to end through the real broker: events produced to Kafka, the
//! consumer started as `run` starts it, outcomes read from MariaDB, Redis and
//! the dead-letter topic.

use order_lifecycle_testkit as common;

use std::collections::BTreeSet;

use common::{wait_until, Env};
use order_lifecycle::domain::{LifecycleBook, OrderEvent};
use order_lifecycle::scenario::{self, Payload, PlanOptions};
use order_lifecycle::store::stray_keys::UnexplainedKeys;
use order_lifecycle::testing::EventScript;
use order_lifecycle::wire::Encoding;

type Row = (String, String, String, Option<String>);

fn row(order: &str, id_type: &str, status: &str, by: Option<&str>) -> Row {
    (
        order.into(),
        id_type.into(),
        status.into(),
        by.map(String::from),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_basic_storage_order_id_is_stored_active() {
    let env = Env::new().await;
    let consumer = env.start(env.run_config());
    let mut s = EventScript::new("123456789");
    env.send(&[s.place()], Encoding::Protobuf).await;
    env.wait_for_log(1, 0).await;
    let rows = env.db.rows().await;
    assert_eq!(
        rows["123456789"],
        row("123456789", "order_id", "active", None)
    );
    env.wait_for_redis().await;
    assert_eq!(
        env.redis
            .get("global_order_lookup:123456789")
            .await
            .as_deref(),
        Some("123456789")
    );
    consumer.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_replacement_second_stop_loss_replaces_the_first_json() {
    let env = Env::new().await;
    let consumer = env.start(env.run_config());
    let mut s = EventScript::new("555");
    env.send(&[s.place(), s.sl("SL-A"), s.sl("SL-B")], Encoding::Json)
        .await;
    env.wait_for_log(3, 0).await;
    let rows = env.db.rows().await;
    assert_eq!(
        rows["SL-A"],
        row("555", "stoploss_id", "replaced", Some("SL-B"))
    );
    assert_eq!(rows["SL-B"], row("555", "stoploss_id", "active", None));
    consumer.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_status_update_provider_execution_marks_stop_loss_executed() {
    let env = Env::new().await;
    let consumer = env.start(env.run_config());
    let mut s = EventScript::new("777");
    env.send(
        &[s.place(), s.sl("SL1"), s.confirm("SL1", "EXECUTED")],
        Encoding::Protobuf,
    )
    .await;
    env.wait_for_log(3, 0).await;
    assert_eq!(env.db.rows().await["SL1"].2, "executed");
    consumer.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_resolution_every_id_resolves_in_mysql_and_redis() {
    let env = Env::new().await;
    let consumer = env.start(env.run_config());
    let mut s = EventScript::new("42");
    let events = vec![
        s.place(),
        s.sl("SL1"),
        s.tp("TP1"),
        s.sl("SL2"),
        s.cancel_tp("TPC1", None),
        s.close("CL1", Some("SLC1"), None),
    ];
    env.send(&events, Encoding::Protobuf).await;
    env.wait_for_log(6, 0).await;
    env.wait_for_redis().await;
    let rows = env.db.rows().await;
    let ids = ["42", "SL1", "TP1", "SL2", "TPC1", "CL1", "SLC1"];
    assert_eq!(rows.len(), ids.len());
    for id in ids {
        assert_eq!(rows[id].0, "42", "{id} in MySQL");
        assert_eq!(
            env.redis
                .get(&format!("global_order_lookup:{id}"))
                .await
                .as_deref(),
            Some("42"),
            "{id} in Redis"
        );
    }
    consumer.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_complete_lifecycle_has_six_ids_and_the_right_ones_active() {
    let env = Env::new().await;
    let consumer = env.start(env.run_config());
    let mut s = EventScript::new("9001");
    let events = vec![
        s.place(),
        s.sl("SL1"),
        s.cancel_sl("SLC1", None),
        s.sl("SL2"),
        s.tp("TP1"),
        s.close("CL1", None, None),
    ];
    env.send(&events, Encoding::Protobuf).await;
    env.wait_for_log(6, 0).await;
    let rows = env.db.rows().await;
    let expected = [
        ("9001", row("9001", "order_id", "active", None)),
        ("SL1", row("9001", "stoploss_id", "cancelled", None)),
        ("SLC1", row("9001", "stoploss_cancel_id", "active", None)),
        ("SL2", row("9001", "stoploss_id", "active", None)),
        ("TP1", row("9001", "takeprofit_id", "active", None)),
        ("CL1", row("9001", "close_id", "active", None)),
    ];
    assert_eq!(rows.len(), 6);
    for (id, r) in expected {
        assert_eq!(rows[id], r, "{id}");
    }
    env.wait_for_redis().await;
    let redis = env.redis.snapshot().await;
    assert_eq!(
        redis["order_lifecycle_active:9001"],
        "close_id=CL1,order_id=9001,stoploss_cancel_id=SLC1,stoploss_id=SL2,takeprofit_id=TP1"
    );
    consumer.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_many_orders_all_applied_and_consistent() {
    let env = Env::new().await;
    let consumer = env.start(env.run_config());
    let plan = scenario::plan(&PlanOptions {
        orders: 120,
        orders_per_second: 1000.0,
        seed: 7,
        json_ratio: 0.3,
        bad_ratio: 0.0,
        run_id: "77".into(),
        start_ms: 1_764_300_000_000,
    });
    let mut events = Vec::new();
    for p in &plan {
        if let Payload::Event(e, enc) = &p.payload {
            env.send(std::slice::from_ref(e), *enc).await;
            events.push((**e).clone());
        }
    }
    // Requests and confirmations travel on different topics and partitions,
    // so confirmations overtake their requests here: they are parked and
    // applied once the id is issued (rule R7).
    env.wait_for_log(events.len() as i64, 0).await;
    assert_eq!(env.db.count("SELECT COUNT(*) FROM parked_events").await, 0);
    env.db.assert_sequences_gap_free().await;
    env.db.assert_one_active_per_type().await;

    let mut book = LifecycleBook::new();
    for e in &events {
        book.process(e).expect("the plan is valid in order");
    }
    let rows = env.db.rows().await;
    let expected: BTreeSet<(String, String)> = book
        .orders()
        .flat_map(|o| {
            o.ids()
                .iter()
                .map(|r| (r.lifecycle_id.to_string(), o.order_id().to_string()))
        })
        .collect();
    let actual: BTreeSet<(String, String)> = rows
        .iter()
        .map(|(id, r)| (id.clone(), r.0.clone()))
        .collect();
    assert_eq!(actual, expected, "every issued id bound to its order");

    env.wait_for_redis().await;
    let redis = env.redis.snapshot().await;
    for (id, order) in &expected {
        assert_eq!(
            redis.get(&format!("global_order_lookup:{id}")),
            Some(order),
            "{id}"
        );
    }
    consumer.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_example_row_by_row() {
    let env = Env::new().await;
    let consumer = env.start(env.run_config());
    let mut s = EventScript::new("123456789");
    let steps = vec![
        (s.place(), vec![("123456789", "order_id", "active", None)]),
        (
            s.sl("SL111"),
            vec![("SL111", "stoploss_id", "active", None)],
        ),
        (
            s.cancel_sl("SLC444", None),
            vec![
                ("SLC444", "stoploss_cancel_id", "active", None),
                ("SL111", "stoploss_id", "cancelled", None),
            ],
        ),
        (
            s.sl("SL777"),
            vec![("SL777", "stoploss_id", "active", None)],
        ),
        (
            s.sl("SL888"),
            vec![
                ("SL777", "stoploss_id", "replaced", Some("SL888")),
                ("SL888", "stoploss_id", "active", None),
            ],
        ),
        (
            s.confirm("SL777", "EXECUTED"),
            vec![("SL777", "stoploss_id", "executed", Some("SL888"))],
        ),
        (
            s.confirm("SLC444", "CANCELLED"),
            vec![("SLC444", "stoploss_cancel_id", "executed", None)],
        ),
    ];
    for (i, (event, expected)) in steps.into_iter().enumerate() {
        env.send(&[event], Encoding::Protobuf).await;
        env.wait_for_log(i as i64 + 1, 0).await;
        let rows = env.db.rows().await;
        for (id, t, st, by) in expected {
            assert_eq!(rows[id], row("123456789", t, st, by), "step {i}: {id}");
        }
    }
    env.wait_for_redis().await;
    for id in ["123456789", "SL111", "SLC444", "SL777", "SL888"] {
        assert_eq!(
            env.redis
                .get(&format!("global_order_lookup:{id}"))
                .await
                .as_deref(),
            Some("123456789")
        );
    }
    consumer.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_breakers_and_bad_bytes_are_dead_lettered_and_consumption_goes_on() {
    let env = Env::new().await;
    let consumer = env.start(env.run_config());
    let mut a = EventScript::new("A1");
    let mut b = EventScript::new("B1");
    env.send(
        &[a.place(), a.sl("SL-SHARED"), b.place()],
        Encoding::Protobuf,
    )
    .await;
    // A1 and B1 may sit on different partitions: let A1 bind its id first.
    env.wait_for_log(3, 0).await;
    // R1: B1 tries to bind A1's stop-loss.
    env.send(&[b.sl("SL-SHARED")], Encoding::Json).await;
    // R10: garbage bytes, a JSON event with no kind, an 80-character id.
    let orders = env.topics.orders.clone();
    env.send_raw(&orders, "B1", &[0xff, 0xff, 0xff, 0x01], None)
        .await;
    env.send_raw(
        &orders,
        "B1",
        br#"{"event_id":"nokind","order_id":"B1","occurred_at_ms":1764300000000}"#,
        Some("application/json"),
    )
    .await;
    let long = "L".repeat(80);
    let long_json = format!(
        r#"{{"event_id":"longid","order_id":"B1","occurred_at_ms":1764300000000,"stop_loss_added":{{"stoploss_id":"{long}"}}}}"#
    );
    env.send_raw(&orders, "B1", long_json.as_bytes(), None)
        .await;
    // Still applied afterwards.
    env.send(&[b.sl("SL-B")], Encoding::Protobuf).await;

    env.wait_for_log(4, 4).await;
    let rows = env.db.rows().await;
    assert_eq!(rows["SL-SHARED"].0, "A1", "the binding did not move");
    assert_eq!(rows["SL-B"], row("B1", "stoploss_id", "active", None));
    assert!(!rows.contains_key(long.as_str()));

    let letters = env.db.dead_letters().await;
    let reasons: Vec<&str> = letters.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(
        reasons,
        vec![
            "id_bound_to_other_order",
            "undecodable_protobuf",
            "missing_kind",
            "invalid_field"
        ]
    );
    assert!(
        letters[0].2.contains("SL-SHARED") && letters[0].2.contains("A1"),
        "{}",
        letters[0].2
    );
    assert!(
        letters[3].2.contains("stop_loss_added.stoploss_id"),
        "{}",
        letters[3].2
    );

    let topic = env.read_dead_letter_topic(4);
    assert_eq!(topic.len(), 4, "four messages on the dead-letter topic");
    let mut topic_reasons: Vec<&str> = topic
        .iter()
        .map(|m| m["dead-letter-reason"].as_str())
        .collect();
    topic_reasons.sort();
    assert_eq!(
        topic_reasons,
        vec![
            "id_bound_to_other_order",
            "invalid_field",
            "missing_kind",
            "undecodable_protobuf"
        ]
    );
    for m in &topic {
        assert_eq!(m["source-topic"], env.topics.orders);
        assert!(m["source-offset"].parse::<i64>().is_ok());
        assert!(m["source-partition"].parse::<i32>().is_ok());
        assert!(!m["dead-letter-error"].is_empty());
    }
    consumer.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_events_delivered_twice_change_nothing() {
    let env = Env::new().await;
    let consumer = env.start(env.run_config());
    let mut events = Vec::new();
    for o in 0..5 {
        let mut s = EventScript::new(&format!("R{o}"));
        events.extend([
            s.place(),
            s.sl(&format!("SL{o}a")),
            s.sl(&format!("SL{o}b")),
            s.confirm(&format!("SL{o}a"), "EXECUTED"),
            s.close(&format!("CL{o}"), Some(&format!("SLC{o}")), None),
        ]);
    }
    env.send(&events, Encoding::Protobuf).await;
    env.wait_for_log(25, 0).await;
    env.wait_for_redis().await;
    let rows_before = env.db.full_rows().await;
    let redis_before = env.redis.snapshot().await;

    // A second producer run with the same event ids, half of them as JSON.
    env.send(&events[..12], Encoding::Json).await;
    env.send(&events[12..], Encoding::Protobuf).await;
    wait_until(
        "the redelivered messages to be consumed",
        std::time::Duration::from_secs(60),
        || async {
            env.db
                .count("SELECT CAST(COALESCE(SUM(next_offset), 0) AS SIGNED) FROM consumer_offsets")
                .await
                >= 50
        },
    )
    .await;
    env.wait_for_redis().await;
    assert_eq!(
        env.db.count("SELECT COUNT(*) FROM lifecycle_events").await,
        25
    );
    assert_eq!(env.db.full_rows().await, rows_before);
    assert_eq!(env.redis.snapshot().await, redis_before);
    assert_eq!(env.db.count("SELECT COUNT(*) FROM dead_letters").await, 0);
    consumer.stop().await;
    env.cleanup().await;
}

/// The binary as users run it: `migrate` creates the schema, `run` consumes
/// and stops cleanly on SIGTERM with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_migrates_runs_and_stops_cleanly_on_sigterm() {
    let env = Env::new().await;
    let bin = env!("CARGO_BIN_EXE_order-lifecycle");
    let fresh = format!("{}_cli", env.db.name);
    let status = std::process::Command::new(bin)
        .args([
            "migrate",
            "--database-url",
            &format!("{}/{fresh}", common::MYSQL_ROOT),
        ])
        .status()
        .expect("run migrate");
    assert!(status.success());
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = ? \
         AND table_name IN ('lifecycle_events', 'order_lifecycle_ids', 'dead_letters', 'parked_events')",
    )
    .bind(&fresh)
    .fetch_one(env.db.store.pool())
    .await
    .unwrap();
    assert_eq!(tables, 4);
    sqlx::query(&format!("DROP DATABASE `{fresh}`"))
        .execute(env.db.store.pool())
        .await
        .unwrap();

    let config = env.run_config();
    let log = std::env::temp_dir().join(format!("{}.log", env.group_id));
    let mut child = std::process::Command::new(bin)
        .arg("run")
        .env("OL_KAFKA_BROKERS", &config.kafka.brokers)
        .env("OL_TOPICS", config.input.topics.join(","))
        .env("OL_GROUP_ID", &config.group_id)
        .env("OL_DEAD_LETTER_TOPIC", &config.dead_letter_topic)
        .env("OL_DATABASE_URL", config.database.url.expose())
        .env("OL_REDIS_KEY_PREFIX", &env.redis.prefix)
        .env("OL_SESSION_TIMEOUT", "6s")
        .env("OL_SHUTDOWN_TIMEOUT", "3s")
        .env("OL_HTTP_LISTEN", "off")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start run");
    let mut s = EventScript::new("BIN1");
    env.send(
        &[s.place(), s.sl("SL1"), s.confirm("SL1", "EXECUTED")],
        Encoding::Json,
    )
    .await;
    env.wait_for_log(3, 0).await;
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "run did not stop on SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let output = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(
        output.contains("order-lifecycle consumer stopped"),
        "{output}"
    );
    assert_eq!(env.db.rows().await["SL1"].2, "executed");
    let _ = std::fs::remove_file(log);
    env.cleanup().await;
}

fn inbound(topic: &str, offset: i64, payload: Vec<u8>) -> order_lifecycle::wire::InboundMessage {
    order_lifecycle::wire::InboundMessage {
        topic: topic.into(),
        partition: 0,
        offset,
        key: None,
        payload: Some(payload),
        content_type: None,
        timestamp_ms: None,
    }
}

/// A crash between the database commit and the Kafka commit: the consumer
/// starts from the offsets stored with the data, not Kafka's, so nothing
/// already stored is read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_stored_with_the_data_win_over_kafkas() {
    let env = Env::with_partitions(1).await;
    let orders = env.topics.orders.clone();
    let mut s = EventScript::new("OFF1");
    let early = [s.place(), s.sl("SL1")];
    let late = [s.sl("SL2"), s.sl("SL3")];
    let garbage = vec![0xff, 0xfe, 0xfd];
    // Kafka holds: 0 event, 1 garbage, 2 event, 3 garbage, 4 and 5 events.
    env.send(&early[..1], Encoding::Protobuf).await;
    env.send_raw(&orders, "OFF1", &garbage, None).await;
    env.send(&early[1..], Encoding::Protobuf).await;
    env.send_raw(&orders, "OFF1", &garbage, None).await;
    env.send(&late, Encoding::Protobuf).await;

    // The database says offsets 0..=2 are done (as a previous instance that
    // died before its Kafka commit would leave it). For offset 1 it holds a
    // valid event, so reading Kafka's garbage at offset 1 again would show
    // as a dead letter at offset 1.
    let pb = |e: &order_lifecycle::domain::OrderEvent| {
        order_lifecycle::wire::encode(e, Encoding::Protobuf)
    };
    let other = EventScript::new("OTHER").place();
    let stored = vec![
        inbound(&orders, 0, pb(&early[0])),
        inbound(&orders, 1, pb(&other)),
        inbound(&orders, 2, pb(&early[1])),
    ];
    let pipeline = order_lifecycle::ingest::PipelineConfig {
        offsets_group: Some(env.group_id.clone()),
        park_timeout: std::time::Duration::from_secs(60),
        max_parked: order_lifecycle::ingest::pipeline::DEFAULT_MAX_PARKED,
        schema_ids: Vec::new(),
    };
    order_lifecycle::ingest::process_batch(&env.db.store, &pipeline, &stored)
        .await
        .unwrap();

    let consumer = env.start(env.run_config());
    env.wait_for_log(5, 1).await;
    let offsets: Vec<i64> = sqlx::query_scalar("SELECT source_offset FROM dead_letters")
        .fetch_all(env.db.store.pool())
        .await
        .unwrap();
    assert_eq!(offsets, vec![3], "offset 1 was not read again");
    let letters = env.read_dead_letter_topic(1);
    assert_eq!(letters[0]["source-offset"], "3");
    assert_eq!(env.db.rows().await["SL3"].2, "active");
    consumer.stop().await;
    env.cleanup().await;
}

/// The dead-letter table is the topic's outbox: a letter recorded by an
/// instance that died before publishing it is published by the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_recorded_before_a_crash_are_still_published() {
    let env = Env::with_partitions(1).await;
    let orders = env.topics.orders.clone();
    let pipeline = order_lifecycle::ingest::PipelineConfig {
        offsets_group: Some(env.group_id.clone()),
        park_timeout: std::time::Duration::from_secs(60),
        max_parked: order_lifecycle::ingest::pipeline::DEFAULT_MAX_PARKED,
        schema_ids: Vec::new(),
    };
    order_lifecycle::ingest::process_batch(
        &env.db.store,
        &pipeline,
        &[inbound(&orders, 0, vec![0xff, 0xff])],
    )
    .await
    .unwrap();
    let consumer = env.start(env.run_config());
    let letters = env.read_dead_letter_topic(1);
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["dead-letter-reason"], "undecodable_protobuf");
    assert_eq!(letters[0]["source-offset"], "0");
    common::wait_until(
        "the letter to be marked published",
        std::time::Duration::from_secs(10),
        || async {
            env.db
                .count("SELECT COUNT(*) FROM dead_letters WHERE published_at IS NOT NULL")
                .await
                == 1
        },
    )
    .await;
    consumer.stop().await;
    env.cleanup().await;
}

/// Sends an order's first four events and consumes them into `env`'s
/// database; returns the "restored" database: a new one that knows offset
/// 0 of each topic, nothing else, while Kafka's committed offset is 4.
async fn consumed_then_restored(env: &Env, s: &mut EventScript) -> common::TestDb {
    let events = [s.place(), s.sl("SL1"), s.sl("SL2"), s.tp("TP1")];
    env.send(&events, Encoding::Protobuf).await;
    let consumer = env.start(env.run_config());
    env.wait_for_log(4, 0).await;
    consumer.stop().await;
    let restored = common::TestDb::new().await;
    for topic in [&env.topics.orders, &env.topics.confirmations] {
        sqlx::query("INSERT INTO consumer_offsets (group_id, topic, kafka_partition, next_offset) VALUES (?, ?, 0, 0)")
            .bind(&env.group_id)
            .bind(topic)
            .execute(restored.store.pool())
            .await
            .unwrap();
    }
    restored
}

/// Waits for the restored database to hold the order's five events, the
/// four it lacked re-read from its own offsets before the fifth.
async fn assert_refilled(restored: &common::TestDb) {
    common::wait_until(
        "the restored database to be refilled",
        std::time::Duration::from_secs(60),
        || async {
            restored
                .count("SELECT COUNT(*) FROM lifecycle_events")
                .await
                >= 5
        },
    )
    .await;
    let rows = restored.rows().await;
    assert_eq!(rows.len(), 5);
    assert_eq!(rows["SL2"].2, "replaced");
    assert_eq!(rows["SL3"].2, "active");
}

/// A database restored from an older backup: its stored offsets are behind
/// Kafka's committed ones, and the consumer re-reads from the database's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_behind_kafka_is_refilled_from_its_own_offsets() {
    let env = Env::with_partitions(1).await;
    let mut s = EventScript::new("BK1");
    let restored = consumed_then_restored(&env, &mut s).await;
    let mut config = env.run_config();
    config.database.url = restored.url.clone();
    let consumer = env.start(config);
    // Kafka's committed offset is 4; something must arrive for the gate to act.
    env.send(&[s.sl("SL3")], Encoding::Protobuf).await;
    assert_refilled(&restored).await;
    consumer.stop().await;
    restored.drop().await;
    env.cleanup().await;
}

/// A restored database whose stored offsets cannot be read when the first
/// message arrives (here the grant to read them is missing, as while the
/// database comes back): the message waits for the read instead of being
/// applied unchecked, ahead of the messages the database lacks (which the
/// offset its batch stored would then have skipped for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_database_is_refilled_even_when_its_offsets_are_unreadable_at_first() {
    let env = Env::with_partitions(1).await;
    let mut s = EventScript::new("BU1");
    let restored = consumed_then_restored(&env, &mut s).await;
    // A user with every table's rights but reading `consumer_offsets`
    // (table grants take effect on open sessions at their next statement).
    let (user, url) = restored.create_user().await;
    let root = restored.store.pool().clone();
    let as_root = |sql: String| {
        let root = root.clone();
        async move { sqlx::query(&sql).execute(&root).await.unwrap() }
    };
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = DATABASE()",
    )
    .fetch_all(&root)
    .await
    .unwrap();
    for table in tables {
        let rights = if table == "consumer_offsets" {
            "INSERT, UPDATE, DELETE"
        } else {
            "ALL"
        };
        as_root(format!(
            "GRANT {rights} ON `{}`.`{table}` TO '{user}'@'%'",
            restored.name
        ))
        .await;
    }
    let consumer = env.spawn_binary(&["--database-url", url.expose()], "unreadable-offsets");
    // Kafka's committed offset is 4; the message after it arrives while
    // the stored offsets cannot be read, and waits.
    env.send(&[s.sl("SL3")], Encoding::Protobuf).await;
    wait_until(
        "the first message to wait for its partition's stored offset",
        std::time::Duration::from_secs(60),
        || async { consumer.logged("stored offset: database unavailable or busy; retrying") },
    )
    .await;
    assert_eq!(
        restored
            .count("SELECT COUNT(*) FROM lifecycle_events")
            .await,
        0,
        "nothing is applied before the stored offset is read"
    );
    as_root(format!(
        "GRANT SELECT ON `{}`.`consumer_offsets` TO '{user}'@'%'",
        restored.name
    ))
    .await;
    assert_refilled(&restored).await;
    let (code, log) = consumer.terminate(std::time::Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{log}");
    restored.drop().await;
    env.cleanup().await;
}

/// `rebuild` while `run` consumes: a reader resolving a fixed set of ids in
/// MySQL and Redis never misses, and afterwards both equal the log's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_while_consuming_never_loses_a_resolution() {
    use common::stream;
    let env = Env::new().await;
    let consumer = env.start(env.run_config());
    let first = stream(41, 100);
    env.send_many(&first).await;
    env.wait_for_log(first.len() as i64, 0).await;
    env.wait_for_redis().await;
    let watched: Vec<String> = env.db.rows().await.keys().take(60).cloned().collect();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let pool = env.db.store.pool().clone();
        let redis = env.redis.client.clone();
        let prefix = env.redis.prefix.clone();
        let watched = watched.clone();
        tokio::spawn(async move {
            let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
            let (mut reads, mut misses) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for id in &watched {
                    let row: Option<i64> = sqlx::query_scalar(
                        "SELECT id FROM order_lifecycle_ids WHERE lifecycle_id = ?",
                    )
                    .bind(id)
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
                    let key: Option<String> = redis::cmd("GET")
                        .arg(format!("{prefix}global_order_lookup:{id}"))
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    reads += 2;
                    if row.is_none() || key.is_none() {
                        misses.push(id.clone());
                    }
                }
            }
            (reads, misses)
        })
    };
    let second = stream(42, 150);
    let sending = env.send_many(&second);
    let rebuilding = async {
        let mut lease = order_lifecycle::projection::rebuild::RebuildLease::acquire(&env.db.store)
            .await
            .expect("the rebuild lease");
        let mysql = order_lifecycle::projection::rebuild::rebuild_mysql(&env.db.store, &mut lease)
            .await
            .unwrap();
        let projection = env.redis.projection().await;
        let redis = order_lifecycle::projection::rebuild::rebuild_redis(
            &env.db.store,
            &projection,
            &mut lease,
            UnexplainedKeys::Keep,
        )
        .await
        .unwrap();
        (mysql, redis)
    };
    let (_, (mysql, _)) = tokio::join!(sending, rebuilding);
    assert!(mysql.rows > 0);
    let all = first.len() + second.len();
    common::wait_until(
        "the second stream",
        std::time::Duration::from_secs(60),
        || async { env.logged().await >= all as i64 },
    )
    .await;
    env.wait_for_redis().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, misses) = reader.await.unwrap();
    assert!(reads > 100, "the reader kept reading ({reads} reads)");
    assert!(misses.is_empty(), "misses during the rebuild: {misses:?}");
    consumer.stop().await;
    common::assert_projections_match_log(&env.db, &env.redis).await;
    env.db.assert_sequences_gap_free().await;
    env.cleanup().await;
}

/// A topic deleted and created again starts at offset 0 while the database
/// remembers higher offsets: the consumer must not skip the new messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_offsets_beyond_a_recreated_topics_end_are_ignored() {
    let env = Env::with_partitions(1).await;
    for topic in [&env.topics.orders, &env.topics.confirmations] {
        sqlx::query(
            "INSERT INTO consumer_offsets (group_id, topic, kafka_partition, next_offset) VALUES (?, ?, 0, 500)",
        )
        .bind(&env.group_id)
        .bind(topic)
        .execute(env.db.store.pool())
        .await
        .unwrap();
    }
    let mut s = EventScript::new("RESET1");
    env.send(
        &[s.place(), s.sl("SL1"), s.confirm("SL1", "EXECUTED")],
        Encoding::Protobuf,
    )
    .await;
    let consumer = env.start(env.run_config());
    env.wait_for_log(3, 0).await;
    assert_eq!(env.db.rows().await["SL1"].2, "executed");
    consumer.stop().await;
    // The stale offsets are forgotten, not kept by "only grow": once the
    // new partitions passed 500, a restart would otherwise skip to 500.
    let stored: Vec<(String, i64)> = sqlx::query_as(
        "SELECT CAST(topic AS CHAR), next_offset FROM consumer_offsets WHERE group_id = ? \
         ORDER BY topic",
    )
    .bind(&env.group_id)
    .fetch_all(env.db.store.pool())
    .await
    .unwrap();
    let at = |topic: &str| stored.iter().find(|(t, _)| t == topic).map(|(_, n)| *n);
    assert_eq!(at(&env.topics.orders), Some(2), "{stored:?}");
    assert_eq!(at(&env.topics.confirmations), Some(1), "{stored:?}");
    env.cleanup().await;
}

/// The stream in rounds holding at most one event per order, in the order
/// the plan made them: a round consumed before the next is sent reaches the
/// consumer in timestamp order.
fn rounds(
    events: &[(order_lifecycle::domain::OrderEvent, Encoding)],
) -> Vec<Vec<(order_lifecycle::domain::OrderEvent, Encoding)>> {
    use order_lifecycle::domain::EventKind;
    let mut rounds: Vec<Vec<_>> = Vec::new();
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut owner: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (event, encoding) in events {
        let order = match (&event.order_id, &event.kind) {
            (Some(o), _) => {
                for (id, _) in event.issued_ids() {
                    owner.insert(id.to_string(), o.to_string());
                }
                o.to_string()
            }
            // A confirmation belongs to the order that issued its id.
            (None, EventKind::ProviderConfirmation(c)) => owner
                .get(c.lifecycle_id.as_str())
                .cloned()
                .unwrap_or_else(|| format!("unknown:{}", c.lifecycle_id)),
            (None, _) => format!("other:{}", event.event_id),
        };
        let round = seen.entry(order).or_insert(0);
        let slot = rounds.len().min(*round);
        if slot == rounds.len() {
            rounds.push(Vec::new());
        }
        rounds[slot].push((event.clone(), *encoding));
        *round = slot + 1;
    }
    rounds
}

fn replay_config(env: &Env) -> order_lifecycle::commands::replay::ReplayConfig {
    let run = env.run_config();
    order_lifecycle::commands::replay::ReplayConfig {
        kafka: run.kafka,
        database: run.database,
        redis: run.redis,
        input: order_lifecycle::config::InputConfig {
            batch_size: 100,
            ..run.input
        },
        group_id: format!("{}-replay", env.group_id),
        since: None,
    }
}

/// `replay` with `config` into the test's database and Redis prefix.
async fn replay(
    env: &Env,
    config: &order_lifecycle::commands::replay::ReplayConfig,
) -> order_lifecycle::commands::replay::ReplaySummary {
    order_lifecycle::commands::replay::replay(&env.db.store, &env.redis.projection().await, config)
        .await
        .expect("replay")
}

/// The read keys, without the projection's own bookkeeping.
async fn read_keys(env: &Env) -> std::collections::BTreeMap<String, String> {
    let mut keys = env.redis.snapshot().await;
    keys.retain(|k, _| !k.starts_with("order_lifecycle:"));
    keys
}

/// Dropping the database and replaying the topics restores the same log
/// (same events, same per-order sequences) and the same projections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_into_an_empty_database_restores_the_log_and_projections() {
    let mut env = Env::new().await;
    let consumer = env.start(env.run_config());
    let events = common::stream(30, 400);
    let consumed = format!(
        "SELECT CAST(COALESCE(SUM(next_offset), 0) AS SIGNED) FROM consumer_offsets WHERE group_id = '{}'",
        env.group_id
    );
    let mut sent = 0;
    for round in rounds(&events) {
        env.send_many(&round).await;
        sent += round.len() as i64;
        wait_until(
            "the round to be consumed",
            std::time::Duration::from_secs(30),
            || async { env.db.count(&consumed).await >= sent },
        )
        .await;
    }
    // A rule breaker and garbage: dead letters must come back too.
    let mut a = EventScript::new("RPL-A");
    let mut b = EventScript::new("RPL-B");
    env.send(&[a.place(), a.sl("RPL-SHARED")], Encoding::Protobuf)
        .await;
    env.send(&[b.place()], Encoding::Protobuf).await;
    env.send(&[b.sl("RPL-SHARED")], Encoding::Json).await;
    let orders = env.topics.orders.clone();
    env.send_raw(&orders, "RPL-B", b"\xff\xfe not an event", None)
        .await;
    sent += 5;
    wait_until(
        "everything to be consumed",
        std::time::Duration::from_secs(30),
        || async { env.db.count(&consumed).await >= sent },
    )
    .await;
    env.wait_for_redis().await;
    consumer.stop().await;

    let log = env.db.log().await;
    let rows = env.db.full_rows().await;
    let letters = env.db.dead_letters().await;
    let keys = read_keys(&env).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        log.len() > events.len() / 2,
        "a real log: {} entries",
        log.len()
    );

    env.db.recreate().await;
    env.redis.cleanup().await;
    assert_eq!(env.logged().await, 0);

    let summary = replay(&env, &replay_config(&env)).await;
    assert_eq!(summary.messages, sent as u64);
    assert_eq!(summary.recorded, log.len() as u64);
    assert_eq!(summary.duplicates, 0);
    assert_eq!(summary.dead_letters, 2);

    let replayed = env.db.log().await;
    assert_eq!(replayed.len(), log.len(), "log entries");
    for (before, after) in log.iter().zip(&replayed) {
        assert_eq!(before, after, "log entry (order, seq, event, ...) differs");
    }
    assert_eq!(env.db.full_rows().await, rows, "order_lifecycle_ids");
    assert_eq!(env.db.dead_letters().await, letters, "dead letters");
    assert_eq!(read_keys(&env).await, keys, "Redis keys");
    env.db.assert_sequences_gap_free().await;
    env.cleanup().await;
}

/// A replay that records entries while another rebuild holds the rebuild
/// lease (one of MySQL only, say) still projects them into Redis: they used
/// to be left to that rebuild, which need not touch Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_beside_a_running_rebuild_projects_its_entries_into_redis() {
    let env = Env::new().await;
    let mut a = EventScript::new("RPR-A");
    env.send(
        &[a.place(), a.sl("RPR-SL"), a.tp("RPR-TP")],
        Encoding::Protobuf,
    )
    .await;
    let lease = order_lifecycle::projection::rebuild::RebuildLease::acquire(&env.db.store)
        .await
        .expect("the rebuild lease");

    let summary = replay(&env, &replay_config(&env)).await;
    assert_eq!(summary.recorded, 3);
    assert_eq!(summary.redis_entries, 3, "the replayed entries projected");
    for id in ["RPR-A", "RPR-SL", "RPR-TP"] {
        assert_eq!(
            env.redis
                .get(&format!("global_order_lookup:{id}"))
                .await
                .as_deref(),
            Some("RPR-A"),
            "{id}"
        );
    }
    common::assert_projections_match_log(&env.db, &env.redis).await;
    lease.release().await.expect("release the lease");
    env.cleanup().await;
}

/// A replay that records nothing still projects a log that Redis does not
/// follow: a replay killed before its Redis step, run again, finds every
/// event logged (here: a Redis flushed with no `run` beside). It used to
/// leave Redis as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_records_nothing_still_projects_a_log_redis_does_not_follow() {
    let env = Env::new().await;
    let mut a = EventScript::new("RPF-A");
    env.send(&[a.place(), a.sl("RPF-SL")], Encoding::Protobuf)
        .await;
    let first = replay(&env, &replay_config(&env)).await;
    assert_eq!((first.recorded, first.redis_entries), (2, 2));
    env.redis.cleanup().await;
    assert_eq!(env.redis.get("global_order_lookup:RPF-SL").await, None);

    let again = replay(&env, &replay_config(&env)).await;
    assert_eq!((again.recorded, again.duplicates), (0, 2));
    assert_eq!(again.redis_entries, 2, "the log projected again");
    assert_eq!(
        env.redis.get("global_order_lookup:RPF-SL").await.as_deref(),
        Some("RPF-A")
    );
    common::assert_projections_match_log(&env.db, &env.redis).await;
    env.cleanup().await;
}

/// Replaying over a healthy store changes nothing, and leaves the live
/// consumer (its group, its stored offsets) alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_over_a_healthy_store_changes_nothing() {
    let env = Env::new().await;
    let consumer = env.start(env.run_config());
    let events = common::stream(25, 401);
    env.send_many(&events).await;
    let mut a = EventScript::new("RPH-A");
    let mut b = EventScript::new("RPH-B");
    env.send(
        &[a.place(), a.sl("RPH-SHARED"), b.place()],
        Encoding::Protobuf,
    )
    .await;
    env.wait_for_log(events.len() as i64 + 3, 0).await;
    env.send(&[b.sl("RPH-SHARED")], Encoding::Protobuf).await;
    let orders = env.topics.orders.clone();
    env.send_raw(&orders, "RPH-B", b"\x00\x01 garbage", None)
        .await;
    env.wait_for_log(events.len() as i64 + 3, 2).await;
    env.wait_for_redis().await;

    let offsets =
        "SELECT CAST(GROUP_CONCAT(CONCAT(group_id, topic, kafka_partition, ':', next_offset) \
                   ORDER BY group_id, topic, kafka_partition) AS CHAR) FROM consumer_offsets";
    let snapshot = || async {
        let offsets: Option<String> = sqlx::query_scalar(offsets)
            .fetch_one(env.db.store.pool())
            .await
            .unwrap();
        (
            env.db.log().await,
            env.db.full_rows().await,
            env.db.dead_letters().await,
            env.db.count("SELECT COUNT(*) FROM parked_events").await,
            offsets,
            read_keys(&env).await,
        )
    };
    let before = snapshot().await;

    let summary = replay(&env, &replay_config(&env)).await;
    let total = events.len() as u64 + 5;
    assert_eq!(summary.messages, total, "every message read again");
    assert_eq!(summary.recorded, 0);
    assert_eq!(summary.parked, 0);
    assert_eq!(
        summary.duplicates,
        total - 1,
        "all but the garbage are duplicates"
    );
    assert_eq!(summary.redis_entries, 0, "Redis left alone");
    assert_eq!(snapshot().await, before, "the store changed");

    // The live consumer goes on as before.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut c = EventScript::new("RPH-C");
    env.send(&[c.place()], Encoding::Protobuf).await;
    env.wait_for_log(events.len() as i64 + 4, 2).await;

    // From a point in time: only what came after it.
    let mut config = replay_config(&env);
    config.since = Some(since);
    let summary = replay(&env, &config).await;
    assert_eq!(
        (summary.messages, summary.duplicates, summary.recorded),
        (1, 1, 0)
    );
    consumer.stop().await;
    env.cleanup().await;
}

/// Every compression codec librdkafka knows (gzip, snappy, lz4, zstd):
/// batches compressed with each are consumed, and nothing after them on
/// their partitions stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_every_compression_codec_are_consumed() {
    use order_lifecycle::kafka;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let env = Env::new().await;
    let consumer = env.start(env.run_config());
    let codecs = ["gzip", "snappy", "lz4", "zstd", "none"];
    let mut sent = 0;
    for (i, codec) in codecs.iter().enumerate() {
        let producer: FutureProducer = kafka::producer_config(&common::kafka_config())
            .set("compression.type", *codec)
            .set("linger.ms", "50")
            .create()
            .unwrap_or_else(|e| panic!("a {codec} producer: {e}"));
        let events = common::stream(15, 700 + i as u64);
        let mut deliveries = Vec::new();
        for (e, encoding) in &events {
            let (topic, key) = env.destination(e);
            let payload = order_lifecycle::wire::encode(e, *encoding);
            let record = FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(payload.as_slice())
                .headers(kafka::content_type_headers(Some(encoding.content_type())));
            deliveries.push(kafka::enqueue(&producer, record).await.expect("enqueue"));
        }
        kafka::await_deliveries(deliveries)
            .await
            .unwrap_or_else(|e| panic!("{codec}: {e}"));
        sent += events.len();
        env.wait_until_logged(sent, std::time::Duration::from_secs(60))
            .await;
    }
    assert_eq!(env.logged().await, sent as i64, "every event once");
    assert_eq!(env.db.count("SELECT COUNT(*) FROM dead_letters").await, 0);
    consumer.stop().await;
    env.cleanup().await;
}

/// Messages as the Confluent serializers write them (magic byte 0, schema
/// id, for protobuf the message-index path; no content-type header) are
/// logged with their schema id beside plain ones; with `--schema-ids`, a
/// framed message of another id is dead-lettered as `unknown_schema_id`
/// and a malformed frame as `invalid_framing`; consumption goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_registry_framed_messages_are_consumed_and_checked() {
    use order_lifecycle::wire::registry;
    let env = Env::new().await;
    let consumer = env.start(env.run_config_with(&["--schema-ids", "7,9"]));
    let mut s = EventScript::new("SR1");
    let place = s.place();
    let sl = s.sl("SR1-SL");
    let tp = s.tp("SR1-TP");
    let refused = s.tp("SR1-TP2");
    let plain = s.confirm("SR1-SL", "EXECUTED");
    let framed = |id: u32, e: &OrderEvent, encoding: Encoding| {
        registry::frame(id, encoding, &order_lifecycle::wire::encode(e, encoding))
    };
    let orders = env.topics.orders.clone();
    env.send_raw(&orders, "SR1", &framed(7, &place, Encoding::Protobuf), None)
        .await;
    env.send_raw(&orders, "SR1", &framed(9, &sl, Encoding::Json), None)
        .await;
    // The long form of the path [0]: count 1, index 0.
    let mut long = vec![0, 0, 0, 0, 7, 2, 0];
    long.extend_from_slice(&order_lifecycle::wire::encode(&tp, Encoding::Protobuf));
    env.send_raw(&orders, "SR1", &long, None).await;
    env.send_raw(
        &orders,
        "SR1",
        &framed(8, &refused, Encoding::Protobuf),
        None,
    )
    .await;
    env.send_raw(&orders, "SR1", &[0, 0, 0], None).await;
    env.send(&[plain], Encoding::Protobuf).await;
    env.wait_for_log(4, 2).await;

    let ids: Vec<(String, Option<u32>)> = sqlx::query_as(
        "SELECT CAST(event_id AS CHAR), schema_id FROM lifecycle_events ORDER BY position",
    )
    .fetch_all(env.db.store.pool())
    .await
    .unwrap();
    let schema_of = |e: &OrderEvent| {
        ids.iter()
            .find(|(id, _)| id == e.event_id.as_str())
            .unwrap_or_else(|| panic!("{} logged: {ids:?}", e.event_id))
            .1
    };
    assert_eq!(schema_of(&place), Some(7));
    assert_eq!(schema_of(&sl), Some(9));
    assert_eq!(schema_of(&tp), Some(7));
    assert_eq!(ids.len(), 4, "{ids:?}");
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT CAST(reason AS CHAR) FROM dead_letters ORDER BY source_offset")
            .fetch_all(env.db.store.pool())
            .await
            .unwrap();
    assert_eq!(reasons, ["unknown_schema_id", "invalid_framing"]);
    assert_eq!(env.db.rows().await["SR1-SL"].2, "executed");
    consumer.stop().await;
    env.cleanup().await;
}

/// A dead letter larger than the dead-letter topic takes is published
/// shortened (its first 8 KiB, with its length and digest in headers), and
/// the letters after it are published as usual: one oversized message never
/// blocks the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_its_topic_is_shortened_and_blocks_nothing() {
    let env = Env::new().await;
    // The service's producer takes records of 20,000 bytes at most, as a
    // dead-letter topic with a small max.message.bytes would.
    let consumer = env.start(env.run_config_with(&["--kafka-option", "message.max.bytes=20000"]));
    let big = format!("{{{}", "x".repeat(40 * 1024 - 1));
    env.send_raw(
        &env.topics.orders,
        "big",
        big.as_bytes(),
        Some("application/json"),
    )
    .await;
    env.send_raw(
        &env.topics.orders,
        "small",
        b"{not json",
        Some("application/json"),
    )
    .await;
    env.wait_for_log(0, 2).await;
    wait_until(
        "both letters published",
        std::time::Duration::from_secs(30),
        || async {
            env.db
                .count("SELECT COUNT(*) FROM dead_letters WHERE published_at IS NOT NULL")
                .await
                == 2
        },
    )
    .await;
    let letters = env.read_dead_letter_topic(2);
    assert_eq!(letters.len(), 2);
    let shortened = letters
        .iter()
        .find(|l| l.contains_key("dead-letter-shortened"))
        .expect("the big letter, shortened");
    assert_eq!(
        shortened["original-payload-length"],
        (40 * 1024).to_string()
    );
    assert_eq!(shortened["payload"].len(), 8 * 1024);
    assert_eq!(shortened["original-payload-fnv1a64"].len(), 16);
    let small = letters
        .iter()
        .find(|l| !l.contains_key("dead-letter-shortened"))
        .expect("the small letter, whole");
    assert_eq!(small["payload"], "{not json");
    assert_eq!(small["dead-letter-reason"], "undecodable_json");
    // The table keeps the whole letter.
    assert_eq!(
        env.db
            .count("SELECT COUNT(*) FROM dead_letters WHERE LENGTH(payload) = 40960")
            .await,
        1
    );
    consumer.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_emptying_one_outbox_publish_each_letter_once() {
    use order_lifecycle::ingest::dead_letter::{publish_pending, DeadLetterPublisher};
    use order_lifecycle::store::dead_letters::{self, DeadLetter};
    let env = Env::new().await;
    let letters: Vec<DeadLetter> = (0..300)
        .map(|offset| DeadLetter {
            topic: env.topics.orders.clone(),
            partition: 0,
            offset,
            key: Some(format!("K{offset}").into_bytes()),
            payload: Some(b"\xff not an event".to_vec()),
            content_type: None,
            reason: "undecodable_protobuf".into(),
            error: "not a protobuf OrderEvent".into(),
            event_id: None,
            order_id: None,
        })
        .collect();
    let mut conn = env.db.store.pool().acquire().await.unwrap();
    dead_letters::insert(&mut conn, &letters).await.unwrap();
    drop(conn);
    // Two instances' publishers, as when a leader hands over mid-publish.
    let publisher =
        || DeadLetterPublisher::new(&common::kafka_config(), &env.topics.dead_letters).unwrap();
    let (one, other) = (publisher(), publisher());
    let (a, b) = tokio::join!(
        publish_pending(&env.db.store, &one),
        publish_pending(&env.db.store, &other)
    );
    assert_eq!(
        a.unwrap() + b.unwrap(),
        letters.len(),
        "each letter marked once"
    );
    let mut published: Vec<String> = env
        .read_all_dead_letters()
        .iter()
        .map(|f| f["source-offset"].clone())
        .collect();
    published.sort();
    let mut expected: Vec<String> = (0..300).map(|o: i64| o.to_string()).collect();
    expected.sort();
    assert_eq!(published, expected, "each letter on the topic once");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_every_lookup_key_and_active_hash_is_right() {
    let env =
        Env::with_services(2, common::TestDb::new().await, common::TestRedis::cluster()).await;
    let consumer = env.start(env.run_config());
    let events = common::stream(300, 31);
    env.send_many(&events).await;
    env.wait_until_logged(events.len(), std::time::Duration::from_secs(120))
        .await;
    env.wait_for_redis().await;
    common::assert_projections_match_log(&env.db, &env.redis).await;
    // The record on every master, all alike, at the log's head.
    let copies = env.redis.projection().await.record_copies().await.unwrap();
    assert_eq!(copies.len(), 3, "one copy per master");
    let head = env
        .db
        .count("SELECT COALESCE(MAX(position), 0) FROM lifecycle_events")
        .await;
    for copy in &copies {
        assert_eq!(copy.as_ref().map(|c| c.position), Some(head), "{copies:?}");
    }
    consumer.stop().await;
    env.redis.cleanup().await;
    assert!(
        env.redis.snapshot().await.is_empty(),
        "cleanup reached every master"
    );
    env.cleanup().await;
}
