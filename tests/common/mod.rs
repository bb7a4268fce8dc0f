//! Shared harness for the integration tests: a fresh database, Redis key
//! prefix and topic set per test, against the real services of this machine
//! (MariaDB, Redis, a Kafka-protocol broker). A missing service fails the
//! test with a message saying which one; nothing is skipped.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use order_lifecycle::config::{
    DatabaseConfig, KafkaConfig, KafkaOption, RedisConfig, RunConfig, SecretUrl,
};
use order_lifecycle::domain::{EventKind, OrderEvent};
use order_lifecycle::kafka;
use order_lifecycle::store::Store;
use order_lifecycle::wire::{self, Encoding};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::Row;

pub const MYSQL_ROOT: &str = "mysql://root@127.0.0.1:3306";

pub fn brokers() -> String {
    std::env::var("OL_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("OL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

fn unique_suffix() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!("{secs}_{:08x}", fastrand::u32(..))
}

/// A database of its own, migrated.
pub struct TestDb {
    pub name: String,
    pub url: SecretUrl,
    pub store: Store,
}

impl TestDb {
    pub async fn new() -> TestDb {
        drop_stale_databases().await;
        let name = format!("olt_{}", unique_suffix());
        let url = SecretUrl::new(format!("{MYSQL_ROOT}/{name}"));
        let store = Store::connect(&url, 4)
            .await
            .unwrap_or_else(|e| panic!("MariaDB at {MYSQL_ROOT} is required: {e}"));
        store.migrate().await.expect("migrations apply");
        TestDb { name, url, store }
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
        pool.close().await;
        let root = sqlx::MySqlPool::connect(MYSQL_ROOT).await.expect("MariaDB");
        sqlx::query(&format!("DROP DATABASE IF EXISTS `{}`", self.name))
            .execute(&root)
            .await
            .expect("drop test database");
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
}

/// A Redis key prefix of its own.
pub struct TestRedis {
    pub prefix: String,
    pub url: String,
    pub client: redis::Client,
}

impl TestRedis {
    pub fn new() -> TestRedis {
        TestRedis::at(&redis_url())
    }

    /// A prefix of its own on the Redis at `url`.
    pub fn at(url: &str) -> TestRedis {
        TestRedis {
            prefix: format!("olt:{}:", unique_suffix()),
            url: url.to_owned(),
            client: redis::Client::open(url).expect("redis url"),
        }
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("Redis at {} is required: {e}", self.url))
    }

    /// Every key under the prefix (prefix stripped) with its value; hashes
    /// as sorted `field=value` lists.
    pub async fn snapshot(&self) -> BTreeMap<String, String> {
        let mut conn = self.conn().await;
        let keys = self.keys(&mut conn).await;
        let mut out = BTreeMap::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let value = if kind == "hash" {
                let h: BTreeMap<String, String> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                h.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            } else {
                redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap()
            };
            out.insert(key[self.prefix.len()..].to_owned(), value);
        }
        out
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        let mut conn = self.conn().await;
        redis::cmd("GET")
            .arg(format!("{}{key}", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// The product's projection on this prefix.
    pub async fn projection(&self) -> order_lifecycle::store::redis_projection::RedisProjection {
        order_lifecycle::store::redis_projection::RedisProjection::connect(&self.url, &self.prefix)
            .await
            .unwrap_or_else(|e| panic!("Redis at {} is required: {e}", self.url))
    }

    /// Every key under the prefix, by SCAN (KEYS would block a shared
    /// Redis holding other tests' hundreds of thousands of keys).
    async fn keys(&self, conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(10_000)
                .query_async(conn)
                .await
                .expect("SCAN");
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                return keys;
            }
        }
    }

    pub async fn cleanup(&self) {
        let mut conn = self.conn().await;
        let keys = self.keys(&mut conn).await;
        for chunk in keys.chunks(5_000) {
            let _: () = redis::cmd("UNLINK")
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .expect("UNLINK");
        }
    }
}

/// A realistic stream of `orders` lifecycles (about 10 events each) from the
/// simulator, valid in order; `seed` also makes the ids unique per stream.
pub fn stream(orders: usize, seed: u64) -> Vec<(OrderEvent, Encoding)> {
    use order_lifecycle::scenario::{plan, Payload, PlanOptions};
    plan(&PlanOptions {
        orders,
        orders_per_second: 100_000.0,
        seed,
        json_ratio: 0.2,
        bad_ratio: 0.0,
        run_id: format!("{seed}"),
        start_ms: 1_764_300_000_000,
    })
    .into_iter()
    .filter_map(|p| match p.payload {
        Payload::Event(e, enc) => Some((*e, enc)),
        Payload::Garbage(_) => None,
    })
    .collect()
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Topics of its own: requests, confirmations, dead letters.
pub struct TestTopics {
    pub orders: String,
    pub confirmations: String,
    pub dead_letters: String,
}

pub fn kafka_config() -> KafkaConfig {
    KafkaConfig {
        brokers: brokers(),
        options: vec![KafkaOption {
            key: "topic.metadata.refresh.interval.ms".into(),
            value: "1000".into(),
        }],
    }
}

impl TestTopics {
    pub async fn new(partitions: i32) -> TestTopics {
        let base = format!("olt-{}", unique_suffix().replace('_', "-"));
        let topics = TestTopics {
            orders: format!("{base}-orders"),
            confirmations: format!("{base}-confirmations"),
            dead_letters: format!("{base}-dlq"),
        };
        kafka::ensure_topics(
            &kafka_config(),
            &[&topics.orders, &topics.confirmations, &topics.dead_letters],
            partitions,
        )
        .await
        .unwrap_or_else(|e| panic!("a Kafka-protocol broker at {} is required: {e}", brokers()));
        topics
    }
}

/// Everything one end-to-end test owns.
pub struct Env {
    pub db: TestDb,
    pub redis: TestRedis,
    pub topics: TestTopics,
    pub group_id: String,
    producer: FutureProducer,
}

impl Env {
    pub async fn new() -> Env {
        Env::with_partitions(2).await
    }

    pub async fn with_partitions(partitions: i32) -> Env {
        let db = TestDb::new().await;
        let topics = TestTopics::new(partitions).await;
        let producer = kafka::producer_config(&kafka_config())
            .create()
            .expect("producer");
        Env {
            db,
            redis: TestRedis::new(),
            group_id: format!("olt-group-{}", unique_suffix()),
            topics,
            producer,
        }
    }

    /// The configuration `run` gets, as the binary would build it.
    pub fn run_config(&self) -> RunConfig {
        RunConfig {
            kafka: kafka_config(),
            database: DatabaseConfig {
                url: self.db.url.clone(),
                max_connections: 4,
            },
            redis: RedisConfig {
                url: SecretUrl::new(self.redis.url.clone()),
                key_prefix: self.redis.prefix.clone(),
            },
            http: order_lifecycle::config::HttpConfig::off(),
            topics: vec![
                self.topics.orders.clone(),
                self.topics.confirmations.clone(),
            ],
            group_id: self.group_id.clone(),
            dead_letter_topic: self.topics.dead_letters.clone(),
            batch_size: 200,
            batch_linger: Duration::from_millis(20),
            session_timeout: Duration::from_secs(6),
            shutdown_timeout: Duration::from_secs(3),
            park_timeout: Duration::from_secs(60),
            max_partition_idle: Duration::from_millis(100),
            create_topics: false,
            topic_partitions: 2,
        }
    }

    /// Starts the consumer in this process, as `run` does.
    pub fn start(&self, config: RunConfig) -> RunningConsumer {
        let (stop, shutdown) = order_lifecycle::shutdown::Shutdown::new();
        let handle = tokio::spawn(order_lifecycle::commands::run::run(config, shutdown));
        RunningConsumer { stop, handle }
    }

    /// Sends events to the topic a producer would: confirmations to the
    /// confirmations topic keyed by lifecycle id, the rest keyed by order.
    pub async fn send(&self, events: &[OrderEvent], encoding: Encoding) {
        for e in events {
            let (topic, key) = match &e.kind {
                EventKind::ProviderConfirmation(c) => {
                    (&self.topics.confirmations, c.lifecycle_id.to_string())
                }
                _ => (
                    &self.topics.orders,
                    e.order_id.as_ref().unwrap().to_string(),
                ),
            };
            self.send_raw(
                topic,
                &key,
                &wire::encode(e, encoding),
                Some(encoding.content_type()),
            )
            .await;
        }
    }

    pub async fn send_raw(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        content_type: Option<&str>,
    ) {
        let headers = kafka::content_type_headers(content_type);
        let record = FutureRecord::to(topic)
            .key(key.as_bytes())
            .payload(payload)
            .headers(headers);
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
    }

    /// Waits until `n` events are in the log and `d` dead letters recorded.
    /// Waits until the log holds at least `n` entries.
    pub async fn wait_until_logged(&self, n: usize, timeout: Duration) {
        wait_until(&format!("{n} log entries"), timeout, || async {
            self.logged().await >= n as i64
        })
        .await;
    }

    pub async fn wait_for_log(&self, n: i64, d: i64) {
        wait_until(
            &format!("{n} log entries and {d} dead letters"),
            Duration::from_secs(60),
            || async {
                self.db.count("SELECT COUNT(*) FROM lifecycle_events").await >= n
                    && self.db.count("SELECT COUNT(*) FROM dead_letters").await >= d
            },
        )
        .await;
        assert_eq!(
            self.db.count("SELECT COUNT(*) FROM lifecycle_events").await,
            n,
            "log entries"
        );
        assert_eq!(
            self.db.count("SELECT COUNT(*) FROM dead_letters").await,
            d,
            "dead letters"
        );
    }

    /// Waits until the Redis follower has projected the whole log.
    pub async fn wait_for_redis(&self) {
        wait_until("the Redis projection to catch up", Duration::from_secs(45), || async {
            let head = self.db.count("SELECT COALESCE(MAX(position), 0) FROM lifecycle_events").await;
            let done = self
                .db
                .count("SELECT COALESCE(MAX(position), 0) FROM projection_checkpoints WHERE name = 'redis'")
                .await;
            done >= head
        })
        .await;
    }

    /// Reads the dead-letter topic from the start: `(reason header, source-topic header, payload)`.
    pub fn read_dead_letter_topic(&self, expected: usize) -> Vec<BTreeMap<String, String>> {
        let consumer: BaseConsumer =
            kafka::consumer_config(&kafka_config(), &self.group_id, Duration::from_secs(6))
                .create()
                .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..2 {
            tpl.add_partition_offset(&self.topics.dead_letters, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let start = Instant::now();
        while out.len() < expected && start.elapsed() < Duration::from_secs(20) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let mut fields = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for h in h.iter() {
                        fields.insert(
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                fields.insert(
                    "payload".into(),
                    String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                );
                out.push(fields);
            }
        }
        out
    }

    pub async fn cleanup(self) {
        self.redis.cleanup().await;
        self.db.drop().await;
    }
}

/// A consumer started in this process.
pub struct RunningConsumer {
    stop: order_lifecycle::shutdown::ShutdownTrigger,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningConsumer {
    /// Requests a graceful stop and checks that the consumer ended cleanly.
    pub async fn stop(self) {
        self.stop.trigger();
        let result = tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("consumer stops within 30 s")
            .expect("consumer task did not panic");
        result.expect("consumer ended without error");
    }
}

/// The read models as the log alone makes them, compared with MySQL and
/// Redis (rule R8).
pub async fn assert_projections_match_log(db: &TestDb, redis: &TestRedis) {
    use order_lifecycle::domain::IdStatus;
    use order_lifecycle::store::fold;
    let from_log = fold::orders_from_log(db.store.pool())
        .await
        .expect("fold the log");
    let from_mysql = fold::orders_from_projection(db.store.pool())
        .await
        .expect("read the projection");
    let sorted = |o: &order_lifecycle::domain::OrderLifecycle| {
        let mut ids = o.ids().to_vec();
        ids.sort_by(|a, b| a.lifecycle_id.cmp(&b.lifecycle_id));
        (o.last_seq(), ids)
    };
    assert_eq!(
        from_log.len(),
        from_mysql.len(),
        "orders in the log and in MySQL"
    );
    for (order, expected) in &from_log {
        let actual = from_mysql
            .get(order)
            .unwrap_or_else(|| panic!("order {order} missing in MySQL"));
        assert_eq!(
            sorted(actual),
            sorted(expected),
            "order {order}: MySQL differs from the log"
        );
    }
    let mut expected_keys = BTreeMap::new();
    for (order, o) in &from_log {
        for r in o.ids() {
            expected_keys.insert(
                format!("global_order_lookup:{}", r.lifecycle_id),
                order.to_string(),
            );
        }
        let mut active: Vec<String> = o
            .ids()
            .iter()
            .filter(|r| r.status == IdStatus::Active)
            .map(|r| format!("{}={}", r.id_type, r.lifecycle_id))
            .collect();
        active.sort();
        if !active.is_empty() {
            expected_keys.insert(format!("order_lifecycle_active:{order}"), active.join(","));
        }
    }
    let mut actual_keys = redis.snapshot().await;
    actual_keys.retain(|k, _| !k.starts_with("order_lifecycle:"));
    let missing: Vec<_> = expected_keys
        .iter()
        .filter(|(k, v)| actual_keys.get(*k) != Some(v))
        .take(5)
        .collect();
    let extra: Vec<_> = actual_keys
        .keys()
        .filter(|k| !expected_keys.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "Redis differs from the log: missing or wrong {missing:?}, extra {extra:?}"
    );
}

impl Env {
    /// Sends many events at once (confirmations to their topic), waiting for
    /// every delivery at the end.
    pub async fn send_many(&self, events: &[(OrderEvent, Encoding)]) {
        let mut deliveries = Vec::new();
        for (e, encoding) in events {
            let (topic, key) = match &e.kind {
                EventKind::ProviderConfirmation(c) => {
                    (&self.topics.confirmations, c.lifecycle_id.to_string())
                }
                _ => (
                    &self.topics.orders,
                    e.order_id.as_ref().unwrap().to_string(),
                ),
            };
            let payload = wire::encode(e, *encoding);
            let record = FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(payload.as_slice())
                .headers(kafka::content_type_headers(Some(encoding.content_type())));
            deliveries.push(
                kafka::enqueue(&self.producer, record)
                    .await
                    .expect("enqueue"),
            );
        }
        kafka::await_deliveries(deliveries).await.expect("deliver");
    }

    /// Starts the `order-lifecycle run` binary with `config`, its log going
    /// to a file named after the group and `name`.
    pub fn spawn_binary(&self, config: &RunConfig, name: &str) -> BinaryConsumer {
        let log = std::env::temp_dir().join(format!("{}-{name}.log", self.group_id));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_order-lifecycle"))
            .arg("run")
            .env("RUST_LOG", "info")
            .env("OL_KAFKA_BROKERS", &config.kafka.brokers)
            .env("OL_TOPICS", config.topics.join(","))
            .env("OL_GROUP_ID", &config.group_id)
            .env("OL_DEAD_LETTER_TOPIC", &config.dead_letter_topic)
            .env("OL_DATABASE_URL", config.database.url.expose())
            .env("OL_REDIS_URL", config.redis.url.expose())
            .env("OL_REDIS_KEY_PREFIX", &config.redis.key_prefix)
            .env("OL_SESSION_TIMEOUT", "6s")
            .env("OL_SHUTDOWN_TIMEOUT", "3s")
            .env(
                "OL_PARK_TIMEOUT",
                format!("{}s", config.park_timeout.as_secs().max(1)),
            )
            .env("OL_BATCH_SIZE", config.batch_size.to_string())
            .env("OL_HTTP_LISTEN", config.http.listen.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start order-lifecycle run");
        BinaryConsumer { child, log }
    }

    /// Log entries so far.
    pub async fn logged(&self) -> i64 {
        self.db.count("SELECT COUNT(*) FROM lifecycle_events").await
    }
}

/// The product's binary, running.
pub struct BinaryConsumer {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

/// A test that fails half-way must not leave consumers running.
impl Drop for BinaryConsumer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl BinaryConsumer {
    /// SIGKILL: no chance to finish anything.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// Whether the log has a line containing `text`.
    pub fn logged(&self, text: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains(text))
    }

    /// SIGTERM, then waits; returns the exit code and the log.
    pub async fn terminate(mut self, within: Duration) -> (Option<i32>, String) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > within {
                let _ = self.child.kill();
                panic!("order-lifecycle did not stop within {within:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        (status.code(), log)
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn port_answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A Redis server of the test's own, on its own port (fault tests stop it;
/// the shared one is never touched).
pub struct OwnRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    pub async fn start() -> OwnRedis {
        let mut redis = OwnRedis {
            port: free_port(),
            child: None,
        };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it (empty: it keeps nothing on disk).
    pub async fn restart(&mut self) {
        let mut child = std::process::Command::new("redis-server");
        child
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stderr(std::process::Stdio::null());
        self.child = Some(start_server(child, "the test's own Redis", self.port, 10).await);
    }

    pub fn stop(&mut self) {
        kill(&mut self.child);
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a test-owned server and waits until its port answers.
async fn start_server(
    mut command: std::process::Command,
    what: &str,
    port: u16,
    seconds: u64,
) -> std::process::Child {
    let child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} could not start: {e}"));
    wait_until(what, Duration::from_secs(seconds), || async move {
        port_answers(port)
    })
    .await;
    child
}

/// Kills and reaps a test-owned server, if running.
fn kill(child: &mut Option<std::process::Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A MariaDB server of the test's own, with its own data directory and port.
pub struct OwnMariaDb {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl OwnMariaDb {
    pub async fn start() -> OwnMariaDb {
        let dir = std::env::temp_dir().join(format!("olt-mariadb-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("mariadb-install-db is required");
        assert!(status.success(), "mariadb-install-db failed");
        let mut db = OwnMariaDb {
            port: free_port(),
            dir,
            child: None,
        };
        db.restart().await;
        db
    }

    pub fn root_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        let mut child = std::process::Command::new("/usr/sbin/mariadbd");
        child
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=64M",
            ])
            .stderr(std::fs::File::create(self.dir.join("err.log")).unwrap());
        self.child = Some(start_server(child, "the test's own MariaDB", self.port, 30).await);
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn crash(&mut self) {
        kill(&mut self.child);
    }
}

impl Drop for OwnMariaDb {
    fn drop(&mut self) {
        self.crash();
        let _ = std::fs::remove_dir_all(&self.dir);
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

impl Env {
    /// An environment whose database and Redis are the given ones.
    pub async fn with_services(partitions: i32, db: TestDb, redis: TestRedis) -> Env {
        let topics = TestTopics::new(partitions).await;
        let producer = kafka::producer_config(&kafka_config())
            .create()
            .expect("producer");
        Env {
            db,
            redis,
            group_id: format!("olt-group-{}", unique_suffix()),
            topics,
            producer,
        }
    }
}

/// A response: status and body (de-chunked).
pub struct HttpResponse {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`).
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let body = body.unwrap_or("");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        rest.to_owned()
    };
    HttpResponse {
        status,
        headers: head.to_owned(),
        body,
    }
}

/// A free local address for an HTTP server.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Messages at consecutive offsets of partition 0 of `topic`, from `first`,
/// each event in its encoding (content-type header set), as the consumer
/// hands them to the pipeline.
pub fn inbound_messages<'a>(
    topic: &str,
    first: i64,
    events: impl IntoIterator<Item = (&'a OrderEvent, Encoding)>,
) -> Vec<order_lifecycle::wire::InboundMessage> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, (e, encoding))| order_lifecycle::wire::InboundMessage {
            topic: topic.into(),
            partition: 0,
            offset: first + i as i64,
            key: None,
            payload: Some(wire::encode(e, encoding)),
            content_type: Some(encoding.content_type().as_bytes().to_vec()),
            timestamp_ms: None,
        })
        .collect()
}
