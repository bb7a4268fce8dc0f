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

use std::collections::HashMap;

use anyhow::Context;
use clap::Args;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer};

use super::{enqueue, plain_consumer, plan, wait_projected, BenchServices, Layout, Scratch};
use crate::config::KafkaConfig;
use crate::kafka;

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
    /// The bench producer's `linger.ms`; the figures include it. The local
    /// broker's cost per request grows with the batches a partition holds:
    /// with much less than 20 ms it saturates during a run and its queueing
    /// sets the tail (README, "What bounds latency").
    #[arg(long, default_value_t = 20)]
    pub producer_linger_ms: u32,
    /// The consumer's `--batch-linger`.
    #[arg(long, default_value = "0ms", value_parser = crate::config::parse_duration)]
    pub batch_linger: Duration,
    /// The consumer's `--max-partition-idle` (rule R11's wait).
    #[arg(long, default_value = "100ms", value_parser = crate::config::parse_duration)]
    pub max_partition_idle: Duration,
    #[command(flatten)]
    pub services: BenchServices,
}

/// Runs the benchmark and prints its figures.
///
/// # Errors
/// Any broker, database or Redis failure.
pub async fn run(config: LatencyConfig) -> anyhow::Result<()> {
    let scratch = Scratch::new("latency", &config.services);
    let result = measure(&config, &scratch).await;
    scratch.remove().await?;
    result
}

async fn measure(config: &LatencyConfig, scratch: &Scratch) -> anyhow::Result<()> {
    let (url, name) = (&scratch.url, scratch.name.as_str());
    let kafka = config.services.kafka();
    let topics = config.layout.topics(name);
    scratch
        .create_topics(&kafka, &topics, config.partitions)
        .await?;
    let mut run = scratch.run_config(&kafka, &topics, config.partitions, config.fetch_wait_ms);
    run.batch_linger = config.batch_linger;
    run.max_partition_idle = config.max_partition_idle;
    let producer: FutureProducer = kafka::producer_config(&kafka)
        .set("linger.ms", config.producer_linger_ms.to_string())
        .create()
        .context("creating the producer")?;
    broker_alone(config, scratch, &run.kafka, &producer).await?;

    // The database exists and is migrated before the consumer starts.
    let store = crate::store::Store::connect(url, 2).await?;
    store.migrate().await?;
    let (stop, stopped) = crate::shutdown::Shutdown::new();
    let consumer = tokio::spawn(crate::commands::run::run(run, stopped));

    let redis = scratch.projection().await?;
    let topic_of = |event: &crate::domain::OrderEvent| -> &str {
        &topics[config.layout.topic_index(&event.kind)]
    };

    // Warm up until an event goes all the way (the group has joined).
    let warm_up = plan(1, &format!("warm{}", crate::clock::now_ms()), 7);
    let started = Instant::now();
    loop {
        let (event, encoding) = &warm_up[0];
        let delivery = enqueue(&producer, topic_of(event), event, *encoding).await?;
        kafka::await_deliveries(vec![delivery]).await?;
        if wait_projected(&redis, 1, Duration::from_secs(5)).await? {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "the consumer did not start consuming within 90 s"
        );
    }
    let skip = redis.position().await?;

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
    let events = steady_plan(config, "lat", 7);
    let events = events.as_slice();
    let cpu_before = super::CpuReading::now();
    let start = Instant::now();
    let steady = produce_steady(&producer, events, config.rate, topic_of).await?;
    let produced_in = start.elapsed();
    kafka::await_deliveries(steady.deliveries).await?;
    let sent_at: Vec<(String, Instant)> = events
        .iter()
        .map(|(e, _)| e.event_id.to_string())
        .zip(steady.sent_at)
        .collect();
    let expected = skip + events.len() as i64;
    let complete = wait_projected(&redis, expected, Duration::from_secs(120)).await?;
    let cpu = super::CpuReading::now().since(&cpu_before);
    let wall = start.elapsed().as_secs_f64();
    let _ = done_tx.send(true);
    let seen = poller.await?;
    stop.trigger();
    consumer.await??;
    anyhow::ensure!(complete, "not every event reached Redis within 120 s");

    // The log's recorded_at (wall clock, µs) placed on the Instant scale.
    let (base_instant, base_us) = (Instant::now(), crate::clock::now_us());
    let instant_of = |us: i64| -> Instant {
        let behind = Duration::from_micros(u64::try_from(base_us - us).unwrap_or(0));
        base_instant.checked_sub(behind).unwrap_or(base_instant)
    };
    let landings = crate::store::event_log::landings_by_event_id(store.pool()).await?;
    let mut latencies: Vec<Duration> = Vec::with_capacity(sent_at.len());
    let (mut to_log, mut log_to_redis) = (Vec::new(), Vec::new());
    for (event_id, at) in &sent_at {
        let Some(landing) = landings.get(event_id) else {
            continue;
        };
        let i = seen.partition_point(|(_, p)| *p < landing.position);
        if let Some((visible, _)) = seen.get(i) {
            let recorded = instant_of(landing.recorded_us);
            latencies.push(visible.saturating_duration_since(*at));
            to_log.push(recorded.saturating_duration_since(*at));
            log_to_redis.push(visible.saturating_duration_since(recorded));
        }
    }
    println!(
        "bench-latency: layout {:?}, {} partitions, producer linger.ms {}, fetch.wait.max.ms {}: \
         {} events at {:.0}/s \
         (asked {}/s); event -> Redis {} ({} measured); of which event -> log row written {}, \
         log row -> Redis {}; CPU in {wall:.1} s: {cpu} (the service's includes this bench's \
         producer and poller)",
        config.layout,
        config.partitions,
        config.producer_linger_ms,
        config.fetch_wait_ms,
        events.len(),
        events.len() as f64 / produced_in.as_secs_f64(),
        config.rate,
        percentiles(&mut latencies),
        latencies.len(),
        percentiles(&mut to_log),
        percentiles(&mut log_to_redis),
    );
    Ok(())
}

/// The same stream through the broker alone, on topics of its own: a plain
/// consumer assigned every partition (no group join, no database, no
/// Redis) with the service's fetch settings; produce -> receive. What the
/// service adds is the difference to this.
async fn broker_alone(
    config: &LatencyConfig,
    scratch: &Scratch,
    kafka: &KafkaConfig,
    producer: &FutureProducer,
) -> anyhow::Result<()> {
    let topics = config.layout.topics(&format!("{}-plain", scratch.name));
    scratch
        .create_topics(kafka, &topics, config.partitions)
        .await?;
    let consumer = plain_consumer(
        kafka,
        &format!("{}-plain", scratch.name),
        &topics,
        config.partitions,
    )?;

    let topic_of = |event: &crate::domain::OrderEvent| -> &str {
        &topics[config.layout.topic_index(&event.kind)]
    };

    // Warm up until the consumer receives (its first fetches wait for
    // metadata and connections), as `measure` does for the service.
    let warm_up = plan(1, &format!("plainwarm{}", crate::clock::now_ms()), 11);
    let mut deliveries = Vec::with_capacity(warm_up.len());
    for (event, encoding) in &warm_up {
        deliveries.push(enqueue(producer, topic_of(event), event, *encoding).await?);
    }
    kafka::await_deliveries(deliveries).await?;
    for _ in &warm_up {
        tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .context("the plain consumer received nothing within 30 s")??;
    }

    let events = steady_plan(config, "plain", 11);
    let events = events.as_slice();
    let total = events.len();
    let receiver = tokio::spawn(async move {
        let mut received: HashMap<(String, i32, i64), Instant> = HashMap::new();
        while received.len() < total {
            match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
                Ok(Ok(m)) => {
                    received.insert(
                        (m.topic().to_owned(), m.partition(), m.offset()),
                        Instant::now(),
                    );
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "plain consumer"),
                Err(_) => break,
            }
        }
        received
    });
    let steady = produce_steady(producer, events, config.rate, topic_of).await?;
    let mut placed = Vec::with_capacity(events.len());
    for ((event, _), delivery) in events.iter().zip(steady.deliveries) {
        match delivery.await {
            Ok(Ok(delivery)) => placed.push((
                topic_of(event).to_owned(),
                delivery.partition,
                delivery.offset,
            )),
            Ok(Err((e, _))) => return Err(e).context("producing"),
            Err(_) => anyhow::bail!("a delivery was cancelled"),
        }
    }
    let received = receiver.await?;
    let mut latencies: Vec<Duration> = placed
        .into_iter()
        .zip(&steady.sent_at)
        .filter_map(|(at, sent)| {
            received
                .get(&at)
                .map(|r| r.saturating_duration_since(*sent))
        })
        .collect();
    println!(
        "bench-latency: broker alone (plain consumer, same rate, producer linger.ms and \
         fetch.wait.max.ms): event -> consumer {} ({} of {} received)",
        percentiles(&mut latencies),
        latencies.len(),
        events.len(),
    );
    Ok(())
}

/// The events of a run: `--rate` times `--seconds` of realistic
/// lifecycles, with ids unique to `name` and the moment.
fn steady_plan(
    config: &LatencyConfig,
    name: &str,
    seed: u64,
) -> Vec<(crate::domain::OrderEvent, crate::wire::Encoding)> {
    let total = (u64::from(config.rate) * config.seconds) as usize;
    let mut events = plan(
        total / 8 + 1,
        &format!("{name}{}", crate::clock::now_ms()),
        seed,
    );
    events.truncate(total);
    events
}

/// What [`produce_steady`] sent.
struct Steady {
    /// When each event was handed to the producer, in order.
    sent_at: Vec<Instant>,
    deliveries: Vec<DeliveryFuture>,
}

/// Produces `events` at `rate` a second, each to `topic_of` it.
async fn produce_steady<'t>(
    producer: &FutureProducer,
    events: &[(crate::domain::OrderEvent, crate::wire::Encoding)],
    rate: u32,
    topic_of: impl Fn(&crate::domain::OrderEvent) -> &'t str,
) -> anyhow::Result<Steady> {
    let mut steady = Steady {
        sent_at: Vec::with_capacity(events.len()),
        deliveries: Vec::with_capacity(events.len()),
    };
    let start = Instant::now();
    let per_event = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    for (i, (event, encoding)) in events.iter().enumerate() {
        let due = start + per_event * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        steady.sent_at.push(Instant::now());
        steady
            .deliveries
            .push(enqueue(producer, topic_of(event), event, *encoding).await?);
    }
    Ok(steady)
}

/// `p50 .. ms, p99 .. ms, max .. ms` of `latencies` (sorted here).
fn percentiles(latencies: &mut [Duration]) -> String {
    latencies.sort();
    let pick = |q: f64| -> f64 {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies
            .get(i)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pick(0.50),
        pick(0.99),
        pick(1.0)
    )
}
