//! Typed configuration: defaults, then environment variables, then flags
//! (clap does the layering), checked before anything connects.
//!
//! Every setting has a flag and an `OL_*` environment variable; the README
//! has the table. Secrets (database and Redis URLs with passwords) live in
//! [`SecretUrl`], which never prints the password.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

/// A connection URL that may carry a password. `Display` and `Debug` mask
/// the password, so it cannot reach a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The URL with its password, for the client library only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

/// Masks the password of `scheme://user:password@host/...`. The userinfo
/// ends at the last `@`, so a password holding `/`, `?`, `#` or `@` (not
/// escaped, as people write them) is masked whole; a URL with an `@` in its
/// query may then be masked more than needed, never less.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({})", self.redacted())
    }
}

impl FromStr for SecretUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<SecretUrl, String> {
        if s.contains("://") {
            Ok(SecretUrl::new(s))
        } else {
            Err("expected a URL like scheme://user:password@host:port/path".into())
        }
    }
}

/// A MySQL/MariaDB URL: `mysql://` or `mariadb://`. Anything else (a
/// `postgres://` URL pasted from another service) is refused at parse time
/// rather than at the first connection.
///
/// # Errors
/// Not a URL, or another scheme.
pub fn parse_database_url(raw: &str) -> Result<SecretUrl, String> {
    with_scheme(
        raw,
        &["mysql", "mariadb"],
        "mysql://user:password@host:3306/database",
    )
}

/// A Redis URL: `redis://` (or `rediss://`, `redis+unix://`, `unix://`).
///
/// # Errors
/// Not a URL, or another scheme.
pub fn parse_redis_url(raw: &str) -> Result<SecretUrl, String> {
    with_scheme(
        raw,
        &["redis", "rediss", "redis+unix", "unix"],
        "redis://:password@host:6379/0",
    )
}

/// Parses one Redis Cluster seed node: `redis://` or `rediss://`, no
/// database other than 0 (a cluster has only that one).
///
/// # Errors
/// A message naming the problem (the URL's secret never in it).
pub fn parse_redis_cluster_node(raw: &str) -> Result<SecretUrl, String> {
    let url = with_scheme(raw, &["redis", "rediss"], "redis://host:7000")?;
    let path = url
        .expose()
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, db)| db);
    match path {
        None | Some("") | Some("0") => Ok(url),
        Some(_) => Err(format!(
            "{}: a Redis Cluster has only database 0",
            url.redacted()
        )),
    }
}

fn with_scheme(raw: &str, schemes: &[&str], example: &str) -> Result<SecretUrl, String> {
    let url: SecretUrl = raw.parse()?;
    let scheme = url.expose().split("://").next().unwrap_or_default();
    if schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
        Ok(url)
    } else {
        Err(format!(
            "the scheme {scheme:?} is not one of {}: expected a URL like {example}",
            schemes.join(", ")
        ))
    }
}

/// Parses `250ms`, `5s`, `2m` or `1h` (and a bare `0`). Any other bare
/// number is refused: `10` for a session timeout meant as seconds would
/// silently be 10 ms.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 250ms, 5s, 2m or 1h"))?;
    let seconds = |factor: u64| {
        n.checked_mul(factor)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{raw:?} is too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "" if n == 0 => Ok(Duration::ZERO),
        "" => Err(format!(
            "{raw:?} needs a unit: {raw}ms, {raw}s, {raw}m or {raw}h"
        )),
        _ => Err(format!("{raw:?} has an unknown unit; use ms, s, m or h")),
    }
}

/// Parses a point in time as milliseconds since the epoch: either a number
/// of milliseconds or an RFC 3339 UTC time like `2026-11-28T09:30:00Z`
/// (fractions of a second allowed).
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_timestamp_ms(raw: &str) -> Result<i64, String> {
    let raw = raw.trim();
    let bad = || format!("{raw:?} is not a time like 2026-11-28T09:30:00Z or epoch milliseconds");
    if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        return raw.parse().map_err(|_| bad());
    }
    let body = raw
        .strip_suffix('Z')
        .or_else(|| raw.strip_suffix('z'))
        .ok_or_else(bad)?;
    let (date, time) = body.split_once(['T', 't', ' ']).ok_or_else(bad)?;
    let (time, fraction) = time.split_once('.').unwrap_or((time, ""));
    let numbers = |s: &str, n: usize| -> Option<Vec<i64>> {
        let parts: Vec<i64> = s
            .split(['-', ':'])
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        (parts.len() == n).then_some(parts)
    };
    let d = numbers(date, 3).ok_or_else(bad)?;
    let t = numbers(time, 3).ok_or_else(bad)?;
    let (y, m, day) = (d[0], d[1], d[2]);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || t[0] > 23 || t[1] > 59 || t[2] > 60 {
        return Err(bad());
    }
    let millis = if fraction.is_empty() {
        0
    } else if fraction.bytes().all(|b| b.is_ascii_digit()) {
        format!("{fraction:0<3}")[..3]
            .parse::<i64>()
            .map_err(|_| bad())?
    } else {
        return Err(bad());
    };
    let days = crate::calendar::days_from_civil(y, m, day);
    Ok(((days * 24 + t[0]) * 60 + t[1]) * 60_000 + t[2] * 1000 + millis)
}

/// One `key=value` librdkafka setting passed through unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaOption {
    pub key: String,
    pub value: String,
}

impl FromStr for KafkaOption {
    type Err = String;
    fn from_str(s: &str) -> Result<KafkaOption, String> {
        match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok(KafkaOption {
                key: k.trim().to_owned(),
                value: v.trim().to_owned(),
            }),
            // The value is not quoted: options carry credentials.
            _ => Err("expected key=value (a librdkafka setting)".into()),
        }
    }
}

/// Where Kafka is and how to talk to it.
#[derive(Debug, Clone, Args)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma-separated host:port.
    #[arg(
        long = "brokers",
        env = "OL_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Extra librdkafka settings (`key=value`), e.g. `security.protocol=SASL_SSL`;
    /// repeat the flag, or separate with commas in the variable. They override
    /// this service's defaults.
    // The values are hidden from `--help`: options carry credentials
    // (`sasl.password`).
    #[arg(
        id = "kafka_options",
        long = "kafka-option",
        env = "OL_KAFKA_OPTIONS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub options: Vec<KafkaOption>,
}

/// Where the MySQL/MariaDB database is.
#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// MySQL/MariaDB URL; the database is created if missing.
    #[arg(
        id = "database_url",
        long = "database-url",
        env = "OL_DATABASE_URL",
        hide_env_values = true,
        default_value = "mysql://root@127.0.0.1:3306/order_lifecycle",
        value_parser = parse_database_url
    )]
    pub url: SecretUrl,
    /// Connection pool size.
    #[arg(
        id = "database_max_connections",
        long = "database-max-connections",
        env = "OL_DATABASE_MAX_CONNECTIONS",
        default_value_t = 8
    )]
    pub max_connections: u32,
}

/// Where Redis is and which key names to use.
#[derive(Debug, Clone, Args)]
pub struct RedisConfig {
    /// Redis URL; `rediss://` for TLS (verified against the system's CAs,
    /// or `--redis-ca-file`).
    #[arg(
        id = "redis_url",
        long = "redis-url",
        env = "OL_REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379/0",
        value_parser = parse_redis_url
    )]
    pub url: SecretUrl,
    /// Redis Cluster: comma-separated seed nodes (`redis://host:port`, or
    /// `rediss://` for TLS; a password in the first one serves them all).
    /// Selects cluster mode in place of --redis-url; the key names stay the
    /// legacy ones.
    #[arg(
        id = "redis_cluster_nodes",
        long = "redis-cluster-nodes",
        env = "OL_REDIS_CLUSTER_NODES",
        hide_env_values = true,
        value_delimiter = ',',
        value_parser = parse_redis_cluster_node
    )]
    pub cluster_nodes: Vec<SecretUrl>,
    /// Prefix for every key written (empty: the legacy names exactly).
    #[arg(
        id = "redis_key_prefix",
        long = "redis-key-prefix",
        env = "OL_REDIS_KEY_PREFIX",
        default_value = ""
    )]
    pub key_prefix: String,
    #[command(flatten)]
    pub tls: RedisTls,
}

impl RedisConfig {
    /// Whether this is a Redis Cluster (`--redis-cluster-nodes`).
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }

    /// Where Redis is, for logs: the URL or the cluster's seed nodes, with
    /// their secrets hidden.
    pub fn describe(&self) -> String {
        if self.is_cluster() {
            let nodes: Vec<String> = self.cluster_nodes.iter().map(SecretUrl::redacted).collect();
            format!("cluster {}", nodes.join(","))
        } else {
            self.url.redacted()
        }
    }
}

/// Certificates for a `rediss://` connection: the CA that signed the
/// server's (instead of the system's), and a client certificate for
/// servers that ask for one (`tls-auth-clients`). PEM files; the key in
/// PKCS#8 (`BEGIN PRIVATE KEY`).
#[derive(Debug, Clone, Default, Args)]
pub struct RedisTls {
    /// CA certificate (PEM) that signed the Redis server's certificate.
    #[arg(long = "redis-ca-file", env = "OL_REDIS_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate (PEM), with --redis-client-key.
    #[arg(
        long = "redis-client-cert",
        env = "OL_REDIS_CLIENT_CERT",
        value_name = "FILE",
        requires = "key_file"
    )]
    pub cert_file: Option<std::path::PathBuf>,
    /// Client key (PEM, PKCS#8), with --redis-client-cert.
    #[arg(
        long = "redis-client-key",
        env = "OL_REDIS_CLIENT_KEY",
        value_name = "FILE",
        requires = "cert_file"
    )]
    pub key_file: Option<std::path::PathBuf>,
}

/// A secret that is not a URL (an API token): never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for comparison only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Secret, String> {
        if s.trim().len() < 16 {
            return Err("an API token must have at least 16 characters".into());
        }
        Ok(Secret(s.trim().to_owned()))
    }
}

/// Where the HTTP server listens: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<std::net::SocketAddr>);

impl FromStr for Listen {
    type Err = String;
    fn from_str(raw: &str) -> Result<Listen, String> {
        match raw.trim() {
            "off" | "" => Ok(Listen(None)),
            other => other
                .parse()
                .map(|a| Listen(Some(a)))
                .map_err(|_| format!("{other:?} is not host:port (e.g. 0.0.0.0:8080) or off")),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("off"),
        }
    }
}

/// The HTTP server: read API, health, metrics.
#[derive(Debug, Clone, Args)]
pub struct HttpConfig {
    /// Address of the HTTP server (read API, /healthz, /readyz, /metrics),
    /// or `off`.
    #[arg(
        long = "http-listen",
        env = "OL_HTTP_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: Listen,
    /// Bearer token required by the /v1 API (unset: no authentication).
    /// Health and metrics stay open for probes and scrapers.
    #[arg(long = "api-token", env = "OL_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<Secret>,
    /// File holding the bearer token (its first line), instead of
    /// `--api-token`: a flag or variable shows in `ps` and `/proc`, a file
    /// readable by the service only does not (a Kubernetes Secret mounted
    /// as a file).
    #[arg(
        long = "api-token-file",
        env = "OL_API_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "api_token",
        value_parser = read_token_file
    )]
    pub api_token_file: Option<Secret>,
    /// Most ids in one batch-resolve request.
    #[arg(
        long = "max-batch-ids",
        env = "OL_MAX_BATCH_IDS",
        default_value_t = 500
    )]
    pub max_batch_ids: usize,
    /// Most `/v1` requests served at once; beyond it a request is answered
    /// 503 `overloaded` at once (with `Retry-After`) instead of queueing.
    /// Health and metrics are not counted, so probes answer under load.
    #[arg(
        long = "http-max-concurrent",
        env = "OL_HTTP_MAX_CONCURRENT",
        default_value_t = 128,
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    pub max_concurrent: u32,
    /// Longest a request may take, from its headers read to its answer
    /// (e.g. `10s`); a slower one is answered 503 `timeout`. Headers must
    /// arrive within the same time, or the connection is closed.
    #[arg(
        long = "http-request-timeout",
        env = "OL_HTTP_REQUEST_TIMEOUT",
        default_value = "10s",
        value_parser = parse_positive_duration
    )]
    pub request_timeout: Duration,
    /// Database connections of the read API under `run`, apart from the
    /// consumer's, so that slow reads never take the consumer's
    /// connections.
    #[arg(
        long = "http-database-connections",
        env = "OL_HTTP_DATABASE_CONNECTIONS",
        default_value_t = 4,
        value_parser = clap::value_parser!(u32).range(1..=1_000)
    )]
    pub database_connections: u32,
}

/// The token in the first line of the file at `path`. Errors name the file,
/// never its content.
///
/// # Errors
/// The file cannot be read, or its first line is not a token.
pub fn read_token_file(path: &str) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token file {path}: {e}"))?;
    let first = text.lines().next().unwrap_or_default();
    first
        .parse()
        .map_err(|e| format!("the token file {path}: {e}"))
}

impl HttpConfig {
    /// The bearer token, from `--api-token` or `--api-token-file`.
    pub fn token(&self) -> Option<Secret> {
        self.api_token
            .clone()
            .or_else(|| self.api_token_file.clone())
    }

    /// No HTTP server (tests, tools).
    pub fn off() -> HttpConfig {
        HttpConfig {
            listen: Listen(None),
            api_token: None,
            api_token_file: None,
            max_batch_ids: 500,
            max_concurrent: 128,
            request_timeout: Duration::from_secs(10),
            database_connections: 4,
        }
    }
}

/// What is consumed and how: the topics, the batch size, how long an event
/// may wait for its id. Shared by `run` and `replay`, which read the same
/// topics the same way.
#[derive(Debug, Clone, Args)]
pub struct InputConfig {
    /// Topics to consume, comma-separated. Any event kind may arrive on any of
    /// them; their messages are applied in production order (rule R11). Order
    /// events on several topics must be co-partitioned (same partition count,
    /// keyed by order id): if the counts differ, an ERROR naming the topics is
    /// logged at start-up and on every assignment, and consumption goes on
    /// (one instance still orders correctly; several may not).
    #[arg(
        long = "topics",
        env = "OL_TOPICS",
        value_delimiter = ',',
        default_value = "order-events,provider-confirmations"
    )]
    pub topics: Vec<String>,
    /// Most messages per batch (one database transaction), 1 to 10,000.
    #[arg(long = "batch-size", env = "OL_BATCH_SIZE", default_value_t = 500, value_parser = parse_batch_size)]
    pub batch_size: usize,
    /// How events wait for ids not issued yet.
    #[command(flatten)]
    pub parking: ParkingConfig,
    /// Which schema registry ids are accepted.
    #[command(flatten)]
    pub schemas: SchemaConfig,
}

/// Which schema registry ids are accepted (shared by `run`, `replay` and
/// `redrive`).
#[derive(Debug, Clone, Default, Args)]
pub struct SchemaConfig {
    /// Schema registry ids accepted in framed messages, comma-separated; a
    /// framed message with another id is dead-lettered as
    /// `unknown_schema_id`. Empty (the default): any id. Plain messages
    /// (no frame) are accepted either way.
    #[arg(long = "schema-ids", env = "OL_SCHEMA_IDS", value_delimiter = ',')]
    pub schema_ids: Vec<u32>,
}

/// `--max-parked`'s default: a million waiting events, about a gigabyte of
/// parked rows at the contract's typical message size.
pub const DEFAULT_MAX_PARKED: u64 = 1_000_000;

/// How events wait for an id not issued yet (rule R7): shared by `run`,
/// `replay`, `redrive` and `import-legacy` (for the events it releases),
/// which park the same way.
#[derive(Debug, Clone, Args)]
pub struct ParkingConfig {
    /// How long an event waits for an id not issued yet (a confirmation that
    /// overtook its request) before it is dead-lettered as
    /// `unknown_lifecycle_id`; counted in stream time (Kafka timestamps of
    /// the consumed partitions), so a backlog parks as it would have live.
    #[arg(long = "park-timeout", env = "OL_PARK_TIMEOUT", default_value = "5m", value_parser = parse_positive_duration)]
    pub park_timeout: Duration,
    /// Most events waiting for their id at once, all ids together (and at
    /// most 1,000 for one id); more are dead-lettered as `parking_full`, so
    /// a flood of confirmations for ids that never come cannot fill the
    /// database.
    #[arg(long = "max-parked", env = "OL_MAX_PARKED", default_value_t = DEFAULT_MAX_PARKED)]
    pub max_parked: u64,
}

impl Default for ParkingConfig {
    fn default() -> ParkingConfig {
        ParkingConfig {
            park_timeout: Duration::from_secs(300),
            max_parked: DEFAULT_MAX_PARKED,
        }
    }
}

/// Most messages (or legacy rows) in one transaction.
pub const MAX_BATCH_SIZE: usize = 10_000;

/// A batch size: 1 to [`MAX_BATCH_SIZE`].
///
/// # Errors
/// Not a whole number in range.
pub fn parse_batch_size(raw: &str) -> Result<usize, String> {
    match raw.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_BATCH_SIZE).contains(&n) => Ok(n),
        _ => Err(format!(
            "{raw:?} is not a whole number from 1 to {MAX_BATCH_SIZE}"
        )),
    }
}

/// A duration longer than zero (see [`parse_duration`]).
///
/// # Errors
/// Not a duration, or zero.
pub fn parse_positive_duration(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if d.is_zero() => Err(format!("{raw:?} must be longer than zero")),
        d => Ok(d),
    }
}

/// Everything `run` needs.
#[derive(Debug, Clone, Args)]
pub struct RunConfig {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub http: HttpConfig,
    #[command(flatten)]
    pub input: InputConfig,
    /// Consumer group.
    #[arg(
        long = "group-id",
        env = "OL_GROUP_ID",
        default_value = "order-lifecycle"
    )]
    pub group_id: String,
    /// Static group membership (Kafka's `group.instance.id`): a name of this
    /// instance, stable across its restarts and unique in the group (e.g.
    /// the pod's name). An instance that comes back within
    /// `--session-timeout` gets its partitions back without a rebalance; an
    /// instance stopped for longer loses them when the timeout passes.
    /// Unset: dynamic membership, every start and stop rebalances.
    #[arg(long = "group-instance-id", env = "OL_GROUP_INSTANCE_ID")]
    pub group_instance_id: Option<String>,
    /// Topic for rejected messages (rule R10).
    #[arg(
        long = "dead-letter-topic",
        env = "OL_DEAD_LETTER_TOPIC",
        default_value = "order-lifecycle-dead-letters"
    )]
    pub dead_letter_topic: String,
    /// How long to wait for a batch to fill once its first message arrived.
    #[arg(long = "batch-linger", env = "OL_BATCH_LINGER", default_value = "50ms", value_parser = parse_duration)]
    pub batch_linger: Duration,
    /// Kafka consumer session timeout; a dead instance's partitions move after it.
    #[arg(long = "session-timeout", env = "OL_SESSION_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub session_timeout: Duration,
    /// Longest a graceful shutdown may take to finish its batch.
    #[arg(long = "shutdown-timeout", env = "OL_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Longest wait for a partition that is behind (empty, not at its end)
    /// before messages of other partitions go ahead of it (rule R11). A
    /// partition caught up to its end is never waited for.
    #[arg(long = "max-partition-idle", env = "OL_MAX_PARTITION_IDLE", default_value = "100ms", value_parser = parse_duration)]
    pub max_partition_idle: Duration,
    /// Create the consumed and dead-letter topics when missing (development;
    /// production topics are usually managed elsewhere).
    #[arg(long = "create-topics", env = "OL_CREATE_TOPICS")]
    pub create_topics: bool,
    /// Partitions for topics created by `--create-topics`.
    #[arg(
        long = "topic-partitions",
        env = "OL_TOPIC_PARTITIONS",
        default_value_t = 4
    )]
    pub topic_partitions: i32,
    /// Orders kept in memory between batches, as last committed, so that a
    /// batch reads from `order_lifecycle_ids` only the orders not kept
    /// (about a kilobyte each); 0 reads every order every time.
    #[arg(
        long = "order-cache",
        env = "OL_ORDER_CACHE",
        default_value_t = DEFAULT_ORDER_CACHE
    )]
    pub order_cache: usize,
}

/// `--order-cache`'s default: the orders of the last twenty to forty
/// batches of 500 (the cache holds between half and all of it).
pub const DEFAULT_ORDER_CACHE: usize = 20_000;

/// The legacy order tables: `import-legacy` reads them, `verify` checks
/// orphans against them.
#[derive(Debug, Clone, Args)]
pub struct LegacyTables {
    /// The live orders table.
    #[arg(
        long = "live-table",
        env = "OL_LEGACY_LIVE_TABLE",
        default_value = "live_user_orders"
    )]
    pub live: String,
    /// The demo orders table.
    #[arg(
        long = "demo-table",
        env = "OL_LEGACY_DEMO_TABLE",
        default_value = "demo_user_orders"
    )]
    pub demo: String,
}

impl LegacyTables {
    /// Both names, live first, checked to be plain identifiers (a table name
    /// cannot be a bound parameter, so nothing else may reach the SQL).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the table.
    pub fn names(&self) -> Result<[&str; 2], ConfigError> {
        for table in [&self.live, &self.demo] {
            if table.is_empty()
                || table.len() > 64
                || !table
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(ConfigError::Invalid(format!(
                    "table name {table:?}: use 1 to 64 letters, digits or underscores"
                )));
            }
        }
        Ok([&self.live, &self.demo])
    }
}

/// A setting that cannot work, found before anything connects.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
}

impl RunConfig {
    /// Cross-field checks.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.input.topics.iter().all(|t| t.trim().is_empty()) {
            return bad("--topics names no topic");
        }
        if self
            .input
            .topics
            .iter()
            .any(|t| t == &self.dead_letter_topic)
        {
            return bad("--dead-letter-topic must not be one of --topics");
        }
        if self.shutdown_timeout >= self.session_timeout {
            return bad("--shutdown-timeout must be shorter than --session-timeout, or a stopping instance would lose its partitions mid-batch");
        }
        if self.max_partition_idle >= self.session_timeout {
            return bad("--max-partition-idle must be shorter than --session-timeout");
        }
        if self.group_id.trim().is_empty() {
            return bad("--group-id is empty");
        }
        if let Some(id) = &self.group_instance_id {
            if id.is_empty()
                || id.len() > 249
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return bad(
                    "--group-instance-id must be 1 to 249 characters of letters, digits, '.', '_' \
                     and '-' (a pod's name, say)",
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_and_redis_urls_need_their_scheme() {
        assert!(parse_database_url("mysql://root@h:3306/db").is_ok());
        assert!(parse_database_url("mariadb://root@h/db").is_ok());
        let pg = parse_database_url("postgres://u:secret@h:5432/db").unwrap_err();
        assert!(
            pg.contains("\"postgres\" is not one of mysql, mariadb"),
            "{pg}"
        );
        assert!(!pg.contains("secret"), "{pg}");
        assert!(parse_redis_url("redis://h:6379/0").is_ok());
        assert!(parse_redis_url("rediss://h:6380/0").is_ok());
        assert!(parse_redis_url("http://h:6379").is_err());
        assert!(parse_redis_cluster_node("redis://h:7000").is_ok());
        assert!(parse_redis_cluster_node("rediss://:pw@h:7000/0").is_ok());
        let db = parse_redis_cluster_node("redis://:secret@h:7000/2").unwrap_err();
        assert!(
            db.contains("only database 0") && !db.contains("secret"),
            "{db}"
        );
        assert!(parse_redis_cluster_node("unix:///tmp/redis.sock").is_err());
    }

    #[test]
    fn passwords_never_print() {
        let url = SecretUrl::new("mysql://app:s3cret@db:3306/ol?ssl-mode=required");
        assert_eq!(
            url.to_string(),
            "mysql://app:***@db:3306/ol?ssl-mode=required"
        );
        assert!(!format!("{url:?}").contains("s3cret"));
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
        for (url, shown) in [
            ("mysql://app:p#ss@db/ol", "mysql://app:***@db/ol"),
            ("mysql://app:pa/ss@db/ol", "mysql://app:***@db/ol"),
            ("mysql://app:pa?ss@db/ol", "mysql://app:***@db/ol"),
            ("mysql://app:p@ss@db/ol", "mysql://app:***@db/ol"),
            ("redis://:x#y/z?w@h:6379/0", "redis://:***@h:6379/0"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        assert_eq!(
            redact_url("mysql://db/ol?note=a@b"),
            "mysql://db/ol?note=a@b"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        let bare = parse_duration("10").unwrap_err();
        assert!(bare.contains("needs a unit: 10ms, 10s"), "{bare}");
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp_ms("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_timestamp_ms("2026-11-28T09:30:00Z"),
            Ok(1_795_858_200_000)
        );
        assert_eq!(
            parse_timestamp_ms("2000-02-29T23:59:59.5Z"),
            Ok(951_868_799_500)
        );
        assert_eq!(parse_timestamp_ms("1795858200000"), Ok(1_795_858_200_000));
        assert!(parse_timestamp_ms("2026-11-28T09:30:00+02:00").is_err());
        assert!(parse_timestamp_ms("2026-13-01T00:00:00Z").is_err());
        assert!(parse_timestamp_ms("yesterday").is_err());
    }
}
