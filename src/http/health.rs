//! `/healthz`: the process answers. `/readyz`: it can do its job: the
//! database and Redis answer within a second, and (in `run`) a Kafka broker
//! is reachable and the consumer has its partition assignment. A 503 names
//! the failing part.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use super::ApiState;
use crate::store::redis_projection::RedisProjection;

/// How long each dependency may take to answer a readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: &'static str,
    /// Each part: `ok`, or what is wrong with it.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<&'static str, String>,
}

/// `GET /healthz`.
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        checks: BTreeMap::new(),
    })
}

/// `GET /readyz`.
pub async fn readyz(State(state): State<ApiState>) -> (StatusCode, Json<Health>) {
    let mut checks = BTreeMap::new();
    checks.insert("database", database(&state).await);
    checks.insert("redis", redis(&state).await);
    if let Some(consumer) = &state.consumer {
        checks.extend(consumer());
    }
    let ready = checks.values().all(|v| v == "ok");
    let failing: Vec<&str> = checks
        .iter()
        .filter(|(_, v)| *v != "ok")
        .map(|(k, _)| *k)
        .collect();
    if !ready {
        // Polled every few seconds by orchestrators: what is wrong is
        // logged where it happens, once; this is detail.
        tracing::debug!(failing = ?failing, "not ready");
    }
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(Health {
            status: if ready { "ok" } else { "unavailable" },
            checks,
        }),
    )
}

async fn database(state: &ApiState) -> String {
    let Some(store) = state.store.get() else {
        return "not connected yet".to_owned();
    };
    let ping = store.ping();
    match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
        Ok(Ok(_)) => "ok".to_owned(),
        Ok(Err(_)) => "unreachable".to_owned(),
        Err(_) => "no answer within 1s".to_owned(),
    }
}

async fn redis(state: &ApiState) -> String {
    let probe = async {
        let mut slot = state.redis_probe.lock().await;
        let redis = match slot.as_ref() {
            Some(redis) => redis.clone(),
            None => {
                let redis = RedisProjection::connect_to(&state.redis).await?;
                *slot = Some(redis.clone());
                redis
            }
        };
        let answer = redis.ping().await;
        if answer.is_err() && redis.is_cluster() {
            // Connect anew next time: a cluster client learns of a failover
            // from a MOVED reply, which a dead master never sends.
            *slot = None;
        }
        answer
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(_)) => "ok".to_owned(),
        Ok(Err(_)) => "unreachable".to_owned(),
        Err(_) => "no answer within 1s".to_owned(),
    }
}
