//! `bench-ingest`: a backlog produced through the real broker, drained by
//! `run`'s own consumer, pipeline and Redis follower, and, in the same run
//! on the same database, the plain ceiling: what MariaDB takes when it is
//! only asked to insert one small log row and one id row per event, in
//! multi-row INSERTs of 1,000 events a transaction, with nothing read. The
//! ratio of the two is the figure to watch (absolute rates move with the
//! machine). Run it on a release build:
//!
//! ```text
//! cargo run --release -- bench-ingest --events 200000
//! ```
//!
//! Events are planned and produced in chunks, so neither the plan nor the
//! producer holds the backlog: 10,000,000 events take the memory of one
//! chunk (the local broker keeps every topic in memory, though).

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rdkafka::producer::FutureProducer;
use sqlx::{MySql, QueryBuilder};

use super::{enqueue, plain_consumer, plan, BenchServices, CpuReading, Layout, Scratch};
use crate::config::{KafkaConfig, RunConfig};
use crate::kafka;
use crate::store::{event_log, offsets, Store};
use crate::telemetry::process_memory_mib;

/// Options of `bench-ingest`.
#[derive(Debug, Clone, Args)]
pub struct IngestBenchConfig {
    /// Events in the backlog (about 8 per order lifecycle).
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// Topic layout.
    #[arg(long, value_enum, default_value = "one")]
    pub layout: Layout,
    /// Partitions per topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// The consumer's batch size (`run --batch-size`).
    #[arg(long, default_value_t = 500, value_parser = crate::config::parse_batch_size)]
    pub batch_size: usize,
    /// `run` instances draining the backlog together (one consumer group;
    /// one of them leads: the Redis projection).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub instances: u16,
    /// Skip the ceiling (e.g. a second drain of a size already measured).
    #[arg(long)]
    pub no_ceiling: bool,
    #[command(flatten)]
    pub services: BenchServices,
    /// Keep the scratch database and keys afterwards (to look at them).
    #[arg(long)]
    pub keep: bool,
}

/// Orders planned (and produced) at a time.
const CHUNK_ORDERS: usize = 2_000;
/// Events per transaction of the ceiling.
const CEILING_TRANSACTION: usize = 1_000;

/// Runs the benchmark and prints its figures.
///
/// # Errors
/// Any broker, database or Redis failure.
pub async fn run(config: IngestBenchConfig) -> anyhow::Result<()> {
    let scratch = Scratch::new("ingest", &config.services);
    let result = measure(&config, &scratch).await;
    if config.keep {
        println!(
            "bench-ingest: kept database and key prefix {}",
            scratch.name
        );
    } else {
        scratch.remove().await?;
    }
    result
}

async fn measure(config: &IngestBenchConfig, scratch: &Scratch) -> anyhow::Result<()> {
    let kafka = config.services.kafka();
    let topics = config.layout.topics(&scratch.name);
    scratch
        .create_topics(&kafka, &topics, config.partitions)
        .await?;
    let store = Store::connect(&scratch.url, 2).await?;
    store.migrate().await?;

    let started = Instant::now();
    let produced = produce(config, &kafka, &topics).await?;
    let produce_seconds = started.elapsed().as_secs_f64();
    println!(
        "bench-ingest: produced {produced} events ({:?} layout, {} partitions a topic) in {:.1} s",
        config.layout, config.partitions, produce_seconds
    );

    let read = broker_read(scratch, &kafka, &topics, config.partitions, produced).await?;
    println!(
        "bench-ingest: broker alone: a plain consumer read the {produced} events in {:.1} s = \
         {:.0} events/s (nothing done with them; the drain cannot be faster); CPU {}",
        read.seconds,
        produced as f64 / read.seconds,
        read.cpu
    );

    let drain = drain(config, scratch, &kafka, &topics, &store, produced).await?;
    println!(
        "bench-ingest: {} instance(s) drained {} events in {:.1} s = {:.0} events/s (timed \
         from the first committed batch; {:.1} s with the group join); CPU {}; peak RSS {} \
         MiB ({} MiB at the first committed batch; the largest instance)",
        config.instances,
        drain.events,
        drain.seconds,
        drain.events as f64 / drain.seconds,
        drain.with_join,
        drain.cpu,
        drain
            .peak_rss_mib
            .map_or_else(|| "n/a".to_owned(), |m| m.to_string()),
        drain
            .start_rss_mib
            .map_or_else(|| "n/a".to_owned(), |m| m.to_string()),
    );
    if !config.no_ceiling {
        let ceiling = ceiling(&store, produced).await?;
        let rate = drain.events as f64 / drain.seconds;
        let plain = produced as f64 / ceiling.seconds;
        println!(
            "bench-ingest: ceiling {produced} events in {:.1} s = {:.0} events/s (one small log \
             row + one id row each, {CEILING_TRANSACTION} a transaction); CPU {}",
            ceiling.seconds, plain, ceiling.cpu
        );
        println!(
            "bench-ingest: ingest / ceiling = {:.2}; service CPU {:.0} us/event, MariaDB CPU \
             {:.0} us/event (ceiling {:.0} us/event)",
            rate / plain,
            drain.service_cpu / drain.events as f64 * 1e6,
            drain.database_cpu / drain.events as f64 * 1e6,
            ceiling.database_cpu / produced as f64 * 1e6,
        );
    }
    Ok(())
}

/// Produces the backlog chunk by chunk, waiting for each chunk's
/// deliveries before planning the next. Returns the events produced.
async fn produce(
    config: &IngestBenchConfig,
    kafka: &KafkaConfig,
    topics: &[String],
) -> anyhow::Result<usize> {
    let producer: FutureProducer = kafka::producer_config(kafka)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .create()
        .context("creating the producer")?;
    let run_id = format!("in{}", crate::clock::now_ms());
    let mut produced = 0;
    let mut chunk = 0u64;
    while produced < config.events {
        chunk += 1;
        let events = plan(CHUNK_ORDERS, &format!("{run_id}c{chunk}x"), chunk);
        let take = events.len().min(config.events - produced);
        let mut deliveries = Vec::with_capacity(take);
        for (event, encoding) in &events[..take] {
            let topic = &topics[config.layout.topic_index(&event.kind)];
            deliveries.push(enqueue(&producer, topic, event, *encoding).await?);
        }
        kafka::await_deliveries(deliveries).await?;
        produced += take;
    }
    Ok(produced)
}

/// What reading the backlog through the broker alone measured.
struct BrokerRead {
    seconds: f64,
    cpu: String,
}

/// Reads the backlog with a plain consumer assigned every partition (no
/// group, the service's fetch settings), doing nothing with it: the rate
/// at which the broker serves this backlog, which bounds the drain.
async fn broker_read(
    scratch: &Scratch,
    kafka: &KafkaConfig,
    topics: &[String],
    partitions: i32,
    produced: usize,
) -> anyhow::Result<BrokerRead> {
    let kafka = scratch.run_config(kafka, topics, partitions, 10).kafka;
    let consumer = plain_consumer(
        &kafka,
        &format!("{}-plain", scratch.name),
        topics,
        partitions,
    )?;
    let cpu0 = CpuReading::now();
    let started = Instant::now();
    let mut read = 0;
    while read < produced {
        match tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await {
            Ok(Ok(_)) => read += 1,
            Ok(Err(e)) => tracing::warn!(error = %e, "plain consumer"),
            Err(_) => anyhow::bail!(
                "the plain consumer read {read} of {produced} events and then nothing for 60 s"
            ),
        }
    }
    Ok(BrokerRead {
        seconds: started.elapsed().as_secs_f64(),
        cpu: CpuReading::now().since(&cpu0),
    })
}

/// How often the drain prints its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(60);

/// What the drain measured.
struct Drain {
    events: usize,
    seconds: f64,
    with_join: f64,
    cpu: String,
    service_cpu: f64,
    database_cpu: f64,
    peak_rss_mib: Option<u64>,
    /// The `run` process's resident memory at its first committed batch.
    start_rss_mib: Option<u64>,
}

/// Runs `run`'s consumer (with its Redis follower) until every produced
/// message is committed and Redis has projected the whole log.
async fn drain(
    config: &IngestBenchConfig,
    scratch: &Scratch,
    kafka: &KafkaConfig,
    topics: &[String],
    store: &Store,
    produced: usize,
) -> anyhow::Result<Drain> {
    let mut run = scratch.run_config(kafka, topics, config.partitions, 10);
    run.input.batch_size = config.batch_size;
    let redis = scratch.projection().await?;
    let joined_at = Instant::now();
    let mut consumers = (0..config.instances)
        .map(|_| ServiceProcess::start(&run))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pids: Vec<String> = consumers.iter().map(ServiceProcess::pid).collect();
    // Resident memory of the largest instance.
    let rss = |field: &str| {
        pids.iter()
            .filter_map(|p| process_memory_mib(p, field))
            .max()
    };
    let mut start_rss_mib = None;
    // From the first committed batch on: events committed, log projected.
    let mut first: Option<(Instant, usize, CpuReading)> = None;
    // Progress each PROGRESS_EVERY: the rate since the last line shows
    // whether it holds as the tables grow.
    let mut last_progress: Option<(Instant, usize)> = None;
    let finished = loop {
        for consumer in &mut consumers {
            consumer.check_running()?;
        }
        let committed = committed(store, &scratch.name).await?;
        if committed > 0 && first.is_none() {
            start_rss_mib = rss("VmRSS:");
            first = Some((Instant::now(), committed, CpuReading::with_services(&pids)));
            last_progress = Some((Instant::now(), committed));
        }
        if let Some((at, then)) = last_progress {
            if at.elapsed() >= PROGRESS_EVERY {
                println!(
                    "bench-ingest: {committed} of {produced} committed; {:.0} events/s over the \
                     last {} s; RSS {} MiB",
                    (committed - then) as f64 / at.elapsed().as_secs_f64(),
                    at.elapsed().as_secs(),
                    rss("VmRSS:").map_or_else(|| "n/a".to_owned(), |m| m.to_string()),
                );
                last_progress = Some((Instant::now(), committed));
            }
        }
        if committed >= produced {
            let head = event_log::head(store.pool()).await?;
            if redis.position().await? >= head {
                break (Instant::now(), CpuReading::with_services(&pids));
            }
        }
        anyhow::ensure!(
            joined_at.elapsed() < Duration::from_secs(3_600),
            "the backlog was not drained within an hour ({committed} of {produced} committed)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let peak_rss_mib = rss("VmHWM:");
    for consumer in consumers {
        consumer.stop().await?;
    }
    let (t0, before, cpu0) = first.context("nothing was committed")?;
    let (t1, cpu1) = finished;
    Ok(Drain {
        events: produced - before,
        seconds: (t1 - t0).as_secs_f64(),
        with_join: (t1 - joined_at).as_secs_f64(),
        cpu: cpu1.since(&cpu0),
        service_cpu: cpu1.of(&cpu0, "service"),
        database_cpu: cpu1.of(&cpu0, "mariadb"),
        peak_rss_mib,
        start_rss_mib,
    })
}

/// Messages committed by the group (see [`offsets::committed_total`]).
async fn committed(store: &Store, group: &str) -> anyhow::Result<usize> {
    let total = offsets::committed_total(store.pool(), group).await?;
    Ok(usize::try_from(total).unwrap_or(usize::MAX))
}

/// What the ceiling measured.
struct Ceiling {
    seconds: f64,
    cpu: String,
    database_cpu: f64,
}

/// Inserts `events` small log rows and as many id rows into tables of
/// their own, 1,000 events a transaction, and times it.
async fn ceiling(store: &Store, events: usize) -> anyhow::Result<Ceiling> {
    let pool = store.pool();
    sqlx::query(
        "CREATE TABLE bench_ceiling_log (position BIGINT NOT NULL PRIMARY KEY, \
         order_id VARCHAR(64) NOT NULL, seq BIGINT NOT NULL, event_id VARCHAR(128) NOT NULL, \
         kind VARCHAR(32) NOT NULL, UNIQUE KEY (order_id, seq), UNIQUE KEY (event_id)) \
         ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    )
    .execute(pool)
    .await?;
    sqlx::query("CREATE TABLE bench_ceiling_ids LIKE order_lifecycle_ids")
        .execute(pool)
        .await?;
    let cpu0 = CpuReading::now();
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    let mut position = 0usize;
    while position < events {
        let n = CEILING_TRANSACTION.min(events - position);
        let rows: Vec<usize> = (position..position + n).collect();
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let mut log = QueryBuilder::<MySql>::new(
            "INSERT INTO bench_ceiling_log (position, order_id, seq, event_id, kind) ",
        );
        log.push_values(&rows, |mut row, i| {
            row.push_bind(*i as i64 + 1)
                .push_bind(format!("bench-order-{}", i / 8))
                .push_bind((i % 8) as i64 + 1)
                .push_bind(format!("bench-event-{i}"))
                .push_bind("stop_loss_added");
        });
        log.build().execute(&mut *tx).await?;
        let mut ids = QueryBuilder::<MySql>::new(
            "INSERT INTO bench_ceiling_ids (order_id, id_type, lifecycle_id, status, \
             created_at, updated_at, issued_seq, updated_seq) ",
        );
        ids.push_values(&rows, |mut row, i| {
            row.push_bind(format!("bench-order-{}", i / 8))
                .push_bind("stoploss_id")
                .push_bind(format!("bench-id-{i}"))
                .push_bind("active")
                .push_bind("2026-11-28 00:00:00")
                .push_bind("2026-11-28 00:00:00")
                .push_bind((i % 8) as i64 + 1)
                .push_bind((i % 8) as i64 + 1);
        });
        ids.build().execute(&mut *tx).await?;
        tx.commit().await?;
        position += n;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu1 = CpuReading::now();
    Ok(Ceiling {
        seconds,
        cpu: cpu1.since(&cpu0),
        database_cpu: cpu1.of(&cpu0, "mariadb"),
    })
}

/// `order-lifecycle run`, this same binary, as a process of its own: its
/// CPU and memory are then the service's alone, not what producing the
/// backlog left in the bench's process. The URLs go in its environment,
/// not on its command line, which any user of the machine can read.
struct ServiceProcess(std::process::Child);

impl ServiceProcess {
    /// Starts `run` with `config` as flags.
    fn start(config: &RunConfig) -> anyhow::Result<ServiceProcess> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut command = std::process::Command::new(exe);
        command
            .arg("run")
            .args(["--brokers", &config.kafka.brokers])
            .env("OL_DATABASE_URL", config.database.url.expose())
            .args([
                "--database-max-connections",
                &config.database.max_connections.to_string(),
            ])
            .env("OL_REDIS_URL", config.redis.url.expose())
            .args(["--redis-key-prefix", &config.redis.key_prefix])
            .args(["--http-listen", "off"])
            .args(["--topics", &config.input.topics.join(",")])
            .args(["--batch-size", &config.input.batch_size.to_string()])
            .args(["--group-id", &config.group_id])
            .args(["--dead-letter-topic", &config.dead_letter_topic])
            .args(["--batch-linger", &ms(config.batch_linger)])
            .args(["--session-timeout", &ms(config.session_timeout)])
            .args(["--shutdown-timeout", &ms(config.shutdown_timeout)])
            .args(["--max-partition-idle", &ms(config.max_partition_idle)])
            .args(["--topic-partitions", &config.topic_partitions.to_string()]);
        for o in &config.kafka.options {
            command.args(["--kafka-option", &format!("{}={}", o.key, o.value)]);
        }
        let child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting order-lifecycle run")?;
        Ok(ServiceProcess(child))
    }

    fn pid(&self) -> String {
        self.0.id().to_string()
    }

    /// An error if it has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        match self.0.try_wait()? {
            Some(status) => anyhow::bail!("the consumer stopped early: {status}"),
            None => Ok(()),
        }
    }

    /// Stops it (SIGTERM, as an operator would; SIGKILL after 30 s).
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid()])
            .status();
        for _ in 0..300 {
            if self.0.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.0.kill()?;
        self.0.wait()?;
        Ok(())
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // A bench that fails leaves no consumer behind.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
