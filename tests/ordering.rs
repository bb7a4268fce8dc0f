//! Rule R11 (the log has the order in which things happened, on any topic
//! layout) and rule R12 (every committed log entry reaches Redis, without
//! waiting on timers), through the real broker, MariaDB and Redis.

use order_lifecycle_testkit as common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{assert_projections_match_log, kafka_config, wait_until, Env, TestDb, TestRedis};
use order_lifecycle::domain::{EventKind, OrderEvent};
use order_lifecycle::ingest::{process_batch, PipelineConfig};
use order_lifecycle::kafka;
use order_lifecycle::store::event_log::{self, NewEntry};
use order_lifecycle::testing::EventScript;
use order_lifecycle::wire::{self, Encoding};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Tests here that start consumers run one at a time: timing is part of
/// what they prove.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The four-topic layout of rule R11: placements, stop-loss/take-profit
/// changes, cancels/closes/modifications, confirmations.
struct FourTopics {
    placements: String,
    protective: String,
    changes: String,
    confirmations: String,
}

impl FourTopics {
    /// The env's order topic takes placements, its confirmations topic the
    /// confirmations; two more topics of the same width are made.
    async fn new(env: &Env, partitions: i32) -> FourTopics {
        let protective = format!("{}-protective", env.topics.orders);
        let changes = format!("{}-changes", env.topics.orders);
        kafka::ensure_topics(&kafka_config(), &[&protective, &changes], partitions)
            .await
            .expect("create topics");
        FourTopics {
            placements: env.topics.orders.clone(),
            protective,
            changes,
            confirmations: env.topics.confirmations.clone(),
        }
    }

    fn all(&self) -> Vec<String> {
        vec![
            self.placements.clone(),
            self.protective.clone(),
            self.changes.clone(),
            self.confirmations.clone(),
        ]
    }

    /// The topic a producer of this layout writes `event` to.
    fn topic_of(&self, event: &OrderEvent) -> &str {
        match event.kind {
            EventKind::OrderPlaced(_) => &self.placements,
            EventKind::StopLossAdded(_) | EventKind::TakeProfitAdded(_) => &self.protective,
            EventKind::ProviderConfirmation(_) => &self.confirmations,
            _ => &self.changes,
        }
    }
}

/// The key producers use: the order id, or the lifecycle id on confirmations.
fn key_of(event: &OrderEvent) -> String {
    match &event.kind {
        EventKind::ProviderConfirmation(c) => c.lifecycle_id.to_string(),
        _ => event.order_id.as_ref().expect("order id").to_string(),
    }
}

fn producer() -> FutureProducer {
    kafka::producer_config(&kafka_config())
        .create()
        .expect("producer")
}

/// Produces `event` to `topic` with the Kafka timestamp `timestamp_ms`.
async fn produce(producer: &FutureProducer, topic: &str, event: &OrderEvent, timestamp_ms: i64) {
    let payload = wire::encode(event, Encoding::Protobuf);
    let key = key_of(event);
    let record = FutureRecord::to(topic)
        .key(key.as_bytes())
        .payload(payload.as_slice())
        .timestamp(timestamp_ms)
        .headers(kafka::content_type_headers(Some(
            Encoding::Protobuf.content_type(),
        )));
    producer
        .send(record, Duration::from_secs(10))
        .await
        .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
}

type Rows = BTreeMap<String, (String, String, String, Option<String>)>;

fn row(
    order: &str,
    id_type: &str,
    status: &str,
    by: Option<&str>,
) -> (String, String, String, Option<String>) {
    (
        order.into(),
        id_type.into(),
        status.into(),
        by.map(Into::into),
    )
}

/// The three lifecycles that went wrong on four topics, for order `o`:
/// the domain example, a close with protective cancels, and a late
/// execution of a replaced stop-loss; with the rows each must end with.
fn scenarios(o: &str) -> (Vec<OrderEvent>, Rows) {
    let (a, b, c) = (format!("{o}A"), format!("{o}B"), format!("{o}C"));
    let id = |order: &str, s: &str| format!("{order}-{s}");
    let mut events = Vec::new();
    let mut expected = Rows::new();

    let mut s = EventScript::new(&a);
    events.extend([
        s.place(),
        s.sl(&id(&a, "SL111")),
        s.cancel_sl(&id(&a, "SLC444"), None),
        s.sl(&id(&a, "SL777")),
        s.sl(&id(&a, "SL888")),
        s.confirm(&id(&a, "SL777"), "EXECUTED"),
        s.confirm(&id(&a, "SLC444"), "CANCELLED"),
    ]);
    for (lid, t, st, by) in [
        (a.clone(), "order_id", "active", None),
        (id(&a, "SL111"), "stoploss_id", "cancelled", None),
        (id(&a, "SLC444"), "stoploss_cancel_id", "executed", None),
        (
            id(&a, "SL777"),
            "stoploss_id",
            "executed",
            Some(id(&a, "SL888")),
        ),
        (id(&a, "SL888"), "stoploss_id", "active", None),
    ] {
        expected.insert(lid, row(&a, t, st, by.as_deref()));
    }

    let mut s = EventScript::new(&b);
    events.extend([
        s.place(),
        s.sl(&id(&b, "SL1")),
        s.tp(&id(&b, "TP1")),
        s.close(&id(&b, "CL1"), Some(&id(&b, "SLC1")), Some(&id(&b, "TPC1"))),
    ]);
    for (lid, t, st) in [
        (b.clone(), "order_id", "active"),
        (id(&b, "SL1"), "stoploss_id", "cancelled"),
        (id(&b, "TP1"), "takeprofit_id", "cancelled"),
        (id(&b, "CL1"), "close_id", "active"),
        (id(&b, "SLC1"), "stoploss_cancel_id", "active"),
        (id(&b, "TPC1"), "takeprofit_cancel_id", "active"),
    ] {
        expected.insert(lid, row(&b, t, st, None));
    }

    let mut s = EventScript::new(&c);
    events.extend([
        s.place(),
        s.sl(&id(&c, "SL1")),
        s.sl(&id(&c, "SL2")),
        s.confirm(&id(&c, "SL1"), "EXECUTED"),
    ]);
    for (lid, t, st, by) in [
        (c.clone(), "order_id", "active", None),
        (
            id(&c, "SL1"),
            "stoploss_id",
            "executed",
            Some(id(&c, "SL2")),
        ),
        (id(&c, "SL2"), "stoploss_id", "active", None),
    ] {
        expected.insert(lid, row(&c, t, st, by.as_deref()));
    }
    (events, expected)
}

/// Every expected row is in MySQL, and every id resolves in Redis.
async fn assert_rows_and_keys(env: &Env, expected: &Rows) {
    let rows = env.db.rows().await;
    for (id, want) in expected {
        assert_eq!(rows.get(id), Some(want), "row of {id}");
        assert_eq!(
            env.redis
                .get(&format!("global_order_lookup:{id}"))
                .await
                .as_ref(),
            Some(&want.0),
            "lookup key of {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycles_on_four_topics_stamped_in_one_millisecond_are_applied_in_order() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = Env::with_partitions(3).await;
    let topics = FourTopics::new(&env, 3).await;
    let producer = producer();
    let stamp = order_lifecycle::clock::now_ms();

    // A backlog: every event stamped in the same millisecond, produced in
    // the worst order (the confirmations topic first, placements last).
    let (backlog, mut expected) = scenarios("BK");
    for family in [3, 2, 1, 0] {
        for e in backlog.iter().filter(|e| rank_of(e) == family) {
            produce(&producer, topics.topic_of(e), e, stamp).await;
        }
    }
    // Order across partitions holds within --max-partition-idle of a
    // partition's messages arriving (rule R11); a second covers a fetch
    // delayed by a busy machine.
    let mut config = env.run_config_with(&["--max-partition-idle", "1s"]);
    config.input.topics = topics.all();
    let consumer = env.start(config);
    env.wait_for_log(backlog.len() as i64, 0).await;

    // Live: the consumer keeps up; each lifecycle produced in order, all in
    // one millisecond, without waiting for deliveries in between.
    let (live, live_expected) = scenarios("LV");
    let stamp = order_lifecycle::clock::now_ms();
    let sends: Vec<_> = live
        .iter()
        .map(|e| produce(&producer, topics.topic_of(e), e, stamp))
        .collect();
    futures_util::future::join_all(sends).await;
    env.wait_for_log((backlog.len() + live.len()) as i64, 0)
        .await;
    expected.extend(live_expected);
    env.wait_for_redis().await;
    assert_rows_and_keys(&env, &expected).await;
    assert_eq!(env.db.count("SELECT COUNT(*) FROM parked_events").await, 0);
    env.db.assert_sequences_gap_free().await;
    assert_projections_match_log(&env.db, &env.redis).await;
    consumer.stop().await;
    env.cleanup().await;
}

fn rank_of(e: &OrderEvent) -> u8 {
    e.kind.causal_rank()
}

/// The per-order sequences of the log: `(order, seq, event_id)`.
async fn sequences(db: &TestDb) -> Vec<(String, i64, String)> {
    sqlx::query_as(
        "SELECT CAST(order_id AS CHAR), seq, CAST(event_id AS CHAR) FROM lifecycle_events \
         ORDER BY order_id, seq",
    )
    .fetch_all(db.store.pool())
    .await
    .expect("read the log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_stream_on_four_topics_or_one_gives_the_same_log_and_replay_reproduces_it() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let four = Env::with_partitions(3).await;
    let topics = FourTopics::new(&four, 3).await;
    let one = Env::with_partitions(1).await;
    let events: Vec<OrderEvent> = common::stream(300, 41)
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    assert!(events.len() > 2_000, "{} events", events.len());

    // Each event's intended production time, a millisecond apart, is its
    // Kafka timestamp. One producer per topic, each running late by a random
    // 0-50 ms at every event (order within a topic kept): the topics'
    // messages reach the broker shuffled against each other.
    let base = order_lifecycle::clock::now_ms();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for topic in topics.all() {
        let mine: Vec<(i64, OrderEvent)> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| topics.topic_of(e) == topic)
            .map(|(i, e)| (base + i as i64, e.clone()))
            .collect();
        tasks.push(tokio::spawn(async move {
            let producer = producer();
            for (ts, e) in mine {
                let due =
                    started + Duration::from_millis((ts - base) as u64 + fastrand::u64(0..50));
                tokio::time::sleep_until(due.into()).await;
                produce(&producer, &topic, &e, ts).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("producer task");
    }
    // The reference: the same stream, in production order, on one topic of
    // one partition.
    let reference = producer();
    for (i, e) in events.iter().enumerate() {
        produce(&reference, &one.topics.orders, e, base + i as i64).await;
    }

    let mut config = four.run_config_with(&["--max-partition-idle", "1s"]);
    config.input.topics = topics.all();
    let consumer = four.start(config);
    let reference_consumer = one.start(one.run_config());
    four.wait_until_logged(events.len(), Duration::from_secs(180))
        .await;
    one.wait_until_logged(events.len(), Duration::from_secs(180))
        .await;
    consumer.stop().await;
    reference_consumer.stop().await;

    assert_eq!(four.db.count("SELECT COUNT(*) FROM dead_letters").await, 0);
    assert_eq!(four.db.count("SELECT COUNT(*) FROM parked_events").await, 0);
    let log = sequences(&four.db).await;
    assert_eq!(log.len(), events.len());
    assert_eq!(log, sequences(&one.db).await, "per-order sequences");
    assert_eq!(
        four.db.full_rows().await,
        one.db.full_rows().await,
        "read models"
    );
    four.wait_for_redis().await;
    assert_projections_match_log(&four.db, &four.redis).await;

    // Replay of the four topics into an empty database: the same log.
    let mut replayed = four;
    let before = replayed.db.log().await;
    replayed.db.recreate().await;
    let run = replayed.run_config();
    let summary = order_lifecycle::commands::replay::replay(
        &replayed.db.store,
        &replayed.redis.projection().await,
        &order_lifecycle::commands::replay::ReplayConfig {
            kafka: run.kafka,
            database: run.database,
            redis: run.redis,
            input: order_lifecycle::config::InputConfig {
                topics: topics.all(),
                batch_size: 200,
                parking: order_lifecycle::config::ParkingConfig {
                    park_timeout: Duration::from_secs(60),
                    ..Default::default()
                },
                schemas: Default::default(),
            },
            group_id: format!("{}-replay", replayed.group_id),
            since: None,
        },
    )
    .await
    .expect("replay");
    assert_eq!(summary.recorded, events.len() as u64);
    assert_eq!(replayed.db.log().await, before, "the replayed log");
    replayed.cleanup().await;
    one.cleanup().await;
}

/// One log entry with a fresh id for `order`, as a writer would append it.
fn entry(order: &str, n: u32) -> NewEntry {
    let mut s = EventScript::new(order);
    s.n = n;
    let e = s.sl(&format!("{order}-SL{n}"));
    let mut book = order_lifecycle::domain::LifecycleBook::new();
    let rec = book.process(&e).expect("valid");
    NewEntry::new(rec, &e, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_holding_a_log_position_and_a_rollback_lose_nothing_and_stall_nothing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = Env::new().await;
    let consumer = env.start(env.run_config());

    // A rolled-back append: its position goes to the next writer, and the
    // next id reaches Redis within a second of being logged.
    let mut tx = env.db.store.pool().begin().await.unwrap();
    event_log::append(&mut tx, &[entry("RB-1", 1)])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut s = EventScript::new("RB-2");
    env.send(&[s.place()], Encoding::Protobuf).await;
    env.wait_for_log(1, 0).await;
    let logged = Instant::now();
    wait_until("RB-2 in Redis", Duration::from_secs(1), || async {
        env.redis.get("global_order_lookup:RB-2").await.is_some()
    })
    .await;
    println!(
        "after a rollback, the next id reached Redis {:?} after MySQL",
        logged.elapsed()
    );

    // A writer takes a log position and commits 20 s later, while batches
    // keep coming: they wait for it (a lock wait is retried), nothing is
    // skipped, and its id reaches Redis.
    let pool = env.db.store.pool().clone();
    let slow = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO order_lifecycle_ids (order_id, id_type, lifecycle_id, status, created_at, \
             updated_at, issued_seq, updated_seq) VALUES ('SLOW', 'stoploss_id', 'SLOW-SL1', 'active', \
             NOW(3), NOW(3), 1, 1)",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        event_log::append(&mut tx, &[entry("SLOW", 1)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        tx.commit().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut others = Vec::new();
    for i in 0..20 {
        let mut s = EventScript::new(&format!("FAST-{i}"));
        others.push(s.place());
    }
    for e in &others {
        env.send(std::slice::from_ref(e), Encoding::Protobuf).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    slow.await.unwrap();
    env.wait_for_log(22, 0).await;
    env.wait_for_redis().await;
    for id in ["SLOW-SL1", "FAST-0", "FAST-19"] {
        assert!(
            env.redis
                .get(&format!("global_order_lookup:{id}"))
                .await
                .is_some(),
            "{id} reached Redis"
        );
    }
    let positions: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM lifecycle_events ORDER BY position")
            .fetch_all(env.db.store.pool())
            .await
            .unwrap();
    assert_eq!(positions, (1..=22).collect::<Vec<i64>>(), "dense positions");
    consumer.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_recreated_or_restored_under_a_live_redis_is_projected_again() {
    let pipeline = PipelineConfig {
        offsets_group: None,
        park_timeout: Duration::from_secs(60),
        max_parked: order_lifecycle::ingest::pipeline::DEFAULT_MAX_PARKED,
        schema_ids: Vec::new(),
    };
    let script = |order: &str, n: usize| {
        let mut s = EventScript::new(order);
        let mut events = vec![s.place()];
        for i in 0..n {
            events.push(s.sl(&format!("{order}-SL{i}")));
        }
        common::inbound_messages("o", 0, events.iter().map(|e| (e, Encoding::Protobuf)))
    };
    let redis = TestRedis::new();
    let projection = redis.projection().await;
    let mut db = TestDb::new().await;
    process_batch(&db.store, &pipeline, &script("OLD", 15))
        .await
        .unwrap();
    order_lifecycle::projection::rebuild::catch_up_to_head(&db.store, &projection, "test")
        .await
        .unwrap();
    assert_eq!(projection.projected().await.unwrap().unwrap().position, 16);

    // Recreated: a new log, shorter than Redis's position.
    db.recreate().await;
    process_batch(&db.store, &pipeline, &script("NEW", 11))
        .await
        .unwrap();
    order_lifecycle::projection::rebuild::catch_up_to_head(&db.store, &projection, "test")
        .await
        .unwrap();
    for i in 0..11 {
        assert_eq!(
            redis
                .get(&format!("global_order_lookup:NEW-SL{i}"))
                .await
                .as_deref(),
            Some("NEW"),
            "NEW-SL{i}"
        );
    }

    // Restored from a backup taken at position 5, then refilled: the same
    // log identity, Redis ahead of it at first, then a different history
    // below Redis's position.
    let log_id = event_log::log_head(db.store.pool()).await.unwrap().log_id;
    let mut restored = TestDb::new().await;
    sqlx::query("UPDATE log_head SET log_id = ?")
        .bind(&log_id)
        .execute(restored.store.pool())
        .await
        .unwrap();
    process_batch(&restored.store, &pipeline, &script("REST", 4))
        .await
        .unwrap();
    process_batch(&restored.store, &pipeline, &script("REFILL", 9))
        .await
        .unwrap();
    assert_eq!(event_log::head(restored.store.pool()).await.unwrap(), 15);
    order_lifecycle::projection::rebuild::catch_up_to_head(&restored.store, &projection, "test")
        .await
        .unwrap();
    for i in 0..9 {
        assert_eq!(
            redis
                .get(&format!("global_order_lookup:REFILL-SL{i}"))
                .await
                .as_deref(),
            Some("REFILL"),
            "REFILL-SL{i}"
        );
    }
    let at = projection.projected().await.unwrap().unwrap();
    assert_eq!((at.log_id, at.position), (log_id, 15));
    std::mem::swap(&mut db, &mut restored);
    restored.drop().await;
    db.drop().await;
    redis.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drained_late_parks_in_stream_time_and_dead_letters_no_confirmation() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = Env::with_partitions(4).await;
    // Lifecycles whose confirmations sit on their own topic, keyed by
    // lifecycle id; all produced before the consumer starts, stamped with
    // their simulated times (about 40 minutes of trading).
    let lifecycles = 50_000;
    let mut events = Vec::with_capacity(lifecycles * 4);
    for i in 0..lifecycles {
        let mut s = EventScript::new(&format!("BL{i}"));
        let sl = format!("BL{i}-SL");
        events.push(s.place());
        events.push(s.sl(&sl));
        events.push(s.confirm(&sl, "NEW"));
        events.push(s.confirm(&sl, "EXECUTED"));
    }
    let base = 1_764_300_000_000;
    let mut deliveries = Vec::new();
    let producer = producer();
    for (i, e) in events.iter().enumerate() {
        let topic = match e.kind {
            EventKind::ProviderConfirmation(_) => &env.topics.confirmations,
            _ => &env.topics.orders,
        };
        let payload = wire::encode(e, Encoding::Protobuf);
        let key = key_of(e);
        let record = FutureRecord::to(topic)
            .key(key.as_bytes())
            .payload(payload.as_slice())
            .timestamp(base + (i as i64 / 4) * 50 + (i as i64 % 4))
            .headers(kafka::content_type_headers(Some(
                Encoding::Protobuf.content_type(),
            )));
        deliveries.push(kafka::enqueue(&producer, record).await.expect("enqueue"));
    }
    kafka::await_deliveries(deliveries).await.expect("deliver");

    // A queue of 256 KiB fills in a fraction of a second, so that how soon
    // a partition with a full queue is fetched again decides whether the
    // order partitions keep up.
    let config = env.run_config_with(&[
        "--park-timeout",
        "3s",
        "--batch-size",
        "1000",
        "--kafka-option",
        "queued.max.messages.kbytes=256",
    ]);
    let started = Instant::now();
    let consumer = env.start(config);
    // About 20 s in a debug build; with a 1 s fetch backoff it did not
    // finish in 600 s.
    env.wait_until_logged(events.len(), Duration::from_secs(180))
        .await;
    println!(
        "drained {} events in {:.1} s",
        events.len(),
        started.elapsed().as_secs_f64()
    );
    // A few periodic rounds: nothing left to expire.
    tokio::time::sleep(Duration::from_secs(3)).await;
    consumer.stop().await;
    assert_eq!(env.db.dead_letters().await, vec![], "no dead letters");
    assert_eq!(env.db.count("SELECT COUNT(*) FROM parked_events").await, 0);
    // The merge kept the orders' partitions fed: hardly a confirmation
    // overtook its stop-loss. (With librdkafka's 1 s fetch backoff on a
    // full queue, the order partitions starved and most confirmations were
    // parked and released later: measured, a million of a million.)
    let ever_parked = env
        .db
        .count(
            "SELECT CAST(COALESCE(AUTO_INCREMENT, 1) AS SIGNED) - 1 FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = 'parked_events'",
        )
        .await;
    println!("{ever_parked} confirmations were parked during the drain");
    assert!(
        ever_parked < (lifecycles / 100) as i64,
        "{ever_parked} confirmations were parked during the drain"
    );
    assert_eq!(
        env.db
            .count("SELECT COUNT(*) FROM order_lifecycle_ids WHERE id_type = 'stoploss_id' AND status = 'executed'")
            .await,
        lifecycles as i64,
        "every stop-loss executed"
    );
    assert_eq!(
        env.db
            .count("SELECT COUNT(*) FROM order_lifecycle_ids WHERE id_type = 'order_id' AND status = 'active'")
            .await,
        lifecycles as i64
    );
    env.cleanup().await;
}
