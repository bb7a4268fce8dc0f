//! `bench-latency`: event-to-Redis latency at a steady rate, through the
//! real broker, MariaDB and Redis, in a scratch database, Redis key prefix
//! and topics of its own (removed afterwards, but for the topics: the local
//! broker keeps them in memory only). Run it on a release build:
//!
//! ```text
//! cargo run --release -- bench-latency --rate 5000 --seconds 20 --layout four
//! ```
//!
//! Latency is measured from the moment an event is handed to the producer
//! to the moment Redis's projection record (written in the same MULTI/EXEC
//! as the event's `global_order_lookup` keys) covers its log position. A
//! poller reads the record every millisecond; afterwards each event's
//! position is looked up in the log. Figures: p50, p99, max.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::migrate::MigrateDatabase;

use crate::config::{
    DatabaseConfig, HttpConfig, KafkaConfig, KafkaOption, RedisConfig, RunConfig, SecretUrl,
};
use crate::domain::EventKind;
use crate::kafka;
use crate::simulate::scenario::{self, Payload, PlanOptions};
use crate::store::redis_projection::RedisProjection;
use crate::wire;

/// How the order events are spread over topics (rule R11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// One order-event topic and a confirmations topic.
    One,
    /// Placements, stop-loss/take-profit changes, cancels/closes/modifications
    /// and confirmations, each on its own topic.
    Four,
}

/// Options of `bench-latency`.
#[derive(Debug, Clone, Args)]
pub struct LatencyConfig {
    /// Events per second to produce.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u32,
    /// How long to produce.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Topic layout.
    #[arg(long, value_enum, default_value = "one")]
    pub layout: Layout,
    /// Partitions per topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// The consumer's `fetch.wait.max.ms`: the local broker answers a waiting
    /// fetch only then, even when messages arrive meanwhile.
    #[arg(long, default_value_t = 10)]
    pub fetch_wait_ms: u32,
    /// Bootstrap brokers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// MySQL/MariaDB server (no database: a scratch one is created and dropped).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
    pub server_url: SecretUrl,
    /// Redis for the scratch key prefix.
    #[arg(long, default_value = "redis://127.0.0.1:6379/0")]
    pub redis_url: SecretUrl,
}

/// Runs the benchmark and prints its figures.
///
/// # Errors
/// Any broker, database or Redis failure.
pub async fn run(config: LatencyConfig) -> anyhow::Result<()> {
    let stamp = crate::clock::now_ms();
    let name = format!("olbench_latency_{stamp}");
    let url = SecretUrl::new(format!("{}/{name}", config.server_url.expose()));
    let prefix = format!("{name}:");
    let result = measure(&config, &url, &name, &prefix).await;
    let redis = RedisProjection::connect(config.redis_url.expose(), &prefix).await?;
    crate::bench::remove_keys(&redis).await?;
    sqlx::MySql::drop_database(url.expose()).await?;
    result
}

async fn measure(
    config: &LatencyConfig,
    url: &SecretUrl,
    name: &str,
    prefix: &str,
) -> anyhow::Result<()> {
    let kafka = KafkaConfig {
        brokers: config.brokers.clone(),
        options: Vec::new(),
    };
    let family = |suffix: &str| format!("{name}-{suffix}");
    let topics: Vec<String> = match config.layout {
        Layout::One => vec![family("orders"), family("confirmations")],
        Layout::Four => vec![
            family("placements"),
            family("protective"),
            family("changes"),
            family("confirmations"),
        ],
    };
    let mut all: Vec<&str> = topics.iter().map(String::as_str).collect();
    let dead_letters = family("dlq");
    all.push(&dead_letters);
    kafka::ensure_topics(&kafka, &all, config.partitions)
        .await
        .context("creating topics")?;

    let mut consumer_kafka = kafka.clone();
    consumer_kafka.options.push(KafkaOption {
        key: "fetch.wait.max.ms".into(),
        value: config.fetch_wait_ms.to_string(),
    });
    let run = RunConfig {
        kafka: consumer_kafka,
        database: DatabaseConfig {
            url: url.clone(),
            max_connections: 8,
        },
        redis: RedisConfig {
            url: config.redis_url.clone(),
            key_prefix: prefix.to_owned(),
        },
        http: HttpConfig::off(),
        topics: topics.clone(),
        group_id: name.to_owned(),
        dead_letter_topic: dead_letters.clone(),
        batch_size: 500,
        batch_linger: Duration::from_millis(50),
        session_timeout: Duration::from_secs(6),
        shutdown_timeout: Duration::from_secs(3),
        park_timeout: Duration::from_secs(300),
        max_partition_idle: Duration::from_millis(100),
        create_topics: false,
        topic_partitions: config.partitions,
    };
    // The database exists and is migrated before the consumer starts.
    let store = crate::store::Store::connect(url, 2).await?;
    store.migrate().await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(crate::ingest::run(run, async {
        let _ = stopped.await;
    }));

    let producer: FutureProducer = kafka::producer_config(&kafka)
        .set("linger.ms", "1")
        .create()
        .context("creating the producer")?;
    let redis = RedisProjection::connect(config.redis_url.expose(), prefix).await?;
    let topic_of = |kind: &EventKind| -> &str {
        let i = match (config.layout, kind) {
            (_, EventKind::ProviderConfirmation(_)) => topics.len() - 1,
            (Layout::One, _) => 0,
            (Layout::Four, EventKind::OrderPlaced(_)) => 0,
            (Layout::Four, EventKind::StopLossAdded(_) | EventKind::TakeProfitAdded(_)) => 1,
            (Layout::Four, _) => 2,
        };
        &topics[i]
    };

    // Warm up until an event goes all the way (the group has joined).
    let warm_up = plan(1, "warm");
    let started = Instant::now();
    loop {
        send(&producer, topic_of, &warm_up[0]).await?;
        if wait_projected(&redis, 1, Duration::from_secs(5)).await? {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "the consumer did not start consuming within 90 s"
        );
    }
    let skip = projected(&redis).await?;

    // The poller: when the projection first covered each position.
    let poll_redis = redis.clone();
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let poller = tokio::spawn(async move {
        let mut seen: Vec<(Instant, i64)> = Vec::new();
        let mut last = 0;
        while !*done_rx.borrow() {
            if let Ok(Some(at)) = poll_redis.projected().await {
                if at.position > last {
                    last = at.position;
                    seen.push((Instant::now(), last));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                _ = done_rx.changed() => {}
            }
        }
        seen
    });

    // Produce at the rate, in the plan's order, sending each tick's due
    // events without waiting for their deliveries.
    let total = (u64::from(config.rate) * config.seconds) as usize;
    let events = plan(total / 8 + 1, "lat");
    let events = &events[..total.min(events.len())];
    let mut sent_at: Vec<(String, Instant)> = Vec::with_capacity(events.len());
    let mut deliveries = Vec::with_capacity(events.len());
    let start = Instant::now();
    let per_event = Duration::from_secs_f64(1.0 / f64::from(config.rate.max(1)));
    for (i, (event, encoding)) in events.iter().enumerate() {
        let due = start + per_event * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        sent_at.push((event.event_id.to_string(), Instant::now()));
        deliveries.push(enqueue(&producer, topic_of, event, *encoding).await?);
    }
    let produced_in = start.elapsed();
    kafka::await_deliveries(deliveries).await?;
    let expected = skip + events.len() as i64;
    let complete = wait_projected(&redis, expected, Duration::from_secs(120)).await?;
    let _ = done_tx.send(true);
    let seen = poller.await?;
    let _ = stop.send(());
    consumer.await??;
    anyhow::ensure!(complete, "not every event reached Redis within 120 s");

    let positions: std::collections::HashMap<String, i64> =
        sqlx::query_as("SELECT CAST(event_id AS CHAR), position FROM lifecycle_events")
            .fetch_all(store.pool())
            .await?
            .into_iter()
            .collect();
    let mut latencies: Vec<Duration> = Vec::with_capacity(sent_at.len());
    for (event_id, at) in &sent_at {
        let Some(position) = positions.get(event_id) else {
            continue;
        };
        let i = seen.partition_point(|(_, p)| p < position);
        if let Some((visible, _)) = seen.get(i) {
            latencies.push(visible.saturating_duration_since(*at));
        }
    }
    latencies.sort();
    let pick = |q: f64| -> f64 {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies
            .get(i)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "bench-latency: layout {:?}, {} partitions, fetch.wait.max.ms {}: {} events at {:.0}/s \
         (asked {}/s); event -> Redis p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} measured)",
        config.layout,
        config.partitions,
        config.fetch_wait_ms,
        events.len(),
        events.len() as f64 / produced_in.as_secs_f64(),
        config.rate,
        pick(0.50),
        pick(0.99),
        pick(1.0),
        latencies.len(),
    );
    Ok(())
}

/// A realistic stream (no broken messages), in the order it happens.
fn plan(orders: usize, run_id: &str) -> Vec<(crate::domain::OrderEvent, wire::Encoding)> {
    let mut planned = scenario::plan(&PlanOptions {
        orders,
        orders_per_second: 1e6,
        seed: 7,
        json_ratio: 0.2,
        bad_ratio: 0.0,
        run_id: format!("{run_id}{}", crate::clock::now_ms()),
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

async fn enqueue<'t>(
    producer: &FutureProducer,
    topic_of: impl Fn(&EventKind) -> &'t str,
    event: &crate::domain::OrderEvent,
    encoding: wire::Encoding,
) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
    let key = match &event.kind {
        EventKind::ProviderConfirmation(c) => c.lifecycle_id.to_string(),
        _ => event
            .order_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    };
    let payload = wire::encode(event, encoding);
    let record = FutureRecord::to(topic_of(&event.kind))
        .key(key.as_bytes())
        .payload(payload.as_slice())
        .headers(kafka::content_type_headers(Some(encoding.content_type())));
    Ok(kafka::enqueue(producer, record).await?)
}

async fn send<'t>(
    producer: &FutureProducer,
    topic_of: impl Fn(&EventKind) -> &'t str,
    (event, encoding): &(crate::domain::OrderEvent, wire::Encoding),
) -> anyhow::Result<()> {
    let delivery = enqueue(producer, topic_of, event, *encoding).await?;
    kafka::await_deliveries(vec![delivery]).await?;
    Ok(())
}

async fn projected(redis: &RedisProjection) -> anyhow::Result<i64> {
    Ok(redis.position().await?)
}

/// Waits until Redis covers `position`; false after `within`.
async fn wait_projected(
    redis: &RedisProjection,
    position: i64,
    within: Duration,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    while started.elapsed() < within {
        if projected(redis).await? >= position {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(false)
}
