//! Everything one end-to-end test owns, the consumer in this process, and
//! the check that the read models match the log.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use order_lifecycle::config::RunConfig;
use order_lifecycle::domain::{EventKind, OrderEvent};
use order_lifecycle::kafka;
use order_lifecycle::wire::{self, Encoding};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::basics::{brokers, unique_suffix, wait_until};
use crate::database::TestDb;
use crate::kafka::{kafka_config, TestTopics};
use crate::process::BinaryConsumer;
use crate::redis::TestRedis;

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
        Env::with_services(partitions, TestDb::new().await, TestRedis::new()).await
    }

    /// The command line of `run` for this test: its topics, group,
    /// database and key prefix, short timeouts, no HTTP server. The binary
    /// gets these arguments ([`Env::spawn_binary`]); in-process consumers
    /// get them parsed ([`Env::run_config`]), so both run the same
    /// configuration.
    pub fn run_args(&self) -> Vec<String> {
        let topics = format!("{},{}", self.topics.orders, self.topics.confirmations);
        [
            "run",
            "--brokers",
            &brokers(),
            "--topics",
            &topics,
            "--group-id",
            &self.group_id,
            "--dead-letter-topic",
            &self.topics.dead_letters,
            "--database-url",
            self.db.url.expose(),
            "--database-max-connections",
            "4",
            "--http-listen",
            "off",
            "--batch-size",
            "200",
            "--batch-linger",
            "20ms",
            "--session-timeout",
            "6s",
            "--shutdown-timeout",
            "3s",
            "--park-timeout",
            "60s",
            "--max-partition-idle",
            "100ms",
            "--topic-partitions",
            "2",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain(self.redis.args())
        .collect()
    }

    /// `run`'s configuration from [`Env::run_args`].
    pub fn run_config(&self) -> RunConfig {
        self.run_config_with(&[])
    }

    /// `run`'s configuration from [`Env::run_args`] and `extra` arguments
    /// (a later flag wins).
    pub fn run_config_with(&self, extra: &[&str]) -> RunConfig {
        let argv = std::iter::once("order-lifecycle".to_owned())
            .chain(self.run_args())
            .chain(extra.iter().map(|a| a.to_string()));
        match order_lifecycle::commands::parse_from(argv, None) {
            Ok(cli) => match cli.command {
                order_lifecycle::commands::Command::Run(config) => *config,
                other => panic!("not run: {other:?}"),
            },
            Err(e) => panic!("the test's run arguments do not parse: {e}"),
        }
    }

    /// Starts the consumer in this process, as `run` does.
    pub fn start(&self, config: RunConfig) -> RunningConsumer {
        let (stop, shutdown) = order_lifecycle::shutdown::Shutdown::new();
        let handle = tokio::spawn(order_lifecycle::commands::run::run(config, shutdown));
        RunningConsumer { stop, handle }
    }

    /// The topic and key a producer would use: confirmations to the
    /// confirmations topic keyed by lifecycle id, the rest to the orders
    /// topic keyed by order.
    pub fn destination(&self, e: &OrderEvent) -> (&str, String) {
        match &e.kind {
            EventKind::ProviderConfirmation(c) => {
                (&self.topics.confirmations, c.lifecycle_id.to_string())
            }
            _ => (
                &self.topics.orders,
                e.order_id
                    .as_ref()
                    .expect("an order event names its order")
                    .to_string(),
            ),
        }
    }

    /// Sends events where a producer would ([`Env::destination`]).
    pub async fn send(&self, events: &[OrderEvent], encoding: Encoding) {
        for e in events {
            let (topic, key) = self.destination(e);
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

    /// Reads the dead-letter topic from the start until `expected` letters
    /// came (or 20 s passed): each letter's headers and its `payload`.
    pub fn read_dead_letter_topic(&self, expected: usize) -> Vec<BTreeMap<String, String>> {
        self.read_dead_letters(|read, _| read >= expected)
    }

    /// Reads the whole dead-letter topic: until nothing more came for 3 s.
    pub fn read_all_dead_letters(&self) -> Vec<BTreeMap<String, String>> {
        self.read_dead_letters(|_, quiet| quiet >= Duration::from_secs(3))
    }

    /// Reads every partition of the dead-letter topic from the start until
    /// `done(letters read, time since the last one)` or 20 s.
    fn read_dead_letters(
        &self,
        done: impl Fn(usize, Duration) -> bool,
    ) -> Vec<BTreeMap<String, String>> {
        let consumer: BaseConsumer =
            kafka::consumer_config(&kafka_config(), &self.group_id, Duration::from_secs(6))
                .create()
                .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(&self.topics.dead_letters), Duration::from_secs(10))
            .expect("the dead-letter topic's metadata");
        let mut tpl = TopicPartitionList::new();
        for p in metadata.topics()[0].partitions() {
            tpl.add_partition_offset(&self.topics.dead_letters, p.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let start = Instant::now();
        let mut last = Instant::now();
        while !done(out.len(), last.elapsed()) && start.elapsed() < Duration::from_secs(20) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                last = Instant::now();
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
            let (topic, key) = self.destination(e);
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

    /// Starts the `order-lifecycle run` binary with [`Env::run_args`] and
    /// `extra` arguments, its log going to a file named after the group and
    /// `name`.
    pub fn spawn_binary(&self, extra: &[&str], name: &str) -> BinaryConsumer {
        let log = std::env::temp_dir().join(format!("{}-{name}.log", self.group_id));
        let child = std::process::Command::new(crate::process::binary())
            .args(self.run_args())
            .args(extra)
            .env("RUST_LOG", "info")
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
