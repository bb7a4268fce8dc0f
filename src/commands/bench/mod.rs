//! Benchmarks: commands that print figures, run by hand on a release build
//! against the real broker, MariaDB and Redis, each in a scratch database,
//! Redis key prefix and topics of its own. They are not tests: nothing here
//! fails on a slow machine. Absolute numbers are noisy on a shared machine,
//! so each bench prints ratios measured in the same run where it can.
//!
//! - [`ingest`]: `bench-ingest`, a backlog drained by `run`'s pipeline beside
//!   the plain multi-row ceiling of the same database;
//! - [`latency`]: `bench-latency`, event-to-Redis latency at a steady rate;
//! - [`rebuild`]: `bench-rebuild`, both rebuilds on a synthetic log;
//! - [`import`]: `bench-import`, `import-legacy` on synthetic legacy tables.

pub mod import;
pub mod ingest;
pub mod latency;
pub mod rebuild;

use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::migrate::MigrateDatabase;

use crate::config::{
    DatabaseConfig, HttpConfig, InputConfig, KafkaConfig, KafkaOption, RedisConfig, RunConfig,
    SecretUrl,
};
use crate::domain::{EventKind, OrderEvent};
use crate::kafka;
use crate::scenario::{self, Payload, PlanOptions};
use crate::store::redis_projection::RedisProjection;
use crate::wire;

/// Where the services a bench uses are.
#[derive(Debug, Clone, Args)]
pub struct BenchServices {
    /// Bootstrap brokers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// MySQL/MariaDB server (no database: a scratch one is created and dropped).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306", value_parser = crate::config::parse_database_url)]
    pub server_url: SecretUrl,
    /// Redis for the scratch key prefix.
    #[arg(long, default_value = "redis://127.0.0.1:6379/0", value_parser = crate::config::parse_redis_url)]
    pub redis_url: SecretUrl,
    /// Extra librdkafka settings (`key=value`) for every client of the bench
    /// and of the service it runs, as `run --kafka-option` takes them; the
    /// bench's own settings (`--producer-linger-ms`, `--fetch-wait-ms`) win.
    #[arg(long = "kafka-option", value_delimiter = ',')]
    pub kafka_options: Vec<crate::config::KafkaOption>,
}

impl BenchServices {
    /// The broker, as the service's commands take it.
    pub fn kafka(&self) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers.clone(),
            options: self.kafka_options.clone(),
        }
    }
}

/// A scratch database and Redis key prefix, named after the bench and the
/// moment it started, so that runs never meet.
#[derive(Debug, Clone)]
pub struct Scratch {
    /// Database name, also the topics' and the consumer group's prefix.
    pub name: String,
    pub url: SecretUrl,
    pub prefix: String,
    redis_url: SecretUrl,
}

impl Scratch {
    /// Names a scratch space on the bench's servers.
    pub fn new(bench: &str, services: &BenchServices) -> Scratch {
        let name = format!("olbench_{bench}_{}", crate::clock::now_ms());
        Scratch {
            url: SecretUrl::new(format!("{}/{name}", services.server_url.expose())),
            prefix: format!("{name}:"),
            name,
            redis_url: services.redis_url.clone(),
        }
    }

    /// The scratch database, as the service's commands take it.
    pub fn database(&self) -> DatabaseConfig {
        DatabaseConfig {
            url: self.url.clone(),
            max_connections: 8,
        }
    }

    /// The scratch key prefix, as the service's commands take it.
    pub fn redis(&self) -> RedisConfig {
        RedisConfig {
            url: self.redis_url.clone(),
            cluster_nodes: Vec::new(),
            key_prefix: self.prefix.clone(),
            tls: Default::default(),
        }
    }

    /// Connects to the scratch key prefix.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn projection(&self) -> anyhow::Result<RedisProjection> {
        Ok(RedisProjection::connect(self.redis_url.expose(), &self.prefix).await?)
    }

    /// `run`'s configuration for the scratch space: `topics` (created
    /// already, with `partitions` each), the consumer's `fetch.wait.max.ms`
    /// set to `fetch_wait_ms` (the local broker answers a waiting fetch only
    /// then), a short session timeout so that the group joins in seconds,
    /// and `run`'s defaults otherwise.
    pub fn run_config(
        &self,
        kafka: &KafkaConfig,
        topics: &[String],
        partitions: i32,
        fetch_wait_ms: u32,
    ) -> RunConfig {
        let mut kafka = kafka.clone();
        kafka.options.push(KafkaOption {
            key: "fetch.wait.max.ms".into(),
            value: fetch_wait_ms.to_string(),
        });
        RunConfig {
            kafka,
            database: self.database(),
            redis: self.redis(),
            http: HttpConfig::off(),
            input: InputConfig {
                topics: topics.to_vec(),
                batch_size: 500,
                parking: crate::config::ParkingConfig::default(),
                schemas: crate::config::SchemaConfig::default(),
            },
            group_id: self.name.clone(),
            group_instance_id: None,
            dead_letter_topic: self.dead_letter_topic(),
            batch_linger: Duration::from_millis(50),
            session_timeout: Duration::from_secs(6),
            shutdown_timeout: Duration::from_secs(3),
            max_partition_idle: Duration::from_millis(100),
            create_topics: false,
            topic_partitions: partitions,
            order_cache: crate::config::DEFAULT_ORDER_CACHE,
        }
    }

    /// The scratch dead-letter topic.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}-dlq", self.name)
    }

    /// Creates `topics` and the dead-letter topic with `partitions` each.
    ///
    /// # Errors
    /// The broker refuses or does not answer.
    pub async fn create_topics(
        &self,
        kafka: &KafkaConfig,
        topics: &[String],
        partitions: i32,
    ) -> anyhow::Result<()> {
        let dead_letters = self.dead_letter_topic();
        let mut all: Vec<&str> = topics.iter().map(String::as_str).collect();
        all.push(&dead_letters);
        kafka::ensure_topics(kafka, &all, partitions)
            .await
            .context("creating topics")
    }

    /// Drops the database and the Redis keys (topics stay: the local broker
    /// keeps them in memory only).
    ///
    /// # Errors
    /// Any database or Redis failure.
    pub async fn remove(&self) -> anyhow::Result<()> {
        remove_keys(&self.projection().await?).await?;
        sqlx::MySql::drop_database(self.url.expose()).await?;
        Ok(())
    }
}

/// Removes every key of the projection's prefix (a scratch prefix).
///
/// # Errors
/// Any Redis failure.
pub(crate) async fn remove_keys(redis: &RedisProjection) -> anyhow::Result<()> {
    let keys = redis.keys();
    for pattern in [
        keys.lookup_pattern(),
        keys.active_pattern(),
        keys.projection(),
    ] {
        let mut cursor = 0;
        loop {
            let (next, batch) = redis.scan(cursor, &pattern).await?;
            redis.delete(&batch.iter().collect::<Vec<_>>()).await?;
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    Ok(())
}

/// How the order events are spread over topics (rule R11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// One order-event topic and a confirmations topic.
    One,
    /// Placements, stop-loss/take-profit changes, cancels/closes/modifications
    /// and confirmations, each on its own topic.
    Four,
}

impl Layout {
    /// The topics of this layout, named after `family`.
    pub fn topics(self, family: &str) -> Vec<String> {
        let names: &[&str] = match self {
            Layout::One => &["orders", "confirmations"],
            Layout::Four => &["placements", "protective", "changes", "confirmations"],
        };
        names.iter().map(|n| format!("{family}-{n}")).collect()
    }

    /// Which of [`Layout::topics`] an event goes to.
    pub fn topic_index(self, kind: &EventKind) -> usize {
        match (self, kind) {
            (Layout::One, EventKind::ProviderConfirmation(_)) => 1,
            (Layout::One, _) => 0,
            (Layout::Four, EventKind::OrderPlaced(_)) => 0,
            (Layout::Four, EventKind::StopLossAdded(_) | EventKind::TakeProfitAdded(_)) => 1,
            (Layout::Four, EventKind::ProviderConfirmation(_)) => 3,
            (Layout::Four, _) => 2,
        }
    }
}

/// A realistic stream of `orders` lifecycles (no broken messages), in the
/// order it happens, with ids unique to `run_id`.
pub fn plan(orders: usize, run_id: &str, seed: u64) -> Vec<(OrderEvent, wire::Encoding)> {
    let mut planned = scenario::plan(&PlanOptions {
        orders,
        orders_per_second: 1e6,
        seed,
        json_ratio: 0.2,
        bad_ratio: 0.0,
        run_id: run_id.to_owned(),
        start_ms: crate::clock::now_ms(),
    });
    planned.sort_by_key(|p| p.at_ms);
    planned
        .into_iter()
        .filter_map(|p| match p.payload {
            Payload::Event(e, enc) => Some((*e, enc)),
            Payload::Garbage(_) => None,
        })
        .collect()
}

/// Queues `event` for `topic`, keyed as the contract says (requests by
/// order, confirmations by lifecycle id).
///
/// # Errors
/// The record cannot be queued.
pub async fn enqueue(
    producer: &FutureProducer,
    topic: &str,
    event: &OrderEvent,
    encoding: wire::Encoding,
) -> anyhow::Result<DeliveryFuture> {
    let key = match &event.kind {
        EventKind::ProviderConfirmation(c) => c.lifecycle_id.to_string(),
        _ => event
            .order_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    };
    let payload = wire::encode(event, encoding);
    let record = FutureRecord::to(topic)
        .key(key.as_bytes())
        .payload(payload.as_slice())
        .headers(kafka::content_type_headers(Some(encoding.content_type())));
    Ok(kafka::enqueue(producer, record).await?)
}

/// A consumer assigned every partition of `topics` from the beginning (no
/// group join, so it starts at once), with `kafka`'s settings: what the
/// benches' "broker alone" figures read with.
///
/// # Errors
/// The client cannot be created or assigned.
pub fn plain_consumer(
    kafka: &KafkaConfig,
    group: &str,
    topics: &[String],
    partitions: i32,
) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = kafka::consumer_config(kafka, group, Duration::from_secs(6))
        .create()
        .context("creating the plain consumer")?;
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        for partition in 0..partitions {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Waits until Redis's projection covers `position`; false after `within`.
///
/// # Errors
/// Any Redis failure.
pub async fn wait_projected(
    redis: &RedisProjection,
    position: i64,
    within: Duration,
) -> anyhow::Result<bool> {
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        if redis.position().await? >= position {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(false)
}

/// CPU seconds (user + system) a process has used so far, from
/// `/proc/<pid>/stat`; `None` where there is no such file.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on (see proc(5)).
    Some(ticks as f64 / 100.0)
}

/// The pid of the first running process whose command name is one of
/// `names` (e.g. `mariadbd`), for measuring a local server's CPU.
pub fn find_process(names: &[&str]) -> Option<String> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
            if names.contains(&comm.trim()) {
                return Some(pid);
            }
        }
    }
    None
}

/// CPU seconds of this process and of the local servers, read together so
/// that two readings give each one's share of a phase.
#[derive(Debug, Clone)]
pub struct CpuReading {
    readings: Vec<(&'static str, Option<String>, f64)>,
}

impl CpuReading {
    /// Reads this process, MariaDB, the broker and Redis.
    pub fn now() -> CpuReading {
        CpuReading::with_service("self")
    }

    /// Reads process `service` (a pid, or `self`) as the service, MariaDB,
    /// the broker and Redis.
    pub fn with_service(service: &str) -> CpuReading {
        CpuReading::with_services(&[service.to_owned()])
    }

    /// [`CpuReading::with_service`] with the service's instances summed.
    pub fn with_services(services: &[String]) -> CpuReading {
        let servers: [(&'static str, Vec<String>); 4] = [
            ("service", services.to_vec()),
            (
                "mariadb",
                find_process(&["mariadbd", "mysqld"]).into_iter().collect(),
            ),
            (
                "broker",
                find_process(&["tansu", "kafka"]).into_iter().collect(),
            ),
            (
                "redis",
                find_process(&["redis-server"]).into_iter().collect(),
            ),
        ];
        CpuReading {
            readings: servers
                .into_iter()
                .map(|(what, pids)| {
                    let seconds = if pids.is_empty() {
                        f64::NAN
                    } else {
                        pids.iter()
                            .map(|pid| cpu_seconds(pid).unwrap_or(f64::NAN))
                            .sum()
                    };
                    (what, pids.first().cloned(), seconds)
                })
                .collect(),
        }
    }

    /// CPU seconds each process used since `earlier`, as `name 1.2 s`.
    pub fn since(&self, earlier: &CpuReading) -> String {
        self.readings
            .iter()
            .zip(&earlier.readings)
            .map(|((what, _, now), (_, _, before))| {
                if now.is_nan() || before.is_nan() {
                    format!("{what} n/a")
                } else {
                    format!("{what} {:.1} s", now - before)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// CPU seconds of one process since `earlier` (NaN if unknown).
    pub fn of(&self, earlier: &CpuReading, what: &str) -> f64 {
        let pick = |r: &CpuReading| {
            r.readings
                .iter()
                .find(|(w, _, _)| *w == what)
                .map_or(f64::NAN, |(_, _, s)| *s)
        };
        pick(self) - pick(earlier)
    }
}

/// Resets this process's peak resident memory (`VmHWM`), so that a later
/// [`crate::telemetry::peak_memory_mib`] measures one phase (Linux only;
/// elsewhere the peak stays the process's).
pub fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
