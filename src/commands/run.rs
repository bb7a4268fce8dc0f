//! `run`: the consumer, with the read API beside it and the Redis follower
//! behind it. This file wires them: the HTTP server starts first (so that
//! `/healthz` answers while the database is still coming), then the store,
//! then the campaign for the leader lease, the follower and the consumer; on
//! shutdown the consumer finishes its batch and leaves the group, the
//! follower (on the leader) projects what was committed, the lease is given
//! back, and the server stops, each within `--shutdown-timeout`. Of many
//! instances sharing a database, only the leader follows the log into Redis
//! and does the housekeeping (see [`crate::store::leadership`]).

use std::sync::Arc;

use anyhow::Context;

use crate::config::RunConfig;
use crate::http::{self, ApiState, ReadinessCheck};
use crate::ingest::{self, assignment::ConsumerStatus};
use crate::projection::redis_follower::{self, Handoff};
use crate::retry::Backoff;
use crate::shutdown::Shutdown;
use crate::store::leadership::Leadership;
use crate::store::redis_projection::RedisProjection;
use crate::store::{Store, StoreError};

/// Runs the ingesting consumer until `shutdown`.
///
/// # Errors
/// Start-up failures (bad configuration, unreachable database, migrations)
/// and fatal storage errors. Transient failures are retried with backoff.
pub async fn run(config: RunConfig, mut shutdown: Shutdown) -> anyhow::Result<()> {
    config.validate()?;
    tracing::info!(
        brokers = %config.kafka.brokers,
        topics = ?config.input.topics,
        group = %config.group_id,
        database = %config.database.url,
        redis = %config.redis.describe(),
        "starting order-lifecycle consumer"
    );
    let status = Arc::new(ConsumerStatus::for_brokers(&config.kafka.brokers));
    let readiness: ReadinessCheck = {
        let status = status.clone();
        Arc::new(move || {
            let kafka = status.kafka_trouble().unwrap_or_else(|| "ok".to_owned());
            let stalled = status.stalled();
            let consumer = if status.assigned().is_none() {
                "waiting for its partition assignment".to_owned()
            } else if !stalled.is_empty() {
                format!(
                    "partitions not advancing although the broker has messages for them: {}",
                    stalled.join(", ")
                )
            } else {
                "ok".to_owned()
            };
            vec![("kafka", kafka), ("consumer", consumer)]
        })
    };
    let api = ApiState::new(&config.http, config.redis.clone(), Some(readiness));
    let server = match config.http.listen.0 {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding the HTTP server to {listen}"))?;
            Some(http::serve(listener, api.clone(), shutdown.clone()))
        }
        None => None,
    };
    let Some(store) = connect(&config, &mut shutdown).await? else {
        return Ok(());
    };
    // Redis refusing this service (TLS, password) stops the start with the
    // reason; Redis merely unreachable is waited for by the follower.
    if let Err(e) = RedisProjection::connect_to(&config.redis).await {
        if RedisProjection::is_refusal(&e) {
            return Err(e).context("connecting to Redis");
        }
        tracing::warn!(redis = %config.redis.describe(), error = %e, "Redis unreachable; the follower retries");
    }
    if server.is_some() {
        // The read API's own connections: slow or many reads never take
        // the consumer's.
        let reads = Store::connect(&config.database.url, config.http.database_connections)
            .await
            .context("connecting the read API to the database")?;
        let _ = api.store.set(reads);
    }

    // The follower stops after the consumer, so that it projects the last
    // batches: it has a signal of its own.
    // The leader lease is given back after the follower's last round.
    let (stop_campaign, campaign_shutdown) = Shutdown::new();
    let (leadership, campaign) = Leadership::campaign(store.clone(), campaign_shutdown);
    let (stop_follower, follower_shutdown) = Shutdown::new();
    let handoff = Arc::new(Handoff::new());
    let follower = tokio::spawn(redis_follower::run(
        store.clone(),
        config.redis.clone(),
        handoff.clone(),
        leadership.clone(),
        follower_shutdown,
    ));
    let result = ingest::consume(&config, &store, status, &handoff, &leadership, shutdown).await;

    handoff.wake();
    stop_follower.trigger();
    if tokio::time::timeout(config.shutdown_timeout, follower)
        .await
        .is_err()
    {
        tracing::warn!("redis follower did not stop in time; it resumes from its checkpoint");
    }
    stop_campaign.trigger();
    if tokio::time::timeout(config.shutdown_timeout, campaign)
        .await
        .is_err()
    {
        tracing::warn!("the leader lease was not given back in time; it ends with its session");
    }
    if let Some(server) = server {
        if result.is_err() {
            // No shutdown came: the consumer failed and the process ends.
            server.abort();
        } else if tokio::time::timeout(config.shutdown_timeout, server)
            .await
            .is_err()
        {
            tracing::warn!("http server did not stop in time");
        }
    }
    match &result {
        Ok(()) => tracing::info!("order-lifecycle consumer stopped"),
        Err(e) => tracing::error!(error = format!("{e:#}"), "order-lifecycle consumer failed"),
    }
    result
}

/// Failed connection attempts (about 6 s of backoff) before the log says
/// ERROR rather than WARN.
const FAILURES_BEFORE_ERROR: u32 = 5;

/// Connects to the database and applies migrations, retrying while it is
/// unreachable (a consumer started before its database must not
/// crash-loop). `None` when shutdown came first.
async fn connect(config: &RunConfig, shutdown: &mut Shutdown) -> anyhow::Result<Option<Store>> {
    let mut backoff = Backoff::new();
    let mut failures = 0u32;
    loop {
        if shutdown.is_requested() {
            return Ok(None);
        }
        let attempt = async {
            let store =
                Store::connect(&config.database.url, config.database.max_connections).await?;
            store.migrate().await?;
            Ok::<_, StoreError>(store)
        };
        // Migrating may wait for another process's migration: a shutdown
        // ends that wait.
        let attempt = tokio::select! {
            result = attempt => result,
            _ = shutdown.requested() => return Ok(None),
        };
        match attempt {
            Ok(store) => return Ok(Some(store)),
            Err(e) if e.is_transient() => {
                failures += 1;
                // A few failures are a database starting beside us; more
                // are a mistake to fix, said once as an ERROR with a hint.
                if failures == FAILURES_BEFORE_ERROR {
                    tracing::error!(
                        database = %config.database.url,
                        error = %e,
                        "the database does not answer; is it running, and is --database-url \
                         (OL_DATABASE_URL: host, port, user, password) right? Retrying"
                    );
                } else {
                    tracing::warn!(database = %config.database.url, error = %e, "database unreachable; retrying");
                }
                backoff.wait(shutdown).await;
            }
            Err(e) => return Err(e).context("connecting to the database and applying migrations"),
        }
    }
}
