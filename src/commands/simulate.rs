//! `simulate`: sends a realistic stream of order lifecycles to the topics, so
//! that a new user sees the system work. The plan is pure
//! ([`crate::scenario::plan`]); this module only paces and sends it.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;
use crate::kafka;
use crate::scenario::{self, Payload, PlanOptions, Stream};
use crate::wire;

/// Options of `simulate`.
#[derive(Debug, Clone, Args)]
pub struct SimulateConfig {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    /// Orders to simulate.
    #[arg(long, default_value_t = 100)]
    pub orders: usize,
    /// Target events per second (about 10 events make one order).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seed of the plan; the same seed and run id give the same stream.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prefix of this run's order ids (digits); default: from the clock, so
    /// that repeated runs never reuse an id.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Share of events sent as JSON instead of protobuf.
    #[arg(long, default_value_t = 0.2)]
    pub json_ratio: f64,
    /// Share of orders that also send one broken message (dead-lettered).
    #[arg(long, default_value_t = 0.02)]
    pub bad_ratio: f64,
    /// Topic for order requests.
    #[arg(long, env = "OL_ORDERS_TOPIC", default_value = "order-events")]
    pub orders_topic: String,
    /// Topic for provider confirmations.
    #[arg(
        long,
        env = "OL_CONFIRMATIONS_TOPIC",
        default_value = "provider-confirmations"
    )]
    pub confirmations_topic: String,
    /// Partitions of topics created when missing.
    #[arg(long, default_value_t = 4)]
    pub topic_partitions: i32,
}

/// Plans and sends the stream, printing progress every second.
///
/// # Errors
/// When the topics cannot be created or a message cannot be delivered.
pub async fn run(config: SimulateConfig) -> anyhow::Result<()> {
    kafka::ensure_topics(
        &config.kafka,
        &[&config.orders_topic, &config.confirmations_topic],
        config.topic_partitions,
    )
    .await
    .context("creating topics")?;
    let producer: FutureProducer = kafka::producer_config(&config.kafka)
        .create()
        .context("creating the producer")?;
    let now_ms = crate::clock::now_ms();
    let run_id = config
        .run_id
        .clone()
        .unwrap_or_else(|| format!("{}", (now_ms / 1000) % 1_000_000));
    let opts = PlanOptions {
        orders: config.orders,
        orders_per_second: (config.rate / 10.0).max(0.01),
        seed: config.seed.unwrap_or(now_ms as u64),
        json_ratio: config.json_ratio,
        bad_ratio: config.bad_ratio,
        run_id,
        start_ms: now_ms,
    };
    let plan = scenario::plan(&opts);
    tracing::info!(orders = opts.orders, messages = plan.len(), run_id = %opts.run_id, "simulating");
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut in_flight = Vec::new();
    let mut sent = 0usize;
    for p in &plan {
        let due = started + Duration::from_millis(p.at_ms);
        tokio::time::sleep_until(due.into()).await;
        let topic = match p.stream {
            Stream::Orders => &config.orders_topic,
            Stream::Confirmations => &config.confirmations_topic,
        };
        let (bytes, content_type) = match &p.payload {
            Payload::Event(e, enc) => (wire::encode(e, *enc), Some(enc.content_type())),
            Payload::Garbage(b) => (b.clone(), None),
        };
        let headers = kafka::content_type_headers(content_type);
        let record = FutureRecord::to(topic)
            .key(p.key.as_bytes())
            .payload(bytes.as_slice())
            .headers(headers);
        in_flight.push(kafka::enqueue(&producer, record).await.context("sending")?);
        sent += 1;
        if in_flight.len() >= 500 {
            kafka::await_deliveries(std::mem::take(&mut in_flight))
                .await
                .context("delivering")?;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            println!("simulate: sent {sent}/{} messages", plan.len());
        }
    }
    kafka::await_deliveries(in_flight)
        .await
        .context("delivering")?;
    println!(
        "simulate: sent {sent} messages for {} orders in {:.1} s",
        opts.orders,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
