//! The Redis read model the platform already reads:
//!
//! - `global_order_lookup:{lifecycle_id}` (string) -> `order_id`, for every id
//!   ever issued; the Python dispatcher resolves provider confirmations with it.
//! - `order_lifecycle_active:{order_id}` (hash) -> `id_type` -> the active
//!   `lifecycle_id` of that type; absent when the order has no active id.
//!
//! - `order_lifecycle:projection` (hash): where the keys stand in the log,
//!   written in the same MULTI/EXEC as the keys: `log_id` (the identity of
//!   the log followed), `position` (the last log position reflected) and
//!   `event_id` (that entry's event id). The projection's checkpoint lives
//!   with its data: a flushed or replaced Redis has no (or an older)
//!   position, and the follower re-projects from there; a Redis that
//!   followed another log, or another history of this one, is re-projected
//!   from the start (rule R12).
//!
//! Every key is prefixed with the configured key prefix (empty in
//! production, so the names are exactly the legacy ones).
//!
//! On a Redis Cluster the keys are the same; the record and the atomicity
//! are kept per hash slot instead (see [`super::redis_cluster`]).

use redis::aio::{ConnectionManager, MultiplexedConnection};

use super::redis_cluster::Cluster;
use crate::config::{RedisConfig, RedisTls};
use crate::domain::{IdType, LifecycleId, OrderId};

/// A Redis failure; always transient for the caller (retry later), since the
/// projection can be rebuilt from the log at any time.
pub type RedisError = redis::RedisError;

/// Writes the Redis keys.
#[derive(Clone)]
pub struct RedisProjection {
    backend: Backend,
    prefix: String,
}

/// How long connecting to a server may take, on one server or a cluster.
pub(super) const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a reply may take.
pub(super) const RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The connection a WATCH lives on, from the WATCH to its EXEC: not the
/// reconnecting one, on which a reconnect in between would drop the WATCH
/// without a word and let the EXEC run unguarded (a follower's write past a
/// rebuild's reset, a stray key's deletion after it became live). On this
/// one the EXEC fails instead; only a WATCH opens a connection. Shared by
/// the projection's clones: one task at a time may go from a WATCH to its
/// EXEC (the follower, `rebuild` and `verify --repair` each have their own
/// projection).
#[derive(Clone)]
struct WatchConnection {
    client: redis::Client,
    /// The connection and its number, so that a failure drops only the
    /// connection it happened on.
    conn: std::sync::Arc<tokio::sync::Mutex<Option<(u64, MultiplexedConnection)>>>,
}

impl WatchConnection {
    fn new(client: redis::Client) -> WatchConnection {
        WatchConnection {
            client,
            conn: Default::default(),
        }
    }

    /// Runs `pipe`, which starts with a WATCH (after an UNWATCH), opening
    /// the connection if there is none. When it fails on a connection that
    /// had dropped (a server `timeout`, a restart), it runs once more on a
    /// new one: nothing was watched yet.
    async fn watch<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, RedisError> {
        match self.run(pipe, true).await {
            Err(e) if e.is_io_error() || e.is_connection_dropped() => self.run(pipe, true).await,
            reply => reply,
        }
    }

    /// Runs `pipe`, the EXEC of a WATCH, on the connection the WATCH went
    /// out on; fails if it is gone.
    async fn exec<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, RedisError> {
        self.run(pipe, false).await
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        may_open: bool,
    ) -> Result<T, RedisError> {
        let (number, mut conn) = {
            let mut slot = self.conn.lock().await;
            match slot.as_ref() {
                Some(open) => open.clone(),
                None if may_open => {
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(CONNECT_TIMEOUT))
                        .set_response_timeout(Some(RESPONSE_TIMEOUT));
                    let conn = self
                        .client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    static OPENED: std::sync::atomic::AtomicU64 =
                        std::sync::atomic::AtomicU64::new(0);
                    let number = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    *slot = Some((number, conn.clone()));
                    (number, conn)
                }
                None => {
                    return Err(RedisError::from((
                        redis::ErrorKind::Io,
                        "the connection of the WATCH was lost before its EXEC",
                    )))
                }
            }
        };
        let reply = pipe.query_async(&mut conn).await;
        if reply.is_err() {
            // Whatever it watched is gone with it.
            let mut slot = self.conn.lock().await;
            if slot.as_ref().is_some_and(|(n, _)| *n == number) {
                *slot = None;
            }
        }
        reply
    }
}

/// One server, or a cluster.
#[derive(Clone)]
enum Backend {
    /// One server (or one master), through a reconnecting connection, and
    /// the one its WATCHes live on.
    Single(ConnectionManager, WatchConnection),
    Cluster(Cluster),
}

/// The key names, in one place.
#[derive(Debug, Clone)]
pub struct RedisKeys {
    prefix: String,
}

impl RedisKeys {
    /// Keys under `prefix` (empty for the legacy names).
    pub fn new(prefix: &str) -> RedisKeys {
        RedisKeys {
            prefix: prefix.to_owned(),
        }
    }

    /// `global_order_lookup:{id}`.
    pub fn lookup(&self, id: &LifecycleId) -> String {
        format!("{}global_order_lookup:{id}", self.prefix)
    }

    /// `order_lifecycle_active:{order_id}`.
    pub fn active(&self, order: &OrderId) -> String {
        format!("{}order_lifecycle_active:{order}", self.prefix)
    }

    /// Pattern matching every lookup key (for SCAN).
    pub fn lookup_pattern(&self) -> String {
        format!("{}global_order_lookup:*", self.prefix)
    }

    /// Pattern matching every active-id hash (for SCAN).
    pub fn active_pattern(&self) -> String {
        format!("{}order_lifecycle_active:*", self.prefix)
    }

    /// `order_lifecycle:projection`.
    pub fn projection(&self) -> String {
        format!("{}order_lifecycle:projection", self.prefix)
    }
}

/// The active ids of one order, as the hash holds them.
pub type ActiveIds = Vec<(IdType, LifecycleId)>;

/// Where the projection stands in the log it follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projected {
    /// The identity of the log (`log_head.log_id`).
    pub log_id: String,
    /// The last log position the keys reflect.
    pub position: i64,
    /// The `event_id` of the entry at `position` (empty at position 0): a
    /// fingerprint of the history followed.
    pub event_id: String,
}

pub(super) const PROJECTION_FIELDS: [&str; 3] = ["log_id", "position", "event_id"];

/// The record from an HMGET of [`PROJECTION_FIELDS`]; `None` unless whole.
pub(super) fn projected(fields: Vec<Option<String>>) -> Option<Projected> {
    let [Some(log_id), Some(position), Some(event_id)] =
        <[Option<String>; 3]>::try_from(fields).ok()?
    else {
        return None;
    };
    Some(Projected {
        log_id,
        position: position.parse().ok()?,
        event_id,
    })
}

impl RedisProjection {
    /// Connects with a connection manager that reconnects by itself.
    ///
    /// # Errors
    /// [`RedisError`] when the URL is invalid or the server unreachable.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisProjection, RedisError> {
        RedisProjection::with_client(redis::Client::open(url)?, prefix).await
    }

    /// Connects as `config` says: its URL, key prefix and TLS files.
    ///
    /// # Errors
    /// [`RedisError`]: a bad URL, an unreadable or invalid certificate
    /// file, or Redis unreachable (TLS refused included).
    pub async fn connect_to(config: &RedisConfig) -> Result<RedisProjection, RedisError> {
        if config.is_cluster() {
            return Ok(RedisProjection {
                backend: Backend::Cluster(Cluster::connect(config).await?),
                prefix: config.key_prefix.clone(),
            });
        }
        let Some(certificates) = tls_certificates(&config.tls)? else {
            return RedisProjection::connect(config.url.expose(), &config.key_prefix).await;
        };
        let client = redis::Client::build_with_tls(config.url.expose(), certificates)?;
        RedisProjection::with_client(client, &config.key_prefix).await
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// On a cluster, the record's copy on each master (see
    /// [`super::redis_cluster`]); empty on one server.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn record_copies(&self) -> Result<Vec<Option<Projected>>, RedisError> {
        match &self.backend {
            Backend::Single(..) => Ok(Vec::new()),
            Backend::Cluster(c) => c.record_copies().await,
        }
    }

    /// On a cluster, the generation to write under from now on (see
    /// [`super::redis_cluster`]); nothing on one server.
    pub fn set_generation(&self, generation: i64) {
        if let Backend::Cluster(c) = &self.backend {
            c.set_generation(generation);
        }
    }

    /// On a cluster, removes the slots' fences before a re-projection of
    /// another log or history (see [`super::redis_cluster`]); nothing on
    /// one server.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn forget_fences(&self) -> Result<(), RedisError> {
        match &self.backend {
            Backend::Single(..) => Ok(()),
            Backend::Cluster(c) => c.forget_fences().await,
        }
    }

    /// Whether `e` is Redis (or its TLS) refusing this service: a wrong
    /// password or user, a certificate that does not verify, a TLS file
    /// that cannot be used. A configuration error: no retry helps.
    pub fn is_refusal(e: &RedisError) -> bool {
        matches!(
            e.kind(),
            redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig
        ) || (e.kind() == redis::ErrorKind::Client && {
            let text = e.to_string().to_ascii_lowercase();
            ["certificate", "tls", "ssl", "handshake"]
                .iter()
                .any(|w| text.contains(w))
        })
    }

    async fn with_client(
        client: redis::Client,
        prefix: &str,
    ) -> Result<RedisProjection, RedisError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        Ok(RedisProjection {
            backend: Backend::Single(conn, WatchConnection::new(client)),
            prefix: prefix.to_owned(),
        })
    }

    /// Whether Redis answers (readiness), on this projection's connection.
    ///
    /// # Errors
    /// [`RedisError`] when it does not.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = match &self.backend {
            Backend::Single(c, _) => c.clone(),
            Backend::Cluster(c) => return c.ping().await,
        };
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok(())
    }

    /// The key names this projection writes.
    pub fn keys(&self) -> RedisKeys {
        RedisKeys::new(&self.prefix)
    }

    /// Where the keys stand; `None` when Redis has no record (new, flushed,
    /// or written by a version that kept no log identity).
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn projected(&self) -> Result<Option<Projected>, RedisError> {
        let mut conn = match &self.backend {
            Backend::Single(c, _) => c.clone(),
            Backend::Cluster(c) => return c.projected().await,
        };
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys().projection())
            .arg(&PROJECTION_FIELDS[..])
            .query_async(&mut conn)
            .await?;
        Ok(projected(fields))
    }

    /// The log position the keys reflect (0 when Redis has no record).
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn position(&self) -> Result<i64, RedisError> {
        Ok(self.projected().await?.map_or(0, |p| p.position))
    }

    /// [`RedisProjection::projected`], and WATCHes the record, so that the
    /// next [`RedisProjection::write`] is abandoned if it changes (a
    /// FLUSHALL, a rebuild, another writer) in between.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn watch_projected(&self) -> Result<Option<Projected>, RedisError> {
        // A cluster guards each slot with its fence instead.
        let watch = match &self.backend {
            Backend::Single(_, watch) => watch,
            Backend::Cluster(c) => return c.projected().await,
        };
        // UNWATCH first: a round that ended without writing left its WATCH
        // (and possibly its "changed" mark) on the connection.
        let key = self.keys().projection();
        let (fields,): (Vec<Option<String>>,) = watch
            .watch(
                redis::pipe()
                    .cmd("UNWATCH")
                    .ignore()
                    .cmd("WATCH")
                    .arg(&key)
                    .ignore()
                    .cmd("HMGET")
                    .arg(&key)
                    .arg(&PROJECTION_FIELDS[..]),
            )
            .await?;
        Ok(projected(fields))
    }

    /// Sets lookups, replaces the active-id hashes of `orders` and records
    /// `at`, in one MULTI/EXEC: a reader never sees a hash half rewritten,
    /// and the record never claims more than was written. Returns `false`,
    /// having written nothing, when the record changed since
    /// [`RedisProjection::watch_projected`].
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable; nothing is assumed written.
    pub async fn write(
        &self,
        lookups: &[(LifecycleId, OrderId)],
        orders: &[(OrderId, ActiveIds)],
        at: &Projected,
    ) -> Result<bool, RedisError> {
        let watch = match &self.backend {
            Backend::Single(_, watch) => watch,
            Backend::Cluster(c) => return c.write(lookups, orders, at, &self.keys()).await,
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.hset_multiple(
            self.keys().projection(),
            &[
                (PROJECTION_FIELDS[0], at.log_id.clone()),
                (PROJECTION_FIELDS[1], at.position.to_string()),
                (PROJECTION_FIELDS[2], at.event_id.clone()),
            ],
        )
        .ignore();
        self.add_key_writes(&mut pipe, lookups, orders);
        let reply: redis::Value = watch.exec(&pipe).await?;
        Ok(reply != redis::Value::Nil)
    }

    /// Forgets where the projection stands, so that the next round
    /// re-projects the whole log (keys are overwritten, never deleted).
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn reset(&self) -> Result<(), RedisError> {
        let mut conn = match &self.backend {
            Backend::Single(c, _) => c.clone(),
            Backend::Cluster(c) => return c.reset().await,
        };
        redis::cmd("DEL")
            .arg(self.keys().projection())
            .query_async(&mut conn)
            .await
    }

    /// One SCAN step over keys matching `pattern`: the next cursor (0 at the
    /// end) and the keys.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn scan(&self, cursor: u64, pattern: &str) -> Result<(u64, Vec<String>), RedisError> {
        let mut conn = match &self.backend {
            Backend::Single(c, _) => c.clone(),
            Backend::Cluster(c) => return c.scan(cursor, pattern).await,
        };
        redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(&mut conn)
            .await
    }

    /// The order each id's lookup key names (`None`: no key), in order.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn lookups(&self, ids: &[&LifecycleId]) -> Result<Vec<Option<String>>, RedisError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys();
        let names: Vec<String> = ids.iter().map(|id| keys.lookup(id)).collect();
        let mut conn = match &self.backend {
            Backend::Single(c, _) => c.clone(),
            Backend::Cluster(c) => return c.mget(names).await,
        };
        redis::cmd("MGET").arg(names).query_async(&mut conn).await
    }

    /// Each order's active-id hash as `(field, value)` pairs (empty: no
    /// hash), in order.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn active_hashes(
        &self,
        orders: &[&OrderId],
    ) -> Result<Vec<std::collections::BTreeMap<String, String>>, RedisError> {
        let keys = self.keys();
        let mut conn = match &self.backend {
            Backend::Single(c, _) => c.clone(),
            Backend::Cluster(c) => {
                return c
                    .active_hashes(orders.iter().map(|o| keys.active(o)).collect())
                    .await
            }
        };
        let mut pipe = redis::pipe();
        for order in orders {
            pipe.hgetall(keys.active(order));
        }
        pipe.query_async(&mut conn).await
    }

    /// Sets lookups and replaces active-id hashes like
    /// [`RedisProjection::write`], without moving the projected position (a
    /// repair of some orders).
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn put(
        &self,
        lookups: &[(LifecycleId, OrderId)],
        orders: &[(OrderId, ActiveIds)],
    ) -> Result<(), RedisError> {
        let mut conn = match &self.backend {
            Backend::Single(c, _) => c.clone(),
            Backend::Cluster(c) => return c.put(lookups, orders, &self.keys()).await,
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.add_key_writes(&mut pipe, lookups, orders);
        pipe.query_async::<()>(&mut conn).await
    }

    fn add_key_writes(
        &self,
        pipe: &mut redis::Pipeline,
        lookups: &[(LifecycleId, OrderId)],
        orders: &[(OrderId, ActiveIds)],
    ) {
        for (key, write) in key_writes(&self.keys(), lookups, orders) {
            write.add_to(&key, pipe);
        }
    }

    /// Watches `keys` (after dropping any earlier watch), for
    /// [`RedisProjection::delete_watched`]. The watch belongs to this
    /// projection's connection: only one task may use it in between.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn watch_keys(&self, keys: &[&String]) -> Result<(), RedisError> {
        let watch = match &self.backend {
            Backend::Single(_, watch) => watch,
            Backend::Cluster(c) => return c.watch_keys(keys).await,
        };
        let mut pipe = redis::pipe();
        pipe.cmd("UNWATCH").ignore();
        if !keys.is_empty() {
            pipe.cmd("WATCH").arg(keys).ignore();
        }
        watch.watch(&pipe).await
    }

    /// Deletes `keys` in one MULTI/EXEC, unless a key watched by
    /// [`RedisProjection::watch_keys`] changed since: then `None`, and
    /// nothing is deleted. `Some(n)`: `n` keys existed.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn delete_watched(&self, keys: &[&String]) -> Result<Option<u64>, RedisError> {
        let watch = match &self.backend {
            Backend::Single(_, watch) => watch,
            Backend::Cluster(c) => return c.delete_watched(keys).await.map(Some),
        };
        if keys.is_empty() {
            // Nothing to guard: the UNWATCH may go on a new connection.
            watch
                .watch::<()>(redis::pipe().cmd("UNWATCH").ignore())
                .await?;
            return Ok(Some(0));
        }
        let mut pipe = redis::pipe();
        pipe.atomic().del(keys);
        let reply: Option<(u64,)> = watch.exec(&pipe).await?;
        Ok(reply.map(|(n,)| n))
    }

    /// Deletes keys; returns how many existed.
    ///
    /// # Errors
    /// [`RedisError`] when Redis is unreachable.
    pub async fn delete(&self, keys: &[&String]) -> Result<u64, RedisError> {
        let mut conn = match &self.backend {
            Backend::Single(c, _) => c.clone(),
            Backend::Cluster(c) => return c.delete(keys).await,
        };
        if keys.is_empty() {
            return Ok(0);
        }
        redis::cmd("DEL").arg(keys).query_async(&mut conn).await
    }
}

/// The certificates `tls` names (`None`: no TLS files, the system's CAs).
///
/// # Errors
/// [`RedisError`] when a file cannot be read.
pub(super) fn tls_certificates(
    tls: &RedisTls,
) -> Result<Option<redis::TlsCertificates>, RedisError> {
    if tls.ca_file.is_none() && tls.cert_file.is_none() {
        return Ok(None);
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "cannot read a Redis TLS file",
                format!("{}: {e}", path.display()),
            ))
        })
    };
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        _ => None,
    };
    let root_cert = tls.ca_file.as_deref().map(read).transpose()?;
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// One key's new content.
pub(super) enum KeyWrite<'a> {
    /// A lookup key naming this order.
    Lookup(&'a str),
    /// An active-id hash replaced by these `(id type, id)` fields (none:
    /// deleted).
    Active(Vec<(&'a str, &'a str)>),
}

impl KeyWrite<'_> {
    /// Adds the write of `key` to `pipe`.
    pub(super) fn add_to(&self, key: &str, pipe: &mut redis::Pipeline) {
        match self {
            KeyWrite::Lookup(order) => {
                pipe.set(key, *order).ignore();
            }
            KeyWrite::Active(fields) => {
                pipe.del(key).ignore();
                if !fields.is_empty() {
                    pipe.hset_multiple(key, fields).ignore();
                }
            }
        }
    }
}

/// The keys that `lookups` and the active ids of `orders` write, with
/// their content.
pub(super) fn key_writes<'a>(
    keys: &'a RedisKeys,
    lookups: &'a [(LifecycleId, OrderId)],
    orders: &'a [(OrderId, ActiveIds)],
) -> impl Iterator<Item = (String, KeyWrite<'a>)> + 'a {
    let lookups = lookups
        .iter()
        .map(|(id, order)| (keys.lookup(id), KeyWrite::Lookup(order.as_str())));
    let hashes = orders.iter().map(|(order, active)| {
        let fields = active
            .iter()
            .map(|(t, id)| (t.as_str(), id.as_str()))
            .collect();
        (keys.active(order), KeyWrite::Active(fields))
    });
    lookups.chain(hashes)
}
