//! The HTTP adapter: the read API for downstream services (`/v1`, see
//! [`api`]), health for orchestrators ([`health`]), and Prometheus metrics.
//! Served by `run` beside the consumer, and alone by `serve` (read
//! replicas).
//!
//! Every request gets a `tracing` span (method, route, status, latency) and
//! is counted in `order_lifecycle_http_requests_total{route,method,status}`
//! and `order_lifecycle_http_request_duration_seconds{route}`. Errors are
//! JSON `{"error": {"code", "message"}}` and never describe database
//! internals (those go to the log).

pub mod api;
pub mod health;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tracing::Instrument;

use crate::config::{HttpConfig, RedisConfig, Secret};
use crate::shutdown::Shutdown;
use crate::store::redis_projection::RedisProjection;
use crate::store::Store;

/// Largest request body accepted (a batch of ids fits many times over).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Every route, as `(method, path)` in the router's syntax. The OpenAPI
/// description (`openapi.json`) must list exactly these; a test checks it.
pub const ROUTES: [(&str, &str); 7] = [
    ("get", "/v1/ids/{lifecycle_id}"),
    ("post", "/v1/ids/resolve"),
    ("get", "/v1/orders/{order_id}/ids"),
    ("get", "/v1/orders/{order_id}/events"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
];

/// Checks of the process's own work for `/readyz`: each part named with
/// `ok` or what is wrong (`run` passes `kafka`, e.g. "no broker reachable
/// at ...", and `consumer`, e.g. "waiting for its partition assignment").
/// A closure, so that the server knows nothing of Kafka.
pub type ReadinessCheck = Arc<dyn Fn() -> Vec<(&'static str, String)> + Send + Sync>;

/// What handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// Set once the database is reachable and migrated; until then the API
    /// answers 503.
    pub store: Arc<OnceLock<Store>>,
    pub redis: RedisConfig,
    /// Whether this process's consumer is ready, when it runs one (`run`).
    pub consumer: Option<ReadinessCheck>,
    /// The Prometheus recorder's handle, when one is installed.
    pub metrics: Option<PrometheusHandle>,
    pub api_token: Option<Secret>,
    pub max_batch_ids: usize,
    /// The readiness probe's Redis connection, made by the first probe that
    /// reaches Redis and kept (it reconnects by itself; a cluster's is made
    /// anew after a failed probe): a probe every few seconds must not open a
    /// connection each time.
    pub redis_probe: Arc<tokio::sync::Mutex<Option<RedisProjection>>>,
    /// `/v1` requests being served take one (`--http-max-concurrent`).
    pub permits: Arc<tokio::sync::Semaphore>,
    /// `--http-request-timeout`.
    pub request_timeout: Duration,
}

impl ApiState {
    /// State for `config`, with the store still to come.
    pub fn new(
        config: &HttpConfig,
        redis: RedisConfig,
        consumer: Option<ReadinessCheck>,
    ) -> ApiState {
        ApiState {
            store: Arc::new(OnceLock::new()),
            redis,
            consumer,
            metrics: METRICS.get().cloned(),
            api_token: config.token(),
            max_batch_ids: config.max_batch_ids,
            redis_probe: Arc::new(tokio::sync::Mutex::new(None)),
            permits: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent as usize)),
            request_timeout: config.request_timeout,
        }
    }

    fn store(&self) -> Result<&Store, ApiError> {
        self.store.get().ok_or(ApiError::Starting)
    }
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder for this process (once; later calls
/// return the same handle). Only binaries call this: tests running many
/// consumers in one process would mix their counts.
pub fn install_metrics() -> Option<PrometheusHandle> {
    if let Some(handle) = METRICS.get() {
        return Some(handle.clone());
    }
    let seconds = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let sizes = [
        1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0,
    ];
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &seconds,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("order_lifecycle_batch_messages".into()),
                &sizes,
            )
        });
    match builder.and_then(|b| b.install_recorder()) {
        Ok(handle) => Some(METRICS.get_or_init(|| handle).clone()),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    }
}

/// The router: `/v1` behind the optional bearer token, health and metrics
/// open, every request traced and counted.
pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/ids/{lifecycle_id}", get(api::resolve))
        .route("/v1/ids/resolve", post(api::resolve_batch))
        .route("/v1/orders/{order_id}/ids", get(api::order_ids))
        .route("/v1/orders/{order_id}/events", get(api::order_events))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            limit_concurrency,
        ));
    Router::new()
        .merge(v1)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(prometheus))
        .fallback(no_such_route)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), deadline))
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

/// Serves `state` on `listener` (bound by the caller at start-up, so that
/// a taken port fails the start and a test can bind port 0) in a task,
/// until `shutdown`; then open connections finish their request in flight
/// and close.
///
/// Each connection is HTTP/1.1 with a header-read timeout of
/// `--http-request-timeout`: a client that opens connections and sends
/// headers slowly (slowloris) holds none of them for longer.
pub fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "http server listening");
        if !address.ip().is_loopback() && state.api_token.is_none() {
            tracing::warn!(
                %address,
                "the read API is reachable beyond this host without a token; set \
                 OL_API_TOKEN_FILE (or OL_API_TOKEN) unless a network policy guards it"
            );
        }
    }
    let header_timeout = state.request_timeout;
    let router = router(state);
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        let mut stopping = shutdown.clone();
        loop {
            let accepted = tokio::select! {
                _ = stopping.requested() => break,
                accepted = listener.accept() => accepted,
                // Reap finished connections as they end.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(router.clone());
            let mut stop = shutdown.clone();
            connections.spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "http connection ended");
                        }
                    }
                    _ = stop.requested() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
            });
        }
        drop(listener);
        while connections.join_next().await.is_some() {}
    })
}

/// Answers 503 `overloaded` at once when `--http-max-concurrent` `/v1`
/// requests are being served: a burst is shed, not queued behind reads
/// that already wait on the database.
async fn limit_concurrency(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Ok(_permit) = state.permits.clone().try_acquire_owned() else {
        return Err(ApiError::Overloaded);
    };
    Ok(next.run(request).await)
}

/// Answers 503 `timeout` when a request takes longer than
/// `--http-request-timeout` (its work is dropped).
async fn deadline(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    tokio::time::timeout(state.request_timeout, next.run(request))
        .await
        .map_err(|_| ApiError::TimedOut)
}

/// An API error: status, stable code, message for people.
#[derive(Debug)]
pub enum ApiError {
    BadRequest {
        code: &'static str,
        message: String,
    },
    NotFound {
        code: &'static str,
        message: String,
    },
    Unauthorized,
    /// The database is not reachable yet (start-up).
    Starting,
    /// The database failed; details are logged, not returned.
    Unavailable(String),
    /// `--http-max-concurrent` requests are being served.
    Overloaded,
    /// The request took longer than `--http-request-timeout`.
    TimedOut,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match &self {
            ApiError::BadRequest { code, message } => {
                (StatusCode::BAD_REQUEST, *code, message.as_str())
            }
            ApiError::NotFound { code, message } => {
                (StatusCode::NOT_FOUND, *code, message.as_str())
            }
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required",
            ),
            ApiError::Starting => (
                StatusCode::SERVICE_UNAVAILABLE,
                "starting",
                "the service is starting; retry shortly",
            ),
            ApiError::Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests are being served; retry shortly",
            ),
            ApiError::TimedOut => (
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "the request took too long and was given up; retry shortly",
            ),
            ApiError::Unavailable(detail) => {
                tracing::error!(error = %detail, "a read failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the lifecycle store is unavailable; retry shortly",
                )
            }
        };
        let mut response = (
            status,
            Json(ErrorBody {
                error: ErrorDetail { code, message },
            }),
        )
            .into_response();
        match self {
            ApiError::Unauthorized => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Overloaded => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        ApiError::Unavailable(e.to_string())
    }
}

/// Requires `Authorization: Bearer <token>` when a token is configured.
async fn authenticate(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.api_token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

/// Compares without stopping at the first difference, so that response
/// times do not reveal how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ x);
    }
    diff == 0
}

/// The method as a metric label: the standard ones by name, any other token
/// (a client may send any) as `other`, so that no request can add a label
/// value.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Traces and counts every request by route (the template, never the raw
/// path, so that ids do not explode the label set).
async fn observe(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(request.method());
    let span = tracing::info_span!("http", %method, %route, status = tracing::field::Empty);
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    span.record("status", status);
    span.in_scope(|| {
        // A 503 from /readyz is an answer, polled every few seconds by
        // orchestrators; what is wrong was logged where it happened.
        if status >= 500 && route != "/readyz" {
            tracing::warn!(ms = (seconds * 1000.0) as u64, "request failed");
        } else {
            tracing::debug!(ms = (seconds * 1000.0) as u64, "request served");
        }
    });
    metrics::counter!(
        "order_lifecycle_http_requests_total",
        "route" => route.clone(),
        "method" => method,
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!("order_lifecycle_http_request_duration_seconds", "route" => route)
        .record(seconds);
    response
}

/// The Prometheus text exposition.
async fn prometheus(State(state): State<ApiState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => ApiError::NotFound {
            code: "metrics_disabled",
            message: "no metrics recorder in this process".into(),
        }
        .into_response(),
    }
}

async fn no_such_route() -> ApiError {
    ApiError::NotFound {
        code: "no_such_route",
        message: "no such route; see openapi.json".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::{constant_time_eq, method_label};

    #[test]
    fn any_method_token_is_one_of_ten_labels() {
        use axum::http::Method;
        assert_eq!(method_label(&Method::GET), "GET");
        for token in ["FOO", "X-ANY-TOKEN-123", "get"] {
            let method = Method::from_bytes(token.as_bytes()).expect("a token");
            assert_eq!(method_label(&method), "other", "{token}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abcdefghijklmnop", b"abcdefghijklmnop"));
        assert!(!constant_time_eq(b"abcdefghijklmnoX", b"abcdefghijklmnop"));
        assert!(!constant_time_eq(b"abcdefghijklmno", b"abcdefghijklmnop"));
        assert!(!constant_time_eq(b"abcdefghijklmnopq", b"abcdefghijklmnop"));
        assert!(!constant_time_eq(b"", b"abcdefghijklmnop"));
    }
}
